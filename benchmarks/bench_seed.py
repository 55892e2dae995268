"""lsmseg against the seed pipeline, whole process from file to mask, same weights, same run.

The seed pipeline (issue 15's baseline): read the volume into memory, percentile normalisation,
MONAI ``sliding_window_inference(roi, sw_batch_size=4, overlap=0.5, mode="gaussian")`` in fp32,
sigmoid > the manifest's threshold, mask written as TIFF. lsmseg: ``Predictor.predict_file`` with
the manifest's settings (component clean-up included), optionally overriding the inference window
and voxel overlap. Each variant runs in its own process (its peak RSS is its own); the order of the
variants rotates from one repetition (and volume) to the next, so that a change in the machine's
load hits all of them alike. Dice is against the labels, for both pipelines.

Volumes are TEST volumes only (the window/overlap defaults are chosen on validation volumes by
``sweep_windows.py``): a real vesselNN stack, DELiVR 100^3 patches, a phantom organ in a wider
dark field.

    python benchmarks/bench_seed.py --weights weights --threads 2 --reps 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REAL_DATA, Timer, current_rss_mb, dice, machine, peak_rss_mb, run_child, table, wide_field  # noqa: E402

# name -> InferenceSettings overrides for lsmseg ({}: the manifest's settings as they are).
# "engine" picks the network runtime (auto: OpenVINO, else ONNX Runtime, on CPU where installed).
LSMSEG_VARIANTS = {
    "lsmseg": {},
    "lsmseg-torch": {"engine": "torch"},
    "lsmseg-onnxruntime": {"engine": "onnxruntime"},
    "lsmseg-openvino": {"engine": "openvino"},
    # OpenVINO on a machine's first run: no compiled model cached yet, so the run compiles (0.6 s here idle, 2-3 s under load).
    # Every other OpenVINO variant imports the compiled model, cached outside the timing.
    "lsmseg-openvino-cold": {"engine": "openvino", "cold": True},
    # OpenVINO warmed up outside the timing as the seed's model is (one batch of windows through the
    # engine: the session opened from the cache and its first, slower inference). The other variants
    # pay both inside the timing (~1 s on the vesselNN crop's 2.7 s), once per process in real use.
    "lsmseg-openvino-warm": {"engine": "openvino", "warm": True},
    # OpenVINO on one stream of all threads, as lsmseg ran before 2026-12-03 (now two streams from two
    # threads on, each running half of every batch: engines.openvino_streams).
    "lsmseg-openvino-1stream": {"engine": "openvino", "streams": 1},
    # glibc's malloc as it comes, as lsmseg ran before 2026-12-03 (every other lsmseg variant fixes
    # the mmap threshold once the model is loaded, as `lsmseg predict` does: lsmseg.allocator;
    # PyTorch on the CPU is left as it comes there too).
    "lsmseg-openvino-glibc": {"engine": "openvino", "glibc": True},
    "lsmseg-torch-glibc": {"engine": "torch", "glibc": True},
    # Test-time mirroring on every axis for every volume (the manifest mirrors by structure name,
    # and these inputs' names name none): what the 8 passes cost and give here.
    "lsmseg-mirrored": {"mirror_axes": (0, 1, 2)},
    # The volume enlarged 1.5x per axis before the network, as the manifest does for volumes named
    # cfos_neuron (these inputs' names name none): what c-Fos's shipped input_scale costs and gives.
    "lsmseg-openvino-scaled": {"engine": "openvino", "input_scale": 1.5},
}


def _load(weights: str):
    from lsmseg.weights import load_manifest, load_model, resolve_manifest

    manifest = load_manifest(resolve_manifest(weights))
    _, entry = manifest.entry_for(None)
    return load_model(manifest, entry), entry


def child(spec: dict) -> dict:
    mapped = None  # glibc's malloc as it comes (the seed, the -glibc variants)
    import torch

    torch.set_num_threads(spec["threads"])
    from lsmseg import io
    from lsmseg.inference import Predictor, RunOptions, predict_file

    model, entry = _load(spec["weights"])
    settings, roi = entry.inference, tuple(entry.model.roi)
    # The PyTorch model's warm-up, outside the timing: the seed's network (and lsmseg-torch's) runs
    # warm; an ONNX Runtime or OpenVINO engine is warmed only in the -warm variant.
    with torch.inference_mode():
        model(torch.zeros(1, 1, *roi))
    baseline = current_rss_mb()
    out = Path(spec["out"])
    stats = {}
    if spec["variant"] == "seed":
        from monai.inferers import sliding_window_inference

        from lsmseg.normalise import normalise_volume

        with Timer() as timer:
            volume = io.read_volume(spec["input"])
            normalised = normalise_volume(volume.load(), settings.lower_percentile, settings.upper_percentile,
                                          upper_tail=settings.upper_tail)
            with torch.inference_mode():
                logits = sliding_window_inference(
                    torch.from_numpy(normalised)[None, None], roi, 4, model, overlap=0.5, mode="gaussian",
                )[0, 0]
            mask = (torch.sigmoid(logits) > settings.threshold).numpy().astype(np.uint8)
            io.write_volume(mask, out / "mask.tif")
    else:
        overrides = dict(spec["overrides"])
        engine = overrides.pop("engine", "auto")
        cold = overrides.pop("cold", False)
        warm = overrides.pop("warm", False)
        glibc = overrides.pop("glibc", False)
        if "streams" in overrides:
            from lsmseg.inference import engines

            streams = overrides.pop("streams")
            engines.openvino_streams = lambda threads, batch_size=4: streams
        if cold:  # an empty cache of this process's own; the export below fills its ONNX part only
            os.environ["LSMSEG_CACHE_DIR"] = tempfile.mkdtemp(prefix="lsmseg-cold-", dir=spec["out"])
        settings = dataclasses.replace(settings, **overrides)
        predictor = Predictor(model, entry.model, settings, device="cpu", engine=engine,
                              options=RunOptions(progress=False))
        if not glibc:  # as `lsmseg predict` does once the model is loaded
            from lsmseg.allocator import map_large_buffers_for

            mapped = map_large_buffers_for(predictor)
        # The ONNX export (and OpenVINO's compiled model) is once per weights and window, cached on
        # disk: outside the timing. Opening the session from the cached files is inside it.
        predictor.export_engine(compiled=not cold)
        if warm:
            predictor.run_windows(torch.zeros(settings.sw_batch_size, 1, *roi))
        stats["engine"] = predictor.engine
        with Timer() as timer:
            record = predict_file(predictor, spec["input"], out / "mask.tif").record
        stats.update(record["blocks"])
    mask = io.read_volume(out / "mask.tif").load()
    np.save(out / "mask.npy", mask > 0)
    return {"seconds": timer.seconds, "cpu_seconds": timer.cpu, "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline,
            "large_buffers_mapped": mapped,
            "windows": stats.get("windows"), "window_runs": stats.get("window_runs"), "engine": stats.get("engine")}


def cases(args, work: Path) -> list[dict]:
    out = []
    from lsmseg import io

    for name in args.vesselnn.split(","):
        if not name:
            continue
        image, label = (REAL_DATA / "vesselnn" / kind / f"{name}.tif" for kind in ("images", "labels"))
        if args.vesselnn_crop:
            # The central Y,X crop (the seed pipeline needs ~225 windows for a whole 512^2 stack: too slow here).
            c = args.vesselnn_crop
            box = (slice(None), slice(256 - c // 2, 256 + c // 2), slice(256 - c // 2, 256 + c // 2))
            for source, target in ((image, work / f"{name}.tif"), (label, work / f"{name}_label.tif")):
                io.write_volume(io.read_volume(source).load()[box], target)
            image, label = work / f"{name}.tif", work / f"{name}_label.tif"
            name = f"{name} (central {c}x{c})"
        out.append({"name": f"vesselNN {name}", "kind": "dense", "input": str(image), "label": str(label)})
    for item in args.delivr.split(","):
        if item:
            kind, name = item.split("/")
            folder = REAL_DATA / "delivr" / kind
            out.append({"name": f"DELiVR {kind} {name}", "kind": "dense",
                        "input": str(folder / "images" / f"{name}.tif"), "label": str(folder / "labels" / f"{name}.tif")})
    if args.wide_field:
        organ, field = (tuple(int(v) for v in s.split(",")) for s in args.wide_field.split(":"))
        out.append({**wide_field(work, organ, field), "kind": "wide field"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child")
    parser.add_argument("--weights", default="weights", help="weights manifest or folder")
    parser.add_argument("--variants", default="seed,lsmseg",
                        help=f"seed and any of {','.join(LSMSEG_VARIANTS)}")
    parser.add_argument("--vesselnn", default="santos2015_mixedSizelowContrastVessels")
    parser.add_argument("--vesselnn-crop", type=int, default=0, help="central Y,X crop of the vesselNN stacks (0: whole)")
    parser.add_argument("--delivr", default="cfos/patchvolume_695_0,microglia/patchvolume_8858_0",
                        help="DELiVR patches KIND/NAME, comma-separated (test sources, not the validation ones)")
    parser.add_argument("--wide-field", default="32,160,160:32,384,384", help="ORGAN:FIELD shapes ('' skips it)")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="append every measurement here (JSON lines)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from lsmseg import io

    print(f"machine: {machine()}\nweights: {args.weights}; {args.threads} threads; variants {args.variants}\n", flush=True)
    variants = args.variants.split(",")
    rows, turn = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for case in cases(args, work):
            label = io.read_volume(case["label"]).load() > 0
            results: dict[str, list[dict]] = {v: [] for v in variants}
            for rep in range(args.reps):
                order = variants[turn % len(variants):] + variants[:turn % len(variants)]  # rotate the order
                turn += 1
                for variant in order:
                    out = work / f"{len(rows)}_{variant}_{rep}"
                    out.mkdir(parents=True)
                    spec = {"variant": variant, "input": case["input"], "out": str(out), "weights": args.weights,
                            "threads": args.threads, "overrides": LSMSEG_VARIANTS.get(variant, {})}
                    result = run_child(Path(__file__), spec, timeout=7200)
                    result["dice"] = dice(np.load(out / "mask.npy"), label)
                    result.update(volume=case["name"], variant=variant, rep=rep, order=order.index(variant))
                    results[variant].append(result)
                    if args.json:
                        with args.json.open("a") as f:
                            f.write(json.dumps(result) + "\n")
                    print(f"  {case['name']}: {variant} rep {rep}: {result['seconds']:.1f} s wall, "
                          f"{result['cpu_seconds']:.1f} s CPU, Dice {result['dice']:.4f}", flush=True)
            seed_wall = np.median([r["seconds"] for r in results["seed"]]) if "seed" in results else None
            seed_cpu = np.median([r["cpu_seconds"] for r in results["seed"]]) if "seed" in results else None
            for variant, runs in results.items():
                wall, cpu = np.median([r["seconds"] for r in runs]), np.median([r["cpu_seconds"] for r in runs])
                rows.append({
                    "volume": case["name"], "variant": variant, "wall": wall, "cpu": cpu,
                    "ratio": seed_wall / wall if seed_wall else None, "cpu_ratio": seed_cpu / cpu if seed_cpu else None,
                    "rss": max(r["peak_rss_mb"] for r in runs),
                    "runs": f"{runs[0]['window_runs']}/{runs[0]['windows']}" if runs[0]["windows"] else "",
                    "engine": runs[0].get("engine") or "torch (MONAI)",
                    "dice": runs[0]["dice"],
                })
    print()
    print(table(rows, [
        ("volume", "volume", ""), ("variant", "variant", ""), ("engine", "engine", ""), ("wall", "wall (s)", ".1f"),
        ("ratio", "throughput vs seed (wall)", ".2f"), ("cpu", "CPU (s)", ".1f"),
        ("cpu_ratio", "throughput vs seed (CPU time)", ".2f"), ("rss", "peak RSS (MB)", ".0f"),
        ("runs", "windows run/total", ""), ("dice", "Dice vs labels", ".4f"),
    ]))


if __name__ == "__main__":
    main()
