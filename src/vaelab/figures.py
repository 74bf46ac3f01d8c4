"""Pictures a person would rather look at than read: reconstructions, prior samples, training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

MIN_SIDE = 28  # upscale tiny images (8x8 digits) so a grid is readable


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> Path:
    """Save [N, C, H, W] images in [0, 1] as one PNG grid."""
    images = images.detach().float().cpu()
    if images.shape[-1] < MIN_SIDE:
        images = F.interpolate(images, scale_factor=MIN_SIDE // images.shape[-1], mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=nrow, padding=2, pad_value=1.0)
    return path


def reconstruction_grid(vae, x: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Rows alternate: `nrow` inputs, then their reconstructions E[x | z = posterior mean]."""
    recon = vae.reconstruct(x).to(x.dtype)
    n = (len(x) // nrow) * nrow
    pairs = torch.stack([x[:n].unflatten(0, (-1, nrow)), recon[:n].unflatten(0, (-1, nrow))], dim=1)
    return pairs.flatten(0, 2)  # [rows, 2, nrow, C, H, W] -> [2n, C, H, W]


def save_reconstructions(vae, x: torch.Tensor, path: Path, nrow: int = 8) -> Path:
    return save_grid(reconstruction_grid(vae, x, nrow), path, nrow)


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
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (name, title) in zip(axes, panels, strict=True):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [row.get(f"{split}/{name}") for row in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, style, markersize=3, label=split)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_kl_per_dim(kl_per_dim: list[float], path: Path) -> Path:
    """Bar chart of KL(q(z_d|x) || p(z_d)) per latent dimension, averaged over images, in nats."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * len(kl_per_dim) + 1.5), 3.0))
    ax.bar(range(len(kl_per_dim)), kl_per_dim, color="tab:blue")
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("KL (nats)")
    ax.set_title("KL per latent dimension (test)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
