"""Watches X.509 contexts from a Carapace agent with py-spiffe (the `spiffe` package on
PyPI), as a long-running workload does, and prints one JSON line per update for the
end-to-end tests:
    {"received_at": <unix seconds, float>, "svids": [{spiffe_id, chain_pem}], "bundle_pem"}
Usage:
    watch_x509.py <socket path> <seconds to watch>
Exits 0 after watching that long, 1 (with the error on stderr) if the stream fails.
"""
import json
import sys
import threading
import time

from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import WorkloadApiClient


def pem(certs) -> str:
    return "".join(c.public_bytes(Encoding.PEM).decode() for c in certs)


def main() -> None:
    socket_path = sys.argv[1]
    seconds = float(sys.argv[2])
    failed = []
    done = threading.Event()
    lock = threading.Lock()

    def on_success(ctx) -> None:
        default = ctx.default_svid
        bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(default.spiffe_id.trust_domain)
        line = json.dumps(
            {
                "received_at": time.time(),
                "svids": [
                    {"spiffe_id": str(s.spiffe_id), "chain_pem": pem(s.cert_chain)}
                    for s in ctx.x509_svids
                ],
                "bundle_pem": pem(bundle.x509_authorities),
            }
        )
        with lock:
            print(line, flush=True)

    def on_error(e: Exception) -> None:
        failed.append(e)
        done.set()

    with WorkloadApiClient(socket_path=f"unix://{socket_path}") as client:
        handle = client.stream_x509_contexts(on_success, on_error, retry_connect=False)
        done.wait(seconds)
        handle.cancel()
    if failed:
        print(f"watch failed: {failed[0]!r}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
