"""Peak RSS against volume size: lsmseg's block-wise predictor vs MONAI, volumes 1x, 4x and 16x.

Volumes are tiles of one phantom written as (zlib) TIFF files on disk; lsmseg reads them lazily and
writes the mask plane by plane, with a fixed block size. Each run is a fresh process; RSS is its
peak (VmHWM). The question is the engine's memory, so by default the network is a cheap
convolutional stand-in with the same ROI (a Swin UNETR's activations are the same for every volume
size and would only add a constant, while its compute would make the 16x run take hours on two
CPU cores); ``--swin`` uses the shipped architecture instead.

    python benchmarks/bench_scaling.py                   # 1x = 64x256x256
    python benchmarks/bench_scaling.py --base 32,128,128 --swin

``lsmseg-no-cache`` is lsmseg with the window cache off (``window_cache_mb=0``): windows on block
borders then run once per block they touch. lsmseg variants fix glibc's mmap threshold as
``lsmseg predict`` does (:mod:`lsmseg.allocator`; the stand-in, too, runs in OpenVINO by default);
``lsmseg-glibc`` (``--glibc-at``) leaves malloc as it comes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Timer, current_rss_mb, machine, model_and_config, peak_rss_mb, run_child, table  # noqa: E402

FACTORS = {1: (1, 1, 1), 4: (1, 2, 2), 16: (4, 2, 2)}


def stand_in(roi):
    import torch

    from lsmseg.config import InferenceSettings, from_dict, ModelConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(2, 1, 3, padding=1))
    config = from_dict(ModelConfig, {"roi": list(roi)})
    return model.eval(), config, InferenceSettings()


def child(spec: dict) -> dict:
    mapped = None  # glibc's malloc as it comes (MONAI, lsmseg-glibc)
    import torch

    torch.set_num_threads(spec["threads"])
    from lsmseg import io

    if spec["swin"]:
        model, config, settings, _ = model_and_config(spec["weights"])
    else:
        model, config, settings = stand_in(spec["roi"])
    with torch.inference_mode():
        model(torch.zeros(1, 1, *config.roi))
    baseline = current_rss_mb()
    if spec["variant"] == "monai":
        from monai.inferers import sliding_window_inference

        from lsmseg.normalise import normalise_volume

        with Timer() as timer:
            image = io.read_volume(spec["input"]).load()
            normalised = normalise_volume(image)
            del image
            with torch.inference_mode():
                logits = sliding_window_inference(torch.from_numpy(normalised)[None, None], tuple(config.roi), 4, model,
                                                  overlap=settings.overlap, mode="gaussian")
            mask = (logits[0, 0] >= 0).numpy().astype(np.uint8)
            io.write_mask(mask, Path(spec["out"]) / "mask.tif")
    else:
        from lsmseg.inference import Predictor, RunOptions, predict_file

        options = RunOptions(progress=False, block_size=spec["block"], prefetch=spec["variant"] == "lsmseg-prefetch",
                             window_cache_mb=0 if spec["variant"] == "lsmseg-no-cache" else RunOptions.window_cache_mb)
        predictor = Predictor(model, config, settings, device="cpu", options=options)
        if spec["variant"] != "lsmseg-glibc":  # as `lsmseg predict` does once the model is loaded
            from lsmseg.allocator import map_large_buffers_for

            mapped = map_large_buffers_for(predictor)
        with Timer() as timer:
            blocks = predict_file(predictor, spec["input"], Path(spec["out"]) / "mask.tif").record["blocks"]
        return {"seconds": timer.seconds, "cpu_seconds": timer.cpu, "peak_rss_mb": peak_rss_mb(), "large_buffers_mapped": mapped,
                "baseline_rss_mb": baseline, "window_runs": blocks["window_runs"], "windows": blocks["windows"]}
    return {"seconds": timer.seconds, "cpu_seconds": timer.cpu, "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline,
            "large_buffers_mapped": mapped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child")
    parser.add_argument("--base", default="64,256,256", help="the 1x volume, Z,Y,X")
    parser.add_argument("--block", default="64,128,128", help="lsmseg block size, Z,Y,X")
    parser.add_argument("--swin", action="store_true", help="use the shipped Swin UNETR architecture")
    parser.add_argument("--weights")
    parser.add_argument("--no-monai", action="store_true")
    parser.add_argument("--no-prefetch", action="store_true", help="leave out the 4x prefetch variant")
    parser.add_argument("--sizes", default="1,4,16", type=lambda text: [int(v) for v in text.split(",") if v],
                        help="which of the sizes 1,4,16 to run")
    parser.add_argument("--no-cache-at", default="1,4,16", type=lambda text: [int(v) for v in text.split(",") if v],
                        help="sizes (1,4,16) also run without the window cache ('' none)")
    parser.add_argument("--glibc-at", default="", type=lambda text: [int(v) for v in text.split(",") if v],
                        help="sizes (1,4,16) also run with glibc's default malloc settings, not lsmseg.allocator's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=1, help="runs of each variant per size (order rotated; medians)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from lsmseg import io
    from lsmseg.synth.phantom import make_phantom

    base = tuple(int(v) for v in args.base.split(","))
    block = [int(v) for v in args.block.split(",")]
    roi = (32, 64, 64)
    print(f"machine: {machine()}")
    print(f"network: {'Swin UNETR (shipped architecture)' if args.swin else 'convolutional stand-in'}, ROI {roi}, "
          f"lsmseg block {tuple(block)}\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tile = make_phantom("vessels", base, seed=2).image
        for factor, reps in FACTORS.items():
            if factor not in args.sizes:
                continue
            image = np.tile(tile, reps)
            path = work / f"x{factor}.tif"
            io.write_volume(image, path, spacing=(3.0, 1.0, 1.0))
            shape = image.shape
            del image
            variants = ["lsmseg"] + ([] if args.no_monai else ["monai"])
            variants += ["lsmseg-prefetch"] if factor == 4 and not args.no_prefetch else []  # does reading in a thread pay on CPU?
            # What the window cache (each border window run once) saves in time and costs in memory.
            variants += ["lsmseg-no-cache"] if factor in args.no_cache_at else []
            # glibc's malloc as it comes (lsmseg before 2026-12-03): large buffers from a growing heap.
            variants += ["lsmseg-glibc"] if factor in args.glibc_at else []
            runs: dict[str, list[dict]] = {variant: [] for variant in variants}
            for rep in range(args.reps):
                for variant in variants[rep % len(variants):] + variants[:rep % len(variants)]:  # rotate the order
                    out = work / f"{variant}{factor}_{rep}"
                    out.mkdir()
                    spec = {"variant": variant, "input": str(path), "out": str(out), "block": block, "roi": roi,
                            "swin": args.swin, "weights": args.weights, "threads": args.threads}
                    result = run_child(Path(__file__), spec)
                    runs[variant].append(result)
                    print(f"  {factor}x {variant} rep {rep}: {result['seconds']:.1f} s, peak RSS "
                          f"{result['peak_rss_mb']:.0f} MB", flush=True)
            for variant, results in runs.items():  # medians over the reps
                result = {key: float(np.median([r[key] for r in results])) for key in
                          ("seconds", "peak_rss_mb", "baseline_rss_mb")} | {k: results[0].get(k) for k in ("window_runs", "windows")}
                rows.append({"factor": f"{factor}x", "shape": "x".join(map(str, shape)), "variant": variant,
                             "mvox": int(np.prod(shape)) / 1e6, "seconds": result["seconds"],
                             "runs": f"{result['window_runs']}/{result['windows']}" if result["windows"] else "",
                             "rss": result["peak_rss_mb"], "above": result["peak_rss_mb"] - result["baseline_rss_mb"]})
            path.unlink()
    for variant in {r["variant"] for r in rows}:
        mine = [r for r in rows if r["variant"] == variant]
        if mine[0]["factor"] != "1x":
            continue
        for r in mine:
            r["growth"] = r["rss"] / mine[0]["rss"]
            r["growth_above"] = r["above"] / max(mine[0]["above"], 1e-9)
    print()
    print(table(rows, [("factor", "size", ""), ("shape", "shape (z,y,x)", ""), ("mvox", "Mvoxel", ".1f"),
                       ("variant", "variant", ""), ("seconds", "time (s)", ".1f"), ("runs", "window runs/windows", ""),
                       ("rss", "peak RSS (MB)", ".0f"),
                       ("growth", "RSS vs 1x", ".2f"), ("above", "peak above model-loaded (MB)", ".0f"),
                       ("growth_above", "that vs 1x", ".2f")]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
