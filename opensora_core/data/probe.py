"""Fast metadata of videos and images: read the container header and demux, never decode.

A video is opened with PyAV; size, codec, frame rate (the stream's average rate) and duration
come from the header, and the frame count from demuxing the video stream's packets (one packet
per frame, no decoding). Web videos keep their index at the front of the file (mp4
"faststart"), so a half-downloaded file opens cleanly and its header still claims every frame:
only counting the packets that are really there tells it apart. A count short of what the
header promises (``stream.frames``, or ``duration * fps`` when the container does not say) marks
the file ``truncated``.

Images (png, jpg, webp, ...) are read with Pillow, header only (PNG chunk checksums are
verified, which needs no decompression): one frame, no frame rate or duration.

Every readable file also gets ``sha256``, the hex digest of its bytes (read in 1 MiB blocks, never
decoded), computed by the same worker that probes it: the fingerprint travels through validate into
the shards, so a video replaced under the same path changes the shard manifest's ``content_hash``
(and with it the training resume key). Empty for a missing, empty or unreadable path.

Every probe returns a :class:`ProbeResult`; nothing here raises on a bad file. This module
imports neither torch nor anything heavy: the ``meta`` stage's CLI must start fast.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import pandas as pd
from PIL import Image

from opensora_core.data.video_io import file_sha256, is_image_path

# Output columns, in order, added to the input table by the meta stage.
META_COLUMNS = (
    "num_frames",
    "height",
    "width",
    "aspect_ratio",
    "resolution",
    "fps",
    "duration",
    "codec",
    "status",
    "error",
    "sha256",
)
STATUSES = ("ok", "missing", "empty", "truncated", "unreadable", "no_video")
# Nullable integers: a row that could not be probed has no size rather than a size of 0.
META_DTYPES = {
    "num_frames": "Int64",
    "height": "Int64",
    "width": "Int64",
    "aspect_ratio": "float64",
    "resolution": "Int64",
    "fps": "float64",
    "duration": "float64",
    "codec": "object",
    "status": "object",
    "error": "object",
    "sha256": "object",
}
# Open options that keep FFmpeg's stream analysis to the header (see _open_header_only).
HEADER_ONLY_OPEN: dict[str, dict[str, str]] = {
    "options": {"skip_frame": "all"},
    "container_options": {"probesize": "32", "analyzeduration": "0", "fpsprobesize": "0"},
}
# When the header gives only a duration, duration * fps is an estimate: some containers count
# the start offset of B-frame reordering in it (FLV), and it rounds either way. A count short of
# it by at most max(DURATION_SLACK_FRAMES, DURATION_SLACK_FRACTION * estimate) is accepted.
DURATION_SLACK_FRAMES = 3
DURATION_SLACK_FRACTION = 0.05


@dataclass
class ProbeResult:
    """What probing one file found; ``status`` is one of :data:`STATUSES`."""

    status: str = "ok"
    error: str = ""
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: float = math.nan
    duration: float = math.nan
    codec: str = ""
    sha256: str = ""
    """Hex SHA-256 of the file's bytes (empty when the file could not be read)."""

    @property
    def aspect_ratio(self) -> float:
        """height / width (Open-Sora's convention), NaN when the size is unknown."""
        if not self.height or not self.width:
            return math.nan
        return self.height / self.width

    @property
    def resolution(self) -> int | None:
        """height * width in pixels."""
        if self.height is None or self.width is None:
            return None
        return self.height * self.width

    def as_row(self) -> dict[str, Any]:
        """The :data:`META_COLUMNS` of one table row."""
        return {
            "num_frames": self.num_frames,
            "height": self.height,
            "width": self.width,
            "aspect_ratio": self.aspect_ratio,
            "resolution": self.resolution,
            "fps": self.fps,
            "duration": self.duration,
            "codec": self.codec,
            "status": self.status,
            "error": self.error,
            "sha256": self.sha256,
        }


