"""`convert_adapter` and `add_weighted_adapter` against PEFT 0.21's `convert_to_lora` and `add_weighted_adapter` at
equal rank, on the same adapters (through `export_peft`). Skipped when `peft` is not installed."""
import copy

import pytest
import torch
from torch import nn

import lowrank_tales as lt
from lowrank_tales.injection import adapter_layers

peft = pytest.importorskip("peft")


def peft_copy(ours, base, tmp_path):
    "PEFT's model holding the same adapter as `ours` (through `export_peft`)."
    lt.export_peft(ours, tmp_path)
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_against_peft_convert_to_lora(tmp_path, method):
    "At equal rank PEFT's truncated SVD and ours agree where ours approximates; at the exact rank both are exact."
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 36), nn.ReLU(), nn.Linear(36, 24))
    ours = lt.inject(copy.deepcopy(base), method, targets=["0", "2"], alpha=4.0,
                     **(dict(rank=3) if method == "loha" else dict(rank=2)))
    with torch.no_grad():
        for a in adapter_layers(ours).values():
            for p in a.updates["default"].factors: p.normal_(std=0.3)
    theirs = peft_copy(ours, base, tmp_path)
    exact = 9 if method == "loha" else 8
    for rank in (2, exact):
        _, sd = peft.convert_to_lora(theirs, rank)
        report = lt.convert_adapter(ours, "default", "lora", rank=rank, new_name=f"r{rank}")
        for r in report:
            D = adapter_layers(ours)[r["layer"]].updates["default"].delta_weight().double()
            pre = f"base_model.model.{r['layer']}."
            P = sd[pre + "lora_B.weight"].double() @ sd[pre + "lora_A.weight"].double()
            peft_error = float((D - P).norm() / D.norm())
            assert abs(peft_error - r["rel_error"]) < 1e-4, (rank, peft_error, r)
            if rank == exact: assert r["rel_error"] < 1e-6 and peft_error < 1e-5


def test_against_peft_add_weighted_adapter_linear(tmp_path):
    "PEFT's `linear` on two LoRAs of equal rank sums scaled factors (cross terms); ours refuses, and `cat` is exact."
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 36), nn.ReLU(), nn.Linear(36, 24))
    ours = lt.inject(copy.deepcopy(base), "lora", targets=["0", "2"], rank=3, alpha=6.0)
    with torch.no_grad():
        for a in adapter_layers(ours).values():
            for p in a.updates["default"].factors: p.normal_(std=0.3)
    theirs = peft_copy(ours, base, tmp_path / "a")
    lt.inject(ours, "lora", targets=["0", "2"], name="b", rank=3, alpha=6.0)
    with torch.no_grad():
        for a in adapter_layers(ours).values():
            for p in a.updates["b"].factors: p.normal_(std=0.3)
    lt.export_peft(ours, tmp_path / "all", name="b")
    theirs.load_adapter(tmp_path / "all" / "b", adapter_name="b")
    theirs.add_weighted_adapter(["default", "b"], [0.5, 0.5], "lin", combination_type="linear")
    layer = adapter_layers(ours)["0"]
    D = 0.5 * layer.updates["default"].delta_weight() + 0.5 * layer.updates["b"].delta_weight()
    pl = theirs.base_model.model[0]
    P = pl.get_delta_weight("lin")
    assert float((P - D).norm() / D.norm()) > 0.1  # PEFT's linear is not the weighted sum
    with pytest.raises(ValueError, match="combination='linear' is not exact"):
        lt.add_weighted_adapter(ours, ["default", "b"], [0.5, 0.5], "lin")
    report = lt.add_weighted_adapter(ours, ["default", "b"], [0.5, 0.5], "cat", combination="cat")
    assert max(r["rel_error"] for r in report) < 1e-6


def test_against_peft_weight_one_rslora():
    "One rsLoRA adapter at weight 1.0: PEFT 0.21's result is not the adapter (measured here); ours is, bit for bit."
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 36), nn.ReLU(), nn.Linear(36, 24))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
                                                                      use_rslora=True, init_lora_weights=False))
    theirs.add_weighted_adapter(["default"], [1.0], "w", combination_type="linear")
    layer = theirs.base_model.model[0]
    D = layer.get_delta_weight("default")
    assert float((layer.get_delta_weight("w") - D).norm() / D.norm()) > 0.5
    ours = lt.inject(copy.deepcopy(base), "lora", targets=["0", "2"], rank=4, alpha=8, rslora=True)
    with torch.no_grad():
        for a in adapter_layers(ours).values():
            for p in a.updates["default"].factors: p.normal_()
    lt.add_weighted_adapter(ours, ["default"], [1.0], "w")
    for a in adapter_layers(ours).values():
        assert torch.equal(a.updates["w"].delta_weight(), a.delta_weight(["default"]))
