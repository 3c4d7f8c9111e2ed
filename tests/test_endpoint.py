"""endpoint.py: the client for OpenAI-compatible endpoints, against a local server that is busy at first."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import endpoint


def test_a_busy_endpoint_is_retried_after_its_retry_after(monkeypatch):
    calls = []

    class Busy(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(self.path)
            busy = len(calls) <= 2
            body = json.dumps({"error": {"message": "queue full"}} if busy else
                              {"choices": [{"message": {"content": "ok"}}]}).encode()
            self.send_response(503 if busy else 200)
            if busy:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert endpoint.chat_completion(url, [{"role": "user", "content": "hi"}]) == "ok" and len(calls) == 3
        calls.clear()
        monkeypatch.setattr(endpoint, "BUSY_RETRIES", 1)  # still busy after the last retry: the call fails
        with pytest.raises(endpoint.EndpointError, match="HTTP 503"):
            endpoint.chat_completion(url, [{"role": "user", "content": "hi"}])
    finally:
        server.shutdown()
    assert endpoint.retry_after("3", 0) == 3 and endpoint.retry_after(None, 2) == 4 and endpoint.retry_after("soon", 9) == 30
