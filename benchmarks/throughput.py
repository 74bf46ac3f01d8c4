"""Training and evaluation throughput of vaelab, side by side with a bare PyTorch loop and pythae.

    .venv/bin/python benchmarks/throughput.py                  # CPU: batch 128, all three paths, then evaluation
    .venv/bin/python benchmarks/throughput.py --compile        # adds vaelab with compile=true
    .venv/bin/python benchmarks/throughput.py --repro          # adds the wall time of a whole default `dvc repro`
    python benchmarks/throughput.py --device cuda              # GPU: batch 512, bf16-mixed (see README.md)

One model, one data set, one batch size for every path: vaelab's default MLP VAE (784-512-16, SiLU, Bernoulli
likelihood with dynamic binarization) on the Fashion-MNIST train split that vaelab prepares, trained with Adam.
Every path runs in a fresh subprocess, so its peak memory is its own, for `--warmup-epochs` + `--epochs` epochs;
only the training loops of the last `--epochs` count (benchmarks/timing.py says exactly what is measured).

    bare     vaelab's own VAE (vaelab.training.builder.build_vae), Adam, binarization per batch, over in-memory tensors:
             no framework at all, the limit of what any framework can reach
    vaelab   vaelab.stages.train.train(cfg) as `pipelines/train.py logger=none` runs it: Lightning Trainer, vaelab's
             data module, callbacks, checkpoints and progress bar; only MLflow is left out
    pythae   pythae's BaseTrainer on the same architecture (pythae_worker.py), in its own venv
             (benchmarks/.venv-pythae) that shares the project's torch

The tables go to the console and to --out (default benchmarks/results/: latest.md, latest.json, one log per worker).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from time import perf_counter

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # timing.py
try:
    import vaelab  # noqa: F401
except ImportError:  # a bare checkout, e.g. on a CUDA machine without the venv: use the source tree
    sys.path.insert(1, str(REPO / "src"))

from timing import TrainingClock, peak_rss_mib, write_result  # noqa: E402

PATHS = {
    "bare": "bare PyTorch loop",
    "vaelab": "vaelab train() (Lightning)",
    "vaelab-compile": "vaelab train(), compile=true",
    "pythae": "pythae BaseTrainer",
}
# train() ends with a val NLL estimate and figures, after the measured epochs; fewer val images keep that short.
VAL_LIMIT = 500
# A warm-up evaluation before the timed ones: thread pools, allocator and kernels are ready when the clock starts.
EVAL_WARMUP = {"images": 8, "k": 64}


class SetupError(RuntimeError):
    """A path cannot be measured here; the message says why and goes into its table row."""


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Training and evaluation throughput: vaelab vs a bare PyTorch loop vs pythae.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch-size", type=int, help="training batch size (default: 128 on cpu, 512 on cuda)")
    p.add_argument("--precision", help="Lightning precision; the bare loop autocasts to match "
                   "(default: 32-true on cpu, bf16-mixed on cuda)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=2, help="measured epochs per path")
    p.add_argument("--warmup-epochs", type=int, default=1, help="epochs run first and not measured")
    p.add_argument("--limit-train", type=int, help="train on the first N training images (default: all 55,000)")
    p.add_argument("--repeats", type=int, default=1, help="measure every path this many times, interleaved; "
                   "the table shows medians")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every worker (default: torch's, one per "
                   "core). On a busy machine see README.md: OMP_WAIT_POLICY=PASSIVE, or --threads 1")  # fmt: skip
    p.add_argument("--console", choices=["tty", "pipe"], default="tty",
                   help="workers write to a pseudo-terminal (as in a user's shell: progress bars render) "
                   "or to a pipe (as under `dvc repro`)")  # fmt: skip
    p.add_argument("--train", action=argparse.BooleanOptionalAction, default=True, help="training throughput")
    p.add_argument("--pythae", action=argparse.BooleanOptionalAction, default=True, help="include pythae")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="add vaelab with compile=true (torch.compile)")  # fmt: skip
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="importance-weighted NLL throughput (vaelab.model.estimators.evaluate_images)")  # fmt: skip
    p.add_argument("--eval-k", default="1000,5000", help="importance samples per image, comma-separated")
    p.add_argument("--eval-images", help="test images evaluated at each k (default: 500,100 on cpu; "
                   "10000,10000 on cuda)")  # fmt: skip
    p.add_argument("--repro", action=argparse.BooleanOptionalAction, default=False,
                   help="wall time of a whole default `dvc repro` in a temporary copy (~5 min on 2 cores)")  # fmt: skip
    p.add_argument("--repro-from", choices=["head", "worktree"], default="head",
                   help="copy for --repro: a git clone of HEAD, or the working tree's files as git sees "
                   "them")  # fmt: skip
    p.add_argument("--pythae-venv", type=Path, default=HERE / ".venv-pythae")
    p.add_argument("--pythae-wheels", type=Path, help="install pythae from this folder of wheels (offline)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="tables and logs go here")
    # Internal: run one path in this process (the driver starts one subprocess per path).
    p.add_argument("--worker", choices=["bare", "vaelab", "eval"], help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    cuda = args.device == "cuda"
    args.batch_size = args.batch_size or (512 if cuda else 128)
    args.precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    ks = [int(k) for k in args.eval_k.split(",")]
    counts = [int(n) for n in (args.eval_images or ("10000,10000" if cuda else "500,100")).split(",")]
    if len(counts) == 1:
        counts *= len(ks)
    if len(counts) != len(ks):
        p.error(f"--eval-images needs one count, or one per --eval-k value ({len(ks)})")
    args.eval_pairs = list(zip(ks, counts, strict=True))
    if args.epochs < 1 or args.warmup_epochs < 0:
        p.error("--epochs must be >= 1 and --warmup-epochs >= 0")
    return args


# ----------------------------------------------------------------------------------------------
# The configuration and the data, as vaelab composes and prepares them


def compose_config(args: argparse.Namespace) -> dict:
    """conf/train.yaml composed by Hydra, as `pipelines/train.py logger=none ...` would, as a plain dict."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = [
        "logger=none",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"trainer.precision={args.precision}",
        f"trainer.max_epochs={args.warmup_epochs + args.epochs}",
        f"data.batch_size={args.batch_size}",
        f"data.limit_train={args.limit_train or 'null'}",
        f"seed={args.seed}",
        f"eval.val_limit={VAL_LIMIT}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def prepare_data(cfg: dict) -> tuple[Path, dict]:
    """The prepared split folder and its manifest (vaelab.data.prepare.ensure_prepared: prepares it if missing)."""
    from omegaconf import OmegaConf

    from vaelab.data.prepare import ensure_prepared
    from vaelab.data.settings import Settings

    os.environ.setdefault("VAELAB_ROOT", str(REPO))  # the project's data/processed/, as the entry points use
    return ensure_prepared(Settings.from_config(OmegaConf.create(cfg["data"])))


