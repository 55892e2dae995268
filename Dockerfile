# lsmseg inference image: /input volumes -> masks in /output (folder, exec and invoke modes).
#
#   docker build -t lsmseg .                      # exec/folder mode (SELMA3D 2024/2025 style)
#   docker build --target invoke -t lsmseg .      # Grand Challenge invoke API (SELMA3D 2026)
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu126 \
#                --build-arg LSMSEG_EXTRAS= -t lsmseg:cuda .   # GPU: PyTorch runs the network, no OpenVINO
# Without a Docker engine: scripts/build_image.sh [--invoke] (buildah). See docs/container.md.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS runtime

# Debian's python3 and venv only; everything else comes as wheels. apt-get clean: on a base without
# Debian's docker-clean hook (build_image.sh's debootstrap one) the layer kept ~90 MB of apt caches.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv "$VIRTUAL_ENV"

# Runtime dependencies first, torch before the rest (a code or pyproject change does not
# reinstall it). PIP_CERT / PIP_FIND_LINKS are empty on a normal machine; scripts/build_image.sh
# sets them where a proxy CA or a local wheel folder is needed. PIP_EXTRA_INDEX_URL picks a torch
# build (https://download.pytorch.org/whl/cpu for a slim CPU image, .../cu126 for CUDA); pip
# ignores empty values.
ARG PIP_CERT=""
ARG PIP_FIND_LINKS=""
ARG PIP_EXTRA_INDEX_URL=""
ARG TORCH_VERSION=2.13.0
# torch/test is 108 C++ test programs (84 MB) that nothing runs; the test suites of the packages torch
# brings (sympy, networkx, mpmath) go in this layer too (see below).
RUN pip install "torch==${TORCH_VERSION}" \
    && rm -rf "$VIRTUAL_ENV"/lib/python3*/site-packages/torch/test \
    && find "$VIRTUAL_ENV"/lib/python3*/site-packages -depth -type d -name tests \
        -not -path "*/torch/*" -not -path "*/numpy/*" -exec rm -rf {} +

# The package's runtime dependencies from pyproject.toml, plus optional extras, comma-separated
# (e.g. LSMSEG_EXTRAS=openvino,zarr). The default `openvino` (openvino + onnx) runs the network on
# CPU ~1.4x faster than ONNX Runtime (`onnx`), itself 3-4x PyTorch, in less memory
# (benchmarks/README.md); a CUDA image leaves it out (LSMSEG_EXTRAS=): on a GPU the engine is PyTorch.
# The packages' own test suites (scipy, numcodecs...) go in the same layer: nothing imports them at
# run time, except numpy's (numpy.testing imports numpy._core.tests._natype in numpy < 2.3, and scipy
# imports numpy.testing), which stay; the import check below would catch another such case.
ARG LSMSEG_EXTRAS="openvino"
COPY pyproject.toml /opt/lsmseg/pyproject.toml
RUN python3 -c 'import os, tomllib; p = tomllib.load(open("/opt/lsmseg/pyproject.toml", "rb"))["project"]; extras = [e for e in os.environ.get("LSMSEG_EXTRAS", "").split(",") if e]; deps = p["dependencies"] + [d for e in extras for d in p["optional-dependencies"][e]]; print("\n".join(d for d in deps if not d.lower().startswith("torch")))' > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && find "$VIRTUAL_ENV"/lib/python3*/site-packages -depth -type d -name tests \
        -not -path "*/torch/*" -not -path "*/numpy/*" -exec rm -rf {} + \
    && python3 -c "import numpy.testing, scipy.ndimage, scipy.stats, SimpleITK, tifffile, zarr, monai.networks.nets"
# openvino's telemetry (a dependency of openvino) runs on `import openvino`: it writes a client id to
# $HOME/intel and sends a usage event to Google Analytics, and under a read-only root or another uid
# it logs three warnings instead. Without it openvino uses its own no-op stub (openvino.tools.ovc).
RUN pip uninstall --yes openvino-telemetry

# The package itself (no dependencies left to resolve), then the weights.
COPY README.md /opt/lsmseg/README.md
COPY src/lsmseg /opt/lsmseg/src/lsmseg
RUN pip install --no-deps /opt/lsmseg && rm -rf /opt/lsmseg/src /opt/lsmseg/build /opt/lsmseg/*.egg-info
COPY weights/ /opt/lsmseg/weights/
# The bundled weights' network exported to ONNX now, so that no run pays the export: the cache is
# root's and read-only at run time. Other weights (mounted at /opt/ml/model, another checksum) are
# exported to /tmp once per process instead. Skipped without an exported engine's extra
# (openvino or onnx) or without weights.
ENV LSMSEG_CACHE_DIR=/opt/lsmseg/onnx-cache
RUN mkdir -p "$LSMSEG_CACHE_DIR" \
    && if [ -f /opt/lsmseg/weights/manifest.yaml ] \
          && python3 -c 'import sys, lsmseg.inference.engines as e; sys.exit(e.installed_exported_engine() is None)'; then \
        python3 -m lsmseg.inference /opt/lsmseg/weights/manifest.yaml; \
    fi
COPY entrypoint.sh /usr/local/bin/entrypoint.sh

# Not root at run time. Weights mounted at /opt/ml/model (a Grand Challenge model tarball) win
# over the image's own weights in /opt/lsmseg/weights.
RUN useradd --create-home --uid 1001 --user-group user \
    && mkdir -p /input /output /opt/ml/model \
    && chown user:user /output
USER 1001:1001
WORKDIR /home/user
ENV LSMSEG_BUNDLED_WEIGHTS=/opt/lsmseg/weights
# The version is pyproject.toml's, kept in step by hand (tests/integration/test_container.py checks it).
LABEL org.opencontainers.image.title="lsmseg" \
      org.opencontainers.image.description="3-D light-sheet microscopy segmentation: /input volumes -> masks in /output" \
      org.opencontainers.image.version="0.1.0"
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]

# Grand Challenge invoke API: the label makes the platform start the container as a server on
# port 4743 (GET /health, POST /invoke) instead of running it once per case.
FROM runtime AS invoke
LABEL org.grand-challenge.api-method="invoke"
# Outside a container the server binds 127.0.0.1; here the platform must reach it from outside.
ENV LSMSEG_MODE=invoke \
    LSMSEG_HOST=0.0.0.0
EXPOSE 4743

# Default target: exec mode when /input/images exists, folder mode otherwise.
FROM runtime AS default
