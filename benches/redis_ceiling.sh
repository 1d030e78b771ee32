#!/bin/sh
# The ceiling of the Redis store on any Redis: redis-benchmark running the
# decision script with the arguments one per-key throttle decision sends.
#
#   benches/redis_ceiling.sh [host] [port] [calls]
#
# (defaults 127.0.0.1, 6379, 200000). It loads src/store/redis/script.lua,
# then runs redis-benchmark at 1, 16 and 64 connections and with one
# connection of 64 pipelined calls, over 10,000 keys, and prints calls per
# second, Redis's time per EVALSHA and the calls that failed (from INFO
# commandstats before and after each run). It writes keys under the prefix "tollgate-ceiling"; they expire
# within a day.
#
# The arguments are those `cargo bench --bench redis --features redis`
# prints as "captured call" (one throttle of 1/s with a bucket of 1,000,000;
# now from Redis TIME; a deadline in microseconds of Redis TIME, here an
# hour ahead). If the script's protocol changes, that line shows the new
# shape.
set -eu

host=${1:-127.0.0.1}
port=${2:-6379}
calls=${3:-200000}
cli() { redis-cli -h "$host" -p "$port" "$@"; }

dir=$(dirname "$0")
sha=$(cli -x SCRIPT LOAD <"$dir/../src/store/redis/script.lua")
now=$(cli TIME | tr '\n' ' ')
deadline=$(echo "$now" | awk '{ printf "%d%06d", $1 + 3600, $2 }')
# Keys as long as the store's: {<32 hex>} with __rand_int__ for 12 of them.
key='tollgate-ceiling:{__rand_int__00000000000000000000}:t:0000000000000000'
# After the time: cost 1; one throttle (interval, burst, shadow, since s and
# ns, its cost); no quota; no cap.
args='1 1 1000000000 1000000 0 0 0 1 0 0'
echo "call: EVALSHA $sha 1 $key a '' $deadline $args"

# calls, usec and failed_calls of EVALSHA so far.
evalsha() {
    cli INFO commandstats | tr -d '\r' | awk -F'[:,=]' '
        /^cmdstat_evalsha:/ { print $3, $5, $11; found = 1 }
        END { if (!found) print 0, 0, 0 }'
}

# Fill the keys first ($args is split into its words on purpose).
# shellcheck disable=SC2086
redis-benchmark -h "$host" -p "$port" -c 1 -P 64 -n 50000 -r 10000 -q \
    EVALSHA "$sha" 1 "$key" a "" "$deadline" $args >/dev/null

for shape in "-c 1" "-c 16" "-c 64" "-c 1 -P 64"; do
    before=$(evalsha)
    # $shape is split into its options on purpose.
    # shellcheck disable=SC2086
    rate=$(redis-benchmark -h "$host" -p "$port" $shape -n "$calls" -r 10000 -q \
        EVALSHA "$sha" 1 "$key" a "" "$deadline" $args |
        tr '\r' '\n' | grep 'requests per second' | tail -n 1 | sed 's/.*: //')
    after=$(evalsha)
    echo "$before $after" | awk -v shape="$shape" -v rate="$rate" '{
        calls = $4 - $1
        printf "%-11s %s; %.1f us per EVALSHA in Redis, %d failed\n",
            shape, rate, ($5 - $2) / (calls > 0 ? calls : 1), $6 - $3 }'
done
