"""A small OpenAI-compatible chat-completions server backed by a local HF model (greedy decoding).

Enough of the API for a judge client: `POST /v1/chat/completions` and `GET /v1/models`. Useful to try
the HTTP judge path without a GPU server, and used by the tests as a real endpoint on 127.0.0.1.

    python -m dadpo.evaluate.serve --model smollm2-135m-instruct --port 8011
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dadpo.generation import GenerationConfig, generate_batch

log = logging.getLogger(__name__)


def make_server(
    model, tok, name: str, host: str = "127.0.0.1", port: int = 0, max_tokens_cap: int = 1024
) -> ThreadingHTTPServer:
    """A server (not yet serving) answering chat completions with `model`; port 0 picks a free port."""
    lock = threading.Lock()  # one generation at a time: the model is not thread-safe

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server API)
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                messages = req["messages"]
                max_tokens = min(int(req.get("max_tokens") or 256), max_tokens_cap)
                if not isinstance(messages, list) or not messages:
                    raise ValueError("messages must be a non-empty list")
            except (ValueError, KeyError, TypeError) as e:
                return self._send(400, {"error": {"message": f"bad request: {e}"}})
            with lock:
                text, n_tokens, stopped = generate_batch(
                    model, tok, [messages], GenerationConfig(max_new_tokens=max_tokens)
                )[0]
            self._send(
                200,
                {
                    "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": name,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop" if stopped else "length",
                        }
                    ],
                    "usage": {"completion_tokens": n_tokens},
                },
            )

        def log_message(self, fmt, *args):
            log.debug("%s " + fmt, self.address_string(), *args)

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> None:
    from dadpo.models import DEFAULT_MODEL, load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model spec to serve (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--port", type=int, default=8011, help="port (default %(default)s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    model, tok = load_model(args.model)
    server = make_server(model, tok, args.model, args.host, args.port)
    print(f"serving {args.model} at http://{args.host}:{server.server_port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
