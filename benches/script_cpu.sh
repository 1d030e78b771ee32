#!/bin/sh
# Redis CPU per decision: src/store/redis/script.lua against benches/lean.lua,
# a hand-written script that makes the same Redis calls with the same values
# and nothing else.
#
#   benches/script_cpu.sh [host] [port] [calls] [rounds] [script]
#
# (defaults 127.0.0.1, 6379, 200000 calls per run, 5 rounds, the crate's
# script.lua; name another file to measure it in its place, e.g. an older
# version saved with `git show REV:src/store/redis/script.lua >/tmp/old.lua`,
# and LEAN=file for the reference that makes the same calls as that one).
#
# It sends the calls RedisStore sends (mode "a", now from Redis TIME with a
# deadline an hour ahead, as src/store/redis/call.rs builds them) in three
# shapes:
#
#   throttle      one throttle (1/s, a bucket of 1,000,000)
#   +day          the throttle and a DAY quota of 1,000,000,000 with its
#                 90-day history
#   +day+cap      both and a concurrency cap of 1,000,000 (leases of 300 s,
#                 one member per key: a request in flight)
#
# First it checks that the two scripts make the same decision and leave the
# same state (replies, values and expiries compared on fresh keys at an
# explicit now). Then, for each shape, it fills 10,000 keys of each kind and
# runs `redis-benchmark -c 1 -P 64 -r 10000` (keys as long as the store's,
# `__rand_int__` in their hash tag) once per script per round, the two in
# turns first. Each run reads INFO before and after: Redis's time per
# EVALSHA (commandstats usec / calls: the script and every command it
# calls), the CPU time of Redis's main thread per call (INFO cpu; it adds
# reading and answering the calls), the commands the script called per
# EVALSHA (both must call the same), and the calls that failed (there must
# be none). It prints each round, then per shape the median of each figure
# and the median of the rounds' script/lean ratios. Another client shape
# can be given with SHAPE="-c 16" (default "-c 1 -P 64").
#
# It writes keys under the prefix "tollgate-cpu"; the throttles' and caps'
# expire within a day, the counts within two, the histories within 90 days
# (delete them with
# `redis-cli --scan --pattern 'tollgate-cpu*' | xargs redis-cli del`).
set -eu

host=${1:-127.0.0.1}
port=${2:-6379}
calls=${3:-200000}
rounds=${4:-5}
dir=$(dirname "$0")
script=${5:-$dir/../src/store/redis/script.lua}
shape=${SHAPE:--c 1 -P 64}
cli() { redis-cli -h "$host" -p "$port" "$@"; }

sha_script=$(cli -x SCRIPT LOAD <"$script")
sha_lean=$(cli -x SCRIPT LOAD <"${LEAN:-$dir/lean.lua}")
now=$(cli TIME | tr '\n' ' ')
now_s=${now%% *}
deadline=$(echo "$now" | awk '{ printf "%d%06d", $1 + 3600, $2 }')
created=$((now_s - now_s % 86400))

# Keys as long as the store's ({<32 hex>} and a 16-hex limit id); every
# __rand_int__ is drawn on its own, so each key kind has 10,000 keys.
tag='tollgate-cpu:{__rand_int__00000000000000000000}'
T="$tag:t:00000000000000a1"
Q="$tag:q"
H="$tag:h"
C="$tag:c"
# The arguments after the mode and the time (ARGV[4..]), per shape.
throttle='1 1 1000000000 1000000 0 0 0 1'
day="1 1000000000 D 0 0 $created 0 90 1 0"
cap='1 1000000 300000 00000000000000a1 0'

# keys numkeys args: one shape.
shape_keys() {
    case $1 in
    throttle) echo "1 $T" ;;
    +day) echo "3 $T $Q $H" ;;
    +day+cap) echo "4 $T $Q $H $C" ;;
    esac
}
shape_args() {
    case $1 in
    throttle) echo "$throttle 0 0" ;;
    +day) echo "$throttle $day 0" ;;
    +day+cap) echo "$throttle $day $cap" ;;
    esac
}

# Every command's calls so far, and EVALSHA's usec and failed calls, as
# "name calls [usec failed]" lines; then "cpu <us>", the CPU time of
# Redis's main thread so far.
stats() {
    cli INFO commandstats | tr -d '\r' | awk -F'[:,=]' '
        /^cmdstat_/ {
            name = substr($1, 9)
            if (name == "evalsha") print name, $3, $5, $11
            else print name, $3
        }'
    cli INFO cpu | tr -d '\r' | awk -F: '
        /^used_cpu_(sys|user)_main_thread:/ { us += $2 * 1000000 }
        END { printf "cpu %.0f\n", us }'
}

# before after label: Redis's time per EVALSHA and the commands it called.
report() {
    printf '%s\n%s\n' "$1" "$2" | awk -v label="$3" '
        seen[$1]++ { d[$1] = $2 - c[$1]; du[$1] = $3 - u[$1]; df[$1] = $4 - f[$1]; next }
        { c[$1] = $2; u[$1] = $3; f[$1] = $4; d[$1] = $2; du[$1] = $3; df[$1] = $4 }
        END {
            n = d["evalsha"]
            if (n <= 0) { print label ": no EVALSHA ran"; exit 1 }
            line = ""
            for (k in d)
                if (k != "evalsha" && k != "cpu" && k != "info" && k !~ /^config/ && d[k] > 0)
                    line = line sprintf(" %s %.2f", toupper(k), d[k] / n)
            printf "%-6s %6.2f us per EVALSHA, %6.2f us CPU per call, %d failed; per call:%s\n",
                label, du["evalsha"] / n, d["cpu"] / n, df["evalsha"], line
            if (df["evalsha"] > 0) exit 1
        }'
}

