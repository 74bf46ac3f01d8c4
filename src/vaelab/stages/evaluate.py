"""The evaluate stage: a trained checkpoint's test metrics (vaelab.model.estimators) and figures, in the run's folder
(outputs/<run_id>/evaluation/, eval.json) and logged into the run that trained it; with `publish=true` (DVC's
evaluate stage) also DVC's outputs, metrics/eval.json and plots/eval/.

    python pipelines/evaluate.py                     # models/latest/, else the newest finished training run
    python pipelines/evaluate.py ckpt=path/to.ckpt   # or a folder (outputs/<run_id>/), or run_id=<mlflow run id>
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from vaelab import paths
from vaelab.checkpoints import TrainedModel, load_trained, sides, trained_with
from vaelab.config import validate
from vaelab.data.observations import fixed_observations
from vaelab.data.prepare import read_prepared
from vaelab.data.settings import Settings
from vaelab.errors import CheckpointError, DataError, EvaluationInterrupted
from vaelab.files import replacing_dir, write_json_atomic
from vaelab.model.estimators import Evaluation, evaluate_images
from vaelab.stages.budget import check_estimate
from vaelab.stages.phases import Phases
from vaelab.stages.progress import progress_bar


def warn(warning: str | None, tag: str, run=None) -> None:
    """A warning about the numbers, if there is one: printed, and kept as the run's tag `tag`."""
    if warning:
        print(f"vaelab: warning: {warning}")
        if run is not None:
            run.set_tags({tag: warning})


def warn_if_collapsed(result: Evaluation, run=None) -> None:
    """Say so, on the console and as the run's `vaelab.warning` tag, when the posterior has collapsed."""
    warn(result.collapse_warning(), "vaelab.warning", run)


# How near its ceiling log N test/mutual_info may come before it is reported as saturated. Half a nat below log N,
# each image's own posterior makes up most of the mixture q(z) at its z (the other N - 1 add a factor e^0.5 in
# geometric mean): the images are told apart almost perfectly, so the estimate could rise by at most 0.5 nats however
# much more the code said about x, and its value is set by N rather than by the model.
MI_SATURATION_MARGIN = 0.5


def mi_saturation(result: Evaluation) -> str | None:
    """A sentence when mutual_info is within MI_SATURATION_MARGIN nats of its maximum log N, else None."""
    if result.mutual_info_max - result.mutual_info < MI_SATURATION_MARGIN:
        return (
            f"mutual_info {result.mutual_info:.2f} is within {MI_SATURATION_MARGIN} nats of its maximum "
            f"log N = {result.mutual_info_max:.2f} (N = {result.n_images}): it measures the number of images, "
            "not I(x; z)"
        )
    return None


def warn_if_saturated(result: Evaluation, run=None) -> None:
    """Say so, on the console and as the run's `vaelab.mi_saturated` tag, when mutual_info is near log N."""
    warn(mi_saturation(result), "vaelab.mi_saturated", run)


GAP_KEYS = ("approximation_gap", "approximation_gap_se", "amortization_gap", "amortization_gap_se")


def split_the_gap(vae, images, settings) -> dict[str, float]:
    """The inference gap on `images` as approximation + amortization (vaelab.model.gaps), with a progress bar over
    the images and one line saying the result. `settings`: the `eval` config section."""
    from vaelab.model.gaps import gap_split

    what = f"gap split ({len(images)} images, up to {settings.gaps_steps} steps each, k={settings.iw_k})"
    start = time.perf_counter()
    with progress_bar(what, total=len(images)) as advance:
        split = gap_split(
            vae,
            images,
            k=settings.iw_k,
            steps=settings.gaps_steps,
            samples=settings.gaps_samples,
            lr=settings.gaps_lr,
            tolerance=settings.gaps_tolerance,
            on_images=advance,
        )
    metrics = split.metrics("test")
    print(
        f"vaelab: inference gap on {split.n_images} test images: {metrics['test/gaps_inference_gap']:.2f} nats = "
        f"approximation {metrics['test/approximation_gap']:.2f} ± {metrics['test/approximation_gap_se']:.2f} + "
        f"amortization {metrics['test/amortization_gap']:.2f} ± {metrics['test/amortization_gap_se']:.2f} "
        f"({metrics['test/gaps_steps']:.0f} refinement steps, "
        f"{(time.perf_counter() - start) / split.n_images:.2f} s per image)",
        flush=True,
    )
    return metrics


