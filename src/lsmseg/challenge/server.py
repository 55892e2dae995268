"""HTTP server for the Grand Challenge *invoke* API (SELMA3D 2026), standard library only.

Grand Challenge starts the container (image label ``org.grand-challenge.api-method="invoke"``),
polls ``GET /health`` until it answers 200, provisions a case under ``/input`` (with
``/input/inputs.json``), calls ``POST /invoke`` and expects 201 once the outputs are in
``/output``. The model is loaded once, in the background, while ``/health`` answers 503.

Responses are JSON. ``/invoke`` answers 201 on success; 422 when the case's input is unusable
(bad or missing image, bad inputs.json), 500 when the output cannot be written or something
unexpected happens, 503 while the model is loading (or when the server stops during the
invocation: it is cancelled, its partial mask removed), 409 when another invocation is running. The
server keeps serving after any error. When the weights cannot be loaded, ``/health`` answers 500
with the reason for ``failed_linger_s`` seconds, then the server stops (exit code 1), since no case
could ever succeed.

Requests are handled defensively (the platform's network is not the only client a port may see;
see docs/security.md): bodies must have a valid ``Content-Length`` of at most
:data:`MAX_BODY_BYTES` (400 / 413, then the connection is closed, so a body is never parsed as a
request), ``Transfer-Encoding`` is refused (501), a refused request's unread bytes are drained for a
bounded time before the close (so that the client reads the refusal instead of a reset), sockets time out after
:data:`SOCKET_TIMEOUT_S` seconds, at most :data:`MAX_CONNECTIONS` connections are served at once,
malformed request lines get 400, and logged request text is escaped.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import re
import signal
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from ..errors import EXIT_FAILED, EXIT_OK, InputError, LsmsegError, printable, single_line

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # /invoke needs no body; anything larger is refused unread
SOCKET_TIMEOUT_S = 30.0  # a stalled client loses its connection (and its thread) after this
MAX_CONNECTIONS = 32  # beyond this, new connections are answered 503 and closed at once
REFUSED_DRAIN_S = 2.0  # after a refusal, read and drop what the client still sends, at most this long
REFUSED_DRAIN_BYTES = 4 * MAX_BODY_BYTES  # ... and at most this much; beyond it the close resets
DEFAULT_FAILED_LINGER_S = 300.0  # after a failed model load, report it on /health this long, then exit
CANCEL_WAIT_S = 5.0  # on SIGTERM, wait this long for a running invocation to unwind (docker stop waits 10 s)
_DIGITS = re.compile(r"[0-9]{1,18}")


def escape_log_text(text: str, limit: int = 300) -> str:
    """Client-supplied text made safe for a log line: control characters escaped, length capped."""
    escaped = printable(text)
    return escaped[:limit] + ("..." if len(escaped) > limit else "")


class Stopping(BaseException):
    """Raised in a running invocation's thread when the server stops: like SIGTERM in exec mode, it
    unwinds the case (the atomic writer removes its partial mask) before the process exits."""


class InvokeService:
    """State shared by the request handlers: the predictor once loaded, and one invocation at a time.

    Args:
        settings: passed to ``invoke`` and to the loader.
        invoke: ``invoke(predictor, settings) -> dict``, one case (:func:`.invoke.handle_invocation`).
    """

    def __init__(self, settings, invoke: Callable):
        self.settings = settings
        self.invoke = invoke
        self.predictor = None
        self.load_error: str | None = None
        self.busy = threading.Lock()
        self._running: int | None = None  # the thread id of the running invocation
        self._running_lock = threading.Lock()
        self._answering = 0  # POST /invoke requests not yet answered
        self.stopping = False  # set by cancel: no invocation starts any more
        self._answered = threading.Condition()

    @contextlib.contextmanager
    def answering(self):
        """Around a POST /invoke from its start to its reply: :meth:`cancel` waits for the reply, so
        that the process does not exit between an invocation's end and its client's answer."""
        with self._answered:
            self._answering += 1
        try:
            yield
        finally:
            with self._answered:
                self._answering -= 1
                self._answered.notify_all()

    def load(self, loader: Callable) -> bool:
        """Load the predictor with ``loader(settings)``; on failure keep one error line for /health.

        Returns:
            True when the model is loaded, False when loading failed (logged, never raised).
        """
        try:
            self.predictor = loader(self.settings)
        except LsmsegError as exc:
            self.load_error = str(exc)
            logger.error("%s", exc)
            return False
        except Exception as exc:  # a bad manifest can fail deep inside torch/MONAI: still one line
            self.load_error = f"cannot load the model: unexpected {type(exc).__name__}: {single_line(exc)[:300]}"
            logger.error("%s", self.load_error)
            logger.debug("traceback", exc_info=True)
            return False
        return True

    def health(self) -> tuple[int, dict]:
        """GET /health's status and body: 200 ready, 503 still loading, 500 loading failed."""
        if self.predictor is not None:
            return HTTPStatus.OK, {"status": "ready"}
        if self.load_error:
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"status": "failed", "error": self.load_error}
        return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "loading"}

    def run_invocation(self) -> tuple[int, dict]:
        """POST /invoke's status and body: 201 with the result, 409 while another invocation runs,
        422 for a bad input, 500 for any other failure, 503 (or 500) before the model is ready."""
        if self.predictor is None:
            return self.health()[0] if self.load_error else HTTPStatus.SERVICE_UNAVAILABLE, {
                "error": self.load_error or "the model is still loading; retry when GET /health answers 200"
            }
        if self.stopping:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": "the server is stopping"}
        if not self.busy.acquire(blocking=False):
            return HTTPStatus.CONFLICT, {"error": "another invocation is running"}
        try:
            try:
                with self._running_lock:
                    self._running = threading.get_ident()
                result = self.invoke(self.predictor, self.settings)
            finally:
                with self._running_lock:
                    self._running = None
        except Stopping:
            logger.error("invocation cancelled: the server is stopping")
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": "the server is stopping; the invocation was cancelled"}
        except InputError as exc:
            logger.error("%s", exc)
            return HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(exc)}
        except LsmsegError as exc:  # output not writable, ...
            logger.error("%s", exc)
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(exc)}
        except Exception as exc:  # a bug must not take the server down with it
            message = f"unexpected {type(exc).__name__}: {single_line(exc)[:300]}"
            logger.error("%s", message)
            logger.debug("traceback", exc_info=True)
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": message}
        finally:
            self.busy.release()
        logger.info("invocation done: %s", result.get("output"))
        return HTTPStatus.CREATED, {"status": "done", **result}

    def cancel(self, wait_s: float = CANCEL_WAIT_S) -> bool:
        """Stop a running invocation (raise :class:`Stopping` in its thread) and wait for it to unwind.

        A process that exits while a daemon thread is inside torch aborts (exit code 134, "terminate
        called without an active exception") and leaves the partial mask; unwinding first avoids both.

        Returns:
            True when no invocation runs and every POST /invoke is answered, False when that did not
            happen within ``wait_s``.
        """
        deadline = time.monotonic() + wait_s
        with self._running_lock:
            self.stopping = True
            if self._running is not None:
                logger.warning("stopping: cancelling the running invocation")
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._running), ctypes.py_object(Stopping))
        # The exception arrives when the thread runs Python again; then its client gets the 503.
        with self._answered:
            if self._answered.wait_for(lambda: self._answering == 0, timeout=max(0.0, deadline - time.monotonic())):
                return True
        logger.warning("the running invocation did not stop within %.0f s", wait_s)
        return False


