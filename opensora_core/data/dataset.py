"""The training dataset: one (index, bucket) key in, one clip cut to the bucket's shape out.

Rows come from any :class:`RowSource` (the shard reader, or :class:`DataFrameRows` over a
DataFrame); the :class:`~opensora_core.data.sampler.BucketBatchSampler` picks each sample's
bucket, and the dataset

1. picks the first frame: centred, or drawn from a hash of (seed, epoch, index) so that any
   worker computes the same start;
2. seeks and decodes only the ``num_frames`` frames it needs, every ``frame_interval`` frames;
3. resizes (the short side to fit, antialiased bilinear) and centre-crops to the bucket's (h, w);
4. scales to [-1, 1] and returns ``video`` as ``(C, T, H, W)``.

A file that fails to decode skips its sample with a :class:`SkippedSampleWarning` (the item is
``None``; :func:`collate_samples` drops it): one bad file never stops a run.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from opensora_core.data.buckets import Bucket, stable_uniform
from opensora_core.data.decoding import DecodeError, decode_frames, frame_span
from opensora_core.data.video_io import is_image_path

_START_SALT = 0x5747  # separates start-frame draws from the bucket coins of the same sample


@runtime_checkable
class RowSource(Protocol):
    """Indexable table of samples: the shard reader's interface."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One row: keys path, text, num_frames, height, width, fps, ... (paths relative to the root)."""
        ...

    def columns(self, names: Sequence[str]) -> pd.DataFrame:
        """Those columns for every row, in row order."""
        ...


class DataFrameRows:
    """A :class:`RowSource` over an in-memory DataFrame (rows in positional order)."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.frame):
            raise IndexError(f"row {index} out of range for {len(self.frame)} rows")
        return self.frame.iloc[index].to_dict()

    def columns(self, names: Sequence[str]) -> pd.DataFrame:
        return self.frame[list(names)]


def as_row_source(rows: RowSource | pd.DataFrame) -> RowSource:
    """A DataFrame wrapped as :class:`DataFrameRows`; any other row source as it is."""
    return DataFrameRows(rows) if isinstance(rows, pd.DataFrame) else rows


class SkippedSampleWarning(RuntimeWarning):
    """A sample was left out of its batch because its file could not be decoded."""


def prepare_video(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 frames ``(T, H0, W0, 3)`` -> float ``(3, T, height, width)`` in [-1, 1].

    Scales so that both sides cover the target (the short side fits; antialiased bilinear),
    then crops the centre.
    """
    _, h0, w0, _ = frames.shape
    frames = np.require(frames, requirements=["C", "W"])  # torch wants writable memory
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, 3, H0, W0)
    scale = max(height / h0, width / w0)
    new_h, new_w = max(height, round(h0 * scale)), max(width, round(w0 * scale))
    if (new_h, new_w) != (h0, w0):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    x = x.clamp(0.0, 255.0) / 127.5 - 1.0
    return x.permute(1, 0, 2, 3).contiguous()


