"""Fetches X509-SVIDs from a Carapace agent with py-spiffe (the `spiffe` package on PyPI)
and prints what it got as JSON, for the end-to-end tests. Usage:
    fetch_svid.py <socket path>
"""
import json
import sys

from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import WorkloadApiClient


def main() -> None:
    socket_path = sys.argv[1]
    with WorkloadApiClient(socket_path=f"unix://{socket_path}") as client:
        ctx = client.fetch_x509_context(timeout=10)
        svids = [
            {
                "spiffe_id": str(s.spiffe_id),
                "chain_pem": "".join(c.public_bytes(Encoding.PEM).decode() for c in s.cert_chain),
            }
            for s in ctx.x509_svids
        ]
        default = ctx.default_svid
        bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(default.spiffe_id.trust_domain)
        print(
            json.dumps(
                {
                    "svids": svids,
                    "default": str(default.spiffe_id),
                    "bundle_pem": "".join(
                        a.public_bytes(Encoding.PEM).decode() for a in bundle.x509_authorities
                    ),
                }
            )
        )


if __name__ == "__main__":
    main()
