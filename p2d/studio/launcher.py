"""Training with several processes from the app: ``accelerate launch`` as a subprocess (LLaMA-Factory's
pattern), with the run's own settings file, followed through the run folder.

`launch_training(run, processes, job)` writes the run's settings to ``<run>/launch-config.yaml`` and
starts ``accelerate launch --multi_gpu --num_processes N -m p2d train --config ... --out <run>``
(``--multi_gpu`` is what starts several processes with torchrun, on GPUs or, with gloo, on CPUs). The
subprocess writes ``train_log.jsonl`` and ``adapter/`` into the run folder as one process would, so the
Train tab's live charts read it as usual. A stop request sends SIGINT to the training processes (not
the launcher), which agree to stop after the same step and save the adapter. A failure is a one-line
UserError with the subprocess's last error line; its whole output is in ``<run>/launch.log``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from p2d.errors import UserError

LAUNCH_CONFIG = "launch-config.yaml"
LAUNCH_LOG = "launch.log"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(run, processes: int) -> list[str]:
    """The launch command for ``run`` (a `p2d.pipeline.Run`) with ``processes`` processes."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(int(processes)),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), "-m", "p2d", "train", "--config", str(Path(run.out) / LAUNCH_CONFIG),
            "--out", str(run.out)]


def _interrupt_workers(proc: subprocess.Popen) -> None:
    import psutil

    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        workers = []
    for w in workers:
        try:
            w.send_signal(signal.SIGINT)
        except psutil.Error:
            pass


def launch_training(run, processes: int, job, poll_s: float = 0.5) -> int:
    """Train ``run`` in ``processes`` processes and wait; the return code (0: trained or stopped and saved)."""
    out = Path(run.out)
    run.config.save(out / LAUNCH_CONFIG)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(out / LAUNCH_LOG, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(command(run, processes), stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=os.getcwd(), start_new_session=True)
        interrupted = False
        while proc.poll() is None:
            if job.should_stop() and not interrupted:
                _interrupt_workers(proc)
                interrupted = True
            time.sleep(poll_s)
    if proc.returncode != 0 and not interrupted:
        lines = [ln for ln in (out / LAUNCH_LOG).read_text(encoding="utf-8", errors="replace").splitlines()
                 if ln.startswith("error:")]
        last = lines[-1][len("error:"):].strip() if lines else f"exit code {proc.returncode}"
        raise UserError(f"training with {processes} processes failed: {last} (the whole output: {out / LAUNCH_LOG})")
    return proc.returncode
