"""A real HTTP server on loopback serving fixed and hostile routes, counting connections it accepts."""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Route = Callable[[BaseHTTPRequestHandler], None]


class ImageServer:
    """`tls`, if given, serves https: a context per server name (SNI), the first for any other
    name; `server_names` records the name each TLS handshake asked for."""

    def __init__(self, host: str = "127.0.0.1", tls: dict[str, ssl.SSLContext] | None = None):
        self.routes: dict[str, Route] = {}
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.server_names: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def setup(self):
                server.connections += 1
                super().setup()

            def do_GET(self):
                server.requests.append((self.path, dict(self.headers)))
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                # A client giving up on a hostile route is the point of the route.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    route(self)

            def log_message(self, *args):
                pass

        if tls:  # HTTP/1.1 keeps connections open, so their reuse can be observed
            Handler.protocol_version = "HTTP/1.1"
        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        if tls:
            default = next(iter(tls.values()))

            def pick(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
                self.server_names.append(name)
                sock.context = tls.get(name or "", default)

            default.sni_callback = pick
            self.httpd.socket = default.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return self.httpd.server_address[0]

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def route(self, path: str, handler: Route) -> str:
        self.routes[path] = handler
        return self.base_url + path

    def add(
        self,
        path: str,
        body: bytes,
        content_type: str = "image/png",
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> str:
        def handler(h: BaseHTTPRequestHandler) -> None:
            h.send_response(status)
            sent = {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}
            for k, v in sent.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(body)

        return self.route(path, handler)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        def handler(h: BaseHTTPRequestHandler) -> None:
            h.send_response(status)
            h.send_header("Location", location)
            h.send_header("Content-Length", "0")
            h.end_headers()

        return self.route(path, handler)

    def drip(self, path: str, body: bytes, interval_s: float = 0.5) -> str:
        """Send `body` one byte every `interval_s`: never silent long enough for a read timeout."""

        def handler(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            for byte in body:
                h.wfile.write(bytes([byte]))
                h.wfile.flush()
                time.sleep(interval_s)

        return self.route(path, handler)

    def endless(self, path: str, declared: int | None = None) -> str:
        """Stream zeros for ever, declaring `declared` bytes (or nothing, i.e. read to close)."""

        def handler(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            if declared is not None:
                h.send_header("Content-Length", str(declared))
            h.end_headers()
            chunk = b"\0" * 65536
            while True:
                h.wfile.write(chunk)

        return self.route(path, handler)

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
