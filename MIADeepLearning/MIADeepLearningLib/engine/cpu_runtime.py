"""A faster CPU path for the networks where the CPU has no native bf16: OpenVINO, checked against PyTorch.

Most clinicians' computers have no native bf16 (AVX512-BF16 / AMX), so PyTorch runs the networks in fp32 there. On
such a CPU (2 Zen cores, AVX2) OpenVINO runs the project's 3D U-Nets 1.7-3x faster than PyTorch fp32 at fp32
precision (Testing/Benchmarks/cpu_speed.py); ONNX Runtime reached 1.1-1.5x and channels-last PyTorch 0.7-1.4x.
PyTorch stays the reference and the fallback:

- a network is converted once (torch.jit.trace on a small input, then OpenVINO's converter) and the converted model
  is cached under <cache>/cpu-runtime/ with the sha256 of its files, which is checked on every load (a changed file
  is converted again); the key is the network's weights (their sha256), its input channels and OpenVINO's version;
- before OpenVINO is used for a network on a machine, its first call runs both paths on the same input and keeps
  OpenVINO only if it gives the same answer (labels: >= 99.9 % of voxels keep their label; intensities: the largest
  difference <= 0.2 % of the output's range) and is faster; the decision is stored beside the converted model, keyed
  by the machine (CPU model, native bf16, threads, OpenVINO's version), so later runs on that machine skip the
  check. The decision and why are in every run's provenance and in the device report;
- anything that goes wrong (OpenVINO missing, a network it cannot convert, a failed check) leaves PyTorch in charge
  with one sentence saying why.

Where the CPU has native bf16 the engine's bf16 autocast path (engine/inference.py) is kept as it was: OpenVINO is
not measured there by this project. `MIADL_CPU_RUNTIME` = auto (default) | openvino (also with native bf16, still
checked) | pytorch (never OpenVINO; benchmarks compare the paths with it).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch

from MIADeepLearningLib import paths
from MIADeepLearningLib.engine import devices

RUNTIME_ENV = "MIADL_CPU_RUNTIME"
RUNTIME_MODES = ("auto", "openvino", "pytorch")
PYTORCH = "pytorch"
LABEL_AGREEMENT = 0.999  # share of voxels that must keep their label under OpenVINO
INTENSITY_TOLERANCE = 0.002  # largest |OpenVINO - PyTorch| allowed, as a share of PyTorch's output range
SPEED_NEEDED = 1.1  # OpenVINO must be at least this much faster than PyTorch fp32 in the check to be used
TRACE_SIZE = 32  # spatial size of the input the network is traced with (rounded up to its size multiple)
OUTPUT_KINDS = ("labels", "intensities")


# ------------------------------------------------------------------------------------------------ availability


def _openvino() -> Any:
    """The openvino module, imported so that its converter's usage telemetry (on by default in the converter, sent
    to a web analytics service) is replaced by its built-in offline stub: nothing about a clinician's use leaves the
    machine. Works when this is the process's first import of openvino (the worker's and the CLI's case)."""
    if "openvino" not in sys.modules and "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # its importers fall back to the stub
    import openvino

    return openvino


def mode() -> str:
    """The runtime the user asked for with MIADL_CPU_RUNTIME (auto when unset or unknown)."""
    value = os.environ.get(RUNTIME_ENV, "auto").strip().lower()
    return value if value in RUNTIME_MODES else "auto"


def openvino_version() -> str | None:
    """OpenVINO's version, or None when it is not installed (it is optional: PyTorch runs every network)."""
    try:
        openvino = _openvino()
    except Exception:
        return None
    return str(openvino.get_version()).split("-")[0]


def unavailable_reason(device: torch.device) -> str | None:
    """None when OpenVINO may run networks for `device`, else why not (one phrase, for provenance)."""
    if device.type != "cpu":
        return f"the network runs on {device.type.upper()}"
    chosen = mode()
    if chosen == PYTORCH:
        return f"{RUNTIME_ENV}=pytorch"
    if chosen == "auto" and devices.cpu_has_native_bf16():
        return "this CPU has native bf16: PyTorch's bf16 path is used"
    if openvino_version() is None:
        return "OpenVINO is not installed"
    return None


