"""Small workloads of the sandbox cluster, standing in for a shop's services.

`orders` answers HTTP on 8080 (JSON that says it came from the cluster, and who asked) and echoes
UDP on 9999; `checkout` is the deployed app that a local copy impersonates. Stdlib only.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ORDERS = [
    {"id": 1001, "item": "espresso machine", "status": "shipped"},
    {"id": 1002, "item": "grinder", "status": "packing"},
]


class Handler(BaseHTTPRequestHandler):
    role = "orders"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/bytes/"):
            self.stream(int(self.path.removeprefix("/bytes/")))
            return
        body: dict[str, object] = {
            "service": self.role,
            "source": "cluster",
            "pod": socket.gethostname(),
            "client": self.client_address[0],
        }
        if self.role == "orders":
            body["orders"] = ORDERS
        self.reply(200, json.dumps(body).encode() + b"\n")

    def do_POST(self) -> None:
        remaining = int(self.headers.get("Content-Length", "0"))
        received = 0
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            received += len(chunk)
            remaining -= len(chunk)
        self.reply(200, json.dumps({"received": received}).encode() + b"\n")

    def stream(self, size: int) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        block = b"x" * (1 << 20)
        while size:
            n = min(size, len(block))
            self.wfile.write(block[:n])
            size -= n

    def reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def udp_echo(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)


def main() -> None:
    role = sys.argv[1]
    Handler.role = role
    if role == "orders":
        threading.Thread(target=udp_echo, args=(9999,), daemon=True).start()
    server = ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8080"))), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
