"""CLIP (Radford et al. 2021): the symmetric contrastive loss, an open_clip wrapper, zero-shot classification
heads built from text embeddings, and a tiny CLIP (any cvzoo backbone + a small word-level text transformer),
trained on the toy captions of `cvzoo.data.ShapesCaptions`.

Image and text encoders here share one duck type, read by the zero-shot helpers and by
`cvzoo.generative.clip_guidance`: `encode_image(images (B, C, H, W) normalised with .signature) -> (B, D)`,
`encode_text(tokens (N, L) int64) -> (N, D)` (both unnormalised; `normalize=True` gives unit rows, as in
open_clip), `signature`, and `logit_scale`, the learnable log of the logit multiplier (multiplier =
`logit_scale.exp()`, clamped at 100 as CLIP does).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cvzoo._optional import require
from cvzoo.heads.pooling import GlobalPool
from cvzoo.types import Signature, cast_like_parameters

MAX_LOGIT_SCALE = 100.0  # CLIP clips the logit multiplier at 100 (its log at ln 100) for training stability
DEFAULT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
ZERO_SHOT_SCALE = 100.0  # the multiplier CLIP (and open_clip's zero-shot evaluation) apply to cosine logits


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value) if isinstance(value, (int, float, str)) or value is None else type(value).__name__


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _device_of(module: object) -> torch.device:
    params = module.parameters() if isinstance(module, nn.Module) else iter(())
    param = next(params, None)
    return param.device if param is not None else torch.device("cpu")


# ------------------------------------------------------------------------------------------------- the loss


def clip_loss(image_embeddings: Tensor, text_embeddings: Tensor, logit_scale: Tensor | float) -> Tensor:
    """CLIP's symmetric InfoNCE. (B, D) image and (B, D) text embeddings, row i of each a positive pair -> ().

    Rows are L2-normalised here; logits are `logit_scale * img @ txt.T` (B, B) and the loss is the mean of the
    cross entropies image -> text (rows) and text -> image (columns), each with targets `arange(B)`.
    `logit_scale` is the multiplier (CLIP's `logit_scale.exp()`), a number or a 0-d / 1-element tensor; the
    same convention as open_clip's `ClipLoss`, which takes normalised features. Computed in float32 (autocast
    off): log-probabilities of B-way softmaxes.
    """
    for name, x in (("image_embeddings", image_embeddings), ("text_embeddings", text_embeddings)):
        if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating (B, D) tensor, got {_describe(x)}")
    if image_embeddings.shape != text_embeddings.shape or image_embeddings.shape[0] < 1:
        raise ValueError(f"image_embeddings and text_embeddings must have the same non-empty (B, D) shape, got "
                         f"{tuple(image_embeddings.shape)} and {tuple(text_embeddings.shape)}")
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a number or a one-element tensor, got {_describe(logit_scale)}")
        logit_scale = logit_scale.reshape(()).float()
    elif isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
        raise ValueError(f"logit_scale must be a number or a one-element tensor, got {_describe(logit_scale)}")
    with torch.autocast(image_embeddings.device.type, enabled=False):
        img = F.normalize(image_embeddings.float(), dim=-1)
        txt = F.normalize(text_embeddings.float(), dim=-1)
        logits = logit_scale * img @ txt.T  # (B, B): [i, j] image i against caption j
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# --------------------------------------------------------------------------------------------- open_clip


class OpenCLIP(nn.Module):
    """An open_clip model in cvzoo's conventions. Images (B, 3, S, S) normalised with `signature` -> (B, D).

    `model_name` is an open_clip architecture (`open_clip.list_models()`, e.g. "ViT-B-32", or one registered
    with `open_clip.add_model_config`) or "local-dir:/path" (a folder with `open_clip_config.json` and
    weights). `pretrained` is None (random weights), an open_clip tag (e.g. "laion2b_s34b_b79k", downloaded
    on first use) or a local checkpoint file. Offline machines pass a path: download the checkpoint
    elsewhere (e.g. `open_clip_pytorch_model.bin` from the model's hub page) and give its path.

    `signature`: the model's mean / std, `min_size` its input size; `encode_image` checks that H and W equal
    `image_size` (open_clip models embed positions for that one size). `tokenizer` is open_clip's
    (`tokenizer(list[str]) -> (N, context_length)` int64), `preprocess` its PIL evaluation transform.
    `forward(images)` is `encode_image`; `loss(images, tokens)` is the CLIP loss for fine-tuning.
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None, *,
                 device: str | torch.device | None = None) -> None:
        super().__init__()
        if not isinstance(model_name, str) or not model_name:
            raise ValueError(f"model_name must be an open_clip model name, got {model_name!r}")
        if pretrained is not None:
            if not isinstance(pretrained, str) or not pretrained:
                raise ValueError(f"pretrained must be None, an open_clip tag or a checkpoint path, got {pretrained!r}")
            looks_like_path = os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
            if looks_like_path and not os.path.isfile(pretrained):
                raise ValueError(f"pretrained={pretrained!r} looks like a checkpoint path but no such file exists")
        open_clip = require("open_clip", "clip", "OpenCLIP")
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=torch.device("cpu") if device is None else device)
        self.model = model
        self.model_name = model_name
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.preprocess = preprocess
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.image_size: tuple[int, int] = (int(h), int(w))
        self.signature = Signature(in_channels=3, mean=tuple(float(m) for m in cfg["mean"]),
                                   std=tuple(float(s) for s in cfg["std"]), min_size=min(self.image_size),
                                   outputs=("image_embedding",))

    @property
    def logit_scale(self) -> Tensor:
        """The learnable log of the logit multiplier (open_clip's `model.logit_scale`)."""
        return self.model.logit_scale

    def encode_image(self, images: Tensor, *, normalize: bool = False) -> Tensor:
        """(B, 3, H, W) normalised with `signature`, H, W = image_size -> (B, D)."""
        images = self.signature.validate(images)
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"images of size {images.shape[-2]}x{images.shape[-1]} do not match the model's input "
                             f"size {self.image_size[0]}x{self.image_size[1]}; resize them first")
        return self.model.encode_image(cast_like_parameters(images, self.model), normalize=normalize)

    def tokenize(self, texts: str | Sequence[str]) -> Tensor:
        """str or list of N strings -> (N, context_length) int64 tokens on the model's device."""
        return self.tokenizer([texts] if isinstance(texts, str) else list(texts)).to(_device_of(self))

    def encode_text(self, texts: str | Sequence[str] | Tensor, *, normalize: bool = False) -> Tensor:
        """Strings (tokenised here) or (N, L) int64 tokens -> (N, D)."""
        tokens = texts if isinstance(texts, Tensor) else self.tokenize(texts)
        if tokens.ndim != 2 or tokens.is_floating_point():
            raise ValueError(f"tokens must be a (N, L) integer tensor, got {_describe(tokens)}")
        return self.model.encode_text(tokens.to(_device_of(self)), normalize=normalize)

    def forward(self, images: Tensor) -> Tensor:
        return self.encode_image(images)

    def loss(self, images: Tensor, targets: Tensor | None = None) -> dict[str, Tensor]:
        """images (B, 3, S, S) normalised, targets (B, L) caption tokens -> {"loss", "logit_scale"}."""
        tokens = _check_tokens(targets, images.shape[0] if isinstance(images, Tensor) else None)
        scale = self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        loss = clip_loss(self.encode_image(images), self.encode_text(tokens), scale)
        return {"loss": loss, "logit_scale": scale.detach()}


