"""A client's personalized model for deployment: a plain timm model, a PEFT adapter, or tier files.

Client *i*'s model is the frozen backbone plus root + its cluster + its leaf, with its personal
head. Three formats:

* ``"timm"``: a folder with ``config.json`` and ``model.safetensors`` (tiers merged into the weights,
  the head included) that ``timm.create_model("local-dir:DIR", pretrained=True)`` builds as a plain
  timm model predicting what the federated model predicts for that client;
* ``"peft"``: a PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) for
  ``peft.PeftModel.from_pretrained(base_timm_model, DIR)``: the tiers as *one* LoRA per adapted
  Linear (rank = the tiers' summed rank, scales folded into ``B``, ``lora_alpha = r``), the paper's
  q/v row slices of the fused ``qkv`` as a ``qkv`` LoRA whose k rows are zero, and the head as a
  module to save; ``base_model_name_or_path`` names the base (timm's name for timm's pretrained weights,
  else ``hilora-lightning:<backbone>``) and a ``README.md`` beside it holds the code that builds it;
* ``"tiers"``: one ``.safetensors`` file per tier (``blocks.0...`` keys) and the head.

Every file carries metadata in its safetensors header (backbone fingerprint, tier ranks, targets,
client id); :func:`check_metadata` refuses a file made for another backbone.

Example:
    >>> from hilora_lightning.export import FORMATS
    >>> FORMATS
    ('timm', 'peft', 'tiers')
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hilora_lightning.atomic import atomic_write
from hilora_lightning.backbone import EMBEDDED_BACKBONES
from hilora_lightning.errors import AdapterStateError
from hilora_lightning.model import HiLoRAViT
from hilora_lightning.state import import_tier
from hilora_lightning.tiers import Tier

__all__ = ["FORMATS", "base_model_name", "base_model_recipe", "check_metadata", "client_copy", "export_client_model",
           "file_metadata"]

FORMATS = ("timm", "peft", "tiers")

State = Mapping[str, Tensor]


def file_metadata(model: HiLoRAViT, client_id: int | None, tiers: Mapping[Tier, State], fmt: str) -> dict[str, str]:
    """The safetensors header metadata of every exported file (strings only)."""
    acfg = model.adapter_config
    return {
        "format": f"hilora-lightning/{fmt}",
        "backbone": str(model.hparams["backbone"]),
        "backbone_sha256": model.backbone_fingerprint(),
        "client_id": "" if client_id is None else str(client_id),
        "tiers": ",".join(t.value for t in tiers),
        "ranks": json.dumps({t.value: acfg.tier(t).rank for t in Tier}),
        "targets": json.dumps(acfg.to_dict().get("targets"), default=str),
        "num_classes": str(model.hparams["num_classes"]),
    }


def check_metadata(path: str | Path, model: HiLoRAViT) -> dict[str, str]:
    """Read an exported file's metadata and refuse it for a model with another frozen backbone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    if not meta.get("format", "").startswith("hilora-lightning/"):
        raise AdapterStateError(f"{str(path)!r} was not exported by hilora-lightning (no metadata)")
    if meta.get("backbone_sha256") != model.backbone_fingerprint():
        raise AdapterStateError(
            f"{str(path)!r} was exported for another frozen backbone ({meta.get('backbone')!r}, fingerprint "
            f"{meta.get('backbone_sha256', '')[:12]}...), this model's is {model.backbone_fingerprint()[:12]}...; "
            "load it into the backbone it was trained on")
    return meta


def _save(state: Mapping[str, Tensor], path: Path, meta: Mapping[str, str]) -> Path:
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata=dict(meta))
    return atomic_write(path, lambda fh: fh.write(data))


def client_copy(model: HiLoRAViT, tiers: Mapping[Tier, State], head: State) -> HiLoRAViT:
    """A copy of ``model`` holding the client's tiers and head (the caller's model is not touched)."""
    own = copy.deepcopy(model).cpu().eval()
    for tier, state in tiers.items():
        import_tier(own, tier, state)
    own.head.load_state_dict(dict(head))
    own.set_active_tiers(list(tiers))
    return own


def _merged_backbone(model: HiLoRAViT, tiers: Mapping[Tier, State], head: State) -> torch.nn.Module:
    """A plain timm model (no adapter modules) whose weights hold the client's tiers merged in."""
    own = client_copy(model, tiers, head)
    for layer in own.tiered_layers.values():
        layer.set_trainable([])  # nothing trains in a deployed model; merging needs frozen tiers
        layer.merge(list(tiers))
    plain = own.build_backbone()
    source = own.model.state_dict()
    merged: dict[str, Tensor] = {}
    for key in plain.state_dict():
        path, _, leaf = key.rpartition(".")
        tiered = own.tiered_layers.get(path)
        merged[key] = getattr(tiered.base_layer, leaf).detach().clone() if tiered is not None else source[key]
    plain.load_state_dict(merged)
    return plain.eval()


def _backbone_args(model: HiLoRAViT) -> tuple[str, dict[str, Any]]:
    from hilora_lightning.backbone import timm_args

    return timm_args(str(model.hparams["backbone"]), **dict(model.hparams["backbone_kwargs"] or {}))


