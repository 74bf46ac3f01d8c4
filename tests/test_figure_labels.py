"""Every figure says what it shows: titles, row and axis labels and legends, read from matplotlib's objects."""

from __future__ import annotations

import optuna
import pytest
import torch
from matplotlib.figure import Figure

from vaelab.data.sources import FASHION_MNIST_CLASSES, class_names
from vaelab.figures import draw_figures, kl_per_dim_figure, latent_scatter_figure
from vaelab.model.likelihoods import Bernoulli
from vaelab.model.networks import build_mlp
from vaelab.model.vae import VAE
from vaelab.search.report import study_figures
from vaelab.sweep.plots import rate_distortion_figure

FASHION = list(FASHION_MNIST_CLASSES)


def tiny_vae(latent_dim: int = 3) -> VAE:
    torch.manual_seed(0)
    encoder, decoder = build_mlp((1, 8, 8), latent_dim=latent_dim, params_per_channel=1, hidden=[16])
    return VAE(encoder, decoder, Bernoulli(), latent_dim=latent_dim).eval()


@pytest.fixture(scope="module")
def run_figures() -> dict[str, Figure]:
    images = torch.bernoulli(torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    labels = torch.arange(20) % 10
    return draw_figures(tiny_vae(), images, labels, [0.5, 2.0, 1.0], "val", class_names=FASHION)


def title(figure: Figure) -> str:
    return figure._suptitle.get_text() if figure._suptitle else figure.axes[0].get_title()


def texts(figure: Figure) -> list[str]:
    """The labels written beside a grid of images: its rows' first, then its columns'."""
    return [text.get_text() for text in figure.axes[0].texts]


def test_a_reconstruction_grid_names_its_split_and_which_rows_are_inputs_and_which_reconstructions(run_figures):
    figure = run_figures["reconstructions.png"]

    assert "validation images" in title(figure) and "reconstructions" in title(figure)
    assert texts(figure) == ["input #0–7", "reconstruction", "input #8–15", "reconstruction"]


def test_a_traversal_grid_names_each_rows_latent_dimension_its_kl_and_the_values_it_sweeps(run_figures):
    figure = run_figures["traversals.png"]

    assert "traversals of one validation image" in title(figure)
    rows, columns = texts(figure)[:3], texts(figure)[3:]
    assert rows == ["z[1], KL 2.00 nats", "z[2], KL 1.00 nats", "z[0], KL 0.50 nats"]  # the largest KL first
    assert columns[0] == "-3" and columns[-1] == "3" and len(columns) == 9
    assert figure.axes[0].get_xlabel() == "value of z[d], from -3 to 3"


def test_an_interpolation_grid_names_the_two_images_each_row_joins(run_figures):
    figure = run_figures["interpolations.png"]

    assert "Interpolations between pairs of validation images A → B" in title(figure)
    rows = texts(figure)[:8]
    assert rows[0] == "#0 T-shirt/top → #8 Bag" and rows[7] == "#7 Sneaker → #15 Sandal"
    columns = texts(figure)[8:]
    assert columns[0] == "A" and columns[1] == "0" and columns[-2] == "1" and columns[-1] == "B"


def test_the_samples_grid_says_they_come_from_the_prior_and_with_which_seed(run_figures):
    assert title(run_figures["samples.png"]) == "Samples from the prior: E[x|z] for 64 draws z ~ p(z) (seed 0)"


def test_every_image_grid_is_wide_enough_to_read_in_the_mlflow_ui(run_figures):
    for name in ("reconstructions.png", "samples.png", "traversals.png", "interpolations.png"):
        assert run_figures[name].get_size_inches()[0] * 110 >= 800, name  # save_figure's 110 dpi


@pytest.mark.parametrize(("split", "named"), [("val", "validation images"), ("test", "test images")])
def test_the_kl_chart_names_the_split_its_kl_was_measured_on(split: str, named: str):
    ax = kl_per_dim_figure([0.5, 2.0, 1.0], split).axes[0]

    assert ax.get_title() == f"KL per latent dimension ({named})"
    assert ax.get_xlabel() == "latent dimension d" and ax.get_ylabel() == "KL (nats)"


def test_the_latent_scatter_legend_names_the_classes_where_the_dataset_has_names(run_figures):
    legend = run_figures["latent_scatter.png"].axes[0].get_legend()

    assert [text.get_text() for text in legend.get_texts()] == FASHION
    assert legend.get_title().get_text() == "class"
    assert "of 20 validation images" in run_figures["latent_scatter.png"].axes[0].get_title()


def test_the_latent_scatter_legend_shows_the_digits_themselves_where_the_classes_have_no_names():
    means, labels = torch.randn(30, 2), torch.tensor([3, 1, 4] * 10)
    legend = latent_scatter_figure(means, labels, "test").axes[0].get_legend()

    assert [text.get_text() for text in legend.get_texts()] == ["1", "3", "4"]
    assert legend.get_title().get_text() == "label"


def test_class_names_come_from_the_prepared_datasets_manifest():
    assert class_names({"dataset": "fashion_mnist"}) == FASHION
    assert class_names({"dataset": "digits"}) is None and class_names({"dataset": "mnist"}) is None
    folder = {"dataset": "image_folder", "source_details": {"classes": ["cats", "dogs"]}}
    assert class_names(folder) == ["cats", "dogs"]
    assert class_names({"dataset": "image_folder", "source_details": {"classes": []}}) is None


def test_the_rate_distortion_plot_tells_jobs_of_the_same_beta_apart_by_every_swept_value():
    rows = [
        {
            "status": "FINISHED",
            "val/kl": kl,
            "val/rec": rec,
            "overrides": {"objective.beta": "4", "model.latent_dim": d},
        }
        for kl, rec, d in [(8.0, 80.0, "2"), (10.0, 75.0, "8")]
    ]
    ax = rate_distortion_figure(rows, ["objective.beta", "model.latent_dim"]).axes[0]

    assert [text.get_text() for text in ax.texts] == ["β=4\nmodel.latent_dim=2", "β=4\nmodel.latent_dim=8"]


@pytest.fixture(scope="module")
def search_plots() -> dict[str, Figure]:
    """The plots of a small study that maximizes val/elbo, reported after each of three epochs."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("optim.lr", 1e-4, 1e-2, log=True)
        latent_dim = trial.suggest_categorical("model.latent_dim", [2, 8])
        for epoch in range(3):
            trial.report(-100.0 + epoch * lr * 1000 + latent_dim, epoch)
        return -100.0 + 3 * lr * 1000 + latent_dim

    study.optimize(objective, n_trials=5)
    figures = study_figures(study, "val/elbo")
    yield figures
    import matplotlib.pyplot as plt

    for figure in figures.values():
        plt.close(figure)


def whole_numbers(ticks) -> bool:
    return all(float(tick).is_integer() for tick in ticks)


def test_the_optimization_history_names_the_metric_with_its_unit_and_counts_trials_in_whole_numbers(search_plots):
    ax = search_plots["optimization_history"].axes[0]

    assert ax.get_ylabel() == "val/elbo (nats)" and ax.get_xlabel() == "trial"
    assert "Objective Value" not in [text.get_text() for text in ax.get_legend().get_texts()]
    assert whole_numbers(ax.get_xticks())


def test_the_learning_curves_of_a_search_plot_the_metric_against_whole_epochs(search_plots):
    ax = search_plots["intermediate_values"].axes[0]

    assert ax.get_ylabel() == "val/elbo (nats)" and ax.get_xlabel() == "epoch"
    assert "val/elbo" in ax.get_title()
    assert whole_numbers(ax.get_xticks())


def test_the_parallel_coordinates_name_the_metric_slant_their_names_and_draw_every_trials_line(search_plots):
    figure = search_plots["parallel_coordinate"]
    ax = figure.axes[0]
    names = ax.get_xticklabels()

    assert [name.get_text() for name in names] == ["val/elbo (nats)", "model.latent_dim", "optim.lr"]
    assert all(name.get_rotation() != 0 and name.get_horizontalalignment() == "left" for name in names)
    assert figure.get_size_inches()[0] >= 1.7 * len(names)  # room for each name
    lines = ax.collections[0]
    colours = lines.get_cmap()(lines.norm(lines.get_array()))[:, :3]  # [trials, RGB]
    assert colours.mean(axis=1).max() < 0.9  # none fades into the white or grey background
    assert not lines.get_clip_on()  # the lines along the frame are drawn whole


def test_parameter_importances_from_few_trials_say_that_they_are_not_reliable(search_plots):
    ax = search_plots["param_importances"].axes[0]

    assert "from only 5 complete trials: unreliable below about 20" in ax.get_title(loc="left")
    assert "val/elbo" in ax.get_xlabel()