def _check_tokens(tokens: object, batch: int | None, name: str = "targets") -> Tensor:
    if tokens is None:
        raise ValueError(f"{name} are required: CLIP trains on (image, caption tokens) pairs; pass the (B, L) "
                         "int64 token batch of the captions")
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.is_floating_point() or tokens.is_complex() \
            or tokens.dtype == torch.bool:
        raise ValueError(f"{name} must be a (B, L) integer tensor of caption tokens, got {_describe(tokens)}")
    if batch is not None and tokens.shape[0] != batch:
        raise ValueError(f"{name} hold {tokens.shape[0]} captions for {batch} images; expected one per image")
    return tokens


# ------------------------------------------------------------------------------------------- zero-shot


def _texts(classnames: Sequence[str], templates: Sequence[str | Callable[[str], str]]) -> list[str]:
    if isinstance(classnames, str) or not isinstance(classnames, Sequence) or not classnames \
            or not all(isinstance(c, str) for c in classnames):
        raise ValueError(f"classnames must be a non-empty sequence of strings, got {classnames!r}")
    if isinstance(templates, str) or not isinstance(templates, Sequence) or not templates:
        raise ValueError(f"templates must be a non-empty sequence of format strings with '{{}}' or callables, "
                         f"got {templates!r}")
    for t in templates:
        if not (callable(t) or (isinstance(t, str) and "{}" in t)):
            raise ValueError(f"templates must hold format strings with '{{}}' or callables, got {t!r}")
    # class-major order (all templates of class 0, then class 1, ...), as open_clip's builder
    return [t.format(c) if isinstance(t, str) else t(c) for c in classnames for t in templates]


