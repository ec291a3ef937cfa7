"""Typed errors. The CLI turns each into a one-paragraph message, never a traceback."""

from __future__ import annotations


class TestbedError(Exception):
    """Base class of every error the testbed reports to a user."""

    exit_code = 2


class SpecError(TestbedError):
    """A topology spec or playbook is invalid: names the file, the field and the fix."""

    def __init__(self, file: str, field: str, problem: str, fix: str = "") -> None:
        self.file = file
        self.field = field
        self.problem = problem
        self.fix = fix
        msg = f"{file}: {field}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


class EnvironmentNotReady(TestbedError):
    """The machine cannot run the testbed at all (not root, no MPTCP, missing tool)."""

    exit_code = 3


class StepTimeout(TestbedError):
    """A bounded step did not finish within its bound."""


class RuntimeFailure(TestbedError):
    """The testbed itself failed while building or driving the network."""
