"""Benchmark: the meta stage's probing (header + demux) against decoding every frame.

    python benchmarks/meta_probe.py [--clip-set realistic|small] [--num-clips N] [--workers 1,2]
                                    [--repeats 3] [--ref-repeats 2] [--scaling-rows 4000]
                                    [--out benchmarks/_work]

1. Generate ``--num-clips`` h264 clips into ``OUT/clips-SET-seedS/`` (files already there are
   reused). ``realistic`` (the default, 200 clips) is shaped like a video training set: short
   side 240/360/480 px, aspect 16:9, 4:3, 9:16 or 1:1, 2-6 s at 24/25/30 fps, crf 23, about half
   faststart. ``small`` (300 clips) is the stress case where opening a container dominates:
   64-256 px sides, 17-97 frames, crf 18.
2. Warm the page cache with one untimed probe pass and a read of every file.
3. For each worker count, alternately time ``tasks.meta.meta`` (read the index, probe, write
   parquet) and two references under the same pandarallel worker count, one decoder thread per
   worker:
   - the Open-Sora reference: decode every frame and turn it into an RGB array, stacked into
     one (T, H, W, 3) array per clip, as ``read_video`` does (the target is stated against it);
   - decode only: decode every frame, no conversion (a lower bound on any decoding reader).
   Each figure is the median of ``--repeats`` probe runs and ``--ref-repeats`` runs of each
   reference. Around every run the wall time, this process's and its workers' CPU time, the
   whole machine's busy CPU (``/proc/stat``) and the load average are recorded, so contention
   from other jobs is visible.
4. Worker scaling: a few hundred rows probe in well under a second, so pandarallel's start-up
   weighs heavily in those runs. ``--scaling-rows`` rows (the clips listed over and over) are
   also probed with each worker count, ``--repeats`` times, interleaved.
5. Check that probing and decoding agree on every clip's frame count; measure the CPU time per
   clip of probing and both references serially (immune to other load on the machine).
6. Print the figures and write them as this clip set's table in the "Metadata probing" section
   of ``benchmarks/BENCHMARKS.md``; the other clip set's table and other sections are kept.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import math
import multiprocessing
import os
import platform
import re
import resource
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
CLIP_SETS = ("realistic", "small")
SUBSECTION_TITLES = {
    "realistic": "### Realistic clips (240p-480p, 2-6 s)",
    "small": "### Small clips (64-256 px, 17-97 frames)",
}
DEFAULT_NUM_CLIPS = {"realistic": 200, "small": 300}
CRF = {"realistic": 23, "small": 18}

# small: the stress case, tiny clips where opening a container costs more than decoding them
SMALL_SIDES = list(range(64, 257, 16))
SMALL_NUM_FRAMES = [17, 33, 49, 65, 81, 97]
SMALL_FPS = [Fraction(8), Fraction(12), Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(30)]
# realistic: short side x aspect (width:height) as in a video training set, 2-6 s
SHORT_SIDES = [240, 360, 480]
ASPECTS = [(16, 9), (4, 3), (9, 16), (1, 1)]
REAL_FPS = [Fraction(24), Fraction(25), Fraction(30)]
DURATION_S = (2.0, 6.0)


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

    @property
    def work(self) -> int:
        """Frames x pixels: what decoding costs grow with."""
        return self.num_frames * self.height * self.width


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


def build_specs(clip_set: str, num_clips: int, seed: int) -> list[ClipSpec]:
    """Clip ``i`` depends only on (set, seed, i): a larger ``--num-clips`` reuses cached ones."""
    specs = []
    for i in range(num_clips):
        rng = np.random.default_rng([seed, i])
        if clip_set == "small":
            height, width = int(rng.choice(SMALL_SIDES)), int(rng.choice(SMALL_SIDES))
            num_frames = int(rng.choice(SMALL_NUM_FRAMES))
            fps = SMALL_FPS[int(rng.integers(len(SMALL_FPS)))]
        else:
            short = int(rng.choice(SHORT_SIDES))
            aw, ah = ASPECTS[int(rng.integers(len(ASPECTS)))]
            if aw >= ah:
                height, width = short, _even(short * aw / ah)
            else:
                height, width = _even(short * ah / aw), short
            fps = REAL_FPS[int(rng.integers(len(REAL_FPS)))]
            num_frames = max(2, round(float(rng.uniform(*DURATION_S)) * fps))
        specs.append(ClipSpec(i, height, width, num_frames, fps, faststart=bool(rng.integers(2))))
    return specs


def render(spec: ClipSpec, seed: int) -> np.ndarray:
    """(T, H, W, 3) uint8: a panning textured background with fine detail and grain, a moving
    square, and sensor noise that changes every frame (so frames do not repeat exactly)."""
    rng = np.random.default_rng([seed, spec.index, 1])
    t, h, w = spec.num_frames, spec.height, spec.width
    speed = rng.uniform(-2.0, 2.0, 2)
    pan = np.round(np.outer(np.arange(t), speed)).astype(int)
    pan -= pan.min(axis=0)
    pad_y, pad_x = pan.max(axis=0) + 1
    y, x = np.mgrid[0 : h + pad_y, 0 : w + pad_x].astype(np.float32)
    freqs = rng.uniform(0.02, 0.3, (3, 2)).astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, 3).astype(np.float32)
    texture = 128 + 60 * np.stack([np.sin(fx * x + fy * y + p) for (fx, fy), p in zip(freqs, phases)], -1)
    fine = np.float32(rng.uniform(0.5, 1.0))
    texture += (30 * np.sin(fine * 0.9 * x) * np.sin(0.7 * y))[..., None]
    texture += rng.normal(0, 6, texture.shape).astype(np.float32)  # grain that pans with the scene
    texture = texture.astype(np.int16)
    margin = 32
    noise = rng.integers(-3, 4, (h + margin, w + margin, 3), dtype=np.int16)
    video = np.empty((t, h, w, 3), dtype=np.uint8)
    side = max(8, min(h, w) // 4)
    for k in range(t):
        oy, ox = rng.integers(0, margin, 2)
        frame = (
            texture[pan[k, 0] : pan[k, 0] + h, pan[k, 1] : pan[k, 1] + w] + noise[oy : oy + h, ox : ox + w]
        )
        top, left = (k * 2) % (h - side), (k * 3) % (w - side)
        frame[top : top + side, left : left + side] = (240, 60, 40)
        np.clip(frame, 0, 255, out=frame)
        video[k] = frame
    return video


def _write_clip(job: tuple[ClipSpec, Path, int, int]) -> None:
    spec, folder, seed, crf = job
    final = folder / spec.name
    tmp = folder / f".tmp-{os.getpid()}-{spec.name}"  # atomic: an interrupted run leaves no clip
    write_video(tmp, render(spec, seed), float(spec.fps), crf=crf, faststart=spec.faststart)
    tmp.replace(final)


def prepare_clips(specs: list[ClipSpec], folder: Path, seed: int, crf: int) -> float:
    """Write the clips not cached yet; returns the seconds it took."""
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(s, folder, seed, crf) for s in specs if not (folder / s.name).is_file()]
    if not todo:
        print(f"reusing {len(specs)} cached clips in {folder}")
        return 0.0
    print(f"writing {len(todo)} clips to {folder} ({len(specs) - len(todo)} cached)")
    # Biggest first, so the pool does not end on one long clip.
    todo.sort(key=lambda job: -job[0].work)
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        for _ in tqdm(pool.imap_unordered(_write_clip, todo), total=len(todo), desc="clips"):
            pass
    return time.perf_counter() - start


# --- the references ------------------------------------------------------------------------


def decode_count(path: str) -> int:
    """Decode only: decode every frame of the first video stream (one thread); -1 on error."""
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_count = 1
            count = 0
            for _ in container.decode(stream):
                count += 1
            return count
    except (av.FFmpegError, IndexError):
        return -1


def decode_rgb_count(path: str) -> int:
    """The Open-Sora reference: every frame decoded and turned into an (H, W, 3) RGB array,
    stacked into one (T, H, W, 3) array, as ``read_video`` does; one thread; -1 on error."""
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_count = 1
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return len(np.stack(frames)) if frames else 0
    except (av.FFmpegError, IndexError):
        return -1


REFERENCES = {"decode": decode_count, "rgb": decode_rgb_count}


def decode_table(index_csv: Path, num_workers: int, kind: str) -> pd.Series:
    """Run reference ``kind`` on every clip of ``index_csv`` with ``num_workers`` pandarallel
    workers (0 = serially in this process)."""
    paths = pd.read_csv(index_csv)["path"]
    fn = REFERENCES[kind]
    if num_workers == 0:
        return paths.apply(fn)
    from pandarallel import pandarallel

    pandarallel.initialize(nb_workers=num_workers, progress_bar=False, verbose=1)
    return paths.parallel_apply(fn)


# --- measuring -----------------------------------------------------------------------------


def _proc_stat() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return math.nan, math.nan
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    return busy / hz, (busy + idle + iowait) / hz


def _own_cpu() -> tuple[float, float]:
    """(this process, its reaped children) user + system CPU seconds."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _reap_children(timeout: float = 10.0) -> None:
    """Wait for finished worker processes, so their CPU time shows in RUSAGE_CHILDREN."""
    gc.collect()
    deadline = time.monotonic() + timeout
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.01)


