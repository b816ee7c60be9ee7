"""`export_peft` / `import_peft` against the real PEFT library, both directions, for LoRA, LoHa and LoKr on linear,
convolutional and embedding layers. Skipped when `peft` is not installed."""
import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from lowrank_tales.models import adapters, export_peft, import_peft, inject  # noqa: E402
from tolerance import assert_close  # noqa: E402


class Net(nn.Module):
    "Embedding → 1×1 and 3×3 convolutions → linear layers: every layer type the adapters support."
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv1 = nn.Conv2d(8, 12, 1)
        self.conv3 = nn.Conv2d(12, 16, 3, padding=1)
        self.mlp = nn.Sequential(nn.Linear(16 * 4, 48), nn.ReLU(), nn.Linear(48, 30))

    def forward(self, ids):  # ids: (batch, 4)
        h = self.emb(ids).transpose(1, 2).reshape(len(ids), 8, 2, 2)
        h = self.conv3(torch.relu(self.conv1(h)))
        return self.mlp(h.flatten(1))


def base(dtype):
    torch.manual_seed(0)
    return Net().to(dtype)


IDS = torch.randint(0, 20, (6, 4), generator=torch.Generator().manual_seed(3))
CASES = [("lora", ["emb", "conv1", "conv3", "0", "2"], dict(rank=4, alpha=11), peft.LoraConfig, dict(lora_alpha=11)),
         ("loha", ["conv1", "conv3", "0", "2"], dict(rank=4, alpha=10), peft.LoHaConfig, dict(alpha=10)),
         ("lokr", ["conv1", "conv3", "0", "2"], dict(rank=2, alpha=5), peft.LoKrConfig, dict(alpha=5)),
         ("lokr", ["conv3", "0", "2"], dict(rank=16, alpha=5, factor=4), peft.LoKrConfig, dict(alpha=5, decompose_factor=4))]


def randomize(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params: p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method,targets,kw,config,peft_kw", CASES)
def test_ours_to_peft(tmp_path, dtype, method, targets, kw, config, peft_kw):
    ours = inject(base(dtype), method, targets=targets, **kw)
    randomize([f for a in adapters(ours).values() for f in a.factors])
    export_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base(dtype), tmp_path)
    n_peft = sum(p.numel() for n, p in theirs.named_parameters() if any(s in n for s in ("lora_", "hada_", "lokr_")))
    assert n_peft == sum(a.n_params for a in adapters(ours).values())
    with torch.no_grad(): assert_close(theirs(IDS), ours(IDS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method,targets,kw,config,peft_kw", CASES)
def test_peft_to_ours(tmp_path, dtype, method, targets, kw, config, peft_kw):
    theirs = peft.get_peft_model(base(dtype), config(r=kw["rank"], target_modules=targets, **peft_kw))
    randomize([p for p in theirs.parameters() if p.requires_grad])
    theirs.save_pretrained(tmp_path)
    ours = import_peft(base(dtype), tmp_path)
    assert sorted(adapters(ours)) == sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "base_layer"))
    with torch.no_grad(): assert_close(ours(IDS), theirs(IDS))


def test_peft_suffix_targets_and_merge(tmp_path):
    "PEFT's suffix rule picks nested modules; after import, merging keeps the outputs (alpha ≠ r)."
    theirs = peft.get_peft_model(base(torch.float64), peft.LoraConfig(r=3, lora_alpha=17, target_modules=["0", "2"]))
    randomize([p for p in theirs.parameters() if p.requires_grad])
    theirs.save_pretrained(tmp_path)
    ours = import_peft(base(torch.float64), tmp_path)
    assert sorted(adapters(ours)) == ["mlp.0", "mlp.2"]
    from lowrank_tales.models import merge
    with torch.no_grad():
        y = ours(IDS)
        merge(ours)
        assert_close(ours(IDS), y)
        assert_close(y, theirs(IDS))
