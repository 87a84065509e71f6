"""Datasets as dicts of arrays {name: array}, read from their original formats; deterministic batches.

Formats: .npz (arrays named after the artifact's inputs/targets, or x/X and y/Y), .npy pairs
(PATH_x.npy + PATH_y.npy given as PATH_x.npy), .csv (last `--target-columns` columns are targets),
MNIST / Fashion-MNIST IDX (.gz or raw; give the images file, the labels file is found beside it),
SARCOS .mat (MATLAB v5, needs scipy; 21 inputs, 7 torques), CIFAR-10 binary batches (a .bin file or
a folder of data_batch_*.bin).

Normalization: IDX and CIFAR images become float32 in [0, 1] (uint8 / 255), shaped [N, C, H, W];
labels int64. Other formats are read as they are (float32 features, float32 targets or int64 labels).
"""
import gzip
from pathlib import Path

import numpy as np

from .errors import EdgezoError, check

SARCOS_INPUTS = 21


def read_idx(path):
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise EdgezoError(f"{path}: cannot read IDX file ({e})") from None
    check(len(raw) >= 4 and raw[0] == 0 and raw[1] == 0 and raw[2] == 8, f"{path}: not an IDX uint8 file")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", ndim, 4).astype(np.int64)
    check(len(raw) == 4 + 4 * ndim + int(np.prod(dims)), f"{path}: IDX file is truncated or has trailing bytes")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_idx_pair(images_path):
    """MNIST-style images file -> (x float32 [N,1,28,28] in [0,1], y int64 [N])."""
    images_path = Path(images_path)
    labels_path = Path(str(images_path).replace("images-idx3", "labels-idx1"))
    check(labels_path != images_path and labels_path.exists(),
          f"{images_path}: no labels file beside it (expected {labels_path.name})")
    x, y = read_idx(images_path), read_idx(labels_path)
    check(len(x) == len(y), f"{images_path}: {len(x)} images but {len(y)} labels")
    return x[:, None].astype(np.float32) / 255.0, y.astype(np.int64)


