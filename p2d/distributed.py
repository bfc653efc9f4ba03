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

Supported: pool scoring in `p2d.selection.select_data` (every method but ``random``, which scores
nothing); head scoring by gradients (`p2d.heads`: ``gradient``, ``gradient_layer``,
``gradient_logratio``, ``taylor``; their sums add up across processes, equal to one process within
float64 rounding); head training (`p2d.training.train_loop`): data parallel, each process takes its
rows of the global batch (``batch_size`` x processes), the head deltas' gradients are summed with
``all_reduce`` after a backward scaled by the global answer-token count, so the steps equal one
process with the global batch (up to float rounding of differently padded batches); evaluation
(`p2d.evaluation.evaluate`: rows split, predictions and loss sums gathered); the full fine-tuning
reference (`p2d.cost`: timed data parallel like head training, each step as long as its slowest
process). `p2d.pipeline.Run` ends every stage with a barrier, so what the main process wrote (the
adapter the evaluation loads) is there for all. One machine (a shared run folder).
Not yet: the proxy fine-tunes (``shift``, ``lofit``) and ``random`` run whole on every process (same
result); the benchmark and the app's other jobs are single-process; a NaN or an error on one process
stops only that one (the others wait until the launcher ends them); FSDP/DeepSpeed (the model is not
wrapped by accelerate, so it must fit on each device).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Processes"]


@dataclass
class Processes:
    world: int = 1
    rank: int = 0
    state: object | None = None  # accelerate's PartialState when there are several

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
                cls._current = cls(world=state.num_processes, rank=state.process_index, state=state)
            else:
                cls._current = cls()
        return cls._current

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batches: list) -> list:
        return list(batches) if self.world == 1 else list(batches)[self.rank::self.world]

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

    def all_reduce_(self, tensors) -> None:
        """Sum each tensor over the processes, in place (a no-op for one process)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def summary(self, rows: int) -> dict:
        """``{"processes": N, "rows_per_process": [...]}`` (every process must call it)."""
        return {"processes": self.world, "rows_per_process": self.gather(int(rows))}
