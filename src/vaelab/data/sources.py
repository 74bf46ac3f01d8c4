"""Raw datasets: where each one's images come from, and the checks that they are what they claim to be.

Every loader returns a RawDataset of uint8 images [N, C, H, W] with their labels and the checksums of what it read;
vaelab.data.prepare splits and stores them. Fashion-MNIST and MNIST are IDX files (a default folder, `data.root`,
or torchvision's download), digits ships inside scikit-learn, and image_folder reads any folder of images.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vaelab import paths
from vaelab.data.settings import Settings
from vaelab.errors import DataError

# Where Fashion-MNIST is looked for when data.root is null: Debian's dataset-fashion-mnist package puts the IDX files
# here, and the environment variable names another folder (a copy on a shared disk, say).
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "VAELAB_FASHION_MNIST"

# The four files of an MNIST-format dataset, as torchvision names them once decompressed.
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# The IDX header's magic number: 0x08 (unsigned bytes), then the number of dimensions (3 or 1).
IDX_MAGIC = {"images": 2051, "labels": 2049}
MNIST_IMAGE_SHAPE = [28, 28]

# MD5 of the *decompressed* IDX files: Debian recompressed the .gz files, so only the content
# is comparable between Debian's copy and torchvision's download.
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
# MD5 of scikit-learn's bundled 8x8 digits, as uint8 images and int64 labels.
DIGITS_MD5 = {"images": "fa70cba135d4cdd4cde65da70dbffde2", "labels": "1041ea9b393a866c07fc3ca1c2bb06cd"}

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# PIL modes with samples wider than 8 bits that vaelab cannot map to grey levels: what each holds, for messages.
WIDE_MODES = {"I": "32-bit integer", "F": "32-bit floating-point"}


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
    details: dict = field(default_factory=dict)  # more about the source for the manifest, e.g. a folder's classes


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class IdxDataset:
    """An MNIST-format dataset as torchvision keeps it: the four IDX files in `data/raw/<torchvision_name>/raw/`."""

    title: str  # for messages
    torchvision_name: str  # the torchvision.datasets class, which also names its folder
    md5: dict[str, str] | None  # of the decompressed files; None where unknown: the IDX structure is checked instead
    classes: tuple[str, ...] = ()  # the names of labels 0, 1, ...; none where a label is its own name (a digit)

    def torchvision_class(self):
        import torchvision.datasets

        return getattr(torchvision.datasets, self.torchvision_name)


FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST = IdxDataset("Fashion-MNIST", "FashionMNIST", FASHION_MNIST_MD5, FASHION_MNIST_CLASSES)
# MNIST's decompressed md5s could not be measured offline, and a made-up checksum would reject the real data.
MNIST = IdxDataset("MNIST", "MNIST", None)


def _find_idx(source: Path, name: str, layout: str) -> Path | None:
    """A raw IDX file in `source`, plain or gzipped, flat (Debian) or in torchvision's `<layout>/raw/` folder."""
    for folder in (source, source / layout / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _decompress(source: Path, target: Path) -> None:
    try:
        opener = gzip.open if source.suffix == ".gz" else open
        with opener(source, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except (OSError, EOFError) as error:
        raise DataError(f"{source}: cannot be read ({error}); the file is truncated or not gzip/IDX") from error


def _stage_idx(source: Path, target: Path, dataset: IdxDataset) -> None:
    """Copy (decompressing if needed) the four IDX files from `source` into torchvision's raw folder.

    The copies are checked before any of them replaces what is there, so a bad source never shadows
    a good earlier copy.
    """
    found = {name: _find_idx(source, name, dataset.torchvision_name) for name in IDX_FILES}
    missing = [f"{name}(.gz)" for name, path in found.items() if path is None]
    if missing:
        raise DataError(f"{source}: missing {', '.join(missing)}; expected the {dataset.title} IDX files")
    target.mkdir(parents=True, exist_ok=True)
    partials = {name: target / f".{name}.partial" for name in IDX_FILES}
    try:
        for name, partial in partials.items():
            _decompress(found[name], partial)
        check_idx_structure(partials, shown=found)
        for name, partial in partials.items():
            partial.replace(target / name)
    finally:
        for partial in partials.values():
            partial.unlink(missing_ok=True)


def _idx_count(path: Path, kind: str, shown: Path) -> int:
    """The number of items in one IDX file of `kind` ("images" or "labels"), after checking its header and length."""
    magic = IDX_MAGIC[kind]
    header_size = 4 * (1 + (magic & 0xFF))  # the magic number, then one 4-byte size per dimension
    with open(path, "rb") as f:
        header = f.read(header_size)
    if len(header) < header_size:
        raise DataError(f"{shown}: {len(header)} bytes, too short for an IDX {kind} header")
    found_magic, count, *shape = struct.unpack(f">{header_size // 4}I", header)
    if found_magic != magic:
        raise DataError(f"{shown}: magic number {found_magic}, expected {magic}; not an IDX {kind} file")
    if kind == "images" and shape != MNIST_IMAGE_SHAPE:
        raise DataError(f"{shown}: images are {shape[0]}x{shape[1]}, expected 28x28")
    expected_size = header_size + count * math.prod(shape)
    size = path.stat().st_size
    if size != expected_size:
        raise DataError(
            f"{shown}: {size} bytes, but its header announces {count} {kind} ({expected_size} bytes); "
            "the file is truncated or corrupted"
        )
    return count


def check_idx_structure(files: dict[str, Path], shown: dict[str, Path] | None = None) -> None:
    """Check the four decompressed IDX files as MNIST-format data; errors name `shown[name]` (default: the file).

    Without a known checksum this is what stands between a wrong file and torchvision's reader,
    which would fail with a bare assertion or read garbage.
    """
    shown = shown or files
    for prefix in ("train", "t10k"):
        images, labels = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
        n_images = _idx_count(files[images], "images", shown[images])
        n_labels = _idx_count(files[labels], "labels", shown[labels])
        if n_images != n_labels:
            raise DataError(f"{shown[labels]}: {n_labels} labels, but {shown[images]} holds {n_images} images")


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


def _download_idx(dataset: IdxDataset, tv_root: Path, not_found: str | None) -> str:
    """The files from an earlier prepare, else torchvision's download (which checks each .gz file's md5).

    Returns where the files came from, for the manifest.
    """
    staged = tv_root / dataset.torchvision_name / "raw"
    files = {name: staged / name for name in IDX_FILES}
    if all(path.is_file() for path in files.values()):
        origin = f"{staged}, staged by an earlier prepare"
    else:
        not_found = not_found or f"{dataset.title} not found in {staged}"
        try:
            dataset.torchvision_class()(tv_root, download=True)
        except Exception as error:  # noqa: BLE001 - any network failure means the same to the user
            raise DataError(
                f"{not_found} and torchvision could not download it into {tv_root} (no internet access?). "
                f"Set data.root to a folder holding the four {dataset.title} IDX files (plain or .gz). "
                f"torchvision said: {str(error).strip()}"
            ) from error
        origin = "torchvision download"
    check_idx_structure(files)
    return origin


def _load_idx_dataset(
    dataset: IdxDataset, root: str | None, local_copy: tuple[Path, str] | None = None, not_found: str | None = None
) -> RawDataset:
    """An MNIST-format dataset from data.root, else `local_copy` (folder, description), else torchvision's download.

    Every route ends in torchvision's folder layout, so torchvision's own reader loads the tensors.
    """
    tv_root = paths.project_root() / "data" / "raw"
    staged = tv_root / dataset.torchvision_name / "raw"
    if root is not None:
        _stage_idx(Path(root), staged, dataset)
        origin = f"data.root: {root}"
    elif local_copy is not None:
        _stage_idx(local_copy[0], staged, dataset)
        origin = local_copy[1]
    else:
        origin = _download_idx(dataset, tv_root, not_found)
    if dataset.md5 is not None:
        raw_md5 = verify_md5(staged, dataset.md5)
    else:
        # No checksum to compare with, but recorded all the same: the manifest then still tells datasets apart.
        raw_md5 = {name: md5_of(staged / name) for name in IDX_FILES}
    tv_class = dataset.torchvision_class()
    train, test = tv_class(tv_root, train=True), tv_class(tv_root, train=False)
    return RawDataset(
        train_images=train.data.unsqueeze(1).contiguous(),  # [N, 1, 28, 28]
        train_labels=train.targets.long(),
        test_images=test.data.unsqueeze(1).contiguous(),
        test_labels=test.targets.long(),
        grey_levels=256,
        source=origin,
        raw_md5=raw_md5,
        details={"classes": list(dataset.classes)} if dataset.classes else {},
    )


def fashion_mnist_folder() -> Path:
    """Where to look for Fashion-MNIST when data.root is null: $VAELAB_FASHION_MNIST, else Debian's folder."""
    return Path(os.environ.get(FASHION_MNIST_ENV) or DEBIAN_FASHION_MNIST)


def load_fashion_mnist(settings: Settings) -> RawDataset:
    """Fashion-MNIST from data.root, else Debian's package, else torchvision's downloader."""
    folder = fashion_mnist_folder()
    installed = _find_idx(folder, IDX_FILES[0], FASHION_MNIST.torchvision_name) is not None
    what = "debian package dataset-fashion-mnist" if str(folder) == DEBIAN_FASHION_MNIST else FASHION_MNIST_ENV
    local_copy = (folder, f"{what}: {folder}") if installed else None
    not_found = (
        f"Fashion-MNIST not found in {folder} (apt-get install dataset-fashion-mnist, or point {FASHION_MNIST_ENV} "
        "at a folder holding its IDX files)"
    )
    return _load_idx_dataset(FASHION_MNIST, settings.root, local_copy, not_found)


def load_mnist(settings: Settings) -> RawDataset:
    """MNIST from data.root (the four IDX files, plain or .gz), else torchvision's downloader."""
    return _load_idx_dataset(MNIST, settings.root)


def load_digits(settings: Settings) -> RawDataset:
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


def _image_files(folder: Path) -> list[Path]:
    """Every image under `folder`, as relative paths in sorted order, which is the same on every machine.

    Hidden files and folders are skipped: they hold things like macOS's `._name.jpg` metadata, not images.
    """
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        hidden = any(part.startswith(".") for part in relative.parts)
        if path.suffix.lower() in IMAGE_EXTENSIONS and not hidden and path.is_file():
            found.append(relative)
    return sorted(found, key=Path.as_posix)


def _folder_labels(files: list[Path]) -> tuple[torch.Tensor, list[str]]:
    """Labels from class subfolders (their sorted names, as ImageFolder numbers them), or all 0 without classes.

    The root has classes when every image lies in a subfolder of it; one image directly in the root
    means the subfolders are just how the images are stored.
    """
    if any(len(relative.parts) == 1 for relative in files):
        return torch.zeros(len(files), dtype=torch.int64), []
    classes = sorted({relative.parts[0] for relative in files})
    index = {name: i for i, name in enumerate(classes)}
    return torch.tensor([index[relative.parts[0]] for relative in files], dtype=torch.int64), classes


def _read_image(path: Path, transform: Callable) -> torch.Tensor:
    """One image as uint8 RGB [3, S, S]. A grey image gets three equal channels; an alpha channel is dropped."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            # Phone and camera JPEGs store their rotation in EXIF; apply it so faces are upright.
            upright = ImageOps.exif_transpose(image)
            rgb = _to_8_bits(upright, image.format, path).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: cannot be read as an image ({error})") from error
    return transform(rgb)


def _to_8_bits(image, file_format: str | None, path: Path):
    """A PIL image whose samples are wider than 8 bits, as 8-bit grey; any other image as it is.

    PIL's convert() clips wide samples at 255 instead of scaling them (a 16-bit photo comes out almost white). 16-bit
    grey keeps its high byte, as PIL reads 16-bit colour PNGs. Modes whose range is unknown are refused by name.
    """
    from PIL import Image

    # Pillow reads 16-bit grey PNG as I;16 (older releases as I, 32-bit): either way the samples are 0..65535.
    sixteen_bit = image.mode.startswith("I;16") or (image.mode == "I" and file_format == "PNG")
    if sixteen_bit:
        samples = np.asarray(image).astype(np.int64)
        if samples.min() < 0 or samples.max() > 0xFFFF:
            raise DataError(f"{path}: 16-bit grey image (mode {image.mode}) holds values outside 0..65535")
        return Image.fromarray((samples >> 8).astype(np.uint8))
    if image.mode in WIDE_MODES:
        raise DataError(
            f"{path}: {WIDE_MODES[image.mode]} image (PIL mode {image.mode}), whose range of values is unknown; "
            "allowed: 8-bit images, or 16-bit grey or colour PNGs (save it as one of those)"
        )
    return image


def _to_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    """[N, 3, S, S] RGB as `channels` (1 or 3); None picks 1 when every image is grey (equal channels), else 3."""
    grey = bool((images[:, 0] == images[:, 1]).all() and (images[:, 1] == images[:, 2]).all())
    if channels is None:
        channels = 1 if grey else 3
    if channels == 3:
        return images
    if grey:
        return images[:, :1].contiguous()  # exact: the three channels are equal
    # ITU-R 601-2 luma in PIL's integer arithmetic (as Image.convert("L")): exact, and the same on every machine.
    weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32).view(1, 3, 1, 1)
    return ((images.int() * weights).sum(1, keepdim=True) + 0x8000).bitwise_right_shift(16).to(torch.uint8)


def load_image_folder(settings: Settings) -> RawDataset:
    """Every image under data.root, resized (shorter side) to data.image_size and centre-cropped square.

    There is no official test split: val and test are carved out of all the images.
    """
    from torchvision.transforms import v2

    if settings.root is None or settings.image_size is None:
        raise DataError("data=image_folder needs data.root (the folder of images) and data.image_size")
    folder = Path(settings.root).resolve()
    files = _image_files(folder)
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in it or its subfolders")
    # Resizing the PIL image (not a tensor) uses Pillow's integer resampling: the same bytes on every machine,
    # so the data hash does not depend on the CPU that prepared the data.
    size = settings.image_size
    transform = v2.Compose([v2.Resize(size), v2.CenterCrop(size), v2.PILToTensor()])
    rgb = torch.stack([_read_image(folder / relative, transform) for relative in files])
    images = _to_channels(rgb, settings.channels)
    labels, classes = _folder_labels(files)
    return RawDataset(
        train_images=images,
        train_labels=labels,
        test_images=None,
        test_labels=None,
        grey_levels=256,
        source=f"image folder: {folder}",
        # No published checksums for a user's folder: hash the decoded content, as for digits.
        raw_md5={
            "images": hashlib.md5(images.numpy().tobytes()).hexdigest(),
            "labels": hashlib.md5(labels.numpy().tobytes()).hexdigest(),
        },
        details={"folder": str(folder), "images": len(files), "classes": classes},
    )


LOADERS: dict[str, Callable[[Settings], RawDataset]] = {
    "fashion_mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "digits": load_digits,
    "image_folder": load_image_folder,
}


def class_names(manifest: dict) -> list[str] | None:
    """The names of a prepared dataset's labels 0, 1, ..., as its manifest records them (`source_details.classes`:
    Fashion-MNIST's ten, an image folder's subfolders), or None where a label is its own name (a digit) or the
    images have no classes. Fashion-MNIST prepared before its manifest recorded them is named all the same."""
    recorded = manifest.get("source_details", {}).get("classes")
    if recorded is None and manifest.get("dataset") == "fashion_mnist":
        recorded = FASHION_MNIST_CLASSES
    return list(recorded or []) or None