@torch.no_grad()
def zero_shot_classifier(model: nn.Module, tokenizer: Callable[[list[str]], Tensor] | None,
                         classnames: Sequence[str], templates: Sequence[str | Callable[[str], str]], *,
                         batch_size: int = 256) -> Tensor:
    """Classification weights from text: -> (D, K), column k the class embedding of `classnames[k]`.

    Each class's T prompts (`template.format(classname)` or `template(classname)`) are encoded, L2-normalised,
    averaged and renormalised (CLIP's prompt ensembling; open_clip's `build_zero_shot_classifier`). `model`
    needs `encode_text(tokens)`; `tokenizer(list[str]) -> (N, L)` tokens (None: `model.tokenizer`).
    Texts are encoded `batch_size` at a time.
    """
    _check_positive_int("batch_size", batch_size)
    tokenizer = getattr(model, "tokenizer", None) if tokenizer is None else tokenizer
    if not callable(tokenizer):
        raise ValueError("tokenizer must be a callable list[str] -> (N, L) tokens (or None with a model that has "
                         f"a tokenizer), got {_describe(tokenizer)}")
    texts = _texts(classnames, templates)
    device = _device_of(model)
    chunks = [model.encode_text(tokenizer(texts[i:i + batch_size]).to(device)).float()
              for i in range(0, len(texts), batch_size)]
    emb = F.normalize(torch.cat(chunks), dim=-1)  # (K * T, D)
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)  # (K, D) mean of unit template embeddings
    return F.normalize(emb, dim=-1).T.contiguous()  # (D, K)


class ZeroShotClassifier(nn.Module):
    """An image encoder and text-derived class weights: (B, C, H, W) normalised images -> logits (B, K).

    `logits = scale * normalize(encoder.encode_image(images)) @ weight`, weight (D, K) with unit columns
    (from `zero_shot_classifier`); `scale` 100 as CLIP's zero-shot evaluation (it does not change the
    argmax, only softmax sharpness). `encoder` is any module with `encode_image` (`OpenCLIP`, `TinyCLIP`);
    its `signature` (if any) is this model's, with output "logits".
    """

    def __init__(self, encoder: nn.Module, weight: Tensor, *, scale: float = ZERO_SHOT_SCALE,
                 classnames: Sequence[str] | None = None) -> None:
        super().__init__()
        if not callable(getattr(encoder, "encode_image", None)):
            raise ValueError(f"encoder must have an encode_image method, got {type(encoder).__name__}")
        if not isinstance(weight, Tensor) or weight.ndim != 2 or not weight.is_floating_point():
            raise ValueError(f"weight must be a floating (D, K) tensor of class embeddings, got {_describe(weight)}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale must be a positive number, got {scale!r}")
        if classnames is not None and len(classnames) != weight.shape[1]:
            raise ValueError(f"classnames has {len(classnames)} names for {weight.shape[1]} weight columns")
        self.encoder = encoder
        self.register_buffer("weight", weight.detach().clone())
        self.scale = float(scale)
        self.num_classes = weight.shape[1]
        self.classnames = tuple(classnames) if classnames is not None else None
        sig = getattr(encoder, "signature", None)
        self.signature = sig.replace(outputs=("logits",)) if isinstance(sig, Signature) else None

    @classmethod
    def from_classnames(cls, model: nn.Module, tokenizer: Callable[[list[str]], Tensor] | None,
                        classnames: Sequence[str], templates: Sequence[str | Callable[[str], str]], *,
                        scale: float = ZERO_SHOT_SCALE) -> ZeroShotClassifier:
        return cls(model, zero_shot_classifier(model, tokenizer, classnames, templates), scale=scale,
                   classnames=classnames)

    def forward(self, images: Tensor) -> Tensor:
        emb = F.normalize(self.encoder.encode_image(images).float(), dim=-1)  # (B, D)
        return self.scale * emb @ self.weight.float()  # (B, K)


