"""Head adapter: small trainable deltas on the weight slices of selected attention heads.

"Training query head h of layer l" (P2D Stage 3; docs/METHOD.md) means training
- q: rows h*d:(h+1)*d of q_proj,
- k, v: rows g*d:(g+1)*d of k_proj and v_proj, g = geometry.kv_head(h) (GQA/MQA: a kv head shared by
  several selected query heads is trained once),
- o: columns h*d:(h+1)*d of o_proj.
For GPT-2 (fused Conv1D) the same slices are the matching output columns of c_attn and input rows of
c_proj.

The adapter holds one zero-initialised delta per (layer, projection) covering only those slices and
adds it with forward hooks, so the base weights are never modified (they get requires_grad=False
while training), optimizer state exists only for the deltas, and autograd never visits layers below
the lowest selected layer.  Delta shapes are layout independent ("Linear orientation"):
q/k/v deltas are [n_rows, hidden] (rows of W in ``y = x @ W.T``), o deltas are [hidden, n_cols].

Supported: the layouts of `p2d.geometry` (split q/k/v/o_proj Linear, GPT-2 Conv1D); any subset of
the projections q, k, v, o.  Not supported / not trained: biases (Qwen2 q/k/v bias, GPT-2 c_attn /
c_proj bias stay frozen), norms, MLPs, embeddings; quantised (bitsandbytes) base weights cannot be
merged into.

Files (PEFT-like names): ``adapter_model.safetensors`` with tensors ``layers.{l}.{q|k|v|o}`` (only
the trained slices) and ``adapter_config.json`` (base model spec, geometry, heads, projections,
training settings, P2D version, format version, ``kind``).

Adapter kinds (``ADAPTER_KINDS``; ``kind`` in adapter_config.json, missing = ``"heads"``); an adapter's
name (`adapter_name`, `parse_adapter`: ``qkvo``, ``qo``, ``offset`` ...) is its kind and projections in one
word, as the comparison cells and the benchmark write it:

- ``heads`` (`HeadAdapter`, above): deltas on the q/k/v/o slices of the selected heads;
- ``offset`` (`OffsetAdapter`): LoFiT's second step (Yin, Ye & Durrett, NeurIPS 2024): a learned
  scale ``a_h`` and offset ``b_h``, each of size ``head_dim``, per selected head, zero-initialised, on
  that head's output (the input of o_proj / c_proj) at every position: ``(1 + a_h) * head_h(x) + b_h``.
  ``2 x head_dim`` parameters per head; LoFiT trains them with lr 1e-2 (``TrainConfig.lr`` is not
  changed for you). Tensors ``layers.{l}.scale`` and ``layers.{l}.offset`` of shape ``[n selected heads
  in l, head_dim]`` (adapters saved with offsets only still load, with a zero scale). Not supported:
  merging into the base weights (an offset before o_proj is a bias after it, and Llama's o_proj has
  none), so `merge_and_save` refuses it; evaluate it attached (`load_adapter`).

`AdapterConfig` is adapter_config.json as a typed record (as PEFT's config classes are), the same for
both kinds; both kinds save and load through one path (`_HookAdapter.save` / `load`: a kind only names
its tensors and per-layer facts). `load_adapter` and `HeadAdapter.load` read the kind and return the
matching class.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file
from safetensors.torch import save as to_bytes

from . import __version__
from .errors import UserError
from .files import atomic_dir, atomic_write, write_json
from .geometry import HeadGeometry, normalize_heads
from .models import is_quantized

PROJECTIONS = ("q", "k", "v", "o")
#: adapter classes by ``kind`` (adapter_config.json; `p2d.training.TrainConfig.adapter`)
ADAPTER_KINDS = ("heads", "offset")
#: what "training a head" means, by name: (kind, projections). The settings and adapter_config.json store
#: the kind and the projections; the comparison cells, the benchmark and its reports name the same adapter
#: by `adapter_name` (these three are the regimes the benchmark compares; any other projection subset is
#: named by its letters, e.g. ``qv``)
ADAPTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "qkvo": ("heads", ("q", "k", "v", "o")),   # the head's q rows, its kv head's k/v rows, its o columns
    "qo": ("heads", ("q", "o")),               # q rows and o columns only: no kv row shared across a GQA group
    "offset": ("offset", ()),                  # LoFiT-style per-head output scale and offset vectors
}
ADAPTER_FORMAT = "p2d-head-adapter"
FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"

_GEOMETRY_KEYS = ("layout", "n_layers", "n_q_heads", "n_kv_heads", "head_dim", "hidden_size")


def normalize_projections(projections) -> tuple[str, ...]:
    if isinstance(projections, str):
        projections = [p for p in projections.replace(",", " ").split() if p]
    projs = tuple(p for p in PROJECTIONS if p in set(projections))
    bad = sorted(set(projections) - set(PROJECTIONS))
    if bad:
        raise UserError(f"unknown projection(s) {', '.join(map(str, bad))}: choose from q, k, v, o")
    if not projs:
        raise UserError("no projection to train: choose at least one of q, k, v, o")
    return projs


def adapter_name(kind: str, projections=PROJECTIONS) -> str:
    """The name of the adapter of ``kind`` on ``projections``: ``offset``, or the projections a ``heads``
    adapter trains (``qkvo``, ``qo``, ``qv`` ...)."""
    if kind not in ADAPTER_KINDS:
        raise UserError(f"unknown adapter kind {kind!r}: use one of {', '.join(ADAPTER_KINDS)}")
    return "offset" if kind == "offset" else "".join(normalize_projections(projections))


def parse_adapter(name: str) -> tuple[str, tuple[str, ...]]:
    """(kind, projections) of an adapter name (`adapter_name`'s names, and ``heads``: every projection;
    ``offset`` has no projections). UserError for anything else."""
    name = str(name).strip().lower()
    if name in ADAPTERS:
        return ADAPTERS[name]
    if name == "heads":
        return "heads", PROJECTIONS
    if name and set(name) <= set(PROJECTIONS) and len(set(name)) == len(name):
        return "heads", normalize_projections(list(name))
    raise UserError(f"unknown adapter {name!r}: use offset, heads or the projections to train ({', '.join(ADAPTERS)} ...)")


def geometry_mismatch(a: HeadGeometry, b: HeadGeometry) -> str | None:
    """A short description of how two geometries differ, or None if an adapter fits both."""
    diffs = [f"{k} {getattr(a, k)} vs {getattr(b, k)}" for k in _GEOMETRY_KEYS if getattr(a, k) != getattr(b, k)]
    return ", ".join(diffs) or None


def _describe(g: HeadGeometry) -> str:
    return (f"{g.architecture} ({g.n_layers} layers x {g.n_q_heads} q heads, {g.n_kv_heads} kv heads, "
            f"head_dim {g.head_dim}, hidden {g.hidden_size})")


def _rows(heads: list[int], d: int, offset: int = 0) -> list[int]:
    return [offset + h * d + j for h in heads for j in range(d)]


@dataclass
class AdapterConfig:
    """adapter_config.json of an adapter of either kind: what the folder says about itself.

    ``layers``: per trained layer (a string key) its ``q_heads`` (and for ``heads`` its ``kv_heads``);
    ``training``: the training record (`p2d.training.train_heads`). `read` accepts every folder P2D has
    written (format version up to ``FORMAT_VERSION``; no ``kind`` = ``"heads"``)."""

    kind: str
    base_model: str
    geometry: HeadGeometry
    heads: list[list[int]]
    projections: list[str]
    dtype: str
    num_params: int
    layers: dict[str, dict] = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    p2d_version: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return {"format": ADAPTER_FORMAT, "format_version": self.format_version, "kind": self.kind,
                "p2d_version": self.p2d_version, "base_model": self.base_model, "geometry": self.geometry.to_dict(),
                "heads": self.heads, "projections": list(self.projections), "dtype": self.dtype,
                "num_params": self.num_params, "layers": self.layers, "training": self.training}

    def save(self, adapter_dir) -> Path:
        return write_json(Path(adapter_dir) / CONFIG_NAME, self.to_dict(), indent=2)

    @classmethod
    def read(cls, adapter_dir) -> "AdapterConfig":
        """The config of the adapter folder ``adapter_dir``; UserError when missing, unreadable, of another
        format, newer than this P2D or of an unknown kind."""
        folder = Path(adapter_dir)
        cfg_path = folder / CONFIG_NAME
        if not folder.is_dir():
            raise UserError(f"adapter folder not found: {adapter_dir}")
        if not cfg_path.is_file():
            raise UserError(f"{adapter_dir} has no {CONFIG_NAME}: point to a folder written by `p2d train` "
                            "(its adapter/ subfolder)")
        try:
            d = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{cfg_path} is corrupt ({exc}); retrain or restore the file") from None
        if not isinstance(d, dict) or d.get("format") != ADAPTER_FORMAT:
            raise UserError(f"{cfg_path} is not a P2D head adapter config (a PEFT/LoRA adapter?)")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise UserError(f"{cfg_path} has adapter format {d.get('format_version')}, newer than this P2D "
                            f"understands ({FORMAT_VERSION}): upgrade p2d")
        kind = d.get("kind", "heads")
        if kind not in ADAPTER_KINDS:
            raise UserError(f"{cfg_path} has unknown adapter kind {kind!r}: upgrade p2d")
        try:
            return cls(kind=kind, base_model=str(d.get("base_model", "")), geometry=HeadGeometry.from_dict(d["geometry"]),
                       heads=d["heads"], projections=list(d["projections"]), dtype=str(d.get("dtype", "")),
                       num_params=int(d.get("num_params", 0)), layers=dict(d.get("layers") or {}),
                       training=dict(d.get("training") or {}), p2d_version=str(d.get("p2d_version", "")),
                       format_version=int(d.get("format_version", 0)))
        except (KeyError, TypeError) as exc:
            raise UserError(f"{cfg_path} is corrupt (missing {exc}); retrain") from None


class _HookAdapter(nn.Module):
    """What `HeadAdapter` and `OffsetAdapter` share: the selected heads, and being attached to at most
    one model (and a model carrying at most one adapter) through forward hooks that `detach` removes.
    A subclass builds its parameters after ``super().__init__`` and returns its hooks from
    `_register_hooks`."""

    kind = ""

    def __init__(self, geometry: HeadGeometry, heads):
        super().__init__()
        self.geometry = geometry
        self.heads = normalize_heads(heads, geometry)
        if not self.heads:
            raise UserError("no heads selected: give at least one [layer, head]")
        self._handles: list = []
        self._model_ref = None
        self.config: AdapterConfig | None = None  # when loaded from files

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def attached_to(self) -> nn.Module | None:
        return self._model_ref() if self._model_ref is not None else None

    def _check_model(self, model: nn.Module) -> None:
        actual = HeadGeometry.from_model(model)
        diff = geometry_mismatch(self.geometry, actual)
        if diff:
            raise UserError(f"adapter was made for {_describe(self.geometry)} but the model is "
                            f"{_describe(actual)} ({diff}): use the model it was trained on")

    def _register_hooks(self, model: nn.Module) -> list:
        raise NotImplementedError

    def tensors(self) -> dict[str, nn.Parameter]:
        """The trained tensors by their name in ``adapter_model.safetensors``."""
        raise NotImplementedError

    def optional_tensors(self) -> set[str]:
        """Names of `tensors` a folder may lack (saved by an older P2D); they keep their initial value."""
        return set()

    def layer_info(self) -> dict[str, dict]:
        """Per trained layer (a string key) what `AdapterConfig.layers` records."""
        raise NotImplementedError

    # -- files --------------------------------------------------------------------------------
    def save(self, out_dir, base_model: str, training: dict | None = None) -> Path:
        """Write ``adapter_model.safetensors`` + ``adapter_config.json`` into ``out_dir`` (created;
        existing adapter files there are replaced).  Returns ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in self.tensors().items()}
        config = AdapterConfig(kind=self.kind, base_model=str(base_model), geometry=self.geometry, heads=self.heads,
                               projections=list(self.projections), dtype=str(next(iter(tensors.values())).dtype).replace("torch.", ""),
                               num_params=self.num_params(), layers=self.layer_info(), training=training or {},
                               p2d_version=__version__)
        data = to_bytes(tensors, metadata={"format": "pt"})  # plain file I/O below: a full disk is an OSError
        atomic_write(out / WEIGHTS_NAME, lambda path: Path(path).write_bytes(data))
        config.save(out)
        return out

    @classmethod
    def load(cls, adapter_dir, device="cpu", dtype=None):
        """Read an adapter written by `save`.  UserError for missing or corrupt files.  ``HeadAdapter.load``
        returns the class of the folder's kind (``kind`` in its config); a kind's own class refuses another."""
        cfg = AdapterConfig.read(adapter_dir)
        if cls is not HeadAdapter and cfg.kind != cls.kind:
            raise UserError(f"{adapter_dir} holds a {cfg.kind!r} adapter, not an {cls.kind} adapter")
        weights = Path(adapter_dir) / WEIGHTS_NAME
        if not weights.is_file():
            raise UserError(f"{adapter_dir} has no {WEIGHTS_NAME}: the adapter was not saved completely; retrain")
        try:
            tensors = load_file(str(weights))
        except Exception as exc:  # safetensors raises its own error types
            raise UserError(f"{weights} is corrupt ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__});"
                            " retrain or restore the file") from None
        if dtype is None:
            dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
        adapter = ADAPTER_CLASSES[cfg.kind](cfg.geometry, cfg.heads, cfg.projections, dtype=dtype, device=device)
        expected = adapter.tensors()
        if set(tensors) not in (set(expected), set(expected) - adapter.optional_tensors()):
            raise UserError(f"{weights} does not match its {CONFIG_NAME} (tensors "
                            f"{sorted(set(tensors) ^ set(expected))[:4]} differ); retrain")
        with torch.no_grad():
            for name, param in expected.items():
                if name not in tensors:  # an optional tensor an older P2D did not save
                    continue
                t = tensors[name]
                if tuple(t.shape) != tuple(param.shape):
                    raise UserError(f"{weights}: tensor {name} has shape {tuple(t.shape)}, expected "
                                    f"{tuple(param.shape)}; the adapter files do not belong together")
                param.copy_(t.to(dtype=param.dtype, device=param.device))
        adapter.config = cfg
        return adapter

    def attach(self, model: nn.Module) -> None:
        """Register the hooks on ``model``.  Attaching twice to the same model is a no-op; attaching
        while attached to another model, or to a model that already carries another P2D adapter,
        raises RuntimeError.  Moves the adapter to the model's device."""
        current = self.attached_to
        if current is model:
            return
        if current is not None or self._handles:
            raise RuntimeError(f"this {type(self).__name__} is already attached to another model: detach() it first")
        other = getattr(model, "_p2d_adapter_ref", None)
        if other is not None and other() is not None:
            raise RuntimeError("the model already has another HeadAdapter attached: detach() that one first")
        self._check_model(model)
        dev = self.geometry.output_projection(model, self.heads[0][0]).weight.device
        if any(p.device != dev for p in self.parameters()):
            self.to(dev)
        self._handles = self._register_hooks(model)
        self._model_ref = weakref.ref(model)
        model._p2d_adapter_ref = weakref.ref(self)

    def detach(self) -> None:
        """Remove the hooks: the model computes exactly what it computed before `attach`."""
        for h in self._handles:
            h.remove()
        self._handles = []
        model = self.attached_to
        if model is not None and getattr(model, "_p2d_adapter_ref", None) is not None:
            if model._p2d_adapter_ref() is self:
                del model._p2d_adapter_ref
        self._model_ref = None


