from __future__ import annotations

import subprocess
import sys

from cvzoo.cli import main
from cvzoo.zoo import MODELS


def test_list_prints_every_entry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in MODELS:
        assert name in out


def test_list_by_task(capsys):
    assert main(["list", "--task", "features"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert {line.split()[0] for line in lines} == {n for n, e in MODELS.items() if e.task == "features"}


def test_info_prints_the_pyramid(capsys):
    assert main(["info", "resnet_micro_fpn", "--size", "97", "131"]) == 0
    out = capsys.readouterr().out
    assert "p3: (1, 64, 13, 17)  stride 8" in out
    assert "p7: (1, 64, 1, 2)  stride 128" in out


def test_unknown_name_is_a_clear_error(capsys):
    assert main(["info", "resnet18_fnp"]) == 2
    assert "did you mean resnet18_fpn" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "cvzoo", "list", "--task", "multitask"],
                         capture_output=True, text=True, check=True)
    assert "resnet_micro_multitask" in out.stdout
