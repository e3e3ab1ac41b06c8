# Shared by the scripts: install what building Carapace needs on Debian.
# shellcheck shell=bash

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# System packages for building and running Carapace and its tests (libtss2-dev: the TPM
# attestor links tpm2-tss through tss-esapi; libssl-dev: it also encrypts credentials to
# RSA EKs with OpenSSL's libcrypto, which tpm2-tss links too; libkrb5-dev: the Kerberos
# attestor links MIT krb5's libgssapi_krb5 and libkrb5).
install_system_packages() {
    echo "==> installing system packages (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -q
    as_root apt-get install -y -q --no-install-recommends \
        ca-certificates curl gcc libc6-dev pkg-config make openssl procps libtss2-dev libssl-dev libkrb5-dev \
        python3 python3-venv python3-pip "$@"
}

# What the hardware-backed tests and the lab (carapace-lab) run: SoftHSM2 and pkcs11-tool
# (opensc), swtpm with tpm2-tools, an MIT Kerberos KDC, and ssh-keygen (openssh-client:
# the sshpop tests make SSH CAs and host certificates with it), systemd's systemd-analyze
# and systemd-sysusers, and strace (tests/tests/ops.rs checks the units and
# scripts/install.sh with them, and traces the binaries' system calls against the units'
# filters; nothing is started under systemd). All run unprivileged on
# loopback (README.md, "The lab"). krb5-config asks debconf questions: DEBIAN_FRONTEND above.
LAB_PACKAGES=(softhsm2 opensc swtpm swtpm-tools tpm2-tools krb5-kdc krb5-admin-server krb5-user openssh-client systemd strace postgresql)

# A Rust toolchain: the one on PATH if recent enough, else rustup's stable.
ensure_rust() {
    if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
    if command -v cargo >/dev/null 2>&1; then
        local minor
        minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
        if [ "${minor:-0}" -ge 85 ]; then return 0; fi
        echo "==> rustc $(rustc --version) is older than 1.85 (edition 2024)"
    fi
    echo "==> installing Rust with rustup (https://rustup.rs)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component clippy,rustfmt
    . "$HOME/.cargo/env"
}
