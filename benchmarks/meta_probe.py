"""Benchmark: the meta stage's probing (header + demux) against decoding every frame.

    python benchmarks/meta_probe.py [--num-clips 300] [--workers 1,2] [--out benchmarks/_work]

1. Generate ``--num-clips`` varied h264 clips (64-256 px sides, 17-97 frames, several frame
   rates, half of them faststart) into ``OUT/clips-seedS/``; files already there are reused.
2. Warm the page cache with one untimed probe pass, so every side reads from memory.
3. For each worker count, alternately time ``tasks.meta.meta`` (read the index, probe, write
   parquet) and two references under the same pandarallel worker count, one decoder thread
   per worker: decoding every frame with PyAV, and decoding plus converting each frame to RGB
   as a data loader does. Each figure is the median of ``--repeats`` runs.
4. Check that probing and decoding agree on every clip's frame count; measure the CPU time
   per clip of both serially (immune to other load on the machine), by clip size.
5. Print the figures and write them as the "Metadata probing" section of
   ``benchmarks/BENCHMARKS.md`` (other sections are kept).
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pandas as pd
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opensora_core.config import MetaConfig  # noqa: E402
from opensora_core.data.probe import probe_file  # noqa: E402
from opensora_core.data.video_io import write_video  # noqa: E402
from tasks.meta import meta  # noqa: E402

SECTION_TITLE = "## Metadata probing"
SIDES = list(range(64, 257, 16))
NUM_FRAMES = [17, 33, 49, 65, 81, 97]
FPS = [Fraction(8), Fraction(12), Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(30)]


@dataclass(frozen=True)
class ClipSpec:
    index: int
    height: int
    width: int
    num_frames: int
    fps: Fraction
    faststart: bool

    @property
    def name(self) -> str:
        rate = f"{self.fps.numerator}-{self.fps.denominator}"
        return f"clip{self.index:05d}_{self.height}x{self.width}_{self.num_frames}f_{rate}fps.mp4"


def build_specs(num_clips: int, seed: int) -> list[ClipSpec]:
    """Clip ``i`` depends only on (seed, i): a larger ``--num-clips`` reuses the cached ones."""
    specs = []
    for i in range(num_clips):
        rng = np.random.default_rng([seed, i])
        specs.append(
            ClipSpec(
                index=i,
                height=int(rng.choice(SIDES)),
                width=int(rng.choice(SIDES)),
                num_frames=int(rng.choice(NUM_FRAMES)),
                fps=FPS[int(rng.integers(len(FPS)))],
                faststart=bool(rng.integers(2)),
            )
        )
    return specs


def render(spec: ClipSpec, seed: int) -> np.ndarray:
    """(T, H, W, 3) uint8: a panning smooth texture, a moving square and mild sensor noise."""
    rng = np.random.default_rng([seed, spec.index, 1])
    t, h, w = spec.num_frames, spec.height, spec.width
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    freqs = rng.uniform(0.02, 0.15, (3, 2))
    phases = rng.uniform(0, 2 * np.pi, 3)
    speed = rng.uniform(-2.0, 2.0, 2)
    video = np.empty((t, h, w, 3), dtype=np.uint8)
    side = max(8, min(h, w) // 4)
    for k in range(t):
        xs, ys = x + speed[0] * k, y + speed[1] * k
        chans = [np.sin(fx * xs + fy * ys + p) for (fx, fy), p in zip(freqs, phases)]
        frame = 128 + 90 * np.stack(chans, axis=-1)
        top, left = (k * 2) % (h - side), (k * 3) % (w - side)
        frame[top : top + side, left : left + side] = (240, 60, 40)
        frame += rng.normal(0, 3, frame.shape)
        video[k] = frame.clip(0, 255).astype(np.uint8)
    return video


def _write_clip(job: tuple[ClipSpec, Path, int]) -> None:
    spec, folder, seed = job
    final = folder / spec.name
    tmp = folder / f".tmp-{os.getpid()}-{spec.name}"  # atomic: an interrupted run leaves no clip
    write_video(tmp, render(spec, seed), float(spec.fps), faststart=spec.faststart)
    tmp.replace(final)


def prepare_clips(specs: list[ClipSpec], folder: Path, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(s, folder, seed) for s in specs if not (folder / s.name).is_file()]
    if not todo:
        print(f"reusing {len(specs)} cached clips in {folder}")
        return
    print(f"writing {len(todo)} clips to {folder} ({len(specs) - len(todo)} cached)")
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        for _ in tqdm(pool.imap_unordered(_write_clip, todo), total=len(todo), desc="clips"):
            pass


def decode_count(path: str, rgb: bool = False) -> int:
    """The reference: decode every frame of the first video stream (one thread); -1 on error.

    ``rgb`` also converts each frame to an (H, W, 3) array, as a data loader (and
    ``opensora_core.data.video_io.read_video``) does.
    """
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_count = 1
            count = 0
            for frame in container.decode(stream):
                if rgb:
                    frame.to_ndarray(format="rgb24")
                count += 1
            return count
    except (av.FFmpegError, IndexError):
        return -1


def decode_rgb_count(path: str) -> int:
    return decode_count(path, rgb=True)


def decode_table(index_csv: Path, num_workers: int, rgb: bool = False) -> pd.Series:
    """Decode every clip of ``index_csv`` with ``num_workers`` pandarallel workers (0 = serial)."""
    paths = pd.read_csv(index_csv)["path"]
    fn = decode_rgb_count if rgb else decode_count
    if num_workers == 0:
        return paths.apply(fn)
    from pandarallel import pandarallel

    pandarallel.initialize(nb_workers=num_workers, progress_bar=False, verbose=1)
    return paths.parallel_apply(fn)


def cpu_per_clip(paths: list[str], fn) -> np.ndarray:
    """CPU milliseconds of ``fn(path)`` for each path, serially in this process."""
    out = np.empty(len(paths))
    for i, path in enumerate(paths):
        start = time.process_time()
        fn(path)
        out[i] = (time.process_time() - start) * 1000
    return out


def cpu_by_size(specs: list[ClipSpec], paths: list[str]) -> list[dict]:
    """Serial CPU time per clip of probing and decoding, by thirds of frames x pixels."""
    probe_ms = cpu_per_clip(paths, probe_file)
    decode_ms = cpu_per_clip(paths, decode_count)
    work = np.array([s.num_frames * s.height * s.width for s in specs], dtype=float)
    order = np.argsort(work, kind="stable")
    groups = [("all clips", order)]
    groups += [
        (name, part)
        for name, part in zip(("smallest third", "middle third", "largest third"), np.array_split(order, 3))
    ]
    return [
        {
            "group": name,
            "mpx": f"{work[idx].min() / 1e6:.2f}-{work[idx].max() / 1e6:.2f}",
            "probe_ms": probe_ms[idx].mean(),
            "decode_ms": decode_ms[idx].mean(),
            "ratio": decode_ms[idx].sum() / probe_ms[idx].sum(),
        }
        for name, idx in groups
    ]


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"nproc {os.cpu_count()}, {cpu}; load average at start {load}"


def render_section(rows: list[dict], info: dict) -> str:
    lines = [
        SECTION_TITLE,
        "",
        "`python -m tasks.meta` reads each clip's container header and counts its video packets by",
        "demuxing, without decoding (`opensora_core/data/probe.py`). The reference decodes every",
        "frame with PyAV (one decoder thread per worker) under the same pandarallel worker count;",
        "the second reference also converts each frame to RGB, as a data loader does.",
        "Probe times cover the whole stage function (read the index CSV, probe, write parquet);",
        f"each figure is the median of {info['repeats']} runs, interleaved with the other sides and",
        "worker counts, on a warm page cache.",
        "",
        "| workers | probe rows/s | decode rows/s | speed-up | decode + RGB rows/s | speed-up |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['probe_rps']:.0f} | {r['decode_rps']:.1f} | {r['ratio']:.1f}x "
            f"| {r['decode_rgb_rps']:.1f} | {r['ratio_rgb']:.1f}x |"
        )
    lines += [
        "",
        "CPU time per clip, serial in one process (`time.process_time`, so other load on the",
        "machine does not count), by thirds of the clips' frames x pixels:",
        "",
        "| clips | frames x pixels (M) | probe ms | decode ms | speed-up |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for g in info["by_size"]:
        lines.append(
            f"| {g['group']} | {g['mpx']} | {g['probe_ms']:.2f} | {g['decode_ms']:.2f} | {g['ratio']:.1f}x |"
        )
    lines += [
        "",
        f"- Clips: {info['clips']}.",
        f"- Frame counts: probe and decode agree on {info['agree']} of {info['num_clips']} clips.",
        f"- Command: `{info['command']}`",
        f"- Date: {info['date']}; machine: {info['machine']}; Python {platform.python_version()}, "
        f"PyAV {av.__version__}.",
        f"- Target: probing at least 20x faster than decoding, rows/s growing with workers. "
        f"Result: {info['verdict']}.",
        "",
    ]
    return "\n".join(lines)


def update_report(report: Path, section: str) -> None:
    """Replace the section (up to the next ``## `` heading) or append it; keep the rest."""
    text = report.read_text() if report.is_file() else "# Benchmarks\n\nMeasured results of `benchmarks/`.\n"
    pattern = re.compile(rf"^{re.escape(SECTION_TITLE)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    report.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-clips", type=int, default=300, help="clips to generate and probe")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (0 = serial)")
    parser.add_argument("--out", default="benchmarks/_work", help="scratch folder (clips are cached)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side and worker count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", default=str(ROOT / "benchmarks" / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    out = Path(args.out)

    # 1. Clips and their index
    specs = build_specs(args.num_clips, args.seed)
    clips = out / f"clips-seed{args.seed}"
    prepare_clips(specs, clips, args.seed)
    index_csv = out / "index.csv"
    pd.DataFrame({"path": [str(clips / s.name) for s in specs], "text": ""}).to_csv(index_csv, index=False)
    total_frames = sum(s.num_frames for s in specs)
    megabytes = sum((clips / s.name).stat().st_size for s in specs) / 1e6
    machine_info = machine()

    # 2. Warm-up: page cache, pandarallel imports
    cfg = MetaConfig(num_workers=0, progress=False)
    meta(index_csv, out / "meta.parquet", cfg)

    # 3. Interleave probe and decode runs and worker counts, so load changes hit all alike
    times = {w: {"probe": [], "decode": [], "decode_rgb": []} for w in workers}
    agree = len(specs)
    for _ in tqdm(range(args.repeats), desc="timing", unit="round"):
        for w in workers:
            seconds, _ = timed(meta, index_csv, out / f"meta-{w}.parquet", cfg, num_workers=w)
            times[w]["probe"].append(seconds)
            seconds, decoded = timed(decode_table, index_csv, w)
            times[w]["decode"].append(seconds)
            seconds, _ = timed(decode_table, index_csv, w, rgb=True)
            times[w]["decode_rgb"].append(seconds)
            probed = pd.read_parquet(out / f"meta-{w}.parquet")
            agree = min(agree, int((probed["num_frames"].to_numpy() == decoded.to_numpy()).sum()))
    rows = []
    for w in workers:
        median = {k: statistics.median(v) for k, v in times[w].items()}
        row = {"workers": w, **{f"{k}_rps": len(specs) / v for k, v in median.items()}}
        row["ratio"] = median["decode"] / median["probe"]
        row["ratio_rgb"] = median["decode_rgb"] / median["probe"]
        rows.append(row)
        print(
            f"workers {w}: probe {row['probe_rps']:.0f} rows/s, decode {row['decode_rps']:.1f} rows/s "
            f"({row['ratio']:.1f}x), decode+RGB {row['decode_rgb_rps']:.1f} rows/s ({row['ratio_rgb']:.1f}x)"
        )
    print(f"frame counts: probe and decode agree on {agree} of {len(specs)} clips")
    by_size = cpu_by_size(specs, [str(clips / s.name) for s in specs])
    for g in by_size:
        print(
            f"CPU per clip, {g['group']}: probe {g['probe_ms']:.2f} ms, decode {g['decode_ms']:.2f} ms "
            f"({g['ratio']:.1f}x)"
        )

    # 4. Report
    sides = [v for s in specs for v in (s.height, s.width)]
    info = {
        "repeats": args.repeats,
        "num_clips": len(specs),
        "agree": agree,
        "by_size": by_size,
        "clips": (
            f"{len(specs)} h264 mp4 (crf 18), sides {min(sides)}-{max(sides)} px, "
            f"{min(s.num_frames for s in specs)}-{max(s.num_frames for s in specs)} frames "
            f"({total_frames} in all), {len({s.fps for s in specs})} frame rates, "
            f"{sum(s.faststart for s in specs)} faststart, {megabytes:.1f} MB"
        ),
        "command": f"python benchmarks/meta_probe.py --num-clips {args.num_clips} --workers {args.workers}",
        "date": dt.date.today().isoformat(),
        "machine": machine_info,
    }
    ratios = [r["ratio"] for r in rows]
    scale = rows[-1]["probe_rps"] / rows[0]["probe_rps"]
    info["verdict"] = (
        f"{min(ratios):.1f}-{max(ratios):.1f}x faster than decoding "
        f"({'met' if min(ratios) >= 20 else 'not met'}); probe rows/s x{scale:.2f} "
        f"from {rows[0]['workers']} to {rows[-1]['workers']} workers"
    )
    report = Path(args.report)
    update_report(report, render_section(rows, info))
    print(f"wrote the '{SECTION_TITLE[3:]}' section of {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
