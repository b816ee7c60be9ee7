"""`inject` on a real Hugging Face transformer (a small BERT built from its config: no download): every method on the
attention and MLP projections, zero update at start, only adapters train, merge/unmerge exact, training moves the
output, and a PEFT round trip of the LoRA adapter. Skipped when `transformers` is not installed."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lowrank_tales as lt  # noqa: E402
from lowrank_tales.models import adapters  # noqa: E402
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
    injected = adapters(model)
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
