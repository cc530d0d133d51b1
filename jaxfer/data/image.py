"""Image preprocessing and augmentation on host (numpy + PIL), seeded.

Examples carry ``"image"`` (HWC uint8 RGB array, or a PIL image); the transforms
below turn it into ``"pixel_values"``: CHW float32, scaled to [0, 1] and normalised
with ``mean``/``std``, the layout and numbers of HuggingFace image processors.
Matching a HF processor:

* ViT (``ViTImageProcessor``, resize straight to 224x224, mean = std = 0.5):
  ``image_transform(224, resize=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)``
* ResNet / ConvNeXt style (shorter side to 256, centre crop 224, ImageNet stats):
  ``image_transform(224, resize=256)`` (the default ``resize`` is ``size / 0.875``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}


def _pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr.astype(np.uint8)).convert("RGB")


def resize(image, size: int | tuple[int, int], resample: str = "bilinear"):
    """``int``: shorter side to ``size`` (aspect kept); ``(h, w)``: exactly that."""
    im = _pil(image)
    w, h = im.size
    if isinstance(size, int):
        s = size / min(h, w)
        size = (max(1, round(h * s)), max(1, round(w * s)))
    return im.resize((size[1], size[0]), _RESAMPLE[resample])


_resize_fn = resize  # image_transform's ``resize`` argument shadows the function


def center_crop(image, size: int):
    """The central ``size x size`` window (PIL image in, PIL image out)."""
    im = _pil(image)
    w, h = im.size
    top, left = (h - size) // 2, (w - size) // 2
    return im.crop((left, top, left + size, top + size))


def normalize(image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """HWC uint8 -> CHW float32 ``(x / 255 - mean) / std``."""
    x = np.asarray(_pil(image), np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def random_resized_crop_box(
    rng: np.random.Generator, height: int, width: int,
    scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop covering ``scale`` of the area with
    aspect ratio in ``ratio`` (log-uniform); after 10 misses, the central crop
    clamped to ``ratio`` (the Inception / torchvision recipe)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def image_transform(
    size: int,
    *,
    train: bool = False,
    resize: int | tuple[int, int] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: bool = True,
    resample: str = "bilinear",
    key: str = "image",
    out_key: str = "pixel_values",
):
    """A per-example ``fn(example, rng) -> example`` for the batch iterators.

    Evaluation (``train=False``): resize (``resize`` as in :func:`resize`; default
    shorter side ``round(size / 0.875)``), centre crop ``size``, normalise.
    Training: random resized crop to ``size x size`` (``scale``, ``ratio``), random
    horizontal flip when ``hflip``, normalise. All randomness comes from ``rng``.
    """
    resize_to = round(size / 0.875) if resize is None else resize

    def fn(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        example = dict(example)
        im = _pil(example.pop(key))
        if train:
            w, h = im.size
            top, left, ch, cw = random_resized_crop_box(rng, h, w, scale, ratio)
            im = im.resize((size, size), _RESAMPLE[resample],
                           box=(left, top, left + cw, top + ch))
            if hflip and rng.random() < 0.5:
                im = im.transpose(0)  # FLIP_LEFT_RIGHT
        else:
            im = _resize_fn(im, resize_to, resample)
            if im.size != (size, size):
                im = center_crop(im, size)
        example[out_key] = normalize(im, mean, std)
        return example

    return fn



def mixup(
    batch: dict[str, np.ndarray],
    rng: np.random.Generator,
    *,
    num_classes: int,
    alpha: float = 0.2,
    key: str = "pixel_values",
    label: str = "label",
) -> dict[str, np.ndarray]:
    """Mix each example with a random partner: ``lam * x + (1 - lam) * x[perm]``.

    One ``lam ~ Beta(alpha, alpha)`` per batch. Integer labels become float32
    soft targets of shape ``(batch, num_classes)`` (already-soft labels are mixed
    as they are). Pure: returns a new dict and leaves ``batch`` untouched. Use as
    ``batch_fn=functools.partial(mixup, num_classes=10)``.
    """
    lam = np.float32(rng.beta(alpha, alpha)) if alpha > 0 else np.float32(1.0)
    perm = rng.permutation(len(batch[key]))
    y = np.asarray(batch[label])
    if y.ndim == 1:
        y = np.eye(num_classes, dtype=np.float32)[y]
    out = dict(batch)
    out[key] = (lam * batch[key] + (1 - lam) * batch[key][perm]).astype(batch[key].dtype)
    out[label] = (lam * y + (1 - lam) * y[perm]).astype(np.float32)
    return out
