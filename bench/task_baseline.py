"""Base-model accuracy on each exact-match task of the built-in pool (before any training).

    python bench/task_baseline.py [--model default] [--n 30] [--max-new-tokens 16]

Prints one JSON line per task (exact match, answer-contained rate, answer loss) and the seconds it
took. Used to choose the default target: a task the model gets wrong before training.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from p2d.data.builtin import EXACT_MATCH_TASKS, build_task_pool  # noqa: E402
from p2d.data.loading import load_records  # noqa: E402
from p2d.evaluation import evaluate  # noqa: E402
from p2d.models import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=30, help="eval rows per task")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", default=",".join(EXACT_MATCH_TASKS))
    args = ap.parse_args()
    lm = load_model(args.model)
    start = time.perf_counter()
    for task in args.tasks.split(","):
        tp = build_task_pool(target=task, seed=args.seed, pool_size=0, probe_size=0, eval_size=args.n)
        res = evaluate(lm, load_records(tp.eval).samples, batch_size=10, max_new_tokens=args.max_new_tokens)
        print(json.dumps({"task": task, "n": res.n, "exact_match": res.accuracy, "contains": res.contains,
                          "loss": round(res.loss, 3)}), flush=True)
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "model": args.model}))


if __name__ == "__main__":
    main()
