#!/usr/bin/env bash
# Installs carapace-server and carapace-agent as systemd services and starts them
# (OPERATIONS.md, "Install as a service"). Run as root from a clone of this repository:
#
#   scripts/install.sh                 # build (release), install, start both
#
# Options:
#   --server-only | --agent-only  install (and start) one of the two
#   --no-start       install only: no systemctl (for images, containers, staging roots)
#   --root DIR       install below DIR instead of / (a staging root; implies nothing is
#                    started, so it needs --no-start)
#   --bin-dir DIR    take carapace-server and carapace-agent from DIR instead of building
#                    them with `cargo build --release --locked`
#   --tpm            also install the agent's TPM drop-in (/dev/tpmrm0, group tss)
#
# What goes where (below --root):
#   /usr/local/bin/carapace-{server,agent}                       0755, replaced
#   /usr/local/lib/systemd/system/carapace-{server,agent}.service  0644, replaced
#   /usr/local/lib/sysusers.d/carapace.conf                      0644, replaced
#   /usr/local/share/carapace/{server,agent}.toml                0644, replaced (the defaults)
#   /etc/carapace/{server,agent}.toml                            0644, ONLY IF ABSENT: an
#       existing config is the operator's and is kept as it is (the script says so)
# Units live under /usr/local/lib: local changes belong in drop-ins under /etc
# (`systemctl edit carapace-server`), which this script never touches.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD

ROOT=/
BIN_DIR=
START=1
SERVER=1
AGENT=1
TPM=0
die() { echo "install.sh: $*" >&2; exit "${2:-64}"; }
while [ $# -gt 0 ]; do
    case $1 in
        --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
        --bin-dir) [ $# -ge 2 ] || die "--bin-dir needs a directory"; BIN_DIR=$2; shift 2 ;;
        --no-start) START=0; shift ;;
        --server-only) AGENT=0; shift ;;
        --agent-only) SERVER=0; shift ;;
        --tpm) TPM=1; shift ;;
        -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[ "$SERVER" -eq 1 ] || [ "$AGENT" -eq 1 ] || die "--server-only and --agent-only exclude each other"
[ -d "$ROOT" ] || die "--root $ROOT is not a directory"
ROOT=$(cd "$ROOT" && pwd)

# Everything that can be checked is checked before anything is written.
if [ "$START" -eq 1 ]; then
    # sd_booted(): systemd runs as PID 1 exactly when this directory exists.
    if [ ! -d "${CARAPACE_SYSTEMD_RUN_DIR:-/run/systemd/system}" ]; then
        die "systemd is not running as PID 1 here (PID 1 is $(cat /proc/1/comm 2>/dev/null || echo unknown); a container?), so the services cannot be started: rerun with --no-start to install only, and start the binaries another way" 69
    fi
    [ "$ROOT" = / ] || die "--root $ROOT is a staging root: nothing can be started there; add --no-start"
    command -v systemctl >/dev/null || die "systemctl not found: apt-get install -y systemd" 69
fi
if [ "$ROOT" = / ] && [ "$(id -u)" -ne 0 ]; then
    die "installing into / needs root (sudo $0 $*)" 77
fi
if [ -n "$BIN_DIR" ]; then
    for b in carapace-server carapace-agent; do
        [ -x "$BIN_DIR/$b" ] || die "--bin-dir: $BIN_DIR/$b is missing or not executable"
    done
else
    . scripts/lib.sh
    ensure_rust
    echo "==> building (release)"
    cargo build --release --locked --bins -p carapace-server -p carapace-agent
    BIN_DIR=$SRC/target/release
fi

dest() { printf '%s%s' "${ROOT%/}" "$1"; }
put() { # mode source destination: replaces (a file this script owns)
    install -D -m "$1" "$2" "$(dest "$3")"
    echo "installed $3"
}
keep_or_put() { # mode source destination: never replaces (a file the operator owns)
    local d
    d=$(dest "$3")
    if [ -e "$d" ] || [ -L "$d" ]; then
        if cmp -s "$2" "$d"; then
            echo "kept $3 (unchanged)"
        else
            echo "kept $3: it is yours and differs from the default, which is in /usr/local/share/carapace/$(basename "$3")"
        fi
    else
        install -D -m "$1" "$2" "$d"
        echo "installed $3"
    fi
}

if [ "$SERVER" -eq 1 ]; then
    put 0755 "$BIN_DIR/carapace-server" /usr/local/bin/carapace-server
    put 0644 dist/systemd/carapace-server.service /usr/local/lib/systemd/system/carapace-server.service
    put 0644 dist/sysusers.d/carapace.conf /usr/local/lib/sysusers.d/carapace.conf
    put 0644 dist/etc/server.toml /usr/local/share/carapace/server.toml
