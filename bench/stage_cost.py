"""The stage-cost table (issue 28 item 5): every stage of a P2D run against its floor, on the embedded model.

One command, measured in one process (ratios are taken within the same run)::

    nice -n 10 python bench/stage_cost.py --threads 1 --sizes 1000,4000 --json docs/data/stage_cost.json \
        --md docs/data/stage_cost.md

For each pool size (the built-in task pool, target addition, probe 100 rows, seed 0):

- ``plain``: one plain no-grad forward over the pool with full logits (`p2d.bench.components.plain_forward_seconds`,
  the unit of the issue's targets);
- ``select (model pass)``: today's activation selection with the default heads (`select_data`: a no-grad forward
  that stops after the deepest selected head's layer); its floor is that forward without hooks
  (``floor_to_deepest``, smallest size only);
- ``record pass``: the select stage's head record (`p2d.method.features.head_norms` over every layer), and its
  disk size; ``reselect``: a selection from the record without the model (10,000 rows by default: the record
  of the smallest size repeated, the timing depends only on the shape), also a random-head null of
  ``--null-draws`` draws; agreement of the record's selection (float32 in memory, float16 from disk) with the
  model pass (Jaccard of the selected rows, Spearman of the scores);
- ``heads``: the default head scoring (probe + pool sample) against a forward and backward (to the input
  embeddings, no weight gradients) over the same rows, and against plain probe forwards;
- ``train step``: one head-training step (the default heads; with a lowest layer, the heads the window
  gives) against one full fine-tuning step on the same median-length batch of the selected rows;
- ``select to layer``: the record pass stopped at each highest layer, against the plain forward;
- padded-token share of each stage's batches (sorted by length, as the stages batch; file order for comparison);
- peak memory (RSS increase on CPU, `p2d.cells.PeakMemory`); the extrapolation to 1M rows (linear in rows).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._common import finish, jaccard  # noqa: E402
from p2d.bench.components import full_step_time, head_step_time, plain_forward_seconds  # noqa: E402
from p2d.explore import spearman  # noqa: E402
from p2d.cells import PeakMemory, random_heads  # noqa: E402
from p2d.config import RunConfig  # noqa: E402
from p2d.data.encoding import collate, encode, iter_batches  # noqa: E402
from p2d.method.features import head_norms, load_record, save_record, select_from_features  # noqa: E402
from p2d.method.gating import HeadGate  # noqa: E402
from p2d.method.heads import DEFAULT_HEAD_METHOD, _pool_sample, score_heads, select_top  # noqa: E402
from p2d.method.scoring import EncodedBatches, loss_batches, padded_tokens  # noqa: E402
from p2d.method.selection import select_data  # noqa: E402
from p2d.models import frozen, load_model  # noqa: E402
from p2d.pipeline import load_run_data  # noqa: E402


def timed(fn):
    with PeakMemory(torch.device("cpu")) as mem:
        t = time.perf_counter()
        out = fn()
        s = time.perf_counter() - t
    return out, s, mem.peak_mb


def padding(samples, tok, bs, ml, sort=True) -> dict:
    enc = encode(samples, tok, ml)
    real = sum(len(it["input_ids"]) for it in enc)
    groups = list(iter_batches(enc, bs, sort_by_length=sort))
    padded = padded_tokens(groups)
    return {"real_tokens": real, "padded_tokens": padded, "pad_share": round(1 - real / padded, 4) if padded else 0.0}


def body_forward_seconds(lm, samples, bs, ml, last: int) -> float:
    """A no-grad forward over ``samples`` stopped after layer ``last`` (no head statistic): the selection floor."""
    enc = EncodedBatches(lm, samples, bs, ml, "all")
    model = lm.model
    body = getattr(model, "base_model", None) or model
    t = time.perf_counter()
    with frozen(model), torch.no_grad(), HeadGate(model, lm.geometry, layers=[last], stop_after=last) as gate:
        for items in enc.groups:
            b = enc.tensors(items)
            gate.run(body, input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    return time.perf_counter() - t


def fwd_bwd_seconds(lm, samples, bs, ml) -> float:
    """Forward and backward (to the input embeddings; no weight gradient) over ``samples``: the heads floor."""
    model = lm.model
    emb = model.get_input_embeddings()
    t = time.perf_counter()
    with frozen(model):
        for b in loss_batches(lm, samples, bs, ml):
            x = emb(b["input_ids"]).detach().requires_grad_(True)
            out = model(inputs_embeds=x, attention_mask=b["attention_mask"], use_cache=False)
            logits = out.logits[:, :-1].float()
            labels = b["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100)
            loss.backward()
    return time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,4000", help="pool sizes, comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--reselect-rows", type=int, default=10_000)
    ap.add_argument("--null-draws", type=int, default=200)
    ap.add_argument("--window-rows", type=int, default=200, help="pool rows the floors and layer windows are timed on")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bs, ml = args.batch_size, args.max_length
    sizes = [int(s) for s in args.sizes.split(",")]
    t0 = time.perf_counter()
    lm = load_model("default", device="cpu")
    L = lm.geometry.n_layers
    res: dict = {"model": "SmolLM2-135M-Instruct (embedded), fp32, CPU", "threads": args.threads, "batch_size": bs,
                 "max_length": ml, "load_before": os.getloadavg(), "sizes": {}}
    log = lambda *a: print(f"[{time.perf_counter() - t0:7.1f}s]", *a, flush=True)  # noqa: E731
    heads = None
    for k, n in enumerate(sizes):
        cfg = RunConfig(pool_size=n, seed=0).validate()
        data = load_run_data(cfg)
        pool, probe = data.pool.samples, data.probe.samples
        row: dict = {"pool_rows": len(pool), "probe_rows": len(probe)}
        plain = plain_forward_seconds(lm, pool, bs, ml)
        row["plain_forward_s"] = plain
        log(n, "plain forward", round(plain, 1))
        if heads is None:  # the heads stage does not grow with the pool (probe + a pool sample)
            heads, hs_s, hs_mem = timed(lambda: score_heads(lm, probe, DEFAULT_HEAD_METHOD, 0.1, pool=pool, seed=0,
                                                            batch_size=bs, max_length=ml))
            sample_rows = heads.extra.get("pool_samples") or 0
            rows = list(probe) + list(_pool_sample(pool, probe, 0))
            floor = fwd_bwd_seconds(lm, rows, bs, ml)
            probe_fwd = plain_forward_seconds(lm, probe, bs, ml)
            res["heads"] = {"method": DEFAULT_HEAD_METHOD, "time_s": hs_s, "peak_mem_mb": hs_mem,
                            "floor_fwd_bwd_s": floor, "ratio_to_floor": hs_s / floor,
                            "probe_forward_s": probe_fwd, "ratio_to_probe_forward": hs_s / probe_fwd,
                            "pool_sample_rows": sample_rows, "padding": padding(rows, lm.tokenizer, bs, ml),
                            "padding_file_order": padding(rows, lm.tokenizer, bs, ml, sort=False),
                            "selected": heads.selected}
            log("heads", res["heads"]["time_s"], "floor", floor, "probe fwd", probe_fwd)
        sel, sel_s, sel_mem = timed(lambda: select_data(lm, heads, pool, "activation", 0.1, batch_size=bs, max_length=ml))
        deepest = max(layer for layer, _ in heads.selected)
        row["select_model_pass"] = {"time_s": sel_s, "ratio_to_plain": sel_s / plain, "peak_mem_mb": sel_mem,
                                    "deepest_layer": deepest}
        log(n, "select (model pass)", round(sel_s, 1))
        feats, rec_s, rec_mem = timed(lambda: head_norms(lm, pool, bs, ml)["all"])
        folder = Path(tempfile.mkdtemp(prefix="p2d-record-"))
        info = save_record(feats, folder)
        disk = load_record(folder, info)
        row["record_pass"] = {"time_s": rec_s, "ratio_to_plain": rec_s / plain, "peak_mem_mb": rec_mem,
                              "disk_bytes": info["bytes"], "bytes_per_row": info["bytes"] / len(pool)}
        log(n, "record pass", round(rec_s, 1))
        agree = {}
        for name, f in (("float32", feats), ("float16_disk", disk)):
            r = select_from_features(f, heads, "activation", 0.1, lm.geometry)
            agree[name] = {"jaccard": jaccard(r.selected, sel.selected), "spearman": spearman(r.scores, sel.scores)}
        row["record_agreement"] = agree
        row["padding_select"] = padding(pool, lm.tokenizer, bs, ml)
        row["padding_select_file_order"] = padding(pool, lm.tokenizer, bs, ml, sort=False)
        train_rows = [pool[i] for i in sel.selected]
        row["padding_train"] = padding(train_rows, lm.tokenizer, bs, ml)
        row["padding_train_file_order"] = padding(train_rows, lm.tokenizer, bs, ml, sort=False)
        if data.eval is not None:
            row["padding_eval"] = padding(data.eval.samples, lm.tokenizer, bs, ml)
        if k == 0:
            res["reselect"] = reselect(feats, heads, lm, args.reselect_rows, args.null_draws)
            log("reselect", res["reselect"])
            sub = pool[:args.window_rows]  # floors and layer windows: per-row ratios, on the pool's first rows
            sub_plain = plain_forward_seconds(lm, sub, bs, ml)
            floors = {top: body_forward_seconds(lm, sub, bs, ml, top) for top in sorted({deepest, L - 1})}
            _, sub_sel, _ = timed(lambda: select_data(lm, heads, sub, "activation", 0.1, batch_size=bs, max_length=ml))
            _, sub_rec, _ = timed(lambda: head_norms(lm, sub, bs, ml)["all"])
            res["floors"] = {"rows": len(sub), "plain_forward_s": sub_plain, "select_model_pass_s": sub_sel,
                             "record_pass_s": sub_rec, "floor_to_deepest_s": floors[deepest],
                             "floor_all_layers_s": floors[L - 1], "select_ratio_to_floor": sub_sel / floors[deepest],
                             "record_ratio_to_floor": sub_rec / floors[L - 1]}
            log("floors", res["floors"])
            res["select_to_layer"] = []
            for top in sorted({L // 3 - 1, L // 2 - 1, 2 * L // 3 - 1}):
                _, s, _ = timed(lambda: head_norms(lm, sub, bs, ml, n_layers=top + 1))
                res["select_to_layer"].append({"highest_layer": top, "time_s": s, "ratio_to_plain": s / sub_plain})
                log("to layer", top, round(s, 1))
            res["select_to_layer"].append({"highest_layer": L - 1, "time_s": sub_rec, "ratio_to_plain": sub_rec / sub_plain})
            res["train_step"] = train_steps(lm, heads, train_rows, bs, ml, L)
            log("train steps", res["train_step"])
        res["sizes"][str(n)] = row
    small, big = str(sizes[0]), str(sizes[-1])
    per_row = res["sizes"][big]["record_pass"]["time_s"] / int(big)
    res["extrapolation_1m"] = {"record_pass_s": per_row * 1e6, "plain_forward_s":
                               res["sizes"][big]["plain_forward_s"] / int(big) * 1e6,
                               "record_disk_gb": res["sizes"][small]["record_pass"]["bytes_per_row"] * 1e6 / 1e9,
                               "reselect_s": res["reselect"]["activation_s"] / args.reselect_rows * 1e6,
                               "basis": f"linear in rows from the {big}-row measurement"}
    return finish(res, t0, markdown, args.json, args.md)


def reselect(feats, heads, lm, rows: int, draws: int) -> dict:
    """Selections from a ``rows``-row float16 record read from disk (the measured record repeated)."""
    n = feats.norms.shape[0]
    reps = -(-rows // n)
    big = type(feats)(norms=feats.norms.repeat(reps, 1, 1)[:rows], grads=None,
                      lengths=feats.lengths.repeat(reps)[:rows], positions=feats.positions, time_s=0.0, extra={})
    folder = Path(tempfile.mkdtemp(prefix="p2d-record-"))
    disk = load_record(folder, save_record(big, folder))
    out = {"rows": rows, "disk_bytes": (folder / "head_record.f16").stat().st_size}
    for method in ("activation", "activation_length_z"):
        times = []
        for _ in range(5):
            t = time.perf_counter()
            select_from_features(load_record(folder, save_info(disk)), heads, method, 0.1, lm.geometry)
            times.append(time.perf_counter() - t)
        out[f"{method}_s"] = statistics.median(times)
    t = time.perf_counter()
    for d in range(draws):
        select_from_features(disk, random_heads(lm, 0.1, 0, d), "activation", 0.1, lm.geometry)
    out["null_draws"], out["null_total_s"] = draws, time.perf_counter() - t
    return out


def save_info(feats) -> dict:
    return {"shape": list(feats.norms.shape), "positions": feats.positions, "pass_s": 0.0}


def train_steps(lm, heads, rows, bs, ml, L) -> list[dict]:
    """One head step per lowest layer (the heads the window [lowest, L-1] gives) against one full step."""
    enc = encode(rows, lm.tokenizer, ml)
    batches = list(iter_batches(enc, bs, sort_by_length=True))
    median = sorted(batches, key=lambda b: max(len(i["input_ids"]) for i in b))[len(batches) // 2]
    micro = [collate(median, lm.tokenizer.pad_token_id or 0)]
    full, full_mem = full_step_time(lm, micro)
    out = []
    for low in (None, L // 3, L // 2, 2 * L // 3):
        hl = heads.selected if low is None else select_top(heads.scores, heads.ratio, [low, L - 1])
        step, mem = head_step_time(lm, hl, micro)
        out.append({"lowest_layer": low, "lowest_selected": min(layer for layer, _ in hl), "head_step_s": step,
                    "full_step_s": full, "ratio_to_full": step / full, "peak_mem_mb": mem, "full_peak_mem_mb": full_mem,
                    "batch_tokens": int(micro[0]["input_ids"].numel())})
    return out


def markdown(r: dict) -> str:
    f = lambda x, d=2: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
    lines = [f"Embedded model, fp32, CPU, {r['threads']} thread(s), batch {r['batch_size']}, max length "
             f"{r['max_length']}; load average before {', '.join(f'{x:.1f}' for x in r['load_before'])}, after "
             f"{', '.join(f'{x:.1f}' for x in r['load_after'])}; total {r['total_s']:.0f} s.", "",
             "| pool rows | stage | seconds | ratio to its floor | ratio to plain forward | padded-token share "
             "(sorted / file order) | peak MB |", "|---|---|---|---|---|---|---|"]
    h = r["heads"]
    for n, row in r["sizes"].items():
        ps, pf = row["padding_select"]["pad_share"], row["padding_select_file_order"]["pad_share"]
        sm, rp = row["select_model_pass"], row["record_pass"]
        lines.append(f"| {n} | plain forward (full logits) | {f(row['plain_forward_s'], 1)} | — | 1.00 | {ps:.3f} / "
                     f"{pf:.3f} | — |")
        lines.append(f"| {n} | select, model pass (to layer {sm['deepest_layer']}) | {f(sm['time_s'], 1)} | "
                     f"{f(r['floors']['select_ratio_to_floor'])} | {f(sm['ratio_to_plain'])} | {ps:.3f} / {pf:.3f} | "
                     f"{f(sm['peak_mem_mb'], 0)} |")
        lines.append(f"| {n} | select, record pass (all layers) | {f(rp['time_s'], 1)} | {f(r['floors']['record_ratio_to_floor'])} | "
                     f"{f(rp['ratio_to_plain'])} | {ps:.3f} / {pf:.3f} | {f(rp['peak_mem_mb'], 0)} |")
        pt, ptf = row["padding_train"]["pad_share"], row["padding_train_file_order"]["pad_share"]
        lines.append(f"| {n} | training rows (10%) | — | — | — | {pt:.3f} / {ptf:.3f} | — |")
        if "padding_eval" in row:
            lines.append(f"| {n} | eval set | — | — | — | {row['padding_eval']['pad_share']:.3f} / — | — |")
    lines.append(f"| any | heads ({h['method']}, probe {r['sizes'][next(iter(r['sizes']))]['probe_rows']} + pool "
                 f"sample) | {f(h['time_s'], 1)} | {f(h['ratio_to_floor'])} (fwd+bwd) | "
                 f"{f(h['ratio_to_probe_forward'])} probe forwards | {h['padding']['pad_share']:.3f} / "
                 f"{h['padding_file_order']['pad_share']:.3f} | {f(h['peak_mem_mb'], 0)} |")
    lines += ["", "| record agreement with the model pass (default heads, top 10%) | pool rows | Jaccard | Spearman |",
              "|---|---|---|---|"]
    for n, row in r["sizes"].items():
        for name, a in row["record_agreement"].items():
            lines.append(f"| {name} | {n} | {a['jaccard']:.4f} | {a['spearman']:.6f} |")
    rs = r["reselect"]
    lines += ["", f"Re-selection from a {rs['rows']}-row float16 record ({rs['disk_bytes'] / 1e6:.1f} MB on disk, read "
              f"from disk each time): activation {rs['activation_s'] * 1000:.0f} ms, activation_length_z "
              f"{rs['activation_length_z_s'] * 1000:.0f} ms (median of 5); a random-head null of {rs['null_draws']} "
              f"draws {rs['null_total_s']:.1f} s.", "",
              f"Floors and layer windows on the pool's first {r['floors']['rows']} rows (ratios to the plain forward over "
              f"the same rows, {r['floors']['plain_forward_s']:.1f} s): the floor of a selection is a no-grad forward "
              f"without hooks to its deepest layer ({r['floors']['floor_to_deepest_s']:.1f} s to the deepest selected "
              f"head's layer, {r['floors']['floor_all_layers_s']:.1f} s to the last layer).", "",
              "| highest head layer | record pass s | ratio to plain forward |", "|---|---|---|"]
    for t in r["select_to_layer"]:
        lines.append(f"| {t['highest_layer']} | {t['time_s']:.1f} | {t['ratio_to_plain']:.2f} |")
    lines += ["", "| lowest head layer | lowest selected | head step s | full step s | ratio to full step | "
              "peak MB (head / full) |", "|---|---|---|---|---|---|"]
    for t in r["train_step"]:
        lines.append(f"| {'none' if t['lowest_layer'] is None else t['lowest_layer']} | {t['lowest_selected']} | "
                     f"{t['head_step_s']:.2f} | {t['full_step_s']:.2f} | {t['ratio_to_full']:.2f} | "
                     f"{f(t['peak_mem_mb'], 0)} / {f(t['full_peak_mem_mb'], 0)} |")
    e = r["extrapolation_1m"]
    lines += ["", f"1M rows on paper ({e['basis']}): record pass {e['record_pass_s'] / 3600:.1f} h (plain forward "
              f"{e['plain_forward_s'] / 3600:.1f} h), record {e['record_disk_gb']:.2f} GB on disk, re-selection "
              f"{e['reselect_s']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
