#!/bin/sh
# Over the network: wrk against examples/load_target.rs on loopback, the bare
# route beside the same route behind tollgate and behind tower_governor.
#
#   benches/load.sh [rounds] [seconds] [connections]
#
# (defaults 3, 8, 32; PORT=3100 in the environment changes the port). It builds
# the example in release, installs wrk when it is missing, then for each round
# and mode starts the server, waits until it answers 200 (and, for the limiters,
# sends its rate-limit headers), runs one second of wrk to warm up and one
# measured run, and stops the server. The modes rotate from round to round so
# that a slow stretch of the machine does not fall on one mode only. With two
# or more cores the server runs on core 0 and wrk on core 1.
#
# Before each run it waits, at most 15 s, until the machine's CPUs have been at
# least 90% idle for a second (the machine is shared), and notes the idle share
# it saw. It prints each run, then per mode the range over rounds of
# requests/s, p50 and p99, and the ratios to the bare route of the same round
# as median (range): requests/s mode/bare (below 1: fewer) and latency
# mode/bare (above 1: slower). Other work on the machine only ever slows a run,
# so the last two columns compare each mode's best run (most requests/s,
# lowest p50) with the bare route's best, the least disturbed runs.
# Every request carries one of the registered keys; a run that got any
# non-2xx answer or socket error is reported and makes the script fail.
# Only 127.0.0.1 is a target, and every wrk run is bounded by -d and timeout.
set -eu

rounds=${1:-3}
seconds=${2:-8}
connections=${3:-32}
port=${PORT:-3100}
url="http://127.0.0.1:$port/"
key_header='x-api-key: key-00004242'

cd "$(dirname "$0")/.."
cargo build --release --example load_target
bin="${CARGO_TARGET_DIR:-target}/release/examples/load_target"
command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)

server_cpu=
client_cpu=
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    server_cpu="taskset -c 0"
    client_cpu="taskset -c 1"
fi

tmp=$(mktemp -d)
pid=
stop_server() {
    if [ -n "$pid" ]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        pid=
    fi
}
trap 'stop_server; rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM

status() {
    curl -s -o /dev/null -w '%{http_code}' --max-time 1 -H "$key_header" "$url" || true
}

if [ "$(status)" != 000 ]; then
    echo "something already answers on $url; set PORT" >&2
    exit 1
fi

start_server() {
    # $server_cpu is split into its words on purpose.
    # shellcheck disable=SC2086
    $server_cpu "$bin" "$1" "$port" 2>"$tmp/server.log" &
    pid=$!
    tries=0
    until [ "$(status)" = 200 ]; do
        tries=$((tries + 1))
        if [ "$tries" -gt 100 ] || ! kill -0 "$pid" 2>/dev/null; then
            echo "$1 server did not answer 200 on $url" >&2
            cat "$tmp/server.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    case $1 in
    tollgate) header=ratelimit ;;
    governor) header=x-ratelimit-remaining ;;
    *) header= ;;
    esac
    if [ -n "$header" ] &&
        ! curl -s -D - -o /dev/null --max-time 1 -H "$key_header" "$url" |
        grep -qi "^$header:"; then
        echo "$1 server sent no $header header" >&2
        exit 1
    fi
}

# Idle share of all CPUs over one second, in percent, from /proc/stat.
idle_pct() {
    a=$(head -n 1 /proc/stat)
    sleep 1
    b=$(head -n 1 /proc/stat)
    echo "$a $b" | awk '{
        n = NF / 2
        for (i = 2; i <= 9; i++) { t += $(n + i) - $i } # guest time is in user
        idle = ($(n + 5) - $5) + ($(n + 6) - $6)
        printf "%d", (t > 0 ? 100 * idle / t : 0) }'
}

wait_idle() {
    tries=0
    idle=$(idle_pct)
    while [ "$idle" -lt 90 ] && [ "$tries" -lt 14 ]; do
        tries=$((tries + 1))
        idle=$(idle_pct)
    done
}

run_wrk() {
    # shellcheck disable=SC2086
    timeout $(($1 + 10)) $client_cpu wrk -t1 -c"$connections" -d"$1"s \
        --timeout 2s --latency -H "$key_header" "$url"
}

# A latency as wrk prints it (850.00us, 1.23ms, 1.01s) in microseconds.
to_us='function us(v) {
    if (v ~ /us$/) return v + 0
    if (v ~ /ms$/) return v * 1000
    if (v ~ /m$/) return v * 60e6
    if (v ~ /s$/) return v * 1e6
    return v + 0
}'

