"""Data is what it says, and nothing is lost or left behind: a run trains on exactly the data its hash names, wide
images and bad model inputs are scaled or refused by name, and concurrent or killed writes leave consistent folders."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.config import REPO, TINY, TINY_TRIAL, make_config
from helpers.processes import subprocess_env
from helpers.stores import all_runs
from vaelab.data.datamodule import ImageData
from vaelab.data.prepare import content_hash, prepare
from vaelab.data.settings import Settings
from vaelab.errors import DataError
from vaelab.files import replacing_dir, write_json_atomic

TESTS = Path(__file__).resolve().parent
DIGITS = 1797  # scikit-learn's digits: every split is carved out of these
DIGITS_TEST = 300  # conf/data/digits.yaml's test_size


def digits_settings(**changes) -> Settings:
    return Settings.from_config(make_config("data=digits", *[f"data.{k}={v}" for k, v in changes.items()]).data)


def reference_hash(settings: Settings, tmp_path: Path) -> str:
    """The data hash these settings give, prepared on their own in a folder nobody else touches."""
    return prepare(settings, out_dir=tmp_path / "reference" / settings.name)["data_hash"]


def assert_one_snapshot(data: ImageData) -> None:
    """Every split the datamodule serves is the one its manifest (and so its data hash) describes."""
    for split in ("train", "val", "test"):
        tensors = data.split(split)
        assert content_hash(tensors) == data.manifest["splits"][split]["sha256"], split
        assert len(tensors["images"]) == data.manifest["splits"][split]["count"], split


# --- a run trains on exactly the data its hash names ---------------------------------------------------------------


@pytest.mark.parametrize("other", [{"val_size": 300}, {"test_size": 100}, {"split_seed": 7}, {"val_size": 0.25}])
def test_a_prepare_with_other_split_settings_does_not_change_the_data_of_a_run_under_way(
    project: Path, tmp_path: Path, other: dict
):
    data = ImageData(digits_settings(val_size=200), batch_size=64)
    replaced = prepare(digits_settings(**other))  # another job, after this run prepared and before it reads a batch
    assert replaced["data_hash"] != data.data_hash
    assert_one_snapshot(data)
    assert len(data.split("val")["images"]) == 200
    assert len(data.split("train")["images"]) == DIGITS - 200 - DIGITS_TEST
    assert data.data_hash == reference_hash(digits_settings(val_size=200), tmp_path)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_tensors_changed_behind_the_manifest_are_prepared_afresh_not_trusted(project: Path, tmp_path: Path, split):
    settings = digits_settings(val_size=200)
    folder = ImageData(settings, batch_size=64).folder
    other = tmp_path / "other" / "digits"
    prepare(digits_settings(val_size=300, split_seed=3), out_dir=other)
    shutil.copy2(other / f"{split}.pt", folder / f"{split}.pt")  # the manifest still names the first split

    data = ImageData(settings, batch_size=64)
    assert_one_snapshot(data)
    assert data.data_hash == reference_hash(settings, tmp_path)
    from vaelab.data.prepare import read_prepared

    for name, tensors in read_prepared(settings, splits=(split,)).splits.items():  # what evaluation reads
        assert content_hash(tensors) == data.manifest["splits"][name]["sha256"]


@pytest.mark.subprocess
def test_two_concurrent_runs_with_other_val_sizes_each_record_the_hash_of_what_they_trained_on(
    project: Path, tmp_path: Path
):
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    sizes = (200, 300)
    processes = []
    for val_size in sizes:
        record = tmp_path / f"val{val_size}.json"
        probe = f"+callbacks.record_data={{_target_:helpers.data_callbacks.RecordData,path:'{record}'}}"
        overrides = [*TINY_TRIAL, f"data.val_size={val_size}", "callbacks=none", probe]
        processes.append(
            subprocess.Popen(
                [sys.executable, str(REPO / "pipelines" / "train.py"), *overrides],
                cwd=project,
                env=subprocess_env(VAELAB_ROOT=str(project), PYTHONPATH=path),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for process in processes:
        out, _ = process.communicate(timeout=600)
        assert process.returncode == 0, out[-3000:]

    tags = {run.info.run_id: run.data.tags["vaelab.data_hash"] for run in all_runs(project)}
    for val_size in sizes:
        record = json.loads((tmp_path / f"val{val_size}.json").read_text())
        assert record["val"] == val_size
        assert record["train"] == DIGITS - val_size - DIGITS_TEST
        assert record["batches"] == -(-record["train"] // 64)  # conf/data/digits.yaml's batch_size
        assert record["data_hash"] == reference_hash(digits_settings(val_size=val_size), tmp_path / str(val_size))
        assert tags[record["run_id"]] == record["data_hash"]


# --- wide images are scaled to 8 bits or refused by name -----------------------------------------------------------


def sixteen_bit_png(path: Path, samples: np.ndarray) -> Path:
    """A 16-bit PNG written byte by byte (PIL writes 16-bit grey, not 16-bit colour): grey [H, W] or RGB [H, W, 3]."""
    import struct
    import zlib

    height, width = samples.shape[:2]
    colour_type = 2 if samples.ndim == 3 else 0
    rows = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


def folder_settings(root: Path, size: int = 8) -> Settings:
    cfg = make_config("data=image_folder", f"data.root={root}", f"data.image_size={size}", "data.val_size=1")
    return Settings.from_config(cfg.data)


def prepared_images(root: Path) -> torch.Tensor:
    """Every prepared image of the folder (all splits), in file order by content: split order does not matter here."""
    manifest = prepare(folder_settings(root))
    folder = Path(os.environ["VAELAB_ROOT"]) / "data" / "processed" / "image_folder"
    images = torch.cat([torch.load(folder / f"{s}.pt", weights_only=True)["images"] for s in manifest["splits"]])
    return images.sort(dim=0).values


def sixteen_bit_ramps(count: int = 3) -> list[np.ndarray]:
    """Grey 8x8 ramps over the whole 16-bit range, one per image (distinct, so that a split of them is visible)."""
    base = np.linspace(0, 65535, 64).reshape(8, 8)
    return [np.clip(base - 1000 * i, 0, 65535).astype(np.uint16) for i in range(count)]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_images_are_scaled_to_8_bits_not_saturated(project: Path, tmp_path: Path, suffix: str):
    root = tmp_path / "images"
    root.mkdir()
    ramps = sixteen_bit_ramps()
    for i, ramp in enumerate(ramps):
        Image.fromarray(ramp).save(root / f"{i}{suffix}")
        assert Image.open(root / f"{i}{suffix}").mode.startswith("I;16")
    images = prepared_images(root)
    expected = torch.stack([torch.from_numpy((r >> 8).astype(np.uint8))[None] for r in ramps]).sort(dim=0).values
    assert images.shape == (3, 1, 8, 8)
    assert torch.equal(images, expected)
    assert (images == 255).float().mean() < 0.05  # a ramp, not a white page


def test_16_bit_colour_and_grey_pngs_of_one_picture_prepare_alike(project: Path, tmp_path: Path):
    """PIL reads 16-bit colour PNGs by their high bytes: 16-bit grey gets the same treatment (regression: colour)."""
    grey, colour = tmp_path / "grey", tmp_path / "colour"
    for i, ramp in enumerate(sixteen_bit_ramps()):
        sixteen_bit_png(grey / f"{i}.png", ramp)
        sixteen_bit_png(colour / f"{i}.png", np.stack([ramp] * 3, axis=-1))
    assert Image.open(grey / "0.png").mode == "I;16" and Image.open(colour / "0.png").mode == "RGB"
    assert torch.equal(prepared_images(grey), prepared_images(colour))


@pytest.mark.parametrize(
    ("samples", "mode", "described"),
    [
        (np.full((8, 8), 70000, dtype=np.int32), "I", "32-bit integer"),
        (np.full((8, 8), 0.5, dtype=np.float32), "F", "32-bit floating-point"),
        (np.full((8, 8), 300.0, dtype=np.float32), "F", "32-bit floating-point"),
    ],
)
def test_images_whose_value_range_is_unknown_are_refused_naming_file_and_mode(
    project: Path, tmp_path: Path, samples: np.ndarray, mode: str, described: str
):
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(root / "fine.png")
    Image.fromarray(samples).save(root / "wide.tif")
    assert Image.open(root / "wide.tif").mode == mode
    with pytest.raises(DataError, match=rf"wide\.tif: {described} image \(PIL mode {mode}\)"):
        prepare(folder_settings(root))


# --- the served model refuses what it would silently misread -------------------------------------------------------


@pytest.fixture(scope="module")
def pyfunc_model(tmp_path_factory: pytest.TempPathFactory):
    """A tiny trained digits VAE, saved and loaded back as an MLflow pyfunc model (no tracking store needed)."""
    import mlflow.pyfunc

    from vaelab.stages.export import save_pyfunc
    from vaelab.stages.train import train

    root = tmp_path_factory.mktemp("pyfunc")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VAELAB_ROOT", str(root))
        patch.delenv("DVC_ROOT", raising=False)
        train(make_config(*TINY, "logger=none", "callbacks=none"))
    [best] = root.glob("outputs/*/checkpoints/best.ckpt")
    folder = save_pyfunc(best, root / "model", (1, 8, 8), latent_dim=4)
    return mlflow.pyfunc.load_model(str(folder))


GOOD = np.random.default_rng(0).random((3, 1, 8, 8)).astype(np.float32)
FAULTS = {
    "NaN": (np.nan, "NaN"),
    "+inf": (np.inf, r"\+inf"),
    "-inf": (-np.inf, "-inf"),
    "above 1": (255.0, "values above 1"),
    "slightly above 1": (1.001, "values above 1"),
    "negative": (-0.5, "values below 0"),
}
FORMS = {
    "float32 array through pyfunc": lambda model, x: model.predict(x),
    "float64 array": lambda model, x: model.get_raw_model().predict(x.astype(np.float64)),
    "nested lists": lambda model, x: model.get_raw_model().predict(x.tolist()),
    "torch tensor": lambda model, x: model.get_raw_model().predict(torch.from_numpy(x)),
}


@pytest.mark.integration
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("fault", FAULTS)
def test_the_model_refuses_nan_infinite_and_out_of_range_images_naming_the_fault(pyfunc_model, form: str, fault: str):
    from vaelab.stages.export import ModelInputError

    value, named = FAULTS[fault]
    images = GOOD.copy()
    images[1, 0, 2, 3] = value
    with pytest.raises(
        ModelInputError,
        match=rf"images hold {named} \(1, first at \[1, 0, 2, 3\]\); expected images as float32 \[N, 1, 8, 8\] "
        r"with values in \[0, 1\]",
    ):
        FORMS[form](pyfunc_model, images)


@pytest.mark.integration
@pytest.mark.parametrize("form", FORMS)
def test_the_model_encodes_images_in_the_unit_range_whatever_their_form(pyfunc_model, form: str):
    images = GOOD.copy()
    images[0, 0, 0, :2] = [0.0, 1.0]  # the bounds themselves are allowed
    codes = FORMS[form](pyfunc_model, images)
    assert codes.shape == (3, 4) and np.isfinite(codes).all()
    np.testing.assert_allclose(codes, pyfunc_model.predict(images), rtol=1e-5, atol=1e-6)


@pytest.mark.integration
def test_unscaled_uint8_images_and_misshapen_input_are_refused(pyfunc_model):
    from vaelab.stages.export import ModelInputError

    raw = pyfunc_model.get_raw_model()
    with pytest.raises(
        ModelInputError, match=r"images hold values above 1 .*; 0-255 images must be divided by 255 first"
    ):
        raw.predict((GOOD * 255).astype(np.uint8))
    with pytest.raises(
        ModelInputError, match=r"images have shape \[3, 64\]; expected images as float32 \[N, 1, 8, 8\]"
    ):
        raw.predict(GOOD.reshape(3, 64))
    with pytest.raises(
        ModelInputError,
        match=r"codes hold NaN \(1, first at \[0, 1\]\); expected codes as float32 \[N, 4\] of finite values",
    ):
        raw.decode(np.array([[0.0, np.nan, 0.0, 0.0]]))


# --- concurrent publishes and the staging that killed writes leave -------------------------------------------------

PUBLISH_MANY = """
import sys
from pathlib import Path
from vaelab.stages.publish import publish

