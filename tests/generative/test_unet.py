import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvzoo.generative.unet import AttentionBlock, DiffusersUNet, ResBlock, UNet, diffusers_unet2d, sinusoidal_embedding

diffusers = pytest.importorskip("diffusers")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw):
    kw = {"base_channels": 8, "channel_mults": (1, 2), "norm_groups": 4, **kw}
    return UNet(**kw)


@pytest.mark.parametrize("dim", [8, 9, 32])
def test_sinusoidal_embedding_matches_diffusers(dim):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 999])
    ref = get_timestep_embedding(t, dim, flip_sin_to_cos=False, downscale_freq_shift=0)
    torch.testing.assert_close(sinusoidal_embedding(t, dim), ref)
    tf = torch.tensor([0.5, 3.25])  # fractional timesteps (continuous-time samplers)
    torch.testing.assert_close(sinusoidal_embedding(tf, dim),
                               get_timestep_embedding(tf, dim, flip_sin_to_cos=False, downscale_freq_shift=0))


@pytest.mark.parametrize("kw", [
    {},
    {"channel_mults": (1,)},
    {"channel_mults": (1, 2, 2), "attention_levels": (1, 2), "num_res_blocks": 2},
    {"scale_shift": False, "mid_attention": False, "out_channels": 2},
    {"in_channels": 3, "num_classes": 4, "attention_levels": (0,), "time_embed_dim": 12},
    {"condition_dim": 5, "dropout": 0.1},
])
def test_output_shape(kw):
    m = tiny(**kw)
    c_in = m.in_channels
    x = torch.randn(2, c_in, 8, 12)  # non-square works
    out = m(x, torch.tensor([3, 40]))
    assert out.shape == (2, kw.get("out_channels", c_in), 8, 12)
    assert m.out_channels == kw.get("out_channels", c_in)
    assert m.size_divisor == 2 ** (len(kw.get("channel_mults", (1, 2))) - 1)


def test_every_parameter_gets_a_gradient():
    m = tiny(num_classes=3, attention_levels=(0, 1))
    out = m(torch.randn(2, 1, 8, 8), torch.tensor([1, 7]), torch.tensor([0, 3]))
    out.square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_class_conditioning_and_null_class():
    m = tiny(num_classes=3).eval()
    assert m.num_classes == 3 and m.null_class == 3 and m.condition_dim is None
    assert m.class_embed.weight.shape[0] == 4  # 3 classes + the learned null row
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 5])
    torch.testing.assert_close(m(x, t), m(x, t, torch.tensor([3, 3])))  # None == the null class
    a, b = m(x, t, torch.tensor([0, 0])), m(x, t, torch.tensor([1, 1]))
    assert (a - b).abs().max() > 1e-4


def test_condition_embedding_null_is_zero_vector():
    m = tiny(condition_dim=6).eval()
    assert m.condition_dim == 6 and m.num_classes is None and m.null_class is None
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 9])
    torch.testing.assert_close(m(x, t), m(x, t, torch.zeros(2, 6)))
    assert (m(x, t, torch.randn(2, 6)) - m(x, t)).abs().max() > 1e-4


def test_unconditional_ignores_nothing_and_broadcasts_scalar_t():
    m = tiny().eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(m(x, 7), m(x, torch.tensor([7, 7, 7])))
    torch.testing.assert_close(m(x, torch.tensor(7.0)), m(x, torch.tensor([7, 7, 7])))
    assert (m(x, 7) - m(x, 8)).abs().max() > 1e-5  # the timestep is used


def test_attention_block_matches_a_brute_force_softmax():
    torch.manual_seed(1)
    blk = AttentionBlock(8, num_heads=2, norm_groups=4)
    x = torch.randn(2, 8, 3, 4)
    h = blk.norm(x).flatten(2)  # (B, C, HW)
    w, bias = blk.qkv.weight[:, :, 0, 0], blk.qkv.bias
    qkv = torch.einsum("oc,bcn->bon", w, h) + bias[None, :, None]  # (B, 3C, HW)
    q, k, v = qkv.chunk(3, dim=1)
    outs = []
    for head in range(2):
        sl = slice(4 * head, 4 * head + 4)
        logits = torch.einsum("bdi,bdj->bij", q[:, sl], k[:, sl]) / 2.0  # sqrt(d) = 2
        outs.append(torch.einsum("bij,bdj->bdi", logits.softmax(-1), v[:, sl]))
    att = torch.cat(outs, dim=1)  # (B, C, HW)
    proj = torch.einsum("oc,bcn->bon", blk.proj.weight[:, :, 0, 0], att) + blk.proj.bias[None, :, None]
    torch.testing.assert_close(blk(x), x + proj.view(2, 8, 3, 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale_shift", [True, False])
def test_res_block_embedding_injection(scale_shift):
    blk = ResBlock(4, 8, 6, norm_groups=2, scale_shift=scale_shift)
    lin = blk.embed[1]
    nn.init.zeros_(lin.weight)
    with torch.no_grad():
        lin.bias.copy_(torch.linspace(-1, 1, lin.bias.numel()))
    x, emb = torch.randn(2, 4, 5, 5), torch.randn(2, 6)
    h = blk.conv1(F.silu(blk.norm1(x)))
    if scale_shift:
        scale, shift = lin.bias[:8, None, None], lin.bias[8:, None, None]
        h = blk.norm2(h) * (1 + scale) + shift
    else:
        h = blk.norm2(h + lin.bias[:, None, None])
    expected = blk.conv2(F.silu(h)) + blk.skip(x)
    torch.testing.assert_close(blk(x, emb), expected)


def test_compile_fullgraph():
    m = tiny(num_classes=3, attention_levels=(1,)).eval()
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 3])
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, t, c), m(x, t, c))