# sha keys args calls: redis-benchmark replaying one call.
bench() {
    # The keys and args are split into words on purpose; "" is an empty
    # argument, which reaches Redis intact.
    # shellcheck disable=SC2086
    redis-benchmark -h "$host" -p "$port" $4 -r 10000 -q \
        EVALSHA "$1" $2 a "" "$deadline" $3 >/dev/null ||
        echo "(redis-benchmark stopped early; the run counts the calls it made)" >&2
}

# The decision and the state each script leaves, on keys of its own at an
# explicit now (the current second, 0.5 s in).
state() {
    st_sha=$1 st_p="tollgate-cpu-check-$1"
    st_keys=$(shape_keys "$2" | awk -v p="$st_p" '{ printf "%d", $1; for (i = 2; i <= NF; i++) printf " %s:{0}:%s", p, substr("tqhc", i - 1, 1) }')
    st_args=$(shape_args "$2")
    set -- "$st_p:{0}:t" "$st_p:{0}:q" "$st_p:{0}:h" "$st_p:{0}:c"
    for _ in 1 2; do
        # shellcheck disable=SC2086
        cli EVALSHA "$st_sha" $st_keys a "$now_s" 500000000 $st_args |
            tr '\n' ' '
        echo
    done
    cli GET "$1"
    cli HGETALL "$2" | tr '\n' ' '
    cli HGETALL "$3" | tr '\n' ' '
    cli ZRANGE "$4" 0 -1 WITHSCORES | tr '\n' ' '
    echo
    # Expiries in whole seconds (the two calls run a moment apart).
    for key in "$@"; do
        cli PTTL "$key" | awk '{ printf "%d ", ($1 + 500) / 1000 }'
    done
    echo
    cli DEL "$@" >/dev/null
}

echo "redis $(cli INFO server | tr -d '\r' | sed -n 's/^redis_version://p'), $calls calls per run, redis-benchmark $shape"
echo "script: $script; reference: ${LEAN:-$dir/lean.lua}"
for kind in throttle +day +day+cap; do
    if [ "$(state "$sha_script" "$kind")" != "$(state "$sha_lean" "$kind")" ]; then
        echo "$kind: the scripts differ:"
        state "$sha_script" "$kind"
        state "$sha_lean" "$kind"
        exit 1
    fi
done
echo "check: both scripts answer and write alike in every shape"

results=$(mktemp)
trap 'rm -f "$results"' EXIT
for kind in throttle +day +day+cap; do
    keys=$(shape_keys "$kind")
    args=$(shape_args "$kind")
    # Fill the keys (about every one of the 10,000 of each kind).
    bench "$sha_script" "$keys" "$args" "-c 1 -P 64 -n 100000"
    echo "== $kind: EVALSHA <sha> $keys a \"\" <deadline> $args"
    r=1
    while [ "$r" -le "$rounds" ]; do
        # Each round runs both, in turns first, so that neither always
        # follows the other.
        if [ $((r % 2)) = 1 ]; then order='script lean'; else order='lean script'; fi
        for which in $order; do
            if [ "$which" = script ]; then sha=$sha_script; else sha=$sha_lean; fi
            before=$(stats)
            bench "$sha" "$keys" "$args" "$shape -n $calls"
            after=$(stats)
            line=$(report "$before" "$after" "$which")
            echo "round $r $line"
            echo "$kind $which $(echo "$line" | awk '{ print $2, $6 }') $r" >>"$results"
        done
        r=$((r + 1))
    done
done

# The median of the numbers on stdin.
median() {
    sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
# kind which column: one figure of every round.
figures() {
    awk -v k="$1" -v w="$2" -v c="$3" '$1 == k && $2 == w { print $c }' "$results"
}
# kind column: script / lean of every round (the two runs side by side).
ratios() {
    awk -v k="$1" -v c="$2" '$1 == k { v[$5, $2] = $c; r[$5] = 1 }
        END { for (i in r) print v[i, "script"] / v[i, "lean"] }' "$results"
}
echo "== medians over $rounds rounds (ratio: the median of each round's script/lean)"
echo "           us per EVALSHA (commandstats)    | us of Redis CPU per call (main thread)"
for kind in throttle +day +day+cap; do
    echo "$(figures "$kind" script 3 | median) $(figures "$kind" lean 3 | median) $(ratios "$kind" 3 | median)" \
        "$(figures "$kind" script 4 | median) $(figures "$kind" lean 4 | median) $(ratios "$kind" 4 | median)" |
        awk -v k="$kind" '{ printf "%-9s script %6.2f lean %6.2f ratio %.2f | script %6.2f lean %6.2f ratio %.2f\n",
            k, $1, $2, $3, $4, $5, $6 }'
done
