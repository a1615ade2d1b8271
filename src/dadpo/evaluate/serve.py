"""A small OpenAI-compatible chat-completions server backed by a local HF model (greedy decoding).

Enough of the API for a judge client: `POST /v1/chat/completions` and `GET /v1/models`. Useful to try
the HTTP judge path without a GPU server, and used by the tests as a real endpoint on 127.0.0.1.

    python -m dadpo.evaluate.serve --model smollm2-135m-instruct --port 8011

Every request it cannot answer gets a JSON error with a 4xx status (never a dropped connection): bodies
over 1 MiB (413), a missing (411) or invalid (400) Content-Length, a body slower than the socket timeout
(408), malformed JSON or chat messages, a `max_tokens` that is not a positive integer, a prompt longer than
the model's context (400). Anyone who can reach the port can use the model, so binding to anything but
loopback logs a warning.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dadpo.data import chat_prompt
from dadpo.errors import DadpoError
from dadpo.generation import GenerationConfig, generate_batch

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    """A request the server refuses: HTTP `status` and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def body_length(headers) -> int:
    """The request body's size from its headers: one plain Content-Length of at most `MAX_BODY_BYTES`."""
    if headers.get("Transfer-Encoding") is not None:
        raise RequestError(411, "chunked bodies are not supported: send a Content-Length")
    values = headers.get_all("Content-Length") or []
    if not values:
        raise RequestError(411, "a Content-Length header is required")
    if len(set(values)) > 1 or not (values[0].isascii() and values[0].isdigit()):
        raise RequestError(400, f"invalid Content-Length {', '.join(values)!r:.60}")
    length = int(values[0])
    if length > MAX_BODY_BYTES:
        raise RequestError(413, f"request body of {length} bytes is over the limit of {MAX_BODY_BYTES}")
    return length


def parse_chat_request(body: bytes, max_tokens_cap: int) -> tuple[list[dict], int]:
    """(messages, max_tokens) of a chat-completions body; `max_tokens` (default 256) is capped at the server's
    `max_tokens_cap`. Anything else the body holds (model, temperature, ...) is not read."""
    try:
        req = json.loads(body)
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
        raise RequestError(400, f"body is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise RequestError(400, "body must be a JSON object")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list")
    for k, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise RequestError(400, f"messages[{k}] must be an object with a role of {', '.join(ROLES)} "
                                    "and a string content")
    max_tokens = req.get("max_tokens")
    if max_tokens is None:
        max_tokens = 256
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(400, f"max_tokens must be a positive integer, got {max_tokens!r:.40}")
    return [{"role": m["role"], "content": m["content"]} for m in messages], min(max_tokens, max_tokens_cap)


def make_server(
    model, tok, name: str, host: str = "127.0.0.1", port: int = 0, max_tokens_cap: int = 1024,
    timeout: float = 30.0,
) -> ThreadingHTTPServer:
    """A server (not yet serving) answering chat completions with `model`; port 0 picks a free port.
    `timeout`: seconds any one socket read or write of a connection may wait (a stalled client is dropped)."""
    from jinja2 import TemplateError

    lock = threading.Lock()  # one generation at a time: the model is not thread-safe
    context = getattr(model.config, "max_position_embeddings", None)

    def prompt_tokens(messages: list[dict]) -> int:
        try:
            return len(tok(chat_prompt(tok, messages), add_special_tokens=False)["input_ids"])
        except TemplateError as e:  # e.g. a template that insists on alternating roles
            raise RequestError(400, f"the chat template refused these messages: {e}") from None

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if code >= 400:  # an unread body may follow: this connection cannot carry another request
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def send_error(self, code, message=None, explain=None):
            """http.server's own refusals (bad request line, headers, method) as JSON too."""
            self.log_error("code %d, message %s", code, message)
            if self.request_version == "HTTP/0.9":  # a garbled request line: still answer with a status line
                self.request_version = "HTTP/1.0"
            self._send(code, _error(message or HTTPStatus(code).phrase))

        def do_GET(self):  # noqa: N802 (http.server API)
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            else:
                self._send(404, _error(f"no route {self.path}"))

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, _error(f"no route {self.path}"))
            try:
                length = body_length(self.headers)
                try:
                    body = self.rfile.read(length)
                except TimeoutError:
                    raise RequestError(408, f"the body did not arrive within {timeout:g} s") from None
                if len(body) < length:
                    raise RequestError(400, f"body ended after {len(body)} of {length} bytes")
                messages, max_tokens = parse_chat_request(body, max_tokens_cap)
                with lock:
                    n_prompt = prompt_tokens(messages)
                    if context and n_prompt + max_tokens > context:
                        raise RequestError(400, f"prompt of {n_prompt} tokens + max_tokens {max_tokens} is over "
                                                f"the model's context of {context}")
                    text, n_tokens, stopped = generate_batch(
                        model, tok, [messages], GenerationConfig(max_new_tokens=max_tokens)
                    )[0]
            except RequestError as e:
                return self._send(e.status, _error(str(e)))
            self._send(200, _completion(name, text, n_prompt, n_tokens, stopped))

        def log_message(self, fmt, *args):
            log.debug("%s " + fmt, self.address_string(), *args)

    Handler.timeout = timeout  # StreamRequestHandler sets it on each connection's socket
    if not is_loopback(host):
        log.warning("serve: binding %s, not loopback: anyone who can reach port %s can use %s (no authentication)",
                    host or "all interfaces", port or "(any)", name)
    return ThreadingHTTPServer((host, port), Handler)


def _error(message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error"}}


def _completion(name: str, text: str, n_prompt: int, n_tokens: int, stopped: bool) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text},
             "finish_reason": "stop" if stopped else "length"}
        ],
        "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_tokens, "total_tokens": n_prompt + n_tokens},
    }


def main(argv: list[str] | None = None) -> None:
    from dadpo.embedded import DEFAULT_MODEL
    from dadpo.models import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model spec to serve (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default %(default)s; any other is reachable from the network)")
    p.add_argument("--port", type=int, default=8011, help="port (default %(default)s)")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port: must be 0-65535, got {args.port}")
    logging.basicConfig(level=logging.INFO)
    try:
        model, tok = load_model(args.model)
    except DadpoError as e:
        p.error(str(e))
    try:
        server = make_server(model, tok, args.model, args.host, args.port)
    except OSError as e:  # unknown host name, address not on this machine, port taken
        p.error(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    print(f"serving {args.model} at http://{args.host}:{server.server_port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
