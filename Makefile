# The two set-up commands: `make demo` and `make test`. Everything else is installed on demand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLIPS ?= ../shared/datasets/fall-clips

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	@scripts/install-system-deps.sh
	$(VENV)/bin/fallwatch demo --clips $(CLIPS)

test: $(VENV)/.installed
	@scripts/install-system-deps.sh --test
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	-$(VENV)/bin/fallwatch stack down
	rm -rf .fallwatch models/tiny