@torch.no_grad()
def zero_shot_accuracy(model: nn.Module, tokenizer: Callable[[list[str]], Tensor] | None, dataset: Dataset,
                       classnames: Sequence[str], templates: Sequence[str | Callable[[str], str]], *,
                       batch_size: int = 64) -> float:
    """Top-1 accuracy of the zero-shot classifier of `classnames` on `dataset` -> a float in [0, 1].

    `dataset` yields `(image (C, H, W) in [0, 1], label)` with `label` an index into `classnames` (e.g.
    `ShapesCaptions(target="label")`); images are normalised with `model.signature`. The model runs in
    eval mode (its mode is restored after).
    """
    _check_positive_int("batch_size", batch_size)
    signature = getattr(model, "signature", None)
    if not isinstance(signature, Signature):
        raise ValueError(f"model must have a Signature `signature` to normalise images, got {type(model).__name__}")
    classifier = ZeroShotClassifier.from_classnames(model, tokenizer, classnames, templates)
    was_training = model.training
    model.eval()
    device = _device_of(model)
    correct = total = 0
    try:
        for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point():
                raise ValueError(f"the dataset must yield integer class labels, got {_describe(labels)} per batch")
            pred = classifier(signature.normalize(images.to(device))).argmax(dim=1)
            correct += int((pred.cpu() == labels).sum())
            total += labels.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("dataset is empty")
    return correct / total


# ------------------------------------------------------------------------------------------ tiny text side

PAD_ID, EOT_ID, UNK_ID = 0, 1, 2
_WORD = re.compile(r"[a-z0-9]+")


