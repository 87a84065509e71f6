"""The one onnxruntime session factory: options, execution providers chosen at run time and checked after the
session starts, for artifacts and the engine's cut subgraphs alike. No torch.

onnxruntime-gpu without a working CUDA logs an error and silently falls back to the CPU, so the providers a
session really uses are read back and compared with what was asked.
"""
import sys

from .errors import EdgezoError

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


def session_options(threads=None, arena=True):
    """Spinning is off: onnxruntime's idle threads would otherwise busy-wait after each call and starve the numpy
    work between calls. arena=False (the engine's many small sessions): each session would otherwise keep its
    own peak (ResNet-20's engine at batch 128 rose 557 MiB with it, 426 without). arena="shared": the process's
    one shared CPU arena (shared_arena()), for the engine's sessions on the CPU (make_session runs CUDA sessions
    arena-less instead). No memory pattern: onnxruntime
    would plan (and keep) one block per input shape, and training runs several (the build's, the steps' batch, an
    evaluation's last partial batch): the demo's rise 27.4 -> 24.9 MiB, its step time unchanged."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 4  # its errors come back as exceptions: no log lines on the terminal
    shared = arena == "shared" and shared_arena()  # else arena-less, as before it
    options.enable_cpu_mem_arena = arena is True or shared
    if shared:
        options.add_session_config_entry("session.use_env_allocators", "1")
    options.enable_mem_pattern = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return options


_SHARED = []


def shared_arena():
    """One CPU arena in onnxruntime's environment, registered once per process, that the sessions asking for it
    allocate from: sessions made and dropped as the engine walks the layers reuse its blocks, where arena-less
    sessions page-faulted every large tensor in again on each call (and concurrent calls contended in glibc's heap).
    It grows by what is asked (no power-of-two rounding) and keeps its peak, which the engine's memory cap bounds.
    False where onnxruntime refuses (another allocator already registered by the host application)."""
    if not _SHARED:
        import onnxruntime as ort
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        try:  # OrtArenaCfg(max_mem 0: no cap, extend strategy 1: kSameAsRequested, chunk sizes: defaults)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
            _SHARED.append(True)
        except Exception:  # onnxruntime's own exception types: one allocator per memory info and process
            _SHARED.append(False)
    return _SHARED[0]


def make_session(model, device="auto", threads=None, options=None, arena=True):
    """An onnxruntime session of `model` (a path or an onnx ModelProto) on `device`; raises if CUDA was asked
    for but is not really active."""
    import onnxruntime as ort
    ort.set_default_logger_severity(4)  # fatal only: its errors come back as exceptions, which edgezo reports in one line
    wanted = providers_for(device)
    if arena == "shared" and wanted[0] != "CPUExecutionProvider":
        arena = False  # the shared arena is a CPU one; CUDA sessions run as they did before it
    options = options or session_options(threads, arena)
    source = str(model) if not hasattr(model, "SerializeToString") else model.SerializeToString()
    what = str(model) if isinstance(source, str) else "a cut of the loss graph"
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=wanted)
    except Exception as e:  # onnxruntime raises its own exception types for bad graphs
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgezoError(f"{what}: onnxruntime cannot load it: {first[:300]}") from None
    active = session.get_providers()
    if wanted[0] != "CPUExecutionProvider" and active[0] == "CPUExecutionProvider":
        if device == "cuda":
            raise EdgezoError(f"--device cuda: onnxruntime fell back to {active[0]} (CUDA libraries missing?)")
        print(f"edgezo: CUDA provider present but not active for {what}; running on the CPU", file=sys.stderr)
        session = ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    if not isinstance(source, str):  # onnxruntime keeps the serialized model only to re-create the session on a
        session.disable_fallback()  # provider fallback, which is done above instead: the engine's 56 cuts of an
        session._model_bytes = None  # int8 MobileNetV3 kept 78 MiB that way
    return session


def active_device(session):
    return "cpu" if session.get_providers()[0] == "CPUExecutionProvider" else "cuda"
