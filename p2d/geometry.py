"""Attention-head geometry of a causal LM.

`HeadGeometry.from_model(model)` knows the number of layers, query heads, kv heads, head_dim, the
query-head -> kv-head map (GQA/MQA), and where each layer's q/k/v/o projections live.

Supported:
- split projections `q_proj`, `k_proj`, `v_proj`, `o_proj` (nn.Linear, weight [out, in]):
  Llama, Mistral, Qwen2/Qwen3, Gemma/Gemma2, SmolLM, Phi (non-fused) and friends;
- GPT-2's fused `c_attn` / `c_proj` (transformers Conv1D, weight [in, out]).
Anything else (fused `qkv_proj`, `query_key_value`, MLA, ...) raises a UserError naming the
architecture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn as nn

from .errors import UserError

#: where the list of decoder blocks lives, tried in order
_LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
)
#: attribute of a decoder block that holds its attention module
_ATTN_NAMES = ("self_attn", "attn", "attention")


def _get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks; UserError if the layout is unknown."""
    for path in _LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise UserError(f"unsupported architecture {_arch_name(model)}: could not find its decoder layers; "
                    "P2D supports Llama/Mistral/Qwen/Gemma/SmolLM-style (q_proj/k_proj/v_proj/o_proj) and GPT-2 models")


def _arch_name(model: nn.Module) -> str:
    archs = getattr(getattr(model, "config", None), "architectures", None)
    return archs[0] if archs else type(model).__name__


def _attention(block: nn.Module) -> nn.Module | None:
    for name in _ATTN_NAMES:
        mod = getattr(block, name, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


@dataclass(frozen=True)
class HeadGeometry:
    """Shape of the attention heads of one model.

    layout "split": per layer modules q_proj, k_proj, v_proj, o_proj (Linear, weight [out, in]);
    query head h owns q_proj rows h*d:(h+1)*d and o_proj columns h*d:(h+1)*d; its kv head g owns
    k_proj/v_proj rows g*d:(g+1)*d.
    layout "fused": GPT-2 Conv1D c_attn (weight [in, 3*H*d]) and c_proj (weight [H*d, out]).
    """

    architecture: str
    layout: str
    n_layers: int
    n_q_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module) -> "HeadGeometry":
        arch = _arch_name(model)
        layers = decoder_layers(model)
        attn = _attention(layers[0])
        cfg = model.config
        if attn is None:
            raise UserError(f"unsupported architecture {arch}: its decoder blocks have no attention module P2D knows")
        if all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            layout = "split"
            n_q = cfg.num_attention_heads
            n_kv = getattr(cfg, "num_key_value_heads", None) or n_q
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
            q_out = attn.q_proj.weight.shape[0]
            k_out = attn.k_proj.weight.shape[0]
            if q_out != n_q * head_dim or k_out != n_kv * head_dim:
                raise UserError(f"unsupported architecture {arch}: q_proj/k_proj shapes {q_out}/{k_out} do not match "
                                f"{n_q} query heads and {n_kv} kv heads of size {head_dim} (gated or fused q_proj?)")
            hidden = attn.q_proj.weight.shape[1]
        elif hasattr(attn, "c_attn") and hasattr(attn, "c_proj"):
            layout = "fused"
            n_q = cfg.n_head
            n_kv = n_q
            hidden = cfg.n_embd
            head_dim = hidden // n_q
            if getattr(attn, "is_cross_attention", False):
                raise UserError(f"unsupported architecture {arch}: cross-attention blocks")
        else:
            names = ", ".join(n for n, _ in attn.named_children()) or "none"
            raise UserError(f"unsupported architecture {arch}: attention projections ({names}) are not "
                            "q_proj/k_proj/v_proj/o_proj or GPT-2 c_attn/c_proj")
        if n_q % n_kv:
            raise UserError(f"unsupported architecture {arch}: {n_q} query heads are not a multiple of {n_kv} kv heads")
        return cls(arch, layout, len(layers), int(n_q), int(n_kv), int(head_dim), int(hidden))

    # -- head bookkeeping ---------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Query heads per kv head (1 for plain multi-head attention)."""
        return self.n_q_heads // self.n_kv_heads

    @property
    def n_heads_total(self) -> int:
        return self.n_layers * self.n_q_heads

    def kv_head(self, q_head: int) -> int:
        """The kv head that query head `q_head` reads (GQA: q // (n_q / n_kv))."""
        if not 0 <= q_head < self.n_q_heads:
            raise IndexError(f"query head {q_head} out of range 0..{self.n_q_heads - 1}")
        return q_head // self.group_size

    def query_heads_changed(self, heads, projections=("q", "k", "v", "o")) -> list[list[int]]:
        """The query heads whose computation an adapter on ``heads`` changes: with k or v among the
        ``projections`` every query head that reads a changed kv head (grouped-query attention: the
        whole group of each selected head), else only the selected heads. An offset adapter (no
        projections) changes only the selected heads' outputs."""
        out = set()
        shared = bool(set(projections) & {"k", "v"})
        for layer, head in heads:
            if shared:
                g = self.kv_head(head)
                out.update((layer, h) for h in range(self.n_q_heads) if self.kv_head(h) == g)
            else:
                out.add((layer, head))
        return [list(x) for x in sorted(out)]

    def check_head(self, layer: int, head: int) -> None:
        if not (0 <= layer < self.n_layers and 0 <= head < self.n_q_heads):
            raise UserError(f"head [{layer}, {head}] does not exist: the model has {self.n_layers} layers "
                            f"x {self.n_q_heads} query heads")

    # -- module access ------------------------------------------------------------------------
    def attention(self, model: nn.Module, layer: int) -> nn.Module:
        return _attention(decoder_layers(model)[layer])

    def projections(self, model: nn.Module, layer: int) -> dict[str, nn.Module]:
        """{"q","k","v","o"} -> module for split layout; {"qkv","o"} for GPT-2."""
        attn = self.attention(model, layer)
        if self.layout == "split":
            return {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj}
        return {"qkv": attn.c_attn, "o": attn.c_proj}

    def output_projection(self, model: nn.Module, layer: int) -> nn.Module:
        """The module whose input is the concatenation of all query heads' outputs (o_proj/c_proj)."""
        return self.projections(model, layer)["o"]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadGeometry":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def normalize_heads(heads, geometry: HeadGeometry | None = None) -> list[list[int]]:
    """Sorted, de-duplicated ``[[layer, head], ...]`` from a list or a HeadScores-like object
    (anything with ``.selected``).  Checks ranges against ``geometry`` when given (UserError)."""
    if hasattr(heads, "selected"):
        heads = heads.selected
    if heads is None:
        heads = []
    out = set()
    for item in heads:
        try:
            layer, head = (int(v) for v in item)
        except (TypeError, ValueError):
            raise UserError(f"bad head {item!r}: heads are [layer, head] pairs of integers") from None
        if geometry is not None:
            geometry.check_head(layer, head)
        out.add((layer, head))
    return [[l, h] for l, h in sorted(out)]
