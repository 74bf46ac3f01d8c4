"""The config's one typed schema: every key, its type and its range, and the keys each component option has.

A composed config (conf/train.yaml, or DVC's params.yaml) is checked by validating it against `Config`
(`vaelab.config.validate`). Models are strict (4.0 is not an integer, "true" is not a boolean) and closed (an
unknown key is an error). Each range is written once, as a pydantic constraint, and the text a user reads ("an
integer >= 1") is made from it. A component group (arch, likelihood, objective, posterior, prior) is a union of
small models told apart by `_target_`, so an option has exactly its own keys: `objective=iwae` has no `beta`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from vaelab.paths import RUN_ID

# Each activation names a torch.nn class in vaelab.model.networks (a test checks the two lists agree).
ACTIVATIONS = ("silu", "relu", "leaky_relu", "elu", "gelu", "tanh", "softplus")
TRACKING_SCHEMES = ("sqlite:///", "http://", "https://", "file:", "postgresql", "mysql", "databricks")

# What a search may optimize, with the direction that is better. All but val/nll_iw are logged every epoch, so a
# pruner can watch them; val/nll_iw is estimated once, after training.
SEARCH_METRICS = {"val/elbo": "maximize", "val/bpd": "minimize", "val/rec": "minimize", "val/nll_iw": "minimize"}
END_OF_TRAINING_METRICS = ("val/nll_iw",)


# Types that carry the text a user reads when a value is not allowed (the field's description).


def integer(low: int) -> Any:
    return Annotated[int, Field(ge=low, description=f"an integer >= {low}")]


def number(low: float) -> Any:
    # Finite: an infinite weight or rate turns every loss non-finite, and only after the run has started.
    return Annotated[float, Field(ge=low, allow_inf_nan=False, description=f"a number >= {low:g}")]


def optional(kind: Any, description: str | None = None) -> Any:
    """`kind` or null, described as such."""
    inner = next(meta for meta in get_args(kind)[1:] if getattr(meta, "description", None))
    return Annotated[kind | None, Field(description=description or f"null or {inner.description}")]


def one_of(*options: Any) -> Any:
    return Annotated[Literal[options], Field(description=f"one of {list(options)}")]


def text(description: str, check: Callable[[str], object] = bool) -> Any:
    """A string that `check` accepts."""

    def accept(value: str) -> str:
        if not check(value):
            raise ValueError(description)
        return value

    return Annotated[str, AfterValidator(accept), Field(description=description)]


def target(path: str) -> Any:
    """The `_target_` of a component option: the class or factory that builds it."""
    return Annotated[Literal[path], Field(alias="_target_", description=path)]


def problem(key: str, value: Any, allowed: str) -> PydanticCustomError:
    """A rule that spans keys: reported like any other key, with its own name, value and what is allowed."""
    return PydanticCustomError("vaelab", "{allowed}", {"key": key, "value": value, "allowed": allowed})


FLAG = Annotated[bool, Field(description="true or false")]
POSITIVE = Annotated[float, Field(gt=0, allow_inf_nan=False, description="a number > 0")]
# numpy's and Lightning's seeds are unsigned 32-bit integers.
SEED = Annotated[int, Field(ge=0, le=2**32 - 1, description=f"an integer in [0, {2**32 - 1}]")]
NAME = text("a non-empty string", str.strip)
SIZES = Annotated[
    list[Annotated[int, Field(gt=0)]],
    Field(min_length=1, description="a non-empty list of integers > 0 (layer sizes, or channels per stage)"),
]


def _is_dir(value: str) -> bool:
    return Path(value).is_dir()


EXISTING_DIR = text("an existing directory", _is_dir)


def holdout(low: int) -> Any:
    """A hold-out size: a count of images, or a fraction of them (what suits a folder of unknown size)."""
    count, fraction = Annotated[int, Field(ge=low)], Annotated[float, Field(gt=0, lt=1)]
    return Annotated[count | fraction, Field(description=f"an integer >= {low} or a fraction in (0, 1)")]


class Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True, frozen=True)


# data=<name>


class Data(Section):
    name: one_of("fashion_mnist", "mnist", "digits")
    root: optional(EXISTING_DIR) = None
    val_size: holdout(1)
    test_size: holdout(0)
    split_seed: SEED
    binarize_seed: SEED
    batch_size: integer(1)
    limit_train: optional(integer(1)) = None


def _grey_or_colour(channels: int | None) -> int | None:
    if channels not in (None, 1, 3):
        raise ValueError("null (auto), 1 or 3")
    return channels


class ImageFolder(Data):
    name: one_of("image_folder")
    # image_folder has no default source to fall back on: its images are wherever data.root points.
    root: text("an existing directory of images (data=image_folder reads data.root)", _is_dir)
    image_size: integer(4)
    # An integer, not Literal[1, 3]: a Literal would take `true` for 1.
    channels: Annotated[int | None, AfterValidator(_grey_or_colour), Field(description="null (auto), 1 or 3")] = None


# Components: arch=, likelihood=, objective=, posterior=, prior=


class Mlp(Section):
    target: target("vaelab.model.networks.build_mlp")
    hidden: SIZES
    activation: one_of(*ACTIVATIONS)


class Conv(Mlp):
    target: target("vaelab.model.networks.build_conv")


class ResNet(Mlp):
    target: target("vaelab.model.networks.build_resnet")
    blocks_per_stage: integer(0)


class Mlp2(Section):
    target: target("vaelab.model.hierarchy.build_mlp2")
    latent_dims: Annotated[
        list[Annotated[int, Field(gt=0)]],
        Field(min_length=2, max_length=2, description="two integers > 0, the sizes of z1 and z2"),
    ]
    hidden: SIZES
    top_hidden: SIZES
    activation: one_of(*ACTIVATIONS)


class Bernoulli(Section):
    target: target("vaelab.model.likelihoods.Bernoulli")


class Gaussian(Section):
    target: target("vaelab.model.likelihoods.Gaussian")
    variance: one_of("pixel", "global")
    min_std: POSITIVE


class DiscretizedLogistic(Section):
    target: target("vaelab.model.likelihoods.DiscretizedLogistic")


class ELBO(Section):
    target: target("vaelab.model.objectives.ELBO")
    beta: number(0)
    kl_warmup_epochs: integer(0)
    free_bits: number(0)


class Capacity(Section):
    target: target("vaelab.model.objectives.Capacity")
    nats: number(0)
    epochs: integer(0)
    gamma: POSITIVE


class IWAE(Section):
    target: target("vaelab.model.objectives.IWAE")
    k: integer(2)
    dreg: FLAG


class DiagonalGaussian(Section):
    target: target("vaelab.model.posteriors.DiagonalGaussian")


class FullGaussian(Section):
    target: target("vaelab.model.posteriors.FullGaussian")


class Planar(Section):
    target: target("vaelab.model.flows.Planar")
    steps: integer(1)


class IAF(Section):
    target: target("vaelab.model.flows.IAF")
    steps: integer(1)
    hidden: SIZES
    context: integer(1)


class StandardNormal(Section):
    target: target("vaelab.model.priors.StandardNormal")


class MixtureOfGaussians(Section):
    target: target("vaelab.model.mixture_priors.MixtureOfGaussians")
    components: integer(1)


class VampPrior(Section):
    target: target("vaelab.model.mixture_priors.VampPrior")
    components: integer(1)


# Components told apart by `_target_`: the group's options, for the error that lists them.
COMPONENTS: dict[str, tuple[type[Section], ...]] = {
    "arch": (Mlp, Conv, ResNet, Mlp2),
    "likelihood": (Bernoulli, Gaussian, DiscretizedLogistic),
    "objective": (ELBO, Capacity, IWAE),
    "posterior": (DiagonalGaussian, FullGaussian, Planar, IAF),
    "prior": (StandardNormal, MixtureOfGaussians, VampPrior),
}


def _union(options: tuple[type[Section], ...]) -> Any:
    """One of the group's options, chosen by `_target_`."""
    if len(options) == 1:
        return options[0]
    return Annotated[Union[options], Field(discriminator="target")]  # noqa: UP007 (a tuple of types)


