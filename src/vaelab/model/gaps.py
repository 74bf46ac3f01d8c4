r"""Where the inference gap goes: approximation against amortization (Cremer, Li & Duvenaud 2018).

    log p(x) - ELBO(q_phi) = [log p(x) - ELBO(q*)]  +  [ELBO(q*) - ELBO(q_phi)]
                               approximation gap        amortization gap

q_phi is the member of the family that the encoder picks for x; q* is the best member of the *same* family for
this x alone. q* is found by optimising the image's local variational parameters, initialised at the encoder's
output for x, with Adam on the ELBO, while the decoder, the prior and the family's own weights (IAF's MADE networks)
stay fixed. The local parameters are the encoder's outputs: (mean, logvar) for diag_gaussian, (mean, logvar, L's
lower triangle) for full_gaussian, (mean, logvar, u, w, b) for planar, (mean, logvar, h) for iaf.

The approximation gap is what the family cannot represent of p(z|x); the amortization gap is what the encoder
leaves on the table. Both ELBOs are estimated afterwards with fresh samples (not those the optimisation saw), and
log p(x) is the larger of the two importance-weighted estimates, with q_phi and with q* as the proposal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vaelab.model.estimators import chunking, iw_batch, standard_error

# Steps over which the refinement's progress is judged: the mean ELBO of the last WINDOW steps against the WINDOW
# before them (single steps are too noisy with a few samples each).
WINDOW = 50
# Images refined together: their parameters are independent, so a batch is many separate optimisations at once.
REFINE_BATCH = 100


@dataclass
class GapSplit:
    """Per-image estimates, in nats, on the first `n_images` images; the gaps as means with standard errors."""

    k: int
    log_px_encoder: torch.Tensor  # [N] the IW estimate with q_phi as the proposal
    log_px_refined: torch.Tensor  # [N] the IW estimate with q* as the proposal
    elbo_encoder: torch.Tensor  # [N] ELBO(q_phi)
    elbo_refined: torch.Tensor  # [N] ELBO(q*)
    steps: list[int]  # Adam steps taken by each batch of images

    @property
    def n_images(self) -> int:
        return len(self.elbo_encoder)

    @property
    def log_px(self) -> torch.Tensor:
        """[N] log p(x), estimated as the larger of the two importance-weighted estimates (both are lower bounds in
        expectation)."""
        return torch.maximum(self.log_px_encoder, self.log_px_refined)

    @property
    def approximation(self) -> torch.Tensor:
        return self.log_px - self.elbo_refined

    @property
    def amortization(self) -> torch.Tensor:
        return self.elbo_refined - self.elbo_encoder

    def metrics(self, prefix: str = "test") -> dict[str, float]:
        return {
            f"{prefix}/approximation_gap": self.approximation.mean().item(),
            f"{prefix}/approximation_gap_se": standard_error(self.approximation),
            f"{prefix}/amortization_gap": self.amortization.mean().item(),
            f"{prefix}/amortization_gap_se": standard_error(self.amortization),
            f"{prefix}/gaps_inference_gap": (self.log_px - self.elbo_encoder).mean().item(),
            f"{prefix}/gaps_nll_iw_encoder": -self.log_px_encoder.mean().item(),
            f"{prefix}/gaps_nll_iw_refined": -self.log_px_refined.mean().item(),
            f"{prefix}/gaps_elbo_refined": self.elbo_refined.mean().item(),
            f"{prefix}/gaps_n_images": float(self.n_images),
            f"{prefix}/gaps_steps": sum(self.steps) / len(self.steps),  # mean Adam steps before stopping
        }


def refine(vae, x: torch.Tensor, steps: int, samples: int, lr: float, tolerance: float) -> tuple[torch.Tensor, int]:
    """q*'s parameters for each image of x [B, ...]: the encoder's output for x [B, P], optimised with Adam on the
    ELBO (estimated with `samples` latents per image and step) for at most `steps` steps, the learning rate falling
    from `lr` to 0, or until WINDOW steps improve the mean ELBO by less than `tolerance` (a fraction of its size; a
    negative one never stops early). Returns the parameters and the steps taken."""
    weights = [p for p in vae.parameters() if p.requires_grad]
    for weight in weights:  # only the local parameters move; the model's gradients are not even computed
        weight.requires_grad_(False)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            params = vae.encoder(x).detach().clone().requires_grad_(True)
            optimizer = torch.optim.Adam([params], lr=lr)
            # The learning rate falls linearly to 0 over `steps`: with a noisy ELBO, a constant one would leave the
            # parameters wandering around q* instead of settling on it.
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1.0 - done / steps)
            history: list[float] = []
            step = 0
            for step in range(1, steps + 1):
                elbo = vae.decode_pass(x, vae.posterior(params), k=samples).elbo  # [B]
                optimizer.zero_grad(set_to_none=True)
                (-elbo.sum()).backward()  # a sum: each image's parameters get their own ELBO's gradient
                optimizer.step()
                schedule.step()
                history.append(elbo.mean().item())
                if step >= 2 * WINDOW and step % WINDOW == 0:
                    recent, before = sum(history[-WINDOW:]) / WINDOW, sum(history[-2 * WINDOW : -WINDOW]) / WINDOW
                    if recent - before < tolerance * abs(before):
                        break
    finally:
        for weight in weights:
            weight.requires_grad_(True)
    return params.detach(), step


def gap_split(
    vae,
    images: torch.Tensor,
    k: int,
    steps: int = 500,
    samples: int = 16,
    lr: float = 1e-2,
    tolerance: float = 1e-4,
    on_images: Callable[[int], None] | None = None,
) -> GapSplit:
    """Split the inference gap on `images` [N, C, H, W] (already in the likelihood's representation), with k
    importance samples for log p(x) and both ELBOs. `on_images(n)` is called as each batch of n images is done."""
    device, rows, _ = chunking(vae, k)
    parts: dict[str, list[torch.Tensor]] = {}
    taken: list[int] = []
    for start in range(0, len(images), REFINE_BATCH):
        x = images[start : start + REFINE_BATCH].to(device)
        params, used = refine(vae, x, steps, samples, lr, tolerance)
        taken.append(used)
        # Fresh samples for both: the refinement's own draws would flatter q*.
        for name, q in (("encoder", None), ("refined", vae.posterior(params))):
            out = iw_batch(vae, x, k, rows, q=q)
            parts.setdefault(f"log_px_{name}", []).append(out["log_px"].double().cpu())
            parts.setdefault(f"elbo_{name}", []).append(out["elbo"].double().cpu())
        if on_images is not None:
            on_images(len(x))
    return GapSplit(k=k, steps=taken, **{name: torch.cat(values) for name, values in parts.items()})
