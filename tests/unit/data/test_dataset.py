from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from opensora_core.data.buckets import Bucket, Buckets
from opensora_core.data.dataset import (
    DataFrameRows,
    RowSource,
    SkippedSampleWarning,
    VideoDataset,
    build_dataloader,
    collate_samples,
    prepare_video,
)
from opensora_core.data.sampler import BucketBatchSampler
from opensora_core.data.video_io import read_video, write_image, write_video


def clip_frames(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, height, width, 3))
    ramp = (np.arange(num_frames) * 6)[:, None, None, None]
    return ((base + ramp) % 256).astype(np.uint8)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """A project root with clips, stills and one corrupt file, and their rows (relative paths)."""
    root = tmp_path_factory.mktemp("project")
    rows = []
    for i, (frames, height, width) in enumerate([(33, 48, 64), (17, 64, 64), (9, 64, 48), (33, 64, 64)]):
        path = f"data/raw/clip{i}.mp4"
        write_video(root / path, clip_frames(frames, height, width, seed=i), fps=12)
        rows.append(
            dict(path=path, text=f"clip {i}", num_frames=frames, height=height, width=width, fps=12.0)
        )
    for i in range(2):
        path = f"data/raw/still{i}.png"
        write_image(root / path, clip_frames(1, 48, 64, seed=10 + i)[0])
        rows.append(dict(path=path, text=f"still {i}", num_frames=1, height=48, width=64, fps=0.0))
    (root / "data/raw/corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    rows.append(dict(path="data/raw/corrupt.mp4", text="bad", num_frames=17, height=64, width=64, fps=12.0))
    frame = pd.DataFrame(rows)
    frame["split"] = "train"
    frame["aspect_ratio"] = frame["height"] / frame["width"]
    return root, frame


def test_dataframe_rows_is_a_row_source(project: tuple[Path, pd.DataFrame]) -> None:
    _, frame = project
    rows = DataFrameRows(frame)
    assert isinstance(rows, RowSource)
    assert len(rows) == len(frame) and rows[1]["path"] == "data/raw/clip1.mp4"
    assert list(rows.columns(["height", "width"]).itertuples(index=False)) == list(
        frame[["height", "width"]].itertuples(index=False)
    )
    with pytest.raises(IndexError):
        rows[len(frame)]


def test_clip_shape_range_and_fields(project: tuple[Path, pd.DataFrame]) -> None:
    root, frame = project
    dataset = VideoDataset(frame, frame_interval=2, root=root)
    bucket = Bucket("32px", 9, 24, 40, 4)
    item = dataset[(0, bucket)]
    video = item["video"]
    assert video.shape == (3, 9, 24, 40) and video.dtype == torch.float32
    assert video.min() >= -1.0 and video.max() <= 1.0 and video.std() > 0.05
    assert item["text"] == "clip 0" and item["index"] == 0 and item["path"] == "data/raw/clip0.mp4"
    assert item["fps"] == pytest.approx(6.0)  # 12 fps sampled every 2 frames


def test_centred_clip_equals_the_decoded_frames(project: tuple[Path, pd.DataFrame]) -> None:
    root, frame = project
    dataset = VideoDataset(frame, frame_interval=3, random_start=False, root=root)
    item = dataset[(0, Bucket("64px", 5, 48, 64, 2))]  # native size: no resize, no crop
    full, _ = read_video(root / "data/raw/clip0.mp4")
    start = (33 - 13) // 2
    expected = torch.from_numpy(full[start : start + 13 : 3]).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert torch.allclose(item["video"], expected, atol=1e-6)


def test_random_start_is_deterministic_per_epoch(project: tuple[Path, pd.DataFrame]) -> None:
    root, frame = project
    bucket = Bucket("32px", 9, 32, 32, 4)
    dataset = VideoDataset(frame, root=root, seed=5)
    starts = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        a, b = dataset[(3, bucket)]["video"], dataset[(3, bucket)]["video"]
        assert torch.equal(a, b)
        starts.add(dataset.start_frame(3, 33, 9))
        assert 0 <= dataset.start_frame(3, 33, 9) <= 24
    assert len(starts) > 1


def test_still_gives_one_frame(project: tuple[Path, pd.DataFrame]) -> None:
    root, frame = project
    dataset = VideoDataset(frame, root=root)
    item = dataset[(4, Bucket("32px", 1, 32, 32, 16))]
    assert item["video"].shape == (3, 1, 32, 32)
    assert item["fps"] == 0.0 and item["text"] == "still 0"


def test_prepare_video_resizes_short_side_and_crops_centre() -> None:
    frames = np.zeros((2, 40, 80, 3), dtype=np.uint8)
    frames[:, :, 20:60] = 255  # a white centre band, black left and right quarters
    out = prepare_video(frames, 20, 20)  # 40x80 -> 20x40, centre 20 columns are the band
    assert out.shape == (3, 2, 20, 20)
    assert torch.all(out[:, :, :, 2:-2] == 1.0)
    out = prepare_video(frames, 80, 80)  # upscale 2x to 80x160: the crop is the band, edges blended
    assert out.shape == (3, 2, 80, 80) and torch.all(out[:, :, :, 1:-1] == 1.0)
    assert torch.all(out[:, :, :, 0] < 1.0)


def test_bad_samples_are_skipped_with_a_warning(project: tuple[Path, pd.DataFrame]) -> None:
    root, frame = project
    dataset = VideoDataset(frame, root=root)
    with pytest.warns(SkippedSampleWarning, match="corrupt.mp4"):
        assert dataset[(6, Bucket("32px", 9, 32, 32, 4))] is None
    with pytest.warns(SkippedSampleWarning, match="needs 17"):  # a 9-frame clip in a 17-frame bucket
        assert dataset[(2, Bucket("32px", 17, 32, 32, 4))] is None
    with pytest.warns(SkippedSampleWarning, match="still"):
        assert dataset[(4, Bucket("32px", 9, 32, 32, 4))] is None
    good = dataset[(1, Bucket("32px", 9, 32, 32, 4))]
    with pytest.warns(SkippedSampleWarning):
        batch = collate_samples([good, dataset[(6, Bucket("32px", 9, 32, 32, 4))]])
    assert batch["video"].shape == (1, 3, 9, 32, 32) and batch["index"].tolist() == [1]
    assert collate_samples([None, None]) is None


def loader_batches(loader: torch.utils.data.DataLoader) -> list[dict]:
    return [batch for batch in loader]


def test_dataloader_workers_match_the_main_process(project: tuple[Path, pd.DataFrame]) -> None:
    root, frame = project
    frame = frame[frame["path"] != "data/raw/corrupt.mp4"]
    buckets = Buckets.from_config({"32px": {1: (1.0, 2), 9: (1.0, 2)}, "48px": {17: (1.0, 2)}})
    dataset = VideoDataset(frame, root=root, seed=3)
    sampler = BucketBatchSampler(frame, buckets, seed=3)
    serial = loader_batches(build_dataloader(dataset, sampler, num_workers=0))
    parallel = loader_batches(build_dataloader(dataset, sampler, num_workers=2, prefetch_factor=2))
    assert len(serial) == len(parallel) == len(sampler) > 1
    seen = set()
    for a, b in zip(serial, parallel):
        assert a["index"].tolist() == b["index"].tolist() and a["text"] == b["text"]
        assert torch.equal(a["video"], b["video"])
        assert a["video"].ndim == 5 and a["video"].shape[1] == 3
        seen.update(a["index"].tolist())
    assert seen == set(range(len(frame)))


def test_build_dataloader_options(project: tuple[Path, pd.DataFrame]) -> None:
    root, frame = project
    buckets = Buckets.from_config({"32px": {1: (1.0, 2)}})
    sampler = BucketBatchSampler(frame, buckets)
    dataset = VideoDataset(frame, root=root)
    loader = build_dataloader(dataset, sampler, num_workers=2, prefetch_factor=3, pin_memory=False)
    assert loader.num_workers == 2 and loader.prefetch_factor == 3 and not loader.pin_memory
    assert loader.batch_sampler is sampler
    assert build_dataloader(dataset, sampler).pin_memory == torch.cuda.is_available()