# The rest of the config


class Model(Section):
    latent_dim: integer(1)


PARTIAL = Annotated[Literal[True], Field(alias="_partial_", description="true (the module completes the call)")]


class Optim(Section):
    target: Annotated[str, Field(alias="_target_", description="a torch.optim optimizer class")]
    partial: PARTIAL
    lr: POSITIVE
    weight_decay: number(0)
    fused: FLAG


class CosineSchedule(Section):
    target: target("torch.optim.lr_scheduler.CosineAnnealingLR")
    partial: PARTIAL
    T_max: integer(1)  # noqa: N815 (torch's name)
    eta_min: number(0) = 0.0


class Trainer(Section):
    # Any other argument of lightning.pytorch.Trainer may be added (+trainer.accumulate_grad_batches=2): Lightning
    # checks those itself when the trainer is built.
    model_config = ConfigDict(extra="allow")
    target: Annotated[str, Field(alias="_target_", description="lightning.pytorch.Trainer")]
    max_epochs: integer(1)
    gradient_clip_val: Annotated[POSITIVE | None, Field(description="null or a number > 0")] = None
    precision: Annotated[str | int, Field(description="a Lightning precision, e.g. 32-true or 16-mixed")]


class Eval(Section):
    iw_k: integer(1)
    val_iw_k: integer(1)
    val_limit: optional(integer(1)) = None
    limit: optional(integer(1)) = None
    max_minutes: optional(number(0)) = 120.0
    after_train: FLAG = False
    gaps: FLAG = False
    gaps_limit: integer(1) = 500
    gaps_steps: integer(1) = 500
    gaps_samples: integer(1) = 16
    gaps_lr: POSITIVE = 1.0e-2
    gaps_tolerance: number(0) = 1.0e-4


