"""What a top-level training run publishes for DVC: models/latest/ (a real copy of the best checkpoint, its config and
run id), metrics/train.json and the per-epoch curve in plots/train/. Sweep jobs and search trials publish nothing."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

from vaelab import paths
from vaelab.files import replacing_dir, write_json_atomic, write_text_atomic

CURVE_COLUMNS = (
    "epoch",
    "train/elbo",
    "val/elbo",
    "train/rec",
    "val/rec",
    "train/kl",
    "val/kl",
    "train/loss",
)


def publish(best: Path, run_id: str, config_file: Path, summary: dict, rows: list[dict[str, float]]) -> None:
    """models/latest/, metrics/train.json and plots/train/curve.csv for this run."""
    publish_latest(best, run_id, config_file)
    write_json_atomic(paths.metrics_dir() / "train.json", summary)
    write_curve(rows, paths.plots_dir() / "train" / "curve.csv")


def publish_latest(checkpoint: Path, run_id: str, config_file: Path) -> Path:
    """Make models/latest/ a real copy (not a link) of this run's best checkpoint: DVC tracks it."""
    target = paths.latest_model_dir()
    with replacing_dir(target) as fresh:
        shutil.copy2(checkpoint, fresh / paths.PUBLISHED_MODEL)
        shutil.copy2(config_file, fresh / paths.RUN_CONFIG)
        (fresh / paths.RUN_ID_FILE).write_text(run_id + "\n")
    return target


def write_curve(rows: list[dict[str, float]], path: Path) -> None:
    """Per-epoch curve as CSV for `dvc plots` (column names without '/'); written whole, so two runs publishing at once
    leave one run's curve, not lines of both."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow([c.replace("/", "_") for c in CURVE_COLUMNS])
    for row in rows:
        writer.writerow([row.get(c, "") for c in CURVE_COLUMNS])
    write_text_atomic(path, text.getvalue())
