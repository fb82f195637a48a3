#!/usr/bin/env bash
# Every benchmark script of docs/performance.md's "Reproduce", run as a smoke test on
# the tiny fixture with few tokens and this tree's debug binaries (built by
# `cargo test`), so that none of them can rot: each must finish within its
# bound and print what its readers look for. Numbers from here mean nothing.
#   scripts/bench_smoke.sh   (scripts/test.sh runs it)
# PYTHON: a python3 with onnxruntime==1.32.0 and numpy (default: the venv the
# export-variant tests made, target/tmp/variants-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
export BATCHGEN_BIN_DIR=${BATCHGEN_BIN_DIR:-./target/debug}
export PYTHON=${PYTHON:-target/tmp/variants-venv/bin/python}
model=tests/fixtures/tiny-gpt2
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
expect() { # file, pattern: the script's output must show it
  grep -q -- "$2" "$out/$1" || { cat "$out/$1"; echo "bench smoke: $1 shows no \"$2\"" >&2; exit 1; }
}
run() { # name, bound in seconds, command...
  local name=$1 bound=$2; shift 2
  echo "== $name: $*"
  if ! timeout "$bound" "$@" >"$out/$name" 2>&1; then
    cat "$out/$name"; echo "bench smoke: $name failed or ran past ${bound} s" >&2; exit 1
  fi
}
run bench 300 scripts/bench.sh "$model" 1 1,4
expect bench "concurrency 4"
expect bench "roofline, measured here"
expect bench "% of the bound"
expect bench "plain ORT loop, after"
expect bench "VmHWM"
run single 300 scripts/bench_single_stream.sh "$model" 1 1
expect single "batchgen ready in"
expect single "tokens/s"
expect single "plain ONNX Runtime loop (Python)"
# The tiny model's context is 256: shorter "long" prompts; the decode-step
# table needs 768 positions, so it is left out.
run engine 600 env DECODE=0 LONG_PROMPT=100 LONG_NEW=8 SHORT_NEW=8 MEMORY_PROMPT=64 REQUESTS=8 \
  scripts/bench_engine.sh "$model" "$BATCHGEN_BIN_DIR/batchgen" 1 1
expect engine "long prompts"
expect engine "concurrency 16: .* tok/s"
expect engine "4 worker(s): idle RSS"
expect engine "single stream"
grep -q "failed [1-9]" "$out/engine" && { cat "$out/engine"; echo "bench smoke: requests failed" >&2; exit 1; }
run precision 300 env SHORT_NEW=8 LONG_PROMPT=100 LONG_NEW=8 PRECISIONS=fp32,int8 \
  TRAINED="$model" HELDOUT=tests/fixtures/eval-text.txt scripts/bench_precision.sh "$model" 1 1
expect precision "short int8 c16: .* tok/s"
expect precision "long int8 c16: .* tok/s"
expect precision "--weights int8 (.* MiB idle)"
expect precision "^int8 .* %"
grep -q "failed [1-9]" "$out/precision" && { cat "$out/precision"; echo "bench smoke: requests failed" >&2; exit 1; }
run prefix 300 env SHARED=64 OWN=8 NEW=4 scripts/bench_prefix.sh "$model" 1 8
expect prefix "prefix cache on: shared-c16"
expect prefix "turn 6  TTFT"
expect prefix "prefix cache off: distinct"
expect prefix "VmHWM"
run fairness 300 env A_PROMPT=100 A_NEW=16 A_CLIENTS=8 B_REQUESTS=6 B_DELAY=1 FLOOD_REQUESTS=8 \
  scripts/bench_fairness.sh "$model" 1 16
expect fairness "b-under-a c2: .* tok/s"
expect fairness "a-with-b c8: .* tok/s"
expect fairness "shares while both ran (.*): a .* tokens = .* %"
grep -q "failed [1-9]" "$out/fairness" && { cat "$out/fairness"; echo "bench smoke: requests failed" >&2; exit 1; }
run structured 300 env NEW=8 scripts/bench_structured.sh "$model" 1 8
expect structured "constrained c16: .* tok/s"
expect structured "masks: .* per decode step"
expect structured "natural c16: .* tok/s"
expect structured "compile (cache miss), per schema: p50"
grep -q "failed [1-9]" "$out/structured" && { cat "$out/structured"; echo "bench smoke: requests failed" >&2; exit 1; }
run spec 300 env NEW=8 COPY=16 scripts/bench_spec.sh "$model" 1 8
expect spec "greedy on #2 c16: .* tok/s"
expect spec "sampled off #2 c1: .* tok/s"
expect spec "repeat on #1: .* proposed tokens accepted"
grep -q "failed [1-9]" "$out/spec" && { cat "$out/spec"; echo "bench smoke: requests failed" >&2; exit 1; }
echo "bench smoke: every benchmark script ran"
