from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
from safetensors.torch import save_file

from helpers import randomize_tiers
from hilora_lightning import HiLoRAViT, Tier
from hilora_lightning.backbone import create_backbone, embedded_weights_path, timm_args
from hilora_lightning.data import DigitsDataModule

TINY = {"backbone": "vit_tiny_patch16_224", "num_classes": 10, "backbone_kwargs": {"img_size": 32, "depth": 2}}


def _trainer(tmp_path: Path, precision: str = "32-true", **kw) -> pl.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        default_root_dir=tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
        logger=False, enable_progress_bar=False, enable_model_summary=False, precision=precision,
        accelerator="cpu", devices=1, **kw,
    )


def _trainable(model: HiLoRAViT) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_stage_decides_active_and_trainable_tiers() -> None:
    model = HiLoRAViT(**TINY, stage="cluster")
    layer = next(iter(model.tiered_layers.values()))
    assert layer.active == (Tier.ROOT, Tier.CLUSTER)
    names = _trainable(model)
    assert names and all(".lora_A.cluster" in n or ".lora_B.cluster" in n or n.startswith("model.head.") for n in names)
    model.set_stage("leaf")
    assert layer.active == tuple(Tier)
    assert all("cluster" not in n and "root" not in n for n in _trainable(model))
    optim = model.configure_optimizers()
    assert sum(p.numel() for g in optim.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    with model.using_tiers(["root"]):
        assert layer.active == (Tier.ROOT,)
    assert layer.active == tuple(Tier)


def test_model_orthogonality_matches_hand_computation() -> None:
    model = HiLoRAViT(**TINY, stage="leaf", gamma_c=0.3, gamma_l=0.7)
    for layer in model.tiered_layers.values():
        randomize_tiers(layer)
    expected = torch.zeros(())
    for layer in model.tiered_layers.values():
        for (_, _, br), (_, _, bc), (_, _, bl) in zip(*(layer.factors(t) for t in Tier)):
            expected = expected + 0.3 * (br.T @ bl).pow(2).sum() + 0.7 * (bc.T @ bl).pow(2).sum()
    got = model.orthogonality_loss()
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)
    got.backward()
    layer = next(iter(model.tiered_layers.values()))
    assert layer.lora_B["leaf"].grad is not None and layer.lora_B["root"].grad is None
    model.set_stage("root")
    assert model.orthogonality_loss().item() == 0.0


@pytest.mark.parametrize("form", ["scaled", "energy"])
def test_model_orthogonality_forms_match_hand_computation(form: str) -> None:
    adapter = {"root": {"rank": 4, "alpha": 16}, "cluster": {"rank": 4, "alpha": 4}, "leaf": {"rank": 2, "alpha": 2}}
    model = HiLoRAViT(**{**TINY, "adapter": adapter}, stage="leaf", gamma_c=0.3, gamma_l=0.7, ortho_form=form)
    for layer in model.tiered_layers.values():
        randomize_tiers(layer)
    expected = torch.zeros((), dtype=torch.float64)
    scale = {"root": 4.0, "cluster": 1.0, "leaf": 1.0}
    for layer in model.tiered_layers.values():
        for (_, ar, br), (_, ac, bc), (_, _, bl) in zip(*(layer.factors(t) for t in Tier)):
            for gamma, a, b, s in ((0.3, ar, br, scale["root"]), (0.7, ac, bc, scale["cluster"])):
                b64, a64, t = b.detach().double(), a.detach().double(), scale["leaf"] * bl.detach().double()
                if form == "scaled":
                    expected += gamma * ((s * b64).T @ t).pow(2).sum()
                else:  # dense SVD of the frozen update, directions weighted by sigma / sigma_max
                    u, sv, _ = torch.linalg.svd(s * b64 @ a64)
                    w = (sv / sv.max())[: b.shape[1]]
                    expected += gamma * (w[:, None] * (u[:, : b.shape[1]].T @ t)).pow(2).sum()
    torch.testing.assert_close(model.orthogonality_loss().double(), expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"ortho_form must be one of \('raw', 'scaled', 'energy'\), got 'x'"):
        HiLoRAViT(**TINY, ortho_form="x")


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_two_batch_fit_trains_only_the_stage(tmp_path: Path, precision: str) -> None:
    model = HiLoRAViT(**TINY, stage="cluster", lr=1e-2)
    for layer in model.tiered_layers.values():
        randomize_tiers(layer)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _trainer(tmp_path, precision).fit(model, DigitsDataModule(batch_size=8))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".cluster" in k or k.startswith("model.head.") for k in changed)
    assert all(torch.isfinite(v).all() for v in after.values())


