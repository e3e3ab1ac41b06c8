#!/usr/bin/env bash
# Times `carapace-server entry create --data` for N entries (default 100,000) on a fresh
# SQLite datastore with the release binary: the figure of BENCHMARKS.md's "Entry
# creation in batches". Usage: scripts/entry-batch-bench.sh [N]   (needs python3)
set -euo pipefail
n=${1:-100000}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${CARAPACE_SERVER_BIN:-$root/target/release/carapace-server}
[ -x "$bin" ] || cargo build --release -p carapace-server --bin carapace-server
work=$(mktemp -d)
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# N entries under 1,000 agents (N/1,000 each), one uid selector and one DNS name each.
python3 - "$n" > "$work/entries.json" <<'PY'
import json, sys
n = int(sys.argv[1])
entries = [{
    "spiffe_id": f"spiffe://example.org/bench/{i}",
    "parent_id": f"spiffe://example.org/spire/agent/join_token/agent{i % 1000}",
    "selectors": [{"type": "unix", "value": f"uid:{i}"}],
    "x509_svid_ttl": 3600,
    "dns_names": [f"w{i}.example.org"],
} for i in range(n)]
json.dump({"entries": entries}, sys.stdout)
PY

sock=$work/admin/admin.sock
"$bin" run --trust-domain example.org --data-dir "$work/data" --admin-socket "$sock" \
    --bind-address 127.0.0.1:0 > "$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
    "$bin" healthcheck --admin-socket "$sock" > /dev/null 2>&1 && break
    sleep 0.1
done

cpu() { awk '{print $14 + $15}' "/proc/$server_pid/stat"; }   # utime + stime, ticks
tick=$(getconf CLK_TCK)
cpu0=$(cpu)
start=$(date +%s.%N)
/usr/bin/time -f "cli: %e s wall, %U s user, %S s sys, %M kB max RSS" \
    "$bin" entry create --data "$work/entries.json" --admin-socket "$sock"
end=$(date +%s.%N)
cpu1=$(cpu)
count=$("$bin" entry count --admin-socket "$sock")
rss=$(awk '/VmRSS/ {print $2 " kB"}' "/proc/$server_pid/status")
echo "entries: $n; time: $(echo "$end - $start" | bc) s; server CPU: $(echo "scale=2; ($cpu1 - $cpu0) / $tick" | bc) s; $count; server RSS after: $rss"
echo "datastore: $(du -sh "$work/data" | cut -f1)"
