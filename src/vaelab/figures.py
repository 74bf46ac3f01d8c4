"""Pictures a person would rather look at than read: reconstructions, prior samples, traversals, interpolations,
the latent space and training curves, each titled and labelled so that it reads without the code."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import offset_copy

from vaelab.charts import few_ticks, save_figure, with_margins

MIN_SIDE = 28  # upscale tiny images (8x8 digits) so that the white frame between cells stays thin beside them
CELL_INCHES = 0.85  # one image of a grid: about 94 px at save_figure's 110 dpi, readable in the MLflow UI
GRID_INCHES = 10.0  # the widest a grid gets: many columns share it
MIN_WIDTH_INCHES = 8.0  # room for the title even when a tiny split gives a grid of one image
SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}


def split_name(split: str) -> str:
    return SPLIT_NAMES.get(split, split)


def tile(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """[N, C, H, W] images as one [C, H', W'] grid, `nrow` to a row (fewer when there are fewer images), with
    `padding` pixels of `pad_value` around each. Written here, not taken from torchvision: importing torchvision
    imports torch's compiler, seconds of start-up for every process that draws a figure."""
    n, channels, height, width = images.shape
    columns = max(1, min(nrow, n))
    rows = -(-n // columns)
    grid = torch.full((channels, rows * (height + padding) + padding, columns * (width + padding) + padding), pad_value)
    for i, image in enumerate(images):
        top, left = (i // columns) * (height + padding) + padding, (i % columns) * (width + padding) + padding
        grid[:, top : top + height, left : left + width] = image
    return grid


def grid_figure(
    images: torch.Tensor,
    nrow: int,
    title: str,
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
    xlabel: str = "",
    padding: int = 2,
) -> Figure:
    """[N, C, H, W] images in [0, 1], `nrow` to a row, as one picture under `title`, with a label left of each row
    and under each column when given. Drawn as one picture and a few dozen texts, whatever the number of images."""
    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape[-1] < MIN_SIDE:
        images = F.interpolate(images, scale_factor=MIN_SIDE // images.shape[-1], mode="nearest")
    n, channels, height, width = images.shape
    columns = max(1, min(nrow, n))
    grid = tile(images, columns, padding)  # [C, H', W']
    cell = min(CELL_INCHES, GRID_INCHES / columns)
    grid_width = cell * columns
    grid_height = grid_width * grid.shape[1] / grid.shape[2]
    left = 0.25 + 0.075 * max((len(label) for label in row_labels), default=0)  # about 0.075 in a character at 9 pt
    top = 0.25 + 0.22 * (title.count("\n") + 1)
    bottom = 0.15 + 0.3 * bool(column_labels) + 0.25 * bool(xlabel)
    fig_width = max(MIN_WIDTH_INCHES, left + grid_width + 0.25)
    left += (fig_width - (left + grid_width + 0.25)) / 2  # a narrow grid and its labels in the middle, under the title
    fig_height = top + grid_height + bottom
    fig = Figure(figsize=(fig_width, fig_height))
    ax = fig.add_axes((left / fig_width, bottom / fig_height, grid_width / fig_width, grid_height / fig_height))
    pixels = grid[0] if channels == 1 else grid.permute(1, 2, 0)
    ax.imshow(pixels.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    # Labels as plain texts beside the picture: a tick would make two lines and a grid line for each of them.
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(xlabel, fontsize=9, labelpad=16 if column_labels else 4)
    for spine in ax.spines.values():
        spine.set_visible(False)
    centre = lambda i, side: padding + i * (side + padding) + side / 2  # noqa: E731
    left_of = offset_copy(ax.transData, fig=fig, x=-6, units="points")
    below = offset_copy(ax.transData, fig=fig, y=-4, units="points")
    for i, label in enumerate(row_labels):
        ax.text(0, centre(i, height), label, transform=left_of, ha="right", va="center", fontsize=9)
    for i, label in enumerate(column_labels):
        ax.text(centre(i, width), grid.shape[1], label, transform=below, ha="center", va="top", fontsize=8)
    fig.suptitle(title, x=0.5, y=1 - 0.12 / fig_height, va="top", fontsize=11)
    return fig


def reconstruction_grid(vae, x: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Rows alternate: `nrow` inputs, then their reconstructions E[x | z = posterior mean]. Fewer than `nrow`
    images (a tiny validation split) make one row of each."""
    nrow = min(nrow, len(x))
    recon = vae.reconstruct(x).to(x.dtype)
    n = (len(x) // nrow) * nrow
    pairs = torch.stack([x[:n].unflatten(0, (-1, nrow)), recon[:n].unflatten(0, (-1, nrow))], dim=1)
    return pairs.flatten(0, 2)  # [rows, 2, nrow, C, H, W] -> [2n, C, H, W]


def reconstruction_figure(vae, x: torch.Tensor, split: str, nrow: int = 8) -> Figure:
    """Images `x` [N, C, H, W] of `split`, each row of inputs above the row of their reconstructions."""
    nrow = min(nrow, len(x))
    grid = reconstruction_grid(vae, x, nrow)
    pairs = len(grid) // (2 * nrow)
    inputs = [f"#{row * nrow}" + (f"–{(row + 1) * nrow - 1}" if nrow > 1 else "") for row in range(pairs)]
    labels = [label for images in inputs for label in (f"input {images}", "reconstruction")]
    title = (
        f"Reconstructions of {split_name(split)} images:\n"
        "each row of inputs above their reconstructions E[x | z = E[z|x]]"
    )
    return grid_figure(grid, nrow, title, row_labels=labels)


def samples_figure(vae, n: int = 64, seed: int = 0) -> Figure:
    """E[x|z] for z ~ p(z), with a fixed seed so that grids of different runs are comparable."""
    images = vae.sample(n, generator=torch.Generator().manual_seed(seed))
    return grid_figure(images, 8, f"Samples from the prior: E[x|z] for {n} draws z ~ p(z) (seed {seed})")


@torch.no_grad()
def traversal_grid(vae, x: torch.Tensor, kl_per_dim: list[float], dims: int = 8, steps: int = 9, span: float = 3.0):
    """One row per latent dimension of the code (the `dims` with the largest KL): decode the posterior mean of image
    `x` [1, C, H, W] with that one coordinate set to each of `steps` values in [-span, span] (prior standard
    deviations of a standard normal prior). Returns the images [rows * steps, C, H, W], the dimensions (row order)
    and the values."""
    order = sorted(range(vae.code_dim), key=lambda d: -kl_per_dim[d])[:dims]
    mean = vae.code(x)  # [1, D]
    values = torch.linspace(-span, span, steps, device=mean.device)
    z = mean.repeat(len(order) * steps, 1)  # [rows * steps, D]
    for row, d in enumerate(order):
        z[row * steps : (row + 1) * steps, d] = values
    return vae.likelihood.mean(vae.decoder(z)), order, values.tolist()


def traversal_figure(vae, x: torch.Tensor, kl_per_dim: list[float], split: str) -> Figure:
    """Traversals of image `x` [1, C, H, W] of `split`: each row sets one latent coordinate, labelled with its
    KL in nats, to the values under the columns."""
    images, order, values = traversal_grid(vae, x, kl_per_dim)
    title = (
        f"Latent traversals of one {split_name(split)} image: each row sets one coordinate z[d] to the values below,\n"
        f"the others at E[z|x]; rows in order of KL, the largest first"
    )
    return grid_figure(
        images,
        len(values),
        title,
        row_labels=[f"z[{d}], KL {kl_per_dim[d]:.2f} nats" for d in order],
        column_labels=[f"{v:g}" for v in values],
        xlabel=f"value of z[d], from {values[0]:g} to {values[-1]:g}",
    )


@torch.no_grad()
def interpolation_grid(vae, x_from: torch.Tensor, x_to: torch.Tensor, steps: int = 10):
    """One row per pair: decode straight lines between the posterior means of x_from[i] and x_to[i]."""
    start = vae.code(x_from)  # [n, D]
    end = vae.code(x_to)
    t = torch.linspace(0, 1, steps, device=start.device)[None, :, None]  # [1, steps, 1]
    z = (1 - t) * start[:, None] + t * end[:, None]  # [n, steps, D]
    return vae.likelihood.mean(vae.decoder(z.flatten(0, 1))), steps


def interpolation_figure(
    vae, x_from: torch.Tensor, x_to: torch.Tensor, ends: Sequence[tuple[str, str]], split: str, steps: int = 10
) -> Figure:
    """One row per pair of `split` images: input x_from[i], the decoded straight line from its posterior mean to
    x_to[i]'s, then input x_to[i]; `ends` names each row's two images."""
    decoded, steps = interpolation_grid(vae, x_from, x_to, steps)
    rows = torch.cat([x_from[:, None], decoded.to(x_from.dtype).unflatten(0, (len(x_from), steps)), x_to[:, None]], 1)
    t = [i / (steps - 1) for i in range(steps)] if steps > 1 else [0.0]
    title = (
        f"Interpolations between pairs of {split_name(split)} images A → B: A, then E[x|z] along\n"
        "z = (1 − t)·E[z|A] + t·E[z|B] for t from 0 to 1, then B"
    )
    return grid_figure(
        rows.flatten(0, 1),
        steps + 2,
        title,
        row_labels=[f"{a} → {b}" for a, b in ends],
        column_labels=["A", *(f"{v:.2g}" for v in t), "B"],
        xlabel="t",
    )


def save_training_curves(history: list[dict[str, float]], path: Path) -> Path:
    """ELBO, reconstruction and KL per epoch, train and val, in nats per image."""
    epochs = [row["epoch"] for row in history]
    panels = [
        ("elbo", "ELBO (nats/image, higher is better)"),
        ("rec", "reconstruction -E log p(x|z)"),
        ("kl", "KL(q||p)"),
    ]
    fig = with_margins(Figure(figsize=(4.2 * len(panels), 3.4)))
    axes = fig.subplots(1, len(panels))
    for ax, (name, title) in zip(axes, panels, strict=True):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [row.get(f"{split}/{name}") for row in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, style, markersize=3, label=split)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        few_ticks(ax, integer_x=True)
        ax.grid(alpha=0.3)
    drawn = [ax for ax in axes if ax.lines]
    if drawn:  # every panel draws train and val alike: one legend says which is which
        drawn[0].legend()
    return save_figure(fig, path, tight=False)


def kl_per_dim_figure(kl_per_dim: list[float], split: str) -> Figure:
    """Bar chart of KL(q(z_d|x) || p(z_d)) per latent dimension, averaged over images of `split`, in nats."""
    fig = with_margins(Figure(figsize=(max(4.0, 0.25 * len(kl_per_dim) + 1.5), 3.0)))
    ax = fig.subplots()
    ax.bar(range(len(kl_per_dim)), kl_per_dim, color="tab:blue")
    few_ticks(ax, integer_x=True, x_bins=10)
    ax.set_xlabel("latent dimension d")
    ax.set_ylabel("KL (nats)")
    ax.set_title(f"KL per latent dimension ({split_name(split)} images)", fontsize=10)
    return fig


def latent_projection(means: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The latents themselves when at most 2-D, otherwise their first two principal components (padded with zeros
    when the images are too few to have two)."""
    if means.shape[1] <= 2:
        return means, "z"
    centred = means - means.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ v[:2].T
    return F.pad(projected, (0, 2 - projected.shape[1])), "PCA of z"


def latent_scatter_figure(
    means: torch.Tensor, labels: torch.Tensor, split: str, class_names: Sequence[str] | None = None
) -> Figure:
    """Posterior means [N, D] of `split` images in 2-D, coloured by class label (named by `class_names` where the
    dataset has names, by the label itself otherwise): the learned manifold at a glance. A 1-D latent is drawn
    against the label, a strip per class."""
    points, axis = latent_projection(means.detach().float().cpu())
    labels = labels.cpu()
    fig = with_margins(Figure(figsize=(6.4, 4.6)), right=1.75)
    ax = fig.subplots()
    if points.shape[1] == 2:
        x, y, y_label = points[:, 0], points[:, 1], f"{axis} 2"
    else:
        x, y, y_label = points[:, 0], labels, "label"
    scatter = ax.scatter(x, y, c=labels, cmap="tab10", s=3, alpha=0.6)
    few_ticks(ax)
    name = (lambda label: class_names[label]) if class_names else str  # noqa: E731
    handles = [
        Line2D([], [], marker="o", linestyle="", markersize=5, color=scatter.cmap(scatter.norm(label)))
        for label in labels.unique().tolist()
    ]
    # Beside the axes: loc="best" would test every position against thousands of points.
    ax.legend(
        handles,
        [name(label) for label in labels.unique().tolist()],
        title="class" if class_names else "label",
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    ax.set_xlabel(f"{axis} 1")
    ax.set_ylabel(y_label)
    ax.set_title(f"Posterior means E[z|x] of {len(points)} {split_name(split)} images ({axis})", fontsize=10)
    return fig


def image_name(index: int, labels: torch.Tensor, class_names: Sequence[str] | None) -> str:
    """An image of a split by its position, with its class where the classes have names."""
    return f"#{index} {class_names[int(labels[index])]}" if class_names else f"#{index}"


@torch.no_grad()
def draw_figures(
    vae,
    images: torch.Tensor,
    labels: torch.Tensor,
    kl_per_dim: list[float],
    split: str,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Figure]:
    """Every picture of a trained model on images [N, C, H, W] of `split` (already in the likelihood's
    representation), by file name. `kl_per_dim`: KL per latent dimension in nats, from the same split."""
    device = next(vae.parameters()).device
    x = images[:64].to(device)
    means = vae.code(images[:5000].to(device))
    # Pairs of distinct images; a single image is interpolated with itself rather than leaving the figure out.
    pairs = max(1, min(8, len(x) // 2))
    first = pairs if len(x) >= 2 * pairs else 0
    ends = [(image_name(i, labels, class_names), image_name(first + i, labels, class_names)) for i in range(pairs)]
    return {
        "reconstructions.png": reconstruction_figure(vae, x[:32], split),
        "samples.png": samples_figure(vae, seed=seed),
        "traversals.png": traversal_figure(vae, x[:1], kl_per_dim, split),
        "interpolations.png": interpolation_figure(vae, x[:pairs], x[first : first + pairs], ends, split),
        "latent_scatter.png": latent_scatter_figure(means, labels[:5000], split, class_names),
        "kl_per_dim.png": kl_per_dim_figure(kl_per_dim, split),
    }


def save_figures(
    vae,
    images: torch.Tensor,
    labels: torch.Tensor,
    kl_per_dim: list[float],
    folder: Path,
    seed: int = 0,
    *,
    split: str,
    class_names: Sequence[str] | None = None,
) -> list[Path]:
    """`draw_figures` as PNGs in `folder`; `class_names` names labels 0, 1, ... (None: the labels are the names)."""
    figures = draw_figures(vae, images, labels, kl_per_dim, split, class_names, seed)
    return [save_figure(figure, folder / name, tight=False) for name, figure in figures.items()]
