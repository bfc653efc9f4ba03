"""Run settings (normalisation, YAML and command-line round trips) and the AER's reference cost."""

import shlex

import pytest
import torch

from p2d.config import RunConfig
from p2d.cost import aer, aer_ratio, full_finetune_cost, reference_steps, stratified_sample, fit_line
from p2d.data.loading import load_records
from p2d.errors import UserError

# every setting away from its default (a value each field accepts)
EVERY = dict(model="org/model", device="cpu", dtype="bf16", trust_remote_code=True, quantize="4bit",
             pool="p.jsonl", probe="q.jsonl", eval="e.jsonl", columns={"prompt": "q", "answer": "a"},
             target="units", pool_size=7, probe_size=3, eval_size=2, other_eval_size=2, seed=5, max_length=64, batch_size=3,
             head_method="random", head_ratio=0.25, positions="content", adapter="offset", select_method="random",
             data_ratio=0.3, hidden_layer=3, min_head_layer=1, max_head_layer=5, epochs=2.5, steps=7,
             max_steps=9, lr=2e-4, grad_accum=2, warmup_ratio=0.1, weight_decay=0.01, max_grad_norm=0.5,
             checkpoint_every=5, scheduler="linear", gradient_checkpointing=True, val_ratio=0.2, val_every=3,
             projections=["q", "o"], eval_limit=4, max_new_tokens=6, reference_epochs=1.5, inference_precision="int8",
             heads_precision="bf16", full_ft="measure", report_to="none", out="x/y")


def _parsed(cfg: RunConfig, command: str = "run") -> RunConfig:
    from p2d.cli import _group_fields, build_parser, config_from_args, COMMAND_GROUPS

    args = build_parser().parse_args(shlex.split(cfg.to_command(command))[3:])
    return config_from_args(args, _group_fields(COMMAND_GROUPS[command]))


def test_every_field_is_covered():
    from dataclasses import fields

    assert set(EVERY) == {f.name for f in fields(RunConfig)}
    default = RunConfig()
    assert all(getattr(default, k) != v for k, v in EVERY.items())


def test_yaml_round_trip_every_field(tmp_path):
    cfg = RunConfig(**EVERY)
    again = RunConfig.load(cfg.save(tmp_path / "c.yaml"))
    assert again == cfg and again.to_dict() == cfg.to_dict()


def test_command_round_trip_every_field():
    cfg = RunConfig(**EVERY)
    assert _parsed(cfg) == cfg
    assert _parsed(RunConfig()) == RunConfig().validate()


def test_train_by_epochs_round_trips():
    """Regression: steps unset + epochs 3 used to print a command that trained 100 steps."""
    cfg = RunConfig(epochs=3)
    cmd = cfg.to_command()
    assert "--epochs 3.0" in cmd and "--steps" not in cmd
    back = _parsed(cfg)
    assert back.steps is None and back.epochs == 3.0 and back.train_epochs == 3.0
    # an explicit "not set" overrides a file value, and 0 means "not set" as in the app
    assert RunConfig(steps="none").steps is None and RunConfig(steps=0).steps is None
    assert RunConfig(steps="12").steps == 12
    assert RunConfig().train_epochs == RunConfig().reference_epochs  # default: as many passes as the reference


def test_values_are_normalised_in_one_place():
    cfg = RunConfig(projections="o, q", quantize="none", columns="prompt=q, answer=a", pool_size="50",
                    head_ratio="0.2", trust_remote_code="true", dtype="BF16", eval_limit=0)
    assert cfg.projections == ["q", "o"] and cfg.quantize is None
    assert cfg.columns == {"prompt": "q", "answer": "a"} and cfg.pool_size == 50 and cfg.head_ratio == 0.2
    assert cfg.trust_remote_code is True and cfg.dtype == "bf16" and cfg.eval_limit is None


@pytest.mark.parametrize("bad, match", [
    ({"head_method": "nope"}, r"Head scoring method \(head_method\) must be one of"),
    ({"data_ratio": 0}, r"data_ratio\) must be above 0"),
    ({"head_ratio": 1.5}, r"head_ratio\) must be at most 1"),
    ({"projections": ["x"]}, r"projections\) must be a non-empty subset of q, k, v, o"),
    ({"projections": ""}, "projections"),
    ({"target": "no-such-task"}, "target"),
    ({"steps": -1}, r"steps\) must be at least 1"),
    ({"pool_size": "ten"}, "whole number"),
    ({"lr": "nan"}, "finite"),
    ({"quantize": "3bit"}, "quantize"),
    ({"device": "tpu"}, "device"),
    ({"full_ft": "guess"}, "full_ft"),
    ({"columns": "prompt"}, "key=column"),
])
def test_config_validation(bad, match):
    with pytest.raises(UserError, match=match):
        RunConfig(**bad).validate()


def test_pool_needs_probe_to_score_heads():
    config = RunConfig(pool="p.jsonl").validate()  # heads given from elsewhere need no probe
    with pytest.raises(UserError, match="probe"):
        config.require_probe()
    assert RunConfig(pool="p.jsonl", probe="q.jsonl").validate().require_probe().probe == "q.jsonl"


