#!/usr/bin/env bash
# Build the lsmseg OCI image with buildah (no Docker engine needed).
#
#   scripts/build_image.sh [--invoke] [--tag NAME] [-- EXTRA BUILDAH ARGS]
#
# Tags localhost/lsmseg:latest, or localhost/lsmseg:invoke with --invoke, unless --tag is given.
#
# --invoke builds the Grand Challenge invoke variant (Dockerfile target `invoke`: label
# org.grand-challenge.api-method="invoke", starts the HTTP server by default); without it the
# image runs in exec/folder mode. As root on a Debian machine the script installs podman/buildah
# if missing, configures them (../shared/container/README.md) and, when the base image is not
# present locally (no registry reachable), makes it with debootstrap from the apt mirror.
# With Docker instead: docker build [--target invoke] -t lsmseg .
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=""
TARGET="default"
BASE_IMAGE="${BASE_IMAGE:-docker.io/library/debian:bookworm-slim}"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --invoke) TARGET="invoke"; shift ;;
    --tag) TAG="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/{/^set/!p}' "$0"; exit 0 ;;
    *) echo "build_image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

TAG="${TAG:-localhost/lsmseg:$([ "$TARGET" = invoke ] && echo invoke || echo latest)}"

log() { printf '[build_image] %s\n' "$*" >&2; }

if ! command -v buildah >/dev/null || ! command -v podman >/dev/null; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    log "installing podman/buildah (apt)"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman buildah runc debootstrap uidmap >/dev/null
  else
    log "buildah and podman are needed (apt-get install podman buildah runc debootstrap uidmap)"
    exit 1
  fi
fi

# The default ulimits make the OCI runtime fail here and crun refuses this cgroup mode: use runc.
if [ "$(id -u)" = "0" ] && ! grep -qs 'runtime *= *"runc"' /etc/containers/containers.conf; then
  log "configuring /etc/containers/containers.conf (runc, no default ulimits)"
  mkdir -p /etc/containers
  cat > /etc/containers/containers.conf <<'CONF'
[containers]
default_ulimits = []
[engine]
runtime = "runc"
CONF
fi

# No registry here: make the Debian base image from the apt mirror when it is not present.
if ! podman image exists "$BASE_IMAGE" 2>/dev/null; then
  if ! podman pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    case "$BASE_IMAGE" in
      *debian:bookworm-slim)
        command -v debootstrap >/dev/null || { log "debootstrap is needed to make $BASE_IMAGE"; exit 1; }
        MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        MIRROR=${MIRROR:-http://deb.debian.org/debian}
        ROOTFS=$(mktemp -d /tmp/lsmseg-rootfs.XXXXXX)
        log "making $BASE_IMAGE with debootstrap from $MIRROR"
        debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >/dev/null
        tar -C "$ROOTFS" -c . | podman import -q - "$BASE_IMAGE" >/dev/null
        rm -rf "$ROOTFS"
        ;;
      *) log "base image $BASE_IMAGE is neither present nor pullable"; exit 1 ;;
    esac
  fi
fi

ARGS=(--isolation chroot --layers --target "$TARGET" -t "$TAG" --build-arg "BASE_IMAGE=$BASE_IMAGE")
# Package downloads inside RUN go through this machine's proxy: hand pip the host CA bundle.
if [ -r /etc/ssl/certs/ca-certificates.crt ]; then
  ARGS+=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt)
fi
# A local wheel folder (here: the CPU build of torch) keeps pip from fetching a multi-GB CUDA torch.
if [ -n "${PIP_FIND_LINKS:-}" ] && [ -d "$PIP_FIND_LINKS" ]; then
  ARGS+=(-v "$PIP_FIND_LINKS":/wheels:ro --build-arg PIP_FIND_LINKS=/wheels)
fi
# Optional extras of pyproject.toml baked into the image (the Dockerfile's default: openvino; e.g.
# LSMSEG_EXTRAS=openvino,zarr; LSMSEG_EXTRAS= for none).
if [ -n "${LSMSEG_EXTRAS+set}" ]; then
  ARGS+=(--build-arg "LSMSEG_EXTRAS=$LSMSEG_EXTRAS")
fi
mkdir -p weights  # the image copies weights/ (possibly empty: then weights come from /opt/ml/model)

log "buildah bud --target $TARGET -t $TAG"
start=$(date +%s)
buildah bud "${ARGS[@]}" "${EXTRA[@]}" .
log "built $TAG in $(( $(date +%s) - start )) s"
