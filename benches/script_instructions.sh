#!/bin/sh
# Instructions Redis executes per decision: src/store/redis/script.lua
# against benches/lean.lua (the same Redis calls, written by hand), counted
# by valgrind's callgrind in a redis-server of its own. Counts do not move
# with the machine's load, so they show differences of a few percent that
# times on a busy machine hide; benches/script_cpu.sh measures the times.
#
#   benches/script_instructions.sh [port] [calls] [script] [lean]
#
# (defaults 7399, 2000 calls per count, the crate's script.lua, lean.lua).
# Needs valgrind (callgrind_control), redis-server and redis-benchmark. It
# starts `valgrind --tool=callgrind redis-server` on the port (no
# persistence), sends the shapes of script_cpu.sh (one throttle; with a DAY
# quota; with a concurrency cap) over 100 keys of each kind: a pass that
# fills them, then, counters zeroed, `calls` calls with redis-benchmark
# (-c 1 -P 50), and reads the instructions of the whole server over those
# calls: the script, the commands it calls, and EVALSHA's own work (reading
# the call, setting up KEYS and ARGV, answering). It prints instructions per
# call for each script and their ratio, and stops the server.
set -eu

port=${1:-7399}
calls=${2:-2000}
dir=$(dirname "$0")
script=${3:-$dir/../src/store/redis/script.lua}
lean=${4:-$dir/lean.lua}
cli() { redis-cli -p "$port" "$@"; }

out=$(mktemp -d)
valgrind --tool=callgrind --callgrind-out-file="$out/cg" \
    redis-server --port "$port" --save '' --appendonly no >"$out/log" 2>&1 &
pid=$!
trap 'cli SHUTDOWN NOSAVE >/dev/null 2>&1 || true; wait "$pid" 2>/dev/null || true; rm -rf "$out"' EXIT
i=0
until cli PING >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -gt 120 ]; then
        echo "redis-server under valgrind did not start:" >&2
        cat "$out/log" >&2
        exit 1
    fi
    sleep 1
done

now=$(cli TIME | head -n 1)
deadline=$(((now + 36000) * 1000000))
created=$((now - now % 86400))
tag='tollgate-ir:{__rand_int__}'
throttle='1 1 1000000000 1000000 0 0 0 1'
day="1 1000000000 D 0 0 $created 0 90 1 0"
cap='1 1000000 300000 00000000000000a1 0'

# sha kind n: Redis's instructions per call over n calls of one shape.
count() {
    case $2 in
    throttle) keys="1 $tag:t" args="$throttle 0 0" ;;
    +day) keys="3 $tag:t $tag:q $tag:h" args="$throttle $day 0" ;;
    +day+cap) keys="4 $tag:t $tag:q $tag:h $tag:c" args="$throttle $day $cap" ;;
    esac
    # The keys and args are split into words on purpose.
    # shellcheck disable=SC2086
    redis-benchmark -p "$port" -c 1 -P 50 -n 1000 -r 100 -q \
        EVALSHA "$1" $keys a "" "$deadline" $args >/dev/null
    callgrind_control -z "$pid" >/dev/null 2>&1
    # shellcheck disable=SC2086
    redis-benchmark -p "$port" -c 1 -P 50 -n "$3" -r 100 -q \
        EVALSHA "$1" $keys a "" "$deadline" $args >/dev/null
    callgrind_control -d "$pid" >/dev/null 2>&1
    # The newest dump holds the counts since the zeroing.
    # shellcheck disable=SC2012
    dump=$(ls -t "$out"/cg.* | head -n 1)
    awk -v n="$3" '/^(summary|totals):/ { printf "%.0f\n", $2 / n; exit }' "$dump"
}

sha_script=$(cli -x SCRIPT LOAD <"$script")
sha_lean=$(cli -x SCRIPT LOAD <"$lean")
echo "redis $(cli INFO server | tr -d '\r' | sed -n 's/^redis_version://p') under callgrind, $calls calls per count"
echo "script: $script"
echo "lean:   $lean"
for kind in throttle +day +day+cap; do
    s=$(count "$sha_script" "$kind" "$calls")
    l=$(count "$sha_lean" "$kind" "$calls")
    echo "$s $l" | awk -v k="$kind" '{ printf "%-9s script %7d  lean %7d instructions per call  ratio %.3f\n", k, $1, $2, $1 / $2 }'
done
failed=$(cli INFO commandstats | tr -d '\r' | sed -n 's/^cmdstat_evalsha:.*failed_calls=\([0-9]*\).*/\1/p')
if [ "${failed:-0}" != 0 ]; then
    echo "$failed calls failed" >&2
    exit 1
fi
