#!/usr/bin/env python
"""scikit-learn's digits (1797 images of 8x8 pixels, 10 classes) written out as an ImageFolder of PNGs.

    python examples/imagenet/digits.py OUT      # OUT/train/<digit>/*.png, OUT/val/<digit>/*.png

Every fifth image of each class goes to val/ (355 images), the rest to train/ (1442). The
16 grey levels are scaled to 0..255 and written as RGB, as a photo would be.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

VAL_EVERY = 5


def write_digits(root: str | Path) -> Path:
    """Writes the ImageFolder under root (once: a complete earlier one is kept) and returns root."""
    from sklearn.datasets import load_digits

    root = Path(root)
    done = root / ".complete"
    if done.exists():
        return root
    digits = load_digits()
    seen = dict.fromkeys(range(10), 0)
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        label = int(label)
        split = "val" if seen[label] % VAL_EVERY == VAL_EVERY - 1 else "train"
        seen[label] += 1
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        grey = np.round(image * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(grey, mode="L").convert("RGB").save(folder / f"{i:04d}.png")
    done.touch()
    return root


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the ImageFolder root to write")
    print(write_digits(ap.parse_args().out))
