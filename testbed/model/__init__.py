"""Pure model: specs, playbooks, addressing, counters, results and verdicts.

Nothing in this package touches the kernel, runs a process or needs root, so all of it
is unit-testable on any machine.
"""
