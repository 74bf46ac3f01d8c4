"""Sweep throughput: trials per hour of one Hydra multirun, run one job at a time and as parallel jobs sharing the
machine (and its one GPU). Small VAEs leave most of an H100 idle, so several trials at once should finish more
trials per hour; this measures whether they do.

    .venv/bin/python benchmarks/sweeps.py                      # CPU: 8 trials, n_jobs 1 then 2
    python benchmarks/sweeps.py --device cuda --jobs 1,4,8     # one GPU shared by 1, 4 and 8 jobs

Every measurement runs the same sweep (`--sweep`, default: latent 2,8 x beta 1,4 x arch mlp,conv = 8 trials) with
`pipelines/train.py -m`, in a throw-away project root with its own MLflow store, so parent and child runs, summaries
and checkpoints are all written as in real use. n_jobs=1 is Hydra's basic launcher; more is the joblib launcher
(`hydra/launcher=joblib hydra.launcher.n_jobs=N`), each job a process of its own.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from time import perf_counter

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from throughput import compose_config, markdown_table, prepare_data  # noqa: E402
from throughput import parse_args as throughput_args  # noqa: E402

DEFAULT_SWEEP = "model.latent_dim=2,8 objective.beta=1,4 arch=mlp,conv"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--jobs", default=None, help="parallel jobs to measure, comma-separated (default: 1,2 on cpu; "
                   "1,4,8 on cuda)")  # fmt: skip
    p.add_argument("--sweep", default=DEFAULT_SWEEP, help=f"the swept overrides (default: {DEFAULT_SWEEP})")
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial (default: 2)")
    p.add_argument("--limit-train", type=int, default=10_000, help="training images per trial (default: 10,000)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="sweeps.md and the sweep logs go here")
    args = p.parse_args(argv)
    args.jobs = [int(n) for n in (args.jobs or ("1,4,8" if args.device == "cuda" else "1,2")).split(",")]
    return args


def sweep_command(args: argparse.Namespace, n_jobs: int) -> list[str]:
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    command = [sys.executable, str(REPO / "pipelines" / "train.py"), "-m", *args.sweep.split(),
               f"trainer.max_epochs={args.epochs}", f"trainer.accelerator={accelerator}",
               f"data.limit_train={args.limit_train}", "tracking.system_metrics=false"]  # fmt: skip
    if args.device == "cuda":
        command.append("trainer.precision=bf16-mixed")
    if n_jobs > 1:
        command += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}"]
    return command


def measure(args: argparse.Namespace, n_jobs: int, processed: Path) -> dict:
    """One whole sweep in a fresh project root (the prepared data linked in); its wall time and trial count."""
    root = Path(tempfile.mkdtemp(prefix="vaelab-sweep-bench-"))
    try:
        (root / "data" / "processed").mkdir(parents=True)
        (root / "data" / "processed" / processed.name).symlink_to(processed)
        env = {k: v for k, v in os.environ.items() if k not in ("DVC_ROOT", "MLFLOW_TRACKING_URI")}
        env["VAELAB_ROOT"] = str(root)
        # Each job would otherwise start one torch thread per core: n_jobs x cores threads fighting for the cores.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n_jobs)))
        log = args.out / f"sweep-jobs{n_jobs}.log"
        begun = perf_counter()
        with open(log, "w") as out:
            code = subprocess.call(sweep_command(args, n_jobs), cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        seconds = perf_counter() - begun
        trials = len(list(root.glob("outputs/*/checkpoints/best.ckpt")))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"n_jobs": n_jobs, "seconds": seconds, "trials": trials, "exit": code, "log": str(log)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = compose_config(throughput_args(["--device", args.device]))
    processed, _ = prepare_data(cfg)
    load = os.getloadavg()[0]
    header = (f"sweep: {args.sweep}; {args.epochs} epochs x {args.limit_train:,} images per trial; "
              f"device {args.device}; {os.cpu_count()} cores; load average at start {load:.1f}")  # fmt: skip
    print(header, flush=True)
    results = []
    for n_jobs in args.jobs:
        print(f"  n_jobs={n_jobs} ...", end=" ", flush=True)
        result = measure(args, n_jobs, processed)
        results.append(result)
        print(f"{result['trials']} trials in {result['seconds']:.0f} s (exit {result['exit']})", flush=True)
    base = results[0]["trials"] / results[0]["seconds"] if results and results[0]["trials"] else None
    rows = []
    for r in results:
        per_hour = 3600 * r["trials"] / r["seconds"]
        ratio = f"{(r['trials'] / r['seconds']) / base:.2f}" if base else "-"
        note = "" if r["exit"] == 0 else f"exit {r['exit']}, see {r['log']}"
        rows.append([str(r["n_jobs"]), str(r["trials"]), f"{r['seconds']:.0f}", f"{per_hour:,.0f}", ratio, note])
    table = markdown_table(["n_jobs", "trials", "wall s", "trials/hour", f"x n_jobs={args.jobs[0]}", "note"], rows)
    text = f"{header}\n\n{table}"
    print("\n" + text)
    (args.out / "sweeps.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
