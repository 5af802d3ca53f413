# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Re-install only when the packaging changes.
INSTALLED := $(VENV)/.installed
# The browser tests drive Debian's Chromium through Playwright (never a downloaded browser).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup test demo notebooks bench clean

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c 'from bilevel.ops.backends.fused_cpu import build_kernel; print("fused_cpu kernel:", build_kernel() or "ready")'
	touch $(INSTALLED)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq --no-install-recommends chromium

test: $(INSTALLED) $(CHROMIUM)
	$(PY) -m pytest -n 2 --durations=15

# DEMO_ARGS: options of app.py, e.g. make demo DEMO_ARGS="--port 7861"
demo: $(INSTALLED)
	$(PY) app.py $(DEMO_ARGS)

notebooks: $(INSTALLED)
	$(VENV)/bin/jupyter lab notebooks/

bench: $(INSTALLED)
	$(PY) benchmarks/bench_bra.py
	$(PY) benchmarks/bench_family_ops.py
	$(PY) benchmarks/bench_models.py

clean:
	rm -rf $(VENV) .pytest_cache lightning_logs