who, times, scratch = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
checkpoint, config = scratch / f"{who}.ckpt", scratch / f"{who}.yaml"
checkpoint.write_text(who * 1000)
config.write_text(who)
rows = [{"epoch": epoch, "train/elbo": float(who[-1])} for epoch in range(200)]
for _ in range(times):
    publish(checkpoint, who, config, {"writer": who}, rows)
"""


@pytest.mark.subprocess
def test_processes_publishing_at_once_all_succeed_and_leave_whole_outputs(project: Path, tmp_path: Path):
    from vaelab import paths

    writers = [f"writer{i}" for i in range(4)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", PUBLISH_MANY, who, "60", str(tmp_path)],
            env=subprocess_env(VAELAB_ROOT=str(project)),
            stderr=subprocess.PIPE,
            text=True,
        )
        for who in writers
    ]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
    latest = paths.latest_model_dir()
    who = (latest / paths.RUN_ID_FILE).read_text().strip()
    assert who in writers
    assert (latest / paths.PUBLISHED_MODEL).read_text() == who * 1000  # one writer's files, not a mix
    assert (latest / paths.RUN_CONFIG).read_text() == who
    assert json.loads((paths.metrics_dir() / "train.json").read_text())["writer"] in writers
    curve = (paths.plots_dir() / "train" / "curve.csv").read_text().splitlines()
    assert len(curve) == 201 and len({line.split(",")[1] for line in curve[1:]}) == 1  # one writer's curve
    for folder in (latest.parent, paths.metrics_dir(), paths.plots_dir() / "train"):
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no staging or aside left


HOLD_STAGING = """
import sys, time
from pathlib import Path
from vaelab.files import replacing_dir, staging_dir

