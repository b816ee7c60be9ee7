"""`export_peft` / `import_peft` against the real PEFT library, both directions, for LoRA, LoHa and LoKr on linear,
convolutional and embedding layers. Skipped when `peft` is not installed."""
import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from lowrank_tales.injection import adapter_layers, inject  # noqa: E402
from lowrank_tales.peft_interop import export_peft, import_peft  # noqa: E402
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
    randomize([f for a in adapter_layers(ours).values() for f in a.factors])
    export_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base(dtype), tmp_path)
    n_peft = sum(p.numel() for n, p in theirs.named_parameters() if any(s in n for s in ("lora_", "hada_", "lokr_")))
    assert n_peft == sum(a.n_params for a in adapter_layers(ours).values())
    with torch.no_grad(): assert_close(theirs(IDS), ours(IDS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method,targets,kw,config,peft_kw", CASES)
def test_peft_to_ours(tmp_path, dtype, method, targets, kw, config, peft_kw):
    theirs = peft.get_peft_model(base(dtype), config(r=kw["rank"], target_modules=targets, **peft_kw))
    randomize([p for p in theirs.parameters() if p.requires_grad])
    theirs.save_pretrained(tmp_path)
    ours = import_peft(base(dtype), tmp_path)
    assert sorted(adapter_layers(ours)) == sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "base_layer"))
    with torch.no_grad(): assert_close(ours(IDS), theirs(IDS))


def test_peft_suffix_targets_and_merge(tmp_path):
    "PEFT's suffix rule picks nested modules; after import, merging keeps the outputs (alpha ≠ r)."
    theirs = peft.get_peft_model(base(torch.float64), peft.LoraConfig(r=3, lora_alpha=17, target_modules=["0", "2"]))
    randomize([p for p in theirs.parameters() if p.requires_grad])
    theirs.save_pretrained(tmp_path)
    ours = import_peft(base(torch.float64), tmp_path)
    assert sorted(adapter_layers(ours)) == ["mlp.0", "mlp.2"]
    from lowrank_tales.injection import merge
    with torch.no_grad():
        y = ours(IDS)
        merge(ours)
        assert_close(ours(IDS), y)
        assert_close(y, theirs(IDS))


def randomize_all(model, seed=1):
    "Random factors for every adapter and random weights for every saved copy (`modules_to_save`)."
    from lowrank_tales.injection import saved_modules
    params = [f for a in adapter_layers(model).values() for u in a.updates.values() for f in u.factors]
    params += [p for s in saved_modules(model).values() for c in s.copies.values() for p in c.parameters()]
    randomize(params, seed)
    return model


OPTION_CASES = [  # (method, our inject keywords, PEFT config class, its keywords): one of each option PEFT and we share
    ("lora", dict(rank=4, alpha=8, rslora=True, dropout=0.1, rank_pattern={"conv3": 2}, alpha_pattern={"mlp.2": 3},
                  modules_to_save=["mlp.0"]),
     peft.LoraConfig, dict(r=4, lora_alpha=8, use_rslora=True, lora_dropout=0.1, rank_pattern={"conv3": 2},
                           alpha_pattern={"mlp.2": 3}, modules_to_save=["mlp.0"])),
    ("loha", dict(rank=4, alpha=6, rank_pattern={"conv3": 2}, alpha_pattern={"mlp.2": 3}),
     peft.LoHaConfig, dict(r=4, alpha=6, rank_pattern={"conv3": 2}, alpha_pattern={"mlp.2": 3})),
    ("lokr", dict(rank=2, alpha=5, rank_pattern={"mlp.2": 1}, alpha_pattern={"conv3": 2}, modules_to_save=["mlp.0"]),
     peft.LoKrConfig, dict(r=2, alpha=5, rank_pattern={"mlp.2": 1}, alpha_pattern={"conv3": 2}, modules_to_save=["mlp.0"])),
]
OPTION_TARGETS = {"lora": ["emb", "conv1", "conv3", "mlp.2"], "loha": ["conv1", "conv3", "mlp.2"], "lokr": ["conv1", "conv3", "mlp.2"]}


