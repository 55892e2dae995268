"""Choose the inference window and overlap on VALIDATION volumes: Dice vs labels for each setting.

The seed pipeline (MONAI sliding_window_inference, training ROI, overlap 0.5, Gaussian, fp32) and
lsmseg with each candidate window/overlap run on the same volumes in one process (the model is
loaded once); masks are scored against the labels. Component clean-up is off for all (windowing is
compared, not post-processing). Results are appended as JSON lines, so a partial run still counts.

Validation split (the lead's): vesselNN poon2015_BBB_Leakage, poon2015_plaqueVessels; DELiVR c-Fos
source 1147, microglia source 7466. Never the benchmark's test volumes.

    python benchmarks/sweep_windows.py --weights weights --out benchmarks/results/sweep.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REAL_DATA, dice, model_and_config  # noqa: E402

# name -> InferenceSettings overrides (window, overlap_voxels); "monai" is the seed pipeline.
CANDIDATES = {
    "w64x128x128-halo16": {"window": (64, 128, 128), "overlap_voxels": (16, 16, 16)},
    "w64x192x192-halo16": {"window": (64, 192, 192), "overlap_voxels": (16, 16, 16)},
    "roi-halo8x16x16": {"window": None, "overlap_voxels": (8, 16, 16)},
    "w64x128x128-halo32": {"window": (64, 128, 128), "overlap_voxels": (32, 32, 32)},
}


def validation_volumes(crop: int | None, per_source: int) -> list[tuple[str, Path, Path, tuple]]:
    out = []
    box = (slice(None),) + ((slice(256 - crop // 2, 256 + crop // 2),) * 2 if crop else (slice(None),) * 2)
    # Interleaved kinds, so that a partial run is still balanced.
    for index, name in enumerate(("poon2015_BBB_Leakage", "poon2015_plaqueVessels")):
        out.append((name, REAL_DATA / "vesselnn" / "images" / f"{name}.tif", REAL_DATA / "vesselnn" / "labels" / f"{name}.tif", box))
        for kind, source in (("cfos", 1147), ("microglia", 7466)):
            for k in range(index, per_source, 2):
                name = f"patchvolume_{source}_{k}"
                folder = REAL_DATA / "delivr" / kind
                out.append((f"{kind}/{name}", folder / "images" / f"{name}.tif", folder / "labels" / f"{name}.tif", (slice(None),) * 3))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default="weights")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--candidates", default=",".join(["monai", *CANDIDATES]))
    parser.add_argument("--crop", type=int, default=256, help="central Y,X crop of the 512^2 vesselNN volumes (0: whole)")
    parser.add_argument("--per-source", type=int, default=2, help="DELiVR patches per validation source")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch
    from monai.inferers import sliding_window_inference

    from lsmseg import io
    from lsmseg.normalise import normalise_volume
    from lsmseg.predictor import Predictor, logit

    torch.set_num_threads(args.threads)
    model, config, settings, _ = model_and_config(args.weights)
    done = set()
    if args.out.exists():
        done = {(r["volume"], r["setting"]) for r in map(json.loads, args.out.read_text().splitlines())}
    from lsmseg.windows import inference_window

    for name, image_path, label_path, box in validation_volumes(args.crop or None, args.per_source):
        image = io.read_volume(image_path).load()[box]
        label = io.read_volume(label_path).load()[box] > 0
        same: dict[tuple, dict] = {}  # settings that give the same grid on this volume run once
        for setting in args.candidates.split(","):
            if (name, setting) in done:
                continue
            if setting != "monai":
                overrides = CANDIDATES[setting]
                key = (inference_window(image.shape, config.roi, overrides["window"]), overrides["overlap_voxels"])
                if key in same:
                    row = dict(same[key], setting=setting, same_as=same[key]["setting"])
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    continue
            start = time.perf_counter()
            if setting == "monai":
                normalised = normalise_volume(image, settings.lower_percentile, settings.upper_percentile)
                with torch.inference_mode():
                    logits = sliding_window_inference(
                        torch.from_numpy(normalised)[None, None], tuple(config.roi), 4, model, overlap=0.5,
                        mode="gaussian", sigma_scale=settings.sigma_scale,
                    )[0, 0].numpy()
                mask = logits >= logit(settings.threshold)
            else:
                chosen = dataclasses.replace(settings, **CANDIDATES[setting])
                predictor = Predictor(model, config, chosen, device="cpu", progress=False)
                mask = predictor.predict_volume(image) > 0
            row = {"volume": name, "shape": list(image.shape), "setting": setting, "dice": dice(mask, label),
                   "seconds": round(time.perf_counter() - start, 1)}
            if setting != "monai":
                same[key] = row
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
