"""The loss-curve PNG is drawn from the loss CSV: every finite row, a resumed run's included."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from opensora_core.training.loss_plot import plot_loss_curve, read_curve, smooth


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("step,loss,lr,grad_norm\n" + "\n".join(rows) + "\n")
    return path


def test_read_curve_keeps_finite_rows_in_order(tmp_path: Path) -> None:
    csv = write_csv(
        tmp_path / "loss.csv", ["10,0.9,0.001,1.0", "20,nan,0.001,1.0", "30,,0.001,", "40,0.5,0.0005,0.8"]
    )
    assert read_curve(csv) == ([10, 40], [0.9, 0.5])
    assert read_curve(csv, "lr") == ([10, 20, 30, 40], [0.001, 0.001, 0.001, 0.0005])


def test_smooth_is_a_trailing_mean() -> None:
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([2.0], 5) == [2.0]


def test_plot_writes_a_png_whose_pixels_depend_on_the_curve(tmp_path: Path) -> None:
    falling = write_csv(tmp_path / "a.csv", [f"{s},{1.0 / s},0.001,1.0" for s in range(1, 41)])
    rising = write_csv(tmp_path / "b.csv", [f"{s},{0.1 * s},0.001,1.0" for s in range(1, 41)])
    a = plot_loss_curve(falling, tmp_path / "out" / "a.png", "stage1")
    b = plot_loss_curve(rising, tmp_path / "out" / "b.png", "stage1")
    ia, ib = Image.open(a), Image.open(b)
    assert ia.format == "PNG" and ia.size == (640, 420)
    assert ia.tobytes() != ib.tobytes()


def test_an_empty_curve_still_draws_and_a_missing_csv_fails(tmp_path: Path) -> None:
    empty = write_csv(tmp_path / "e.csv", [])
    assert plot_loss_curve(empty, tmp_path / "e.png", "empty").is_file()
    with pytest.raises(FileNotFoundError):
        plot_loss_curve(tmp_path / "missing.csv", tmp_path / "m.png", "missing")