def load_sarcos(path):
    """SARCOS .mat (sarcos_inv or sarcos_inv_test) or .npz -> (x [N,21], y [N,7]) float32."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            table = z[z.files[0]]
    else:
        try:
            from scipy.io import loadmat
        except ImportError:
            raise EdgezoError(f"{path}: reading .mat files needs scipy (pip install scipy)") from None
        try:
            mat = loadmat(str(path))
        except Exception as e:  # scipy raises several types for non-.mat input
            raise EdgezoError(f"{path}: not a readable MATLAB .mat file ({e})") from None
        keys = [k for k in mat if not k.startswith("__")]
        check(len(keys) == 1, f"{path}: expected one array in the .mat file, found {keys}")
        table = mat[keys[0]]
    check(table.ndim == 2 and table.shape[1] == 28, f"{path}: SARCOS table must be [N, 28], got {table.shape}")
    table = table.astype(np.float32)
    return table[:, :SARCOS_INPUTS], table[:, SARCOS_INPUTS:]


def load_cifar10(path):
    """CIFAR-10 binary batch file(s) -> (x float32 [N,3,32,32] in [0,1], y int64 [N])."""
    path = Path(path)
    files = sorted(path.glob("data_batch_*.bin")) if path.is_dir() else [path]
    check(files, f"{path}: no data_batch_*.bin files in this folder")
    raw = np.concatenate([np.fromfile(f, np.uint8) for f in files])
    check(raw.size % 3073 == 0, f"{path}: CIFAR-10 binary size {raw.size} is not a multiple of 3073")
    raw = raw.reshape(-1, 3073)
    return raw[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0, raw[:, 0].astype(np.int64)


def _from_npz(path):
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as e:
        raise EdgezoError(f"{path}: not a readable .npz file ({str(e).splitlines()[0]})") from None


def read_arrays(path, target_columns=None):
    """Raw arrays of a data file: a dict {name: array}."""
    path = Path(path)
    check(path.exists(), f"--data {path}: no such file or folder")
    name = path.name
    if name.endswith(".npz"):
        return _from_npz(path)
    elif name.endswith(".mat"):
        x, y = load_sarcos(path)
    elif "idx3" in name:
        x, y = load_idx_pair(path)
    elif name.endswith(".bin") or path.is_dir():
        x, y = load_cifar10(path)
    elif name.endswith(".npy"):
        other = Path(str(path).replace("_x.npy", "_y.npy"))
        check(other != path and other.exists(), f"{path}: .npy data is given as PATH_x.npy with PATH_y.npy beside it")
        x, y = np.load(path, allow_pickle=False), np.load(other, allow_pickle=False)
    elif name.endswith(".csv"):
        check(target_columns, f"{path}: for .csv data give the number of target columns (--target-columns)")
        table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
        x, y = table[:, :-target_columns], table[:, -target_columns:]
        if target_columns == 1 and np.all(y == np.round(y)):
            y = y[:, 0]
    else:
        raise EdgezoError(f"--data {path}: unknown format (use .npz, .npy, .csv, .mat, IDX or CIFAR-10 .bin)")
    return {"x": x, "y": y}


def _non_finite_rows(value, chunk_bytes=1 << 20):
    """The rows holding a NaN or an infinity, checked a chunk of rows at a time: one boolean mask of the whole
    array would be a transient of a quarter of its size on the run's peak RSS."""
    flat = value.reshape(len(value), -1)
    rows = max(1, chunk_bytes // max(1, flat.shape[1]))
    return [start + int(r) for start in range(0, len(flat), rows)
            for r in np.flatnonzero(~np.isfinite(flat[start:start + rows]).all(axis=1))]


def match_arrays(arrays, manifest, source="data"):
    """{artifact input/target name: array}, cast and checked against the manifest's shapes and dtypes."""
    out = {}
    aliases = {}
    if len(manifest["inputs"]) == 1:
        aliases[manifest["inputs"][0]["name"]] = ("x", "X")
    if len(manifest["targets"]) == 1:
        aliases[manifest["targets"][0]["name"]] = ("y", "Y")
    for spec in manifest["inputs"] + manifest["targets"]:
        name = spec["name"]
        found = [k for k in (name,) + aliases.get(name, ()) if k in arrays]
        check(found, f"{source}: no array named {name!r}" + (f" (or {'/'.join(aliases[name])})" if name in aliases
                                                             else "") + f"; it has {sorted(arrays)}")
        value = np.asarray(arrays[found[0]])
        want = spec["shape"][1:]
        if spec["dtype"].startswith("int"):
            check(value.dtype.kind in "iu" or (value.dtype.kind == "f" and np.all(value == np.round(value))),
                  f"{source}: {name!r} must hold integer class labels, got {value.dtype}")
        else:
            check(value.dtype.kind in "fiu", f"{source}: {name!r} must be numeric, got {value.dtype}")
        if value.ndim == len(want) and len(want) > 0 and list(value.shape) == want:
            value = value[None]
        shape_ok = value.ndim == len(want) + 1 and all(isinstance(w, str) or w == s
                                                       for w, s in zip(want, value.shape[1:]))
        check(shape_ok, f"{source}: {name!r} has shape {list(value.shape)}, the artifact wants "
                        f"[N, {', '.join(map(str, want))}]".replace(", ]", "]"))
        out[name] = value.astype(spec["dtype"], copy=False)
        if value.dtype.kind == "f" and value.size:
            bad = _non_finite_rows(value)
            if len(bad):
                raise EdgezoError(f"{source}: {name!r} has a NaN or infinite value in row {bad[0]} ({len(bad)} "
                                  "rows in all); clean the data before training")
    sizes = {k: len(v) for k, v in out.items()}
    check(len(set(sizes.values())) == 1, f"{source}: arrays have different numbers of rows {sizes}")
    check(next(iter(sizes.values())) > 0, f"{source}: the dataset is empty")
    classes = manifest["loss"].get("num_classes")
    if classes:
        for spec in manifest["targets"]:
            y = out[spec["name"]]
            bad = (y < 0) | (y >= classes)
            if bad.any():
                raise EdgezoError(f"{source}: label {y[bad][0]} of {spec['name']!r} is outside [0, {classes})")
    return out


def load_data(path, manifest, target_columns=None):
    return match_arrays(read_arrays(path, target_columns), manifest, f"--data {path}")


def num_rows(data):
    return len(next(iter(data.values())))


def take(data, rows):
    return {k: v[rows] for k, v in data.items()}


def split(data, fraction, seed):
    """(train, validation): a seeded random `fraction` of the rows goes to validation."""
    check(0 < fraction < 1, f"--val-fraction must be in (0, 1), got {fraction}")
    n = num_rows(data)
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * fraction)))
    check(n_val < n, f"--val-fraction {fraction} leaves no training rows out of {n}")
    return take(data, np.sort(order[n_val:])), take(data, np.sort(order[:n_val]))


def epoch_order(n, seed, epoch):
    """The row order of one epoch: a permutation fixed by (seed, epoch), so a resume can rebuild it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches_per_epoch(n, batch_size, drop_last=False):
    return n // batch_size if drop_last else (n + batch_size - 1) // batch_size


def check_batch_size(batch_size, n):
    check(isinstance(batch_size, int) and 1 <= batch_size <= n,
          f"--batch-size must be in [1, {n}] (the number of training rows), got {batch_size}")


def batches(data, batch_size, order, start=0, drop_last=False):
    """Minibatches of `data` in `order` from batch number `start`; the last may be smaller unless dropped."""
    n = len(order)
    check_batch_size(batch_size, n)
    for b in range(start, batches_per_epoch(n, batch_size, drop_last)):
        yield take(data, order[b * batch_size:(b + 1) * batch_size])
