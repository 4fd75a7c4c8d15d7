"""Before round 1: does every client's data fit the model? One clear line for the first mistake found.

Reads one sample of each client's train and test split through the loader the client will use
(a sample that raises on reading is left to the run, which drops and records that client),
checks the labels against ``num_classes`` (every label where the data set tells them cheaply) and
the image shape against the backbone (one forward pass on the first client's sample; every other
client must match its shape). Costs one sample per split and one forward; a run over data that
cannot work fails here, before anything trains or is written, instead of as "0 of N clients
succeeded" a round later.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from hilora_lightning import HiLoRAViT
    >>> from hilora_lightning.data import ClientData
    >>> ds = TensorDataset(torch.zeros(4, 3, 28, 28), torch.zeros(4, dtype=torch.long))
    >>> check_clients(HiLoRAViT(num_classes=10), [ClientData(0, ds, ds, val_fraction=0)])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hilora_lightning.errors.ClientDataCheckError: client 0: its images (shape (3, 28, 28)) do not fit the \
backbone ... resize them in the data set's transform, or set model.backbone_kwargs.img_size to their size
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hilora_lightning.data.clients import ClientData
from hilora_lightning.data.samples import SampleFormatError, dataset_labels
from hilora_lightning.errors import ClientDataCheckError
from hilora_lightning.federation.failures import failure_text, hint_for
from hilora_lightning.federation.local import LoaderSpec

__all__ = ["check_clients"]


@torch.no_grad()
def check_clients(model: Any, clients: Sequence[ClientData], loader: LoaderSpec | None = None) -> None:
    """Raise :class:`~hilora_lightning.errors.ClientDataCheckError` for the first client whose data cannot
    train ``model``: unreadable samples, a label outside ``[0, num_classes)``, an image the backbone refuses."""
    spec = loader or LoaderSpec()
    num_classes = int(model.hparams.get("num_classes", 0)) or None
    shape: tuple[int, ...] | None = None
    for client in clients:
        collate = spec.for_client(client.collate_fn).collate()
        for split in ("train", "test"):
            data = client.split(split)
            try:
                x, y = collate([data[0]])
            except SampleFormatError as exc:
                raise ClientDataCheckError(f"client {client.client_id}: its {split} samples cannot be read as "
                                           f"(image, label): {exc}") from exc
            except Exception:  # noqa: S112 - a read error is this client's (dropped and recorded in the run)
                continue
            labels = dataset_labels(data, spec.keys, read_samples=False)
            seen = y.reshape(-1) if labels is None or len(labels) == 0 else torch.as_tensor(labels)
            if num_classes is not None and len(seen) and (int(seen.min()) < 0 or int(seen.max()) >= num_classes):
                bad = int(seen.max()) if int(seen.max()) >= num_classes else int(seen.min())
                raise ClientDataCheckError(
                    f"client {client.client_id}: its {split} split has label {bad}, outside [0, {num_classes}) "
                    f"of the model's num_classes={num_classes}; set model.num_classes to the number of classes "
                    "(labels must be 0..K-1)")
            if shape is None:
                shape = tuple(x.shape[1:])
                _forward(model, x, client.client_id)
            elif tuple(x.shape[1:]) != shape:
                raise ClientDataCheckError(
                    f"client {client.client_id}: its {split} images have shape {tuple(x.shape[1:])}, client "
                    f"{clients[0].client_id}'s {shape}; every client's images must have the backbone's size (resize "
                    "them in the data set's transform)")


def _forward(model: Any, x: torch.Tensor, client_id: int) -> None:
    was = model.training
    model.eval()
    try:
        model(x.to(next(model.parameters()).device, torch.float32))
    except Exception as exc:
        hint = hint_for(failure_text(exc)) or "check the images' size and channels against the backbone"
        raise ClientDataCheckError(f"client {client_id}: its images (shape {tuple(x.shape[1:])}) do not fit the "
                                   f"backbone ({failure_text(exc)}); {hint}") from exc
    finally:
        model.train(was)