def test_checkpoint_round_trip_is_exact_and_adapter_only(tmp_path: Path) -> None:
    model = HiLoRAViT(**TINY, stage="cluster", lr=1e-2, seed=5)
    trainer = _trainer(tmp_path)
    trainer.fit(model, DigitsDataModule(batch_size=8))
    ckpt = tmp_path / "adapters.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, weights_only=False)
    assert raw["state_dict"] and all(".lora_" in k or k.startswith("model.head.") for k in raw["state_dict"])
    assert raw["hilora_stage"] == "cluster"
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = HiLoRAViT.load_from_checkpoint(ckpt)
    assert not [w for w in caught if "Found keys" in str(w.message)]  # the absent backbone is by design: quiet
    assert loaded.stage is Tier.CLUSTER
    partial = {k: v for k, v in raw["state_dict"].items() if not k.endswith(".root")}  # root factors missing: said
    keys = HiLoRAViT(**TINY, seed=5).load_state_dict(partial, strict=False)
    assert keys.missing_keys and all(k.endswith(".root") for k in keys.missing_keys)
    ref = model.adapter_state_dict()
    got = loaded.adapter_state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x))


def test_pretrained_weights_from_a_local_file(tmp_path: Path) -> None:
    source = timm.create_model("test_vit", num_classes=7)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    same_head = create_backbone("test_vit", num_classes=7, pretrained_file=path)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), same_head.state_dict().values()))
    new_head = create_backbone("test_vit", num_classes=3, pretrained_file=path)
    assert torch.equal(new_head.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert new_head.head.out_features == 3
    model = HiLoRAViT(backbone="test_vit", num_classes=7, pretrained_file=str(path))
    assert torch.equal(model.tiered_layers["blocks.0.attn.qkv"].base_layer.weight, source.blocks[0].attn.qkv.weight)
    with pytest.raises(FileNotFoundError, match=r"pretrained_file '.*nope.pth' does not exist; pass the path"):
        create_backbone("test_vit", num_classes=3, pretrained_file=tmp_path / "nope.pth")


def test_embedded_backbone_has_learned_the_digits() -> None:
    model = HiLoRAViT(backbone="hilora-digits-vit", num_classes=10).eval()
    dm = DigitsDataModule(quarter_turns=0)
    dm.setup()
    x, y = dm.test_set.tensors
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    assert acc > 0.8  # upright held-out digits: the frozen backbone and its head already work


def test_embedded_mnist_backbone_is_the_coarse_patch_vit_and_transfers() -> None:
    path, kwargs = embedded_weights_path("hilora-mnist-vit"), timm_args("hilora-mnist-vit")
    assert path.is_file() and path != embedded_weights_path("hilora-digits-vit")
    assert kwargs == ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 4,
                                               "num_heads": 3})
    assert timm_args("vit_small_patch16_224", img_size=64) == ("vit_small_patch16_224", {"img_size": 64})
    model = HiLoRAViT(backbone="hilora-mnist-vit", num_classes=10).eval()
    assert model.model.patch_embed.num_patches == 16  # 4 x 4 tokens: a quarter of the digits ViT's cost
    digits = HiLoRAViT(backbone="hilora-digits-vit", num_classes=10)
    assert model.backbone_fingerprint() != digits.backbone_fingerprint()
    dm = DigitsDataModule(quarter_turns=0)
    dm.setup()
    x, y = dm.test_set.tensors
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    assert acc > 0.3  # pretrained on MNIST, never saw the 8x8 digits: 0.42 measured, chance is 0.1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0}, r"lr must be > 0, got 0"),
        ({"weight_decay": -1}, r"weight_decay must be >= 0, got -1"),
        ({"gamma_c": -0.1}, r"gamma_c and gamma_l must be >= 0, got -0.1 and 0.1"),
        ({"ortho_side": "C"}, r"ortho_side must be one of \('B', 'A'\), got 'C'"),
        ({"num_classes": 0}, r"num_classes must be a positive int, got 0"),
        ({"stage": "trunk"}, r"unknown tier 'trunk'"),
    ],
)
def test_constructor_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HiLoRAViT(**{**TINY, **kwargs})


