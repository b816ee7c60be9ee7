"""PEFT's options in the adapted layer, against the real `peft`: LoRA's `init_lora_weights` (the same factors and
residual base weight from one seed), per-row adapters (`adapter_names=`), DoRA on convolutions. Tiny random models."""
import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import lowrank_tales as lt  # noqa: E402
from lowrank_tales.injection import adapter_layers, inject  # noqa: E402


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10)).to(dtype)


def peft_factors(theirs, module: str, adapter: str = "default"):
    "`(B, A)` of PEFT's LoRA on `module` as our `d_out × r`, `r × d_in` matrices."
    m = theirs.base_model.model.get_submodule(module)
    B, A = m.lora_B[adapter].weight, m.lora_A[adapter].weight
    return B.reshape(B.shape[0], -1), A.reshape(A.shape[0], -1)


@pytest.mark.parametrize("init", [False, "gaussian", "orthogonal", "olora", "pissa"])
def test_init_equals_peft(init):
    "One seed, the same model: PEFT's initial factors and (olora, pissa) its residual base weights, exactly."
    torch.manual_seed(5)
    theirs = peft.get_peft_model(mlp(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
                                                        init_lora_weights=init))
    torch.manual_seed(5)
    ours = inject(mlp(), "lora", targets=["0", "2"], rank=4, alpha=8, init=init)
    for name, layer in adapter_layers(ours).items():
        B, A = peft_factors(theirs, name)
        torch.testing.assert_close(layer.B, B, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.A, A, atol=1e-6, rtol=1e-5)
        base = theirs.base_model.model.get_submodule(name).base_layer
        torch.testing.assert_close(layer.base.weight, base.weight, atol=1e-6, rtol=1e-5)
    x = torch.randn(3, 16)
    with torch.no_grad(): torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_default_init_distribution_as_peft():
    "`True`: A Kaiming-uniform (bound 1/√d_in), B = 0, as PEFT's; embeddings A = 0, B ~ N(0, 1)."
    lin = lt.LoRA(nn.Linear(400, 300), rank=64).requires_grad_(False)
    assert float(lin.B.abs().max()) == 0 and float(lin.A.abs().max()) <= 1 / 20
    assert abs(float(lin.A.std()) - (1 / 20) / 3 ** 0.5) < 2e-3  # uniform on [-b, b]: std b/√3
    emb = lt.LoRA(nn.Embedding(300, 400), rank=64, init="gaussian").requires_grad_(False)
    assert float(emb.A.abs().max()) == 0 and abs(float(emb.B.std()) - 1) < 0.02  # PEFT's embedding: as True
    off = lt.LoRA(nn.Embedding(300, 400), rank=64, init=False).requires_grad_(False)
    assert abs(float(off.A.std()) - 1) < 0.02 and abs(float(off.B.std()) - 1) < 0.02


def test_pissa_bf16_residual_as_peft():
    """A bfloat16 layer: PEFT computes in float32 and rounds the residual once, as we do; its factors are rounded to
    bfloat16 (ours stay float32, so they agree to bfloat16's precision)."""
    theirs = peft.get_peft_model(mlp(torch.bfloat16), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                                                      init_lora_weights="pissa"))
    ours = inject(mlp(torch.bfloat16), "lora", targets=["0"], rank=4, alpha=8, init="pissa")
    base = theirs.base_model.model.get_submodule("0").base_layer
    assert torch.equal(ours[0].base.weight, base.weight)
    B, A = peft_factors(theirs, "0")
    torch.testing.assert_close(ours[0].B, B.float(), atol=2e-3, rtol=8e-3)
    torch.testing.assert_close(ours[0].A, A.float(), atol=2e-3, rtol=8e-3)


def _two_adapters(model):
    "Adapters 'one' and 'two' (LoRA; PEFT refuses per-row batches with DoRA) on ours and PEFT's, same factors."
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]),
                                 adapter_name="one")
    theirs.add_adapter("two", peft.LoraConfig(r=3, lora_alpha=5, target_modules=["0"]))
    ours = inject(copy.deepcopy(model), "lora", targets=["0", "2"], name="one", rank=2, alpha=4)
    inject(ours, "lora", targets=["0"], name="two", rank=3, alpha=5)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, layer in adapter_layers(ours).items():
            for n, u in layer.updates.items():
                m = theirs.base_model.model.get_submodule(name)
                for f, g in ((u.A, m.lora_A[n].weight), (u.B, m.lora_B[n].weight)):
                    f.copy_(0.3 * torch.randn(f.shape, generator=gen)); g.copy_(f.reshape(g.shape))
    return ours, theirs


