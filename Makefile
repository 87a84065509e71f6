# Two commands: `make demo` and `make test`. Both build .venv inside the repo first.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[export,executorch,tune,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgezo demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs
