#!/usr/bin/env bash
# A software TPM (swtpm) with EK certificates from a local CA, for trying TPM node
# attestation without a TPM chip and without carapace-lab. OPERATIONS.md ("Recipe: swtpm
# with an EK certificate") explains each step; tests/tests/ops.rs runs this very script
# and attests an agent with it.
#
# Usage: swtpm-ek-cert.sh DIR PORT
#   DIR   the TPM's directory: manufactured on the first run (a new local CA, a TPM
#         state with RSA-2048 and P-384 EK certificates), reused afterwards
#   PORT  swtpm's TPM command port on 127.0.0.1; its control port is PORT+1
# Starts swtpm in the background (pid in DIR/swtpm.pid; stop it with
# `swtpm_ioctl --tcp 127.0.0.1:$((PORT+1)) -s`, which also saves its state).
#
# Writes into DIR: localca/ (the EK CA: swtpm-localca-rootca-cert.pem, issuercert.pem and
# their keys), ek-ca.pem (root and intermediate: the server's ek_ca_files), state/ (the
# TPM), server-tpm.toml and agent-tpm.toml (the two config sections).
set -euo pipefail

usage() { echo "usage: $0 DIR PORT" >&2; exit 64; }
[ $# -eq 2 ] || usage
DIR=$1
PORT=$2
case $PORT in *[!0-9]* | "") usage ;; esac
[ "$PORT" -ge 1024 ] && [ "$PORT" -le 65534 ] || { echo "PORT: 1024..65534 (PORT+1 is the control port)" >&2; exit 64; }
CTRL=$((PORT + 1))

for tool in swtpm swtpm_setup swtpm_localca swtpm_ioctl; do
    command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install -y swtpm swtpm-tools" >&2; exit 69; }
done
LOCALCA=$(command -v swtpm_localca)

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
case $DIR in *[[:space:]#\"]*) echo "$DIR: use a path without spaces, '#' or quotes" >&2; exit 64 ;; esac
chmod 700 "$DIR"

if [ ! -f "$DIR/state/tpm2-00.permall" ]; then
    # 1. Private configs, so that swtpm_setup uses DIR and not /etc/swtpm_setup.conf's
    #    /var/lib/swtpm-localca. These files expand no variables: every path is literal.
    mkdir -p -m 700 "$DIR/conf" "$DIR/localca" "$DIR/state" "$DIR/tmp"
    cat >"$DIR/conf/swtpm-localca.conf" <<EOF
statedir = $DIR/localca
signingkey = $DIR/localca/signkey.pem
issuercert = $DIR/localca/issuercert.pem
certserial = $DIR/localca/certserial
EOF
    printf -- '--platform-manufacturer Carapace\n--platform-version 2.1\n--platform-model swtpm\n' \
        >"$DIR/conf/swtpm-localca.options"
    cat >"$DIR/conf/swtpm_setup.conf" <<EOF
create_certs_tool = $LOCALCA
create_certs_tool_config = $DIR/conf/swtpm-localca.conf
create_certs_tool_options = $DIR/conf/swtpm-localca.options
active_pcr_banks = sha256
EOF
    # 2. Manufacture: EKs (RSA-2048 at NV 0x01c00002, ECC P-384 at 0x01c00016) certified
    #    by the local CA, made on this first run. swtpm_setup works in TMPDIR.
    TMPDIR=$DIR/tmp swtpm_setup --tpm2 --tpmstate "$DIR/state" --config "$DIR/conf/swtpm_setup.conf" \
        --create-ek-cert --create-platform-cert --pcr-banks sha256 --display >"$DIR/manufacture.log" 2>&1 || {
        cat "$DIR/manufacture.log" >&2; echo "swtpm_setup failed (log: $DIR/manufacture.log)" >&2; exit 1; }
    # 3. The trust anchors for the server: the CA's root and the intermediate that signs
    #    the EK certificates (a real fleet lists its TPM vendors' CAs instead).
    cat "$DIR/localca/swtpm-localca-rootca-cert.pem" "$DIR/localca/issuercert.pem" >"$DIR/ek-ca.pem"
    chmod 644 "$DIR/ek-ca.pem"
fi

# 4. Serve the TPM on loopback TCP: commands on PORT, swtpm's control channel on PORT+1
#    (what the swtpm TCTI also uses, so the agent is given PORT only).
if [ -f "$DIR/swtpm.pid" ] && kill -0 "$(cat "$DIR/swtpm.pid")" 2>/dev/null; then
    echo "swtpm already runs for $DIR (pid $(cat "$DIR/swtpm.pid"))" >&2
    exit 75
fi
rm -f "$DIR/swtpm.pid"
swtpm socket --tpm2 --tpmstate "dir=$DIR/state" \
    --server "type=tcp,port=$PORT,bindaddr=127.0.0.1" --ctrl "type=tcp,port=$CTRL,bindaddr=127.0.0.1" \
    --flags not-need-init,startup-clear \
    --pid "file=$DIR/swtpm.pid" --log "file=$DIR/swtpm.log,level=1" --daemon
for _ in $(seq 1 100); do
    if swtpm_ioctl --tcp "127.0.0.1:$CTRL" -g >/dev/null 2>&1; then break; fi
    sleep 0.1
done
swtpm_ioctl --tcp "127.0.0.1:$CTRL" -g >/dev/null || { echo "swtpm does not answer on 127.0.0.1:$CTRL (log: $DIR/swtpm.log)" >&2; exit 1; }

# 5. The two config sections.
cat >"$DIR/server-tpm.toml" <<EOF
[node_attestor.tpm]
ek_ca_files = ["$DIR/ek-ca.pem"]
EOF
cat >"$DIR/agent-tpm.toml" <<EOF
[node_attestor.tpm]
tcti = "swtpm:host=127.0.0.1,port=$PORT"
EOF
chmod 644 "$DIR/server-tpm.toml" "$DIR/agent-tpm.toml"

echo "swtpm pid $(cat "$DIR/swtpm.pid") on 127.0.0.1:$PORT (control $CTRL); EK CA: $DIR/ek-ca.pem"
echo "server config: $DIR/server-tpm.toml; agent config: $DIR/agent-tpm.toml"
