"""MNIST from IDX files (and torchvision's download): a tiny but well-formed set the tests write themselves."""

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.config import make_config
from helpers.mnist import idx_bytes, mnist_arrays, mnist_files, write_mnist
from vaelab.data.prepare import prepare
from vaelab.data.settings import Settings
from vaelab.data.sources import IDX_FILES
from vaelab.errors import DataError


def mnist_settings(root: Path, *overrides: str) -> Settings:
    return Settings.from_config(make_config("data=mnist", f"data.root={root}", "data.val_size=20", *overrides).data)


def test_mnist_from_idx_files_is_split_and_recorded(project: Path, tmp_path: Path):
    files = mnist_files()
    manifest = prepare(mnist_settings(write_mnist(tmp_path / "flat", files)))

    assert {name: s["count"] for name, s in manifest["splits"].items()} == {"train": 100, "val": 20, "test": 40}
    assert manifest["dataset"] == "mnist" and manifest["image_shape"] == [1, 28, 28] and manifest["grey_levels"] == 256
    assert "data.root" in manifest["source"]
    # no known checksums, but the md5 of each decompressed file is recorded all the same
    assert manifest["raw_md5"] == {name: hashlib.md5(files[name]).hexdigest() for name in IDX_FILES}

    folder = project / "data" / "processed" / "mnist"
    test = torch.load(folder / "test.pt", weights_only=True)
    assert test["images"].dtype == torch.uint8
    assert torch.equal(test["images"][:, 0], torch.from_numpy(mnist_arrays()["t10k-images-idx3-ubyte"]))
    assert test["labels"].tolist() == [i % 10 for i in range(40)]
    assert set(test["binary"].unique().tolist()) == {0, 1}

    # torchvision's layout (MNIST/raw/), all plain this time: the same data, so the same hash
    write_mnist(tmp_path / "torchvision" / "MNIST" / "raw", files, gzipped=())
    assert prepare(mnist_settings(tmp_path / "torchvision"))["data_hash"] == manifest["data_hash"]


def test_different_mnist_files_give_a_different_data_hash(project: Path, tmp_path: Path):
    first = prepare(mnist_settings(write_mnist(tmp_path / "a", mnist_files())))
    arrays = mnist_arrays()
    arrays["t10k-images-idx3-ubyte"][0, 0, 0] ^= 0xFF
    second = prepare(mnist_settings(write_mnist(tmp_path / "b", {n: idx_bytes(a) for n, a in arrays.items()})))
    assert second["raw_md5"]["t10k-images-idx3-ubyte"] != first["raw_md5"]["t10k-images-idx3-ubyte"]
    assert second["data_hash"] != first["data_hash"]


def swap_magic(files: dict[str, bytes]) -> None:
    files["train-labels-idx1-ubyte"] = struct.pack(">I", 2051) + files["train-labels-idx1-ubyte"][4:]


def wrong_image_size(files: dict[str, bytes]) -> None:
    files["t10k-images-idx3-ubyte"] = idx_bytes(np.zeros((40, 32, 32), dtype=np.uint8))


def fewer_labels(files: dict[str, bytes]) -> None:
    files["t10k-labels-idx1-ubyte"] = idx_bytes(np.zeros(39, dtype=np.uint8))


def truncate(files: dict[str, bytes]) -> None:
    files["train-images-idx3-ubyte"] = files["train-images-idx3-ubyte"][:-100]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (swap_magic, r"train-labels-idx1-ubyte: magic number 2051, expected 2049"),
        (wrong_image_size, r"t10k-images-idx3-ubyte: images are 32x32, expected 28x28"),
        (fewer_labels, r"t10k-labels-idx1-ubyte.gz: 39 labels, but .*t10k-images-idx3-ubyte holds 40 images"),
        (truncate, r"train-images-idx3-ubyte.gz: \d+ bytes, but its header announces 120 images"),
    ],
)
def test_a_malformed_idx_file_is_named_in_the_error(project: Path, tmp_path: Path, mutate, message: str):
    files = mnist_files()
    mutate(files)
    with pytest.raises(DataError, match=message):
        prepare(mnist_settings(write_mnist(tmp_path / "raw", files)))
    assert not (project / "data" / "processed" / "mnist").exists()
    # nothing staged either: a bad copy must not stand in for the real files later
    assert not list((project / "data" / "raw" / "MNIST" / "raw").iterdir())


def test_a_missing_idx_file_is_named(project: Path, tmp_path: Path):
    files = mnist_files()
    del files["t10k-labels-idx1-ubyte"]
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte\(\.gz\); expected the MNIST IDX files"):
        prepare(mnist_settings(write_mnist(tmp_path / "raw", files)))


def test_without_data_root_mnist_is_downloaded_and_a_failure_is_explained(
    project: Path, monkeypatch: pytest.MonkeyPatch
):
    from torchvision.datasets import MNIST

    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])  # nothing listens on port 9
    with pytest.raises(DataError, match="torchvision could not download it") as error:
        prepare(Settings.from_config(make_config("data=mnist").data))
    assert "MNIST not found in" in str(error.value) and "data.root" in str(error.value)


def test_mnist_files_staged_by_an_earlier_prepare_are_reused_without_a_download(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from torchvision.datasets import MNIST

    first = prepare(mnist_settings(write_mnist(tmp_path / "raw", mnist_files())))
    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])
    again = prepare(Settings.from_config(make_config("data=mnist", "data.val_size=20").data))
    assert again["data_hash"] == first["data_hash"] and "earlier prepare" in again["source"]
