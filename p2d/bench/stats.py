"""The benchmark's statistics: what a selection holds, paired differences with bootstrap intervals, and
what they can detect.

A selection of a labelled pool (`target_stats`): the share of target-skill rows and of their lexical
twins among the selected rows, their shares of the pool, the `auroc` of the scores for target rows,
and the task mix; an evaluation's `mean_other_accuracy` over the held-out rows of the other tasks.

Accuracies are per-row 0/1 values (strict greedy match of every eval row, `p2d.evaluation.forced_eval`),
so a difference between two cells is estimated from the *same rows* of the *same seeds*:

- `paired_difference(a, b)`: ``a`` and ``b`` map seed -> per-row values of the same eval rows. The
  estimate is the mean over seeds of the mean row difference; the 95% interval is a two-level
  bootstrap (seeds with replacement, then rows with replacement within each drawn seed, the same rows
  for both cells), so it covers both the spread between seeds and the finite eval set.
- `null_comparison(x, draws)`: a cell against a null distribution of cells (random head sets):
  ``x`` maps seed -> rows, ``draws`` seed -> list of rows per draw. The estimate is x minus the mean
  draw; the interval resamples seeds, draws within a seed and rows; ``rank`` is where x falls among
  the draws (the share of draws at or above it, pooled over seeds: an empirical p-value).
- `mde(interval)`: the smallest effect the comparison could detect: 2.8 standard errors (80% power at
  a two-sided 5% level), with the standard error taken from the bootstrap interval's width / 3.92.

Seeds with missing values on either side are left out (``n_seeds`` says how many counted).
"""

from __future__ import annotations

import math
import random
import statistics

import numpy as np

from ..data.builtin_hard import TWIN_SUFFIX

Z95 = 1.959964
POWER80 = 2.8  # z(0.975) + z(0.8)


def target_stats(selected: list[int], scores: list[float], labels: list[str | None], target: str | None) -> dict:
    """What a selection holds: the share of target-skill rows and of twins (``<target>_twin``), their pool
    shares, the AUROC of the scores for target rows, and the task mix (labelled pools only)."""
    if target is None or not any(labels):
        return {}
    twin = target + TWIN_SUFFIX
    n = max(1, len(selected))
    picked = [labels[i] for i in selected]
    counts: dict[str, int] = {}
    for t in picked:
        counts[str(t)] = counts.get(str(t), 0) + 1
    return {"precision": sum(t == target for t in picked) / n, "twins": sum(t == twin for t in picked) / n,
            "pool_share": sum(t == target for t in labels) / len(labels),
            "pool_twins": sum(t == twin for t in labels) / len(labels),
            "auroc": auroc(scores, [t == target for t in labels]), "task_counts": counts}


def auroc(scores: list[float], positive: list[bool]) -> float | None:
    """Probability that a random positive outranks a random negative (ties count half)."""
    pairs = [(s, p) for s, p in zip(scores, positive) if s is not None and math.isfinite(s)]
    n_pos = sum(p for _, p in pairs)
    n_neg = len(pairs) - n_pos
    if not n_pos or not n_neg:
        return None
    pairs.sort(key=lambda t: t[0])
    rank_sum, i = 0.0, 0
    while i < len(pairs):  # average ranks over ties
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        rank_sum += ((i + j) / 2 + 1) * sum(p for _, p in pairs[i:j + 1])
        i = j + 1
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def mean_other_accuracy(other_tasks: dict | None) -> float | None:
    """The mean accuracy over the other tasks of an evaluation (``EvalResult.other_tasks``; None without)."""
    accs = [v["accuracy"] for v in (other_tasks or {}).values() if v.get("accuracy") is not None]
    return sum(accs) / len(accs) if accs else None


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def _clean(rows) -> list[float] | None:
    if rows is None:
        return None
    return [float(v) for v in rows if v is not None]


def paired_difference(a: dict, b: dict, draws: int = 2000, seed: int = 0) -> dict | None:
    """Mean of a - b over seeds and rows, with a 95% two-level bootstrap interval (see the module)."""
    seeds = []
    for s in sorted(set(a) & set(b)):
        ra, rb = a[s], b[s]
        if ra is None or rb is None or len(ra) != len(rb):
            continue
        pairs = [(x, y) for x, y in zip(ra, rb) if x is not None and y is not None]
        if pairs:
            seeds.append([x - y for x, y in pairs])
    if not seeds:
        return None
    est = _mean([_mean(d) for d in seeds])
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(d, dtype=float) for d in seeds]
    boots = np.zeros(draws)
    picks = rng.integers(0, len(arrays), size=(draws, len(arrays)))
    for j, arr in enumerate(arrays):  # the j-th drawn seed of every resample, rows resampled within it
        for k in range(len(arrays)):
            chosen = picks[:, j] == k
            n = int(chosen.sum())
            if n:
                rows = rng.integers(0, len(arrays[k]), size=(n, len(arrays[k])))
                boots[chosen] += arrays[k][rows].mean(axis=1)
    boots = list(boots / len(arrays))
    return _summary(est, boots, n_seeds=len(seeds), n_rows=len(seeds[0]),
                    per_seed=[round(_mean(d), 6) for d in seeds])


