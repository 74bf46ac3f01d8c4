"""The sweep's plots: val/elbo against each swept value, rate against distortion when β was swept, and the test
inference gap split into approximation and amortization when the jobs were evaluated with eval.gaps."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaelab.sweep.runs import GAP_SPLIT, SELECTION
from vaelab.sweep.tables import is_number

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def axis_values(values: list[str]) -> tuple[list[float], list[str], bool]:
    """Plot positions for an axis's values: the numbers themselves if all are numeric, else category indices."""
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        categories = sorted(set(values))
        return [float(categories.index(v)) for v in values], categories, False
    return numbers, [], True


def plot_metric_by_axis(rows: list[dict[str, Any]], axes: list[str], path: Path) -> list[Path]:
    """val/elbo of every finished job against each swept value, with the mean over the other axes as a line."""
    done = [row for row in rows if row["status"] == "FINISHED" and math.isfinite(row[SELECTION])]
    if not done or not axes:
        return []
    from matplotlib.figure import Figure

    from vaelab.charts import save_figure

    fig = Figure(figsize=(3.6 * len(axes), 3.4))
    panels = fig.subplots(1, len(axes), sharey=True, squeeze=False)
    for axis, panel in zip(axes, panels[0], strict=True):
        x, categories, numeric = axis_values([row["overrides"].get(axis, "") for row in done])
        y = [row[SELECTION] for row in done]
        panel.scatter(x, y, alpha=0.7)
        means = sorted({xi: statistics.fmean(yi for xj, yi in zip(x, y, strict=True) if xj == xi) for xi in x}.items())
        panel.plot([m[0] for m in means], [m[1] for m in means], color="black", lw=1, label="mean")
        if numeric and min(x) > 0 and max(x) / min(x) >= 8:
            panel.set_xscale("log", base=2)
        if categories:
            panel.set_xticks(range(len(categories)), categories)
        else:
            panel.set_xticks(sorted(set(x)), [f"{v:g}" for v in sorted(set(x))])
            panel.minorticks_off()
        panel.set_xlabel(axis)
    panels[0][0].set_ylabel(f"{SELECTION} (nats, higher is better)")
    panels[0][0].legend()
    return [save_figure(fig, path)]


def swept_values(overrides: dict[str, str], axes: list[str]) -> str:
    """A job's swept values, one `key=value` a line (β for objective.beta): what tells its point from the others."""
    return "\n".join(f"{'β' if axis == 'objective.beta' else axis}={overrides.get(axis, '')}" for axis in axes)


def rate_distortion_figure(rows: list[dict[str, Any]], axes: list[str]) -> Figure | None:
    """Rate (val/kl) against distortion (val/rec) in nats, one point per finished job, coloured by β and labelled
    by every swept value in `axes`; None when no job finished.

    Each dashed line is one ELBO value: -elbo = rate + distortion, so moving along it trades one for the other.
    """
    done = [row for row in rows if row["status"] == "FINISHED" and math.isfinite(row["val/kl"])]
    if not done:
        return None
    from matplotlib.figure import Figure

    rate = [row["val/kl"] for row in done]
    distortion = [row["val/rec"] for row in done]
    beta = [float(row["overrides"].get("objective.beta", "nan")) for row in done]
    fig = Figure(figsize=(6.5, 5.0))
    ax = fig.subplots()
    points = ax.scatter(rate, distortion, c=beta, cmap="viridis", zorder=3)
    fig.colorbar(points, ax=ax, label="β")
    for r, d, row in zip(rate, distortion, done, strict=True):
        label = swept_values(row["overrides"], axes or ["objective.beta"])
        right_half = r > max(rate) * 0.6  # its label to the left, where the colour bar leaves no room to the right
        ax.annotate(
            label,
            (r, d),
            textcoords="offset points",
            xytext=(-4 if right_half else 4, 4),
            ha="right" if right_half else "left",
            multialignment="right" if right_half else "left",
            va="bottom",
            fontsize=7,
        )
    totals = [r + d for r, d in zip(rate, distortion, strict=True)]
    for total in {min(totals), max(totals)}:
        ax.plot([0, total], [total, 0], ls="--", lw=0.8, color="grey")
    ax.set_xlim(0, max(rate) * 1.15 + 1e-9)
    ax.set_ylim(min(distortion) * 0.95, max(distortion) * 1.05)
    ax.set_xlabel("rate: val/kl (nats)")
    ax.set_ylabel("distortion: val/rec (nats)")
    ax.set_title("Rate–distortion of each job (dashed: constant ELBO)")
    return fig


def plot_rate_distortion(rows: list[dict[str, Any]], axes: list[str], path: Path) -> list[Path]:
    """`rate_distortion_figure` as a PNG; nothing when no job finished."""
    figure = rate_distortion_figure(rows, axes)
    if figure is None:
        return []
    from vaelab.charts import save_figure

    return [save_figure(figure, path)]


def plot_gap_split(rows: list[dict[str, Any]], axes: list[str], path: Path) -> list[Path]:
    """One stacked bar per finished job that logged both gaps (approximation + amortization, with their standard
    errors), labelled by its swept values; nothing when no job did."""
    done = [row for row in rows if row["status"] == "FINISHED" and all(is_number(row.get(m)) for m in GAP_SPLIT)]
    if not done:
        return []
    from vaelab.charts import save_gap_split

    approximation, amortization = GAP_SPLIT
    labels = [
        "\n".join(f"{axis}={row['overrides'].get(axis, '')}" for axis in axes) or f"job {row['job']}" for row in done
    ]

    def values(metric: str) -> list[float]:
        return [float(row[metric]) if is_number(row.get(metric)) else math.nan for row in done]  # NaN: no error bar

    return [
        save_gap_split(
            labels,
            values(approximation),
            values(f"{approximation}_se"),
            values(amortization),
            values(f"{amortization}_se"),
            path,
        )
    ]
