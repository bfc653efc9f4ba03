"""Export a P2D head adapter as a PEFT LoRA adapter that PEFT, vLLM, TGI and the Hub can load.

A head delta is exactly a low-rank update with a one-hot factor (PEFT computes
``W' = W + scaling * B @ A`` with ``scaling = lora_alpha / r``; we set ``lora_alpha = r``, so 1):

- q / k / v: the delta ``D`` covers rows ``R`` of the projection: ``A = D`` (``[r, in]``) and
  ``B[R[i], i] = 1`` (``[out, r]``), ``r = len(R)``;
- o: the delta ``D`` covers columns ``C`` of o_proj: ``B = D`` (``[out, r]``) and ``A[i, C[i]] = 1``
  (``[r, in]``), ``r = len(C)``;
- GPT-2's fused ``c_attn`` (Conv1D, ``fan_in_fan_out``): one LoRA over the q, k and v rows of the
  layer together (their columns in the fused output), and ``c_proj`` as o.

Ranks differ per module (number of selected heads x head dim): ``rank_pattern`` / ``alpha_pattern``
carry them by module name. Only layers with selected heads are targeted. Tensors are written in
float32. ``PeftModel.from_pretrained(base, folder)`` then computes what base + the P2D adapter
computes (tested), and ``merge_and_unload()`` equals P2D's own merge. ``p2d_export.json`` next to
them records the heads, the ranks and the training settings.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from . import __version__
from .adapter import CONFIG_NAME, WEIGHTS_NAME, HeadAdapter, geometry_mismatch
from .errors import UserError
from .files import atomic_dir, write_json

EXPORT_FORMATS = ("peft", "gguf")  # gguf: p2d.gguf_export (the merged model as one file)
P2D_EXPORT_INFO = "p2d_export.json"  # heads, ranks and training settings of the exported adapter


def _module_names(model) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def lora_tensors(adapter: HeadAdapter, model) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """{peft tensor name: tensor} and {module name: rank} for ``adapter`` on ``model``."""
    g = adapter.geometry
    names = _module_names(model)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}

    def put(module, a: torch.Tensor, b: torch.Tensor) -> None:
        name = names[id(module)]
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
        ranks[name] = a.shape[0]

    for layer in adapter.layers:
        mods = g.projections(model, layer)
        deltas = {p: adapter.delta(layer, p).detach().float().cpu() for p in adapter.projections}
        if g.layout == "split":
            for p in (p for p in adapter.projections if p != "o"):
                rows = adapter.target_indices(layer, p)
                out_features = mods[p].weight.shape[0]
                b = torch.zeros(out_features, len(rows))
                b[rows, torch.arange(len(rows))] = 1.0
                put(mods[p], deltas[p], b)
        else:
            qkv = [p for p in adapter.projections if p != "o"]
            if qkv:
                cols = [c for p in qkv for c in adapter.fused_cols(layer, p)]
                out_features = mods["qkv"].weight.shape[1]  # Conv1D weight is [in, out]
                b = torch.zeros(out_features, len(cols))
                b[cols, torch.arange(len(cols))] = 1.0
                put(mods["qkv"], torch.cat([deltas[p] for p in qkv], 0), b)
        if "o" in adapter.projections:
            cols = adapter.target_indices(layer, "o")
            o = mods["o"]
            in_features = o.weight.shape[1] if g.layout == "split" else o.weight.shape[0]
            a = torch.zeros(len(cols), in_features)
            a[torch.arange(len(cols)), cols] = 1.0
            put(o, a, deltas["o"])
    return tensors, ranks


def export_peft(lm, adapter_dir, out_dir, base_model_name: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT LoRA) into ``out_dir``.

    ``lm`` is the base model the adapter was trained on (its module names are needed).
    ``base_model_name`` is recorded as ``base_model_name_or_path`` (default: the model spec).
    """
    from safetensors.torch import save_file

    adapter = HeadAdapter.load(adapter_dir)
    diff = geometry_mismatch(adapter.geometry, lm.geometry)
    if diff:
        raise UserError(f"adapter {adapter_dir} does not fit model {lm.spec!r} ({diff}): export it with the model "
                        f"it was trained on ({adapter.config.base_model or '?'})")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out_dir} already exists and is not empty: choose a new folder or delete it first")
    tensors, ranks = lora_tensors(adapter, lm.model)
    targets = sorted(ranks)
    first = ranks[targets[0]]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name or str(lm.spec),
        "r": first, "lora_alpha": first, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "fan_in_fan_out": adapter.geometry.layout == "fused",
        "target_modules": targets,  # full module names: PEFT matches them exactly
        "rank_pattern": {re.escape(t): r for t, r in ranks.items()},  # matched as regex suffixes
        "alpha_pattern": {re.escape(t): r for t, r in ranks.items()},
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "revision": None, "layers_to_transform": None, "layers_pattern": None,
    }
    provenance = {"exported_by": f"p2d {__version__}", "heads": adapter.heads, "projections": list(adapter.projections),
                  "source_adapter": str(adapter_dir), "ranks": ranks, "max_rank": max(ranks.values()),
                  "training": adapter.config.training}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})  # PEFT's names, as P2D's adapter
        write_json(tmp / CONFIG_NAME, config, indent=2)
        write_json(tmp / P2D_EXPORT_INFO, provenance, indent=2)
    return out
