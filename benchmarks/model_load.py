"""How long loading a trained model takes, and where the time goes: `mlflow.pyfunc.load_model("runs:/<id>/model")`
beside the plain-PyTorch reference (`torch.load` of the same checkpoint), each in a fresh process, as a user's
script or notebook pays it.

    .venv/bin/python benchmarks/model_load.py                 # trains one tiny digits model in a throw-away root
    .venv/bin/python benchmarks/model_load.py --repeats 5

Each measurement is a new interpreter (imports included, with the OS's file cache warm after the first), timed in
steps: importing torch, importing mlflow, resolving `runs:/<id>/model` and downloading its artifacts, building the
model from the folder (MLflow first checks that the installed packages satisfy the model's requirements, unless
`suppress_warnings=True`; measured both ways), the first `predict`. The reference does what any PyTorch user would:
import torch and `torch.load` the checkpoint (weights only). Printed as a markdown table of medians, with the
libraries each path imported that prediction does not need.
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from throughput import markdown_table  # noqa: E402

# Heavy libraries a prediction does not need: each one found in sys.modules after a load is time spent for nothing.
UNNEEDED = ("lightning", "torchmetrics", "optuna", "hydra", "matplotlib", "sklearn", "torchvision")

PYFUNC = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import mlflow
t2 = time.perf_counter()
from mlflow.artifacts import download_artifacts
folder = download_artifacts(f"runs:/{sys.argv[2]}/model", tracking_uri=sys.argv[1])
t3 = time.perf_counter()
model = mlflow.pyfunc.load_model(folder, suppress_warnings=sys.argv[3] == "quiet")
t4 = time.perf_counter()
import numpy as np
model.predict(np.zeros((2, 1, 8, 8), dtype=np.float32))
t5 = time.perf_counter()
print(json.dumps({"import torch": t1 - t0, "import mlflow": t2 - t1, "resolve + download": t3 - t2,
                  "build model": t4 - t3, "first predict": t5 - t4, "total": t5 - t0,
                  "modules": sorted({name.split(".")[0] for name in sys.modules})}))
"""

REFERENCE = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
t2 = time.perf_counter()
print(json.dumps({"import torch": t1 - t0, "build model": t2 - t1, "total": t2 - t0,
                  "modules": sorted({name.split(".")[0] for name in sys.modules})}))
"""

STEPS = ("import torch", "import mlflow", "resolve + download", "build model", "first predict", "total")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per path (median reported)")
    parser.add_argument("--root", type=Path, default=None, help="a project root holding a trained run (else train one)")
    return parser.parse_args(argv)


def train_tiny(root: Path) -> None:
    overrides = ["data=digits", "trainer.max_epochs=1", "eval.val_iw_k=4", "arch.hidden=[64]", "model.latent_dim=4"]
    env = {**os.environ, "VAELAB_ROOT": str(root)}
    subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "train.py"), *overrides],
        env=env,
        cwd=root,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def measure(code: str, *args: str, cwd: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="vaelab-model-load-"))
    if not list((root / "outputs").glob("*/checkpoints/best.ckpt")):
        print(f"training one tiny digits model in {root} ...", flush=True)
        train_tiny(root)
    [run_dir] = [p.parent.parent for p in (root / "outputs").glob("*/checkpoints/best.ckpt")][:1]
    run_id, uri = run_dir.name, f"sqlite:///{root / 'mlflow.db'}"

    default, quiet = "pyfunc.load_model(runs:/<id>/model)", "the same, suppress_warnings=True"
    results: dict[str, list[dict]] = {default: [], quiet: [], "torch.load (reference)": []}
    for repeat in range(args.repeats):
        results[default].append(measure(PYFUNC, uri, run_id, "checked", cwd=root))
        results[quiet].append(measure(PYFUNC, uri, run_id, "quiet", cwd=root))
        results["torch.load (reference)"].append(
            measure(REFERENCE, str(run_dir / "checkpoints" / "best.ckpt"), cwd=root)
        )
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)

    headers = ["path", *(f"{step} s" for step in STEPS), "unneeded imports"]
    rows = []
    for path, runs in results.items():
        cells = [path]
        for step in STEPS:
            values = [run[step] for run in runs if step in run]
            cells.append(f"{statistics.median(values):.2f}" if values else "-")
        unneeded = sorted(set.union(*(set(run["modules"]) for run in runs)) & set(UNNEEDED))
        rows.append([*cells, ", ".join(unneeded) or "none"])
    print(f"\nmedians of {args.repeats} fresh processes each (run {run_id}):\n")
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
