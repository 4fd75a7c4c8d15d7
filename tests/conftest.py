from __future__ import annotations

import pytest
import timm
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def test_vit() -> torch.nn.Module:
    return timm.create_model("test_vit", pretrained=False, num_classes=5).eval()
