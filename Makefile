# `make demo` and `make test` work on a fresh machine with nothing but Python 3.11:
# the first use creates .venv and installs the project from the lock (requirements.lock:
# every package at an exact version with its hashes), plus the system packages the tests need.
PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock
GPU_LOCK := requirements-gpu.lock
# espeak-ng speaks the test clips; opencv (PySceneDetect's video reader) needs libGL, glib and xcb;
# chromium is the real browser the chat page is tested in.
APT_PACKAGES := espeak-ng libgl1 libglib2.0-0 libxcb1 chromium
# The one command that compiles both locks (Linux x86_64, Python 3.11, hashes for every file).
UV_COMPILE := $(VENV)/bin/uv pip compile --quiet --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --generate-hashes --custom-compile-command "make lock"

.PHONY: demo test test-fast lint install lock check-env system-deps gpu-check clean

install: $(STAMP)

# The venv's own pip installs exactly the lock (--require-hashes refuses anything unlisted),
# then mio itself without dependencies: nothing is resolved afresh at install time.
$(STAMP): $(LOCK) pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --no-deps --require-hashes -r $(LOCK)
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Regenerate the locks from pyproject's ranges (upgrade: change the range, `make lock`, `make test`).
lock: $(STAMP)
	$(UV_COMPILE) pyproject.toml --extra dev -o $(LOCK)
	$(UV_COMPILE) pyproject.toml --extra dev --extra gpu -o $(GPU_LOCK)

# One line per broken thing, naming the package and the fix, before any test runs.
check-env: $(STAMP)
	@$(VENV)/bin/python -m mio.envcheck

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

demo: check-env system-deps
	$(VENV)/bin/mio demo

# ruff: lint and import order, configured in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check mio tests

test: check-env lint system-deps
	$(VENV)/bin/python -m pytest -q --durations=20

# The development loop: everything but the tests marked slow (at most 2 minutes).
test-fast: check-env lint system-deps
	$(VENV)/bin/python -m pytest -q -m "not slow"

# Every check that needs a GPU, in one process tree (at most 8 minutes on one H100): flash-attn from
# the GPU lock, the tests marked gpu, the GPU parts of the benches; figures in gpu-check.json.
gpu-check: check-env
	$(VENV)/bin/python -m mio.gpucheck gpu-check.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
