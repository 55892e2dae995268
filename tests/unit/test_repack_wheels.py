"""scripts/repack_wheels.py: a wheel recompressed with LZMA is smaller and pip installs it as the original."""

import base64
import hashlib
import random
import subprocess
import sys
import zipfile

import pytest

from ..conftest import load_script


@pytest.fixture(scope="module")
def repack():
    return load_script("repack_wheels")


def make_wheel(folder):
    """A small valid wheel (deflated, as pip and build write them) of a package `tinypkg`."""
    files = {
        # Text that repeats at long range, as code does: LZMA's window sees it, deflate's 32 KiB do not.
        "tinypkg/__init__.py": "VALUE = 7\n" + "".join(f"# {random.Random(i % 300).getrandbits(400):x}\n" for i in range(3000)),
        "tinypkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n",
        "tinypkg-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files["tinypkg-1.0.dist-info/RECORD"] = "\n".join(record + ["tinypkg-1.0.dist-info/RECORD,,"]) + "\n"
    path = folder / "tinypkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path, files


def test_repacked_wheel_is_lzma_holds_the_same_files_and_installs(repack, tmp_path):
    wheel, files = make_wheel(tmp_path)
    wheel.chmod(0o644)
    before, after = repack.repack(wheel)
    assert wheel.stat().st_mode & 0o777 == 0o644
    assert after == wheel.stat().st_size < before
    with zipfile.ZipFile(wheel) as archive:
        assert {i.filename: i.compress_type for i in archive.infolist()} == dict.fromkeys(files, zipfile.ZIP_LZMA)
        assert {name: archive.read(name).decode() for name in files} == files
    assert repack.repack(wheel) == (after, after)  # already LZMA: left as it is
    assert [p.name for p in tmp_path.iterdir()] == [wheel.name]  # no temporary file left

    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                              "--target", str(target), str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    value = subprocess.run([sys.executable, "-c", "import tinypkg; print(tinypkg.VALUE)"], capture_output=True,
                           text=True, env={"PYTHONPATH": str(target)})
    assert value.stdout.strip() == "7", value.stderr


def test_a_broken_wheel_is_reported_and_left_alone(repack, tmp_path):
    wheel, _ = make_wheel(tmp_path)
    wheel.write_bytes(wheel.read_bytes()[:-40])  # cut short: the zip directory is gone
    original = wheel.read_bytes()
    assert repack.main([str(tmp_path)]) == 1
    assert wheel.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == [wheel.name]
    assert repack.main([str(tmp_path / "missing.whl")]) == 2