def null_comparison(x: dict, draws_by_seed: dict, draws: int = 2000, seed: int = 0) -> dict | None:
    """x minus the mean of a null distribution of cells (random draws), with a 95% bootstrap interval
    and x's rank among the draws (see the module docstring)."""
    seeds = []
    for s in sorted(set(x) & set(draws_by_seed)):
        rx = _clean(x[s])
        rd = [_clean(d) for d in draws_by_seed[s] if d is not None]
        rd = [d for d in rd if d is not None and len(d) == len(rx)]
        if rx and rd:
            seeds.append((rx, rd))
    if not seeds:
        return None
    est = _mean([_mean(rx) - _mean([_mean(d) for d in rd]) for rx, rd in seeds])
    at_or_above = sum(sum(_mean(d) >= _mean(rx) for d in rd) for rx, rd in seeds)
    n_draws = sum(len(rd) for _, rd in seeds)
    rng = np.random.default_rng(seed)
    xs = [np.asarray(rx, dtype=float) for rx, _ in seeds]
    ds = [np.asarray(rd, dtype=float) for _, rd in seeds]  # [draws, rows]
    boots = np.zeros(draws)
    picks = rng.integers(0, len(seeds), size=(draws, len(seeds)))
    for j in range(len(seeds)):
        for k in range(len(seeds)):
            chosen = int((picks[:, j] == k).sum())
            if not chosen:
                continue
            rows = rng.integers(0, xs[k].shape[0], size=(chosen, xs[k].shape[0]))
            which = rng.integers(0, ds[k].shape[0], size=(chosen, ds[k].shape[0]))
            x_mean = xs[k][rows].mean(axis=1)
            d_mean = np.stack([ds[k][which[:, i]][np.arange(chosen)[:, None], rows].mean(axis=1)
                               for i in range(ds[k].shape[0])], axis=1).mean(axis=1)
            boots[picks[:, j] == k] += x_mean - d_mean
    boots = list(boots / len(seeds))
    return _summary(est, boots, n_seeds=len(seeds), n_rows=len(seeds[0][0]), n_draws=n_draws,
                    share_of_draws_at_or_above=at_or_above / n_draws,
                    draw_means=[[round(_mean(d), 6) for d in rd] for _, rd in seeds],
                    per_seed=[round(_mean(rx), 6) for rx, _ in seeds])


def seeds_interval(values: list[float], draws: int = 2000, seed: int = 0) -> dict | None:
    """Mean of per-seed values with a bootstrap interval over seeds (for statistics without rows)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    rng = random.Random(seed)
    boots = [_mean([rng.choice(vals) for _ in vals]) for _ in range(draws)]
    return _summary(_mean(vals), boots, n_seeds=len(vals), per_seed=vals)


def _summary(est: float, boots: list[float], **extra) -> dict:
    boots = sorted(float(b) for b in boots)
    lo, hi = boots[int(0.025 * (len(boots) - 1))], boots[int(0.975 * (len(boots) - 1))]
    out = {"estimate": float(est), "ci95": [lo, hi], "sd_boot": statistics.pstdev(boots), **extra}
    out["mde"] = mde(out)
    return out


def mde(summary: dict | None) -> float | None:
    """The smallest true difference this comparison would detect with 80% power (two-sided 5%)."""
    if not summary:
        return None
    lo, hi = summary["ci95"]
    return float(POWER80 * (hi - lo) / (2 * Z95))


def proportion_mde(n_rows: int, n_seeds: int = 1, p: float = 0.5) -> float:
    """The smallest difference of two accuracies measured on the same ``n_rows`` x ``n_seeds`` rows
    detectable with 80% power at 5%, for independent rows at accuracy ``p`` (an upper bound: pairing
    the rows only lowers it)."""
    se = (2 * p * (1 - p) / (n_rows * n_seeds)) ** 0.5
    return POWER80 * se
