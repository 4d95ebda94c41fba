"""Bucketed, distributed, resumable batch sampling.

Each epoch has one *global* batch order, the same on every rank and for every world size:

1. assign every sample its bucket for (seed, epoch) (:class:`~opensora_core.data.buckets.Buckets`);
   samples without a bucket sit the epoch out;
2. shuffle the samples (seed, epoch), group them by bucket keeping that order, and cut each
   group into micro-batches of the bucket's batch size (a short last one is dropped with
   ``drop_last``);
3. shuffle the micro-batches (seed, epoch).

Ranks are dealt global batches round-robin: with ``C`` batches consumed and ``W`` ranks, rank
``r`` yields global batches ``C + r, C + r + W, ...``. Every rank yields the same number of
batches: the tail that does not fill a round is dropped with ``drop_last``, or completed with
batches from the start of the epoch without it (then the last round repeats a few samples).

The state is ``{seed, epoch, consumed_batches}`` in *global* batches, so a run resumes at the
same place in the order whatever its new world size: the batches after a resume equal those the
uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader, Sampler

from opensora_core.data.buckets import Bucket, Buckets
from opensora_core.data.dataset import RowSource, as_row_source

Key = tuple[int, Bucket]
"""One dataset key: (row index, bucket)."""

_SIZE_COLUMNS = ["height", "width", "num_frames"]


class BucketBatchSampler(Sampler[list[Key]]):
    """Yields this rank's micro-batches, lists of ``(index, bucket)`` keys of one bucket each.

    Args:
        meta_df_or_rows: a DataFrame or :class:`~opensora_core.data.dataset.RowSource` with the
            columns height, width, num_frames; row positions are the sample indices.
        buckets: the run's bucket set.
        num_replicas, rank: world size and this rank.
        seed: seed of the bucket coins and the shuffles.
        drop_last: drop short bucket batches and the tail that does not fill a round of ranks.
    """

    def __init__(
        self,
        meta_df_or_rows: pd.DataFrame | RowSource,
        buckets: Buckets,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank {rank} of {num_replicas}")
        sizes = as_row_source(meta_df_or_rows).columns(_SIZE_COLUMNS)
        self.heights = pd.to_numeric(sizes["height"], errors="coerce").to_numpy(dtype=np.float64)
        self.widths = pd.to_numeric(sizes["width"], errors="coerce").to_numpy(dtype=np.float64)
        self.num_frames = pd.to_numeric(sizes["num_frames"], errors="coerce").to_numpy(dtype=np.float64)
        self.buckets = buckets
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._start = 0  # global batches already consumed when the next pass starts
        self._pass_start = 0  # ... when the current (or last) pass started
        self._yielded = 0  # batches this rank yielded in the current pass
        self._cache: tuple[int, int, list[list[Key]]] | None = None

    # -- the global order ---------------------------------------------------------------------
    def global_batches(self, epoch: int | None = None) -> list[list[Key]]:
        """All micro-batches of an epoch (default: the current one) in global order, every rank's."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is not None and self._cache[:2] == (self.seed, epoch):
            return self._cache[2]
        codes, catalogue = self.buckets.assign_codes(
            self.heights, self.widths, self.num_frames, seed=self.seed, epoch=epoch
        )
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(codes))
        order = order[codes[order] >= 0]
        # Group by bucket, keeping the shuffled order inside each group (a stable sort).
        order = order[np.argsort(codes[order], kind="stable")]
        bounds = np.searchsorted(codes[order], np.arange(len(catalogue) + 1))
        batches: list[list[Key]] = []
        for code in sorted(range(len(catalogue)), key=catalogue.__getitem__):
            bucket = catalogue[code]
            members = order[bounds[code] : bounds[code + 1]].tolist()
            for lo in range(0, len(members), bucket.batch_size):
                chunk = members[lo : lo + bucket.batch_size]
                if len(chunk) < bucket.batch_size and self.drop_last:
                    break
                batches.append([(i, bucket) for i in chunk])
        shuffle = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
        batches = [batches[j] for j in shuffle]
        self._cache = (self.seed, epoch, batches)
        return batches

    def _rank_positions(self, consumed: int) -> list[int]:
        """Global positions this rank yields after ``consumed`` global batches."""
        total = len(self.global_batches())
        remaining = max(0, total - consumed)
        rounds = (
            remaining // self.num_replicas if self.drop_last else math.ceil(remaining / self.num_replicas)
        )
        # Positions past the end wrap to the start of the epoch (padding, without drop_last).
        return [(consumed + self.rank + k * self.num_replicas) % total for k in range(rounds)]

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[Key]]:
        batches = self.global_batches()
        self._pass_start, self._yielded = self._start, 0
        for position in self._rank_positions(self._pass_start):
            self._yielded += 1
            yield batches[position]
        self._start = 0  # another pass over the same epoch starts from its beginning

    def __len__(self) -> int:
        """Batches the next pass yields on this rank (the whole epoch unless resumed mid-way)."""
        return len(self._rank_positions(self._start))

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch``; a resume offset is kept only when the epoch stays the same."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._start = self._pass_start = self._yielded = 0

    # -- state --------------------------------------------------------------------------------
    def state_dict(self, steps_done: int | None = None) -> dict[str, int]:
        """``{seed, epoch, consumed_batches}``, consumed counted in global batches.

        ``steps_done``: batches the training loop has taken from the current pass on this rank.
        Leave it None only when nothing runs ahead of the loop: a DataLoader draws from the
        sampler before its batches are used (:class:`InfiniteLoader` passes the right count).
        """
        taken = self._yielded if steps_done is None else steps_done
        consumed = min(self._pass_start + taken * self.num_replicas, len(self.global_batches()))
        return {"seed": self.seed, "epoch": self.epoch, "consumed_batches": consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next pass continues the saved epoch after its consumed global batches."""
        seed = int(state["seed"])
        if seed != self.seed:
            warnings.warn(
                f"sampler seed {self.seed} replaced by the checkpoint's {seed} to resume its order",
                stacklevel=2,
            )
            self.seed = seed
        self.epoch = int(state["epoch"])
        self._start = self._pass_start = int(state["consumed_batches"])
        self._yielded = 0


class InfiniteLoader:
    """Endless batches for step-based training: passes over the loader, epoch after epoch.

    Before each pass the dataset (when it has ``set_epoch``) is told the sampler's epoch; after
    a pass the sampler moves to the next epoch. Batches that came out ``None`` (every sample
    failed to decode) are skipped. :meth:`state_dict` counts the batches handed out, not those
    the loader prefetched, so it is the state to checkpoint.
    """

    def __init__(self, loader: DataLoader, sampler: BucketBatchSampler | None = None) -> None:
        self.loader = loader
        self.sampler = sampler if sampler is not None else loader.batch_sampler
        if not isinstance(self.sampler, BucketBatchSampler):
            raise TypeError("InfiniteLoader needs the loader's BucketBatchSampler")
        self._iterator: Iterator[Any] | None = None
        self._taken = 0  # batches taken from the current pass

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __iter__(self) -> InfiniteLoader:
        return self

    def __next__(self) -> Any:
        passes_without_batches = 0
        while True:
            if self._iterator is None:
                set_epoch = getattr(self.loader.dataset, "set_epoch", None)
                if set_epoch is not None:
                    set_epoch(self.sampler.epoch)
                self._iterator = iter(self.loader)
                self._taken = 0
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                if self._taken == 0:
                    passes_without_batches += 1
                    # A resumed pass may be empty; two empty passes in a row mean no sample fits.
                    if passes_without_batches >= 2:
                        raise ValueError(
                            "the sampler yields no batches: no sample fits any bucket on this rank"
                        ) from None
                self.sampler.set_epoch(self.sampler.epoch + 1)
                continue
            self._taken += 1
            if batch is None:
                warnings.warn("skipping a batch whose samples all failed to decode", stacklevel=2)
                continue
            return batch

    def state_dict(self) -> dict[str, int]:
        """The sampler's state after the batches handed out so far."""
        return self.sampler.state_dict(steps_done=self._taken)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume (before the first batch is drawn)."""
        self.sampler.load_state_dict(state)
        self._iterator = None
        self._taken = 0
