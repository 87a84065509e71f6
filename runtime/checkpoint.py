"""Atomic checkpoints: one .npz (no pickle) holding params, optimizer state, position and config.

The file is written to a temporary name, fsynced and renamed, so a checkpoint on disk is always a
whole one (the previous one until the rename). Non-array values travel as one JSON string.
"""
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from .errors import EdgezoError
from .files import atomic_write

NAME = "checkpoint.npz"


def fingerprint(artifact_path):
    """sha256 over the artifact's manifest.json and params.npy: ties a run to its artifact."""
    h = hashlib.sha256()
    for name in ("manifest.json", "params.npy"):
        h.update((Path(artifact_path) / name).read_bytes())
    return h.hexdigest()


def to_bytes(params, optimizer_state, info):
    """params, optimizer state and info as one .npz (no pickle): a checkpoint's content."""
    inner = dict(optimizer_state["state"])
    arrays = {"params": params, **{f"opt.{k}": inner.pop(k) for k in list(inner) if isinstance(inner[k], np.ndarray)}}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps({"optimizer": dict(optimizer_state, state=inner), **info})), **arrays)
    return buffer.getvalue()


def from_bytes(blob, label):
    """(params, optimizer_state, info) of to_bytes' output; EdgezoError naming `label` if it is damaged."""
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            params = z["params"].copy()
            state = dict(meta.pop("optimizer"))  # checkpoints before settings were kept apart: one flat dict
            (state["state"] if "state" in state else state).update(
                {k[4:]: z[k].copy() for k in z.files if k.startswith("opt.")})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise EdgezoError(f"{label}: damaged checkpoint ({type(e).__name__}: {str(e)[:100]})") from None
    return params, state, meta


def save(run_dir, params, optimizer_state, info):
    blob = to_bytes(params, optimizer_state, info)
    return atomic_write(Path(run_dir) / NAME, lambda tmp: Path(tmp).write_bytes(blob))


def load(run_dir):
    """(params, optimizer_state, info) of the run's checkpoint; EdgezoError if absent or damaged."""
    path = Path(run_dir) / NAME
    if not path.is_file():
        raise EdgezoError(f"--resume {run_dir}: no {NAME} in it (no checkpoint was written yet)")
    return from_bytes(path.read_bytes(), path)
