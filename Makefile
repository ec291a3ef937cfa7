# Entry points for people and CI. `make test` is what CI runs (.ci/run) and what the
# README gives; `make setup` is the one installation path (scripts/setup.sh).
VENV ?= .venv
PY ?= $(VENV)/bin/python
TESTBED ?= $(VENV)/bin/testbed

.PHONY: setup test unit demo lint doctor clean

setup:
	VENV=$(VENV) bash scripts/setup.sh

# Everything: unit tests and, as root, the integration tests on real namespaces.
test: setup
	$(PY) -m pytest -q -ra tests

# Unit tests only: no root needed (needs an environment made once by `sudo make setup`,
# or PY=/path/to/python with the dependencies installed).
unit:
	@test -x $(PY) || { echo "no $(PY): run 'sudo make setup' first (or set PY=...)" >&2; exit 2; }
	$(PY) -m pytest -q -ra tests/unit

# The claims matrix: every claim's playbook under TLS/TCP and TLS/MPTCP; prints the
# matrix and the path of results/<run-id>/report.html. MATRIX_ARGS="--only M1 M2" etc.
demo: setup
	$(TESTBED) matrix $(MATRIX_ARGS)

lint:
	@test -x $(PY) || { echo "no $(PY): run 'sudo make setup' first (or set PY=...)" >&2; exit 2; }
	$(PY) -m ruff check testbed tests

doctor: setup
	$(TESTBED) doctor

clean:
	$(TESTBED) clean
