#!/usr/bin/env python3
"""Example receiver for LLMProxy's usage webhook (`usage_hook.url`): logs every JSON body it gets.

The gateway POSTs one record object per request (or, with usage_hook.batch_size > 1, a JSON array
of them). Delivery is at least once: a real receiver stores each record once, keyed by its
`request_id` (and checks X-LLMProxy-Signature when usage_hook.secret is set; see the README).

    python3 receiver.py [--listen HOST:PORT]      (default 0.0.0.0:8090)

POST any path with a JSON object -> 200 {"status":"ok"}, one log line with the record.
Not JSON -> 400. GET /health -> 200.
"""
import argparse
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1 << 20


class Handler(BaseHTTPRequestHandler):
    server_version = "llmproxy-webhook-receiver"

    def _reply(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            self._reply(200, {"status": "ok"})
        else:
            self._reply(404, {"error": "not found"})

    def do_POST(self):
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self._reply(413 if length > MAX_BODY else 400, {"error": "bad Content-Length"})
            return
        raw = self.rfile.read(length)
        try:
            record = json.loads(raw)
        except ValueError as e:
            self._reply(400, {"error": f"not JSON: {e}"})
            return
        log = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "path": self.path,
               "record": record}
        print(json.dumps(log, ensure_ascii=False), flush=True)
        self._reply(200, {"status": "ok"})

    def log_message(self, fmt, *args):  # the JSON line above is the log; no access log on stderr
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="0.0.0.0:8090", help="HOST:PORT (default 0.0.0.0:8090)")
    a = ap.parse_args()
    host, _, port = a.listen.rpartition(":")
    srv = ThreadingHTTPServer((host.strip("[]") or "0.0.0.0", int(port)), Handler)
    h, p = srv.server_address[:2]
    print(f"webhook-receiver: listening on http://{h}:{p}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
