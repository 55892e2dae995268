#!/usr/bin/env bash
# The GPU check of issue 13, one command for one device call (about 9 minutes), every result under
# $OUT (default ./gpu_check_out):
#   1. environment: nvidia-smi, torch / CUDA / cuDNN versions, the packages, the date
#   2. pytest -m cuda (tests/cuda): junit XML, log, and the measured values (cuda_report.jsonl)
#   3. benchmarks/bench_vs_monai.py on the GPU (--device cuda where the script has it), JSON
#   4. the time-boxed fine-tuning of training/configs/gpu_finetune_real.yaml (Swin UNETR feature size
#      24, 64^3 windows, batch 4, from scratch: no pretrained encoder of that shape exists) on the
#      packed real training data + phantoms, validated at the end on the packed validation split;
#      its wall-clock budget (max_seconds, at most 300 s) is what the 9 minutes leave
#   5. the run's best weights in fp16, in parts of <= 15 MiB, with an index (scripts/gpu_weights.py),
#      and the reassembly checked there
# What comes back (at most 8 files, flat): gpu_check.log, summary.json, results.tar.gz (logs, junit,
# reports, bench JSON, run.json, log.csv, the run's config and the pack's record), gpu_general.json
# and gpu_general.fp16.safetensors.part0..2. Reassemble: python scripts/gpu_weights.py join
# OUT/gpu_general.json -o WEIGHTS_DIR (checks every sha256; WEIGHTS_DIR then works with --weights).
#
# `scripts/gpu_check.sh --dry-run` runs every step on the CPU with tiny settings in under 3 minutes
# (tests on the CPU stand-in, LSMSEG_CUDA_TESTS_ON_CPU=1; tiny bench shapes; a tiny model for one
# step on phantoms packed like the real data), so the script is known to work before a GPU is lent.
#
# Data and packages travel with the call (the device has no network and no ../shared/data/real).
# The working tree that travels is limited to 64 MiB, carried paths included: the tracked tree is
# ~26 MiB (the shipped weights 21 MiB), the wheels 11.5 MiB, which leaves ~25 MiB for data:
#   .whl/       scripts/gpu_fetch_wheels.sh: monai, zarr + numcodecs, dask + distributed and what
#               they need that the device image lacks, and a wheel of lsmseg for its entry points,
#               recompressed with LZMA (~11.5 MiB). Not SimpleITK, without which the exec-mode test
#               skips (it writes output.mha): `gpu_fetch_wheels.sh --simpleitk` swaps the dask stack
#               for it (~36 MiB in all), which leaves no room for data, so such a call runs the
#               checks that need none (docs/gpu_check.md: the exec-mode test and the benchmark).
#   .gpu_data/  scripts/gpu_pack_data.py: the train and validation splits of
#               training/configs/general_finetune_real_logtail.yaml (never the test split) as zlib
#               TIFFs, non-8-bit images as uint16 with 255 steps over the percentile range inference
#               normalises to and the bright tail above it (that run keeps it: data.upper_tail log),
#               one volume per set and source in turn until the budget is spent (24 of the 62
#               volumes fit; pack.json lists what was left out), and finetune.yaml, the GPU config
#               pointing at them. The same pack gives the fp16/bf16 test its real volumes
#               (LSMSEG_DATA=.gpu_data); the bundled sample/ gives it the phantoms.
# Both folders are ignored by git (.gitignore: /.whl/, /.gpu_data/).
#
# A session that has a GPU prepares here (seconds), checks the size, then makes ONE device call:
#   scripts/gpu_fetch_wheels.sh && python scripts/gpu_pack_data.py
#   du -shc .whl .gpu_data; git ls-files -z | xargs -0 du -cb | tail -1      # all together < 64 MiB
#   run(command="bash scripts/gpu_check.sh", carry=[".whl", ".gpu_data"], timeout_s=600)
# The script keeps to GPU_CHECK_BUDGET_S (default 540 s) by sizing the training to what is left, so
# the call ends inside its 600 s; with 15 minutes of device time a session has no second try: call
# give_back right after it. Results: files_at from the reply (or /work/.device/...).
# The exec-mode test needs SimpleITK, which travels only without a data pack (64 MiB): that is a call
# of its own, with the benchmark (docs/gpu_check.md, "The next device call"):
#   scripts/gpu_fetch_wheels.sh --simpleitk
#   run(command="GPU_CHECK_TESTS_S=200 GPU_CHECK_BENCH_S=330 bash scripts/gpu_check.sh --only cuda-tests,bench",
#       carry=[".whl"], timeout_s=600)
# A machine still warm after it (30 s) can take a rerun of what failed, e.g.
#   GPU_CHECK_TESTS_K="autocast" GPU_CHECK_TESTS_S=80 bash scripts/gpu_check.sh --only cuda-tests
# (--only takes cuda-tests, bench, training; training includes its weights step).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

