#!/usr/bin/env bash
# The prefix cache benchmark of docs/performance.md ("Prefix cache"): the same
# loads against a release server with --prefix-cache off, then on, in one
# pass, with each server's peak resident memory.
#   scripts/bench_prefix.sh MODEL_DIR [THREADS] [REQUESTS]
# Loads (64 new tokens each, EOS ignored, greedy):
#   shared-c16  16 clients, every prompt = the same 512 tokens + 32 of its own
#   shared-c1   one client, the same prompts
#   turns       8 conversations x 6 turns, each turn +32 user tokens, 64 generated
#   distinct    16 clients, 544 distinct tokens per prompt (no hit possible)
# Environment: LOADS (default "shared-c16 shared-c1 turns distinct"),
# SHARED (512), OWN (32), NEW (64), MODES ("off on"; an entry MODE:LAYOUT, e.g.
# on:slots, also passes --kv-layout LAYOUT; default auto, i.e. paged).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
model=$1; threads=${2:-2}; requests=${3:-48}
shared=${SHARED:-512}; own=${OWN:-32}; new=${NEW:-64}
loads=${LOADS:-shared-c16 shared-c1 turns distinct}
port=50091
log=$(mktemp)
trap 'kill $pid 2>/dev/null; rm -f "$log"' EXIT
grep -m1 "model name" /proc/cpuinfo || true
echo "cpu flags: $(grep -o -w 'avx2\|avx512f\|avx512_vnni\|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
for entry in ${MODES:-off on}; do
  mode=${entry%%:*}; layout=auto
  [ "$entry" = "$mode" ] || layout=${entry#*:}
  serve_ready "$bin/batchgen" "$log" --model "$model" --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:0 \
    --intra-op-threads "$threads" --prefix-cache "$mode" --kv-layout "$layout"
  require_built "$log"
  bench=("$bin/batchgen" bench --target http://127.0.0.1:$port --no-sequential --new-tokens "$new")
  for load in $loads; do
    echo "== prefix cache $mode: $load ($layout layout)"
    case $load in
      shared-c16) "${bench[@]}" --concurrency 16 --requests "$requests" --prompt-tokens "$own" --shared-prefix "$shared" ;;
      shared-c1) "${bench[@]}" --concurrency 1 --requests 8 --prompt-tokens "$own" --shared-prefix "$shared" ;;
      turns) "${bench[@]}" --concurrency 8 --turns 6 --prompt-tokens "$own" ;;
      distinct) "${bench[@]}" --concurrency 16 --requests "$requests" --prompt-tokens $((shared + own)) ;;
      *) echo "unknown load $load" >&2; exit 2 ;;
    esac 2>/dev/null
  done
  echo "== prefix cache $mode: server memory and busy periods ($layout layout)"
  grep -E "VmRSS|VmHWM" /proc/$pid/status
  sed 's/\x1b\[[0-9;]*m//g' "$log" | grep "busy period" | sed 's/.*prompt tokens from the prefix cache/  from the prefix cache:/' | tail -4 || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
done
trap - EXIT
rm -f "$log"
