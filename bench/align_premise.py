"""The premise of the alignment pools, measured on the real model: the behaviour is one the base model
can produce when asked, but does not by default.

For every target of `p2d.data.builtin_align` and for the eval rows as its pool presents them, the base
model's check pass rate (and the check's parts) under four conditions (`PREMISE_CONDITIONS`):

- ``zero-shot``: the eval prompt as it is (what a benchmark scores; should be low);
- ``asked``: the prompt asks for the behaviour in words (should be clearly higher);
- ``asked+example``: asked, after one demonstration turn (refusal: two, a refusal and a plain answer);
- ``few-shot``: after 4 demonstration turns (probe rows), not asked (the ceiling of the function target).

For ``refusal`` the same conditions on the other tasks' held-out rows give the false-refusal rate, and
its demonstrations alternate the probe's refusals with plain answers of other topics (pool rows). For
the format targets ``content_any`` is whether the reply keeps the content whatever its format (the
base model answers these questions). Greedy generation with the eval's own token budget (the longest
gold answer + 8), the same for every condition of a target.

    nice -n 10 python bench/align_premise.py                       # writes docs/data/align_premise.{json,md}
    nice -n 10 python bench/align_premise.py --eval-rows 24 --out /tmp/premise   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from p2d.checks import keeps_content  # noqa: E402
from p2d.data.builtin_align import (ALIGN_TARGETS, PREMISE_CONDITIONS, align_target_info,  # noqa: E402
                                    build_align_pool, premise_samples)
from p2d.data.loading import load_records  # noqa: E402
from p2d.evaluation import default_max_new_tokens, generate_answers, part_rates, row_check, score_reply  # noqa: E402
from p2d.models import load_model  # noqa: E402


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson interval of a rate k/n."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [round(max(0.0, mid - half), 4), round(min(1.0, mid + half), 4)]


def measure(lm, target: str, samples, mnt: int, batch_size: int) -> dict:
    t0 = time.time()
    preds = generate_answers(lm, samples, batch_size=batch_size, max_new_tokens=mnt)
    scored = [score_reply(s, p, row_check(s)) for s, p in zip(samples, preds)]
    hits = [h for h, _ in scored]
    out = {"n": len(samples), "pass": sum(hits) / len(hits), "pass_ci95": wilson(sum(hits), len(hits)),
           "parts": part_rates([pt for _, pt in scored]), "seconds": round(time.time() - t0, 1),
           "examples": [{"prompt": s.prompt_text[:160], "reply": p[:200], "pass": h}
                        for s, p, h in list(zip(samples, preds, hits))[:3]]}
    keep = [(s.row.get("check") or {}) for s in samples]
    if align_target_info()[target]["kind"] == "format":
        ok = [keeps_content(p, c.get("keep"), c.get("avoid", ())) for p, c in zip(preds, keep)]
        out["content_any"] = sum(ok) / len(ok)
    return out


def markdown(result: dict) -> str:
    lines = ["# The alignment pools' premise, measured", "",
             f"Command: `{result['command']}`. Machine: {result['machine']}. Model: {result['model']}, greedy, "
             f"{result['eval_rows']} eval rows per target (the pool's first eval rows, seed {result['seed']}), "
             f"{result['shots']} demonstrations for few-shot. Rate with its 95% Wilson interval; the check's "
             "parts after it.", "",
             "| target | condition | pass | 95% CI | parts | content, any format |",
             "|---|---|---|---|---|---|"]
    for target, r in result["targets"].items():
        for cond, m in r["eval"].items():
            parts = ", ".join(f"{k} {v:.2f}" for k, v in m["parts"].items()) or "-"
            ca = f"{m['content_any']:.2f}" if "content_any" in m else "-"
            lines.append(f"| {target} | {cond} | {m['pass']:.2f} | {m['pass_ci95'][0]:.2f}-{m['pass_ci95'][1]:.2f} "
                         f"| {parts} | {ca} |")
    for target, r in result["targets"].items():
        if r.get("elsewhere"):
            lines += ["", f"False rate of `{target}` on the other tasks' held-out rows "
                      f"({next(iter(r['elsewhere'].values()))['n']} rows; refused = the behaviour where it should not be):",
                      "", "| condition | refused | 95% CI |", "|---|---|---|"]
            for cond, m in r["elsewhere"].items():
                k = round(m["parts"].get("refused", 0) * m["n"])
                ci = wilson(k, m["n"])
                lines.append(f"| {cond} | {m['parts'].get('refused', 0):.2f} | {ci[0]:.2f}-{ci[1]:.2f} |")
    lines += ["", "Example replies (first rows):", ""]
    for target, r in result["targets"].items():
        for cond, m in r["eval"].items():
            ex = m["examples"][0]
            lines.append(f"- {target}, {cond}: `{ex['prompt'][-70:]!s}` -> `{ex['reply'][:110]!s}` "
                         f"({'pass' if ex['pass'] else 'fail'})".replace("\n", "\\n"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(ALIGN_TARGETS))
    ap.add_argument("--eval-rows", type=int, default=120)
    ap.add_argument("--other-rows", type=int, default=4, help="held-out rows per other task (refusal's false rate)")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default="docs/data/align_premise")
    args = ap.parse_args(argv)
    lm = load_model(args.model, device="cpu")
    result = {"command": "python bench/align_premise.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads",
              "model": lm.spec, "eval_rows": args.eval_rows, "shots": args.shots, "seed": args.seed, "targets": {}}
    t_all = time.time()
    for target in args.targets.split(","):
        tp = build_align_pool(target, seed=args.seed, eval_size=args.eval_rows, other_eval_size=args.other_rows)
        mnt = default_max_new_tokens(lm, load_records(tp.eval).samples)
        checked = [row for row in tp.other_eval if row.get("check")]  # refusal: where it must not refuse
        demos, example_shots = tp.probe, 1
        if checked:  # a refusal's demonstrations alternate refusals and plain answers of other topics
            plain = [row for row in tp.pool if row["task"] in ("quiz", "legal", "finance")]
            demos, example_shots = [d for pair in zip(tp.probe, plain) for d in pair], 2
        r = {"max_new_tokens": mnt, "demonstrations": "probe rows" + (" alternating with plain answers of other "
                                                                       "topics" if checked else ""),
             "eval": {}, "elsewhere": {}}
        for cond in PREMISE_CONDITIONS:
            for part, rows in (("eval", tp.eval), ("elsewhere", checked)):
                if rows:
                    samples = premise_samples(target, rows, demos, cond, args.shots, example_shots)
                    r[part][cond] = measure(lm, target, samples, mnt, args.batch_size)
                    print(target, cond, part, {k: r[part][cond][k] for k in ("pass", "parts", "seconds")}, flush=True)
        result["targets"][target] = r
    result["seconds"] = round(time.time() - t_all, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
