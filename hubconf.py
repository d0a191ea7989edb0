"""torch.hub entry points: every cvzoo zoo entry, e.g.

    torch.hub.load("path/to/cvzoo", "resnet_micro_fpn", source="local")

Top level imports only torch and cvzoo's core; timm and other extras load inside the entries that use them.
"""

dependencies = ["torch", "torchvision", "einops", "safetensors"]

from cvzoo.zoo import MODELS as _MODELS  # noqa: E402  (torch.hub reads `dependencies` first by convention)

globals().update({_name: _entry.builder for _name, _entry in _MODELS.items()})
