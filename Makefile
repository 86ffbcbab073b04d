# The two commands of the README:
#   make run    the main job: private sparse fine-tuning of ImageNet EfficientNet-Lite0 on Fashion-MNIST (2 min wall,
#               3.2 CPU-minutes on 2 idle cores: 68.15% at eps = 1.997 with torch 2.14.1, 67.95% on AVX-512 kernels); RUN_ARGS="--model gn_cnn" for the small-CNN run
#   make test   lint and the test suite (CPU, a few minutes)
# Both create and fill the project's virtual environment (.venv) when it is missing or out of date.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DEB := /usr/share/datasets/fashion-mnist
RUN_ARGS ?=
BENCH_ARGS ?=

.PHONY: run test lint format venv data bench bench-accuracy clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Offline copy of Fashion-MNIST from Debian's package when we may install it; otherwise the job
# downloads it through torchvision (or reads --data-dir).
data:
	@if [ ! -d $(FMNIST_DEB) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
		echo "dataset-fashion-mnist not installed; torchvision will try to download Fashion-MNIST"; \
	fi

run: $(STAMP) data
	$(PY) examples/fashion_mnist_sparta.py $(RUN_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/speed.py

bench-accuracy: $(STAMP) data
	$(PY) benchmarks/accuracy.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .ruff_cache
