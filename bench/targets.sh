#!/usr/bin/env bash
# One sitting of every issue-13 target (BENCHMARKS.md, "Where the targets
# stand"), in the order the tables give them, about 4 minutes on 2 cores.
# Needs redis-server and mosquitto on PATH (apt-get install redis-server
# mosquitto); run it on a quiet machine (nothing else running) and read the
# medians of the alternating rounds from each section's output.
#
#   bench/targets.sh [OUT]    # OUT: a file to tee everything into
set -euo pipefail
out=${1:-/dev/null}
run() { echo "== pimcore bench $*"; pimcore bench --no-progress "$@"; echo; }
{
    echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(git rev-parse --short HEAD 2>/dev/null || echo '?'), load $(cut -d' ' -f1-3 /proc/loadavg)"
    run --compare redis --shape 50x16 --durability log --rounds 3 -d 4
    run --compare redis --shape 1x1 --durability log --rounds 5 -d 4
    run --compare mosquitto --shape e2e-1x64 --durability log --rounds 3 -d 4
    for i in 1 2 3; do
        for backend in cython pure; do
            run --shape 50x16 --durability log --backend "$backend" -d 4
        done
    done
    run --group 1000 -c 20
    run --group 1000 -c 20
    run --conns 0 --idle 19000 --procs 4 --hold 3
} 2>&1 | tee "$out"
