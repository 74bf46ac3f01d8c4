"""Data: checksums, deterministic splits, the manifest, batching by rank, and the binarization protocol."""

import gzip
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers.config import DEBIAN_FASHION, make_config, needs_fashion_mnist
from vaelab.data.datamodule import ImageData, TensorBatches
from vaelab.data.prepare import ensure_prepared, prepare
from vaelab.data.settings import Settings
from vaelab.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_MD5, class_names
from vaelab.errors import DataError


def digits_settings(**changes) -> Settings:
    return Settings.from_config(make_config("data=digits", *[f"data.{k}={v}" for k, v in changes.items()]).data)


def test_digits_prepare_is_deterministic_and_writes_a_manifest(project: Path):
    first = prepare(digits_settings())
    folder = project / "data" / "processed" / "digits"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest == first
    assert {name: s["count"] for name, s in manifest["splits"].items()} == {
        "train": 1297,
        "val": 200,
        "test": 300,
    }
    assert manifest["grey_levels"] == 17 and manifest["image_shape"] == [1, 8, 8]
    assert manifest["binarize_seed"] == 1234 and manifest["split_seed"] == 0
    assert prepare(digits_settings())["data_hash"] == first["data_hash"]
    assert prepare(digits_settings(split_seed=1))["data_hash"] != first["data_hash"]

    train = torch.load(folder / "train.pt", weights_only=True)
    val = torch.load(folder / "val.pt", weights_only=True)
    assert train["images"].dtype == torch.uint8 and int(train["images"].max()) == 16
    assert set(val["binary"].unique().tolist()) == {0, 1}
    assert "binary" not in train  # training images are binarized afresh at each use


def test_ensure_prepared_reprepares_only_when_settings_change(project: Path):
    folder, manifest = ensure_prepared(digits_settings())
    stamp = (folder / "train.pt").stat().st_mtime_ns
    assert ensure_prepared(digits_settings())[1] == manifest
    assert (folder / "train.pt").stat().st_mtime_ns == stamp
    assert ensure_prepared(digits_settings(val_size=100))[1]["splits"]["val"]["count"] == 100


def test_shards_of_a_tensor_do_not_overlap_and_reshuffle_per_epoch():
    data = torch.arange(103)
    shards = [list(TensorBatches(data, 10, shuffle=True, seed=0, rank=r, world_size=2)) for r in (0, 1)]
    seen = [torch.cat(batches).tolist() for batches in shards]
    assert len(seen[0]) == len(seen[1]) == 51
    assert not set(seen[0]) & set(seen[1])
    loader = TensorBatches(data, 10, shuffle=True, seed=0)
    assert len(loader) == 11
    epoch0 = torch.cat(list(loader)).tolist()
    assert torch.cat(list(loader)).tolist() == epoch0  # same epoch, same order (resumable)
    loader.sampler.set_epoch(1)
    assert torch.cat(list(loader)).tolist() != epoch0
    assert sorted(torch.cat(list(loader)).tolist()) == list(range(103))


def test_training_batches_are_binarized_afresh_and_eval_batches_are_fixed(project: Path):
    data = ImageData(digits_settings(), batch_size=64)

    class FakeTrainer:
        training, global_rank, world_size = True, 0, 1
        strategy = SimpleNamespace(root_device=torch.device("cpu"))

    data.trainer = FakeTrainer()
    grey = data.split("train")["images"][:64]
    first, second = data.on_after_batch_transfer(grey, 0), data.on_after_batch_transfer(grey, 0)
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(first, second)
    FakeTrainer.training = False
    stored = data.split("val")["binary"][:64].float()  # binarized once by prepare, with the manifest's seed
    assert torch.equal(data.eval_images("val", 64), stored)
    assert torch.equal(next(iter(data.val_dataloader()))[:64], stored)
    assert torch.equal(data.on_after_batch_transfer(stored, 0), stored)  # already observed: left alone


def corrupt_copy(tmp_path: Path, name: str, mutate) -> Path:
    folder = tmp_path / "raw"
    shutil.copytree(DEBIAN_FASHION, folder)
    path = folder / f"{name}.gz"
    path.write_bytes(mutate(path.read_bytes()))
    return folder


@needs_fashion_mnist
def test_fashion_mnist_checksums_are_verified_on_decompressed_bytes(project: Path, tmp_path: Path):
    def flip_a_pixel(gz: bytes) -> bytes:
        raw = bytearray(gzip.decompress(gz))
        raw[5000] ^= 0xFF
        return gzip.compress(bytes(raw))

    root = corrupt_copy(tmp_path, "t10k-images-idx3-ubyte", flip_a_pixel)
    settings = Settings.from_config(make_config(f"data.root={root}").data)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: checksum mismatch"):
        prepare(settings)
    assert not (project / "data" / "processed" / "fashion_mnist").exists()  # nothing half-written


@needs_fashion_mnist
def test_a_truncated_archive_is_named_in_the_error(project: Path, tmp_path: Path):
    root = corrupt_copy(tmp_path, "train-labels-idx1-ubyte", lambda gz: gz[: len(gz) // 2])
    settings = Settings.from_config(make_config(f"data.root={root}").data)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: cannot be read"):
        prepare(settings)


def test_without_debian_data_torchvision_downloads_and_a_failure_is_explained(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from torchvision.datasets import FashionMNIST

    from vaelab.data import sources

    monkeypatch.setenv(sources.FASHION_MNIST_ENV, str(tmp_path / "not-installed"))
    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])  # nothing listens on port 9
    with pytest.raises(DataError, match="torchvision could not download it") as error:
        prepare(Settings.from_config(make_config().data))
    assert "apt-get install dataset-fashion-mnist" in str(error.value) and "data.root" in str(error.value)


@pytest.mark.subprocess
def test_real_fashion_mnist_is_split_55k_5k_10k_and_its_manifest_names_its_classes(fashion_processed: Path):
    manifest = json.loads((fashion_processed / "manifest.json").read_text())
    assert {name: s["count"] for name, s in manifest["splits"].items()} == {
        "train": 55000,
        "val": 5000,
        "test": 10000,
    }
    assert manifest["grey_levels"] == 256 and manifest["image_shape"] == [1, 28, 28]
    assert manifest["raw_md5"] == FASHION_MNIST_MD5
    assert "debian" in manifest["source"]
    assert manifest["source_details"]["classes"][:2] == ["T-shirt/top", "Trouser"]
    assert class_names(manifest) == list(FASHION_MNIST_CLASSES) and len(FASHION_MNIST_CLASSES) == 10