class HeadAdapter(_HookAdapter):
    """Trainable deltas for the q/k/v/o slices of selected heads (see the module docstring).

    Parameters are named ``"{layer}_{proj}"`` in ``self.deltas`` (a ParameterDict).  The adapter is
    never registered inside the model: ``model.parameters()`` / ``state_dict()`` stay unchanged.
    """

    kind = "heads"

    def __init__(self, geometry: HeadGeometry, heads, projections=PROJECTIONS, dtype=torch.float32,
                 device="cpu"):
        super().__init__(geometry, heads)
        self.projections = normalize_projections(projections)
        g, d = geometry, geometry.head_dim
        self.deltas = nn.ParameterDict()
        self._layers: dict[int, dict] = {}
        for layer in sorted({l for l, _ in self.heads}):
            q_heads = [h for l, h in self.heads if l == layer]
            kv_heads = sorted({g.kv_head(h) for h in q_heads})
            self._layers[layer] = {"q_heads": q_heads, "kv_heads": kv_heads}
            for p in self.projections:
                if p == "q":
                    shape = (len(q_heads) * d, g.hidden_size)
                elif p in ("k", "v"):
                    shape = (len(kv_heads) * d, g.hidden_size)
                else:
                    shape = (g.hidden_size, len(q_heads) * d)
                self.deltas[f"{layer}_{p}"] = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
                self.register_buffer(f"_idx_{layer}_{p}", torch.tensor(self.target_indices(layer, p),
                                                                       dtype=torch.long, device=device),
                                     persistent=False)
                if g.layout == "fused" and p != "o":
                    self.register_buffer(f"_fidx_{layer}_{p}", torch.tensor(self.fused_cols(layer, p),
                                                                            dtype=torch.long, device=device),
                                         persistent=False)

    # -- bookkeeping --------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return sorted(self._layers)

    def kv_heads(self, layer: int) -> list[int]:
        """The kv heads whose k/v rows are trained in ``layer`` (deduplicated)."""
        return list(self._layers[layer]["kv_heads"])

    def target_indices(self, layer: int, proj: str) -> list[int]:
        """Indices into the base projection covered by the delta, in Linear orientation:
        q/k/v -> output rows of q_proj/k_proj/v_proj (per-projection numbering, also for GPT-2),
        o -> input columns of o_proj (GPT-2: input rows of c_proj)."""
        info, d = self._layers[layer], self.geometry.head_dim
        if proj in ("q", "o"):
            return _rows(info["q_heads"], d)
        return _rows(info["kv_heads"], d)

    def fused_cols(self, layer: int, proj: str) -> list[int]:
        """GPT-2 c_attn output columns for q/k/v of this layer."""
        n = self.geometry.n_q_heads * self.geometry.head_dim
        offset = {"q": 0, "k": n, "v": 2 * n}[proj]
        return [offset + i for i in self.target_indices(layer, proj)]

    def delta(self, layer: int, proj: str) -> nn.Parameter:
        return self.deltas[f"{layer}_{proj}"]

    # -- hooks --------------------------------------------------------------------------------
    def _register_hooks(self, model: nn.Module) -> list:
        handles = []
        g = self.geometry
        for layer in self.layers:
            mods = g.projections(model, layer)
            out_projs = [p for p in self.projections if p != "o"]
            if g.layout == "split":
                for p in out_projs:
                    handles.append(mods[p].register_forward_hook(self._out_hook(layer, [p], "_idx")))
            elif out_projs:
                handles.append(mods["qkv"].register_forward_hook(self._out_hook(layer, out_projs, "_fidx")))
            if "o" in self.projections:
                handles.append(mods["o"].register_forward_hook(self._o_hook(layer)))
        return handles

    def _out_hook(self, layer: int, projs: list[str], idx_prefix: str):
        names = [f"{layer}_{p}" for p in projs]
        idx_names = [f"{idx_prefix}_{layer}_{p}" for p in projs]

        def hook(module, args, output):
            x = args[0]
            if len(names) == 1:
                delta, idx = self.deltas[names[0]], getattr(self, idx_names[0])
            else:
                delta = torch.cat([self.deltas[n] for n in names], 0)
                idx = torch.cat([getattr(self, n) for n in idx_names], 0)
            return output.index_add(-1, idx, x @ delta.to(x.dtype).T)

        return hook

    def _o_hook(self, layer: int):
        name, idx_name = f"{layer}_o", f"_idx_{layer}_o"

        def hook(module, args, output):
            x = args[0]
            delta = self.deltas[name]
            return output + x.index_select(-1, getattr(self, idx_name)) @ delta.to(x.dtype).T

        return hook

    # -- merging ------------------------------------------------------------------------------
    @torch.no_grad()
    def merge_into(self, model: nn.Module) -> None:
        """Add the deltas into ``model``'s base weights in place.  If the adapter is attached to
        ``model`` it is detached first, so nothing is applied twice."""
        if self.attached_to is model:
            self.detach()
        self._check_model(model)
        g = self.geometry
        for layer in self.layers:
            mods = g.projections(model, layer)
            for p in self.projections:
                delta = self.delta(layer, p)
                if g.layout == "split":
                    w = mods[p].weight
                    idx = torch.tensor(self.target_indices(layer, p), device=w.device)
                    if p == "o":
                        w.index_add_(1, idx, delta.to(device=w.device, dtype=w.dtype))
                    else:
                        w.index_add_(0, idx, delta.to(device=w.device, dtype=w.dtype))
                else:  # GPT-2 Conv1D: weight [in, out]
                    if p == "o":
                        w = mods["o"].weight
                        idx = torch.tensor(self.target_indices(layer, p), device=w.device)
                        w.index_add_(0, idx, delta.T.to(device=w.device, dtype=w.dtype))
                    else:
                        w = mods["qkv"].weight
                        idx = torch.tensor(self.fused_cols(layer, p), device=w.device)
                        w.index_add_(1, idx, delta.T.to(device=w.device, dtype=w.dtype))

    def _base_slices(self, model: nn.Module) -> list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]]:
        """(weight, dim, index, copy of the slice) for every slice `merge_into` touches."""
        g, out = self.geometry, []
        for layer in self.layers:
            mods = g.projections(model, layer)
            for p in self.projections:
                if g.layout == "split":
                    w, dim, idx = mods[p].weight, (1 if p == "o" else 0), self.target_indices(layer, p)
                elif p == "o":
                    w, dim, idx = mods["o"].weight, 0, self.target_indices(layer, p)
                else:
                    w, dim, idx = mods["qkv"].weight, 1, self.fused_cols(layer, p)
                idx_t = torch.tensor(idx, device=w.device)
                out.append((w, dim, idx_t, w.detach().index_select(dim, idx_t).clone()))
        return out

    # -- files --------------------------------------------------------------------------------
    def tensors(self) -> dict[str, nn.Parameter]:
        return {f"layers.{l}.{p}": self.delta(l, p) for l in self.layers for p in self.projections}

    def layer_info(self) -> dict[str, dict]:
        return {str(l): {"q_heads": self._layers[l]["q_heads"], "kv_heads": self._layers[l]["kv_heads"]}
                for l in self.layers}


