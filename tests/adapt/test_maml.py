"""MAML's meta-gradients against an explicit functional implementation written out by hand."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvzoo.adapt import MAML, episode_labels

pytestmark = pytest.mark.usefixtures("one_thread")

N, K, Q = 3, 2, 2


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(12, 8)
        self.head = nn.Linear(8, N)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x.flatten(1))))


def explicit_meta_gradient(net, images, tasks, inner_lr, steps, first_order, head_only):
    """The MAML objective with the network written as a function of four tensors."""
    w1, b1, w2, b2 = (p.detach().clone().requires_grad_() for p in
                      (net.body.weight, net.body.bias, net.head.weight, net.head.bias))

    def f(x, w1, b1, w2, b2):
        return torch.tanh(x.flatten(1) @ w1.T + b1) @ w2.T + b2

    labels = episode_labels(N, K, Q)
    per = N * (K + Q)
    total = 0
    for t in range(tasks):
        x = images[t * per:(t + 1) * per]
        params = [w1, b1, w2, b2]
        for _ in range(steps):
            loss = F.cross_entropy(f(x[:N * K], *params), labels[:N * K])
            adapted = [2, 3] if head_only else [0, 1, 2, 3]
            grads = torch.autograd.grad(loss, [params[i] for i in adapted], create_graph=not first_order)
            if first_order:
                grads = [g.detach() for g in grads]
            params = list(params)
            for i, g in zip(adapted, grads):
                params[i] = params[i] - inner_lr * g
        total = total + F.cross_entropy(f(x[N * K:], *params), labels[N * K:])
    return torch.autograd.grad(total / tasks, [w1, b1, w2, b2])


@pytest.mark.parametrize("first_order, adapt, steps", [(False, "all", 1), (False, "all", 2), (True, "all", 2),
                                                       (False, "head", 3)])
def test_meta_gradient_equals_the_explicit_computation(first_order, adapt, steps):
    net = TinyNet().double()
    maml = MAML(net, n_way=N, k_shot=K, query=Q, inner_lr=0.3, inner_steps=steps, first_order=first_order,
                adapt=adapt)
    images = torch.randn(2 * N * (K + Q), 3, 2, 2, dtype=torch.float64)
    maml.loss(images, episode_labels(N, K, Q, tasks=2))["loss"].backward()
    expected = explicit_meta_gradient(net, images, 2, 0.3, steps, first_order, adapt == "head")
    got = [net.body.weight.grad, net.body.bias.grad, net.head.weight.grad, net.head.bias.grad]
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-10)


def test_second_order_differs_from_first_order():
    net = TinyNet().double()
    images = torch.randn(N * (K + Q), 3, 2, 2, dtype=torch.float64)
    labels = episode_labels(N, K, Q)
    grads = []
    for first_order in (False, True):
        net.zero_grad()
        MAML(net, n_way=N, k_shot=K, query=Q, first_order=first_order).loss(images, labels)["loss"].backward()
        grads.append(net.body.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_batch_norm_in_train_mode_and_predict_leaves_buffers_alone():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, N))
    maml = MAML(net, n_way=N, k_shot=K, query=Q, adapt="all")
    images = torch.randn(N * (K + Q), 1, 6, 6)
    out = maml.loss(images, episode_labels(N, K, Q))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and net[1].weight.grad is not None
    assert int(net[1].num_batches_tracked) > 0  # running statistics update as in an ordinary forward
    before = {k: v.clone() for k, v in net.state_dict().items()}
    maml.eval()
    predicted = maml.predict(images[:N * K], episode_labels(N, K, 0)[:N * K], images[N * K:])
    assert predicted.shape == (N * Q,)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not net.training


def test_arguments_and_episodes_are_checked():
    with pytest.raises(ValueError, match="inner_lr"):
        MAML(TinyNet(), inner_lr=0.0)
    with pytest.raises(ValueError, match="head_prefix='classifier'"):
        MAML(TinyNet(), adapt="head", head_prefix="classifier")
    with pytest.raises(ValueError, match="adapt must be"):
        MAML(TinyNet(), adapt="body")
    maml = MAML(TinyNet(), n_way=N, k_shot=K, query=Q)
    with pytest.raises(ValueError, match="episodic batches"):
        maml.loss(torch.randn(5, 3, 2, 2), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="episode layout"):
        maml.loss(torch.randn(12, 3, 2, 2), episode_labels(N, K, Q).flip(0))
