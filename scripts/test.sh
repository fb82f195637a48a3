#!/usr/bin/env bash
# The whole test suite: the Rust tests (unit, end-to-end against the real
# server on batchgen's own graph over its paged KV cache, then again on the
# exported graph and over the slot KV cache, metrics
# with a real Prometheus when installed, faults, TLS, keys, HTTP), the soak,
# the benchmark scripts as a smoke test, the scale-out proof, then the Python
# and Node example clients against the real server binary (plaintext, TLS,
# the official openai client, the playground in headless Chromium). Needs
# Rust, python3 with pip and venv, Node.js with npm, openssl (and chromium for
# the playground test, else SKIPPED); dependencies come from the registries.
# Last, the commands of README.md and docs/ (scripts/doc_test.py).
set -euo pipefail
cd "$(dirname "$0")/.."
# fault-injection: tests/faults.rs makes the engine fail on purpose through a
# request header that only this feature honours (release builds leave it out).
cargo test --features fault-injection
# The end-to-end tests again on the ONNX export as it is (--graph exported,
# the left-padded path), which must stay as exact as batchgen's own graph.
BATCHGEN_TEST_GRAPH=exported cargo test --features fault-injection --test generation --test decoding --test batching \
  --test variants --test metrics --test ecosystem --test faults
# The engine's end-to-end tests again over the slot KV cache (--kv-layout
# slots: contiguous slots, GroupQueryAttention, the prefix cache copying).
BATCHGEN_TEST_KV_LAYOUT=slots cargo test --features fault-injection --test generation --test decoding \
  --test batching --test variants --test prefix_cache --test fairness --test speculation --test faults
# Soak and overload (tests/soak.rs, ignored in a plain cargo test): 2,016 mixed
# calls from 32 clients, then a burst of 10 × --max-queue; prints its figures.
cargo test --features fault-injection --test soak -- --ignored --nocapture
# Every benchmark script, as a smoke test on the tiny fixture (debug binaries,
# few tokens), so that the commands of docs/performance.md cannot rot.
scripts/bench_smoke.sh
# Three replicas in network namespaces behind nginx: drain, kill, restart
# (root, iproute2 and nginx; prints SKIPPED without them).
tests/scaleout/run.sh
# The clients run the binary cargo test just built.
export BATCHGEN_BIN="$PWD/target/debug/batchgen"
venv=target/python-client-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/clients/python/requirements.txt
(cd tests/clients/python && "../../../$venv/bin/python" -m pytest -q -p no:cacheprovider)
(cd tests/clients/node && npm ci --no-audit --no-fund --loglevel=error && node --test)
# The documentation's commands (README.md, docs/): every block marked `test`
# runs against the server started as the docs say (scripts/doc_test.py).
DOC_PYTHON="$PWD/$venv/bin/python" DOC_PATH="$PWD/$venv/bin" python3 scripts/doc_test.py
