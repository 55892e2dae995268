"""lsmseg's block-wise predictor against MONAI's sliding_window_inference, in one run.

Same model, ROI, overlap, Gaussian blending (sigma 0.125), batch size and normalisation; each
variant in its own process (peak RSS is its own). Volumes: (a) a vessel phantom with a realistic
dark background (>= 50 % outside the tissue), (b) the phantom in a wider field of its own
background, (c) the real TRAILMAP light-sheet crop. Reported: throughput (input voxels per second,
read to mask), its ratio to MONAI, peak RSS (and on CUDA peak GPU memory), Dice of each mask
against the ground truth and the difference to MONAI's Dice.

    python benchmarks/bench_vs_monai.py                       # random weights, shipped architecture
    python benchmarks/bench_vs_monai.py --weights weights/    # the shipped weights
    python benchmarks/bench_vs_monai.py --weights weights/ --device cuda   # on the GPU, + lsmseg-host-accum
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REAL_DATA, Timer, current_rss_mb, dice, machine, model_and_config, peak_rss_mb,  # noqa: E402
                     run_child, table, wide_field)

# monai: same batch size as lsmseg; monai-default: MONAI's default sw_batch_size=1; lsmseg-no-skip:
# no background skipping; lsmseg-host-accum: windows blended on the host, batch by batch, not on the
# GPU (issue 13's before; on CPU the same as lsmseg).
VARIANTS = ("monai", "monai-default", "lsmseg", "lsmseg-no-skip", "lsmseg-host-accum")
DEFAULT_VARIANTS = {"cpu": VARIANTS[:4], "cuda": VARIANTS}


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from lsmseg import io

    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    model, config, settings, _ = model_and_config(spec["weights"])
    model = model.to(device)
    settings.sw_batch_size = spec["batch"]
    with torch.inference_mode():  # warm-up outside the timing, for every variant alike
        model(torch.zeros(1, 1, *config.roi, device=device))
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)  # the peak of the run, not of the warm-up
    baseline = current_rss_mb()
    out = Path(spec["out"])
    if spec["variant"].startswith("monai"):
        from monai.inferers import sliding_window_inference

        from lsmseg.normalise import normalise_volume

        with Timer() as timer:
            image = io.read_volume(spec["input"]).load()
            normalised = normalise_volume(image, settings.lower_percentile, settings.upper_percentile,
                                          upper_tail=settings.upper_tail)
            with torch.inference_mode():  # fp32, windows and blending on the device (the seed's pipeline)
                logits = sliding_window_inference(
                    torch.from_numpy(normalised)[None, None].to(device), tuple(config.roi),
                    1 if spec["variant"] == "monai-default" else settings.sw_batch_size, model,
                    overlap=settings.overlap, mode="gaussian", sigma_scale=settings.sigma_scale,
                    sw_device=device, device=device,
                )[0, 0].cpu()
            probability_threshold = torch.logit(torch.tensor(settings.threshold)).item()
            mask = (logits >= probability_threshold).numpy().astype(np.uint8)
        stats = {}
    else:
        from lsmseg.inference import Predictor, RunOptions, predict_file

        variant = spec["variant"]
        options = RunOptions(progress=False, skip_background=variant != "lsmseg-no-skip", block_size=spec.get("block"),
                             device_accumulation=variant != "lsmseg-host-accum")
        predictor = Predictor(model, config, settings, device=device, precision=spec.get("precision", "fp32"),
                              options=options)
        with Timer() as timer:
            record = predict_file(predictor, spec["input"], out / "mask.tif").record
        mask = io.read_volume(out / "mask.tif").load()
        stats = record["blocks"]
    np.save(out / "mask.npy", mask)
    return {"seconds": timer.seconds, "cpu_seconds": timer.cpu, "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline,
            "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
            "windows": stats.get("windows"), "window_runs": stats.get("window_runs"),
            "windows_skipped": stats.get("windows_skipped")}


def prepare_inputs(work: Path, phantom_shape, wide_shape, use_real: bool) -> list[dict]:
    from lsmseg import io
    from lsmseg.synth.phantom import make_phantom

    cases = []
    phantom = make_phantom("vessels", phantom_shape, seed=1)
    io.write_volume(phantom.image, work / "phantom.tif", spacing=phantom.spacing)
    cases.append({"name": f"phantom vessels {'x'.join(map(str, phantom_shape))}", "input": str(work / "phantom.tif"),
                  "label": phantom.label.astype(bool), "where": None,
                  "dark": 1.0 - float(phantom.tissue.mean())})
    if wide_shape:
        wide = wide_field(work, (wide_shape[0], *phantom_shape[1:]), wide_shape)
        cases.append({**wide, "label": io.read_volume(wide["label"]).load() > 0, "where": None})
    if use_real and (REAL_DATA / "trailmap" / "volume.tif").is_file():
        sparse = io.read_volume(REAL_DATA / "trailmap" / "sparse_label.tif").load()
        cases.append({"name": "real TRAILMAP 101x120x120", "input": str(REAL_DATA / "trailmap" / "volume.tif"),
                      "label": sparse == 2, "where": np.isin(sparse, (1, 2)), "dark": None})
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child")
    parser.add_argument("--weights", help="weights manifest or folder (default: random weights)")
    parser.add_argument("--phantom-shape", default="48,256,256")
    parser.add_argument("--wide-shape", default="32,448,448", help="field of view of the wide-field case ('' skips it)")
    parser.add_argument("--variants", help=f"subset of {','.join(VARIANTS)} (default: all but lsmseg-host-accum "
                        "on cpu, all on cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the network runs (lsmseg and MONAI alike; on cuda also peak GPU memory)")
    parser.add_argument("--precision", choices=("fp32", "auto", "bf16", "fp16"), default="fp32",
                        help="lsmseg's precision (default fp32, as MONAI's here; auto: autocast on cuda)")
    parser.add_argument("--no-real", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    _, config, settings, weights_note = model_and_config(args.weights)
    print(f"machine: {machine()}\nmodel: Swin UNETR {json.dumps(dict(feature_size=config.feature_size, depths=list(config.depths), roi=list(config.roi)))}, {weights_note}")
    print(f"overlap {settings.overlap}, gaussian sigma {settings.sigma_scale}, batch {args.batch}, {args.threads} threads, "
          f"device {args.device}, lsmseg precision {args.precision}\n")
    variants = args.variants.split(",") if args.variants else list(DEFAULT_VARIANTS[args.device])
    if "monai" not in variants:
        parser.error("--variants must include monai (the ratios and Dice differences are against it)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shape = tuple(int(v) for v in args.phantom_shape.split(","))
        wide = tuple(int(v) for v in args.wide_shape.split(",")) if args.wide_shape else None
        for case in prepare_inputs(work, shape, wide, not args.no_real):
            results = {}
            for variant in variants:
                out = work / case["name"].replace(" ", "_") / variant
                out.mkdir(parents=True)
                spec = {"variant": variant, "input": case["input"], "out": str(out), "weights": args.weights,
                        "batch": args.batch, "threads": args.threads, "device": args.device,
                        "precision": args.precision}
                result = run_child(Path(__file__), spec)
                mask = np.load(out / "mask.npy")
                result["dice"] = dice(mask, case["label"], case["where"])
                result["mask"] = mask
                results[variant] = result
                print(f"  {case['name']}: {variant} {result['seconds']:.1f} s wall, {result['cpu_seconds']:.1f} s CPU",
                      flush=True)
            voxels = int(np.prod(results["monai"]["mask"].shape))
            # Ratios are against the faster MONAI variant (by wall time and by CPU time separately).
            monai_runs = [r for v, r in results.items() if v.startswith("monai")]
            fastest_wall = min(r["seconds"] for r in monai_runs)
            fastest_cpu = min(r["cpu_seconds"] for r in monai_runs)
            for variant, result in results.items():
                rows.append({
                    "volume": case["name"], "dark": case["dark"], "variant": variant,
                    "seconds": result["seconds"], "mvox_s": voxels / result["seconds"] / 1e6,
                    "speedup": fastest_wall / result["seconds"],
                    "cpu": result["cpu_seconds"], "cpu_speedup": fastest_cpu / result["cpu_seconds"],
                    "rss": result["peak_rss_mb"], "rss_above": result["peak_rss_mb"] - result["baseline_rss_mb"],
                    "gpu": result["peak_gpu_mb"],
                    "runs": f"{result['window_runs']}/{result['windows']}" if result["windows"] else "",
                    "dice": result["dice"], "dice_diff": result["dice"] - results["monai"]["dice"],
                    "agree": dice(result["mask"], results["monai"]["mask"]),
                })
            if args.json:  # after every volume: a run stopped by a time limit keeps what it measured
                args.json.write_text(json.dumps(rows, indent=2))
    print()
    print(table(rows, [
        ("volume", "volume", ""), ("dark", "dark fraction", ".2f"), ("variant", "variant", ""),
        ("seconds", "wall (s)", ".1f"), ("mvox_s", "Mvoxel/s (wall)", ".3f"),
        ("speedup", "throughput vs faster MONAI, wall", ".2f"), ("cpu", "CPU (s)", ".1f"),
        ("cpu_speedup", "throughput vs faster MONAI, CPU time", ".2f"),
        ("rss", "peak RSS (MB)", ".0f"), ("rss_above", "peak above model-loaded (MB)", ".0f"),
        *([("gpu", "peak GPU memory (MB)", ".0f")] if args.device == "cuda" else []),
        ("runs", "windows run/total", ""), ("dice", "Dice vs truth", ".4f"), ("dice_diff", "Dice - MONAI's", "+.4f"),
        ("agree", "Dice vs MONAI mask", ".4f"),
    ]))


if __name__ == "__main__":
    main()
