#!/usr/bin/env bash
# Whole container runs on the bundled sample, one image against another, interleaved (issue 15).
#
#   benchmarks/bench_container.sh BEFORE_IMAGE AFTER_IMAGE [ROUNDS]
#
# Each run: podman run --network none, folder mode on sample/images (3 volumes of 48x160x160), the
# image's own weights. Prints per run: wall time of `podman run`, CPU time (user + system) and peak
# RSS of the lsmseg process (getrusage inside the container), the engine and whether the ONNX file
# was exported (from the provenance). AFTER_IMAGE also runs with an empty writable cache
# (LSMSEG_CACHE_DIR=/tmp/cold-cache: the export paid at run time). Then the masks' Dice vs the labels.
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=$1 AFTER=$2 ROUNDS=${3:-1}
WORK=$(mktemp -d /tmp/lsmseg-bench-container.XXXXXX)
trap 'rm -rf "$WORK"' EXIT  # also when a run fails
mkdir -m 755 "$WORK/in" && cp sample/images/*.tif "$WORK/in/" && chmod 644 "$WORK/in"/*
PROBE="import resource, sys; from lsmseg.cli import main; rc = main(['challenge', '--mode', 'folder']); u = resource.getrusage(resource.RUSAGE_SELF); print('peak_rss_mb', u.ru_maxrss // 1024, 'cpu_s', round(u.ru_utime + u.ru_stime, 1), file=sys.stderr); sys.exit(rc)"

run() {  # LABEL IMAGE [podman args]
  local label=$1 image=$2; shift 2
  local out="$WORK/out-$label"; rm -rf "$out"; mkdir -m 777 "$out"
  local start end; start=$(date +%s.%N)
  # A failed run stops the benchmark with its log's end (set -e alone exited silently).
  if ! podman run --rm --network none --tmpfs /tmp -v "$WORK/in:/input:ro" -v "$out:/output" "$@" \
      --entrypoint python "$image" -c "$PROBE" > "$WORK/$label.log" 2>&1; then
    echo "bench_container.sh: run $label of $image failed; the end of its log:" >&2
    tail -n 5 "$WORK/$label.log" >&2
    exit 1
  fi
  end=$(date +%s.%N)
  python3 - "$label" "$out" "$(echo "$end - $start" | bc)" "$(grep -o 'peak_rss_mb.*' "$WORK/$label.log")" <<'PY'
import json, pathlib, sys
label, out, wall, usage = sys.argv[1:]
records = [json.loads(p.read_text()) for p in sorted(pathlib.Path(out).glob("*.provenance.json"))]
engines = {r["parameters"]["engine"] for r in records}
exported = {m["exported"] for r in records for m in (r["parameters"].get("onnx_models") or [])}
print(f"{label}: wall {float(wall):.1f} s, {usage}, engine {'/'.join(sorted(engines))}, onnx exported {sorted(exported)}")
PY
}

for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then run "before$round" "$BEFORE"; run "after$round" "$AFTER"
  else run "after$round" "$AFTER"; run "before$round" "$BEFORE"; fi
done
run after-cold "$AFTER" -e LSMSEG_CACHE_DIR=/tmp/cold-cache
python3 - "$WORK" <<'PY'
import pathlib, sys
import numpy as np, tifffile
work = pathlib.Path(sys.argv[1])
for label in sorted(p.name[4:] for p in work.glob("out-*")):
    dice = []
    for mask in sorted((work / f"out-{label}").glob("*.tif")):
        a, b = tifffile.imread(mask) > 0, tifffile.imread(pathlib.Path("sample/labels") / mask.name) > 0
        dice.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    print(f"{label}: Dice vs labels " + ", ".join(f"{d:.4f}" for d in dice) + f" (mean {np.mean(dice):.4f})")
PY
