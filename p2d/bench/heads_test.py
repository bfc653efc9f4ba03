"""The heads test of the benchmark (``--parts heads_test``): does the choice of heads matter once every
head set gets its own best learning rate?

Every head set of a seed, P2D's (the benchmark's head method), the candidate methods (``importance``,
``lofit`` ...), ``test_draws`` random sets (`p2d.cells.random_heads`, the ``random<d>`` sets of the rest
of the benchmark) and ``matched_draws`` random sets matched to P2D's by heads per layer and kv groups
touched per layer (`p2d.cells.matched_heads`), is trained on P2D's rows at every point of ONE
learning-rate grid per adapter (`shared_grid`: the adapter's sweep grid, every finished sweep's winner
of that adapter and, where needed, more points x3.16 apart, so the grid spans every winner), in every
adapter of ``adapters`` (``qkvo``, ``qo``, ``offset``). Every cell is a `p2d.bench.benchmark.Bench.cell`
unit (``cell-<heads>-<adapter>-p2d@lr<rate>``; the same training, evaluation, caching and resuming as
every cell) that also records the probe rows' loss. Each kind's own best rate is the one with the lowest
mean probe loss at the choice seed (the heads test runs there too), never read off eval rows; without
choice-seed units it falls back to the reporting seeds' probe rows and says so.

The selection null of every head set of the test comes from one feature pass per seed over pool and
probe (`p2d.method.features.head_features`: every head's statistic per row), so scoring all random and
matched sets costs one forward and backward.

Not supported: a grid per head set (that is what the sweeps do; the test exists to remove that).
"""

from __future__ import annotations

import math
import re
import statistics

from ..cells import Cell, matched_heads
from ..cost import Clock
from ..manifest import content_digest
from ..method.features import activation_from_features, alignment_from_features, head_features
from ..method.scoring import top_samples
from .split import folder_name
from .stats import null_comparison, target_stats

EXTEND = 10 ** 0.5


def shared_grid(base: list, winners: list, points: int = 3) -> list[float]:
    """One learning-rate grid for every head set of an adapter: the sweep grid ``base`` and every sweep
    winner, widened x3.16 alternately above and below until it has ``points`` values (sorted, rounded to
    4 significant digits so a rate has one name)."""
    grid = {float(f"{float(x):.4g}") for x in list(base) + [w for w in winners if w is not None]}
    up = True
    while len(grid) < points:
        grid.add(float(f"{(max(grid) * EXTEND if up else min(grid) / EXTEND):.4g}"))
        up = not up
    return sorted(grid)


def grid_of(bench, split: str, adapter: str) -> tuple[list[float], dict]:
    """The heads test's grid of ``adapter`` on ``split`` and the sweep winners it spans ({kind: rate})."""
    c = bench.cfg
    base = getattr(c, f"lr_{adapter}")
    winners = {}
    for h in ("p2d", "random"):
        entry = bench.units.get((folder_name(split), "sweep", f"{adapter}-{h}"))
        if entry:
            winners[f"{adapter}-{h}"] = float(entry["result"]["chosen"])
    return shared_grid(base, list(winners.values()), c.test_grid_points), winners


def lr_tag(lr: float) -> str:
    return f"@lr{lr:g}"


def head_sets(bench, sp) -> dict[str, tuple]:
    """{name: (HeadScores, digest)} of every head set of the test at this seed (None heads: not done)."""
    c = bench.cfg
    p2d = bench.heads(sp, c.head_method)
    sets = {"p2d": p2d}
    for m in c.head_candidates:
        if m != c.head_method:
            sets[m] = bench.heads(sp, m)
    for d in range(c.test_draws):
        sets[f"random{d}"] = bench.heads(sp, f"random{d}")
    if p2d[0] is not None:
        for d in range(c.matched_draws):
            hs = matched_heads(bench.lm, p2d[0], sp.seed, d)
            sets[f"matched{d}"] = (hs, content_digest(hs.selected))
    return sets


def run(bench, sp, rows: dict | None) -> None:
    """Every head set x adapter x grid point on P2D's rows ``rows`` at this seed, and the selection null."""
    if rows is None:
        return
    sets = head_sets(bench, sp)
    null(bench, sp, sets)
    for adapter in bench.cfg.adapters:
        grid, _ = grid_of(bench, sp.name, adapter)
        for name, heads in sets.items():  # set by set, so that a run cut short leaves whole sets
            for lr in grid:
                bench.cell(sp, Cell("heads", "p2d", name, adapter), rows, heads, lr, tag=lr_tag(lr), probe=True)


def _kv_groups(geo, heads) -> dict[int, int]:
    out: dict[int, set] = {}
    for layer, h in heads:
        out.setdefault(layer, set()).add(geo.kv_head(h))
    return {k: len(v) for k, v in sorted(out.items())}


def _layers(heads) -> dict[int, int]:
    out: dict[int, int] = {}
    for layer, _ in heads:
        out[layer] = out.get(layer, 0) + 1
    return dict(sorted(out.items()))


def null(bench, sp, sets: dict) -> dict | None:
    """Selection precision (activation and alignment, at the benchmark's data ratio) of every head set of
    the test, from one feature pass over pool and probe; whether each matched set matches P2D's."""
    c = bench.cfg
    if any(h is None for h, _ in sets.values()):
        return None
    geo = bench.lm.geometry

    def compute():

        with Clock() as clock:
            rc = sp.config
            pf = head_features(bench.lm, sp.pool, rc.batch_size, rc.max_length, rc.positions, progress=bench.progress)
            qf = head_features(bench.lm, sp.probe, rc.batch_size, rc.max_length, rc.positions)
        ref = sets["p2d"][0].selected
        out = {"features_s": clock.wall_s, "features_cpu_s": clock.cpu_s, "sets": {},
               "p2d_layers": _layers(ref), "p2d_kv_groups": _kv_groups(geo, ref)}
        for name, (hs, _) in sets.items():
            res = {"heads": len(hs.selected), "kv_groups": sum(_kv_groups(geo, hs.selected).values()),
                   "layers_match": _layers(hs.selected) == _layers(ref),
                   "kv_groups_match": _kv_groups(geo, hs.selected) == _kv_groups(geo, ref)}
            for score, fn in (("activation", lambda h: activation_from_features(pf, h)),
                              ("alignment", lambda h: alignment_from_features(pf, qf, h))):
                scores = fn(hs.selected)
                res[score] = target_stats(top_samples(scores, c.data_ratio), scores, sp.labels, sp.target).get("precision")
            out["sets"][name] = res
        return out, None

    settings = {**bench.common(sp), "sets": sorted(sets), "head_ratio": c.head_ratio, "positions": c.positions,
                "data_ratio": c.data_ratio}
    return bench.unit(sp.key + ("heads-test-null",), settings, {k: d for k, (_, d) in sets.items()}, compute,
                      f"{sp.name} seed {sp.seed}: heads-test selection null ({len(sets)} head sets, one feature pass)")


# ------------------------------------------------------------------------------------------ report
def kind_of(name: str) -> str:
    """The kind of a head set: ``random<d>`` -> random, ``matched<d>`` -> matched, else its name."""
    for k in ("random", "matched"):
        if name.startswith(k) and name[len(k):].isdigit():
            return k
    return name


