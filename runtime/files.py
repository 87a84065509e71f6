"""Files that are either whole or absent."""
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import EdgezoError


def atomic_write(path, writer):
    """writer(tmp_path) then fsync and rename onto path: the file is either whole or absent."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise EdgezoError(f"{path}: cannot create its folder (a file is in the way)") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        reason = e.strerror or f"short write, {e} (disk full or file size limit?)"
        raise EdgezoError(f"cannot write {path}: {reason}; nothing was written there") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_npy(path, array):
    """np.save through atomic_write (np.save given a name would append '.npy' to the temp name)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
    return atomic_write(path, write)


def save_json(path, obj):
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))


def load_npy(path, label):
    """np.load without pickle; an unreadable file is an EdgezoError naming `label` and the path."""
    try:
        value = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise EdgezoError(f"{label}{path}: not a readable .npy file ({str(e).splitlines()[0]})") from None
    if not isinstance(value, np.ndarray):  # an .npz archive
        names = list(value.files)
        value.close()
        raise EdgezoError(f"{label}{path}: an .npz archive ({', '.join(names[:4]) or 'empty'}), not a .npy array: "
                          "give the run's params.npy")
    return value


def load_params(path, n, label="", wants="the artifact"):
    """A flat float32 parameter vector of n values from an .npy file, or an EdgezoError saying what it holds."""
    params = load_npy(path, label)
    if params.dtype != np.float32 or params.shape != (n,):
        raise EdgezoError(f"{label}{path}: holds {params.dtype} {params.shape}, {wants} wants float32 ({n},)")
    return params


def check_new_folder(out):
    """`out` may be created as a new folder: absent or empty, and no file in the way of its parents."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EdgezoError(f"--out {out} exists and is not an empty folder (it is not empty or a file); "
                          "choose a new one")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise EdgezoError(f"--out {out}: cannot create it, {parent} is a file")
            break
    return out
