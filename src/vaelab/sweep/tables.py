"""Plain-text, Markdown and CSV tables of a sweep's jobs: NaN is a blank cell, floats have two decimals."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd


def cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return str(int(value)) if value.is_integer() else f"{value:.2f}"  # best_epoch is a whole number
    return str(value)


def is_number(value: Any) -> bool:
    """Does a metric's cell hold a value (not blank: never logged, or the job did not finish)?"""
    return isinstance(value, (int, float)) and math.isfinite(value)


def mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def with_standard_errors(table: pd.DataFrame) -> pd.DataFrame:
    """The table to read: each metric that has a `<metric>_se` column as one `value ± se` column in its place (the CSV
    keeps them apart, to compute with)."""
    paired = [c for c in table.columns if f"{c}_se" in table.columns]
    if not paired:
        return table
    table = table.copy()
    for column in paired:
        table[column] = [mean_std(v, se) for v, se in zip(table[column], table[f"{column}_se"], strict=True)]
    return table.drop(columns=[f"{c}_se" for c in paired])


def markdown_table(table: pd.DataFrame) -> str:
    # The cells are formatted here; tabulate would otherwise re-read them as numbers and drop the trailing zeros.
    cells = table.map(lambda value: cell(value).replace("|", "\\|"))
    return cells.to_markdown(index=False, disable_numparse=True) + "\n"


def text_table(table: pd.DataFrame) -> str:
    return table.map(cell).to_markdown(index=False, tablefmt="plain", disable_numparse=True)


def write_csv(path: Path, table: pd.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False, lineterminator="\r\n")  # the csv module's line ending, as the files always had
    return path
