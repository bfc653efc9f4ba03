"""Publish a run on the Hugging Face Hub: the PEFT-format adapter (optionally the merged model) and a
model card that says what was trained, on what, and what it measured.

`model_card(run_dir)` builds README.md from the run folder's files (config.yaml, metrics.json,
heads.json, selection.json) and needs no network; `push_run` exports the adapter to PEFT format
(`p2d.export`), writes the card next to it and uploads the folder with ``huggingface_hub``
(``create_repo(exist_ok=True)`` + ``upload_folder``). With ``merged=True`` the merged model goes to
the subfolder ``merged/`` of the same repo (``from_pretrained(repo, subfolder="merged")``).
Needs a token (``HF_TOKEN`` or ``huggingface-cli login``) and the network; without them it fails
with one line saying so.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .adapter import CONFIG_NAME as ADAPTER_CONFIG
from .adapter import merge_and_save
from .config import RunConfig
from .errors import UserError
from .export import export_peft
from .files import read_json
from .method.heads import HEADS_FILE
from .method.selection import SELECTION_FILE
from .models import EMBEDDED_HUB_ID
from .pipeline import CONFIG_FILE, METRICS_FILE, default_loader
from .training import ADAPTER_SUBDIR

MERGED_DIR = "merged"  # the subfolder of the repo with the merged model


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _epochs(metrics: dict, config) -> str:
    steps, n = metrics.get("steps_done"), metrics.get("n_selected")
    if not steps or not n:
        return "?"
    return f"{steps * config.batch_size * config.grad_accum / n:.3g}"


def _loss(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def model_card(run_dir, repo_id: str | None = None, base_model: str | None = None) -> str:
    """README.md text for the run in ``run_dir`` (YAML front matter + what was done and measured)."""
    run_dir = Path(run_dir)
    config = RunConfig.load(run_dir / CONFIG_FILE)
    metrics = read_json(run_dir / METRICS_FILE) or {}
    heads = read_json(run_dir / HEADS_FILE) or {}
    selection = read_json(run_dir / SELECTION_FILE) or {}
    base = base_name(base_model or config.model)
    before, after = metrics.get("eval_before") or {}, metrics.get("eval_after") or {}
    n_heads = len(heads.get("selected") or [])
    geo = (heads.get("extra") or {}).get("geometry") or {}
    total_heads = (geo.get("n_layers") or 0) * (geo.get("n_q_heads") or 0)
    data = config.pool or f"the built-in P2D task pool (target task: {config.target}, {config.pool_size} rows)"
    lines = [
        "---", f"base_model: {base}", "library_name: peft", "pipeline_tag: text-generation",
        "tags:", "  - p2d", "  - lora", "  - attention-heads", "  - data-selection", "---", "",
        f"# {repo_id or run_dir.name}", "",
        f"A P2D head adapter for [{base}](https://huggingface.co/{base}), exported as a PEFT LoRA adapter. "
        "P2D (\"From Parameters to Data\") scores every attention head on a few target examples, uses the "
        "top heads to select training data, and fine-tunes only those heads' q/k/v/o slices; the rest of the "
        "model is frozen. Made with P2D Studio.", "",
        "## Use", "", "```python", "from peft import AutoPeftModelForCausalLM", "",
        f"model = AutoPeftModelForCausalLM.from_pretrained(\"{repo_id or '<this repo>'}\")", "```", "",
        "## What was trained", "",
        f"- heads: {n_heads}{f' of {total_heads}' if total_heads else ''} query heads, scored by "
        f"`{heads.get('method', config.head_method)}` on the probe set: "
        + ", ".join(f"L{l}.H{h}" for l, h in (heads.get("selected") or [])[:40])
        + (" …" if n_heads > 40 else ""),
        f"- data: {data}; selection `{selection.get('method', config.select_method)}` kept "
        f"{selection.get('n_selected', '?')} of {selection.get('n_pool', '?')} rows"
        + (f" ({', '.join(f'{k} {v}' for k, v in list((selection.get('task_counts') or {}).items())[:6])})"
           if selection.get("task_counts") else ""),
        f"- training: {metrics.get('steps_done', '?')} steps ({_epochs(metrics, config)} epochs over the "
        f"{selection.get('n_selected', '?')} selected rows), lr {config.lr:g}, batch {config.batch_size}, max length "
        f"{config.max_length}, projections "
        f"{','.join(config.projections)}; {metrics.get('trainable_params', 0):,} trainable parameters of "
        f"{metrics.get('total_params') or 0:,}", "",
        "## What it measured", "",
        "| | before | after |", "|---|---|---|",
        f"| exact match | {_pct(before.get('accuracy'))} | {_pct(after.get('accuracy'))} |",
        f"| answer contained | {_pct(before.get('contains'))} | {_pct(after.get('contains'))} |",
        f"| answer loss | {_loss(before.get('loss'))} | {_loss(after.get('loss'))} |", "",
    ]
    if metrics.get("aer") is not None:
        full = metrics.get("full_ft") or {}
        lines += [f"Alignment Efficiency Ratio {metrics['aer']:.3f} (speed-up {metrics['speedup']:.1f}x): heads "
                  f"{metrics['time_heads_s']:.0f} s + selection {metrics['time_select_s']:.0f} s + training "
                  f"{metrics['time_train_s']:.0f} s, against full fine-tuning of all parameters on the whole pool for "
                  f"{metrics.get('reference_epochs', full.get('epochs', '?'))} epochs "
                  f"({metrics.get('aer_mode', full.get('mode', '?'))}: {metrics['time_full_s']:.0f} s). "
                  "Evaluation is not part of the AER.", ""]
    lines += ["The eval set, the numbers above and the AER come from one run on one machine; rerun the settings "
              "(`config.yaml` in the P2D run folder) to check them.", ""]
    return "\n".join(lines)


def push_run(run_dir, repo_id: str, lm=None, merged: bool = False, private: bool = False, token: str | None = None,
             progress=None) -> dict:
    """Upload the run's adapter (PEFT format) and model card to ``repo_id``; see the module docstring."""
    run_dir = Path(run_dir)
    adapter = run_dir / ADAPTER_SUBDIR
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise UserError(f"{run_dir} has no trained adapter (adapter/): train first")
    if os.environ.get("HF_HUB_OFFLINE", "").strip() in ("1", "true", "yes"):
        raise UserError("the Hugging Face hub is switched off here (HF_HUB_OFFLINE=1): unset it to push")
    try:
        from huggingface_hub import HfApi, get_token
    except ImportError:
        raise UserError("pushing needs the huggingface_hub package: pip install huggingface_hub") from None
    token = token or get_token()
    if not token:
        raise UserError("pushing needs a Hugging Face token with write access: huggingface-cli login, or set HF_TOKEN")
    config = RunConfig.load(run_dir / CONFIG_FILE)
    if lm is None:
        lm = default_loader(config)
    with tempfile.TemporaryDirectory(prefix="p2d-push-") as tmp:
        folder = export_peft(lm, adapter, Path(tmp) / "repo", base_model_name=base_name(config.model))
        (folder / "README.md").write_text(model_card(run_dir, repo_id), encoding="utf-8")
        if merged:
            merge_and_save(lm, adapter, folder / MERGED_DIR)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                     commit_message=f"P2D head adapter from {run_dir.name}")
        except Exception as exc:  # noqa: BLE001 - network, auth and hub errors arrive as many types
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"could not push to {repo_id}: {msg} (check the token's write access, the repo id and "
                            "the network)") from None
    return {"repo": repo_id, "url": f"https://huggingface.co/{repo_id}", "commit": getattr(info, "oid", None),
            "merged": merged}


def base_name(spec: str) -> str:
    """The hub id recorded for a model spec: the embedded default's hub id, any other spec as it is."""
    return EMBEDDED_HUB_ID if spec == "default" else spec
