"""The real OCI image, built with buildah and run with podman the way challenge organisers run it.

    --network none, /input read-only, /output writable, /tmp a tmpfs, weights at /opt/ml/model

Needs podman and buildah (``.ci/run`` installs them and sets LSMSEG_CONTAINER_TESTS=1). The image
is built by ``scripts/build_image.sh`` (twice: the default target and the ``invoke`` target, which
shares every layer but the last). Weights are small test weights made here and mounted at
``/opt/ml/model`` (a Grand Challenge model mount), never shipped; the engine test also runs the
image's own weights (``weights/``) against the PyTorch engine outside the container.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lsmseg import io

from ..conftest import REPO, container_tests_enabled, make_weights

pytestmark = pytest.mark.container

TOOLS = ("podman", "buildah")
HAVE_TOOLS = all(shutil.which(tool) for tool in TOOLS)
_ENABLED, _WHY = container_tests_enabled(os.environ.get("LSMSEG_CONTAINER_TESTS"), HAVE_TOOLS)
if not _ENABLED:
    pytest.skip(_WHY, allow_module_level=True)

# LSMSEG_TEST_IMAGE: another tag, so that concurrent runs on one machine do not rebuild each other's images.
IMAGE = os.environ.get("LSMSEG_TEST_IMAGE") or "localhost/lsmseg:test"
INVOKE_IMAGE = f"{IMAGE}-invoke"
SPACING = (2.5, 0.8, 0.8)  # z, y, x in micrometres
SLUG_IN, SLUG_OUT = "light-sheet-3d-microscopy", "isolated-biological-structure"
RUN_TIMEOUT = 600


def sh(*args, timeout=RUN_TIMEOUT, check=False) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def images():
    """Build both targets once per session; report how long it took."""
    timings = {}
    for tag, extra in ((IMAGE, []), (INVOKE_IMAGE, ["--invoke"])):
        start = time.perf_counter()
        sh(REPO / "scripts" / "build_image.sh", "--tag", tag, *extra, timeout=3600, check=True)
        timings[tag] = time.perf_counter() - start
    print(f"\nimage build times: {', '.join(f'{t}: {s:.0f} s' for t, s in timings.items())}")
    return IMAGE, INVOKE_IMAGE


@pytest.fixture(scope="session")
def weights(tmp_path_factory, tiny_model_config, tiny_model) -> Path:
    """Test weights as a Grand Challenge model mount (extracted files)."""
    folder = tmp_path_factory.mktemp("opt-ml-model")
    make_weights(folder, tiny_model_config, tiny_model)
    for item in [folder, *folder.iterdir()]:
        item.chmod(0o755 if item.is_dir() else 0o644)  # readable by the image's non-root user
    return folder


def writable_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)  # the container user (uid 1001) writes here, as on Grand Challenge
    return path


def readable_tree(path: Path) -> Path:
    for item in [path, *path.rglob("*")]:
        item.chmod(0o755 if item.is_dir() else 0o644)
    return path


def podman_run(image, input_dir, output_dir, model_dir=None, *args, output_mode="rw", env=None):
    command = ["podman", "run", "--rm", "--network", "none", "--tmpfs", "/tmp",
               "-v", f"{input_dir}:/input:ro", "-v", f"{output_dir}:/output:{output_mode}"]
    if model_dir:
        command += ["-v", f"{model_dir}:/opt/ml/model:ro"]
    for key, value in (env or {}).items():
        command += ["-e", f"{key}={value}"]
    return sh(*command, image, *args)


def volume(shape, seed):
    return np.random.default_rng(seed).integers(0, 4000, shape).astype(np.uint16)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ERROR")]


def test_image_labels(images):
    default, invoke = images
    label = '{{index .Config.Labels "org.grand-challenge.api-method"}}'
    assert sh("podman", "image", "inspect", "--format", label, invoke, check=True).stdout.strip() == "invoke"
    assert sh("podman", "image", "inspect", "--format", label, default, check=True).stdout.strip() in ("", "<no value>")
    user = sh("podman", "image", "inspect", "--format", "{{.Config.User}}", default, check=True).stdout.strip()
    assert user and not user.startswith(("0", "root")), "runs as a non-root user"


def test_image_holds_the_inference_package_only(images):
    """No training, evaluation or phantom generator in the image: their commands are simply absent."""
    result = sh("podman", "run", "--rm", "--network", "none", "--entrypoint", "lsmseg", images[0], "--help",
                check=True)
    commands = re.findall(r"^    (\w+)\s", result.stdout, flags=re.M)
    assert commands == ["predict", "challenge", "serve"], result.stdout
    probe = sh("podman", "run", "--rm", "--network", "none", "--entrypoint", "python3", images[0], "-c",
               "import importlib.util as u; print([m for m in ('lsmseg.synth', 'lsmseg_training', "
               "'lsmseg_evaluation') if u.find_spec(m)])", check=True)
    assert probe.stdout.strip() == "[]"


def test_folder_mode_two_formats_and_one_bad_file(images, weights, tmp_path):
    src = readable_tree(writable_dir(tmp_path / "in"))
    shapes = {"a.tif": (12, 70, 66), "b.nii.gz": (20, 48, 52), "c.mha": (7, 40, 40)}
    for name, shape in shapes.items():
        io.write_volume(volume(shape, len(name)), src / name, spacing=SPACING)
    (src / "broken.tif").write_bytes(b"II*\x00" + b"\x17" * 200)
    readable_tree(src)
    out = writable_dir(tmp_path / "out")

    result = podman_run(images[0], src, out, weights)

    assert result.returncode == 1, result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and errors[0].startswith("ERROR: /input/broken.tif: "), result.stderr
    masks = sorted(p.name for p in out.iterdir() if not p.name.endswith(".provenance.json"))
    assert masks == sorted(shapes), "a mask for every good volume, none for the bad one, nothing partial"
    for name, shape in shapes.items():
        mask = io.read_volume(out / name)
        assert mask.shape == shape and mask.dtype == np.uint8
        assert set(np.unique(mask.load())) <= {0, 1}
        np.testing.assert_allclose(mask.spacing, SPACING, rtol=1e-4)
        provenance = json.loads((out / f"{name}.provenance.json").read_text())
        assert provenance["input"] == f"/input/{name}" and provenance["weights"]["sha256"]


def test_exec_mode(images, weights, tmp_path):
    case = tmp_path / "in" / "images" / SLUG_IN
    case.mkdir(parents=True)
    image = volume((14, 64, 60), 3)
    io.write_volume(image, case / "brain_01.tif", spacing=SPACING)
    readable_tree(tmp_path / "in")
    out = writable_dir(tmp_path / "out")

    result = podman_run(images[0], tmp_path / "in", out, weights)  # exec mode is chosen automatically

    assert result.returncode == 0, result.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        f"images/{SLUG_OUT}/output.mha"
    ]
    mask = sitk.ReadImage(str(out / "images" / SLUG_OUT / "output.mha"))
    assert mask.GetSize() == image.shape[::-1] and mask.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(mask.GetSpacing(), SPACING[::-1], rtol=1e-4)
    assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}


def test_invoke_mode_health_invoke_output(images, weights, tmp_path):
    # Weights as an uploaded model tarball, which the container extracts to /tmp.
    model = tmp_path / "model"
    model.mkdir()
    with tarfile.open(model / "model.tar.gz", "w:gz") as tar:
        for item in weights.iterdir():
            tar.add(item, arcname=item.name)
    readable_tree(model)
    staging = tmp_path / "staging"
    case = staging / "images" / SLUG_IN
    case.mkdir(parents=True)
    image = volume((9, 50, 44), 4)
    io.write_volume(image, case / "f3c2-uuid.mha", spacing=SPACING)
    (staging / "inputs.json").write_text(json.dumps([{
        "socket": {"slug": SLUG_IN, "relative_path": f"images/{SLUG_IN}", "is_image_kind": True},
        "file": None, "image": {"name": "cell_nuclei_2301.mha"}, "value": None,
    }]))
    readable_tree(staging)
    out = writable_dir(tmp_path / "out")
    name = f"lsmseg-invoke-{uuid.uuid4().hex[:8]}"
    sh("podman", "run", "--detach", "--name", name, "--network", "none", "--tmpfs", "/tmp",
       "-v", f"{staging}:/input:ro", "-v", f"{out}:/output", "-v", f"{model}:/opt/ml/model:ro",
       images[1], check=True)

    def call(method: str, path: str) -> tuple[int, dict]:
        # --network none: the port is reachable only from inside the container's own namespace.
        script = (
            "import json, sys, urllib.request, urllib.error\n"
            f"req = urllib.request.Request('http://127.0.0.1:4743{path}', method='{method}', "
            f"data=b'' if '{method}' == 'POST' else None)\n"
            "try:\n"
            "    r = urllib.request.urlopen(req, timeout=300); print(r.status, r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code, e.read().decode())\n"
            "except OSError as e:\n"
            "    print(0, json.dumps({'error': str(e)}))\n"
        )
        result = sh("podman", "exec", name, "python", "-c", script)
        if result.returncode != 0:
            return -1, {"error": result.stderr}
        status, _, body = result.stdout.strip().partition(" ")
        return int(status), json.loads(body or "{}")

    try:
        for _ in range(120):
            status, _ = call("GET", "/health")
            if status == 200:
                break
            time.sleep(1)
        assert status == 200, sh("podman", "logs", name).stderr

        status, body = call("POST", "/invoke")
        assert status == 201, (body, sh("podman", "logs", name).stderr)
        mask = sitk.ReadImage(str(out / "images" / SLUG_OUT / "output.mha"))
        assert mask.GetSize() == image.shape[::-1] and mask.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_allclose(mask.GetSpacing(), SPACING[::-1], rtol=1e-4)
        assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}

        # The next case is broken: a clear error status and message, and the server keeps serving.
        (case / "f3c2-uuid.mha").write_bytes(b"ObjectType = Image\nNDims = 3\n")
        status, body = call("POST", "/invoke")
        assert status == 422 and "/input/images/" in body["error"], body
        assert call("GET", "/health")[0] == 200
    finally:
        stopped = sh("podman", "stop", "--time", "20", name)
        code = sh("podman", "inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        logs = sh("podman", "logs", name).stderr
        sh("podman", "rm", "--force", name)
    assert stopped.returncode == 0 and code == "0", logs  # SIGTERM is a clean shutdown
    assert "ERROR: /input/images/" in logs


def test_threads_follow_a_cpu_limit(images, weights, tmp_path):
    # --cpus 1 on a host of 2 or more cores: PyTorch (and every engine's default after it) counted
    # the host's cores and ran that many threads under a quota of one CPU.
    src = readable_tree(writable_dir(tmp_path / "in"))
    io.write_volume(volume((8, 40, 40), 1), src / "a.tif", spacing=SPACING)
    readable_tree(src)
    out = writable_dir(tmp_path / "out")
    result = sh("podman", "run", "--rm", "--network", "none", "--tmpfs", "/tmp", "--cpus", "1",
                "-v", f"{src}:/input:ro", "-v", f"{out}:/output", "-v", f"{weights}:/opt/ml/model:ro", images[0])
    if result.returncode == 125 and "cpu" in result.stderr.lower():
        pytest.skip(f"podman cannot set a CPU limit here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    threads = json.loads((out / "a.tif.provenance.json").read_text())["versions"]["threads"]
    assert threads == 1


def test_empty_input_unwritable_output_and_bad_weights(images, weights, tmp_path):
    empty = readable_tree(writable_dir(tmp_path / "empty"))
    out = writable_dir(tmp_path / "out")
    result = podman_run(images[0], empty, out, weights)
    assert result.returncode == 0 and "no volumes found" in result.stderr, result.stderr

    src = tmp_path / "in"
    src.mkdir()
    io.write_volume(volume((8, 40, 40), 5), src / "x.tif")
    readable_tree(src)
    result = podman_run(images[0], src, out, weights, output_mode="ro")
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert line.startswith("ERROR: /output: output folder is not writable"), result.stderr

    tampered = tmp_path / "tampered"
    shutil.copytree(weights, tampered)
    with open(tampered / "general.safetensors", "r+b") as handle:
        handle.seek(200)
        handle.write(b"\x01\x02\x03")
    readable_tree(tampered)
    result = podman_run(images[0], src, out, tampered)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert "/opt/ml/model/general.safetensors: checksum mismatch" in line
    assert not (out / "x.tif").exists()

    if not (REPO / "weights" / "manifest.yaml").is_file():  # the image carries no weights of its own
        result = podman_run(images[0], src, out)
        assert result.returncode == 1
        [line] = error_lines(result.stderr)
        assert "no trained weights are installed" in line


# A 32x96x96 crop of the bundled vessel sample with 18,931 labelled voxels: 4 windows of 32x64x64.
SAMPLE = REPO / "sample" / "images" / "vessels_0.tif"
SAMPLE_CROP = (slice(0, 32), slice(32, 128), slice(32, 128))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def torch_mask_outside(manifest: Path, image: Path, out: Path) -> np.ndarray:
    """The mask the PyTorch engine gives outside the container, with the same weights and settings."""
    from lsmseg.inference import Predictor, RunOptions, predict_file

    predictor = Predictor.from_manifest(manifest, device="cpu", engine="torch", options=RunOptions(progress=False))
    record = predict_file(predictor, image, out / image.name, provenance_path=out / "torch.provenance.json").record
    assert record["parameters"]["engine"] == "torch"
    return io.read_volume(out / image.name).load()


def sample_crop(folder: Path) -> Path:
    sample = io.read_volume(SAMPLE)
    path = folder / "vessels_crop.tif"
    io.write_volume(np.ascontiguousarray(sample.load()[SAMPLE_CROP]), path, spacing=sample.spacing)
    readable_tree(folder)
    return path


@pytest.mark.skipif(not (REPO / "weights" / "manifest.yaml").is_file(), reason="the image carries no weights")
def test_bundled_weights_run_openvino_from_the_prefilled_cache(images, tmp_path):
    """The image's own weights: OpenVINO on CPU from the ONNX cache filled at build time (no export at
    run time), and the masks of the PyTorch engine outside the container."""
    from lsmseg.weights import load_manifest

    manifest = REPO / "weights" / "manifest.yaml"
    [entry] = load_manifest(manifest).models.values()
    image = sample_crop(writable_dir(tmp_path / "in"))
    out = writable_dir(tmp_path / "out")

    result = podman_run(images[0], tmp_path / "in", out)  # no /opt/ml/model: the bundled weights

    assert result.returncode == 0, result.stderr
    assert "exporting" not in result.stderr and "not writable" not in result.stderr, result.stderr
    provenance = json.loads((out / f"{image.name}.provenance.json").read_text())
    assert provenance["weights"]["sha256"] == entry.sha256
    assert provenance["parameters"]["engine"] == "openvino"
    window = "x".join(map(str, entry.model.roi))
    assert provenance["parameters"]["onnx_models"] == [{
        "window": list(entry.model.roi), "exported": False, "cached": True,
        "file": f"/opt/lsmseg/onnx-cache/onnx/{entry.sha256[:16]}_{window}_v1.onnx",
    }], "a cache hit in the image's read-only cache"

    ours = io.read_volume(out / image.name).load()
    expected = torch_mask_outside(manifest, image, writable_dir(tmp_path / "torch"))
    agreement = float((ours == expected).mean())
    print(f"\nbundled weights, {image.name} {ours.shape}: container (openvino) vs torch outside: Dice "
          f"{dice(ours, expected):.5f}, voxel agreement {agreement:.6f}, {int(expected.sum())} foreground voxels")
    assert expected.sum() > 1000, "the crop holds vessels"
    assert dice(ours, expected) >= 0.99 and agreement >= 0.999


def test_mounted_weights_export_to_tmp_once(images, weights, tmp_path):
    """Weights at /opt/ml/model (another checksum than the image's): the read-only cache does not hold
    them, so the network is exported to /tmp for the process, with one warning line; masks as PyTorch's."""
    image = sample_crop(writable_dir(tmp_path / "in"))
    io.write_volume(volume((20, 40, 40), 6), tmp_path / "in" / "second.tif", spacing=SPACING)
    readable_tree(tmp_path / "in")
    out = writable_dir(tmp_path / "out")

    result = podman_run(images[0], tmp_path / "in", out, weights)

    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "not writable" in warnings[0] and "/tmp/lsmseg-onnx-" in warnings[0], result.stderr
    for name in (image.name, "second.tif"):  # one export for the process, reused by the second volume
        provenance = json.loads((out / f"{name}.provenance.json").read_text())
        assert provenance["parameters"]["engine"] == "openvino"
        [model] = provenance["parameters"]["onnx_models"]
        assert model["exported"] and not model["cached"] and model["file"].startswith("/tmp/lsmseg-onnx-")

    ours = io.read_volume(out / image.name).load()
    expected = torch_mask_outside(weights / "manifest.yaml", image, writable_dir(tmp_path / "torch"))
    agreement = float((ours == expected).mean())
    print(f"\nmounted test weights, {image.name}: container (openvino) vs torch outside: "
          f"Dice {dice(ours, expected):.5f}, voxel agreement {agreement:.6f}")
    assert agreement >= 0.999 and (expected.sum() < 100 or dice(ours, expected) >= 0.99)


@pytest.mark.skipif(not (REPO / "weights" / "manifest.yaml").is_file(), reason="the image carries no weights")
def test_read_only_root_any_uid_writes_nothing_but_output(images, tmp_path):
    """As organisers may run it: --read-only, a tmpfs /tmp, an arbitrary uid:gid, --network none. The
    good volume is written beside a bad one, with no warning (OpenVINO's telemetry, imported with
    openvino, warned three times that it cannot write the home folder); an output folder that uid
    cannot write is one line and exit 1; with a writable root, nothing is written outside /output
    (the telemetry wrote a client id and usage stats to /home/user/intel and sent an event)."""
    src = writable_dir(tmp_path / "in")
    io.write_volume(volume((12, 70, 66), 7), src / "good.tif", spacing=SPACING)
    (src / "bad.tif").write_bytes(b"II*\x00" + b"\x17" * 200)
    readable_tree(src)
    out = writable_dir(tmp_path / "out")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)  # root's, not writable by the uid below
    any_uid = ["--read-only", "--tmpfs", "/tmp", "--user", "12345:54321"]

    result = sh("podman", "run", "--rm", "--network", "none", *any_uid, "-v", f"{src}:/input:ro",
                "-v", f"{out}:/output", images[0])
    assert result.returncode == 1, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith(("ERROR", "WARNING"))] == [
        error_lines(result.stderr)[0], "WARNING: 1 of 2 volume(s) failed; no mask was written for them"
    ] and error_lines(result.stderr)[0].startswith("ERROR: /input/bad.tif: "), result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["good.tif", "good.tif.provenance.json"]

    result = sh("podman", "run", "--rm", "--network", "none", *any_uid, "-v", f"{src}:/input:ro",
                "-v", f"{locked}:/output", images[0])
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert line.startswith("ERROR: /output: output folder is not writable") and "uid 12345" in line, result.stderr
    assert not list(locked.iterdir())

    name = f"lsmseg-diff-{uuid.uuid4().hex[:8]}"
    try:
        result = sh("podman", "run", "--name", name, "--network", "none", "--tmpfs", "/tmp",
                    "-v", f"{src}:/input:ro", "-v", f"{writable_dir(tmp_path / 'out2')}:/output", images[0])
        assert result.returncode == 1, result.stderr
        changed = sh("podman", "diff", name, check=True).stdout.split()
    finally:
        sh("podman", "rm", "--force", name)
    # podman itself writes /etc (hosts, resolv.conf); lsmseg writes nowhere in the image.
    assert [path for path in changed[1::2] if not path.startswith("/etc")] == [], changed


