import shlex

import pytest
import torch

from p2d.config import RunConfig
from p2d.cost import aer, full_finetune_cost, reference_steps
from p2d.data.loading import load_records
from p2d.errors import UserError


def test_config_yaml_round_trip_and_command(tmp_path):
    cfg = RunConfig(model="m", steps=7, lr=5e-4, projections=["q", "o"], columns={"prompt": "q", "answer": "a"})
    path = cfg.save(tmp_path / "c.yaml")
    again = RunConfig.load(path)
    assert again == cfg
    cmd = shlex.split(cfg.to_command())
    assert cmd[:4] == ["python", "-m", "p2d", "run"]
    assert cmd[cmd.index("--steps") + 1] == "7" and cmd[cmd.index("--projections") + 1] == "q,o"
    assert "--batch-size" not in cmd  # defaults are left out


def test_config_command_reparses_to_same_config(capsys, tmp_path):
    from p2d.cli import build_parser

    cfg = RunConfig(steps=5, head_method="random", data_ratio=0.2, projections=["q", "k"], trust_remote_code=True)
    args = build_parser().parse_args(shlex.split(cfg.to_command())[3:])
    assert args.steps == 5 and args.head_method == "random" and args.data_ratio == 0.2
    assert args.projections == "q,k" and args.trust_remote_code is True


@pytest.mark.parametrize("bad, match", [
    ({"head_method": "nope"}, "head method"),
    ({"data_ratio": 0}, "data-ratio"),
    ({"projections": ["x"]}, "projections"),
    ({"pool": "p.jsonl"}, "probe"),
    ({"target": "no-such-task"}, "target"),
    ({"steps": 0}, "steps"),
])
def test_config_validation(bad, match):
    with pytest.raises(UserError, match=match):
        RunConfig(**bad).validate()


def test_config_rejects_unknown_keys_and_bad_yaml():
    with pytest.raises(UserError, match="unknown setting"):
        RunConfig.from_yaml("stepz: 3\n")
    with pytest.raises(UserError, match="YAML"):
        RunConfig.from_yaml("a: [unclosed\n")
    with pytest.raises(UserError, match="mapping"):
        RunConfig.from_yaml("- 1\n- 2\n")


def test_reference_steps():
    assert reference_steps(1000, 8, 1) == 125
    assert reference_steps(1000, 8, 2.5) == 313
    assert reference_steps(3, 8, 1) == 1


def test_aer_arithmetic():
    r = aer(10, 20, 30, 600)
    assert r["aer"] == pytest.approx(0.1) and r["speedup"] == pytest.approx(10)


def test_full_finetune_estimate_leaves_weights_identical(tiny_llama):
    pool = load_records([{"question": f"q{i} " * (i % 5 + 1), "answer": f"a{i}"} for i in range(20)]).samples
    before = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    flags = [p.requires_grad for p in tiny_llama.model.parameters()]
    est = full_finetune_cost(tiny_llama, pool, epochs=2, batch_size=4, max_length=64, timed_steps=2)
    assert est.mode == "estimated" and est.steps == 10 and est.timed_steps == 2
    assert est.time_s == pytest.approx(est.s_per_step * 10)
    assert est.trainable_params == sum(p.numel() for p in tiny_llama.model.parameters())
    assert est.optimizer_state_bytes == 2 * 4 * est.trainable_params  # AdamW fp32: exp_avg + exp_avg_sq
    after = tiny_llama.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in tiny_llama.model.parameters()] == flags
    assert all(p.grad is None for p in tiny_llama.model.parameters())


def test_full_finetune_measured(tiny_llama):
    pool = load_records([{"question": f"q{i}", "answer": f"a{i}"} for i in range(8)]).samples
    m = full_finetune_cost(tiny_llama, pool, epochs=1, batch_size=4, max_length=32, mode="measure")
    assert m.mode == "measured" and m.steps == 2 and m.time_s > 0


def test_estimate_rescales_to_other_epochs(tiny_llama):
    pool = load_records([{"question": f"q{i}", "answer": f"a{i}"} for i in range(16)]).samples
    est = full_finetune_cost(tiny_llama, pool, epochs=1, batch_size=4, max_length=32, timed_steps=1)
    three = est.for_epochs(3)
    assert three.steps == 12 and three.epochs == 3 and three.mode == "estimated"
    assert three.time_s == pytest.approx(est.s_per_step * 12) and three.s_per_step == est.s_per_step
