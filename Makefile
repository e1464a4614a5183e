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

# `make browser`: Debian's chromium + chromium-driver for the dashboard's browser test
# (tests/test_server_dashboard_browser.py), installed with apt-get where it exists and we are root;
# elsewhere, or if apt-get fails, it says so and that test skips with the same message.
.PHONY: browser
test: browser
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
	  echo "browser: chromium and chromedriver are installed"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "browser: installing chromium and chromium-driver with apt-get ..."; \
	  (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq || true; \
	   apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null) || \
	  echo "browser: apt-get could not install them: the dashboard's browser test will skip"; \
	else \
	  echo "browser: no apt-get, or not root: the dashboard's browser test will skip (install chromium and chromium-driver to run it)"; \
	fi
