"""Train with the Hugging Face ``Trainer`` on an encrypted dataset.

The Trainer's train dataloader is a ``shardlock.torch.DataLoader`` with two workers
(``get_train_dataloader`` is overridden, so the Trainer does not re-batch shardlock's
batches); the Trainer sets the epoch through ``DataLoader.set_epoch``. Checks that each
epoch delivers every sample once, in a new order, and that the loss falls. Run:
python examples/train_hf.py [--samples N] [--epochs E]
"""

import pathlib
import tempfile

import torch
from _blobs import EpochCheck, example_args, make_blobs
from transformers import Trainer, TrainerCallback, TrainingArguments

import shardlock


class Classifier(torch.nn.Module):
    def __init__(self, check: EpochCheck) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
        self.check = check

    def forward(self, x: torch.Tensor, y: torch.Tensor, sample_id: torch.Tensor) -> dict:
        if self.training:
            self.check.add(sample_id)
        logits = self.net(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, y), "logits": logits}


class ShardlockTrainer(Trainer):
    def get_train_dataloader(self) -> shardlock.torch.DataLoader:
        return shardlock.torch.DataLoader(self.train_dataset, num_workers=2)


class EpochEnd(TrainerCallback):
    def __init__(self, check: EpochCheck) -> None:
        self.check = check

    def on_epoch_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        print(f"epoch {round(state.epoch) - 1}: {self.check.end_epoch()}")


def main() -> None:
    args = example_args(3)
    with tempfile.TemporaryDirectory() as d:
        kw = make_blobs(pathlib.Path(d), args.samples, "train_hf")
        ds = shardlock.torch.IterableDataset(kw.pop("path"), **kw, batch_size=250, seed=0, sample_ids=True,
                                             drop_last=False)
        check = EpochCheck(args.samples)
        targs = TrainingArguments(output_dir=str(pathlib.Path(d) / "out"), num_train_epochs=args.epochs,
                                  learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", use_cpu=True,
                                  report_to=[], save_strategy="no", logging_steps=10, disable_tqdm=True)
        trainer = ShardlockTrainer(model=Classifier(check), args=targs, train_dataset=ds, callbacks=[EpochEnd(check)])
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        print(f"logged losses: {[round(v, 4) for v in losses]}")
        if len(check.epochs) != args.epochs or not losses or not losses[-1] < losses[0]:
            raise SystemExit(f"{len(check.epochs)} epochs, losses {losses}")


if __name__ == "__main__":
    main()