def test_image_metadata_and_no_package_cache(images):
    """The version label is the package's; apt's downloaded .deb files are not kept in the image (a base
    without Debian's docker-clean hook, such as the debootstrap one, kept ~90 MB of them)."""
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), flags=re.MULTILINE).group(1)
    for image in images:
        label = '{{index .Config.Labels "org.opencontainers.image.version"}}'
        assert sh("podman", "image", "inspect", "--format", label, image, check=True).stdout.strip() == version
    probe = sh("podman", "run", "--rm", "--network", "none", "--entrypoint", "sh", images[0], "-c",
               "ls /var/cache/apt/archives | grep -c '[.]deb$'; ls -d /opt/lsmseg/*.egg-info 2>/dev/null; "
               "python3 -c 'import importlib.util as u; print(u.find_spec(\"openvino_telemetry\"))'")
    assert probe.stdout.split() == ["0", "None"], probe.stdout


def test_bench_container_reports_a_failed_run_and_cleans_up(tmp_path):
    """benchmarks/bench_container.sh: a run that fails stops the benchmark with a message naming it and
    removes its work folder (it exited 125 silently and left the folder, the sample copy in it)."""
    before = set(Path("/tmp").glob("lsmseg-bench-container.*"))
    missing = f"localhost/lsmseg-missing-{uuid.uuid4().hex[:8]}:none"
    result = sh(REPO / "benchmarks" / "bench_container.sh", missing, missing)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert f"run before1 of {missing} failed" in result.stderr, result.stderr
    assert set(Path("/tmp").glob("lsmseg-bench-container.*")) == before
