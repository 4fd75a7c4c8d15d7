"""The batched backend: the stacked math against per-client references, and plans run together against
the sequential executor.

Tolerance. Batched and sequential runs compute the same sums in another order (batched matmuls over
clients, a shared frozen slot merged into the base weight), so they agree to float32 rounding per
step, ~1e-7 relative. AdamW divides each gradient by its own running magnitude, so an element whose
true gradient is near zero can move by up to ``lr`` on rounding alone; over these few steps the measured
gap in each client's product ``B A`` is ~1e-5 (relative Frobenius norm), and 1-2 thread runs of the
*sequential* executor differ by ~5e-7. ``PRODUCT_RTOL = 1e-3`` leaves two orders of magnitude of margin
and still fails on a real difference (tested: the same plans with the penalty left out).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from hilora_lightning import HiLoRAViT, Tier
from hilora_lightning.batched_lora import StackedDelta, stacked_head, stacked_lora_delta
from hilora_lightning.data import ClientData, digits_federation
from hilora_lightning.federation import FederatedOrchestrator, FederationConfig
from hilora_lightning.federation.backend import InProcessBackend
from hilora_lightning.federation.batched import BatchedBackend, batch_refusal
from hilora_lightning.federation.hilora import HiLoRAStrategy
from hilora_lightning.federation.plan import Budget
from hilora_lightning.federation.runtime import ClientRuntime
from hilora_lightning.layer import TieredLoRALinear

R, C, L = Tier.ROOT, Tier.CLUSTER, Tier.LEAF
PRODUCT_RTOL = 1e-3
FAST = {"local_steps": 3, "batch_size": 16, "seed": 0}


def test_stacked_delta_equals_each_clients_own_lora_on_segments() -> None:
    """q and v row slices of a fused qkv (the paper's targets): every client's rows get its own update."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 8, generator=g)
    a, b = torch.randn(3, 2, 4, 8, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    rows = ((0, 5), (10, 15))
    out = stacked_lora_delta(x, a, b, rows, 0.5, out_features=15)
    for c in range(3):
        ref = torch.zeros(7, 15)
        for s, (start, stop) in enumerate(rows):
            ref[:, start:stop] = 0.5 * x[c] @ a[c, s].T @ b[c, s].T
        torch.testing.assert_close(out[c], ref, rtol=1e-5, atol=1e-6)
    f, w, bias = torch.randn(3, 7, 8, generator=g), torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, generator=g)
    for c in range(3):
        torch.testing.assert_close(stacked_head(f, w, bias)[c], f[c] @ w[c].T + bias[c], rtol=1e-5, atol=1e-6)


def test_a_layer_in_a_batched_pass_equals_the_layer_loaded_with_each_clients_factors() -> None:
    from hilora_lightning import AdapterConfig

    base = torch.nn.Linear(8, 24)
    layer = TieredLoRALinear(base, AdapterConfig(targets="paper"), segments=("q", "v"), path="m")
    g = torch.Generator().manual_seed(1)
    states = [(torch.randn(2, 8, 8, generator=g), torch.randn(2, 8, 8, generator=g) * 0.1) for _ in range(3)]
    x = torch.randn(3 * 4, 5, 8, generator=g)
    layer.batched = StackedDelta(3, [(torch.stack([a for a, _ in states]), torch.stack([b for _, b in states]),
                                      layer.scaling[R])])
    got = layer(x)
    layer.batched = None
    layer.set_active([R])
    for c, (a, b) in enumerate(states):
        with torch.no_grad():
            layer.lora_A[R.value].copy_(a)
            layer.lora_B[R.value].copy_(b)
        torch.testing.assert_close(got[4 * c:4 * (c + 1)], layer(x[4 * c:4 * (c + 1)]), rtol=1e-5, atol=1e-5)


def _products(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[:-7]: state[k[:-7] + ".lora_B"] @ state[k[:-7] + ".lora_A"] for k in state if k.endswith(".lora_A")}


def _gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    pa, pb = _products(a), _products(b)
    return max(float((pa[k] - pb[k]).norm() / pa[k].norm().clamp_min(1e-12)) for k in pa)


def _run(backend, clients, stage: Tier, gamma: float = 0.1, budget: Budget | None = None, **model_kw):
    """One round's plans of ``stage`` on the clients (2 clusters), through ``backend``."""
    model = HiLoRAViT(lr=3e-3, gamma_c=gamma, gamma_l=gamma, **model_kw)
    cfg = FederationConfig(rounds=6, root_rounds=(1, 2), cluster_rounds=(1, 2), **FAST)
    strategy = HiLoRAStrategy(model, cfg)
    state = strategy.initial_state([c.client_id for c in clients])
    g = torch.Generator().manual_seed(5)
    state.root = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in state.root.items()}
    if stage is not R:
        state.stage, state.assignment = stage, {c.client_id: c.client_id % 2 for c in clients}
        state.num_clusters = 2
        state.clusters = {j: {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in state.root.items()}
                          for j in range(2)}
        state.cluster_heads = {j: dict(state.global_head) for j in range(2)}
    plans = strategy.configure_fit(state, 2, [c.client_id for c in clients], stage)
    if budget is not None:
        plans = {c: dataclasses.replace(p, budget=budget) for c, p in plans.items()}
    backend.bind(ClientRuntime(model), clients)
    return backend.fit(plans), backend


