"""MNIST as users have it: a tiny but well-formed set of the four IDX files, for data.root."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file: big-endian magic number (0x08 = unsigned bytes, then the number of dimensions), sizes, data."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def mnist_arrays(n_train: int = 120, n_test: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
    }


def write_mnist(folder: Path, files: dict[str, bytes], gzipped=("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte")):
    """The IDX files in `folder`, some gzipped (`<name>.gz`) and some plain, as users have them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if name in gzipped:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


def mnist_files(**sizes: int) -> dict[str, bytes]:
    """The four IDX files' bytes; `n_train` and `n_test` as in mnist_arrays."""
    return {name: idx_bytes(array) for name, array in mnist_arrays(**sizes).items()}
