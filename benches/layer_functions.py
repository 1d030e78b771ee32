#!/usr/bin/env python3
"""Where each layer variant's instructions over the bare service go, by
function, counted by callgrind in benches/layer.rs's timed loops.

    cargo bench --bench layer --no-run
    python3 benches/layer_functions.py target/release/deps/layer-<hash> tollgate tollgate_no_headers

For each variant, the bare service and the variant run in one interleaved
round of N requests each (N=3000 unless set), as benches/layer_instructions.sh
counts them; the bare service alone is counted first, and each function's
instructions per request over it are printed, largest first (`TOP` rows,
30 unless set). Needs valgrind (callgrind_annotate).
"""
import os
import re
import subprocess
import sys
import tempfile


def profile(binary, only, n, out):
    env = dict(os.environ, TOLLGATE_ITERS=str(n), TOLLGATE_INTERLEAVE="1", TOLLGATE_ONLY=only)
    subprocess.run(
        ["valgrind", "--tool=callgrind", "--collect-atstart=no",
         "--toggle-collect=layer::interleave*", "--callgrind-out-file=" + out, binary, "--bench"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    text = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", out],
                          capture_output=True, text=True, check=True).stdout
    counts = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)", line)
        if not m or "PROGRAM TOTALS" in line:
            continue
        name = re.sub(r" \[.*\]$", "", m.group(2))
        if name.startswith("???:") or name.startswith("./"):
            name = name.split(":", 1)[1]
        counts[name] = counts.get(name, 0) + int(m.group(1).replace(",", ""))
    return counts


def main():
    binary, variants = sys.argv[1], sys.argv[2:]
    n = int(os.environ.get("N", "3000"))
    top = int(os.environ.get("TOP", "30"))
    # Each variant runs n / 10 warm-up requests and n timed ones.
    per = n + n // 10
    with tempfile.TemporaryDirectory() as tmp:
        bare = profile(binary, "none", n, os.path.join(tmp, "bare.out"))
        for v in variants:
            both = profile(binary, v, n, os.path.join(tmp, v + ".out"))
            diff = {k: (both.get(k, 0) - 2 * bare.get(k, 0)) / per for k in set(both) | set(bare)}
            print(f"== {v}: +{sum(diff.values()):.0f} instructions per request over bare")
            for name, x in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:top]:
                print(f"{x:8.1f}  {name[:140]}")


if __name__ == "__main__":
    main()
