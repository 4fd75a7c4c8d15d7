"""Class predictions of one client's personalized model on image files (the ``hilora-fl predict`` command).

Images are read with PIL and transformed as the run's data were: the embedded digits as grayscale
repeated to three channels, image data sets (CIFAR-100, DomainNet, ImageFolder) with their resize
and normalization.

Example:
    >>> from hilora_lightning.predict import image_paths
    >>> image_paths("no/such/folder")
    Traceback (most recent call last):
    ...
    FileNotFoundError: no image file or folder at 'no/such/folder'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hilora_lightning.export import client_copy
from hilora_lightning.model import HiLoRAViT
from hilora_lightning.tiers import Tier

__all__ = ["IMAGE_SUFFIXES", "image_paths", "image_transform", "predict_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_paths(target: str | Path) -> list[Path]:
    """One image file, or the image files of a folder (sorted); an error if there are none."""
    path = Path(target)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no image file or folder at {str(target)!r}")
    found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise FileNotFoundError(f"{str(target)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return found


def image_transform(data: Mapping[str, Any], model: Any = None) -> Callable[[Any], Tensor]:
    """The transform of the config's ``data`` section for one PIL image.

    ``data.transform`` (``"package.module:function"``, called with no arguments) returns your own; for
    a ``data.builder`` without one, images are resized to ``data.img_size`` (else the backbone's
    input size) and normalized with mean = std = 0.5, the statistics of timm's in21k ViTs.
    """
    from torchvision import transforms

    if "transform" in data:
        from hilora_lightning.data.hook import load_callable

        return load_callable(data["transform"], "data.transform")()  # type: ignore[no-any-return]
    if "builder" in data:
        from hilora_lightning.data.images import default_transform

        size = data.get("img_size") or _input_size(model) or 224
        return default_transform(int(size))
    if data.get("name", "digits") == "digits":
        size = int(data.get("img_size", 32))
        return transforms.Compose([transforms.Grayscale(1), transforms.Resize((size, size)), transforms.ToTensor(),
                                   transforms.Lambda(lambda x: x.repeat(3, 1, 1)),
                                   transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    from hilora_lightning.data.images import default_transform

    return default_transform(int(data.get("img_size", 224)))


def _input_size(model: Any) -> int | None:
    size = getattr(getattr(getattr(model, "model", None), "patch_embed", None), "img_size", None)
    return int(size[0]) if isinstance(size, (tuple, list)) else (int(size) if size else None)


@torch.no_grad()
def predict_images(model: HiLoRAViT, tiers: Mapping[Tier, Mapping[str, Tensor]], head: Mapping[str, Tensor],
                   paths: Sequence[Path], transform: Callable[[Any], Tensor], topk: int = 5,
                   batch_size: int = 64) -> list[dict[str, Any]]:
    """Top-``topk`` classes and probabilities per image, with the client's tiers and head (``model`` untouched)."""
    from PIL import Image

    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an int >= 1, got {topk!r}")
    own = client_copy(model, tiers, head)
    k = min(topk, int(own.hparams["num_classes"]))
    out: list[dict[str, Any]] = []
    with own.using_tiers(list(tiers)):
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            images = []
            for p in chunk:
                try:
                    with Image.open(p) as img:
                        images.append(transform(img.convert("RGB")))
                except OSError as exc:
                    raise ValueError(f"cannot read image {str(p)!r}: {exc}") from exc
            probs = own(torch.stack(images)).softmax(-1)
            top = probs.topk(k, dim=-1)
            for p, idx, val in zip(chunk, top.indices.tolist(), top.values.tolist()):
                out.append({"image": str(p), "classes": idx, "probabilities": [round(v, 6) for v in val]})
    return out
