"""Several processes (``accelerate launch``): who scores what, and the one process that writes.

`Processes.current()` is the view of this process: one process (no launcher, or one process) or, when
started by ``accelerate launch --num_processes N`` (``WORLD_SIZE`` > 1 in the environment), accelerate's
`PartialState` (gloo on CPU, NCCL on GPUs), created on first use.

- `shard(batches)`: this process's share of a list of batches, round robin. Whole batches move, never
  rows, so every batch is computed exactly as one process computes it and the merged scores equal the
  one-process scores bit for bit.
- `merge(values, owned)`: per-row values from every process put back in one list on every process.
- `is_main`: the process that writes files (`p2d.files` refuses to write on the others, so a stage can
  run on every process and only one copy of its outputs lands on disk); `barrier()`.
- `summary(rows)`: what a result file records: how many processes ran and how many rows each scored.

Supported: pool scoring in `p2d.method.selection.select_data` (every method but ``random``, which scores
nothing); head scoring by gradients (`p2d.method.heads`: ``gradient``, ``gradient_layer``,
``gradient_logratio``, ``taylor``; their sums add up across processes, equal to one process within
float64 rounding); head training (`p2d.training.train_loop`): data parallel, each process takes its
rows of the global batch (``batch_size`` x processes), the head deltas' gradients are summed with
``all_reduce`` after a backward scaled by the global answer-token count, so the steps equal one
process with the global batch (up to float rounding of differently padded batches); evaluation
(`p2d.evaluation.evaluate`: rows split, predictions and loss sums gathered); the full fine-tuning
reference (`p2d.cost`: timed data parallel like head training, each step as long as its slowest
process). `p2d.pipeline.Run` ends every stage with a barrier, so what the main process wrote (the
adapter the evaluation loads) is there for all.
Models larger than one device (FSDP): started with an FSDP accelerate config (``accelerate launch
--use_fsdp --fsdp_version 2 ...`` or a config file with ``distributed_type: FSDP``; accelerate sets
``ACCELERATE_USE_FSDP``), `shard_layers` shards every decoder layer's weights across the processes with
PyTorch's FSDP2 ``fully_shard``; the embeddings, final norm and LM head stay whole on every process
(so the body and the head can still be called on their own), and so do the head deltas, which live in
hook modules outside the model and are all-reduced as above. Each layer's weights are gathered for its
forward and backward, so with a sharded model every process must run the same number of batches:
`padded` pads a share of a global list with copies of its first item, `lockstep` tells a loop over a
process's own batches how many to run (the most any process has), `agreed` makes a stop check the same
on every process. The copies' results are dropped. Config keys read: ``fsdp_reshard_after_forward``
(true / false, or FSDP1's FULL_SHARD / SHARD_GRAD_OP; also from ``fsdp_sharding_strategy``, whose
NO_SHARD means plain data parallel) and ``fsdp_offload_params`` (GPU only); the others (auto-wrap
policy, state-dict type, prefetch, activation checkpointing) are not used: P2D always shards by
decoder layer and never saves the base model. Not with sharding: ``taylor``, ``shift`` and ``shift_sgd`` head scores (they need whole weight
gradients; `check_sharding` refuses them), ``--quantize``. DeepSpeed is not supported (`check_engine`
refuses it): ZeRO-1/2 shard only optimizer state and gradients, which for P2D belong to the head
deltas (a few percent of the parameters), not the frozen weights that fill a device; ZeRO-3 shards
those as FSDP does.
Not yet: the proxy fine-tunes (``shift``, ``lofit``) and ``random`` run whole on every process (same
result); the benchmark and the app's other jobs are single-process; a NaN or an error on one process
stops only that one (the others wait until the launcher ends them). One machine (a shared run folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import UserError

# torch, accelerate and the geometry (which needs torch) are imported where used: p2d.files and p2d.data import
# this module and stay importable without torch; accelerate is only needed with several processes

__all__ = ["Processes", "check_engine", "fsdp_requested", "is_shard", "shard_layers"]

TRUE = ("1", "true", "yes")


def fsdp_requested() -> bool:
    """The launcher asked for FSDP (an accelerate FSDP config or ``--use_fsdp``) with sharding (FSDP1's
    ``NO_SHARD`` strategy is plain data parallel)."""
    no_shard = os.environ.get("FSDP_SHARDING_STRATEGY", "").strip().upper() in ("NO_SHARD", "3")
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in TRUE and not no_shard


def is_shard(t) -> bool:
    """``t`` is a DTensor: a sharded model's weight (or its gradient), of which this process holds a part."""
    return hasattr(t, "to_local") and hasattr(t, "device_mesh")


