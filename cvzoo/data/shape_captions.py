"""Captioned shapes: single coloured shapes with captions such as "a red circle", and held-out colour/shape
combinations for compositional zero-shot tests (what `cvzoo.ssl.TinyCLIP` trains on)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from cvzoo.data import shapes as _shapes
from cvzoo.data.info import DatasetInfo

_WORD = re.compile(r"[a-z0-9]+")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")



SHAPE_NAMES = ("circle", "square", "triangle", "star")  # cvzoo.data.shapes.CLASSES: index k draws label k
# white is never held out: seeing every shape in one neutral colour helps shape features transfer across colours
SHAPE_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.7, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1),
    "white": (0.95, 0.95, 0.95),
}
# one combination per shape and per colour: every word still appears in training, each with the others
DEFAULT_HELD_OUT = (("red", "square"), ("blue", "star"), ("green", "triangle"), ("yellow", "circle"))
CAPTION_TEMPLATES = ("a {colour} {shape}",)
COMBINATION_SETS = ("seen", "held_out", "all")


class ShapesCaptions(Dataset):
    """Single coloured shapes with captions: item i -> `(image (3, S, S) float32 in [0, 1], caption)`
    (`target="caption"`) or `(image, label)` (`target="label"`, an int64 0-d index into `classnames`). The
    caption is the string, or its tokens `tokenizer([caption])[0]` when a tokenizer is given (e.g.
    `cvzoo.ssl.WordTokenizer(ShapesCaptions.vocabulary_of(), context_length=8)`).

    Each image holds one circle, square, triangle or star (drawn with `cvzoo.data.shapes`' helpers: random
    diameter in [0.45, 0.9] * S, position and rotation) in one of the named `colours` (RGB in [0, 1], jittered
    by up to `colour_jitter` per channel) on a Shapes background texture, desaturated (saturation x 0.3, so
    colour words name the object) and darkened (x 0.35, so every colour is brighter than the background and
    shape edges look alike in every colour), plus pixel noise. The caption is a template from `templates`
    ("a {colour} {shape}"; a template may name only one of the two) filled in.

    `combinations` picks which (colour, shape) pairs are drawn: "seen" (all but `held_out`), "held_out" (only
    those) or "all"; `held_out` names pairs of `colours` (pass it with your own palette). A model trained on
    "seen" and evaluated on "held_out" never saw those pairs, only their words in other pairs: a compositional
    zero-shot test. `classnames` lists every pair, colour-major, as "red circle", "red square", ...; labels
    index it whatever `combinations` is. Items are seeded from
    `(seed, split, combinations, index)` as Shapes does, drawn on first access and cached.
    """

    def __init__(self, split: str = "train", *, num_images: int | None = None, image_size: int = 32,
                 combinations: str = "seen", held_out: Sequence[tuple[str, str]] = DEFAULT_HELD_OUT,
                 colours: dict[str, tuple[float, float, float]] | None = None,
                 templates: Sequence[str] = CAPTION_TEMPLATES, tokenizer: Callable[[list[str]], Tensor] | None = None,
                 target: str = "caption", colour_jitter: float = 0.05, seed: int = 0, cache: bool = True) -> None:
        self._shapes = _shapes
        if split not in _shapes.SPLITS:
            raise ValueError(f"split must be one of {_shapes.SPLITS}, got {split!r}")
        num_images = _shapes.DEFAULT_NUM_IMAGES[split] if num_images is None else num_images
        _check_positive_int("num_images", num_images)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
        if combinations not in COMBINATION_SETS:
            raise ValueError(f"combinations must be one of {COMBINATION_SETS}, got {combinations!r}")
        if target not in ("caption", "label"):
            raise ValueError(f"target must be 'caption' or 'label', got {target!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if not 0.0 <= colour_jitter <= 0.5:
            raise ValueError(f"colour_jitter must lie in [0, 0.5], got {colour_jitter!r}")
        colours = dict(SHAPE_COLOURS if colours is None else colours)
        if not colours:
            raise ValueError("colours must name at least one colour")
        for name, rgb in colours.items():
            if not isinstance(name, str) or not _WORD.fullmatch(name) or len(rgb) != 3 \
                    or not all(0.0 <= float(c) <= 1.0 for c in rgb):
                raise ValueError(f"colours must map lower-case words to RGB triples in [0, 1], got {name!r}: {rgb!r}")
        if tuple(_shapes.CLASSES) != SHAPE_NAMES:
            raise ValueError(f"cvzoo.data.shapes draws {_shapes.CLASSES}, expected {SHAPE_NAMES}")
        if isinstance(templates, str) or not templates or not all(
                isinstance(t, str) and ("{colour}" in t or "{shape}" in t) for t in templates):
            raise ValueError(f"templates must be a non-empty sequence of strings with '{{colour}}' and/or '{{shape}}', "
                             f"got {templates!r}")
        every = [(c, s) for c in colours for s in SHAPE_NAMES]
        held = tuple((str(c), str(s)) for c, s in held_out)
        for pair in held:
            if pair not in every:
                raise ValueError(f"held_out pair {pair!r} is not a (colour, shape) pair of colours {tuple(colours)} "
                                 f"and shapes {SHAPE_NAMES}")
        chosen = {"seen": [p for p in every if p not in held], "held_out": [p for p in every if p in held],
                  "all": every}[combinations]
        if not chosen:
            raise ValueError(f"combinations={combinations!r} with held_out={held!r} leaves no (colour, shape) pair")
        self.split, self.num_images, self.image_size, self.seed = split, num_images, image_size, seed
        self.combinations: tuple[tuple[str, str], ...] = tuple(chosen)
        self.held_out = held
        self.colours = colours
        self.templates = tuple(templates)
        self.target = target
        self.colour_jitter = float(colour_jitter)
        self.classnames: tuple[str, ...] = tuple(f"{c} {s}" for c, s in every)
        self.vocabulary: tuple[str, ...] = self.vocabulary_of(colours, self.templates)
        self.tokenizer = tokenizer
        self._salt = f"captions-{split}-{combinations}"
        self.cache = cache
        self._cache: dict[int, tuple[Tensor, str, str, str]] = {}
        grid = torch.arange(image_size, dtype=torch.float32) + 0.5  # pixel centres
        self._ys, self._xs = torch.meshgrid(grid, grid, indexing="ij")
        self.info = DatasetInfo(name="shapes-captions", task="classification" if target == "label" else "captions",
                                classes=self.classnames, in_channels=3, image_size=(image_size, image_size),
                                target_fields=(target,))

    @staticmethod
    def vocabulary_of(colours: Iterable[str] = tuple(SHAPE_COLOURS), templates: Sequence[str] = CAPTION_TEMPLATES
                      ) -> tuple[str, ...]:
        """Every word the captions can use: the templates' words, the colour names and the shape names."""
        words = [w for t in templates for w in _WORD.findall(t.replace("{colour}", " ").replace("{shape}", " "))]
        return tuple(dict.fromkeys([*words, *colours, *SHAPE_NAMES]))

    def __len__(self) -> int:
        return self.num_images

    def zero_shot_splits(self) -> dict[str, ShapesCaptions]:
        """The same split as labelled images, {"held_out_pairs": only the held-out pairs, "seen_pairs": only the
        others}: what a zero-shot evaluation scores (labels index `classnames`, all pairs)."""
        common = {"num_images": self.num_images, "image_size": self.image_size, "held_out": self.held_out,
                  "colours": self.colours, "templates": self.templates, "target": "label",
                  "colour_jitter": self.colour_jitter, "seed": self.seed, "cache": self.cache}
        return {"held_out_pairs": ShapesCaptions(self.split, combinations="held_out", **common),
                "seen_pairs": ShapesCaptions(self.split, combinations="seen", **common)}

    def describe(self, index: int) -> tuple[str, str, str]:
        """(colour, shape, caption) of item `index`."""
        _, colour, shape, caption = self._item(index)
        return colour, shape, caption

    def _item(self, index: int) -> tuple[Tensor, str, str, str]:
        return _shapes.cached_item(self, index)

    def _render(self, index: int) -> tuple[Tensor, str, str, str]:
        sh, size = self._shapes, self.image_size
        g = torch.Generator().manual_seed(sh.item_seed(self.seed, self._salt, index))
        colour, shape = self.combinations[int(torch.randint(len(self.combinations), (1,), generator=g))]
        template = self.templates[int(torch.randint(len(self.templates), (1,), generator=g))]
        background = sh._background(g, size)
        grey = background.mean(dim=0, keepdim=True)
        # desaturated and dark: every palette colour is brighter than the background, so a shape's luminance
        # edges have the same sign whatever its colour (shape cues that transfer to unseen colour pairs)
        canvas = 0.35 * (grey + 0.3 * (background - grey))  # (3, S, S)
        frac, u, v, angle = torch.rand(4, generator=g).tolist()
        r = (0.45 + 0.45 * frac) * size / 2
        cx, cy = r + (size - 2 * r) * u, r + (size - 2 * r) * v  # the whole shape inside the image
        mask, _ = sh._draw_shape(SHAPE_NAMES.index(shape), cx, cy, r, angle * 2 * math.pi, self._xs, self._ys)
        jitter = (torch.rand(3, generator=g) * 2 - 1) * self.colour_jitter
        rgb = (torch.tensor(self.colours[colour], dtype=torch.float32) + jitter).clamp(0.0, 1.0)
        canvas = torch.where(mask, rgb[:, None, None], canvas)
        canvas = (canvas + sh._NOISE_STD * torch.randn(canvas.shape, generator=g)).clamp(0.0, 1.0)
        return canvas, colour, shape, template.format(colour=colour, shape=shape)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, colour, shape, caption = self._item(index)
        if self.target == "label":
            return image.clone(), torch.tensor(self.classnames.index(f"{colour} {shape}"), dtype=torch.int64)
        return image.clone(), caption if self.tokenizer is None else self.tokenizer([caption])[0]
