"""Mutual TLS between workloads with `spiffe-tls` (PyPI; py-spiffe's TLS library), for
the federation end-to-end tests. Each side takes its X509-SVID and trust bundles (its own
trust domain's and the federated ones) from a Carapace agent's Workload API, and
authorizes the peer by its exact SPIFFE ID.

    spiffetls_peer.py serve <socket path> <host:port> <client SPIFFE ID>
        Listens; prints "listening" once ready; for each connection: handshake, read a
        line, answer "<own SPIFFE ID> got: <line>". A refused handshake is printed to
        stderr ("refused: ...") and the next connection is served.
    spiffetls_peer.py dial <socket path> <host:port> <server SPIFFE ID> <message>
        Connects, sends the message, prints the answer as JSON {"answer": ...}; exits 3
        with "refused: ..." on stderr when the TLS connection fails.
"""
import json
import sys
import warnings

from spiffe import SpiffeId, X509Source
from spiffetls import ListenOptions, ServerTlsMode, dial, listen
from spiffetls.errors import TLSConnectionError
from spiffetls.tlsconfig.authorize import authorize_id

# py-spiffe 0.3.2 flags the X509Source.bundles spiffe-tls reads as deprecated.
warnings.simplefilter("ignore", DeprecationWarning)


def read_line(conn) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1024)
        if not chunk:
            break
        data += chunk
    return data.strip()


def serve(source: X509Source, address: str, client_id: str) -> None:
    own = str(source.svid.spiffe_id)
    listener = listen(
        address,
        source,
        ListenOptions(tls_mode=ServerTlsMode.MTLS, authorize_fn=authorize_id(SpiffeId(client_id))),
    )
    print("listening", flush=True)
    while True:
        conn, _ = listener.accept()
        try:
            conn.do_handshake()
            line = read_line(conn)
            conn.sendall(f"{own} got: {line.decode()}\n".encode())
            conn.shutdown()
        except Exception as e:  # a refused peer: report it and serve the next one
            print(f"refused: {e!r}", file=sys.stderr, flush=True)
        finally:
            conn.close()


def dial_once(source: X509Source, address: str, server_id: str, message: str) -> None:
    try:
        conn = dial(address, source, authorize_fn=authorize_id(SpiffeId(server_id)))
    except TLSConnectionError as e:
        print(f"refused: {e}", file=sys.stderr)
        sys.exit(3)
    conn.sendall(f"{message}\n".encode())
    answer = read_line(conn).decode()
    conn.close()
    print(json.dumps({"answer": answer}))


def main() -> None:
    mode, socket_path, address, peer_id = sys.argv[1:5]
    source = X509Source(socket_path=f"unix://{socket_path}", timeout_in_seconds=20)
    try:
        if mode == "serve":
            serve(source, address, peer_id)
        elif mode == "dial":
            dial_once(source, address, peer_id, sys.argv[5])
        else:
            sys.exit(f"unknown mode {mode!r}")
    finally:
        source.close()


if __name__ == "__main__":
    main()
