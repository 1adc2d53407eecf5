"""ONNX export with validation, shared transform constants, optional int8 and ORT format.

``export_onnx`` runs ``torch.onnx.export(dynamo=True)`` at opset :data:`OPSET` with a dynamic
batch axis, merges identical initializers (the DCT / Walsh-Hadamard constants of every layer of
the same size become one initializer), checks the model with
``onnx.checker.check_model(full_check=True)``, runs it in ONNX Runtime on real inputs and compares
with PyTorch. Beyond the tolerance it raises :class:`ExportError` and leaves no file behind; the
file appears only after validation (written to a temporary name, then renamed).

Tolerance: ``max|onnx - torch| <= tolerance * max(1, max|torch|)`` (default 1e-4). An int8 file
cannot meet that; it is validated by top-1 agreement with the float model instead
(>= :data:`INT8_MIN_AGREEMENT` of the inputs) and its held-out accuracy is reported.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from .checkpoint import atomic_write
from .errors import ExportError

__all__ = [
    "OPSET",
    "DEFAULT_TOLERANCE",
    "INT8_MIN_AGREEMENT",
    "ExportResult",
    "export_onnx",
    "onnx_initializer_bytes",
    "stored_state_bytes",
    "mobile_usability",
    "ort_session",
]

OPSET = 18
"""ONNX opset of every export: supported by ONNX Runtime >= 1.14 on all platforms, mobile included."""
DEFAULT_TOLERANCE = 1e-4
INT8_MIN_AGREEMENT = 0.98


@dataclass
class ExportResult:
    """What an export produced and how it was checked."""

    path: str
    bytes: int
    max_abs_diff: float
    max_rel_diff: float
    stored_parameter_bytes: int
    constant_bytes: int  # shared transform constants (DCT / Walsh-Hadamard factors, index vectors)
    initializers: int
    quantized: bool = False
    top1_agreement: float = 1.0
    extra_files: list[str] = field(default_factory=list)
    mobile_notes: list[str] = field(default_factory=list)  # onnxruntime's mobile usability checker, with --ort

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def ort_session(path_or_bytes, threads: int = 2):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path_or_bytes, options, providers=["CPUExecutionProvider"])


def _strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug metadata (stack traces, FX names) and intermediate
    value_info: they are most of a small model's file and useless on a device (in place)."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]
    model.graph.doc_string = ""


def _dedupe_initializers(model: onnx.ModelProto) -> None:
    """Merge initializers with identical type, shape and bytes into one (in place)."""
    graph, first_of, rename = model.graph, {}, {}
    for init in graph.initializer:
        array = onnx.numpy_helper.to_array(init)
        key = (init.data_type, tuple(init.dims), hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest())
        if key in first_of:
            rename[init.name] = first_of[key]
        else:
            first_of[key] = init.name
    if not rename:
        return
    kept = [init for init in graph.initializer if init.name not in rename]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]


def onnx_initializer_bytes(model: onnx.ModelProto) -> int:
    """Total bytes of the graph's initializers (the weights and constants the file carries)."""
    return sum(onnx.numpy_helper.to_array(init).nbytes for init in model.graph.initializer)


def stored_state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state_dict (float32 parameters, integer permutations, ...)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter logs and warns a lot about optional packages; keep the CLI clean."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch", "root", "")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            try:
                yield
            finally:
                for logger, level in zip(loggers, levels):
                    logger.setLevel(level)


def _to_proto(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=OPSET,
                dynamic_shapes=({0: batch},),
                input_names=["input"],
                output_names=["logits"],
                external_data=False,
            )
    except Exception as exc:  # the exporter raises many types; one line for the user
        raise ExportError(f"torch.onnx.export failed: {str(exc).splitlines()[0][:300]}") from exc
    proto = program.model_proto
    _strip_debug_info(proto)
    _dedupe_initializers(proto)
    return proto


def _compare(session, model: nn.Module, inputs: torch.Tensor) -> tuple[float, float, float]:
    """(max abs diff, relative diff, top-1 agreement) of the session's outputs against the model's."""
    with torch.no_grad():
        reference = model(inputs).float().numpy()
    got = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
    diff = float(np.abs(got - reference).max())
    rel = diff / max(1.0, float(np.abs(reference).max()))
    agreement = float((got.argmax(-1) == reference.argmax(-1)).mean())
    return diff, rel, agreement


