import pytest
import torch
import torch.nn.functional as F

from cvzoo.adapt import ZeroShotHead

pytestmark = pytest.mark.usefixtures("one_thread")


def test_logits_closed_form():
    prototypes, feats = torch.randn(4, 6), torch.randn(3, 6)
    head = ZeroShotHead(prototypes, scale=7.0)
    expected = 7.0 * F.normalize(feats, dim=-1) @ F.normalize(prototypes, dim=-1).T
    assert torch.allclose(head(feats), expected, atol=1e-6)
    assert torch.allclose(ZeroShotHead(prototypes, metric="dot")(feats), feats @ prototypes.T, atol=1e-6)


def test_from_text_uses_the_clip_text_embeddings():
    from cvzoo.backbones import resnet_micro
    from cvzoo.ssl.clip import TinyCLIP, TinyTextEncoder, WordTokenizer, ZeroShotClassifier

    tokenizer = WordTokenizer(["a", "red", "blue", "circle", "square"])
    clip = TinyCLIP(resnet_micro(out_indices=(3,)), TinyTextEncoder(tokenizer.vocab_size, width=16, heads=2),
                    embed_dim=8).eval()
    names, templates = ["red circle", "blue square"], ["a {}"]
    head = ZeroShotHead.from_text(clip, tokenizer, names, templates)
    images = torch.randn(2, 3, 32, 32)
    reference = ZeroShotClassifier.from_classnames(clip, tokenizer, names, templates)(images)
    assert torch.allclose(head(clip.encode_image(images)), reference, atol=1e-4)
    assert head.classnames == tuple(names)


def test_attribute_head_learns_seen_classes_and_transfers_to_unseen_ones():
    # classes are 8-bit attribute vectors; images' features are a fixed random linear map of their class's
    # attributes plus noise. The head learns the inverse map on 12 seen classes and must name 8 unseen ones.
    g = torch.Generator().manual_seed(0)
    attributes = (torch.rand(20, 8, generator=g) < 0.5).float()
    attributes[:, 0] = 1.0  # no all-zero vector
    seen, unseen = torch.arange(12), torch.arange(12, 20)
    mixing = torch.randn(8, 32, generator=g)

    def features(classes, n):
        labels = classes[torch.randint(0, len(classes), (n,), generator=g)]
        return attributes[labels] @ mixing + 0.1 * torch.randn(n, 32, generator=g), labels

    head = ZeroShotHead.from_attributes(attributes[seen], in_features=32)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    x, y = features(seen, 600)
    for _ in range(200):
        optimizer.zero_grad()
        head.loss(x, y)["loss"].backward()
        optimizer.step()
    head.set_classes(attributes[unseen])
    xt, yt = features(unseen, 400)
    accuracy = (head(xt).argmax(-1) == yt - 12).float().mean()
    assert accuracy > 0.6  # chance is 1/8


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="prototypes must be a floating"):
        ZeroShotHead(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="metric"):
        ZeroShotHead(torch.randn(3, 2), metric="l2")
    head = ZeroShotHead.from_attributes(torch.randn(3, 4), in_features=5)
    with pytest.raises(ValueError, match="keep width 4"):
        head.set_classes(torch.randn(2, 5))
    with pytest.raises(ValueError, match="classnames has 1 names"):
        head.set_classes(torch.randn(2, 4), ["x"])
