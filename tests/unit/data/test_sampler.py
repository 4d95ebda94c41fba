from collections import Counter
from itertools import islice

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from opensora_core.data.buckets import Buckets
from opensora_core.data.dataset import DataFrameRows
from opensora_core.data.sampler import BucketBatchSampler, InfiniteLoader

CONFIG = {"32px": {1: (1.0, 8), 9: (1.0, 4), 17: (0.7, 2)}, "64px": {9: (0.5, 3), 17: (0.5, 2)}}


@pytest.fixture(scope="module")
def meta() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 300
    sizes = rng.choice([32, 48, 64, 96, 16], size=(n, 2))
    frames = rng.choice([1, 1, 9, 17, 33, 5], size=n)
    return pd.DataFrame({"height": sizes[:, 0], "width": sizes[:, 1], "num_frames": frames, "path": "x"})


@pytest.fixture(scope="module")
def buckets() -> Buckets:
    return Buckets.from_config(CONFIG)


def make(meta: pd.DataFrame, buckets: Buckets, world: int = 1, rank: int = 0, **kw) -> BucketBatchSampler:
    return BucketBatchSampler(meta, buckets, num_replicas=world, rank=rank, seed=kw.pop("seed", 7), **kw)


def indices(batches: list) -> list[list[int]]:
    return [[i for i, _ in batch] for batch in batches]


def test_batches_are_same_shape_and_cover_every_assigned_sample(meta, buckets) -> None:
    sampler = make(meta, buckets, drop_last=False)
    batches = list(sampler)
    assert batches == sampler.global_batches() and len(sampler) == len(batches)
    for batch in batches:
        bucket = batch[0][1]
        assert all(b == bucket for _, b in batch) and 1 <= len(batch) <= bucket.batch_size
    counts = Counter(i for batch in batches for i, _ in batch)
    assigned = buckets.assign_many(meta["height"], meta["width"], meta["num_frames"], seed=7, epoch=0)
    assert set(counts) == {i for i, b in enumerate(assigned) if b is not None}
    assert set(counts.values()) == {1}
    assert len(counts) < len(meta)  # some samples (16 px, 5 frames) fit no bucket


def test_drop_last_gives_full_batches_only(meta, buckets) -> None:
    for batch in make(meta, buckets, drop_last=True):
        assert len(batch) == batch[0][1].batch_size


def test_determinism_and_epochs(meta, buckets) -> None:
    a, b = make(meta, buckets), make(meta, buckets)
    assert list(a) == list(b)
    a.set_epoch(1)
    b.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 == list(b) and epoch1 != list(make(meta, buckets))
    assert list(make(meta, buckets, seed=8)) != list(make(meta, buckets))
    # A RowSource gives the same batches as the DataFrame it wraps.
    assert list(BucketBatchSampler(DataFrameRows(meta), buckets, seed=7)) == list(make(meta, buckets))


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_get_equal_counts_of_disjoint_batches(meta, buckets, drop_last: bool) -> None:
    global_batches = make(meta, buckets, drop_last=drop_last).global_batches()
    # The interesting case: a world size that leaves a tail to drop or pad.
    world = next(w for w in (3, 4, 5, 7) if len(global_batches) % w)
    ranks = [list(make(meta, buckets, world, r, drop_last=drop_last)) for r in range(world)]
    counts = {len(batches) for batches in ranks}
    assert len(counts) == 1 and counts.pop() == len(make(meta, buckets, world, 0, drop_last=drop_last))
    dealt = [ranks[k % world][k // world] for k in range(world * len(ranks[0]))]
    if drop_last:
        assert dealt == global_batches[: len(dealt)] and len(global_batches) - len(dealt) < world
        flat = [i for batch in dealt for i, _ in batch]
        assert len(flat) == len(set(flat))  # disjoint samples across ranks
    else:
        assert dealt[: len(global_batches)] == global_batches
        assert dealt[len(global_batches) :] == global_batches[: len(dealt) - len(global_batches)]


def run_until(samplers: list[BucketBatchSampler], steps: int) -> list[list]:
    """Every rank takes ``steps`` batches; returns them per step in global order."""
    iterators = [iter(s) for s in samplers]
    return [next(it) for _ in range(steps) for it in iterators]


def test_resume_mid_epoch_same_world_size(meta, buckets) -> None:
    world = 2
    uninterrupted = [list(make(meta, buckets, world, r, drop_last=True)) for r in range(world)]
    first = [make(meta, buckets, world, r, drop_last=True) for r in range(world)]
    run_until(first, 3)
    state = first[0].state_dict()
    assert state == first[1].state_dict() == {"seed": 7, "epoch": 0, "consumed_batches": 6}
    for r in range(world):
        resumed = make(meta, buckets, world, r, drop_last=True)
        resumed.load_state_dict(state)
        assert len(resumed) == len(uninterrupted[r]) - 3
        assert list(resumed) == uninterrupted[r][3:]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 3)])
