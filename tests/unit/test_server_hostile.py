"""The invoke server against a hostile client on 127.0.0.1 (issue 11): malformed, oversized,
chunked, stalled and parallel requests; afterwards it still answers /health 200 and /invoke 201.
Bounded in time: socket timeouts are shortened for the test, every socket has a timeout."""

import concurrent.futures
import json
import logging
import socket
import threading
import time

import pytest

from lsmseg.challenge import server as server_module
from lsmseg.challenge.invoke import handle_invocation
from lsmseg.challenge.server import InvokeService, make_server, serve

from .test_challenge import settings_for

CLIENT_TIMEOUT = 10.0


def raw(port: int, data: bytes, read: bool = True) -> bytes:
    """Send raw bytes; return everything the server answers until it closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(data)
        if not read:
            return b""
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            chunks.append(b"<client timeout: connection left open>")
        return b"".join(chunks)


def status_codes(answer: bytes) -> list[int]:
    return [int(line.split()[1]) for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.")]


def start_server(tmp_path, invoke, max_connections: int | None = None):
    """A server for a loaded (stand-in) model, serving in a thread; the caller shuts it down."""
    service = InvokeService(settings_for(tmp_path), invoke=invoke)
    service.predictor = object()
    server = make_server(service, "127.0.0.1", 0, max_connections)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def hostile_server(tmp_path, monkeypatch):
    monkeypatch.setattr(server_module, "SOCKET_TIMEOUT_S", 1.0, raising=False)
    monkeypatch.setattr(server_module, "MAX_CONNECTIONS", 16, raising=False)
    calls = []

    def counting_invoke(predictor, settings):
        calls.append(time.monotonic())
        return {"output": "/output/images/s/output.mha"}

    server = start_server(tmp_path, counting_invoke)
    yield server.server_address[1], calls
    server.shutdown()
    server.server_close()


def test_bad_content_length_is_400_and_closes(hostile_server):
    port, calls = hostile_server
    for value in (b"abc", b"-1", b"1e3", b"12, 12"):
        answer = raw(port, b"POST /invoke HTTP/1.1\r\nHost: x\r\nContent-Length: " + value + b"\r\n\r\n")
        assert status_codes(answer) == [400], (value, answer)
    answer = raw(port, b"POST /invoke HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n")
    assert status_codes(answer) == [400]
    assert calls == []


def test_oversized_body_is_413_and_never_parsed_as_a_request(hostile_server):
    port, calls = hostile_server
    smuggled = b"POST /invoke HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    body = b"x" * (2 << 20) + smuggled
    answer = raw(port, b"POST /health HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert status_codes(answer) == [413]
    assert calls == [], "the tail of the body was run as /invoke"


def test_a_client_still_sending_its_oversized_body_reads_the_413_not_a_reset(hostile_server):
    """The refusal goes out before the body is sent: the server must drain it rather than close with
    unread bytes, which resets the connection (the client's send fails, its answer may be lost)."""
    port, calls = hostile_server
    body = b"x" * (2 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(b"POST /invoke HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body))
        time.sleep(0.3)  # the server has answered 413 by now
        sock.sendall(body)  # BrokenPipeError / ConnectionResetError if the server closed unread
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert status_codes(answer) == [413]
    assert calls == []


@pytest.mark.parametrize("bound", ["seconds", "bytes"])
def test_the_drain_after_a_refusal_is_bounded(tmp_path, monkeypatch, bound):
    """A refused client that keeps its socket open, or keeps sending, holds its connection slot
    no longer than REFUSED_DRAIN_S seconds or REFUSED_DRAIN_BYTES bytes."""
    if bound == "seconds":
        monkeypatch.setattr(server_module, "REFUSED_DRAIN_S", 1.0)
    else:
        monkeypatch.setattr(server_module, "REFUSED_DRAIN_S", 60.0)
        monkeypatch.setattr(server_module, "REFUSED_DRAIN_BYTES", 256 << 10)
    server = start_server(tmp_path, lambda predictor, settings: {"output": "x"}, max_connections=1)
    port = server.server_address[1]
    health = b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n"
    hostile = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    try:
        hostile.sendall(b"POST /invoke HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (1 << 30))
        assert status_codes(b"".join(iter(lambda: hostile.recv(65536), b""))) == [413]
        if bound == "seconds":
            time.sleep(0.3)  # an undrained connection would have freed its slot by now
            assert status_codes(raw(port, health)) == [503], "the refused connection was not drained"
        else:
            def keep_sending():
                try:
                    while True:
                        hostile.sendall(b"x" * 65536)
                except OSError:  # reset once the server has dropped enough and closed
                    pass
            threading.Thread(target=keep_sending, daemon=True).start()
        started, codes = time.monotonic(), []
        while time.monotonic() - started < 8.0 and codes[-1:] != [200]:
            codes = status_codes(raw(port, health))
            time.sleep(0.05)
        assert codes == [200], "the refused connection still holds the only slot"
    finally:
        hostile.close()
        server.shutdown()
        server.server_close()


def test_chunked_bodies_are_refused(hostile_server):
    port, calls = hostile_server
    inner = b"POST /invoke HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    chunked = b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n"
    answer = raw(port, b"POST /health HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
    assert status_codes(answer) == [501]
    assert calls == []


def test_malformed_request_lines_get_400_and_logged_text_is_escaped(hostile_server, caplog):
    port, _ = hostile_server
    caplog.set_level(logging.DEBUG, logger="lsmseg.challenge.server")
    for line in (b"GARBAGE\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9 extra\r\n\r\n", b"\x00\x01\x02\r\n\r\n"):
        assert status_codes(raw(port, line))[0] in (400, 505), line
    raw(port, b"GET /\x1b[31mred\x07 HTTP/1.1\r\nConnection: close\r\n\r\n")
    time.sleep(0.2)
    assert "\x1b" not in caplog.text and "\x07" not in caplog.text and "\\x1b" in caplog.text


def test_stalled_and_parallel_clients_do_not_exhaust_the_server(hostile_server):
    port, calls = hostile_server
    baseline = threading.active_count()
    stalled = []
    for _ in range(40):  # more than max_connections: the extra ones are refused at once
        sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
        sock.sendall(b"POST /invoke HTTP/1.1\r\nContent-Length: 1000\r\n\r\nonly a part")
        stalled.append(sock)
    try:
        time.sleep(2.5)  # past the server's socket timeout (1 s in this test)
        assert threading.active_count() <= baseline + 2, "stalled uploads still hold threads"
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: raw(port, b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n"),
                                    range(24)))
        assert all(status_codes(a) == [200] for a in answers)
        answer = raw(port, b"POST /invoke HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        assert status_codes(answer) == [201] and json.loads(answer.split(b"\r\n\r\n", 1)[1])["status"] == "done"
        assert len(calls) == 1, "a stalled upload was run as an invocation"
    finally:
        for sock in stalled:
            sock.close()


def test_health_reports_a_failed_model_load_with_its_reason(tmp_path, monkeypatch):
    def bad_manifest_loader(settings):
        raise ValueError("number of heads must be positive")  # what MONAI raises for num_heads: [0, ...]

    listening, codes = {}, []
    ready = threading.Event()

    def on_listen(address, service):
        listening["port"] = address[1]
        ready.set()

    monkeypatch.setattr(server_module, "DEFAULT_FAILED_LINGER_S", 3.0, raising=False)
    thread = threading.Thread(target=lambda: codes.append(serve(
        settings_for(tmp_path, host="127.0.0.1", port=0), invoke=handle_invocation, loader=bad_manifest_loader,
        on_listen=on_listen)))
    thread.start()
    assert ready.wait(10)
    deadline = time.monotonic() + 2.5
    answer = b""
    while time.monotonic() < deadline:
        answer = raw(listening["port"], b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        if status_codes(answer) == [500]:
            break
        time.sleep(0.05)
    assert status_codes(answer) == [500]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["status"] == "failed" and "number of heads must be positive" in body["error"]
    thread.join(10)
    assert codes == [1]
