r"""Held-out evaluation of a trained VAE, in nats per image unless the name says bits.

    elbo           E_q[log p(x|z)] - KL(q(z|x) || p(z))           lower bound on log p(x)
    nll_iw         -log (1/k) sum_i p(x, z_i) / q(z_i|x)            upper bound on -log p(x); tightens with k
    inference_gap  -elbo - nll_iw                                   lower bound on E KL(q(z|x) || p(z|x))
    bpd            nll_iw / (C H W ln 2)                            bits per dimension
    active_units   #{d : Var_x(E_q[z_d]) > 0.01}                    Burda et al. (2016)
    mutual_info    I(x; z) under p_data(x) q(z|x), in nats           how much the code says about x; <= log N
    *_se           standard error across images                     is a difference between runs real?
    iw_ess         (sum_i w_i)^2 / sum_i w_i^2, mean over images     out of k: was k large enough?

Every quantity of one image uses the same fixed observation of it (binarized or dequantized once, by seed)
and the same k latents.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress

from vaelab import paths
from vaelab.data import fixed_observations
from vaelab.datasets import Settings, ensure_prepared, load_split
from vaelab.errors import CheckpointError, ConfigError, DataError
from vaelab.files import replacing_dir, write_json_atomic
from vaelab.objectives import LOG_2PI, bits_per_dim, gaussian_log_prob

# Latents decoded at once (k-chunk x images): bounds memory at about rows x pixels x a few floats.
# On a CPU, 4096 rows keep the working set in cache and ran 2x faster than 32768 (784 pixels, 2 cores).
ROWS = {"cpu": 1 << 12, "cuda": 1 << 18}
ACTIVE_UNIT_THRESHOLD = 0.01
COLLAPSE_FRACTION = 0.1


@dataclass
class Evaluation:
    """Averages over images, with standard errors across images: a difference between two runs smaller
    than a few standard errors is noise. `iw_ess` is the mean effective sample size of the importance
    weights, (sum w)^2 / sum w^2, out of k: near 1 means k was far too small for nll_iw to be tight."""

    n_images: int
    k: int
    dims: int
    elbo: float
    elbo_se: float
    rec: float
    kl: float
    nll_iw: float
    nll_iw_se: float
    iw_ess: float
    active_units: int
    mutual_info: float
    kl_per_dim: list[float]

    @property
    def inference_gap(self) -> float:
        return -self.elbo - self.nll_iw

    @property
    def bpd(self) -> float:
        return bits_per_dim(self.nll_iw, self.dims)

    @property
    def latent_dim(self) -> int:
        return len(self.kl_per_dim)

    def collapse_warning(self) -> str | None:
        """Posterior collapse: fewer than 10% of the latent dimensions carry information about x."""
        if self.active_units < COLLAPSE_FRACTION * self.latent_dim:
            return (
                f"posterior collapse: only {self.active_units} of {self.latent_dim} latent dimensions are active "
                f"(Var_x E_q[z_d] > {ACTIVE_UNIT_THRESHOLD}); KL {self.kl:.2f} nats"
            )
        return None

    def metrics(self, prefix: str = "test") -> dict[str, float]:
        return {
            f"{prefix}/elbo": self.elbo,
            f"{prefix}/elbo_se": self.elbo_se,
            f"{prefix}/rec": self.rec,
            f"{prefix}/kl": self.kl,
            f"{prefix}/nll_iw": self.nll_iw,
            f"{prefix}/nll_iw_se": self.nll_iw_se,
            f"{prefix}/bpd": self.bpd,
            f"{prefix}/inference_gap": self.inference_gap,
            f"{prefix}/iw_ess": self.iw_ess,
            f"{prefix}/active_units": float(self.active_units),
            f"{prefix}/mutual_info": self.mutual_info,
        }


def active_units(posterior_means: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """#{d : Var_x(E_q[z_d|x]) > threshold} from posterior means [N, D] (Burda et al. 2016)."""
    return int((posterior_means.double().var(0) > threshold).sum())


