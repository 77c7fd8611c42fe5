"""The C kernel for top-1 prompt logprob entries (kernels/logprob_rows.py) against the torch path it stands in
for (runner/sampler.prompt_logprob_tensors) on random logits, ties included, and where it must step aside."""

import pytest
import torch

from bstar.engine.runner.sampler import prompt_logprob_tensors
from bstar.kernels import native
from bstar.kernels.logprob_rows import logprob_rows

needs_kernel = pytest.mark.skipif(native.load("logprob_rows") is None, reason="no C compiler: the torch path runs")


def _logits(R: int, V: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits rounded to 1/8 (ties within a row: ranks and the first maximum matter), with some rows'
    targets at the maximum and some maxima repeated, in a wider tensor (rows further apart than V)."""
    g = torch.Generator().manual_seed(seed)
    wide = (torch.randn(R, V + 5, generator=g) * 4).mul(8).round().div(8)
    x = wide[:, :V]
    targets = torch.randint(0, V, (R,), generator=g)
    for r in range(0, R, 3):  # the target is a maximum
        x[r, targets[r]] = x[r].max()
    for r in range(1, R, 4):  # the maximum twice: the first index wins
        top = int(x[r].argmax())
        x[r, (top + 7) % V] = x[r, top]
    return x, targets


@needs_kernel
@pytest.mark.parametrize("R, V, seed", [(1, 2, 0), (37, 320, 1), (256, 4096, 2), (5, 50257, 3)])
def test_kernel_equals_the_torch_path(R, V, seed, one_torch_thread):
    x, targets = _logits(R, V, seed)
    got = logprob_rows(x, targets)
    want = prompt_logprob_tensors(x, targets, [1] * R)
    assert got is not None and got[3] == want[3] == 2
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=2e-5)  # (float32 sums in another order)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


@needs_kernel
def test_kernel_threads_agree():
    x, targets = _logits(64, 1000, 4)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = logprob_rows(x, targets)
        torch.set_num_threads(2)
        two = logprob_rows(x, targets)
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(a, b) for a, b in zip(one[:3], two[:3]))


@pytest.mark.parametrize("bad", ["nan", "inf", "float64", "column-major"])
def test_kernel_steps_aside(bad):
    x, targets = _logits(8, 64, 5)
    if bad in ("nan", "inf"):
        x[3, 10] = float(bad)
    elif bad == "float64":
        x = x.double()
    else:
        x = x.t().contiguous().t()
    assert logprob_rows(x, targets) is None