def test_config_rejects_unknown_keys_and_bad_yaml():
    with pytest.raises(UserError, match="unknown setting"):
        RunConfig.from_yaml("stepz: 3\n")
    with pytest.raises(UserError, match="YAML"):
        RunConfig.from_yaml("a: [unclosed\n")
    with pytest.raises(UserError, match="mapping"):
        RunConfig.from_yaml("- 1\n- 2\n")


def test_stage_settings_split():
    cfg = RunConfig()
    assert "lr" in cfg.stage_settings("train") and "lr" not in cfg.stage_settings("reference")
    assert "reference_epochs" in cfg.stage_settings("reference")
    for key in ("steps", "epochs", "max_steps", "lr"):
        assert key not in cfg.stage_settings("reference")  # the reference never follows P2D's length


# -- cost ----------------------------------------------------------------------------------------
def test_reference_steps_and_sampling():
    assert reference_steps(125, 1) == 125 and reference_steps(125, 2.5) == 313 and reference_steps(1, 0.1) == 1
    sizes = [5, 1, 9, 3, 7, 2]
    pick = stratified_sample(sizes, 3)
    assert [sizes[i] for i in pick] == sorted([sizes[i] for i in pick]) or len(pick) == 3
    assert min(sizes[i] for i in pick) == 1 and max(sizes[i] for i in pick) == 9
    a, b, cov, _ = fit_line([1, 2, 3, 4], [3, 5, 7, 9])
    assert a == pytest.approx(1) and b == pytest.approx(2) and cov[1][1] == pytest.approx(0, abs=1e-12)


def test_aer_arithmetic():
    r = aer(10, 20, 30, 600)
    assert r["aer"] == pytest.approx(0.1) and r["speedup"] == pytest.approx(10)
    # one rule for a missing reference: no AER (not infinity), in a run's metrics and in every cell
    assert aer(10, 20, 30, 0) == {"aer": None, "speedup": None, "time_p2d_s": 60}
    assert aer_ratio(60, None) is None and aer_ratio(60, 120) == 0.5


def _pool(n, vary=True):
    return load_records([{"question": f"q{i} " * ((i % 5 + 1) if vary else 1), "answer": f"a{i}"}
                         for i in range(n)]).samples


def test_full_finetune_estimate_leaves_weights_identical(tiny_llama):
    before = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    flags = [p.requires_grad for p in tiny_llama.model.parameters()]
    est = full_finetune_cost(tiny_llama, _pool(20), epochs=2, batch_size=4, max_length=64, timed_steps=3)
    assert est.mode == "estimated" and est.steps == 10 and est.timed_steps == 3 and est.n_pool == 20
    assert est.time_s > 0 and est.stderr_s is not None and est.stderr_s >= 0
    assert est.time_s == pytest.approx(est.s_per_step * 10)
    assert est.trainable_params == sum(p.numel() for p in tiny_llama.model.parameters())
    assert est.optimizer_state_bytes == 2 * 4 * est.trainable_params  # AdamW fp32: exp_avg + exp_avg_sq
    after = tiny_llama.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in tiny_llama.model.parameters()] == flags
    assert all(p.grad is None for p in tiny_llama.model.parameters())


def test_reference_with_non_finite_gradients_leaves_weights_identical(tiny_llama):
    """A NaN gradient must not reach the weights, even with lr=0 (0 * NaN = NaN)."""
    model = tiny_llama.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w = model.model.layers[1].self_attn.q_proj.weight
    handle = w.register_hook(lambda g: g * float("nan"))
    try:
        m = full_finetune_cost(tiny_llama, _pool(12), epochs=1, batch_size=4, max_length=64, mode="measure")
    finally:
        handle.remove()
    assert m.skipped_steps == m.steps == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_full_finetune_measured(tiny_llama):
    m = full_finetune_cost(tiny_llama, _pool(8), epochs=1, batch_size=4, max_length=32, mode="measure")
    assert m.mode == "measured" and m.steps == 2 and m.timed_steps == 2 and m.time_s > 0 and m.stderr_s is None


def test_reference_tokens_follow_the_pool_not_the_sample(tiny_llama):
    short = full_finetune_cost(tiny_llama, _pool(16, vary=False), epochs=1, batch_size=4, max_length=64,
                               timed_steps=2)
    long = full_finetune_cost(tiny_llama, _pool(16, vary=True), epochs=1, batch_size=4, max_length=64, timed_steps=2)
    assert long.tokens > short.tokens and long.steps == short.steps == 4


def test_the_paper_preset_names_p2d_as_the_paper_describes_it():
    """p2d-paper stays P2D (gate-gradient heads, their activation selects, their q/k/v/o slices train) even
    where the defaults are changed by the rule judged by training."""
    from p2d.config import RunConfig

    c = RunConfig.preset("p2d-paper", target="dates")
    assert (c.head_method, c.select_method, c.adapter_name) == ("gradient_logratio", "activation", "qkvo")
    assert (c.head_ratio, c.data_ratio, c.min_head_layer, c.max_head_layer) == (0.1, 0.1, None, None)
    assert c.target == "dates"  # changes go on top
