#!/usr/bin/env bash
# The main job on the embedded default: local keyring, local shards.
# keygen -> pack -> inspect -> verify, printing throughput. Run via `make demo`.
set -euo pipefail
PY=${PY:-python3}
OUT=${OUT:-demo-out}
rm -rf "$OUT" && mkdir -p "$OUT/input"
echo "== generating a synthetic dataset (64k samples: uint8 3x32x32 images, int64 labels)"
"$PY" - "$OUT/input" <<'PYEOF'
import sys, numpy as np
rng = np.random.default_rng(0)
n = 65536
np.save(f"{sys.argv[1]}/image.npy", rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8))
np.save(f"{sys.argv[1]}/label.npy", rng.integers(0, 10, size=(n,), dtype=np.int64))
PYEOF
echo "== keygen"
shardlock keygen kek --out "$OUT/keyring.json"
shardlock keygen issuer --out "$OUT/issuer.key"
echo "== pack"
shardlock pack --keyring "$OUT/keyring.json" --issuer-key "$OUT/issuer.key" \
  --dataset-id demo/cifar-like --shard-size 32MiB --out "$OUT/dataset" "$OUT/input/image.npy" "$OUT/input/label.npy"
echo "== inspect (no key needed)"
shardlock inspect "$OUT/dataset" --trust "$OUT/issuer.key.pub"
echo "== verify (authenticates every chunk)"
shardlock verify "$OUT/dataset" --keyring "$OUT/keyring.json" --trust "$OUT/issuer.key.pub"
