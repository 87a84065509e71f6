"""Atomic checkpoints: one .npz (no pickle) holding params, optimizer state, position and config.

The file is written to a temporary name, fsynced and renamed, so a checkpoint on disk is always a
whole one (the previous one until the rename). Non-array values travel as one JSON string.
"""
import hashlib
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


def save(run_dir, params, optimizer_state, info):
    inner = dict(optimizer_state["state"])
    arrays = {"params": params, **{f"opt.{k}": inner.pop(k) for k in list(inner) if isinstance(inner[k], np.ndarray)}}
    meta = json.dumps({"optimizer": dict(optimizer_state, state=inner), **info})

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(meta), **arrays)
    return atomic_write(Path(run_dir) / NAME, write)


def load(run_dir):
    """(params, optimizer_state, info) of the run's checkpoint; EdgezoError if absent or damaged."""
    path = Path(run_dir) / NAME
    if not path.is_file():
        raise EdgezoError(f"--resume {run_dir}: no {NAME} in it (no checkpoint was written yet)")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            params = z["params"].copy()
            state = dict(meta.pop("optimizer"))  # checkpoints before settings were kept apart: one flat dict
            (state["state"] if "state" in state else state).update(
                {k[4:]: z[k].copy() for k in z.files if k.startswith("opt.")})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise EdgezoError(f"{path}: damaged checkpoint ({type(e).__name__}: {str(e)[:100]})") from None
    return params, state, meta
