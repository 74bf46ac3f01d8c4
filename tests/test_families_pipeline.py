"""Every posterior family and every prior works through the whole pipeline: it trains, evaluates, resumes and loads
as the pyfunc model. The regular tier runs each family with the standard prior and each prior with the diagonal
Gaussian and with IAF; the slow tier runs all 12 combinations."""

import math
from pathlib import Path

import numpy as np
import pytest

from helpers.config import TINY, make_config
from helpers.stores import mlflow_client
from vaelab.stages.evaluate import evaluate
from vaelab.stages.train import train

pytestmark = pytest.mark.integration

POSTERIORS = ["diag_gaussian", "full_gaussian", "planar", "iaf"]
PRIORS = ["standard", "mog", "vamp"]
REGULAR = sorted(
    {(posterior, "standard") for posterior in POSTERIORS}
    | {(posterior, prior) for posterior in ("diag_gaussian", "iaf") for prior in PRIORS}
)
OTHERS = [(posterior, prior) for posterior in POSTERIORS for prior in PRIORS if (posterior, prior) not in REGULAR]


def overrides(posterior: str, prior: str) -> list[str]:
    """TINY, two training steps and 50 images to evaluate, with smaller flows and mixtures than the defaults, so
    that a combination takes seconds."""
    small = {
        "planar": ["posterior.steps=2"],
        "iaf": ["posterior.steps=2", "posterior.hidden=[16]", "posterior.context=8"],
        "mog": ["prior.components=3"],
        "vamp": ["prior.components=5"],
    }
    return [
        *TINY,
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "eval.limit=50",
        "eval.val_limit=50",
        f"posterior={posterior}",
        f"prior={prior}",
        *small.get(posterior, []),
        *small.get(prior, []),
    ]


def trains_evaluates_resumes_and_loads(project: Path, posterior: str, prior: str) -> None:
    import mlflow

    cfg = overrides(posterior, prior)
    summary = train(make_config(*cfg))
    run_id = summary["run_id"]
    metrics = evaluate(make_config(*cfg, f"run_id={run_id}"))
    elbo, nll = metrics["test/elbo"], metrics["test/nll_iw"]
    assert math.isfinite(elbo) and math.isfinite(nll)
    assert nll <= -elbo + 3 * metrics["test/elbo_se"]  # the IW bound is above the ELBO
    assert metrics["test/active_units"] >= 0 and math.isfinite(metrics["test/mutual_info"])

    mlflow_client(project).set_terminated(run_id, "KILLED")  # as if stopped while finishing the run
    again = train(make_config(f"resume={run_id}"))  # rebuilds the family and prior from the run's checkpoint
    assert again["run_id"] == run_id
    run = mlflow_client(project).get_run(run_id)
    assert run.info.status == "FINISHED"
    # Which Gaussian stood in for q(z|x) in test/mutual_info, where q(z|x) is not a diagonal Gaussian itself.
    assert ("vaelab.mutual_info_from" in run.data.tags) == (posterior != "diag_gaussian")

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    images = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    codes = model.predict(images)
    assert codes.shape == (5, 4) and np.isfinite(codes).all()
    np.testing.assert_array_equal(model.predict(images), codes)  # E_q[z|x] is the same on every call
    assert model.get_raw_model().sample(3).shape == (3, 1, 8, 8)


@pytest.mark.parametrize(("posterior", "prior"), REGULAR, ids=["-".join(c) for c in REGULAR])
def test_a_family_or_prior_trains_evaluates_resumes_and_loads_as_the_pyfunc_model(project: Path, posterior, prior):
    trains_evaluates_resumes_and_loads(project, posterior, prior)


@pytest.mark.slow
@pytest.mark.parametrize(("posterior", "prior"), OTHERS, ids=["-".join(c) for c in OTHERS])
def test_every_other_combination_trains_evaluates_resumes_and_loads(project: Path, posterior, prior):
    trains_evaluates_resumes_and_loads(project, posterior, prior)
