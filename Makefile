# `make demo` and `make test` work on a fresh machine with nothing but Python 3.11:
# the first use creates .venv and installs the project (and the system packages the
# tests need) into it.
PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.installed
APT_PACKAGES := espeak-ng

.PHONY: demo test install system-deps clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

# System packages some tests use (espeak-ng speaks the test clips). Installed through
# apt-get only where missing, so a machine that has them is not touched.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing; \
	  else echo "warning: install$$missing for the full test suite"; fi; \
	fi

demo: $(STAMP)
	$(VENV)/bin/mio demo

test: $(STAMP) system-deps
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
