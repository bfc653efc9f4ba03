"""Per-head gates and per-head output capture, via hooks on each layer's output projection.

transformers gives causal LMs no ``head_mask``, so P2D reaches the heads through the one place where
they are still separate: the input of the output projection (``o_proj``; GPT-2's ``c_proj``) is the
concatenation of all query heads' outputs, ``[B, T, n_q * head_dim]``. A forward pre-hook views it
as ``[B, T, n_q, head_dim]`` and

- multiplies head outputs by gates: per layer a tensor of shape ``[n_q]`` (same gate for the whole
  batch) or ``[B, n_q]`` (one gate per sample). Gates may require grad: with ``[B, n_q]`` gates one
  backward of the *sum* of per-sample losses gives every sample's own gate gradient;
- captures per-head output norms: the L2 norm of each head's output vector, averaged over the
  positions of a mask (e.g. the positions that predict answer tokens), one ``[B, n_q]`` tensor per
  layer. Captured norms are of the *ungated* head outputs and are detached (no big tensors are kept);
- optionally stops the forward right after the last layer it needs (``stop_after``): the hook of that
  layer raises `StopForward`, which `HeadGate.run` swallows. Useful for scores that need no logits.

Hooks are only registered on the layers asked for, and are always removed on exit (also on
exceptions). Both head layouts of `p2d.geometry.HeadGeometry` are supported ("split" Llama-style and
"fused" GPT-2), since both feed the concatenated head outputs to their output projection.

`answer_losses` is the forward helper the scoring code shares: per-sample mean cross-entropy on the
answer tokens, computing logits only at the positions that predict answer tokens (or at any other
position mask passed as ``positions``).

Which answer positions count (``POSITIONS``):

- ``"all"``: every position that predicts an answer token (`answer_positions`). With a chat template
  the answer tokens end with the template's end-of-turn marker and whatever the template adds after
  it (SmolLM2's ChatML: ``<|im_end|>`` then ``"\n"``), so for a one-token answer two of its three
  positions predict template tokens, not content;
- ``"content"``: only the positions that predict an answer token *before the first special token of
  the answer* (`content_positions`); special tokens are the tokenizer's ``all_special_ids``, its
  eos/bos/pad ids and every added token marked special (`special_token_ids`). Everything from that
  first special token on (end-of-turn, eos, the template's trailing newline) is dropped. A row whose
  answer has no content token left (an empty answer) keeps all its answer positions.
  Not handled: answers that legitimately contain a special token in the middle (the rest of the
  answer is dropped too), and templates that append non-special text after the answer *without* a
  special token first (their trailing text counts as content).
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn.functional as F

from ..data.encoding import IGNORE_INDEX
from ..geometry import HeadGeometry, decoder_layers

__all__ = ["HeadGate", "StopForward", "POSITIONS", "answer_losses", "answer_token_losses", "answer_logits",
           "answer_positions",
           "content_positions", "special_token_ids", "position_mask", "heads_by_layer", "StopInside", "stop_inside"]

#: which answer positions per-head statistics and losses are taken at (see the module docstring)
POSITIONS = ("all", "content")


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (caught by `HeadGate.run`)."""


class StopInside(Exception):
    """Raised by `stop_inside`'s hooks: a stop was asked for part-way through a forward or backward pass."""


@contextlib.contextmanager
def stop_inside(model: torch.nn.Module, should_stop):
    """While inside, ``should_stop()`` is also asked before each decoder layer's forward and, when a forward
    builds a graph, as the backward pass reaches each layer's output; `StopInside` is raised when it says yes.
    A loop that checks between batches and takes `StopInside` as "stopped" then stops within one layer's work
    instead of one batch's (a batch can take half a minute on a busy machine). The interrupted batch's results
    are lost, the earlier ones kept. ``should_stop`` None: nothing is hooked."""
    if should_stop is None:
        yield
        return

    def check(*_):
        if should_stop():
            raise StopInside()

    def on_output(module, args, output):
        h = output[0] if isinstance(output, (tuple, list)) else output
        if torch.is_tensor(h) and h.requires_grad:
            h.register_hook(check)

    handles = []
    try:
        for layer in decoder_layers(model):
            handles += [layer.register_forward_pre_hook(check), layer.register_forward_hook(on_output)]
        yield
    finally:
        for h in handles:
            h.remove()


