# Two commands: `make demo` and `make test`. Both build .venv inside the repo first.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean bench-ort

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[export,executorch,tune,fleet,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgezo demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -n 2 -m "not alone"  # two workers: most tests wait on subprocesses, Ray or Flower polls
	$(PY) -m pytest -m alone  # memory measured against a tolerance: nothing beside them

clean:
	rm -rf $(VENV) runs

# ONNX Runtime's on-device training, for benchmarks/ort_training.py only: its own venv, never .venv
# (onnxruntime-training replaces onnxruntime; its artifact step needs torch; onnx 1.16 writes IR <= 10).
ORT_VENV := .venv-ort
ORT_STAMP := $(ORT_VENV)/.installed

$(ORT_STAMP):
	test -x $(ORT_VENV)/bin/python || python3 -m venv $(ORT_VENV)
	$(ORT_VENV)/bin/python -m pip install -q --upgrade pip
	$(ORT_VENV)/bin/python -m pip install -q "torch==2.13.0"
	$(ORT_VENV)/bin/python -m pip install -q "onnxruntime-training==1.19.2" "onnx>=1.16,<1.17" "numpy<2" psutil
	touch $(ORT_STAMP)

bench-ort: $(STAMP) $(ORT_STAMP)
	$(PY) benchmarks/ort_training.py --ort-python $(ORT_VENV)/bin/python
