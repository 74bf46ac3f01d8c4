"""A callback that records what a training run actually trains on, for tests that race other processes against it.

'+callbacks.record_data={_target_:helpers.data_callbacks.RecordData,path:/some/file.json}'
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class RecordData(Callback):
    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_start(self, trainer, pl_module) -> None:
        # By now Lightning has asked the datamodule for its loaders: these are the tensors the run trains on.
        data = trainer.datamodule
        record = {
            "data_hash": pl_module.lineage["data_hash"],
            "run_id": pl_module.lineage["run_id"],
            "train": len(data.split("train")["images"]),
            "val": len(data.eval_images("val")),
            "batches": trainer.num_training_batches,
        }
        self.path.write_text(json.dumps(record))