def test_nothing_to_train_is_reported() -> None:
    model = HiLoRAViT(**TINY, train_head=False)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"nothing to train in stage 'root'"):
        model.configure_optimizers()


def test_subclass_can_override_the_loss(tmp_path: Path) -> None:
    class Smoothed(HiLoRAViT):
        calls = 0

        def compute_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            Smoothed.calls += 1
            return torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1)

    _trainer(tmp_path).fit(Smoothed(**TINY), DigitsDataModule(batch_size=8))
    assert Smoothed.calls >= 2


def test_checkpoint_from_another_backbone_is_refused(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    trainer.fit(HiLoRAViT(**TINY, seed=1), DigitsDataModule(batch_size=8))
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, weights_only=False)
    raw["hilora_backbone_sha256"] = "0" * 64
    torch.save(raw, ckpt)
    with pytest.raises(RuntimeError, match=r"trained on a different frozen backbone \(weight fingerprint 000000000000"):
        HiLoRAViT.load_from_checkpoint(ckpt)


def test_orthogonality_cache_follows_frozen_factor_changes() -> None:
    model = HiLoRAViT(**TINY, stage="cluster", gamma_c=1.0)
    for layer in model.tiered_layers.values():
        randomize_tiers(layer)
    first = model.orthogonality_loss().item()
    assert model.orthogonality_loss().item() == first  # cached frozen side, same value
    with torch.no_grad():
        for layer in model.tiered_layers.values():
            layer.lora_B["root"].mul_(2.0)  # a new root (e.g. imported after aggregation)
    assert model.orthogonality_loss().item() == pytest.approx(4 * first, rel=1e-5)


def _saved(tmp_path: Path) -> Path:
    trainer = _trainer(tmp_path)
    trainer.fit(HiLoRAViT(**TINY, seed=1), DigitsDataModule(batch_size=8))
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt


def test_model_checkpoints_are_checked_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hilora_lightning.errors import AdapterStateError

    ckpt = _saved(tmp_path)
    raw = torch.load(ckpt, weights_only=True)
    no_adapters = {**raw, "state_dict": {k: v for k, v in raw["state_dict"].items() if ".lora_" not in k}}
    torch.save(no_adapters, tmp_path / "none.ckpt")
    with pytest.raises(AdapterStateError, match="holds no adapter factors .* loading it would give fresh"):
        HiLoRAViT.load_from_checkpoint(tmp_path / "none.ckpt")
    key = next(k for k in raw["state_dict"] if ".lora_B." in k)
    nan = {**raw, "state_dict": {**raw["state_dict"], key: torch.full_like(raw["state_dict"][key], float("nan"))}}
    torch.save(nan, tmp_path / "nan.ckpt")
    with pytest.raises(AdapterStateError, match="holds NaN or Inf adapter values"):
        HiLoRAViT.load_from_checkpoint(tmp_path / "nan.ckpt")
    legacy = {k: v for k, v in raw.items() if k != "hilora_backbone_sha256"}
    torch.save(legacy, tmp_path / "legacy.ckpt")
    with pytest.raises(AdapterStateError, match="has no backbone fingerprint, .* pass allow_legacy=True"):
        HiLoRAViT.load_from_checkpoint(tmp_path / "legacy.ckpt")
    assert HiLoRAViT.load_from_checkpoint(tmp_path / "legacy.ckpt", allow_legacy=True).stage is Tier.ROOT
    with pytest.raises(ValueError, match="load with weights_only=True only, got weights_only=False"):
        HiLoRAViT.load_from_checkpoint(ckpt, weights_only=False)


class _Payload:
    def __reduce__(self):
        return (print, ("pickle payload ran",))


def test_a_pickle_payload_never_runs_even_with_the_override_variable(tmp_path, monkeypatch, capsys) -> None:
    ckpt = _saved(tmp_path)
    raw = torch.load(ckpt, weights_only=True)
    raw["evil"] = _Payload()
    torch.save(raw, tmp_path / "evil.ckpt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        HiLoRAViT.load_from_checkpoint(tmp_path / "evil.ckpt")
    assert "pickle payload ran" not in capsys.readouterr().out