@dataclass
class Run:
    wall: float
    parent_cpu: float  # this process: read the index, hand out rows, gather, write
    worker_cpu: float  # the pandarallel workers (and pandarallel's manager process)
    machine_busy: float  # busy CPU seconds of the whole machine over the run
    load1: float  # 1-minute load average after the run

    @property
    def cpu(self) -> float:
        return self.parent_cpu + self.worker_cpu

    @property
    def others_cores(self) -> float:
        """Cores busy with other processes during the run (never below 0)."""
        return max(0.0, (self.machine_busy - self.cpu) / self.wall)


def scaling_row(workers: int, num_rows: int, run: Run) -> dict:
    """Figures of one probe run for the scaling table."""
    return {
        "workers": workers,
        "rows": num_rows,
        "rps": num_rows / run.wall,
        "wall": run.wall,
        "cpu": run.cpu,
        "parent_cpu": run.parent_cpu,
        "worker_cpu": run.worker_cpu,
        "used": run.cpu / run.wall,
        "others": run.others_cores,
        "load1": run.load1,
        "per_cpu_s": num_rows / run.cpu,
        # the rate if the parent and every worker had a core to itself
        "cpu_bound": num_rows / (run.parent_cpu + run.worker_cpu / max(workers, 1)),
    }


def measure(fn, *args, **kwargs) -> tuple[Run, object]:
    _reap_children()
    self0, kids0 = _own_cpu()
    busy0, _ = _proc_stat()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    wall = time.perf_counter() - start
    _reap_children()
    self1, kids1 = _own_cpu()
    busy1, _ = _proc_stat()
    return Run(wall, self1 - self0, kids1 - kids0, busy1 - busy0, os.getloadavg()[0]), out


