# Two commands from a fresh clone:  `make demo`  and  `make test`.
# Both create/use .venv, install the pinned torch first (timm needs torchvision, which only imports
# beside its matching torch), then dinocell itself with its dev extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(VENV)/bin/dinocell pretrain --config configs/demo_synthetic.yaml --output-dir $(DEMO_DIR)

test: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: install
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

bench: install
	$(PY) benchmarks/bench_views.py
	$(PY) benchmarks/bench_train_step.py
	$(PY) benchmarks/bench_s3.py
	$(PY) benchmarks/bench_features.py

clean:
	rm -rf $(VENV) build *.egg-info runs