def machine_key() -> str:
    """What a stored decision is valid for: the CPU, whether it has native bf16, the threads and OpenVINO's
    version (a new OpenVINO or another thread count is checked anew)."""
    bf16 = "bf16" if devices.cpu_has_native_bf16() else "no-bf16"
    return f"{devices.cpu_name()} | {bf16} | {torch.get_num_threads()} threads | openvino {openvino_version()}"


def status() -> dict[str, Any]:
    """For the device report: which CPU runtime networks get here and the decisions stored on this machine."""
    reason = unavailable_reason(torch.device("cpu"))
    stored: list[dict[str, Any]] = []
    folder = cache_folder()
    key = machine_key()
    if folder.is_dir():
        for sidecar in sorted(folder.glob("*.json")):
            try:
                record = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            decision = record.get("decisions", {}).get(key)
            if decision:
                stored.append({"network": record.get("network"), "weights_sha256": record.get("weights_sha256"),
                               "runtime": decision.get("runtime"), "why": decision.get("note")})
    return {"mode": mode(), "openvino": openvino_version(), "native_bf16": devices.cpu_has_native_bf16(),
            "cpu_runtime": "openvino (checked per network)" if reason is None else f"pytorch: {reason}",
            "decisions_on_this_machine": stored}


# ---------------------------------------------------------------------------------------------- conversion cache


def cache_folder() -> Path:
    return paths.cache_dir() / "cpu-runtime"