DRY=0
ONLY=""  # --only STEP[,STEP]: a second call repeats what the first left undone
USAGE="usage: scripts/gpu_check.sh [--dry-run] [--only cuda-tests,bench,training]"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY="${2:?$USAGE}"; shift ;;
    *) echo "$USAGE" >&2; exit 2 ;;
  esac
  shift
done
wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

OUT="${OUT:-$REPO/gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
RESULTS="$WORK/results"
mkdir -p "$RESULTS"
PYTHON="${PYTHON:-python3}"
T0=$(date +%s)
if [ "$DRY" = 1 ]; then BUDGET="${GPU_CHECK_BUDGET_S:-170}"; else BUDGET="${GPU_CHECK_BUDGET_S:-540}"; fi
# A step over its time box gets SIGABRT (then SIGKILL 15 s later): with the fault handler on, every Python
# process of the step prints its threads' stacks first, so a call cut short says where each one was.
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONFAULTHANDLER=1
box() { local seconds="$1"; shift; timeout -s ABRT -k 15 "$seconds" "$@"; }  # exits 124 when over
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET - $(elapsed) )); }

# One summary and one tarball of the small results, rewritten after every step, so that a call cut
# short still brings back what was done.
collect() {  # (atomic renames: a call cut short never leaves half a file)
  tar -czf "$OUT/.results.$BASHPID.tar.gz" -C "$WORK" results 2>/dev/null && mv -f "$OUT/.results.$BASHPID.tar.gz" "$OUT/results.tar.gz"
  "$PYTHON" - "$WORK/steps.tsv" "$OUT/summary.json" "$DRY" "$(elapsed)" <<'PY'
import json, sys
from pathlib import Path
steps = [dict(zip(("step", "exit", "seconds"), line.split("\t"))) for line in Path(sys.argv[1]).read_text().splitlines()] \
    if Path(sys.argv[1]).is_file() else []
for s in steps:
    s["exit"], s["seconds"] = int(s["exit"]), int(s["seconds"])
tmp = Path(sys.argv[2] + ".tmp%d" % __import__("os").getpid())
tmp.write_text(json.dumps({"dry_run": sys.argv[3] == "1", "seconds": int(sys.argv[4]),
                                         "ok": all(s["exit"] == 0 for s in steps), "steps": steps}, indent=1))
tmp.replace(sys.argv[2])
PY
}

step() {  # step NAME COMMAND...: run, log, record the exit code and time, collect
  local name="$1" start rc
  shift
  start=$(date +%s)
  echo "=== $name (at $(elapsed) s of $BUDGET)"
  "$@"
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$WORK/steps.tsv"
  echo "=== $name: exit $rc after $(( $(date +%s) - start )) s"
  collect
  return 0
}

