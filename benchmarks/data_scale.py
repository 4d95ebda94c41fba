"""Benchmark: the data stages (meta, validate, shard) at 10k to 1M rows, and a no-change `dvc repro`.

    python benchmarks/data_scale.py [--rows 10000,100000,1000000] [--meta-rows 10000,100000]
                                    [--broken-fraction 0.01] [--rows-per-shard 1000]
                                    [--dvc-clips 100000] [--workers 2] [--out benchmarks/_work/scale]

1. meta: ``--clips`` real clips from the synthetic generator, hard-linked to ``N`` paths for
   each ``--meta-rows`` N (a folder of links per size, reused when complete), indexed as a CSV
   and probed by ``python -m tasks.meta`` with ``--workers`` pandarallel workers.
2. validate and shard at each ``--rows`` N: a meta table as the meta stage writes it (same
   columns and dtypes), generated in chunks, with ``--broken-fraction`` of its rows broken in
   four ways (status not ok, frame rate out of range, empty caption, a path that repeats an
   earlier row's, mostly in another batch). ``python -m tasks.validate`` must quarantine exactly
   those rows (checked from ``quarantine.parquet``); ``python -m tasks.shard`` shards the rest.
3. ``dvc repro`` with nothing changed: a copy of the project's tracked files, ``ingest.source:
   folder`` over ``--dvc-clips`` hard-linked user clips (each with a caption ``.txt``); ``dvc
   repro shard`` once (timed: ingest, meta, validate, shard), then again (nothing to do; timed)
   and ``dvc status``.

Every stage runs as its own process; its wall time and peak RSS (``ru_maxrss`` of that process
from ``os.wait4``: the largest of the process and the children it waited for, not their sum)
are recorded, with the load average before it. Prints a markdown table per part.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opensora_core.config import IngestConfig  # noqa: E402
from opensora_core.data.probe import META_DTYPES  # noqa: E402
from opensora_core.data.synthetic import plan_samples, write_sample  # noqa: E402

CHUNK = 100_000
BROKEN_KINDS = ("status", "fps", "text", "duplicate")


@dataclass
class Run:
    """One stage process: what ran, how long, how much memory."""

    stage: str
    rows: int
    seconds: float
    max_rss_mib: float
    load: float
    rc: int
    tail: str = ""

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def run_stage(stage: str, rows: int, cmd: list[str], cwd: Path) -> Run:
    """Run ``cmd`` in ``cwd`` with the venv first on PATH; wall time and the process's peak RSS."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    load = os.getloadavg()[0]
    log = cwd / f".{stage}-{rows}.log"
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc
    tail = log.read_text()[-600:]
    return Run(stage, rows, seconds, usage.ru_maxrss / 1024, load, rc, tail)


def stage_cmd(task: str, *args: str) -> list[str]:
    """``python -m tasks.TASK`` with the project's params, tracking off, quiet."""
    params = ["--params", str(ROOT / "params.yaml"), "--set", "tracking.enabled=false", "-q"]
    return [sys.executable, "-m", f"tasks.{task}", *params, *args]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def make_clips(out: Path, count: int) -> list[Path]:
    """``count`` real mp4 clips from the synthetic generator (reused when present)."""
    cfg = IngestConfig(num_clips=count, num_stills=0, val_combos=0, seed=0)
    paths = []
    for sample in plan_samples(cfg):
        path = out / "clips" / sample.rel_path
        paths.append(path if path.is_file() else write_sample(sample, out / "clips"))
    return paths


def link_clips(folder: Path, clips: list[Path], count: int, captions: bool = False) -> list[str]:
    """``count`` hard links to ``clips`` (cycled) in ``folder``, with caption links if asked; their names.

    A file takes at most 65000 links (ext4), so each caption file serves 30000 clips.
    """
    names = [f"clip_{i:07d}.mp4" for i in range(count)]
    done = folder / ".complete"
    if not done.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i, name in enumerate(names):
            os.link(clips[i % len(clips)], folder / name)
            if captions:
                caption = folder.parent / f".{folder.name}-caption-{i // 30_000}.txt"
                if not caption.is_file():
                    caption.write_text("a red circle moving left on a grey background\n")
                os.link(caption, folder / name.replace(".mp4", ".txt"))
        done.write_text(str(count))
    return names