def weights_fingerprint(network: torch.nn.Module) -> str:
    """sha256 over the network's class, parameter names, shapes and values: the same weights give the same key in
    every process, so a network is converted once per machine."""
    digest = hashlib.sha256(type(network).__name__.encode())
    for name, tensor in network.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, record: dict[str, Any]) -> None:
    """Atomically (another worker may read it at the same time)."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(partial, path)


def _trace_input(batch: torch.Tensor, multiple: int) -> torch.Tensor:
    """A small input of the batch's channels to trace with: the network's graph does not depend on the size."""
    size = max(multiple, -(-TRACE_SIZE // multiple) * multiple)
    spatial = [min(int(n), size) for n in batch.shape[2:]]
    return batch[(slice(0, 1), slice(None), *(slice(0, n) for n in spatial))].contiguous().cpu().float()


def _convert(network: torch.nn.Module, example: torch.Tensor) -> Any:
    """The network as an OpenVINO model with dynamic batch and spatial sizes."""
    openvino = _openvino()

    shape = openvino.PartialShape([-1, int(example.shape[1])] + [-1] * (example.ndim - 2))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warns about every shape check it freezes; the check catches those
        source: Any = network
        if not isinstance(network, torch.jit.ScriptModule) and hasattr(torch.jit, "trace"):
            # a traced module converts in ~1 s; OpenVINO's own tracing of the module took ~20 s here
            source = torch.jit.trace(network, example, check_trace=False)
        return openvino.convert_model(source, example_input=example, input=[shape])


class _CachedModel:
    """The converted model's files (<key>.xml/.bin) and their sidecar (<key>.json: checksums, decisions)."""

    def __init__(self, network: torch.nn.Module, channels: int) -> None:
        self.fingerprint = weights_fingerprint(network)
        self.network_name = type(network).__name__
        key = f"{self.fingerprint[:32]}-c{channels}-ov{openvino_version()}"
        folder = cache_folder()
        self.xml, self.bin, self.sidecar = (folder / f"{key}{suffix}" for suffix in (".xml", ".bin", ".json"))

    def record(self) -> dict[str, Any]:
        try:
            return json.loads(self.sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def load(self) -> tuple[Any | None, str]:
        """(the stored model, '') when its files are there and match their checksums, else (None, why not)."""
        openvino = _openvino()

        record = self.record()
        if not (self.xml.is_file() and self.bin.is_file() and record):
            return None, "converted for the first time"
        if _file_sha256(self.xml) != record.get("xml_sha256") or _file_sha256(self.bin) != record.get("bin_sha256"):
            return None, "its stored conversion failed the sha256 check and was converted again"
        return openvino.Core().read_model(str(self.xml)), ""

    def save(self, model: Any) -> None:
        openvino = _openvino()

        self.xml.parent.mkdir(parents=True, exist_ok=True)
        openvino.save_model(model, str(self.xml), compress_to_fp16=False)
        record = self.record()
        record.update({"network": self.network_name, "weights_sha256": self.fingerprint,
                       "openvino": openvino_version(), "xml_sha256": _file_sha256(self.xml),
                       "bin_sha256": _file_sha256(self.bin)})
        record.setdefault("decisions", {})
        _write_json(self.sidecar, record)

    def decision(self) -> dict[str, Any] | None:
        return self.record().get("decisions", {}).get(machine_key())

    def store_decision(self, decision: dict[str, Any]) -> None:
        record = self.record()
        if not record:
            return
        record.setdefault("decisions", {})[machine_key()] = decision
        _write_json(self.sidecar, record)


class OpenVinoNetwork:
    """Runs a converted network like the PyTorch module: (N, C, ...) float32 tensor in, float32 tensor out (a tuple
    when the network has several outputs)."""

    def __init__(self, model: Any) -> None:
        openvino = _openvino()

        core = openvino.Core()
        properties = {"INFERENCE_NUM_THREADS": max(1, torch.get_num_threads()), "INFERENCE_PRECISION_HINT": "f32",
                      "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = core.compile_model(model, "CPU", properties)
        self.request = self.compiled.create_infer_request()
        self.outputs = len(self.compiled.outputs)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        inputs = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        results = self.request.infer({0: inputs}, share_inputs=True)
        tensors = tuple(torch.from_numpy(results[index].copy()) for index in range(self.outputs))
        return tensors[0] if self.outputs == 1 else tensors


# ------------------------------------------------------------------------------------------------- the runner


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def agreement(candidate: torch.Tensor, reference: torch.Tensor, output_kind: str) -> tuple[bool, str]:
    """Whether `candidate` gives the reference's answer: labels (argmax over channels; one channel: both the logit
    and the probability threshold) on >= LABEL_AGREEMENT of voxels, or intensities within INTENSITY_TOLERANCE of the
    range; and the measured figure, as words."""
    if candidate.shape != reference.shape:
        return False, f"its output has shape {tuple(candidate.shape)}, PyTorch's {tuple(reference.shape)}"
    if not bool(torch.isfinite(candidate).all()):
        return False, "its output has non-finite values"
    if output_kind == "labels":
        if reference.shape[1] > 1:
            kept = (candidate.argmax(dim=1) == reference.argmax(dim=1)).float().mean().item()
        else:
            kept = (((candidate > 0) == (reference > 0)) & ((candidate > 0.5) == (reference > 0.5))).float().mean()
            kept = float(kept)
        return kept >= LABEL_AGREEMENT, f"{kept:.4%} of voxels keep their label (needs {LABEL_AGREEMENT:.1%})"
    spread = float(reference.max() - reference.min())
    error = float((candidate - reference).abs().max()) / max(spread, 1e-12)
    return error <= INTENSITY_TOLERANCE, (f"largest difference {error:.2e} of the output range (needs "
                                          f"<= {INTENSITY_TOLERANCE:.1e})")


class NetworkRunner:
    """Calls a network on the best checked path for this machine; callable like the network itself.

    `runtime` is "pytorch" or "openvino <version>"; `note` says why (for provenance). Undecided until the first
    call on a machine without a stored decision: that call runs both paths (the PyTorch output is returned)."""

    def __init__(self, network: Any, device: torch.device, output_kind: str = "labels") -> None:
        if output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {output_kind!r}.")
        self.network, self.device, self.output_kind = network, torch.device(device), output_kind
        self.accelerated: OpenVinoNetwork | None = None
        self.runtime = PYTORCH
        self.note = "not run yet"  # which path and why, for provenance
        self.decided = False
        reason = unavailable_reason(self.device)
        if reason is None and not isinstance(network, torch.nn.Module):
            reason = "the network is not a PyTorch module"
        if reason is not None:
            self.decided = True
            self.note = f"PyTorch fp32: {reason}"

    def __call__(self, batch: torch.Tensor) -> Any:
        if not self.decided:
            return self._decide(batch)
        if self.accelerated is not None:
            return self.accelerated(batch)
        return self.network(batch)

    def _multiple(self) -> int:
        return int(getattr(self.network, "size_multiple", 16) or 16)

    def _decide(self, batch: torch.Tensor) -> Any:
        """Converts (or loads) the network, then uses a stored decision or checks OpenVINO against PyTorch on this
        batch; returns PyTorch's output when it ran."""
        self.decided = True
        started = time.perf_counter()
        try:
            cached = _CachedModel(self.network, int(batch.shape[1]))
            model, why = cached.load()
            if model is None:
                model = _convert(self.network, _trace_input(batch, self._multiple()))
                cached.save(model)
            accelerated = OpenVinoNetwork(model)
        except Exception as error:  # an unconvertible network: PyTorch runs it, as it always could
            self.note = f"PyTorch fp32: OpenVINO could not convert the network ({type(error).__name__}: {error})"[:400]
            return self.network(batch)
        prepared = f" ({why}, {time.perf_counter() - started:.1f} s)" if why else ""
        stored = cached.decision()
        if stored is not None:
            if stored.get("runtime") != PYTORCH:
                self._use(accelerated)
            self.note = f"{stored.get('note', '')} (checked on an earlier run on this machine){prepared}"
            return self(batch)
        started = time.process_time()
        reference = _first(self.network(batch)).float()
        torch_seconds = time.process_time() - started
        try:
            accelerated(batch)  # the first call of a compiled model prepares its kernels
            started = time.process_time()
            candidate = _first(accelerated(batch)).float()
            openvino_seconds = time.process_time() - started
            same, measured = agreement(candidate, reference, self.output_kind)
        except Exception as error:
            same, measured, openvino_seconds = False, f"it failed ({type(error).__name__}: {error})"[:300], 0.0
        speedup = torch_seconds / max(openvino_seconds, 1e-6)
        fast = speedup >= SPEED_NEEDED or mode() == "openvino"
        if same and fast:
            self._use(accelerated)
            note = (f"OpenVINO {openvino_version()} fp32: checked against PyTorch fp32 on this machine's first input: "
                    f"{measured}, {speedup:.1f}x as fast")
        else:
            problem = measured if not same else f"only {speedup:.1f}x as fast (needs {SPEED_NEEDED}x)"
            note = f"PyTorch fp32: OpenVINO {openvino_version()} failed the check on this machine: {problem}"
        cached.store_decision({"runtime": self.runtime, "note": note, "speedup": round(speedup, 2),
                               "checked_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.note = note + prepared
        return reference

    def _use(self, accelerated: OpenVinoNetwork) -> None:
        self.accelerated = accelerated
        self.runtime = f"openvino {openvino_version()}"


# a network -> its runner per (device, output kind): a warm worker converts and checks once
_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def runner(network: Any, device: torch.device, output_kind: str = "labels") -> NetworkRunner:
    """The runner of `network` on `device` (one per network object, so later calls reuse its decision)."""
    key = (str(torch.device(device)), output_kind, mode())
    try:
        per_network = _RUNNERS.setdefault(network, {})
    except TypeError:  # not weakly referenceable: a fresh runner each time
        return NetworkRunner(network, device, output_kind)
    if key not in per_network:
        per_network[key] = NetworkRunner(network, device, output_kind)
    return per_network[key]