def heads_by_layer(heads: Iterable) -> dict[int, list[int]]:
    """[[layer, head], ...] -> {layer: sorted heads}, layers in ascending order."""
    out: dict[int, set[int]] = {}
    for layer, head in heads:
        out.setdefault(int(layer), set()).add(int(head))
    return {layer: sorted(out[layer]) for layer in sorted(out)}


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Bool mask [B, T] of the positions whose next token is an answer token (they predict it).

    The last position never predicts anything. This is where the answer-token loss is computed, so
    per-head statistics "on the answer tokens" are taken at these positions.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def special_token_ids(tokenizer) -> list[int]:
    """Sorted ids of the tokenizer's special tokens: ``all_special_ids``, eos/bos/pad, and every
    added token flagged special (chat-template markers such as ``<|im_end|>``)."""
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            ids.add(value)
    for idx, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(idx))
    return sorted(ids)


def content_positions(labels: torch.Tensor, special_ids, fallback: bool = True) -> torch.Tensor:
    """Bool mask [B, T]: the answer positions whose target comes before the first special token of
    the row's answer (see the module docstring). ``special_ids``: an iterable of ids or a tensor.

    With ``fallback`` a row left without any such position keeps all its answer positions.
    """
    ids = torch.as_tensor(list(special_ids) if not torch.is_tensor(special_ids) else special_ids,
                          dtype=labels.dtype, device=labels.device)
    targets = labels[:, 1:]
    is_answer = targets != IGNORE_INDEX
    special = is_answer & torch.isin(targets, ids)
    seen_special = special.long().cumsum(dim=1) > 0
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = is_answer & ~seen_special
    if fallback:
        empty = ~mask.any(dim=1)
        if empty.any():
            mask[empty] = answer_positions(labels[empty])
    return mask


def position_mask(labels: torch.Tensor, positions: str = "all", special_ids=None) -> torch.Tensor:
    """`answer_positions` for ``"all"``, `content_positions` for ``"content"`` (needs ``special_ids``)."""
    if positions == "all":
        return answer_positions(labels)
    if positions == "content":
        if special_ids is None:
            raise ValueError("positions='content' needs the tokenizer's special ids (special_token_ids)")
        return content_positions(labels, special_ids)
    raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, not {positions!r}")


