"""The trained VAE as an MLflow pyfunc model: `mlflow.pyfunc.load_model(f"runs:/{run_id}/model")`.

`predict(images)` encodes float32 images [N, C, H, W] in [0, 1] to their posterior means [N, code_dim] (the whole
latent, or z1 of a two-layer model: the coordinates the decoder reads); NaN,
infinite or out-of-range values (0-255 images not divided by 255) raise a ModelInputError that says which. The
images are observed as in evaluation (grey levels, then binarized with a fixed seed for Bernoulli models), so the
same image always gets the same code. To decode or sample, take the model out of its wrapper:

    vae = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").get_raw_model()
    images = vae.decode(z)           # z: float32 [N, code_dim] -> E[x|z], [N, C, H, W] in [0, 1]
    images = vae.sample(16, seed=0)  # 16 draws of E[x|z], z ~ p(z)
    trained = vae.module             # the network, its hparams and lineage; .lightning_module() for a Trainer

The model folder holds the checkpoint and names this module as its loader (`_load_pyfunc`), so loading needs
vaelab installed, as it is wherever the model was trained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

OBSERVATION_SEED = 0


class ModelInputError(ValueError):
    """What the model was given is not what it encodes (or decodes): NaN, infinite, out of range or misshapen."""


def checked_input(values, what: str, shape: tuple[int, ...], low: float | None = None, high: float | None = None):
    """`values` (an array, a tensor, nested lists) as a float32 tensor [N, *shape], each value finite and within
    [low, high]; else a ModelInputError that names what is wrong and what is expected.

    A model given NaN, infinite or unscaled (0-255) images would still return plausible codes: refused instead."""
    bounds = f" with values in [{low:g}, {high:g}]" if low is not None and high is not None else " of finite values"
    expected = f"expected {what} as float32 [N, {', '.join(map(str, shape))}]{bounds}"
    x = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values)
    if x.dtype.kind not in "biuf":
        raise ModelInputError(f"{what} are of type {x.dtype}, not numbers; {expected}")
    if x.ndim != 1 + len(shape) or tuple(x.shape[1:]) != shape:
        raise ModelInputError(f"{what} have shape {list(x.shape)}; {expected}")
    x = x.astype(np.float64, copy=False)
    found = {
        "NaN": np.isnan(x),
        "+inf": np.isposinf(x),
        "-inf": np.isneginf(x),
    }
    finite = np.isfinite(x)
    if high is not None:
        found[f"values above {high:g}"] = finite & (x > high)
    if low is not None:
        found[f"values below {low:g}"] = finite & (x < low)
    problems = [
        f"{name} ({int(mask.sum())}, first at {list(map(int, np.argwhere(mask)[0]))})"
        for name, mask in found.items()
        if mask.any()
    ]
    if problems:
        hint = "; 0-255 images must be divided by 255 first" if high == 1.0 and (finite & (x > 1)).any() else ""
        raise ModelInputError(f"{what} hold {', '.join(problems)}; {expected}{hint}")
    return torch.from_numpy(x.astype(np.float32))


class TrainedVAE:
    """What the pyfunc wraps: a trained VAE that encodes, decodes and samples numpy arrays."""

    def __init__(self, checkpoint: str | Path):
        from vaelab.checkpoints import load_trained

        self.module = load_trained(checkpoint).eval()
        self.vae = self.module.vae

    def _observe(self, images) -> torch.Tensor:
        x = checked_input(images, "images", tuple(self.module.hparams["image_shape"]), low=0.0, high=1.0)
        levels = self.vae.likelihood.grey_levels
        grey = (x * (levels - 1)).round().to(torch.uint8)
        return type(self.vae.likelihood).observe(grey, levels, torch.Generator().manual_seed(OBSERVATION_SEED))

    @torch.inference_mode()
    def predict(self, model_input, params=None) -> np.ndarray:
        return self.vae.code(self._observe(model_input)).numpy()

    @torch.inference_mode()
    def decode(self, z: np.ndarray) -> np.ndarray:
        params = self.vae.decoder(checked_input(z, "codes", (self.vae.code_dim,)))
        return self.vae.likelihood.mean(params).numpy()

    @torch.inference_mode()
    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        return self.vae.sample(n, generator=torch.Generator().manual_seed(seed)).numpy()

    def get_raw_model(self) -> TrainedVAE:
        return self


def _load_pyfunc(data_path: str) -> TrainedVAE:
    """MLflow's python_function loader: `data_path` is the checkpoint inside the model folder."""
    return TrainedVAE(data_path)


def signature(image_shape: tuple[int, ...], latent_dim: int):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *image_shape))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, latent_dim))]),
    )


def requirements() -> list[str]:
    """Pinned from this environment, so MLflow need not infer them (which would load the model in a subprocess)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "lightning", "hydra-core", "omegaconf", "mlflow")]


def save_pyfunc(checkpoint: Path, folder: Path, image_shape: tuple[int, ...], latent_dim: int) -> Path:
    """Write the MLflow model folder (MLmodel, the checkpoint, the signature) to `folder`."""
    import mlflow.pyfunc

    mlflow.pyfunc.save_model(
        path=str(folder),
        loader_module=__name__,
        data_path=str(checkpoint),
        signature=signature(image_shape, latent_dim),
        input_example=np.full((1, *image_shape), 0.5, dtype=np.float32),
        pip_requirements=requirements(),
    )
    return folder


# Not "model": MLflow 3 resolves runs:/<run_id>/<name> through a logged model of that name, looked up in the
# default tracking store rather than the run's, which breaks runs:/<run_id>/model for a project's own store.
LOGGED_MODEL_NAME = "vae"


def log_logged_model(client, run_id: str, folder: Path, name: str = LOGGED_MODEL_NAME) -> str:
    """The model folder as an MLflow 3 LoggedModel of the run: listed as the run's model (the runs table's Models
    column) and loadable as models:/<model_id>, beside runs:/<run_id>/model. Its id."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    experiment_id = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, model_type="pyfunc")
    try:
        client.log_model_artifacts(model.model_id, str(folder))
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model_id=model.model_id, step=0)])
    return model.model_id


def register(client, run_id: str, name: str, data_hash: str, alias: str | None = None) -> str:
    """Register runs:/<run_id>/model as a new version of `name`, tagged with the data hash, and point `alias` (if
    any) at it, away from whichever version it named before; its version. Says so on stdout."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    version = client.create_model_version(name, source=source, run_id=run_id, tags={"vaelab.data_hash": data_hash})
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version.version}"
    print(f"vaelab: registered model {name} version {version.version}{f' as @{alias}' if alias else ''} ({uri})")
    return version.version