target, how = Path(sys.argv[1]), sys.argv[2]
if how == "replacing":
    with replacing_dir(target) as fresh:
        (fresh / "half.png").write_text("half")
        print(fresh, flush=True)
        time.sleep(120)
else:
    fresh = staging_dir(target)
    print(fresh, flush=True)
    time.sleep(120)
"""


def hold_staging(target: Path, how: str) -> tuple[subprocess.Popen, Path]:
    """A live process writing a staging folder for `target`: the process and that folder."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_STAGING, str(target), how],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline().strip()
    assert line, f"the writer ended (exit {process.wait()}) before staging anything"
    return process, Path(line)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


@pytest.mark.subprocess
@pytest.mark.parametrize("how", ["replacing", "staging"])
def test_a_live_writers_staging_is_kept_and_a_killed_writers_is_removed_by_the_next_write(tmp_path: Path, how: str):
    from vaelab.files import remove_stale_staging

    plots = tmp_path / "plots"
    process, staging = hold_staging(plots / "eval", how)
    try:
        assert staging.is_dir() and staging.name.startswith(".eval.")
        with replacing_dir(plots / "eval") as fresh:  # another evaluation, while the first is still writing
            (fresh / "done.png").write_text("done")
        assert remove_stale_staging(plots) == []
        assert staging.is_dir()
    finally:
        kill(process)
    assert staging.is_dir()  # SIGKILL runs no cleanup
    with replacing_dir(plots / "eval") as fresh:
        (fresh / "done.png").write_text("again")
    assert not staging.exists()
    assert sorted(p.name for p in plots.iterdir()) == ["eval"]


