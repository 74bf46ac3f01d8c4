"""Pictures a person would rather look at than read: reconstructions, prior samples, training curves."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

from vaelab.charts import few_ticks, save_figure, with_margins

MIN_SIDE = 28  # upscale tiny images (8x8 digits) so a grid is readable


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> Path:
    """Save [N, C, H, W] images in [0, 1] as one PNG grid."""
    images = images.detach().float().cpu()
    if images.shape[-1] < MIN_SIDE:
        images = F.interpolate(images, scale_factor=MIN_SIDE // images.shape[-1], mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (tile(images, nrow) * 255 + 0.5).clamp(0, 255).to(torch.uint8)  # [C, H', W']
    Image.fromarray(pixels[0].numpy() if len(pixels) == 1 else pixels.permute(1, 2, 0).numpy()).save(
        path, compress_level=1
    )
    return path


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


def reconstruction_grid(vae, x: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Rows alternate: `nrow` inputs, then their reconstructions E[x | z = posterior mean]. Fewer than `nrow`
    images (a tiny validation split) make one row of each."""
    nrow = min(nrow, len(x))
    recon = vae.reconstruct(x).to(x.dtype)
    n = (len(x) // nrow) * nrow
    pairs = torch.stack([x[:n].unflatten(0, (-1, nrow)), recon[:n].unflatten(0, (-1, nrow))], dim=1)
    return pairs.flatten(0, 2)  # [rows, 2, nrow, C, H, W] -> [2n, C, H, W]


def save_reconstructions(vae, x: torch.Tensor, path: Path, nrow: int = 8) -> Path:
    return save_grid(reconstruction_grid(vae, x, nrow), path, min(nrow, len(x)))


def save_prior_samples(vae, path: Path, n: int = 64, seed: int = 0) -> Path:
    """E[x|z] for z ~ N(0, I), with a fixed seed so grids of different runs are comparable."""
    return save_grid(vae.sample(n, generator=torch.Generator().manual_seed(seed)), path, nrow=8)


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


def save_kl_per_dim(kl_per_dim: list[float], path: Path) -> Path:
    """Bar chart of KL(q(z_d|x) || p(z_d)) per latent dimension, averaged over images, in nats."""
    fig = with_margins(Figure(figsize=(max(4.0, 0.25 * len(kl_per_dim) + 1.5), 3.0)))
    ax = fig.subplots()
    ax.bar(range(len(kl_per_dim)), kl_per_dim, color="tab:blue")
    few_ticks(ax, integer_x=True, x_bins=10)
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("KL (nats)")
    ax.set_title("KL per latent dimension (test)", fontsize=10)
    return save_figure(fig, path, tight=False)


@torch.no_grad()
def traversal_grid(vae, x: torch.Tensor, kl_per_dim: list[float], dims: int = 8, steps: int = 9, span: float = 3.0):
    """One row per latent dimension of the code (the `dims` with the largest KL): decode the posterior mean of image
    `x` [1, C, H, W] with that one coordinate swept over [-span, span] prior standard deviations."""
    order = sorted(range(vae.code_dim), key=lambda d: -kl_per_dim[d])[:dims]
    mean = vae.code(x)  # [1, D]
    values = torch.linspace(-span, span, steps, device=mean.device)
    z = mean.repeat(len(order) * steps, 1)  # [rows * steps, D]
    for row, d in enumerate(order):
        z[row * steps : (row + 1) * steps, d] = values
    return vae.likelihood.mean(vae.decoder(z)), steps


@torch.no_grad()
def interpolation_grid(vae, x_from: torch.Tensor, x_to: torch.Tensor, steps: int = 10):
    """One row per pair: decode straight lines between the posterior means of x_from[i] and x_to[i]."""
    start = vae.code(x_from)  # [n, D]
    end = vae.code(x_to)
    t = torch.linspace(0, 1, steps, device=start.device)[None, :, None]  # [1, steps, 1]
    z = (1 - t) * start[:, None] + t * end[:, None]  # [n, steps, D]
    return vae.likelihood.mean(vae.decoder(z.flatten(0, 1))), steps


def latent_projection(means: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The latents themselves when at most 2-D, otherwise their first two principal components (padded with zeros
    when the images are too few to have two)."""
    if means.shape[1] <= 2:
        return means, "z"
    centred = means - means.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ v[:2].T
    return F.pad(projected, (0, 2 - projected.shape[1])), "PCA of z"


def save_latent_scatter(means: torch.Tensor, labels: torch.Tensor, path: Path) -> Path:
    """Posterior means in 2-D, coloured by class label: the learned manifold at a glance. A 1-D latent is drawn
    against the label, a strip per class."""
    points, axis = latent_projection(means.detach().float().cpu())
    labels = labels.cpu()
    fig = with_margins(Figure(figsize=(5.8, 4.6)), right=0.75)
    ax = fig.subplots()
    if points.shape[1] == 2:
        x, y, y_label = points[:, 0], points[:, 1], f"{axis} 2"
    else:
        x, y, y_label = points[:, 0], labels, "label"
    scatter = ax.scatter(x, y, c=labels, cmap="tab10", s=3, alpha=0.6)
    few_ticks(ax)
    # Beside the axes: loc="best" would test every position against thousands of points.
    # Plain labels: the default ones are mathtext, which matplotlib parses afresh for every figure.
    handles, names = scatter.legend_elements(fmt="{x:.0f}")
    ax.legend(handles, names, title="label", fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel(f"{axis} 1")
    ax.set_ylabel(y_label)
    ax.set_title(f"posterior means E[z|x] ({axis})", fontsize=10)
    return save_figure(fig, path, tight=False)


@torch.no_grad()
def save_figures(
    vae, images: torch.Tensor, labels: torch.Tensor, kl_per_dim: list[float], folder: Path, seed: int = 0
) -> list[Path]:
    """Every picture of a trained model on held-out `images` (already in the likelihood's representation)."""
    device = next(vae.parameters()).device
    x = images[:64].to(device)
    means = vae.code(images[:5000].to(device))
    traversals, steps = traversal_grid(vae, x[:1], kl_per_dim)
    paths = [
        save_reconstructions(vae, x[:32], folder / "reconstructions.png"),
        save_prior_samples(vae, folder / "samples.png", seed=seed),
        save_grid(traversals, folder / "traversals.png", nrow=steps),
    ]
    # Pairs of distinct images; a single image is interpolated with itself rather than leaving the figure out.
    pairs = max(1, min(8, len(x) // 2))
    ends = x[pairs : 2 * pairs] if len(x) >= 2 * pairs else x[:pairs]
    interpolations, steps = interpolation_grid(vae, x[:pairs], ends)
    paths.append(save_grid(interpolations, folder / "interpolations.png", nrow=steps))
    paths.append(save_latent_scatter(means, labels[:5000], folder / "latent_scatter.png"))
    paths.append(save_kl_per_dim(kl_per_dim, folder / "kl_per_dim.png"))
    return paths
