"""Datasets and loaders for train.py: an ImageFolder (torchvision's when it imports, else
pil_vision's) or synthetic images, and samplers whose order depends on the seed and the epoch only."""

from __future__ import annotations

import math
import os

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

try:
    from torchvision import datasets as _tv_datasets
    from torchvision import transforms as _tv_transforms

    BACKEND = "torchvision"
except Exception:  # absent, or built for another torch (it then fails while registering its ops)
    import pil_vision as _pil

    _tv_datasets = _tv_transforms = _pil
    BACKEND = "pil_vision"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(image_size: int, scale: tuple[float, float], hflip: float):
    t = _tv_transforms
    steps = [t.RandomResizedCrop(image_size, scale=scale)]
    if hflip > 0:
        steps.append(t.RandomHorizontalFlip(hflip))
    return t.Compose(steps + [t.ToTensor(), t.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def val_transform(image_size: int, crop_pct: float):
    t = _tv_transforms
    resize = int(math.floor(image_size / crop_pct))
    return t.Compose(
        [t.Resize(resize), t.CenterCrop(image_size), t.ToTensor(), t.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def image_folder(root: str, transform) -> Dataset:
    return _tv_datasets.ImageFolder(root, transform)


class SyntheticImages(Dataset):
    """`n` images of (3, size, size) and labels, each a pure function of its index (for --dummy)."""

    def __init__(self, n: int, image_size: int, num_classes: int, seed: int) -> None:
        self.n, self.image_size, self.num_classes, self.seed = n, image_size, num_classes, seed
        self.classes = [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        x = torch.randn(3, self.image_size, self.image_size, generator=g)
        return x, int(torch.randint(self.num_classes, (), generator=g))


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ...: every sample once over all ranks (the shards may differ by
    one), so validation counts each image exactly once."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = range(rank, n, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def loaders(
    train_set: Dataset, val_set: Dataset, batch: int, workers: int, rank: int, world: int, seed: int
) -> tuple[DataLoader, DataLoader]:
    """The training loader shuffles with DistributedSampler (with world = 1 too), seeded by seed and
    the epoch (set_epoch), and drops the last incomplete batch, so every rank takes the same number
    of steps and no batch norm sees a batch of one. Call seed_epoch() before iterating it."""
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    common = {"num_workers": workers, "persistent_workers": False}
    train = DataLoader(
        train_set, batch_size=batch, sampler=sampler, drop_last=True, generator=torch.Generator(), **common
    )
    val = DataLoader(val_set, batch_size=batch, sampler=ShardSampler(len(val_set), rank, world), **common)
    return train, val


def seed_epoch(loader: DataLoader, seed: int, epoch: int, rank: int) -> None:
    """Makes the epoch's order and augmentations a function of (seed, epoch, rank) alone: the
    sampler's permutation, the workers' seeds (drawn from the loader's generator) and, with no
    workers, torch's global generator, which the transforms then draw from."""
    loader.sampler.set_epoch(epoch)
    epoch_seed = (seed * 1_000_003 + epoch) * 1_009 + rank
    loader.generator.manual_seed(epoch_seed)
    if loader.num_workers == 0:
        torch.manual_seed(epoch_seed)


def check_image_folder(path: str, what: str) -> str | None:
    """Why `path` cannot be the `what` split of an ImageFolder, or None."""
    if not os.path.isdir(path):
        return f"{what}: no folder {path!r} (expected DATA/train/<class>/<images> and DATA/val/<class>/<images>)"
    return None
