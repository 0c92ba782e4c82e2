"""Data-parallel compiles on ``torch.distributed``.

Under ``torchrun --nproc-per-node N -m sqc compile ...`` every rank runs the
same streamed pipeline (:mod:`sqc.streaming`) on its share of the calibration
samples, and the ranks meet per layer:

* **statistics**: each rank sums its samples' Fisher (and guided Hessian)
  pieces as subtrees of one fixed pairwise tree (:mod:`sqc.quant.reduce`); the
  subtrees travel by broadcast and every rank merges them in the tree's own
  order, so the sum has the bits a one-process compile gives;
* **fit**: each rank solves a contiguous run of every weight's row chunks
  (:func:`sqc.quant.kmeans.fit_rows` with ``part=``), and the centroids are
  broadcast back; per-row k-means does not depend on other rows, so the
  tables are the one-process tables;
* **artifact**: rank 0 writes it (to a temporary folder, renamed at the end);
  the others wait at a barrier.

gloo carries CPU tensors, NCCL CUDA ones (``SQC_DIST_BACKEND`` overrides). A rank that dies makes the next collective fail on
the others (gloo reports the closed connection; torchrun then stops the job)
and no artifact is written.
"""
from __future__ import annotations

import datetime
import os

import torch

from .quant.reduce import Item, Node, TreeSum, rank_blocks

__all__ = ["Group", "PeerLost", "current_group", "init_from_env"]


class PeerLost(RuntimeError):
    """Another rank of the job stopped (or a collective timed out): this rank stops too, writing nothing."""


def _collective(group: "Group", what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # gloo: "Connection closed by peer" / timeouts (DistBackendError is a RuntimeError)
        raise PeerLost(
            f"rank {group.rank} of {group.world}: {what} failed because another rank stopped or timed out "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); no artifact is written; the failing "
            "rank's own error is in the job's log") from e


class Group:
    """This process's place in a compile job: rank ``rank`` of ``world`` (a job of one: 0 of 1)."""

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        self.rank, self.world = rank, world

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def blocks(self, n: int) -> list[list[Node]]:
        """The sample subtrees of every rank (the same on all ranks)."""
        return rank_blocks(n, self.world)

    def samples(self, n: int) -> list[int]:
        """This rank's calibration samples, in order."""
        return [i for lo, hi in self.blocks(n)[self.rank] for i in range(lo, hi)]

    def tree_sum(self, n: int, acc: TreeSum, like: dict[str, tuple[torch.Size, torch.dtype]]) -> Item:
        """The sum over all ranks' samples in the fixed tree order: every rank's subtrees are
        broadcast from their owner and merged on every rank in order (at most one partial per tree
        level held). ``like`` gives each entry's shape and dtype (a rank may own no sample)."""
        if not self.distributed:
            return acc.result()
        import torch.distributed as dist

        mine = dict(acc.nodes())
        pieces = []
        for owner, blocks in enumerate(self.blocks(n)):
            for node in TreeSum.held(n, blocks):
                if owner == self.rank:
                    item = mine.pop(node)
                else:
                    item = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in like.items()}
                for k in sorted(item):
                    _collective(self, f"summing the statistics ({k})", dist.broadcast, item[k], src=owner)
                pieces.append((node, item))
        if mine:
            raise RuntimeError(f"rank {self.rank} holds partial sums {sorted(mine)} that are not its blocks")
        return TreeSum.combine(n, pieces)

    def share_rows(self, t: torch.Tensor, runs: list[tuple[int, int]]) -> None:
        """Fill ``t``'s rows in place: rank ``r`` computed rows ``runs[r]`` and broadcasts them."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for owner, (lo, hi) in enumerate(runs):
            if hi > lo:
                part = t[lo:hi].contiguous()
                _collective(self, "sharing the fitted rows", dist.broadcast, part, src=owner)
                if owner != self.rank:
                    t[lo:hi] = part

    def barrier(self, what: str = "a barrier") -> None:
        if self.distributed:
            import torch.distributed as dist

            _collective(self, what, dist.barrier)

    def close(self) -> None:
        """Leave the job (after its last collective)."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


_GROUP = Group()


def current_group() -> Group:
    """The group :func:`init_from_env` joined, or the one-process group."""
    return _GROUP


def init_from_env(timeout_s: float | None = None) -> Group:
    """Join the ``torchrun`` job described by the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR`` ...); a one-process group when ``WORLD_SIZE`` is unset or 1. The timeout of a
    collective (default ``SQC_DIST_TIMEOUT_S`` or 1800 s) bounds how long a rank waits for a
    peer that stopped without closing its connection."""
    global _GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _GROUP = Group()
        return _GROUP
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed: run sqc compile without torchrun")
    if not dist.is_initialized():
        secs = timeout_s if timeout_s is not None else float(os.environ.get("SQC_DIST_TIMEOUT_S", "1800"))
        # the statistics live on the CPU (gloo); a CUDA job's device tensors go through NCCL
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=os.environ.get("SQC_DIST_BACKEND", backend),
                                timeout=datetime.timedelta(seconds=secs))
    _GROUP = Group(dist.get_rank(), dist.get_world_size())
    return _GROUP
