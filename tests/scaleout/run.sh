#!/usr/bin/env bash
# Scale-out, proven: three batchgen replicas, each in its own network namespace
# (veth pairs on private /24s this script makes; no other traffic), behind nginx
# with deploy/nginx/batchgen.conf; `batchgen bench` drives load through nginx.
#   (a) SIGTERM one replica mid-load: no call fails (it drains; nginx moves new calls);
#   (b) SIGKILL another mid-load: only the calls in flight on it fail (through
#       nginx they end INTERNAL, "h2 protocol error": nginx resets a stream whose
#       upstream died mid-answer; without a proxy they end UNAVAILABLE), and the
#       clients' retries (bench --retries) land on the survivors;
#   (c) bring it back: once its health is SERVING it receives calls again;
#   (d) one conversation (4 turns, one x-session-id) goes to one replica: only
#       that replica's prefix cache hits rise;
#   (e) kill that replica: the same session is served by one other replica,
#       whose hits rise, and no call fails.
# Prints per-replica call counts (nginx's log of upstream addresses) and failures,
# and asserts them. Everything it starts it stops; every wait is bounded.
#   tests/scaleout/run.sh      (scripts/test.sh runs it; needs root, ip, nginx)
# BATCHGEN_BIN: the binary (default target/debug/batchgen).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null || ! [ -x /usr/sbin/nginx ]; then
  echo "SKIPPED: the scale-out test needs root, iproute2 and nginx (/usr/sbin/nginx)"
  exit 0
fi
bin=$(realpath "${BATCHGEN_BIN:-target/debug/batchgen}")
model=$PWD/tests/fixtures/tiny-gpt2
work=$(mktemp -d)
tag=bg$$
net=10.213
declare -A pid
nginx_pid=

cleanup() {
  set +e
  [ -n "$nginx_pid" ] && kill "$nginx_pid" 2>/dev/null && wait "$nginx_pid" 2>/dev/null
  for i in 1 2 3; do [ -n "${pid[$i]:-}" ] && kill -TERM "${pid[$i]}" 2>/dev/null; done
  local deadline=$((SECONDS + 10))
  for i in 1 2 3; do
    while [ -n "${pid[$i]:-}" ] && kill -0 "${pid[$i]}" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    [ -n "${pid[$i]:-}" ] && kill -9 "${pid[$i]}" 2>/dev/null
  done
  wait 2>/dev/null
  for i in 1 2 3; do
    ip netns del "$tag-$i" 2>/dev/null
    ip link del "$tag-h$i" 2>/dev/null
  done
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "SCALE-OUT FAILED: $*" >&2; for i in 1 2 3; do echo "--- replica $i"; tail -5 "$work/r$i.log" 2>/dev/null; done; exit 1; }

for i in 1 2 3; do
  ns=$tag-$i
  ip netns add "$ns"
  ip link add "$tag-h$i" type veth peer name "$tag-n$i"
  ip link set "$tag-n$i" netns "$ns"
  ip addr add "$net.$i.1/24" dev "$tag-h$i"
  ip link set "$tag-h$i" up
  ip netns exec "$ns" ip addr add "$net.$i.2/24" dev "$tag-n$i"
  ip netns exec "$ns" ip link set "$tag-n$i" up
  ip netns exec "$ns" ip link set lo up
done

