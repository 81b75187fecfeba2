"""The part of torchvision that train.py needs, on Pillow alone, for when torchvision does not import.

ImageFolder and the transforms RandomResizedCrop, RandomHorizontalFlip, Resize, CenterCrop,
ToTensor and Normalize, with torchvision's arguments, defaults and random draws (from torch's
generator, so a seeded run is reproducible). Images are resized with Pillow's bilinear filter,
as torchvision does for PIL images.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def pil_loader(path: str) -> Image.Image:
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/<image>: classes are the sorted folder names, samples (path, class index)
    sorted by path within each class. A class folder with no image is an error, as in torchvision."""

    def __init__(self, root: str, transform: Callable | None = None) -> None:
        self.root = os.fspath(root)
        self.transform = transform
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {self.root}.")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        empty = []
        for c in self.classes:
            found = []
            for dirpath, _, files in sorted(os.walk(os.path.join(self.root, c), followlinks=True)):
                found += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
            empty += [] if found else [c]
            self.samples += [(p, self.class_to_idx[c]) for p in found]
        if empty:
            raise FileNotFoundError(
                f"Found no valid file for the classes {', '.join(empty)}. Supported extensions are: "
                f"{', '.join(IMG_EXTENSIONS)}"
            )
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        img = pil_loader(path)
        return (self.transform(img) if self.transform is not None else img), target


class Compose:
    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class RandomResizedCrop:
    """A crop of random area (a `scale` fraction of the image) and aspect ratio, resized to `size`."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)) -> None:
        self.size = _size2(size)
        self.scale = scale
        self.ratio = ratio

    @staticmethod
    def get_params(img: Image.Image, scale, ratio) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop, drawn as torchvision draws it."""
        width, height = img.size
        area = height * width
        log_ratio = torch.log(torch.tensor(ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
            aspect_ratio = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,)).item()
                j = torch.randint(0, width - w + 1, size=(1,)).item()
                return i, j, h, w
        in_ratio = width / height  # fallback: the whole image, clipped to the ratio range
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            h, w = height, int(round(height * max(ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image) -> Image.Image:
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        return img.crop((j, i, j + w, i + h)).resize(self.size[::-1], Image.BILINEAR)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1).item() < self.p else img


class Resize:
    """An int resizes the shorter side to it (the longer one in proportion, rounded down); a pair is (h, w)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if isinstance(self.size, int):
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.size, int(self.size * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            new_h, new_w = _size2(self.size)
        return img if (new_w, new_h) == (w, h) else img.resize((new_w, new_h), Image.BILINEAR)


class CenterCrop:
    """The central (h, w) window. Where the image is smaller, zeros pad it, the odd one after it."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _size2(size)

    @staticmethod
    def _start(have: int, want: int) -> int:
        return -((want - have) // 2) if want > have else int(round((have - want) / 2.0))

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        ch, cw = self.size
        top, left = self._start(h, ch), self._start(w, cw)
        return img.crop((left, top, left + cw, top + ch))  # Pillow fills outside the image with zeros


class ToTensor:
    """An RGB PIL image (H, W) as a float32 (3, H, W) tensor in [0, 1]."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        a = np.asarray(img, dtype=np.uint8)
        return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255)


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
