"""What a sample or a batch may look like, and how the library reads images and labels out of it.

Every client loader of the federation yields ``(images, labels)``. Samples may be tuples
``(image, label, ...)`` or dicts (what Hugging Face ``datasets`` and most image pipelines yield,
``{"pixel_values": ..., "label": ...}``); :class:`SampleKeys` names the dict keys (``None``: the
first of :data:`IMAGE_KEYS` / :data:`LABEL_KEYS` present), and :class:`XYCollate` turns any
batch (after the user's own ``collate_fn``, if any) into the pair. Pure data plumbing: no model,
no Lightning.

Example:
    >>> import torch
    >>> x, y = split_batch({"pixel_values": torch.zeros(2, 3, 4, 4), "label": torch.tensor([1, 0])})
    >>> tuple(x.shape), y.tolist()
    ((2, 3, 4, 4), [1, 0])
    >>> split_batch({"img": torch.zeros(1)}, SampleKeys(label_key="y"))
    Traceback (most recent call last):
    ...
    hilora_lightning.data.samples.SampleFormatError: a dict sample/batch has no label key 'y' (its keys: ['img']); \
set loader.label_key (SampleKeys(label_key=...)) to the key that holds the class index
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset, default_collate

__all__ = ["IMAGE_KEYS", "LABEL_KEYS", "SampleFormatError", "SampleKeys", "XYCollate", "dataset_labels",
           "split_batch"]

#: dict keys tried for the image, in order, when :attr:`SampleKeys.image_key` is ``None``
IMAGE_KEYS = ("pixel_values", "image", "img", "x", "input", "inputs")
#: dict keys tried for the label, in order, when :attr:`SampleKeys.label_key` is ``None``
LABEL_KEYS = ("label", "labels", "fine_label", "y", "target", "targets")


class SampleFormatError(TypeError):
    """A sample or batch that is neither a tensor, a ``(image, label)`` sequence nor a dict with the named keys."""


@dataclasses.dataclass(frozen=True)
class SampleKeys:
    """Which dict keys hold the image and the label (``None``: the first of the usual names present).

    Example:
        >>> SampleKeys().pick({"image": 1, "label": 2}, "image")
        'image'
    """

    image_key: str | None = None
    label_key: str | None = None

    def pick(self, sample: Mapping[str, Any], what: str) -> str | None:
        """The key of ``what`` (``"image"`` or ``"label"``) in ``sample``; ``None`` if an automatic one is absent."""
        given, usual = (self.image_key, IMAGE_KEYS) if what == "image" else (self.label_key, LABEL_KEYS)
        if given is not None:
            if given not in sample:
                raise SampleFormatError(
                    f"a dict sample/batch has no {what} key {given!r} (its keys: {sorted(map(str, sample))}); set "
                    f"loader.{what}_key (SampleKeys({what}_key=...)) to the key that holds the "
                    f"{'image tensor' if what == 'image' else 'class index'}")
            return given
        return next((k for k in usual if k in sample), None)


def split_batch(batch: Any, keys: SampleKeys | None = None, need_label: bool = True) -> tuple[Any, Any]:
    """``(images, labels)`` of a batch or a sample: a tensor (no label), a sequence ``(x, y, ...)`` or a dict.

    With ``need_label=False`` a batch without labels gives ``(images, None)`` (prediction).
    """
    keys = keys or SampleKeys()
    if isinstance(batch, Tensor):
        if need_label:
            raise SampleFormatError("got a bare tensor where (image, label) was expected; the samples need labels")
        return batch, None
    if isinstance(batch, Mapping):
        xk, yk = keys.pick(batch, "image"), keys.pick(batch, "label")
        if xk is None:
            raise SampleFormatError(
                f"a dict sample/batch has none of the image keys {list(IMAGE_KEYS)} (its keys: "
                f"{sorted(map(str, batch))}); set loader.image_key (SampleKeys(image_key=...)) to the image's key")
        if yk is None and need_label:
            raise SampleFormatError(
                f"a dict sample/batch has none of the label keys {list(LABEL_KEYS)} (its keys: "
                f"{sorted(map(str, batch))}); set loader.label_key (SampleKeys(label_key=...)) to the label's key")
        return batch[xk], None if yk is None else batch[yk]
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 1:
        if len(batch) == 1:
            if need_label:
                raise SampleFormatError("got a 1-item sample/batch (image only) where (image, label) was expected")
            return batch[0], None
        return batch[0], batch[1]
    raise SampleFormatError(f"a sample/batch must be a tensor, an (image, label, ...) tuple or a dict, got "
                            f"{type(batch).__name__}")


class XYCollate:
    """The collate function of every client loader: the user's (or PyTorch's default), then ``(x, y)``.

    Picklable (loader worker processes). Labels become a ``long`` tensor; a batch of non-tensor
    images (PIL images of an untransformed data set) is an error that says what to do.

    Example:
        >>> import torch
        >>> x, y = XYCollate()([{"image": torch.zeros(3, 2, 2), "label": 4}] * 2)
        >>> tuple(x.shape), y.dtype
        ((2, 3, 2, 2), torch.int64)
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None = None, keys: SampleKeys | None = None) -> None:
        self.collate_fn, self.keys = collate_fn, keys or SampleKeys()

    def __call__(self, samples: list[Any]) -> tuple[Tensor, Tensor]:
        if self.collate_fn is None and samples and isinstance(samples[0], Mapping):
            # collate only the two fields used (other fields, e.g. file names or PIL images, need not stack)
            picked = [split_batch(s, self.keys) for s in samples]
            batch: Any = default_collate([(_tensor_image(x), y) for x, y in picked])
        else:
            try:
                batch = (self.collate_fn or default_collate)(samples)
            except TypeError as exc:
                if samples and _has_pil(samples[0]):
                    raise SampleFormatError(_PIL_HINT) from exc
                raise
        x, y = split_batch(batch, self.keys)
        if not isinstance(x, Tensor):
            raise SampleFormatError(_PIL_HINT if _has_pil(x) else
                                    f"a collated batch's images must be a tensor, got {type(x).__name__}")
        return x, torch.as_tensor(y, dtype=torch.long)


