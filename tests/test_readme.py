"""README stays true: two set-up commands, the one .ci/run runs, and the zoo table."""

from __future__ import annotations

import re
from pathlib import Path

from cvzoo.zoo import markdown_table

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_readme_opens_with_exactly_two_setup_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert first_block[0].endswith("cvzoo train") and "pytest" in first_block[1]
    assert README.index("```bash") < README.index("## ")


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    pattern = re.search(r"grep -m1 -E '([^']+)' README.md", ci).group(1)
    matches = [line for line in README.splitlines() if re.search(pattern, line)]
    assert matches and matches[0].endswith("python -m pytest -q")


def test_readme_zoo_table_is_current():
    assert markdown_table() in README


def test_readme_composition_example_runs():
    first_python = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(first_python, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["losses"]["loss"].ndim == 0
    assert namespace["pred"].probs.shape == (8, 10)
