# Entry points for people and CI. `make test` is what CI runs (.ci/run) and what the
# README gives; `make setup` is the one installation path (scripts/setup.sh).
VENV ?= .venv
PY ?= $(VENV)/bin/python
TESTBED ?= $(VENV)/bin/testbed

.PHONY: setup test unit demo bench lint doctor clean vm-test vagrant-test

setup:
	VENV=$(VENV) bash scripts/setup.sh

# Everything: unit tests and, as root, the integration tests on real namespaces. On a
# machine that cannot run the testbed (setup.sh exits 3: not Linux, no MPTCP, ...), the
# suite runs in the running Vagrant VM instead, if there is one.
test:
	@rc=0; VENV=$(VENV) bash scripts/setup.sh || rc=$$?; \
	if [ $$rc -eq 3 ]; then exec bash scripts/vagrant-test.sh --if-running; fi; \
	[ $$rc -eq 0 ] || exit $$rc
	$(PY) -m pytest -q -ra tests

# The VM path, tested on this machine: builds (cached in .cache/vm/) a Debian 12 image from
# Debian packages, boots it with qemu (KVM or TCG, network restricted to a loopback SSH
# forward), provisions it with scripts/setup.sh and runs playbooks in it via testbed --host.
vm-test: setup
	$(PY) -m testbed.vm test

# The suite inside the running Vagrant VM (vagrant up first); results/ copied back.
vagrant-test:
	bash scripts/vagrant-test.sh

# Unit tests only: no root needed (needs an environment made once by `sudo make setup`,
# or PY=/path/to/python with the dependencies installed).
unit:
	@test -x $(PY) || { echo "no $(PY): run 'sudo make setup' first (or set PY=...)" >&2; exit 2; }
	$(PY) -m pytest -q -ra tests/unit

# The claims matrix: every claim's playbook under TLS/TCP and TLS/MPTCP; prints the
# matrix and the path of results/<run-id>/report.html. MATRIX_ARGS="--only M1 M2" etc.
demo: setup
	$(TESTBED) matrix $(MATRIX_ARGS)

# Performance and scale benchmark: results/bench/<id>.json and .png, a table on stdout.
# BENCH_ARGS="--quick" for the reduced mode, "--only topology attack_rate" etc.
bench: setup
	$(PY) -m testbed.bench $(BENCH_ARGS)

lint:
	@test -x $(PY) || { echo "no $(PY): run 'sudo make setup' first (or set PY=...)" >&2; exit 2; }
	$(PY) -m ruff check testbed tests

doctor: setup
	$(TESTBED) doctor

clean:
	$(TESTBED) clean
