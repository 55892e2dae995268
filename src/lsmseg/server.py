"""HTTP server for the Grand Challenge *invoke* API (SELMA3D 2026), standard library only.

Grand Challenge starts the container (image label ``org.grand-challenge.api-method="invoke"``),
polls ``GET /health`` until it answers 200, provisions a case under ``/input`` (with
``/input/inputs.json``), calls ``POST /invoke`` and expects 201 once the outputs are in
``/output``. The model is loaded once, in the background, while ``/health`` answers 503.

Responses are JSON. ``/invoke`` answers 201 on success; 422 when the case's input is unusable
(bad or missing image, bad inputs.json), 500 when the output cannot be written or something
unexpected happens, 503 while the model is loading, 409 when another invocation is running. The
server keeps serving after any error; a failure to load the weights stops it (exit code 1), since
no case could ever succeed.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from .errors import InputError, LsmsegError

logger = logging.getLogger(__name__)


class InvokeService:
    """State shared by the request handlers: the predictor once loaded, and one invocation at a time."""

    def __init__(self, settings, invoke: Callable | None = None):
        from .challenge import handle_invocation

        self.settings = settings
        self.invoke = invoke or handle_invocation
        self.predictor = None
        self.load_error: str | None = None
        self.busy = threading.Lock()

    def load(self, loader: Callable) -> bool:
        try:
            self.predictor = loader(self.settings)
        except LsmsegError as exc:
            self.load_error = str(exc)
            logger.error("%s", exc)
            return False
        return True

    def health(self) -> tuple[int, dict]:
        if self.predictor is not None:
            return HTTPStatus.OK, {"status": "ready"}
        if self.load_error:
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"status": "failed", "error": self.load_error}
        return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "loading"}

    def run_invocation(self) -> tuple[int, dict]:
        if self.predictor is None:
            return self.health()[0] if self.load_error else HTTPStatus.SERVICE_UNAVAILABLE, {
                "error": self.load_error or "the model is still loading; retry when GET /health answers 200"
            }
        if not self.busy.acquire(blocking=False):
            return HTTPStatus.CONFLICT, {"error": "another invocation is running"}
        try:
            result = self.invoke(self.predictor, self.settings)
        except InputError as exc:
            logger.error("%s", exc)
            return HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(exc)}
        except LsmsegError as exc:  # output not writable, ...
            logger.error("%s", exc)
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(exc)}
        except Exception as exc:  # a bug must not take the server down with it
            message = f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            logger.error("%s", message)
            logger.debug("traceback", exc_info=True)
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": message}
        finally:
            self.busy.release()
        logger.info("invocation done: %s", result.get("output"))
        return HTTPStatus.CREATED, {"status": "done", **result}


def make_handler(service: InvokeService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "lsmseg"
        protocol_version = "HTTP/1.1"

        def _reply(self, status: int, body: dict) -> None:
            payload = json.dumps(body).encode()
            self.send_response(int(status))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _discard_body(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > 0:
                self.rfile.read(min(length, 1 << 20))

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.split("?")[0] in ("/health", "/ping"):
                self._reply(*service.health())
            else:
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {self.path}; use GET /health, POST /invoke"})

        do_HEAD = do_GET

        def do_POST(self) -> None:  # noqa: N802
            self._discard_body()
            if self.path.split("?")[0] == "/invoke":
                self._reply(*service.run_invocation())
            else:
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {self.path}; use GET /health, POST /invoke"})

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (signature from http.server)
            # Health polls every few seconds would drown the log: keep them at debug level.
            level = logging.DEBUG if self.path.startswith(("/health", "/ping")) else logging.INFO
            logger.log(level, "%s %s", self.address_string(), format % args)

    return Handler


def make_server(service: InvokeService, host: str, port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(service))
    server.daemon_threads = True
    return server


def serve(
    settings,
    predictor=None,
    loader: Callable | None = None,
    stop: threading.Event | None = None,
    on_listen: Callable | None = None,
) -> int:
    """Listen, load the model, serve until SIGTERM/SIGINT (or ``stop``). Returns the exit code."""
    from .challenge import EXIT_FAILED, EXIT_OK, load_predictor

    service = InvokeService(settings)
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
        if predictor is not None:
            service.predictor = predictor
        elif not service.load(loader or load_predictor):
            return EXIT_FAILED
        logger.info("model loaded; ready for POST /invoke")
        stop.wait()
        logger.info("stopping the invoke server")
        return EXIT_OK
    finally:
        server.shutdown()
        server.server_close()