@pytest.mark.subprocess
def test_a_killed_prepares_staging_is_removed_by_the_next_run_even_when_the_data_is_current(project: Path):
    data = ImageData(digits_settings(), batch_size=64)
    process, staging = hold_staging(data.folder, "replacing")
    try:
        ImageData(digits_settings(), batch_size=64)  # reads the current data while the other prepare writes
        assert staging.is_dir()
    finally:
        kill(process)
    again = ImageData(digits_settings(), batch_size=64)
    assert not staging.exists()
    assert again.data_hash == data.data_hash
    assert sorted(p.name for p in data.folder.parent.iterdir() if p.name != ".digits.lock") == ["digits"]


def test_staging_files_nobody_writes_are_removed_by_the_next_atomic_write(tmp_path: Path):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    killed_write = metrics / ".train.json.k1ll3d00.staging"  # what a write SIGKILLed before its rename leaves
    killed_write.write_text("{half")
    write_json_atomic(metrics / "eval.json", {"test/elbo": -1.0})
    assert sorted(p.name for p in metrics.iterdir()) == ["eval.json"]


def test_unmarked_staging_of_older_versions_is_removed_only_once_a_day_old(tmp_path: Path):
    from vaelab.files import remove_stale_staging

    plots = tmp_path / "plots"
    old, recent = plots / ".eval.a1b2c3d4", plots / ".latest.old"
    for folder in (old, recent):
        folder.mkdir(parents=True)
    day_ago = time.time() - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    unrelated = [plots / ".gitignore", plots / ".digits.lock", plots / ".eval.png.lock"]
    for path in unrelated:
        path.write_text("")
        os.utime(path, (day_ago, day_ago))
    assert remove_stale_staging(plots) == [old]
    assert recent.is_dir() and all(path.exists() for path in unrelated)


def test_lock_files_and_staging_that_vaelab_creates_are_git_ignored():
    names = [
        "data/processed/.digits.lock",
        ".optuna-default.lock",
        ".optuna-my_study.lock",
        "mlflow.db.lock",
        "plots/.eval.k1ll3d00.staging",
        "data/processed/.digits.k1ll3d00.staging",
    ]
    done = subprocess.run(["git", "check-ignore", "--no-index", *names], cwd=REPO, capture_output=True, text=True)
    assert sorted(done.stdout.split()) == sorted(names)
