"""`inject` on a real Hugging Face transformer (a small BERT built from its config: no download): every method on the
attention and MLP projections, zero update at start, only adapters train, merge/unmerge exact, training moves the
output, and a PEFT round trip of the LoRA adapter. Skipped when `transformers` is not installed."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lowrank_tales as lt  # noqa: E402
from lowrank_tales.injection import adapter_layers  # noqa: E402
from tolerance import assert_close  # noqa: E402

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
OPTIONS = {"lora": dict(rank=4, alpha=8), "loha": dict(rank=2, alpha=4), "lokr": dict(rank=4, alpha=8), "lokh": dict(p=2)}


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)
    return transformers.BertModel(config).eval()


IDS = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(1))


def hidden(model):
    return model(input_ids=IDS).last_hidden_state


@pytest.mark.parametrize("method", OPTIONS)
def test_inject_train_merge_on_bert(method):
    model = tiny_bert()
    before = hidden(model).detach()
    lt.inject(model, method, targets=TARGETS, **OPTIONS[method])
    assert torch.equal(hidden(model).detach(), before), "the update must start at zero"
    injected = adapter_layers(model)
    assert len(injected) == 2 * len(TARGETS), sorted(injected)  # two layers, six projections each
    factors = {f"{name}.{n}" for name, ad in injected.items() for n, _ in ad.named_parameters() if not n.startswith("base.")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == factors, "only the adapters' factors train"
    assert lt.trainable_parameters(model) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad(); hidden(model).pow(2).mean().backward(); opt.step()
    trained = hidden(model).detach()
    assert not torch.allclose(trained, before), "training the adapters must change the output"
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lt.merge(model)
    assert_close(hidden(model).detach(), trained)
    lt.unmerge(model)
    for n, p in model.named_parameters():
        if n in weights: assert torch.equal(p.detach(), weights[n]), f"{n} not restored bit for bit"


def test_lora_on_bert_round_trips_through_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_bert()
    lt.inject(model, "lora", targets=["query", "value"], rank=4, alpha=8)
    for p in model.parameters():
        if p.requires_grad: torch.nn.init.normal_(p, std=0.1)
    lt.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert_close(theirs(input_ids=IDS).last_hidden_state, hidden(model))


def randomize(model, seed=2, std=0.2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapter_layers(model).values():
            for u in a.updates.values():
                for f in u.factors: f.copy_(std * torch.randn(f.shape, generator=gen, dtype=f.dtype))
    return model


@pytest.mark.parametrize("method", OPTIONS)
def test_merge_and_unload_round_trips_through_save_pretrained(tmp_path, method):
    "merge_and_unload gives back a plain BertModel: save_pretrained/from_pretrained reproduce the adapted outputs."
    model = randomize(lt.inject(tiny_bert(), method, targets=TARGETS, **OPTIONS[method]))
    expected = hidden(model).detach()
    keys = list(tiny_bert().state_dict())
    plain = lt.merge_and_unload(model)
    assert not adapter_layers(plain) and list(plain.state_dict()) == keys
    assert [type(m) for m in plain.modules()] == [type(m) for m in tiny_bert().modules()]
    plain.save_pretrained(tmp_path)
    back = transformers.BertModel.from_pretrained(tmp_path).eval()
    assert_close(hidden(back).detach(), expected, ulps=256)  # merged weights rounded once to float32


def test_two_named_adapters_on_bert(tmp_path):
    "Two named adapters: switched, combined, disabled, saved and loaded each under its name, against plain references."
    model = lt.inject(tiny_bert(), "lora", targets=["query", "value"], rank=4, alpha=8)
    lt.inject(model, "loha", targets=["intermediate.dense"], name="mlp", rank=2, alpha=4)
    randomize(model)
    assert lt.adapter_names(model) == ["default", "mlp"]
    outs = {}
    for active in ("default", "mlp", ["default", "mlp"]):
        lt.set_adapter(model, active)
        outs[str(active)] = hidden(model).detach()
        ref = tiny_bert()  # the reference: the plain model with the active updates added to its weights
        with torch.no_grad():
            for n, a in adapter_layers(model).items():
                for k in a.active: ref.get_submodule(n).weight += a.updates[k].delta_weight()
        assert_close(outs[str(active)], hidden(ref).detach(), ulps=256)
    with lt.disable_adapters(model): assert torch.equal(hidden(model).detach(), hidden(tiny_bert()).detach())
    lt.save_adapter(model, tmp_path, name=["default", "mlp"])
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "mlp" / "adapter_config.json").is_file()
    back = lt.load_adapter(lt.load_adapter(tiny_bert(), tmp_path), tmp_path / "mlp")
    assert lt.adapter_names(back) == ["default", "mlp"]
    lt.set_adapter(back, ["default", "mlp"])
    assert torch.equal(hidden(back).detach(), outs[str(["default", "mlp"])])


def test_t5_wo_read_through_weight():
    "T5's feed-forward reads `wo.weight.dtype` before calling `wo`: adapted, it runs, trains and merges exactly."
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    model = transformers.T5EncoderModel(config).double().eval()
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    lt.inject(model, "lora", targets=["wo"], rank=2, alpha=4)
    randomize(model)
    y = model(input_ids=ids).last_hidden_state
    y.square().sum().backward()
    assert all(a.B.grad is not None for a in adapter_layers(model).values())
    lt.merge(model)
    assert_close(model(input_ids=ids).last_hidden_state.detach(), y.detach())
