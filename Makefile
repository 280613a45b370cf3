# `make demo` and `make test` set everything up themselves (scripts/setup.sh) on first use.
VENV ?= .venv

.PHONY: setup demo test test-gpu lint clean
setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/epmoe demo

test: setup
	bash scripts/test.sh

test-gpu: setup
	$(VENV)/bin/python -m pytest -m "gpu or multigpu" -q

lint: setup
	$(VENV)/bin/ruff check epmoe tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
