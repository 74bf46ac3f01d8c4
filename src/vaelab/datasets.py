"""The prepare stage: raw dataset -> verified, deterministically split, compact uint8 tensors + manifest.

Output, in `data/processed/<name>/`:
    train.pt, val.pt, test.pt   {"images": uint8 [N, C, H, W] grey levels, "labels": int64 [N],
                                 "binary": uint8 [N, C, H, W] 0/1 (val and test only)}
    manifest.json               counts, content hashes, seeds, grey levels, where the raw data came from

Validation and test images are binarized *once* here, with `binarize_seed`, so every evaluation of
every model sees the same binary images (SPEC.md, evaluation protocol). Training images stay grey:
they are binarized afresh at each use (data.py).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from vaelab import __version__, paths
from vaelab.errors import DataError
from vaelab.files import replace_dir, staging_dir

SPLITS = ("train", "val", "test")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# MD5 of the *decompressed* IDX files: Debian recompressed the .gz files, so only the content
# is comparable between Debian's copy and torchvision's download (ENVIRONMENT.md).
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
# MD5 of scikit-learn's bundled 8x8 digits, as uint8 images and int64 labels.
DIGITS_MD5 = {"images": "fa70cba135d4cdd4cde65da70dbffde2", "labels": "1041ea9b393a866c07fc3ca1c2bb06cd"}


@dataclass
class RawDataset:
    """Images as uint8 [N, C, H, W] with values in [0, grey_levels). `test_*` is None without an official test split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor | None
    test_labels: torch.Tensor | None
    grey_levels: int
    source: str
    raw_md5: dict[str, str]


@dataclass(frozen=True)
class Settings:
    """What determines the prepared data. The manifest records it; a change triggers a fresh prepare."""

    name: str
    root: str | None
    val_size: int
    test_size: int
    split_seed: int
    binarize_seed: int

    @classmethod
    def from_config(cls, data_cfg) -> Settings:
        return cls(
            name=str(data_cfg.name),
            root=None if data_cfg.get("root") is None else str(data_cfg.root),
            val_size=int(data_cfg.val_size),
            test_size=int(data_cfg.get("test_size") or 0),
            split_seed=int(data_cfg.split_seed),
            binarize_seed=int(data_cfg.binarize_seed),
        )

    def manifest_keys(self) -> dict:
        return {
            "dataset": self.name,
            "val_size": self.val_size,
            "test_size": self.test_size,
            "split_seed": self.split_seed,
            "binarize_seed": self.binarize_seed,
        }


