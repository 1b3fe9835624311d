#!/usr/bin/env bash
# Installs the peer loaders for `make compare` into the venv, one package at a time, each
# held to the torch, numpy and test packages already there (a peer that would change
# them is not installed: it must never break `make test`'s own dependencies). A package that fails leaves its reason in VENV/compare-peers/PKG.status,
# which run.py reports as "skipped: REASON" instead of failing the whole comparison.
#   bash benches/compare/install.sh VENV
set -uo pipefail
venv=$1
status="$venv/compare-peers"
mkdir -p "$status"
pins="$status/constraints.txt"
# The local label (+cu132) is dropped: pip does not match a constraint that carries one.
"$venv/bin/python" - > "$pins" <<'PY'
import importlib.metadata as md
import numpy, torch
print("torch==" + torch.__version__.split("+")[0])
print("numpy==" + numpy.__version__)
for pkg in ("transformers", "huggingface_hub", "datasets", "pyarrow", "lightning", "accelerate", "torchdata", "ray", "pandas"):
    try:
        print(f"{pkg}=={md.version(pkg)}")
    except md.PackageNotFoundError:
        pass
PY
for pkg in cryptography matplotlib psutil litdata mosaicml-streaming; do
  if "$venv/bin/pip" install -q --disable-pip-version-check -c "$pins" "$pkg" > "$status/$pkg.log" 2>&1; then
    echo ok > "$status/$pkg.status"
  else
    why=$(grep -m 2 -E 'depends on|No matching distribution' "$status/$pkg.log" | sed 's/^ *//' | paste -sd ';' | cut -c 1-300)
    [ -n "$why" ] || why=$(grep -m 1 -E '^ERROR' "$status/$pkg.log" | cut -c 1-300)
    echo "not installable with $(paste -sd ' ' "$pins") held: ${why:-see $status/$pkg.log}" > "$status/$pkg.status"
    echo "compare: $pkg not installed (it will be reported as skipped): $(cat "$status/$pkg.status")" >&2
  fi
done
exit 0
