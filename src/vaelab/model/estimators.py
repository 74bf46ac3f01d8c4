r"""Held-out evaluation of a trained VAE, in nats per image unless the name says bits.

    elbo           E_q[log p(x|z)] - KL(q(z|x) || p(z))           lower bound on log p(x)
    nll_iw         -log (1/k) sum_i p(x, z_i) / q(z_i|x)            upper bound on -log p(x); tightens with k
    inference_gap  -elbo - nll_iw                                   lower bound on E KL(q(z|x) || p(z|x))
    bpd            nll_iw / (C H W ln 2)                            bits per dimension
    active_units   #{d : Var_x(E_q[z_d]) > 0.01}                    Burda et al. (2016)
    mutual_info    I(x; z) under p_data(x) q(z|x), in nats           a lower bound; <= mutual_info_max = log N
    *_se           standard error across images                     is a difference between runs real?
    iw_ess         (sum_i w_i)^2 / sum_i w_i^2, mean over images     out of k: was k large enough?

Every quantity of one image uses the same fixed observation of it (binarized or dequantized once, by seed)
and the same k latents.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vaelab.model.distributions import LOG_2PI, gaussian_log_prob
from vaelab.model.objectives import bits_per_dim

# Latents decoded at once (k-chunk x images): bounds memory at about rows x pixels x a few floats.
# On a CPU, 4096 rows keep the working set in cache (benchmarks/README.md has the measurement).
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

    @property
    def mutual_info_max(self) -> float:
        """log N in nats: the most `mutual_info` can be on these N images, however much the code says about x."""
        return math.log(self.n_images)

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
            f"{prefix}/mutual_info_max": self.mutual_info_max,
        }


def active_units(posterior_means: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """#{d : Var_x(E_q[z_d|x]) > threshold} from posterior means [N, D] (Burda et al. 2016)."""
    return int((posterior_means.double().var(0) > threshold).sum())


