# `make test`  : fresh machine -> .venv, torch (CPU wheel 2.13.0 when none), the package (editable,
#                native extension built against that torch), then the test suite.
# `make serve` : same set-up, then the HTTP server on the embedded default model (127.0.0.1:8000).
# `make demo`  : same set-up, then a short mixed trace through the embedded engine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test serve demo clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml setup.py $(wildcard csrc/*)
	$(PIP) install --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install pybind11 ninja numpy
	$(PIP) install --no-build-isolation -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

serve: install
	$(PY) -m tetri_engine serve $(SERVE_ARGS)

demo: install
	$(PY) -m tetri_engine demo $(DEMO_ARGS)

clean:
	rm -rf build *.egg-info tetri_engine/_C*.so
