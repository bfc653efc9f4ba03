"""The benchmark's report: results.json, results.md and the AER-vs-accuracy figure, from the units.

Accuracy is the strict greedy match of every eval row (`p2d.evaluation.forced_eval`); differences are
paired by seed and row with 95% two-level bootstrap intervals and the smallest effect they could
detect (`p2d.bench.stats`). Costs follow `p2d.cells.cell_cost`: a cell's training, plus the head
scoring of the scored heads it trains or that chose its data, plus the selection pass that chose its
rows. AER = cost / the measured training time of full fine-tuning of the whole pool (same split, the
first reporting seed). The equal-accuracy AER reads the time full fine-tuning needed to reach P2D's
accuracy off its learning curve, from the base model at 0 s and interpolated between points
(`p2d.cost.time_to_reach`), with an interval from resampling the eval rows.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from pathlib import Path

from ..cells import CELLS, cell_cost
from ..cost import time_to_reach
from ..files import write_json, write_text
from . import frontier, heads_test
from .choose import choice_markdown, choose_defaults, judged_rule, rule_markdown
from .config import SELECTOR_LABELS
from .split import folder_name
from .stats import null_comparison, paired_difference

HEAD_FREE = ("tfidf", "bm25", "hidden", "rh-alignment", "random",  # selectors that do not use P2D's heads
             "answer_shape", "answer_tfidf", "shape_tfidf")


def _stat(values) -> dict | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def _units_of(bench, split_folder: str, seed: int) -> dict[str, dict]:
    return {k[2]: e for k, e in bench.touched.items() if len(k) == 3 and k[0] == split_folder and k[1] == f"seed{seed}"}


def _cell_name(heads: str, adapter: str, data: str) -> str:
    return f"cell-{heads}-{adapter}-{data}"


def collect(bench, machine: dict, model: dict) -> dict:
    """Everything the invocation found valid, summarised per split (see the module docstring)."""
    cfg = bench.cfg
    out = {"config": asdict(cfg), "machine": machine, "model": model, "splits": {}}
    for split in cfg.splits:
        f = folder_name(split)
        seeds = {s: _units_of(bench, f, s) for s in cfg.seed_list}
        seeds = {s: u for s, u in seeds.items() if u}
        sweeps = {k[2]: e["result"] for k, e in bench.touched.items() if len(k) == 3 and k[:2] == (f, "sweep")}
        out["splits"][split] = _summarise_split(cfg, split, seeds, sweeps)
        out["splits"][split]["heads_test"] = heads_test.summarise(cfg, split, seeds, _units_of(bench, f, cfg.choice_seed),
                                                                  cfg.bootstrap)
        out["splits"][split]["frontier"] = frontier.summarise(cfg, seeds, _cost)
    out["defaults"] = choose_defaults(bench)
    out["rule"] = judged_rule(bench)
    out["units"] = units_provenance(bench.touched.values())
    return out


def units_provenance(entries) -> dict:
    """How many of the report's units each code version made (``commit``, ``+dirty`` when its tracked files
    differed from it; ``not recorded``: units made before units recorded it, ``no git checkout``) and with
    how many torch threads (``0``: torch's default)."""
    code: dict[str, int] = {}
    threads: dict[str, int] = {}
    for e in entries:
        c = e.get("code")
        name = ("not recorded" if c is None else "no git checkout" if not c.get("commit")
                else c["commit"][:12] + ("+dirty" if c.get("dirty") else ""))
        code[name] = code.get(name, 0) + 1
        t = str((e.get("settings") or {}).get("threads", "not recorded"))
        threads[t] = threads.get(t, 0) + 1
    return {"code": dict(sorted(code.items())), "threads": dict(sorted(threads.items()))}


def _rows(units: dict, name: str, key: str = "strict") -> list | None:
    """Per-row values of a cell's evaluation: ``strict`` (0/1) or ``row_loss`` (answer loss, nats)."""
    e = units.get(name)
    return e["result"][key] if e else None


def _both(fn, a_name: str, b, seeds: dict, B: int) -> dict | None:
    """``fn`` (paired_difference or null_comparison) on accuracy, with the same on the answer loss."""
    out = {}
    for key in ("strict", "row_loss"):
        a = {k: _rows(u, a_name, key) for k, u in seeds.items()}
        a = {k: v for k, v in a.items() if v is not None}
        other = b(key)
        out[key] = fn(a, other, draws=B) if a and other else None
    if out["strict"] is None:
        return None
    return {**out["strict"], "loss": out["row_loss"]}


def _summarise_split(cfg, split: str, seeds: dict[int, dict], sweeps: dict) -> dict:
    B = cfg.bootstrap
    s: dict = {"seeds": sorted(seeds), "sweeps": sweeps}
    s["base"] = _stat(u["base"]["result"]["accuracy"] for u in seeds.values() if "base" in u)
    # -- selection --------------------------------------------------------------------------------
    sel = {}
    for name in cfg.selectors:
        vals = [u[f"select-{name}"]["result"] for u in seeds.values() if f"select-{name}" in u]
        if vals:
            sel[name] = {k: _stat(v.get(k) for v in vals) for k in ("precision", "twins", "auroc", "time_s", "cpu_s")}
            sel[name]["per_seed"] = [v.get("precision") for v in vals]
    s["selection"] = sel
    any_sel = next((u[k]["result"] for u in seeds.values() for k in u if k.startswith("select-")), {})
    s["pool_share"], s["pool_twins"] = any_sel.get("pool_share"), any_sel.get("pool_twins")
    feats = [u["features"]["result"] for u in seeds.values() if "features" in u]
    if feats:
        null_act = [d["activation"].get("precision") for f in feats for d in f["random"]]
        null_aln = [d["alignment"].get("precision") for f in feats for d in f["random"]]
        methods = {}
        for m in feats[0]["methods"]:
            methods[m] = {score: _stat(f["methods"][m][score].get("precision") for f in feats if m in f["methods"])
                          for score in ("activation", "alignment")}
            methods[m]["twins_activation"] = _stat(f["methods"][m]["activation"].get("twins") for f in feats
                                                   if m in f["methods"])
        s["null_precision"] = {"activation": _dist(null_act), "alignment": _dist(null_aln)}
        s["head_methods_precision"] = methods
        p2d = [f["methods"].get(cfg.head_method, {}).get("activation", {}).get("precision") for f in feats]
        s["p2d_precision_rank_in_null"] = _share_at_or_above(p2d, [[d["activation"].get("precision") for d in f["random"]]
                                                                   for f in feats])
    # -- selectors trained ------------------------------------------------------------------------------
    trained = {}
    p2d_cell = _cell_name("p2d", cfg.adapter, "p2d")
    for name in cfg.selectors:
        cell = _cell_name("p2d", cfg.adapter, name)
        vals = {seed: u[cell]["result"] for seed, u in seeds.items() if cell in u}
        if not vals:
            continue
        row = _cell_summary(vals, seeds, name, cfg.head_method)
        if name != "p2d":
            row["p2d_minus"] = _both(paired_difference, p2d_cell,
                                     lambda key, cell=cell: {k: _rows(u, cell, key) for k, u in seeds.items()}, seeds, B)
        trained[name] = row
    s["selectors"] = trained
    free = {k: v for k, v in trained.items() if k in HEAD_FREE and v["accuracy"]}
    if free and "p2d" in trained:
        best = max(free, key=lambda k: free[k]["accuracy"]["mean"])
        s["best_head_free"] = {"selector": best, "p2d_minus": trained[best].get("p2d_minus")}
    # -- heads ------------------------------------------------------------------------------------------
    heads = {}
    for adapter in cfg.adapters:
        p2d_name = _cell_name("p2d", adapter, "p2d")
        p2d = {k: _rows(u, p2d_name) for k, u in seeds.items()}
        p2d = {k: v for k, v in p2d.items() if v is not None}

        def draws_of(key, adapter=adapter):
            return {k: [r for d in range(cfg.training_draws) if (r := _rows(u, _cell_name(f"random{d}", adapter, "p2d"),
                                                                               key))] for k, u in seeds.items()}

        draws = draws_of("strict")
        if not p2d or not any(draws.values()):
            continue
        row = {"p2d": _cell_summary({k: u[p2d_name]["result"] for k, u in seeds.items() if p2d_name in u}, seeds,
                                    "p2d", cfg.head_method),
               "random": _stat(statistics.fmean(r) for v in draws.values() for r in v),
               "random_range": _dist([statistics.fmean(r) for v in draws.values() for r in v]),
               "p2d_vs_random": _both(null_comparison, p2d_name, draws_of, seeds, B), "candidates": {},
               "random_loss": _stat(statistics.fmean(r) for v in draws_of("row_loss").values() for r in v),
               "lr": {h: sweeps.get(f"{adapter}-{h}", {}).get("chosen") for h in ("p2d", "random")},
               "lr_interior": {h: sweeps.get(f"{adapter}-{h}", {}).get("interior") for h in ("p2d", "random")}}
        for m in cfg.head_candidates:
            if m == cfg.head_method:
                continue
            cand = {k: _rows(u, _cell_name(m, adapter, "p2d")) for k, u in seeds.items()}
            cand = {k: v for k, v in cand.items() if v is not None}
            if cand:
                row["candidates"][m] = {"accuracy": _stat(statistics.fmean(v) for v in cand.values()),
                                        "vs_random": _both(null_comparison, _cell_name(m, adapter, "p2d"), draws_of,
                                                           seeds, B)}
        heads[adapter] = row
    s["heads"] = heads
    # -- classic ----------------------------------------------------------------------------------------
    classic = {}
    for name in cfg.classic:
        c = CELLS[name]
        cell = _cell_name(c.trainable, c.trainable, c.data)
        vals = {seed: u[cell]["result"] for seed, u in seeds.items() if cell in u}
        if vals:
            row = _cell_summary(vals, seeds, c.data, cfg.head_method)
            row["p2d_minus"] = _both(paired_difference, p2d_cell,
                                     lambda key, cell=cell: {k: _rows(u, cell, key) for k, u in seeds.items()}, seeds, B)
            classic[name] = row
    s["classic"] = classic
    s["aer"] = _aer(cfg, seeds, p2d_cell)
    return s


def _cost(res: dict, units: dict, data: str, head_method: str, cpu: bool = False) -> float:
    """`cell_cost` of a trained cell from its units: its training, the scoring of the scored heads it
    trains (else of those that chose its rows), the selection that chose its rows. Wall seconds, or
    with ``cpu`` the process's CPU seconds (one torch thread: what the work costs whatever else runs)."""
    heads = str(res["cell"].get("heads") or "")
    sel = units.get(f"select-{data}", {}).get("result", {})
    t = "cpu_s" if cpu else "time_s"
    if heads and not heads.startswith("random"):
        unit = units.get(f"heads-{head_method if heads == 'p2d' else heads}")
        heads_s = unit["result"][t] if unit else 0.0
    else:
        heads_s = (sel.get("heads_cpu_s") if cpu else sel.get("heads_s")) or 0.0
    return cell_cost(res["cpu_s" if cpu else "train_s"] or 0.0, heads_s, sel.get(t) or 0.0)


def _cell_summary(vals: dict[int, dict], seeds: dict, data: str, head_method: str) -> dict:
    res = list(vals.values())
    costs = [_cost(r, seeds[k], data, head_method) for k, r in vals.items()]
    return {"accuracy": _stat(r.get("accuracy") for r in res), "loss": _stat(r.get("loss") for r in res),
            "other_accuracy": _stat(r.get("other_accuracy") for r in res),
            "cost_s": _stat(costs),
            "cost_cpu_s": _stat(_cost(r, seeds[k], data, head_method, cpu=True) for k, r in vals.items()),
            "train_s": _stat(r["train_s"] for r in res), "cpu_s": _stat(r.get("cpu_s") for r in res),
            "rows": res[0]["rows"], "steps": res[0]["steps"], "lr": res[0]["lr"],
            "trainable_params": _span(r["trainable_params"] for r in res),
            "query_heads_changed": _span(r.get("query_heads_changed") for r in res),
            "optimizer_state_bytes": res[0]["optimizer_state_bytes"], "per_seed": [r.get("accuracy") for r in res]}


def _span(values) -> dict | None:
    """Per-seed counts (trainable parameters, query heads changed: they differ between seeds when the heads
    do) as their range and the values, in seed order."""
    vals = list(values)
    known = [v for v in vals if v is not None]
    return {"min": min(known), "max": max(known), "per_seed": vals} if known else None


def _count_span(sp, sep: str = ",") -> str:
    if not sp:
        return "–"
    lo, hi = f"{sp['min']:{sep}}", f"{sp['max']:{sep}}"
    return lo if lo == hi else f"{lo}-{hi}"


def _dist(values) -> dict | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    q = lambda p: vals[min(len(vals) - 1, int(p * (len(vals) - 1) + 0.5))]  # noqa: E731
    return {"mean": statistics.fmean(vals), "p05": q(0.05), "median": q(0.5), "p95": q(0.95), "min": vals[0],
            "max": vals[-1], "n": len(vals)}


def _share_at_or_above(values: list, draws: list[list]) -> float | None:
    pairs = [(v, d) for v, ds in zip(values, draws) if v is not None for d in ds if d is not None]
    return sum(d >= v for v, d in pairs) / len(pairs) if pairs else None


def _aer(cfg, seeds: dict, p2d_cell: str) -> dict | None:
    """AER of P2D against full fine-tuning of the whole pool, and at equal accuracy (first seed with the
    reference), with an interval from resampling eval rows."""
    import numpy as np

    for seed, u in seeds.items():
        ref, p2d, base = u.get("cell-full-full-pool"), u.get(p2d_cell), u.get("base")
        if not (ref and p2d and base):
            continue
        ref, p2d, base = ref["result"], p2d["result"], base["result"]
        cost = _cost(p2d, u, "p2d", cfg.head_method)
        cost_cpu = _cost(p2d, u, "p2d", cfg.head_method, cpu=True)
        t_full = ref["train_s"]
        curve = [{"train_s": p["train_s"], "accuracy": p["accuracy"]} for p in ref["curve"]]
        t_eq = time_to_reach(curve, p2d["accuracy"], base["accuracy"])
        rng = np.random.default_rng(0)
        rows = [np.asarray([v if v is not None else 0 for v in r], dtype=float)
                for r in [base["strict"], p2d["strict"]] + [p["strict"] for p in ref["curve"]]]
        boots = []
        n = len(rows[0])
        for _ in range(cfg.bootstrap):
            idx = rng.integers(0, n, size=n)
            b, p, *c = [r[idx].mean() for r in rows]
            t = time_to_reach([{"train_s": pt["train_s"], "accuracy": a} for pt, a in zip(curve, c)], p, b)
            boots.append(math.inf if t in (None, 0.0) else cost / t)
        boots.sort()
        lo, hi = boots[int(0.025 * (len(boots) - 1))], boots[int(0.975 * (len(boots) - 1))]
        return {"seed": seed, "p2d_cost_s": cost, "p2d_accuracy": p2d["accuracy"], "base_accuracy": base["accuracy"],
                "full_time_s": t_full, "full_accuracy": ref["accuracy"], "aer": cost / t_full if t_full else None,
                "aer_cpu": cost_cpu / ref["cpu_s"] if ref.get("cpu_s") else None, "p2d_cpu_s": cost_cpu,
                "full_cpu_s": ref.get("cpu_s"),
                "curve": [{"train_s": 0.0, "accuracy": base["accuracy"]}] + curve,
                "full_time_to_reach_s": t_eq,
                "aer_at_equal_accuracy": (cost / t_eq) if t_eq else None,
                "aer_at_equal_accuracy_ci95": [lo, hi],
                "note": None if t_eq else ("P2D's accuracy is at or below the base model's" if t_eq == 0.0
                                           else "full fine-tuning never reached P2D's accuracy")}
    return None


# ------------------------------------------------------------------------------------------ output
def _pct(st, digits=1) -> str:
    if st is None:
        return "–"
    if isinstance(st, dict) and "mean" in st:
        m, sd = 100 * st["mean"], 100 * st.get("sd", 0.0)
        return f"{m:.{digits}f} ± {sd:.{digits}f}" if st.get("n", 1) > 1 else f"{m:.{digits}f}"
    return f"{100 * st:.{digits}f}"


def _num(st, digits=3) -> str:
    if st is None:
        return "–"
    m = st["mean"] if isinstance(st, dict) else st
    return f"{m:.{digits}g}"


def _diff(d) -> str:
    if not d:
        return "–"
    lo, hi = d["ci95"]
    return f"{100 * d['estimate']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] (MDE {100 * d['mde']:.1f})"


def _ldiff(d) -> str:
    """A difference of answer losses (nats; negative: P2D's is lower)."""
    d = (d or {}).get("loss")
    if not d:
        return "–"
    lo, hi = d["ci95"]
    return f"{d['estimate']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _lr(x) -> str:
    return "–" if x is None else f"{x:.3g}"


def markdown(results: dict) -> str:
    cfg = results["config"]
    m = results["machine"]
    lines = [f"# P2D benchmark ({'quick' if cfg['quick'] else 'default size'})", "",
             f"Machine: {m.get('platform')}, Python {m.get('python')}, torch {m.get('torch')}, {m.get('cpu_count')} "
             f"CPUs, {m.get('torch_threads')} torch threads{', ' + m['gpu'] if m.get('gpu') else ''}  ",
             f"Model: {results['model'].get('model')} ({results['model'].get('params'):,} parameters, "
             f"{results['model'].get('device')}, {results['model'].get('dtype')})  ",
             f"Reporting seeds {cfg['first_seed']}..{cfg['first_seed'] + cfg['seeds'] - 1}, choice seed "
             f"{cfg['choice_seed']}; pool {cfg['pool_size']} rows, probe {cfg['probe_size']}, eval up to "
             f"{cfg['eval_size']} rows; budget {cfg['data_ratio']:.0%} of the pool, {cfg['epochs']:g} epochs over "
             f"each cell's rows; batch {cfg['batch_size']}, max length {cfg['max_length']}; heads {cfg['head_method']} "
             f"({cfg['head_ratio']:.0%}), selection {cfg['select_method']}; selector cells train P2D's heads with "
             f"the {cfg['adapter']} adapter.  ",
             "Accuracy: strict greedy match of every eval row (teacher-forced; exactly when greedy decoding "
             "reproduces the gold answer token for token). Differences: P2D minus the other cell in points, "
             "paired by seed and row, [95% bootstrap interval] and the smallest effect the comparison could "
             "detect (MDE, 80% power).  ",
             f"Total time of this invocation: {results.get('time_s', 0):.0f} s.  "]
    prov = results.get("units") or {}
    if prov.get("code"):
        lines.append("Units by the code commit that made them: " + ", ".join(f"`{k}` {n}" for k, n in prov["code"].items())
                     + "; by torch threads: " + ", ".join(f"{k}: {n}" for k, n in prov["threads"].items()) + ".")
    lines.append("")
    if not results.get("complete", True):
        lines += ["**Incomplete:** " + ("; ".join(results.get("skipped") or []) or "the time limit stopped the run")
                  + ". The tables cover what finished (rerun the same command to continue).", ""]
    for split, s in results["splits"].items():
        lines += [f"## `{split}`", "",
                  f"Seeds {s['seeds']}. Pool: {_pct(s.get('pool_share'))}% target-skill rows, "
                  f"{_pct(s.get('pool_twins'))}% twins. Base model {_pct(s['base'])}%.", ""]
        if s["selection"]:
            lines += ["| selector | target rows % | twins % | AUROC | selection s (CPU s) |", "|---|---|---|---|---|"]
            for name, v in s["selection"].items():
                lines.append(f"| {SELECTOR_LABELS.get(name, name)} | {_pct(v['precision'])} | {_pct(v['twins'])} | "
                             f"{_num(v['auroc'])} | {_num(v['time_s'])} ({_num(v['cpu_s'])}) |")
            nul = (s.get("null_precision") or {}).get("activation")
            if nul:
                lines += ["", f"Null distribution (random heads, activation, {nul['n']} draws): target rows mean "
                          f"{_pct(nul['mean'])}%, 5-95% {_pct(nul['p05'])}-{_pct(nul['p95'])}%; share of draws at or "
                          f"above P2D's heads: {_pct(s.get('p2d_precision_rank_in_null'))}%."]
            hm = s.get("head_methods_precision")
            if hm:
                lines += ["", "Head methods (precision with activation / alignment): " + "; ".join(
                    f"{k} {_pct(v['activation'])} / {_pct(v['alignment'])}" for k, v in hm.items()) + "."]
            lines.append("")
        if s["selectors"]:
            lines += ["Trained on each selector's rows (P2D's heads, same budget, epochs and learning rate):", "",
                      "| selector | accuracy % | answer loss | other tasks % | cost CPU s | P2D minus it, pp [95%] | "
                      "P2D minus it, loss [95%] |", "|---|---|---|---|---|---|---|"]
            for name, v in s["selectors"].items():
                lines.append(f"| {SELECTOR_LABELS.get(name, name)} | {_pct(v['accuracy'])} | {_num(v['loss'])} | "
                             f"{_pct(v['other_accuracy'])} | {_num(v['cost_cpu_s'])} | {_diff(v.get('p2d_minus'))} | "
                             f"{_ldiff(v.get('p2d_minus'))} |")
            b = s.get("best_head_free")
            if b and b.get("p2d_minus"):
                d = b["p2d_minus"]
                verdict = ("beats" if d["ci95"][0] > 0 else "loses to" if d["ci95"][1] < 0 else "does not separate from")
                lv = d.get("loss") or {}
                lverdict = "" if not lv else (" lower" if lv["ci95"][1] < 0 else " higher" if lv["ci95"][0] > 0
                                              else " not separable")
                lines += ["", f"P2D {verdict} the best selector without P2D's heads ({b['selector']}) in accuracy: "
                          f"{_diff(d)} pp; its answer loss is{lverdict}: {_ldiff(d)} nats."]
            lines.append("")
        if s["heads"]:
            lines += ["Which heads are trained (on P2D's rows; random heads: the null distribution):", "",
                      "| adapter | P2D heads % | random heads % (5-95%) | P2D minus random, pp [95%] | draws at or "
                      "above P2D | answer loss P2D / random | P2D minus random, loss [95%] | query heads changed | "
                      "trainable params | lr P2D / random (interior) |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for adapter, v in s["heads"].items():
                nc = v.get("p2d_vs_random") or {}
                rr = v.get("random_range") or {}
                lr = v["lr"]
                lines.append(f"| {adapter} | {_pct(v['p2d']['accuracy'])} | {_pct(v['random'])} "
                             f"({_pct(rr.get('p05'))}-{_pct(rr.get('p95'))}) | {_diff(nc)} | "
                             f"{_pct(nc.get('share_of_draws_at_or_above'))}% | {_num(v['p2d']['loss'])} / "
                             f"{_num(v.get('random_loss'))} | {_ldiff(nc)} | {_count_span(v['p2d']['query_heads_changed'], '')} | "
                             f"{_count_span(v['p2d']['trainable_params'])} | {_lr(lr.get('p2d'))} / {_lr(lr.get('random'))} "
                             f"({v['lr_interior'].get('p2d')}/{v['lr_interior'].get('random')}) |")
                for m_, c in v["candidates"].items():
                    lines.append(f"| {adapter}, {m_} heads (vs random) | {_pct(c['accuracy'])} | | "
                                 f"{_diff(c.get('vs_random'))} | | | {_ldiff(c.get('vs_random'))} | | | |")
            lines.append("")
        if s["classic"]:
            lines += ["| classic cell | accuracy % | answer loss | trainable params | P2D minus it, pp [95%] | "
                      "P2D minus it, loss [95%] |", "|---|---|---|---|---|---|"]
            for name, v in s["classic"].items():
                lines.append(f"| {CELLS[name].label} | {_pct(v['accuracy'])} | {_num(v['loss'])} | "
                             f"{_count_span(v['trainable_params'])} | {_diff(v.get('p2d_minus'))} | {_ldiff(v.get('p2d_minus'))} |")
            lines.append("")
        a = s.get("aer")
        if a:
            eq = a["aer_at_equal_accuracy"]
            lo, hi = a["aer_at_equal_accuracy_ci95"]
            lines += [f"AER (seed {a['seed']}): P2D {a['p2d_cost_s']:.0f} s / full fine-tuning of the whole pool "
                      f"{a['full_time_s']:.0f} s = {a['aer']:.3f} (CPU seconds: {a['p2d_cpu_s']:.0f} / "
                      f"{a['full_cpu_s'] or 0:.0f} = {a['aer_cpu'] or 0:.3f}; full fine-tuning reached "
                      f"{_pct(a['full_accuracy'])}%, "
                      f"P2D {_pct(a['p2d_accuracy'])}%). At equal accuracy: "
                      + (f"{eq:.3f} [95% {lo:.3f}, {hi:.3g}]" if eq else a["note"]) + " (full fine-tuning's curve "
                      "from the base model at 0 s: " + ", ".join(f"{p['train_s']:.0f} s {100 * p['accuracy']:.1f}%"
                                                                 for p in a["curve"]) + ").", ""]
        if s.get("heads_test"):
            lines.append(heads_test.markdown(s["heads_test"], cfg["head_method"]))
        if s.get("frontier"):
            lines += [frontier.markdown(s["frontier"]), f"![frontier of {split}]({frontier.svg_name(split)})", ""]
    if results.get("rule"):
        lines.append(rule_markdown(results["rule"]))
    if results.get("defaults"):
        lines.append(choice_markdown(results["defaults"]))
    return "\n".join(lines)


def figure(results: dict):
    import plotly.graph_objects as go

    fig = go.Figure()
    for split, s in results["splits"].items():
        a = s.get("aer")
        if not a:
            continue
        fig.add_trace(go.Scatter(x=[p["train_s"] for p in a["curve"]], y=[100 * p["accuracy"] for p in a["curve"]],
                                 mode="lines+markers", name=f"{split}: full fine-tuning of the whole pool"))
        fig.add_trace(go.Scatter(x=[a["p2d_cost_s"]], y=[100 * a["p2d_accuracy"]], mode="markers",
                                 marker=dict(size=14, symbol="star"), name=f"{split}: P2D (cost)"))
    fig.update_layout(title="Accuracy against time: full fine-tuning's learning curve and P2D",
                      xaxis_title="seconds (training; P2D: heads + selection + training)",
                      yaxis_title="strict accuracy (%)", template="plotly_white", height=480, width=820)
    return fig


def write_report(out: Path, results: dict) -> None:
    write_json(out / "results.json", results)
    write_text(out / "results.md", markdown(results))
    for split, s in results["splits"].items():
        if s.get("frontier"):
            write_text(out / frontier.svg_name(split), frontier.svg({split: s["frontier"]}))
    try:
        fig = figure(results)
    except ImportError:  # plotly missing (a bare GPU image): rerunning the same command elsewhere redraws it
        return
    write_text(out / "aer_vs_accuracy.html", fig.to_html(include_plotlyjs=True, full_html=True))
