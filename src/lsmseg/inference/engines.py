"""Execution engines for the network on CPU: PyTorch, or ONNX Runtime or OpenVINO on the exported network.

On CPU, ONNX Runtime runs the Swin UNETR of the shipped weights 3-4x faster than PyTorch (eager) with
the same logits within float tolerance, and OpenVINO faster still (benchmarks/README.md). Both are
optional dependencies (``pip install lsmseg[onnx]``, ``lsmseg[openvino]``); ``auto`` takes OpenVINO,
else ONNX Runtime, else PyTorch. Both run the same ONNX file. The network is exported once
per weights and window shape into a cache folder (``LSMSEG_CACHE_DIR``, default
``~/.cache/lsmseg``), keyed by the weights' SHA-256 (or a hash of the parameters), written atomically;
``python -m lsmseg.inference [MANIFEST]`` fills the cache ahead of time (e.g. while building an image).
OpenVINO's compiled model is cached there too (``openvino/``, per weights, window, OpenVINO version,
CPU and settings): compiling takes 0.6-2.7 s per process here, importing the compiled model 0.2-0.5 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import OutputError
from ..io import atomic_output

logger = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime", "openvino")
# The engines that run the ONNX export, fastest first (benchmarks/README.md): ``auto``'s order.
EXPORTED_ENGINES = ("openvino", "onnxruntime")
# Bump when the export changes (opset, axes), so that stale cached files are not reused.
EXPORT_VERSION = 1


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime and onnx (for the export) are installed (``lsmseg[onnx]``)."""
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def openvino_available() -> bool:
    """Whether OpenVINO and onnx (for the export) are installed (``lsmseg[openvino]``)."""
    return importlib.util.find_spec("openvino") is not None and importlib.util.find_spec("onnx") is not None


_AVAILABLE = {"onnxruntime": onnxruntime_available, "openvino": openvino_available}
_EXTRA = {"onnxruntime": "the onnxruntime and onnx packages (pip install lsmseg[onnx])",
          "openvino": "the openvino and onnx packages (pip install lsmseg[openvino])"}


def installed_exported_engine() -> str | None:
    """The fastest exported engine whose packages are installed; None when neither is."""
    return next((engine for engine in EXPORTED_ENGINES if _AVAILABLE[engine]()), None)