# ----------------------------------------------------------------------------------------------
# Raw sources


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _find_idx(source: Path, name: str) -> Path | None:
    """A raw IDX file in `source`, plain or gzipped, flat (Debian) or in torchvision's layout."""
    for folder in (source, source / "FashionMNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _stage_idx(source: Path, target: Path, files: dict[str, str]) -> None:
    """Copy (decompressing if needed) the IDX files from `source` into torchvision's raw folder."""
    target.mkdir(parents=True, exist_ok=True)
    for name in files:
        found = _find_idx(source, name)
        if found is None:
            raise DataError(f"{source}: missing {name} (or {name}.gz); expected the Fashion-MNIST IDX files")
        partial = target / f".{name}.partial"
        try:
            opener = gzip.open if found.suffix == ".gz" else open
            with opener(found, "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as error:
            partial.unlink(missing_ok=True)
            raise DataError(f"{found}: cannot be read ({error}); the file is truncated or not gzip/IDX") from error
        partial.replace(target / name)


def verify_md5(folder: Path, expected: dict[str, str]) -> dict[str, str]:
    for name, md5 in expected.items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: missing")
        actual = md5_of(path)
        if actual != md5:
            raise DataError(
                f"{path}: checksum mismatch (md5 of the decompressed file is {actual}, expected {md5}); "
                "the file is truncated or corrupted"
            )
    return dict(expected)


def load_fashion_mnist(root: str | None) -> RawDataset:
    """Fashion-MNIST from `root`, else Debian's package, else torchvision's downloader."""
    from torchvision.datasets import FashionMNIST

    tv_root = paths.project_root() / "data" / "raw"
    staged = tv_root / "FashionMNIST" / "raw"
    if root is not None:
        source = Path(root)
        _stage_idx(source, staged, FASHION_MNIST_MD5)
        origin = f"data.root: {source}"
    elif _find_idx(DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte"):
        _stage_idx(DEBIAN_FASHION_MNIST, staged, FASHION_MNIST_MD5)
        origin = f"debian package dataset-fashion-mnist: {DEBIAN_FASHION_MNIST}"
    else:
        origin = "torchvision download"
        if not all((staged / name).is_file() for name in FASHION_MNIST_MD5):
            try:
                FashionMNIST(tv_root, download=True)
            except Exception as error:  # noqa: BLE001 - any network failure means the same to the user
                raise DataError(
                    f"Fashion-MNIST not found in {DEBIAN_FASHION_MNIST} (apt-get install dataset-fashion-mnist) "
                    f"and torchvision could not download it into {tv_root}: {error}. "
                    "Set data.root to a folder holding the IDX files."
                ) from error
    raw_md5 = verify_md5(staged, FASHION_MNIST_MD5)
    train, test = FashionMNIST(tv_root, train=True), FashionMNIST(tv_root, train=False)
    return RawDataset(
        train_images=train.data.unsqueeze(1).contiguous(),  # [N, 1, 28, 28]
        train_labels=train.targets.long(),
        test_images=test.data.unsqueeze(1).contiguous(),
        test_labels=test.targets.long(),
        grey_levels=256,
        source=origin,
        raw_md5=raw_md5,
    )


def load_digits(root: str | None) -> RawDataset:
    """scikit-learn's bundled 8x8 digits: 1,797 images with 17 grey levels (0..16), no official test split."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = bunch.images.astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    actual = {
        "images": hashlib.md5(images.tobytes()).hexdigest(),
        "labels": hashlib.md5(labels.tobytes()).hexdigest(),
    }
    if actual != DIGITS_MD5:
        raise DataError(f"scikit-learn's digits changed: md5 {actual}, expected {DIGITS_MD5}")
    return RawDataset(
        train_images=torch.from_numpy(images).unsqueeze(1),  # [1797, 1, 8, 8]
        train_labels=torch.from_numpy(labels),
        test_images=None,
        test_labels=None,
        grey_levels=17,
        source="scikit-learn load_digits",
        raw_md5=actual,
    )


LOADERS: dict[str, Callable[[str | None], RawDataset]] = {
    "fashion_mnist": load_fashion_mnist,
    "digits": load_digits,
}


# ----------------------------------------------------------------------------------------------
# Split, binarize once, store


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


def binarize(images: torch.Tensor, grey_levels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample x_bin ~ Bernoulli(x / (levels - 1)), as uint8 0/1. Without a generator: fresh each call."""
    probs = images.float() / (grey_levels - 1)
    return torch.bernoulli(probs, generator=generator).to(torch.uint8)


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
    idx = split_indices(n, settings.val_size, 0 if official_test else settings.test_size, settings.split_seed)
    splits = {
        "train": {"images": raw.train_images[idx["train"]], "labels": raw.train_labels[idx["train"]]},
        "val": {"images": raw.train_images[idx["val"]], "labels": raw.train_labels[idx["val"]]},
    }
    if official_test:
        splits["test"] = {"images": raw.test_images, "labels": raw.test_labels}
    else:
        splits["test"] = {"images": raw.train_images[idx["test"]], "labels": raw.train_labels[idx["test"]]}
    for offset, split in enumerate(("val", "test"), start=1):
        generator = torch.Generator().manual_seed(settings.binarize_seed + offset)
        splits[split]["binary"] = binarize(splits[split]["images"], raw.grey_levels, generator)
    return splits


def prepare(settings: Settings, out_dir: Path | None = None) -> dict:
    """Read, verify, split and store one dataset. Returns the manifest. Never leaves partial output."""
    if settings.name not in LOADERS:
        raise DataError(f"unknown dataset {settings.name!r}; known: {sorted(LOADERS)}")
    out_dir = out_dir or paths.processed_dir(settings.name)
    raw = LOADERS[settings.name](settings.root)
    splits = build_splits(raw, settings)
    manifest = {
        **settings.manifest_keys(),
        "source": raw.source,
        "image_shape": list(raw.train_images.shape[1:]),
        "grey_levels": raw.grey_levels,
        "raw_md5": raw.raw_md5,
        "splits": {name: {"count": len(t["images"]), "sha256": content_hash(t)} for name, t in splits.items()},
        "vaelab_version": __version__,
    }
    manifest["data_hash"] = hashlib.sha256(
        json.dumps({k: manifest[k] for k in ("splits", "grey_levels", "image_shape")}, sort_keys=True).encode()
    ).hexdigest()

    staging = staging_dir(out_dir)
    try:
        for name, tensors in splits.items():
            torch.save(tensors, staging / f"{name}.pt")
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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