@pytest.mark.parametrize("stage", [R, C, L])
def test_batched_equals_sequential_on_every_stage_within_the_stated_tolerance(stage: Tier) -> None:
    """Root (nothing frozen), cluster (the shared frozen root merged into the base, the penalty against it at a
    weight that matters), leaf (two clusters: per-client frozen slots stacked, penalty against both)."""
    clients = digits_federation(4, num_groups=2)
    seq, seq_backend = _run(InProcessBackend(), clients, stage, gamma=5.0)
    bat, bat_backend = _run(BatchedBackend(), clients, stage, gamma=5.0)
    for cid in seq:
        if stage is L:  # the leaf stays on the client; compare what it kept
            a, b = seq_backend.store(cid).kept[L], bat_backend.store(cid).kept[L]
        else:
            a, b = seq[cid].factors, bat[cid].factors
            torch.testing.assert_close(bat[cid].head["weight"], seq[cid].head["weight"], rtol=0, atol=1e-4)
        assert _gap(a, b) < PRODUCT_RTOL, (cid, _gap(a, b))
        assert bat[cid].num_samples == seq[cid].num_samples
        torch.testing.assert_close(bat_backend.store(cid).head or {}, seq_backend.store(cid).head or {},
                                   rtol=0, atol=1e-4)
    if stage is not R:  # the tolerance can fail: without the penalty the updates differ by more than it
        off, off_backend = _run(BatchedBackend(), clients, stage, gamma=0.0)
        without = off_backend.store(0).kept[L] if stage is L else off[0].factors
        ref = seq_backend.store(0).kept[L] if stage is L else seq[0].factors
        assert _gap(ref, without) > PRODUCT_RTOL


def test_a_client_whose_data_raises_fails_alone_and_the_others_equal_a_pass_without_it() -> None:
    class Broken(Dataset):
        def __init__(self, inner: Dataset) -> None:
            self.inner = inner

        def __len__(self) -> int:
            return len(self.inner)  # type: ignore[arg-type]

        def __getitem__(self, i: int):
            raise OSError("disk on fire")

    clients = digits_federation(4, num_groups=2)
    broken = [*clients[:2], ClientData(2, Broken(clients[2].train), clients[2].test, clients[2].group,
                                       val=clients[2].val), clients[3]]
    got, _ = _run(BatchedBackend(), broken, R)
    ref, _ = _run(BatchedBackend(), [c for c in clients if c.client_id != 2], R)
    assert isinstance(got[2], OSError) and "disk on fire" in str(got[2])
    for cid in (0, 1, 3):
        assert all(torch.equal(got[cid].factors[k], ref[cid].factors[k]) for k in ref[cid].factors)


def _uneven(clients: list[ClientData], sizes: tuple[int, ...]) -> list[ClientData]:
    """The clients with ``sizes`` training samples: different numbers of batches, short last batches."""
    out = []
    for c, n in zip(clients, sizes):
        x, y = c.train.tensors  # type: ignore[attr-defined]
        out.append(dataclasses.replace(c, train=TensorDataset(x[:n], y[:n])))
    return out


def test_batch_order_is_the_order_a_lightning_fit_draws() -> None:
    """Lightning takes len(loader) batches per epoch: with 48 samples in batches of 16 the sampler's tail (a
    second randperm) is never drawn, with 37 it is; both must match what a real fit reads."""
    from hilora_lightning.federation.local import batch_order, fit_current

    class Recorder(Dataset):
        def __init__(self, n: int) -> None:
            self.n, self.read = n, []

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int):
            self.read.append(i)
            return torch.zeros(3, 32, 32), 0

    for n in (48, 37):
        data = Recorder(n)
        fit_current(HiLoRAViT(), data, seed=7, batch_size=16, local_epochs=3, local_steps=None, trainer_kwargs={})
        assert data.read == [i for batch in batch_order(n, 7, 16, 3, None) for i in batch]
        data = Recorder(n)
        fit_current(HiLoRAViT(), data, seed=7, batch_size=16, local_epochs=1, local_steps=5, trainer_kwargs={})
        assert data.read == [i for batch in batch_order(n, 7, 16, 1, 5) for i in batch]


