"""int8 files from float ONNX models by onnxruntime's own quantizer (quantize_static), as users deploy them: one
place for the calibration reader and the quantizer's settings (the int8 demo, the benchmarks, the tests)."""
import logging


def quantize_static_int8(source, out, batches, per_channel=True, weight="QInt8", activation="QInt8", symmetric=True,
                         form="QDQ"):
    """Write `out`: `source` quantized to int8, calibrated on `batches` (an iterable of {input name: array}).
    weight/activation: onnxruntime QuantType names; form: "QDQ" or "QOperator"."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)
    root = logging.getLogger()  # the quantizer's advice ("consider pre-processing") goes to the root logger
    level = root.level
    root.setLevel(logging.ERROR)  # setLevel, not .level =: it clears the loggers' cached levels
    try:
        quantize_static(str(source), str(out), Reader(), quant_format=getattr(QuantFormat, form),
                        per_channel=per_channel, weight_type=getattr(QuantType, weight),
                        activation_type=getattr(QuantType, activation),
                        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": symmetric})
    finally:
        root.setLevel(level)
    return out
