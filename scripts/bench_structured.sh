#!/usr/bin/env bash
# The structured-output benchmark of docs/performance.md ("Structured outputs"):
# one release server, the same loads without and with a JSON Schema per
# request, in one pass (plain, constrained, plain again: the spread of the two
# plain runs is the noise), then what the constraints cost outside the model.
#   scripts/bench_structured.sh MODEL_DIR [THREADS] [REQUESTS]
# Loads: 32-token prompts, NEW (128) new tokens, greedy, at concurrency 1 and 16.
# "constrained": request i is held to schema i mod 24 of
# tests/fixtures/structured/schemas.json, each wrapped as an array of at least
# 200 items so that no sentence ends before NEW tokens (every request then
# makes as many tokens as an unconstrained one: the ratio is the mask's cost,
# not shorter answers). "natural": the schemas as they are (answers end where
# their JSON does; tokens/s then also pays for more prefills per token).
# Environment: NEW (128), LEVELS (1,16).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
model=$1; threads=${2:-2}; requests=${3:-48}
new=${NEW:-128}; levels=${LEVELS:-1,16}
port=50095
corpus=tests/fixtures/structured/schemas.json
dir=$(mktemp -d)
log=$dir/server.log
trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
cpu_info
python3 -c '
import json, sys
corpus = json.load(open(sys.argv[1]))
def wrap(s):
    s = dict(s)
    defs = s.pop("$defs", None)  # "#/$defs/..." references resolve against the root
    return {"type": "array", "items": s, "minItems": 200, **({"$defs": defs} if defs else {})}
json.dump([wrap(s) for s in corpus.values()], open(sys.argv[2], "w"))
' "$corpus" "$dir/wrapped.json"
metrics=$((port + 1))
serve_ready "$bin/batchgen" "$log" --model "$model" --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:$metrics \
  --intra-op-threads "$threads"
require_built "$log"
bench=("$bin/batchgen" bench --target http://127.0.0.1:$port --no-sequential --concurrency "$levels"
  --requests "$requests" --new-tokens "$new" --json)
scrape() { curl -sf "127.0.0.1:$metrics/metrics"; }
sum() { scrape | awk -v m="$1" '$1 == m { s += $2 } END { printf "%.6f", s }'; }
for load in plain constrained plain-again natural; do
  case $load in
    plain|plain-again) "${bench[@]}" 2>/dev/null | bench_summary "$load" ;;
    constrained)
      before_mask=$(sum batchgen_constraint_mask_seconds_sum); before_n=$(sum batchgen_constraint_mask_seconds_count)
      before_step=$(sum batchgen_decode_step_duration_seconds_sum); before_steps=$(sum batchgen_decode_step_duration_seconds_count)
      "${bench[@]}" --json-schemas "$dir/wrapped.json" 2>/dev/null | bench_summary "$load"
      python3 -c '
import sys
m0, n0, s0, k0, m1, n1, s1, k1 = map(float, sys.argv[1:])
masks, steps = n1 - n0, k1 - k0
print("  masks: %d rows x steps, %.1f us each on average; %.2f ms of masks per decode step of %.1f ms (%.1f %%)" % (
    masks, (m1 - m0) / max(masks, 1) * 1e6, (m1 - m0) / max(steps, 1) * 1e3, (s1 - s0) / max(steps, 1) * 1e3,
    100 * (m1 - m0) / max(s1 - s0, 1e-9)))
' "$before_mask" "$before_n" "$before_step" "$before_steps" \
        "$(sum batchgen_constraint_mask_seconds_sum)" "$(sum batchgen_constraint_mask_seconds_count)" \
        "$(sum batchgen_decode_step_duration_seconds_sum)" "$(sum batchgen_decode_step_duration_seconds_count)"
      ;;
    natural) "${bench[@]}" --json-schemas "$corpus" 2>/dev/null | bench_summary "$load" ;;
  esac
done
echo "== compile and mask costs (examples/constraint_costs.rs)"
"$bin/examples/constraint_costs" "$model/tokenizer.json" "$corpus"
kill "$pid"; wait "$pid" 2>/dev/null || true
trap - EXIT
rm -rf "$dir"