@pytest.mark.parametrize("stage", [R, C, L])
def test_epoch_budgets_over_uneven_clients_batch_and_equal_the_sequential_executor(stage: Tier) -> None:
    """2 epochs of batch 16 over 37 / 50 / 23 / 41 samples: 3, 4, 2, 3 batches per epoch, every epoch's last short;
    the clients that finish first must not move while the others go on (AdamW would move them on a zero
    gradient).

    gamma = 1: at gamma = 5 one layer of client 0's leaf is ill-conditioned here (input noise of 1e-6 relative
    moves the *sequential* run's product there by 1e-2), so no tolerance about float order could hold; at
    gamma = 1 that noise moves the sequential products by <= 2e-4 and the batched gap is below it."""
    clients = _uneven(digits_federation(4, num_groups=2), (37, 50, 23, 41))
    said: list[str] = []
    epochs = Budget(16, 2, None)
    seq, seq_backend = _run(InProcessBackend(), clients, stage, gamma=1.0, budget=epochs)
    bat, bat_backend = _run(BatchedBackend(notice=said.append), clients, stage, gamma=1.0, budget=epochs)
    assert said == []
    for cid in seq:
        a = seq_backend.store(cid).kept[L] if stage is L else seq[cid].factors
        b = bat_backend.store(cid).kept[L] if stage is L else bat[cid].factors
        assert _gap(a, b) < PRODUCT_RTOL, (cid, _gap(a, b))
        torch.testing.assert_close(bat_backend.store(cid).head or bat[cid].head,
                                   seq_backend.store(cid).head or seq[cid].head, rtol=0, atol=1e-4)
    # the freeze after the last batch matters: without it the 23-sample client moves by more than the tolerance
    from hilora_lightning.federation import batched_pass

    real = batched_pass._Finished.restore
    batched_pass._Finished.restore = lambda self, params: None  # type: ignore[method-assign]
    try:
        moved, moved_backend = _run(BatchedBackend(), clients, stage, gamma=1.0, budget=epochs)
    finally:
        batched_pass._Finished.restore = real  # type: ignore[method-assign]
    a = seq_backend.store(2).kept[L] if stage is L else seq[2].factors
    b = moved_backend.store(2).kept[L] if stage is L else moved[2].factors
    assert _gap(a, b) > PRODUCT_RTOL


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_clips_each_clients_own_gradient_as_its_own_fit_does(algorithm: str) -> None:
    clients = digits_federation(3, num_groups=2)
    clip = {"gradient_clip_val": 0.05, "gradient_clip_algorithm": algorithm}

    def run(backend, kwargs):
        model = HiLoRAViT(lr=3e-3)
        strategy = HiLoRAStrategy(model, FederationConfig(rounds=6, root_rounds=(1, 2), cluster_rounds=(1, 2),
                                                          **FAST))
        state = strategy.initial_state([c.client_id for c in clients])
        backend.bind(ClientRuntime(model, kwargs), clients)
        return backend.fit(strategy.configure_fit(state, 1, [c.client_id for c in clients], R))

    said: list[str] = []
    seq, bat = run(InProcessBackend(), clip), run(BatchedBackend(notice=said.append), clip)
    unclipped = run(BatchedBackend(), {})
    assert said == []
    for cid in seq:
        assert _gap(seq[cid].factors, bat[cid].factors) < PRODUCT_RTOL, (cid, _gap(seq[cid].factors, bat[cid].factors))
        assert _gap(seq[cid].factors, unclipped[cid].factors) > PRODUCT_RTOL  # the clip binds
    assert batch_refusal(HiLoRAViT(), {**clip, "precision": "16-mixed"}) == "gradient clipping under fp16 loss scaling"


