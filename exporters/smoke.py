"""The export's smoke test: the loss graph must run once before an artifact is written (torch-free)."""
from pathlib import Path

import numpy as np

from ..runtime.errors import EdgezoError, check

GUESSES = (8, 64, 512, 4096)  # sizes tried for dynamic non-batch dims (an STFT's reflection pad needs > 64)


def smoke_test(loss_model, model_path, sample_data=None, log=print):
    """Run the loss graph on a batch of 2 zeros. Other dynamic dims: the sizes of `sample_data` (a .npz or .npy
    of the model's inputs, batch-first) where given, else the first of GUESSES the graph runs at, said in a line
    when it is not the first. A failure that names a size of 2 is about the batch."""
    from ..runtime.sessions import make_session
    try:
        session = make_session(loss_model, "cpu")
    except EdgezoError as e:
        raise EdgezoError(f"{model_path}: the loss graph does not load: {e}") from None
    inputs = [i for i in session.get_inputs() if i.name != "params"]
    sample = _sample_shapes(sample_data, inputs) if sample_data else {}
    dtypes = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
              "tensor(double)": np.float64, "tensor(float16)": np.float16}
    first = None
    for size in ([None] if sample_data else GUESSES):
        feed = {"params": np.zeros(next(i for i in session.get_inputs() if i.name == "params").shape, np.float32)}
        for i in inputs:
            shape = sample.get(i.name) or [d if isinstance(d, int) and d > 0 else (2 if k == 0 else size)
                                           for k, d in enumerate(i.shape)]
            if None in shape:  # an input the sample file does not hold: the first guess
                shape = [GUESSES[0] if d is None else d for d in shape]
            feed[i.name] = np.zeros(shape, dtypes.get(i.type, np.float32))
        try:
            session.run(["loss"], feed)
        except Exception as e:  # onnxruntime's own exception types
            first = first or str(e).strip().splitlines()[0].split("Status Message: ")[-1][:200]
            continue
        if size not in (None, GUESSES[0]) and any(not isinstance(d, int) for i in inputs for d in i.shape[1:]):
            log(f"export smoke test: dynamic non-batch dimensions given size {size} ({GUESSES[0]} did not run: "
                f"{first[:120]}); give --sample-data FILE to test on your data's shapes")
        return
    what = f"the shapes of {sample_data}" if sample_data else f"other dynamic sizes {', '.join(map(str, GUESSES))}"
    raise EdgezoError(f"{model_path}: the loss graph does not run on a batch of 2 ({what}): {first}; a fixed batch "
                      "size, a target that does not fit the output, or an input to fix with --fix-input?")


def _sample_shapes(path, inputs):
    """{input name: [2, *its per-row shape in the file]} from a .npz (arrays named after the inputs, or x/X) or
    a .npy (the first input)."""
    from ..runtime.files import load_npy
    path = Path(path)
    check(path.is_file(), f"--sample-data {path}: no such file")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {n: z[n].shape for n in z.files}
        except (ValueError, OSError, EOFError) as e:
            raise EdgezoError(f"--sample-data {path}: not a readable .npz ({str(e).splitlines()[0]})") from None
    else:
        arrays = {inputs[0].name: load_npy(path, "--sample-data ").shape}
    out = {}
    for k, i in enumerate(inputs):
        shape = arrays.get(i.name) or (arrays.get("x") or arrays.get("X") if k == 0 else None)
        if shape is not None:
            check(len(shape) == len(i.shape), f"--sample-data {path}: {i.name!r} has {len(shape)} axes, the model "
                                              f"input {len(i.shape)}")
            out[i.name] = [2, *shape[1:]]
    check(out, f"--sample-data {path}: holds none of the model's inputs ({[i.name for i in inputs]})")
    return out
