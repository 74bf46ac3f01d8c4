"""What determines a prepared dataset: the `data.*` keys that shape its tensors. The manifest records them, and a
change triggers a fresh prepare."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """What determines the prepared data. The manifest records it; a change triggers a fresh prepare."""

    name: str
    root: str | None
    val_size: int | float  # an int is a count, a float in (0, 1) a fraction of the images split
    test_size: int | float
    split_seed: int
    binarize_seed: int
    # Only data=image_folder has these keys; None elsewhere, so the other datasets' settings stay as they were.
    image_size: int | None = None
    channels: int | None = None  # None: 1 if every image is grey, else 3

    @classmethod
    def from_config(cls, data_cfg) -> Settings:
        return cls(
            name=str(data_cfg.name),
            root=None if data_cfg.get("root") is None else str(data_cfg.root),
            val_size=_hold_out_size(data_cfg.val_size),
            test_size=_hold_out_size(data_cfg.get("test_size")),
            split_seed=int(data_cfg.split_seed),
            binarize_seed=int(data_cfg.binarize_seed),
            image_size=_optional_int(data_cfg.get("image_size")),
            channels=_optional_int(data_cfg.get("channels")),
        )

    def manifest_keys(self) -> dict:
        # `root` belongs here because for image_folder (and MNIST from data.root) the folder *is* the data:
        # pointing data.root elsewhere must re-prepare. A manifest written before a key existed reads it as
        # None (ensure_prepared uses .get), so adding keys does not invalidate prepared data.
        return {
            "dataset": self.name,
            "root": self.root,
            "val_size": self.val_size,
            "test_size": self.test_size,
            "split_seed": self.split_seed,
            "binarize_seed": self.binarize_seed,
            "image_size": self.image_size,
            "channels": self.channels,
        }


def _hold_out_size(value) -> int | float:
    """A configured val/test size: a float stays a fraction, anything else (null included) is a count."""
    return float(value) if isinstance(value, float) else int(value or 0)


def _optional_int(value) -> int | None:
    return None if value is None else int(value)