@pytest.mark.parametrize("method,kw,config,peft_kw", OPTION_CASES)
def test_options_both_ways(tmp_path, method, kw, config, peft_kw):
    "rsLoRA, per-module ranks and alphas, dropout and modules_to_save mean the same here and in PEFT, both ways."
    dtype = torch.float64
    ours = randomize_all(inject(base(dtype), method, targets=OPTION_TARGETS[method], **kw)).eval()
    export_peft(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(base(dtype), tmp_path / "ours").eval()
    with torch.no_grad(): assert_close(theirs(IDS), ours(IDS))
    theirs = peft.get_peft_model(base(dtype), config(target_modules=OPTION_TARGETS[method], **peft_kw))
    randomize([p for p in theirs.parameters() if p.requires_grad])
    theirs.save_pretrained(tmp_path / "theirs")
    back = import_peft(base(dtype), tmp_path / "theirs").eval()
    theirs.eval()
    with torch.no_grad(): assert_close(back(IDS), theirs(IDS))
    from lowrank_tales.peft_interop import peft_rank
    assert peft_rank(adapter_layers(back)["conv3"].updates["default"]) == kw.get("rank_pattern", {}).get("conv3", kw["rank"])


def test_named_adapters_in_peft_layout(tmp_path):
    "Two named adapters: PEFT's folder layout (the non-default one in a subfolder named after it), both ways."
    dtype = torch.float64
    ours = inject(base(dtype), "lora", targets=["conv3", "2"], rank=4, alpha=8)
    inject(ours, "lora", targets=["conv1", "2"], name="other", rank=2, alpha=3)
    randomize_all(ours)
    export_peft(ours, tmp_path / "ours", name=["default", "other"])
    assert (tmp_path / "ours" / "other" / "adapter_config.json").is_file()
    theirs = peft.PeftModel.from_pretrained(base(dtype), tmp_path / "ours")
    theirs.load_adapter(tmp_path / "ours" / "other", adapter_name="other")
    for name in ("default", "other"):
        from lowrank_tales.injection import set_adapter
        set_adapter(ours, name)
        theirs.set_adapter(name)
        with torch.no_grad(): assert_close(theirs(IDS), ours(IDS))
    theirs.save_pretrained(tmp_path / "theirs", selected_adapters=["default", "other"])
    back = import_peft(base(dtype), tmp_path / "theirs")
    import_peft(back, tmp_path / "theirs" / "other", name="other")
    for name in ("default", "other"):
        set_adapter(back, name); set_adapter(ours, name)
        with torch.no_grad(): assert_close(back(IDS), ours(IDS))


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=24, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config).double().eval()


def test_gpt2_conv1d_both_ways(tmp_path):
    "GPT-2's Conv1D layers (weights stored transposed): ours and PEFT's LoRA agree, both ways."
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = randomize_all(inject(tiny_gpt2(), "lora", targets=["c_attn", "c_proj", "c_fc"], rank=4, alpha=8))
    export_peft(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours").eval()
    with torch.no_grad(): assert_close(theirs(ids).logits, ours(ids).logits)
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                               fan_in_fan_out=True))
    randomize([p for p in theirs.parameters() if p.requires_grad])
    theirs.save_pretrained(tmp_path / "theirs")
    back = import_peft(tiny_gpt2(), tmp_path / "theirs")
    with torch.no_grad(): assert_close(back(ids).logits, theirs.eval()(ids).logits)


def test_init_from_weight_exports_relative_to_the_original(tmp_path):
    "A PiSSA-started LoRA (base W0 − s·B0A0) exports as PEFT's rank-2r LoRA of the untouched model, as PEFT converts it."
    from lowrank_tales.extraction import init_from_weight
    ours = init_from_weight(base(torch.float64), "lora", targets=["conv3", "0", "2"], rank=2, alpha=4.0)
    randomize([a.B for a in adapter_layers(ours).values()], seed=3)
    export_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base(torch.float64), tmp_path)
    assert theirs.peft_config["default"].r == 4
    with torch.no_grad(): assert_close(theirs(IDS), ours(IDS))



def test_init_from_weight_loha_exports_relative_to_the_original(tmp_path):
    "A LoHA started from W0 exports as the LoHA (V U) ∘ 11ᵀ of rank 2 r² of the untouched model; PEFT computes the same."
    from lowrank_tales.extraction import init_from_weight
    ours = init_from_weight(base(torch.float64), "loha", targets=["0", "2"], rank=2, alpha=4.0, max_iter=5)
    randomize([a.B1 for a in adapter_layers(ours).values()], seed=3)
    export_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base(torch.float64), tmp_path)
    assert theirs.peft_config["default"].r == 8
    with torch.no_grad(): assert_close(theirs(IDS), ours(IDS))

