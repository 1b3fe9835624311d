"""Train with PyTorch Lightning on an encrypted dataset.

A ``LightningDataModule`` whose ``train_dataloader()`` is a
``shardlock.torch.DataLoader`` with two workers; the module sets the dataset's epoch
from the trainer's (``on_train_epoch_start``). Checks that every epoch delivers each
sample once, in a new order, and that the loss falls. Run:
python examples/train_lightning.py [--samples N] [--epochs E]
"""

import pathlib
import tempfile

import lightning as L
import torch
from _blobs import EpochCheck, example_args, make_blobs

import shardlock


class Blobs(L.LightningDataModule):
    def __init__(self, root: pathlib.Path, samples: int) -> None:
        super().__init__()
        self.root, self.samples = root, samples

    def prepare_data(self) -> None:
        self.kw = make_blobs(self.root, self.samples, "train_lightning")

    def setup(self, stage: str) -> None:
        kw = dict(self.kw)
        self.ds = shardlock.torch.IterableDataset(kw.pop("path"), **kw, batch_size=250, seed=0, sample_ids=True,
                                                  drop_last=False)

    def train_dataloader(self) -> shardlock.torch.DataLoader:
        return shardlock.torch.DataLoader(self.ds, num_workers=2)


class Classifier(L.LightningModule):
    def __init__(self, check: EpochCheck) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
        self.check = check
        self.losses: list = []
        self.total = 0.0

    def on_train_epoch_start(self) -> None:
        self.trainer.datamodule.ds.set_epoch(self.current_epoch)
        self.total, self.n = 0.0, 0

    def training_step(self, batch: dict, index: int) -> torch.Tensor:
        self.check.add(batch["sample_id"])
        loss = torch.nn.functional.cross_entropy(self.net(batch["x"]), batch["y"])
        self.total += loss.item() * len(batch["y"])
        self.n += len(batch["y"])
        return loss

    def on_train_epoch_end(self) -> None:
        seen = self.check.end_epoch()
        self.losses.append(self.total / self.n)
        print(f"epoch {self.current_epoch}: loss {self.losses[-1]:.4f}, {seen}")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    args = example_args(3)
    with tempfile.TemporaryDirectory() as d:
        check = EpochCheck(args.samples)
        model = Classifier(check)
        trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, datamodule=Blobs(pathlib.Path(d), args.samples))
        if len(model.losses) != args.epochs or not model.losses[-1] < model.losses[0]:
            raise SystemExit(f"loss did not fall over {args.epochs} epochs: {model.losses}")


if __name__ == "__main__":
    main()
