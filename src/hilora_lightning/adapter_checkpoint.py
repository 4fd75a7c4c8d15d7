"""Checks of a :class:`~hilora_lightning.model.HiLoRAViT` Lightning checkpoint before anything is built from it.

Example:
    >>> from hilora_lightning.adapter_checkpoint import check_adapter_checkpoint
    >>> try:
    ...     check_adapter_checkpoint({"state_dict": {"model.head.weight": 0}}, "a.ckpt")
    ... except ValueError as exc:
    ...     print(str(exc)[:40])
    'a.ckpt' holds no adapter factors (no '.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hilora_lightning.errors import AdapterStateError

__all__ = ["AdapterCheckpointMixin", "check_adapter_checkpoint"]


def check_adapter_checkpoint(checkpoint: Any, name: str, allow_legacy: bool = False) -> None:
    """Refuse a model checkpoint without adapter factors, with non-finite ones, or without a backbone fingerprint."""
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise AdapterStateError(f"{name!r} is not a Lightning checkpoint (no state_dict)")
    state = checkpoint["state_dict"]
    factors = {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
    if not factors:
        raise AdapterStateError(f"{name!r} holds no adapter factors (no '.lora_A.'/'.lora_B.' keys among "
                                f"{len(state)}): it was not saved from a HiLoRAViT; loading it would give fresh "
                                "adapters")
    bad = sorted(k for k, v in factors.items() if isinstance(v, Tensor) and not bool(torch.isfinite(v).all()))
    if bad:
        more = " ..." if len(bad) > 3 else ""
        raise AdapterStateError(f"{name!r} holds NaN or Inf adapter values in {bad[:3]}{more}")
    if "hilora_backbone_sha256" not in checkpoint and not allow_legacy:
        raise AdapterStateError(f"{name!r} has no backbone fingerprint, so nothing proves its adapters fit the rebuilt "
                                "backbone; pass allow_legacy=True to load a file from before fingerprints existed")


if TYPE_CHECKING:
    from torch import nn

    _Base = nn.Module
else:
    _Base = object


class AdapterCheckpointMixin(_Base):
    """The checkpoint side of :class:`~hilora_lightning.model.HiLoRAViT`: adapter-only Lightning checkpoints.

    Saves only the tiers' factors, gates and the head (the frozen backbone is rebuilt from the
    hyper-parameters), with the stage and the backbone's weight fingerprint; loads them back after
    :func:`check_adapter_checkpoint`.
    """

    if TYPE_CHECKING:  # what the model provides
        head: Any
        stage: Any

        def backbone_fingerprint(self) -> str: ...

        def set_stage(self, stage: Any) -> None: ...

    def _is_adapter_key(self, key: str) -> bool:
        return (".lora_A." in key or ".lora_B." in key or ".tier_gate." in key
                or key.startswith(self._head_prefix()))

    def _head_prefix(self) -> str:
        head = self.head
        for name, module in self.named_modules():
            if module is head:
                return name + "."
        return "model.head."

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only adapter factors and the head: the frozen backbone is rebuilt from hparams."""
        state = checkpoint.get("state_dict", {})
        checkpoint["state_dict"] = {k: v for k, v in state.items() if self._is_adapter_key(k)}
        checkpoint["hilora_stage"] = self.stage.value
        checkpoint["hilora_backbone_sha256"] = self.backbone_fingerprint()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the stage; refuse adapters trained on a different frozen backbone."""
        expected = checkpoint.get("hilora_backbone_sha256")
        if expected is not None and expected != self.backbone_fingerprint():
            raise RuntimeError(
                "this checkpoint's adapters were trained on a different frozen backbone (weight fingerprint "
                f"{expected[:12]}..., rebuilt backbone {self.backbone_fingerprint()[:12]}...); rebuild it with "
                "the same backbone, pretrained/pretrained_file, backbone_kwargs and seed"
            )
        if "hilora_stage" in checkpoint:
            self.set_stage(checkpoint["hilora_stage"])

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike[str],
        map_location: Any = None,
        hparams_file: str | os.PathLike[str] | None = None,
        strict: bool | None = None,
        weights_only: bool | None = True,
        allow_legacy: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Rebuild the frozen backbone from the saved hyper-parameters and load the adapters and head.

        Always reads with ``weights_only=True`` (tensors and plain types, never code; an environment
        variable cannot turn it off). The checkpoint is checked before anything is built: it must hold
        adapter factors, all finite, and the backbone fingerprint that :meth:`on_load_checkpoint`
        compares (``allow_legacy=True`` accepts a file without a fingerprint, from before it existed).

        Example:
            >>> from hilora_lightning import HiLoRAViT
            >>> HiLoRAViT.load_from_checkpoint("missing.ckpt")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            FileNotFoundError: no HiLoRAViT checkpoint at 'missing.ckpt'
        """
        if weights_only is not True:
            raise ValueError("HiLoRAViT checkpoints load with weights_only=True only, got "
                             f"weights_only={weights_only!r}")
        path = Path(checkpoint_path)
        if not path.is_file():
            raise FileNotFoundError(f"no HiLoRAViT checkpoint at {str(checkpoint_path)!r}")
        check_adapter_checkpoint(torch.load(path, map_location="cpu", weights_only=True), str(path), allow_legacy)
        hparams = None if hparams_file is None else Path(hparams_file)
        return super().load_from_checkpoint(path, map_location, hparams, strict,  # type: ignore[misc]
                                            weights_only=True, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; a non-strict load (Lightning's, of an adapter-only checkpoint) reports
        only missing *adapter* keys: the frozen backbone is absent by design (rebuilt from the hyper-parameters
        and checked by its fingerprint), so Lightning does not list its ~60 keys as missing."""
        keys = super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]
        if strict:
            return keys
        return type(keys)([k for k in keys.missing_keys if self._is_adapter_key(k)], keys.unexpected_keys)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """All tiers' factors and the head, as stored in checkpoints."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if self._is_adapter_key(k)}

