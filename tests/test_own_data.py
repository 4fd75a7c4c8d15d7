"""The user's own data: samples as tuples or dicts, DataModules, Hugging Face data sets, a folder per client,
the validation split, the data hook, predict_step, fail-fast and the one-line errors."""

from __future__ import annotations

import sys
import textwrap

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from helpers import digits_tensors as _digits_tensors
from helpers import write_png_sites as _write_png_sites
from hilora_lightning import HiLoRAViT
from hilora_lightning.data import digits_federation
from hilora_lightning.data.clients import ClientData, as_clients, validation_split
from hilora_lightning.data.hook import BuilderError, call_builder
from hilora_lightning.data.samples import SampleFormatError, SampleKeys, XYCollate, dataset_labels, split_batch
from hilora_lightning.errors import ClientDataCheckError
from hilora_lightning.federation import FederatedOrchestrator, FederationConfig, FederationError
from hilora_lightning.federation.failures import describe_failures
from hilora_lightning.federation.local import LoaderSpec

FAST = {"rounds": 4, "root_rounds": (1, 1), "cluster_rounds": (1, 1), "local_steps": 2, "batch_size": 8}


class DictDigits(Dataset):
    """Samples as dicts, the way Hugging Face image data sets yield them."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, image_key: str = "pixel_values", label_key: str = "label"):
        self.x, self.y, self.ik, self.lk = x, y, image_key, label_key

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {self.ik: self.x[i], self.lk: int(self.y[i]), "path": f"img{i}.png"}


class DM(pl.LightningDataModule):
    def __init__(self, x, y, xt, yt, with_val: bool = True):
        super().__init__()
        self.x, self.y, self.xt, self.yt, self.with_val = x, y, xt, yt, with_val
        self.calls: list[str] = []

    def prepare_data(self) -> None:
        self.calls.append("prepare")

    def setup(self, stage: str) -> None:
        self.calls.append(f"setup:{stage}")
        n = len(self.y)
        self.train_set = TensorDataset(self.x[: n - 4], self.y[: n - 4])
        self.val_set = TensorDataset(self.x[n - 4:], self.y[n - 4:])
        self.test_set = TensorDataset(self.xt, self.yt)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=64, shuffle=True)

    def test_dataloader(self):
        return DataLoader(self.test_set, batch_size=64)


class DMVal(DM):
    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=64)


def _run(clients, unseen=(), **kw):
    orch = FederatedOrchestrator(HiLoRAViT(lr=3e-3), clients, FederationConfig(**FAST), unseen=unseen,
                                 progress=False, raise_client_errors=True, **kw)
    result = orch.run()
    stages = [r.stage for r in result.records]
    assert {"root", "cluster", "leaf"} <= set(stages), stages
    assert set(result.tierwise) == {"root", "root+cluster", "root+cluster+leaf"}
    return orch, result


# ---------------------------------------------------------------------------- samples


def test_split_batch_reads_tensors_tuples_and_dicts():
    x, y = torch.zeros(2, 3, 4, 4), torch.tensor([1, 0])
    assert split_batch((x, y))[1] is y
    assert split_batch([x, y, "extra"])[0] is x
    assert split_batch(x, need_label=False) == (x, None)
    assert split_batch((x,), need_label=False) == (x, None)
    got = split_batch({"image": x, "labels": y})
    assert got[0] is x and got[1] is y
    assert split_batch({"px": x, "cls": y}, SampleKeys("px", "cls"))[1] is y
    with pytest.raises(SampleFormatError, match=r"none of the image keys .* \(its keys: \['cls', 'px'\]\)"):
        split_batch({"px": x, "cls": y})
    with pytest.raises(SampleFormatError, match="bare tensor"):
        split_batch(x)
    with pytest.raises(SampleFormatError, match="got str"):
        split_batch("abc")


def test_xy_collate_batches_dict_samples_and_user_collate():
    data = DictDigits(torch.randn(5, 3, 4, 4), torch.tensor([0, 1, 2, 3, 4]))
    x, y = XYCollate()([data[i] for i in range(3)])
    assert torch.equal(x, data.x[:3]) and y.tolist() == [0, 1, 2] and y.dtype == torch.long

    def mine(samples):  # a user's collate returning a dict batch
        return {"pixel_values": torch.stack([s["pixel_values"] for s in samples]) * 2,
                "label": torch.tensor([s["label"] for s in samples])}

    x2, y2 = XYCollate(mine)([data[i] for i in range(2)])
    assert torch.equal(x2, data.x[:2] * 2) and y2.tolist() == [0, 1]


def test_pil_samples_get_the_transform_hint():
    from PIL import Image

    samples = [{"image": Image.new("RGB", (4, 4)), "label": 0}] * 2
    with pytest.raises(SampleFormatError, match="PIL images .* give the data set a transform"):
        XYCollate()(samples)
    with pytest.raises(SampleFormatError, match="PIL images"):
        XYCollate()([(Image.new("RGB", (4, 4)), 0)] * 2)


def test_dataset_labels_without_reading_images():
    from hilora_lightning.data.images import ArrayImageDataset

    y = torch.tensor([3, 1, 4, 1, 5])
    assert dataset_labels(Subset(TensorDataset(torch.zeros(5, 1), y), [4, 0])).tolist() == [5, 3]
    arr = ArrayImageDataset(np.zeros((5, 2, 2, 3), np.uint8), y.numpy(), indices=[2, 3])
    assert dataset_labels(arr).tolist() == [4, 1]
    assert dataset_labels(DictDigits(torch.zeros(5, 1), y)).tolist() == y.tolist()  # read sample by sample
    assert dataset_labels(DictDigits(torch.zeros(5, 1), y), read_samples=False) is None


def test_loader_spec_options_and_errors():
    spec = LoaderSpec.from_dict({"image_key": "px", "label_key": "cls",
                                 "collate_fn": "torch.utils.data:default_collate"})
    assert spec.keys == SampleKeys("px", "cls")
    x, y = spec.collate()([{"px": torch.ones(2), "cls": 1}, {"px": torch.zeros(2), "cls": 0}])
    assert y.tolist() == [1, 0] and x.shape == (2, 2)
    with pytest.raises(ValueError, match="unknown loader option.*valid: num_workers, pin_memory"):
        LoaderSpec.from_dict({"workers": 2})
    with pytest.raises(ValueError, match="loader.collate_fn 'nope.mod:f': cannot import module 'nope.mod'"):
        LoaderSpec(collate_fn="nope.mod:f")
    with pytest.raises(ValueError, match="collate_fn must be 'package.module:function', got 'nocolon'"):
        LoaderSpec(collate_fn="nocolon")


# ---------------------------------------------------------------------------- ClientData and the validation split


def test_validation_split_is_stratified_disjoint_and_seeded():
    y = torch.arange(40) % 4
    ds = TensorDataset(torch.arange(40).float().unsqueeze(1), y)  # feature = row index
    rest, val = validation_split(ds, 0.25, seed=3)
    assert isinstance(rest, TensorDataset) and isinstance(val, TensorDataset)
    ri, vi = rest.tensors[0].squeeze(1).long(), val.tensors[0].squeeze(1).long()
    assert len(ri) == 32 and len(vi) == 8  # round(0.25 * 10) = 2 of each class's 10
    assert set(ri.tolist()).isdisjoint(vi.tolist()) and len(set(ri.tolist()) | set(vi.tolist())) == 40
    assert torch.equal(rest.tensors[1], y[ri]) and torch.equal(val.tensors[1], y[vi])  # rows stay paired
    assert np.bincount(val.tensors[1].numpy()).tolist() == [2, 2, 2, 2]
    assert torch.equal(validation_split(ds, 0.25, seed=3)[1].tensors[0], val.tensors[0])
    assert not torch.equal(validation_split(ds, 0.25, seed=4)[1].tensors[0], val.tensors[0])
    other_rest, other_val = validation_split(DictDigits(torch.zeros(40, 1), y), 0.25, seed=3)  # not tensors: views
    assert isinstance(other_val, Subset) and other_val.indices == vi.tolist()


def test_client_data_holds_out_validation_unless_given():
    ds = TensorDataset(torch.zeros(20, 1), torch.arange(20) % 2)
    c = ClientData(0, ds, ds)
    assert (c.num_samples, len(c.val), c.eval_split) == (18, 2, "val")
    assert c.split("val") is c.val and c.split("test") is ds
    none = ClientData(1, ds, ds, val_fraction=0)
    assert none.val is None and none.eval_split == "test" and none.split("val") is ds and none.num_samples == 20
    given = ClientData(2, ds, ds, val=Subset(ds, [0, 1]))
    assert given.num_samples == 20 and len(given.val) == 2
    with pytest.raises(ValueError, match="a training set of 1 sample.*pass val=... or val_fraction=0"):
        ClientData(3, Subset(ds, [0]), ds)


def test_client_data_refuses_what_it_cannot_use():
    x, y, xt, yt = _digits_tensors(1)[0]
    with pytest.raises(TypeError, match=r"client 0: train is a LightningDataModule; build the client with "
                                        r"ClientData.from_datamodule\(0, datamodule\)"):
        ClientData(0, DM(x, y, xt, yt), DM(x, y, xt, yt))

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from ()

    with pytest.raises(TypeError, match="train must be a map-style data set .* got Stream"):
        ClientData(0, Stream(), TensorDataset(xt, yt))


def test_from_datamodule_calls_the_hooks_and_takes_its_splits():
    x, y, xt, yt = _digits_tensors(1)[0]
    dm = DMVal(x, y, xt, yt)
    c = ClientData.from_datamodule(5, dm, group=1)
    assert dm.calls == ["prepare", "setup:fit", "setup:test"]
    assert (c.client_id, c.group, c.num_samples, len(c.val), len(c.test)) == (5, 1, len(y) - 4, 4, len(yt))
    no_val = ClientData.from_datamodule(6, DM(x, y, xt, yt))  # no val_dataloader: a slice of train
    assert no_val.num_samples + len(no_val.val) == len(y) - 4


# ---------------------------------------------------------------------------- federations from own data


def test_federation_from_datamodules_with_unseen():
    data = _digits_tensors(5)
    dms = [DMVal(*d) for d in data]
    orch, result = _run(dms[:4], unseen=dms[4:])
    assert sorted(orch.clients) == [0, 1, 2, 3] and sorted(orch.unseen) == [4]
    assert all(r.split == "val" for r in result.records) and result.splits == {"rounds": "val", "final": "test"}
    assert "finetuned" in result.generalization


def test_federation_from_dict_samples_with_custom_keys():
    data = _digits_tensors(4)
    clients = [ClientData(i, DictDigits(x, y, "img", "cls"), DictDigits(xt, yt, "img", "cls"), label_key="cls")
               for i, (x, y, xt, yt) in enumerate(data)]
    _, result = _run(clients[:3], unseen=clients[3:], loader={"image_key": "img", "label_key": "cls"})
    assert 0.0 <= result.tierwise["root+cluster+leaf"]["mean"] <= 1.0


def test_dict_samples_train_like_tuples_bitwise():
    """A dict sample and a tuple sample of the same tensors give the same federation, to the bit."""
    data = _digits_tensors(3)
    tuples = [ClientData(i, TensorDataset(x, y), TensorDataset(xt, yt)) for i, (x, y, xt, yt) in enumerate(data)]
    dicts = [ClientData(i, DictDigits(x, y), DictDigits(xt, yt)) for i, (x, y, xt, yt) in enumerate(data)]
    a, ra = _run(tuples)
    b, rb = _run(dicts)
    assert ra.client_accuracy == rb.client_accuracy
    for k, v in a.state.root.items():
        assert torch.equal(v, b.state.root[k]), k


def test_federation_from_a_hugging_face_dataset():
    datasets = pytest.importorskip("datasets")
    from hilora_lightning.data.hf import hf_clients

    data = _digits_tensors(4)
    rows = {"image": [], "label": [], "site": []}
    for site, (x, y, _, _) in enumerate(data):
        for img, label in zip(x, y):
            rows["image"].append(((img[0].clamp(-1, 1) + 1) * 127.5).to(torch.uint8).numpy())
            rows["label"].append(int(label))
            rows["site"].append(site)
    ds = datasets.Dataset.from_dict(rows)
    clients = hf_clients(ds, client_column="site", img_size=32)
    assert [c.client_id for c in clients] == [0, 1, 2, 3]
    assert tuple(clients[0].train[0]["pixel_values"].shape) == (3, 32, 32)
    _run(clients[:3], unseen=clients[3:])
    drawn = hf_clients(ds, num_clients=5, partition="dirichlet", alpha=0.5, img_size=32)
    assert sum(c.num_samples + len(c.val) + len(c.test) for c in drawn) == len(ds)
    with pytest.raises(ValueError, match="no column 'owner'"):
        hf_clients(ds, client_column="owner")


def test_flower_datasets_partitioner():
    pytest.importorskip("flwr_datasets")
    datasets = pytest.importorskip("datasets")
    from hilora_lightning.data.hf import flower_partition

    ds = datasets.Dataset.from_dict({"image": [np.zeros((8, 8, 3), np.uint8)] * 60, "label": [0, 1, 2] * 20})
    every = flower_partition(ds, "dirichlet", num_partitions=3, alpha=1.0, img_size=32, val_fraction=0)
    assert [c.client_id for c in every] == [0, 1, 2]
    assert sum(c.num_samples + len(c.test) for c in every) == 60
    one = flower_partition(ds, "dirichlet", num_partitions=3, partition_id=2, alpha=1.0, img_size=32, val_fraction=0)
    assert one[0].num_samples == every[2].num_samples  # the same partition, built on its node alone
    with pytest.raises(ValueError, match="partitioner must be one of"):
        flower_partition(ds, "zipf")


def test_federation_from_a_folder_per_client(tmp_path):
    from hilora_lightning.data.federations import image_folder_clients

    data = _digits_tensors(4)
    _write_png_sites(tmp_path, data)
    clients = image_folder_clients(tmp_path, img_size=32)
    assert [c.client_id for c in clients] == [0, 1, 2, 3]
    total = sum(c.num_samples + len(c.val) + len(c.test) for c in clients)
    assert total == sum(len(d[1]) for d in data)
    _run(clients[:3], unseen=clients[3:])


# ---------------------------------------------------------------------------- the data hook


BUILDER = '''
import torch
from torch.utils.data import TensorDataset
from hilora_lightning.data import digits_federation

CALLS = []

def build(n=4, held=1, partition_id=None, num_partitions=None):
    CALLS.append((n, partition_id, num_partitions))
    pairs = [(TensorDataset(*c.train.tensors), TensorDataset(*c.test.tensors))
             for c in digits_federation(n, num_groups=2, val_fraction=0)]
    if partition_id is not None:
        return [pairs[partition_id]]
    return pairs[: n - held], pairs[n - held:]

def bad():
    return 42

def wrong_items():
    return [1, 2]
'''


@pytest.fixture()
def builder_module(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(textwrap.dedent(BUILDER))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_data", None)
    yield "my_data"
    sys.modules.pop("my_data", None)


def test_call_builder_shapes_and_partition(builder_module):
    clients, unseen = call_builder(f"{builder_module}:build", {"n": 4})
    assert len(clients) == 3 and len(unseen) == 1
    mine, _ = call_builder(f"{builder_module}:build", {"n": 4}, partition=(2, 4))
    assert len(mine) == 1 and sys.modules[builder_module].CALLS[-1] == (4, 2, 4)
    with pytest.raises(BuilderError, match=r"data builder 'my_data:bad' returned int as its clients; expected a list"):
        call_builder(f"{builder_module}:bad")
    with pytest.raises(BuilderError, match=r"does not take the arguments \['m'\] \(its signature: \(n=4, held=1"):
        call_builder(f"{builder_module}:build", {"m": 1})
    with pytest.raises(ValueError, match="module 'my_data' has no attribute 'nothere'"):
        call_builder(f"{builder_module}:nothere")


def test_config_builder_runs_through_experiment(builder_module, tmp_path):
    from hilora_lightning.config_check import ConfigError
    from hilora_lightning.experiment import build_clients, build_experiment

    data = {"builder": f"{builder_module}:build", "kwargs": {"n": 5, "held": 1}}
    clients, unseen = build_clients(data, seed=0)
    assert [c.client_id for c in clients] == [0, 1, 2, 3] and [c.client_id for c in unseen] == [4]
    assert all(c.val is not None for c in clients)
    with pytest.raises(ValueError, match=r"data.builder builds the clients itself; \['num_clients'\] do not apply"):
        build_clients({**data, "num_clients": 3}, seed=0)
    with pytest.raises((BuilderError, ConfigError), match=r"my_data:wrong_items.*client 0: expected a ClientData"):
        build_experiment({"data": {"builder": f"{builder_module}:wrong_items"}, "out_dir": str(tmp_path / "o")})


# ---------------------------------------------------------------------------- predict_step


def test_trainer_predict_returns_logits_of_every_batch_form():
    model = HiLoRAViT(num_classes=10)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        want = model(x)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    for loader in (DataLoader(TensorDataset(x), batch_size=4),
                   DataLoader(TensorDataset(x, torch.zeros(6, dtype=torch.long)), batch_size=4),
                   DataLoader(DictDigits(x, torch.zeros(6, dtype=torch.long)), batch_size=4),
                   DataLoader(x, batch_size=4)):
        out = torch.cat(trainer.predict(model, loader))
        assert out.shape == (6, 10)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)  # same op order, batches of 4 vs 6


# ---------------------------------------------------------------------------- errors


def test_bad_labels_and_image_size_are_one_clear_line_before_round_one():
    data = _digits_tensors(2)
    bad_labels = [ClientData(i, TensorDataset(x, y + 5), TensorDataset(xt, yt))
                  for i, (x, y, xt, yt) in enumerate(data)]
    with pytest.raises(ClientDataCheckError, match=r"client 0: its train split has label 1[0-4], outside \[0, 10\).*"
                                                  "set model.num_classes"):
        FederatedOrchestrator(HiLoRAViT(), bad_labels, FederationConfig(**FAST), progress=False)
    small = [ClientData(i, TensorDataset(x[:, :, :28, :28], y), TensorDataset(xt[:, :, :28, :28], yt))
             for i, (x, y, xt, yt) in enumerate(data)]
    with pytest.raises(ClientDataCheckError, match=r"client 0: its images \(shape \(3, 28, 28\)\) do not fit the "
                                                  r"backbone .*set model.backbone_kwargs.img_size"):
        FederatedOrchestrator(HiLoRAViT(), small, FederationConfig(**FAST), progress=False)
    mixed = [ClientData(0, TensorDataset(*data[0][:2]), TensorDataset(*data[0][2:])),
             ClientData(1, TensorDataset(data[1][0][:, :, :28, :28], data[1][1]), TensorDataset(*data[1][2:]))]
    with pytest.raises(ClientDataCheckError, match=r"client 1: its train images have shape \(3, 28, 28\), client 0's "
                                                  r"\(3, 32, 32\)"):
        FederatedOrchestrator(HiLoRAViT(), mixed, FederationConfig(**FAST), progress=False)
    with pytest.raises(SampleFormatError, match=r"client 0: cannot read the training labels to hold out a stratified "
                                                r"validation split .*pass label_key=..., val=... or val_fraction=0"):
        ClientData(0, DictDigits(data[0][0], data[0][1], "pic", "lab"), DictDigits(data[0][2], data[0][3]))
    wrong = [ClientData(i, DictDigits(x, y, "pic", "y"), DictDigits(xt, yt, "pic", "y"))
             for i, (x, y, xt, yt) in enumerate(data)]
    with pytest.raises(ClientDataCheckError, match=r"client 0: its train samples cannot be read as \(image, label\): "
                                                  r"a dict sample/batch has none of the image keys"):
        FederatedOrchestrator(HiLoRAViT(), wrong, FederationConfig(**FAST), progress=False)


class Flaky(Dataset):
    """Reads fine for the pre-flight check, then fails: a client whose disk goes away mid-run."""

    def __init__(self, base: Dataset):
        self.base, self.reads = base, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        self.reads += 1
        if self.reads > 2:
            raise OSError(f"disk gone while reading sample {i}")
        return self.base[i]


def test_failures_are_listed_one_per_line_and_fail_fast_reraises():
    data = _digits_tensors(2)
    mk = lambda: [ClientData(i, Flaky(TensorDataset(x, y)), TensorDataset(xt, yt), val=TensorDataset(xt, yt))  # noqa: E731
                  for i, (x, y, xt, yt) in enumerate(data)]
    orch = FederatedOrchestrator(HiLoRAViT(), mk(), FederationConfig(**FAST), progress=False)
    with pytest.raises(FederationError) as info:
        orch.run()
    lines = str(info.value).splitlines()
    assert lines[0].startswith("round 1: only 0 of 2 clients succeeded")
    assert lines[1].startswith("  client 0: OSError: disk gone") and lines[2].startswith("  client 1: OSError")
    fast = FederatedOrchestrator(HiLoRAViT(), mk(), FederationConfig(**FAST), progress=False, raise_client_errors=True)
    with pytest.raises(OSError, match="disk gone") as raised:
        fast.run()
    assert any(frame.name == "__getitem__" for frame in raised.traceback)  # the client's own frame, not a wrapper
    assert fast.state.round == 0


def test_describe_failures_hints_once_per_cause():
    text = describe_failures({1: "IndexError: Target 12 is out of bounds.",
                              0: "IndexError: Target 11 is out of bounds.",
                              2: "AssertionError: Input height (28) doesn't match model (32).",
                              3: "SampleFormatError: a dict sample/batch has no label key 'y'"})
    lines = text.splitlines()
    assert [ln.split(":")[0] for ln in lines[:4]] == ["  client 0", "  client 1", "  client 2", "  client 3"]
    hints = [ln for ln in lines if ln.startswith("  hint:")]
    assert len(hints) == 3 and "num_classes" in hints[0] and "img_size" in hints[1] and "image_key" in hints[2]


def test_assert_inside_a_client_callback_reaches_the_test():
    class Check(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert batch[0].shape[0] == 999, "the batch size the test expects"

    orch = FederatedOrchestrator(HiLoRAViT(), digits_federation(2), FederationConfig(**FAST), progress=False,
                                 trainer_kwargs={"callbacks": [Check()]}, raise_client_errors=True)
    with pytest.raises(AssertionError, match="the batch size the test expects"):
        orch.run()


def test_as_clients_converts_and_refuses():
    ds = TensorDataset(torch.zeros(6, 1), torch.zeros(6, dtype=torch.long))
    cs = as_clients([(ds, ds), (ds, ds, ds)])
    assert [c.client_id for c in cs] == [0, 1] and len(cs[1].val) == 6
    with pytest.raises(TypeError, match="client 0: expected a ClientData, a LightningDataModule or a"):
        as_clients([ds])


# ---------------------------------------------------------------------------- the command line and Flower


def _builder_config(tmp_path, module: str) -> Path:  # noqa: F821
    cfg = tmp_path / "own.yaml"
    cfg.write_text(textwrap.dedent(f"""
        data: {{builder: "{module}:build", kwargs: {{n: 4, held: 1}}}}
        model: {{backbone: hilora-digits-vit}}
        federation: {{rounds: 4, root_rounds: [1, 1], cluster_rounds: [1, 1], local_steps: 2, batch_size: 8}}
        out_dir: {tmp_path / "run"}
    """))
    return cfg


def test_a_builder_config_runs_exports_and_predicts(builder_module, tmp_path, capsys):
    import json

    from PIL import Image

    from hilora_lightning.cli import main

    cfg = _builder_config(tmp_path, builder_module)
    assert main(["run", str(cfg), "--check"]) == 0
    assert f"data from builder {builder_module}:build" in capsys.readouterr().out
    assert main(["run", str(cfg)]) == 0
    assert main(["compare", str(cfg), "methods=fedit"]) == 0  # the same builder serves compare
    assert (tmp_path / "run" / "compare" / "comparison.json").is_file()
    run = tmp_path / "run"
    assert main(["export", str(run), "--client", "3", "--format", "tiers", "--out", str(tmp_path / "m")]) == 0
    x = digits_federation(4, num_groups=2, val_fraction=0)[3].test.tensors[0][:2]
    (tmp_path / "img").mkdir()
    for i, img in enumerate(x):
        Image.fromarray(((img.permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1) * 255).byte().numpy()).save(
            tmp_path / "img" / f"{i}.png")
    capsys.readouterr()
    assert main(["predict", str(run), str(tmp_path / "img"), "--client", "3", "--topk", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and all(len(r["classes"]) == 2 for r in rows)


def test_cli_errors_list_clients_per_line_and_fail_fast_raises(tmp_path, capsys):
    from hilora_lightning.cli import main

    cfg = tmp_path / "fm.yaml"
    cfg.write_text(f"data: {{name: fashion-mnist, root: {tmp_path / 'nowhere'}}}\nout_dir: {tmp_path / 'o'}\n")
    assert main(["run", str(cfg), "--check"]) == 2
    err = capsys.readouterr().err
    assert "data.root" in err and "nowhere' does not exist" in err and "config OK" not in err
    assert main(["run", str(cfg), "model.adapter.targets=mlp.fc1", "data.name=digits", "--check"]) == 0
    (tmp_path / "flaky.py").write_text(textwrap.dedent('''
        import torch
        from torch.utils.data import Dataset, TensorDataset
        from hilora_lightning.data import ClientData, digits_federation

        class Flaky(Dataset):
            def __init__(self, base):
                self.base, self.reads = base, 0
            def __len__(self):
                return len(self.base)
            def __getitem__(self, i):
                self.reads += 1
                if self.reads > 2:
                    raise OSError("disk gone")
                return self.base[i]

        def build():
            return [ClientData(c.client_id, Flaky(c.train), c.test, val=c.val) for c in digits_federation(3)]
    '''))
    sys.modules.pop("flaky", None)
    sys.path.insert(0, str(tmp_path))
    try:
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"data: {{builder: 'flaky:build'}}\nout_dir: {tmp_path / 'b'}\n"
                       "federation: {rounds: 4, root_rounds: [1, 1], cluster_rounds: [1, 1], local_steps: 2}\n")
        assert main(["run", str(bad)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err[0].startswith("hilora-fl: error: round 1: only 0 of 3 clients succeeded")
        assert [ln.split(":")[0] for ln in err[1:4]] == ["  client 0", "  client 1", "  client 2"]
        sys.modules.pop("flaky", None)
        with pytest.raises(OSError, match="disk gone"):
            main(["run", str(bad), "out_dir=" + str(tmp_path / "c"), "--fail-fast"])
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("flaky", None)


def test_a_flower_node_builds_only_its_partition(builder_module):
    pytest.importorskip("flwr")
    from types import SimpleNamespace

    from hilora_lightning.flower import client_app

    cfg = {"seed": 0, "data": {"builder": f"{builder_module}:build", "kwargs": {"n": 4}}}
    node = SimpleNamespace(node_config={"partition-id": 2, "num-partitions": 4}, run_config={})
    ((client, unseen),) = client_app._clients(cfg, node)
    assert sys.modules[builder_module].CALLS[-1] == (4, 2, 4) and not unseen
    want = digits_federation(4, num_groups=2, val_fraction=0)[2]
    assert client.num_samples + len(client.val) == want.num_samples and len(client.test) == len(want.test)
    with pytest.raises(ValueError, match="has no 'num-partitions'"):
        client_app._clients(cfg, SimpleNamespace(node_config={"partition-id": 2}, run_config={}))
    # a node serving two partitions (clients-per-node 2 of 2 nodes: 4 partitions) builds both
    pair = client_app._clients(cfg, SimpleNamespace(node_config={"partition-id": 1, "num-partitions": 2},
                                                    run_config={"clients-per-node": 2}))
    assert sys.modules[builder_module].CALLS[-2:] == [(4, 2, 4), (4, 3, 4)] and len(pair) == 2
