"""Stream one epoch of the demo dataset into torch tensors and print throughput.

Usage: python examples/demo_stream.py DIR KEYRING TOKEN TRUST
"""

import sys
import time

import torch

import shardlock


def main() -> None:
    path, keyring, token, trust = sys.argv[1:5]
    loader = shardlock.Loader(path, keyring=keyring, token=token, trust=trust, batch_size=256, shuffle="window")
    for epoch in range(2):
        t0 = time.perf_counter()
        n_bytes = n_samples = 0
        for batch in loader:
            image, label = batch["image"], batch["label"]
            assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8
            n_bytes += image.numel() * image.element_size() + label.numel() * label.element_size()
            n_samples += len(label)
        dt = time.perf_counter() - t0
        print(f"epoch {epoch}: {n_samples} samples as torch tensors, {n_bytes / 1e9:.3f} GB in {dt:.3f} s "
              f"= {n_bytes / dt / 1e9:.2f} GB/s, {n_samples / dt:,.0f} samples/s "
              f"(first batch: image {tuple(image.shape)} {image.dtype}, label {tuple(label.shape)} {label.dtype})")


if __name__ == "__main__":
    main()