start() { # replica number: starts it in its namespace and waits (at most 120 s) until it is ready
  local i=$1
  ip netns exec "$tag-$i" "$bin" serve --model "$model" --listen "$net.$i.2:50051" \
    --metrics-listen "$net.$i.2:9464" --http-listen "$net.$i.2:8000" --intra-op-threads 1 --shutdown-grace 20 >>"$work/r$i.log" 2>&1 &
  pid[$i]=$!
  local deadline=$((SECONDS + 120))
  until "$bin" health --target "http://$net.$i.2:50051" --service batchgen.v1.Generation >/dev/null 2>&1; do
    kill -0 "${pid[$i]}" 2>/dev/null || fail "replica $i exited while starting"
    [ "$SECONDS" -lt "$deadline" ] || fail "replica $i not SERVING within 120 s"
    sleep 0.2
  done
}
for i in 1 2 3; do start "$i"; done

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$work/nginx"
servers=""
for i in 1 2 3; do servers+="    server $net.$i.2:50051 max_fails=1 fail_timeout=5s;\n"; done
# The shipped file, with this test's replicas and port.
python3 - "$work/nginx/batchgen.conf" "$port" "$servers" <<'EOF'
import re, sys
out, port, servers = sys.argv[1], sys.argv[2], sys.argv[3].replace("\\n", "\n")
conf = open("deploy/nginx/batchgen.conf").read()
conf = re.sub(r"    server 127\.0\.0\.1:50051[^\n]*\n(    # server [^\n]*\n)*", servers, conf)
conf = conf.replace("listen 8080 http2", f"listen 127.0.0.1:{port} http2")
assert servers.strip() in conf and port in conf
open(out, "w").write(conf)
EOF
cat >"$work/nginx/nginx.conf" <<EOF
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events {}
http {
  log_format calls '\$upstream_addr \$status';
  access_log $work/nginx/calls.log calls;
  include $work/nginx/batchgen.conf;
}
EOF
/usr/sbin/nginx -t -p "$work/nginx" -c "$work/nginx/nginx.conf" 2>/dev/null || fail "nginx -t"
/usr/sbin/nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" >/dev/null 2>&1 &
nginx_pid=$!
deadline=$((SECONDS + 10))
until "$bin" health --target "http://127.0.0.1:$port" --service batchgen.v1.Generation >/dev/null 2>&1; do
  [ "$SECONDS" -lt "$deadline" ] || fail "nginx not answering within 10 s"
  sleep 0.1
done

load() { # phase name: load through nginx in the background; sets $bench
  : >"$work/nginx/calls.log"
  timeout 120 "$bin" bench --target "http://127.0.0.1:$port" --json --no-sequential --concurrency 6 \
    --requests 90 --prompt-tokens 16 --new-tokens 48 --retries 3 >"$work/$1.json" 2>"$work/$1.err" &
  bench=$!
}
report() { # phase name: prints the calls per replica and the bench's failures
  local phase=$1
  for i in 1 2 3; do
    printf '  %s: replica %d (%s.%d.2) answered %d calls\n' "$phase" "$i" "$net" "$i" "$(calls "$i")"
  done
  grep -h "requests failed" "$work/$phase.err" | sed 's/^/  bench: /' || true
  python3 - "$work/$phase.json" <<'EOF'
import json, sys
l = json.load(open(sys.argv[1]))[0]
print(f"  {sys.argv[1].rsplit('/', 1)[-1][:-5]}: {l['requests']} calls ok, {l['failed']} failed {l['failed_by_code']}, "
      f"{l['retried']} sent again after being lost with their replica")
EOF
}
field() { python3 -c "import json, sys; print(json.load(open(sys.argv[1]))[0][sys.argv[2]])" "$work/$1.json" "$2"; }
# Calls a replica answered: the last address nginx tried for each call (a call
# refused by a stopped replica lists it first, then the one that served it).
calls() { awk '{print $(NF-1)}' "$work/nginx/calls.log" | grep -c "^$net.$1.2:50051" || true; }

echo "== baseline: three replicas"
load baseline; wait "$bench" || fail "bench (baseline)"
report baseline
[ "$(field baseline failed)" = 0 ] || fail "calls failed with every replica up"
for i in 1 2 3; do [ "$(calls "$i")" -gt 0 ] || fail "replica $i took no calls"; done

echo "== (a) SIGTERM replica 1 mid-load"
load sigterm; sleep 1.5
kill -TERM "${pid[1]}"
wait "$bench" || fail "bench (sigterm)"
deadline=$((SECONDS + 40))
while kill -0 "${pid[1]}" 2>/dev/null; do [ "$SECONDS" -lt "$deadline" ] || fail "replica 1 did not exit after draining"; sleep 0.1; done
wait "${pid[1]}" || fail "replica 1 exited with an error after SIGTERM"
pid[1]=
report sigterm
[ "$(field sigterm failed)" = 0 ] || fail "a call failed while replica 1 drained"
grep -q "draining" "$work/r1.log" || fail "replica 1 did not drain"

echo "== (b) SIGKILL replica 2 mid-load"
rows() { # replica number: rows in its running batches now (0 when it cannot be read)
  python3 -c '
import sys, urllib.request
try:
    text = urllib.request.urlopen(sys.argv[1], timeout=2).read().decode()
    print(int(sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith("batchgen_batch_rows{"))))
except Exception:
    print(0)
