"""The rule that chooses the product's defaults, applied to the choice seed of the choice splits.

Written before the benchmark was run (docs/BENCHMARKS.md quotes it); nothing here reads an eval row
of a reporting seed:

1. **Selection** (head method x score, and the selectors without heads): every head method of the
   choice study (P2D's default, ``gradient`` without contrast, ``gradient_layer``, the candidates) with
   the ``activation`` and the ``alignment`` score, and ``tfidf``, ``bm25`` and ``hidden`` (at a quarter,
   half and three quarters of the depth). Score: the mean over the choice splits of the share of
   target-skill rows among the selected rows at the choice seed. The highest score wins; within 0.02
   of it, the one with the lower mean selection CPU seconds (head scoring included).
2. **Adapter** (``qkvo``, ``qo``, ``offset``, each at the learning rate its own sweep chose): trained
   on P2D's heads and P2D's selection at the choice seed, the lowest mean probe loss over the choice
   splits wins; within 0.01 nats of it, the one that changes fewer query heads.
3. If a selector without heads wins step 1, the product's default selection uses it (the heads are
   still found, for training); P2D as the paper describes it stays a named configuration.
"""

from __future__ import annotations

import statistics

from ..adapter import parse_adapter
from .split import folder_name

TIE_PRECISION = 0.02
TIE_LOSS = 0.01


def _reach(adapter: str) -> int:
    """How far an adapter's change reaches: k/v rows a whole GQA group (2), q/o slices their own query
    heads (1), an offset only the head's output (0)."""
    kind, projections = parse_adapter(adapter)
    return 0 if kind == "offset" else 2 if {"k", "v"} & set(projections) else 1


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def choose_defaults(bench) -> dict | None:
    """The rule applied to what the invocation found valid (None without a choice study)."""
    cfg = bench.cfg
    seed = f"seed{cfg.choice_seed}"
    cand: dict[str, dict] = {}
    splits_seen = []
    for split in cfg.choice_splits:
        f = folder_name(split)
        units = {k[2]: e["result"] for k, e in bench.touched.items() if len(k) == 3 and k[:2] == (f, seed)}
        feats = units.get("features")
        if not feats:
            continue
        splits_seen.append(split)
        act_s = (units.get("select-p2d") or {}).get("cpu_s")
        aln_s = (units.get("select-rh-alignment") or {}).get("cpu_s")
        for m, v in feats["methods"].items():
            heads_cpu = (units.get(f"heads-{m}") or {}).get("cpu_s")
            for score, sel_cpu in (("activation", act_s), ("alignment", aln_s)):
                c = cand.setdefault(f"{m} + {score}", {"kind": "heads", "head_method": m, "select_method": score,
                                                       "precision": [], "twins": [], "cpu_s": []})
                c["precision"].append(v[score].get("precision"))
                c["twins"].append(v[score].get("twins"))
                c["cpu_s"].append((heads_cpu or 0.0) + (sel_cpu or 0.0) if sel_cpu is not None else None)
        for name, u in units.items():
            if not name.startswith("select-") or name in ("select-p2d", "select-rh-alignment", "select-random"):
                continue
            sel = name[len("select-"):]
            layer = int(sel.split("-L")[1]) if "-L" in sel else (cfg.hidden_layer if sel == "hidden" else None)
            key = sel if not sel.startswith("hidden") else (f"hidden (layer {layer})" if layer is not None
                                                             else "hidden (middle layer)")
            c = cand.setdefault(key, {"kind": "no heads", "select_method": sel.split("-L")[0], "hidden_layer": layer,
                                      "precision": [], "twins": [], "cpu_s": []})
            c["precision"].append(u.get("precision"))
            c["twins"].append(u.get("twins"))
            c["cpu_s"].append(u.get("cpu_s"))
    if not cand:
        return None
    table = []
    for name, c in cand.items():
        if len(c["precision"]) < len(splits_seen):
            continue  # measured on fewer splits: not comparable
        table.append({"candidate": name, **{k: v for k, v in c.items() if k not in ("precision", "twins", "cpu_s")},
                      "precision": _mean(c["precision"]), "worst": min(p for p in c["precision"] if p is not None),
                      "twins": _mean(c["twins"]), "cpu_s": _mean(c["cpu_s"]), "per_split": c["precision"]})
    table.sort(key=lambda r: -(r["precision"] or 0))
    best = table[0]["precision"]
    close = [r for r in table if r["precision"] is not None and best - r["precision"] <= TIE_PRECISION]
    winner = min(close, key=lambda r: r["cpu_s"] if r["cpu_s"] is not None else float("inf"))
    adapters = []
    for adapter in cfg.adapters:
        losses = []
        for split in splits_seen:
            sweep = bench.touched.get((folder_name(split), "sweep", f"{adapter}-p2d"))
            if sweep:
                pts = {p["lr"]: p for p in sweep["result"]["points"]}
                losses.append(pts[sweep["result"]["chosen"]]["probe_loss"])
        if len(losses) == len(splits_seen) and losses:
            adapters.append({"adapter": adapter, "probe_loss": _mean(losses), "per_split": losses})
    adapter_winner = None
    if adapters:
        low = min(a["probe_loss"] for a in adapters)
        close = [a for a in adapters if a["probe_loss"] - low <= TIE_LOSS]
        adapter_winner = min(close, key=lambda a: (_reach(a["adapter"]), a["probe_loss"]))["adapter"]
    return {"choice_seed": cfg.choice_seed, "splits": splits_seen, "selection": table, "selection_winner": winner,
            "adapters": adapters, "adapter_winner": adapter_winner}


def choice_markdown(d: dict) -> str:
    lines = [f"## Defaults by the rule (choice seed {d['choice_seed']}; splits {', '.join(d['splits'])})", "",
             "| candidate | kind | target rows (mean) | worst split | twins | CPU s | per split |", "|---|---|---|---|---|---|---|"]
    for r in d["selection"]:
        lines.append(f"| {r['candidate']} | {r['kind']} | {r['precision']:.3f} | {r['worst']:.3f} | "
                     f"{(r['twins'] or 0):.3f} | {r['cpu_s'] if r['cpu_s'] is None else round(r['cpu_s'], 1)} | "
                     f"{', '.join(f'{p:.2f}' for p in r['per_split'] if p is not None)} |")
    w = d["selection_winner"]
    lines += ["", f"Selection by the rule: **{w['candidate']}** (mean {w['precision']:.3f})."]
    if d["adapters"]:
        lines += ["", "| adapter | probe loss at its swept lr (mean) | per split |", "|---|---|---|"]
        lines += [f"| {a['adapter']} | {a['probe_loss']:.4f} | {', '.join(f'{x:.4f}' for x in a['per_split'])} |"
                  for a in d["adapters"]]
        lines += ["", f"Adapter by the rule: **{d['adapter_winner']}**."]
    return "\n".join(lines) + "\n"
