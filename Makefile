# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Re-install only when the packaging changes.
INSTALLED := $(VENV)/.installed

.PHONY: setup test demo notebooks bench clean

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

test: $(INSTALLED)
	$(PY) -m pytest -n 2 --durations=15

demo: $(INSTALLED)
	$(PY) app.py

notebooks: $(INSTALLED)
	$(VENV)/bin/jupyter lab notebooks/

bench: $(INSTALLED)
	$(PY) benchmarks/bench_bra.py
	$(PY) benchmarks/bench_models.py

clean:
	rm -rf $(VENV) .pytest_cache lightning_logs