def make_handler(service: InvokeService) -> type[BaseHTTPRequestHandler]:
    """The request handler class serving ``service``: GET /health and POST /invoke, with bounded
    bodies, socket timeouts and one-line log records."""
    class Handler(BaseHTTPRequestHandler):
        server_version = "lsmseg"
        protocol_version = "HTTP/1.1"
        timeout = SOCKET_TIMEOUT_S  # StreamRequestHandler sets it on the socket

        def _reply(self, status: int, body: dict, close: bool = False) -> None:
            payload = json.dumps(body).encode()
            self.send_response(int(status))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _refuse(self, status: int, body: dict) -> None:
            """Answer a refusal, then close the connection (see :meth:`_drain_before_close`)."""
            self._reply(status, body, close=True)
            self._drain_before_close()

        def _drain_before_close(self) -> None:
            """Stop sending, then read and drop what the client still sends, bounded.

            Closing a socket with unread bytes makes the kernel reset the connection: a client
            still sending its body gets a broken pipe, and may never read the answer. So drain for
            at most :data:`REFUSED_DRAIN_S` seconds and :data:`REFUSED_DRAIN_BYTES` bytes (a
            hostile client holds its thread no longer); the server closes the socket afterwards.
            """
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + REFUSED_DRAIN_S
                left = REFUSED_DRAIN_BYTES
                while left > 0:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self.connection.settimeout(remaining)
                    chunk = self.rfile.read1(min(left, 1 << 16))
                    if not chunk:  # the client has closed its side
                        break
                    left -= len(chunk)
            except OSError:  # timeout, reset: the refusal was sent, nothing more to do
                pass

        def _read_body(self) -> bool:
            """Read (and drop) a request body, or refuse it and close; True when all is well.

            Closing after every refusal matters: an unread body left on a keep-alive connection
            would be parsed as the next request.
            """
            if self.headers.get("Transfer-Encoding") is not None:
                self._refuse(HTTPStatus.NOT_IMPLEMENTED,
                             {"error": "Transfer-Encoding is not supported; send Content-Length"})
                return False
            values = self.headers.get_all("Content-Length") or []
            if not values:
                return True
            if len(values) > 1 or not _DIGITS.fullmatch(values[0].strip()):
                self._refuse(HTTPStatus.BAD_REQUEST, {"error": "invalid Content-Length"})
                return False
            length = int(values[0])
            if length > MAX_BODY_BYTES:
                self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             {"error": f"request body over {MAX_BODY_BYTES} bytes"})
                return False
            while length > 0:  # the socket timeout ends a stalled upload
                chunk = self.rfile.read(min(length, 1 << 16))
                if not chunk:
                    self.close_connection = True
                    return False
                length -= len(chunk)
            return True

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """http.server's errors (malformed request line, bad version, unknown method...) as a
            real HTTP/1.1 status line and a JSON body, and the connection closed. A malformed line
            leaves the version at HTTP/0.9, for which http.server would send no status line."""
            if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
                self.request_version = "HTTP/1.1"
            phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "Error"
            self.log_error("code %d, message %s", code, message)
            payload = json.dumps({"error": escape_log_text(message or phrase, 200)}).encode()
            self.send_response_only(code, phrase)  # never echo client text in the status line
            self.send_header("Server", self.version_string())
            self.send_header("Date", self.date_time_string())
            self.send_header("Connection", "close")
            self.close_connection = True
            if code >= 200 and code not in (HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED):
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if getattr(self, "command", None) != "HEAD":
                    self.wfile.write(payload)
            else:
                self.end_headers()
            self._drain_before_close()

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if not self._read_body():
                return
            if self.path.split("?")[0] in ("/health", "/ping"):
                self._reply(*service.health())
            else:
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {escape_log_text(self.path, 100)}; "
                                                   "use GET /health, POST /invoke"})

        do_HEAD = do_GET

        def do_POST(self) -> None:  # noqa: N802
            if self.path.split("?")[0] == "/invoke":
                with service.answering():  # from the body on: a stopping server waits for this reply
                    if self._read_body():
                        self._reply(*service.run_invocation())
            elif self._read_body():
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {escape_log_text(self.path, 100)}; "
                                                   "use GET /health, POST /invoke"})

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (signature from http.server)
            # A malformed request line leaves no self.path; anything from the client is escaped.
            path = getattr(self, "path", "") or ""
            # Health polls every few seconds would drown the log: keep them at debug level.
            level = logging.DEBUG if path.startswith(("/health", "/ping")) else logging.INFO
            logger.log(level, "%s %s", self.address_string(), escape_log_text(format % args))

    return Handler


class InvokeHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that serves at most ``max_connections`` connections at once."""

    daemon_threads = True

    def __init__(self, address, handler, max_connections: int = MAX_CONNECTIONS):
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):  # one line, never a traceback on stderr
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (socket.timeout, ConnectionError)):
            return
        logger.warning("request from %s failed: %s", client_address[0], escape_log_text(f"{type(exc).__name__}: {exc}"))


def make_server(service: InvokeService, host: str, port: int, max_connections: int | None = None) -> InvokeHTTPServer:
    """A server for ``service`` on ``host:port`` (port 0: any free port); ``max_connections``
    defaults to :data:`MAX_CONNECTIONS`."""
    return InvokeHTTPServer((host, port), make_handler(service), max_connections or MAX_CONNECTIONS)


def serve(
    settings,
    *,
    invoke: Callable,
    loader: Callable | None = None,
    predictor=None,
    stop: threading.Event | None = None,
    on_listen: Callable | None = None,
    failed_linger_s: float | None = None,
) -> int:
    """Listen, load the model, serve until SIGTERM/SIGINT (or ``stop``). Returns the exit code.

    When loading fails, ``/health`` answers 500 with the reason for ``failed_linger_s`` seconds
    (default :data:`DEFAULT_FAILED_LINGER_S`, or until stopped), then the server stops with exit code 1.

    Args:
        settings: ``host`` and ``port`` to listen on; passed to ``invoke`` and ``loader``.
        invoke: handles one ``POST /invoke`` (see :class:`InvokeService`).
        loader: ``loader(settings) -> predictor``, run once in the background (needed unless
            ``predictor`` is given).
        predictor: an already loaded predictor.
        stop: set it to stop the server (default: SIGTERM/SIGINT do).
        on_listen: called with ``((host, port), service)`` once listening (tests).
        failed_linger_s: how long a failed load is reported before the server stops.
    """
    if predictor is None and loader is None:
        raise ValueError("serve needs a predictor or a loader")
    service = InvokeService(settings, invoke)
    service.predictor = predictor  # before listening: a given predictor is ready for the first request
    try:
        server = make_server(service, settings.host, settings.port)
    except OSError as exc:
        logger.error("cannot listen on %s:%s (%s)", settings.host, settings.port, exc.strerror or exc)
        return EXIT_FAILED
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="lsmseg-http", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    logger.info("invoke server listening on http://%s:%s (GET /health, POST /invoke)", host, port)
    if on_listen:
        on_listen((host, port), service)
    try:
        if predictor is None and not service.load(loader):
            failed_linger_s = DEFAULT_FAILED_LINGER_S if failed_linger_s is None else failed_linger_s
            logger.error("the model could not be loaded; GET /health answers 500 with the reason, stopping in %.0f s",
                         failed_linger_s)
            stop.wait(failed_linger_s)
            return EXIT_FAILED
        logger.info("model loaded; ready for POST /invoke")
        stop.wait()
        logger.info("stopping the invoke server")
        return EXIT_OK
    finally:
        server.shutdown()  # no new invocation starts; then the running one, if any, unwinds
        service.cancel()
        server.server_close()
