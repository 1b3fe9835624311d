#!/usr/bin/env bash
# The main job on the embedded default: local keyring, local shards.
# keygen -> pack -> inspect -> token -> verify -> stream into torch tensors, printing
# throughput. Run via `make demo`.
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
echo "== token: the data owner grants 'demo-job' read+verify on every shard for 1 hour"
shardlock token issue --issuer-key "$OUT/issuer.key" --dataset demo/cifar-like --principal demo-job \
  --ops read,verify --ttl 1h --out "$OUT/job.token"
shardlock token inspect "$OUT/job.token" --trust "$OUT/issuer.key.pub"
echo "== verify (authorizes each shard, then authenticates every chunk; decisions go to the audit log)"
shardlock verify "$OUT/dataset" --keyring "$OUT/keyring.json" --token "$OUT/job.token" \
  --trust "$OUT/issuer.key.pub" --audit-log "$OUT/audit.jsonl"
echo "== a token narrowed offline to shard 0 is denied the other shards (and the denials are audited)"
shardlock token attenuate "$OUT/job.token" --trust "$OUT/issuer.key.pub" --shards 0 --out "$OUT/narrow.token"
shardlock verify "$OUT/dataset" --keyring "$OUT/keyring.json" --token "$OUT/narrow.token" \
  --trust "$OUT/issuer.key.pub" --audit-log "$OUT/audit.jsonl" || echo "(denied as expected)"
shardlock audit verify "$OUT/audit.jsonl"
echo "== stream 2 epochs through the loader (authorize each shard, decrypt on worker threads into locked batches)"
shardlock bench "$OUT/dataset" --keyring "$OUT/keyring.json" --token "$OUT/job.token" \
  --trust "$OUT/issuer.key.pub" --batch-size 256 --epochs 2
echo "== stream an epoch into torch tensors from Python (import shardlock)"
"$PY" examples/demo_stream.py "$OUT/dataset" "$OUT/keyring.json" "$OUT/job.token" "$OUT/issuer.key.pub"
