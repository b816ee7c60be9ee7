"""Our LoRA/LoHA/LoKr follow PEFT's conventions exactly: factor shapes, scales and the dimension split.

Each adapter is built here and in PEFT on the same frozen layer, our factors are copied into PEFT's parameters
(only reshaped), and the two outputs must agree in float64. Skipped when `peft` is not installed.
"""
import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft.tuners.lokr.layer import factorization  # noqa: E402

from lowrank_tales.adapters import LoHA, LoKr, LoRA, split_dim  # noqa: E402
from tolerance import assert_close  # noqa: E402


def test_split_dim_matches_peft_factorization():
    for dim in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 64):
            assert split_dim(dim, factor) == factorization(dim, factor), (dim, factor)


def peft_layer(base, config):
    "The PEFT-adapted copy of `base` (float64), and the adapted layer inside it."
    model = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), config).double()
    return model, model.base_model.model[0]


def randomize(ad):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for f in ad.factors: f.copy_(torch.randn(f.shape, generator=gen, dtype=f.dtype))
    return ad


def copy_into(ours, theirs: dict):
    "Copy our factors into PEFT's parameters (reshaped to PEFT's layout), checking the sizes agree."
    with torch.no_grad():
        for name, p in theirs.items():
            src = getattr(ours, name)
            assert src.numel() == p.numel(), (name, tuple(src.shape), tuple(p.shape))
            p.copy_(src.reshape(p.shape))


BASES = [lambda: nn.Linear(48, 30), lambda: nn.Linear(1024, 64), lambda: nn.Conv2d(8, 12, 3, padding=1), lambda: nn.Conv2d(8, 12, 1)]


def inputs(base):
    return torch.randn(2, base.in_channels, 5, 5, dtype=torch.float64) if isinstance(base, nn.Conv2d) else torch.randn(3, base.in_features, dtype=torch.float64)


@pytest.mark.parametrize("make_base", BASES)
def test_lora_equals_peft(make_base):
    base = make_base().double()
    ours = randomize(LoRA(copy.deepcopy(base), rank=4, alpha=11))
    model, layer = peft_layer(base, peft.LoraConfig(r=4, lora_alpha=11, target_modules=["0"]))
    assert layer.scaling["default"] == ours.scale
    copy_into(ours, {"A": layer.lora_A["default"].weight, "B": layer.lora_B["default"].weight})
    x = inputs(base)
    assert_close(model(x), ours(x))
    assert_close(layer.get_delta_weight("default").reshape(ours.d_out, -1), ours.delta_weight())


@pytest.mark.parametrize("make_base", BASES)
def test_loha_equals_peft(make_base):
    base = make_base().double()
    # PEFT multiplies the LoHa update by `torch.tensor(alpha / r)`, a float32 scalar: with alpha / r = 2.5 (exact in
    # float32) the comparison can be exact in float64.
    ours = randomize(LoHA(copy.deepcopy(base), rank=4, alpha=10))
    model, layer = peft_layer(base, peft.LoHaConfig(r=4, alpha=10, target_modules=["0"]))
    assert layer.scaling["default"] == pytest.approx(ours.scale)
    copy_into(ours, {"B1": layer.hada_w1_a["default"], "A1": layer.hada_w1_b["default"],
                     "B2": layer.hada_w2_a["default"], "A2": layer.hada_w2_b["default"]})
    x = inputs(base)
    assert_close(model(x), ours(x))


@pytest.mark.parametrize("make_base", BASES)
@pytest.mark.parametrize("rank", [1, 16])  # a low-rank B (w2_a, w2_b) and a full B (w2)
def test_lokr_equals_peft(make_base, rank):
    base = make_base().double()
    ours = randomize(LoKr(copy.deepcopy(base), rank=min(rank, 8) if isinstance(base, nn.Conv2d) else rank, alpha=5))
    r = ours.rank
    model, layer = peft_layer(base, peft.LoKrConfig(r=r, alpha=5, target_modules=["0"]))
    assert layer.scaling["default"] == pytest.approx(ours.scale)
    names = {"A": layer.lokr_w1["default"]}
    if ours.low_rank: names.update(B1=layer.lokr_w2_a["default"], B2=layer.lokr_w2_b["default"])
    else: names.update(B=layer.lokr_w2["default"])
    assert ("default" in layer.lokr_w2) == (not ours.low_rank)  # the same rule chose the same structure
    copy_into(ours, names)
    assert tuple(layer.lokr_w1["default"].shape) == tuple(ours.A.shape)
    x = inputs(base)
    assert_close(model(x), ours(x))
