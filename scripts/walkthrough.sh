#!/usr/bin/env bash
# A new user's first hour, run as written: a fresh clone of this repository's committed state, a
# fresh venv, then the commands of README.md, evaluation/README.md and training/README.md.
#
#   scripts/walkthrough.sh [--full] [--system-site-packages] [WORKDIR]
#
# Default (about 35 min on 2 shared CPU cores on 2026-12-07, when README's first command installed
# no engine extra and PyTorch ran the network; the openvino extra it installs now makes the predicting
# steps ~3.5x faster): README's first command (install + predict the sample), the README's Python
# snippet, the eval extra + `lsmseg evaluate` on the sample, the training pipeline on the smoke
# configs (pretrain -> finetune -> export -> predict with the export, ~3 min), and with real data
# present (LSMSEG_DATA, else ../shared/data/real) the training README's comparison of the previous
# weights (~6 min) and README's test-split validation for microglia (~11 min with PyTorch; its
# figures are README's microglia column). The other structures are predicted mirrored (8 passes
# per window), so only --full validates them.
# --full adds README's test command (the whole suite, ~20 min in two workers), the whole test split's validation
# and the previous weights' two training runs (~50 min).
# --system-site-packages lets the venv see this interpreter's packages (an already-downloaded torch)
# where the network cannot fetch them; the lsmseg packages still come from the clone.
#
# CI: .ci/run runs it only with LSMSEG_WALKTHROUGH=1 (a second torch install, the sample and the
# real data would add ~35 min to a ~20 min run); run it before a release or after changing the docs.
set -euo pipefail
full=0 venv_flags=()
while [ $# -gt 0 ]; do
  case "$1" in
    --full) full=1 ;;
    --system-site-packages) venv_flags+=(--system-site-packages) ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) break ;;
  esac
  shift
done
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d -t lsmseg-walkthrough-XXXX)}"
mkdir -p "$work"
export LSMSEG_DATA="${LSMSEG_DATA:-$(cd "$repo/.." && pwd)/shared/data/real}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
unset PYTHONPATH LSMSEG_WEIGHTS

step() {
  local start=$SECONDS
  echo "== $*"
  bash -euo pipefail -c "$*"
  echo "   ok, $((SECONDS - start)) s"
}

rm -rf "$work/lsmseg" "$work/venv"
git clone -q "$repo" "$work/lsmseg"
python3 -m venv "${venv_flags[@]}" "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
cd "$work/lsmseg"
echo "walkthrough in $work/lsmseg ($(git log -1 --format=%h)), venv $work/venv, LSMSEG_DATA=$LSMSEG_DATA"

# README.md: two commands on a fresh machine (the first one)
step 'pip install torch==2.13.0 -e ".[openvino]" && lsmseg predict sample/images -o sample-masks'
step 'test "$(ls sample-masks/*.tif | wc -l)" = 3 && test -z "$(git status --porcelain)"'  # .gitignore'd
# README.md: the Python snippet, extracted verbatim
step "python - <<'PY'
import re, pathlib
code = re.search(r'\`\`\`python\n(.*?)\`\`\`', pathlib.Path('README.md').read_text(), re.S).group(1)
exec(compile(code, 'README.md', 'exec'))
PY"
# evaluation/README.md: the extra, then scoring the masks against the sample's labels
step 'lsmseg evaluate --pred sample-masks --labels sample/labels --out runs/eval-sample || test $? = 1'
step 'pip install -q -e ".[eval]"'
step 'lsmseg evaluate --pred sample-masks --labels sample/labels --images sample/images --out runs/eval-sample'
# training/README.md on the smoke configs: pretrain, fine-tune, export (to the run's export/), predict
step 'pip install -q -e ".[train]"'
step 'lsmseg pretrain -c training/configs/smoke_pretrain.yaml && lsmseg finetune -c training/configs/smoke_finetune.yaml'
step 'test -f runs/smoke/finetune/training.png'
step 'lsmseg export runs/smoke/finetune && ! lsmseg export runs/smoke/finetune -o weights'  # refuses to replace
step 'lsmseg predict sample/images -o runs/smoke-masks --weights runs/smoke/finetune/export --save-probabilities runs/smoke-prob'
if [ -d "$LSMSEG_DATA/vesselnn" ]; then
  # training/README.md's table is the previous weights', made from git history as it says
  step 'mkdir -p runs/general/previous && git show a6dbc64:weights/general.safetensors > runs/general/previous/general.safetensors \
    && git show a6dbc64:weights/manifest.yaml > runs/general/previous/manifest.yaml'
  step 'python -m lsmseg_training.compare --weights runs/general/previous \
    --images "$LSMSEG_DATA/vesselnn/images" --labels "$LSMSEG_DATA/vesselnn/labels" \
    --names poon2015_BBB_Leakage santos2015_mixedSizelowContrastVessels'
  # README's validation command, one structure: all 78 cases (no --split), mirrored, would take hours
  step 'python -m lsmseg_evaluation.validate_shipped --split training/configs/general_finetune_real.yaml --set test --baseline \
    --structures microglia --out runs/validate-test-microglia'
else
  echo "== real data not found at $LSMSEG_DATA: comparison and validation skipped"
fi
if [ "$full" = 1 ]; then
  step 'pip install -q torch==2.13.0 -e ".[dev]" && python -m pytest tests -n 2 --dist loadfile'
  step 'python -m lsmseg_evaluation.validate_shipped --split training/configs/general_finetune_real.yaml --set test --baseline'
  step 'lsmseg pretrain -c training/configs/general_pretrain.yaml && lsmseg finetune -c training/configs/general_finetune_long.yaml'
  step 'lsmseg export runs/general/finetune_long --name general --min-component-voxels 10'
fi
echo "walkthrough passed ($SECONDS s)"
