#!/usr/bin/env bash
# The benchmarks of PERFORMANCE.md §5, scenarios S1 and S2, and issue 3's B3, in one
# command:
#   B1  X509-SVID issuance: the crypto ceiling (the server's own functions, in process,
#       1 thread and every core) beside BatchNewX509SVID throughput over the node API of
#       the real carapace-server (1 and 2 mTLS connections);
#   B2  Workload API: FetchX509SVID first-response latency on new connections with 1, 100
#       and 1,000 concurrent clients against the real carapace-agent, agent memory per
#       cached SVID, and entry-to-workload propagation;
#   B3  X509-SVID issuance with the CA key in SoftHSM2 ([key_manager.pkcs11], sessions = 1
#       and = nproc) over the node API, beside SoftHSM2's raw P-256 CKM_ECDSA rate (1 and
#       nproc threads) and the software-key rate of B1; goal: >= 80 % of the raw rate.
#       Needs softhsm2 (apt-get install -y softhsm2); without it B3 fails in the report.
# Builds in release mode, then prints a Markdown report (also written to
# target/bench-report.md) with the machine and this command. Run one benchmark alone
# with target/release/carapace-bench --only b1|b2|b3 --bin-dir target/release.
#
# Usage: scripts/bench.sh [--quick]
#   --quick  reduced sizes (2,000 SVIDs, 1 and 100 clients, 0.5 s raw-rate runs): a smoke
#            run of well under a minute after the build. The full run (about a minute
#            after the build) is the default.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

BENCH_ARGS=()
for arg in "$@"; do
    case "$arg" in
        --quick) BENCH_ARGS+=(--quick) ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "scripts/bench.sh: unknown argument $arg (usage: scripts/bench.sh [--quick])" >&2; exit 64 ;;
    esac
done

. scripts/lib.sh
ensure_rust
echo "==> building (release)" >&2
cargo build --release --locked -p carapace-server -p carapace-agent -p carapace-bench

# 1,000 concurrent Workload API clients need 1,000+ descriptors in this process and in
# the agent (which inherits the limit); carapace-bench also raises its soft limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

echo "==> running the benchmarks (the report follows on stdout)" >&2
exec "$TARGET/release/carapace-bench" "${BENCH_ARGS[@]}" \
    --bin-dir "$TARGET/release" \
    --out "$TARGET/bench-report.md" \
    --command "scripts/bench.sh${*:+ $*}"
