"""Prepared tensors -> batches for Lightning, observed the way the likelihood models them.

Batches come straight from in-memory uint8 tensors: no per-sample Python Dataset, no workers. The
tensors sit on the accelerator, so a GPU step copies nothing from the host. The loader shards by rank
itself (Lightning's automatic DistributedSampler only applies to DataLoader).

The likelihood class decides what the model sees (vaelab.model.likelihoods, `observe`):
    train    uint8 batch -> observed afresh on the device at every use (e.g. dynamic binarization,
             fresh dequantization noise)
    val/test observed once with the manifest's seed, identical for every model and every evaluation
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch

from vaelab.data.observations import fixed_observations
from vaelab.data.prepare import read_prepared
from vaelab.data.settings import Settings
from vaelab.model.likelihoods import Bernoulli, Likelihood


class TensorBatches:
    """Iterate over an in-memory tensor in batches; reshuffled per epoch, sharded by rank.

    Shuffling is seeded by (seed, epoch), so a resumed run sees the same order. Under DDP each rank
    takes every `world_size`-th index of the permutation, truncated to equal length, so shards never overlap.
    """

    def __init__(
        self,
        tensor: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.tensor = tensor
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        # Lightning calls `loader.sampler.set_epoch(epoch)` at each epoch start; we are our own sampler.
        # (Having a `sampler`, Lightning treats us like a DataLoader and also asks for `batch_sampler`.)
        self.sampler = self
        self.batch_sampler = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        n = len(self.tensor)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(n)
        per_rank = n // self.world_size
        return order[self.rank :: self.world_size][:per_rank]

    def __len__(self) -> int:
        return math.ceil(len(self.tensor) // self.world_size / self.batch_size)

    def __iter__(self):
        idx = self.indices().to(self.tensor.device)  # one small copy per epoch, none per batch
        for start in range(0, len(idx), self.batch_size):
            yield self.tensor[idx[start : start + self.batch_size]]


class ImageData(pl.LightningDataModule):
    """Fashion-MNIST, digits, ... as in-memory tensors: prepared on demand, batched without copies."""

    def __init__(
        self,
        settings: Settings,
        batch_size: int,
        limit_train: int | None = None,
        eval_batch_size: int = 1000,
        likelihood: type[Likelihood] = Bernoulli,
        seed: int = 0,
    ):
        super().__init__()
        self.settings = settings
        self.batch_size = batch_size
        self.limit_train = limit_train
        self.eval_batch_size = eval_batch_size
        self.likelihood = likelihood
        self.seed = seed
        # All three splits are read now, with the manifest, as one snapshot: the data hash the run records is that
        # of the tensors it trains on, even if another job re-prepares the folder with other settings meanwhile.
        prepared = read_prepared(settings)
        self.folder, self.manifest = prepared.folder, prepared.manifest
        self._prepared = prepared.splits
        self._splits: dict[str, dict[str, torch.Tensor]] = {}
        self._fixed: dict[str, torch.Tensor] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["image_shape"])

    @property
    def grey_levels(self) -> int:
        return int(self.manifest["grey_levels"])

    @property
    def data_hash(self) -> str:
        return self.manifest["data_hash"]

    def split(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._splits:
            tensors = self._prepared[name]
            if name == "train" and self.limit_train:
                tensors = {k: v[: self.limit_train] for k, v in tensors.items()}
            self._splits[name] = tensors
        return self._splits[name]

    def eval_images(self, name: str, limit: int | None = None) -> torch.Tensor:
        """The fixed observation of the val or test split (cached), optionally its first `limit` images."""
        if name not in self._fixed:
            self._fixed[name] = fixed_observations(self.split(name), name, self.likelihood, self.manifest)
        return self._fixed[name][:limit] if limit else self._fixed[name]

    def _loader(self, tensor: torch.Tensor, batch_size: int, shuffle: bool) -> TensorBatches:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # The whole split is moved to the accelerator once (Fashion-MNIST's train split is 43 MB of uint8): every
        # batch is then sliced, and observed, where the model runs, and Lightning's per-batch transfer is a no-op.
        device = trainer.strategy.root_device if trainer is not None else tensor.device
        return TensorBatches(
            tensor.to(device), batch_size, shuffle=shuffle, seed=self.seed, rank=rank, world_size=world
        )

    def train_dataloader(self) -> TensorBatches:
        return self._loader(self.split("train")["images"], self.batch_size, shuffle=True)

    def val_dataloader(self) -> TensorBatches:
        return self._loader(self.eval_images("val"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> TensorBatches:
        return self._loader(self.eval_images("test"), self.eval_batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> torch.Tensor:
        # Runs on the device, so observing (binarizing, dequantizing) costs no host work and no extra copy.
        if self.trainer is not None and self.trainer.training:
            return self.likelihood.observe(batch, self.grey_levels)
        return batch  # val/test batches are already the fixed observation
