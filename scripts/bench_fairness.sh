#!/usr/bin/env bash
# The fair-scheduling benchmark of docs/performance.md ("Fair scheduling
# between keys"): one release server with two API keys.
#   scripts/bench_fairness.sh MODEL_DIR [THREADS] [A_REQUESTS]
# Passes, each printing `batchgen bench` lines:
#   b-idle   key B alone: Poisson arrivals at 2/s of 32-token prompts, 32 new tokens
#   a-alone  key A alone: 64 clients of 500-token prompts, 128 new tokens
#   a+b      both at once: B starts once A's flood has filled the batch (B_DELAY s)
#   both-flood  A and B each 32 clients of the same requests: their shares of tokens
# Environment: A_PROMPT (500), A_NEW (128), A_CLIENTS (64), B_REQUESTS (40),
# B_DELAY (20), FLOOD_REQUESTS (64), PASSES (default "b-idle a-alone a+b both-flood"),
# SERVER_BIN (the server measured, e.g. an older build; default: this tree's; the
# bench client is always this tree's), SERVER_ARGS (more server flags, e.g.
# "--preemption off").
set -euo pipefail
. "$(dirname "$0")/lib.sh"
model=$1; threads=${2:-2}; a_requests=${3:-128}
a_prompt=${A_PROMPT:-500}; a_new=${A_NEW:-128}; a_clients=${A_CLIENTS:-64}
b_requests=${B_REQUESTS:-40}; b_delay=${B_DELAY:-20}; flood=${FLOOD_REQUESTS:-64}
port=50093
work=$(mktemp -d)
log=$work/server.log
pid=""
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; rm -rf "$work"' EXIT
grep -m1 "model name" /proc/cpuinfo || true
echo "cpu flags: $(grep -o -w 'avx2\|avx512f\|avx512_vnni\|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
"$bin/batchgen" keygen tenant-a > "$work/a"
"$bin/batchgen" keygen tenant-b > "$work/b"
key_a=$(head -n1 "$work/a"); key_b=$(head -n1 "$work/b")
tail -n1 "$work/a" > "$work/keys"; tail -n1 "$work/b" >> "$work/keys"
serve_ready "${SERVER_BIN:-$bin/batchgen}" "$log" --model "$model" --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:0 \
  --intra-op-threads "$threads" --api-keys "$work/keys" --max-queue 512 ${SERVER_ARGS:-}
require_built "$log"
bench=("$bin/batchgen" bench --target http://127.0.0.1:$port --no-sequential --json)
a_load=(--api-key "$key_a" --concurrency "$a_clients" --requests "$a_requests" --prompt-tokens "$a_prompt" --new-tokens "$a_new")
b_load=(--api-key "$key_b" --concurrency 0 --rate 2 --requests "$b_requests" --prompt-tokens 32 --new-tokens 32)
passes=" ${PASSES:-b-idle a-alone a+b both-flood} "
metrics=$(grep -o 'metrics on http://[0-9.:]*/metrics' "$log" | head -1 | sed 's/metrics on //')
tokens() { # key: its generated tokens so far (finished requests)
  local v
  v=$(curl -sf "$metrics" | awk -v k="key=\"$1\"" 'index($0, "batchgen_api_key_generated_tokens_total{") == 1 && index($0, k) { print $2 }' | head -1)
  echo "${v:-0}"
}
if [[ $passes == *" b-idle "* ]]; then
  echo "== b-idle"
  "${bench[@]}" "${b_load[@]}" 2>/dev/null | bench_summary b-idle
fi
if [[ $passes == *" a-alone "* ]]; then
  echo "== a-alone"
  "${bench[@]}" "${a_load[@]}" --seed 2 2>/dev/null | bench_summary a-alone
fi
if [[ $passes == *" a+b "* ]]; then
  echo "== a+b (B from ${b_delay} s into A's flood)"
  "${bench[@]}" "${a_load[@]}" --seed 3 2>/dev/null > "$work/a.json" &
  a=$!
  sleep "$b_delay"
  "${bench[@]}" "${b_load[@]}" --seed 4 2>/dev/null | bench_summary b-under-a
  wait "$a"
  bench_summary a-with-b < "$work/a.json"
  echo "  preemptions: $(curl -sf "$metrics" | grep '^batchgen_preemptions_total' | awk '{ printf "%s %s  ", $1, $2 }')"
fi
[[ $passes == *" both-flood "* ]] || { kill "$pid"; wait "$pid" 2>/dev/null || true; trap - EXIT; rm -rf "$work"; exit 0; }
echo "== both-flood (equal weights): tokens per key while both ran"
base_a=$(tokens tenant-a); base_b=$(tokens tenant-b)
"${bench[@]}" --api-key "$key_a" --concurrency 32 --requests "$flood" --prompt-tokens 64 --new-tokens 64 --seed 5 2>/dev/null > "$work/fa.json" &
fa=$!
"${bench[@]}" --api-key "$key_b" --concurrency 32 --requests "$flood" --prompt-tokens 64 --new-tokens 64 --seed 6 2>/dev/null > "$work/fb.json" &
fb=$!
# Each key's tokens (finished requests) once a second while both are running.
while kill -0 "$fa" 2>/dev/null && kill -0 "$fb" 2>/dev/null; do
  now_a=$(tokens tenant-a); now_b=$(tokens tenant-b)
  echo "$SECONDS $(( ${now_a%.*} - ${base_a%.*} )) $(( ${now_b%.*} - ${base_b%.*} ))" >> "$work/shares"
  sleep 1
done
wait "$fa" "$fb"
# The last sample before either key finished: each key's share of the tokens.
awk '{ a = $2; b = $3; n = NR } END { t = a + b; if (t > 0) printf "  shares while both ran (%d one-second samples): a %d, b %d tokens = %.1f %% / %.1f %%\n", n, a, b, 100 * a / t, 100 * b / t }' "$work/shares"
awk '{ t = $2 + $3; if (t > 0) printf "%.1f ", 100 * $2 / t } END { print "" }' "$work/shares" | sed 's/^/  a share so far, per second: /'
# The second half of the samples alone: the share once the first wave (whichever
# key's clients connected first took the empty batch) is past.
awk '{ a[NR] = $2; b[NR] = $3 } END { m = int(NR / 2); da = a[NR] - a[m]; db = b[NR] - b[m]; if (da + db > 0) printf "  shares over the second half (%d s): a %d, b %d tokens = %.1f %% / %.1f %%\n", NR - m, da, db, 100 * da / (da + db), 100 * db / (da + db) }' "$work/shares"
bench_summary flood-a < "$work/fa.json"
bench_summary flood-b < "$work/fb.json"
echo "  preemptions: $(curl -sf "$metrics" | grep '^batchgen_preemptions_total' | awk '{ printf "%s %s  ", $1, $2 }')"
kill "$pid"; wait "$pid" 2>/dev/null || true
trap - EXIT
rm -rf "$work"