@torch.inference_mode()
def mutual_information(mean: torch.Tensor, logvar: torch.Tensor, seed: int = 0, chunk: int = 1024) -> float:
    """A lower bound on I(x; z) under p_data(x) q(z|x) from these N images, in nats: the mean over images of
    log q(z_n|x_n) - log q(z_n), one z_n ~ q(z|x_n) each, with q(z) the mixture (1/N) sum_m q(z|x_m).

    It is 0 when every image has the same posterior, and it cannot exceed log N, which it reaches when the posteriors
    do not overlap, however much more the code says about x (the mean KL to the prior bounds I(x; z) from above).
    Near log N it measures N, not I(x; z); compare it only across runs evaluated on the same number of images.
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
def iw_batch(
    vae, x: torch.Tensor, k: int, rows: int, on_samples: Callable[[int], None] | None = None, q=None
) -> dict[str, torch.Tensor]:
    """Per-image importance-weighted log p(x), ELBO terms and ESS for one batch.

    Streams over chunks of the k samples, keeping log sum_i w_i and log sum_i w_i^2 in float32. `on_samples(n)` is
    called after each chunk of n latent samples (images x samples each), for a progress display. `q`: the proposal
    (a posterior Member for these images); the encoder's q(z|x) by default.
    """
    q = vae.encode(x) if q is None else q  # q(z|x) [B, D], encoded once for all k samples
    chunk = max(1, rows // len(x))
    log_sum_w = torch.full((len(x),), -math.inf, device=x.device)  # log sum_i w_i, [B]
    log_sum_w2 = torch.full((len(x),), -math.inf, device=x.device)  # log sum_i w_i^2, [B]
    sums = {"log_px_z": 0.0, "kl": 0.0, "kl_per_dim": 0.0}  # sums over the k samples (a closed-form KL: k times it)
    for start in range(0, k, chunk):
        out = vae.decode_pass(x, q, k=min(chunk, k - start))
        log_w = out.log_weights.float()  # [c, B]
        log_sum_w = torch.logaddexp(log_sum_w, torch.logsumexp(log_w, dim=0))
        log_sum_w2 = torch.logaddexp(log_sum_w2, torch.logsumexp(2 * log_w, dim=0))
        c = len(log_w)
        sums["log_px_z"] = sums["log_px_z"] + out.log_px_z.float().sum(0)
        sums["kl"] = sums["kl"] + c * out.kl.float()
        sums["kl_per_dim"] = sums["kl_per_dim"] + c * out.kl_per_dim.float()
        if on_samples is not None:
            on_samples(log_w.numel())
    rec, kl = -sums["log_px_z"] / k, sums["kl"] / k
    # I(x; z) needs q(z|x) at every image's z: a Gaussian's own density, the base Gaussian of a flow.
    mi_mean, mi_logvar = q.gaussian_marginals() or (q.mean, q.logvar)
    return {
        "log_px": log_sum_w - math.log(k),
        "elbo": -rec - kl,
        "rec": rec,
        "kl": kl,
        "ess": torch.exp(2 * log_sum_w - log_sum_w2),
        "kl_per_dim": sums["kl_per_dim"] / k,
        "expected_z": q.expected_z().float(),
        "mi_mean": mi_mean.float(),
        "mi_logvar": mi_logvar.float(),
    }


def chunking(vae, k: int) -> tuple[torch.device, int, int]:
    """The device, and how evaluate_images splits its work there: the rows decoded at once and images per batch."""
    device = next(vae.parameters()).device
    rows = ROWS.get(device.type, ROWS["cpu"])
    return device, rows, max(1, min(512, rows // k))


def evaluate_images(vae, images: torch.Tensor, k: int, on_samples: Callable[[int], None] | None = None) -> Evaluation:
    """Evaluate on fixed images [N, C, H, W] (already in the likelihood's representation).

    `on_samples(n)` is called after each chunk of n latent samples (of len(images) * k in all), for a progress
    display that moves even when one image's k samples take minutes."""
    device, rows, batch = chunking(vae, k)
    n = len(images)
    # One buffer per result for all the images, filled batch by batch. Keeping each batch's small result tensors
    # instead would leave them between the batches' large temporaries in glibc's heap, which then cannot reuse or
    # return that memory: with the VampPrior at k = 1000 the process grew by ~30 MB a batch, 24 GB for the test set.
    per_image: dict[str, torch.Tensor] = {}
    for start in range(0, n, batch):
        x = images[start : start + batch].to(device, non_blocking=True)
        for name, value in iw_batch(vae, x, k, rows, on_samples).items():
            if name not in per_image:
                per_image[name] = torch.empty((n, *value.shape[1:]), dtype=torch.float64)
            per_image[name][start : start + len(x)] = value.cpu()
    kl_per_dim = per_image["kl_per_dim"].mean(0)
    return Evaluation(
        n_images=n,
        k=k,
        dims=math.prod(images.shape[1:]),
        elbo=per_image["elbo"].mean().item(),
        elbo_se=standard_error(per_image["elbo"]),
        rec=per_image["rec"].mean().item(),
        kl=per_image["kl"].mean().item(),
        nll_iw=-per_image["log_px"].mean().item(),
        nll_iw_se=standard_error(per_image["log_px"]),
        iw_ess=per_image["ess"].mean().item(),
        active_units=active_units(per_image["expected_z"]),
        mutual_info=mutual_information(per_image["mi_mean"], per_image["mi_logvar"]),
        kl_per_dim=kl_per_dim.tolist(),
    )


def standard_error(values: torch.Tensor) -> float:
    return (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else float("nan")


@torch.inference_mode()
def estimated_seconds(vae, images: torch.Tensor, k: int, timings: int = 2) -> float:
    """How long evaluate_images(vae, images, k) will take, from timing one chunk of its work (the fastest of
    `timings`, so that a first call's set-up does not count) and counting the chunks."""
    device, rows, batch = chunking(vae, k)
    x = images[:batch].to(device)
    chunk = min(max(1, rows // len(x)), k)
    q = vae.encode(x)
    fastest = math.inf
    for _ in range(timings):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        _ = vae.decode_pass(x, q, k=chunk).log_weights  # the bound's terms, as evaluation computes them
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        fastest = min(fastest, time.perf_counter() - start)
    per_sample = fastest / (chunk * len(x))
    return per_sample * len(images) * k
