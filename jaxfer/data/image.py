"""Image preprocessing and augmentation on host (numpy + PIL), seeded.

Examples carry ``"image"`` (HWC uint8 RGB or HW greyscale array, or a PIL image); the transforms
below turn it into ``"pixel_values"``: CHW float32, scaled to [0, 1] and normalised
with ``mean``/``std``, the layout and numbers of HuggingFace image processors.
Matching a HF processor:

* ViT (``ViTImageProcessor``, resize straight to 224x224, mean = std = 0.5):
  ``image_transform(224, resize=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)``
* ResNet / ConvNeXt style (shorter side to 256, centre crop 224, ImageNet stats):
  ``image_transform(224, resize=256)`` (the default ``resize`` is ``size / 0.875``).

Recipes do not type these numbers: :func:`transform_options` turns a model's
own description (``jaxfer.Model.preprocessing()``: the checkpoint's
``preprocessor_config.json``, else the family's) into the arguments.
Training augmentation presets live in :mod:`jaxfer.data.augment`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxfer.data import augment as augment_lib
from jaxfer.data.augment import random_resized_crop_box  # noqa: F401  (re-exported)

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


def image_transform(
    size: int,
    *,
    train: bool = False,
    resize: int | tuple[int, int] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    augment: str | augment_lib.Augment | Mapping[str, Any] = "imagenet",
    resample: str = "bilinear",
    key: str = "image",
    out_key: str = "pixel_values",
):
    """A per-example ``fn(example, rng) -> example`` for the batch iterators.

    Evaluation (``train=False``): resize (``resize`` as in :func:`resize`; default
    shorter side ``round(size / 0.875)``), centre crop ``size``, normalise.
    Training: ``augment`` (a preset name of :mod:`jaxfer.data.augment`, an
    ``Augment`` or a dict of its fields): a random resized crop to ``size x size``
    (or, without ``crop``, the evaluation resize and crop), then flips, rotation,
    colour jitter and RandAugment ops as it says, then normalise. All randomness
    comes from ``rng``.

    Greyscale images (``(H, W)`` or ``(H, W, 1)`` arrays, mode ``L`` files) are
    replicated into three equal channels before normalising: exactly what an
    RGB-pretrained network sees for a grey photo, so its first layer stays as
    trained (summing its kernels over channels instead would not be the same
    function once each channel is normalised with its own mean and std).
    """
    resize_to = round(size / 0.875) if resize is None else resize
    policy = augment_lib.get(augment)
    filter_ = _RESAMPLE[resample]

    def fn(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        example = dict(example)
        im = _pil(example.pop(key))
        if train and policy.crop:
            im = augment_lib.crop_and_resize(im, size, policy, rng, filter_)
        else:
            im = _resize_fn(im, resize_to, resample)
            if im.size != (size, size):
                im = center_crop(im, size)
        if train:
            im = augment_lib.apply(im, policy, rng)
        example[out_key] = normalize(im, mean, std)
        return example

    return fn


def transform_options(preprocessing: Mapping[str, Any] | None, size: int | None = None,
                      overrides: Mapping[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """A model's preprocessing description -> ``(size, image_transform kwargs)``.

    ``preprocessing`` (``jaxfer.Model.preprocessing()``: from the checkpoint's
    ``preprocessor_config.json`` or the family) holds ``size`` (the trained
    resolution), ``crop_pct`` (shorter side resized to ``size / crop_pct`` then
    centre-cropped; ``None``: resized straight to ``size x size``), ``mean``,
    ``std`` and ``resample``. ``size`` overrides the resolution, keeping the crop
    fraction, so a smaller input sees the same field of view. ``overrides`` (a
    recipe's ``data.image_options``) win over what the model says. Without a
    description (``None``) the transform's defaults stay (ImageNet statistics).
    """
    if preprocessing is None:
        if not size:
            raise ValueError("no image size: the model describes no preprocessing; set data.image_size")
        return int(size), dict(overrides or {})
    size = int(size or preprocessing["size"])
    crop_pct = preprocessing.get("crop_pct")
    opts: dict[str, Any] = {"resize": (size, size) if crop_pct is None else round(size / crop_pct)}
    for k in ("mean", "std", "resample"):
        if preprocessing.get(k) is not None:
            opts[k] = tuple(preprocessing[k]) if k != "resample" else preprocessing[k]
    opts.update(overrides or {})
    return size, opts


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
