"""Where training runs: execution providers chosen at run time, checked after the session starts.

No torch here. onnxruntime-gpu without a working CUDA logs an error and silently falls back to the
CPU, so the providers a session really uses are read back and compared with what was asked.
"""
import sys

from ..runtime.errors import EdgezoError

DEVICES = ("auto", "cpu", "cuda")


def providers_for(device):
    import onnxruntime as ort
    available = ort.get_available_providers()
    if device not in DEVICES:
        raise EdgezoError(f"--device must be one of {list(DEVICES)}, got {device!r}")
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise EdgezoError(f"--device cuda: this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider "
                          f"(available: {available}); install onnxruntime-gpu (and not onnxruntime)")
    if device == "cuda" or (device == "auto" and has_cuda):
        gpu = ["TensorrtExecutionProvider"] if "TensorrtExecutionProvider" in available else []
        return gpu + ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(path, device="auto", threads=None, options=None):
    """An onnxruntime session on `device`; raises if CUDA was asked for but is not really active."""
    import onnxruntime as ort
    so = options or ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # idle onnxruntime threads otherwise busy-wait after each call, starving the numpy work between calls
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    wanted = providers_for(device)
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=wanted)
    except Exception as e:  # onnxruntime raises its own exception types for bad graphs
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgezoError(f"{path}: onnxruntime cannot load it: {first[:300]}") from None
    active = session.get_providers()
    if wanted[0] != "CPUExecutionProvider" and active[0] == "CPUExecutionProvider":
        if device == "cuda":
            raise EdgezoError(f"--device cuda: onnxruntime fell back to {active[0]} (CUDA libraries missing?)")
        print(f"edgezo: CUDA provider present but not active for {path}; running on the CPU", file=sys.stderr)
        session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    return session


def active_device(session):
    return "cpu" if session.get_providers()[0] == "CPUExecutionProvider" else "cuda"
