"""Training augmentation for images: presets of PIL operations, every draw from one seeded rng.

An :class:`Augment` says what a training example goes through after it is
decoded (the evaluation transform never augments):

1. a random resized crop (``scale`` of the area, aspect ratio in ``ratio``,
   log-uniform; torchvision's recipe) resized to the model's ``size x size``;
2. flips: left-right (``hflip``) and top-bottom (``vflip``), each with probability 1/2;
3. a rotation by an angle uniform in ``[-rotate, rotate]`` degrees (bilinear, zeros outside);
4. colour jitter: brightness, contrast and saturation factors uniform in
   ``[1 - b, 1 + b]`` (each 0 = off), applied in that order;
5. RandAugment-style ops (Cubuk et al. 2020): ``randaugment_ops`` operations
   drawn uniformly (with replacement) from :data:`RANDAUGMENT_OPS`, each at
   magnitude ``randaugment_magnitude`` (0-10, torchvision's scale) with a random sign.

Every random number comes from the ``rng`` handed in, in a fixed order, so
the same rng gives the same image; the batch iterators draw it from
``(seed, epoch, position)`` (see :mod:`jaxfer.data.iterators`), which makes
augmented batches a pure function of the seed and the step: a resumed run
sees exactly the batches of an uninterrupted one.

Presets (:data:`PRESETS`), by name in recipes (``data.image_options.augment``):

* ``"none"``: the evaluation transform (resize, centre crop) also in training;
* ``"flip"``: resize, centre crop, left-right flip;
* ``"imagenet"`` (default): random resized crop (8-100% of the area) + left-right flip;
* ``"light"``: crop 50-100%, left-right flip, 10 degree rotations, mild colour jitter;
* ``"randaugment"``: ``"imagenet"`` + 2 RandAugment ops at magnitude 9;
* ``"light_randaugment"``: crop 35-100%, flip + 2 ops at magnitude 5;
* ``"inspection"``: for images without an up or a left (solar cells, wafers,
  micrographs, scans): crop 70-100%, both flips, 10 degree rotations, brightness
  and contrast jitter of 20%, no saturation (often greyscale).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

_BILINEAR = 2


@dataclasses.dataclass(frozen=True)
class Augment:
    """One training augmentation policy; see the module docstring for the order of the steps."""

    crop: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    vflip: bool = False
    rotate: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    randaugment_ops: int = 0
    randaugment_magnitude: float = 9.0

    def __post_init__(self):
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"augment scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"augment {name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.randaugment_magnitude <= 10:
            raise ValueError(f"randaugment_magnitude is on a 0-10 scale, got {self.randaugment_magnitude}")


PRESETS: dict[str, Augment] = {
    "none": Augment(crop=False, hflip=False),
    "flip": Augment(crop=False),
    "imagenet": Augment(),
    "light": Augment(scale=(0.5, 1.0), rotate=10.0, brightness=0.2, contrast=0.2, saturation=0.1),
    "randaugment": Augment(randaugment_ops=2, randaugment_magnitude=9.0),
    "light_randaugment": Augment(scale=(0.35, 1.0), randaugment_ops=2, randaugment_magnitude=5.0),
    "inspection": Augment(scale=(0.7, 1.0), vflip=True, rotate=10.0, brightness=0.2, contrast=0.2),
}


def get(augment: str | Augment | Mapping[str, Any]) -> Augment:
    """A preset by name, an :class:`Augment`, or a dict of its fields (``{"preset": name, **changes}``)."""
    if isinstance(augment, Augment):
        return augment
    if isinstance(augment, str):
        if augment not in PRESETS:
            raise ValueError(f"unknown augmentation preset {augment!r}; known: {', '.join(PRESETS)}")
        return PRESETS[augment]
    fields = dict(augment)
    base = get(fields.pop("preset", "imagenet"))
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(Augment)})
    if unknown:
        raise ValueError(f"unknown augmentation fields {unknown}; known: {[f.name for f in dataclasses.fields(Augment)]}")
    return dataclasses.replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


# ------------------------------------------------------------ RandAugment ops
def _sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


def _affine(im, matrix):
    from PIL import Image

    return im.transform(im.size, Image.AFFINE, matrix, resample=_BILINEAR)


def _enhance(kind):
    def op(im, m, rng):
        from PIL import ImageEnhance

        return getattr(ImageEnhance, kind)(im).enhance(1.0 + _sign(rng) * 0.9 * m / 10)

    return op


def _ops() -> dict[str, Callable]:
    from PIL import ImageOps

    return {
        "identity": lambda im, m, rng: im,
        "autocontrast": lambda im, m, rng: ImageOps.autocontrast(im),
        "equalize": lambda im, m, rng: ImageOps.equalize(im),
        "rotate": lambda im, m, rng: im.rotate(_sign(rng) * 30.0 * m / 10, resample=_BILINEAR),
        "posterize": lambda im, m, rng: ImageOps.posterize(im, max(1, int(8 - round(4 * m / 10)))),
        "solarize": lambda im, m, rng: ImageOps.solarize(im, int(255 * (1 - m / 10))),
        "color": _enhance("Color"),
        "contrast": _enhance("Contrast"),
        "brightness": _enhance("Brightness"),
        "sharpness": _enhance("Sharpness"),
        "shear_x": lambda im, m, rng: _affine(im, (1, _sign(rng) * 0.3 * m / 10, 0, 0, 1, 0)),
        "shear_y": lambda im, m, rng: _affine(im, (1, 0, 0, _sign(rng) * 0.3 * m / 10, 1, 0)),
        "translate_x": lambda im, m, rng: _affine(im, (1, 0, _sign(rng) * 0.45 * m / 10 * im.size[0], 0, 1, 0)),
        "translate_y": lambda im, m, rng: _affine(im, (1, 0, 0, 0, 1, _sign(rng) * 0.45 * m / 10 * im.size[1])),
    }


RANDAUGMENT_OPS = ("identity", "autocontrast", "equalize", "rotate", "posterize", "solarize", "color",
                   "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")


# ----------------------------------------------------------------- apply
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


def crop_and_resize(im, size: int, aug: Augment, rng: np.random.Generator, resample: int):
    """Step 1: a random resized crop of PIL image ``im`` to ``size x size``."""
    w, h = im.size
    top, left, ch, cw = random_resized_crop_box(rng, h, w, aug.scale, aug.ratio)
    return im.resize((size, size), resample, box=(left, top, left + cw, top + ch))


def apply(im, aug: Augment, rng: np.random.Generator):
    """Steps 2-5 on a PIL image (RGB), drawing from ``rng`` in a fixed order."""
    from PIL import ImageEnhance

    if aug.hflip and rng.random() < 0.5:
        im = im.transpose(0)  # FLIP_LEFT_RIGHT
    if aug.vflip and rng.random() < 0.5:
        im = im.transpose(1)  # FLIP_TOP_BOTTOM
    if aug.rotate:
        im = im.rotate(float(rng.uniform(-aug.rotate, aug.rotate)), resample=_BILINEAR)
    for amount, enhancer in ((aug.brightness, ImageEnhance.Brightness), (aug.contrast, ImageEnhance.Contrast),
                             (aug.saturation, ImageEnhance.Color)):
        if amount:
            im = enhancer(im).enhance(float(rng.uniform(1 - amount, 1 + amount)))
    if aug.randaugment_ops:
        ops = _ops()
        for _ in range(aug.randaugment_ops):
            name = RANDAUGMENT_OPS[int(rng.integers(len(RANDAUGMENT_OPS)))]
            im = ops[name](im, aug.randaugment_magnitude, rng)
    return im
