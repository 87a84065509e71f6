"""Quantized values in numpy, as ONNX's QuantizeLinear / DequantizeLinear compute them (torch-free; used by
write-back on the device and by the exporter)."""
import numpy as np

from .errors import check

_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255),
           np.dtype(np.int32): (-2 ** 31, 2 ** 31 - 1)}


def _along(values, ndim, axis):
    """A per-channel vector shaped to broadcast along `axis` of an ndim-array (a scalar stays one)."""
    if np.ndim(values) != 1 or ndim == 0:
        return np.asarray(values)
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.reshape(values, shape)


def dequantize(q, scale, zero_point=None, axis=1):
    """(q - zero_point) * scale in float32."""
    zp = 0 if zero_point is None else _along(zero_point, q.ndim, axis).astype(np.float32)
    return ((q.astype(np.float32) - zp) * _along(scale, q.ndim, axis).astype(np.float32)).astype(np.float32)


def quantize(x, scale, zero_point, axis, dtype, what="a weight"):
    """saturate(round_half_even(x / scale) + zero_point) in dtype, as QuantizeLinear."""
    lo, hi = _RANGES[np.dtype(dtype)]
    zp = 0 if zero_point is None else _along(zero_point, x.ndim, axis).astype(np.float32)
    return np.clip(np.round(x.astype(np.float32) / _along(scale, x.ndim, axis).astype(np.float32)) + zp,
                   lo, hi).astype(dtype)


def requantize_bias(value, scale, name):
    """round_half_even(value / scale) as int32; a value outside int32 is an error, not a wrapped number."""
    steps = np.round(value.astype(np.float32) / scale.astype(np.float32))
    lo, hi = _RANGES[np.dtype(np.int32)]
    check(np.all(np.isfinite(steps)) and steps.min(initial=0) >= lo and steps.max(initial=0) <= hi,
          f"the trained bias {name!r} does not fit int32 at its scale (up to {np.nanmax(np.abs(steps)):.3g} steps): "
          "it cannot be written back quantized")
    return steps.astype(np.int32)