def _mean(v):
    v = [x for x in v if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(v) if v else None


def summarise(cfg, split: str, seeds: dict[int, dict], choice: dict, bootstrap: int = 2000) -> dict | None:
    """The heads test of a split from its units: per adapter and kind, accuracy and probe loss at every
    grid point (reporting seeds; random and matched: the mean over draws, and the draws' spread), each
    kind's own best rate (lowest mean probe loss at the choice seed, else at the reporting seeds) and
    its accuracy there per seed, P2D at its best against random and matched sets at theirs; the
    selection nulls."""
    out: dict = {"adapters": {}, "null": None}
    any_cell = False
    for adapter in cfg.adapters:
        pattern = re.compile(rf"^cell-(.+)-{re.escape(adapter)}-p2d@lr(.+)$")
        found = [m.groups() for units in list(seeds.values()) + [choice] for k in units if (m := pattern.match(k))]
        rates = sorted({float(r) for _, r in found})
        if not rates:
            continue
        any_cell = True

        def rows(units, name, lr, key="strict"):
            e = units.get(f"cell-{name}-{adapter}-p2d{lr_tag(lr)}")
            return e["result"][key] if e else None

        def res(units, name, lr, key):
            e = units.get(f"cell-{name}-{adapter}-p2d{lr_tag(lr)}")
            return e["result"].get(key) if e else None

        # the sets trained at every rate at every seed where they were trained (a run cut short: no partial set)
        set_names = sorted(n for n in {n for n, _ in found} if all(
            all(f"cell-{n}-{adapter}-p2d{lr_tag(lr)}" in u for lr in rates)
            for u in list(seeds.values()) + [choice] if any(k.startswith(f"cell-{n}-{adapter}-p2d@lr") for k in u)))
        kinds = list(dict.fromkeys(kind_of(n) for n in ["p2d"] + set_names))
        members = {k: [n for n in set_names if kind_of(n) == k] for k in kinds}
        table = {}
        for kind in kinds:
            at = {}
            for lr in rates:
                per_seed = {s: _mean(res(u, n, lr, "accuracy") for n in members[kind]) for s, u in seeds.items()}
                draws = [res(u, n, lr, "accuracy") for u in seeds.values() for n in members[kind]]
                at[lr] = {"accuracy": _mean(per_seed.values()), "per_seed": per_seed,
                          "spread": [min(d for d in draws if d is not None), max(d for d in draws if d is not None)]
                          if any(d is not None for d in draws) else None,
                          "probe_loss": _mean(res(u, n, lr, "probe_loss") for u in seeds.values() for n in members[kind]),
                          "choice_probe_loss": _mean(res(choice, n, lr, "probe_loss") for n in members[kind])}
            by_choice = {lr: v["choice_probe_loss"] for lr, v in at.items() if v["choice_probe_loss"] is not None}
            by_report = {lr: v["probe_loss"] for lr, v in at.items() if v["probe_loss"] is not None}
            chosen_on = "choice seed" if by_choice else "reporting seeds" if by_report else None
            pick = by_choice or by_report
            best = min(pick, key=pick.get) if pick else None
            table[kind] = {"at": [{"lr": lr, **v} for lr, v in at.items()], "best_lr": best, "chosen_on": chosen_on,
                           "n_sets": len(members[kind]), "best": at[best] if best is not None else None}
        comparisons = {}  # every scored head set at its best rate against the random / matched sets at theirs
        for kind in kinds:
            own = table[kind]["best_lr"]
            if kind in ("random", "matched") or own is None:
                continue
            for null_kind in ("random", "matched"):
                best = table.get(null_kind, {}).get("best_lr")
                if best is None:
                    continue
                for key in ("strict", "row_loss"):
                    x = {s: rows(u, kind, own, key) for s, u in seeds.items()}
                    x = {s: v for s, v in x.items() if v is not None}
                    d = {s: [r for n in members[null_kind] if (r := rows(u, n, best, key)) is not None]
                         for s, u in seeds.items()}
                    comparisons.setdefault(kind, {}).setdefault(null_kind, {})[key] = (
                        null_comparison(x, d, draws=bootstrap) if x else None)
        out["adapters"][adapter] = {"rates": rates, "kinds": table, "vs_null": comparisons}
    nulls = [u["heads-test-null"]["result"] for u in seeds.values() if "heads-test-null" in u]
    if nulls:
        nl = {}
        for kind in ("p2d", "random", "matched", *[k for k in nulls[0]["sets"] if kind_of(k) == k and k != "p2d"]):
            for score in ("activation", "alignment"):
                vals = [r[score] for n_ in nulls for name, r in n_["sets"].items() if kind_of(name) == kind]
                vals = sorted(v for v in vals if v is not None)
                if vals:
                    nl.setdefault(kind, {})[score] = {"mean": statistics.fmean(vals), "max": vals[-1],
                                                      "p95": vals[min(len(vals) - 1, int(0.95 * (len(vals) - 1) + 0.5))],
                                                      "n": len(vals)}
        p2d = [n_["sets"]["p2d"]["activation"] for n_ in nulls]
        share = {k: _share([[r["activation"] for name, r in n_["sets"].items() if kind_of(name) == k] for n_ in nulls],
                           p2d) for k in ("random", "matched")}
        matched = [r for n_ in nulls for name, r in n_["sets"].items() if kind_of(name) == "matched"]
        out["null"] = {"by_kind": nl, "share_at_or_above_p2d": share,
                       "features_cpu_s": [n_["features_cpu_s"] for n_ in nulls],
                       "matched_all_match": all(r["layers_match"] and r["kv_groups_match"] for r in matched)
                       if matched else None,
                       "p2d_kv_groups": sum(nulls[0]["p2d_kv_groups"].values())}
    return out if any_cell or nulls else None


def _share(draws_by_seed: list[list], values: list) -> float | None:
    pairs = [(v, d) for v, ds in zip(values, draws_by_seed) if v is not None for d in ds if d is not None]
    return sum(d >= v for v, d in pairs) / len(pairs) if pairs else None


def _p(x, digits=1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def _d(d) -> str:
    if not d:
        return "–"
    lo, hi = d["ci95"]
    return f"{100 * d['estimate']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def markdown(h: dict, head_method: str = "") -> str:
    """The heads test's section of results.md."""
    lines = ["### Heads test: every head set at every rate of one grid", "",
             "Each head set trained on P2D's rows at every rate of one grid per adapter (the same rates for every "
             "kind). Cells: strict accuracy % over reporting seeds (random and matched: mean over draws) and "
             "(probe loss); the kind's own best rate is the lowest mean probe loss (at the choice seed where it "
             "ran; never eval rows).", ""]
    for adapter, a in h["adapters"].items():
        rates = a["rates"]
        lines += [f"`{adapter}`:", "", "| heads (sets) | " + " | ".join(f"lr {r:g}" for r in rates)
                  + " | own best lr (chosen on) | accuracy % at it, per seed |",
                  "|---|" + "---|" * len(rates) + "---|---|"]
        for kind, v in a["kinds"].items():
            cells = []
            for p in v["at"]:
                cells.append("–" if p["accuracy"] is None else f"{_p(p['accuracy'])} ({p['probe_loss']:.3f})"
                             if p["probe_loss"] is not None else _p(p["accuracy"]))
            b = v["best"]
            per = ", ".join(_p(x) for x in b["per_seed"].values()) if b else "–"
            best = "–" if v["best_lr"] is None else f"{v['best_lr']:g}"
            shown = f"P2D ({head_method})" if kind == "p2d" and head_method else kind
            lines.append(f"| {shown} ({v['n_sets']}) | " + " | ".join(cells) + f" | {best} ({v['chosen_on'] or '–'}) | "
                         f"{_p(b['accuracy']) if b else '–'} ({per}) |")
        for kind, nulls in a["vs_null"].items():
            shown = f"P2D ({head_method})" if kind == "p2d" and head_method else kind
            for null_kind, c in nulls.items():
                s, lo = c.get("strict"), c.get("row_loss")
                if s:
                    loss = f"; answer loss {lo['estimate']:+.3f} [{lo['ci95'][0]:+.3f}, {lo['ci95'][1]:+.3f}]" if lo else ""
                    lines += ["", f"{shown} at its best rate minus {null_kind} sets at theirs: {_d(s)} pp{loss}; "
                              f"{null_kind} draws at or above it: {_p(s.get('share_of_draws_at_or_above'))}% of "
                              f"{s.get('n_draws')}."]
        lines.append("")
    n = h.get("null")
    if n:
        bk = n["by_kind"]
        lines += ["Selection null of the same head sets (activation / alignment precision at the data budget, one "
                  f"feature pass per seed, CPU s {', '.join(f'{x:.0f}' for x in n['features_cpu_s'])}): " + "; ".join(
                      f"{k} mean {_p(v['activation']['mean'])} / {_p(v.get('alignment', {}).get('mean'))}%, "
                      f"95th pct {_p(v['activation']['p95'])}% (n {v['activation']['n']})"
                      for k, v in bk.items() if 'activation' in v) + ". Draws at or above P2D's activation precision: "
                  f"random {_p(n['share_at_or_above_p2d']['random'])}%, matched "
                  f"{_p(n['share_at_or_above_p2d']['matched'])}%. Matched sets match P2D's heads per layer and kv "
                  f"groups per layer ({n['p2d_kv_groups']} kv groups): {n['matched_all_match']}.", ""]
    return "\n".join(lines)
