#!/usr/bin/env bash
# Two shardlock binaries side by side on the same datasets, interleaved, so a change can
# be shown not to regress: `shardlock bench --json` median GB/s of epochs 2-4 per run.
#   benches/ab_bench.sh OLD_BIN NEW_BIN [ROUNDS]     (needs python3 with numpy)
# Datasets: 8 KiB samples (batch 256) and 147 KiB samples (batch 64), ~256 MiB each,
# window and global shuffle. The machine is shared and noisy: compare within one run.
set -euo pipefail
OLD=$1 NEW=$2 ROUNDS=${3:-3}
PY=${PY:-python3}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
"$NEW" keygen kek --out "$W/kr.json" >/dev/null
"$NEW" keygen issuer --out "$W/iss" >/dev/null
"$PY" - "$W" <<'EOF'
import sys, numpy as np
w = sys.argv[1]
rng = np.random.default_rng(0)
np.save(f"{w}/small.npy", rng.integers(0, 256, size=(32768, 8192), dtype=np.uint8))
np.save(f"{w}/large.npy", rng.integers(0, 256, size=(1792, 150528), dtype=np.uint8))
EOF
for s in small large; do
  "$NEW" pack --keyring "$W/kr.json" --issuer-key "$W/iss" --dataset-id "ab/$s" --out "$W/ds-$s" "$W/$s.npy" >/dev/null
  "$NEW" token issue --issuer-key "$W/iss" --dataset "ab/$s" --principal ab --ttl 2h --out "$W/$s.token" >/dev/null
  rm "$W/$s.npy"
done
run() { # bin dataset batch shuffle -> median GB/s of epochs 2..4
  "$1" bench "$W/ds-$2" --keyring "$W/kr.json" --token "$W/$2.token" --trust "$W/iss.pub" \
    --batch-size "$3" --epochs 4 --shuffle "$4" --json |
    "$PY" -c 'import json,sys,statistics as s; e=json.load(sys.stdin)["epochs"][1:]; print("%.3f" % s.median(x["gb_per_s"] for x in e))'
}
printf '%-7s %-7s %-6s %-10s %-10s\n' samples shuffle round old_GB/s new_GB/s
for shape in "small 256" "large 64"; do
  set -- $shape
  for mode in window global; do
    for r in $(seq "$ROUNDS"); do
      printf '%-7s %-7s %-6s %-10s %-10s\n' "$1" "$mode" "$r" "$(run "$OLD" "$1" "$2" "$mode")" "$(run "$NEW" "$1" "$2" "$mode")"
    done
  done
done
