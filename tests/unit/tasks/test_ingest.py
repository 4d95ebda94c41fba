"""The ingest stage on tmp_path: synthetic, folder and CSV sources, reruns, and the CLI's exit codes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from opensora_core.config import IngestConfig
from opensora_core.data.synthetic import COLORS, centroid_track, dominant_color, motion_of_track
from opensora_core.data.video_io import read_video, write_image, write_video
from opensora_core.errors import InputError
from tasks.ingest import hash_split, ingest, main, write_preview


def synth_cfg(**overrides) -> IngestConfig:
    base = {
        "num_clips": 10,
        "num_stills": 4,
        "val_combos": 2,
        "sizes": [[32, 32], [32, 48]],
        "num_frames": [9],
    }
    return IngestConfig(**{**base, **overrides})


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def make_clip(path: Path, color: tuple[int, int, int] = (200, 50, 50)) -> Path:
    frames = np.zeros((5, 16, 16, 3), np.uint8)
    frames[:, 4:12, 4:12] = color
    return write_video(path, frames, fps=8)


def write_params(tmp_path: Path, ingest_section: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"ingest": ingest_section, "tracking": {"enabled": False}}))
    return path


# --------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------
def test_synthetic_writes_index_labels_and_files(tmp_path):
    summary = ingest(synth_cfg(), Path("data/raw"), tmp_path, progress=False)
    out = tmp_path / "data/raw"
    index = pd.read_csv(out / "index.csv", keep_default_na=False)
    assert list(index.columns) == ["path", "text", "split"]
    assert len(index) == 14 and set(index["split"]) == {"train", "val"}
    assert index["path"].str.match(r"^data/raw/(clips/clip_\d{4}\.mp4|stills/still_\d{4}\.png)$").all()
    assert all((tmp_path / p).is_file() for p in index["path"])

    labels = pd.read_parquet(out / "labels.parquet")
    assert list(labels["path"]) == list(index["path"]) and list(labels["text"]) == list(index["text"])
    assert list(labels["split"]) == list(index["split"])
    for column in ("shape", "color", "motion", "background", "color_rgb", "size", "start_y", "start_x"):
        assert column in labels.columns
    for column in ("speed", "num_frames", "height", "width", "fps"):
        assert column in labels.columns

    # Each file holds what its label row says.
    for row in labels.itertuples():
        frames, fps = read_video(tmp_path / row.path)
        assert frames.shape == (row.num_frames, row.height, row.width, 3)
        assert dominant_color(frames) == row.color
        assert motion_of_track(centroid_track(frames)) == row.motion
        if row.kind == "clip":
            assert fps == pytest.approx(row.fps)

    assert (
        str(summary) == f"10 clips + 4 stills, {summary.num_train} train / {summary.num_val} val -> data/raw"
    )
    assert summary.num_train + summary.num_val == 14
    assert summary.counts["split.val"] == summary.num_val and summary.counts["rows"] == 14
    assert summary.counts["val_combos"] == 2
    assert sum(v for k, v in summary.counts.items() if k.startswith("shape.")) == 14


def test_rerun_gives_same_bytes_clears_old_outputs_and_keeps_other_files(tmp_path):
    cfg = synth_cfg()
    ingest(cfg, Path("raw"), tmp_path, progress=False)
    first = tree_bytes(tmp_path / "raw")
    first_frames = {n: read_video(tmp_path / "raw" / n)[0] for n in first if n.endswith(".mp4")}
    stale = tmp_path / "raw/clips/clip_9999.mp4"
    make_clip(stale)
    (tmp_path / "raw/README.txt").write_text("kept")

    ingest(cfg, Path("raw"), tmp_path, progress=False)
    second = tree_bytes(tmp_path / "raw")
    assert not stale.exists()
    assert second.pop("README.txt") == b"kept"
    assert sorted(second) == sorted(first)
    # libx264's SIMD paths may read uninitialised memory, so mp4 bytes can differ between
    # encodes of the same frames; every other file is byte for byte the same.
    for name in first:
        if name.endswith(".mp4"):
            a, _ = read_video(tmp_path / "raw" / name)
            np.testing.assert_array_equal(a.shape, np.asarray(first_frames[name]).shape)
            assert np.abs(a.astype(int) - first_frames[name].astype(int)).mean() < 4.0, name
        else:
            assert second[name] == first[name], name

    ingest(dataclasses.replace(cfg, seed=1), Path("raw"), tmp_path, progress=False)
    assert tree_bytes(tmp_path / "raw")["index.csv"] != first["index.csv"]


def test_output_outside_root_is_indexed_with_absolute_paths(tmp_path):
    root, out = tmp_path / "project", tmp_path / "elsewhere"
    root.mkdir()
    summary = ingest(synth_cfg(num_stills=0), out, root, progress=False)
    assert all(p.startswith(str(out)) for p in summary.index["path"])
    assert summary.labels_path == out / "labels.parquet"


# --------------------------------------------------------------------------------------------
# folder and csv
# --------------------------------------------------------------------------------------------
def make_folder(folder: Path) -> None:
    make_clip(folder / "a.mp4")
    (folder / "a.txt").write_text("a red  square\non black\n", encoding="utf-8")
    make_clip(folder / "sub dir" / "crème brûlée 1.mp4", (50, 200, 50))
    (folder / "sub dir" / "crème brûlée 1.txt").write_text("un carré vert", encoding="utf-8")
    write_image(folder / "sub dir" / "still.png", np.full((16, 16, 3), 90, np.uint8))
    make_clip(folder / ".hidden" / "skip.mp4")
    (folder / "notes.md").write_text("not media")


def test_folder_source_indexes_in_place(tmp_path):
    folder = tmp_path / "videos"
    make_folder(folder)
    cfg = IngestConfig(source="folder", path="videos", val_fraction=0.5)
    summary = ingest(cfg, Path("data/raw"), tmp_path, progress=False)

    index = pd.read_csv(tmp_path / "data/raw/index.csv", keep_default_na=False)
    assert list(index.columns) == ["path", "text", "split"]
    assert list(index["path"]) == [
        "videos/a.mp4",
        "videos/sub dir/crème brûlée 1.mp4",
        "videos/sub dir/still.png",
    ]
    assert list(index["text"]) == ["a red square on black", "un carré vert", ""]
    assert list(index["split"]) == [
        hash_split(k, 0.5) for k in ("a.mp4", "sub dir/crème brûlée 1.mp4", "sub dir/still.png")
    ]
    # Nothing copied; a labels table with the label columns and no rows: no ground truth.
    assert sorted(p.name for p in (tmp_path / "data/raw").iterdir()) == ["index.csv", "labels.parquet"]
    labels = pd.read_parquet(tmp_path / "data/raw/labels.parquet")
    assert labels.empty and {"path", "split", "kind", "shape", "color", "motion"} <= set(labels.columns)
    assert not summary.has_labels and summary.num_videos == 2 and summary.num_images == 1
    assert "val_combos" not in summary.counts
    assert str(summary).startswith("2 videos + 1 images (folder), ")


def test_folder_outside_root_gives_absolute_paths(tmp_path):
    folder, root = tmp_path / "ext", tmp_path / "project"
    make_folder(folder)
    root.mkdir()
    summary = ingest(IngestConfig(source="folder", path=str(folder)), Path("data/raw"), root, progress=False)
    assert summary.index["path"].iloc[0] == (folder / "a.mp4").as_posix()


def test_csv_source_resolves_relative_paths_against_the_csv(tmp_path):
    make_folder(tmp_path / "meta" / "clips")
    outside = make_clip(tmp_path.parent / f"{tmp_path.name}_outside.mp4")
    table = pd.DataFrame(
        {
            "path": ["clips/a.mp4", "clips/sub dir/crème brûlée 1.mp4", str(outside), "clips/missing.mp4"],
            "text": ["first, with a comma", "deuxième", "absolute", ""],
            "extra": [1, 2, 3, 4],
        }
    )
    table.to_csv(tmp_path / "meta" / "list.csv", index=False)
    summary = ingest(
        IngestConfig(source="csv", path="meta/list.csv"), Path("data/raw"), tmp_path, progress=False
    )

    index = pd.read_csv(tmp_path / "data/raw/index.csv", keep_default_na=False)
    assert list(index.columns) == ["path", "text", "split"]
    assert list(index["path"]) == [
        "meta/clips/a.mp4",
        "meta/clips/sub dir/crème brûlée 1.mp4",
        outside.as_posix(),
        "meta/clips/missing.mp4",  # kept: validation reports it
    ]
    assert list(index["text"]) == ["first, with a comma", "deuxième", "absolute", ""]
    assert summary.num_videos == 4
    assert pd.read_parquet(summary.labels_path).empty and not summary.has_labels


@pytest.mark.parametrize(
    ("source", "path", "message"),
    [("folder", "nope", "no such folder"), ("csv", "nope.csv", "no such CSV file")],
)
def test_missing_source_is_an_input_error(tmp_path, source, path, message):
    with pytest.raises(InputError, match=message):
        ingest(IngestConfig(source=source, path=path), Path("raw"), tmp_path, progress=False)


def test_csv_without_text_column_names_it(tmp_path):
    (tmp_path / "list.csv").write_text("path,caption\na.mp4,hello\n")
    with pytest.raises(InputError, match=r"missing column\(s\) text; found: path, caption"):
        ingest(IngestConfig(source="csv", path="list.csv"), Path("raw"), tmp_path, progress=False)


def test_hash_split_is_stable_and_near_the_fraction():
    keys = [f"clip_{i}.mp4" for i in range(2000)]
    splits = [hash_split(k, 0.2) for k in keys]
    assert splits == [hash_split(k, 0.2) for k in keys]
    assert 0.17 < splits.count("val") / len(keys) < 0.23
    assert {hash_split(k, 0.0) for k in keys} == {"train"}


def test_preview_shows_clips_and_survives_no_video(tmp_path):
    from PIL import Image

    summary = ingest(synth_cfg(), Path("raw"), tmp_path, progress=False)
    sheet = write_preview(summary.index, tmp_path, tmp_path / "preview.png", max_clips=3, cell=64)
    with Image.open(sheet) as img:
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape[1] == 3 * (64 + 4) + 4 and pixels.shape[0] > 3 * 64
    # The first clip is on the sheet: its shape colour shows up.
    colour = np.asarray(COLORS[summary.labels["color"].iloc[0]])
    assert (np.abs(pixels.astype(int) - colour).sum(axis=-1) < 40).sum() > 20

    empty = write_preview(summary.index.iloc[0:0], tmp_path, tmp_path / "empty.png")
    assert empty.is_file()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def test_main_bad_source_path_exits_2(tmp_path, capsys):
    params = write_params(tmp_path, {"source": "folder", "path": "no_such_dir"})
    rc = main(["--params", str(params), "--root", str(tmp_path), "-q"])
    assert rc == 2
    assert "no_such_dir: no such folder" in capsys.readouterr().err


def test_main_unknown_key_exits_2_naming_it(tmp_path, capsys):
    params = write_params(tmp_path, {})
    rc = main(["--params", str(params), "--root", str(tmp_path), "--set", "ingest.num_clipz=3"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "ingest.num_clipz" in err and "num_clips" in err


def test_main_logs_counts_and_preview_to_mlflow(tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("OPENSORA_PARENT_RUN_ID", raising=False)
    params = write_params(tmp_path, {"num_clips": 6, "num_stills": 2, "val_combos": 1, "num_frames": [9]})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--params", str(params), "--root", str(tmp_path), "-q"]
    rc = main([*argv, "--set", "tracking.enabled=true", "--set", f"tracking.uri={uri}"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith("ingest: 6 clips + 2 stills, ") and "-> data/raw" in out
    assert (tmp_path / "data/raw/index.csv").is_file() and (tmp_path / "reports/ingest_preview.png").is_file()

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("opensora").experiment_id])
    assert run.data.tags["stage"] == "ingest" and run.info.status == "FINISHED"
    assert run.data.metrics["rows"] == 8 and run.data.params["num_clips"] == "6"
    index = pd.read_csv(tmp_path / "data/raw/index.csv")
    assert run.data.metrics["split.val"] == (index["split"] == "val").sum()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"ingest_preview.png", "ingest_counts.json"} <= artifacts


def test_help_exits_0():
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
