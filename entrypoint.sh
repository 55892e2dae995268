#!/bin/sh
# lsmseg container entrypoint: segment every volume in /input, write masks to /output.
#
#   (no arguments)          LSMSEG_MODE, else exec mode when /input/images exists, else folder mode
#   folder|exec|invoke ...  that mode; further options go to `lsmseg challenge` (see --help)
#   --OPTION ...            options for `lsmseg challenge` (e.g. --mode invoke --port 8080)
#   COMMAND ...             any other lsmseg command, e.g. `predict /input/x.tif -o /output`
#
# Environment: LSMSEG_MODE, LSMSEG_INPUT (/input), LSMSEG_OUTPUT (/output), LSMSEG_INPUT_SLUG,
# LSMSEG_OUTPUT_SLUG, LSMSEG_PORT (4743), LSMSEG_DEVICE (cuda when visible, else cpu), LSMSEG_ENGINE (auto),
# LSMSEG_MIRROR_AXES (the manifest's per structure; none|all|ZYX), LSMSEG_WEIGHTS (a manifest; default /opt/ml/model, then the image's weights).
# Exit codes: 0 all volumes segmented (or none found), 1 any volume failed or no usable weights,
# 2 bad arguments, 143 SIGTERM (docker stop) and 130 Ctrl-C in folder/exec modes (invoke: 0).
# Every branch execs, so lsmseg is the container's PID 1 and receives the signals itself.
set -eu
case "${1:-}" in
  folder|exec|invoke)
    mode="$1"
    shift
    exec lsmseg challenge --mode "$mode" "$@"
    ;;
  --version)
    exec lsmseg --version
    ;;
  "" | -*)
    exec lsmseg challenge "$@"
    ;;
  *)
    exec lsmseg "$@"
    ;;
esac
