"""Client-side work on the one shared model: load a client's view, fit it with Lightning, evaluate.

The orchestrator (and the Flower client app) keep one :class:`HiLoRAViT` in memory; a client's turn
loads its tiers and head into it, runs a Lightning ``Trainer.fit`` and reads the trained tier back.

Example:
    >>> from hilora_lightning.federation.local import trainer_for
    >>> trainer_for(local_epochs=1, local_steps=None, extra={}).max_epochs
    1
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from hilora_lightning.data.hook import load_callable
from hilora_lightning.data.samples import SampleKeys, XYCollate
from hilora_lightning.federation.client import client_seed
from hilora_lightning.model import HiLoRAViT
from hilora_lightning.state import export_tier, import_tier
from hilora_lightning.tiers import Tier

__all__ = [
    "LoaderSpec",
    "StepSampler",
    "batch_order",
    "client_loader",
    "client_seed",
    "eval_device",
    "evaluate",
    "fit_client",
    "fit_current",
    "fresh_callbacks",
    "head_state",
    "load_view",
    "quiet_lightning",
    "trainer_for",
    "trainer_precision",
    "wants_logging",
]


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
    """How every client DataLoader is built (training, evaluation, probes): workers, pinning, collation.

    On a GPU with decoded-image data sets (the paper's 224-px configs) use workers and pinned memory,
    or the accelerator starves; the defaults suit small in-memory tensors. Samples may be tuples or
    dicts: ``image_key`` / ``label_key`` name the dict keys (``None``: the usual names, see
    :class:`~hilora_lightning.data.samples.SampleKeys`); ``collate_fn`` (a callable, or
    ``"package.module:function"`` in a config) batches the samples first. Whatever it returns, the
    loader yields ``(images, labels)``. A client's own ``collate_fn`` (``ClientData.collate_fn``, a
    DataModule's) takes precedence.

    Example:
        >>> LoaderSpec(num_workers=2, pin_memory=True).kwargs()["num_workers"]
        2
        >>> LoaderSpec(persistent_workers=True)
        Traceback (most recent call last):
        ...
        ValueError: persistent_workers=True needs num_workers > 0, got num_workers=0
    """

    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    collate_fn: Callable[[list[Any]], Any] | str | None = None
    image_key: str | None = None
    label_key: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {self.num_workers!r}")
        for name in ("pin_memory", "persistent_workers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.persistent_workers and self.num_workers == 0:
            raise ValueError("persistent_workers=True needs num_workers > 0, got num_workers=0")
        for name in ("image_key", "label_key"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string (a dict sample's key) or null, got {getattr(self, name)!r}")
        if isinstance(self.collate_fn, str):
            load_callable(self.collate_fn, "loader.collate_fn")  # fail now, not inside the first client
        elif self.collate_fn is not None and not callable(self.collate_fn):
            raise ValueError(f"collate_fn must be a callable or 'package.module:function', got {self.collate_fn!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | LoaderSpec | None) -> LoaderSpec:
        """A spec from a mapping (the config's ``loader`` section); unknown keys are an error."""
        if isinstance(data, LoaderSpec):
            return data
        data = dict(data or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"unknown loader option(s) {unknown}; valid: {', '.join(valid)}")
        return cls(**data)

    @property
    def keys(self) -> SampleKeys:
        """The dict keys of image and label."""
        return SampleKeys(self.image_key, self.label_key)

    def for_client(self, collate_fn: Callable[[list[Any]], Any] | None) -> LoaderSpec:
        """This spec for a client with its own ``collate_fn`` (a DataModule's), which wins; ``None``: as is."""
        return self if collate_fn is None else dataclasses.replace(self, collate_fn=collate_fn)

    def collate(self) -> XYCollate:
        """The loaders' collate function: ``collate_fn`` (or PyTorch's default), then ``(images, labels)``."""
        fn = self.collate_fn
        return XYCollate(load_callable(fn, "loader.collate_fn") if isinstance(fn, str) else fn, self.keys)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``torch.utils.data.DataLoader``."""
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory,
                "persistent_workers": self.persistent_workers, "collate_fn": self.collate()}


def head_state(model: HiLoRAViT) -> dict[str, Tensor]:
    """A CPU float32 copy of the head's parameters."""
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.head.state_dict().items()}


@torch.no_grad()
def load_view(
    model: HiLoRAViT,
    tiers: Mapping[Tier, Mapping[str, Tensor] | None],
    head: Mapping[str, Tensor] | None,
) -> None:
    """Load the given tier states (validated) and head into the shared model; ``None`` leaves a slot."""
    for tier, state in tiers.items():
        if state is not None:
            import_tier(model, tier, state)
    if head is not None:
        model.head.load_state_dict(dict(head))


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-Trainer info lines (hundreds of client fits would drown the log)."""
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


#: Trainer options that read what a fit logs; without any of them a client fit runs ``barebones``
OBSERVERS = ("logger", "callbacks", "enable_progress_bar", "enable_checkpointing", "enable_model_summary", "profiler")


def wants_logging(extra: Mapping[str, Any]) -> bool:
    """Whether the user's Trainer options include something that reads logged values."""
    return any(k in extra and extra[k] not in (None, False, []) for k in OBSERVERS)


def trainer_for(local_epochs: int, local_steps: int | None, extra: Mapping[str, Any]) -> pl.Trainer:
    """A Trainer for one local update; ``extra`` passes Lightning options through (precision, loggers, ...).

    With no logger, callbacks, progress bar, checkpointing or profiler requested, the Trainer runs in
    Lightning's ``barebones`` mode (no logging machinery): hundreds of short client fits add up.
    """
    kwargs: dict[str, Any] = {"num_sanity_val_steps": 0, "limit_val_batches": 0}
    if wants_logging(extra):
        kwargs.update(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    else:
        kwargs.update(barebones=True)
    kwargs.update(extra)
    if "callbacks" in extra:
        kwargs["callbacks"] = fresh_callbacks(extra["callbacks"])
    if local_steps is not None:
        kwargs.update(max_steps=local_steps, max_epochs=1)
    else:
        kwargs.update(max_epochs=local_epochs)
    return pl.Trainer(**kwargs)


def fresh_callbacks(callbacks: Any) -> list[Any]:
    """Callbacks for one client fit: a factory (zero-argument callable) is called, instances are deep-copied.

    Every client's Trainer gets its own callback objects, so stateful callbacks (``EarlyStopping``,
    ``ModelCheckpoint``) never carry one client's state into another's fit.
    """
    made = callbacks() if callable(callbacks) else callbacks
    if made is None:
        return []
    items = list(made) if isinstance(made, (list, tuple)) else [made]
    return [copy.deepcopy(cb) for cb in items] if not callable(callbacks) else items


class StepSampler(Sampler[int]):
    """``num_samples`` indices drawn as consecutive seeded permutations of ``range(n)``.

    Every sample is seen once per pass over the data, as with ``shuffle=True``, but a local update of
    ``steps`` batches runs as one Lightning epoch of full batches instead of several short epochs.

    Example:
        >>> import torch
        >>> sorted(StepSampler(3, 6, torch.Generator().manual_seed(0)))
        [0, 0, 1, 1, 2, 2]
    """

    def __init__(self, n: int, num_samples: int, generator: torch.Generator) -> None:
        if n <= 0:
            raise ValueError(f"cannot sample from an empty dataset (n={n})")
        self.n, self.num_samples, self.generator = n, num_samples, generator

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        reps = -(-self.num_samples // self.n)
        order = torch.cat([torch.randperm(self.n, generator=self.generator) for _ in range(reps)])
        return iter(order[: self.num_samples].tolist())


def client_loader(train: Dataset, seed: int, batch_size: int, local_steps: int | None, **kwargs: Any) -> DataLoader:
    """The DataLoader of one local update: ``local_steps`` full batches in one pass (no epoch restarts inside
    a local update), else shuffled epochs, both drawn from ``seed``. ``kwargs`` go to the DataLoader."""
    gen = torch.Generator().manual_seed(seed)
    if local_steps is None:
        return DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen, **kwargs)
    sampler = StepSampler(len(train), local_steps * batch_size, gen)  # type: ignore[arg-type]
    return DataLoader(train, batch_size=batch_size, sampler=sampler, **kwargs)


def batch_order(num_samples: int, seed: int, batch_size: int, epochs: int, local_steps: int | None) -> list[list[int]]:
    """The sample indices of every batch :func:`fit_current`'s loader yields, in order (the last batch of an
    epoch may be short). The batched backend draws each client's batches by it.

    Example:
        >>> [len(b) for b in batch_order(5, seed=0, batch_size=2, epochs=2, local_steps=None)]
        [2, 2, 1, 2, 2, 1]
        >>> len(batch_order(5, seed=0, batch_size=2, epochs=9, local_steps=4))  # steps win over epochs
        4
    """
    loader = client_loader(range(num_samples), seed, batch_size, local_steps,  # type: ignore[arg-type]
                           collate_fn=list)
    out: list[list[int]] = []
    for _ in range(epochs if local_steps is None else 1):
        batches = iter(loader)  # Lightning takes len(loader) batches and stops: a shuffled epoch over a multiple
        out += [next(batches) for _ in range(len(loader))]  # of the batch size never draws the sampler's tail
    return out


def fit_client(
    model: HiLoRAViT,
    train: Dataset,
    stage: Tier,
    seed: int,
    batch_size: int,
    local_epochs: int,
    local_steps: int | None,
    trainer_kwargs: Mapping[str, Any],
    loader: LoaderSpec | None = None,
) -> dict[str, Tensor]:
    """Train ``stage``'s tier (and the head) on ``train``; return the trained tier's factors (CPU)."""
    model.set_stage(stage)
    fit_current(model, train, seed, batch_size, local_epochs, local_steps, trainer_kwargs, loader)
    return export_tier(model, stage)


def fit_current(
    model: HiLoRAViT,
    train: Dataset,
    seed: int,
    batch_size: int,
    local_epochs: int,
    local_steps: int | None,
    trainer_kwargs: Mapping[str, Any],
    loader: LoaderSpec | None = None,
) -> None:
    """One local update of whatever the model's switches make trainable (tiers, head, gates)."""
    torch.manual_seed(seed)
    data = client_loader(train, seed, batch_size, local_steps, **(loader or LoaderSpec()).kwargs())
    was_logging = model.train_logging
    model.train_logging = wants_logging(trainer_kwargs)
    with quiet_lightning(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        try:
            trainer_for(local_epochs, local_steps, trainer_kwargs).fit(model, train_dataloaders=data)
        finally:
            model.train_logging = was_logging
    if any(p.device.type != "cpu" for p in model.head.parameters()):
        model.cpu()  # the server side works on the CPU; skip the module walk when already there


def trainer_precision(trainer_kwargs: Mapping[str, Any] | None) -> str:
    """The precision the clients' Trainers run at (Lightning's default ``"32-true"`` when unset)."""
    return str((trainer_kwargs or {}).get("precision", "32-true"))


def eval_device(trainer_kwargs: Mapping[str, Any]) -> torch.device:
    """Where the server evaluates: CUDA when the clients' Trainers run on a GPU, else the CPU."""
    acc = str(trainer_kwargs.get("accelerator", "cpu"))
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model: HiLoRAViT, data: Dataset, tiers: list[Tier], batch_size: int = 256,
             device: torch.device | None = None, loader: LoaderSpec | None = None, metric: str = "accuracy") -> float:
    """Accuracy (or, with ``metric="loss"``, mean loss) of ``model`` with only ``tiers`` active on ``data``.

    The model is moved to ``device`` and *left there*: a backend evaluating many clients moves it
    once per batch of clients, not once per client (``model.cpu()`` when done).
    """
    was_training = model.training
    model.eval()
    dev = device or torch.device("cpu")
    if device is not None:
        model.to(device)
    correct = total = 0
    loss = 0.0
    spec = (loader or LoaderSpec()).kwargs()
    try:
        with model.using_tiers(tiers):
            for x, y in DataLoader(data, batch_size=batch_size, **spec):
                logits = model(x.to(dev, non_blocking=True))
                if metric == "loss":
                    loss += float(model.compute_loss(logits, y.to(dev))) * len(y)
                else:
                    correct += int((logits.argmax(-1).cpu() == y).sum())
                total += len(y)
    finally:
        model.train(was_training)
    return (loss if metric == "loss" else correct) / max(total, 1)