class VideoDataset(Dataset):
    """Clips and stills cut to their bucket's shape; indexed by ``(index, bucket)`` keys.

    Args:
        rows: the samples (a :class:`RowSource` or a DataFrame) with path, text, num_frames, fps.
        frame_interval: frames between two sampled frames (the buckets must use the same value).
        random_start: draw the first frame (deterministic per seed, epoch, index); else centre.
        seed: seed of the start-frame draws.
        root: folder the row paths are relative to (the project root).
    """

    def __init__(
        self,
        rows: RowSource | pd.DataFrame,
        frame_interval: int = 1,
        *,
        random_start: bool = True,
        seed: int = 0,
        root: str | Path = ".",
    ) -> None:
        if frame_interval < 1:
            raise ValueError(f"frame_interval must be >= 1, got {frame_interval}")
        self.rows = as_row_source(rows)
        self.frame_interval = frame_interval
        self.random_start = random_start
        self.seed = seed
        self.root = Path(root)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Start frames change per epoch; workers see this when the loader starts its next pass."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def start_frame(self, index: int, total_frames: int, span: int) -> int:
        """First frame of a ``span``-frame window in a ``total_frames``-frame video."""
        room = total_frames - span
        if room <= 0:
            return 0
        if not self.random_start:
            return room // 2
        u = float(stable_uniform(self.seed, self.epoch, index, salt=_START_SALT))
        return min(int(u * (room + 1)), room)

    def __getitem__(self, key: tuple[int, Bucket]) -> dict[str, Any] | None:
        """``video`` (3, T, H, W) float in [-1, 1], ``text``, ``index``, ``path``, ``fps``; None if skipped.

        ``fps`` is the rate of the sampled clip (the source's divided by ``frame_interval``);
        stills give their row's fps (0 for images).
        """
        index, bucket = key
        row = self.rows[index]
        path = str(row["path"])
        try:
            frames = self._decode(index, row, bucket)
        except DecodeError as err:
            warnings.warn(f"skipping sample {index}: {err}", SkippedSampleWarning, stacklevel=2)
            return None
        fps = float(row.get("fps") or 0.0)
        if not is_image_path(path):
            fps /= self.frame_interval
        return {
            "video": prepare_video(frames, bucket.height, bucket.width),
            "text": str(row.get("text") or ""),
            "index": int(index),
            "path": path,
            "fps": fps,
        }

    def _decode(self, index: int, row: dict[str, Any], bucket: Bucket) -> np.ndarray:
        path = Path(row["path"])
        if not path.is_absolute():
            path = self.root / path
        if is_image_path(path):
            if bucket.num_frames != 1:
                raise DecodeError(f"{path}: a still cannot fill a {bucket.num_frames}-frame bucket")
            return decode_frames(path)
        span = frame_span(bucket.num_frames, self.frame_interval)
        total = int(row.get("num_frames") or 0)
        if total < span:
            raise DecodeError(
                f"{path}: {total} frames, the bucket needs {span} "
                f"({bucket.num_frames} every {self.frame_interval})"
            )
        start = self.start_frame(index, total, span)
        return decode_frames(path, start, bucket.num_frames, self.frame_interval)


def collate_samples(samples: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Stack the samples that decoded; None when none did.

    Returns ``video`` (B, C, T, H, W), ``index`` (B,) long, ``fps`` (B,) float, ``text`` and
    ``path`` lists of B strings.
    """
    kept = [s for s in samples if s is not None]
    if not kept:
        return None
    return {
        "video": torch.stack([s["video"] for s in kept]),
        "text": [s["text"] for s in kept],
        "index": torch.tensor([s["index"] for s in kept], dtype=torch.long),
        "path": [s["path"] for s in kept],
        "fps": torch.tensor([s["fps"] for s in kept], dtype=torch.float32),
    }


def _init_worker(_: int) -> None:
    # Each worker decodes one clip at a time; torch's default thread pool per worker would
    # oversubscribe the cores the workers already share.
    torch.set_num_threads(1)


def build_dataloader(
    dataset: Dataset,
    sampler: Sampler,
    num_workers: int = 0,
    prefetch_factor: int | None = 2,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` whose batches are the sampler's lists of keys.

    ``pin_memory`` None pins only when CUDA is available. ``prefetch_factor`` (batches per
    worker) applies with ``num_workers > 0``. Workers are not persistent, so each pass sees the
    dataset's current epoch.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra = {"prefetch_factor": prefetch_factor, "worker_init_fn": _init_worker}
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_samples,
        pin_memory=pin_memory,
        persistent_workers=False,
        # Its own generator: starting a pass must not draw from the global RNG, or a resumed
        # run (which starts a pass where the uninterrupted one did not) would diverge.
        generator=torch.Generator().manual_seed(0),
        **extra,
    )
