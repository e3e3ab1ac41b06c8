"""A hostile or broken SPIFFE bundle endpoint for the federation end-to-end tests: an
HTTPS server (Python's own `ssl` and `http.server`) whose answer to GET / the test
chooses by writing a file, one line:
    serve <path>    200 with the file's bytes (application/json)
    redirect        302 to https://localhost:<port>/elsewhere
    big             200 with a 10 MB body of JSON-looking bytes
Usage:
    bundle_peer.py <port> <cert chain PEM> <key PEM> <mode file>
Prints "listening" once ready.
"""
import http.server
import ssl
import sys


def main() -> None:
    port, cert, key, mode_file = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            with open(mode_file) as f:
                mode, _, arg = f.read().strip().partition(" ")
            if mode == "serve":
                with open(arg, "rb") as f:
                    body = f.read()
                self.answer(200, body)
            elif mode == "redirect":
                self.send_response(302)
                self.send_header("Location", f"https://localhost:{port}/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif mode == "big":
                self.answer(200, b'{"keys": [' + b" " * (10 * 1024 * 1024) + b"]}")
            else:
                self.answer(500, b"unknown mode")

        def answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass  # the client gave up on a body it refuses: expected

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
