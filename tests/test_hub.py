"""The hub: a model card built offline from a real run folder; pushing fails with one clear line here."""

import pytest

from p2d.config import STAGES, RunConfig
from p2d.errors import UserError
from p2d.hub import model_card, push_run
from p2d.pipeline import Run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    from p2d.models import load_model

    from conftest import _save, _tiny_llama

    model_dir = _save(_tiny_llama(len(tokenizer)), tokenizer, tmp_path_factory.mktemp("tiny-hub"))
    out = tmp_path_factory.mktemp("hub-run")
    cfg = RunConfig(model=model_dir, device="cpu", pool_size=40, probe_size=8, eval_size=4, batch_size=4,
                    max_length=64, head_ratio=0.25, data_ratio=0.2, steps=2, max_new_tokens=3, head_method="random",
                    select_method="random", report_to="none", out=str(out))
    Run(cfg, lm=load_model(model_dir, device="cpu")).run(STAGES)
    return out


@pytest.mark.slow
def test_model_card_says_what_was_trained_and_measured(run_dir):
    card = model_card(run_dir, "me/tiny-p2d")
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    assert "AutoPeftModelForCausalLM.from_pretrained(\"me/tiny-p2d\")" in card
    assert "4 of 16 query heads" in card and "kept 8 of 40 rows" in card
    assert "| exact match |" in card and "Alignment Efficiency Ratio" in card
    assert "2 steps (1 epochs over the 8 selected rows)" in card


@pytest.mark.slow
def test_push_without_network_or_token_is_one_clear_line(run_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        push_run(run_dir, "me/tiny-p2d")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(run_dir / "no-hf-home"))  # no stored token either
    with pytest.raises(UserError, match="token"):
        push_run(run_dir, "me/tiny-p2d")


def test_push_needs_a_trained_adapter(tmp_path):
    with pytest.raises(UserError, match="no trained adapter"):
        push_run(tmp_path, "me/x")
