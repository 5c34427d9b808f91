# `make demo` runs the audit job on the built-in demo; `make test` runs the linter and the tests.
# Both create the project virtualenv (.venv) on first use. `make browser` installs Chromium for
# the report's browser tests (Debian/Ubuntu package, as root); without it those tests skip.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install test lint browser demo clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(INSTALLED)

lint: $(INSTALLED)
	$(BIN)/ruff check .

browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
		  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; }; }; } || \
		echo "Chromium not installed: the report's browser tests will skip"

test: lint browser
	$(BIN)/python -m pytest -q --durations=20

demo: $(INSTALLED)
	$(BIN)/sfam demo --output demo-output

clean:
	rm -rf demo-output .pytest_cache