def probe_file(path: str | Path | None) -> ProbeResult:
    """Probe one file by its path (relative paths resolve against the current directory).

    Never raises: a missing, empty or broken file gives a result with that ``status`` and a
    readable ``error``.
    """
    if path is None or (isinstance(path, float) and math.isnan(path)) or str(path).strip() == "":
        return ProbeResult(status="missing", error="the row has no path")
    path = Path(str(path))
    try:
        if not path.exists():
            return ProbeResult(status="missing", error=f"{path} does not exist")
        if path.is_dir():
            return ProbeResult(status="unreadable", error=f"{path} is a directory, not a file")
        if path.stat().st_size == 0:
            return ProbeResult(status="empty", error=f"{path} is empty (0 bytes)")
        if not os.access(path, os.R_OK):
            return ProbeResult(status="unreadable", error=f"{path} is not readable (permission denied)")
        result = probe_image(path) if is_image_path(path) else probe_video(path)
        result.sha256 = file_sha256(path)
        return result
    except Exception as exc:  # a probe must never stop the run
        return ProbeResult(status="unreadable", error=f"probing {path} failed: {type(exc).__name__}: {exc}")


def probe_video(path: Path) -> ProbeResult:
    """Header fields of the first video stream plus its packet count; no frame is decoded."""
    try:
        container = _open_header_only(path)
    except av.FFmpegError as exc:
        return ProbeResult(status="unreadable", error=f"cannot open as a video: {_ffmpeg_message(exc)}")
    with container:
        if not container.streams.video:
            kinds = ", ".join(f"{s.type} ({_codec_name(s)})" for s in container.streams) or "nothing"
            return ProbeResult(status="no_video", error=f"no video stream; the file holds: {kinds}")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else math.nan
        duration = _duration_seconds(container, stream)
        result = ProbeResult(
            height=stream.height or None,
            width=stream.width or None,
            fps=fps,
            duration=duration,
            codec=_codec_name(stream),
        )
        promised, exact = _promised_frames(stream, fps, duration)
        count = 0
        try:
            for packet in container.demux(stream):
                if packet.size:  # demux ends with one empty flush packet
                    count += 1
        except av.FFmpegError as exc:
            result.num_frames = count
            result.status = "truncated"
            promise = f" of the {promised} its header promises" if promised else ""
            result.error = f"demuxing stopped after {count} frames{promise}: {_ffmpeg_message(exc)}"
            return result
    result.num_frames = count
    tolerance = 0 if exact else max(DURATION_SLACK_FRAMES, DURATION_SLACK_FRACTION * promised)
    if promised and count < promised - tolerance:
        source = "" if exact else f" ({duration:.3f} s at {fps:g} fps)"
        result.status = "truncated"
        result.error = (
            f"the file holds {count} frames but its header promises {promised}{source}: "
            "it was cut short, e.g. by an interrupted download"
        )
    elif count == 0:
        result.status = "unreadable"
        result.error = "the video stream holds no frames"
    return result


def probe_image(path: Path) -> ProbeResult:
    """Size and format of a still image from its header: one frame, no fps or duration."""
    try:
        img = Image.open(path)
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return ProbeResult(status="unreadable", error=f"not a readable image: {exc}")
    with img:
        width, height = img.size
        result = ProbeResult(num_frames=1, height=height, width=width, codec=(img.format or "").lower())
        try:
            img.verify()
        except (OSError, SyntaxError, ValueError) as exc:
            # Pillow reports a file cut short as "Truncated File Read" / "image file is truncated".
            result.status = "truncated" if "truncat" in str(exc).lower() else "unreadable"
            result.error = f"broken image: {exc}"
    return result


