#!/usr/bin/env python3
"""Verifies a JWT-SVID the way a generic OpenID Connect relying party does, with PyJWT.

Fetches the discovery document (--discovery-url, the issuer's
/.well-known/openid-configuration) over HTTPS trusting only --ca-file, reads its jwks_uri,
fetches the JWK Set with PyJWT's PyJWKClient (which keeps only keys with "use": "sig" or
no use), picks the key named by the token's kid and verifies the token: the signature
with an algorithm from the document's id_token_signing_alg_values_supported, exp/nbf/iat,
aud containing --audience, and iss equal to the document's issuer when the token has one
(--require-issuer: it must have one).

Prints the verified claims as JSON on stdout and exits 0; on any failure prints the
reason on stderr and exits 1.
"""

import argparse
import json
import ssl
import sys
import urllib.request

import jwt


def fail(reason):
    print(f"oidc_verify: {reason}", file=sys.stderr)
    sys.exit(1)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--discovery-url", required=True)
    p.add_argument("--ca-file", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--audience", required=True)
    p.add_argument("--require-issuer", action="store_true")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()

    try:
        ctx = ssl.create_default_context(cafile=args.ca_file)
    except (OSError, ssl.SSLError) as e:
        fail(f"cannot read --ca-file {args.ca_file}: {e}")

    try:
        with urllib.request.urlopen(
            args.discovery_url, context=ctx, timeout=args.timeout
        ) as resp:
            doc = json.load(resp)
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        fail(f"cannot fetch the discovery document {args.discovery_url}: {e}")
    for member in ("issuer", "jwks_uri", "id_token_signing_alg_values_supported"):
        if member not in doc:
            fail(f"the discovery document has no {member}")
    algorithms = doc["id_token_signing_alg_values_supported"]
    if not algorithms:
        fail("the discovery document lists no signing algorithm")

    try:
        jwks = jwt.PyJWKClient(doc["jwks_uri"], cache_keys=False, ssl_context=ctx, timeout=args.timeout)
        key = jwks.get_signing_key_from_jwt(args.token)
    except jwt.PyJWKClientError as e:
        fail(f"no key for the token from {doc['jwks_uri']}: {e}")
    except jwt.PyJWTError as e:
        fail(f"the token cannot be read: {e}")

    options = {"require": ["exp", "aud", "sub"]}
    kwargs = {}
    if args.require_issuer:
        options["require"].append("iss")
        kwargs["issuer"] = doc["issuer"]
    else:
        try:
            unverified = jwt.decode(args.token, options={"verify_signature": False})
        except jwt.PyJWTError as e:
            fail(f"the token cannot be read: {e}")
        if "iss" in unverified:
            kwargs["issuer"] = doc["issuer"]
    try:
        claims = jwt.decode(
            args.token,
            key.key,
            algorithms=algorithms,
            audience=args.audience,
            options=options,
            **kwargs,
        )
    except jwt.PyJWTError as e:
        fail(f"the token does not verify: {type(e).__name__}: {e}")
    print(json.dumps(claims, sort_keys=True))


if __name__ == "__main__":
    main()
