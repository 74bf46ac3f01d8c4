"""Resuming a killed or stopped run: `python pipelines/train.py resume=<run_id>` (or `resume=last`).

A resumed run is the same run, continued: it trains with the config it was started with (its
outputs/<run_id>/config.yaml), from its last checkpoint (weights, optimizer, scheduler, epoch, callbacks and
RNG state), on the same data (the data hash must match), and logs into the same MLflow run without logging
its params again (MLflow refuses changed param values).

Nothing read back from the run's folder runs unless trusted: every `_target_` in its config.yaml and in its last
checkpoint (hyper-parameters and lineage) must be on vaelab.training.builder's trusted list, or named again by the
user on this command line (`+resume.run=<run_id> '+resume.trust=[mypkg.MyCallback]'`). A refused resume stops
before the run is reopened, so the run's status and tags stay exactly as they were.

Its config file holds no secret (vaelab.redaction): one given as `${oc.env:VAR}` is read from the environment
again; a tracking.uri's password is given again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from vaelab import __version__, paths
from vaelab.checkpoints import read_checkpoint
from vaelab.errors import ConfigError, VaelabError
from vaelab.redaction import is_redacted
from vaelab.tracking.run import Run, flatten
from vaelab.tracking.store import newest_train_runs, resolve_uri
from vaelab.training.builder import TRUSTED_TEXT, untrusted_targets

# Overrides that may come with resume=: which run, what of it the user trusts, and where to find it. Anything else
# would change a run in flight.
ALLOWED_WITH_RESUME = ("resume", "tracking.uri", "tracking.experiment")


@dataclass
class Resumption:
    run_id: str
    checkpoint: Path
    cfg: DictConfig  # the run's own config
    finished: RunInfo | None = None  # a FINISHED run's status and tags before it was reopened

    def reopen(self, uri: str | None) -> Run:
        """The run, RUNNING again; a FINISHED one's record is kept, so that a failed resume can put it back."""
        before = Run.attach(uri, self.run_id)
        record = before.client.get_run(self.run_id)
        if record.info.status == "FINISHED":
            self.finished = RunInfo(record.info.status, record.info.end_time, dict(record.data.tags))
        return Run.reopen(uri, self.run_id)

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


def is_allowed_with_resume(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return key in ALLOWED_WITH_RESUME or key.startswith("resume.")


def resumption(cfg: DictConfig, overrides: list[str]) -> Resumption:
    """Which run `cfg.resume` names, its last checkpoint and its own config; a clear error when any is missing, and
    a refusal, before anything is built from them, when they name a `_target_` that neither vaelab nor the user
    trusts."""
    asked, trusted = requested(cfg)
    extra = [o for o in overrides if not is_allowed_with_resume(o)]
    if extra:
        raise ConfigError(
            [
                (
                    "resume",
                    asked,
                    f"no other overrides ({' '.join(extra)}): a resumed run continues with its own config; "
                    f"only resume.trust, {', '.join(ALLOWED_WITH_RESUME[1:])} may come with it",
                )
            ]
        )
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
    if any(o.lstrip("+").startswith("tracking.uri=") for o in overrides):
        stored.tracking.uri = cfg.tracking.uri  # the store moved, e.g. to a server: this command says where
    check_secrets_at_hand(run_id, stored)
    check_trusted(run_id, config_file, stored_values(run_id, config_file, stored), trusted)
    # weights_only: a pickle with code is refused here, before anything is built or reopened.
    state = read_checkpoint(checkpoint)
    check_trusted(run_id, checkpoint, {k: state.get(k) for k in ("hyper_parameters", "vaelab")}, trusted)
    return Resumption(run_id=run_id, checkpoint=checkpoint, cfg=stored)


def stored_values(run_id: str, config_file: Path, stored: DictConfig) -> dict:
    """The stored config as the values Hydra would instantiate (interpolations resolved, as instantiate does)."""
    try:
        return OmegaConf.to_container(stored, resolve=True)
    except Exception as error:  # noqa: BLE001 - any broken interpolation: the file is not a config vaelab wrote
        raise VaelabError(f"cannot resume run {run_id}: {config_file} does not resolve ({error})") from None


def check_trusted(run_id: str, source: Path, values: object, trusted: list[str]) -> None:
    """Refuse, in one line, when `values` (read from `source`) name a `_target_` nobody trusts."""
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
