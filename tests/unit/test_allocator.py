"""lsmseg.allocator: glibc's mmap threshold fixed by the `lsmseg` command, unless the user chose one."""

import os
import subprocess
import sys

import pytest

CHECK = "from lsmseg.allocator import map_large_buffers; print(map_large_buffers())"


def run(env_extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES", "LSMSEG_MMAP_THRESHOLD")} | env_extra
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_threshold_set_on_glibc_unless_the_environment_says_otherwise():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert run({}) == "True"
    assert run({"LSMSEG_MMAP_THRESHOLD": "4194304"}) == "True"
    assert run({"LSMSEG_MMAP_THRESHOLD": "0"}) == "False"  # malloc as glibc sets it
    assert run({"MALLOC_MMAP_THRESHOLD_": "65536"}) == "False"  # the user's own glibc settings win
    assert run({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}) == "False"


@pytest.mark.parametrize("engine, device, called", [("openvino", "cpu", True), ("onnxruntime", "cpu", True),
                                                     ("torch", "cuda", True), ("torch", "cpu", False)])
def test_set_for_every_engine_but_pytorch_on_the_cpu(monkeypatch, engine, device, called):
    import types

    import torch

    from lsmseg import allocator

    calls = []
    monkeypatch.setattr(allocator, "map_large_buffers", lambda: calls.append(True) or True)
    predictor = types.SimpleNamespace(engine=engine, device=torch.device(device))
    assert allocator.map_large_buffers_for(predictor) is called
    assert calls == ([True] if called else [])


def test_predict_and_the_challenge_loader_set_it_once_the_model_is_loaded(monkeypatch, tmp_path, tiny_weights):
    from lsmseg import cli
    from lsmseg.challenge import settings as challenge_settings

    seen = []
    monkeypatch.setattr(cli, "map_large_buffers_for", lambda predictor: seen.append(("predict", predictor.engine)))
    import numpy as np

    from lsmseg import io

    io.write_volume(np.zeros((6, 24, 24), np.uint16), tmp_path / "in" / "a.tif")
    assert cli.main(["predict", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights",
                     str(tiny_weights), "-q"]) == 0
    import lsmseg.allocator

    monkeypatch.setattr(lsmseg.allocator, "map_large_buffers_for", lambda predictor: seen.append(("challenge", predictor.engine)))
    settings = challenge_settings.ChallengeSettings(input_dir=tmp_path, output_dir=tmp_path / "o", weights=tiny_weights)
    challenge_settings.load_predictor(settings)
    assert [where for where, _ in seen] == ["predict", "challenge"]
