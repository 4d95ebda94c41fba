import math

import numpy as np
import pytest

from opensora_core.data.buckets import (
    ASPECT_RATIOS,
    RESOLUTION_NAMES,
    Bucket,
    BucketOptions,
    Buckets,
    aspect_ratio_table,
    closest_ratio,
    resolution_area,
    stable_uniform,
)
from opensora_core.errors import ConfigError

EXAMPLE = {"32px": {1: (1.0, 16), 9: (1.0, 4)}, "64px": {17: (0.5, 2)}}


def test_resolution_areas() -> None:
    assert resolution_area("64px") == 64 * 64
    assert resolution_area("256px") == 256 * 256
    assert resolution_area("720p") == 720 * 1280
    assert resolution_area("480p") == 480 * 854
    with pytest.raises(ConfigError, match="unknown resolution"):
        resolution_area("hd")


@pytest.mark.parametrize("factor", [8, 16])
@pytest.mark.parametrize("name", [n for n in RESOLUTION_NAMES if resolution_area(n) >= 144 * 256])
def test_tables_keep_area_ratio_and_factor(name: str, factor: int) -> None:
    table = aspect_ratio_table(name, factor)
    assert set(table) == set(ASPECT_RATIOS)
    area = resolution_area(name)
    for ratio, (h, w) in table.items():
        assert h % factor == 0 and w % factor == 0
        assert abs(h * w / area - 1) < 0.1, (ratio, h, w)
        assert abs(math.log(h / w / ratio)) < 0.12, (ratio, h, w)


def test_small_tables_are_multiples_of_the_factor() -> None:
    for name in ("32px", "48px", "64px"):
        for h, w in aspect_ratio_table(name, 16).values():
            assert h % 16 == 0 and w % 16 == 0 and h >= 16 and w >= 16
    assert aspect_ratio_table("64px", 8)[1.0] == (64, 64)
    assert aspect_ratio_table("144p", 16)[0.56] == (144, 256)


def test_closest_ratio() -> None:
    assert closest_ratio(480, 854) == 0.56
    assert closest_ratio(64, 64) == 1.0
    assert closest_ratio(48, 64) == 0.75
    assert closest_ratio(100, 10) == 4.0


def test_stable_uniform_is_a_pure_function_in_range() -> None:
    u = stable_uniform(3, 1, np.arange(10_000), salt=7)
    assert np.array_equal(u, stable_uniform(3, 1, np.arange(10_000), salt=7))
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.02
    assert float(stable_uniform(3, 1, 42, salt=7)) == u[42]
    for other in (stable_uniform(4, 1, np.arange(10_000), 7), stable_uniform(3, 2, np.arange(10_000), 7)):
        assert np.mean(other == u) < 0.01


def test_example_assignment() -> None:
    buckets = Buckets(BucketOptions(EXAMPLE))
    still = buckets.assign(0, 64, 64, 1)
    assert still == Bucket("32px", 1, 32, 32, 16)
    short = buckets.assign(1, 48, 64, 9)  # 3:4 -> 32px table at 0.75 with factor 8
    h, w = aspect_ratio_table("32px", 8)[0.75]
    assert short == Bucket("32px", 9, h, w, 4)
    assert buckets.assign(2, 64, 64, 8) is None  # too short for 9 frames
    assert buckets.assign(3, 16, 16, 9) is None  # 32px would need a 2x upscale
    assert buckets.assign(4, float("nan"), 64, 9) is None


def test_assignment_is_deterministic_per_seed_epoch_index() -> None:
    buckets = Buckets(BucketOptions(EXAMPLE))
    n = 400
    args = (np.full(n, 64), np.full(n, 64), np.full(n, 33))
    first = buckets.assign_many(*args, seed=1, epoch=0)
    assert first == buckets.assign_many(*args, seed=1, epoch=0)
    assert [buckets.assign(i, 64, 64, 33, seed=1, epoch=0) for i in range(n)] == first
    # Indices are what matters, not positions: a shuffled call gives the same per-index answer.
    perm = np.random.default_rng(0).permutation(n)
    shuffled = buckets.assign_many(*args, seed=1, epoch=0, indices=perm)
    assert [shuffled[k] for k in np.argsort(perm)] == first
    assert first != buckets.assign_many(*args, seed=1, epoch=1)
    assert first != buckets.assign_many(*args, seed=2, epoch=0)