class OffsetAdapter(_HookAdapter):
    """LoFiT-style per-head scale and offset: each selected head's output ``h`` becomes
    ``(1 + a) * h + b`` with trainable ``head_dim`` vectors ``a`` (scale) and ``b`` (offset).

    Same interface as `HeadAdapter` (attach / detach / parameters / num_params / save / load; not
    merge_into). Parameters: ``self.scales["{layer}"]`` and ``self.offsets["{layer}"]``, each of shape
    ``[n selected heads in layer, head_dim]``, zero-initialised (attached, the model computes exactly
    what it did before training). Adapters saved before the scale existed load with a zero scale.
    """

    kind = "offset"

    def __init__(self, geometry: HeadGeometry, heads, projections=None, dtype=torch.float32, device="cpu"):
        super().__init__(geometry, heads)
        self.projections: tuple[str, ...] = ()  # no weight slices are trained
        d = geometry.head_dim
        self.offsets = nn.ParameterDict()
        self.scales = nn.ParameterDict()
        self._layers: dict[int, list[int]] = {}
        for layer in sorted({l for l, _ in self.heads}):
            q_heads = [h for l, h in self.heads if l == layer]
            self._layers[layer] = q_heads
            self.offsets[str(layer)] = nn.Parameter(torch.zeros(len(q_heads), d, dtype=dtype, device=device))
            self.scales[str(layer)] = nn.Parameter(torch.zeros(len(q_heads), d, dtype=dtype, device=device))
            self.register_buffer(f"_idx_{layer}", torch.tensor(_rows(q_heads, d), dtype=torch.long, device=device),
                                 persistent=False)

    @property
    def layers(self) -> list[int]:
        return sorted(self._layers)

    def offset(self, layer: int) -> nn.Parameter:
        return self.offsets[str(layer)]

    def scale(self, layer: int) -> nn.Parameter:
        return self.scales[str(layer)]

    def _register_hooks(self, model: nn.Module) -> list:
        """Forward pre-hooks on the output projections of the selected heads' layers."""
        return [self.geometry.output_projection(model, layer).register_forward_pre_hook(self._hook(layer))
                for layer in self.layers]

    def _hook(self, layer: int):
        key, idx_name = str(layer), f"_idx_{layer}"
        width = self.geometry.n_q_heads * self.geometry.head_dim

        def hook(module, args):
            x = args[0]
            idx = getattr(self, idx_name)
            offset = torch.zeros(width, dtype=x.dtype, device=x.device).index_add(
                0, idx, self.offsets[key].reshape(-1).to(x.dtype))
            scale = torch.ones(width, dtype=x.dtype, device=x.device).index_add(
                0, idx, self.scales[key].reshape(-1).to(x.dtype))
            return (x * scale + offset, *args[1:])

        return hook

    def merge_into(self, model: nn.Module) -> None:
        raise UserError("an offset adapter cannot be merged into the base weights (it is a bias after o_proj, "
                        "which Llama-style models do not have): evaluate it attached to the base model instead")

    def tensors(self) -> dict[str, nn.Parameter]:
        return {f"layers.{l}.{what}": getattr(self, what)(l) for l in self.layers for what in ("offset", "scale")}

    def optional_tensors(self) -> set[str]:
        return {f"layers.{l}.scale" for l in self.layers}  # adapters saved before the scale: offsets only

    def layer_info(self) -> dict[str, dict]:
        return {str(l): {"q_heads": self._layers[l]} for l in self.layers}


