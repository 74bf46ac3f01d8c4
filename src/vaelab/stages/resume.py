"""Resuming a killed or stopped run: `python pipelines/train.py resume=<run_id>` (or `resume=last`).

A resumed run is the same run, continued: it trains with the config it was started with (its
outputs/<run_id>/config.yaml), from its last checkpoint (weights, optimizer, scheduler, epoch, callbacks and
RNG state), on the same data (the data hash must match), and logs into the same MLflow run without logging
its params again (MLflow refuses changed param values). It says so in one line: the run, the checkpoint, and the
epoch it goes on from.

`resume=<run_id> trainer.max_epochs=N` extends a run, stopped or finished, to N epochs in all: the one change to
its config a resume allows. N must be more than the epochs it has trained, and a run whose learning rate follows a
schedule set for its first length (scheduler=cosine) is not extended, since the schedule would run past its end.
The run's param trainer.max_epochs keeps the value it was started with (MLflow params are written once); the tag
`vaelab.extended_to` holds the length it was extended to, and its config.yaml (and the config artifact) the config
it now trains with.

A run that FINISHED has nothing left to do, whether it trained all its epochs or a callback (EarlyStopping) or a
trainer limit ended it sooner: resuming it says so, with its best epoch and val/elbo, and changes nothing;
`trainer.max_epochs=N` on the command line trains it on. A run from before runs kept a summary file is known to be
finished by MLflow: its end-of-training estimates were logged at the step its last checkpoint holds. A run stopped
after its last epoch, while it was being finished (the end-of-training estimates, figures, model logging,
publishing), is finished by resuming it, without training again.

Nothing read back from the run's folder runs unless trusted: every `_target_` in its config.yaml and in its last
checkpoint (hyper-parameters and lineage) must be on vaelab.training.builder's trusted list, or named again by the
user on this command line (`+resume.run=<run_id> '+resume.trust=[mypkg.MyCallback]'`). A refused resume stops
before the run is reopened, so the run's status and tags stay exactly as they were.

Its config file holds no secret (vaelab.redaction): one given as `${oc.env:VAR}` is read from the environment
again; a tracking.uri's password is given again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from vaelab import __version__, paths
from vaelab.errors import ConfigError, VaelabError
from vaelab.redaction import is_redacted
from vaelab.tracking.run import TAG_PREFIX, Run, flatten
from vaelab.tracking.store import SQLITE, StoreClient, check_store, newest_train_runs, resolve_uri

# Overrides that may come with resume=: which run, what of it the user trusts, where to find it, and how long it
# trains in all (an extension). Anything else would change a run in flight.
ALLOWED_WITH_RESUME = ("resume", "tracking.uri", "tracking.experiment", "trainer.max_epochs")
EXTENDED_TO_TAG = f"{TAG_PREFIX}extended_to"  # the trainer.max_epochs a resume extended the run to
ALREADY_FINISHED = "already_finished"  # in train()'s summary of a resume that found nothing left to do


@dataclass
class Resumption:
    """A run to continue, as its own files describe it. `epochs_done`: the complete epochs its last checkpoint holds;
    `extended_from`: the trainer.max_epochs it was stopped or finished with, when this command changes it."""

    run_id: str
    checkpoint: Path
    cfg: DictConfig  # the run's own config (trainer.max_epochs the extension's, when it is one)
    epochs_done: int = 0
    extended_from: int | None = None
    status: str | None = None  # its MLflow status before the resume; None when it is not tracked
    summarised_epochs: float | None = None  # the epochs its last finishing covered (its summary file says)
    asked_epochs: bool = False  # trainer.max_epochs came on the command line: train on, even to the same length
    finished: RunInfo | None = None  # a FINISHED run's status and tags before it was reopened

    @property
    def max_epochs(self) -> int:
        return int(self.cfg.trainer.max_epochs)

    @property
    def already_finished(self) -> bool:
        """The run ended FINISHED, its end-of-training work covered every epoch its last checkpoint holds (all of
        them, or fewer where a callback or a trainer limit stopped it), and this command asks for no more epochs:
        nothing is left. (An extension stopped while it was being finished leaves the run FINISHED as it was before,
        with more epochs in its checkpoint than in its summary: resuming it finishes it.)"""
        return self.status == "FINISHED" and not self.asked_epochs and self.summarised_epochs == self.epochs_done

    def announcement(self) -> str:
        """The one line a resumed run starts with."""
        if self.extended_from is not None:
            where = f"epoch {self.epochs_done} of {self.max_epochs}; trainer.max_epochs was {self.extended_from}"
        elif self.epochs_done >= self.max_epochs:
            where = f"epoch {self.epochs_done} of {self.max_epochs}: training is done, finishing the run"
        else:
            where = f"epoch {self.epochs_done} of {self.max_epochs}"
        return f"vaelab: resuming run {self.run_id} from {self.checkpoint} ({where})"

    def finished_line(self) -> str:
        """What resuming a run that already finished says: its best epoch and val/elbo (from its summary file, when
        it has one), and how to train it further."""
        summary = read_summary(self.run_id)
        best = (
            f" ({best_epoch_text(summary)}: val/elbo {summary['val/elbo']:.2f})"
            if {"best_epoch", "epochs", "val/elbo"} <= summary.keys()
            else ""
        )
        if self.epochs_done >= self.max_epochs:
            return (
                f"vaelab: run {self.run_id} already finished all its {self.max_epochs} epochs{best}; nothing to "
                f"resume. `resume={self.run_id} trainer.max_epochs=<more>` trains it further"
            )
        return (
            f"vaelab: run {self.run_id} already finished: it stopped after {self.epochs_done} of its {self.max_epochs} "
            f"epochs (a callback or a trainer limit ended it){best}; nothing to resume. "
            f"`resume={self.run_id} trainer.max_epochs=<N>` trains it on to N epochs"
        )

    def summary(self) -> dict[str, float | str]:
        """The summary of a run that already finished, as its end of training wrote it, and its `run_id`."""
        return {**read_summary(self.run_id), "run_id": self.run_id}

    def reopen(self, uri: str | None) -> Run:
        """The run, RUNNING again; a FINISHED one's record is kept, so that a failed resume can put it back. A run
        that now trains to another length than its param trainer.max_epochs says (written once, when it was
        created) gets the tag `vaelab.extended_to`."""
        before = Run.attach(uri, self.run_id)
        record = before.client.get_run(self.run_id)
        if record.info.status == "FINISHED":
            self.finished = RunInfo(record.info.status, record.info.end_time, dict(record.data.tags))
        run = Run.reopen(uri, self.run_id)
        if record.data.params.get("trainer.max_epochs", str(self.max_epochs)) != str(self.max_epochs):
            run.set_tags({EXTENDED_TO_TAG: str(self.max_epochs)})
        return run

    def put_back(self, run: Run) -> None:
        """A resume of a FINISHED run that failed or was stopped leaves the run as it was: FINISHED, with its tags;
        the console said what went wrong."""
        if self.finished is None:
            return
        now = run.client.get_run(self.run_id).data.tags
        for key in now.keys() - self.finished.tags.keys():
            run.client.delete_tag(self.run_id, key)
        run.set_tags({k: v for k, v in self.finished.tags.items() if now.get(k) != v})
        run.client.set_terminated(self.run_id, self.finished.status, end_time=self.finished.end_time)


@dataclass(frozen=True)
class RunInfo:
    status: str
    end_time: int | None
    tags: dict[str, str]


def last_checkpoint(run_id: str) -> Path:
    return paths.last_checkpoint(run_id)


def best_epoch_text(summary: dict) -> str:
    """`best epoch 2 of 2`: a training summary's best epoch counted from 1, as the progress bar counts (the summary
    keeps Lightning's 0-based index, as the checkpoints are named)."""
    return f"best epoch {summary['best_epoch'] + 1:.0f} of {summary['epochs']:.0f}"


