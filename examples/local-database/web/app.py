"""The checkout app under development: it reads its configuration from the environment that
composemirror imports from the deployed app, and shows where each answer came from."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


def customers() -> dict[str, object]:
    url = os.environ["DATABASE_URL"]
    try:
        out = subprocess.run(
            ["psql", url, "-AtF", "\t", "-c", "SELECT name, source FROM customers ORDER BY id"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError) as e:
        return {"host": urlsplit(url).hostname, "error": str(e)}
    rows = [line.split("\t") for line in out.splitlines() if line]
    return {
        "host": urlsplit(url).hostname,
        "source": rows[0][1] if rows else "empty",
        "names": [name for name, _ in rows],
    }


def orders() -> dict[str, object]:
    url = os.environ["ORDERS_URL"]
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
    except OSError as e:
        return {"url": url, "error": str(e)}
    return {
        "url": url,
        "source": body["source"],
        "pod": body["pod"],
        "orders": [f"#{o['id']} {o['item']}: {o['status']}" for o in body["orders"]],
    }


def report() -> str:
    db, remote = customers(), orders()
    lines = [f"checkout, local copy (APP_MODE={os.environ.get('APP_MODE', '-')})", ""]
    if "error" in db:
        lines.append(f"customers  ERROR from {db['host']}: {db['error']}")
    else:
        lines.append(
            f"customers  from the {str(db['source']).upper()} database "
            f"(DATABASE_URL host {db['host']})"
        )
        lines += [f"  - {name}" for name in db["names"]]  # type: ignore[attr-defined]
    if "error" in remote:
        lines.append(f"orders     ERROR from {remote['url']}: {remote['error']}")
    else:
        lines.append(
            f"orders     from the {str(remote['source']).upper()} "
            f"(ORDERS_URL {remote['url']}, pod {remote['pod']})"
        )
        lines += [f"  - {line}" for line in remote["orders"]]  # type: ignore[attr-defined]
    return "\n".join(lines) + "\n"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/json":
            body = json.dumps({"customers": customers(), "orders": orders()}).encode()
        else:
            body = report().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
