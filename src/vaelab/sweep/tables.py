"""Plain-text, Markdown and CSV tables of a sweep's jobs: NaN is a blank cell, floats have two decimals."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any


def cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return str(int(value)) if value.is_integer() else f"{value:.2f}"  # best_epoch is a whole number
    return str(value)


def mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def line(cells: list[Any]) -> str:
        return "| " + " | ".join(cell(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]) + "\n"


def text_table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header, *([cell(c) for c in row] for row in rows)]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if isinstance(c, float) and math.isnan(c) else c for c in row] for row in rows])
    return path
