"""Fashion-MNIST (Zalando, MIT licence; 60k + 10k 28x28 grayscale images, 10 classes) and its federations.

The four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each raw or ``.gz``) are read from the first folder that has them: the
given ``root`` (also ``root/FashionMNIST/raw``, where torchvision puts them), then
``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package:
``apt-get install -y dataset-fashion-mnist``), then, with ``download=True``, torchvision downloads
them into ``root``. Images become ``(N, 3, img_size, img_size)`` tensors normalized like the digits
backbone expects (grayscale repeated to three channels, mean 0.5, std 0.5).

Federations (all images pooled, then partitioned, then split per client into train/test with the
same label mix): ``gl-dir`` (Dirichlet over all classes), ``sc-dir`` (latent groups = class groups:
tops, footwear, the rest; Dirichlet inside a group), ``patho`` (``classes_per_client`` classes each),
``domain`` (latent groups = image domains: upright, rotated 90 degrees, inverted, blurred;
Dirichlet label skew inside each).

Example:
    >>> from hilora_lightning.data.fashion import CLASSES, SUPERCLASS_OF
    >>> [CLASSES[c] for c in range(10) if SUPERCLASS_OF[c] == 1]
    ['Sandal', 'Sneaker', 'Ankle boot']
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from hilora_lightning.data.clients import DEFAULT_VAL_FRACTION, ClientData
from hilora_lightning.data.partition import (
    check_partition,
    dirichlet_partition,
    domain_dirichlet_partition,
    pathological_partition,
    split_train_test,
    superclass_dirichlet_partition,
)

__all__ = ["CLASSES", "DEBIAN_ROOT", "DEFAULT_ALPHA", "DOMAINS", "FASHION_PARTITIONS", "SUPERCLASS_OF",
           "fashion_mnist_federation", "fashion_tensors", "find_fashion_mnist", "load_fashion_mnist", "read_idx"]

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
#: latent class groups of the SC-Dir analogue: 0 tops, 1 footwear, 2 the rest (trouser, dress, bag)
SUPERCLASS_OF = (0, 2, 0, 2, 0, 1, 0, 1, 2, 1)
DOMAINS = ("upright", "rot90", "inverted", "blurred")
FASHION_PARTITIONS = ("gl-dir", "sc-dir", "patho", "domain")
DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
#: Dirichlet concentration per partition when none is given: SC-Dir(3) and domain 0.6 as the paper;
#: GL-Dir 0.5 (the paper's 0.3 leaves some of 36 clients fewer than 600 of the 70k images)
DEFAULT_ALPHA = {"gl-dir": 0.5, "sc-dir": 3.0, "patho": 0.0, "domain": 0.6}
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """One IDX file (raw or gzip) as a uint8 array: images ``(N, rows, cols)`` or labels ``(N,)``."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{str(path)!r} is not an IDX file of unsigned bytes (magic {raw[:4].hex()!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(dims)):
        raise ValueError(f"{str(path)!r} is truncated or corrupt: header says {dims} "
                         f"({int(np.prod(dims))} bytes), the file holds {len(raw) - header}")
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header).reshape(dims)  # writable


def _file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_fashion_mnist(root: str | os.PathLike[str] | None = None) -> Path | None:
    """The first folder holding all four IDX files: ``root`` or ``root/FashionMNIST/raw`` when a root is
    given (nothing else: a given root is never silently replaced), else the Debian package's path."""
    folders = [Path(root), Path(root) / "FashionMNIST" / "raw"] if root is not None else [DEBIAN_ROOT]
    for folder in folders:
        if all(_file(folder, n) for pair in FILES.values() for n in pair):
            return folder
    return None


def load_fashion_mnist(root: str | os.PathLike[str] | None = None, split: str = "train",
                       download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of ``split`` (``"train"``, ``"test"`` or ``"all"``)."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    folder = find_fashion_mnist(root)
    if folder is None and download:
        if root is None:
            raise ValueError("download=True needs a root folder to download Fashion-MNIST into")
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
        folder = find_fashion_mnist(root)
    if folder is None and root is not None:
        what = "does not exist" if not Path(root).exists() else "holds no Fashion-MNIST IDX files"
        raise FileNotFoundError(
            f"Fashion-MNIST not found: data.root {str(root)!r} {what} (looked in it and its FashionMNIST/raw for "
            "train-images-idx3-ubyte[.gz], ...). Fix data.root, add data.download=true to fetch the files into it, "
            f"or leave data.root out to use the Debian package's copy in {str(DEBIAN_ROOT)!r}")
    if folder is None:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: {str(DEBIAN_ROOT)!r} does not hold the four IDX files "
            "(train-images-idx3-ubyte[.gz], ...). Install them with 'apt-get install -y dataset-fashion-mnist' "
            "(Debian/Ubuntu), or pass data.root and data.download=true to fetch them with torchvision")
    parts = ("train", "test") if split == "all" else (split,)
    images, labels = [], []
    for part in parts:
        img_name, lab_name = FILES[part]
        x, y = read_idx(_file(folder, img_name)), read_idx(_file(folder, lab_name))  # type: ignore[arg-type]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"Fashion-MNIST {part} files in {str(folder)!r} disagree: images {x.shape}, "
                             f"labels {y.shape}")
        if y.size and int(y.max()) >= len(CLASSES):
            raise ValueError(f"Fashion-MNIST {part} labels go up to {int(y.max())}, expected 0..9")
        images.append(x)
        labels.append(y.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def fashion_tensors(images: np.ndarray, img_size: int = 32) -> Tensor:
    """uint8 ``(N, H, W)`` -> float ``(N, 3, img_size, img_size)``, normalized to [-1, 1]."""
    x = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32).unsqueeze(1) / 255.0
    if x.shape[-1] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).repeat(1, 3, 1, 1).contiguous()


