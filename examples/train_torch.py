"""Train a small PyTorch model on an encrypted dataset.

Packs a synthetic classification problem (two Gaussian blobs in 32 dimensions),
issues an access token, streams it through shardlock.Loader on CPU (or CUDA when
available) and prints a falling loss. Run: python examples/train_torch.py [--samples N]
"""

import argparse
import pathlib
import tempfile

import numpy as np
import torch

import shardlock


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as d:
        root = pathlib.Path(d)
        keyring, issuer = root / "keyring.json", root / "issuer.key"
        shardlock.create_keyring(keyring)
        trust = shardlock.create_issuer_key(issuer)
        rng = np.random.default_rng(0)
        y = rng.integers(0, 2, size=args.samples)
        x = (rng.standard_normal((args.samples, 32)) + (2 * y[:, None] - 1) * 0.6).astype(np.float32)
        shardlock.pack_numpy(root / "data", {"x": x, "y": y.astype(np.int64)}, keyring=keyring, issuer_key=issuer,
                             dataset_id="examples/blobs", shard_size=1 << 20)
        token = root / "job.token"
        shardlock.issue_token(issuer, token, dataset="examples/blobs", principal="train_torch", ttl="10m")

        device = "cuda" if torch.cuda.is_available() else "cpu"
        loader = shardlock.Loader(root / "data", keyring=keyring, token=token, trust=trust,
                                  batch_size=256, shuffle="window", seed=0, device=device)
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
