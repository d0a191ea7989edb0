"""The test tree's own rule: without __init__.py files, pytest imports test modules by basename, so two test
files of the same name in different folders break collection of the whole suite."""

from collections import Counter
from pathlib import Path


def test_test_module_basenames_are_unique():
    names = Counter(p.name for p in Path(__file__).parent.rglob("*.py") if p.name != "conftest.py")
    assert not [n for n, c in names.items() if c > 1]