' "http://$net.$1.2:9464/metrics"
}
load sigkill; sleep 1
# Kill it while it is generating for some call (a fixed sleep once landed between its calls).
deadline=$((SECONDS + 20))
until [ "$(rows 2)" -gt 0 ]; do
  [ "$SECONDS" -lt "$deadline" ] || fail "replica 2 ran no call within 20 s of the load starting"
  sleep 0.05
done
kill -9 "${pid[2]}"; wait "${pid[2]}" 2>/dev/null || true; pid[2]=
wait "$bench" || fail "bench (sigkill)"
report sigkill
[ "$(field sigkill failed)" = 0 ] || fail "calls failed after their retries"
lost=$(field sigkill retried)
# A call nginx had sent to replica 2 but that had no answer yet is passed on by
# nginx itself (grpc_next_upstream): its log lists replica 2, then the survivor.
moved=$(grep -c "$net.2.2:50051, " "$work/nginx/calls.log" || true)
echo "  sigkill: $moved calls passed on by nginx after replica 2 died"
[ $((lost + moved)) -gt 0 ] || fail "no call was in flight on the killed replica (nothing retried or passed on)"
# Only calls in flight on it were lost: at most the clients' concurrency.
[ "$lost" -le 6 ] || fail "$lost calls lost, more than were in flight"
[ "$(calls 3)" -gt 0 ] || fail "the survivor took no calls"

echo "== (c) replica 2 back"
start 2
sleep 6 # nginx's fail_timeout (5 s) for the upstream it saw fail
load back; wait "$bench" || fail "bench (back)"
report back
[ "$(field back failed)" = 0 ] || fail "calls failed with replica 2 back"
[ "$(calls 2)" -gt 0 ] || fail "replica 2 took no calls after it was SERVING again"
echo "== (d) session affinity: one conversation's turns reach one replica and its prefix cache"
start 1
sleep 6 # nginx's fail_timeout for replica 1, seen down in (a)
hits() { # replica number: its prefix cache hit tokens so far
  python3 -c '
import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
print(int(float(next(l.split()[-1] for l in text.splitlines() if l.startswith("batchgen_prefix_cache_hit_tokens_total")))))
' "http://$net.$1.2:9464/metrics"
}
conversation() { # phase name: one conversation of 4 turns under one session id, through nginx
  timeout 60 "$bin" bench --target "http://127.0.0.1:$port" --json --no-sequential --concurrency 1 --requests 1 \
    --turns 4 --prompt-tokens 16 --new-tokens 8 --seed 99 --session-id affinity --retries 3 >"$work/$1.json" 2>"$work/$1.err" \
    || fail "bench ($1)"
  [ "$(field "$1" failed)" = 0 ] || fail "calls of the conversation failed ($1)"
  [ "$(field "$1" requests)" = 4 ] || fail "the conversation did not run its 4 turns ($1)"
}
declare -A before after
for i in 1 2 3; do before[$i]=$(hits "$i"); done
conversation affinity
rose=()
for i in 1 2 3; do after[$i]=$(hits "$i"); if [ "${after[$i]}" -gt "${before[$i]}" ]; then rose+=("$i"); fi; done
echo "  affinity: prefix cache hit tokens per replica ${before[1]},${before[2]},${before[3]} -> ${after[1]},${after[2]},${after[3]}"
[ "${#rose[@]}" = 1 ] || fail "the conversation's hits rose on ${#rose[@]} replicas (${rose[*]:-none}), not on one"
owner=${rose[0]}
echo "== (e) the session's replica ($owner) killed: the same session is served by another"
kill -9 "${pid[$owner]}"; wait "${pid[$owner]}" 2>/dev/null || true; pid[$owner]=
for i in 1 2 3; do [ "$i" = "$owner" ] || before[$i]=$(hits "$i"); done
conversation failover
moved=()
for i in 1 2 3; do
  [ "$i" = "$owner" ] && continue
  after[$i]=$(hits "$i"); if [ "${after[$i]}" -gt "${before[$i]}" ]; then moved+=("$i"); fi
done
[ "${#moved[@]}" = 1 ] || fail "after the kill the session's hits rose on ${#moved[@]} replicas, not on one"
echo "  failover: the session moved from replica $owner to replica ${moved[0]}; no call failed"
echo "scale-out: drain lost nothing, a kill lost only retried calls, a restarted replica serves again, a session keeps to one replica and moves when it dies"
