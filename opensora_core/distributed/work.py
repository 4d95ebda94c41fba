"""Splitting a list of work items over the ranks of a launch and gathering the results in order.

Every rank builds the same list; rank r takes the items j with ``j % world_size == r``
(:func:`shard_work`), rank 0 gathers every rank's ``(j, result)`` pairs (:func:`gather_to_main`)
and puts them back in list order (:func:`merge_in_order`). Without a process group the world is
one rank.
"""

from __future__ import annotations

from typing import Any


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of the default group; ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_work(items: list[Any], rank: int, world: int) -> list[tuple[int, Any]]:
    """``(j, item)`` of the items this rank takes: those with ``j % world == rank``."""
    return [(j, item) for j, item in enumerate(items) if j % world == rank]


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's picklable ``obj`` on rank 0, in rank order; None on the other ranks."""
    import torch.distributed as dist

    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def merge_in_order(parts: list[list[tuple[int, Any]]]) -> list[Any]:
    """The ``(j, result)`` pairs of every rank as one list ordered by ``j``."""
    return [result for _, result in sorted((pair for part in parts for pair in part), key=lambda p: p[0])]
