"""Looking into runs: how two head maps compare.

`compare_head_maps(a, b)` takes two `p2d.heads.HeadScores` of the same head geometry (two targets,
two methods or two seeds: any two ``heads.json``) and returns the overlap of their selected sets
(Jaccard index, shared and own heads), the Spearman rank correlation of all head scores, and a
rank-difference map (per head, its score percentile in ``a`` minus that in ``b``: scales of
different methods do not matter). NaN scores rank last, as in `p2d.heads.select_top`.

Supported: maps of the same n_layers x n_q_heads; anything else is a `UserError`. Reusing a map for
another task is the heads stage's ``--heads`` option of ``select`` and ``train``.

`forgetting(before, after)` lines up per-task accuracy before and after training: the eval set's own
tasks (when its rows carry a task label) and the held-out rows of the pool's other tasks
(``EvalResult.other_tasks``, the built-in pool's ``other_eval_size``): what tuning changed elsewhere.
"""

from __future__ import annotations

import math

from .errors import UserError
from .heads import HeadScores

__all__ = ["compare_head_maps", "rank_percentiles", "spearman", "forgetting"]


def _same(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or x == y


def rank_percentiles(values: list[float]) -> list[float]:
    """Each value's rank as a share in [0, 1] (1 = highest; ties share their average rank; NaN lowest)."""
    n = len(values)
    if n <= 1:
        return [1.0] * n
    order = sorted(range(n), key=lambda i: (not math.isnan(values[i]), values[i] if not math.isnan(values[i]) else 0))
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and _same(values[order[j + 1]], values[order[i]]):
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return [r / (n - 1) for r in ranks]


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson over average ranks); None when either side is constant."""
    ra, rb = rank_percentiles(a), rank_percentiles(b)
    n = len(ra)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return cov / math.sqrt(va * vb)


def _describe(hs: HeadScores, name: str) -> dict:
    return {"name": name, "method": hs.method, "ratio": hs.ratio, "model": hs.model, "n_selected": len(hs.selected)}


def compare_head_maps(a: HeadScores, b: HeadScores, name_a: str = "a", name_b: str = "b") -> dict:
    """Overlap, rank correlation and rank-difference map of two head maps (see the module docstring)."""
    if (a.n_layers, a.n_q_heads) != (b.n_layers, b.n_q_heads):
        raise UserError(f"the head maps do not match: {name_a} has {a.n_layers} layers x {a.n_q_heads} heads, "
                        f"{name_b} {b.n_layers} x {b.n_q_heads}; compare maps of the same model")
    flat_a = [float(x) for row in a.scores for x in row]
    flat_b = [float(x) for row in b.scores for x in row]
    sel_a = {tuple(h) for h in a.selected}
    sel_b = {tuple(h) for h in b.selected}
    union = sel_a | sel_b
    pa, pb = rank_percentiles(flat_a), rank_percentiles(flat_b)
    n_q = a.n_q_heads
    diff = [[round(pa[layer * n_q + h] - pb[layer * n_q + h], 6) for h in range(n_q)] for layer in range(a.n_layers)]
    rho = spearman(flat_a, flat_b)
    return {
        "a": _describe(a, name_a), "b": _describe(b, name_b),
        "jaccard": len(sel_a & sel_b) / len(union) if union else None,
        "shared": sorted([list(h) for h in sel_a & sel_b]),
        "only_a": sorted([list(h) for h in sel_a - sel_b]),
        "only_b": sorted([list(h) for h in sel_b - sel_a]),
        "spearman": None if rho is None else round(rho, 6),
        "rank_difference": diff,
    }


def _by_task(result) -> tuple[dict, dict]:
    d = result if isinstance(result, dict) else result.to_dict()
    return d.get("by_task") or {}, d.get("other_tasks") or {}


def forgetting(before, after) -> list[dict]:
    """Rows ``{"task", "set", "before", "after", "change", "n"}`` (accuracy as a share; ``set`` is "eval"
    or "other tasks"), eval tasks first; ``before``/``after`` are `EvalResult`s or their dicts (None:
    not evaluated). A task only in one of them has None on the other side."""
    rows = []
    b_eval, b_other = _by_task(before) if before is not None else ({}, {})
    a_eval, a_other = _by_task(after) if after is not None else ({}, {})
    for label, b, a in (("eval", b_eval, a_eval), ("other tasks", b_other, a_other)):
        for task in sorted(set(b) | set(a)):
            x, y = (b.get(task) or {}).get("accuracy"), (a.get(task) or {}).get("accuracy")
            rows.append({"task": task, "set": label, "before": x, "after": y,
                         "change": None if x is None or y is None else y - x,
                         "n": (a.get(task) or b.get(task) or {}).get("n")})
    return rows
