"""`cvzoo implicit fit-image` and `cvzoo implicit nerf`, called in-process with tiny settings."""

import argparse

import pytest
import torch
from safetensors.torch import load_file

from cvzoo.implicit.cli import add_parsers

pytestmark = pytest.mark.usefixtures("one_thread")


def _parse(argv):
    parser = argparse.ArgumentParser(prog="cvzoo")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_fit_image_writes_png_and_weights(tmp_path, capsys):
    pytest.importorskip("skimage")
    args = _parse(["implicit", "fit-image", "--size", "16", "--steps", "5", "--hidden", "16", "--layers", "1",
                   "--out", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "after 5 steps" in out
    assert (tmp_path / "fit.png").stat().st_size > 0
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert weights["network.net.0.linear.weight"].shape == (16, 2)


def test_nerf_prints_held_out_psnr_and_writes_render(tmp_path, capsys):
    args = _parse(["implicit", "nerf", "--views", "5", "--test-views", "1", "--size", "8", "--steps", "3",
                   "--batch-rays", "64", "--hidden", "16", "--out", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "held-out PSNR" in out and "mean training colour" in out
    from PIL import Image

    with Image.open(tmp_path / "held_out.png") as im:  # one render above its ground truth
        assert im.size[1] > im.size[0]
    assert any(torch.is_tensor(v) for v in load_file(str(tmp_path / "model.safetensors")).values())


def test_bad_arguments_raise_value_errors(tmp_path):
    args = _parse(["implicit", "nerf", "--views", "4", "--test-views", "4", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--test-views must be < --views=4, got 4"):
        args.func(args)
    args = _parse(["implicit", "fit-image", "--steps", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--steps must be >= 1, got 0"):
        args.func(args)