modes="bare tollgate governor"
echo "round mode req/s p50_us p99_us idle%_before" | tee "$tmp/runs"
round=1
while [ "$round" -le "$rounds" ]; do
    # Rotate the order: round 2 starts with the second mode, and so on.
    order=$(echo "$modes" | awk -v r="$round" '{
        for (i = 0; i < NF; i++) printf "%s ", $(((i + r - 1) % NF) + 1) }')
    for mode in $order; do
        wait_idle
        start_server "$mode"
        run_wrk 1 >/dev/null
        run_wrk "$seconds" >"$tmp/wrk.out"
        stop_server
        if grep -q -e 'Non-2xx' -e 'Socket errors' "$tmp/wrk.out"; then
            echo "round $round $mode:" >&2
            grep -e 'Non-2xx' -e 'Socket errors' "$tmp/wrk.out" >&2
            failed=1
        fi
        awk -v round="$round" -v mode="$mode" -v idle="$idle" "$to_us"'
            /^Requests\/sec:/ { rps = $2 }
            $1 == "50%" { p50 = us($2) }
            $1 == "99%" { p99 = us($2) }
            END { printf "%d %s %.0f %.0f %.0f %d\n", round, mode, rps, p50, p99, idle }
        ' "$tmp/wrk.out" | tee -a "$tmp/runs"
    done
    round=$((round + 1))
done

echo
echo "wrk -t1 -c$connections -d${seconds}s, $rounds rounds${server_cpu:+, server on core 0 and wrk on core 1}"
echo "ranges over rounds; ratios to bare within each round, as median (range)"
awk '
    NR == 1 { next }
    function range(a, b, fmt) {
        return sprintf(fmt, a) (sprintf(fmt, a) == sprintf(fmt, b) ? "" : "-" sprintf(fmt, b))
    }
    # Keeps v in list name; lists are sorted when summarised.
    function keep(name, v) { count[name]++; val[name, count[name]] = v }
    function summary(name, fmt, with_median,    k, j, t, c, mid) {
        c = count[name]
        for (k = 2; k <= c; k++) for (j = k; j > 1 && val[name, j - 1] > val[name, j]; j--) {
            t = val[name, j]; val[name, j] = val[name, j - 1]; val[name, j - 1] = t
        }
        mid = c % 2 ? val[name, (c + 1) / 2] : (val[name, c / 2] + val[name, c / 2 + 1]) / 2
        if (!with_median) return range(val[name, 1], val[name, c], fmt)
        return sprintf(fmt, mid) " (" range(val[name, 1], val[name, c], fmt) ")"
    }
    {
        rps[$1, $2] = $3; p50[$1, $2] = $4; p99[$1, $2] = $5; rounds[$1] = 1
        if (!(($2) in best_rps) || $3 > best_rps[$2]) best_rps[$2] = $3
        if (!(($2) in best_p50) || $4 < best_p50[$2]) best_p50[$2] = $4
        keep($2 " rps", $3); keep($2 " p50", $4); keep($2 " p99", $5)
    }
    END {
        n = split("bare tollgate governor", modes, " ")
        for (r in rounds) for (i = 2; i <= n; i++) {
            m = modes[i]
            keep(m " rrps", rps[r, m] / rps[r, "bare"])
            keep(m " rp50", p50[r, m] / p50[r, "bare"])
            keep(m " rp99", p99[r, m] / p99[r, "bare"])
        }
        row = "| %-8s | %13s | %9s | %11s | %17s | %17s | %17s | %10s | %9s |\n"
        printf row, "mode", "req/s", "p50 (us)", "p99 (us)",
            "req/s ratio", "p50 ratio", "p99 ratio", "best req/s", "best p50"
        printf "|----------|--------------:|----------:|------------:|"
        printf "------------------:|------------------:|------------------:|"
        printf "-----------:|----------:|\n"
        for (i = 1; i <= n; i++) {
            m = modes[i]
            if (m == "bare") { rr = "1"; r50 = "1"; r99 = "1" }
            else {
                rr = summary(m " rrps", "%.2f", 1)
                r50 = summary(m " rp50", "%.2f", 1)
                r99 = summary(m " rp99", "%.2f", 1)
            }
            printf row, m, summary(m " rps", "%d"), summary(m " p50", "%d"),
                summary(m " p99", "%d"), rr, r50, r99,
                sprintf("%.2f", best_rps[m] / best_rps["bare"]),
                sprintf("%.2f", best_p50[m] / best_p50["bare"])
        }
    }
' "$tmp/runs"

if [ -n "${failed:-}" ]; then
    echo "some runs got errors (above)" >&2
    exit 1
fi
