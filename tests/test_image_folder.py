"""Any folder of images as a dataset: grey or colour, class subfolders as labels, resized and split by its settings."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.config import TINY, make_config
from vaelab.config import problems
from vaelab.data.prepare import ensure_prepared, prepare
from vaelab.data.settings import Settings
from vaelab.errors import DataError
from vaelab.stages.train import train

SIZES = [(20, 24), (31, 17), (16, 16), (40, 25), (18, 30)]  # width x height: mixed, some smaller than 32


def write_images(folder: Path, count: int, mode: str, suffix: str = ".png", seed: int = 0) -> Path:
    """`count` random images of mixed sizes: "L" grey, "RGB" reddish colour, "RGB-grey" grey stored as RGB."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        grey = rng.integers(0, 256, (height, width), dtype=np.uint8)
        if mode == "L":
            image = Image.fromarray(grey, mode="L")
        elif mode == "RGB-grey":
            image = Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB")
        else:
            rgb = np.stack([grey | 0x80, grey // 4, grey // 4], axis=-1)  # red well above green and blue
            image = Image.fromarray(rgb.astype(np.uint8), mode="RGB")
        image.save(folder / f"img{i:03d}{suffix}")
    return folder


def folder_settings(root: Path, *overrides: str) -> Settings:
    cfg = make_config("data=image_folder", f"data.root={root}", "data.image_size=16", *overrides)
    return Settings.from_config(cfg.data)


def load(project: Path, split: str) -> dict[str, torch.Tensor]:
    return torch.load(project / "data" / "processed" / "image_folder" / f"{split}.pt", weights_only=True)


def test_a_folder_of_grey_images_becomes_one_channel_split_by_fractions(project: Path, tmp_path: Path):
    root = write_images(tmp_path / "faces", 20, "L")
    write_images(root / "more", 10, "RGB-grey", ".jpg", seed=1)  # grey content stored as RGB (JPEG) is grey too
    (root / "notes.txt").write_text("not an image")
    (root / "._img000.png").write_bytes(b"macOS metadata, not an image")

    manifest = prepare(folder_settings(root))  # the default val 0.1 and test 0.1 of 30 images

    assert {name: s["count"] for name, s in manifest["splits"].items()} == {"train": 24, "val": 3, "test": 3}
    assert manifest["image_shape"] == [1, 16, 16] and manifest["grey_levels"] == 256
    assert manifest["source_details"] == {"folder": str(root.resolve()), "images": 30, "classes": []}
    assert str(root.resolve()) in manifest["source"]
    assert manifest["image_size"] == 16 and manifest["channels"] is None
    train = load(project, "train")
    assert train["images"].dtype == torch.uint8 and train["images"].shape == (24, 1, 16, 16)
    assert train["labels"].tolist() == [0] * 24  # an image directly in the root: no classes
    assert set(load(project, "val")["binary"].unique().tolist()) <= {0, 1}


def test_colour_images_in_class_subfolders_get_three_channels_and_labels(project: Path, tmp_path: Path):
    root = tmp_path / "pets"
    write_images(root / "cats", 12, "RGB")
    write_images(root / "dogs" / "nested", 8, "L", ".bmp")  # found recursively, labelled by the top subfolder

    manifest = prepare(folder_settings(root, "data.val_size=4", "data.test_size=4"))

    assert manifest["image_shape"] == [3, 16, 16]
    assert manifest["source_details"]["classes"] == ["cats", "dogs"]
    images = torch.cat([load(project, split)["images"] for split in ("train", "val", "test")])
    labels = torch.cat([load(project, split)["labels"] for split in ("train", "val", "test")])
    assert images.shape == (20, 3, 16, 16)
    assert sorted(labels.tolist()) == [0] * 12 + [1] * 8
    cats, dogs = images[labels == 0].int(), images[labels == 1].int()
    assert (cats[:, 0] > cats[:, 2]).all()  # the reddish colour images are class 0
    assert torch.equal(dogs[:, 0], dogs[:, 2])  # the grey ones class 1

    one = prepare(folder_settings(root, "data.val_size=4", "data.test_size=4", "data.channels=1"))
    assert one["image_shape"] == [1, 16, 16]


def test_an_image_folder_split_is_deterministic_and_follows_its_settings(project: Path, tmp_path: Path):
    root = write_images(tmp_path / "faces", 30, "RGB")
    settings = folder_settings(root, "data.val_size=5", "data.test_size=5")
    folder, first = ensure_prepared(settings)
    stamp = (folder / "train.pt").stat().st_mtime_ns
    assert ensure_prepared(settings)[1] == first and (folder / "train.pt").stat().st_mtime_ns == stamp
    assert prepare(settings)["data_hash"] == first["data_hash"]  # prepared afresh: the same bytes

    reseeded = prepare(folder_settings(root, "data.val_size=5", "data.test_size=5", "data.split_seed=1"))
    assert reseeded["data_hash"] != first["data_hash"]
    # image size, channels and the folder itself are part of the settings: a change re-prepares
    assert ensure_prepared(folder_settings(root, "data.image_size=8"))[1]["image_shape"] == [3, 8, 8]
    assert ensure_prepared(folder_settings(root, "data.image_size=8", "data.channels=1"))[1]["image_shape"] == [1, 8, 8]
    other = write_images(tmp_path / "other", 10, "L")
    moved = ensure_prepared(folder_settings(other, "data.image_size=8", "data.channels=1"))[1]
    assert moved["source_details"]["images"] == 10


def test_an_unreadable_image_or_an_empty_folder_is_explained(project: Path, tmp_path: Path):
    root = write_images(tmp_path / "faces", 10, "L")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png: cannot be read as an image"):
        prepare(folder_settings(root, "data.val_size=2", "data.test_size=2"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        prepare(folder_settings(tmp_path / "empty"))


@pytest.mark.integration
def test_one_short_training_on_an_image_folder(project: Path, tmp_path: Path):
    root = tmp_path / "pets"
    write_images(root / "cats", 24, "RGB")
    write_images(root / "dogs", 16, "L")
    tiny = [override for override in TINY if not override.startswith("data=")]
    summary = train(
        make_config(
            *tiny,
            "data=image_folder",
            f"data.root={root}",
            "data.image_size=16",
            "data.val_size=8",
            "data.test_size=8",
            "data.batch_size=8",
            "trainer.max_epochs=1",
        )
    )
    assert np.isfinite(summary["val/elbo"]) and summary["val/elbo"] < 0
    manifest = json.loads((project / "data" / "processed" / "image_folder" / "manifest.json").read_text())
    assert manifest["image_shape"] == [3, 16, 16]


def test_the_new_data_configs_are_validated(tmp_path: Path):
    assert problems(make_config("data=mnist")) == []
    assert problems(make_config("data=image_folder", f"data.root={tmp_path}")) == []
    assert problems(make_config("data=image_folder", f"data.root={tmp_path}", "data.val_size=300")) == []

    def keys(*overrides: str) -> list[str]:
        return [key for key, _, _ in problems(make_config(*overrides))]

    assert keys("data=image_folder") == ["data.root"]
    folder = ["data=image_folder", f"data.root={tmp_path}"]
    assert keys(*folder, "data.image_size=2") == ["data.image_size"]
    assert keys(*folder, "data.image_size=16.5") == ["data.image_size"]
    assert keys(*folder, "data.channels=2") == ["data.channels"]
    assert keys(*folder, "data.channels=true") == ["data.channels"]
    assert keys(*folder, "data.val_size=1.5", "data.test_size=-0.1") == ["data.val_size", "data.test_size"]
    assert keys(*folder, "data.val_size=0") == ["data.val_size"]
