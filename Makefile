# Two commands on a fresh machine: `make demo` and `make test` (README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo install redis models clean audit soak

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP) redis

redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing Debian's redis-server"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

models: install
	$(PY) -m local.demo_models --out var/models

test: install
	$(PY) -m pytest -q

# The randomised fault soak (tests/fleet/test_soak.py) for SOAK_MINUTES (default 30; 3 inside `make test`):
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
