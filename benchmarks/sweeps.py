"""Sweep throughput: trials per hour of one Hydra multirun, run one job at a time and as parallel jobs sharing the
machine (and its one GPU). Small VAEs leave most of an H100 idle, so several trials at once should finish more
trials per hour; this measures whether they do.

    .venv/bin/python benchmarks/sweeps.py                      # CPU: 8 trials, n_jobs 1 then 2
    python benchmarks/sweeps.py --device cuda --jobs 1,4,8     # one GPU shared by 1, 4 and 8 jobs
    .venv/bin/python benchmarks/sweeps.py --fixed-cost         # what a job and a process cost beyond training

Every measurement runs the same sweep (`--sweep`, default: latent 2,8 x beta 1,4 x arch mlp,conv = 8 trials) with
`pipelines/train.py -m`, in a throw-away project root with its own MLflow store, so parent and child runs, summaries
and checkpoints are all written as in real use. n_jobs=1 is Hydra's basic launcher; more is the joblib launcher
(`hydra/launcher=joblib hydra.launcher.n_jobs=N`), each job a process of its own.
"""

from __future__ import annotations

import argparse
import csv
import json
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

CODE = REPO  # the checkout measured by --fixed-cost (--code)
DEFAULT_SWEEP = "model.latent_dim=2,8 objective.beta=1,4 arch=mlp,conv"
# A run's phases (vaelab.stages.phases.PHASES), in order; spelled out so that older code can be measured too.
PHASES = ("setup", "fit", "estimates", "figures", "model_logging", "publish", "evaluation")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--jobs", default=None, help="parallel jobs to measure, comma-separated (default: 1,2 on cpu; "
                   "1,4,8 on cuda)")  # fmt: skip
    p.add_argument("--sweep", default=DEFAULT_SWEEP, help=f"the swept overrides (default: {DEFAULT_SWEEP})")
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial (default: 2)")
    p.add_argument("--limit-train", type=int, default=10_000, help="training images per trial (default: 10,000)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="sweeps.md and the sweep logs go here")
    p.add_argument("--fixed-cost", action="store_true", help="instead: a job's cost beyond its training loop (from "
                   "1-job and N-job digits sweeps on one core) and the training path's import time")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="--fixed-cost: medians of this many runs (default: 3)")
    p.add_argument("--fixed-jobs", type=int, default=9, help="--fixed-cost: jobs of the longer sweep (default: 9)")
    p.add_argument("--code", type=Path, default=REPO, help="--fixed-cost: the checkout whose pipelines and src/ run "
                   "(default: this one), e.g. a worktree of an earlier commit, to compare in one sitting")  # fmt: skip
    args = p.parse_args(argv)
    global CODE
    CODE = args.code.resolve()
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


