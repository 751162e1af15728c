"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from meliad_core import plugins


@pytest.fixture
def installed_plugins():
    """The installed plugins only (other test modules install fakes); restored afterwards."""
    plugins.set_plugin_manager(None)
    yield
    plugins.set_plugin_manager(None)
