#!/usr/bin/env bash
# Triton's perf_analyzer (v2 gRPC, batch 1) against the served model, between two runs of the
# ceiling (ONNX Runtime alone, INT8 as the server's CPU default picks it here), so the ratio comes
# from one quiet stretch of the machine. perf_analyzer: ../shared/tools/setup-perf-analyzer.sh,
# then PA=$PA_ROOT/bin/perf_analyzer. The ceiling's JSON and plot go to a temporary folder.
#
#     PA=/tmp/perf_analyzer/bin/perf_analyzer bash bench/perf_analyzer_vs_ceiling.sh
set -u
cd "$(dirname "$0")/.."
PA=${PA:-perf_analyzer}
out=$(mktemp -d)
ceiling() {
    .venv/bin/python bench/ceiling.py --precision int8 --threads 0 --batch-sizes 1,64 --rounds 3 --seconds 2 \
        --json "$out/ceiling.json" --plot "$out/ceiling.png" 2>&1 | grep -E "int8|best"
}
echo "== ceiling (before)"; ceiling
.venv/bin/cnnserve serve --http-port 18000 --grpc-port 18001 >"$out/server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server; rm -rf "$out"' EXIT
for _ in $(seq 60); do curl -sf 127.0.0.1:18000/readyz >/dev/null && break; sleep 1; done
grep -m1 "precision" "$out/server.log"
for round in 1 2; do
    for c in 64 1; do
        echo "== perf_analyzer round $round, $c caller(s)"
        "$PA" -m cifar10 -u 127.0.0.1:18001 -i grpc -b 1 --shape input:3,32,32 --concurrency-range "$c:$c" \
            --measurement-interval 4000 --stability-percentage 999 --max-trials 3 2>&1 |
            grep -E "Throughput|p50 latency|[Ee]rror|[Ff]ailed" | tail -3
    done
done
kill -TERM $server; wait $server
echo "== ceiling (after)"; ceiling