def test_validation():
    m = tiny()
    with pytest.raises(ValueError, match="divisible by size_divisor=2"):
        m(torch.randn(1, 1, 8, 7), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"x must be a \(B, 1, H, W\)"):
        m(torch.randn(1, 3, 8, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match="unconditional"):
        m(torch.randn(1, 1, 8, 8), torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="t must have shape"):
        m(torch.randn(2, 1, 8, 8), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer tensor of class labels"):
        tiny(num_classes=3)(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), torch.randn(2))
    with pytest.raises(ValueError, match=r"\(2, 4\) floating"):
        tiny(condition_dim=4)(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="norm_groups"):
        UNet(base_channels=12, norm_groups=8)
    with pytest.raises(ValueError, match="attention_levels"):
        tiny(attention_levels=(2,))
    with pytest.raises(ValueError, match="at most one"):
        tiny(num_classes=3, condition_dim=4)
    with pytest.raises(ValueError, match="channel_mults"):
        tiny(channel_mults=())
    with pytest.raises(ValueError, match="num_heads"):
        tiny(attention_levels=(0,), attention_heads=3)


# ------------------------------------------------------------------------------------------- diffusers adapter

def _unet2d(**kw):
    kw = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": (8, 16),
          "layers_per_block": 1, "norm_num_groups": 4, "down_block_types": ("DownBlock2D", "DownBlock2D"),
          "up_block_types": ("UpBlock2D", "UpBlock2D"), "attention_head_dim": 4, **kw}
    return diffusers.UNet2DModel(**kw).eval()


def test_adapter_unconditional_unet2d():
    model = _unet2d()
    m = DiffusersUNet(model)
    assert (m.num_classes, m.null_class, m.condition_dim) == (None, None, None)
    assert (m.in_channels, m.out_channels, m.size_divisor, m.image_size) == (1, 1, 2, 8)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 30])
    torch.testing.assert_close(m(x, t), model(x, t).sample)
    with pytest.raises(ValueError, match="unconditional"):
        m(x, t, torch.tensor([0, 1]))


def test_adapter_class_conditional_unet2d():
    model = _unet2d(num_class_embeds=4)
    m = DiffusersUNet(model)
    assert (m.num_classes, m.null_class, m.condition_dim) == (3, 3, None)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 30])
    labels = torch.tensor([0, 2])
    torch.testing.assert_close(m(x, t, labels), model(x, t, class_labels=labels).sample)
    torch.testing.assert_close(m(x, t), model(x, t, class_labels=torch.tensor([3, 3])).sample)


def test_adapter_cross_attention_unet2d_condition():
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=6, attention_head_dim=2).eval()
    m = DiffusersUNet(model)
    assert (m.num_classes, m.null_class, m.condition_dim) == (None, None, 6)
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor([3, 30]), torch.randn(2, 6)
    torch.testing.assert_close(m(x, t, cond), model(x, t, encoder_hidden_states=cond[:, None, :]).sample)
    torch.testing.assert_close(m(x, t), model(x, t, encoder_hidden_states=torch.zeros(2, 1, 6)).sample)
    with pytest.raises(ValueError, match=r"\(2, 6\) floating"):
        m(x, t, torch.tensor([0, 1]))


def test_adapter_rejects_unsupported_models():
    with pytest.raises(ValueError, match="UNet2DModel or UNet2DConditionModel"):
        DiffusersUNet(nn.Conv2d(1, 1, 3))
    with pytest.raises(ValueError, match="class_embed_type"):
        DiffusersUNet(_unet2d(class_embed_type="timestep"))
    with pytest.raises(ValueError, match="learned variance"):
        DiffusersUNet(_unet2d(out_channels=2))
    with pytest.raises(ValueError, match="num_class_embeds"):
        DiffusersUNet(_unet2d(num_class_embeds=1))


def test_diffusers_unet2d_builder():
    m = diffusers_unet2d(8, 1, num_classes=5, block_out_channels=(8, 16), norm_num_groups=4, attention_levels=(1,),
                         attention_head_dim=4)
    cfg = m.model.config
    assert cfg.num_class_embeds == 6 and m.num_classes == 5 and m.null_class == 5
    assert tuple(cfg.down_block_types) == ("DownBlock2D", "AttnDownBlock2D")
    assert tuple(cfg.up_block_types) == ("AttnUpBlock2D", "UpBlock2D")
    out = m(torch.randn(2, 1, 8, 8), torch.tensor([0, 9]), torch.tensor([4, 5]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="image_size=6"):
        diffusers_unet2d(6, 1, block_out_channels=(8, 16, 16), norm_num_groups=4)
    with pytest.raises(ValueError, match="norm_num_groups"):
        diffusers_unet2d(8, 1, block_out_channels=(8, 12), norm_num_groups=8)
