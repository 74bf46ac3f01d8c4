"""train(cfg): one VAE, from composed config to tracked, checkpointed, published model.

Used by the train stage, by every multirun job and by every search trial (which only adds callbacks).
Order matters: validate, prepare data, build the model (all may fail cheaply) and only then create
the MLflow run, so a bad config never leaves a dangling run.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from time import perf_counter

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from vaelab import __version__, paths
from vaelab.checkpoints import read_checkpoint
from vaelab.config import validate
from vaelab.data.datamodule import ImageData
from vaelab.data.settings import Settings
from vaelab.data.sources import class_names
from vaelab.errors import TrainingInterrupted, VaelabError, storage_problem
from vaelab.figures import save_figures, save_training_curves
from vaelab.files import check_writable, replacing_dir, write_json_atomic, write_text_atomic
from vaelab.model.estimators import evaluate_images
from vaelab.redaction import redact_text
from vaelab.stages.budget import check_estimate, warn_if_slow_step
from vaelab.stages.epoch_progress import epoch_progress
from vaelab.stages.evaluate import warn_if_collapsed
from vaelab.stages.export import log_logged_model, register, save_pyfunc
from vaelab.stages.logger import lightning_logger
from vaelab.stages.phases import Phases, is_rank_zero
from vaelab.stages.preflight import check_buildable
from vaelab.stages.progress import progress_bar
from vaelab.stages.publish import publish as publish_outputs
from vaelab.stages.resume import ALREADY_FINISHED, Resumption, resumption
from vaelab.sweep.runs import EVAL_FAILURE_TAG
from vaelab.tracking.lifecycle import ending_of, run_lifecycle
from vaelab.tracking.run import Run, public_config
from vaelab.tracking.store import check_store, process_tracking_uri
from vaelab.training.builder import resolve
from vaelab.training.callbacks import (
    AtomicCheckpointIO,
    EpochHistory,
    InterruptCheckpoint,
    RngState,
)
from vaelab.training.module import SELECTION_METRIC, VAEModule

VAL_ESTIMATES = ("val/nll_iw", "val/nll_iw_se", "val/inference_gap", "val/iw_ess")


def hydra_overrides() -> list[str]:
    """The command line's overrides when running under Hydra, else none (e.g. compose API in tests)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def build_module(cfg: DictConfig, image_shape: tuple[int, ...], grey_levels: int) -> VAEModule:
    """The LightningModule for `cfg`, given the components' configs as plain values (what its checkpoints store)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    return VAEModule(
        image_shape=list(image_shape),
        arch=container["arch"],
        likelihood=container["likelihood"],
        latent_dim=container["model"]["latent_dim"],
        objective=container["objective"],
        posterior=container["posterior"],
        prior=container["prior"],
        optimizer=container["optim"],
        scheduler=container["scheduler"],
        nan_policy=cfg.nan_policy,
        grey_levels=grey_levels,
        channels_last=cfg.channels_last,
    )


def build_data(cfg: DictConfig) -> ImageData:
    return ImageData(
        Settings.from_config(cfg.data),
        batch_size=cfg.data.batch_size,
        limit_train=cfg.data.limit_train,
        likelihood=resolve(cfg.likelihood._target_),
        seed=cfg.seed,
    )


def train(
    cfg: DictConfig,
    callbacks: Sequence[Callback] = (),
    parent_run_id: str | None = None,
    pruned: Sequence[type[BaseException]] = (),
    tags: Mapping[str, str] | None = None,
    resumed: Resumption | None = None,
) -> dict[str, float | str]:
    """Train one VAE as configured; return the summary metrics plus its `run_id`. `tags`: more `vaelab.*` tags for
    a new run (named without the prefix), set as it is created (a sweep's job number, say).

    With `resume` set, the run it names goes on (vaelab.stages.resume; `resumed`: what an entry point already read of
    it, so that its refusals came before the heavy imports). When that run had already finished all its epochs,
    nothing runs: its summary as it was comes back, with `already_finished` set.

    `pruned`: exceptions a callback raises to stop a trial that will not pay off (a search's pruner); the run then
    ends KILLED with the tag optuna.state=PRUNED (vaelab.tracking.lifecycle).

    Every run keeps its files in outputs/<run_id>/ and its MLflow run. With `publish=true` (DVC's train stage) a
    top-level run also publishes models/latest/, metrics/train.json and plots/train/, DVC's outputs: a direct run
    leaves them alone, so they never pair one run's parameters with another's metrics. A nested run (a sweep's job
    or a search's trial, `parent_run_id` set) never publishes, so parallel jobs never overwrite each other's results.
    """
    began = perf_counter()
    phases = Phases()
    pruned = tuple(pruned)
    resume = None
    validate(cfg)
    if cfg.get("resume") is not None:
        resume = resumed or resumption(cfg, hydra_overrides())
        cfg = resume.cfg
        validate(cfg)  # the run's stored config is a file on disk: checked like any other
    if cfg.get("logger") is not None:
        check_store(cfg.tracking.uri)
    skip_gpu_probe_without_gpu()
    check_buildable(cfg)  # the Trainer's and the optimizer's arguments, judged by Lightning and torch
    if resume and resume.already_finished:  # nothing to train or finish: say so, and leave the run as it is
        print(resume.finished_line(), flush=True)
        return {**resume.summary(), ALREADY_FINISHED: "true"}
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = build_data(cfg)
    if resume:
        check_same_data(resume, data.data_hash)
    module = build_module(cfg, data.image_shape, data.grey_levels)
    if cfg.compile:
        module.vae.encoder.compile()
        module.vae.decoder.compile()

    publish = parent_run_id is None and bool(cfg.get("publish"))
    check_outputs_writable(publish)
    val_images = data.eval_images("val", cfg.eval.val_limit)
    check_estimate(module.vae, val_images, cfg.eval.val_iw_k, "eval.val_iw_k", cfg.eval.max_minutes, "val NLL")
    warn_if_slow_step(module.vae, val_images, cfg)
    if cfg.eval.after_train:  # a test estimate over budget is refused now, not after the training it would follow
        test_images = data.eval_images("test", cfg.eval.limit)
        check_estimate(module.vae, test_images, cfg.eval.iw_k, "eval.iw_k", cfg.eval.max_minutes, "test NLL")

    run = None
    tracked = cfg.get("logger") is not None and is_rank_zero()  # under DDP, one run: rank zero's
    if resume and is_rank_zero():
        print(resume.announcement(), flush=True)  # every check passed: the run is reopened now
    if tracked and resume:
        run = resume.reopen(cfg.tracking.uri)
    elif tracked:
        run = Run.create(
            cfg,
            stage="train",
            overrides=hydra_overrides(),
            tags={
                "data_hash": data.data_hash,
                "representation": module.vae.likelihood.representation,
                "dataset": data.settings.name,
                **(tags or {}),
            },
            parent_run_id=parent_run_id,
        )
        run.log_dataset(data.settings.name, data.folder, data.manifest, context="training")
    run_id = run.run_id if run else resume.run_id if resume else None
    phases.add("setup", perf_counter() - began)
    saved = paths.interrupted_checkpoint(run_id) if run_id else None

    def where_saved() -> dict[str, str]:
        return {"vaelab.interrupted_checkpoint": str(saved)} if saved and saved.is_file() else {}

    monitor = run.monitor_system(resume=resume is not None) if run and cfg.tracking.system_metrics else None
    fitted: list[bool] = []  # set once Trainer.fit has returned: an interrupt after it needs no more training
    try:
        # Lightning's MLflow logger points MLflow's process-wide tracking URI at this run's store: put back after.
        with process_tracking_uri(), run_lifecycle(run, pruned=pruned, interrupt_tags=where_saved):
            try:
                return fit_and_publish(
                    cfg,
                    module,
                    data,
                    run,
                    callbacks,
                    publish=publish,
                    resume=resume,
                    fitted=fitted,
                    phases=phases,
                )
            finally:
                if monitor:
                    monitor.finish()
    except BaseException as error:
        if run and resume:
            resume.put_back(run)  # a FINISHED run stays FINISHED whatever its resume met
        if ending_of(error, pruned).interrupted:
            raise TrainingInterrupted(interrupt_message(run_id, saved, fitted=bool(fitted))) from None
        problem = storage_problem(error)
        if problem is not None:
            raise problem from error
        raise


def check_outputs_writable(publish: bool) -> None:
    """A full disk or a read-only folder fails here, naming it, before the run exists or any epoch is spent."""
    folders = [paths.outputs_dir()]
    if publish:
        folders += [paths.latest_model_dir().parent, paths.metrics_dir(), paths.plots_dir()]
    for folder in folders:
        try:
            check_writable(folder)
        except OSError as error:
            problem = storage_problem(error)
            if problem is None:
                raise
            raise problem from error


def interrupt_message(run_id: str | None, saved: Path | None, fitted: bool = False) -> str:
    if run_id is None or saved is None:
        return "training interrupted"
    if fitted:
        return (
            "interrupted after training, while finishing the run (the validation estimates, figures, model logging "
            f"and publishing); `python pipelines/train.py resume={run_id}` finishes it without training again"
        )
    state = f"its state at the interrupt is in {saved}" if saved.is_file() else "nothing was saved"
    if not (saved.parent / paths.LAST).is_file():
        return f"training interrupted during its first epoch; {state}, but there is no complete epoch to resume from"
    return (
        f"training interrupted; {state}. "
        f"`python pipelines/train.py resume={run_id}` continues it from the end of its last complete epoch"
    )


def skip_gpu_probe_without_gpu() -> None:
    """Say there is no GPU, where there is none, so torch stops looking for one at every optimizer step.

    Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1. With a CUDA build of torch, Adam's step then asks
    NVML for the GPU count afresh every time, a library load per step (benchmarks/README.md has the cost).
    An empty CUDA_VISIBLE_DEVICES answers it at once, and changes nothing where no GPU is visible anyway."""
    if "CUDA_VISIBLE_DEVICES" not in os.environ and torch.cuda.device_count() == 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def check_same_data(resume: Resumption, data_hash: str) -> None:
    """A resumed run must see the data it started on: a changed dataset would make it two runs in one."""
    started_on = read_checkpoint(resume.checkpoint).get("vaelab", {}).get("data_hash")
    if started_on is not None and started_on != data_hash:
        raise VaelabError(
            f"cannot resume run {resume.run_id}: it started on data {started_on}, but the data is now {data_hash}; "
            "start a new run instead"
        )


def fit_and_publish(
    cfg: DictConfig,
    module: VAEModule,
    data: ImageData,
    run: Run | None,
    callbacks: Sequence[Callback],
    publish: bool = True,
    resume: Resumption | None = None,
    fitted: list[bool] | None = None,
    phases: Phases | None = None,
) -> dict[str, float | str]:
    """Everything that happens inside the run: any failure here marks the run FAILED or KILLED. `fitted` gets an
    entry once Trainer.fit has returned. `phases` times each phase, logged to the run as `time/<phase>_s`."""
    phases = phases or Phases()
    fit_began = perf_counter()
    # Under DDP every rank runs train(). Only rank zero has the MLflow run and writes files; the other ranks train
    # their shard of the data and stop after fit (ModelCheckpoint takes rank zero's folder, and saves on rank zero).
    rank_zero = is_rank_zero()
    run_id = run.run_id if run else resume.run_id if resume else uuid.uuid4().hex
    out_dir = paths.run_dir(run_id)
    # What the run is remembered by (its config file, its checkpoints) holds no secret: see public_config.
    config = public_config(cfg)
    config_file = write_text_atomic(paths.run_config(run_id), OmegaConf.to_yaml(config)) if rank_zero else None
    module.lineage = {
        "vaelab_version": __version__,
        "run_id": run_id,
        "data": dataclasses.asdict(data.settings),
        "data_hash": data.data_hash,
        "representation": module.vae.likelihood.representation,
        "config": config,
    }
    checkpoint = ModelCheckpoint(
        dirpath=paths.checkpoints_dir(run_id),
        filename=Path(paths.BEST).stem,  # Lightning adds the suffix, and names the last one last.ckpt itself
        monitor=SELECTION_METRIC,
        mode="max",
        save_last=True,
    )
    history = EpochHistory()
    # The config's callbacks come from the command line or a conf/ file, the user's own code: Hydra builds them.
    chosen = [instantiate(spec) for spec in (cfg.get("callbacks") or {}).values()]
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        logger=lightning_logger(run, cfg.logger) if run else False,
        callbacks=[
            checkpoint,
            InterruptCheckpoint(paths.checkpoints_dir(run_id)),
            history,
            RngState(),
            *chosen,
            *callbacks,
            *epoch_progress([*chosen, *callbacks], history),
        ],
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in [*chosen, *callbacks]),
        default_root_dir=str(out_dir),
        plugins=[AtomicCheckpointIO()],
    )
    # weights_only: resume checked this file, and Lightning's own read of it must not run a pickle either.
    trainer.fit(module, datamodule=data, ckpt_path=resume.checkpoint if resume else None, weights_only=True)
    phases.add("fit", perf_counter() - fit_began)
    if fitted is not None:
        fitted.append(True)
    if not rank_zero:
        return {}
    say_if_stopped_early(trainer, int(cfg.trainer.max_epochs))
    summary = finish(cfg, trainer, module, data, checkpoint, history, run, config_file, publish, phases)
    if cfg.eval.after_train:
        with phases("evaluation"):
            summary |= evaluate_after_training(cfg, str(summary["run_id"]), run, publish)
    if run:
        run.log_metrics(phases.metrics())
    return summary


def say_if_stopped_early(trainer: pl.Trainer, max_epochs: int) -> None:
    """The epoch lines end short of trainer.max_epochs when a callback (EarlyStopping) or a trainer limit stopped
    the fit without an error: say so, once, before the run is finished as usual."""
    if trainer.current_epoch < max_epochs:
        print(
            f"vaelab: training stopped after {trainer.current_epoch} of its {max_epochs} epochs "
            "(a callback such as EarlyStopping, or a trainer limit, ended it)",
            flush=True,
        )


def finish(
    cfg: DictConfig,
    trainer: pl.Trainer,
    module: VAEModule,
    data: ImageData,
    checkpoint: ModelCheckpoint,
    history: EpochHistory,
    run: Run | None,
    config_file: Path,
    publish: bool = True,
    phases: Phases | None = None,
) -> dict[str, float | str]:
    """After fit: reload the best weights, estimate val/nll_iw, draw figures, log artifacts, publish."""
    phases = phases or Phases()
    with phases("estimates"):
        best, state, val_images, val_iw = best_estimates(cfg, module, data, checkpoint)
    out_dir = config_file.parent
    figures = out_dir / paths.FIGURES
    with phases("figures"):
        val_labels = data.split("val")["labels"][: len(val_images)]
        kl_per_dim, names = val_iw.kl_per_dim, class_names(data.manifest)
        save_figures(
            module.vae, val_images, val_labels, kl_per_dim, figures, seed=cfg.seed, split="val", class_names=names
        )
        save_training_curves(history.rows, figures / "training_curves.png")

    best_row = next(row for row in history.rows if row["epoch"] == state["epoch"])
    # The end-of-training IW estimates use the first eval.val_limit val images (all by default).
    val_estimates = {k: v for k, v in val_iw.metrics("val").items() if k in VAL_ESTIMATES}
    summary = {
        **{k: v for k, v in best_row.items() if k.startswith(("train/", "val/"))},
        **val_estimates,
        "val/iw_k": float(cfg.eval.val_iw_k),  # the run's own: a resumed run's, not the resume command's default
        "best_epoch": float(best_row["epoch"]),  # counted from 0 (shown from 1: stages.resume.best_epoch_text)
        "epochs": float(len(history.rows)),
        "train/images_per_sec": sum(r["train/images_per_sec"] for r in history.rows) / len(history.rows),
    }
    warn_if_collapsed(val_iw, run)
    if run:
        with phases("model_logging"):
            run.log_metrics({**val_estimates, "val/iw_k": float(cfg.eval.val_iw_k)}, step=trainer.global_step)
            run.log_artifact(config_file, "config")
            run.log_artifact(best, paths.CHECKPOINTS)
            run.log_artifact(figures, paths.FIGURES)
            log_model(cfg, run, best, out_dir / paths.PYFUNC_MODEL, data, module)

    summary["run_id"] = module.lineage["run_id"]
    write_json_atomic(out_dir / paths.TRAIN_SUMMARY, summary)
    if publish:
        with phases("publish"):
            publish_outputs(best, module.lineage["run_id"], config_file, summary, history.rows)
    return summary


def best_estimates(cfg: DictConfig, module: VAEModule, data: ImageData, checkpoint: ModelCheckpoint):
    """The best checkpoint's weights loaded into `module`, and its IW estimates on the first eval.val_limit val
    images: (checkpoint path, checkpoint state, those images, their estimates)."""
    best = Path(checkpoint.best_model_path)
    state = read_checkpoint(best)
    module.load_state_dict(state["state_dict"])
    module.eval()

    val_images = data.eval_images("val", cfg.eval.val_limit)
    with progress_bar(f"val NLL (k={cfg.eval.val_iw_k})", total=len(val_images) * cfg.eval.val_iw_k) as advance:
        val_iw = evaluate_images(module.vae, val_images, k=cfg.eval.val_iw_k, on_samples=advance)
    return best, state, val_images, val_iw


def log_model(cfg: DictConfig, run: Run, checkpoint: Path, folder: Path, data: ImageData, module: VAEModule) -> None:
    """The best weights as an MLflow pyfunc (runs:/<run_id>/model, and the run's LoggedModel, models:/<model_id>),
    registered when `tracking.register_as` names it."""
    with replacing_dir(folder) as fresh:  # MLflow refuses to save over an earlier model (e.g. before a resume)
        save_pyfunc(checkpoint, fresh, data.image_shape, module.vae.code_dim)
    run.log_artifact(folder, paths.PYFUNC_MODEL)
    model_id = log_logged_model(run.client, run.run_id, folder)
    run.set_tags({"vaelab.model_id": model_id})
    if cfg.tracking.get("register_as"):
        version = register(run.client, run.run_id, cfg.tracking.register_as, data.data_hash, cfg.tracking.get("alias"))
        run.set_tags({"vaelab.registered_model": f"{cfg.tracking.register_as}/{version}"})


def evaluate_after_training(
    cfg: DictConfig, run_id: str, run: Run | None, publish: bool = True
) -> dict[str, float | str]:
    """`eval.after_train`: the evaluate stage on the run's best checkpoint, logged into the run itself (still RUNNING,
    a sweep's child run for a sweep's job); its test metrics, or none when it failed.

    A failure here leaves the run to end FINISHED: its training, checkpoint, figures and model are all logged and
    sound, and the evaluate stage can be run again on them alone. So the failure is not allowed to mark the run
    FAILED, nor to pass silently: it is printed with the command that retries it, kept on the run as the tag
    `vaelab.eval_failure`, and a sweep's summary shows it in the job's failure column. An interrupt still stops the
    run (KILLED), and resuming it finishes it, evaluation included, without training again. `publish`: as for the
    training's own outputs, only a run that is not a sweep's job writes the project's evaluation files.
    """
    from vaelab.stages.evaluate import evaluate_checkpoint

    asked = copy.deepcopy(cfg)
    with read_write(asked), open_dict(asked):
        asked.run_id, asked.ckpt = run_id, None  # evaluate the checkpoint of this run, and log into this run
    try:
        results = evaluate_checkpoint(asked, publish=publish)
    except Exception as error:  # noqa: BLE001 - see the docstring
        reason = redact_text(f"{type(error).__name__}: {error}".strip())
        print(
            f"vaelab: warning: training finished, but its evaluation on test failed: {reason}\n"
            f"  `python pipelines/evaluate.py run_id={run_id}` evaluates it again",
            file=sys.stderr,
            flush=True,
        )
        if run:
            run.set_tags({EVAL_FAILURE_TAG: reason[:5000]})
        return {}
    return {key: value for key, value in results.items() if key != "run_id"}
