"""examples/imagenet/pil_vision.py, the Pillow-only data path, against references on fixed images.

The references are torch's own ops: bilinear F.interpolate with antialias (made to match
Pillow's filter), slicing, flipping, and the arithmetic of normalisation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "imagenet"
sys.path.insert(0, str(EXAMPLES))

import data  # noqa: E402
import pil_vision as pv  # noqa: E402


def fixed_image(w: int, h: int, phase: int = 0) -> np.ndarray:
    """An (h, w, 3) uint8 image with gradients, stripes and a corner mark: no two halves alike."""
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255) // max(1, w - 1)
    g = (y * 255) // max(1, h - 1)
    b = ((x // 3 + y // 2 + phase) % 2) * 200 + 30
    img = np.stack([r, g, b], axis=-1).astype(np.uint8)
    img[:2, :3] = (255, 0, 128)
    return img


def as_float(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1)


def reference_resize(a: np.ndarray, h: int, w: int) -> torch.Tensor:
    """(3, h, w) in 0..255, through torch's bilinear filter with antialias (Pillow's, before rounding)."""
    return F.interpolate(as_float(a)[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]


def pil_array(img: Image.Image) -> torch.Tensor:
    return as_float(np.asarray(img))


def test_image_folder_reads_classes_and_pixels(tmp_path):
    images = {}
    for c, name in [("zebra", "b.png"), ("ant", "a.png"), ("ant", "c.PNG"), ("ant/deeper", "d.png")]:
        (tmp_path / c).mkdir(parents=True, exist_ok=True)
        a = fixed_image(9 + len(images), 7, phase=len(images))
        Image.fromarray(a).save(tmp_path / c / name)
        images[f"{c}/{name}"] = a
    (tmp_path / "ant" / "readme.txt").write_text("not an image")
    ds = pv.ImageFolder(str(tmp_path), transform=pv.ToTensor())
    assert ds.classes == ["ant", "zebra"] and ds.class_to_idx == {"ant": 0, "zebra": 1}
    rel = [str(Path(p).relative_to(tmp_path)) for p, _ in ds.samples]
    assert rel == ["ant/a.png", "ant/c.PNG", "ant/deeper/d.png", "zebra/b.png"]
    assert ds.targets == [0, 0, 0, 1] and len(ds) == 4
    for i, key in enumerate(rel):
        x, t = ds[i]
        assert t == ds.targets[i] and x.dtype == torch.float32
        assert torch.equal(x, as_float(images[key]) / 255)

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="Found no valid file for the classes empty"):
        pv.ImageFolder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Couldn't find any class folder"):
        pv.ImageFolder(str(tmp_path / "empty"))


def test_to_tensor_and_normalize_exact():
    a = fixed_image(13, 6)
    x = pv.ToTensor()(Image.fromarray(a))
    assert x.shape == (3, 6, 13) and torch.equal(x, as_float(a) / 255)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    y = pv.Normalize(mean, std)(x)
    expected = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.equal(y, expected)


@pytest.mark.parametrize(
    ("w", "h", "size", "out_wh"),
    [(37, 23, 16, (25, 16)), (23, 37, 16, (16, 25)), (8, 8, 24, (24, 24)), (40, 30, (12, 20), (20, 12))],
)
def test_resize_matches_bilinear_reference(w, h, size, out_wh):
    a = fixed_image(w, h)
    out = pv.Resize(size)(Image.fromarray(a))
    assert out.size == out_wh
    ref = reference_resize(a, out_wh[1], out_wh[0])
    assert (pil_array(out) - ref).abs().max() <= 1.0  # Pillow rounds to uint8


def test_center_crop_matches_slicing_and_pads_like_torchvision():
    a = fixed_image(25, 16)
    out = pv.CenterCrop(12)(Image.fromarray(a))
    top, left = round((16 - 12) / 2), round((25 - 12) / 2)
    assert torch.equal(pil_array(out), as_float(a[top : top + 12, left : left + 12]))
    out = pv.CenterCrop((20, 9))(Image.fromarray(a))  # taller than the image: zero rows, 2 on top and 2 below
    expected = np.zeros((20, 9, 3), np.uint8)
    left = round((25 - 9) / 2)
    expected[2:18] = a[:, left : left + 9]
    assert torch.equal(pil_array(out), as_float(expected))
    out = pv.CenterCrop((19, 9))(Image.fromarray(a))  # odd padding: torchvision puts the extra row below
    expected = np.zeros((19, 9, 3), np.uint8)
    expected[1:17] = a[:, left : left + 9]
    assert torch.equal(pil_array(out), as_float(expected))


def test_horizontal_flip():
    a = fixed_image(11, 5)
    assert torch.equal(pil_array(pv.RandomHorizontalFlip(1.0)(Image.fromarray(a))), as_float(a[:, ::-1].copy()))
    assert torch.equal(pil_array(pv.RandomHorizontalFlip(0.0)(Image.fromarray(a))), as_float(a))
    torch.manual_seed(0)
    flips = [pv.RandomHorizontalFlip(0.5)(Image.fromarray(a)).getpixel((0, 0)) != tuple(a[0, 0]) for _ in range(400)]
    assert 150 < sum(flips) < 250


def test_random_resized_crop_draws_and_resizes():
    a = fixed_image(48, 36)
    img = Image.fromarray(a)
    torch.manual_seed(1)
    boxes = [pv.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(300)]
    for i, j, h, w in boxes:
        assert 0 <= i and i + h <= 36 and 0 <= j and j + w <= 48
        assert 0.08 * 0.8 <= h * w / (36 * 48) <= 1.0 + 1e-9
        assert 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25  # up to rounding of small crops
    assert len(set(boxes)) > 250

    # The transform is the crop at the drawn box, resized: the same draws through get_params.
    t = pv.RandomResizedCrop(20, scale=(0.3, 0.9))
    torch.manual_seed(7)
    out = t(img)
    torch.manual_seed(7)
    i, j, h, w = t.get_params(img, (0.3, 0.9), t.ratio)
    assert out.size == (20, 20)
    ref = reference_resize(a[i : i + h, j : j + w], 20, 20)
    assert (pil_array(out) - ref).abs().max() <= 1.0

    # No draw fits (the whole area at a ratio the image does not have): the central crop at the
    # nearest ratio.
    square = Image.fromarray(fixed_image(30, 30))
    assert pv.RandomResizedCrop.get_params(square, (1.0, 1.0), (2.0, 3.0)) == (7, 0, 15, 30)
    assert pv.RandomResizedCrop.get_params(square, (1.0, 1.0), (0.25, 0.5)) == (0, 7, 30, 15)


def test_the_script_transforms_compose_these():
    if data.BACKEND != "pil_vision":
        pytest.skip("torchvision imports: train.py uses its transforms")
    a = fixed_image(40, 30)
    x = data.val_transform(16, 0.8)(Image.fromarray(a))  # resize to 20 (shorter side), center 16
    resized = pv.Resize(20)(Image.fromarray(a))
    assert resized.size == (26, 20)
    crop = np.asarray(resized)[2:18, 5:21]
    expected = pv.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)(as_float(crop) / 255)
    assert x.shape == (3, 16, 16) and torch.equal(x, expected)
    torch.manual_seed(3)
    y = data.train_transform(16, (0.5, 1.0), 0.5)(Image.fromarray(a))
    assert y.shape == (3, 16, 16) and y.dtype == torch.float32


def test_same_as_torchvision_when_it_imports():
    tv = pytest.importorskip("torchvision.transforms", reason="torchvision is not installed beside this torch")
    a = fixed_image(48, 36)
    for ours, theirs in [
        (pv.RandomResizedCrop(20), tv.RandomResizedCrop(20)),
        (pv.Resize(17), tv.Resize(17)),
        (pv.CenterCrop((40, 9)), tv.CenterCrop((40, 9))),
    ]:
        torch.manual_seed(5)
        x = pil_array(ours(Image.fromarray(a)))
        torch.manual_seed(5)
        y = pil_array(theirs(Image.fromarray(a)))
        assert torch.equal(x, y), type(ours).__name__