def read_summary(run_id: str) -> dict:
    """The run's summary file (outputs/<run_id>/train.json), or nothing when it has none or it does not parse."""
    try:
        return json.loads((paths.run_dir(run_id) / paths.TRAIN_SUMMARY).read_text())
    except (OSError, ValueError):
        return {}


def newest_resumable(uri: str, experiment: str) -> str:
    """The most recently started train run of the experiment that has a last checkpoint here."""
    for run_id in newest_train_runs(uri, experiment):
        if last_checkpoint(run_id).is_file():
            return run_id
    raise VaelabError(
        f"resume=last: no train run of experiment '{experiment}' in {uri} has a last checkpoint "
        f"(outputs/<run_id>/checkpoints/last.ckpt under {paths.project_root()})"
    )


def requested(cfg: DictConfig) -> tuple[str | None, list[str]]:
    """The run `resume` names (`resume=<run>`, or `resume.run`) and the targets the user trusts (`resume.trust`)."""
    resume = cfg.get("resume")
    if isinstance(resume, DictConfig):
        return resume.get("run"), list(resume.get("trust") or [])
    return resume, []


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def is_allowed_with_resume(override: str) -> bool:
    key = override_key(override)
    return key in ALLOWED_WITH_RESUME or key.startswith("resume.")


