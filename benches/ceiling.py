"""The loader against the crypto ceiling, one command per shape and shuffle, each
measured with `shardlock bench --ceiling` (the ceilings right after the loader, in the
same process): 8 KiB samples (batch 256) and 147 KiB samples (batch 64), shuffle none,
window and global, 4 epochs (median of epochs 2-4).

    python benches/ceiling.py DATA_DIR [--small]      (make ceiling)

The data is random u8, packed into 64 MiB shards (36,864 x 8 KiB and 2,048 x 147 KiB,
about 300 MB each; --small: an eighth of that).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np

import shardlock


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--bin", default=os.environ.get("SHARDLOCK_BIN", "shardlock"))
    args = ap.parse_args()
    d = args.data
    os.makedirs(d, exist_ok=True)
    kr, iss = os.path.join(d, "kr.json"), os.path.join(d, "iss.key")
    if not os.path.exists(kr):
        shardlock.create_keyring(kr)
        shardlock.create_issuer_key(iss)
    rng = np.random.default_rng(0)
    scale = 8 if args.small else 1
    for name, n, size, batch in [("s8k", 36864 // scale, 8192, 256), ("s147k", 2048 // scale, 150528, 64)]:
        path = os.path.join(d, name)
        if not os.path.exists(os.path.join(path, "manifest.json")):
            x = rng.integers(0, 255, (n, size), dtype=np.uint8)
            shardlock.pack_numpy(path, {"x": x}, keyring=kr, issuer_key=iss, dataset_id=name, shard_size="64MiB",
                                 force=True)
        token = os.path.join(d, f"{name}.tok")
        shardlock.issue_token(iss, token, dataset=name, principal="bench")
        for shuffle in ("none", "window", "global"):
            print(f"== {n} x {size // 1024} KiB, batch {batch}, shuffle {shuffle}", flush=True)
            out = subprocess.run([args.bin, "bench", path, "--keyring", kr, "--token", token, "--trust", iss + ".pub",
                                  "--batch-size", str(batch), "--epochs", "4", "--shuffle", shuffle, "--ceiling"],
                                 check=True, capture_output=True, text=True).stdout
            print("\n".join(out.splitlines()[-3:]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
