"""JWT-SVIDs from a Carapace agent with clients others wrote, for the end-to-end tests:
py-spiffe (the `spiffe` package on PyPI: WorkloadApiClient, JwtSource, JwtSvid) and PyJWT.
Every command prints one JSON document on stdout and exits 0, or prints the error on
stderr and exits 1.

Usage:
    jwt_client.py <socket> fetch <audience>... [--subject <spiffe id>]
        WorkloadApiClient.fetch_jwt_svids and fetch_jwt_svid (the default identity):
        {"svids": [{spiffe_id, token, audience, expiry}], "default": {...}}
    jwt_client.py <socket> bundles
        WorkloadApiClient.fetch_jwt_bundles: {"<trust domain>": ["<kid>", ...]}
    jwt_client.py <socket> jwks
        The raw FetchJWTBundles message (py-spiffe's generated stub):
        {"<trust domain ID as keyed>": <JWKS document>}
    jwt_client.py <socket> validate <audience> <token>
        WorkloadApiClient.validate_jwt_svid: {spiffe_id, audience, expiry}
    jwt_client.py <socket> source <audience>...
        JwtSource: fetch_svid, then JwtSvid.parse_and_validate with the source's bundle
        for the token's trust domain: {spiffe_id, audience, expiry, bundle_kids}
    jwt_client.py - pyjwt <jwks file> <audience> <token>
        PyJWT alone: picks the key by the token's kid in the JWKS (a file holding a JWKS, or
        a SPIFFE bundle, or the `jwks` output above: its first document), verifies the
        signature, exp and aud: {claims}
"""
import json
import sys
import warnings

# py-spiffe imports DSA types, which `cryptography` flags as deprecated on stderr; stderr
# carries only the refusal for the tests.
warnings.simplefilter("ignore")

import grpc  # noqa: E402
import jwt  # noqa: E402
from spiffe import JwtBundle, JwtSource, JwtSvid, SpiffeId, WorkloadApiClient  # noqa: E402
from spiffe._proto import workload_pb2, workload_pb2_grpc  # noqa: E402


def svid_json(s: JwtSvid) -> dict:
    return {
        "spiffe_id": str(s.spiffe_id),
        "token": s.token,
        "audience": sorted(s.audience),
        "expiry": s.expiry,
    }


def fetch(socket: str, args: list) -> dict:
    subject = None
    if "--subject" in args:
        i = args.index("--subject")
        subject = SpiffeId(args[i + 1])
        args = args[:i] + args[i + 2 :]
    audience = set(args)
    with WorkloadApiClient(socket_path=f"unix://{socket}") as client:
        svids = client.fetch_jwt_svids(audience=audience, subject=subject, timeout=10)
        default = client.fetch_jwt_svid(audience=audience, subject=subject, timeout=10)
    return {"svids": [svid_json(s) for s in svids], "default": svid_json(default)}


def bundles(socket: str) -> dict:
    with WorkloadApiClient(socket_path=f"unix://{socket}") as client:
        bundle_set = client.fetch_jwt_bundles(timeout=10)
    return {
        str(b.trust_domain): sorted(b.jwt_authorities.keys()) for b in bundle_set.bundles
    }


def raw_jwks(socket: str) -> dict:
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        stream = stub.FetchJWTBundles(
            workload_pb2.JWTBundlesRequest(),
            metadata=(("workload.spiffe.io", "true"),),
            timeout=10,
        )
        first = next(iter(stream))
        stream.cancel()
    return {td: json.loads(jwks) for td, jwks in first.bundles.items()}


def validate(socket: str, audience: str, token: str) -> dict:
    with WorkloadApiClient(socket_path=f"unix://{socket}") as client:
        s = client.validate_jwt_svid(token=token, audience=audience, timeout=10)
    return {"spiffe_id": str(s.spiffe_id), "audience": sorted(s.audience), "expiry": s.expiry}


def source(socket: str, audiences: list) -> dict:
    with JwtSource(socket_path=f"unix://{socket}", timeout_in_seconds=10) as src:
        s = src.fetch_svid(audience=set(audiences))
        bundle: JwtBundle = src.get_bundle_for_trust_domain(s.spiffe_id.trust_domain)
        if bundle is None:
            raise RuntimeError(f"the JwtSource has no bundle for {s.spiffe_id.trust_domain}")
        checked = JwtSvid.parse_and_validate(s.token, bundle, {audiences[0]})
    return {
        "spiffe_id": str(checked.spiffe_id),
        "audience": sorted(checked.audience),
        "expiry": checked.expiry,
        "bundle_kids": sorted(bundle.jwt_authorities.keys()),
    }


def pyjwt_verify(jwks_path: str, audience: str, token: str) -> dict:
    with open(jwks_path, encoding="utf-8") as f:
        doc = json.load(f)
    if "keys" not in doc:  # the `jwks` output: {trust domain: JWKS}
        doc = next(iter(doc.values()))
    # A SPIFFE bundle also holds x509-svid keys: only the JWT-SVID keys sign tokens.
    keys = [k for k in doc["keys"] if k.get("use") in (None, "sig", "jwt-svid")]
    key_set = jwt.PyJWKSet.from_dict({"keys": keys})
    header = jwt.get_unverified_header(token)
    kid = header.get("kid")
    matching = [k for k in key_set.keys if k.key_id == kid]
    if not matching:
        raise RuntimeError(f"no key with kid {kid!r} in {jwks_path}")
    claims = jwt.decode(
        token,
        key=matching[0],
        algorithms=["ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"],
        audience=audience,
        options={"require": ["exp", "sub", "aud"]},
    )
    return {"claims": claims}


def main() -> None:
    socket, command, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    try:
        if command == "fetch":
            out = fetch(socket, args)
        elif command == "bundles":
            out = bundles(socket)
        elif command == "jwks":
            out = raw_jwks(socket)
        elif command == "validate":
            out = validate(socket, args[0], args[1])
        elif command == "source":
            out = source(socket, args)
        elif command == "pyjwt":
            out = pyjwt_verify(args[0], args[1], args[2])
        else:
            raise SystemExit(f"unknown command {command!r}; see the usage at the top of {sys.argv[0]}")
    except SystemExit:
        raise
    except Exception as e:  # every refusal: the message, exit 1
        print(f"{command} failed: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
