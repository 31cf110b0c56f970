"""TEST ONLY: a small HTTP/1.1 server for the port-proxy tests, run as a "guest" program.

`python3 http_echo.py PORT` listens on 127.0.0.1:PORT (threads, stdlib only):
- POST/PUT /echo: reads the body (Content-Length or chunked) and answers JSON with its
  length, sha256, the request's method, target and headers (lower-cased names);
- GET /echo?...: the same without a body;
- GET /slow?s=N: answers after N seconds;
- GET /bytes?n=N: N bytes (b"x"), chunked, without Content-Length;
- GET /reset: closes the connection without answering;
- GET /truncate: promises 100000 bytes, sends 10, closes.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _json(self, body: bytes) -> None:
        data = json.dumps({"method": self.command, "target": self.path, "length": len(body),
                           "sha256": hashlib.sha256(body).hexdigest(),
                           "headers": [[k.lower(), v] for k, v in self.headers.items()]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Echo", "yes")
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        self._json(self._body())

    do_PUT = do_POST

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/slow":
            time.sleep(float(q.get("s", "1")))
            self._json(b"")
        elif url.path == "/bytes":
            n = int(q.get("n", "0"))
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"x" * 65536
            while n > 0:
                part = chunk[:n]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                n -= len(part)
            self.wfile.write(b"0\r\n\r\n")
        elif url.path == "/truncate":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True
            self.connection.close()
        elif url.path == "/reset":
            self.close_connection = True
            self.connection.close()
        else:
            self._json(b"")


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
