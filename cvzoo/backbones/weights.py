"""Loading pretrained weights into backbones: from a URL, a .safetensors file or a torch .pth file."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

PretrainedArg = bool | str | os.PathLike


def read_state_dict(source: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a URL (cached by torch.hub), a .safetensors file or a torch checkpoint file.

    Checkpoints that wrap the weights (`{"state_dict": ...}`, `{"model": ...}`) are unwrapped.
    """
    text = str(source)
    if text.startswith(("http://", "https://")):
        state = torch.hub.load_state_dict_from_url(text, map_location="cpu", progress=False)
    else:
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"pretrained weights file {str(path)!r} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"pretrained weights {text!r} hold a {type(state).__name__}, not a state dict")
    return dict(state)


def load_pretrained(
    module: nn.Module,
    pretrained: PretrainedArg,
    default_url: str | None,
    convert: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
) -> nn.Module:
    """Loads weights into `module`; every parameter and buffer of `module` must be covered.

    `pretrained`: False (nothing), True (`default_url`), or a URL / file path. Keys that `module`
    lacks (a classifier, stages the backbone truncated) are ignored; `convert` maps foreign key names
    and shapes onto `module`'s first.
    """
    if pretrained is False or pretrained is None:
        return module
    if pretrained is True:
        if default_url is None:
            raise ValueError(f"pretrained=True: no published weights for {type(module).__name__}; "
                             "pass a file path or URL instead")
        pretrained = default_url
    state = read_state_dict(pretrained)
    if convert is not None:
        state = convert(state)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"pretrained weights {str(pretrained)!r} lack {len(missing)} entries that "
                         f"{type(module).__name__} needs, e.g. {missing[:5]}")
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"pretrained weights {str(pretrained)!r} have shapes that do not fit "
                         f"{type(module).__name__} (key, given, expected): {wrong[:5]}")
    module.load_state_dict({k: state[k] for k in own})
    return module