# ---------------------------------------------------------------------------------------------- packages
# (lsmseg's own distribution too: its metadata holds the entry points of `lsmseg finetune` and `export`)
needed="monai zarr distributed"
if ls .whl/simpleitk-*.whl >/dev/null 2>&1; then needed="monai zarr SimpleITK"; fi  # (--simpleitk: no dask stack)
if ! "$PYTHON" -c "import importlib.metadata as m, importlib.util as u, sys; m.version('lsmseg')
sys.exit(any(u.find_spec(n) is None for n in sys.argv[1].split()))" "$needed" 2>/dev/null; then
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    echo "installing the carried wheels (.whl) into /tmp/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONPATH="$REPO/src:$REPO/training:$REPO/evaluation${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY" = 1 ]; then
  export LSMSEG_CUDA_TESTS_ON_CPU=1
  PACK="$WORK/pack"
  step pack "$PYTHON" scripts/gpu_pack_data.py --stand-in --out "$PACK"
else
  PACK="$REPO/.gpu_data"
  [ -f "$PACK/finetune.yaml" ] || echo "WARNING: no $PACK/finetune.yaml: run scripts/gpu_pack_data.py first (training will fail)"
fi
export LSMSEG_DATA="$PACK"

# ---------------------------------------------------------------------------------------------- 1. environment
environment() (
  date -u
  uname -a
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$PYTHON" - <<'PY'
import importlib.metadata as md, platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm_{p.major}{p.minor}",
          "bf16", torch.cuda.is_bf16_supported(), "tf32 (cudnn)", torch.backends.cudnn.allow_tf32)
for name in ("monai", "numpy", "scipy", "tifffile", "zarr", "numcodecs", "dask", "distributed", "SimpleITK",
             "imagecodecs", "onnxruntime", "openvino", "safetensors", "lsmseg"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
PY
  if [ -f "$PACK/pack.json" ]; then cp "$PACK/pack.json" "$RESULTS/pack.json"; fi
) > "$RESULTS/environment.txt" 2>&1
step environment environment
cat "$RESULTS/environment.txt"

# ---------------------------------------------------------------------------------------------- 2. CUDA tests
# GPU_CHECK_TESTS_K: a pytest -k expression (a rerun of the tests that failed); GPU_CHECK_TESTS_S: their time box.
# On the device the CPU sides of the comparisons get 8 of its 16 cores (the tests default to CI's 2).
if [ "$DRY" = 1 ]; then TEST_THREADS=2; else TEST_THREADS=8; fi
cuda_tests() (
  LSMSEG_TEST_THREADS=$TEST_THREADS LSMSEG_CUDA_REPORT="$RESULTS/cuda_report.jsonl" box "$1" "$PYTHON" -m pytest tests/cuda tests/unit/test_blocks.py -m cuda -q -rs \
    -p no:cacheprovider --junitxml="$RESULTS/junit.xml" ${GPU_CHECK_TESTS_K:+-k "$GPU_CHECK_TESTS_K"} 2>&1 | tee "$RESULTS/pytest.log"
)
run_tests() {
  if [ "$DRY" = 1 ]; then
    step cuda-tests cuda_tests "${GPU_CHECK_TESTS_S:-170}"
  else
    step cuda-tests cuda_tests "${GPU_CHECK_TESTS_S:-240}"
  fi
}

# ---------------------------------------------------------------------------------------------- 3. benchmark
bench_args=(--json "$RESULTS/bench_vs_monai.json" --no-real)
if "$PYTHON" benchmarks/bench_vs_monai.py --help 2>/dev/null | grep -q -- '--device'; then
  if [ "$DRY" = 1 ]; then bench_args+=(--device cpu); else bench_args+=(--device cuda); fi
fi
if [ "$DRY" = 1 ]; then
  bench_args+=(--phantom-shape 32,64,64 --wide-shape '' --variants monai,lsmseg --threads 2)
  BENCH_TIMEOUT=60
else
  # Three variants x two volumes, each a process that starts CUDA: before/after device accumulation
  # against MONAI's fp32 pipeline; rows are written after each volume, so a timeout keeps the first.
  bench_args+=(--weights weights --variants monai,lsmseg,lsmseg-host-accum)
  BENCH_TIMEOUT=180
fi
# GPU_CHECK_BENCH_ARGS: more arguments, split at spaces (e.g. --wide-shape= for the phantom volume alone);
# GPU_CHECK_BENCH_S: its time box.
read -r -a extra_bench_args <<< "${GPU_CHECK_BENCH_ARGS:-}"
bench_args+=("${extra_bench_args[@]}")
BENCH_TIMEOUT="${GPU_CHECK_BENCH_S:-$BENCH_TIMEOUT}"
bench() (
  box "$BENCH_TIMEOUT" "$PYTHON" benchmarks/bench_vs_monai.py "${bench_args[@]}" 2>&1 | tee "$RESULTS/bench_vs_monai.log"
)

# ---------------------------------------------------------------------------------------------- 4. training
RUN="$WORK/runs/gpu/finetune_real"
if [ "$DRY" = 1 ]; then
  RESERVE=30; CAP=30
  train_args=(--set model.feature_size=12 --set "model.depths=[1, 1, 1, 1]" --set "model.num_heads=[1, 2, 4, 8]"
              --set "model.roi=[32, 32, 64]" --set batch_size=1 --set epochs=1 --set steps_per_epoch=1
              --set device=cpu --set data.workers=0 --set data.train_phantoms.per_kind=1
              --set "data.train_phantoms.kinds=[vessels]" --set "data.train_phantoms.shape=[32, 64, 64]"
              --set validation.sw_batch_size=2)
else
  RESERVE=120; CAP=300
  train_args=()
fi
training() (
  cd "$WORK" || exit 1
  box $(( $1 + RESERVE + 60 )) "$PYTHON" -m lsmseg finetune -c "$PACK/finetune.yaml" --data "$PACK" \
    --set "max_seconds=$1" "${train_args[@]}" 2>&1 | tee "$RESULTS/training.log"
  status=$?
  mkdir -p "$RESULTS/training"
  cp "$PACK/finetune.yaml" "$RESULTS/training/" 2>/dev/null
  for f in run.json log.csv training.png; do cp "$RUN/$f" "$RESULTS/training/" 2>/dev/null; done
  exit $status
)
run_training() {
  local seconds=$(( $(left) - RESERVE ))
  [ "$seconds" -gt "$CAP" ] && seconds=$CAP
  [ "$DRY" = 1 ] && seconds=$CAP  # one step: the budget only bounds a slow machine
  if [ "$seconds" -lt 10 ]; then
    echo "=== training: skipped, only $(left) s of the budget left"
    printf 'training\t3\t0\n' >> "$WORK/steps.tsv"
  else
    step training training "$seconds"
  fi
}

# ---------------------------------------------------------------------------------------------- 5. weights
weights() (
  set -e
  cd "$WORK"
  "$PYTHON" -m lsmseg export "$RUN" -o "$WORK/export" --name gpu_general
  "$PYTHON" "$REPO/scripts/gpu_weights.py" split "$WORK/export" "$OUT" --name gpu_general --part-mb "$1"
  "$PYTHON" "$REPO/scripts/gpu_weights.py" join "$OUT/gpu_general.json" -o "$WORK/joined"
  cp "$WORK/export/manifest.yaml" "$RESULTS/training/export-manifest.yaml"
)
run_weights() {
  if [ ! -f "$RUN/best.safetensors" ]; then
    echo "=== weights: skipped, the training run wrote no best.safetensors"
    printf 'weights\t3\t0\n' >> "$WORK/steps.tsv"
  elif [ "$DRY" = 1 ]; then
    step weights weights 4
  else
    step weights weights 15
  fi
}

# ---------------------------------------------------------------------------------------------- the run
wanted cuda-tests && run_tests
wanted bench && step bench bench
wanted training && run_training
wanted training && run_weights

collect
echo "=== done after $(elapsed) s: $(ls "$OUT" | wc -l) file(s) in $OUT"
ls -la "$OUT"
rm -rf "$WORK"
"$PYTHON" -c "import json, sys; sys.exit(0 if json.load(open('$OUT/summary.json'))['ok'] else 1)"