def test_dora_both_ways(tmp_path):
    "DoRA (LoRA with a trained magnitude per output) computes exactly as PEFT's, both ways; merged, the same outputs."
    targets = ["0", "2"]  # DoRA adapts linear layers here
    ours = randomize_all(inject(base(torch.float64), "lora", targets=targets, rank=3, alpha=6, dora=True))
    with torch.no_grad():
        for a in adapter_layers(ours).values(): a.magnitude.mul_(1.3)
    export_peft(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(base(torch.float64), tmp_path / "ours")
    with torch.no_grad(): assert_close(theirs(IDS), ours(IDS))
    theirs = peft.get_peft_model(base(torch.float64), peft.LoraConfig(r=3, lora_alpha=6, target_modules=targets, use_dora=True))
    randomize([p for p in theirs.parameters() if p.requires_grad])
    theirs.save_pretrained(tmp_path / "theirs")
    back = import_peft(base(torch.float64), tmp_path / "theirs")
    with torch.no_grad():
        y = back(IDS)
        assert_close(y, theirs(IDS))
        from lowrank_tales.injection import merge
        assert_close(merge(back)(IDS), y)


class Conv1dNet(nn.Module):
    "Embedding → 1-wide and 3-wide (padded, dilated) 1-d convolutions → a linear layer."
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv1 = nn.Conv1d(8, 12, 1)
        self.conv3 = nn.Conv1d(12, 16, 3, padding=2, dilation=2)
        self.out = nn.Linear(16 * 4, 10)

    def forward(self, ids):  # ids: (batch, 4)
        h = self.conv3(torch.relu(self.conv1(self.emb(ids).transpose(1, 2))))
        return self.out(h.flatten(1))


def conv1d_net(dtype):
    torch.manual_seed(0)
    return Conv1dNet().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method,kw,config,peft_kw", [("loha", dict(rank=3, alpha=6), peft.LoHaConfig, dict(alpha=6)),
                                                      ("lokr", dict(rank=1, alpha=5), peft.LoKrConfig, dict(alpha=5))])
def test_loha_lokr_on_conv1d_both_ways(tmp_path, dtype, method, kw, config, peft_kw):
    "PEFT's LoHa and LoKr take nn.Conv1d (flattened kernels, as for Conv2d): ours exports to them and imports from them."
    targets = ["conv1", "conv3", "out"]
    ours = inject(conv1d_net(dtype), method, targets=targets, **kw)
    randomize([f for a in adapter_layers(ours).values() for f in a.factors])
    export_peft(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(conv1d_net(dtype), tmp_path / "ours")
    with torch.no_grad(): assert_close(theirs(IDS), ours(IDS))
    theirs = peft.get_peft_model(conv1d_net(dtype), config(r=kw["rank"], target_modules=targets, **peft_kw))
    randomize([p for p in theirs.parameters() if p.requires_grad], seed=2)
    theirs.save_pretrained(tmp_path / "theirs")
    back = import_peft(conv1d_net(dtype), tmp_path / "theirs")
    assert sorted(adapter_layers(back)) == sorted(targets)
    with torch.no_grad():
        assert_close(back(IDS), theirs(IDS))
        assert not torch.allclose(back(IDS), conv1d_net(dtype)(IDS))  # the adapters do change the model


def test_lokr_with_a_full_factor_on_conv1d_is_refused_both_ways(tmp_path):
    "PEFT's make_kron widens w1 only for 4-d kernels: on nn.Conv1d a full w2 means another matrix, refused both ways."
    ours = inject(conv1d_net(torch.float64), "lokr", targets=["conv1"], rank=2)
    with pytest.raises(ValueError, match="module 'conv1' cannot be exported to PEFT: PEFT's LoKr on nn.Conv1d"):
        export_peft(ours, tmp_path / "ours")
    theirs = peft.get_peft_model(conv1d_net(torch.float64), peft.LoKrConfig(r=2, target_modules=["conv1"]))
    theirs.save_pretrained(tmp_path / "theirs")
    plain = conv1d_net(torch.float64)
    with pytest.raises(ValueError, match="module 'conv1' cannot be imported: PEFT's LoKr on nn.Conv1d"):
        import_peft(plain, tmp_path / "theirs")
    assert type(plain.conv1) is nn.Conv1d  # nothing was changed
