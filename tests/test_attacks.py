"""Hostile clients: each model attack's upload against a dense numpy reference, the data attacks' samples,
and the wrapper backend sending exactly what the attacker computes through a real federation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from hilora_lightning.data.clients import ClientData
from hilora_lightning.federation.attacks import (
    Attack,
    HostileBackend,
    add_trigger,
    hostile_factors,
    hostile_head,
    poison_client,
    triggered_test,
)

SHAPES = {"blocks.0.qkv": (10, 7), "blocks.1.fc": (6, 9)}
RANK = 2


def _state(gen: torch.Generator, zero_b: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for name, (p, q) in SHAPES.items():
        out[f"{name}.lora_A"] = torch.randn(RANK, q, generator=gen)
        out[f"{name}.lora_B"] = torch.zeros(p, RANK) if zero_b else torch.randn(p, RANK, generator=gen)
    return out


def _prod(state, name) -> np.ndarray:
    return state[f"{name}.lora_B"].double().numpy() @ state[f"{name}.lora_A"].double().numpy()


def _truncate(m: np.ndarray, r: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(m)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.mark.parametrize("kind,coef", [("sign_flip", (2.0, -1.0)), ("scale", (-4.0, 5.0)), ("backdoor", (-4.0, 5.0))])
def test_model_attacks_send_the_rank_r_truncation_of_their_target(kind, coef) -> None:
    gen = torch.Generator().manual_seed(0)
    start, honest = _state(gen), _state(gen)
    sent = hostile_factors(kind, honest, start, scale=5.0)
    for name in SHAPES:
        target = coef[0] * _prod(start, name) + coef[1] * _prod(honest, name)  # c0 B0 A0 + c1 B A
        # float32 factors of O(10) products: ~1e-6 relative, far below 1e-4
        np.testing.assert_allclose(_prod(sent, name), _truncate(target, RANK), atol=1e-4 * np.abs(target).max())
        assert sent[f"{name}.lora_B"].shape == honest[f"{name}.lora_B"].shape


def test_sign_flip_from_a_zero_start_is_exact_and_noise_has_the_honest_norm() -> None:
    gen = torch.Generator().manual_seed(1)
    start, honest = _state(gen, zero_b=True), _state(gen)
    flip = hostile_factors("sign_flip", honest, start)
    noise = hostile_factors("noise", honest, start, generator=torch.Generator().manual_seed(3))
    for name in SHAPES:
        want = -_prod(honest, name)
        np.testing.assert_allclose(_prod(flip, name), want, atol=1e-5 * np.abs(want).max())
        honest_norm = np.linalg.norm(_prod(honest, name) - _prod(start, name))
        assert np.linalg.norm(_prod(noise, name) - _prod(start, name)) == pytest.approx(honest_norm, rel=1e-5)
        # and it points nowhere near the honest update (random direction in a 60-dim product space)
        cos = np.sum(_prod(noise, name) * _prod(honest, name)) / honest_norm ** 2
        assert abs(cos) < 0.9
    free = hostile_factors("free_ride", honest, start)
    assert all(torch.equal(free[k], start[k]) for k in start)


def test_head_attacks() -> None:
    h0 = {"w": torch.ones(3, 2), "b": torch.zeros(3)}
    h = {"w": torch.full((3, 2), 2.0), "b": torch.ones(3)}
    assert torch.equal(hostile_head("sign_flip", h, h0)["w"], torch.zeros(3, 2))
    assert torch.equal(hostile_head("scale", h, h0, scale=5)["b"], torch.full((3,), 5.0))
    assert torch.equal(hostile_head("free_ride", h, h0)["w"], h0["w"])
    assert torch.equal(hostile_head("label_flip", h, h0)["w"], h["w"])  # data poisoning: the head is honest
    noisy = hostile_head("noise", h, h0, generator=torch.Generator().manual_seed(0))
    assert float((noisy["w"] - h0["w"]).norm()) == pytest.approx(float((h["w"] - h0["w"]).norm()), rel=1e-5)


def _client(n: int = 40) -> ClientData:
    x = torch.rand(n, 1, 8, 8) * 0.5
    y = torch.arange(n) % 4
    return ClientData(7, TensorDataset(x, y), TensorDataset(x.clone(), y.clone()), val_fraction=0)


def test_label_flipping_and_backdoor_poison_only_the_training_split() -> None:
    client = _client()
    flipped = poison_client(client, Attack("label_flip", num_classes=4))
    assert [int(flipped.train[i][1]) for i in range(8)] == [3 - i % 4 for i in range(8)]
    assert torch.equal(flipped.test[5][0], client.test[5][0]) and int(flipped.test[5][1]) == 1
    door = poison_client(client, Attack("backdoor", num_classes=4, target=2, poison_fraction=0.25, trigger_size=2))
    poisoned = [i for i in range(40) if not torch.equal(door.train[i][0], client.train[i][0])]
    assert len(poisoned) == 10  # a quarter of the samples carry the trigger, labelled with the target
    for i in poisoned:
        x, y = door.train[i]
        assert int(y) == 2 and torch.equal(x[:, -2:, -2:], torch.full((1, 2, 2), float(client.train[i][0].max())))
    assert poison_client(client, Attack("sign_flip")) is client


def test_triggered_test_keeps_the_non_target_images_triggered() -> None:
    client = _client()
    trig = triggered_test(client, Attack("backdoor", num_classes=4, target=1, trigger_size=3))
    assert len(trig.test) == 30  # the 10 class-1 images are left out
    x, y = trig.test[0]
    assert int(y) == 1 and torch.equal(x, add_trigger(client.test[0][0], 3))
    with pytest.raises(TypeError, match="the backdoor trigger goes on a C x H x W image tensor"):
        add_trigger(torch.zeros(8, 8), 2)
    with pytest.raises(ValueError, match="attack kind must be one of"):
        Attack("flip")


def test_a_free_rider_uploads_exactly_what_it_received_through_a_real_federation() -> None:
    """The wrapper sits between the executor and the runner's checks: the upload the server sees is the
    attacker's (here the root it was sent, bit for bit), and a sign flipper's is the honest one reversed."""
    from hilora_lightning import HiLoRAViT
    from hilora_lightning.data.digits import digits_federation
    from hilora_lightning.federation import FederatedOrchestrator
    from hilora_lightning.federation.config import FederationConfig

    clients = digits_federation(4, num_groups=2)
    cfg = FederationConfig(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), local_steps=2, finetune_epochs=0)
    seen: dict[int, dict] = {}

    def hook(p):
        if p.round == 1:
            seen[p.client_id] = p.factors

    def run(hostile):
        seen.clear()
        torch.manual_seed(0)
        orch = FederatedOrchestrator(HiLoRAViT(), clients, cfg, progress=False, upload_hook=hook,
                                     backend=HostileBackend(None, hostile))
        start = {k: v.clone() for k, v in orch.root.items()}
        orch.run(stop_after=1)
        return start, dict(seen)

    start, honest = run({})
    _, attacked = run({1: Attack("free_ride"), 2: Attack("sign_flip")})
    assert all(torch.equal(attacked[1][k], start[k]) for k in start)
    for prefix in {k.rsplit(".", 1)[0] for k in start}:
        b0a0 = _prod(start, prefix)
        want = _truncate(2 * b0a0 - _prod(honest[2], prefix), honest[2][f"{prefix}.lora_B"].shape[1])
        np.testing.assert_allclose(_prod(attacked[2], prefix), want, atol=1e-4 * np.abs(want).max())
    assert all(torch.equal(attacked[0][k], honest[0][k]) for k in start)  # honest clients untouched
