"""Device and dtype behaviour: CUDA with bf16 autocast and channels_last, and one inductor compile."""

from __future__ import annotations

import pytest
import torch

from cvzoo.zoo import create_model


@pytest.fixture
def full_fp32():
    """cuDNN/cuBLAS without TF32, restored afterwards: comparisons at fp32 precision."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


FEATURE_MODELS = ["resnet_micro_fpn", "resnet_micro_pan", "resnet_micro_bifpn", "convnext_micro_fpn", "resnet18_fpn"]


@pytest.mark.cuda
@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_cuda_bf16_channels_last_matches_fp32(name):
    model = create_model(name).cuda().eval()
    x = torch.randn(2, 3, 97, 131, device="cuda")
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(ref, out):
        assert b.dtype == torch.bfloat16 and torch.isfinite(b).all()
        assert (a - b.float()).norm() / a.norm() < 0.05


@pytest.mark.cuda
def test_cuda_classifier_loss_is_float32_under_autocast_and_trains():
    model = create_model("resnet_micro_classifier", num_classes=3).cuda()
    images = torch.randn(8, 3, 64, 64, device="cuda")
    labels = torch.randint(0, 3, (8,), device="cuda")
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    first = None
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(images, labels)["loss"]
        assert loss.dtype == torch.float32
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.5 * first
    with pytest.raises(ValueError, match="NaN or inf"):
        model.loss(images.masked_fill(images > 3, float("nan")), labels)


@pytest.mark.cuda
def test_cuda_inductor_compile_matches_eager(full_fp32):
    model = create_model("resnet_micro_fpn").cuda().eval()
    x = torch.randn(2, 3, 128, 160, device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for a, b in zip(model(x), compiled(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_cpu_inductor_compile_matches_eager():
    torch._dynamo.reset()
    model = create_model("resnet_micro_fpn").eval()
    x = torch.randn(1, 3, 64, 96)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for a, b in zip(model(x), compiled(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["retinanet_micro", "fcos_micro", "atss_micro", "centernet_micro"])
def test_cuda_detector_matches_cpu(name, full_fp32):
    """Loss and detections on CUDA (one-call NMS, no syncs in the loss) equal the CPU path's."""
    model = create_model(name).eval()
    with torch.no_grad():  # varied scores so post-processing has work
        for m in model.head.modules():
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.normal_(-1.0, 1.0)
    x = torch.randn(2, 3, 128, 160)
    # centres off the prior grid: no exact distance ties, which CPU and CUDA top-k may break differently
    targets = [{"boxes": torch.tensor([[10.3, 12.9, 70.6, 90.1], [40.7, 30.2, 150.1, 120.4]]),
                "labels": torch.tensor([0, 3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    with torch.no_grad():
        cpu_loss = model.loss(x, targets)
        cpu_dets = model.predict(x)
        model.cuda()
        gpu_loss = model.loss(x.cuda(), [{k: v.cuda() for k, v in t.items()} for t in targets])
        gpu_dets = model.predict(x.cuda())
    for k in cpu_loss:
        torch.testing.assert_close(gpu_loss[k].cpu(), cpu_loss[k], rtol=1e-3, atol=1e-4)
    for c, g in zip(cpu_dets, gpu_dets):
        assert len(c.boxes) == len(g.boxes) > 0
        torch.testing.assert_close(g.scores.cpu(), c.scores, rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["maskrcnn_micro", "keypointrcnn_micro"])
def test_cuda_two_stage_matches_cpu(name, full_fp32):
    """Detections, masks and keypoints on CUDA (grouped NMS, batched pasting) equal the CPU path's; the
    loss (random RoI sampling, so not compared) is finite and backpropagates."""
    model = create_model(name).eval()
    with torch.no_grad():  # varied scores so the box head keeps detections
        for p in model.box_branch.head.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        cpu_dets = model.predict(x)
        model.cuda()
        gpu_dets = model.predict(x.cuda())
    for c, g in zip(cpu_dets, gpu_dets):
        assert len(c.boxes) == len(g.boxes) > 0
        torch.testing.assert_close(g.boxes.cpu(), c.boxes, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(g.scores.cpu(), c.scores, rtol=1e-3, atol=1e-4)
        for key, value in c.extras.items():
            torch.testing.assert_close(g.extras[key].cpu(), value, rtol=1e-3, atol=1e-3)
    model.train()
    targets = [{"boxes": torch.tensor([[10.3, 12.9, 70.6, 90.1]], device="cuda"),
                "labels": torch.tensor([1], device="cuda"),
                "masks": torch.ones(1, 128, 160, dtype=torch.bool, device="cuda"),
                "keypoints": torch.tensor([[[20.0, 20, 1], [60, 30, 1], [40, 80, 1], [15, 50, 1]]], device="cuda")}] * 2
    loss = model.loss(x.cuda(), targets)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