def generate_meta(path: Path, rows: int, broken_fraction: float, seed: int = 0) -> np.ndarray:
    """Write a meta table of ``rows`` rows in chunks; returns the sorted row ids made broken."""
    rng = np.random.default_rng(seed)
    broken = np.sort(rng.choice(rows, size=round(rows * broken_fraction), replace=False))
    kind = np.full(rows, -1)
    kind[broken] = np.arange(len(broken)) % len(BROKEN_KINDS)
    kind[:2][kind[:2] == 3] = 2  # the first rows have no earlier path to repeat
    healthy = np.ones(rows, dtype=bool)
    healthy[broken] = False
    writer = None
    for start in range(0, rows, CHUNK):
        ids = np.arange(start, min(rows, start + CHUNK))
        writer = _write_meta_chunk(path, writer, ids, kind[ids], healthy)
    assert writer is not None
    writer.close()
    return broken


def _write_meta_chunk(
    path: Path, writer: pq.ParquetWriter | None, ids: np.ndarray, kind: np.ndarray, healthy: np.ndarray
) -> pq.ParquetWriter:
    n = len(ids)
    still = ids % 10 == 9
    height = np.where(ids % 3 == 1, 48, 64)
    width = np.where(ids % 3 == 2, 48, 64)
    frames = np.where(still, 1, np.where(ids % 2 == 0, 9, 17))
    fps = np.where(still, np.nan, np.array([8.0, 12.0, 24.0])[ids % 3])
    paths = np.array([clip_path(i) for i in ids], dtype=object)
    status = np.full(n, "ok", dtype=object)
    error = np.full(n, "", dtype=object)
    text = np.full(n, "a red circle moving left", dtype=object)
    status[kind == 0], error[kind == 0] = "truncated", "the file holds 5 frames but its header promises 17"
    fps[(kind == 1) & ~still] = 400.0
    frames[(kind == 1) & still] = 9  # a "still" made a video with no usable rate: fps NaN fails
    text[kind == 2] = "  "
    for j in np.flatnonzero(kind == 3):
        paths[j] = clip_path(_earlier_healthy(int(ids[j]), healthy))
    table = pd.DataFrame(
        {
            "path": paths,
            "text": text,
            "split": np.where(ids % 10 == 0, "val", "train").astype(object),
            "num_frames": frames,
            "height": height,
            "width": width,
            "aspect_ratio": height / width,
            "resolution": height * width,
            "fps": fps,
            "duration": np.where(still, np.nan, frames / fps),
            "codec": np.where(still, "png", "h264").astype(object),
            "status": status,
            "error": error,
            # a stand-in content fingerprint per row, as the meta stage's sha256 column
            "sha256": np.array([f"{i:064x}" for i in ids], dtype=object),
        }
    ).astype(META_DTYPES)
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    if writer is None:
        writer = pq.ParquetWriter(path, arrow.schema)
    writer.write_table(arrow.cast(writer.schema))
    return writer


def clip_path(row: int) -> str:
    """The path of row ``row`` of a generated table (every tenth row a still)."""
    return f"data/raw/clip_{row:07d}.{'png' if row % 10 == 9 else 'mp4'}"


def _earlier_healthy(row: int, healthy: np.ndarray) -> int:
    """A healthy row before ``row`` (150001 rows back when there are that many: another batch)."""
    j = row - 150_001 if row > 150_001 else row - 1
    while j >= 0 and not healthy[j]:
        j -= 1
    if j < 0:
        raise ValueError(f"no healthy row before {row}")
    return j


# --------------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------------
def bench_meta(out: Path, sizes: list[int], clips: int, workers: int) -> list[Run]:
    """meta on hard-linked real clips, one folder of links per size."""
    sources = make_clips(out, clips)
    runs = []
    for rows in sizes:
        folder = out / f"links-{rows}"
        names = link_clips(folder, sources, rows)
        index = out / f"index-{rows}.csv"
        paths = [f"{folder.name}/{n}" for n in names]
        pd.DataFrame({"path": paths, "text": "a red circle", "split": "train"}).to_csv(index, index=False)
        output = f"meta-{rows}.parquet"
        runs.append(
            run_stage(
                "meta",
                rows,
                stage_cmd("meta", "--input", index.name, "--output", output, "--num-workers", str(workers)),
                out,
            )
        )
        if runs[-1].rc == 0:
            status = pd.read_parquet(out / output, columns=["status"])["status"]
            runs[-1].tail = f"{int((status == 'ok').sum())} ok of {len(status)}"
    return runs


