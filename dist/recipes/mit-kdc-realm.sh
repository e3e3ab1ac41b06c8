#!/usr/bin/env bash
# An MIT Kerberos realm with a node's host principal and the server's service principal,
# for Kerberos node attestation without Active Directory and without carapace-lab.
# OPERATIONS.md ("Recipe: an MIT KDC realm") explains each step; tests/tests/ops.rs runs
# this very script and attests an agent with the keytabs it writes.
#
# Usage: mit-kdc-realm.sh DIR REALM PORT [HOST_FQDN [SERVER_FQDN]]
#   DIR          a new or empty directory (created 0700)
#   REALM        e.g. EXAMPLE.COM (upper case)
#   PORT         the KDC's port (UDP and TCP) on KDC_BIND
#   HOST_FQDN    the node: default this machine's name as the agent derives it
#                (`hostname`, in lower case; see OPERATIONS.md)
#   SERVER_FQDN  the host part of the server's principal carapace/<SERVER_FQDN>
#                (default HOST_FQDN; it need not resolve)
# Environment: KDC_BIND (default 127.0.0.1).
#
# Writes into DIR: krb5.conf (both sides' KRB5_CONFIG), kdc.conf (KRB5_KDC_PROFILE),
# db/ (the database and its stash), host.keytab (host/<HOST_FQDN>, the agent's),
# carapace.keytab (carapace/<SERVER_FQDN>, the server's), server-kerberos.toml and
# agent-kerberos.toml (the config sections), env (the variables above). Starts krb5kdc
# (pid in DIR/krb5kdc.pid; stop it with `kill "$(cat DIR/krb5kdc.pid)"`).
set -euo pipefail

usage() { echo "usage: $0 DIR REALM PORT [HOST_FQDN [SERVER_FQDN]]" >&2; exit 64; }
[ $# -ge 3 ] && [ $# -le 5 ] || usage
DIR=$1
REALM=$2
PORT=$3
HOST_FQDN=${4:-$(hostname | tr '[:upper:]' '[:lower:]')}
SERVER_FQDN=${5:-$HOST_FQDN}
BIND=${KDC_BIND:-127.0.0.1}

case $REALM in *[!A-Z0-9.-]* | "") echo "REALM: upper-case letters, digits, '.' and '-' (e.g. EXAMPLE.COM)" >&2; exit 64 ;; esac
case $PORT in *[!0-9]* | "") usage ;; esac
for h in "$HOST_FQDN" "$SERVER_FQDN"; do
    case $h in *[!a-z0-9.-]* | "" | .* | -*) echo "$h: a host name in lower case (letters, digits, '.', '-')" >&2; exit 64 ;; esac
done
for tool in krb5kdc kdb5_util kadmin.local; do
    command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install -y krb5-kdc krb5-admin-server krb5-user" >&2; exit 69; }
done

