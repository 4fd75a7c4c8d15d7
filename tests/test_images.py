from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hilora_lightning.data.federations import cifar100_federation, domainnet_federation
from hilora_lightning.data.images import load_cifar100, load_domainnet_index, load_image_folder_index


def write_fake_cifar100(root: Path, n: int = 400) -> None:
    """The real on-disk format: cifar-100-python/{train,test,meta} pickles of flat uint8 rows."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, size in (("train", n), ("test", n // 4)):
        fine = np.arange(size) % 100
        entry = {"data": rng.integers(0, 256, (size, 3072), dtype=np.uint8), "fine_labels": fine.tolist(),
                 "coarse_labels": (fine // 5).tolist(), "filenames": [f"{i}.png" for i in range(size)]}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [str(i) for i in range(100)]}))


def write_fake_domainnet(root: Path, per_class: int = 6) -> None:
    classes = ["bird", "zebra", "teapot", "cat"]  # "cat" is outside the 10-class subset
    for domain in ("clipart", "sketch"):
        lines = []
        for label, cls in enumerate(classes):
            (root / domain / cls).mkdir(parents=True)
            for k in range(per_class):
                rel = f"{domain}/{cls}/{domain}_{k}.png"
                Image.fromarray(np.full((20, 24, 3), 40 * label, dtype=np.uint8)).save(root / rel)
                lines.append(f"{rel} {label}")
        (root / f"{domain}_train.txt").write_text("\n".join(lines) + "\n")


def test_cifar100_reads_the_python_format(tmp_path: Path) -> None:
    write_fake_cifar100(tmp_path)
    images, fine, coarse = load_cifar100(tmp_path, train=True, verify=False)
    assert images.shape == (400, 32, 32, 3) and images.dtype == np.uint8
    assert fine[:3].tolist() == [0, 1, 2] and coarse[:6].tolist() == [0, 0, 0, 0, 0, 1]
    with pytest.raises(ValueError, match=r"does not match the official CIFAR-100 MD5; refusing to unpickle"):
        load_cifar100(tmp_path, train=True)


def test_cifar100_missing_files_say_where_to_put_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"CIFAR-100 not found: expected .*cifar-100-python/train.*extract it"):
        load_cifar100(tmp_path)


@pytest.mark.parametrize("partition", ["gl-dir", "sc-dir", "patho"])
def test_cifar100_federation(tmp_path: Path, partition: str) -> None:
    write_fake_cifar100(tmp_path)
    clients = cifar100_federation(tmp_path, num_clients=10, partition=partition, alpha=1.0, classes_per_client=20,
                                  img_size=32, verify=False)
    assert len(clients) == 10 and sum(c.num_samples + len(c.val) + len(c.test) for c in clients) == 400
    x, y = clients[0].train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 100
    if partition == "sc-dir":
        assert all(c.group is not None for c in clients)


def test_domainnet_index_and_federation(tmp_path: Path) -> None:
    write_fake_domainnet(tmp_path)
    paths, labels, doms = load_domainnet_index(tmp_path, domains=("clipart", "sketch"))
    assert len(paths) == 36 and sorted(set(labels.tolist())) == [0, 4, 9]  # bird, teapot, zebra of the ten
    assert sorted(set(doms.tolist())) == [0, 1]
    clients = domainnet_federation(tmp_path, clients_per_domain=2, domains=("clipart", "sketch"), img_size=16)
    assert [c.group for c in clients] == [0, 0, 1, 1]
    x, y = clients[0].train[0]
    assert x.shape == (3, 16, 16)
    with pytest.raises(FileNotFoundError, match=r"DomainNet split file .*painting_train.txt' not found"):
        load_domainnet_index(tmp_path, domains=("painting",))


def test_image_folder_federation(tmp_path: Path) -> None:
    from hilora_lightning.data.federations import image_folder_federation

    write_fake_domainnet(tmp_path)
    clients = image_folder_federation(tmp_path / "sketch", num_clients=3, alpha=5.0, img_size=8)
    assert len(clients) == 3 and sum(c.num_samples + len(c.val) + len(c.test) for c in clients) == 24
    assert clients[0].test[0][0].shape == (3, 8, 8)


def test_image_folder_index(tmp_path: Path) -> None:
    write_fake_domainnet(tmp_path)
    paths, labels, classes = load_image_folder_index(tmp_path / "clipart")
    assert classes == ["bird", "cat", "teapot", "zebra"] and len(paths) == 24
    with pytest.raises(FileNotFoundError, match=r"image folder .* does not exist"):
        load_image_folder_index(tmp_path / "nope")