def test_adapter_names_equal_peft():
    "PEFT's `adapter_names=` on the same adapters and rows: the same outputs, and each row as it is alone."
    ours, theirs = _two_adapters(mlp())
    theirs.eval(); ours.eval()
    lt.accept_adapter_names(ours)
    x = torch.randn(6, 16)
    names = ["one", "two", "__base__", "two", "one", "one"]
    with torch.no_grad():
        got = ours(x, adapter_names=names)
        torch.testing.assert_close(got, theirs(x, adapter_names=names), atol=1e-5, rtol=1e-5)
        for i, n in enumerate(names):
            with lt.adapter_batch(ours, [n]): alone = ours(x[i:i + 1])
            torch.testing.assert_close(got[i:i + 1], alone, atol=1e-6, rtol=1e-6)
    lt.merge(ours, "one")
    with pytest.raises(ValueError, match="are merged in module"): ours(x, adapter_names=names)


@pytest.mark.parametrize("method,kw", [("loha", dict(rank=2)), ("lokr", dict(rank=2)), ("lokh", dict(p=2)),
                                       ("lora", dict(rank=2, dora=True))])
def test_adapter_batch_every_method(method, kw):
    "Every method (and DoRA, which PEFT refuses here): a mixed batch equals each row through its adapter alone."
    model = inject(mlp(torch.float64), method, targets=["0", "2"], name="x", **kw)
    inject(model, "lora", targets=["2"], name="y", rank=2, dropout=0.5)  # dropout is off in eval
    model.eval()
    with torch.no_grad():
        for p in model.parameters(): p.add_(0.2 * torch.randn_like(p)) if p.requires_grad else None
    x = torch.randn(4, 16, dtype=torch.float64)
    names = ["y", "x", "__base__", "x"]
    with lt.adapter_batch(model, names): y = model(x)
    for i, n in enumerate(names):
        with lt.adapter_batch(model, [n]): torch.testing.assert_close(y[i], model(x[i:i + 1])[0])


def test_dora_conv_equals_peft():
    "DoRA on a Conv2d (PEFT's `_DoraConvNdLayer`): the same output for the same factors and magnitude."
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1))
    theirs = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=2, lora_alpha=5, target_modules=["0", "2"],
                                                                     use_dora=True))
    ours = inject(copy.deepcopy(net), "lora", targets=["0", "2"], rank=2, alpha=5, dora=True)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, layer in adapter_layers(ours).items():
            m = theirs.base_model.model.get_submodule(name)
            torch.testing.assert_close(layer.magnitude, m.lora_magnitude_vector["default"].weight.reshape(-1))
            for f, g in ((layer.A, m.lora_A["default"].weight), (layer.B, m.lora_B["default"].weight)):
                f.copy_(0.3 * torch.randn(f.shape, generator=gen)); g.copy_(f.reshape(g.shape))
            layer.magnitude.mul_(1.2)
            mag = m.lora_magnitude_vector["default"].weight
            mag.copy_(layer.magnitude.reshape(mag.shape))
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad(): torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    lt.merge(ours)
    with torch.no_grad(): torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_options_refused_by_name_before_any_change():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    for kw, msg in [(dict(init="pissa_niter_4"), "init must be one of"),
                    (dict(bias="lora_only", method="loha"), "bias='lora_only' is an option of lora"),
                    (dict(init="olora", rank=3, method="loha"), "init='olora' is an option of lora")]:
        method = kw.pop("method", "lora")
        with pytest.raises(ValueError, match=msg): inject(model, method, targets=["0"], **kw)
        assert not adapter_layers(model)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("method,config,kw,peft_kw", [
    ("loha", peft.LoHaConfig, dict(rank=2, alpha=3), dict(r=2, alpha=3)),
    ("lokr", peft.LoKrConfig, dict(rank=2, alpha=3, rank_dropout_scale=True),
     dict(r=2, alpha=3, rank_dropout_scale=True)),
    ("lokr", peft.LoKrConfig, dict(rank=2, alpha=3), dict(r=2, alpha=3))])
