"""torch.hub.load(repo_dir, name, source="local") for every zoo entry."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from cvzoo.zoo import MODELS

REPO = str(Path(__file__).resolve().parents[1])


def _hubconf():
    """hubconf imported from its file, as torch.hub does (torch.hub.list/help only take GitHub repos)."""
    spec = importlib.util.spec_from_file_location("hubconf_under_test", Path(REPO) / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hub_lists_exactly_the_zoo():
    hub = _hubconf()
    entries = [f for f in dir(hub) if callable(getattr(hub, f)) and not f.startswith("_")]  # torch.hub.list's rule
    assert sorted(entries) == sorted(MODELS)
    assert {"torch", "torchvision"} <= set(hub.dependencies)


@pytest.mark.parametrize("name", list(MODELS))
def test_hub_loads_every_entry_with_its_docstring(name):
    model = torch.hub.load(REPO, name, source="local")
    assert type(model).__name__ == type(MODELS[name]()).__name__
    # every image model declares what it takes; implicit models take coordinates or rays, not images
    assert hasattr(model, "signature") or MODELS[name].task == "implicit"
    doc = getattr(_hubconf(), name).__doc__  # what torch.hub.help returns
    assert doc and doc.strip().splitlines()[0] == MODELS[name].description


def test_hub_passes_keyword_arguments():
    model = torch.hub.load(REPO, "resnet_micro_classifier", source="local", num_classes=3)
    assert model.num_classes == 3
    assert model(torch.randn(1, 3, 64, 64)).logits.shape == (1, 3)
