"""The op counter itself: it sees every dispatched op, backward included, and flags synchronising ones."""

from __future__ import annotations

import torch

from cvzoo.profiling import OpCounter, count_ops


def test_counts_forward_and_backward_ops():
    x = torch.randn(3, requires_grad=True)
    with OpCounter() as c:
        (x * 2).sum().backward()
    names = {op.__name__ for op in c.ops}
    assert "mul.Tensor" in names and "sum.default" in names
    assert c.total >= 4  # mul, sum, and their backward


def test_flags_host_device_synchronisations():
    x = torch.randn(10)
    assert count_ops(lambda: x.sum().item())[1] == 1
    assert count_ops(lambda: x[x > 0])[1] == 1  # boolean-mask indexing
    assert count_ops(lambda: x.nonzero())[1] == 1
    assert count_ops(lambda: torch.where(x > 0, x, 0.0))[1] == 0


def test_median_seconds_takes_the_median_after_the_warmup():
    from cvzoo.profiling import median_seconds

    calls = []
    durations = iter([0.5, 0.5, 0.0, 0.03, 0.01])  # two warm-up calls (slow), then three timed ones

    def fn():
        import time

        calls.append(1)
        time.sleep(next(durations))

    t = median_seconds(fn, repeats=3, warmup=2)
    assert len(calls) == 5
    assert 0.01 <= t < 0.03  # the median of (0.0, 0.03, 0.01) plus timer overhead; the warm-ups do not count


def test_paired_median_seconds_alternates_the_functions():
    from cvzoo.profiling import paired_median_seconds

    order = []
    a = lambda: order.append("a")  # noqa: E731
    b = lambda: order.append("b")  # noqa: E731
    medians = paired_median_seconds([a, b], repeats=3, warmup=1)
    assert order == ["a", "b"] * 4  # one warm-up round, three timed rounds, alternating
    assert len(medians) == 2 and all(m >= 0 for m in medians)