#: adapter class per kind
ADAPTER_CLASSES = {"heads": HeadAdapter, "offset": OffsetAdapter}


def make_adapter(kind: str, geometry: HeadGeometry, heads, projections=PROJECTIONS, dtype=torch.float32,
                 device="cpu"):
    """A fresh adapter of ``kind`` (one of ``ADAPTER_KINDS``) for ``heads``."""
    if kind not in ADAPTER_CLASSES:
        raise UserError(f"unknown adapter kind {kind!r}: use one of {', '.join(ADAPTER_KINDS)}")
    return ADAPTER_CLASSES[kind](geometry, heads, projections, dtype=dtype, device=device)


def load_adapter(lm, adapter_dir) -> HeadAdapter | OffsetAdapter:
    """Load an adapter (any kind) for the LoadedModel ``lm``, check that its geometry matches, and
    attach it."""
    adapter = HeadAdapter.load(adapter_dir, device=lm.device)
    diff = geometry_mismatch(adapter.geometry, lm.geometry)
    if diff:
        base = adapter.config.base_model or "?"
        raise UserError(f"adapter {adapter_dir} was trained on {base!r}, {_describe(adapter.geometry)}, but the "
                        f"loaded model {lm.spec!r} is {_describe(lm.geometry)} ({diff}): use the model it was trained on (model: {base})")
    adapter.attach(lm.model)
    return adapter


