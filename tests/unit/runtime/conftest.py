"""Fixtures of the runtime's unit tests; the stand-ins themselves are in runtime_fakes.py."""

import gc

import pytest
from runtime_fakes import Rig


@pytest.fixture
def rig():
    return Rig()


@pytest.fixture(autouse=True)
def collector_restored():
    """The loop pauses the garbage collector from begin() to its first write: a test that ends
    before that write must not leave the rest of the session without a collector."""
    was_enabled = gc.isenabled()
    yield
    if was_enabled:
        gc.enable()
