"""Annotation and evaluation across processes and nodes (``accelerate launch --num_processes N``).

Search is embarrassingly parallel over problems, so each process (rank) takes a deterministic share
of the problems, runs its own engine on its own device, and the shares are merged at the end:

- **Sharding by problem id.** :func:`shard_positions` orders the problems by a hash of their id and
  deals them round-robin: the shares are disjoint, cover every problem, differ in size by at most one,
  do not depend on the order of the rows, and mix easy and hard problems (datasets are often sorted
  by difficulty or topic).
- **Waiting without timeouts.** Ranks finish their shares at different times (hours apart on a large
  annotation), longer than NCCL's collective timeout. Coordination therefore runs on a separate gloo
  group with a long timeout (``timeout_hours``), never on the training backend's default group.
- **Merging.** Annotation writes one file per finished tree under ``output_dir/shards/`` from every
  rank, so the merge is rank 0 reading them all: multi-node annotation needs an ``output_dir`` on a
  filesystem shared by the nodes (rank 0 names the problems whose trees it cannot find). Evaluation
  gathers its records over the gloo group and needs no shared filesystem.
- **Resume per shard** comes from the per-problem files: a restarted rank skips the problems (trees,
  evaluation records) already on disk, whichever rank wrote them, so a resume may even use a
  different number of processes.

``accelerate launch`` (or ``torchrun``) sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without
them :meth:`ProcessShard.from_environment` is the single process, and nothing here touches
``torch.distributed``. On a machine without CUDA the processes run on the CPU over gloo
(``accelerate_configs/multi_process_cpu.yaml``).
"""

from __future__ import annotations

import atexit
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

__all__ = ["ProcessShard", "shard_positions"]

_GROUPS: dict[tuple[int, float], Any] = {}


def _destroy_process_group() -> None:
    """Tear the process groups down before the interpreter does.

    A gloo group left to the interpreter's exit now and then aborts the process there ("terminate called
    without an active exception"), failing the launch after the work is done.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _GROUPS.clear()


def _id_key(problem_id: Any) -> str:
    return hashlib.sha256(str(problem_id).encode("utf-8")).hexdigest()


def shard_positions(ids: Sequence[Any], rank: int, world_size: int) -> list[int]:
    """Positions (ascending) of the problems that process ``rank`` of ``world_size`` handles.

    Problems are ordered by the SHA-256 of their id (position breaks ties between equal ids) and
    dealt round-robin, so the assignment depends on the ids alone.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    order = sorted(range(len(ids)), key=lambda i: (_id_key(ids[i]), i))
    return sorted(order[rank::world_size])


@dataclass(frozen=True)
class ProcessShard:
    """Which share of the problems this process handles, and how it meets the other processes.

    Args:
        rank: this process's index among all processes (all nodes).
        world_size: number of processes.
        local_rank: index on this node; picks the GPU.
        device: where this process's model goes (``"cuda:<local_rank>"``, ``"cpu"``); None keeps the
            loader's default.
        timeout_hours: how long a process waits for the others (they finish their shares at
            different times).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str | None = None
    timeout_hours: float = 72.0

    @classmethod
    def from_environment(cls, timeout_hours: float = 72.0) -> ProcessShard:
        """The shard of this process under ``accelerate launch`` / ``torchrun`` (a single process otherwise)."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(timeout_hours=timeout_hours)
        import torch
        from accelerate import PartialState

        # accelerate's own MULTI_CPU launch needs mpirun; processes started by torchrun on a machine
        # without CUDA are told to use the CPU so that accelerate picks gloo instead of giving up.
        state = PartialState(cpu=not torch.cuda.is_available())
        atexit.register(_destroy_process_group)
        return cls(
            rank=state.process_index,
            world_size=state.num_processes,
            local_rank=state.local_process_index,
            device="cpu" if state.device.type == "cpu" else str(state.device),
            timeout_hours=timeout_hours,
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def label(self) -> str:
        return f"process {self.rank + 1} of {self.world_size}"

    def positions(self, ids: Sequence[Any]) -> list[int]:
        """Positions of the problems this process handles (see :func:`shard_positions`)."""
        return shard_positions(ids, self.rank, self.world_size)

    # ------------------------------------------------------------------ coordination
    def _group(self):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError(
                f"{self.label}: torch.distributed is not initialized; build the shard with "
                "ProcessShard.from_environment() under accelerate launch or torchrun"
            )
        key = (self.world_size, self.timeout_hours)
        if key not in _GROUPS:
            _GROUPS[key] = dist.new_group(backend="gloo", timeout=timedelta(hours=self.timeout_hours))
        return _GROUPS[key]

    def barrier(self) -> None:
        """Wait until every process gets here (no-op for a single process)."""
        if self.is_distributed:
            import torch.distributed as dist

            dist.barrier(group=self._group())

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process (``[obj]`` for a single process)."""
        if not self.is_distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._group())
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if not self.is_distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._group())
        return box[0]
