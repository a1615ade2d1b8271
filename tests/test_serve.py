"""`dadpo.evaluate.serve` over a real socket with the real SmolLM2 model: every malformed request gets a
4xx JSON reply within seconds, and the server keeps answering valid requests."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time

import pytest

from dadpo.evaluate.serve import MAX_BODY_BYTES, main, make_server

TIMEOUT = 2.0  # the server's socket timeout in these tests


@pytest.fixture(scope="module")
def port(smollm):
    model, tok = smollm
    srv = make_server(model, tok, "smollm", max_tokens_cap=8, timeout=TIMEOUT)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_port
    srv.shutdown()
    srv.server_close()


def _exchange(port: int, raw: bytes, wait: float = TIMEOUT + 5) -> tuple[int, dict, float]:
    """Send raw bytes, read one HTTP reply: (status, JSON body, seconds it took)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(raw)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.getheader("Content-Type") == "application/json"
        body = json.loads(resp.read())
    return resp.status, body, time.monotonic() - t0


def _post(port: int, body: bytes, headers: str | None = None, wait: float = TIMEOUT + 5) -> tuple[int, dict, float]:
    headers = f"Content-Length: {len(body)}\r\n" if headers is None else headers
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + headers.encode() + b"\r\n"
    return _exchange(port, head + body, wait)


def _chat(**fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "Say hi."}], **fields}).encode()


@pytest.mark.parametrize(
    ("body", "headers", "status", "needle"),
    [
        (_chat(max_tokens=-5), None, 400, "max_tokens"),
        (_chat(max_tokens=True), None, 400, "max_tokens"),
        (_chat(max_tokens="8"), None, 400, "max_tokens"),
        (json.dumps({"messages": [1, 2]}).encode(), None, 400, "messages[0]"),
        (json.dumps({"messages": [{"role": "user", "content": ["x"]}]}).encode(), None, 400, "messages[0]"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), None, 400, "messages[0]"),
        (json.dumps({"messages": []}).encode(), None, 400, "messages"),
        (b"[1, 2]", None, 400, "JSON object"),
        (b"{not json", None, 400, "not valid JSON"),
        (b"\xff\xfe{}", None, 400, "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, None, 400, "not valid JSON"),
        (_chat(), "Content-Length: -1\r\n", 400, "Content-Length"),
        (_chat(), "Content-Length: 1e14\r\n", 400, "Content-Length"),
        (_chat(), "Content-Length: 100000000000000\r\n", 413, "over the limit"),
        (_chat(), f"Content-Length: {MAX_BODY_BYTES + 1}\r\n", 413, "over the limit"),
        (_chat(), "Content-Length: 5\r\nContent-Length: 6\r\n", 400, "Content-Length"),
        (_chat(), "", 411, "Content-Length"),
        (_chat(), "Transfer-Encoding: chunked\r\n", 411, "chunked"),
        (json.dumps({"messages": [{"role": "user", "content": "hello " * 9000}]}).encode(), None, 400, "context"),
    ],
)
def test_malformed_requests_get_a_json_4xx_in_seconds(port, body, headers, status, needle):
    code, reply, seconds = _post(port, body, headers)
    assert code == status and needle in reply["error"]["message"], reply
    assert seconds < 5


def test_a_body_that_stops_arriving_gets_408_after_the_socket_timeout(port):
    code, reply, seconds = _post(port, b'{"messages": ', "Content-Length: 100\r\n")
    assert code == 408 and "did not arrive" in reply["error"]["message"]
    assert TIMEOUT - 0.5 < seconds < TIMEOUT + 3


def test_http_servers_own_refusals_are_json_too(port):
    for line in (b"garbage", b"GET / HTTP/2.0", b"GET / HTTP/x"):
        code, reply, _ = _exchange(port, line + b"\r\n\r\n")
        assert 400 <= code < 506 and reply["error"]["message"], line
    code, reply, _ = _exchange(port, b"PUT /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert code == 501 and reply["error"]["message"]
    code, reply, _ = _post(port, _chat()[:-1])  # a valid length, a torn body
    assert code == 400


def test_valid_requests_still_work_after_bad_ones(port):
    for body in (_chat(max_tokens=-5), b"{"):
        assert _post(port, body)[0] == 400
    code, reply, _ = _post(port, _chat(max_tokens=1000), wait=300)  # over the cap of 8: capped, not refused
    assert code == 200 and isinstance(reply["choices"][0]["message"]["content"], str)
    assert 0 < reply["usage"]["completion_tokens"] <= 8 and reply["usage"]["prompt_tokens"] > 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v1/models")
    assert json.loads(conn.getresponse().read())["data"][0]["id"] == "smollm"


def test_binding_beyond_loopback_warns(smollm, caplog):
    model, tok = smollm
    with caplog.at_level(logging.WARNING, logger="dadpo.evaluate.serve"):
        make_server(model, tok, "m", host="127.0.0.1").server_close()
        assert not caplog.records
        make_server(model, tok, "m", host="0.0.0.0").server_close()
    assert len(caplog.records) == 1 and "not loopback" in caplog.records[0].getMessage()


@pytest.mark.parametrize(("args", "needle"), [(["--port", "70000"], "--port"),
                                              (["--host", "no-such-host.invalid", "--port", "0"], "cannot listen")])
def test_serve_main_refuses_a_bad_address_in_one_line(capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and needle in err[-1] and "Traceback" not in "\n".join(err)