def cpu_per_clip(paths: list[str], fn) -> np.ndarray:
    """CPU milliseconds of ``fn(path)`` for each path, serially in this process."""
    out = np.empty(len(paths))
    for i, path in enumerate(paths):
        start = time.process_time()
        fn(path)
        out[i] = (time.process_time() - start) * 1000
    return out


def cpu_by_size(specs: list[ClipSpec], paths: list[str]) -> list[dict]:
    """Serial CPU time per clip of probing and both references, by thirds of frames x pixels."""
    probe_ms = cpu_per_clip(paths, probe_file)
    decode_ms = cpu_per_clip(paths, decode_count)
    rgb_ms = cpu_per_clip(paths, decode_rgb_count)
    work = np.array([s.work for s in specs], dtype=float)
    order = np.argsort(work, kind="stable")
    groups = [("all clips", order)]
    groups += list(zip(("smallest third", "middle third", "largest third"), np.array_split(order, 3)))
    return [
        {
            "group": name,
            "mpx": f"{work[idx].min() / 1e6:.2f}-{work[idx].max() / 1e6:.2f}",
            "probe_ms": probe_ms[idx].mean(),
            "rgb_ms": rgb_ms[idx].mean(),
            "rgb_ratio": rgb_ms[idx].sum() / probe_ms[idx].sum(),
            "decode_ms": decode_ms[idx].mean(),
            "decode_ratio": decode_ms[idx].sum() / probe_ms[idx].sum(),
        }
        for name, idx in groups
    ]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_text() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


