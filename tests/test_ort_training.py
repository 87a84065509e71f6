"""benchmarks/ort_training.py's check before timing: ONNX Runtime's on-device training (its own venv, .venv-ort)
and edgezo train the same tensors of the same file and give the same loss on the first batch. Runs only where
`make bench-ort` has built .venv-ort (onnxruntime-training cannot share the project's venv)."""
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ORT_PYTHON = ROOT / ".venv-ort" / "bin" / "python"
FASHION = ROOT / ".." / "shared" / "datasets" / "fashion-mnist" / "train-images-idx3-ubyte.gz"

pytestmark = [pytest.mark.skipif(not ORT_PYTHON.exists(), reason=".venv-ort absent: `make bench-ort` builds it "
                                 "(onnxruntime-training 1.19.2 in a venv of its own)"),
              pytest.mark.skipif(not FASHION.exists(), reason=f"{FASHION} absent")]


def test_both_sides_train_the_same_tensors_of_the_same_file(tmp_path):
    import ort_cases
    import ort_training
    case = tmp_path / "demo"
    ort_cases.build("demo", case)
    np.save(case / "order.npy", ort_training.batch_order(1024, 64, 1))
    assert ort_training.ort(str(ORT_PYTHON), "artifacts", ort_training.ort_job(case, "adamw"), case, "artifacts")["ok"]
    check = ort_training.same_tensors_check(str(ORT_PYTHON), case)
    manifest = json.loads((case / "art" / "manifest.json").read_text())
    assert check["names_equal"] and check["sizes_equal"], check
    assert check["trainable_values"] == manifest["num_params"] == 330
    assert check["relative_difference"] < 1e-5 and check["passed"], check
    # a different selection on the ORT side is caught: the artifacts are made from the job's names
    job = ort_training.ort_job(case, "adamw")
    job.update(trainable=job["trainable"][:1], dir=str(tmp_path / "other"))
    assert ort_training.ort(str(ORT_PYTHON), "artifacts", job, tmp_path, "other")["ok"]
    job["dir"] = str(tmp_path / "other")
    theirs = ort_training.ort(str(ORT_PYTHON), "check", job, tmp_path, "other_check")
    assert sorted(theirs["trainable"]) != sorted(e["name"] for e in manifest["trainable"])