_PIL_HINT = ("the samples hold PIL images (or other non-tensors), which do not batch: give the data set a transform "
             "that returns tensors (torchvision's transforms.ToTensor(), a Hugging Face dataset's with_transform, "
             "hilora_lightning.data.default_transform) or pass loader.collate_fn")


def _has_pil(value: Any) -> bool:
    if isinstance(value, Mapping):
        return any(_has_pil(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_pil(v) for v in value[:2])
    return type(value).__module__.startswith("PIL")


def _tensor_image(x: Any) -> Any:
    if isinstance(x, Tensor) or isinstance(x, np.ndarray):
        return x
    if _has_pil(x):
        raise SampleFormatError(_PIL_HINT)
    return x


def dataset_labels(data: Dataset, keys: SampleKeys | None = None, read_samples: bool = True) -> np.ndarray | None:
    """Every sample's label, read without loading images where the data set says its labels.

    Knows ``TensorDataset``, ``Subset``/``ConcatDataset`` (recursively), the library's image data
    sets (``.labels``), torchvision's (``.targets``) and Hugging Face data sets (the label column);
    anything else is read sample by sample (its images decoded once), or with ``read_samples=False``
    gives ``None``.

    Example:
        >>> import torch
        >>> from torch.utils.data import Subset, TensorDataset
        >>> ds = TensorDataset(torch.zeros(4, 1), torch.tensor([3, 1, 4, 1]))
        >>> dataset_labels(Subset(ds, [2, 0])).tolist()
        [4, 3]
    """
    keys = keys or SampleKeys()
    if isinstance(data, TensorDataset) and len(data.tensors) >= 2:
        return np.asarray(data.tensors[1]).reshape(-1)
    if isinstance(data, Subset):
        inner = dataset_labels(data.dataset, keys, read_samples)
        return None if inner is None else inner[np.asarray(data.indices, dtype=np.int64)]
    if isinstance(data, ConcatDataset):
        parts = [dataset_labels(d, keys, read_samples) for d in data.datasets]
        return None if any(p is None for p in parts) else np.concatenate(parts)  # type: ignore[arg-type]
    indices = getattr(data, "indices", None)
    for attr in ("labels", "targets"):
        values = getattr(data, attr, None)
        if isinstance(values, (np.ndarray, list, Tensor)) and not callable(values):
            labels = np.asarray(values).reshape(-1)
            if indices is not None and len(indices) == len(data):  # type: ignore[arg-type]
                labels = labels[np.asarray(indices, dtype=np.int64)]  # a view of a larger array (CIFAR)
            if len(labels) == len(data):  # type: ignore[arg-type]
                return labels
    columns = getattr(data, "column_names", None)
    if columns is not None:  # a Hugging Face dataset: read the label column only
        name = keys.label_key or next((k for k in LABEL_KEYS if k in columns), None)
        if name is not None:
            return np.asarray(data.with_format(None)[name])  # type: ignore[attr-defined]
    if not read_samples:
        return None
    return np.asarray([int(_label_of(data[i], keys)) for i in range(len(data))])  # type: ignore[arg-type]


def _label_of(sample: Any, keys: SampleKeys) -> Any:
    """A sample's label alone (a dict sample needs no image key for it)."""
    if isinstance(sample, Mapping):
        key = keys.pick(sample, "label")
        if key is None:
            raise SampleFormatError(f"a dict sample has none of the label keys {list(LABEL_KEYS)} (its keys: "
                                    f"{sorted(map(str, sample))}); name the label's key (label_key=...)")
        return sample[key]
    return split_batch(sample, keys)[1]