class HeadGate:
    """Context manager that hooks the output projection of `layers` (default: all layers).

    Usage::

        with HeadGate(model, geometry, layers=[3, 7]) as gate:
            gate.set_gate(3, torch.tensor([1., 0., 1., 1.]))      # [n_q]: same for all samples
            gate.set_gate(7, g7)                                   # [B, n_q]: per sample
            gate.capture(mask)                                     # [B, T] positions to average
            out = model(**batch)
            gate.norms[7]                                          # [B, n_q] mean head-output norms

    Gates and the capture mask stay set for every forward until changed (`clear_gates`,
    `capture(None)`). ``stop_after=L`` makes the forward stop once layer L's heads have been seen;
    run such a forward through `run` (it returns None when the forward was stopped).
    """

    def __init__(self, model: torch.nn.Module, geometry: HeadGeometry, layers: Iterable[int] | None = None,
                 stop_after: int | None = None):
        self.model = model
        self.geometry = geometry
        self.layers = sorted(set(range(geometry.n_layers) if layers is None else (int(x) for x in layers)))
        for layer in self.layers:
            if not 0 <= layer < geometry.n_layers:
                raise IndexError(f"layer {layer} out of range 0..{geometry.n_layers - 1}")
        if stop_after is not None and stop_after not in self.layers:
            raise ValueError("stop_after must be one of the hooked layers")
        self.stop_after = stop_after
        self.gates: dict[int, torch.Tensor] = {}
        self.norms: dict[int, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._handles: list = []

    # -- setup ----------------------------------------------------------------------------------
    def __enter__(self) -> "HeadGate":
        try:
            for layer in self.layers:
                module = self.geometry.output_projection(self.model, layer)
                self._handles.append(module.register_forward_pre_hook(self._make_hook(layer), with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    # -- gates and capture ----------------------------------------------------------------------
    def set_gate(self, layer: int, gate: torch.Tensor | None) -> None:
        """Gate of one hooked layer: [n_q] or [B, n_q] (None removes it)."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not hooked (hooked: {self.layers})")
        if gate is None:
            self.gates.pop(layer, None)
            return
        if gate.dim() not in (1, 2) or gate.shape[-1] != self.geometry.n_q_heads:
            raise ValueError(f"gate for layer {layer} must have shape [n_q] or [B, n_q] with n_q="
                             f"{self.geometry.n_q_heads}, got {tuple(gate.shape)}")
        self.gates[layer] = gate

    def clear_gates(self) -> None:
        self.gates.clear()

    def capture(self, mask: torch.Tensor | None) -> None:
        """Capture per-head mean output norms over the True/nonzero positions of ``mask`` [B, T] in
        the next forwards (`norms[layer]` -> [B, n_q]); None stops capturing. Clears old norms."""
        self._mask = None if mask is None else mask.detach()
        self.norms = {}

    # -- the hook -------------------------------------------------------------------------------
    def _make_hook(self, layer: int):
        n_q, d = self.geometry.n_q_heads, self.geometry.head_dim

        def hook(module, args, kwargs):
            if args:
                x, rest, key = args[0], args[1:], None
            else:  # called with a keyword argument
                key = "input" if "input" in kwargs else next(iter(kwargs))
                x, rest = kwargs[key], ()
            gate = self.gates.get(layer)
            if self._mask is not None:
                self._capture(layer, x, n_q, d)
            if gate is not None:
                shape = x.shape
                heads = x.reshape(*shape[:-1], n_q, d)
                g = gate.to(dtype=x.dtype, device=x.device)
                g = g.view(1, 1, n_q, 1) if g.dim() == 1 else g.view(g.shape[0], 1, n_q, 1)
                x = (heads * g).reshape(shape)
            if self.stop_after == layer:
                raise StopForward()
            if gate is None:
                return None
            if key is None:
                return (x, *rest), kwargs
            kwargs = dict(kwargs)
            kwargs[key] = x
            return args, kwargs

        return hook

    def _capture(self, layer: int, x: torch.Tensor, n_q: int, d: int) -> None:
        with torch.no_grad():
            mask = self._mask.to(device=x.device, dtype=torch.float32)
            norms = x.detach().reshape(*x.shape[:-1], n_q, d).float().norm(dim=-1)  # [B, T, n_q]
            count = mask.sum(dim=1).clamp_min(1.0)  # [B]
            self.norms[layer] = (norms * mask.unsqueeze(-1)).sum(dim=1) / count.unsqueeze(-1)

    # -- running ------------------------------------------------------------------------------
    def run(self, fn, *args, **kwargs):
        """Call ``fn(*args, **kwargs)`` (e.g. the model); returns None if a hook stopped it early."""
        try:
            return fn(*args, **kwargs)
        except StopForward:
            return None


# ----------------------------------------------------------------------------------- forward helper


def _logit_postprocess(model, logits: torch.Tensor) -> torch.Tensor:
    """Apply the output scalings some architectures do after lm_head (Gemma2/3 soft-capping,
    Granite's logits_scaling, Cohere's logit_scale)."""
    cfg = getattr(model, "config", None)
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scaling = getattr(cfg, "logits_scaling", None)
    if scaling and scaling != 1:
        logits = logits / scaling
    scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    return logits


def answer_token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                        fast: bool = True, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every answer token (flat ``[N]``, float32) and the batch row of each.

    With ``fast`` the model body runs once and the LM head only at the positions that predict answer
    tokens (the full [B, T, vocab] logits are never built); output scalings (Gemma soft-capping,
    Granite/Cohere logit scales) are applied after it. ``fast=False``, or a model whose body or head
    cannot be reached, takes the plain full forward. ``positions`` (bool [B, T], a subset of
    `answer_positions`, e.g. `content_positions`) restricts the loss to those positions.
    """
    logits, targets, rows = answer_logits(model, batch, fast, positions)
    return F.cross_entropy(logits.float(), targets, reduction="none"), rows


def answer_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], fast: bool = True,
                  positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits at the positions that predict answer tokens (``[N, vocab]``, in batch order), the
    answer tokens they predict (``[N]``) and the batch row of each (see `answer_token_losses`)."""
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    pos = answer_positions(labels) if positions is None else positions.to(labels.device)  # [B, T]
    rows, cols = pos.nonzero(as_tuple=True)
    targets = labels[rows, cols + 1]
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if fast and body is not None and body is not model and head is not None:
        out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        logits = _logit_postprocess(model, head(hidden[rows, cols]))
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[rows, cols]
    return logits, targets, rows


def answer_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                  positions: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean cross-entropy on the answer tokens ([B], float32); 0 for samples without any.
    ``positions``: see `answer_token_losses`."""
    token_loss, rows = answer_token_losses(model, batch, positions=positions)
    n = batch["input_ids"].shape[0]
    sums = torch.zeros(n, dtype=torch.float32, device=token_loss.device).index_add(0, rows, token_loss)
    counts = torch.zeros(n, dtype=torch.float32, device=token_loss.device).index_add(
        0, rows, torch.ones_like(token_loss))
    return sums / counts.clamp_min(1.0)
