"""scripts/gpu_pack_data.py: the packed copy of an image normalises as the original does, tail included;
the pack replaces only a previous pack, never the data, and a failed run keeps it. scripts/gpu_weights.py:
one-line errors, and a joined weights folder holding only what ``--weights`` reads."""

import dataclasses

import numpy as np
import pytest

from ..conftest import REPO, load_script
from lsmseg.io import write_volume
from lsmseg.normalise import normalise, percentiles


@pytest.fixture(scope="module")
def pack():
    return load_script("gpu_pack_data")


def bright_tailed(seed=0):
    """uint16 haze with a few objects far above the 99.5th percentile (a light-sheet patch's shape)."""
    rng = np.random.default_rng(seed)
    image = rng.gamma(4.0, 100.0, size=(20, 40, 40))
    image[5:8, 10:14, 10:14] = 20000 + rng.normal(0, 2000, size=(3, 4, 4))
    return np.clip(image, 0, 65535).astype(np.uint16)


@pytest.mark.parametrize("upper_tail", ["clip", "log"])
def test_the_packed_copy_normalises_as_the_original(pack, upper_tail):
    image = bright_tailed()
    stored, record = pack.as_stored(image, 0.5, 99.5, upper_tail)
    assert stored.dtype == (np.uint8 if upper_tail == "clip" else np.uint16)
    lo, hi = percentiles(image)
    expected = normalise(image, lo, hi, upper_tail=upper_tail)
    got = normalise(stored, *percentiles(stored), upper_tail=upper_tail)
    # Half a step of 255 over the percentile range, plus the copy's own percentiles being rounded
    error = float(np.abs(got - expected).max())
    assert error <= 1 / 400
    assert record["quantised"] and record["max_normalised_error"] == pytest.approx(error, abs=1e-6)


def test_the_log_tail_survives_packing(pack):
    image = bright_tailed()
    stored, _ = pack.as_stored(image, 0.5, 99.5, "log")
    got = normalise(stored, *percentiles(stored), upper_tail="log")
    # The objects (~50x the upper percentile) stay far above the haze's ceiling of 1.
    assert got[5:8, 10:14, 10:14].min() > 3.0
    assert got.max() > 1 + np.log(20.0)


