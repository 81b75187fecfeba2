"""A real training run: a small CNN on scikit-learn's 8x8 digits (shipped with the package),
trained with the same seed under nn.Conv2d and under convert(). The loss curves agree and the
final accuracies are within one percentage point."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_directconv as tdc
from helpers import requires_jit

datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn is needed for the digits data set")


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def _train(model: nn.Module, x, y, x_test, y_test, epochs: int = 8) -> tuple[list[float], float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 50):
            idx = order[i : i + 50]
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return losses, accuracy


@requires_jit
def test_digits_train_the_same_under_convert() -> None:
    x, y, x_test, y_test = _digits()
    torch.manual_seed(2)
    reference = _model()
    converted = tdc.convert(reference)  # a copy with the same initial weights
    before = tdc.jit_stats()["fallbacks"]
    ref_losses, ref_acc = _train(reference, x, y, x_test, y_test)
    losses, acc = _train(converted, x, y, x_test, y_test)
    assert tdc.jit_stats()["fallbacks"] == before, "the converted model fell back to torch's convolution"
    assert ref_acc > 0.85, f"the reference did not learn (accuracy {ref_acc:.3f}); the comparison would mean little"
    assert abs(acc - ref_acc) <= 0.01, f"accuracy {acc:.4f} vs nn.Conv2d {ref_acc:.4f}"
    # Float sums in another order drift apart slowly over the run: compare the curves.
    for step in range(0, len(losses), 10):
        assert abs(losses[step] - ref_losses[step]) <= 0.02 + 0.05 * ref_losses[step], (
            f"step {step}: loss {losses[step]:.4f} vs nn.Conv2d {ref_losses[step]:.4f}"
        )
