"""Loads the toy blocks (tests/scalenet/toys.py) as module ``scalenet_test_toys``: with
--import-mode=importlib test folders are not packages, so test files cannot import a sibling."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TOYS_PATH = Path(__file__).with_name("toys.py")


def load_toys():
    if "scalenet_test_toys" not in sys.modules:
        spec = importlib.util.spec_from_file_location("scalenet_test_toys", TOYS_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["scalenet_test_toys"] = module
        spec.loader.exec_module(module)
    return sys.modules["scalenet_test_toys"]


load_toys()


@pytest.fixture
def toys():
    return load_toys()