def export_client_model(model: HiLoRAViT, tiers: Mapping[Tier, State], head: State, out_dir: str | Path,
                        fmt: str = "timm", client_id: int | None = None) -> list[Path]:
    """Write client ``client_id``'s model (``tiers``: its tier states, ``head``: its head) in ``fmt``.

    Returns the written files. The model passed in is not changed.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = file_metadata(model, client_id, tiers, fmt)
    if fmt == "tiers":
        paths = [_save(state, out / f"{tier.value}.safetensors", {**meta, "tier": tier.value})
                 for tier, state in tiers.items()]
        return [*paths, _save(head, out / "head.safetensors", {**meta, "tier": "head"})]
    if fmt == "timm":
        from timm.models._hub import save_config_for_hf

        plain = _merged_backbone(model, tiers, head)
        arch, kwargs = _backbone_args(model)
        weights = _save(plain.state_dict(), out / "model.safetensors", meta)
        save_config_for_hf(plain, str(out / "config.json"), model_config={"architecture": arch},
                           model_args=kwargs)
        cfg = json.loads((out / "config.json").read_text())
        cfg["architecture"] = arch  # the timm name (the embedded backbone is a configured vit_tiny)
        pretrained = cfg.setdefault("pretrained_cfg", {})
        for borrowed in ("license", "hf_hub_id", "url", "paper_ids", "paper_name", "origin_url", "notes"):
            pretrained.pop(borrowed, None)  # the stock model's, not this one's: these weights are the client's
        pretrained["tag"] = "hilora" if client_id is None else f"hilora_client{client_id}"
        cfg["base_model"] = base_model_name(model)  # what the client's weights were fine-tuned from
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        return [weights, out / "config.json"]
    return _export_peft(model, tiers, head, out, meta)


def _export_peft(model: HiLoRAViT, tiers: Mapping[Tier, State], head: State, out: Path,
                 meta: Mapping[str, str]) -> list[Path]:
    """One LoRA per adapted Linear: ``delta = B A`` with ``B`` the tiers' scaled ``B`` s stacked side by side."""
    own = client_copy(model, tiers, head)
    weights: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for path, layer in own.tiered_layers.items():
        base = layer.base_layer
        a_parts, b_parts = [], []
        for tier in tiers:
            scale = float(layer.scaling[tier])
            for (_, start, stop), (_, a, b) in zip(layer.segments, layer.factors(tier)):
                full_b = torch.zeros(base.out_features, b.shape[1])  # rows outside the segment (k) stay zero
                full_b[start:stop] = b.detach().float() * scale
                a_parts.append(a.detach().float())
                b_parts.append(full_b)
        lora_a, lora_b = torch.cat(a_parts, 0), torch.cat(b_parts, 1)
        weights[f"base_model.model.{path}.lora_A.weight"] = lora_a
        weights[f"base_model.model.{path}.lora_B.weight"] = lora_b
        ranks[path] = lora_a.shape[0]
    head_prefix = own._head_prefix()[len("model."):]
    for k, v in own.head.state_dict().items():
        weights[f"base_model.model.{head_prefix}{k}"] = v.detach().float()
    r = max(ranks.values())
    config = {
        "peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(ranks), "rank_pattern": {k: v for k, v in ranks.items()},
        "alpha_pattern": {k: v for k, v in ranks.items()}, "modules_to_save": [head_prefix.rstrip(".")],
        "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "base_model_name_or_path": base_model_name(model), "inference_mode": True,
    }
    cfg_path = out / "adapter_config.json"
    cfg_path.write_text(json.dumps(config, indent=2))
    readme = out / "README.md"
    readme.write_text(base_model_recipe(model))
    return [_save(weights, out / "adapter_model.safetensors", meta), cfg_path, readme]


def base_model_name(model: HiLoRAViT) -> str:
    """The base a PEFT export loads onto: the timm name of timm's pretrained weights, else
    ``hilora-lightning:<backbone>`` (an embedded backbone, a local weights file or a seeded random init:
    built by :func:`base_model_recipe`'s code).

    Example:
        >>> base_model_name(HiLoRAViT(backbone="hilora-digits-vit"))
        'hilora-lightning:hilora-digits-vit'
    """
    hp = model.hparams
    name = str(hp["backbone"])
    if bool(hp["pretrained"]) and not hp["pretrained_file"] and name not in EMBEDDED_BACKBONES:
        return name
    return f"hilora-lightning:{name}"


def base_model_recipe(model: HiLoRAViT) -> str:
    """A README for an exported adapter: the code that builds its base model exactly (same frozen weights).

    Example:
        >>> "HiLoRAViT(backbone='hilora-digits-vit'" in base_model_recipe(HiLoRAViT())
        True
    """
    hp = model.hparams
    args = {"backbone": str(hp["backbone"]), "num_classes": int(hp["num_classes"]),
            "pretrained": bool(hp["pretrained"]), "pretrained_file": hp["pretrained_file"],
            "backbone_kwargs": dict(hp["backbone_kwargs"] or {}),
            "seed": int(hp["seed"])}
    call = ", ".join(f"{k}={v!r}" for k, v in args.items())
    lines = [
        f"# A PEFT LoRA adapter exported by hilora-lightning (base: {base_model_name(model)})",
        "",
        "The adapter holds one client's tiers (root + cluster + leaf, stacked as one LoRA per adapted Linear) and its",
        "head. Build the base model exactly as the federation did (the same frozen weights), then load the adapter:",
        "",
        "```python",
        "import peft",
        "from hilora_lightning import HiLoRAViT",
        "",
        f"base = HiLoRAViT({call}).build_backbone().eval()",
        "model = peft.PeftModel.from_pretrained(base, 'THIS_FOLDER').eval()",
        "```",
    ]
    if base_model_name(model) == args["backbone"]:
        arch, kwargs = _backbone_args(model)
        extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        lines += ["", "The frozen weights are timm's pretrained ones, so timm alone builds the base too:", "",
                  "```python", "import timm", "",
                  f"base = timm.create_model({args['backbone']!r}, pretrained=True, num_classes={args['num_classes']}"
                  f"{extra}).eval()", "```"]
    return "\n".join(lines) + "\n"
