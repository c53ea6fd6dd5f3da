"""A minimal, fast Mews stand-in for CPU benchmarks of 10 million rows.

The sandbox validates every field and keeps every membership in memory (about 1 KB each):
right for the tests, too heavy for 10 million rows. This stand-in answers
``loyaltyMemberships/add`` exactly in the shape Mews (and the sandbox) does, the full
created membership per item, in order, but stores nothing: it only counts. ``getAll``
answers an empty page and ``configuration/get`` a fixed enterprise. It runs in its own
process, so its CPU is never counted as the client's.

``python -m benchmarks.fast_mews --port 0`` prints ``listening on http://127.0.0.1:PORT``;
``GET /_sandbox/stats`` answers ``{"stored": N, "requests": R}``, ``POST /_sandbox/reset`` zeroes them.
"""

from __future__ import annotations

import argparse
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec

_decode = msgspec.json.decode
_encode = msgspec.json.encode
CHAIN_ID = "8a1a4b1d-61a5-4c4f-8a0b-6a3e3b0c2f11"


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stored = 0
        self.requests = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Request-Id", str(uuid.uuid4()))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        state = self.server.state
        self._send(200, _encode({"stored": state.stored, "requests": state.requests}))

    def do_POST(self) -> None:
        state = self.server.state
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/_sandbox/reset":
            with state.lock:
                state.stored = state.requests = 0
            self._send(200, b"{}")
            return
        body = _decode(raw) if raw else {}
        with state.lock:
            state.requests += 1
        if self.path.endswith("loyaltyMemberships/add"):
            created = [
                {
                    "Id": str(uuid.uuid4()),
                    "ChainId": CHAIN_ID,
                    "AccountId": item["AccountId"],
                    "LoyaltyProgramId": item["LoyaltyProgramId"],
                    "State": item.get("State") or "Enrolled",
                    "IsPrimary": item["IsPrimary"],
                    "ProviderMembershipId": None,
                    "Code": item.get("Code"),
                    "MembershipNumber": item.get("Code"),
                    "Points": item.get("Points"),
                    "ExpirationDate": item.get("ExpirationDate"),
                    "Url": item.get("Url"),
                    "LoyaltyTierId": item.get("LoyaltyTierId"),
                    "ActivityState": "Active",
                    "DeletedUtc": None,
                }
                for item in body["LoyaltyMemberships"]
            ]
            with state.lock:
                state.stored += len(created)
            self._send(200, _encode({"LoyaltyMemberships": created}))
        elif self.path.endswith("loyaltyMemberships/getAll"):
            self._send(200, b'{"LoyaltyMemberships":[],"Cursor":null}')
        else:
            self._send(200, _encode({"Enterprise": {"Id": CHAIN_ID, "Name": "Fast stand-in"}}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.fast_mews")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.state = _State()  # type: ignore[attr-defined]
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