def project_env(root: Path, threads: str) -> dict[str, str]:
    """This environment for a run in the project `root` with `threads` torch threads, without a DVC root or an
    MLflow URI that would send it elsewhere; the measured checkout's code first on the path (see --code)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_ROOT", "MLFLOW_TRACKING_URI")}
    path = os.pathsep.join(filter(None, [str(CODE / "src"), env.get("PYTHONPATH")]))
    return {**env, "VAELAB_ROOT": str(root), "OMP_NUM_THREADS": threads, "PYTHONPATH": path}


def measure(args: argparse.Namespace, n_jobs: int, processed: Path) -> dict:
    """One whole sweep in a fresh project root (the prepared data linked in); its wall time and trial count."""
    root = Path(tempfile.mkdtemp(prefix="vaelab-sweep-bench-"))
    try:
        (root / "data" / "processed").mkdir(parents=True)
        (root / "data" / "processed" / processed.name).symlink_to(processed)
        # Each job would otherwise start one torch thread per core: n_jobs x cores threads fighting for the cores.
        threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n_jobs)))
        env = project_env(root, threads)
        log = args.out / f"sweep-jobs{n_jobs}.log"
        begun = perf_counter()
        with open(log, "w") as out:
            code = subprocess.call(sweep_command(args, n_jobs), cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        seconds = perf_counter() - begun
        trials = len(list(root.glob("outputs/*/checkpoints/best.ckpt")))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"n_jobs": n_jobs, "seconds": seconds, "trials": trials, "exit": code, "log": str(log)}


# One core, one torch thread: the protocol for fixed costs, so a neighbour's load or a second thread's spinning
# does not pass for vaelab's own time.
PINNED = ["taskset", "-c", "0"]


def timed(command: list[str], root: Path) -> float:
    begun = perf_counter()
    subprocess.run(PINNED + command, cwd=root, env=project_env(root, "1"), check=True, capture_output=True)
    return perf_counter() - begun


DIGITS = ["data=digits", "trainer.max_epochs=2", "trainer.accelerator=cpu", "tracking.system_metrics=false"]


def digits_sweep(root: Path, jobs: int) -> dict:
    """A `jobs`-job digits sweep (2 epochs each) in the fresh project `root`: its wall seconds, the seconds its jobs
    spent in their training loops (from each job's images/s and the training images), and each job's phases as its
    run logged them (`time/<phase>_s`, vaelab.stages.phases; none where the code predates them)."""
    betas = ",".join(str(b + 1) for b in range(jobs))
    command = [sys.executable, str(CODE / "pipelines" / "train.py"), "-m", *DIGITS, f"objective.beta={betas}"]
    seconds = timed(command, root)
    [summary] = root.glob("outputs/*/summary.csv")
    n_train = digits_train_count(root)
    rows = list(csv.DictReader(summary.open()))
    training = sum(2 * n_train / float(row["train/images_per_sec"]) for row in rows)
    children = child_runs(root)
    phases = [{k[5:-2]: v for k, v in run.data.metrics.items() if k.startswith("time/")} for run in children]
    steady = steady_job_seconds(children) if jobs >= 3 else None
    return {"seconds": seconds, "training": training, "phases": phases, "steady": steady}


def digits_train_count(root: Path) -> int:
    manifest = json.loads(next(root.glob("data/processed/*/manifest.json")).read_text())
    return manifest["splits"]["train"]["count"]


def child_runs(root: Path) -> list:
    """The sweep's child runs, from its own MLflow store, in the order they started."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    return sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.start_time)


def steady_job_seconds(children: list) -> float:
    """A job's wall time once the process is warm: the median time from one child run's start to the next's, the
    first job's (which pays the first figure's, model's and store's one-off costs) left out. Each interval holds a
    whole job: Hydra's part, the training run, and the sweep's bookkeeping."""
    starts = [run.info.start_time / 1000 for run in children]
    return median([later - earlier for earlier, later in zip(starts[1:-1], starts[2:], strict=True)])


def bare_loop_seconds(root: Path) -> float:
    """The same 2 digits epochs (model, batch size, Adam) as a plain PyTorch loop: throughput.py's bare worker,
    pinned like the sweeps, on the data the sweep prepared in `root`."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="train", overrides=DIGITS), resolve=True)
    [manifest_file] = root.glob("data/processed/*/manifest.json")
    manifest = json.loads(manifest_file.read_text())
    spec = {"config": cfg, "data_folder": str(manifest_file.parent), "image_shape": manifest["image_shape"],
            "grey_levels": manifest["grey_levels"], "device": "cpu", "precision": "32-true",
            "batch_size": cfg["data"]["batch_size"], "epochs": 2, "warmup_epochs": 0, "limit_train": None,
            "seed": cfg["seed"], "threads": 1}  # fmt: skip
    spec_file, result_file = root / "bare.spec.json", root / "bare.result.json"
    spec_file.write_text(json.dumps(spec))
    worker = [sys.executable, str(HERE / "throughput.py"), "--worker", "bare", "--spec", str(spec_file),
              "--result", str(result_file)]  # fmt: skip
    timed(worker, root)
    return json.loads(result_file.read_text())["seconds"]


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def fixed_cost(args: argparse.Namespace) -> None:
    """A sweep job's cost beyond its training loop, where it goes, and a process's cost of importing the training
    path; beside them, a bare PyTorch loop's time for the same training."""
    load = os.getloadavg()[0]
    one: list[dict] = []
    many: list[dict] = []
    bare: list[float] = []
    imports: dict[str, list[float]] = {"import torch": [], "import vaelab.stages.train": []}
    for _ in range(args.repeats):
        for jobs, into in ((1, one), (args.fixed_jobs, many)):
            root = Path(tempfile.mkdtemp(prefix="vaelab-fixed-cost-"))
            try:
                into.append(digits_sweep(root, jobs))
                if jobs == 1:
                    bare.append(bare_loop_seconds(root))
            finally:
                shutil.rmtree(root, ignore_errors=True)
        for statement, times in imports.items():
            times.append(timed([sys.executable, "-c", statement], CODE))
    per_job = median([(m["seconds"] - o["seconds"]) / (args.fixed_jobs - 1) for o, m in zip(one, many, strict=True)])
    steady = median([m["steady"] for m in many])
    training = median([m["training"] / args.fixed_jobs for m in many])
    torch_s, train_s = (median(times) for times in imports.values())
    rows = [
        ["1-job digits sweep, wall s", f"{median([o['seconds'] for o in one]):.1f}"],
        [f"{args.fixed_jobs}-job digits sweep, wall s", f"{median([m['seconds'] for m in many]):.1f}"],
        ["each extra job (the sweeps' difference over the extra jobs), s", f"{per_job:.2f}"],
        ["a warm job (from one child run's start to the next's), s", f"{steady:.2f}"],
        ["  of which its training loop, s", f"{training:.2f}"],
        ["  fixed cost (the rest), s", f"{steady - training:.2f}"],
        ["bare PyTorch loop, the same 2 epochs, s", f"{median(bare):.2f}"],
    ]
    phases = [p for m in many for p in m["phases"][1:]]  # warm jobs: the first pays one-off costs
    if any(phases):  # runs log their phases since vaelab.stages.phases
        rows.append(["a warm job's phases (its run's time/<phase>_s, median over jobs), s", ""])
        seen = [name for name in PHASES if any(name in p for p in phases)]
        medians = {name: median([p.get(name, 0.0) for p in phases]) for name in seen}
        rows += [[f"  {name}", f"{seconds:.2f}"] for name, seconds in medians.items()]
        rows.append(["  Hydra and the sweep's bookkeeping (the rest of a warm job), s",
                     f"{steady - sum(medians.values()):.2f}"])  # fmt: skip
    rows += [
        ["import torch, s", f"{torch_s:.2f}"],
        ["import vaelab.stages.train, s", f"{train_s:.2f} ({train_s / torch_s:.1f}x import torch)"],
    ]
    header = (f"fixed costs: median of {args.repeats}, taskset -c 0, OMP_NUM_THREADS=1, digits, 2 epochs per job; "
              f"load average at start {load:.1f}")  # fmt: skip
    text = f"{header}\n\n{markdown_table(['measure', 'value'], rows)}"
    print(text)
    (args.out / "fixed_cost.md").write_text(text + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fixed_cost:
        return fixed_cost(args)
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
