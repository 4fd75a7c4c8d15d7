"""Real image data from local disk: CIFAR-100 (python format), DomainNet (official layout), ImageFolder.

Nothing here downloads at import or in tests. CIFAR-100 honours ``download=`` through torchvision
(which checks the archive's MD5); when the files are missing the error says where to put them.

Example:
    >>> from hilora_lightning.data.images import DOMAINNET_DOMAINS
    >>> DOMAINNET_DOMAINS[:3]
    ('clipart', 'infograph', 'painting')
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "CIFAR100_FILES",
    "IMAGE_EXTENSIONS",
    "DOMAINNET_DOMAINS",
    "DOMAINNET_TEN_CLASSES",
    "ArrayImageDataset",
    "PathImageDataset",
    "default_transform",
    "load_cifar100",
    "load_domainnet_index",
    "load_image_folder_index",
]

CIFAR100_FILES = {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
                  "meta": "7973b15100ade9c7d40fb424638fde48"}
#: file suffixes read as images by the folder loaders (what torchvision's ImageFolder accepts)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"})
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
#: The 10-class DomainNet subset used by FedBN and the federated DomainNet literature (our reading of
#: the paper's "top 10 classes", PAPER.md C18).
DOMAINNET_TEN_CLASSES = ("bird", "feather", "headphones", "ice_cream", "teapot", "tiger", "whale", "windmill",
                         "wine_glass", "zebra")


def default_transform(img_size: int = 224, mean: Sequence[float] = (0.5, 0.5, 0.5),
                      std: Sequence[float] = (0.5, 0.5, 0.5)) -> Callable[[Any], Tensor]:
    """PIL/uint8 image -> resized, normalized float tensor (timm ViT in21k statistics by default)."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize((img_size, img_size)), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


class ArrayImageDataset(Dataset):
    """Images held as a uint8 ``(N, H, W, 3)`` array (CIFAR), optionally a subset of indices."""

    def __init__(self, images: np.ndarray, labels: Sequence[int] | np.ndarray,
                 transform: Callable[[Any], Tensor] | None = None,
                 indices: Sequence[int] | np.ndarray | None = None) -> None:
        self.images, self.labels = images, np.asarray(labels)
        self.indices = np.arange(len(self.labels)) if indices is None else np.asarray(indices)
        self.transform = transform or default_transform(32)

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, rows: Sequence[int] | np.ndarray) -> ArrayImageDataset:
        """The same images at positions ``rows`` of this data set (shares the array)."""
        rows = self.indices[np.asarray(rows, dtype=np.int64)]
        return ArrayImageDataset(self.images, self.labels, self.transform, rows)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        j = int(self.indices[i])
        return self.transform(Image.fromarray(self.images[j])), int(self.labels[j])


class PathImageDataset(Dataset):
    """Images read from files on demand (DomainNet, ImageFolder)."""

    def __init__(self, paths: Sequence[str | Path], labels: Sequence[int] | np.ndarray,
                 transform: Callable[[Any], Tensor] | None = None) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"got {len(paths)} paths but {len(labels)} labels")
        self.paths, self.labels = list(paths), np.asarray(labels)
        self.transform = transform or default_transform(224)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, rows: Sequence[int] | np.ndarray) -> PathImageDataset:
        """The images at positions ``rows`` of this data set."""
        return PathImageDataset([self.paths[int(i)] for i in rows], self.labels[np.asarray(rows, dtype=np.int64)],
                                self.transform)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), int(self.labels[i])


def load_cifar100(root: str | os.PathLike[str], train: bool = True, download: bool = False,
                  verify: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-100 as ``(images uint8 (N, 32, 32, 3), fine labels, coarse labels)``.

    Args:
        root: folder that holds (or will hold) ``cifar-100-python/``.
        train: the training or the official test split.
        download: fetch the archive with torchvision if it is missing (needs the network).
        verify: check the files' MD5 against the official release before unpickling them (the
            format is Python pickle, so only trusted, verified files are read).
    """
    folder = Path(root) / "cifar-100-python"
    if download:
        from torchvision.datasets import CIFAR100

        CIFAR100(str(root), train=train, download=True)
    name = "train" if train else "test"
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-100 not found: expected {str(path)!r} (files train, test, meta in {str(folder)!r}). Offline? "
            "Download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
            f"into {str(Path(root))!r}, or pass download=True on a machine with network access"
        )
    if verify:
        from torchvision.datasets.utils import check_integrity

        if not check_integrity(str(path), CIFAR100_FILES[name]):
            raise ValueError(f"{str(path)!r} does not match the official CIFAR-100 MD5; refusing to unpickle it "
                             "(re-download it, or pass verify=False for a file you trust)")
    with path.open("rb") as fh:
        entry = pickle.load(fh, encoding="latin1")  # noqa: S301 - the official format; MD5-verified above
    images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(entry["fine_labels"]), np.asarray(entry["coarse_labels"])


def load_domainnet_index(
    root: str | os.PathLike[str],
    split: str = "train",
    domains: Sequence[str] = DOMAINNET_DOMAINS,
    classes: Sequence[str] | None = DOMAINNET_TEN_CLASSES,
) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Paths, labels and domain ids of DomainNet from its official layout and split files.

    Expects ``root/<domain>_<split>.txt`` with lines ``<domain>/<class>/<file> <label>`` and the images
    under ``root/<domain>/<class>/``. ``classes`` keeps a subset (relabelled 0..len-1 in that order).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    keep = {c: i for i, c in enumerate(classes)} if classes is not None else None
    paths: list[Path] = []
    labels: list[int] = []
    doms: list[int] = []
    for d, domain in enumerate(domains):
        listing = root / f"{domain}_{split}.txt"
        if not listing.is_file():
            raise FileNotFoundError(
                f"DomainNet split file {str(listing)!r} not found: put the official '<domain>_{split}.txt' files and "
                f"the '<domain>/' image folders under {str(root)!r}"
            )
        for line in listing.read_text().splitlines():
            if not line.strip():
                continue
            rel, label = line.rsplit(maxsplit=1)
            cls = rel.split("/")[1]
            if keep is not None and cls not in keep:
                continue
            paths.append(root / rel)
            labels.append(keep[cls] if keep is not None else int(label))
            doms.append(d)
    if not paths:
        raise ValueError(f"no DomainNet images of classes {list(classes or [])[:5]}... found under {str(root)!r}")
    return paths, np.asarray(labels), np.asarray(doms)


def load_image_folder_index(root: str | os.PathLike[str]) -> tuple[list[Path], np.ndarray, list[str]]:
    """Paths and labels of an ImageFolder tree (``root/<class>/<image>``), classes sorted by name."""
    from torchvision.datasets import ImageFolder

    if not Path(root).is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    folder = ImageFolder(str(root))
    return [Path(p) for p, _ in folder.samples], np.asarray(folder.targets), list(folder.classes)