def test_rank_and_module_dropout_equal_peft(method, config, kw, peft_kw):
    "Training forwards with PEFT's rank and module dropout: one seed, PEFT's output (its draws, in its order)."
    theirs = peft.get_peft_model(mlp(), config(target_modules=["0", "2"], rank_dropout=0.4, module_dropout=0.3,
                                               **peft_kw))
    ours = inject(mlp(), method, targets=["0", "2"], rank_dropout=0.4, module_dropout=0.3, **kw)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the same random factors: ours by name order, PEFT's by its parameter names
        for name, layer in adapter_layers(ours).items():
            m = theirs.base_model.model.get_submodule(name)
            if method == "loha":
                pairs = tuple(zip(layer.factors, (m.hada_w1_a, m.hada_w1_b, m.hada_w2_a, m.hada_w2_b)))  # B1 A1 B2 A2
            else:
                B = ((layer.B1, m.lokr_w2_a), (layer.B2, m.lokr_w2_b)) if layer.low_rank else ((layer.B, m.lokr_w2),)
                pairs = ((layer.A, m.lokr_w1),) + B
            for f, g in pairs:
                f.copy_(0.3 * torch.randn(f.shape, generator=gen)); g["default"].copy_(f)
    ours.train(); theirs.train()
    x = torch.randn(4, 16)
    outs = []
    for seed in range(8):
        torch.manual_seed(seed); a = ours(x)
        torch.manual_seed(seed); b = theirs(x)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        outs.append(a)
    assert len({round(float(o.sum()), 4) for o in outs}) > 1  # the draws change the output
    ours.eval(); theirs.eval()
    with torch.no_grad(): torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


class Tokens(nn.Module):
    "An embedding (with a padding index) read by a linear layer."
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(30, 8, padding_idx=0), nn.Linear(8, 5)

    def forward(self, ids): return self.out(self.emb(ids))


def test_dora_embedding_equals_peft():
    "DoRA on an nn.Embedding (PEFT's `DoraEmbeddingLayer`): the same magnitude at the start, the same outputs."
    torch.manual_seed(0)
    net = Tokens()
    theirs = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=2, lora_alpha=5, target_modules=["emb"],
                                                                     use_dora=True))
    ours = inject(copy.deepcopy(net), "lora", targets=["emb"], rank=2, alpha=5, dora=True)
    m, layer = theirs.base_model.model.emb, ours.emb
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        torch.testing.assert_close(layer.magnitude, m.lora_magnitude_vector["default"].weight)
        for f, g in ((layer.A, m.lora_embedding_A["default"]), (layer.B, m.lora_embedding_B["default"])):
            f.copy_(0.3 * torch.randn(f.shape, generator=gen)); g.copy_(f)
        layer.magnitude.mul_(1.2); m.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    ids = torch.tensor([[0, 4, 29], [7, 7, 1]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids), atol=1e-5, rtol=1e-5)
        lt.merge(ours)
        torch.testing.assert_close(ours(ids), theirs(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["emb", "conv"])
def test_dora_export_beyond_linear_keeps_its_meaning(tmp_path, target):
    "DoRA on an embedding or a convolution, exported: PEFT computes what we compute (or the export refuses)."
    torch.manual_seed(0)
    net = Tokens() if target == "emb" else nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Flatten(), nn.Linear(24, 5))
    x = torch.tensor([[0, 4, 29], [7, 7, 1]]) if target == "emb" else torch.randn(2, 3, 2, 2)
    ours = inject(copy.deepcopy(net), "lora", targets=["emb" if target == "emb" else "0"], rank=2, alpha=5, dora=True)
    with torch.no_grad():
        for p in ours.parameters(): p.add_(0.2 * torch.randn_like(p)) if p.requires_grad else None
    try: lt.export_peft(ours, tmp_path)
    except ValueError: return  # refused by name: acceptable
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path)
    with torch.no_grad(): torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    for name in ("a", "b"): inject(model, "lora", targets=["q_proj", "v_proj"], rank=2, name=name)
    with torch.no_grad():
        for n, p in model.named_parameters(): p.add_(0.5 * torch.randn_like(p)) if ".updates." in n else None
    return model.eval()


def _check_rows(model):
    ids = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(ids, adapter_names=["a", "b", "__base__"]).logits
        for i, n in enumerate(["a", "b"]):
            lt.set_adapter(model, n)
            torch.testing.assert_close(y[i:i + 1], model(ids[i:i + 1]).logits)
        with lt.disable_adapters(model): torch.testing.assert_close(y[2:], model(ids[2:]).logits)


def test_adapter_names_on_a_transformers_model():
    "A transformers model takes `**kwargs`: with the hook, `adapter_names=` runs per row, exactly."
    _check_rows(lt.accept_adapter_names(_tiny_llama()))


def test_adapter_names_never_silently_ignored_after_inject():
    _check_rows(_tiny_llama())