fi
if [ "$AGENT" -eq 1 ]; then
    put 0755 "$BIN_DIR/carapace-agent" /usr/local/bin/carapace-agent
    put 0644 dist/systemd/carapace-agent.service /usr/local/lib/systemd/system/carapace-agent.service
    put 0644 dist/etc/agent.toml /usr/local/share/carapace/agent.toml
    if [ "$TPM" -eq 1 ]; then
        put 0644 dist/systemd/carapace-agent.service.d/tpm.conf \
            /usr/local/lib/systemd/system/carapace-agent.service.d/tpm.conf
    fi
fi
install -d -m 0755 "$(dest /etc/carapace)"
[ "$SERVER" -eq 0 ] || keep_or_put 0644 dist/etc/server.toml /etc/carapace/server.toml
[ "$AGENT" -eq 0 ] || keep_or_put 0644 dist/etc/agent.toml /etc/carapace/agent.toml

# The server's user, from the sysusers.d file (systemd-sysusers also works in a staging
# root), else useradd.
if [ "$SERVER" -eq 1 ]; then
    if command -v systemd-sysusers >/dev/null; then
        install -d -m 0755 "$(dest /etc)"
        systemd-sysusers --root="$ROOT" "$(dest /usr/local/lib/sysusers.d/carapace.conf)"
    elif [ "$ROOT" = / ]; then
        getent passwd carapace >/dev/null ||
            useradd --system --user-group --home-dir /var/lib/carapace/server --no-create-home \
                --shell /usr/sbin/nologin --comment "Carapace server" carapace
    else
        echo "no systemd-sysusers: the carapace user is created at boot from /usr/local/lib/sysusers.d/carapace.conf"
    fi
fi

if [ "$START" -eq 0 ]; then
    echo "installed; not started (--no-start). Start with: systemctl daemon-reload && systemctl enable --now carapace-server carapace-agent"
    exit 0
fi

wait_for() { # description, command...
    local what=$1; shift
    for _ in $(seq 1 150); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    die "$what did not become ready; see journalctl -u carapace-server -u carapace-agent" 1
}

systemctl daemon-reload
if [ "$SERVER" -eq 1 ]; then
    systemctl enable --now carapace-server.service
    CARAPACE_SERVER_UID=$(id -u carapace)
    export CARAPACE_SERVER_UID
    wait_for "carapace-server" /usr/local/bin/carapace-server healthcheck --admin-socket /run/carapace/admin.sock
    echo "carapace-server is running (admin: CARAPACE_SERVER_UID=$CARAPACE_SERVER_UID carapace-server entry show)"
fi
if [ "$AGENT" -eq 1 ]; then
    systemctl enable carapace-agent.service
    made_env=0
    if [ "$SERVER" -eq 1 ] && [ ! -e /etc/carapace/bundle.pem ] && [ ! -e /var/lib/carapace/agent ] &&
        [ ! -e /etc/carapace/agent.env ] && cmp -s dist/etc/agent.toml /etc/carapace/agent.toml; then
        # A single-node install with the default agent config: bootstrap the agent from
        # the server just started (its bundle, and a join token through a 0600 file).
        /usr/local/bin/carapace-server bundle show --admin-socket /run/carapace/admin.sock >/etc/carapace/bundle.pem.new
        mv /etc/carapace/bundle.pem.new /etc/carapace/bundle.pem
        token=$(/usr/local/bin/carapace-server token generate --admin-socket /run/carapace/admin.sock |
            sed -n 's/^Token: //p')
        [ -n "$token" ] || die "carapace-server token generate printed no token" 1
        (umask 077 && printf 'CARAPACE_JOIN_TOKEN=%s\n' "$token" >/etc/carapace/agent.env)
        unset token
        made_env=1
    fi
    if [ -e /etc/carapace/bundle.pem ] || ! grep -q '^trust_bundle_path = "/etc/carapace/bundle.pem"' /etc/carapace/agent.toml; then
        systemctl start carapace-agent.service
        wait_for "carapace-agent" /usr/local/bin/carapace-agent healthcheck --socket-path /run/carapace-agent/api.sock
        # The token is spent once the agent holds its identity.
        if [ "$made_env" -eq 1 ]; then rm -f /etc/carapace/agent.env; fi
        echo "carapace-agent is running: SPIFFE_ENDPOINT_SOCKET=unix:///run/carapace-agent/api.sock"
    else
        echo "carapace-agent is enabled but not started: put the server's bundle in /etc/carapace/bundle.pem"
        echo "and CARAPACE_JOIN_TOKEN=<token> in /etc/carapace/agent.env (chmod 600), then: systemctl start carapace-agent"
    fi
fi