def merge_and_save(lm, adapter_dir, out_dir) -> Path:
    """Write ``lm``'s model with the adapter merged in, plus its tokenizer, to ``out_dir``
    (save_pretrained, safetensors) and a copy of the adapter config as ``p2d_adapter_config.json``.

    ``out_dir`` must not exist or be empty (UserError otherwise).  Written into a temporary folder
    next to it and renamed at the end, so a failure leaves no half-written model.  ``lm.model`` is
    left exactly as it was (the touched weight slices are restored bit for bit).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out_dir} already exists and is not empty: choose a new folder or delete it first")
    with merged_weights(lm, adapter_dir) as adapter:
        if out.exists():
            out.rmdir()  # empty (checked above): atomic_dir creates it whole
        with atomic_dir(out) as tmp:
            try:
                lm.model.save_pretrained(tmp)
                if lm.tokenizer is not None:
                    lm.tokenizer.save_pretrained(tmp)
            except Exception as exc:  # safetensors reports a full disk as its own error type
                if "os error" in str(exc) and not isinstance(exc, OSError):
                    raise UserError(f"could not write the merged model to {out_dir}: {str(exc).splitlines()[0]}; "
                                    "free some disk space or choose another folder") from None
                raise
            (tmp / "p2d_adapter_config.json").write_text(json.dumps(adapter.config.to_dict(), indent=2) + "\n")
    return out


@contextlib.contextmanager
def merged_weights(lm, adapter_dir):
    """``lm.model`` with the head adapter of ``adapter_dir`` merged into its weights inside the block (the
    adapter is yielded); afterwards the touched weight slices are restored bit for bit, also on errors.
    UserError for a quantised base, an offset adapter or an adapter of another model."""
    if is_quantized(lm.model):
        raise UserError("cannot merge into a quantised base: load the model without quantisation (quantize none)")
    adapter = HeadAdapter.load(adapter_dir, device=lm.device)
    if isinstance(adapter, OffsetAdapter):
        adapter.merge_into(lm.model)  # raises: offsets cannot be merged
    diff = geometry_mismatch(adapter.geometry, lm.geometry)
    if diff:
        raise UserError(f"adapter {adapter_dir} does not fit model {lm.spec!r} ({diff}): merge it into "
                        f"{adapter.config.base_model or 'the model it was trained on'}")
    backup = adapter._base_slices(lm.model)
    try:
        adapter.merge_into(lm.model)
        yield adapter
    finally:
        with torch.no_grad():
            for w, dim, idx, saved in backup:
                w.index_copy_(dim, idx, saved)
