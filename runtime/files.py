"""Files that are either whole or absent."""
import os
import tempfile
from pathlib import Path

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
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
