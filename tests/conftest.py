"""Shared test configuration.

Tests marked ``@pytest.mark.root`` need real namespaces. Not being root is the only reason
they are skipped; anything else they need that is missing makes them fail, so a broken
machine never passes silently.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root")
    for item in items:
        if item.get_closest_marker("root") is not None:
            item.add_marker(skip)
