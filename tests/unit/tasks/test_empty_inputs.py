"""Empty and blank inputs to the CLIs: exit 2 with one sentence naming the file, nothing written."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tasks import ingest, meta, sample, vae_reconstruct

EMPTY_FILES = {
    "zero_bytes": "",
    "header_only": "text\n",
}


def run_main(main: Callable[[list[str]], int], argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("", r"the file is empty"),
        ("text\n", r"header but no rows"),
        ("prompt\n", r"header but no rows"),
        ("text\na red circle moves left\n\n", None),  # a trailing blank line is no row
        ("text,note\na red circle,x\n  ,y\n", r"empty 'text' in data row 2"),
        ("caption\nsomething\n", r"needs a 'text' or 'prompt' column; found: caption"),
    ],
)
def test_sample_rejects_empty_prompts_csv(
    tmp_path: Path, capsys, monkeypatch, body: str, message: str | None
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    csv = tmp_path / "prompts.csv"
    csv.write_text(body)
    out = tmp_path / "out"
    argv = ["--params", str(tmp_path / "params.yaml"), "--prompts-csv", str(csv), "--save-dir", str(out)]
    (tmp_path / "params.yaml").write_text("{}\n")
    # A CSV with a usable row gets past the prompts and stops at the (missing) model: exit 2 too.
    argv += ["--model", str(tmp_path / "no-model")]
    message = message or r"no-model"
    code, err = run_main(sample.main, argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists()


def test_sample_rejects_an_index_range_with_no_rows(tmp_path: Path, capsys) -> None:
    csv = tmp_path / "prompts.csv"
    csv.write_text("text\na\nb\n")
    (tmp_path / "params.yaml").write_text("{}\n")
    argv = ["--params", str(tmp_path / "params.yaml"), "--prompts-csv", str(csv), "--start-index", "5"]
    code, err = run_main(sample.main, [*argv, "--save-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and "no rows in [--start-index 5, --end-index 2) of its 2" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("body", ["", "path\n", "path\n \n"])
def test_vae_reconstruct_rejects_empty_csv(tmp_path: Path, capsys, body: str) -> None:
    csv = tmp_path / "clips.csv"
    csv.write_text(body)
    (tmp_path / "params.yaml").write_text("{}\n")
    out = tmp_path / "out"
    argv = ["--params", str(tmp_path / "params.yaml"), "--input", str(csv), "--save-dir", str(out)]
    code, err = run_main(vae_reconstruct.main, argv, capsys)
    assert code == 2 and "Traceback" not in err and str(csv) in err, err
    assert not out.exists()


@pytest.mark.parametrize("body", ["", "path,text\n", "path,text\n ,a caption\n"])
def test_ingest_rejects_empty_csv_and_keeps_the_previous_output(tmp_path: Path, capsys, body: str) -> None:
    csv = tmp_path / "mine.csv"
    csv.write_text(body)
    (tmp_path / "params.yaml").write_text(f"ingest:\n  source: csv\n  path: {csv}\n")
    previous = tmp_path / "data/raw/index.csv"
    previous.parent.mkdir(parents=True)
    previous.write_text("path,text,split\nold.mp4,old,train\n")
    argv = ["--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path), "-q"]
    code, err = run_main(ingest.main, argv, capsys)
    assert code == 2 and "Traceback" not in err and "ingest.path" in err, err
    assert previous.read_text() == "path,text,split\nold.mp4,old,train\n"


def test_ingest_rejects_an_empty_folder_and_keeps_the_previous_output(tmp_path: Path, capsys) -> None:
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "notes.txt").write_text("no videos here")
    (tmp_path / "params.yaml").write_text(f"ingest:\n  source: folder\n  path: {tmp_path / 'clips'}\n")
    previous = tmp_path / "data/raw/index.csv"
    previous.parent.mkdir(parents=True)
    previous.write_text("kept\n")
    code, err = run_main(
        ingest.main, ["--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path)], capsys
    )
    assert code == 2 and "no video or image files found" in err, err
    assert previous.read_text() == "kept\n"


def test_meta_rejects_an_index_without_rows(tmp_path: Path, capsys) -> None:
    index = tmp_path / "index.csv"
    index.write_text("path,text,split\n")
    (tmp_path / "params.yaml").write_text("{}\n")
    out = tmp_path / "meta.parquet"
    argv = ["--params", str(tmp_path / "params.yaml"), "--input", str(index), "--output", str(out)]
    code, err = run_main(meta.main, argv, capsys)
    assert code == 2 and "header but no rows" in err, err
    assert not out.exists()
