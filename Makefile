# `make demo` and `make test` work on a fresh machine with nothing but Python 3.11:
# the first use creates .venv and installs the project (and the system packages the
# tests need) into it.
PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.installed
# espeak-ng speaks the test clips; opencv (PySceneDetect's video reader) needs libGL, glib and xcb.
APT_PACKAGES := espeak-ng libgl1 libglib2.0-0 libxcb1

.PHONY: demo test install system-deps clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

# System packages the tests use, installed through apt-get only where dpkg says they are
# missing, so a machine that has them is not touched.
system-deps:
	@command -v dpkg >/dev/null || { echo "warning: not a Debian system; install $(APT_PACKAGES) for the full test suite"; exit 0; }; \
	missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing; \
	  else echo "warning: install$$missing for the full test suite"; fi; \
	fi

demo: $(STAMP) system-deps
	$(VENV)/bin/mio demo

test: $(STAMP) system-deps
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