def test_uint8_images_are_packed_as_they_are(pack):
    image = (bright_tailed() // 256).astype(np.uint8)
    for upper_tail in ("clip", "log"):
        stored, record = pack.as_stored(image, 0.5, 99.5, upper_tail)
        assert stored is image and not record["quantised"]


# --- the pack folder: what --out may replace, and a failure midway ---------------------------------------------

TINY_CONFIG = """name: tiny
output: runs/tiny
data:
  train:
    - {images: $LSMSEG_DATA/cells/images, labels: $LSMSEG_DATA/cells/labels, structure: cfos_neuron, include: [a]}
  validation:
    - {images: $LSMSEG_DATA/cells/images, labels: $LSMSEG_DATA/cells/labels, structure: cfos_neuron, include: [b]}
"""


@pytest.fixture
def tiny(tmp_path):
    """A data root of two small labelled volumes (one per split) and a config packing them."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for name in "ab":
        write_volume(rng.integers(0, 4000, (8, 16, 16)).astype(np.uint16), data / "cells" / "images" / f"{name}.tif")
        write_volume((rng.random((8, 16, 16)) > 0.8).astype(np.uint8), data / "cells" / "labels" / f"{name}.tif")
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    return {"data": data, "config": config}


def contents(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_pack(pack, tiny, out, *extra):
    return pack.main(["--config", str(tiny["config"]), "--data", str(tiny["data"]), "--out", str(out), "--max-mb", "1",
                      *extra])


def test_a_folder_that_is_not_a_pack_is_never_replaced(pack, tiny, tmp_path, capsys):
    out = tmp_path / "mydata"
    (out / "vesselnn" / "images").mkdir(parents=True)
    (out / "vesselnn" / "images" / "keep.txt").write_text("mine")
    assert run_pack(pack, tiny, out, "--stand-in") == 2
    assert (out / "vesselnn" / "images" / "keep.txt").read_text() == "mine"
    err = capsys.readouterr().err
    assert err.startswith("gpu_pack_data: --out ") and "no pack.json" in err and err.count("\n") == 1


@pytest.mark.parametrize("where", ["data", "data/cells/images", "data/cells/pack", "."])
def test_an_out_touching_the_data_is_refused(pack, tiny, tmp_path, capsys, where):
    before = contents(tiny["data"])
    assert run_pack(pack, tiny, tmp_path / where) == 2
    assert contents(tiny["data"]) == before and not (tmp_path / "data" / "cells" / "pack").exists()
    err = capsys.readouterr().err
    assert err.startswith("gpu_pack_data: --out ") and "apart from the data" in err and err.count("\n") == 1


@pytest.mark.parametrize("where", ["work", "work/repo"])
def test_an_out_holding_the_repository_is_refused(pack, tiny, tmp_path, capsys, monkeypatch, where):
    repo = tmp_path / "work" / "repo"  # a stand-in: the real checkout is never put at risk here
    repo.mkdir(parents=True)
    (repo / "README.md").write_text("code")
    monkeypatch.setattr(pack, "REPO", repo)
    assert run_pack(pack, tiny, tmp_path / where, "--stand-in") == 2
    assert (repo / "README.md").read_text() == "code"
    assert "the repository" in capsys.readouterr().err


def test_a_previous_pack_or_an_empty_folder_is_replaced(pack, tiny, tmp_path):
    out = tmp_path / "pack"
    out.mkdir()
    assert run_pack(pack, tiny, out) == 0
    (out / "train" / "stale.tif").write_bytes(b"old")
    assert run_pack(pack, tiny, out) == 0
    assert (out / "pack.json").is_file() and not (out / "train" / "stale.tif").exists()
    assert sorted(p.name for p in (out / "validation" / "cfos_neuron" / "labels").iterdir()) == ["b.tif"]


def test_a_failed_run_keeps_the_previous_pack(pack, tiny, tmp_path, capsys):
    out = tmp_path / "pack"
    assert run_pack(pack, tiny, out) == 0
    before = contents(out)
    label = tiny["data"] / "cells" / "labels" / "b.tif"  # the validation label, read after the training volume
    label.write_bytes(label.read_bytes()[:100])
    capsys.readouterr()
    assert run_pack(pack, tiny, out) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"gpu_pack_data: {label}: cannot read TIFF") and err.count("\n") == 1
    assert contents(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "pack", "tiny.yaml"]  # no partial pack left


# --- scripts/gpu_weights.py ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_weights():
    return load_script("gpu_weights")


@pytest.fixture
def export(tmp_path):
    """An export of one small model (the shipped manifest's entry, tiny tensors: split and join never build it)."""
    import torch

    from lsmseg.weights import Manifest, load_manifest, save_weights, write_manifest

    folder = tmp_path / "export"
    state = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(0)), "n": torch.arange(5)}
    sha = save_weights(state, folder / "tiny.safetensors")
    entry = dataclasses.replace(load_manifest(REPO / "weights").entry_for(None)[1], file="tiny.safetensors", sha256=sha)
    write_manifest(Manifest(models={"tiny": entry}, default="tiny"), folder / "manifest.yaml")
    return folder, state


def test_join_restores_fp32_and_leaves_no_fp16_file(gpu_weights, export, tmp_path):
    from lsmseg.weights import load_manifest, load_state_dict

    folder, state = export
    index = gpu_weights.split(folder, tmp_path / "parts", "gpu_tiny", 0.004)  # 8 KiB of fp16: 2 parts
    assert len(list((tmp_path / "parts").glob("gpu_tiny.fp16.safetensors.part*"))) == 2
    manifest_path = gpu_weights.join(index, tmp_path / "joined")
    # What --weights reads and nothing else: the fp16 file was only a step.
    assert sorted(p.name for p in (tmp_path / "joined").iterdir()) == ["manifest.yaml", "tiny.safetensors"]
    manifest = load_manifest(manifest_path)
    _, entry = manifest.entry_for(None)
    restored = load_state_dict(manifest.checkpoint_path(entry), entry.sha256)
    assert restored["w"].dtype == state["w"].dtype and bool((restored["w"] == state["w"].half().float()).all())


def test_join_with_a_part_missing_is_one_line(gpu_weights, export, tmp_path, capsys):
    folder, _ = export
    assert gpu_weights.main(["split", str(folder), str(tmp_path / "parts"), "--name", "gpu_tiny", "--part-mb", "0.004"]) == 0
    (tmp_path / "parts" / "gpu_tiny.fp16.safetensors.part1").unlink()
    with pytest.raises(SystemExit) as failed:
        gpu_weights.main(["join", str(tmp_path / "parts" / "gpu_tiny.json"), "-o", str(tmp_path / "joined")])
    message = str(failed.value.code)
    assert message.startswith(f"ERROR: {tmp_path / 'parts' / 'gpu_tiny.fp16.safetensors.part1'}: cannot read")
    assert "\n" not in message and not (tmp_path / "joined").exists()


