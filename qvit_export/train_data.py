"""Training and validation data for qvit-train: Fashion-MNIST (in memory) or an ImageNet-layout folder through
timm's data pipeline, with augmentation that is a function of (seed, epoch, sample index) alone.

Seeding each sample's augmentation from its index, not from a shared random stream, makes a run independent of
how many processes and loader workers share the work (the torchrun test relies on it) and lets a resumed run
draw exactly the augmentations the interrupted one would have.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from .data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist, folder_dataset, image_mode
from .errors import QvitError
from .timm_models import input_shape
from .untrusted import shown

if TYPE_CHECKING:
    from .recipe import Recipe

_BACKGROUND = (0.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD  # a black pixel after normalisation


def _unchanged(x):
    return x


class SeededAugment(Dataset):
    """``transform(base[i])`` with torch's and Python's random state seeded from (seed, epoch, i).

    ``plain`` is the transform without augmentation.
    """

    def __init__(self, base: Dataset, transform, seed: int, plain=None):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0
        self.plain = plain or _unchanged

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        sample_seed = hash((self.seed, self.epoch, int(i))) & 0x7FFF_FFFF_FFFF_FFFF  # tuples of ints hash stably
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            saved = random.getstate()
            random.seed(sample_seed)
            try:
                x = self.transform(x)
            finally:
                random.setstate(saved)
        return x, y


class FashionAugment:
    """Random crop after zero padding, and a horizontal flip, on a normalised [1, 28, 28] tensor."""

    def __init__(self, crop_padding: int, hflip: float):
        self.pad, self.hflip = int(crop_padding), float(hflip)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            h, w = x.shape[-2:]
            x = F.pad(x, (self.pad,) * 4, value=_BACKGROUND)
            i, j = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = x[..., i:i + h, j:j + w]
        if self.hflip and torch.rand(()) < self.hflip:
            x = x.flip(-1)
        return x


def _limit(dataset: Dataset, n: int | None) -> Dataset:
    return dataset if n is None or n >= len(dataset) else Subset(dataset, range(n))


def _fashion(recipe: Recipe, model) -> tuple[Dataset, Dataset]:
    if input_shape(model)[0] != 1:
        raise QvitError("Fashion-MNIST images are grey (1 channel) but this model takes RGB: set model_kwargs "
                        "in_chans: 1 (and img_size: 28), or pass an image folder as data")
    aug = recipe.augment
    train = _limit(fashion_mnist("train"), recipe.train_limit)
    if aug.crop_padding or aug.hflip:
        train = SeededAugment(train, FashionAugment(aug.crop_padding, aug.hflip), recipe.seed)
    return train, _limit(fashion_mnist("test"), recipe.val_limit)


def _folder_split(root: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise QvitError(f"{root} has no {names[0]} folder ({' or '.join(names)}/): lay it out as ImageNet is, "
                    "<root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg")


def _image_folder(recipe: Recipe, model) -> tuple[Dataset, Dataset]:
    from timm.data import create_transform

    from .data import data_config

    root = Path(recipe.data)
    if not root.is_dir():
        raise QvitError(f"data folder not found: {root} (use 'fashion-mnist', or an ImageNet-layout folder with "
                        "train/ and val/)")
    config = data_config(model, f"the images of {root}")
    aug = recipe.augment
    plain = create_transform(**config, is_training=False)
    try:
        augmented = create_transform(**config, is_training=True, hflip=aug.hflip, scale=tuple(aug.scale),
                                     color_jitter=aug.color_jitter, auto_augment=aug.auto_augment or None,
                                     re_prob=aug.re_prob)
    except (AssertionError, ValueError, KeyError, TypeError, IndexError) as e:  # timm parses the policy string
        raise QvitError(f"augment.auto_augment={shown(aug.auto_augment)} is not a policy timm knows "
                        f"({type(e).__name__}): use one such as rand-m9-mstd0.5-inc1") from None
    # The training images come untransformed: SeededAugment applies timm's transform, seeded per sample.
    mode = image_mode(model)
    train = folder_dataset(_folder_split(root, ("train",)), None, mode)
    val = folder_dataset(_folder_split(root, ("val", "validation")), plain, mode)
    return (SeededAugment(_limit(train, recipe.train_limit), augmented, recipe.seed, plain=plain),
            _limit(val, recipe.val_limit))


def training_data(recipe: Recipe, model) -> tuple[Dataset, Dataset]:
    """(train, val) datasets for the recipe's data and the model's input."""
    train, val = (_fashion if recipe.data == "fashion-mnist" else _image_folder)(recipe, model)
    if len(train) == 0 or len(val) == 0:
        raise QvitError(f"{recipe.data}: the training or validation split is empty (check train_limit/val_limit)")
    return train, val


def set_epoch(dataset: Dataset, epoch: int) -> None:
    if isinstance(dataset, SeededAugment):
        dataset.set_epoch(epoch)
