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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from vaelab import __version__, paths
from vaelab.data.settings import Settings
from vaelab.data.sources import LOADERS, RawDataset
from vaelab.errors import DataError
from vaelab.files import remove_stale_staging, replacing_dir
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
    """Read, verify, split and store one dataset. Returns the manifest. Never leaves partial output.

    Holds the dataset's lock (as `read_prepared` does), so a run never reads a folder half-way through its replacement.
    """
    out_dir = out_dir or paths.processed_dir(settings.name)
    with _dataset_lock(settings.name, out_dir):
        return _prepare(settings, out_dir)[0]


def _prepare(settings: Settings, out_dir: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """`prepare` under the caller's lock: the manifest and the tensors it describes."""
    if settings.name not in LOADERS:
        raise DataError(f"unknown dataset {settings.name!r}; known: {sorted(LOADERS)}")
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
    return manifest, splits


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def _dataset_lock(name: str, folder: Path) -> Iterator[None]:
    """One process at a time prepares or reads dataset `name` in `folder`'s parent; stale staging there goes first."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{name}.lock")):
        remove_stale_staging(folder.parent)
        yield


@dataclass(frozen=True)
class Prepared:
    """Prepared tensors and the manifest that describes them, read together: `manifest["data_hash"]` names exactly
    these tensors, whatever another process prepares into the same folder afterwards."""

    folder: Path
    manifest: dict
    splits: dict[str, dict[str, torch.Tensor]]

    @property
    def data_hash(self) -> str:
        return self.manifest["data_hash"]


def read_prepared(settings: Settings, splits: Sequence[str] = SPLITS) -> Prepared:
    """The prepared `splits` for these settings, preparing them first when missing, stale or not what the manifest
    says. Training and evaluation call this, so a fresh clone can train without `dvc repro` first.

    The manifest is read, the tensors loaded and their content hashes checked against it under the dataset's lock:
    parallel jobs with other split settings re-prepare the same folder, and a run must record the hash of the data
    it trains on. A folder changed behind the lock (a hand copy, a `dvc checkout` mid-run) fails the hash check and
    is prepared afresh.
    """
    folder = paths.processed_dir(settings.name)
    with _dataset_lock(settings.name, folder):
        manifest = read_manifest(folder)
        if _is_current(manifest, folder, settings):
            loaded = {name: load_split(folder, name) for name in splits}
            if all(content_hash(loaded[name]) == manifest["splits"][name].get("sha256") for name in splits):
                return Prepared(folder, manifest, loaded)
        manifest, prepared = _prepare(settings, folder)
        return Prepared(folder, manifest, {name: prepared[name] for name in splits})


def _is_current(manifest: dict | None, folder: Path, settings: Settings) -> bool:
    return (
        manifest is not None
        and all(manifest.get(k) == v for k, v in settings.manifest_keys().items())
        and all(isinstance(manifest.get("splits", {}).get(split), dict) for split in SPLITS)
        and all((folder / f"{split}.pt").is_file() for split in SPLITS)
    )


def ensure_prepared(settings: Settings) -> tuple[Path, dict]:
    """The processed folder for these settings and its manifest, preparing it first when missing or stale.

    Only the manifest is read: a caller that then loads tensors from the folder could get another prepare's;
    `read_prepared` reads both at once."""
    prepared = read_prepared(settings, splits=())
    return prepared.folder, prepared.manifest


def load_split(folder: Path, split: str) -> dict[str, torch.Tensor]:
    return torch.load(folder / f"{split}.pt", weights_only=True)
