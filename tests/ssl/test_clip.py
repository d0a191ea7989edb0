"""CLIP: the loss and the zero-shot head against open_clip, the open_clip wrapper on a tiny registered config,
the word tokenizer and tiny text transformer (against torch's TransformerEncoderLayer), TinyCLIP training on
captioned shapes and the held-out combination split."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvzoo.backbones import ResNet
from cvzoo.data.shape_captions import DEFAULT_HELD_OUT, SHAPE_COLOURS, ShapesCaptions
from cvzoo.ssl.clip import (
    EOT_ID,
    PAD_ID,
    UNK_ID,
    OpenCLIP,
    TinyCLIP,
    TinyTextEncoder,
    WordTokenizer,
    ZeroShotClassifier,
    clip_loss,
    zero_shot_accuracy,
    zero_shot_classifier,
)

TINY_NAME = "cvzoo-test-tiny-clip"
# the smallest built-in open_clip architectures have tens of millions of parameters: register a tiny one
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def open_clip(tmp_path_factory):
    oc = pytest.importorskip("open_clip")
    path = tmp_path_factory.mktemp("open_clip_cfg") / f"{TINY_NAME}.json"
    path.write_text(json.dumps(TINY_CFG))
    oc.add_model_config(path)
    return oc


@pytest.fixture(scope="module")
def tiny_open_clip(open_clip):
    torch.manual_seed(0)
    return OpenCLIP(TINY_NAME).eval()


def tiny_backbone(seed: int = 0) -> ResNet:
    torch.manual_seed(seed)
    return ResNet(layers=(1, 1), widths=(8, 16), stem_width=8, out_indices=(0, 1))  # ~6k parameters, stride 8


def tiny_clip(seed: int = 0, pool: str = "eot", causal: bool = True) -> TinyCLIP:
    tok = WordTokenizer(ShapesCaptions.vocabulary_of(), context_length=8)
    torch.manual_seed(seed)
    text = TinyTextEncoder(tok.vocab_size, width=16, layers=1, heads=2, context_length=8, pool=pool, causal=causal)
    return TinyCLIP(tiny_backbone(seed), text, embed_dim=16, tokenizer=tok)


# ---- the loss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 14.3, torch.tensor(100.0)])
def test_clip_loss_matches_open_clip(open_clip, scale):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(6, 16, generator=g, requires_grad=True)
    txt = torch.randn(6, 16, generator=g, requires_grad=True)
    ours = clip_loss(img, txt, scale)
    ref = open_clip.loss.ClipLoss()(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale)
    torch.testing.assert_close(ours, ref)
    g_ours = torch.autograd.grad(ours, [img, txt])
    g_ref = torch.autograd.grad(ref, [img, txt])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)


def test_clip_loss_brute_force():
    g = torch.Generator().manual_seed(1)
    img, txt, s = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g), 7.0
    cos = [[float(F.cosine_similarity(img[i], txt[j], dim=0)) for j in range(4)] for i in range(4)]
    i2t = [-s * cos[i][i] + math.log(sum(math.exp(s * cos[i][j]) for j in range(4))) for i in range(4)]
    t2i = [-s * cos[j][j] + math.log(sum(math.exp(s * cos[i][j]) for i in range(4))) for j in range(4)]
    want = (sum(i2t) / 4 + sum(t2i) / 4) / 2
    assert float(clip_loss(img, txt, s)) == pytest.approx(want, rel=1e-5)


def test_clip_loss_compiles():
    img, txt, scale = torch.randn(5, 8), torch.randn(5, 8), torch.tensor(20.0)
    compiled = torch.compile(clip_loss, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(img, txt, scale), clip_loss(img, txt, scale))


def test_clip_loss_validates():
    with pytest.raises(ValueError, match="same non-empty"):
        clip_loss(torch.randn(4, 8), torch.randn(3, 8), 1.0)
    with pytest.raises(ValueError, match="image_embeddings"):
        clip_loss(torch.randn(4, 8, 1), torch.randn(4, 8), 1.0)
    with pytest.raises(ValueError, match="logit_scale"):
        clip_loss(torch.randn(4, 8), torch.randn(4, 8), torch.ones(2))


# ---- open_clip wrapper and zero-shot heads ---------------------------------------------------------------


def test_open_clip_wrapper(open_clip, tiny_open_clip):
    m = tiny_open_clip
    assert m.image_size == (16, 16)
    assert m.signature.min_size == 16
    assert m.signature.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert m.signature.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    assert m.logit_scale is m.model.logit_scale
    assert float(m.logit_scale.detach().exp()) == pytest.approx(1 / 0.07, rel=1e-5)
    images = m.signature.normalize(torch.rand(3, 3, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(images), m.model.encode_image(images))
        torch.testing.assert_close(m(images), m.model.encode_image(images))
        texts = ["a red circle", "a blue star"]
        tokens = open_clip.get_tokenizer(TINY_NAME)(texts)
        assert tokens.shape == (2, 8)
        torch.testing.assert_close(m.encode_text(texts), m.model.encode_text(tokens))
        torch.testing.assert_close(m.encode_text(tokens, normalize=True), F.normalize(m.model.encode_text(tokens)))
        out = m.loss(images[:2], tokens)
        want = open_clip.loss.ClipLoss()(m.model.encode_image(images[:2], normalize=True),
                                         m.model.encode_text(tokens, normalize=True), m.model.logit_scale.exp())
        torch.testing.assert_close(out["loss"], want)
    with pytest.raises(ValueError, match="input size 16x16"):
        m.encode_image(torch.zeros(1, 3, 32, 32))


def test_open_clip_loads_a_local_checkpoint(tiny_open_clip, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_open_clip.model.state_dict(), path)
    torch.manual_seed(123)  # a different random init, overwritten by the checkpoint
    loaded = OpenCLIP(TINY_NAME, pretrained=str(path)).eval()
    images = tiny_open_clip.signature.normalize(torch.rand(2, 3, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), tiny_open_clip.encode_image(images))
    with pytest.raises(ValueError, match="no such file"):
        OpenCLIP(TINY_NAME, pretrained=str(tmp_path / "missing.pt"))


CLASSNAMES = ["red circle", "blue star", "green square"]
TEMPLATES = ["a photo of a {}.", "a {}", "itap of a {}"]
CALLABLE_TEMPLATES = [lambda c: f"a photo of a {c}.", lambda c: f"a {c}"]  # open_clip takes all str or all callables


@pytest.mark.parametrize(("batch_size", "templates"), [(256, TEMPLATES), (2, TEMPLATES), (5, CALLABLE_TEMPLATES)])
def test_zero_shot_classifier_matches_open_clip(open_clip, tiny_open_clip, batch_size, templates):
    m = tiny_open_clip
    ours = zero_shot_classifier(m, m.tokenizer, CLASSNAMES, templates, batch_size=batch_size)
    ref = open_clip.build_zero_shot_classifier(m.model, m.tokenizer, CLASSNAMES, templates, num_classes_per_batch=2)
    assert ours.shape == (16, 3)
    torch.testing.assert_close(ours, ref)
    legacy = open_clip.zero_shot_classifier.build_zero_shot_classifier_legacy(m.model, m.tokenizer, CLASSNAMES,
                                                                            templates)
    torch.testing.assert_close(ours, legacy)
    # tokenizer=None reads the model's own
    torch.testing.assert_close(zero_shot_classifier(m, None, CLASSNAMES, templates), ours)


def test_zero_shot_classifier_on_tiny_clip_matches_open_clip(open_clip):
    model = tiny_clip().eval()
    ours = zero_shot_classifier(model, model.tokenizer, CLASSNAMES, TEMPLATES)
    ref = open_clip.build_zero_shot_classifier(model, model.tokenizer, CLASSNAMES, TEMPLATES)
    torch.testing.assert_close(ours, ref)


def test_zero_shot_classifier_module_and_accuracy():
    model = tiny_clip().eval()
    weight = zero_shot_classifier(model, model.tokenizer, CLASSNAMES, ["a {}"])
    head = ZeroShotClassifier(model, weight, classnames=CLASSNAMES)
    assert head.num_classes == 3 and head.signature.outputs == ("logits",)
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(7, 3, 16, 16, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    with torch.no_grad():
        logits = head(model.signature.normalize(raw))
        emb = model.encode_image(model.signature.normalize(raw))
    # brute force: 100 * cosine of each image with each class's mean-of-unit-prompts direction
    for i in range(7):
        for k in range(3):
            want = 100 * float(F.cosine_similarity(emb[i], weight[:, k], dim=0))
            assert float(logits[i, k]) == pytest.approx(want, rel=1e-4, abs=1e-4)
    dataset = list(zip(raw, labels))
    want_acc = sum(int(logits[i].argmax()) == int(labels[i]) for i in range(7)) / 7
    model.train()
    assert zero_shot_accuracy(model, model.tokenizer, dataset, CLASSNAMES, ["a {}"], batch_size=3) == \
        pytest.approx(want_acc)
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="templates"):
        zero_shot_classifier(model, model.tokenizer, CLASSNAMES, ["no placeholder"])
    with pytest.raises(ValueError, match="weight"):
        ZeroShotClassifier(model, torch.zeros(3))


# ---- tokenizer and text encoder ---------------------------------------------------------------------------


def test_word_tokenizer_round_trip():
    tok = WordTokenizer(["a", "Red", "circle", "red", "blue"], context_length=6)
    assert tok.words == ("<pad>", "<eot>", "<unk>", "a", "red", "circle", "blue")
    assert tok.vocab_size == 7
    ids = tok(["A red, Circle!", "a blue"])
    assert ids.dtype == torch.int64 and ids.shape == (2, 6)
    assert ids.tolist() == [[3, 4, 5, EOT_ID, PAD_ID, PAD_ID], [3, 6, EOT_ID, PAD_ID, PAD_ID, PAD_ID]]
    assert tok.batch_decode(ids) == ["a red circle", "a blue"]
    assert tok.decode(tok("a green circle")[0]) == "a <unk> circle"
    assert tok("a green")[0, 1] == UNK_ID
    long = tok("a red red red red red red red")  # cut to 5 words and still ends with EOT
    assert long[0].tolist() == [3, 4, 4, 4, 4, EOT_ID]
    assert tok("a red", context_length=3).tolist() == [[3, 4, EOT_ID]]
    with pytest.raises(ValueError, match="single words"):
        WordTokenizer(["two words"])
    with pytest.raises(ValueError, match="context_length"):
        WordTokenizer(["a"], context_length=1)


def test_text_block_matches_torch_transformer_layer():
    torch.manual_seed(0)
    enc = TinyTextEncoder(10, width=16, layers=1, heads=2, context_length=6, causal=True).eval()
    block = enc.blocks[0]
    ref = nn.TransformerEncoderLayer(16, 2, dim_feedforward=64, dropout=0.0, activation="gelu", batch_first=True,
                                     norm_first=True).eval()
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(block.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(block.qkv.bias)
        ref.self_attn.out_proj.weight.copy_(block.proj.weight)
        ref.self_attn.out_proj.bias.copy_(block.proj.bias)
        ref.linear1.load_state_dict(block.mlp[0].state_dict())
        ref.linear2.load_state_dict(block.mlp[2].state_dict())
        ref.norm1.load_state_dict(block.ln_1.state_dict())
        ref.norm2.load_state_dict(block.ln_2.state_dict())
        x = torch.randn(3, 6, 16)
        causal = torch.ones(6, 6, dtype=torch.bool).tril()
        torch.testing.assert_close(block(x, causal), ref(x, src_mask=~causal), rtol=1e-5, atol=1e-5)
        keep = torch.tensor([[1, 1, 1, 0, 0, 0]] * 3, dtype=torch.bool)
        torch.testing.assert_close(block(x, keep[:, None, None, :]), ref(x, src_key_padding_mask=~keep),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("pool", "causal"), [("eot", True), ("mean", False), ("mean", True), ("eot", False)])
def test_text_encoder_ignores_padding(pool, causal):
    torch.manual_seed(0)
    enc = TinyTextEncoder(12, width=16, layers=2, heads=2, context_length=10, pool=pool, causal=causal).eval()
    short = torch.tensor([[3, 4, 5, EOT_ID, 0, 0], [6, EOT_ID, 0, 0, 0, 0]])
    padded = F.pad(short, (0, 4))  # the same captions, more padding
    with torch.no_grad():
        out = enc(short)
        assert out.shape == (2, 16)
        torch.testing.assert_close(enc(padded), out)
        after_eot = short.clone()
        after_eot[0, 4:] = torch.tensor([7, 8])  # tokens after EOT: only causal EOT pooling never sees them
        changed = not torch.allclose(enc(after_eot)[0], out[0])
        assert changed == (not (pool == "eot" and causal))


def test_text_encoder_without_blocks_is_a_mean_of_normalised_word_and_position_embeddings():
    torch.manual_seed(0)
    enc = TinyTextEncoder(12, width=16, layers=0, heads=2, context_length=6, pool="mean", causal=False).eval()
    tokens = torch.tensor([[3, 4, EOT_ID, 0, 0, 0]])
    with torch.no_grad():
        per_token = enc.ln_final(enc.token_embedding(tokens[0, :3]) + enc.positional_embedding[:3])
        torch.testing.assert_close(enc(tokens)[0], per_token.mean(0))
    with pytest.raises(ValueError, match="layers must be an int >= 0"):
        TinyTextEncoder(12, layers=-1)


def test_text_encoder_validates():
    enc = TinyTextEncoder(10, width=8, layers=1, heads=2, context_length=4)
    with pytest.raises(ValueError, match="context_length"):
        enc(torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        enc(torch.tensor([[3, 11, EOT_ID, 0]]))
    with pytest.raises(ValueError, match="end-of-text"):
        enc(torch.tensor([[3, 4, 5, 0]]))
    with pytest.raises(ValueError, match="divisible"):
        TinyTextEncoder(10, width=10, heads=4)


# ---- TinyCLIP --------------------------------------------------------------------------------------------


def test_tiny_clip_contract():
    model = tiny_clip()
    images = model.signature.normalize(torch.rand(4, 3, 16, 16))
    tokens = model.tokenizer(["a red circle", "a blue star", "a green square", "a yellow triangle"])
    assert model.signature is model.backbone.signature
    assert model(images).shape == (4, 16)  # pooled backbone features
    assert model.encode_image(images).shape == (4, 16)
    torch.testing.assert_close(model.encode_text(["a red circle"]), model.encode_text(tokens[:1]))
    out = model.loss(images, tokens)
    want = clip_loss(model.encode_image(images), model.encode_text(tokens), model.logit_scale.exp())
    torch.testing.assert_close(out["loss"], want)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))  # clamped at 100, as CLIP
    out = model.loss(images, tokens)
    assert float(out["logit_scale"]) == pytest.approx(100.0)
    torch.testing.assert_close(out["loss"], clip_loss(model.encode_image(images), model.encode_text(tokens), 100.0))
    with pytest.raises(ValueError, match="required"):
        model.loss(images, None)
    with pytest.raises(ValueError, match="one per image"):
        model.loss(images, tokens[:3])
    with pytest.raises(ValueError, match="width"):
        TinyCLIP(tiny_backbone(), nn.Linear(2, 2))


def test_tiny_clip_trains_on_shapes_captions():
    model = tiny_clip()
    data = ShapesCaptions("train", num_images=64, image_size=16, tokenizer=model.tokenizer)
    assert ShapesCaptions.vocabulary_of() == data.vocabulary
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    losses = []
    while len(losses) < 20:
        for images, tokens in loader:
            loss = model.loss(model.signature.normalize(images), tokens)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert all(math.isfinite(v) for v in losses)
    assert last < first - 0.2, losses


# ---- the caption dataset ---------------------------------------------------------------------------------


def test_held_out_split_excludes_the_combinations():
    held = set(DEFAULT_HELD_OUT)
    seen = ShapesCaptions("train", num_images=300, image_size=16)
    pairs = {seen.describe(i)[:2] for i in range(len(seen))}
    assert not pairs & held
    assert len(pairs) == len(SHAPE_COLOURS) * 4 - len(held)  # every other pair is drawn
    tokenizer = WordTokenizer(ShapesCaptions.vocabulary_of(), context_length=8)
    test = ShapesCaptions("test", num_images=60, image_size=16, combinations="held_out", tokenizer=tokenizer)
    assert {test.describe(i)[:2] for i in range(len(test))} == held
    everything = ShapesCaptions("val", num_images=300, image_size=16, combinations="all")
    assert len({everything.describe(i)[:2] for i in range(len(everything))}) == len(SHAPE_COLOURS) * 4
    # the tokens and labels say what the image shows
    labelled = ShapesCaptions("test", num_images=60, image_size=16, combinations="held_out", target="label")
    for i in range(20):
        image, tokens = test[i]
        colour, shape, caption = test.describe(i)
        assert test.tokenizer.decode(tokens) == caption == f"a {colour} {shape}"
        image2, label = labelled[i]
        assert torch.equal(image, image2) and labelled.classnames[int(label)] == f"{colour} {shape}"
        assert image.shape == (3, 16, 16) and float(image.min()) >= 0 and float(image.max()) <= 1
        rgb = torch.tensor(SHAPE_COLOURS[colour])[:, None, None]
        assert int(((image - rgb).abs().amax(dim=0) < 0.15).sum()) >= 10  # the object has the named colour


def test_shapes_captions_is_seeded_and_validates():
    a, b = ShapesCaptions("train", num_images=5, image_size=16), ShapesCaptions("train", num_images=5, image_size=16)
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(5))
    assert isinstance(a[0][1], str)  # no tokenizer: the caption itself
    c = ShapesCaptions("val", num_images=5, image_size=16)
    assert not torch.equal(a[0][0], c[0][0])
    with pytest.raises(ValueError, match="held_out pair"):
        ShapesCaptions(held_out=[("purple", "circle")])
    with pytest.raises(ValueError, match="combinations"):
        ShapesCaptions(combinations="unseen")
    with pytest.raises(ValueError, match="leaves no"):
        ShapesCaptions(combinations="held_out", held_out=())
    with pytest.raises(IndexError):
        a[5]


def test_tiny_clip_and_open_clip_are_guidance_scorers(tiny_open_clip):
    from cvzoo.generative.clip_guidance import clip_similarity

    for scorer in (tiny_clip().eval(), tiny_open_clip):
        images = torch.rand(2, 3, 16, 16)
        text = scorer.encode_text(["a red circle"])[0].detach()
        with torch.no_grad():
            want = F.cosine_similarity(scorer.encode_image(scorer.signature.normalize(images)), text[None], dim=1)
        torch.testing.assert_close(clip_similarity(scorer, images, text), want)