def _is_uri(value: str) -> bool:
    """Well-formed as MLflow reads it: the scheme's own parts are there (a host, a file, a database)."""
    if not value.startswith(TRACKING_SCHEMES) or any(c.isspace() or not c.isprintable() for c in value):
        return False
    if value == "databricks":  # the default Databricks profile
        return True
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 (parsing it is the check: a port that is not a number in range raises)
    except ValueError:
        return False
    if parts.scheme == "sqlite":  # sqlite:///<file>, the file relative to the project or, with a 4th slash, absolute
        file = value.removeprefix("sqlite:///").split("?")[0]
        return bool(file) and not file.endswith("/") and not parts.netloc
    if parts.scheme in ("http", "https"):
        return bool(parts.hostname)
    if parts.scheme == "file":
        return bool(parts.path)
    return "://" in value and bool(parts.netloc or parts.path.strip("/"))  # databases, databricks://<profile>


def _is_model_name(value: str) -> bool:
    """What MLflow's model registry accepts (checked by MLflow's own rule, so only when a name is given)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(value)
    except MlflowException:
        return False
    return True


URI_TEXT = (
    "an MLflow tracking URI: sqlite:///<file> (relative to the project) or sqlite:////<absolute file>, "
    "http(s)://<host>[:port], file:<folder>, a database URL (postgresql://..., mysql://...) or databricks"
)
MODEL_NAME_TEXT = "a model registry name: non-empty, without '/' or ':', not starting with '..'"
ALIAS_TEXT = "a model registry alias: letters, digits, '_' and '-', not 'latest' nor a version such as 'v3'"


def _is_model_alias(value: str) -> bool:
    """What MLflow's model registry accepts as an alias (by MLflow's own rules: its characters, and no name it
    keeps for itself)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved

    try:
        _validate_model_alias_name(value)
        _validate_model_alias_name_reserved(value)
    except MlflowException:
        return False
    return True


