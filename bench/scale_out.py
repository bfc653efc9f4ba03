"""What several processes cost and save: one process, N whole copies, N processes sharing one sharded
model (FSDP), on the same commands.

For every setting (``one``; ``whole``: ``accelerate launch --config_file configs/accelerate/multi_process.yaml``;
``sharded``: the same with ``configs/accelerate/fsdp.yaml``) and every repeat it runs

1. ``p2d select`` (head scoring + pool scoring) on the built-in pool, and
2. ``p2d train`` for ``--steps`` steps on the rows that run selected, with the same global batch
   everywhere (``--batch-size``; each of N processes takes ``batch_size / N`` rows of it),

and reads back what the result files say: head scoring and selection time (``heads.json``,
``selection.json``), training time and steps (the adapter's config), the parameters each process holds
(``p2d info`` under the same launcher) and the wall time of each command (model loading included, once
per process). It also checks that every setting selected the same rows. Medians over the repeats; the
settings alternate within a repeat, so machine noise spreads over all of them.

Example (2-core CPU, embedded model, one thread per process)::

    HF_HUB_OFFLINE=1 python bench/scale_out.py --repeats 2 --json runs/scale_out.json

What it does not measure: GPUs (run it there with ``--model`` a larger model), memory peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2d.adapter import CONFIG_NAME  # noqa: E402
from p2d.method.heads import HEADS_FILE  # noqa: E402
from p2d.method.selection import SELECTED_FILE, SELECTION_FILE  # noqa: E402
from p2d.studio.launcher import free_port  # noqa: E402
from p2d.training import ADAPTER_SUBDIR  # noqa: E402
CONFIGS = {"whole": ROOT / "configs/accelerate/multi_process.yaml", "sharded": ROOT / "configs/accelerate/fsdp.yaml"}


def _command(setting: str, processes: int, argv: list[str]) -> list[str]:
    if setting == "one":
        return [sys.executable, "-m", "p2d", *argv]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS[setting]),
            "--num_processes", str(processes), "--main_process_port", str(free_port()), "-m", "p2d", *argv]


def _run(setting: str, processes: int, argv: list[str], threads: int) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run(_command(setting, processes, argv), capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{setting}: {' '.join(argv[:1])} failed:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def measure(setting: str, args, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    common = ["--model", args.model, "--max-length", str(args.max_length), "--batch-size", str(args.batch_size)]
    sel_dir, train_dir = out / "select", out / "train"
    select_wall, _ = _run(setting, args.processes, ["select", *common, "--pool-size", str(args.pool_size),
                                                     "--probe-size", str(args.probe_size), "--out", str(sel_dir)],
                          args.threads)
    heads = json.loads((sel_dir / HEADS_FILE).read_text())
    selection = json.loads((sel_dir / SELECTION_FILE).read_text())
    per_process = args.batch_size if setting == "one" else max(1, args.batch_size // args.processes)
    train_wall, _ = _run(setting, args.processes, ["train", *common, "--data", str(sel_dir / SELECTED_FILE),
                                                    "--heads", str(sel_dir / HEADS_FILE), "--steps", str(args.steps),
                                                    "--batch-size", str(per_process), "--out", str(train_dir)],
                         args.threads)
    training = json.loads((train_dir / ADAPTER_SUBDIR / CONFIG_NAME).read_text())["training"]
    _, info = _run(setting, args.processes, ["info", "--model", args.model], args.threads) if setting == "sharded" \
        else (0.0, "")
    held = json.loads(info[info.index("{"):]).get("params_per_process") if info else None
    return {"setting": setting, "heads_s": heads["time_s"], "select_s": selection["time_s"],
            "select_wall_s": round(select_wall, 2), "train_s": round(training["time_s"], 3),
            "train_steps": training["steps_done"], "train_wall_s": round(train_wall, 2),
            "final_loss": training.get("final_loss"),
            "selected": selection["selected"], "params_per_process": held}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--settings", default="one,whole,sharded")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--pool-size", type=int, default=400)
    ap.add_argument("--probe-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="runs/scale_out")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    rows = []
    for r in range(args.repeats):
        for setting in settings:
            row = measure(setting, args, Path(args.out).resolve() / f"{setting}-{r}")
            row["repeat"] = r
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "selected"}), flush=True)
    same = len({tuple(row["selected"]) for row in rows}) == 1
    keys = ("heads_s", "select_s", "select_wall_s", "train_s", "train_wall_s")
    summary = {s: {k: statistics.median(row[k] for row in rows if row["setting"] == s) for k in keys}
               for s in settings}
    for s in settings:
        held = [row["params_per_process"] for row in rows if row["setting"] == s and row["params_per_process"]]
        summary[s]["params_per_process"] = held[0] if held else None
    report = {"settings": summary, "same_rows_selected": same, "processes": args.processes, "threads": args.threads,
              "model": args.model, "pool_size": args.pool_size, "probe_size": args.probe_size,
              "batch_size_per_process": args.batch_size, "steps": args.steps, "repeats": args.repeats,
              "runs": [{k: v for k, v in row.items() if k != "selected"} for row in rows]}
    print(f"\nmedians over {args.repeats} repeat(s); the same rows selected everywhere: {same}")
    print(f"{'setting':10} {'heads s':>8} {'select s':>9} {'select wall':>12} {'train s':>8} {'train wall':>11}")
    for s, v in summary.items():
        print(f"{s:10} {v['heads_s']:8.1f} {v['select_s']:9.1f} {v['select_wall_s']:12.1f} {v['train_s']:8.1f} "
              f"{v['train_wall_s']:11.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
