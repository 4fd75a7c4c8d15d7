"""``HiLoRAViT``: a LightningModule with a frozen timm ViT, tiered LoRA adapters and a head.

The *stage* (a :class:`~hilora_lightning.tiers.Tier`) decides what trains: the stage's tier (and the
head, unless ``train_head=False``) gets gradients, the tiers above it stay active and frozen, the
tiers below are inactive. The loss is cross-entropy plus the stage's cross-tier orthogonality terms.

Override points for subclasses:

* :meth:`build_backbone` - create a different frozen network (any ``nn.Module`` with Linear layers
  matching the targets and a ``get_classifier()`` or ``head``).
* :meth:`compute_loss` - replace the task loss (the orthogonality term is added by the step).
* :meth:`orthogonality_loss` - replace the regularizer.
* ``training_step`` / ``validation_step`` as in any LightningModule.

Example:
    >>> import lightning.pytorch as pl
    >>> from hilora_lightning import HiLoRAViT
    >>> from hilora_lightning.data import DigitsDataModule
    >>> model = HiLoRAViT(backbone="hilora-digits-vit", num_classes=10, stage="root")
    >>> trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1,
    ...                      logger=False, enable_progress_bar=False, enable_checkpointing=False)
    >>> trainer.fit(model, DigitsDataModule(quarter_turns=1))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from hilora_lightning.adapter_checkpoint import AdapterCheckpointMixin
from hilora_lightning.backbone import create_backbone
from hilora_lightning.config import AdapterConfig
from hilora_lightning.data.samples import SampleKeys, split_batch
from hilora_lightning.gates import TierGate
from hilora_lightning.inject import inject_tiers
from hilora_lightning.layer import TieredLoRALinear
from hilora_lightning.orthogonality import (
    ORTHO_FORMS,
    ORTHO_SIDES,
    FrozenGroups,
    effective_frozen,
    frozen_groups,
    grouped_penalty,
)
from hilora_lightning.tiers import Tier, parse_tiers

__all__ = ["HiLoRAViT"]


class HiLoRAViT(AdapterCheckpointMixin, pl.LightningModule):  # type: ignore[misc]
    """A frozen timm ViT with root / cluster / leaf LoRA tiers, trained one stage at a time.

    Args:
        backbone: a timm model name or ``"hilora-digits-vit"`` (the embedded pretrained backbone).
        num_classes: number of classes of the head.
        adapter: an :class:`AdapterConfig` or its dict form (ranks, alphas, targets).
        stage: the tier that trains first (``"root"``, ``"cluster"``, ``"leaf"``).
        pretrained: load timm's pretrained weights (needs network or a cache).
        pretrained_file: local weight file for the backbone (timm ``pretrained_cfg_overlay``).
        backbone_kwargs: extra ``timm.create_model`` arguments (``img_size``, ...).
        lr: AdamW learning rate of the trainable parameters.
        weight_decay: AdamW weight decay.
        gamma_c: weight of the penalty against the frozen root tier.
        gamma_l: weight of the penalty against the frozen cluster tier (leaf stage).
        ortho_side: ``"B"`` (column spaces, the paper) or ``"A"`` (row spaces, for ablations).
        ortho_form: the frozen side of the penalty (:data:`~hilora_lightning.orthogonality.ORTHO_FORMS`):
            ``"raw"`` factors (the printed formula), ``"scaled"`` by ``alpha / r`` (PAPER.md C7), or
            ``"energy"`` (frozen directions weighted by their singular value, none without one).
        train_head: whether the classification head trains with the stage's tier.
        seed: seed of the tiers' initial ``A`` factors (equal seeds give equal shared tiers).
    """

    def __init__(
        self,
        backbone: str = "hilora-digits-vit",
        num_classes: int = 10,
        adapter: AdapterConfig | Mapping[str, Any] | None = None,
        stage: Tier | str = Tier.ROOT,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        backbone_kwargs: Mapping[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        gamma_c: float = 0.1,
        gamma_l: float = 0.1,
        ortho_side: str = "B",
        ortho_form: str = "raw",
        train_head: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        cfg = adapter if isinstance(adapter, AdapterConfig) else AdapterConfig.from_dict(adapter or {})
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if gamma_c < 0 or gamma_l < 0:
            raise ValueError(f"gamma_c and gamma_l must be >= 0, got {gamma_c!r} and {gamma_l!r}")
        if ortho_side not in ORTHO_SIDES:
            raise ValueError(f"ortho_side must be one of {ORTHO_SIDES}, got {ortho_side!r}")
        if ortho_form not in ORTHO_FORMS:
            raise ValueError(f"ortho_form must be one of {ORTHO_FORMS}, got {ortho_form!r}")
        # hparams hold plain types only, so a checkpoint can rebuild the module (load_from_checkpoint)
        self.save_hyperparameters(ignore=["adapter", "stage"])
        self.hparams["adapter"] = cfg.to_dict()
        self.hparams["stage"] = Tier.parse(stage).value
        self.adapter_config = cfg
        self.strict_loading = False  # adapter-only checkpoints: the frozen backbone is rebuilt, not stored
        self._fingerprint: str | None = None
        #: log training losses and accuracy (``self.log`` costs ~1 ms a call); the federation turns
        #: it off for client fits that have no logger, progress bar or callbacks to read them
        self.train_logging = True
        self._ortho_cache: tuple[Any, FrozenGroups] | None = None
        self.model = self.build_backbone()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tiered_layers: dict[str, TieredLoRALinear] = inject_tiers(self.model, cfg, seed=seed)
        # validate_args=False: the per-step input checks cost more than the update on small batches
        acc = {"num_classes": num_classes, "average": "micro", "validate_args": False}
        self.train_acc = MulticlassAccuracy(**acc)  # type: ignore[arg-type]
        self.val_acc = MulticlassAccuracy(**acc)  # type: ignore[arg-type]
        self.test_acc = MulticlassAccuracy(**acc)  # type: ignore[arg-type]
        self.stage: Tier = Tier.ROOT
        #: ``(frozen tier, gamma)`` pairs of the penalty, set by :meth:`set_tiers`; ``None``: the stage's own
        self.penalty: tuple[tuple[Tier, float], ...] | None = None
        self.set_stage(stage)

    # ---------------------------------------------------------------- construction
    def build_backbone(self) -> nn.Module:
        """Create the backbone from the hyper-parameters; override to use another network.

        Randomly initialized parts (a new head, or a whole backbone without pretrained weights)
        are drawn from ``seed`` under a forked RNG, so the same hyper-parameters always rebuild the
        same frozen network: adapter-only checkpoints rely on it.
        """
        hp = self.hparams
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(hp["seed"]))
            return create_backbone(
                hp["backbone"],
                num_classes=hp["num_classes"],
                pretrained=hp["pretrained"],
                pretrained_file=hp["pretrained_file"],
                **dict(hp["backbone_kwargs"] or {}),
            )

    def backbone_fingerprint(self) -> str:
        """SHA-256 of the frozen (non-adapter, non-head) weights; stored in checkpoints and checked on load."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for key, value in self.state_dict().items():
                if not self._is_adapter_key(key):
                    digest.update(key.encode())
                    digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    @property
    def head(self) -> nn.Module:
        """The classification head (timm's ``get_classifier()``)."""
        get = getattr(self.model, "get_classifier", None)
        head = get() if callable(get) else getattr(self.model, "head", None)
        if not isinstance(head, nn.Module):
            raise RuntimeError(
                f"{type(self.model).__name__} exposes no classification head: expected get_classifier() "
                "or a .head module; override HiLoRAViT.head in your subclass"
            )
        return head

    # ---------------------------------------------------------------- stage switches
    def set_stage(self, stage: Tier | str) -> None:
        """Train ``stage``'s tier (and the head); keep the tiers above active and frozen."""
        stage = Tier.parse(stage)
        self.stage = stage
        self.hparams["stage"] = stage.value
        self.penalty = None
        for layer in self.tiered_layers.values():
            layer.set_active([*stage.frozen_above(), stage])
            layer.set_trainable([stage])
        for p in self.head.parameters():
            p.requires_grad_(bool(self.hparams["train_head"]))

    def set_tiers(
        self, active: Iterable[Tier | str], trainable: Iterable[Tier | str], head: bool = True, gates: bool = False,
        penalty: Iterable[tuple[Tier, float]] | None = None,
    ) -> None:
        """Free-form switches (local plans, dual-adapter baselines): which tiers contribute, which train,
        head, gates, and the orthogonality penalty.

        :meth:`set_stage` is the cascade's special case. The stage is set to the deepest trainable tier.
        ``penalty``: ``(frozen tier, gamma)`` pairs the trained tier is kept orthogonal to; ``None``: the
        stage's frozen tiers above it with ``gamma_c`` / ``gamma_l``, as :meth:`set_stage` does.
        """
        active_t, train_t = parse_tiers(list(active)), parse_tiers(list(trainable))
        missing = [t.value for t in train_t if t not in active_t]
        if missing:
            raise ValueError(f"trainable tiers {missing} must also be active, got active={[t.value for t in active_t]}")
        if train_t:
            self.stage = train_t[-1]
            self.hparams["stage"] = self.stage.value
        self.penalty = None if penalty is None else tuple((Tier.parse(t), float(g)) for t, g in penalty)
        for layer in self.tiered_layers.values():
            layer.set_active(active_t)
            layer.set_trainable(train_t)
            if layer.tier_gate is not None:
                layer.tier_gate.requires_grad_(gates)
        for p in self.head.parameters():
            p.requires_grad_(head)

    def set_gates(self, tiers: Iterable[Tier | str] | None, mode: str = "input",
                  init: Iterable[float] | None = None) -> None:
        """Put a fresh :class:`~hilora_lightning.gates.TierGate` over ``tiers`` on every tiered layer
        (``None`` removes them). Gates start frozen; :meth:`set_tiers` with ``gates=True`` trains them."""
        for layer in self.tiered_layers.values():
            gate = None
            if tiers is not None:
                gate = TierGate(layer.base_layer.in_features, list(tiers), mode,
                                None if init is None else list(init)).to(layer.base_layer.weight.device)
                gate.requires_grad_(False)
            layer.set_gate(gate)

    def gate_state(self) -> dict[str, Tensor]:
        """A CPU float32 copy of every gate's parameters, keyed by layer path (empty without gates)."""
        out: dict[str, Tensor] = {}
        for path, layer in self.state_layers().items():
            if layer.tier_gate is not None:
                for k, v in layer.tier_gate.state_dict().items():
                    out[f"{path}.tier_gate.{k}"] = v.detach().to("cpu", torch.float32).clone()
        return out

    @torch.no_grad()
    def load_gate_state(self, state: Mapping[str, Tensor]) -> None:
        """Load :meth:`gate_state` output into the gates (same gates, same keys, or an error)."""
        expected = self.gate_state()
        if set(state) != set(expected) or any(tuple(state[k].shape) != tuple(v.shape) for k, v in expected.items()):
            raise ValueError(f"gate state has keys {sorted(state)[:4]}..., expected {sorted(expected)[:4]}... "
                             "(the same gates, as set_gates made them)")
        for path, layer in self.state_layers().items():
            if layer.tier_gate is not None:
                prefix = f"{path}.tier_gate."
                layer.tier_gate.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def set_active_tiers(self, tiers: Iterable[Tier | str]) -> None:
        """Choose which tiers contribute to the output (e.g. root only for a tier-wise table)."""
        tiers = parse_tiers(list(tiers))
        for layer in self.tiered_layers.values():
            layer.set_active(tiers)

    @contextlib.contextmanager
    def using_tiers(self, tiers: Iterable[Tier | str]) -> Iterator[None]:
        """Temporarily evaluate with only ``tiers`` active."""
        before = {name: layer.active for name, layer in self.tiered_layers.items()}
        self.set_active_tiers(tiers)
        try:
            yield
        finally:
            for name, layer in self.tiered_layers.items():
                layer.set_active(before[name])

    def reset_tier(self, tier: Tier | str, seed: int) -> None:
        """Re-initialize ``tier`` as a no-op (``B = 0``, ``A`` from ``seed``) on every layer."""
        for layer in self.tiered_layers.values():
            layer.reset_tier(tier, seed)

    # ---------------------------------------------------------------- loss
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)  # type: ignore[no-any-return]

    def compute_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """The task loss; cross-entropy by default."""
        return F.cross_entropy(logits, target)

    def orthogonality_loss(self) -> Tensor:
        """The stage's cross-tier penalty (zero in the root stage), summed over adapted layers.

        The frozen tiers' side is cached for as long as their parameters stay unchanged.
        """
        hp = self.hparams
        side, form = hp["ortho_side"], hp.get("ortho_form", "raw")
        key = "lora_B" if side == "B" else "lora_A"
        layers = list(self.tiered_layers.values())
        if self.penalty is None:
            above = self.stage.frozen_above()
            gammas = {Tier.ROOT: float(hp["gamma_c"]), Tier.CLUSTER: float(hp["gamma_l"])}
        else:  # a plan's own (frozen tier, gamma) pairs
            above, gammas = tuple(t for t, _ in self.penalty), dict(self.penalty)
        if not above or not layers:
            return torch.zeros((), device=self.device)
        trainable = [getattr(layer, key)[self.stage.value] for layer in layers]
        if not any(gammas[t] for t in above):  # ablations and baselines without the penalty
            return torch.zeros((), device=self.device)
        frozen_params = [p for t in above for layer in layers for p in (layer.lora_A[t.value], layer.lora_B[t.value])]
        cache_key = (
            self.stage, side, form, tuple(gammas[t] for t in above),
            tuple((id(p), p._version, p.device) for p in frozen_params),
        )
        if self._ortho_cache is None or self._ortho_cache[0] != cache_key:
            pairs = [(gammas[t], [effective_frozen(layer.lora_B[t.value], layer.lora_A[t.value], layer.scaling[t],
                                                   layer.scaling[self.stage], form, side) for layer in layers])
                     for t in above]
            self._ortho_cache = (cache_key, frozen_groups(trainable, pairs, side))
        return grouped_penalty(trainable, self._ortho_cache[1], side)

    #: the dict keys of image and label in a batch of dict samples (``None``: the usual names)
    sample_keys = SampleKeys()

    def _shared_step(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        x, y = split_batch(batch, self.sample_keys)
        logits = self(x)
        return self.compute_loss(logits, y), logits, y

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Logits of a batch with the active tiers: a tensor, ``(x,)``, ``(x, y)`` or a dict batch.

        ``trainer.predict(model, loader)`` returns one logits tensor per batch (``softmax(-1)`` of it
        gives probabilities); labels, if the batch has them, are ignored.

        Example:
            >>> import torch
            >>> model = HiLoRAViT(num_classes=3)
            >>> model.predict_step({"pixel_values": torch.zeros(2, 3, 32, 32)}, 0).shape
            torch.Size([2, 3])
        """
        x, _ = split_batch(batch, self.sample_keys, need_label=False)
        return self(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        task, logits, y = self._shared_step(batch)
        ortho = self.orthogonality_loss()
        loss = task + ortho
        if not self.train_logging:
            return loss
        self.train_acc(logits.detach(), y)
        bs = y.shape[0]
        self.log("train/loss", loss, batch_size=bs, prog_bar=True)
        if self.stage is not Tier.ROOT:  # the root stage has no penalty: task loss == loss
            self.log_dict({"train/task_loss": task, "train/ortho": ortho}, batch_size=bs)
        self.log("train/acc", self.train_acc, batch_size=bs, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        task, logits, y = self._shared_step(batch)
        self.val_acc(logits, y)
        self.log("val/loss", task, batch_size=y.shape[0], prog_bar=True)
        self.log("val/acc", self.val_acc, batch_size=y.shape[0], prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        task, logits, y = self._shared_step(batch)
        self.test_acc(logits, y)
        self.log("test/loss", task, batch_size=y.shape[0])
        self.log("test/acc", self.test_acc, batch_size=y.shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(
                f"nothing to train in stage {self.stage.value!r}: the tier is frozen and train_head=False"
            )
        return torch.optim.AdamW(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])

    def state_layers(self) -> dict[str, TieredLoRALinear]:
        """The tiered layers keyed by their path *in the backbone* (``blocks.0.attn.qkv``).

        Tier states exported from a :class:`HiLoRAViT` therefore carry the same keys as those exported
        from a bare injected timm model (``blocks.0.attn.qkv.q.lora_A``), and load into it and back.
        """
        return self.tiered_layers
