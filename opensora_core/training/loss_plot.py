"""The loss curve of a training stage as a PNG, drawn from its loss CSV (the ``dvc plots`` data).

Drawn from the CSV rather than from the trainer's memory, so a resumed run's picture shows the
whole curve, steps before the interruption included.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path


def read_curve(csv_path: Path, column: str = "loss") -> tuple[list[int], list[float]]:
    """The (steps, values) of ``column`` in a loss CSV; rows with an empty or non-finite value are left out."""
    steps, values = [], []
    with Path(csv_path).open(newline="") as fh:
        for row in csv.DictReader(fh):
            raw = row.get(column, "")
            if raw in ("", None):
                continue
            value = float(raw)
            if math.isfinite(value):
                steps.append(int(float(row["step"])))
                values.append(value)
    return steps, values


def smooth(values: list[float], window: int) -> list[float]:
    """The trailing mean over ``window`` points (a shorter window at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curve(csv_path: Path, png_path: Path, title: str) -> Path:
    """Draw the loss (and the learning rate, when the CSV has it) against the step; returns the PNG.

    The loss axis is logarithmic when every value is positive; a trailing mean over a tenth of the
    points is drawn over the raw values.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, loss = read_curve(csv_path)
    lr_steps, lr = read_curve(csv_path, "lr")
    fig, axes = plt.subplots(2, 1, figsize=(6.4, 4.2), sharex=True, height_ratios=[3, 1])
    axes[0].plot(steps, loss, color="tab:blue", alpha=0.35, linewidth=1, label="loss")
    if loss:
        window = max(1, len(loss) // 10)
        axes[0].plot(steps, smooth(loss, window), color="tab:blue", linewidth=2, label=f"mean of {window}")
    if loss and min(loss) > 0:
        axes[0].set_yscale("log")
    axes[0].set(ylabel="loss", title=title)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].plot(lr_steps, lr, color="tab:orange")
    axes[1].set(xlabel="step", ylabel="lr")
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return png_path