class WordTokenizer:
    """Lower-cased words -> ids, one row of `context_length` per text: `tokenizer(texts) -> (N, L)` int64.

    Ids: 0 padding, 1 end of text (EOT), 2 unknown word, then the vocabulary in the given order (duplicates
    dropped). Words are runs of `[a-z0-9]` after lower-casing (punctuation separates words and is dropped).
    Each row holds the words, then EOT, then padding; a text longer than `context_length - 1` words is cut
    and still ends with EOT (as open_clip's tokenizer). `decode` inverts it up to case, punctuation and
    unknown words (`<unk>`).
    """

    pad_id, eot_id, unk_id = PAD_ID, EOT_ID, UNK_ID

    def __init__(self, vocabulary: Iterable[str], *, context_length: int = 8) -> None:
        _check_positive_int("context_length", context_length)
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (a word and the end-of-text token), got {context_length}")
        if isinstance(vocabulary, str):
            raise ValueError(f"vocabulary must be an iterable of words, not one string: {vocabulary!r}")
        words: list[str] = []
        for w in vocabulary:
            if not isinstance(w, str) or not _WORD.fullmatch(w.lower()):
                raise ValueError(f"vocabulary entries must be single words of letters and digits, got {w!r}")
            if w.lower() not in words:
                words.append(w.lower())
        if not words:
            raise ValueError("vocabulary must hold at least one word")
        self.words: tuple[str, ...] = ("<pad>", "<eot>", "<unk>", *words)
        self._ids = {w: i for i, w in enumerate(self.words) if i > UNK_ID}
        self.context_length = context_length

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        """One text -> its word ids (no EOT, no padding, not cut)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {_describe(text)}")
        return [self._ids.get(w, UNK_ID) for w in _WORD.findall(text.lower())]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> Tensor:
        """str or N strings -> (N, context_length) int64."""
        length = self.context_length if context_length is None else context_length
        _check_positive_int("context_length", length)
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.full((len(texts), length), PAD_ID, dtype=torch.int64)
        for i, text in enumerate(texts):
            ids = self.encode(text)[: length - 1] + [EOT_ID]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out

    def decode(self, tokens: Tensor | Sequence[int]) -> str:
        """One row of ids -> the words up to the first EOT, joined by spaces."""
        words = []
        for i in (tokens.tolist() if isinstance(tokens, Tensor) else tokens):
            if i == EOT_ID:
                break
            if i != PAD_ID:
                words.append(self.words[i] if 0 <= i < len(self.words) else "<unk>")
        return " ".join(words)

    def batch_decode(self, tokens: Tensor) -> list[str]:
        """(N, L) -> N strings."""
        return [self.decode(row) for row in tokens]


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)). (B, L, W) -> (B, L, W)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, L, W / heads)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.ln_2(x))


class TinyTextEncoder(nn.Module):
    """A small CLIP text transformer. tokens (B, L) int64, L <= context_length -> pooled features (B, width).

    Token + learned position embeddings, `layers` pre-norm blocks (0: none, so with `pool="mean"` the text
    is a bag of position-tagged words, whose embeddings add up: what composes unseen word pairs), a final
    LayerNorm. `causal=True` masks
    attention to earlier positions (CLIP's text model); `causal=False` lets every token see every non-pad
    token. `pool="eot"` reads the features at the first end-of-text token (`eot_id`; every row must hold one),
    which under causal attention has seen the whole caption, as CLIP; `pool="mean"` averages the features of
    the non-pad tokens (EOT included). Padding (`pad_id`) follows the text, so it never changes the output
    of either pooling. Ids match `WordTokenizer` (pad 0, EOT 1).
    """

    def __init__(self, vocab_size: int, *, width: int = 64, layers: int = 2, heads: int = 4, context_length: int = 8,
                 causal: bool = True, pool: str = "eot", mlp_ratio: float = 4.0, pad_id: int = PAD_ID,
                 eot_id: int = EOT_ID) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("width", width), ("heads", heads),
                            ("context_length", context_length)):
            _check_positive_int(name, value)
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
            raise ValueError(f"layers must be an int >= 0 (0: a bag of position-tagged words), got {layers!r}")
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        if pool not in ("eot", "mean"):
            raise ValueError(f"pool must be 'eot' or 'mean', got {pool!r}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio!r}")
        for name, value in (("pad_id", pad_id), ("eot_id", eot_id)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
                raise ValueError(f"{name} must be an int in [0, vocab_size={vocab_size}), got {value!r}")
        self.vocab_size, self.width, self.context_length = vocab_size, width, context_length
        self.causal, self.pool = bool(causal), pool
        self.pad_id, self.eot_id = pad_id, eot_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.register_buffer("causal_mask", torch.ones(context_length, context_length, dtype=torch.bool).tril(),
                             persistent=False)
        # CLIP's initialisation of the embeddings
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens: Tensor) -> Tensor:
        tokens = _check_tokens(tokens, None, "tokens")
        b, n = tokens.shape
        if n > self.context_length:
            raise ValueError(f"tokens have length {n} > context_length={self.context_length}")
        if not torch.compiler.is_compiling():  # reads values (a sync): skipped while torch.compile traces
            if int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size:
                raise ValueError(f"tokens must lie in [0, vocab_size={self.vocab_size}), got values from "
                                 f"{int(tokens.min())} to {int(tokens.max())}")
            if self.pool == "eot" and not bool((tokens == self.eot_id).any(dim=1).all()):
                raise ValueError(f"every row of tokens must hold the end-of-text id {self.eot_id} (pool='eot')")
        tokens = tokens.to(self.token_embedding.weight.device)
        x = self.token_embedding(tokens) + self.positional_embedding[:n]  # (B, L, W)
        keep = tokens != self.pad_id  # (B, L)
        if self.causal:
            mask = self.causal_mask[:n, :n]  # (L, L): query i sees keys j <= i
        else:  # key padding; key 0 always visible so an all-pad row gives no NaN
            mask = (keep | (torch.arange(n, device=tokens.device) == 0))[:, None, None, :]  # (B, 1, 1, L)
        for block in self.blocks:
            x = block(x, mask)
        x = self.ln_final(x)
        if self.pool == "eot":
            idx = (tokens == self.eot_id).int().argmax(dim=1)  # (B,) first EOT
            return x[torch.arange(b, device=x.device), idx]
        w = keep.to(x.dtype)[..., None]  # (B, L, 1)
        return (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)


# ---------------------------------------------------------------------------------------------- TinyCLIP


class TinyCLIP(nn.Module):
    """A small CLIP: a cvzoo backbone (global average pool of its last map) + linear projection, a text
    encoder + linear projection, both to `embed_dim`, and a learnable logit scale.

    `loss(images, targets)` -> {"loss": clip_loss, "logit_scale": the multiplier used}: `images` (B, C, H, W)
    normalised with `signature` (the backbone's), `targets` the (B, L) int64 caption tokens, or B caption
    strings that `tokenizer` turns into tokens (what a caption dataset without a tokenizer yields). The
    multiplier is `logit_scale.exp()` clamped at 100 (CLIP). `encode_image` / `encode_text` give (B,
    embed_dim) embeddings (unit rows with `normalize=True`); `forward(images)` is the backbone's pooled
    features (B, C), the embedding kept after pre-training. `text_encoder` is any module `tokens (B, L) ->
    (B, width)` with a `width` attribute (`TinyTextEncoder`); `tokenizer` (optional, e.g. `WordTokenizer`) lets
    `encode_text` take strings.
    """

    def __init__(self, image_backbone: nn.Module, text_encoder: nn.Module, *, embed_dim: int = 64,
                 init_logit_scale: float = DEFAULT_LOGIT_SCALE,
                 tokenizer: Callable[[list[str]], Tensor] | None = None) -> None:
        super().__init__()
        info = getattr(image_backbone, "feature_info", None)
        if not info or not isinstance(getattr(image_backbone, "signature", None), Signature):
            raise ValueError(f"image_backbone must be a cvzoo backbone with feature_info and signature, "
                             f"got {type(image_backbone).__name__}")
        width = getattr(text_encoder, "width", None)
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"text_encoder must declare its output size as an int `width`, got {width!r}")
        _check_positive_int("embed_dim", embed_dim)
        if isinstance(init_logit_scale, bool) or not isinstance(init_logit_scale, (int, float)) \
                or not math.isfinite(init_logit_scale):
            raise ValueError(f"init_logit_scale must be a finite number (the log of the multiplier), "
                             f"got {init_logit_scale!r}")
        self.backbone = image_backbone
        self.pool = GlobalPool("avg")
        self.image_projection = nn.Linear(info[-1].channels, embed_dim, bias=False)
        self.text_encoder = text_encoder
        self.text_projection = nn.Linear(width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.embed_dim = embed_dim
        self.tokenizer = tokenizer
        self.signature: Signature = image_backbone.signature

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) normalised -> (B, C_last) pooled backbone features."""
        return self.pool(self.backbone(images))

    def encode_image(self, images: Tensor, *, normalize: bool = False) -> Tensor:
        """(B, C, H, W) normalised -> (B, embed_dim)."""
        images = cast_like_parameters(self.signature.validate(images), self)
        emb = self.image_projection(self.pool(self.backbone(images)))
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, texts: Tensor | str | Sequence[str], *, normalize: bool = False) -> Tensor:
        """(N, L) int64 tokens (or strings, with a tokenizer) -> (N, embed_dim)."""
        if not isinstance(texts, Tensor):
            if self.tokenizer is None:
                raise ValueError("encode_text got strings but this TinyCLIP has no tokenizer; pass tokens or build "
                                 "it with tokenizer=WordTokenizer(...)")
            texts = self.tokenizer([texts] if isinstance(texts, str) else list(texts))
        emb = self.text_projection(self.text_encoder(texts))
        return F.normalize(emb, dim=-1) if normalize else emb

    def loss(self, images: Tensor, targets: Tensor | Sequence[str] | None = None) -> dict[str, Tensor]:
        batch = images.shape[0] if isinstance(images, Tensor) else None
        if isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets):
            if self.tokenizer is None:
                raise ValueError("targets are caption strings but this TinyCLIP has no tokenizer; pass tokens or "
                                 "build it with tokenizer=WordTokenizer(...)")
            if batch is not None and len(targets) != batch:
                raise ValueError(f"targets has {len(targets)} captions for {batch} images; expected one per image")
            targets = self.tokenizer(list(targets)).to(self.logit_scale.device)
        tokens = _check_tokens(targets, batch)
        scale = self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        loss = clip_loss(self.encode_image(images), self.encode_text(tokens), scale)
        return {"loss": loss, "logit_scale": scale.detach()}