def _quantize_int8(float_path: str, out_path: str, model: onnx.ModelProto, stored_names: set[str]) -> None:
    """Dynamic int8 quantisation of the dense layers (MatMul/Gemm/Conv with stored weights), never of
    the transform constants.

    The quantiser renames the Gemm nodes it rewrites, so the transform MatMuls are excluded
    rather than the dense ones included.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weights = {init.name for init in model.graph.initializer if init.name in stored_names and len(init.dims) >= 2}
    matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    excluded = [n.name for n in matmuls if not weights.intersection(n.input)]
    if len(excluded) == len(matmuls):
        raise ExportError("--quantize int8: the model has no dense layer left to quantise; drop --quantize")
    with _quiet_exporter():
        quantize_dynamic(float_path, out_path, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                         nodes_to_exclude=excluded)


def _convert_to_ort(onnx_path: str, out_path: str) -> None:
    """ONNX -> ORT format (the format of the ONNX Runtime mobile packages), via onnxruntime's tools."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with tempfile.TemporaryDirectory(dir=Path(out_path).parent, prefix=".fixclf-ort-") as work:
        source = Path(work) / "model.onnx"
        shutil.copyfile(onnx_path, source)
        with _quiet_exporter():
            convert_onnx_models_to_ort(source, output_dir=Path(work), optimization_styles=[OptimizationStyle.Fixed])
        produced = next(Path(work).glob("*.ort"), None)
        if produced is None:
            raise ExportError("ORT format conversion produced no .ort file; export plain ONNX instead")
        os.replace(produced, out_path)


def mobile_usability(onnx_path: str | os.PathLike) -> list[str]:
    """Run onnxruntime's mobile usability checker (the tool behind
    ``python -m onnxruntime.tools.check_onnx_model_mobile_usability``) and return what it says."""
    from onnxruntime.tools.mobile_helpers import usability_checker

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage().strip())

    logger = logging.getLogger("fixclf.mobile_usability")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    collector = Collect()
    logger.addHandler(collector)
    try:
        with _quiet_exporter():
            try_eps = usability_checker.analyze_model(Path(onnx_path), skip_optimize=False, logger=logger)
    except Exception as exc:  # the checker is best effort; the .ort file itself was produced and validated
        return [f"mobile usability check unavailable: {type(exc).__name__}: {exc}"]
    finally:
        logger.removeHandler(collector)
    verdict = ("NNAPI (Android) / CoreML (iOS) may help: compare them with the CPU EP" if try_eps
               else "use the CPU execution provider on mobile")
    return [line for line in collector.lines if line] + [verdict]


def export_onnx(
    model: nn.Module,
    inputs: torch.Tensor,
    path: str | os.PathLike,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    quantize: str | None = None,
    ort_format: bool = False,
) -> ExportResult:
    """Export ``model`` to ``path``, validate it in ONNX Runtime on ``inputs``, return the figures.

    ``inputs``: (M, ...) real samples (M >= 1); also the export example. ``quantize="int8"``
    writes the dynamically quantised model instead of the float one. ``ort_format=True`` also
    writes ``path`` with suffix ``.ort``. Nothing is left at ``path`` when anything fails.
    """
    if quantize not in (None, "int8"):
        raise ExportError(f"unknown quantisation {quantize!r}; use int8 or leave it out")
    model = model.eval().float()
    inputs = inputs.float()
    path = Path(path)
    stored_names = set(model.state_dict().keys())
    proto = _to_proto(model, inputs[:2])
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"exported model failed onnx.checker: {str(exc).splitlines()[0][:300]}") from exc
    # The exporter folds parameter-only arithmetic (e.g. ACDC's diagonal moved into the spectral
    # layout) into new initializers of the same size, so stored state is counted on the model and
    # everything else the file carries is a constant: transform factors, indices, shapes.
    stored_bytes = stored_state_bytes(model)
    constant_bytes = max(0, onnx_initializer_bytes(proto) - stored_bytes)
    extra: list[str] = []
    with atomic_write(path) as tmp_path:
        tmp = str(tmp_path)
        onnx.save_model(proto, tmp)
        if quantize:
            try:
                _quantize_int8(tmp, tmp + ".q", proto, stored_names)
                os.replace(tmp + ".q", tmp)
            finally:
                Path(tmp + ".q").unlink(missing_ok=True)
        diff, rel, agreement = _compare(ort_session(tmp), model, inputs)
        if quantize:
            if agreement < INT8_MIN_AGREEMENT:
                raise ExportError(
                    f"int8 model agrees with the float model on only {agreement:.1%} of inputs "
                    f"(need {INT8_MIN_AGREEMENT:.0%}); export without --quantize"
                )
        elif not rel <= tolerance:
            raise ExportError(
                f"ONNX output differs from PyTorch: max abs diff {diff:.3g}, relative {rel:.3g} > tolerance "
                f"{tolerance:g}; no file written (raise --tolerance only if this difference is acceptable)"
            )
        notes: list[str] = []
        if ort_format:
            with atomic_write(path.with_suffix(".ort")) as ort_tmp:  # kept only if it loads and runs
                _convert_to_ort(tmp, str(ort_tmp))
                _compare(ort_session(str(ort_tmp)), model, inputs[:8])
            extra.append(str(path.with_suffix(".ort")))
            notes = mobile_usability(tmp)
    return ExportResult(
        path=str(path),
        bytes=path.stat().st_size,
        max_abs_diff=diff,
        max_rel_diff=rel,
        stored_parameter_bytes=stored_bytes,
        constant_bytes=constant_bytes,
        initializers=len(proto.graph.initializer),
        quantized=bool(quantize),
        top1_agreement=agreement,
        extra_files=extra,
        mobile_notes=notes,
    )