@torch.inference_mode()
def mutual_information(mean: torch.Tensor, logvar: torch.Tensor, seed: int = 0, chunk: int = 1024) -> float:
    """I(x; z) = E_{x, z ~ q(z|x)}[log q(z|x) - log q(z)] over these N images, in nats.

    The aggregate posterior q(z) is the mixture (1/N) sum_m q(z|x_m), evaluated at one z_n ~ q(z|x_n) per
    image. It is 0 when every image has the same posterior and at most log N when they do not overlap,
    so compare it across runs evaluated on the same number of images.
    """
    mean, logvar = mean.double(), logvar.double()
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed), dtype=mean.dtype)
    z = mean + torch.exp(0.5 * logvar) * noise  # [N, D]
    log_q_own = gaussian_log_prob(z, mean, logvar)  # [N]  log q(z_n | x_n)
    # log q(z_n | x_m) for all pairs as matrix products: sum_d (z_nd - m_md)^2 / v_md expanded, N^2 D flops in BLAS.
    precision = torch.exp(-logvar)  # [N, D]
    per_m = -0.5 * (LOG_2PI * mean.shape[1] + logvar.sum(1) + (mean.pow(2) * precision).sum(1))  # [N]
    log_q_mix = []
    for zc in z.split(chunk):
        pairs = per_m - 0.5 * (zc.pow(2) @ precision.T) + zc @ (mean * precision).T  # [c, N]
        log_q_mix.append(torch.logsumexp(pairs, dim=1) - math.log(len(z)))  # log q(z_n)
    return (log_q_own - torch.cat(log_q_mix)).mean().item()