def check_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    """Refuse the overrides a resume does not allow. It reads nothing but the command line, and resumption() calls
    it before importing torch: a refused command answers in about a second."""
    extra = [o for o in overrides if not is_allowed_with_resume(o)]
    if extra:
        raise ConfigError(
            [
                (
                    "resume",
                    requested(cfg)[0],
                    f"no other overrides ({' '.join(extra)}): a resumed run continues with its own config; "
                    f"only resume.trust, {', '.join(ALLOWED_WITH_RESUME[1:])} may come with it",
                )
            ]
        )


def resumption(cfg: DictConfig, overrides: list[str]) -> Resumption:
    """Which run `cfg.resume` names, its last checkpoint, its own config and its MLflow status; a clear error when
    any is missing, and a refusal, before anything is built from them, when they name a `_target_` that neither
    vaelab nor the user trusts, or when `trainer.max_epochs` (among `overrides`) would not extend the run.

    The refusals come in the order of their cost: the command line (no import), the run's files, its checkpoint and
    the extension (torch), then what its files name (importing those, Lightning among them). A run folder that names
    an untrusted target is refused even when the run has finished: its files were changed by someone."""
    check_overrides(cfg, overrides)
    from vaelab.checkpoints import read_checkpoint  # torch: imported once the command line has passed

    asked, trusted = requested(cfg)
    if asked is None:
        raise ConfigError([("resume.run", None, "`last` or an MLflow run id when resume.trust is given")])
    if asked == "last":
        run_id = newest_resumable(resolve_uri(cfg.tracking.uri), cfg.tracking.experiment)
    else:
        run_id = asked  # a run id: vaelab.schema checked its form

    checkpoint, config_file = last_checkpoint(run_id), paths.run_config(run_id)
    for path in (checkpoint, config_file):
        if not path.is_file():
            raise VaelabError(f"cannot resume run {run_id}: {path} does not exist")
    stored = OmegaConf.load(config_file)
    if "objective" not in stored:
        raise VaelabError(
            f"cannot resume run {run_id}: {config_file} was written by vaelab 0.1, whose runs vaelab {__version__} "
            "cannot continue (the objective, posterior and prior became components); start a new run"
        )
    stored.resume = run_id
    if any(override_key(o) == "tracking.uri" for o in overrides):
        stored.tracking.uri = cfg.tracking.uri  # the store moved, e.g. to a server: this command says where
    check_secrets_at_hand(run_id, stored)
    values = stored_values(run_id, config_file, stored)
    # weights_only: a pickle with code is refused here, before anything is built or reopened.
    state = read_checkpoint(checkpoint)
    # Lightning saves last.ckpt at the end of an epoch, before counting it: its `epoch` is that epoch's 0-based index.
    epochs_done = int(state.get("epoch", -1)) + 1
    extended_from = None
    asked_epochs = any(override_key(o) == "trainer.max_epochs" for o in overrides)
    if asked_epochs:
        check_extension(run_id, stored, epochs_done, int(cfg.trainer.max_epochs))
        if cfg.trainer.max_epochs != stored.trainer.max_epochs:
            extended_from = int(stored.trainer.max_epochs)
            stored.trainer.max_epochs = int(cfg.trainer.max_epochs)
    record = tracked_run(stored, run_id)
    status = record.info.status if record else None
    check_trusted(run_id, config_file, values, trusted)
    check_trusted(run_id, checkpoint, {k: state.get(k) for k in ("hyper_parameters", "vaelab")}, trusted)
    return Resumption(
        run_id=run_id,
        checkpoint=checkpoint,
        cfg=stored,
        epochs_done=epochs_done,
        extended_from=extended_from,
        status=status,
        summarised_epochs=summarised_epochs(run_id, stored, record, int(state.get("global_step", -1)), epochs_done),
        asked_epochs=asked_epochs,
    )


