"""Fixtures of the runtime's unit tests; the stand-ins themselves are in runtime_fakes.py."""

import pytest
from runtime_fakes import Rig


@pytest.fixture
def rig():
    return Rig()
