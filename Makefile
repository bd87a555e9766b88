# Two commands on a fresh machine: `make demo` and `make test` (README.md). Each step says what it installs.
# .ci/check-machine checks Python (before any venv exists) and Redis, and says what is missing and how to get it.
#   PYTHON=python3.12 make test   builds .venv with that interpreter (3.11 or newer)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock

.PHONY: test lint demo install redis chromium models clean audit soak lock

# The venv holds exactly the lock's versions: what CI tested. The lock is regenerated only by `make lock`.
$(STAMP): $(LOCK)
	@PYTHON="$(PYTHON)" .ci/check-machine python
	@echo "make: creating the virtual environment $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	@echo "make: installing the $$(grep -c '^[A-Za-z]' $(LOCK)) packages pinned in $(LOCK) into $(VENV)" \
	  "(a few minutes on a fresh machine, most of it torch and its libraries)"
	$(PY) -m pip install --progress-bar on -r $(LOCK)
	touch $(STAMP)

install: $(STAMP) redis

redis:
	@.ci/check-machine redis

# Debian's chromium for the ops page's browser test (tests/ops/test_ops_page.py skips, saying why, without it).
chromium:
	@.ci/check-machine chromium

models: install
	$(PY) -m local.demo_models --out var/models

test: install chromium
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# requirements.lock from requirements-dev.txt (which includes requirements.txt) with pip-tools, resolved with
# this machine's pip configuration. Versions already in the lock are kept; `make lock UPGRADE=1` re-resolves the
# unpinned ones to the newest allowed. torch is written as its public version (2.13.0, not 2.13.0+cpu) so that
# the CPU build of a dev machine and the CUDA build of a GPU machine both satisfy the same line.
lock:
	@PYTHON="$(PYTHON)" .ci/check-machine python
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $$(grep '^pip-tools==' requirements-dev.txt)
	CUSTOM_COMPILE_COMMAND="make lock" $(PY) -m piptools compile --quiet --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links --no-emit-trusted-host $(if $(UPGRADE),--upgrade) \
	  -o $(LOCK) requirements-dev.txt
	sed -i -E -e 's/^(torch==[0-9.]+)\+[a-z0-9.]+$$/\1/' \
	  -e '/^#    make lock$$/a #\n# No hashes: the CPU torch wheel of a dev machine and the CUDA one of a GPU machine differ, and\n# torch is pinned by its public version so that both builds satisfy it.' $(LOCK)

# The randomised fault soak (tests/fleet/test_soak.py) for SOAK_MINUTES (default 30; 1.5 inside `make test`):
# prints the seed (SOAK_SEED repeats a schedule), the faults injected and the invariants; report in var/soak/.
SOAK_MINUTES ?= 30
soak: install
	SOAK_MINUTES=$(SOAK_MINUTES) $(PY) -m pytest -q -s -p no:cacheprovider tests/fleet/test_soak.py

demo: install
	$(PY) -m local.demo

# Known-vulnerability audit of the pins (pip-audit); skips with a message where its database is unreachable.
audit: install
	PY=$(PY) .ci/audit

clean:
	rm -rf var .pytest_cache .hypothesis
