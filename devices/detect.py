"""What this machine is: CPU, NVIDIA GPU, or Jetson (model, memory, L4T / JetPack). No torch.

Also the device profiles of the Jetson boards edgezo plans for (memory shared by CPU and GPU).
"""
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

# name: (model, memory MiB, JetPack Python, JetPack) -- memory is the board's LPDDR, shared with the GPU
PROFILES = {
    "jetson-nano-4gb": ("Jetson Nano 4GB", 4096, "3.6", "4.6"),
    "xavier-nx": ("Jetson Xavier NX 8GB", 8192, "3.8", "5.1"),
    "orin-nano-4gb": ("Jetson Orin Nano 4GB", 4096, "3.10", "6.0"),
    "orin-nano-8gb": ("Jetson Orin Nano 8GB", 8192, "3.10", "6.0"),
    "orin-nx-8gb": ("Jetson Orin NX 8GB", 8192, "3.10", "6.0"),
    "orin-nx-16gb": ("Jetson Orin NX 16GB", 16384, "3.10", "6.0"),
    "agx-orin-32gb": ("Jetson AGX Orin 32GB", 32768, "3.10", "6.0"),
    "agx-orin-64gb": ("Jetson AGX Orin 64GB", 65536, "3.10", "6.0"),
}
# what the OS, desktop-less JetPack services and the CUDA context take before training starts (MiB)
JETSON_RESERVED_MB = 1200


def parse_meminfo(text):
    """/proc/meminfo text -> {field: MiB} (its values are in kB)."""
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name.strip()] = int(parts[0]) / 1024
    return out


def meminfo_mb(field="MemTotal", text=None):
    """One /proc/meminfo field in MiB (or of `text`, a recorded sample), None where absent."""
    if text is None:
        try:
            text = Path("/proc/meminfo").read_text()
        except OSError:
            return None
    return parse_meminfo(text).get(field)


def nvmap_used_mb(text=None):
    """Jetson: GPU memory allocated through NvMap (NvMapMemUsed in /proc/meminfo, as jetson-stats reads it
    on Orin, where NVML has no memory query), or None on other machines."""
    return meminfo_mb("NvMapMemUsed", text)


def jetson():
    """{model, l4t} on a Jetson, else None."""
    release = Path("/etc/nv_tegra_release")
    model_file = Path("/proc/device-tree/model")
    if not release.exists() and not (model_file.exists() and "jetson" in model_file.read_text().lower()):
        return None
    model = model_file.read_text().strip("\x00\n ") if model_file.exists() else "unknown Jetson"
    l4t = None
    if release.exists():
        match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release.read_text())
        if match:
            l4t = f"{match.group(1)}.{match.group(2)}"
    return {"model": model, "l4t": l4t}


def nvidia_gpus():
    """[{name, memory_mb}] from nvidia-smi, or [] where there is none."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, _, memory = line.rpartition(",")
        if name:
            gpus.append({"name": name.strip(), "memory_mb": float(memory)})
    return gpus


def describe():
    """This machine: kind (cpu | cuda | jetson), CPU, memory, GPUs, Jetson facts, onnxruntime providers."""
    info = {"kind": "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_mb": meminfo_mb(), "python": platform.python_version(), "gpus": nvidia_gpus(), "jetson": jetson()}
    try:
        import onnxruntime as ort
        info["onnxruntime"] = ort.__version__
        info["providers"] = ort.get_available_providers()
    except ImportError:
        info["providers"] = []
    if info["jetson"]:
        info["kind"] = "jetson"
    elif info["gpus"]:
        info["kind"] = "cuda"
    return info


def nvml_process_mb(pid=None):
    """GPU memory this process (or `pid`) holds on all GPUs, through NVML (desktop GPUs), or None."""
    pid = os.getpid() if pid is None else pid
    try:
        import pynvml
        pynvml.nvmlInit()
        total = 0.0
        for i in range(pynvml.nvmlDeviceGetCount()):
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i)):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    total += proc.usedGpuMemory / 2 ** 20
        pynvml.nvmlShutdown()
        return total
    except Exception:  # no pynvml, no driver, or a Jetson (no NVML memory query)
        return None


def nvml_used_mb():
    """Device-level used memory of GPU 0 through NVML (discrete GPUs), or None."""
    try:
        import pynvml
        pynvml.nvmlInit()
        used = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / 2 ** 20
        pynvml.nvmlShutdown()
        return used
    except Exception:  # no pynvml, no driver, or a Jetson (no NVML memory query)
        return None
