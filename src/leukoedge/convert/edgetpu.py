"""Edge TPU checks: would ``edgetpu_compiler`` map this int8 graph to the TPU?

The compiler maps a graph to the Edge TPU only when it is fully integer, has
static shapes with batch 1 and a single subgraph, and it stops mapping at the
first unsupported op: that op *and everything after it* run on the CPU. We
read the TFLite flatbuffer (TensorFlow's schema module; conversion already
needs TensorFlow) and report every op that would fall back, so the user knows
before buying or plugging in a Coral.

:data:`EDGETPU_OPS` follows Coral's "Supported operations" table
(https://coral.ai/docs/edgetpu/models-intro/#supported-operations, compiler
16). When ``edgetpu_compiler`` is on PATH we run it and keep its log; it is
the final word, our check is the early warning.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConversionError

#: TFLite builtin ops the Edge TPU executes (Coral docs, compiler v16).
EDGETPU_OPS = frozenset(
    {
        "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS",
        "FULLY_CONNECTED", "GATHER", "HARD_SWISH", "L2_NORMALIZATION", "LOGISTIC", "LSTM",
        "UNIDIRECTIONAL_SEQUENCE_LSTM", "MAXIMUM", "MAX_POOL_2D", "MEAN", "MINIMUM", "MUL", "PACK",
        "PAD", "PRELU", "QUANTIZE", "REDUCE_MAX", "REDUCE_MIN", "RELU", "RELU6", "RELU_N1_TO_1",
        "RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX",
        "SPACE_TO_DEPTH", "SPLIT", "SQUARED_DIFFERENCE", "SQUEEZE", "STRIDED_SLICE", "SUB", "SUM",
        "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
    }
)
_INTEGER_TYPES = {"INT8", "UINT8", "INT32"}  # INT32 only for biases and shape tensors
COMPILE_ELSEWHERE = (
    "edgetpu_compiler is not installed here. It runs on x86-64 Debian/Ubuntu: add Coral's apt "
    "repository (https://coral.ai/docs/edgetpu/compiler/), `apt install edgetpu-compiler`, then re-run "
    "`leukoedge convert RUN_DIR --quantize int8 --edgetpu --out BUNDLE` there: the compiled "
    "model_edgetpu.tflite is then added to the bundle and its checksums."
)


@dataclass(frozen=True)
class EdgeTpuReport:
    """Outcome of the check (and of the compiler when it ran)."""

    fully_integer: bool
    batch_one: bool
    single_subgraph: bool
    ops: dict[str, int]
    unsupported_ops: list[str]
    cpu_fallback_ops: list[str]
    float_tensors: list[str]
    compatible: bool
    compiler: str | None = None
    compiled: bool = False
    compiler_log: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_text(self) -> str:
        lines = [
            f"Edge TPU check: {'compatible' if self.compatible else 'NOT fully compatible'}",
            f"  fully integer: {self.fully_integer}; batch 1: {self.batch_one}; single subgraph: {self.single_subgraph}",
            f"  ops: {', '.join(f'{k} x{v}' for k, v in sorted(self.ops.items()))}",
        ]
        if self.cpu_fallback_ops:
            lines.append(f"  would run on the CPU (from the first unsupported op on): {', '.join(self.cpu_fallback_ops)}")
        if self.float_tensors:
            lines.append(f"  float tensors: {', '.join(self.float_tensors[:8])}{' ...' if len(self.float_tensors) > 8 else ''}")
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)


def inspect(model: bytes) -> EdgeTpuReport:
    """Check a converted model against the Edge TPU's requirements."""
    from tensorflow.lite.python import schema_py_generated as schema

    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    try:
        root = schema.Model.GetRootAsModel(model, 0)
        n_sub = root.SubgraphsLength()
    except (IndexError, ValueError) as err:  # flatbuffers raise these on garbage
        raise ConversionError(f"cannot parse the converted model ({err})") from None
    graph = root.Subgraphs(0)
    sequence = []
    for i in range(graph.OperatorsLength()):
        code = root.OperatorCodes(graph.Operators(i).OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        custom = code.CustomCode()
        sequence.append(f"CUSTOM:{custom.decode()}" if custom else op_names.get(builtin, f"OP_{builtin}"))
    float_tensors = []
    for i in range(graph.TensorsLength()):
        tensor = graph.Tensors(i)
        if type_names.get(tensor.Type(), "?") not in _INTEGER_TYPES:
            float_tensors.append(f"{tensor.Name().decode()} ({type_names.get(tensor.Type(), '?').lower()})")
    batch_one = True
    for idx in [graph.Inputs(i) for i in range(graph.InputsLength())]:
        tensor = graph.Tensors(idx)
        shape = list(tensor.ShapeAsNumpy())
        signature = tensor.ShapeSignatureAsNumpy()
        dynamic = not isinstance(signature, int) and any(int(d) < 0 for d in signature)
        batch_one = batch_one and bool(shape) and shape[0] == 1 and not dynamic
    counts: dict[str, int] = {}
    for name in sequence:
        counts[name] = counts.get(name, 0) + 1
    unsupported = sorted({name for name in sequence if name not in EDGETPU_OPS})
    first_bad = next((i for i, name in enumerate(sequence) if name not in EDGETPU_OPS), None)
    fallback = [] if first_bad is None else [f"{i}:{name}" for i, name in enumerate(sequence[first_bad:], first_bad)]
    fully_integer = not float_tensors
    return EdgeTpuReport(
        fully_integer=fully_integer,
        batch_one=batch_one,
        single_subgraph=n_sub == 1,
        ops=counts,
        unsupported_ops=unsupported,
        cpu_fallback_ops=fallback,
        float_tensors=float_tensors,
        compatible=fully_integer and batch_one and n_sub == 1 and not unsupported,
    )


def compile_model(model_path: Path, out_dir: Path, report: EdgeTpuReport, timeout: float = 600.0) -> tuple[EdgeTpuReport, Path | None]:
    """Run ``edgetpu_compiler`` when available; returns the updated report and the compiled file."""
    compiler = shutil.which("edgetpu_compiler")
    if compiler is None:
        return _with(report, notes=[*report.notes, COMPILE_ELSEWHERE]), None
    with tempfile.TemporaryDirectory(prefix="leukoedge-edgetpu-") as work:
        try:
            proc = subprocess.run(
                [compiler, "-s", "-o", work, str(model_path)], capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ConversionError(f"edgetpu_compiler could not run ({err})") from None
        log = (proc.stdout + proc.stderr).strip()
        produced = Path(work) / f"{model_path.stem}_edgetpu.tflite"
        if proc.returncode != 0 or not produced.is_file():
            raise ConversionError(
                f"edgetpu_compiler failed (exit {proc.returncode}): {log.splitlines()[-1] if log else 'no output'}",
                hint="see the op list above; unsupported ops must be replaced in the model",
            )
        target = out_dir / "model_edgetpu.tflite"
        shutil.copyfile(produced, target)
    version = log.splitlines()[0] if log else compiler
    return _with(report, compiler=version, compiled=True, compiler_log=log), target


def _with(report: EdgeTpuReport, **changes) -> EdgeTpuReport:
    data = report.to_dict()
    data.update(changes)
    return EdgeTpuReport(**data)


def mappable_ops(model: bytes) -> tuple[int, int]:
    """(ops the Edge TPU compiler would map, ops in the graph) for a converted model.

    The compiler maps ops from the start of the graph until the first op it
    cannot run: one not in :data:`EDGETPU_OPS`, or one that reads or writes a
    tensor that is not 8-bit integer (a float layer kept by ``--repair``'s
    fallback, any int16 activation of a 16x8 model). That op and everything after
    it run on the CPU, so the share is a prefix, not a count of good ops.
    """
    from tensorflow.lite.python import schema_py_generated as schema

    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    try:
        root = schema.Model.GetRootAsModel(model, 0)
        graph = root.Subgraphs(0)
    except (IndexError, ValueError) as err:
        raise ConversionError(f"cannot parse the converted model ({err})") from None
    total = graph.OperatorsLength()
    for i in range(total):
        op = graph.Operators(i)
        code = root.OperatorCodes(op.OpcodeIndex())
        name = op_names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()))
        tensors = [t for t in (*_indices(op.InputsAsNumpy()), *_indices(op.OutputsAsNumpy())) if t >= 0]
        integer = all(type_names.get(graph.Tensors(t).Type()) in _INTEGER_TYPES for t in tensors)
        if code.CustomCode() or name not in EDGETPU_OPS or not integer:
            return i, total
    return total, total


def _indices(vector) -> list[int]:
    """A flatbuffer index vector as ints (the generated code returns 0 for an absent vector)."""
    return [] if isinstance(vector, int) else [int(t) for t in vector]