def resolve_engine(engine: str, device: torch.device, precision: str, compile: bool) -> str:
    """The engine to use: ``auto`` is OpenVINO, else ONNX Runtime, on CPU in fp32 when installed, else PyTorch.

    Args:
        engine: ``"auto"``, ``"torch"``, ``"onnxruntime"`` or ``"openvino"``.
        device: where the model runs.
        precision: the predictor's precision (the exported engines run fp32 only).
        compile: whether the model is ``torch.compile``-d (then PyTorch).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    cpu_fp32 = device.type == "cpu" and precision in ("auto", "fp32") and not compile
    if engine in EXPORTED_ENGINES:
        if not cpu_fp32:
            raise ValueError(f"engine '{engine}' runs on CPU in fp32 only (no --compile, no bf16/fp16)")
        if not _AVAILABLE[engine]():
            raise ValueError(f"engine '{engine}' needs {_EXTRA[engine]}")
        return engine
    if engine == "auto":
        return (installed_exported_engine() if cpu_fp32 else None) or "torch"
    return engine


def exported_engine(engine: str, model: torch.nn.Module, sha256: str | None = None, threads: int | None = None,
                    batch_size: int = 4):
    """The engine object that runs ``model``'s ONNX export for ``engine``; None for PyTorch.

    Args:
        engine: a resolved engine (:func:`resolve_engine`).
        model: the network.
        sha256: its checkpoint's SHA-256, if known; the export's cache key (:func:`model_key`,
            which otherwise hashes the weights, so only for an exported engine).
        threads: intra-op threads (default: torch's).
        batch_size: windows per call (``InferenceSettings.sw_batch_size``); OpenVINO splits
            batches of two or more across its streams (:func:`openvino_streams`).
    """
    if engine not in EXPORTED_ENGINES:
        return None
    if engine == "openvino":
        return OpenVinoEngine(model, model_key(model, sha256), threads, batch_size)
    return OnnxEngine(model, model_key(model, sha256), threads)


def model_key(model: torch.nn.Module, sha256: str | None = None) -> str:
    """A stable key for a model's weights: the checkpoint's SHA-256 if known, else a hash of its tensors.

    Args:
        model: the network.
        sha256: its checkpoint's SHA-256, if known.
    """
    if sha256:
        return sha256[:16]
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """The export cache folder: ``LSMSEG_CACHE_DIR``, else ``~/.cache/lsmseg``."""
    return Path(os.environ.get("LSMSEG_CACHE_DIR") or Path.home() / ".cache" / "lsmseg")


def export_dir() -> Path:
    """Where the network's ONNX exports are cached: ``<cache_dir()>/onnx``."""
    return cache_dir() / "onnx"


def writable_folder(folder: Path) -> bool:
    """Whether ``folder`` exists (made if need be) and this process may write there; an image's
    prefilled cache is not, for its non-root user."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.access(folder, os.W_OK | os.X_OK)
    except OSError:
        return False


class OnnxEngine:
    """Runs ``model`` through ONNX Runtime, one session per window shape (batch size is dynamic).

    Sessions are created on first use and never pickled (dask workers build their own).
    """

    def __init__(self, model: torch.nn.Module, key: str, threads: int | None = None):
        self.model = model
        self.key = key
        self.threads = threads
        self._sessions: dict[tuple[int, ...], object] = {}
        # Per window shape: the ONNX file used and whether this process exported it (for provenance).
        self.models: dict[tuple[int, ...], dict] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_sessions"] = {}
        return state

    def path_for(self, window: Sequence[int]) -> Path:
        shape = "x".join(str(int(w)) for w in window)
        return export_dir() / f"{self.key}_{shape}_v{EXPORT_VERSION}.onnx"

    def export(self, window: Sequence[int]) -> Path:
        """The network exported for windows of ``window``: the cached file, or an export now.

        A cache folder this process cannot write (an image's, prefilled at build time for its own
        weights) gets an export to a temporary folder for this process instead, with one warning.
        """
        window = tuple(int(w) for w in window)
        path = self.path_for(window)
        if path.is_file():
            self.models[window] = {"window": list(window), "file": str(path), "exported": False, "cached": True}
            return path
        writable = writable_folder(path.parent)
        if writable:
            logger.info("exporting the network to ONNX for windows %s (once per weights and window)", window)
        else:
            folder = Path(tempfile.mkdtemp(prefix="lsmseg-onnx-"))
            path = folder / path.name
            logger.warning("ONNX cache %s not writable (weights %s not prefilled there); exporting the network "
                           "for windows %s to %s for this process only", cache_dir(), self.key, window, folder)
        example = torch.zeros(1, 1, *window)
        # Atomic: a concurrent process (another dask worker) sees the whole file or none.
        with atomic_output(path) as tmp, torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and training-mode notes
            torch.onnx.export(
                self.model.cpu().eval(), (example,), str(tmp), opset_version=17, dynamo=False,
                input_names=["windows"], output_names=["logits"],
                dynamic_axes={"windows": {0: "n"}, "logits": {0: "n"}},
            )
            os.chmod(tmp, 0o644)  # readable by an image's non-root user (the cache is built as root)
        self.models[window] = {"window": list(window), "file": str(path), "exported": True, "cached": writable}
        return path

    def describe(self) -> list[dict]:
        """The ONNX files this process used, per window shape: cache hit (exported False) or export;
        for OpenVINO also its compiled model's cache file (``compiled_model``; ``imported``: read
        from the cache, with no ONNX file needed, or written there after compiling)."""
        return [dict(entry) for entry in self.models.values()]

    def session(self, window: Sequence[int]):
        window = tuple(int(w) for w in window)
        if window not in self._sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads or torch.get_num_threads()
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            self._sessions[window] = ort.InferenceSession(
                str(self.export(window)), options, providers=["CPUExecutionProvider"]
            )
        return self._sessions[window]

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(windows.detach().cpu().numpy(), dtype=np.float32)
        (logits,) = self.session(batch.shape[2:]).run(None, {"windows": batch})
        return torch.from_numpy(logits)


_openvino_import_lock = threading.Lock()


def import_openvino():
    """``import openvino`` without its usage telemetry, and return the module.

    Importing openvino imports its model converter, which sends a usage event to Google Analytics
    (openvino-telemetry) unless the user opted out with ``opt_in_out --opt_out``; lsmseg runs on lab
    and challenge data and sends nothing anywhere. With ``openvino_telemetry`` unimportable while
    openvino loads, the converter takes its own no-op stub; the block is lifted afterwards, so the
    process may import openvino_telemetry for its own use later (one imported before, or a block the
    application set itself, is left as it was). While openvino loads, no other thread can import
    openvino_telemetry either. Where openvino was imported before lsmseg's first use, its telemetry
    is as that import left it.
    """
    # One thread at a time: a second one would otherwise find the half-loaded module in sys.modules.
    with _openvino_import_lock:
        if "openvino" not in sys.modules:
            blocked = "openvino_telemetry" not in sys.modules
            if blocked:
                sys.modules["openvino_telemetry"] = None
            try:
                import openvino  # noqa: F401
            finally:
                if blocked and sys.modules.get("openvino_telemetry", 0) is None:
                    del sys.modules["openvino_telemetry"]
        import openvino  # waits for a plain import another thread may have under way
    return openvino


_openvino_core = None
_openvino_core_lock = threading.Lock()


def openvino_core():
    """The process's one OpenVINO ``Core``, created on first use and never released.

    One only, because each Core's CPU plugin installs an alternate signal stack of its own for the
    thread that creates it and unmaps it when released, restoring the stack it found: two Cores
    released in the order they were made leave the thread's alternate stack unmapped, and the next
    signal handled there (SIGTERM from ``docker stop``, Ctrl-C) kills the process with a segfault
    (OpenVINO 2026.4; tests/unit/test_engines.py keeps it from coming back).
    """
    global _openvino_core
    with _openvino_core_lock:
        if _openvino_core is None:
            _openvino_core = import_openvino().Core()
        return _openvino_core


def openvino_streams(threads: int, batch_size: int = 4) -> int:
    """How many OpenVINO CPU streams (infer requests running side by side, each on a share of the
    threads) an engine of ``threads`` threads uses for batches of ``batch_size`` windows: two from
    two threads and two windows on, else one.

    A batch of windows split across two streams ran 1.03-1.19x faster end to end than the whole
    batch on one stream of both threads, on 2 cores, with identical logits
    (benchmarks/README.md, "OpenVINO on two streams"); more than two streams was not measured on
    more cores, so it is not used. A stream runs on its share of the threads only, so batches of
    one window stay on one stream of them all.
    """
    return 2 if threads >= 2 and batch_size >= 2 else 1


def openvino_config(threads: int, batch_size: int = 4) -> dict:
    """OpenVINO's CPU settings for lsmseg: fp32 pinned (its default is bf16 on CPUs with AMX or
    AVX-512 BF16, which would make masks depend on the machine), latency-bound streams
    (:func:`openvino_streams`) sharing ``threads``."""
    return {"INFERENCE_NUM_THREADS": int(threads), "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": openvino_streams(int(threads), int(batch_size))}


def run_split(requests: Sequence, batch: np.ndarray) -> np.ndarray:
    """``batch`` split into as many parts as there are OpenVINO infer ``requests`` (at most one
    window each), run side by side, their logits joined in order (a new array). Every request
    started is waited for, also when another fails, so none is left busy for the next call."""
    parts = np.array_split(batch, min(len(requests), len(batch)))
    started = []
    try:
        for request, part in zip(requests, parts):
            request.start_async({0: part})
            started.append(request)
    finally:
        for request in started:
            request.wait()
    return np.concatenate([request.get_output_tensor(0).data for request in started])


class OpenVinoEngine(OnnxEngine):
    """Runs the same ONNX export through OpenVINO's CPU plugin, one compiled model per window shape.

    Precision is pinned to fp32 (:func:`openvino_config`). With two streams (:func:`openvino_streams`,
    for ``batch_size`` windows per call) each batch is split in two halves that run side by side,
    one infer request each; a window's logits do not depend on the batch it runs in. A lone window
    (the background level's, a block's last batch of one) runs on one stream's threads. Calls are
    serialised (the infer requests are reused), so one engine may be shared by threads.
    """

    def __init__(self, model: torch.nn.Module, key: str, threads: int | None = None, batch_size: int = 4):
        super().__init__(model, key, threads)
        self.batch_size = int(batch_size)
        self._lock = threading.Lock()
        self._requests: dict[tuple[int, ...], list] = {}  # per window shape, one infer request per stream

    def __getstate__(self):
        state = super().__getstate__()
        del state["_lock"]
        state["_requests"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def config(self) -> dict:
        return openvino_config(self.threads or torch.get_num_threads(), self.batch_size)

    def blob_path(self, window: Sequence[int]) -> Path:
        """Where the compiled model for ``window`` is cached: one file per weights, window, OpenVINO
        build, CPU model and settings (a blob is never imported where it was not compiled alike)."""
        ov = import_openvino()
        config = self.config()
        tag = "|".join([ov.__version__, openvino_core().get_property("CPU", "FULL_DEVICE_NAME"),
                        *(f"{k}={config[k]}" for k in sorted(config))])
        shape = "x".join(str(int(w)) for w in window)
        digest = hashlib.sha256(tag.encode()).hexdigest()[:12]
        return cache_dir() / "openvino" / f"{self.key}_{shape}_v{EXPORT_VERSION}_{digest}.blob"

    def session(self, window: Sequence[int]):
        window = tuple(int(w) for w in window)
        if window not in self._sessions:
            compiled = self._compile(window, self.blob_path(window))
            # One infer request per stream the model was compiled (or imported) with; none for one.
            streams = int(compiled.get_property("NUM_STREAMS"))
            self._requests[window] = [compiled.create_infer_request() for _ in range(streams)] if streams > 1 else []
            self._sessions[window] = compiled
        return self._sessions[window]

    def cache_compiled(self, window: Sequence[int]) -> Path | None:
        """Compile the model for ``window`` into the cache now, unless it is there, and release it (a
        later call imports it). The cached file, or None where the cache is not writable."""
        window = tuple(int(w) for w in window)
        blob = self.blob_path(window)
        if not blob.is_file():
            with self._lock:
                self._compile(window, blob)
        return blob if blob.is_file() else None

    def _compile(self, window: tuple[int, ...], blob: Path):
        """The compiled model: imported from ``blob`` (its :meth:`blob_path`), else compiled and cached there."""
        core, config = openvino_core(), self.config()
        if blob.is_file():
            try:
                compiled = core.import_model(blob.read_bytes(), "CPU", config)
                self.models[window] = {"window": list(window), "compiled_model": str(blob), "imported": True}
                return compiled
            except (OSError, RuntimeError) as exc:  # a blob this OpenVINO cannot read: compile anew
                logger.warning("%s: cannot import the compiled model (%s); compiling it again",
                               blob, str(exc).strip().splitlines()[-1])
        compiled = core.compile_model(str(self.export(window)), "CPU", config)
        if writable_folder(blob.parent):
            try:
                # Atomic: another process (a dask worker) imports the whole blob or finds none.
                with atomic_output(blob) as tmp:
                    tmp.write_bytes(compiled.export_model().getvalue())
                    os.chmod(tmp, 0o644)
                self.models[window].update(compiled_model=str(blob), imported=False)
            except OutputError as exc:  # e.g. a full disk: this run goes on without the cache
                logger.warning("%s", exc)
        return compiled

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(windows.detach().cpu().numpy(), dtype=np.float32)
        window = tuple(int(w) for w in batch.shape[2:])
        with self._lock:
            compiled, requests = self.session(window), self._requests[window]
            if min(len(requests), len(batch)) < 2:
                logits = compiled(batch, share_outputs=False)[0]
            else:
                logits = run_split(requests, batch)
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))