def check_extension(run_id: str, stored: DictConfig, epochs_done: int, asked: int) -> None:
    """Refuse, in one line and before anything is written, a trainer.max_epochs that would not train the run any
    further, or that its learning-rate schedule was not set for."""
    if asked <= epochs_done:
        raise VaelabError(
            f"cannot resume run {run_id} with trainer.max_epochs={asked}: allowed more than {epochs_done}, the epochs "
            "it has trained already (trainer.max_epochs counts them all)"
        )
    if stored.get("scheduler") is not None and asked != stored.trainer.max_epochs:
        raise VaelabError(
            f"cannot resume run {run_id} with trainer.max_epochs={asked}: its learning rate follows a schedule set "
            f"for its {stored.trainer.max_epochs} epochs (scheduler.T_max={stored.scheduler.get('T_max')}), which "
            "would run past its end; only a run without a scheduler can be extended"
        )


def tracked_run(stored: DictConfig, run_id: str):
    """The run's MLflow record (its status: FINISHED, KILLED, ...), or None when it is not tracked or its store does
    not have it (resuming it then says why, as before)."""
    if stored.get("logger") is None:
        return None
    check_store(stored.tracking.uri)  # a server that does not answer is named now, not after MLflow's retries
    uri = resolve_uri(stored.tracking.uri)
    if uri.startswith(SQLITE) and not Path(uri.removeprefix(SQLITE).partition("?")[0]).is_file():
        return None  # no store yet: looking must not create one
    try:
        return StoreClient(uri).get_run(run_id)
    except Exception:  # noqa: BLE001 - e.g. a run this store does not have: reopening it says so
        return None


# Logged once, by the end of training, at the global step it finished at.
FINISHING_METRIC = "val/nll_iw_se"


def summarised_epochs(run_id: str, stored: DictConfig, record, global_step: int, epochs_done: int) -> float | None:
    """The epochs the run's last finishing covered. Its summary file says; for a FINISHED run without one (runs kept
    none before), MLflow does: the end-of-training estimates were logged at the global step of the checkpoint they
    came from, so they covered all `epochs_done` when that is the last checkpoint's step."""
    summary = read_summary(run_id)
    if "epochs" in summary or record is None or record.info.status != "FINISHED":
        return summary.get("epochs")
    client = StoreClient(resolve_uri(stored.tracking.uri))
    steps = [metric.step for metric in client.get_metric_history(run_id, FINISHING_METRIC)]
    return float(epochs_done) if steps and max(steps) == global_step else None


def stored_values(run_id: str, config_file: Path, stored: DictConfig) -> dict:
    """The stored config as the values Hydra would instantiate (interpolations resolved, as instantiate does)."""
    try:
        return OmegaConf.to_container(stored, resolve=True)
    except Exception as error:  # noqa: BLE001 - any broken interpolation: the file is not a config vaelab wrote
        raise VaelabError(f"cannot resume run {run_id}: {config_file} does not resolve ({error})") from None


def check_trusted(run_id: str, source: Path, values: object, trusted: list[str]) -> None:
    """Refuse, in one line, when `values` (read from `source`) name a `_target_` nobody trusts."""
    from vaelab.training.builder import TRUSTED_TEXT, untrusted_targets

    found = untrusted_targets(values, trusted)
    if not found:
        return
    where = ", ".join(f"{place}._target_={target!r}" if place else f"_target_={target!r}" for place, target in found)
    names = sorted({str(target) for _, target in found} | set(trusted))
    raise VaelabError(
        f"cannot resume run {run_id}: {source} names {where}, which is not {TRUSTED_TEXT}; nothing from it was run. "
        f"If you trust it, name it again when resuming: +resume.run={run_id} '+resume.trust=[{','.join(names)}]'"
    )


def check_secrets_at_hand(run_id: str, stored: DictConfig) -> None:
    """A secret given as `${oc.env:VAR}` was stored as such: VAR must be set again. One given in plain text was
    never stored (the config file holds `***`): tracking.uri may be given again, any other cannot."""
    try:
        resolved = OmegaConf.to_container(stored, resolve=True)
    except InterpolationResolutionError as error:
        raise VaelabError(
            f"cannot resume run {run_id}: its {error.full_key} is read from the environment, and {error.msg}; "
            "set it again"
        ) from None
    missing = [key for key, value in flatten(resolved).items() if is_redacted(value)]
    if missing == ["tracking.uri"]:
        raise VaelabError(
            f"cannot resume run {run_id}: its tracking.uri held a password, which vaelab does not store; "
            f"give it again (resume={run_id} tracking.uri=...)"
        )
    if missing:
        raise VaelabError(
            f"cannot resume run {run_id}: its {', '.join(missing)} held a secret in plain text, which vaelab does not "
            "store; start a new run, and pass secrets as ${oc.env:VAR} to keep a run resumable"
        )
