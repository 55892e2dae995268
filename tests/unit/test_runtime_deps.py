"""Inference needs only the runtime dependencies the container installs (pyproject's list)."""

import subprocess
import sys
import textwrap

from ..conftest import REPO, make_weights

DEV_ONLY = ("skimage", "matplotlib", "cc3d", "dask", "distributed", "nibabel", "pytest", "lsmseg_training", "lsmseg_evaluation")


def test_predict_runs_with_dev_only_packages_blocked(tmp_path, tiny_model_config, tiny_model):
    manifest = make_weights(tmp_path / "w", tiny_model_config, tiny_model)
    script = textwrap.dedent(
        f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {DEV_ONLY!r}:
                    raise ImportError("blocked for this test: " + name)
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, {str(REPO / "src")!r})
        import numpy as np
        from lsmseg import io
        from lsmseg.inference import Predictor, RunOptions, predict_file
        from lsmseg.cli import build_parser
        build_parser()  # optional subcommands are skipped, not fatal
        rng = np.random.default_rng(0)
        image = rng.integers(100, 200, (16, 64, 64)).astype(np.uint16)
        image[4:12, 20:40, 20:40] += 2000
        io.write_volume(image, {str(tmp_path / "in.tif")!r}, spacing=(3.0, 1.0, 1.0))
        predictor = Predictor.from_manifest({str(manifest)!r}, device="cpu", options=RunOptions(progress=False))
        result = predict_file(predictor, {str(tmp_path / "in.tif")!r}, {str(tmp_path / "out" / "in.tif")!r})
        assert result.ok
        print("OK", sorted(m for m in sys.modules if m.split(".")[0] in {DEV_ONLY!r}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "OK []"
