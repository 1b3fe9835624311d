"""Train a small PyTorch model on an encrypted dataset.

Packs a synthetic classification problem (two Gaussian blobs in 32 dimensions),
issues an access token, streams it through shardlock.Loader on CPU (or CUDA when
available) and prints a falling loss. Run: python examples/train_torch.py [--samples N]
"""

import pathlib
import tempfile

import torch
from _blobs import example_args, make_blobs

import shardlock


def main() -> None:
    args = example_args(4)

    with tempfile.TemporaryDirectory() as d:
        kw = make_blobs(pathlib.Path(d), args.samples, "train_torch")
        path = kw.pop("path")

        device = "cuda" if torch.cuda.is_available() else "cpu"
        loader = shardlock.Loader(path, **kw, batch_size=256, shuffle="window", seed=0, device=device)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for epoch in range(args.epochs):
            total, n = 0.0, 0
            for batch in loader:
                loss = torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(batch["y"])
                n += len(batch["y"])
            losses.append(total / n)
            print(f"epoch {epoch}: loss {losses[-1]:.4f} over {n} samples ({device})")
        if not losses[-1] < losses[0]:
            raise SystemExit("loss did not fall")


if __name__ == "__main__":
    main()