def test_plans_that_cannot_batch_run_alone_with_one_notice_and_equal_the_sequential_executor() -> None:
    from hilora_lightning import AdapterConfig

    said: list[str] = []
    clients = digits_federation(3, num_groups=2)
    dropout = {"adapter": AdapterConfig(root={"dropout": 0.1})}
    got, _ = _run(BatchedBackend(notice=said.append), clients, R, **dropout)
    ref, _ = _run(InProcessBackend(), clients, R, **dropout)
    assert said == ["batched backend: dropout draws differ from a client's own fit run one client at a time"]
    for cid in ref:
        assert all(torch.equal(got[cid].factors[k], ref[cid].factors[k]) for k in ref[cid].factors)
    model = HiLoRAViT()
    assert batch_refusal(model, {"accumulate_grad_batches": 2}) == ("Trainer options ['accumulate_grad_batches'] "
                                                                   "need a Lightning fit per client")
    assert batch_refusal(model, {"precision": "bf16-mixed", "accelerator": "cpu"}) is None

    class Focal(HiLoRAViT):
        def compute_loss(self, logits, target):  # a user's own loss: the batched pass would not call it
            return super().compute_loss(logits, target) * 2

    assert batch_refusal(Focal(), {}) == "Focal overrides compute_loss"
    with pytest.raises(ValueError, match="clients_per_pass must be >= 1 or None, got 0"):
        BatchedBackend(clients_per_pass=0)


def test_a_federation_on_the_batched_backend_matches_the_sequential_one_and_resumes_bitwise(tmp_path) -> None:
    """All three stages, clustering, unseen clients routed by loss and fine-tuned; chunks of 2 clients; the
    accuracy tables agree within one test image per client; a resumed batched run equals an uninterrupted one."""
    everyone = digits_federation(7, num_groups=2)
    cfg = FederationConfig(rounds=4, root_rounds=(1, 2), cluster_rounds=(1, 1), finetune_epochs=1, **FAST)

    def orch(backend, **kw):
        return FederatedOrchestrator(HiLoRAViT(lr=3e-3), everyone[:5], cfg, unseen=everyone[5:], progress=False,
                                     backend=backend, **kw)

    seq = orch(None).run()
    bat = orch(BatchedBackend(clients_per_pass=2)).run()
    assert bat.assignment == seq.assignment and bat.routing == seq.routing
    for cid, acc in seq.client_accuracy.items():
        assert abs(bat.client_accuracy[cid] - acc) <= 1 / len(everyone[cid].test) + 1e-9
    for view, row in seq.tierwise.items():
        assert abs(bat.tierwise[view]["mean"] - row["mean"]) <= max(1 / len(c.test) for c in everyone[:5]) + 1e-9
    first = orch(BatchedBackend(clients_per_pass=2), checkpoint_path=tmp_path / "fed.pt")
    first.run(stop_after=2)
    resumed = orch(BatchedBackend(clients_per_pass=2), checkpoint_path=tmp_path / "fed.pt").run(resume=True)
    assert resumed.client_accuracy == bat.client_accuracy and resumed.tierwise == bat.tierwise


def test_batched_scores_equal_the_sequential_scores() -> None:
    clients = digits_federation(4, num_groups=2)
    model = HiLoRAViT(lr=3e-3)
    cfg = FederationConfig(rounds=4, root_rounds=(1, 2), cluster_rounds=(1, 1), **FAST)
    strategy = HiLoRAStrategy(model, cfg)
    state = strategy.initial_state([c.client_id for c in clients])
    g = torch.Generator().manual_seed(3)
    state.root = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in state.root.items()}
    plans = strategy.evaluation_requests(state, [R])
    seq, bat = InProcessBackend(), BatchedBackend()
    seq.bind(ClientRuntime(model), clients)
    bat.bind(ClientRuntime(model), clients)
    assert bat.evaluate(plans) == seq.evaluate(plans)
    loss_plans = {c: dataclasses.replace(p, metric="loss") for c, p in plans.items()}
    a, b = seq.evaluate(loss_plans), bat.evaluate(loss_plans)
    assert all(abs(a[c] - b[c]) <= 1e-5 * abs(a[c]) for c in a)  # float32 sums of ~40 losses in another order


def test_a_client_with_images_of_the_wrong_size_fails_alone_with_its_own_error() -> None:
    """Not a data error the pass can pin on a client (the concatenation fails): the chunk runs one client at a
    time, so the bad client fails with the backbone's own message and the others equal the sequential run."""
    from torch.utils.data import TensorDataset

    said: list[str] = []
    clients = digits_federation(3, num_groups=2)
    small = TensorDataset(torch.zeros(20, 3, 28, 28), torch.zeros(20, dtype=torch.long))
    bad = [*clients[:2], ClientData(2, small, clients[2].test, clients[2].group)]
    got, _ = _run(BatchedBackend(notice=said.append), bad, R)
    ref, _ = _run(InProcessBackend(), bad, R)
    assert isinstance(got[2], Exception) and type(got[2]) is type(ref[2]) and str(got[2]) == str(ref[2])
    assert len(said) == 1 and said[0].startswith("batched backend: a pass that raised (RuntimeError")
    for cid in (0, 1):
        assert all(torch.equal(got[cid].factors[k], ref[cid].factors[k]) for k in ref[cid].factors)