if [ -e "$DIR" ] && [ -n "$(ls -A "$DIR")" ]; then
    echo "$DIR is not empty: refusing to write a realm over what is there" >&2
    exit 73
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
case $DIR in *[[:space:]#\"]*) echo "$DIR: use a path without spaces, '#' or quotes" >&2; exit 64 ;; esac
chmod 700 "$DIR"
umask 077
mkdir "$DIR/db"

# 1. The client profile (both the agent and the server read it through KRB5_CONFIG, or
#    /etc/krb5.conf). dns_canonicalize_hostname and rdns off: the agent's default
#    principal is host/<`hostname` in lower case>, whatever DNS says (OPERATIONS.md).
domain_lines="    $HOST_FQDN = $REALM"
case $HOST_FQDN in *.*) domain_lines="$domain_lines
    .${HOST_FQDN#*.} = $REALM" ;; esac
cat >"$DIR/krb5.conf" <<EOF
[libdefaults]
    default_realm = $REALM
    dns_lookup_kdc = false
    dns_lookup_realm = false
    dns_canonicalize_hostname = false
    rdns = false
    udp_preference_limit = 1
[realms]
    $REALM = {
        kdc = $BIND:$PORT
    }
[domain_realm]
$domain_lines
EOF
# 2. The KDC's profile (KRB5_KDC_PROFILE). krb5 profiles expand no variables.
cat >"$DIR/kdc.conf" <<EOF
[kdcdefaults]
    kdc_listen = $BIND:$PORT
    kdc_tcp_listen = $BIND:$PORT
[realms]
    $REALM = {
        database_name = $DIR/db/principal
        key_stash_file = $DIR/db/stash
        acl_file = $DIR/kadm5.acl
        max_life = 10h 0m 0s
        supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
    }
[logging]
    kdc = FILE:$DIR/kdc.log
    default = FILE:$DIR/kdc.log
EOF
: >"$DIR/kadm5.acl"
chmod 644 "$DIR/krb5.conf"
export KRB5_CONFIG=$DIR/krb5.conf KRB5_KDC_PROFILE=$DIR/kdc.conf

# 3. The database; its master key goes to the stash file. The password is given on
#    stdin, never as an argument.
master=$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')
printf '%s\n%s\n' "$master" "$master" | kdb5_util create -s -r "$REALM" >/dev/null
unset master

# 4. Principals with random keys, and their keytabs. kadmin.local exits 0 even when a
#    query fails: its own message is the check.
kadmin() {
    local out
    out=$(kadmin.local -r "$REALM" -q "$1" 2>&1)
    if ! printf '%s' "$out" | grep -q "$2"; then echo "kadmin.local $1: $out" >&2; exit 1; fi
}
HOST=host/$HOST_FQDN@$REALM
SERVICE=carapace/$SERVER_FQDN@$REALM
kadmin "addprinc -randkey $HOST" "Principal \"$HOST\" created"
kadmin "addprinc -randkey $SERVICE" "Principal \"$SERVICE\" created"
kadmin "ktadd -k $DIR/host.keytab $HOST" "added to keytab"
kadmin "ktadd -k $DIR/carapace.keytab $SERVICE" "added to keytab"
chmod 600 "$DIR/host.keytab" "$DIR/carapace.keytab"

# 5. The KDC, in the background (it writes its pid file once it serves).
krb5kdc -r "$REALM" -P "$DIR/krb5kdc.pid"
for _ in $(seq 1 100); do
    if [ -s "$DIR/krb5kdc.pid" ] && (exec 3<>"/dev/tcp/$BIND/$PORT") 2>/dev/null; then break; fi
    sleep 0.1
done
(exec 3<>"/dev/tcp/$BIND/$PORT") 2>/dev/null || { echo "krb5kdc does not answer on $BIND:$PORT (log: $DIR/kdc.log)" >&2; exit 1; }

# 6. The config sections and the environment both sides need.
cat >"$DIR/server-kerberos.toml" <<EOF
[node_attestor.kerberos]
keytab = "$DIR/carapace.keytab"
service_principal = "$SERVICE"
allowed_realms = ["$REALM"]
EOF
cat >"$DIR/agent-kerberos.toml" <<EOF
[node_attestor.kerberos]
service_principal = "$SERVICE"
keytab = "$DIR/host.keytab"
# principal: default host/<this host's name>, here $HOST
EOF
printf 'KRB5_CONFIG=%s\n' "$DIR/krb5.conf" >"$DIR/env"
chmod 644 "$DIR/server-kerberos.toml" "$DIR/agent-kerberos.toml" "$DIR/env"

echo "realm $REALM: krb5kdc pid $(cat "$DIR/krb5kdc.pid") on $BIND:$PORT"
echo "agent: $HOST in $DIR/host.keytab; server: $SERVICE in $DIR/carapace.keytab"
echo "both sides: KRB5_CONFIG=$DIR/krb5.conf; configs: $DIR/server-kerberos.toml, $DIR/agent-kerberos.toml"
