"""Fetches a SPIFFE bundle endpoint over https_web (Python's `urllib`, trusting the given
CA file) and parses it with py-spiffe's bundle parsers, for the federation end-to-end
tests. py-spiffe 0.3.2 has no parser for a whole SPIFFE bundle: the X.509 authorities
(`use: x509-svid`, `x5c`) go to `X509Bundle.parse_raw` and the JWT keys (`use:
jwt-svid`) to `JwtBundle.parse`, as a py-spiffe user does. Prints JSON:
    {"sequence": n, "refresh_hint": n, "x509_authorities": [PEM...], "jwt_kids": [...]}
Usage:
    parse_bundle.py <url> <CA file> <trust domain>
"""
import base64
import json
import ssl
import sys
import urllib.request

from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import JwtBundle, TrustDomain, X509Bundle


def main() -> None:
    url, cafile, td = sys.argv[1], sys.argv[2], TrustDomain(sys.argv[3])
    ctx = ssl.create_default_context(cafile=cafile)
    with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
        doc = json.load(resp)
    keys = doc["keys"]
    der = b"".join(base64.b64decode(k["x5c"][0]) for k in keys if k["use"] == "x509-svid")
    x509 = X509Bundle.parse_raw(td, der)
    jwt = JwtBundle.parse(td, json.dumps({"keys": [k for k in keys if k["use"] == "jwt-svid"]}).encode())
    print(
        json.dumps(
            {
                "sequence": doc["spiffe_sequence"],
                "refresh_hint": doc["spiffe_refresh_hint"],
                "x509_authorities": [
                    c.public_bytes(Encoding.PEM).decode() for c in x509.x509_authorities
                ],
                "jwt_kids": sorted(jwt.jwt_authorities.keys()),
            }
        )
    )


if __name__ == "__main__":
    main()
