"""Write a model, with a head adapter merged in, as one GGUF file (llama.cpp, Ollama, LM Studio), with the
``gguf`` package.

Supported: Llama-family models (transformers' ``LlamaForCausalLM``: Llama 2/3, SmolLM, TinyLlama, the
embedded SmolLM2) with the default rotary embedding (no ``rope_scaling``), without attention or MLP
biases, and a fast tokenizer (``tokenizer.json``) of one of the two kinds llama.cpp reads: byte-level BPE
(GGUF tokenizer model ``gpt2``) or sentencepiece-style BPE with byte fallback (``llama``). Other
architectures, rope scaling (Llama 3.1's ``llama3``), biases and quantised bases are refused with a
one-line message.

Types (`GGUF_TYPES`): ``f32``, ``f16`` (default), ``bf16`` and ``q8_0``, the types llama.cpp's own
converter writes; 1-D tensors (the norms) are always f32, and with q8_0 a matrix whose rows are not a
multiple of 32 values is written f16. For k-quants (Q4_K_M, ...) run llama.cpp's ``llama-quantize`` on
the f16 file.

Layout, as llama.cpp's converter writes it: tensor names from ``gguf.get_tensor_name_map``; the rows of
q_proj and k_proj permuted per head so the two rotary halves are interleaved in pairs (llama.cpp's rope
order; transformers' GGUF reader undoes it); no ``output.weight`` when the embeddings are tied; the
tokenizer's tokens, token types, merges or scores, special token ids and chat template as
``tokenizer.*`` metadata. ``tokenizer.ggml.pre`` (llama.cpp's name for a BPE pre-tokenizer) is copied
from the source GGUF when the model came from one (the embedded model does); otherwise it is left out
and llama.cpp falls back to its default pre-tokenizer with a warning.

Tested: transformers' GGUF loader (``from_pretrained(folder, gguf_file=name)``) reads the file back and
its logits equal the merged model's (tests/test_gguf_export.py: f32 to 1e-5, f16 and bf16 and q8_0 within
the stated tolerances). Not tested here: loading in llama.cpp itself.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .files import atomic_dir, write_json

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_TYPE = "f16"
SUPPORTED = ("llama",)  # transformers model_type values


def gguf_name(outtype: str) -> str:
    """The file name the export writes into its folder."""
    return f"model-{outtype}.gguf"


def check_exportable(model, outtype: str = DEFAULT_TYPE) -> None:
    """UserError unless `export_gguf` supports ``model`` and ``outtype`` (see the module docstring)."""
    from .models import is_quantized

    if outtype not in GGUF_TYPES:
        raise UserError(f"GGUF type {outtype!r} is not supported: use one of {', '.join(GGUF_TYPES)} (for k-quants "
                        "run llama.cpp's llama-quantize on the f16 file)")
    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        raise UserError(f"GGUF export supports Llama-family models so far, not {cfg.model_type!r}: export the PEFT "
                        "adapter or a merged folder and convert it with llama.cpp's convert_hf_to_gguf.py")
    rope = _rope(cfg)
    if rope.get("rope_type", "default") not in ("default", None):
        raise UserError(f"GGUF export does not handle rope scaling ({rope.get('rope_type')}) yet: convert a merged "
                        "folder with llama.cpp's convert_hf_to_gguf.py")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise UserError("GGUF export does not handle attention or MLP biases yet: convert a merged folder with "
                        "llama.cpp's convert_hf_to_gguf.py")
    if is_quantized(model):
        raise UserError("cannot export a quantised base as GGUF: load the model without quantisation (quantize none)")


def _rope(cfg) -> dict:
    """The rotary settings (transformers 5 keeps them in ``rope_parameters``; older configs at top level)."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    scaling = getattr(cfg, "rope_scaling", None)
    if scaling and not params.get("rope_type"):
        params.update(scaling)
    params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return params


def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection per head: [first rotary half, second half] -> interleaved pairs."""
    out_features = w.shape[0]
    return w.reshape(n_heads, 2, out_features // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _encode(name: str, w: torch.Tensor, outtype: str):
    """(data, raw type or None) of one tensor in the file's type (norms and vectors stay f32)."""
    import gguf

    data = w.detach().to("cpu", torch.float32).numpy()
    if data.ndim < 2 or outtype == "f32":
        return data, None
    if outtype == "f16" or (outtype == "q8_0" and data.shape[-1] % 32):
        return data.astype(np.float16), None
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    return gguf.quants.quantize(data, qtype), qtype


def _source_gguf(spec: str) -> Path | None:
    """The GGUF file a model spec was loaded from (the embedded model's package file, or a .gguf spec)."""
    from .models import DEFAULT_SPEC, embedded_gguf_path, resolve_spec

    if str(spec) == DEFAULT_SPEC:
        return embedded_gguf_path()
    try:
        resolved = resolve_spec(spec)
    except UserError:
        return None
    return Path(resolved.location) / resolved.gguf_file if resolved.kind == "gguf" else None


