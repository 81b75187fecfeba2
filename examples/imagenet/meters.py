"""Running averages, the progress line and top-k accuracy for train.py."""

from __future__ import annotations

import torch


class AverageMeter:
    """The last value and the running average of a quantity, weighted by how many samples it covers."""

    def __init__(self, name: str, fmt: str = ":.3f") -> None:
        self.name, self.fmt = name, fmt
        self.val = self.sum = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1) -> None:
        self.val = val
        self.sum += val * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / self.count if self.count else 0.0

    def __str__(self) -> str:
        return f"{self.name} {self.val:{self.fmt[1:]}} ({self.avg:{self.fmt[1:]}})"


class ProgressMeter:
    """`prefix[ step/steps]` followed by each meter, tab-separated."""

    def __init__(self, steps: int, meters: list[AverageMeter], prefix: str = "") -> None:
        width = len(str(steps))
        self.step_fmt = f"[{{:{width}d}}/{steps}]"
        self.meters, self.prefix = meters, prefix

    def line(self, step: int) -> str:
        return "\t".join([self.prefix + self.step_fmt.format(step)] + [str(m) for m in self.meters])


def correct_topk(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...]) -> list[int]:
    """How many rows of `output` have their target among their k highest scores, for each k
    (k is capped at the number of classes)."""
    with torch.no_grad():
        maxk = min(max(topk), output.shape[1])
        pred = output.topk(maxk, dim=1).indices
        hit = pred.eq(target.view(-1, 1))
        return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in topk]