def test_a_non_finite_shared_slot_fails_every_client_and_leaves_the_base_weights_untouched() -> None:
    clients = digits_federation(3, num_groups=2)
    model = HiLoRAViT(lr=3e-3)
    base = {p: layer.base_layer.weight.detach().clone() for p, layer in model.state_layers().items()}
    cfg = FederationConfig(rounds=6, root_rounds=(1, 2), cluster_rounds=(1, 2), **FAST)
    strategy = HiLoRAStrategy(model, cfg)
    state = strategy.initial_state([c.client_id for c in clients])
    state.root = {k: torch.full_like(v, float("nan")) for k, v in state.root.items()}
    state.stage, state.assignment, state.num_clusters = C, {c.client_id: 0 for c in clients}, 1
    state.clusters, state.cluster_heads = {0: strategy.spec.fresh(C, 1)}, {0: dict(state.global_head)}
    said: list[str] = []
    backend = BatchedBackend(notice=said.append)
    backend.bind(ClientRuntime(model), clients)
    got = backend.fit(strategy.configure_fit(state, 2, [c.client_id for c in clients], C))
    assert all(isinstance(r, Exception) for r in got.values()) and said and "holds NaN or Inf values" in said[0]
    for path, layer in model.state_layers().items():
        assert layer.batched is None and layer.merged == ()
        assert torch.equal(layer.base_layer.weight, base[path])


def _state_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The products' gap when both factors are there, else the state's own relative difference (a kept ``B``)."""
    if any(k.endswith(".lora_A") for k in a) and any(k.endswith(".lora_B") for k in a):
        return _gap(a, b)
    return max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) for k in a)


@pytest.mark.parametrize("name", ["fdlora", "fedalt", "feddpa-f", "feddpa-t", "fedit", "fedsa-lora", "flexlora",
                                  "local-lora", "pf2lora"])
def test_every_baseline_batches_and_equals_the_sequential_runner(name: str) -> None:
    """Each baseline's plans batch (FedALT's input gates over the frozen rest-of-world and the personal LoRA,
    FDLoRA's scalar fusion phase, FedSA-LoRA's kept B, FedDPA's local rounds, the unseen client's fine-tune):
    every client's kept slots, gates and head, the shared state and the accuracy tables as the sequential runner
    gives them, without a notice."""
    from hilora_lightning.baselines import BASELINES, BaselineRunner

    everyone = digits_federation(5, num_groups=2)
    cfg = FederationConfig(rounds=2, schedule="per_round", root_rounds=(1, 1), cluster_rounds=(1, 1),
                           local_steps=3, batch_size=16, finetune_epochs=1)
    said: list[str] = []

    def run(backend):
        runner = BaselineRunner(BASELINES[name](rounds=2, local_rounds=1), HiLoRAViT(lr=3e-3), everyone[:4], cfg,
                                unseen=everyone[4:], progress=False, backend=backend)
        return runner, runner.run()

    seq_runner, seq = run(None)
    bat_runner, bat = run(BatchedBackend(notice=said.append))
    assert said == []
    for cid in range(4):
        a, b = seq_runner.client_store(cid), bat_runner.client_store(cid)
        assert sorted(a.kept) == sorted(b.kept) and (a.gates is None) == (b.gates is None)
        for slot in a.kept:
            assert _state_gap(a.kept[slot], b.kept[slot]) < PRODUCT_RTOL, (cid, slot)
        if a.gates is not None:
            torch.testing.assert_close(b.gates, a.gates, rtol=0, atol=1e-4)
        if a.head is not None:
            torch.testing.assert_close(b.head, a.head, rtol=0, atol=1e-4)
    if seq_runner.global_state:
        assert _state_gap(seq_runner.global_state, bat_runner.global_state) < PRODUCT_RTOL
    for cid, acc in seq.client_accuracy.items():
        assert abs(bat.client_accuracy[cid] - acc) <= 1 / len(everyone[cid].test) + 1e-9
    for view, row in seq.tierwise.items():
        assert abs(bat.tierwise[view]["mean"] - row["mean"]) <= max(1 / len(c.test) for c in everyone) + 1e-9