def _pre_tokenizer(spec: str) -> str | None:
    path = _source_gguf(spec)
    if path is None:
        return None
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def _add_vocab(writer, tokenizer, n_vocab: int, pre: str | None) -> str:
    """The tokenizer as ``tokenizer.*`` metadata; returns its GGUF tokenizer model (gpt2 or llama)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("GGUF export needs a fast tokenizer (tokenizer.json); this model has a slow one")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export handles BPE tokenizers (byte-level or with byte fallback), not "
                        f"{model.get('type')}: convert a merged folder with llama.cpp's convert_hf_to_gguf.py")
    with tempfile.TemporaryDirectory(prefix="p2d-gguf-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        if model.get("byte_fallback"):  # sentencepiece-style (Llama 2, TinyLlama): tokens with scores and types
            kind = "llama"
            vocab = gguf.LlamaHfVocab(Path(tmp))
            tokens, scores, types = [], [], []
            for text, score, ttype in vocab.all_tokens():
                tokens.append(text)
                scores.append(score)
                types.append(ttype)
            for i in range(len(tokens), n_vocab):
                tokens.append(f"[PAD{i}]".encode())
                scores.append(-1000.0)
                types.append(gguf.TokenType.UNUSED)
            writer.add_tokenizer_model(kind)
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            special = gguf.SpecialVocab(tmp, load_merges=False, n_vocab=n_vocab)
        else:  # byte-level BPE (GPT-2 style: Llama 3, SmolLM): the vocabulary as stored, and the merges
            kind = "gpt2"
            ids = tokenizer.get_vocab()
            by_id = {i: t for t, i in ids.items()}
            added = tokenizer.added_tokens_decoder
            tokens, types = [], []
            for i in range(n_vocab):
                if i not in by_id:
                    tokens.append(f"[PAD{i}]")
                    types.append(gguf.TokenType.UNUSED)
                    continue
                tokens.append(by_id[i])
                types.append(gguf.TokenType.NORMAL if i not in added else
                             gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            writer.add_tokenizer_model(kind)
            if pre:
                writer.add_tokenizer_pre(pre)
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=n_vocab)
        for which, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
            if which not in special.add_special_token:  # what the tokenizer does, when its config does not say
                ids = tokenizer("a")["input_ids"]
                special.add_special_token[which] = token_id is not None and \
                    (ids[:1] if which == "bos" else ids[-1:]) == [token_id]
        special.add_to_gguf(writer, quiet=True)
        if special.chat_template is None and getattr(tokenizer, "chat_template", None):
            writer.add_chat_template(tokenizer.chat_template)
        if kind == "gpt2":
            writer.add_add_space_prefix(bool((spec.get("pre_tokenizer") or {}).get("add_prefix_space", False)))
    return kind


def _write(model, tokenizer, path: Path, outtype: str, name: str, pre: str | None) -> dict:
    import gguf

    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    n_vocab = model.get_input_embeddings().weight.shape[0]
    rope = _rope(cfg)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    if head_dim * n_heads != cfg.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    kind = _add_vocab(writer, tokenizer, n_vocab, pre)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    counts: dict[str, int] = {}
    with torch.no_grad():
        for key, w in model.state_dict().items():
            if tied and key == "lm_head.weight":
                continue  # llama.cpp uses token_embd for the output when there is no output.weight
            target = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise UserError(f"GGUF export: no GGUF name for the tensor {key} of this model")
            if key.endswith("self_attn.q_proj.weight"):
                w = _permute(w, n_heads)
            elif key.endswith("self_attn.k_proj.weight"):
                w = _permute(w, n_kv)
            data, raw = _encode(target, w, outtype)
            writer.add_tensor(target, data, raw_dtype=raw)
            counts[raw.name if raw is not None else str(data.dtype)] = counts.get(
                raw.name if raw is not None else str(data.dtype), 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tokenizer": kind, "pre_tokenizer": pre, "tied_embeddings": tied, "tensor_types": counts}


def export_gguf(lm, adapter_dir, out_dir, outtype: str = DEFAULT_TYPE, name: str | None = None) -> Path:
    """Write ``lm``'s model with the head adapter of ``adapter_dir`` merged in (``None``: the model as it is) to
    ``out_dir/model-<outtype>.gguf``, with ``p2d_export.json`` (heads, type, tokenizer) next to it. ``out_dir``
    must not exist or be empty; ``lm.model`` is left as it was. Returns the folder."""
    from . import __version__
    from .adapter import AdapterConfig, merged_weights

    check_exportable(lm.model, outtype)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out_dir} already exists and is not empty: choose a new folder or delete it first")
    name = name or Path(str(lm.spec)).name or "model"
    pre = _pre_tokenizer(lm.spec)
    adapter = AdapterConfig.read(adapter_dir) if adapter_dir is not None else None
    if out.exists():
        out.rmdir()  # empty (checked above): atomic_dir creates it whole
    with atomic_dir(out) as tmp:
        if adapter_dir is not None:
            with merged_weights(lm, adapter_dir):
                info = _write(lm.model, lm.tokenizer, tmp / gguf_name(outtype), outtype, name, pre)
        else:
            info = _write(lm.model, lm.tokenizer, tmp / gguf_name(outtype), outtype, name, pre)
        write_json(tmp / "p2d_export.json", {
            "exported_by": f"p2d {__version__}", "format": "gguf", "type": outtype, "file": gguf_name(outtype),
            "base_model": str(lm.spec), "source_adapter": str(adapter_dir) if adapter_dir is not None else None,
            "heads": adapter.heads if adapter else None, "projections": adapter.projections if adapter else None,
            **info}, indent=2)
    return out