def test_probabilities_are_respected() -> None:
    buckets = Buckets(BucketOptions({"64px": {17: (0.3, 2)}, "32px": {9: (1.0, 4), 17: (0.0, 4)}}))
    n = 4000
    assigned = buckets.assign_many(np.full(n, 64), np.full(n, 64), np.full(n, 17), seed=0, epoch=0)
    names = [(b.resolution, b.num_frames) for b in assigned]
    share_64 = names.count(("64px", 17)) / n
    assert abs(share_64 - 0.3) < 0.03
    # Probability 0 is never kept; everything not kept at 64px falls to the next candidate.
    assert names.count(("32px", 17)) == 0
    assert names.count(("32px", 9)) == n - names.count(("64px", 17))


def test_size_limits_and_upscale_tolerance() -> None:
    config = {"64px": {9: (1.0, 2)}, "48px": {9: (1.0, 2)}}
    # A 48x64 clip reaches the 64px 3:4 bucket (72x56 with factor 8) only with a 1.17x upscale.
    strict = Buckets(BucketOptions(config, max_upscale=1.0))
    loose = Buckets(BucketOptions(config, max_upscale=1.25))
    assert strict.assign(0, 64, 48, 9).resolution == "48px"
    assert loose.assign(0, 64, 48, 9).resolution == "64px"
    # Nothing is ever upscaled beyond the tolerance.
    rng = np.random.default_rng(0)
    heights, widths = rng.integers(16, 120, 500), rng.integers(16, 120, 500)
    for h, w, bucket in zip(heights, widths, loose.assign_many(heights, widths, np.full(500, 9))):
        if bucket is not None:
            assert max(bucket.height / h, bucket.width / w) <= 1.25
        else:
            table = aspect_ratio_table("48px", 8)[closest_ratio(h, w)]
            assert max(table[0] / h, table[1] / w) > 1.25


def test_length_limits_frame_interval_and_stills() -> None:
    config = {"32px": {1: (1.0, 8), 9: (1.0, 4), 17: (1.0, 2)}}
    buckets = Buckets(BucketOptions(config, frame_interval=2))
    assert buckets.assign(0, 32, 32, 33).num_frames == 17  # 17 frames every 2 need 33
    assert buckets.assign(0, 32, 32, 32).num_frames == 9
    assert buckets.assign(0, 32, 32, 16) is None  # 9 every 2 need 17; videos skip the still bucket
    assert buckets.assign(0, 32, 32, 1).num_frames == 1
    only_stills = {"32px": {1: (1.0, 8)}}
    assert Buckets(BucketOptions(only_stills)).assign(0, 32, 32, 9) is None
    assert Buckets(BucketOptions(only_stills, stills_from_videos=True)).assign(0, 32, 32, 9).num_frames == 1


def test_config_validation_and_yaml_forms() -> None:
    yaml_like = {"32px": {"1": [1.0, 16], "9": [1.0, 4]}, "64px": {"17": [0.5, 2]}}
    assert Buckets(BucketOptions(yaml_like)).entries == Buckets(BucketOptions(EXAMPLE)).entries
    assert [e[:2] for e in Buckets(BucketOptions(EXAMPLE)).entries] == [
        ("64px", 17),
        ("32px", 9),
        ("32px", 1),
    ]
    bad = [
        {"32px": {9: (1.5, 4)}},
        {"32px": {9: (1.0, 0)}},
        {"32px": {0: (1.0, 4)}},
        {"32px": {9: 1.0}},
        {"big": {9: (1.0, 4)}},
        {"32px": {}},
        {},
    ]
    for config in bad:
        with pytest.raises(ConfigError):
            BucketOptions(config)
    with pytest.raises(ConfigError):
        BucketOptions(EXAMPLE, max_upscale=0.5)


def test_all_lists_every_distinct_bucket() -> None:
    buckets = Buckets(BucketOptions(EXAMPLE, spatial_factor=16))
    every = buckets.all()
    assert len(every) == len(set(every))
    assert {b.resolution for b in every} == {"32px", "64px"}
    assert all(b.height % 16 == 0 and b.width % 16 == 0 for b in every)
    rng = np.random.default_rng(1)
    sizes = rng.integers(16, 200, (300, 2))
    for bucket in buckets.assign_many(sizes[:, 0], sizes[:, 1], rng.integers(1, 40, 300)):
        assert bucket is None or bucket in every