class Tracking(Section):
    uri: optional(text(URI_TEXT, _is_uri)) = None
    # MLflow's limit; the name is encoded where it becomes a folder (vaelab.tracking.store.artifact_location).
    experiment: text("a non-empty string of at most 500 characters", lambda v: v.strip() and len(v) <= 500)
    run_name: Annotated[str | None, Field(description="null or a string")] = None
    system_metrics: FLAG
    register_as: optional(text(MODEL_NAME_TEXT, _is_model_name)) = None
    alias: optional(text(ALIAS_TEXT, _is_model_alias)) = None
    lock_timeout_s: number(0)

    @model_validator(mode="after")
    def _alias_of_a_registered_model(self) -> Tracking:
        # An alias names a version of the model that register_as registers: without one it would name nothing.
        if self.alias is not None and self.register_as is None:
            raise problem("tracking.alias", self.alias, "null unless tracking.register_as names the model to register")
        return self


class Logger(Section):
    target: Annotated[str, Field(alias="_target_", description="an MLflow logger class of vaelab.stages.logger")]
    log_model: FLAG


class Callback(Section):
    model_config = ConfigDict(extra="allow")  # a callback's own arguments
    target: Annotated[str, Field(alias="_target_", description="a Lightning Callback class")]


RUN_ID_TEXT = "null, or an MLflow run id (32 hex digits)"
RESUME_TEXT = "null, `last`, or an MLflow run id (32 hex digits)"
RESUME_RUN = optional(text(RESUME_TEXT, lambda v: v == "last" or re.fullmatch(RUN_ID, v)), RESUME_TEXT)
DOTTED_NAME = text("a dotted name (mypkg.MyCallback)", lambda v: re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", v))


class Resume(Section):
    """`resume=<run_id>` in full: the run, and the `_target_`s its stored config names that the user trusts.

    A stored config is a file, which anyone who can write to the run's folder may have changed: its `_target_`s
    outside vaelab.training.builder's trusted list run only when the user names them here, on the command line."""

    run: RESUME_RUN = None
    trust: Annotated[list[DOTTED_NAME], Field(description="a list of dotted names (mypkg.MyCallback)")] = []


RESUME_FORMS = f"{RESUME_TEXT}; or resume.run=<that> with resume.trust=[<dotted names>]"


class Config(Section):
    """conf/train.yaml, composed."""

    data: Annotated[Data | ImageFolder, Field(discriminator="name")]
    arch: _union(COMPONENTS["arch"])
    likelihood: _union(COMPONENTS["likelihood"])
    objective: _union(COMPONENTS["objective"])
    posterior: _union(COMPONENTS["posterior"])
    prior: _union(COMPONENTS["prior"])
    trainer: Trainer
    logger: Logger | None = None
    model: Model
    optim: Optim
    scheduler: _union((CosineSchedule,)) | None = None
    eval: Eval
    tracking: Tracking
    callbacks: dict[str, Callback] = {}
    compile: FLAG
    channels_last: FLAG
    nan_policy: one_of("fail", "skip")
    seed: SEED
    ckpt: Annotated[str | None, Field(description="null or a checkpoint path")] = None
    run_id: optional(text(RUN_ID_TEXT, lambda v: re.fullmatch(RUN_ID, v)), RUN_ID_TEXT) = None
    resume: Annotated[RESUME_RUN | Resume, Field(description=RESUME_FORMS)] = None
    sweep: dict[str, Any] | None = None
    publish: FLAG = False

    @model_validator(mode="after")
    def _across_keys(self) -> Config:
        if self.ckpt is not None and self.run_id is not None:
            raise problem("ckpt", self.ckpt, f"null when run_id is given (run_id={self.run_id} names a checkpoint)")
        # logger=mlflow_server logs to a server, so tracking.uri must name one.
        to_server = self.logger is not None and self.logger.target.endswith("ServerRunLogger")
        if to_server and not (self.tracking.uri or "").startswith(("http://", "https://")):
            allowed = "an http:// or https:// server URI when logger=mlflow_server"
            raise problem("tracking.uri", self.tracking.uri, allowed)
        # DReG scores the drawn latents under q with its parameters held fixed, which needs q's density at any z;
        # a flow's transform has no closed-form inverse.
        if isinstance(self.objective, IWAE) and self.objective.dreg and isinstance(self.posterior, Planar | IAF):
            allowed = "false with a flow posterior (planar, iaf): DReG needs log q(z|x) at any z, which a flow lacks"
            raise problem("objective.dreg", True, allowed)
        # The VampPrior is a mixture of q(z|u_k) at pseudo-inputs u_k; with two layers the prior is p(z2), and z2 is
        # not what the encoder's family describes (that is q(z1|x)).
        if isinstance(self.arch, Mlp2) and isinstance(self.prior, VampPrior):
            allowed = "standard or mog with arch=mlp2 (the prior is p(z2), the encoder's family is q(z1|x))"
            raise problem("prior", "vamp", allowed)
        # Lightning's 16-bit gradient scaler cannot clip the gradients of an optimizer that unscales in its step.
        clipped = self.trainer.gradient_clip_val is not None
        if str(self.trainer.precision).startswith("16") and clipped and self.optim.fused:
            allowed = "false when trainer.precision is 16-bit and trainer.gradient_clip_val is set"
            raise problem("optim.fused", True, allowed)
        return self


# hydra/sweeper=optuna (hparams_search=<name>): checked on top of Config by the search. Its rules name keys under
# hydra.sweeper.

SWEEPER = "hydra.sweeper"
STORAGE_TEXT = "null (optuna.db at the project root) or an SQLAlchemy URL (sqlite:///..., postgresql+psycopg://...)"


# A study's name reaches file names, comments in reproduce.sh and best_<study>.yaml, and log lines: one line.
STUDY_NAME = text("a non-empty single line of printable characters", lambda v: v.strip() and v.isprintable())
OPTUNA_PART = Annotated[dict[str, Any], Field(description="a config with the _target_ of an Optuna class")]


class OptunaSweeper(Section):
    study_name: STUDY_NAME
    storage: optional(text(STORAGE_TEXT, lambda v: re.match(r"[a-z][a-z0-9+]*://", v)), STORAGE_TEXT) = None
    n_trials: integer(1)
    n_jobs: optional(integer(1)) = None
    # A running trial records a heartbeat; one silent for the grace period (its process died) is marked FAIL and
    # retried, so a crashed worker's trial neither blocks the study nor is waited for forever. Optuna takes whole
    # seconds.
    heartbeat_interval: integer(1)
    grace_period: integer(1)
    max_retry: integer(0)
    metric: one_of(*SEARCH_METRICS)
    direction: one_of("maximize", "minimize")
    sampler: OPTUNA_PART
    pruner: OPTUNA_PART
    params: dict[str, Any] | None = None  # vaelab.search.space checks each parameter

    @model_validator(mode="after")
    def _across_keys(self) -> OptunaSweeper:
        if self.direction != SEARCH_METRICS[self.metric]:
            allowed = f"{SEARCH_METRICS[self.metric]} for {SWEEPER}.metric={self.metric}"
            raise problem("direction", self.direction, allowed)
        pruner = str(self.pruner.get("_target_"))
        if self.metric in END_OF_TRAINING_METRICS and not pruner.endswith(".NopPruner"):
            allowed = f"none (hydra/sweeper/pruner=none) for {SWEEPER}.metric={self.metric}: estimated after training"
            raise problem("pruner._target_", pruner, allowed)
        if self.grace_period <= self.heartbeat_interval:
            # a live worker would be taken for dead between two of its own heartbeats
            allowed = f"an integer > {SWEEPER}.heartbeat_interval ({self.heartbeat_interval})"
            raise problem("grace_period", self.grace_period, allowed)
        return self
