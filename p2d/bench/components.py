"""Component figures of the benchmark: where the time of a P2D run goes, as ratios measured in one run.

- scoring throughput: every head-scoring and selection method over the same data, as a ratio to one
  plain no-grad forward (full logits) over that data with the same length-grouped batches
  (`plain_forward_seconds`);
- one optimizer step of head training, LoRA (q,k,v,o) and full fine-tuning on the same batch: median
  time and peak memory;
- how the head step and the activation selection grow with the share of heads (5, 10, 30, 100%) and
  with the sequence length (synthetic batches of 64 / 128 / 256 tokens, answer on the last quarter);
- a profile (top operators) of one head-training step and of one activation-selection batch.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from ..adapter import HeadAdapter
from ..cells import LORA_TARGETS, PeakMemory
from ..data.encoding import IGNORE_INDEX, collate, encode, iter_batches
from ..errors import UserError
from ..method.heads import score_heads
from ..method.scoring import EncodedBatches
from ..method.selection import SELECT_METHODS, select_data
from ..models import frozen, trainable
from ..training import loss_backward

SHARES = (0.05, 0.1, 0.3, 1.0)
LENGTHS = (64, 128, 256)


def _sync(lm):
    if lm.device.type == "cuda":
        torch.cuda.synchronize()


def plain_forward_seconds(lm, samples: list, batch_size: int = 8, max_length: int = 256) -> float:
    """Wall seconds of one plain no-grad forward of the model (full logits, as ``model(**inputs)``)
    over ``samples``, encoded and batched exactly as `p2d.method.selection.select_data` does (encoding
    included, as in ``Selection.time_s``): the unit of every cost ratio here."""
    samples = list(samples or [])
    if not samples:
        raise UserError("no samples to time")
    _sync(lm)
    start = time.perf_counter()
    enc = EncodedBatches(lm, samples, batch_size, max_length, "all")
    with frozen(lm.model), torch.no_grad():
        for items in enc.groups:
            batch = enc.tensors(items)
            lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    _sync(lm)
    return time.perf_counter() - start


def _random_heads(lm, share: float, seed: int) -> list[list[int]]:
    return score_heads(lm, [], method="random", ratio=share, seed=seed).selected


def step_time(lm, model, params, micro, n: int = 3) -> tuple[float, float | None]:
    opt = torch.optim.AdamW(params, lr=0.0)
    times = []
    with PeakMemory(lm.device) as mem:
        for i in range(n + 1):
            _sync(lm)
            t = time.perf_counter()
            loss_backward(model, micro, lm.device)
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(lm)
            if i:
                times.append(time.perf_counter() - t)
    del opt
    return statistics.median(times), mem.peak_mb


def head_step_time(lm, heads, micro, n: int = 3) -> tuple[float, float | None]:
    """Median seconds (and peak MB) of an optimizer step of a head adapter on ``heads`` over ``micro``;
    the adapter is detached afterwards, the base model untouched."""
    adapter = HeadAdapter(lm.geometry, heads, device=lm.device)
    with trainable(lm.model, []):
        adapter.attach(lm.model)
        try:
            return step_time(lm, lm.model, list(adapter.parameters()), micro, n)
        finally:
            adapter.detach()


def full_step_time(lm, micro, n: int = 3) -> tuple[float, float | None]:
    """Median seconds (and peak MB) of a full fine-tuning step over ``micro`` (AdamW at lr 0); the
    weights are restored afterwards."""
    params = list(lm.model.parameters())
    saved = [p.detach().clone() for p in params]
    try:
        with trainable(lm.model, params):
            return step_time(lm, lm.model, params, micro, n)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        del saved


def step_comparison(lm, micro, heads, lora_rank: int = 8) -> dict:
    """Head / LoRA / full step on the same batch (the base model is left as it was)."""
    out = {"heads": head_step_time(lm, heads, micro), "full": full_step_time(lm, micro)}
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=LORA_TARGETS),
                                    copy.deepcopy(lm.model))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    with trainable(model, lora):
        out["lora"] = step_time(lm, model, lora, micro)
    del model
    counts = {"heads": HeadAdapter(lm.geometry, heads, device=lm.device).num_params(),
              "lora": sum(p.numel() for p in lora), "full": sum(p.numel() for p in lm.model.parameters())}
    return {k: {"step_s": v[0], "peak_mem_mb": v[1], "trainable_params": counts[k]} for k, v in out.items()}


def synthetic_batch(lm, batch_size: int, length: int) -> list[dict]:
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(10, min(lm.tokenizer.vocab_size, 30000), (batch_size, length), generator=g)
    labels = ids.clone()
    labels[:, : length * 3 // 4] = IGNORE_INDEX
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]


def profile_table(fn, rows: int = 8) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
    table = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:rows]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1
    return [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1000, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in table]


def component_figures(lm, split, cfg, heads, progress=None) -> dict:
    """All component figures on ``split`` (see the module docstring)."""
    bs, ml = cfg.batch_size, cfg.max_length
    pool, probe = split.pool, split.probe
    res: dict = {"pool_rows": len(pool), "probe_rows": len(probe)}
    fwd_pool = plain_forward_seconds(lm, pool, bs, ml)
    fwd_probe = plain_forward_seconds(lm, probe, bs, ml)
    res["plain_forward_pool_s"], res["plain_forward_probe_s"] = fwd_pool, fwd_probe
    res["head_scoring"] = {}
    for method in ("gradient", "shift", "random"):
        hs = score_heads(lm, probe, method=method, ratio=cfg.head_ratio, pool=pool, seed=split.seed, batch_size=bs,
                         max_length=ml)
        # gradient contrasts with a pool sample of max(len(probe), 64) rows: compare with a forward over both
        res["head_scoring"][method] = {"time_s": hs.time_s, "ratio_to_probe_forward": hs.time_s / fwd_probe}
    res["selection"] = {}
    for method in SELECT_METHODS:
        sel = select_data(lm, heads, pool, method=method, ratio=cfg.data_ratio, probe=probe, batch_size=bs,
                          max_length=ml, seed=split.seed)
        res["selection"][method] = {"time_s": sel.time_s, "ratio_to_pool_forward": sel.time_s / fwd_pool}
    enc = encode(pool, lm.tokenizer, ml)
    batches = list(iter_batches(enc, bs, sort_by_length=True))
    median = sorted(batches, key=lambda b: max(len(i["input_ids"]) for i in b))[len(batches) // 2]
    micro = [collate(median, lm.tokenizer.pad_token_id or 0)]
    res["steps_same_batch"] = {"batch_tokens": int(micro[0]["input_ids"].numel()),
                               **step_comparison(lm, micro, heads, cfg.lora_rank)}
    res["head_share"] = []
    for share in SHARES:
        hl = _random_heads(lm, share, seed=7)
        step, _ = head_step_time(lm, hl, micro)
        sel = select_data(lm, hl, pool, method="activation", ratio=cfg.data_ratio, batch_size=bs, max_length=ml)
        res["head_share"].append({"share": share, "heads": len(hl), "deepest_layer": max(l for l, _ in hl),
                                  "head_step_s": step, "activation_select_s": sel.time_s,
                                  "activation_ratio_to_forward": sel.time_s / fwd_pool})
    res["length"] = []
    for length in LENGTHS:
        if length > ml:
            continue
        batch = synthetic_batch(lm, bs, length)
        steps = step_comparison(lm, batch, heads, cfg.lora_rank)
        res["length"].append({"tokens": length, **{k: v["step_s"] for k, v in steps.items()}})
    adapter = HeadAdapter(lm.geometry, heads, device=lm.device)
    with trainable(lm.model, []):
        adapter.attach(lm.model)
        try:
            res["profile_head_step"] = profile_table(lambda: loss_backward(lm.model, micro, lm.device))
        finally:
            adapter.detach()
    res["profile_activation_batch"] = profile_table(
        lambda: select_data(lm, heads, [pool[i] for i in range(min(len(pool), bs))], method="activation",
                            ratio=1.0, batch_size=bs, max_length=ml))
    return res


def components_markdown(c: dict) -> str:
    lines = ["## Component figures", "",
             f"Plain no-grad forward (full logits): pool {c['pool_rows']} rows {c['plain_forward_pool_s']:.1f} s, "
             f"probe {c['probe_rows']} rows {c['plain_forward_probe_s']:.1f} s.", "",
             "| stage | method | seconds | ratio to a plain forward over the same data |", "|---|---|---|---|"]
    for m, v in c["head_scoring"].items():
        lines.append(f"| heads | {m} | {v['time_s']:.1f} | {v['ratio_to_probe_forward']:.2f} (probe) |")
    for m, v in c["selection"].items():
        lines.append(f"| selection | {m} | {v['time_s']:.1f} | {v['ratio_to_pool_forward']:.2f} (pool) |")
    s = c["steps_same_batch"]
    lines += ["", f"One optimizer step on the same batch ({s['batch_tokens']} padded tokens):", "",
              "| trained | step s | ratio to full | peak memory MB | trainable params |", "|---|---|---|---|---|"]
    for k in ("heads", "lora", "full"):
        v = s[k]
        mem = "–" if v["peak_mem_mb"] is None else f"{v['peak_mem_mb']:.0f}"
        lines.append(f"| {k} | {v['step_s']:.3f} | {v['step_s'] / s['full']['step_s']:.2f} | {mem} | "
                     f"{v['trainable_params']:,} |")
    lines += ["", "| head share | heads | deepest layer | head step s | activation selection s (ratio to forward) |",
              "|---|---|---|---|---|"]
    for r in c["head_share"]:
        lines.append(f"| {r['share']:.0%} | {r['heads']} | {r['deepest_layer']} | {r['head_step_s']:.3f} | "
                     f"{r['activation_select_s']:.1f} ({r['activation_ratio_to_forward']:.2f}) |")
    lines += ["", "| tokens per sample | head step s | LoRA step s | full step s |", "|---|---|---|---|"]
    for r in c["length"]:
        lines.append(f"| {r['tokens']} | {r['heads']:.3f} | {r['lora']:.3f} | {r['full']:.3f} |")
    for name, rows in (("one head-training step", c["profile_head_step"]),
                       ("one activation-selection batch", c["profile_activation_batch"])):
        lines += ["", f"Top operators of {name} (self CPU time):", "", "| operator | ms | share | calls |",
                  "|---|---|---|---|"]
        lines += [f"| `{r['op']}` | {r['self_cpu_ms']:.1f} | {r['share']:.0%} | {r['calls']} |" for r in rows]
    return "\n".join(lines) + "\n"