def write_kl_per_dim(kl_per_dim: list[float], path: Path) -> None:
    """test/kl_per_dim as CSV (dim, kl in nats): which latent dimensions carry information."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{d},{kl:.6f}\n" for d, kl in enumerate(kl_per_dim))
    path.write_text("dim,kl\n" + rows)


# Where a folder passed as ckpt= keeps its checkpoint: models/latest/, outputs/<run_id>/, or its checkpoints/.
CHECKPOINT_IN_FOLDER = (paths.PUBLISHED_MODEL, f"{paths.CHECKPOINTS}/{paths.BEST}", paths.BEST)
# The config keys that fix a network's shapes and its test images, as evaluate compares them with a checkpoint.
MODEL_KEYS = ("arch", "likelihood", "posterior", "prior", "model", "data")


def resolve_checkpoint(cfg: DictConfig) -> tuple[Path, str]:
    """`ckpt=<file or folder>`, else the best checkpoint of `run_id=<id>`, else the published model (models/latest/),
    else the best checkpoint of the newest finished training run; and how it was asked for."""
    if cfg.get("ckpt"):
        path, asked = Path(cfg.ckpt), f"ckpt={cfg.ckpt}"
        if path.is_dir():
            inside = [path / name for name in CHECKPOINT_IN_FOLDER if (path / name).is_file()]
            if not inside:
                raise CheckpointError(f"{asked}: a folder without {', '.join(CHECKPOINT_IN_FOLDER)} in it")
            path = inside[0]
    elif cfg.get("run_id"):
        path, asked = paths.best_checkpoint(cfg.run_id), f"run_id={cfg.run_id}"
    elif paths.published_model().is_file():
        path, asked = paths.published_model(), "the default, models/latest/"
    else:
        run_id = newest_finished_run(cfg)
        asked = "the newest finished training run: models/latest/ holds no published model"
        path = paths.best_checkpoint(run_id)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} ({asked}; train a model first, or pass ckpt=<path>)")
    return path, asked


def asked_keys(cfg: DictConfig) -> list[str]:
    """The config keys this evaluation was explicitly given: its command line's overrides, or every model key when
    the primary config is a whole file of its own (DVC's params.yaml, which also trained models/latest) or an
    experiment. The rest of the composed config is defaults, which a checkpoint's own config rightly overrules."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    hydra = HydraConfig.get()
    keys = [override.split("=", 1)[0].lstrip("+~") for override in hydra.overrides.task]
    if hydra.job.config_name != "train" or "experiment" in keys:
        return list(MODEL_KEYS)
    return keys


COMPONENTS = ("arch", "likelihood", "posterior", "prior")  # what a model is built from, beside its latent size


def model_entries(components: dict[str, dict], latent_dim: int, data: Settings) -> dict[str, object]:
    """A model and its data as flat, comparable entries named by their config keys."""
    settings = {f"data.{key}": value for key, value in asdict(data).items()}
    return {**{name: components[name] for name in COMPONENTS}, "model.latent_dim": latent_dim, **settings}


def check_checkpoint_fits(path: Path, model: TrainedModel, cfg: DictConfig, keys: list[str]) -> Settings:
    """The checkpoint's data settings, after checking that it is the model the config's `keys` ask for.

    An evaluation of another model than the one asked for would report its numbers under the wrong name."""
    lineage, hparams = model.lineage, model.hparams
    if not isinstance(lineage.get("data"), dict) or "data_hash" not in lineage:
        raise CheckpointError(
            f"{path}: has no vaelab lineage (its data settings and data hash), so which test images belong to it "
            "is unknown; evaluate checkpoints written by vaelab training"
        )
    try:
        settings = Settings(**lineage["data"])
    except TypeError as error:
        raise CheckpointError(f"{path}: its lineage's data settings are unreadable ({error})") from error
    trained = model_entries(hparams, hparams["latent_dim"], settings)
    asked = model_entries(
        {name: OmegaConf.to_container(cfg[name], resolve=True) for name in COMPONENTS},
        cfg.model.latent_dim,
        Settings.from_config(cfg.data),
    )

    def is_asked(entry: str) -> bool:
        return any(entry == key or entry.startswith(f"{key}.") or key.startswith(f"{entry}.") for key in keys)

    differ = [entry for entry in trained if is_asked(entry) and trained[entry] != asked[entry]]
    if differ:
        lines = "\n".join(f"  {e}: trained with {trained[e]!r}; the config asks for {asked[e]!r}" for e in differ)
        raise CheckpointError(
            f"{path} is not the model this evaluation asks for:\n{lines}\n"
            f"It is {trained_with(hparams)}, trained on {settings.name}. Leave these keys out to evaluate it "
            "as it was trained, or pass the checkpoint of the model they describe."
        )
    return settings


def evaluate(cfg: DictConfig) -> dict[str, float | str | None]:
    """Evaluate a checkpoint on the test split, saying which; write its results (and with `publish=true` DVC's
    metrics/eval.json and plots/eval/); log into its run.

    An interrupt (Ctrl-C, SIGTERM) changes nothing it has not finished: the training run keeps its status, and
    each results folder and file is replaced whole or not at all."""
    try:
        return evaluate_checkpoint(cfg, publish=bool(cfg.get("publish")), announce=True)
    except KeyboardInterrupt:
        raise EvaluationInterrupted(
            "evaluation interrupted; the trained run keeps its status, and its evaluation files hold what they held "
            "before unless they were already written. `python pipelines/evaluate.py` with the same arguments "
            "evaluates again"
        ) from None


def newest_finished_run(cfg: DictConfig) -> str:
    """The newest FINISHED training run of the configured experiment whose best checkpoint is in outputs/."""
    from vaelab.tracking.store import newest_train_runs, resolve_uri

    nothing_published = "models/latest/ holds no published model (DVC's train stage publishes one)"
    if cfg.get("logger") is None:
        raise CheckpointError(
            f"{nothing_published}, and logger=none keeps no runs to choose from; pass run_id=<id> or ckpt=<path>"
        )
    uri = resolve_uri(cfg.tracking.uri)
    for run_id in newest_train_runs(uri, cfg.tracking.experiment, status="FINISHED"):
        if paths.best_checkpoint(run_id).is_file():
            return run_id
    raise CheckpointError(
        f"{nothing_published}, and experiment '{cfg.tracking.experiment}' has no finished training run with a "
        f"checkpoint under {paths.outputs_dir()}; train a model first, or pass run_id=<id> or ckpt=<path>"
    )


def evaluate_checkpoint(
    cfg: DictConfig, publish: bool = False, announce: bool = False
) -> dict[str, float | str | None]:
    """`publish`: also write DVC's outputs. `announce`: first say which run and checkpoint it evaluates (a run
    evaluated right after its training needs no introduction)."""
    from vaelab.charts import save_gap_split
    from vaelab.data.sources import class_names
    from vaelab.figures import save_figures
    from vaelab.tracking.run import Run
    from vaelab.tracking.store import check_store

    validate(cfg)
    if cfg.get("logger") is not None:
        check_store(cfg.tracking.uri)  # before the work whose results it would receive
    path, asked = resolve_checkpoint(cfg)
    torch.manual_seed(cfg.seed)  # the importance samples too: the same checkpoint gives the same numbers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    trained = load_trained(path, map_location=device)
    lineage = trained.lineage
    if announce:
        print(f"vaelab: evaluating run {lineage.get('run_id') or '(unknown)'}: {path} ({asked})", flush=True)
    settings = check_checkpoint_fits(path, trained, cfg, asked_keys(cfg))
    prepared = read_prepared(settings, splits=("test",))
    folder, manifest = prepared.folder, prepared.manifest
    if list(manifest["image_shape"]) != list(trained.hparams["image_shape"]):
        raise CheckpointError(
            f"{path} was trained on {sides(trained.hparams['image_shape'])} images, but its data settings now "
            f"give {sides(manifest['image_shape'])} images ({folder})"
        )
    if manifest["data_hash"] != lineage["data_hash"]:
        raise DataError(
            f"{folder} holds data {manifest['data_hash'][:12]}, but {path} was trained on "
            f"{lineage['data_hash'][:12]}; re-run prepare with the checkpoint's data settings"
        )
    test = prepared.splits["test"]
    images = fixed_observations(test, "test", type(trained.vae.likelihood), manifest, cfg.eval.limit)

    check_estimate(trained.vae, images, cfg.eval.iw_k, "eval.iw_k", cfg.eval.max_minutes, "test NLL")
    phases = Phases()  # announced where stdout is not a terminal; not logged (a run's time/ metrics are its training's)
    with phases("test_estimates"):
        with progress_bar(f"test NLL (k={cfg.eval.iw_k})", total=len(images) * cfg.eval.iw_k) as advance:
            result = evaluate_images(trained.vae, images, k=cfg.eval.iw_k, on_samples=advance)
        metrics = result.metrics("test")
        if cfg.eval.gaps:
            metrics.update(split_the_gap(trained.vae, images[: cfg.eval.gaps_limit], cfg.eval))

    # The run's own folder keeps its results, where parallel evaluations (a sweep's jobs) never overwrite each
    # other's; published figures go to DVC's plots/eval/ instead.
    run_folder = paths.run_dir(lineage["run_id"]) if lineage.get("run_id") else paths.outputs_dir()
    plots = paths.plots_dir() / "eval" if publish else run_folder / paths.EVALUATION
    with phases("test_figures"), replacing_dir(plots) as fresh:  # no figure of an earlier evaluation survives
        labels, names = test["labels"][: len(images)], class_names(manifest)
        save_figures(
            trained.vae, images, labels, result.kl_per_dim, fresh, seed=cfg.seed, split="test", class_names=names
        )
        write_kl_per_dim(result.kl_per_dim, fresh / "kl_per_dim.csv")
        if "test/approximation_gap" in metrics:
            save_gap_split(
                [type(trained.vae.posterior).__name__],
                *([metrics[f"test/{gap}"]] for gap in GAP_KEYS),
                fresh / "gap_split.png",
            )
    summary = {**metrics, "eval/iw_k": cfg.eval.iw_k, "eval/n_images": result.n_images}
    results = {**summary, "run_id": lineage.get("run_id")}
    write_json_atomic(run_folder / paths.EVAL_SUMMARY, results)
    if publish:
        write_json_atomic(paths.metrics_dir() / "eval.json", results)

    run_id, run = lineage.get("run_id"), None
    if cfg.get("logger") is not None and run_id:
        with phases("test_logging"):
            try:
                run = Run.attach(cfg.tracking.uri, run_id)
            except Exception as error:  # noqa: BLE001 - a missing run must not lose the evaluation
                print(f"vaelab: results not logged to MLflow (run {run_id}: {error})")
            else:
                run.log_metrics(summary, step=0)
                run.log_dataset(settings.name, folder, manifest, "evaluation", split="test", images=result.n_images)
                run.log_artifact(plots, "evaluation")
                tags = {"vaelab.eval.checkpoint": str(path), "vaelab.eval.iw_k": str(cfg.eval.iw_k)}
                if trained.vae.posterior.mutual_info_from:
                    tags["vaelab.mutual_info_from"] = trained.vae.posterior.mutual_info_from
                run.set_tags(tags)
    warn_if_collapsed(result, run)
    warn_if_saturated(result, run)
    return {**summary, "run_id": run_id}
