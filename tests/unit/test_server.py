"""The invoke HTTP server, in process on an ephemeral port of 127.0.0.1."""

import json
import queue
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import SimpleITK as sitk

from lsmseg import io
from lsmseg.challenge.invoke import handle_invocation
from lsmseg.challenge.server import InvokeService, make_server, serve
from lsmseg.config import InferenceSettings
from lsmseg.errors import EXIT_FAILED, EXIT_OK, InputError, OutputError, WeightsError
from lsmseg.inference import Predictor, RunOptions

from .test_challenge import SELMA3D_2026_INPUTS, settings_for


def request(base: str, method: str, path: str, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(base + path, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture
def running():
    """Start a server around an InvokeService; yields (service, base URL)."""
    servers = []

    def start(service: InvokeService) -> str:
        server = make_server(service, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_health_before_and_after_loading_and_invoke_errors_keep_serving(tmp_path, running):
    outcomes = iter([InputError(tmp_path / "x.tif", "corrupt"), OutputError(tmp_path, "disk full"),
                     RuntimeError("boom"), {"output": "/output/images/s/output.mha"}])

    def fake_invoke(predictor, settings):
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    service = InvokeService(settings_for(tmp_path), invoke=fake_invoke)
    base = running(service)
    assert request(base, "GET", "/health") == (503, {"status": "loading"})
    status, body = request(base, "POST", "/invoke")
    assert status == 503 and "loading" in body["error"]

    service.predictor = object()  # loaded
    assert request(base, "GET", "/health") == (200, {"status": "ready"})
    status, body = request(base, "POST", "/invoke")
    assert status == 422 and body["error"] == f"{tmp_path / 'x.tif'}: corrupt"
    status, body = request(base, "POST", "/invoke")
    assert status == 500 and "disk full" in body["error"]
    status, body = request(base, "POST", "/invoke")
    assert status == 500 and body["error"] == "unexpected RuntimeError: boom"
    status, body = request(base, "POST", "/invoke")
    assert status == 201 and body["output"] == "/output/images/s/output.mha"
    assert request(base, "GET", "/health")[0] == 200  # still serving after every kind of error
    assert request(base, "GET", "/nope")[0] == 404
    assert request(base, "POST", "/health")[0] == 404


def test_one_invocation_at_a_time(tmp_path, running):
    entered, release = threading.Event(), threading.Event()

    def slow_invoke(predictor, settings):
        entered.set()
        release.wait(30)
        return {"output": "done"}

    service = InvokeService(settings_for(tmp_path), invoke=slow_invoke)
    service.predictor = object()
    base = running(service)
    first = {}
    worker = threading.Thread(target=lambda: first.update(result=request(base, "POST", "/invoke")))
    worker.start()
    assert entered.wait(30)
    assert request(base, "POST", "/invoke")[0] == 409
    assert request(base, "GET", "/health")[0] == 200  # health answers while an invocation runs
    release.set()
    worker.join(30)
    assert first["result"][0] == 201


def test_serve_end_to_end_with_a_real_predictor(tmp_path, tiny_model, tiny_model_config):
    predictor = Predictor(tiny_model, tiny_model_config, InferenceSettings(), device="cpu", options=RunOptions(progress=False))
    settings = settings_for(tmp_path, host="127.0.0.1", port=0)
    folder = tmp_path / "in" / "images" / "light-sheet-3d-microscopy"
    folder.mkdir(parents=True)
    image = np.random.default_rng(0).integers(0, 4000, (9, 40, 36)).astype(np.uint16)
    io.write_volume(image, folder / "case.mha", spacing=(3.0, 0.5, 0.5))
    (tmp_path / "in" / "inputs.json").write_text(json.dumps(SELMA3D_2026_INPUTS))

    stop, listening, codes = threading.Event(), {}, []
    ready = threading.Event()

    def on_listen(address, service):
        listening["base"] = f"http://{address[0]}:{address[1]}"
        ready.set()

    thread = threading.Thread(
        target=lambda: codes.append(serve(settings, invoke=handle_invocation, loader=lambda s: predictor, stop=stop,
                                           on_listen=on_listen))
    )
    thread.start()
    try:
        assert ready.wait(30)
        base = listening["base"]
        for _ in range(100):  # the model loads in the background
            if request(base, "GET", "/health")[0] == 200:
                break
            threading.Event().wait(0.05)
        status, body = request(base, "POST", "/invoke")
        assert status == 201, body
        mask = sitk.ReadImage(body["output"])
        assert mask.GetSize() == (36, 40, 9) and mask.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_allclose(mask.GetSpacing(), (0.5, 0.5, 3.0))
        assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}

        (folder / "case.mha").write_bytes(b"not an image")  # the next case is broken
        status, body = request(base, "POST", "/invoke")
        assert status == 422 and str(folder / "case.mha") in body["error"]
        (tmp_path / "in" / "inputs.json").unlink()
        status, body = request(base, "POST", "/invoke")
        assert status == 422 and "inputs.json" in body["error"]
        assert request(base, "GET", "/health")[0] == 200
    finally:
        stop.set()
        thread.join(30)
    assert codes == [EXIT_OK]


def test_serve_exits_one_when_weights_cannot_load(tmp_path, caplog):
    def failing_loader(settings):
        raise WeightsError("/opt/ml/model/general.safetensors: checksum mismatch")

    code = serve(settings_for(tmp_path, host="127.0.0.1", port=0), invoke=handle_invocation, loader=failing_loader,
                 failed_linger_s=0)
    assert code == EXIT_FAILED
    assert "checksum mismatch" in caplog.text


def test_serve_reports_a_busy_port(tmp_path, caplog):
    blocker = make_server(InvokeService(settings_for(tmp_path), handle_invocation), "127.0.0.1", 0)
    try:
        port = blocker.server_address[1]
        assert serve(settings_for(tmp_path, host="127.0.0.1", port=port), invoke=handle_invocation,
                     loader=lambda s: object()) == EXIT_FAILED
        assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
    finally:
        blocker.server_close()


SERVER_STOPPED_MID_INVOCATION = """
import sys, torch
from lsmseg.challenge.server import serve
from lsmseg.challenge.settings import ChallengeSettings

def invoke(predictor, settings):  # a case that is still predicting when SIGTERM arrives
    print("running", flush=True)
    x = torch.randn(128, 128)
    while True:
        x = torch.tanh(x @ x)

sys.exit(serve(ChallengeSettings(host="127.0.0.1", port=0), invoke=invoke, predictor=object(),
               on_listen=lambda address, service: print(address[1], flush=True)))
"""


def test_a_given_predictor_is_ready_when_the_server_listens():
    # It was set after on_listen: a request sent as soon as the port was known could get 503
    # ("loading"), which hung the SIGTERM test below on a busy machine.
    stop, seen = threading.Event(), {}

    def on_listen(address, service):
        seen["health"] = service.health()
        stop.set()

    from lsmseg.challenge.settings import ChallengeSettings

    assert serve(ChallengeSettings(host="127.0.0.1", port=0), invoke=lambda p, s: {}, predictor=object(),
                 stop=stop, on_listen=on_listen) == EXIT_OK
    assert seen["health"][0] == 200, seen


def test_stopping_waits_for_the_reply_of_an_invocation_that_has_ended():
    # The process exited once the invocation's lock was free, before its handler wrote the reply:
    # on a busy machine the client of a cancelled (or just finished) case got no answer at all.
    import time

    service = InvokeService(None, invoke=lambda p, s: {})
    replied = threading.Event()

    def handler():
        with service.answering():
            time.sleep(0.5)  # the reply being written
            replied.set()

    thread = threading.Thread(target=handler)
    thread.start()
    time.sleep(0.1)
    assert service.cancel(wait_s=0.05) is False and not replied.is_set()
    assert service.cancel(wait_s=10) is True and replied.is_set()
    thread.join()
    # A request that was still sending its body when the server stopped starts no case.
    service.predictor = object()
    assert service.run_invocation()[0] == 503


def test_sigterm_during_an_invocation_cancels_it_and_exits_zero(tmp_path):
    """docker stop while a case runs: the process exited with the invocation's thread inside torch
    and aborted (exit code 134, 'terminate called without an active exception'); now the case is
    cancelled (503 to its client), and the server exits 0 as documented."""
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-c", SERVER_STOPPED_MID_INVOCATION], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    lines = queue.Queue()  # stdout read by a thread: a line that never comes fails the test, not hangs it
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        port = int(lines.get(timeout=60))
        answer = {}
        client = threading.Thread(target=lambda: answer.update(
            result=request(f"http://127.0.0.1:{port}", "POST", "/invoke", timeout=60)))
        client.start()
        assert lines.get(timeout=60).strip() == "running", answer
        time.sleep(0.2)  # inside torch
        process.send_signal(signal.SIGTERM)
        stderr = process.stderr.read() if process.wait(timeout=60) is not None else ""
        client.join(60)
    finally:
        process.kill()
    assert process.returncode == EXIT_OK, stderr
    assert "terminate called" not in stderr
    status, body = answer["result"]
    assert status == 503 and "cancelled" in body["error"]