def test_join_of_a_missing_index_is_one_line(gpu_weights, tmp_path):
    with pytest.raises(SystemExit) as failed:
        gpu_weights.main(["join", str(tmp_path / "none.json"), "-o", str(tmp_path / "joined")])
    assert str(failed.value.code).startswith(f"ERROR: {tmp_path / 'none.json'}: cannot read the index")


def test_split_of_a_folder_without_export_is_one_line(gpu_weights, tmp_path, capsys):
    assert gpu_weights.main(["split", str(tmp_path), str(tmp_path / "parts")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ERROR: ") and "manifest" in err and err.count("\n") == 1


@pytest.mark.parametrize("part_mb", ["0", "-1", "nan", "1e-9"])
def test_part_size_must_be_above_zero(gpu_weights, export, tmp_path, capsys, part_mb):
    folder, _ = export
    with pytest.raises(SystemExit) as refused:
        gpu_weights.main(["split", str(folder), str(tmp_path / "parts"), "--part-mb", part_mb])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "--part-mb:" in err and ("> 0" in err or "at least one byte" in err), err
    assert not (tmp_path / "parts").exists()


@pytest.mark.parametrize("damage, expected", [
    (lambda index: index.pop("parts"), "not an index written by 'gpu_weights.py split' (missing parts)"),
    (lambda index: index["parts"][0].update(file="../../etc/hostname"), "is not a plain name in one folder"),
    (lambda index: index.update(fp16_file="../outside.safetensors"), "is not a plain name in one folder"),
])
def test_join_refuses_an_index_that_is_not_splits_or_names_files_elsewhere(gpu_weights, export, tmp_path, damage,
                                                                            expected):
    # Was a KeyError traceback; a part named ../../x was read from outside the index's folder.
    import json

    folder, _ = export
    assert gpu_weights.main(["split", str(folder), str(tmp_path / "parts"), "--name", "gpu_tiny"]) == 0
    index_path = tmp_path / "parts" / "gpu_tiny.json"
    index = json.loads(index_path.read_text())
    damage(index)
    index_path.write_text(json.dumps(index))
    with pytest.raises(SystemExit) as failed:
        gpu_weights.main(["join", str(index_path), "-o", str(tmp_path / "joined")])
    message = str(failed.value.code)
    assert message.startswith(f"ERROR: {index_path}: ") and expected in message and "\n" not in message
    assert not (tmp_path / "joined").exists() and not (tmp_path / "outside.safetensors").exists()


@pytest.mark.parametrize("max_mb", ["0", "-1", "nan"])
def test_budget_must_be_above_zero(pack, tiny, tmp_path, capsys, max_mb):
    # --max-mb 0 fell back to the default budget and -1 packed nothing, both with exit 0.
    with pytest.raises(SystemExit) as refused:
        pack.main(["--config", str(tiny["config"]), "--data", str(tiny["data"]), "--out", str(tmp_path / "out"),
                   "--max-mb", max_mb])
    assert refused.value.code == 2 and "--max-mb:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_killed_runs_partial_pack_is_removed_and_nothing_else(pack, tiny, tmp_path):
    import subprocess

    out = tmp_path / "pack"
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs: the writer of the half-built pack below
    killed = tmp_path / f".partial-{gone.pid}-0123abcd-pack"
    (killed / "train").mkdir(parents=True)
    other = tmp_path / f".partial-{gone.pid}-0123abcd-something-else"  # not this pack's: kept
    other.mkdir()
    assert run_pack(pack, tiny, out) == 0
    assert not killed.exists() and other.is_dir() and (out / "pack.json").is_file()


def test_a_label_that_training_refuses_is_refused_not_packed_as_binary(pack, tiny, tmp_path, capsys):
    # Was: packed as != 0, so the packed copy of a {0, 1, 2} label (a sparse one undeclared) passed
    # training's binary check on the GPU machine, 1 = background trained as foreground.
    label = tiny["data"] / "cells" / "labels" / "a.tif"
    write_volume(np.pad(np.ones((8, 16, 8), np.uint8), ((0, 0), (0, 0), (0, 8)), constant_values=2), label)
    assert run_pack(pack, tiny, tmp_path / "pack") != 0
    assert "a.tif: label values {1, 2} are not binary" in capsys.readouterr().err
    assert not (tmp_path / "pack").exists()
