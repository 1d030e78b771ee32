#!/bin/sh
# Instructions per request each layer variant adds to the bare service,
# counted by callgrind inside the timed loops only (setup, warm-up of the
# policy and the runtime are left out), for benches/layer.rs's variants.
#
#   cargo bench --bench layer --no-run
#   benches/layer_instructions.sh target/release/deps/layer-<hash> tollgate tollgate_no_headers tower_governor_default
#
# Each count runs `bare` and one variant in one interleaved round of
# N requests each (N=20000 unless set); `bare` alone is counted first and
# taken off. Needs valgrind.
set -eu
bin=$1
shift
n=${N:-20000}
count() {
    TOLLGATE_ITERS=$n TOLLGATE_INTERLEAVE=1 TOLLGATE_ONLY=$1 \
        valgrind --tool=callgrind --collect-atstart=no '--toggle-collect=layer::interleave*' \
        --callgrind-out-file=/dev/null "$bin" --bench 2>&1 >/dev/null |
        grep Collected | tail -1 | awk '{print $4}'
}
# Each variant runs n / 10 warm-up requests and n timed ones.
per=$((n + n / 10))
base=$(count none)
echo "bare: $((base / per)) instructions per request"
for v in "$@"; do
    both=$(count "$v")
    echo "$v: +$(((both - base) / per - base / per)) instructions per request over bare"
done