def _apply_domain(x: Tensor, domain: int) -> Tensor:
    if domain == 1:
        return torch.rot90(x, 1, dims=(-2, -1))
    if domain == 2:
        return -x  # inverted intensities (x is in [-1, 1])
    if domain == 3:
        kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
        k2 = (kernel[:, None] * kernel[None, :]) / 256.0
        weight = k2.expand(x.shape[1], 1, 5, 5).contiguous()
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), weight, groups=x.shape[1])
    return x


def _partition(labels: np.ndarray, partition: str, num_clients: int, alpha: float, classes_per_client: int,
               domain_of: np.ndarray, seed: int) -> tuple[list[np.ndarray], list[int | None]]:
    if partition == "gl-dir":
        return dirichlet_partition(labels, num_clients, alpha, seed=seed), [None] * num_clients
    if partition == "patho":
        return pathological_partition(labels, num_clients, classes_per_client, seed=seed), [None] * num_clients
    if partition == "sc-dir":
        parts, g = superclass_dirichlet_partition(labels, np.asarray(SUPERCLASS_OF), num_clients, alpha,
                                                  superclasses_per_group=1, seed=seed)
    else:
        parts, g = domain_dirichlet_partition(labels, domain_of, num_clients // len(DOMAINS), alpha, seed=seed)
    return parts, [int(v) for v in g]


def fashion_mnist_federation(
    root: str | os.PathLike[str] | None = None,
    num_clients: int = 36,
    partition: str = "sc-dir",
    alpha: float | None = None,
    classes_per_client: int = 3,
    per_client: int = 620,
    test_fraction: float = 0.25,
    img_size: int = 32,
    download: bool = False,
    seed: int = 0,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> list[ClientData]:
    """Fashion-MNIST clients (see the module docstring for the partitions).

    The 70k images are partitioned over the clients (label skew by ``partition``), then every client
    keeps a seeded random ``per_client`` of its share (its label mix, equal sizes): with the defaults
    about 465 training and at least 150 test images each. A draw that leaves a client fewer than ``per_client``
    images is redrawn (up to 50 times) before giving up with a clear error. ``domain`` splits the
    clients evenly over :data:`DOMAINS` (``num_clients`` must be a multiple of 4).
    """
    if partition not in FASHION_PARTITIONS:
        raise ValueError(f"partition must be one of {FASHION_PARTITIONS}, got {partition!r}")
    alpha = DEFAULT_ALPHA[partition] if alpha is None else alpha
    if isinstance(per_client, bool) or not isinstance(per_client, int) or per_client < 2:
        raise ValueError(f"per_client must be an int >= 2, got {per_client!r}")
    if partition == "domain" and num_clients % len(DOMAINS):
        raise ValueError(f"partition 'domain' needs num_clients divisible by {len(DOMAINS)}, got {num_clients}")
    images, labels = load_fashion_mnist(root, "all", download)
    rng = np.random.default_rng([seed, 11])
    domain_of = rng.integers(0, len(DOMAINS), size=len(labels))
    for attempt in range(50):
        parts, groups = _partition(labels, partition, num_clients, alpha, classes_per_client, domain_of,
                                   seed + 1000 * attempt)
        if min(len(p) for p in parts) >= per_client:
            break
    else:
        raise ValueError(f"no {partition} partition with alpha={alpha} gave all {num_clients} clients "
                         f"{per_client} images in 50 draws; lower per_client or raise alpha")
    check_partition(parts, len(labels))
    parts = [np.sort(rng.choice(p, size=per_client, replace=False)) for p in parts]
    used = np.unique(np.concatenate(parts))
    x = fashion_tensors(images[used], img_size)
    if partition == "domain":
        for d in range(len(DOMAINS)):
            idx = torch.as_tensor(np.flatnonzero(domain_of[used] == d))
            x[idx] = _apply_domain(x[idx], d)
    position = np.full(len(labels), -1, dtype=np.int64)
    position[used] = np.arange(len(used))
    y = torch.as_tensor(labels)
    clients = []
    for i, (tr, te) in enumerate(split_train_test(parts, labels, test_fraction, seed=seed)):
        clients.append(ClientData(i, TensorDataset(x[position[tr]], y[tr]), TensorDataset(x[position[te]], y[te]),
                                  groups[i], val_fraction=val_fraction))
    return clients
