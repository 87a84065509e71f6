"""edgezo.exporters: module / ONNX model -> artifact folder, and write-back. torch is imported lazily."""
from .onnx_graph import write_back


def export_module(*args, **kwargs):
    from .torch_export import export_module as export
    return export(*args, **kwargs)


__all__ = ["export_module", "write_back"]
