"""Export of a client's personalized model: timm folder, PEFT adapter, tier files; same predictions."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch

from hilora_lightning import HiLoRAViT, Tier
from hilora_lightning.data import digits_federation, split_unseen
from hilora_lightning.errors import AdapterStateError
from hilora_lightning.export import check_metadata
from hilora_lightning.federation import ClusteringConfig, FederatedOrchestrator, FederationConfig
from hilora_lightning.state import import_tier, load_tier_file


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    clients, unseen = split_unseen(digits_federation(5, num_groups=2), 0.2)
    cfg = FederationConfig(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), local_steps=3, batch_size=16,
                           clustering=ClusteringConfig(k_min=2, k_max=2), finetune_epochs=1)
    orch = FederatedOrchestrator(HiLoRAViT(lr=3e-3), clients, cfg, unseen=unseen, progress=False)
    orch.run()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return orch, x


def _reference(orch, cid, x):
    """The federated model's logits for client ``cid``: its tiers as LoRA terms (not merged), its head."""
    tiers, head = orch.client_model(cid)
    model = copy.deepcopy(orch.model).eval()
    for tier, state in tiers.items():
        import_tier(model, tier, state)
    model.head.load_state_dict(head)
    with torch.no_grad(), model.using_tiers(list(tiers)):
        return model(x), tiers


@pytest.mark.parametrize("which", ["training", "unseen"])
def test_timm_export_predicts_what_the_federated_model_predicts(run, tmp_path, which) -> None:
    orch, x = run
    cid = sorted(orch.clients)[1] if which == "training" else sorted(orch.unseen)[0]
    want, tiers = _reference(orch, cid, x)
    assert set(tiers) == set(Tier)  # root, its cluster and its (fine-tuned) leaf
    orch.export_client(cid, tmp_path, "timm")
    plain = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert not any("lora" in k for k in plain.state_dict())  # a plain timm ViT
    with torch.no_grad():
        got = plain(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert check_metadata(tmp_path / "model.safetensors", orch.model)["client_id"] == str(cid)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["pretrained_cfg"]["tag"] == f"hilora_client{cid}"
    assert "license" not in config["pretrained_cfg"]  # nothing borrowed from timm's stock model
    assert config["base_model"] == "hilora-lightning:hilora-digits-vit"


def test_peft_export_loads_into_the_bare_timm_model_with_the_same_predictions(run, tmp_path) -> None:
    pytest.importorskip("peft")
    orch, x = run
    cid = sorted(orch.clients)[0]
    want, _ = _reference(orch, cid, x)
    orch.export_client(cid, tmp_path, "peft")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "hilora-lightning:hilora-digits-vit"
    recipe = (tmp_path / "README.md").read_text()  # the base as the export's README builds it, run as written
    code = recipe.split("```python\n")[1].split("```")[0].replace("THIS_FOLDER", str(tmp_path))
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the README's own code block
    with torch.no_grad():
        got = scope["model"](x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_peft_base_of_timm_pretrained_weights_is_the_timm_name() -> None:
    from hilora_lightning.export import base_model_name, base_model_recipe

    model = HiLoRAViT(backbone="test_vit", num_classes=10, backbone_kwargs={"img_size": 32})
    assert base_model_name(model) == "hilora-lightning:test_vit"  # random init from the seed: only we rebuild it
    model.hparams["pretrained"] = True  # (no download here: the name and the recipe only)
    assert base_model_name(model) == "test_vit"
    assert "timm.create_model('test_vit', pretrained=True, num_classes=10, img_size=32)" in base_model_recipe(model)


def test_tier_files_and_the_backbone_check(run, tmp_path) -> None:
    orch, _ = run
    cid = sorted(orch.clients)[0]
    paths = orch.export_client(cid, tmp_path, "tiers")
    assert sorted(p.name for p in paths) == ["cluster.safetensors", "head.safetensors", "leaf.safetensors",
                                             "root.safetensors"]
    tiers, _ = orch.client_model(cid)
    root = load_tier_file(tmp_path / "root.safetensors")
    assert root.keys() == tiers[Tier.ROOT].keys() and all(torch.equal(root[k], v) for k, v in tiers[Tier.ROOT].items())
    other = HiLoRAViT(backbone="test_vit", num_classes=10)
    with pytest.raises(AdapterStateError, match="was exported for another frozen backbone"):
        check_metadata(tmp_path / "root.safetensors", other)
    with pytest.raises(AdapterStateError, match="was exported for another frozen backbone"):
        load_tier_file(tmp_path / "leaf.safetensors", other)
    assert load_tier_file(tmp_path / "leaf.safetensors", orch.model).keys() == tiers[Tier.LEAF].keys()
    with pytest.raises(ValueError, match="format must be one of"):
        orch.export_client(cid, tmp_path, "onnx")
    with pytest.raises(ValueError, match="no client 99"):
        orch.export_client(99, tmp_path)


def test_an_unseen_client_without_a_fine_tune_exports_its_routed_cluster_and_head(tmp_path) -> None:
    clients, unseen = split_unseen(digits_federation(5, num_groups=2), 0.2)
    cfg = FederationConfig(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), local_steps=2, batch_size=16,
                           clustering=ClusteringConfig(k_min=2, k_max=2), finetune_epochs=0)
    orch = FederatedOrchestrator(HiLoRAViT(lr=3e-3), clients, cfg, unseen=unseen, progress=False)
    result = orch.run()
    cid = sorted(orch.unseen)[0]
    tiers, head = orch.client_model(cid)  # no fine-tune: no leaf and no head of its own
    j = result.routing[cid]
    assert set(tiers) == {Tier.ROOT, Tier.CLUSTER}
    assert tiers[Tier.CLUSTER].keys() == orch.clusters[j].keys()
    assert all(torch.equal(tiers[Tier.CLUSTER][k], v) for k, v in orch.clusters[j].items())
    assert all(torch.equal(head[k], v) for k, v in orch.cluster_heads[j].items())
    assert orch.export_client(cid, tmp_path, "tiers")
