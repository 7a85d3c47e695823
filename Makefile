# Two commands do everything on a fresh machine with Python 3.10+:
#   make demo   set up, generate the demo data, plan and preprocess it (the main job)
#   make test   set up and run the test suite
VENV ?= .venv
BIN := $(VENV)/bin
# Demo data and outputs stay inside the clone unless AUTOSEG_HOME says otherwise.
export AUTOSEG_HOME ?= $(CURDIR)/autoseg_data

.PHONY: setup demo test lint clean

$(VENV)/.installed: setup.py pyproject.toml tools/setup_venv.sh
	bash tools/setup_venv.sh $(VENV)
	touch $@

setup: $(VENV)/.installed

demo: setup
	bash tools/demo.sh

test: setup
	bash tools/install_browser.sh
	$(BIN)/python -m pytest -q --durations=15

lint: setup
	$(BIN)/ruff check autoseg planners trainers tests tools
	$(BIN)/ruff format --check autoseg planners trainers tests tools setup.py

clean:
	rm -rf $(VENV) autoseg_data .pytest_cache
