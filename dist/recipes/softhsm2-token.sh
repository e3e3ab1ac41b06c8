#!/usr/bin/env bash
# A SoftHSM2 token for carapace-server's CA keys, without carapace-lab.
# OPERATIONS.md ("Recipe: a SoftHSM2 token") explains each step; tests/tests/ops.rs runs
# this very script and starts a server on what it writes.
#
# Usage: softhsm2-token.sh DIR [TOKEN_LABEL]
#   DIR          a new or empty directory (created 0700), e.g. /var/lib/carapace/softhsm
#   TOKEN_LABEL  default "carapace"
# Environment:
#   TOKEN_OWNER      the user the server runs as (default: the user running this). The
#                    token files must belong to it: SoftHSM2 shows a token its user cannot
#                    read as "not found", with no error. Needs root when it is not you.
#   SOFTHSM2_MODULE  the PKCS#11 library (default: Debian's libsofthsm2.so)
#
# Writes into DIR: softhsm2.conf (SOFTHSM2_CONF), tokens/ (the token), user.pin and
# so.pin (0600, the PIN followed by a newline), server-pkcs11.toml (the server's
# [key_manager.pkcs11] section) and carapace-server.service.d/softhsm2.conf (the unit's
# drop-in: SOFTHSM2_CONF in its environment, the token directory writable).
set -euo pipefail

usage() { echo "usage: $0 DIR [TOKEN_LABEL]" >&2; exit 64; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
DIR=$1
LABEL=${2:-carapace}
OWNER=${TOKEN_OWNER:-$(id -un)}

command -v softhsm2-util >/dev/null || {
    echo "softhsm2-util not found: apt-get install -y softhsm2" >&2; exit 69; }
MODULE=${SOFTHSM2_MODULE:-}
if [ -z "$MODULE" ]; then
    for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so; do
        if [ -f "$m" ]; then MODULE=$m; break; fi
    done
fi
[ -n "$MODULE" ] && [ -f "$MODULE" ] || {
    echo "the SoftHSM2 PKCS#11 module was not found; set SOFTHSM2_MODULE" >&2; exit 69; }
case $LABEL in
    *[!A-Za-z0-9._-]* | "") echo "token label: use letters, digits, '.', '_' and '-'" >&2; exit 64 ;;
esac
[ ${#LABEL} -le 32 ] || { echo "token label: at most 32 characters" >&2; exit 64; }
id -u "$OWNER" >/dev/null 2>&1 || { echo "TOKEN_OWNER: no user $OWNER" >&2; exit 64; }

# Never touch what is already there: a token holds CA keys.
if [ -e "$DIR" ] && [ -n "$(ls -A "$DIR")" ]; then
    echo "$DIR is not empty: refusing to write a token over what is there" >&2
    exit 73
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
# krb5-style profiles and SoftHSM2's config expand nothing; a path with spaces or '#'
# would be misread.
case $DIR in *[[:space:]#\"]*) echo "$DIR: use a path without spaces, '#' or quotes" >&2; exit 64 ;; esac
chmod 700 "$DIR"
mkdir -m 700 "$DIR/tokens"

# 1. The SoftHSM2 configuration: where its tokens live.
cat >"$DIR/softhsm2.conf" <<EOF
directories.tokendir = $DIR/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
EOF
chmod 600 "$DIR/softhsm2.conf"

# 2. Random PINs, each in a 0600 file with a trailing newline (the server ignores one).
random_pin() { od -An -tx1 -N12 /dev/urandom | tr -d ' \n'; }
umask 077
printf '%s\n' "$(random_pin)" >"$DIR/user.pin"
printf '%s\n' "$(random_pin)" >"$DIR/so.pin"

# 3. The token itself, made as its owner. (softhsm2-util takes the PINs as arguments:
# they show in the process list for the tenth of a second it runs.)
if [ "$(id -un)" != "$OWNER" ]; then
    chown -R "$OWNER:" "$DIR"
    as_owner() { runuser -u "$OWNER" -- "$@"; }
else
    as_owner() { "$@"; }
fi
as_owner env SOFTHSM2_CONF="$DIR/softhsm2.conf" softhsm2-util --init-token --free \
    --label "$LABEL" --pin "$(head -n1 "$DIR/user.pin")" --so-pin "$(head -n1 "$DIR/so.pin")" >/dev/null

# 4. What the server needs: its config section and the unit's drop-in.
cat >"$DIR/server-pkcs11.toml" <<EOF
[key_manager.pkcs11]
module = "$MODULE"
token_label = "$LABEL"
pin_file = "$DIR/user.pin"
EOF
mkdir -m 755 "$DIR/carapace-server.service.d"
cat >"$DIR/carapace-server.service.d/softhsm2.conf" <<EOF
# Copy to /etc/systemd/system/carapace-server.service.d/softhsm2.conf, then
# systemctl daemon-reload && systemctl restart carapace-server.
[Service]
Environment=SOFTHSM2_CONF=$DIR/softhsm2.conf
# ProtectSystem=strict makes everything read-only: SoftHSM2 writes its token files.
ReadWritePaths=$DIR/tokens
EOF
chmod 644 "$DIR/server-pkcs11.toml" "$DIR/carapace-server.service.d/softhsm2.conf"
if [ "$(id -un)" != "$OWNER" ]; then chown -R "$OWNER:" "$DIR"; fi

echo "token \"$LABEL\" ready in $DIR/tokens (owner $OWNER)"
echo "server config: $DIR/server-pkcs11.toml; unit drop-in: $DIR/carapace-server.service.d/softhsm2.conf"
echo "environment:   SOFTHSM2_CONF=$DIR/softhsm2.conf"
