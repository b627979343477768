# The README's commands. `make install` builds .venv from nothing; the other targets install first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU wheel goes in first: a bare `torch` requirement would pull several GB of CUDA packages.
# On a GPU machine: `make install TORCH=torch` (or install your CUDA build into .venv first).
TORCH  ?= torch==2.13.0
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install test test-fast bench gpu-check demo clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[dev,demo,plot,export,bench,tensorboard,wandb,mlflow]"
	touch $@

# Most of a test's time is processes starting (torch's import) or waiting on each other (SLURM, torchrun):
# the files run in parallel, one worker a core (at most 4); a file's tests stay in one worker (its fixtures),
# the files in tests/conftest.py's order, longest first (xdist would put the files of most tests first).
test: install
	$(PY) -m pytest -n auto --maxprocesses=4 --dist loadfile --no-loadscope-reorder

test-fast: install
	$(PY) -m pytest -m "not slow and not slurm"

bench: install
	$(PY) bench/shards.py
	$(PY) bench/stream.py
	$(PY) bench/loader.py
	$(PY) bench/train_step.py
	$(PY) bench/evaluate.py
	$(PY) bench/models.py

# on a machine with CUDA: train step, is the GPU fed, nccl, a 24 MP restore (bench/gpu_check.py)
gpu-check: install
	$(PY) bench/gpu_check.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache demo

# The embedded demo, offline: scikit-image ships real photographs. Shards, 2-rank CPU training for a
# few minutes, evaluation and a before/after picture of a held-out photo, all under demo/.
demo: install
	$(PY) -m restorer demo --out demo