def test_resume_after_changing_world_size(meta, buckets, before: int, after: int) -> None:
    global_batches = make(meta, buckets, drop_last=True).global_batches()
    first = [make(meta, buckets, before, r, drop_last=True) for r in range(before)]
    taken = run_until(first, 5)
    assert taken == global_batches[: 5 * before]
    state = first[0].state_dict()
    assert state["consumed_batches"] == 5 * before
    resumed = []
    for r in range(after):
        sampler = make(meta, buckets, after, r, drop_last=True)
        sampler.load_state_dict(state)
        resumed.append(list(sampler))
    union = [resumed[k % after][k // after] for k in range(after * len(resumed[0]))]
    remaining = global_batches[5 * before :]
    assert union == remaining[: len(union)] and len(remaining) - len(union) < after


def test_set_epoch_keeps_a_resume_offset_only_for_the_same_epoch(meta, buckets) -> None:
    sampler = make(meta, buckets)
    sampler.load_state_dict({"seed": 7, "epoch": 2, "consumed_batches": 4})
    sampler.set_epoch(2)
    assert list(sampler) == make(meta, buckets).global_batches(epoch=2)[4:]
    assert len(sampler) == len(sampler.global_batches())  # the next pass is a whole epoch again
    sampler.load_state_dict({"seed": 7, "epoch": 2, "consumed_batches": 4})
    sampler.set_epoch(3)
    assert list(sampler) == sampler.global_batches(epoch=3)


def test_state_dict_with_steps_done_ignores_prefetch(meta, buckets) -> None:
    sampler = make(meta, buckets, 2, 1)
    iterator = iter(sampler)
    for _ in range(4):  # a loader ran four batches ahead ...
        next(iterator)
    assert sampler.state_dict()["consumed_batches"] == 8
    assert sampler.state_dict(steps_done=1)["consumed_batches"] == 2  # ... but one was trained on


class Keys(torch.utils.data.Dataset):
    """A dataset whose items are their keys: the loader's batches show what the sampler dealt."""

    def __init__(self) -> None:
        self.epochs: list[int] = []

    def __getitem__(self, key):
        return key

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


def loader(meta, buckets, dataset: Keys, num_workers: int = 0) -> DataLoader:
    sampler = make(meta, buckets, drop_last=True)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=list,
        num_workers=num_workers,
        prefetch_factor=4 if num_workers else None,
    )


def test_infinite_loader_advances_epochs_and_resumes_exactly(meta, buckets) -> None:
    epoch0, epoch1 = (make(meta, buckets, drop_last=True).global_batches(epoch=e) for e in (0, 1))
    dataset = Keys()
    endless = InfiniteLoader(loader(meta, buckets, dataset))
    steps = len(epoch0) + len(epoch1) + 5
    reference = list(islice(endless, steps))
    assert reference[: len(epoch0) + len(epoch1)] == epoch0 + epoch1
    assert endless.epoch == 2 and dataset.epochs == [0, 1, 2]

    # Stop 3 steps into epoch 1 with a prefetching loader, resume in a fresh one.
    first = InfiniteLoader(loader(meta, buckets, Keys(), num_workers=1))
    cut = len(epoch0) + 3
    assert list(islice(first, cut)) == reference[:cut]
    state = first.state_dict()
    assert state == {"seed": 7, "epoch": 1, "consumed_batches": 3}
    second = InfiniteLoader(loader(meta, buckets, Keys()))
    second.load_state_dict(state)
    assert list(islice(second, steps - cut)) == reference[cut:]


def test_infinite_loader_rejects_a_sampler_with_no_batches(buckets) -> None:
    tiny = pd.DataFrame({"height": [8, 8], "width": [8, 8], "num_frames": [9, 9]})
    endless = InfiniteLoader(DataLoader(Keys(), batch_sampler=make(tiny, buckets), collate_fn=list))
    with pytest.raises(ValueError, match="no batches"):
        next(endless)


def test_bad_rank_is_rejected(meta, buckets) -> None:
    with pytest.raises(ValueError):
        make(meta, buckets, 2, 2)