def check_engine() -> None:
    """Refuse launchers P2D does not run under (one line): DeepSpeed."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in TRUE:
        raise UserError("DeepSpeed is not supported: P2D trains only the head deltas, so ZeRO-1/2 would shard only "
                        "their small optimizer state; for a model larger than one device use an FSDP config "
                        "(configs/accelerate/fsdp.yaml, which shards the weights as ZeRO-3 would), otherwise plain "
                        "several processes (--multi_gpu)")


@dataclass
class Processes:
    world: int = 1
    rank: int = 0
    state: object | None = None  # accelerate's PartialState when there are several
    sharded: bool = False        # the model's layers are sharded across the processes (FSDP)

    _current = None

    @classmethod
    def current(cls) -> "Processes":
        """This process's view (cached): several only under a launcher that set WORLD_SIZE > 1."""
        if cls._current is None:
            if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
                import torch
                from accelerate import PartialState

                # without a GPU accelerate must be told, or it stays one process (gloo on CPU)
                state = PartialState(cpu=not torch.cuda.is_available())
                cls._current = cls(world=state.num_processes, rank=state.process_index, state=state,
                                   sharded=state.num_processes > 1 and fsdp_requested())
            else:
                cls._current = cls()
        return cls._current

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batches: list) -> list:
        return list(batches) if self.world == 1 else list(batches)[self.rank::self.world]

    def padded(self, items: list) -> tuple[list, int]:
        """(this process's share of ``items``, how many of them are its own). With a sharded model the
        share is padded with copies of ``items[0]`` to the longest share, so every process runs as many
        batches; the caller drops the copies' results (the first ``own`` items are the real ones)."""
        mine = self.shard(items)
        if not self.sharded or not items:
            return mine, len(mine)
        longest = -(-len(items) // self.world)
        return mine + [items[0]] * (longest - len(mine)), len(mine)

    def lockstep(self, n: int) -> int:
        """How many batches to run when this process has ``n`` of its own: ``n``, or with a sharded
        model the most any process has (the rest run on a filler whose result is dropped)."""
        if not self.sharded:
            return n
        import torch

        t = torch.tensor([int(n)], dtype=torch.int64)
        self.all_reduce_([t], op="max")
        return int(t.item())

    def agreed(self, should_stop):
        """``should_stop`` answered alike on every process (any process asked: all stop), for loops that
        run in step on a sharded model; the check itself unchanged otherwise."""
        if should_stop is None or not self.sharded:
            return should_stop

        def check() -> bool:
            import torch

            flag = torch.tensor([float(bool(should_stop()))], dtype=torch.float64)
            self.all_reduce_([flag])
            return bool(flag.item() > 0)

        return check

    def gather(self, obj) -> list:
        """``[obj of process 0, obj of process 1, ...]`` on every process."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def merge(self, values: list, owned: list[int]) -> list:
        """``values`` where each process set only the positions in its ``owned``: the positions of
        every process, on every process."""
        if self.world == 1:
            return values
        merged = list(values)
        for part in self.gather({i: values[i] for i in owned}):
            for i, v in part.items():
                merged[i] = v
        return merged

    def total(self, value):
        """The sum over processes of ``value`` (a number or a tensor, summed on the CPU in process order)."""
        if self.world == 1:
            return value
        parts = self.gather(value.detach().cpu() if hasattr(value, "detach") else value)
        out = parts[0]
        for part in parts[1:]:
            out = out + part
        return out

    def all_reduce_(self, tensors, op: str = "sum") -> None:
        """Sum (or ``op="max"``) each tensor over the processes, in place (a no-op for one process).
        A CPU tensor under NCCL, which reduces only GPU tensors, travels through this process's GPU."""
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        backend = str(dist.get_backend()).lower()
        gpu_only = "nccl" in backend and "gloo" not in backend
        for t in tensors:
            if gpu_only and t.device.type != "cuda":
                moved = t.to(torch.device("cuda", torch.cuda.current_device()))
                dist.all_reduce(moved, op=reduce_op)
                t.copy_(moved)
            else:
                dist.all_reduce(t, op=reduce_op)

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def summary(self, rows: int) -> dict:
        """``{"processes": N, "rows_per_process": [...], "sharded": bool}`` (every process must call it)."""
        return {"processes": self.world, "rows_per_process": self.gather(int(rows)), "sharded": self.sharded}

    def check_sharding(self, what: str, instead: str) -> None:
        """Refuse ``what`` (one line, saying ``instead``) when the model is sharded: it needs whole
        weights on each process."""
        if self.sharded:
            raise UserError(f"{what} needs each process to hold the whole model, so it does not run with a sharded "
                            f"(FSDP) model: {instead}, or launch without FSDP (--multi_gpu)")


def _fsdp_options(device) -> dict:
    """fully_shard keyword arguments from the FSDP settings accelerate put in the environment."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    reshard = (os.environ.get("FSDP_RESHARD_AFTER_FORWARD") or "true").strip().upper()
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "").strip().upper()
    keep = reshard in ("FALSE", "0", "SHARD_GRAD_OP", "NO_RESHARD") or strategy in ("SHARD_GRAD_OP", "2")
    options: dict = {"reshard_after_forward": not keep}
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "").lower() in TRUE and device.type == "cuda":
        options["offload_policy"] = CPUOffloadPolicy()
    return options


def shard_layers(model, device) -> int:
    """Shard every decoder layer of ``model`` across the processes (FSDP2 ``fully_shard``, one group per
    layer, on ``device``); the rest of the model (embeddings, final norm, LM head) is left whole and
    moved to ``device`` by the caller. Returns the number of sharded layers."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .geometry import decoder_layers

    procs = Processes.current()
    mesh = init_device_mesh(device.type, (procs.world,))
    options = _fsdp_options(device)
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, **options)
    return len(layers)