# --- the report ----------------------------------------------------------------------------

INTRO = """\
`python -m tasks.meta` reads each clip's container header and counts its video packets by
demuxing, without decoding (`opensora_core/data/probe.py`). It is timed against two references
run under the same pandarallel worker count, one decoder thread per worker:

- **Open-Sora reference** (the target is stated against it): decode every frame and turn it into
  an RGB array, stacked into one (T, H, W, 3) array per clip, as `read_video` does in Open-Sora's
  metadata script (here with PyAV directly; torchvision is not installed).
- **decode only**: decode every frame, no RGB conversion. No reader that needs pixels is faster;
  this ratio is the honest floor of what skipping decoding buys.

Probe times cover the whole stage function (read the index CSV, probe, write parquet). Each
figure is the median of the runs, interleaved with the other sides and worker counts, on a warm
page cache. Wall-clock rows/s depend on what else the machine is running; the CPU-time tables
do not. The synthetic clips carry fewer bits per second than typical web video of the same size
(see each table's kbit/s); decoding work grows with the bits per frame, so if anything the
references here are on the cheap side."""


def render_subsection(clip_set: str, rows: list[dict], info: dict) -> str:
    lines = [
        SUBSECTION_TITLES[clip_set],
        "",
        f"Result: {info['verdict']}",
        "",
        f"Wall clock, {info['num_clips']} rows, median of {info['repeats']} probe runs and "
        f"{info['ref_repeats']} runs of each reference:",
        "",
        "| workers | probe rows/s | Open-Sora ref. rows/s | speed-up vs Open-Sora ref. "
        "| decode-only rows/s | speed-up vs decode only |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['probe_rps']:.0f} | {r['rgb_rps']:.1f} | **{r['rgb_ratio']:.1f}x** "
            f"| {r['decode_rps']:.1f} | {r['decode_ratio']:.1f}x |"
        )
    if info["scaling"]:
        lines += [
            "",
            f"Probe worker scaling: {info['scaling'][0]['rows']} rows (the {info['num_clips']} clips listed over "
            f"and over), median of {info['repeats']} runs. *CPU s* is this process plus its workers "
            "(`getrusage`); *cores used* = CPU s / wall s; *other load* = cores the rest of the machine kept "
            "busy meanwhile (`/proc/stat` minus ours); *CPU-bound rows/s* = rows / (parent CPU s + worker "
            "CPU s / workers), the rate if every process had a core to itself: derived, not measured, "
            "and approximate, as CPU time per row itself varies by some percent between runs on a "
            "loaded machine.",
            "",
            "| workers | probe rows/s (wall) | wall s | CPU s (parent + workers) | cores used "
            "| other load (cores) | load avg (1 min) | rows per CPU s | CPU-bound rows/s |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in info["scaling"]:
            lines.append(
                "| {workers} | {rps:.0f} | {wall:.2f} | {cpu:.2f} ({parent_cpu:.2f} + {worker_cpu:.2f}) | {used:.2f} "
                "| {others:.2f} | {load1:.1f} | {per_cpu_s:.0f} | {cpu_bound:.0f} |".format(**r)
            )
    lines += [
        "",
        "CPU time per clip, serial in one process (`time.process_time`, so other load on the",
        "machine does not count), by thirds of the clips' frames x pixels:",
        "",
        "| clips | frames x pixels (M) | probe ms | Open-Sora ref. ms | speed-up | decode-only ms | speed-up |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for g in info["by_size"]:
        lines.append(
            f"| {g['group']} | {g['mpx']} | {g['probe_ms']:.2f} | {g['rgb_ms']:.1f} | **{g['rgb_ratio']:.1f}x** "
            f"| {g['decode_ms']:.1f} | {g['decode_ratio']:.1f}x |"
        )
    lines += [
        "",
        f"- Clips: {info['clips']}.",
        f"- Frame counts: probe and decode agree on {info['agree']} of {info['num_clips']} clips.",
        f"- Command: `{info['command']}` ({info['elapsed']}).",
        f"- Date: {info['date']}; machine: nproc {os.cpu_count()}, {cpu_model()}; load average "
        f"{info['load_start']} at start, {info['load_end']} at end; Python {platform.python_version()}, "
        f"PyAV {av.__version__}.",
        "",
    ]
    return "\n".join(lines)


def render_section(subsections: dict[str, str]) -> str:
    parts = [SECTION_TITLE, "", INTRO, ""]
    for name in CLIP_SETS:
        if name in subsections:
            parts += [subsections[name].rstrip("\n"), ""]
    return "\n".join(parts)


def existing_subsections(text: str) -> dict[str, str]:
    """The clip-set tables already in the section of ``text``, by clip set."""
    found = re.search(rf"^{re.escape(SECTION_TITLE)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    if not found:
        return {}
    out = {}
    for name, title in SUBSECTION_TITLES.items():
        part = re.search(rf"^{re.escape(title)}\n.*?(?=^### |\Z)", found.group(1), re.S | re.M)
        if part:
            out[name] = part.group(0)
    return out


def update_report(report: Path, clip_set: str, subsection: str) -> None:
    """Replace this clip set's table in the section (keeping the other set's) or add it;
    replace the section up to the next ``## `` heading or append it; keep the rest."""
    text = report.read_text() if report.is_file() else "# Benchmarks\n\nMeasured results of `benchmarks/`.\n"
    subsections = existing_subsections(text)
    subsections[clip_set] = subsection
    section = render_section(subsections)
    pattern = re.compile(rf"^{re.escape(SECTION_TITLE)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    report.write_text(text.rstrip("\n") + "\n")


def _minutes(seconds: float) -> str:
    total = round(seconds)
    return f"{total // 60} min {total % 60:02d} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip-set", choices=CLIP_SETS, default="realistic", help="which clips to time")
    parser.add_argument(
        "--num-clips", type=int, default=None, help="clips (default: 200 realistic, 300 small)"
    )
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (0 = serial)")
    parser.add_argument("--out", default="benchmarks/_work", help="scratch folder (clips are cached)")
    parser.add_argument("--repeats", type=int, default=3, help="probe runs per worker count")
    parser.add_argument("--ref-repeats", type=int, default=2, help="runs of each reference per worker count")
    parser.add_argument(
        "--scaling-rows", type=int, default=4000, help="rows of the worker-scaling probe runs (0: skip them)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", default=str(ROOT / "benchmarks" / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    load_start = load_text()
    num_clips = args.num_clips or DEFAULT_NUM_CLIPS[args.clip_set]
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    out = Path(args.out)

    # 1. Clips and their index
    specs = build_specs(args.clip_set, num_clips, args.seed)
    clips = out / f"clips-{args.clip_set}-seed{args.seed}"
    generation_s = prepare_clips(specs, clips, args.seed, CRF[args.clip_set])
    index_csv = out / f"index-{args.clip_set}.csv"
    paths = [str(clips / s.name) for s in specs]
    pd.DataFrame({"path": paths, "text": ""}).to_csv(index_csv, index=False)

    # 2. Warm-up: page cache, pandarallel imports
    cfg = MetaConfig(num_workers=0, progress=False)
    meta(index_csv, out / f"meta-{args.clip_set}.parquet", cfg)
    for path in paths:
        Path(path).read_bytes()

    # 3. Interleave the three sides and the worker counts, so load changes hit all alike
    runs: dict[int, dict[str, list[Run]]] = {w: {"probe": [], "decode": [], "rgb": []} for w in workers}
    agree = len(specs)
    for round_ in tqdm(range(max(args.repeats, args.ref_repeats)), desc="timing", unit="round"):
        for w in workers:
            if round_ < args.repeats:
                parquet = out / f"meta-{args.clip_set}-{w}.parquet"
                run, _ = measure(meta, index_csv, parquet, cfg, num_workers=w)
                runs[w]["probe"].append(run)
            if round_ < args.ref_repeats:
                run, decoded = measure(decode_table, index_csv, w, "decode")
                runs[w]["decode"].append(run)
                run, _ = measure(decode_table, index_csv, w, "rgb")
                runs[w]["rgb"].append(run)
                probed = pd.read_parquet(out / f"meta-{args.clip_set}-{w}.parquet")
                agree = min(agree, int((probed["num_frames"].to_numpy() == decoded.to_numpy()).sum()))
    rows = []
    for w in workers:
        median = {k: statistics.median(r.wall for r in v) for k, v in runs[w].items()}
        row = {"workers": w, **{f"{k}_rps": len(specs) / v for k, v in median.items()}}
        row["decode_ratio"] = median["decode"] / median["probe"]
        row["rgb_ratio"] = median["rgb"] / median["probe"]
        rows.append(row)
        print(
            f"workers {w}: probe {row['probe_rps']:.0f} rows/s; Open-Sora ref. {row['rgb_rps']:.1f} rows/s "
            f"({row['rgb_ratio']:.1f}x); decode only {row['decode_rps']:.1f} rows/s ({row['decode_ratio']:.1f}x)"
        )

    # 4. Worker scaling on a longer table
    scaling = []
    if args.scaling_rows > 0:
        big_csv = out / f"index-{args.clip_set}-scaling.csv"
        big = [paths[i % len(paths)] for i in range(args.scaling_rows)]
        pd.DataFrame({"path": big, "text": ""}).to_csv(big_csv, index=False)
        big_runs: dict[int, list[Run]] = {w: [] for w in workers}
        for _ in tqdm(range(args.repeats), desc="scaling", unit="round"):
            for w in workers:
                run, _ = measure(
                    meta, big_csv, out / f"meta-{args.clip_set}-scaling.parquet", cfg, num_workers=w
                )
                big_runs[w].append(run)
        for w in workers:
            median_run = sorted(big_runs[w], key=lambda r: r.wall)[len(big_runs[w]) // 2]
            scaling.append(scaling_row(w, args.scaling_rows, median_run))
            print(
                "scaling, workers {workers}: {rps:.0f} rows/s wall, CPU {cpu:.2f} s, cores used {used:.2f}, "
                "other load {others:.2f} cores, CPU-bound {cpu_bound:.0f} rows/s".format(**scaling[-1])
            )

    # 5. Frame counts, CPU time per clip
    print(f"frame counts: probe and decode agree on {agree} of {len(specs)} clips")
    by_size = cpu_by_size(specs, paths)
    for g in by_size:
        print(
            f"CPU per clip, {g['group']}: probe {g['probe_ms']:.2f} ms, Open-Sora ref. {g['rgb_ms']:.1f} ms "
            f"({g['rgb_ratio']:.1f}x), decode only {g['decode_ms']:.1f} ms ({g['decode_ratio']:.1f}x)"
        )

    # 6. Verdict and report
    total_frames = sum(s.num_frames for s in specs)
    megabytes = sum(Path(p).stat().st_size for p in paths) / 1e6
    seconds = sum(s.num_frames / float(s.fps) for s in specs)
    shorts = sorted({min(s.height, s.width) for s in specs})
    if args.clip_set == "realistic":
        shape = (
            f"short side {'/'.join(map(str, shorts))} px, aspect "
            f"{', '.join(f'{n} {a}' for a, n in _aspect_counts(specs).items())}, "
            f"{min(s.num_frames / float(s.fps) for s in specs):.1f}-"
            f"{max(s.num_frames / float(s.fps) for s in specs):.1f} s at "
            f"{'/'.join(str(int(f)) for f in REAL_FPS)} fps"
        )
    else:
        sides = [v for s in specs for v in (s.height, s.width)]
        shape = f"sides {min(sides)}-{max(sides)} px, {len({s.fps for s in specs})} frame rates"
    info = {
        "repeats": args.repeats,
        "ref_repeats": args.ref_repeats,
        "scaling": scaling,
        "num_clips": len(specs),
        "agree": agree,
        "by_size": by_size,
        "clips": (
            f"{len(specs)} h264 mp4 (crf {CRF[args.clip_set]}, preset veryfast), {shape}, "
            f"{min(s.num_frames for s in specs)}-{max(s.num_frames for s in specs)} frames "
            f"({total_frames} in all), {sum(s.faststart for s in specs)} faststart, {megabytes:.1f} MB, "
            f"{megabytes * 8e3 / seconds:.0f} kbit/s on average"
        ),
        "date": dt.date.today().isoformat(),
        "load_start": load_start,
    }
    command = "python benchmarks/meta_probe.py"
    if argv is None:
        command += " " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""
    info["command"] = command.strip()
    rgb = [r["rgb_ratio"] for r in rows]
    dec = [r["decode_ratio"] for r in rows]
    cpu_all = by_size[0]
    scale = rows[-1]["probe_rps"] / rows[0]["probe_rps"]
    span = f"{rows[0]['workers']} to {rows[-1]['workers']} workers"
    if scaling:
        big_scale = scaling[-1]["rps"] / scaling[0]["rps"]
        cpu_scale = scaling[-1]["cpu_bound"] / scaling[0]["cpu_bound"]
        used = ", ".join(f"{r['used']:.2f}" for r in scaling)
        others = ", ".join(f"{r['others']:.2f}" for r in scaling)
        scaling_text = (
            f"; with {scaling[0]['rows']} rows x{big_scale:.2f} wall clock "
            f"({_trend(big_scale)}; those runs got {used} cores while other "
            f"processes kept {others} cores busy on this {os.cpu_count()}-core machine), "
            f"x{cpu_scale:.2f} CPU-bound (derived)"
        )
    else:
        scaling_text = ""
    info["verdict"] = (
        f"target (the issue's): probing at least 20x faster than the Open-Sora reference (every frame "
        f"decoded to RGB arrays, as `read_video` does): **{min(rgb):.1f}-{max(rgb):.1f}x wall clock, "
        f"{cpu_all['rgb_ratio']:.1f}x CPU time per clip: {'met' if min(rgb) >= 20 else 'not met'}**. "
        f"Against decode only (no RGB conversion, not the target's reference): {min(dec):.1f}-{max(dec):.1f}x "
        f"wall clock, {cpu_all['decode_ratio']:.1f}x CPU time per clip"
        f"{' (also at least 20x)' if min(dec) >= 20 and cpu_all['decode_ratio'] >= 20 else ', under 20x'}. "
        f"Probe rows/s from {span}: with {len(specs)} rows x{scale:.2f} wall clock "
        f"({_trend(scale)}{'' if scale > 1.1 else ': starting the worker pool weighs as much as the probing'})"
        f"{scaling_text}."
    )
    elapsed = time.perf_counter() - started
    info["elapsed"] = (
        f"{_minutes(elapsed)} in all, of which {_minutes(generation_s)} generating clips"
        if generation_s
        else f"{_minutes(elapsed)}, clips cached"
    )
    info["load_end"] = load_text()
    print("Result:", info["verdict"].replace("**", ""))
    report = Path(args.report)
    update_report(report, args.clip_set, render_subsection(args.clip_set, rows, info))
    print(
        f"wrote the '{SUBSECTION_TITLES[args.clip_set][4:]}' table of the '{SECTION_TITLE[3:]}' section of {report}"
    )
    print(f"total {_minutes(elapsed)}")
    return 0


def _trend(factor: float) -> str:
    """A speed-up factor in words; within 10% counts as flat (run-to-run noise here)."""
    if factor > 1.1:
        return "grows"
    if factor >= 0.9:
        return "flat, within 10%"
    return "drops"


def _aspect_counts(specs: list[ClipSpec]) -> dict[str, int]:
    """How many clips of each width:height aspect."""
    counts: dict[str, int] = {}
    for s in specs:
        for aw, ah in ASPECTS:
            if abs(s.width / s.height - aw / ah) < 0.02:
                key = f"{aw}:{ah}"
                counts[key] = counts.get(key, 0) + 1
                break
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    sys.exit(main())