@torch.inference_mode()
def iw_batch(vae, x: torch.Tensor, k: int, rows: int) -> dict[str, torch.Tensor]:
    """Per-image importance-weighted log p(x), ELBO terms and ESS for one batch.

    Streams over chunks of the k samples, keeping log sum_i w_i and log sum_i w_i^2 in float32.
    """
    mean, logvar = vae.encode(x)  # [B, D], encoded once for all k samples
    chunk = max(1, rows // len(x))
    log_sum_w = torch.full((len(x),), -math.inf, device=x.device)  # log sum_i w_i, [B]
    log_sum_w2 = torch.full((len(x),), -math.inf, device=x.device)  # log sum_i w_i^2, [B]
    sum_log_px_z = torch.zeros(len(x), device=x.device)
    for start in range(0, k, chunk):
        out = vae.decode_pass(x, mean, logvar, k=min(chunk, k - start))
        log_w = out.log_weights.float()  # [c, B]
        log_sum_w = torch.logaddexp(log_sum_w, torch.logsumexp(log_w, dim=0))
        log_sum_w2 = torch.logaddexp(log_sum_w2, torch.logsumexp(2 * log_w, dim=0))
        sum_log_px_z += out.log_px_z.float().sum(0)
    kl_per_dim = out.kl_per_dim.float()  # closed form, the same for every chunk
    rec = -sum_log_px_z / k
    return {
        "log_px": log_sum_w - math.log(k),
        "elbo": -rec - kl_per_dim.sum(-1),
        "rec": rec,
        "ess": torch.exp(2 * log_sum_w - log_sum_w2),
        "kl_per_dim": kl_per_dim,
        "mean": mean.float(),
        "logvar": logvar.float(),
    }


def evaluate_images(vae, images: torch.Tensor, k: int, description: str = "evaluating") -> Evaluation:
    """Evaluate on fixed images [N, C, H, W] (already in the likelihood's representation)."""
    device = next(vae.parameters()).device
    rows = ROWS.get(device.type, ROWS["cpu"])
    batch = max(1, min(512, rows // k))
    parts: dict[str, list[torch.Tensor]] = {}
    with Progress(transient=True) as progress:
        task = progress.add_task(f"{description} (k={k})", total=len(images))
        for start in range(0, len(images), batch):
            x = images[start : start + batch].to(device, non_blocking=True)
            for name, value in iw_batch(vae, x, k, rows).items():
                parts.setdefault(name, []).append(value.cpu())
            progress.advance(task, len(x))
    per_image = {name: torch.cat(values).double() for name, values in parts.items()}
    n = len(images)
    kl_per_dim = per_image["kl_per_dim"].mean(0)
    return Evaluation(
        n_images=n,
        k=k,
        dims=math.prod(images.shape[1:]),
        elbo=per_image["elbo"].mean().item(),
        elbo_se=standard_error(per_image["elbo"]),
        rec=per_image["rec"].mean().item(),
        kl=kl_per_dim.sum().item(),
        nll_iw=-per_image["log_px"].mean().item(),
        nll_iw_se=standard_error(per_image["log_px"]),
        iw_ess=per_image["ess"].mean().item(),
        active_units=active_units(per_image["mean"]),
        mutual_info=mutual_information(per_image["mean"], per_image["logvar"]),
        kl_per_dim=kl_per_dim.tolist(),
    )


def standard_error(values: torch.Tensor) -> float:
    return (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else float("nan")


# ----------------------------------------------------------------------------------------------
# The evaluate stage


def warn_if_collapsed(result: Evaluation, run=None) -> None:
    """Say so, on the console and as the run's `vaelab.warning` tag, when the posterior has collapsed."""
    warning = result.collapse_warning()
    if warning:
        print(f"vaelab: warning: {warning}")
        if run is not None:
            run.set_tags({"vaelab.warning": warning})


def write_kl_per_dim(kl_per_dim: list[float], path: Path) -> None:
    """test/kl_per_dim as CSV (dim, kl in nats): which latent dimensions carry information."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{d},{kl:.6f}\n" for d, kl in enumerate(kl_per_dim))
    path.write_text("dim,kl\n" + rows)


# Where a folder passed as ckpt= keeps its checkpoint: models/latest/, outputs/<run_id>/, or its checkpoints/.
CHECKPOINT_IN_FOLDER = ("model.ckpt", "checkpoints/best.ckpt", "best.ckpt")
# The config keys that fix a network's shapes and its test images, as evaluate compares them with a checkpoint.
MODEL_KEYS = ("arch", "likelihood", "model", "data")


def resolve_checkpoint(cfg: DictConfig) -> Path:
    """`ckpt=<file or folder>`, else the best checkpoint of `run_id=<id>`, else models/latest/model.ckpt."""
    from vaelab.resume import RUN_ID

    if cfg.get("ckpt") and cfg.get("run_id"):
        raise ConfigError([("ckpt", cfg.ckpt, f"null when run_id is given (run_id={cfg.run_id} names a checkpoint)")])
    if cfg.get("ckpt"):
        path, asked = Path(cfg.ckpt), f"ckpt={cfg.ckpt}"
        if path.is_dir():
            inside = [path / name for name in CHECKPOINT_IN_FOLDER if (path / name).is_file()]
            if not inside:
                raise CheckpointError(f"{asked}: a folder without {', '.join(CHECKPOINT_IN_FOLDER)} in it")
            path = inside[0]
    elif cfg.get("run_id"):
        if not RUN_ID.match(str(cfg.run_id)):
            raise ConfigError([("run_id", cfg.run_id, "null, or an MLflow run id (32 hex digits)")])
        path, asked = paths.run_dir(cfg.run_id) / "checkpoints" / "best.ckpt", f"run_id={cfg.run_id}"
    else:
        path, asked = paths.latest_model_dir() / "model.ckpt", "the default, models/latest/"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} ({asked}; train a model first, or pass ckpt=<path>)")
    return path


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


def model_entries(arch: dict, likelihood: dict, latent_dim: int, data: Settings) -> dict[str, object]:
    """A model and its data as flat, comparable entries named by their config keys."""
    settings = {f"data.{key}": value for key, value in asdict(data).items()}
    return {"arch": arch, "likelihood": likelihood, "model.latent_dim": latent_dim, **settings}


def check_checkpoint_fits(path: Path, module, cfg: DictConfig, keys: list[str]) -> Settings:
    """The checkpoint's data settings, after checking that it is the model the config's `keys` ask for.

    An evaluation of another model than the one asked for would report its numbers under the wrong name."""
    from vaelab.checkpoints import trained_with

    lineage, hparams = module.lineage, module.hparams
    if not isinstance(lineage.get("data"), dict) or "data_hash" not in lineage:
        raise CheckpointError(
            f"{path}: has no vaelab lineage (its data settings and data hash), so which test images belong to it "
            "is unknown; evaluate checkpoints written by vaelab training"
        )
    try:
        settings = Settings(**lineage["data"])
    except TypeError as error:
        raise CheckpointError(f"{path}: its lineage's data settings are unreadable ({error})") from error
    trained = model_entries(hparams["arch"], hparams["likelihood"], hparams["latent_dim"], settings)
    asked = model_entries(
        OmegaConf.to_container(cfg.arch, resolve=True),
        OmegaConf.to_container(cfg.likelihood, resolve=True),
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
    """Evaluate a checkpoint on the test split; write metrics/eval.json and plots/eval/; log into its run."""
    from vaelab.checkpoints import load_trained, sides
    from vaelab.figures import save_figures
    from vaelab.tracking import Run, check_server

    if cfg.get("logger") is not None:
        check_server(cfg.tracking.uri)  # before the work whose results it would receive
    path = resolve_checkpoint(cfg)
    torch.manual_seed(cfg.seed)  # the importance samples too: the same checkpoint gives the same numbers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = load_trained(path, map_location=device)
    lineage = module.lineage
    folder, manifest = ensure_prepared(check_checkpoint_fits(path, module, cfg, asked_keys(cfg)))
    if list(manifest["image_shape"]) != list(module.hparams["image_shape"]):
        raise CheckpointError(
            f"{path} was trained on {sides(module.hparams['image_shape'])} images, but its data settings now "
            f"give {sides(manifest['image_shape'])} images ({folder})"
        )
    if manifest["data_hash"] != lineage["data_hash"]:
        raise DataError(
            f"{folder} holds data {manifest['data_hash'][:12]}, but {path} was trained on "
            f"{lineage['data_hash'][:12]}; re-run prepare with the checkpoint's data settings"
        )
    test = load_split(folder, "test")
    images = fixed_observations(test, "test", type(module.vae.likelihood), manifest, cfg.eval.limit)

    result = evaluate_images(module.vae, images, k=cfg.eval.iw_k, description="test NLL")
    metrics = result.metrics("test")

    plots = paths.plots_dir() / "eval"
    with replacing_dir(plots) as fresh:  # no figure of an earlier evaluation survives
        save_figures(module.vae, images, test["labels"][: len(images)], result.kl_per_dim, fresh, seed=cfg.seed)
        write_kl_per_dim(result.kl_per_dim, fresh / "kl_per_dim.csv")
    summary = {**metrics, "eval/iw_k": cfg.eval.iw_k, "eval/n_images": result.n_images}
    write_json_atomic(paths.metrics_dir() / "eval.json", {**summary, "run_id": lineage.get("run_id")})

    run_id, run = lineage.get("run_id"), None
    if cfg.get("logger") is not None and run_id:
        try:
            run = Run.attach(cfg.tracking.uri, run_id)
        except Exception as error:  # noqa: BLE001 - a missing run must not lose the evaluation
            print(f"vaelab: results not logged to MLflow (run {run_id}: {error})")
        else:
            run.log_metrics(summary, step=0)
            run.log_artifact(plots, "evaluation")
            run.set_tags({"vaelab.eval.checkpoint": str(path), "vaelab.eval.iw_k": str(cfg.eval.iw_k)})
    warn_if_collapsed(result, run)
    return {**summary, "run_id": run_id}
