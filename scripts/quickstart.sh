#!/usr/bin/env bash
# The README's main command: installs what is needed, builds Carapace, starts a server
# and an agent on this machine on the embedded defaults (SQLite, a disk CA key, trust
# domain example.org), registers an entry for the current user, and shows a workload
# (`carapace-agent api fetch x509`, run as you) receiving its X509-SVID.
# Both keep running in the background; `scripts/quickstart.sh stop` stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=${CARAPACE_HOME:-$( [ "$(id -u)" -eq 0 ] && echo /var/lib/carapace || echo "$HOME/.carapace" )}
SERVER_SOCKET=${CARAPACE_ADMIN_SOCKET:-/tmp/carapace-server/private/admin.sock}
AGENT_SOCKET=${CARAPACE_AGENT_SOCKET:-/tmp/carapace-agent/public/api.sock}
TD=${CARAPACE_TRUST_DOMAIN:-example.org}
# Health endpoints (/live, /ready, /metrics), loopback only.
SERVER_HEALTH=${CARAPACE_SERVER_HEALTH:-127.0.0.1:8080}
AGENT_HEALTH=${CARAPACE_AGENT_HEALTH:-127.0.0.1:8082}
BIN=$ROOT/target/release

stop() {
    for name in agent server; do
        if [ -f "$STATE/$name.pid" ]; then
            pid=$(cat "$STATE/$name.pid")
            if kill "$pid" 2>/dev/null; then
                # Wait for it to exit: it holds its data dir's lock until then, and a new
                # instance started at once would be refused.
                for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
                echo "stopped carapace-$name (pid $pid)"
            fi
            rm -f "$STATE/$name.pid"
        fi
    done
}

wait_for() { # description, command...
    local what=$1; shift
    for _ in $(seq 1 100); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    echo "timed out waiting for $what; see $STATE/*.log" >&2
    exit 1
}

if [ "${1:-}" = "stop" ]; then stop; exit 0; fi

. scripts/lib.sh
install_system_packages
ensure_rust
echo "==> building (release)"
cargo build --release --locked --bins -p carapace-server -p carapace-agent

stop
mkdir -p "$STATE"
chmod 700 "$STATE"

echo "==> starting carapace-server (trust domain $TD, data in $STATE/server)"
"$BIN/carapace-server" run --trust-domain "$TD" --data-dir "$STATE/server" --admin-socket "$SERVER_SOCKET" \
    --health-address "$SERVER_HEALTH" >"$STATE/server.log" 2>&1 &
echo $! >"$STATE/server.pid"
wait_for "the server" "$BIN/carapace-server" healthcheck --admin-socket "$SERVER_SOCKET"

"$BIN/carapace-server" bundle show --admin-socket "$SERVER_SOCKET" >"$STATE/bundle.pem"
token_json=$("$BIN/carapace-server" token generate --admin-socket "$SERVER_SOCKET" --output json)
token=$(printf '%s' "$token_json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
agent_id=$(printf '%s' "$token_json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["agent_id"])')

echo "==> starting carapace-agent ($agent_id)"
rm -rf "$STATE/agent"
# The token goes through the environment, not argv, so it never shows in `ps`.
CARAPACE_JOIN_TOKEN="$token" "$BIN/carapace-agent" run --trust-domain "$TD" --data-dir "$STATE/agent" \
    --socket-path "$AGENT_SOCKET" --trust-bundle "$STATE/bundle.pem" --health-address "$AGENT_HEALTH" \
    >"$STATE/agent.log" 2>&1 &
echo $! >"$STATE/agent.pid"
unset token token_json
wait_for "the agent" "$BIN/carapace-agent" healthcheck --health-address "$AGENT_HEALTH"

user=$(id -un)
echo "==> registering spiffe://$TD/user/$user for unix:uid:$(id -u)"
"$BIN/carapace-server" entry create --admin-socket "$SERVER_SOCKET" \
    --parent-id "$agent_id" --spiffe-id "spiffe://$TD/user/$user" --selector "unix:uid:$(id -u)"

echo "==> a workload running as $user fetches its SVID"
wait_for "the SVID" "$BIN/carapace-agent" api fetch x509 --socket-path "$AGENT_SOCKET"
"$BIN/carapace-agent" api fetch x509 --socket-path "$AGENT_SOCKET" --write "$STATE/svid"
echo "==> openssl verify against the server's bundle"
openssl verify -CAfile "$STATE/bundle.pem" "$STATE/svid/svid.pem"

cat <<EOT

Carapace is running:
  server  pid $(cat "$STATE/server.pid"), node API 127.0.0.1:8081, admin socket $SERVER_SOCKET, log $STATE/server.log,
          health http://$SERVER_HEALTH/ready and /metrics
  agent   pid $(cat "$STATE/agent.pid"), Workload API $AGENT_SOCKET, log $STATE/agent.log,
          health http://$AGENT_HEALTH/ready and /metrics
Try:
  $BIN/carapace-agent api watch --socket-path $AGENT_SOCKET
  SPIFFE_ENDPOINT_SOCKET=unix://$AGENT_SOCKET <any SPIFFE client>
  $BIN/carapace-server entry show --admin-socket $SERVER_SOCKET
  curl -s http://$SERVER_HEALTH/metrics
Stop both with: scripts/quickstart.sh stop
EOT
