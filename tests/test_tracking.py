"""Experiment tracking: TensorBoard scalars read back from a real tiny run; clear errors otherwise."""

import importlib.util

import pytest

from p2d.config import STAGES, RunConfig
from p2d.errors import UserError
from p2d.pipeline import Run
from p2d.tracking import open_tracker


@pytest.mark.slow
def test_tensorboard_scalars_read_back(tiny_llama, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = RunConfig(model=tiny_llama.spec, device="cpu", pool_size=40, probe_size=8, eval_size=4, batch_size=4,
                    max_length=64, head_ratio=0.25, data_ratio=0.2, steps=3, max_new_tokens=3, head_method="random",
                    select_method="random", val_ratio=0.25, val_every=1, report_to="tensorboard",
                    out=str(tmp_path / "run"))
    Run(cfg, lm=tiny_llama).run(STAGES)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm", "train/val_loss", "eval/loss_before",
            "eval/loss_after", "cost/aer", "time/train_s", "time/full_reference_s"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert acc.Scalars("cost/aer")[0].value > 0


def test_auto_and_none(tmp_path):
    t = open_tracker("none", tmp_path, {})
    t.log({"x": 1.0}, step=1)
    t.close()
    auto = open_tracker("auto", tmp_path, {})
    assert auto.kind == ("tensorboard" if importlib.util.find_spec("tensorboard") else "none")
    auto.close()
    with pytest.raises(UserError, match="report_to must be one of"):
        open_tracker("mlflow", tmp_path, {})


@pytest.mark.parametrize("kind", ["trackio", "wandb"])
def test_missing_tracker_package_is_a_clear_error(kind, tmp_path):
    if importlib.util.find_spec(kind) is not None:
        pytest.skip(f"{kind} is installed here")
    with pytest.raises(UserError, match=rf"pip install 'p2d-studio\[track\]' \(or {kind};"):
        open_tracker(kind, tmp_path, {})