# ----------------------------------------------------------------------------------------------
# Workers: each runs in its own process, started by the driver below


def set_threads(spec: dict) -> None:
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])


def worker_bare(spec: dict) -> dict:
    """vaelab's VAE and loss, Adam, and a plain loop over an in-memory uint8 tensor: no framework."""
    import contextlib

    import torch

    from vaelab.data.prepare import load_split
    from vaelab.model.objectives import beta_vae_loss
    from vaelab.training.builder import build_optimizer, build_vae

    # Importing vaelab imported Lightning, which sets this; a plain PyTorch program would not have it, and with it
    # every Adam step on a GPU-less machine probes NVML (vaelab.stages.train.skip_gpu_probe_without_gpu).
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    device, cfg = torch.device(spec["device"]), spec["config"]
    set_threads(spec)
    clock = TrainingClock(spec["warmup_epochs"], spec["device"])  # baseline: before data and model
    torch.manual_seed(spec["seed"])
    images = load_split(Path(spec["data_folder"]), "train")["images"]
    images = images[: spec["limit_train"]] if spec["limit_train"] else images
    images = images.to(device)  # uint8 [N, 1, 28, 28], resident on the device
    vae = build_vae(spec["image_shape"], cfg["arch"], cfg["likelihood"], cfg["model"]["latent_dim"],
                    grey_levels=spec["grey_levels"]).to(device)  # fmt: skip
    observe, grey_levels = type(vae.likelihood).observe, spec["grey_levels"]
    optim = cfg["optim"]
    optimizer = build_optimizer(vae.parameters(), optim)  # the same partial config train() completes
    beta, free_bits = float(cfg["objective"]["beta"]), float(cfg["objective"]["free_bits"])
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if spec["precision"].startswith("bf16")
        else contextlib.nullcontext()
    )
    n, batch = len(images), spec["batch_size"]
    for epoch in range(spec["warmup_epochs"] + spec["epochs"]):
        clock.start(epoch)
        order = torch.randperm(n, device=device)
        for start in range(0, n, batch):
            x = observe(images[order[start : start + batch]], grey_levels)  # binarized afresh, on the device
            with autocast:
                out = vae(x)
                loss = beta_vae_loss(out.rec, out.kl_per_dim, beta, free_bits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        clock.stop(epoch, n)
    return clock.result(precision=spec["precision"], version=f"torch {torch.__version__}")


def lightning_meter(clock: TrainingClock):
    """A Lightning callback that feeds `clock`: each epoch's training loop, up to validation, is one window.

    It has no per-step hook: the module counts the epoch's images (VAEModule.images_this_epoch), so measuring adds
    no work to a step."""
    from vaelab.training.callbacks import EpochCallback

    class Meter(EpochCallback):
        def __init__(self) -> None:
            self.open = False

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.open = True
            clock.start(trainer.current_epoch)

        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                self.close(trainer, pl_module)

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.close(trainer, pl_module)  # when no validation ran this epoch

        def close(self, trainer, pl_module) -> None:
            if self.open:
                clock.stop(trainer.current_epoch, pl_module.images_this_epoch)
                self.open = False

    return Meter()


def worker_vaelab(spec: dict) -> dict:
    """vaelab.stages.train.train(cfg), the function behind `pipelines/train.py`, with logger=none (no MLflow).

    It runs in a throw-away project root (VAELAB_ROOT), so its checkpoints, models/latest/ and metrics/ never
    touch the repository; the prepared data is linked in, so nothing is prepared again.
    """
    root = Path(tempfile.mkdtemp(prefix="vaelab-bench-"))
    try:
        source = Path(spec["data_folder"])
        processed = root / "data" / "processed" / source.name
        processed.mkdir(parents=True)
        for file in source.iterdir():
            (processed / file.name).symlink_to(file)
        os.environ["VAELAB_ROOT"] = str(root)
        os.environ.pop("DVC_ROOT", None)

        import lightning
        from omegaconf import OmegaConf

        import vaelab
        from vaelab.stages.train import train

        set_threads(spec)
        clock = TrainingClock(spec["warmup_epochs"], spec["device"])  # baseline: before data and model
        train(OmegaConf.create(spec["config"]), callbacks=[lightning_meter(clock)])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return clock.result(
        precision=spec["precision"], version=f"vaelab {vaelab.__version__}, lightning {lightning.__version__}"
    )


def worker_eval(spec: dict) -> dict:
    """vaelab.model.estimators.evaluate_images on the fixed test images, for each (k, images) pair.

    The model is freshly initialised: the importance-weighted estimate does the same work whatever the weights.
    """
    import torch

    from vaelab.data.datamodule import fixed_observations
    from vaelab.data.prepare import load_split
    from vaelab.model.estimators import evaluate_images
    from vaelab.training.builder import build_vae

    device, cfg = torch.device(spec["device"]), spec["config"]
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    set_threads(spec)
    torch.manual_seed(spec["seed"])
    vae = build_vae(spec["image_shape"], cfg["arch"], cfg["likelihood"], cfg["model"]["latent_dim"],
                    grey_levels=spec["grey_levels"]).to(device).eval()  # fmt: skip
    test = load_split(Path(spec["data_folder"]), "test")
    images = fixed_observations(test, "test", type(vae.likelihood), spec["manifest"])
    evaluate_images(vae, images[: EVAL_WARMUP["images"]], k=EVAL_WARMUP["k"])

    rows = []
    for k, count in spec["eval_pairs"]:
        subset = images[:count]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = perf_counter()
        evaluate_images(vae, subset, k=k)
        sync()
        seconds = perf_counter() - start
        rows.append(
            {
                "k": k,
                "images": len(subset),
                "seconds": seconds,
                "images_per_s": len(subset) / seconds,
                "peak_rss_mib": peak_rss_mib(),
                "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            }
        )
    return {"rows": rows, "version": f"torch {torch.__version__}"}


WORKERS = {"bare": worker_bare, "vaelab": worker_vaelab, "eval": worker_eval}


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{models[0]}, {os.cpu_count()} cores" if models else f"{os.cpu_count()} cores"


# ----------------------------------------------------------------------------------------------
# Running workers


ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\r")


def spawn(cmd: list[str], log: Path, tty: bool, env: dict[str, str]) -> int:
    """Run `cmd`, its output into `log`; in a pseudo-terminal when `tty`, so progress bars draw as for a user."""
    with open(log, "wb") as out:
        if not tty:
            return subprocess.run(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out).returncode
        import fcntl
        import pty
        import select
        import struct
        import termios

        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, columns
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
        os.close(follower)
        try:
            while True:
                ready, _, _ = select.select([leader], [], [], 0.5)
                if ready:
                    try:
                        data = os.read(leader, 1 << 16)
                    except OSError:  # EIO: every writer has closed the terminal
                        data = b""
                    if not data:
                        break
                    out.write(data)
                elif proc.poll() is not None:  # exited; a lingering grandchild may still hold the terminal
                    break
        finally:
            os.close(leader)
        return proc.wait()


def failure_reason(log: Path) -> str:
    """The most telling line of a failed worker's output: its last error line, else its last line."""
    lines = [ANSI.sub(b"", line).decode(errors="replace").strip() for line in log.read_bytes().splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return (errors or lines or ["no output"])[-1][:300]


def run_worker(name: str, cmd: list[str], spec: dict, args: argparse.Namespace, run_dir: Path) -> dict:
    """Run one worker process on `spec`; its result dict, or {"error": reason}."""
    spec_file, result_file = run_dir / f"{name}.spec.json", run_dir / f"{name}.result.json"
    spec_file.write_text(json.dumps(spec))
    result_file.unlink(missing_ok=True)
    log = args.out / f"{name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.console == "tty":
        env.setdefault("TERM", "xterm-256color")
    code = spawn([*cmd, "--spec", str(spec_file), "--result", str(result_file)], log, args.console == "tty", env)
    if code != 0 or not result_file.is_file():
        return {"error": f"exit {code}: {failure_reason(log)} (log: {log})"}
    return json.loads(result_file.read_text())


def clear_logs(out: Path) -> None:
    """Remove an earlier run's worker logs, so every log in --out belongs to this run."""
    for log in out.glob("*.log"):
        if re.fullmatch(r"(bare|vaelab|vaelab-compile|pythae|eval|repro)(-\d+)?\.log", log.name):
            log.unlink()


def self_worker(kind: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", kind]


# ----------------------------------------------------------------------------------------------
# pythae's own venv


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def check_output(cmd: list[str], **kwargs) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        noise = "Location 'file://"  # pip.conf names local indexes that hold only some packages
        message = [line for line in (done.stderr + done.stdout).splitlines() if line.strip() and noise not in line]
        raise SetupError(f"{' '.join(map(str, cmd[:4]))} ...: {' / '.join(message[-3:])[:400]}")
    return done.stdout.strip()


def pythae_python(args: argparse.Namespace, torch_version: str) -> Path:
    """The python of a venv holding pythae and sharing this interpreter's packages (torch, numpy, ...).

    Created on first use: `python -m venv`, a .pth file naming this interpreter's site-packages (so torch is
    the project's, not a second 5 GB copy), then `pip install --no-deps pythae` plus whichever of pythae's
    requirements are still missing, each with --no-deps too. (pythae asks for `dataclasses`, a Python 3.6
    backport that must not be installed, and its torch requirement must never pull a second torch.)
    """
    import site

    venv, py = args.pythae_venv, python_of(args.pythae_venv)
    version = "import sys; print('%d.%d' % sys.version_info[:2])"
    wanted = "{}.{}".format(*sys.version_info[:2])
    if py.exists():
        try:
            current = check_output([str(py), "-c", version])
        except SetupError:
            current = None
        if current != wanted:
            shutil.rmtree(venv)
    if not py.exists():
        print(f"  creating {venv.relative_to(REPO) if venv.is_relative_to(REPO) else venv} for pythae ...", flush=True)
        try:
            check_output([sys.executable, "-m", "venv", str(venv)])
        except SetupError:  # no ensurepip (e.g. Debian's python without python3-venv): pip comes from outside
            shutil.rmtree(venv, ignore_errors=True)
            check_output([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    purelib = Path(check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]))
    (purelib / "zz_shared_with_vaelab.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    probe = "import pythae.models, pythae.trainers, torch; print(torch.__version__)"
    try:
        found = check_output([str(py), "-c", probe])
    except SetupError:
        print("  installing pythae into it (--no-deps) ...", flush=True)
        if subprocess.run([str(py), "-m", "pip", "--version"], capture_output=True).returncode == 0:
            pip = [str(py), "-m", "pip", "install"]
        else:  # a venv made --without-pip: this interpreter's pip installs into it
            pip = [sys.executable, "-m", "pip", "install", "--target", str(purelib)]
        pip += ["--quiet", "--disable-pip-version-check", "--no-deps"]
        if args.pythae_wheels:
            pip += ["--no-index", "--find-links", str(args.pythae_wheels)]
        check_output([*pip, "pythae"])
        missing = json.loads(check_output([str(py), "-c", MISSING_REQUIREMENTS]))
        if missing:
            check_output([*pip, *missing])
        found = check_output([str(py), "-c", probe])
    if found != torch_version:
        raise SetupError(f"the pythae venv imports torch {found}, not the project's {torch_version}")
    return py


# Run inside the pythae venv: pythae's requirements that are neither installed nor to be skipped.
MISSING_REQUIREMENTS = """
import json
from importlib.metadata import PackageNotFoundError, requires, version
from packaging.requirements import Requirement
missing = []
for line in requires("pythae") or []:
    req = Requirement(line)
    if req.name.lower() in {"dataclasses", "torch", "numpy"} or (req.marker and not req.marker.evaluate()):
        continue
    try:
        version(req.name)
    except PackageNotFoundError:
        missing.append(str(req))
print(json.dumps(missing))
"""


# ----------------------------------------------------------------------------------------------
# A whole `dvc repro` in a temporary copy


def copy_worktree(root: Path) -> None:
    """The working tree's files as git sees them (tracked, and untracked but not ignored) in a fresh repository."""
    names = check_output(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO)
    for name in filter(None, names.split("\0")):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    identity = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost",
                    GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost")  # fmt: skip
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "benchmark copy"]):
        check_output(cmd, cwd=root, env=identity)


def measure_repro(args: argparse.Namespace) -> dict:
    """Wall time of `dvc repro` (default params.yaml) in a temporary copy, as `make repro` runs it after setup:
    the venv's bin first on PATH (so stages run the venv's python), VAELAB_ROOT at the copy."""
    venv_bin = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1")
    for key in ("DVC_ROOT", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    dvc = shutil.which("dvc", path=env["PATH"])
    if dvc is None:
        return {"error": f"no dvc on PATH (looked in {venv_bin} first)"}
    tmp = Path(tempfile.mkdtemp(prefix="vaelab-repro-"))
    root = tmp / "repo"
    log = args.out / "repro.log"
    try:
        if args.repro_from == "head":
            check_output(["git", "clone", "--quiet", str(REPO), str(root)])
        else:
            copy_worktree(root)
        env["VAELAB_ROOT"] = str(root)
        stages: dict[str, float] = {}
        current, begun = None, perf_counter()
        with open(log, "w") as out:
            proc = subprocess.Popen([dvc, "repro"], cwd=root, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)  # fmt: skip
            for line in proc.stdout:
                out.write(line)
                started = re.search(r"Running stage '([^']+)'", line)
                if started:
                    now = perf_counter()
                    if current:
                        stages[current] = now - stages[current]
                    current, stages[started.group(1)] = started.group(1), now
                    print(f"  dvc repro: running stage '{current}' ({now - begun:.0f} s)", flush=True)
            code = proc.wait()
        seconds = perf_counter() - begun
        if current:
            stages[current] = perf_counter() - stages[current]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if code != 0:
        return {"error": f"dvc repro exited {code} (log: {log})", "seconds": seconds}
    return {"seconds": seconds, "stages": stages, "source": args.repro_from}


# ----------------------------------------------------------------------------------------------
# Tables


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def summarize(runs: list[dict]) -> dict:
    """Medians over repeats (memory: the largest); an error if every repeat failed."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[-1]["error"]}
    memory = ("peak_rss_mib", "delta_rss_mib", "peak_gpu_mib")
    summary = {k: v for k, v in good[-1].items() if k not in memory}
    summary["images_per_s"] = statistics.median(r["images_per_s"] for r in good)
    summary["spread"] = (min(r["images_per_s"] for r in good), max(r["images_per_s"] for r in good))
    summary["images_per_cpu_s"] = statistics.median(r["images_per_cpu_s"] for r in good)
    for key in memory:
        values = [r[key] for r in good if r.get(key) is not None]
        summary[key] = max(values) if values else None
    return summary


def minutes(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def training_table(results: dict[str, dict], epoch_images: int, cuda: bool) -> str:
    bare = results.get("bare", {}).get("images_per_s")
    bare_cpu = results.get("bare", {}).get("images_per_cpu_s")
    headers = ["path", "images/s", f"s/epoch ({epoch_images:,})", "peak RSS MiB (Δ training)"]
    headers += ["peak GPU MiB"] if cuda else []
    headers += ["× bare loop", "images/CPU-s", "× bare (CPU)", "precision"]
    rows, notes = [], []
    for key, label in PATHS.items():
        if key not in results:
            continue
        r = results[key]
        if "error" in r:
            rows.append([label, "not measured", *(["–"] * (len(headers) - 2))])
            notes.append(f"{label}: not measured: {r['error']}")
            continue
        speed = r["images_per_s"]
        low, high = r["spread"]
        cells = [
            label,
            f"{speed:,.0f}" + (f" ({low:,.0f}–{high:,.0f})" if high > low else ""),
            f"{epoch_images / speed:.2f}",
            f"{r['peak_rss_mib']:,.0f} ({r['delta_rss_mib']:+,.0f})",
        ]
        cells += [f"{r['peak_gpu_mib']:,.0f}" if r.get("peak_gpu_mib") is not None else "–"] if cuda else []
        cpu = r["images_per_cpu_s"]
        cells += [f"{speed / bare:.2f}" if bare else "–", f"{cpu:,.0f}", f"{cpu / bare_cpu:.2f}" if bare_cpu else "–"]
        cells += [r["precision"]]
        rows.append(cells)
    return "\n\n".join([markdown_table(headers, rows), *notes])


def eval_table(result: dict, test_images: int, cuda: bool) -> str:
    if "error" in result:
        return f"evaluation: not measured: {result['error']}"
    headers = ["k", "images", "images/s", f"s for all {test_images:,} test images", "peak RSS MiB"]
    headers += ["peak GPU MiB"] if cuda else []
    rows = []
    for r in result["rows"]:
        cells = [f"{r['k']:,}", f"{r['images']:,}", f"{r['images_per_s']:,.1f}",
                 minutes(test_images / r["images_per_s"]), f"{r['peak_rss_mib']:,.0f}"]  # fmt: skip
        cells += [f"{r['peak_gpu_mib']:,.0f}"] if cuda else []
        rows.append(cells)
    return markdown_table(headers, rows)


def repro_line(result: dict) -> str:
    if "error" in result:
        return f"dvc repro: not measured: {result['error']}"
    stages = ", ".join(f"{name} ~{minutes(s)}" for name, s in result["stages"].items())
    source = "a git clone of HEAD" if result["source"] == "head" else "a copy of the working tree"
    return f"dvc repro (default params, in {source}): {minutes(result['seconds'])} ({stages})"


# ----------------------------------------------------------------------------------------------
# Driver


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        write_result(args.result, WORKERS[args.worker](json.loads(args.spec.read_text())))
        return

    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    clear_logs(args.out)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("throughput: --device cuda, but torch sees no GPU")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (
        f"device: {device_name(args.device)}; torch {torch.__version__}; batch {args.batch_size}; "
        f"precision {args.precision}; {args.warmup_epochs} warm-up + {args.epochs} measured epochs; "
        f"torch threads: {args.threads or torch.get_num_threads()}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; console: {args.console}; "
        f"load average at start: {load:.1f}"
    )
    print(header, flush=True)
    if not cuda and load > 0.5 * (os.cpu_count() or 1):
        print("  (a busy machine: these numbers are provisional; see README.md on OMP_WAIT_POLICY)", flush=True)

    cfg = compose_config(args)
    folder, manifest = prepare_data(cfg)
    train_count = manifest["splits"]["train"]["count"]
    spec = {
        "config": cfg,
        "data_folder": str(folder),
        "train_file": str(folder / "train.pt"),
        "manifest": manifest,
        "image_shape": manifest["image_shape"],
        "grey_levels": manifest["grey_levels"],
        "device": args.device,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "warmup_epochs": args.warmup_epochs,
        "limit_train": args.limit_train,
        "seed": args.seed,
        "threads": args.threads,
        "eval_pairs": args.eval_pairs,
    }
    images = min(args.limit_train or train_count, train_count)
    report: dict = {"header": header, "args": {k: str(v) for k, v in vars(args).items()}}
    sections: list[str] = []

    with tempfile.TemporaryDirectory(prefix="vaelab-bench-") as tmp:
        run_dir = Path(tmp)
        if args.train:
            commands = {"bare": self_worker("bare"), "vaelab": self_worker("vaelab")}
            specs = {"bare": spec, "vaelab": spec}
            if args.compile:
                commands["vaelab-compile"] = self_worker("vaelab")
                specs["vaelab-compile"] = {**spec, "config": {**cfg, "compile": True}}
            runs: dict[str, list[dict]] = {key: [] for key in commands}
            if args.pythae:
                runs["pythae"] = []
                try:
                    commands["pythae"] = [str(pythae_python(args, torch.__version__)), str(HERE / "pythae_worker.py")]
                    specs["pythae"] = spec
                except SetupError as error:
                    runs["pythae"].append({"error": f"pythae could not be set up: {error}"})
            print(f"training: {images:,} images x {args.warmup_epochs + args.epochs} epochs per path", flush=True)
            for repeat in range(args.repeats):
                for key, cmd in commands.items():
                    name = key if args.repeats == 1 else f"{key}-{repeat + 1}"
                    print(f"  {PATHS[key]} ...", end=" ", flush=True)
                    result = run_worker(name, cmd, specs[key], args, run_dir)
                    runs[key].append(result)
                    print(result.get("error") or f"{result['images_per_s']:,.0f} images/s", flush=True)
            results = {key: summarize(value) for key, value in runs.items()}
            report["training"] = {"runs": runs, "summary": results}
            table = training_table(results, train_count, cuda)
            compiled, eager = results.get("vaelab-compile", {}), results.get("vaelab", {})
            if "images_per_s" in compiled and "images_per_s" in eager:
                speedup = compiled["images_per_s"] / eager["images_per_s"]
                table += f"\n\ncompile=true speed-up over eager vaelab: {speedup:.2f}x"
            sections.append(f"Training throughput ({images:,} images, batch {args.batch_size}):\n\n{table}")

        if args.eval:
            pairs = ", ".join(f"k={k:,} on {n:,} images" for k, n in args.eval_pairs)
            print(f"evaluation (importance-weighted NLL): {pairs} ...", end=" ", flush=True)
            result = run_worker("eval", self_worker("eval"), spec, args, run_dir)
            print(result.get("error") or "done", flush=True)
            report["evaluation"] = result
            test_count = manifest["splits"]["test"]["count"]
            sections.append(
                "Evaluation throughput (vaelab.model.estimators.evaluate_images, fp32):\n\n"
                + eval_table(result, test_count, cuda)
            )

    if args.repro:
        print(f"dvc repro in a temporary copy ({args.repro_from}) ...", flush=True)
        result = measure_repro(args)
        report["repro"] = result
        sections.append(repro_line(result))

    text = "\n\n".join([header, *sections])
    print("\n" + text)
    (args.out / "latest.md").write_text(text + "\n")
    (args.out / "latest.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\n(saved to {args.out / 'latest.md'}; worker logs beside it)")


if __name__ == "__main__":
    main()
