"""Each variational family (and prior) on Fashion-MNIST: test NLL, ELBO and inference gap after the same training,
and the training throughput relative to the diagonal Gaussian, measured side by side in one process.

    .venv/bin/python benchmarks/families.py                         # the four families, prior=standard, 10 epochs
    .venv/bin/python benchmarks/families.py --priors                # adds prior=mog and prior=vamp (diag_gaussian)
    .venv/bin/python benchmarks/families.py --epochs 2 --limit 500  # a quick look
    .venv/bin/python benchmarks/families.py --priors --throughput-only  # the throughput table alone

Quality: `pipelines/train.py` then `pipelines/evaluate.py` for each combination (the default MLP VAE, 784-512-16,
Bernoulli, the plain ELBO, seed 0), in one project folder under --root, with `logger=none`; the numbers are read from
the evaluation's metrics/eval.json (test/nll_iw with k = --iw-k on the first --limit test images).
Throughput: training steps (forward, loss, backward, Adam) of each family's VAE on batches of 128 real images, the
families interleaved over --repeats rounds so that a busy machine slows them alike; the median images/s of each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from time import perf_counter

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ["diag_gaussian", "full_gaussian", "planar", "iaf"]
PRIORS = ["mog", "vamp"]


def run(*args: str, root: Path) -> None:
    env = {**os.environ, "VAELAB_ROOT": str(root)}
    done = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def quality(posterior: str, prior: str, args: argparse.Namespace, root: Path) -> dict[str, float]:
    common = [f"posterior={posterior}", f"prior={prior}", "logger=none", f"seed={args.seed}"]
    start = perf_counter()
    run(str(REPO / "pipelines/train.py"), *common, f"trainer.max_epochs={args.epochs}", root=root)
    trained = perf_counter() - start
    run(str(REPO / "pipelines/evaluate.py"), *common, f"eval.iw_k={args.iw_k}", f"eval.limit={args.limit}", root=root)
    metrics = json.loads((root / "metrics" / "eval.json").read_text())
    return {
        **{k: metrics[k] for k in ("test/nll_iw", "test/nll_iw_se", "test/elbo", "test/inference_gap")},
        "train_wall_s": trained,
    }


def throughputs(combinations: list[tuple[str, str]], repeats: int, steps: int, root: Path) -> dict[tuple, float]:
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vaelab.model.likelihoods import Bernoulli
    from vaelab.training.builder import build, build_vae

    train_split = torch.load(root / "data" / "processed" / "fashion_mnist" / "train.pt", weights_only=True)
    images = train_split["images"][: 128 * steps]
    batches = images.split(128)
    models = {}
    for posterior, prior in combinations:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"posterior={posterior}", f"prior={prior}"])
        c = OmegaConf.to_container(cfg, resolve=True)
        torch.manual_seed(0)
        latent_dim = c["model"]["latent_dim"]
        vae = build_vae([1, 28, 28], c["arch"], c["likelihood"], latent_dim, 256, c["posterior"], c["prior"])
        models[posterior, prior] = (vae, build(c["objective"]), torch.optim.Adam(vae.parameters(), lr=1e-3))
    rates: dict[tuple, list[float]] = {key: [] for key in models}
    for _ in range(repeats):
        for key, (vae, objective, optimizer) in models.items():
            start = perf_counter()
            for grey in batches:
                x = Bernoulli.observe(grey, 256).float()
                loss = objective.loss(vae(x, k=objective.latent_samples), 0.0)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            rates[key].append(len(images) / (perf_counter() - start))
    return {key: statistics.median(r) for key, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iw-k", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=2000, help="test images to evaluate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--priors", action="store_true", help="also prior=mog and prior=vamp with diag_gaussian")
    parser.add_argument("--repeats", type=int, default=5, help="throughput rounds")
    parser.add_argument("--steps", type=int, default=40, help="training steps per throughput round")
    parser.add_argument("--root", type=Path, default=None, help="project folder (default: a new temporary one)")
    parser.add_argument("--throughput-only", action="store_true", help="measure the training throughput alone")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="vaelab-families-"))
    root.mkdir(parents=True, exist_ok=True)

    combinations = [(f, "standard") for f in FAMILIES] + ([("diag_gaussian", p) for p in PRIORS] if args.priors else [])
    run(str(REPO / "pipelines/prepare.py"), root=root)
    rates = throughputs(combinations, args.repeats, args.steps, root)
    base = rates["diag_gaussian", "standard"]
    if args.throughput_only:
        print("\n| posterior | prior | train images/s | vs diag_gaussian |\n|---|---|---|---|")
        for (posterior, prior), rate in rates.items():
            print(f"| {posterior} | {prior} | {rate:.0f} | {rate / base:.2f}x |")
        return
    rows = []
    for posterior, prior in combinations:
        print(f"training and evaluating posterior={posterior} prior={prior} ...", flush=True)
        q = quality(posterior, prior, args, root)
        rows.append(
            f"| {posterior} | {prior} | {q['test/nll_iw']:.2f} ± {q['test/nll_iw_se']:.2f} | {q['test/elbo']:.2f} "
            f"| {q['test/inference_gap']:.2f} | {rates[posterior, prior]:.0f} | {rates[posterior, prior] / base:.2f}x "
            f"| {q['train_wall_s']:.0f} |"
        )
    print(
        f"\nFashion-MNIST, MLP 784-512-16, {args.epochs} epochs, seed {args.seed}; test/nll_iw with k = {args.iw_k} on "
        f"the first {args.limit} test images (nats per image)\n\n"
        "| posterior | prior | test/nll_iw | test/elbo | test/inference_gap | train images/s | vs diag_gaussian "
        "| train wall s |\n|---|---|---|---|---|---|---|---|"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
