"""Every figure is written, and is a valid PNG large enough to read in the MLflow UI."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from vaelab.figures import draw_figures, save_figures, save_training_curves, tile
from vaelab.model.likelihoods import Bernoulli
from vaelab.model.networks import build_mlp
from vaelab.model.vae import VAE


def test_every_figure_is_a_png_large_enough_to_read(tmp_path: Path):
    torch.manual_seed(0)
    encoder, decoder = build_mlp((1, 8, 8), latent_dim=3, params_per_channel=1, hidden=[16])
    vae = VAE(encoder, decoder, Bernoulli(), latent_dim=3).eval()
    images = torch.bernoulli(torch.rand(100, 1, 8, 8))
    labels = torch.arange(100) % 10
    paths = save_figures(vae, images, labels, kl_per_dim=[0.5, 2.0, 1.0], folder=tmp_path, split="val")
    paths.append(save_training_curves([{"epoch": 0, "train/elbo": -40.0, "val/elbo": -39.0}], tmp_path / "c.png"))

    names = {p.name for p in paths}
    assert names == {
        "reconstructions.png",
        "samples.png",
        "traversals.png",
        "interpolations.png",
        "latent_scatter.png",
        "kl_per_dim.png",
        "c.png",
    }
    grids = {"reconstructions.png", "samples.png", "traversals.png", "interpolations.png"}
    for path in paths:
        with Image.open(path) as picture:
            picture.verify()
        with Image.open(path) as picture:
            assert picture.format == "PNG"
            if path.name in grids:  # 8x8 digits, each drawn about 90 pixels wide
                assert picture.size[0] >= 800 and picture.size[1] >= 300, path.name
            else:
                assert picture.size[0] > 300 and picture.size[1] > 200, path.name


@pytest.mark.parametrize(
    ("n_images", "latent_dim"),
    [(1, 3), (2, 3), (3, 5), (7, 2), (100, 1), (1, 1), (2, 1)],
)
def test_a_handful_of_images_or_a_single_latent_still_draws_every_figure(tmp_path: Path, n_images, latent_dim):
    """A tiny validation split (data.val_size=1, eval.val_limit=1, eval.limit=1) or model.latent_dim=1: each figure
    shows what there is, rather than failing the run after it has trained."""
    torch.manual_seed(0)
    encoder, decoder = build_mlp((1, 8, 8), latent_dim=latent_dim, params_per_channel=1, hidden=[16])
    vae = VAE(encoder, decoder, Bernoulli(), latent_dim=latent_dim).eval()
    images = torch.bernoulli(torch.rand(n_images, 1, 8, 8))
    paths = save_figures(vae, images, torch.arange(n_images) % 10, [1.0] * latent_dim, tmp_path, split="val")

    assert len(paths) == 6
    for path in paths:
        with Image.open(path) as picture:
            picture.verify()
    per_row = min(8, n_images)  # rows of inputs, each above its reconstructions
    figures = draw_figures(vae, images, torch.arange(n_images) % 10, [1.0] * latent_dim, "val")
    assert len(figures["reconstructions.png"].axes[0].texts) == 2 * (min(n_images, 32) // per_row)


def test_a_grid_puts_nrow_images_to_a_row_each_framed_by_two_white_pixels():
    images = torch.linspace(0, 0.8, 5).view(5, 1, 1, 1).expand(5, 1, 3, 3)  # five flat grey squares
    grid = tile(images, nrow=3)

    assert grid.shape == (1, 2 * (3 + 2) + 2, 3 * (3 + 2) + 2)  # two rows of three cells, padding between and around
    cell = lambda row, column: grid[0, 2 + 5 * row : 5 + 5 * row, 2 + 5 * column : 5 + 5 * column]  # noqa: E731
    assert torch.equal(cell(0, 1), images[1, 0]) and torch.equal(cell(1, 0), images[3, 0])
    assert torch.equal(cell(1, 2), torch.ones(3, 3))  # no sixth image: white
    assert torch.equal(grid[0, :2], torch.ones(2, grid.shape[2]))