def probe_table(
    paths: Iterable[Any], num_workers: int = 0, progress: bool = True, engine: str = "pandarallel"
) -> pd.DataFrame:
    """Probe every path; returns one row of :data:`META_COLUMNS` per path, in the same order.

    ``engine`` ``pandarallel``: ``num_workers`` > 0 spreads the rows over that many pandarallel
    worker processes (with pandarallel's progress bar); 0 probes serially in this process (with
    a tqdm bar). ``ray``: the rows go as tasks to the Ray cluster this process is connected to
    (see :func:`maybe_ray_cluster`), in blocks of consecutive rows.
    """
    series = pd.Series(list(paths), dtype=object)
    if len(series) == 0:
        rows: list[dict[str, Any]] = []
    elif engine == "ray":
        rows = _probe_with_ray(series.tolist(), progress)
    elif num_workers > 0:
        from pandarallel import pandarallel

        # Never more workers than rows: pandarallel gives each worker one contiguous chunk.
        pandarallel.initialize(nb_workers=min(num_workers, len(series)), progress_bar=progress, verbose=1)
        rows = list(series.parallel_apply(probe_row))
    else:
        from tqdm import tqdm

        rows = [probe_row(p) for p in tqdm(series, desc="meta", unit="file", disable=not progress)]
    table = pd.DataFrame.from_records(rows, columns=list(META_COLUMNS))
    return table.astype(META_DTYPES)


@contextmanager
def maybe_ray_cluster(engine: str, address: str, num_workers: int) -> Iterator[None]:
    """Connect to the Ray cluster at ``address`` (or start a local one of ``num_workers`` CPUs)
    for the ``ray`` engine, unless already connected; disconnect at the end if it connected.
    Does nothing for other engines."""
    if engine != "ray":
        yield
        return
    import ray

    started = not ray.is_initialized()
    if started and address:
        ray.init(address=address, log_to_driver=False)
    elif started:
        ray.init(num_cpus=max(1, num_workers), include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _probe_with_ray(paths: list[Any], progress: bool) -> list[dict[str, Any]]:
    """Probe ``paths`` as Ray tasks of consecutive blocks (4 per cluster CPU), results in order."""
    import ray
    from tqdm import tqdm

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    size = max(1, math.ceil(len(paths) / (4 * cpus)))
    task = ray.remote(num_cpus=1)(probe_block)
    # Relative paths resolve against this folder on every node (a shared filesystem).
    refs = [task.remote(paths[i : i + size], os.getcwd()) for i in range(0, len(paths), size)]
    rows: list[dict[str, Any]] = []
    for ref in tqdm(refs, desc="meta (ray)", unit="block", disable=not progress):
        rows.extend(ray.get(ref))
    return rows


def probe_block(paths: list[Any], cwd: str) -> list[dict[str, Any]]:
    """:func:`probe_row` of each path with ``cwd`` as the current directory (a Ray task)."""
    if os.path.isdir(cwd):
        os.chdir(cwd)
    return [probe_row(p) for p in paths]


def probe_row(path: Any) -> dict[str, Any]:
    """:func:`probe_file` as a table row (the function the workers apply)."""
    return probe_file(path).as_row()


def _open_header_only(path: Path) -> Any:
    """Open a container reading little more than its header; raises ``av.FFmpegError``.

    FFmpeg's stream analysis normally decodes the first frames and reads packets ahead to learn
    the pixel format and frame rate. Neither is needed here when the header states the size and
    rate (mp4, mov, mkv, webm, avi): skip both. Containers that describe their streams only
    through their packets (MPEG-TS, raw streams) then leave the size or rate unknown, and are
    opened again with the full analysis.
    """
    try:
        container = av.open(str(path), **HEADER_ONLY_OPEN)
    except av.FFmpegError:
        return av.open(str(path))
    video = container.streams.video
    if video and video[0].width and video[0].height and video[0].average_rate:
        return container
    container.close()
    return av.open(str(path))


def _promised_frames(stream: Any, fps: float, duration: float) -> tuple[int, bool]:
    """Frames the header promises and whether that number is exact (``stream.frames``)."""
    if stream.frames:
        return int(stream.frames), True
    if math.isfinite(fps) and math.isfinite(duration) and fps > 0 and duration > 0:
        return round(duration * fps), False
    return 0, False


def _duration_seconds(container: Any, stream: Any) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return math.nan


def _codec_name(stream: Any) -> str:
    ctx = stream.codec_context
    return ctx.name if ctx is not None else "unknown"


def _ffmpeg_message(exc: av.FFmpegError) -> str:
    """FFmpeg's sentence without the errno and file name PyAV wraps around it."""
    return (getattr(exc, "strerror", None) or str(exc)).rstrip(".")
