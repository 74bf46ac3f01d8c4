"""Charts drawn with matplotlib alone (no torch): saving a figure, fixed margins, sparse ticks, and the inference
gap split. A sweep's or a search's parent process draws its summary plots with these, and imports no torch for it."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# Every run draws its figures, every job of a sweep included. Margins fixed in inches cost nothing, where
# tight_layout measures every label first: about half of a small figure's drawing time (benchmarks/README.md).
MARGINS_INCHES = {"left": 0.8, "right": 0.15, "bottom": 0.5, "top": 0.35}


def with_margins(fig: Figure, wspace: float = 0.25, **inches: float) -> Figure:
    """`fig` with MARGINS_INCHES (or `inches` in their place) around its axes, whatever its size."""
    width, height = fig.get_size_inches()
    margins = {**MARGINS_INCHES, **inches}
    fig.subplots_adjust(
        left=margins["left"] / width,
        right=1 - margins["right"] / width,
        bottom=margins["bottom"] / height,
        top=1 - margins["top"] / height,
        wspace=wspace,
    )
    return fig


def few_ticks(ax, integer_x: bool = False, x_bins: int = 5) -> None:
    """At most about five ticks an axis: every tick label is text drawn afresh, the costliest part of a small
    figure. `integer_x`: whole numbers only on x (epochs, latent dimensions)."""
    ax.xaxis.set_major_locator(MaxNLocator(x_bins, integer=integer_x))
    ax.yaxis.set_major_locator(MaxNLocator(5))


def save_figure(fig: Figure, path: Path, tight: bool = True) -> Path:
    """Write a matplotlib figure as PNG; `tight`: fit its margins to its labels first (else they are as set)."""
    if tight:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # zlib's fastest level: a third of the encoding time of PIL's default, for files a little larger
    fig.savefig(path, dpi=110, pil_kwargs={"compress_level": 1})
    return path


def gap_split_figure(
    labels: list[str],
    approximation: list[float],
    approximation_se: list[float],
    amortization: list[float],
    amortization_se: list[float],
) -> Figure:
    """One stacked bar per label: the inference gap split in two, in nats per image. At the bottom the approximation
    gap (log p(x) minus the ELBO of the best q(z|x) in the family), on top the amortization gap (that ELBO minus the
    encoder's), so a bar's height is the whole inference gap. Each part's error bar is its standard error."""
    widest = max((len(line) for label in labels for line in label.splitlines()), default=0)
    fig = Figure(figsize=(max(4.0, max(0.8, 0.065 * widest) * len(labels) + 1.5), 4.2))
    ax = fig.subplots()
    positions = range(len(labels))
    ax.bar(positions, approximation, yerr=approximation_se, capsize=3, color="tab:blue", label="approximation gap")
    ax.bar(
        positions,
        amortization,
        bottom=approximation,
        yerr=amortization_se,
        capsize=3,
        color="tab:orange",
        label="amortization gap",
    )
    ax.set_xticks(positions, labels, fontsize=8)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("nats per image (lower is better)")
    ax.set_title("Inference gap = approximation + amortization (test)", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def save_gap_split(
    labels: list[str],
    approximation: list[float],
    approximation_se: list[float],
    amortization: list[float],
    amortization_se: list[float],
    path: Path,
) -> Path:
    """The gap split of each labelled run (a sweep's jobs, or one run) as a PNG: see `gap_split_figure`."""
    figure = gap_split_figure(labels, approximation, approximation_se, amortization, amortization_se)
    return save_figure(figure, path)
