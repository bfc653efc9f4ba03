"""Shared fixtures: the real SmolLM2 tokenizer and tiny random-initialised models built here.

Tiny models are real transformers models (Llama with GQA, GPT-2) with a few layers, saved to a
temporary folder so they load through the same model-spec path users take.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one torch thread unless the environment says otherwise: the tiny test models are dominated by per-operation
# overhead, and on a shared 2-core machine a second thread mostly waits (measured: a gradient head-scoring test
# took 11.4 s with torch's default threads and 0.3 s with one)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer (ChatML template, pad == eos)."""
    from p2d.models import load_tokenizer

    return load_tokenizer("default")


def _tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def _tiny_gpt2(vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=3, n_head=4, n_positions=512)
    return GPT2LMHeadModel(cfg)


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tokenizer, tmp_path_factory):
    """Folder of a tiny Llama (4 layers, 4 query heads, 2 kv heads, head_dim 16) + the real tokenizer."""
    return _save(_tiny_llama(len(tokenizer)), tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tokenizer, tmp_path_factory):
    """Folder of a tiny GPT-2 (3 layers, 4 heads, fused c_attn) + the real tokenizer."""
    return _save(_tiny_gpt2(len(tokenizer)), tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture()
def tiny_llama(tiny_llama_dir):
    """A freshly loaded tiny Llama (LoadedModel), safe to modify in the test."""
    from p2d.models import load_model

    return load_model(tiny_llama_dir, device="cpu")


@pytest.fixture()
def tiny_gpt2(tiny_gpt2_dir):
    from p2d.models import load_model

    return load_model(tiny_gpt2_dir, device="cpu")


@pytest.fixture(scope="module")
def default_is_tiny(tiny_llama_dir):
    """The embedded model spec ("default") loads the tiny Llama in the requesting module (its apps and runs)."""
    import p2d.pipeline
    from p2d.models import load_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(p2d.pipeline, "default_loader",
                   lambda config: load_model(tiny_llama_dir if config.model == "default" else config.model,
                                             device="cpu"))
        yield tiny_llama_dir


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct, loaded once per session (do not modify it in tests)."""
    from p2d.models import load_model

    return load_model("default", device="cpu")
