# The two set-up commands: `make demo` and `make test`. Everything else is installed on demand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLIPS ?= ../shared/datasets/fall-clips

.PHONY: demo reference test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@# MediaPipe (the reference cloud model's BlazePose) without its declared dependencies: they pull
	@# opencv-contrib-python, a second cv2 that needs libGL, and jax, which BlazePose does not use.
	@# Its runtime dependencies are in pyproject.toml.
	$(PY) -m pip install --quiet --no-deps 'mediapipe==0.10.14'
	touch $@

demo: $(VENV)/.installed
	@scripts/install-system-deps.sh
	$(VENV)/bin/fallwatch demo --clips $(CLIPS)

# The reference pair trained on falls-fallaction, its DMD report and published switcher (about 3 minutes on a quiet 2-core CPU).
reference: $(VENV)/.installed
	$(VENV)/bin/fallwatch models train-reference
	$(VENV)/bin/fallwatch --config config/reference.yaml dmd run

test: $(VENV)/.installed
	@scripts/install-system-deps.sh --test
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	-$(VENV)/bin/fallwatch stack down
	rm -rf .fallwatch models/tiny
