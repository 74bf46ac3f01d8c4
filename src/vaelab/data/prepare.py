"""The prepare stage: raw dataset -> verified, deterministically split, compact uint8 tensors + manifest.

Output, in `data/processed/<name>/`:
    train.pt, val.pt, test.pt   {"images": uint8 [N, C, H, W] grey levels, "labels": int64 [N],
                                 "binary": uint8 [N, C, H, W] 0/1 (val and test only)}
    manifest.json               counts, content hashes, seeds, grey levels, where the raw data came from

Validation and test images are binarized *once* here, with `binarize_seed`, so every evaluation of
every model sees the same binary images (the evaluation protocol in the README). Training images stay grey:
they are binarized afresh at each use (vaelab.data.datamodule).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from filelock import FileLock

from vaelab import __version__, paths
from vaelab.data.settings import Settings
from vaelab.data.sources import LOADERS, RawDataset
from vaelab.errors import DataError
from vaelab.files import replacing_dir
from vaelab.model.likelihoods import binarize

SPLITS = ("train", "val", "test")
# val and test are observed once (binarized here, dequantized by the datamodule) with seed binarize_seed + offset.
EVAL_SEED_OFFSET = {"val": 1, "test": 2}


def hold_out_count(size: int | float, n: int) -> int:
    """A val/test size as a count of images: an int is one already, a float in (0, 1) a fraction of `n` (at least 1)."""
    if isinstance(size, float):
        return max(1, round(size * n))
    return size


def split_indices(n: int, val_size: int, test_size: int, seed: int) -> dict[str, torch.Tensor]:
    """A seeded permutation cut into val, test (when carved out of train) and train."""
    if val_size + test_size >= n:
        raise DataError(f"cannot hold out {val_size} val + {test_size} test images from {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return {
        "val": perm[:val_size].sort().values,
        "test": perm[val_size : val_size + test_size].sort().values,
        "train": perm[val_size + test_size :].sort().values,
    }


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_splits(raw: RawDataset, settings: Settings) -> dict[str, dict[str, torch.Tensor]]:
    n = len(raw.train_images)
    official_test = raw.test_images is not None
    if not official_test and settings.test_size <= 0:
        raise DataError(f"{settings.name} has no official test split: set data.test_size > 0")
    val_size = hold_out_count(settings.val_size, n)
    test_size = 0 if official_test else hold_out_count(settings.test_size, n)
    idx = split_indices(n, val_size, test_size, settings.split_seed)
    splits = {
        "train": {"images": raw.train_images[idx["train"]], "labels": raw.train_labels[idx["train"]]},
        "val": {"images": raw.train_images[idx["val"]], "labels": raw.train_labels[idx["val"]]},
    }
    if official_test:
        splits["test"] = {"images": raw.test_images, "labels": raw.test_labels}
    else:
        splits["test"] = {"images": raw.train_images[idx["test"]], "labels": raw.train_labels[idx["test"]]}
    for split in ("val", "test"):
        generator = torch.Generator().manual_seed(settings.binarize_seed + EVAL_SEED_OFFSET[split])
        splits[split]["binary"] = binarize(splits[split]["images"], raw.grey_levels, generator)
    return splits


def prepare(settings: Settings, out_dir: Path | None = None) -> dict:
    """Read, verify, split and store one dataset. Returns the manifest. Never leaves partial output."""
    if settings.name not in LOADERS:
        raise DataError(f"unknown dataset {settings.name!r}; known: {sorted(LOADERS)}")
    out_dir = out_dir or paths.processed_dir(settings.name)
    raw = LOADERS[settings.name](settings)
    splits = build_splits(raw, settings)
    manifest = {
        **settings.manifest_keys(),
        "source": raw.source,
        "image_shape": list(raw.train_images.shape[1:]),
        "grey_levels": raw.grey_levels,
        "raw_md5": raw.raw_md5,
        **({"source_details": raw.details} if raw.details else {}),
        "splits": {name: {"count": len(t["images"]), "sha256": content_hash(t)} for name, t in splits.items()},
        "vaelab_version": __version__,
    }
    manifest["data_hash"] = hashlib.sha256(
        json.dumps({k: manifest[k] for k in ("splits", "grey_levels", "image_shape")}, sort_keys=True).encode()
    ).hexdigest()

    with replacing_dir(out_dir) as fresh:
        for name, tensors in splits.items():
            torch.save(tensors, fresh / f"{name}.pt")
        (fresh / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def ensure_prepared(settings: Settings) -> tuple[Path, dict]:
    """The processed folder for these settings, preparing it first when it is missing or stale.

    Training and evaluation call this, so a fresh clone can train without `dvc repro` first.
    A file lock keeps parallel sweep jobs from preparing the same dataset twice at once.
    """
    folder = paths.processed_dir(settings.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{settings.name}.lock")):
        manifest = read_manifest(folder)
        current = (
            manifest is not None
            and all(manifest.get(k) == v for k, v in settings.manifest_keys().items())
            and all((folder / f"{split}.pt").is_file() for split in SPLITS)
        )
        if not current:
            manifest = prepare(settings, folder)
    return folder, manifest


def load_split(folder: Path, split: str) -> dict[str, torch.Tensor]:
    return torch.load(folder / f"{split}.pt", weights_only=True)

