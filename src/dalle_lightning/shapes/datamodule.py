"""The Shapes data set as a LightningDataModule: rendered into real shards on first use, then read by the same
`ShardDataModule` as any img2dataset output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dalle_lightning.data.datamodule import ShardDataModule
from dalle_lightning.shapes import dataset


class ShapesDataModule(ShardDataModule):
    """The embedded Shapes data set: rendered into real shards on first use, then read like any other."""

    def __init__(
        self,
        root: str,
        num_train: int = 20_000,
        num_val: int = 1000,
        render_size: int = 64,
        render_seed: int = 0,
        samples_per_shard: int = 1000,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.root = Path(root)
        self.build_args = dict(
            num_train=num_train,
            num_val=num_val,
            size=render_size,
            seed=render_seed,
            samples_per_shard=samples_per_shard,
        )

    def prepare_data(self) -> None:
        dataset.build(self.root, **self.build_args)

    def setup(self, stage: str | None = None) -> None:
        manifest = dataset.build(self.root, **self.build_args)  # instant when already built
        self.train_shards = manifest["shards"]["train"]
        self.val_shards = manifest["shards"]["val"]
        super().setup(stage)
