"""Tiny stateless functions over a LiteRT interpreter (pycoral adapters style).

Everything the device needs about tensors (names, shapes, dtypes,
quantisation) is read from the model itself; ``bundle.json`` is only
cross-checked against it. Outputs are found by *signature name*, because
TFLite orders a multi-output model's tensors differently from Keras.

Quantisation algebra (affine, per tensor): ``real = scale * (q - zero_point)``.
Dequantising goes through int64 so ``q - zero_point`` cannot wrap around in
int8/uint8 arithmetic. Quantising rounds to the nearest step and clips to
the dtype's range; for the usual image input (scale 1, zero point -128 for
int8, 0 for uint8) it is exact: ``q = pixel - 128`` or ``q = pixel``.
"""
from __future__ import annotations

import numpy as np

from ..errors import BundleError

_INT_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}


def signature_tensors(interpreter) -> tuple[dict, dict]:
    """({input name: details}, {output name: details}) of the single signature."""
    signatures = interpreter.get_signature_list()
    if len(signatures) != 1:
        raise BundleError(f"the model must have exactly one signature, it has {sorted(signatures)}")
    runner = interpreter.get_signature_runner(next(iter(signatures)))
    return runner.get_input_details(), runner.get_output_details()


def quant_params(details: dict) -> tuple[float, int]:
    """(scale, zero_point) of a per-tensor quantised tensor; (0.0, 0) for float tensors."""
    params = details.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", []), dtype=np.float64)
    zeros = np.asarray(params.get("zero_points", []), dtype=np.int64)
    if scales.size == 0:
        scale, zero = details.get("quantization", (0.0, 0))
        return float(scale), int(zero)
    if scales.size != 1:
        raise BundleError(f"tensor {details.get('name')!r} is quantised per channel; the runtime needs per-tensor I/O")
    return float(scales[0]), int(zeros[0])


def quantize(real: np.ndarray, dtype: np.dtype, scale: float, zero_point: int) -> np.ndarray:
    """Real values -> tensor values. Float tensors (scale 0) get float32 as is."""
    dtype = np.dtype(dtype)
    if dtype == np.float32 or scale == 0.0:
        return np.asarray(real, dtype=np.float32)
    lo, hi = _INT_RANGES[dtype]
    q = np.rint(np.asarray(real, dtype=np.float64) / scale).astype(np.int64) + zero_point
    return np.clip(q, lo, hi).astype(dtype)


def dequantize(values: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Tensor values -> real float32 values (int64 avoids int8 wrap-around)."""
    values = np.asarray(values)
    if values.dtype.kind == "f" or scale == 0.0:
        return values.astype(np.float32)
    return (scale * (values.astype(np.int64) - zero_point)).astype(np.float32)


def set_input(interpreter, details: dict, pixels: np.ndarray) -> None:
    """Feed one HxWx3 uint8 image (raw pixels: ``Rescaling`` is inside the model)."""
    scale, zero = quant_params(details)
    batch = quantize(pixels[None, ...], details["dtype"], scale, zero)
    interpreter.set_tensor(details["index"], batch)


def get_output(interpreter, details: dict) -> np.ndarray:
    """One output, dequantised, without its batch dimension."""
    scale, zero = quant_params(details)
    return dequantize(interpreter.get_tensor(details["index"]), scale, zero)[0]
