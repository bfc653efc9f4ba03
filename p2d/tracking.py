"""Experiment tracking: a run's training curve, evaluation and AER sent to TensorBoard, Trackio or W&B.

``report_to`` (RunConfig):

- ``auto`` (default): TensorBoard event files in ``<run folder>/tensorboard`` when the
  ``tensorboard`` package is installed, else nothing;
- ``tensorboard``: the same, and an error when the package is missing;
- ``trackio``: ``trackio.init/log/finish`` (local-first; ``TRACKIO_DIR`` or its default folder);
- ``wandb``: ``wandb.init/log/finish`` in project ``$WANDB_PROJECT`` (default ``p2d``); needs
  ``WANDB_API_KEY``, a ``wandb login``, or ``WANDB_MODE=offline``;
- ``none``.

Logged: per training step ``train/loss``, ``train/lr``, ``train/tokens_per_s``, ``train/grad_norm``
(and ``train/val_loss`` when a validation share is set); per stage its time; ``eval/*_before`` and
``eval/*_after`` (exact match, contains, answer loss); ``cost/aer``, ``cost/speedup`` and the
reference time. Trackers are used through their own libraries, imported only when chosen.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import UserError

# each tracker's package is optional and imported when that tracker opens

REPORT_TO = ("auto", "none", "tensorboard", "trackio", "wandb")
TENSORBOARD_DIR = "tensorboard"


class Tracker:
    """No tracking (and the interface of the others)."""

    kind = "none"

    def log(self, values: dict, step: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    kind = "tensorboard"

    def __init__(self, folder: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)

    def log(self, values: dict, step: int | None = None) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class TrackioTracker(Tracker):
    kind = "trackio"

    def __init__(self, name: str, config: dict):
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "p2d"), name=name, config=config)

    def log(self, values: dict, step: int | None = None) -> None:
        self.trackio.log(_numbers(values), step=step)

    def close(self) -> None:
        self.trackio.finish()


class WandbTracker(Tracker):
    kind = "wandb"

    def __init__(self, name: str, config: dict, folder: Path):
        import wandb

        mode = os.environ.get("WANDB_MODE", "")
        if mode not in ("offline", "disabled") and not os.environ.get("WANDB_API_KEY") and not _wandb_netrc():
            raise UserError("report_to wandb needs a W&B login (wandb login, or WANDB_API_KEY) or WANDB_MODE=offline")
        folder.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "p2d"), name=name, config=config,
                                  dir=str(folder), reinit="finish_previous")
        except Exception as exc:  # noqa: BLE001 - wandb raises its own error types (network, auth)
            raise UserError(f"W&B could not start ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                            "check the login and the network, or use WANDB_MODE=offline") from None

    def log(self, values: dict, step: int | None = None) -> None:
        self.run.log(_numbers(values), step=step)

    def close(self) -> None:
        self.run.finish()


def _numbers(values: dict) -> dict:
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _wandb_netrc() -> bool:
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return "api.wandb.ai" in path.read_text(encoding="utf-8")
    except OSError:
        return False


def _need(package: str, kind: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise UserError(f"report_to {kind} needs the {package} package: pip install 'p2d-studio[track]' (or {package}; or "
                        "report_to none)")


def open_tracker(kind: str, run_dir, config: dict, name: str | None = None) -> Tracker:
    """The tracker ``kind`` (see the module docstring) for the run in ``run_dir``."""
    if kind not in REPORT_TO:
        raise UserError(f"report_to must be one of {', '.join(REPORT_TO)}, got {kind!r}")
    run_dir = Path(run_dir)
    name = name or run_dir.name
    if kind == "auto":
        kind = "tensorboard" if importlib.util.find_spec("tensorboard") is not None else "none"
    if kind == "none":
        return Tracker()
    if kind == "tensorboard":
        _need("tensorboard", kind)
        return TensorBoardTracker(run_dir / TENSORBOARD_DIR, config)
    if kind == "trackio":
        _need("trackio", kind)
        return TrackioTracker(name, config)
    _need("wandb", kind)
    return WandbTracker(name, config, run_dir)


def stage_values(stage: str, result) -> dict:
    """What a finished stage reports (tracker keys -> numbers)."""
    if result is None:
        return {}
    if stage in ("heads", "select", "train"):
        return {f"time/{stage}_s": getattr(result, "time_s", None)}
    if stage in ("eval_before", "eval_after"):
        when = stage.split("_")[1]
        return {f"eval/accuracy_{when}": result.accuracy, f"eval/contains_{when}": result.contains,
                f"eval/loss_{when}": result.loss}
    if stage == "reference":
        return {"time/full_reference_s": result.time_s}
    return {}
