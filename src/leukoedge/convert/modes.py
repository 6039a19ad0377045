"""The quantisation modes: ONE table, the source of truth for what each accepts.

The CLI's ``--quantize`` choices, the argument checks and the converter
settings all come from :data:`MODES`; adding a mode means adding a row.
No TensorFlow here: the converter settings are applied by ``export``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantMode:
    """One row of the table.

    Attributes:
        name: the ``--quantize`` value.
        summary: one line for ``--help`` and the reports.
        io_dtype: dtype of the model's input and output tensors.
        full_integer: TFLITE_BUILTINS_INT8 only, integer I/O (needs calibration data).
        optimize: apply ``tf.lite.Optimize.DEFAULT``.
        float16_weights: store weights as float16.
        edgetpu: may be compiled for the Coral Edge TPU (full-integer only).
    """

    name: str
    summary: str
    io_dtype: str
    full_integer: bool
    optimize: bool
    float16_weights: bool = False
    edgetpu: bool = False

    @property
    def accepts_calibration(self) -> bool:
        return self.full_integer


MODES: dict[str, QuantMode] = {
    m.name: m
    for m in (
        QuantMode("int8", "full-integer int8, int8 input/output (CPU, Edge TPU)", "int8", True, True, edgetpu=True),
        QuantMode("uint8", "full-integer int8 kernels, uint8 input/output (Edge TPU, older tools)", "uint8", True, True, edgetpu=True),
        QuantMode("float16", "float16 weights, float32 compute and I/O (GPU delegates)", "float32", False, True, float16_weights=True),
        QuantMode("dynamic", "int8 weights, float activations and I/O (dynamic range)", "float32", False, True),
        QuantMode("none", "float32 TFLite (reference, largest)", "float32", False, False),
    )
}

DEFAULT_CALIBRATION = 300
#: Fewer representative images than this give unreliable activation ranges.
MIN_CALIBRATION = 32