def bench_validate_shard(
    out: Path, sizes: list[int], broken_fraction: float, rows_per_shard: int
) -> list[Run]:
    """validate and shard of generated meta tables; checks that exactly the broken rows are quarantined."""
    runs = []
    for rows in sizes:
        work = out / f"table-{rows}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        broken = generate_meta(work / "meta.parquet", rows, broken_fraction)
        gate = ["--set", f"validate.max_bad_fraction={max(0.1, 2 * broken_fraction)}"]
        runs.append(
            run_stage(
                "validate",
                rows,
                stage_cmd(
                    "validate",
                    "--input",
                    "meta.parquet",
                    "--clean",
                    "clean.parquet",
                    "--quarantine",
                    "quarantine.parquet",
                    "--report-dir",
                    "reports",
                    *gate,
                ),
                work,
            )
        )
        quarantined = np.sort(
            pd.read_parquet(work / "quarantine.parquet", columns=["input_row"])["input_row"].to_numpy()
        )
        exact = np.array_equal(quarantined, broken)
        runs[-1].tail = f"{len(broken)} broken, {len(quarantined)} quarantined, exactly those: {exact}"
        if not exact:
            raise SystemExit(f"validate at {rows} rows quarantined other rows than the broken ones")
        shard = ["--set", f"shard.rows_per_shard={rows_per_shard}"]
        runs.append(
            run_stage(
                "shard",
                rows - len(broken),
                stage_cmd("shard", "--input", "clean.parquet", "--output", "shards", *shard),
                work,
            )
        )
        shutil.rmtree(work / "shards", ignore_errors=True)
    return runs


def bench_dvc(out: Path, clips: int, sources: list[Path]) -> list[Run]:
    """`dvc repro shard` over a folder of user clips: once, then with nothing changed; `dvc status`."""
    user = out / f"user-clips-{clips}"
    link_clips(user, sources, clips, captions=True)
    project = out / "dvc-project"
    shutil.rmtree(project, ignore_errors=True)
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, project / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ingest"].update(source="folder", path=str(user))
    params["tracking"]["enabled"] = False
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = [str(Path(sys.executable).parent / "dvc")]
    # The copy has the project's .dvc/ but no git repository.
    subprocess.run([*dvc, "config", "--local", "core.no_scm", "true"], cwd=project, check=True)
    runs = [run_stage("dvc repro shard (first)", clips, [*dvc, "repro", "shard"], project)]
    runs.append(run_stage("dvc repro shard (no change)", clips, [*dvc, "repro", "shard"], project))
    runs.append(run_stage("dvc status", clips, [*dvc, "status"], project))
    runs[1].tail = runs[1].tail.strip().splitlines()[-1] if runs[1].tail.strip() else ""
    return runs


def table(runs: list[Run]) -> str:
    lines = [
        "| stage | rows | wall s | rows/s | peak RSS MiB | load (1 min) | exit | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in runs:
        note = r.tail.strip().splitlines()[-1] if r.tail.strip() else ""
        lines.append(
            f"| {r.stage} | {r.rows} | {r.seconds:.1f} | {r.rows_per_s:.0f} | {r.max_rss_mib:.0f} | {r.load:.1f} | {r.rc} | {note[:90]} |"
        )
    return "\n".join(lines)


def sizes_arg(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rows", type=sizes_arg, default=[10_000, 100_000, 1_000_000], help="validate + shard sizes"
    )
    parser.add_argument(
        "--meta-rows", type=sizes_arg, default=[10_000, 100_000], help="meta sizes (hard links)"
    )
    parser.add_argument("--clips", type=int, default=8, help="real clips the links point to")
    parser.add_argument("--broken-fraction", type=float, default=0.01)
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument(
        "--dvc-clips", type=int, default=100_000, help="user clips for the dvc repro check (0: skip)"
    )
    parser.add_argument("--workers", type=int, default=2, help="meta pandarallel workers")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/_work/scale")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()}", flush=True)
    runs = bench_meta(out, args.meta_rows, args.clips, args.workers) if args.meta_rows else []
    runs += bench_validate_shard(out, args.rows, args.broken_fraction, args.rows_per_shard)
    if args.dvc_clips:
        runs += bench_dvc(out, args.dvc_clips, make_clips(out, args.clips))
    print(table(runs), flush=True)
    failed = [r for r in runs if r.rc != 0]
    for r in failed:
        print(f"{r.stage} at {r.rows} rows exited {r.rc}:\n{r.tail}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
