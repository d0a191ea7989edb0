"""Naming the layers a CAM reads and recording their outputs for one forward pass.

Layers are named by dotted path from the model (`"backbone.model.layer4"`, any depth, `ModuleList`
indices as numbers) or passed as modules. Wrappers are looked through: a `torch.compile`d model
(`_orig_mod.`), `DistributedDataParallel` and `DataParallel` (`module.`) resolve with or without their
prefix, and the CAM runs the unwrapped module (see `unwrap`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

LayerArg = str | nn.Module
_WRAPPER_ATTRS = ("_orig_mod", "module")  # torch.compile's OptimizedModule; DDP and DataParallel


def _wrapped(module: nn.Module) -> nn.Module | None:
    """The module inside a compile/DDP/DataParallel wrapper, or None for an ordinary module."""
    inner = module._modules.get("_orig_mod")
    if inner is not None and type(module).__name__ == "OptimizedModule":
        return inner
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return module.module
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """Strips torch.compile / DistributedDataParallel / DataParallel wrappers: the module that holds the weights.

    A CAM runs this module: a compiled graph would recompile for every call's fresh hooks (and non-eager
    backends do not expose gradients of intermediate activations), and DDP's forward runs collectives
    (buffer broadcast, reducer bookkeeping) that would block when one rank alone explains an image.
    """
    inner = _wrapped(model)
    while inner is not None:
        model, inner = inner, _wrapped(inner)
    return model


def _walk(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for part in path.split("."):
        while True:
            child = module._modules.get(part)
            if child is not None:
                module = child
                break
            inner = _wrapped(module)
            if inner is not None:  # look through a wrapper that does not name this part
                module = inner
                continue
            if part in _WRAPPER_ATTRS:  # a wrapper prefix copied from elsewhere (a DDP or compiled checkpoint)
                break
            return None
    return module


def resolve_layers(model: nn.Module, target_layers: Sequence[LayerArg] | LayerArg,
                   name: str = "target_layers") -> tuple[tuple[str, nn.Module], ...]:
    """Dotted paths or modules -> ((display name, module), ...), submodules of `unwrap(model)`.

    Raises a ValueError naming the argument: an unknown path lists the nearest existing names (difflib).
    """
    if isinstance(target_layers, (str, nn.Module)):
        target_layers = [target_layers]
    if not isinstance(target_layers, Sequence) or not target_layers:
        raise ValueError(f"{name} must be a non-empty list of dotted layer names or modules, got {target_layers!r:.80}")
    inner = unwrap(model)
    names = {id(m): n for n, m in inner.named_modules()}
    out: list[tuple[str, nn.Module]] = []
    for i, layer in enumerate(target_layers):
        if isinstance(layer, str):
            module = _walk(model, layer) if layer else inner
            if module is not None:
                module = unwrap(module) if id(module) not in names else module
            if module is None or id(module) not in names:
                candidates = [n for n in names.values() if n]
                close = difflib.get_close_matches(layer, candidates, n=5, cutoff=0.5)
                hint = f"nearest names: {close}" if close else f"top-level names: {list(inner._modules)[:10]}"
                raise ValueError(f"{name}[{i}] = {layer!r} is not a submodule of {type(inner).__name__}; {hint}")
            out.append((layer or "<model>", module))
        elif isinstance(layer, nn.Module):
            if id(layer) not in names:
                raise ValueError(f"{name}[{i}] is a {type(layer).__name__} that is not a submodule of "
                                 f"{type(inner).__name__}")
            out.append((names[id(layer)] or "<model>", layer))
        else:
            raise ValueError(f"{name}[{i}] must be a dotted layer name or an nn.Module, got {type(layer).__name__}")
    seen: set[int] = set()
    for layer_name, module in out:
        if id(module) in seen:
            raise ValueError(f"{name} lists the layer {layer_name!r} twice")
        seen.add(id(module))
    return tuple(out)


def tensor_leaves(output: object) -> list[Tensor] | None:
    """The tensors of a layer output: a tensor, or a flat list/tuple (NamedTuple too) of tensors; else None."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (list, tuple)) and output and all(isinstance(t, Tensor) for t in output):
        return list(output)
    return None


def rebuild(output: object, leaves: Sequence[Tensor]) -> object:
    """The structure of `output` (see tensor_leaves) holding `leaves` instead."""
    if isinstance(output, Tensor):
        return leaves[0]
    if isinstance(output, tuple):
        return type(output)(*leaves) if hasattr(output, "_fields") else tuple(leaves)
    return list(leaves)


class ActivationRecorder:
    """Forward hooks that keep the outputs of the given layers, live only inside `attached()`.

    Only forwards that run with gradients enabled while `recording()` is on are kept, so a target's
    `model_output` may call `model.predict` (a `torch.no_grad` method) around the pass that is
    explained. A layer output that does not require grad (frozen weights, input without grad) is
    replaced by a fresh leaf that does, so gradients w.r.t. it can still be taken; the rest of the
    model sees a copy of it (in-place ops downstream stay legal).
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Module]]) -> None:
        self.layers = tuple(layers)
        self.outputs: list[list[object]] = [[] for _ in self.layers]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._recording = False

    def _hook(self, slot: int):
        def hook(module: nn.Module, args: object, output: object) -> object:
            if not (self._recording and torch.is_grad_enabled()):
                return None
            leaves = tensor_leaves(output)
            if leaves is not None and not all(t.requires_grad for t in leaves if t.is_floating_point()):
                fresh = [t.detach().requires_grad_() if t.is_floating_point() and not t.requires_grad else t
                         for t in leaves]
                self.outputs[slot].append(rebuild(output, fresh))
                return rebuild(output, [t.clone() for t in fresh])
            self.outputs[slot].append(output)
            return None

        return hook

    @contextmanager
    def attached(self) -> Iterator[ActivationRecorder]:
        """Registers the hooks; removes them on exit, also when the forward raised."""
        try:
            for slot, (_, module) in enumerate(self.layers):
                self._handles.append(module.register_forward_hook(self._hook(slot)))
            yield self
        finally:
            self.remove()

    @contextmanager
    def recording(self) -> Iterator[None]:
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._recording = False

    def clear(self) -> None:
        """Drops the recorded outputs (and the graphs they hold)."""
        self.outputs = [[] for _ in self.layers]

    def take(self) -> list[object]:
        """One output per layer (ValueError if a layer ran zero or several times); clears the recorder."""
        outputs = self.outputs
        self.clear()
        taken = []
        for (name, _), got in zip(self.layers, outputs):
            if len(got) != 1:
                if not got:
                    raise ValueError(f"target_layers: layer {name!r} did not run with gradients enabled during "
                                     "the explained forward pass; choose a layer on the model's forward path")
                raise ValueError(f"target_layers: layer {name!r} ran {len(got)} times in one forward pass (a module "
                                 "shared across pyramid levels?); choose a layer that runs once")
            taken.append(got[0])
        return taken
