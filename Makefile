# rayprune: `make demo` and `make test` work on a fresh machine (they build .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench gpu-check install clean

$(STAMP): requirements.txt requirements-data.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-data.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rayprune run configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

gpu-check: $(STAMP)
	$(PY) cluster/gpu_check.py $(GPU_CHECK_ARGS)

bench: $(STAMP)
	$(PY) bench/engine_step.py
	$(PY) bench/throughput.py
	$(PY) bench/busy_fraction.py
	$(PY) bench/sprint_pool.py
	$(PY) bench/racing.py
	$(PY) bench/campaigns.py
	$(PY) bench/sprint_vs_blockpruner.py
	$(PY) bench/plan_table.py
	$(PY) bench/plan_vs_measured.py
	$(PY) bench/driver_memory.py

clean:
	rm -rf $(VENV) runs .pytest_cache
