"""PEFT's `bias` ("all", "lora_only") and LoHa/LoKr's train-time options through `inject`, our files and PEFT folders,
against the real `peft` on tiny random BERT, GPT-2, Llama and T5 models: the same trainable biases, the same keys in
the file, the same outputs after `PeftModel.from_pretrained` / `import_peft`, and PEFT's one-adapter-with-bias rule."""
import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

import lowrank_tales as lt  # noqa: E402
from lowrank_tales.injection import _adapter_biases, adapter_layers  # noqa: E402

IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def _bert():
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32, vocab_size=50,
        max_position_embeddings=16, num_labels=3)).eval()


def _gpt2():
    torch.manual_seed(0)
    return transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50,
                                                          n_positions=16, bos_token_id=0, eos_token_id=0)).eval()


def _llama():
    torch.manual_seed(0)
    return transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, attention_bias=True, mlp_bias=True)).eval()


def _t5():
    torch.manual_seed(0)
    return transformers.T5EncoderModel(transformers.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                             num_heads=2)).eval()


# model, our inject keywords, PEFT's LoraConfig keywords
CASES = {
    "bert": (_bert, dict(targets=["query", "value"], modules_to_save=["classifier"]),
             dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    "gpt2": (_gpt2, dict(targets=["c_attn", "c_fc"]), dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "llama": (_llama, dict(targets=["q_proj", "down_proj"]), dict(target_modules=["q_proj", "down_proj"])),
    "t5": (_t5, dict(targets=["q", "wo"]), dict(target_modules=["q", "wo"])),  # T5 has no biases: none saved
}


def out(m):
    with torch.no_grad():
        o = m(IDS)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def trained(m, seed=3):
    "Every trainable parameter (factors, biases, saved copies) moved, as training would."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad: p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def trainable(m):
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def keys(folder):
    return sorted(load_file(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
@pytest.mark.parametrize("case", list(CASES))
def test_bias_both_ways_equals_peft(tmp_path, case, bias):
    mk, ours_kw, peft_kw = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = trained(peft.get_peft_model(mk(), peft.LoraConfig(r=2, lora_alpha=4, bias=bias, **peft_kw)))
        ours = lt.inject(mk(), "lora", rank=2, alpha=4, bias=bias, **ours_kw)
        assert trainable(ours) == trainable(theirs)  # the same biases train
        lt.export_peft(trained(ours), tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "theirs")
        assert keys(tmp_path / "ours") == keys(tmp_path / "theirs")  # the same keys, biases included
        assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["bias"] == bias
        back = peft.PeftModel.from_pretrained(mk(), tmp_path / "ours").eval()  # ours → PEFT
        torch.testing.assert_close(out(back), out(ours), atol=1e-5, rtol=1e-5)
        ref = peft.PeftModel.from_pretrained(mk(), tmp_path / "theirs", is_trainable=True).eval()  # PEFT → ours
    imported = lt.import_peft(mk(), tmp_path / "theirs").eval()
    torch.testing.assert_close(out(imported), out(ref), atol=1e-5, rtol=1e-5)
    assert trainable(imported) == trainable(ref)
    again = lt.load_adapter(mk(), lt.save_adapter(imported, tmp_path / "lt"))  # and through our own files
    torch.testing.assert_close(out(again.eval()), out(ref), atol=1e-5, rtol=1e-5)


def test_one_adapter_with_bias_as_peft(tmp_path):
    "PEFT raises for a second adapter with bias != 'none'; so do we, by name, for inject and both loads."
    theirs = peft.get_peft_model(_bert(), peft.LoraConfig(r=2, target_modules=["query"], bias="all"))
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        theirs.add_adapter("b", peft.LoraConfig(r=2, target_modules=["value"], bias="lora_only"))
    theirs.save_pretrained(tmp_path / "p")
    ours = lt.inject(_bert(), "lora", targets=["query"], rank=2, bias="all")
    lt.save_adapter(ours, tmp_path / "lt")
    ours = lt.inject(_bert(), "lora", targets=["value"], rank=2, bias="lora_only", name="first")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    grads = [p.requires_grad for p in ours.parameters()]
    for call in (lambda: lt.inject(ours, "lora", targets=["query"], rank=2, bias="all", name="b"),
                 lambda: lt.import_peft(ours, tmp_path / "p", name="b"),
                 lambda: lt.load_adapter(ours, tmp_path / "lt", name="b")):
        with pytest.raises(ValueError, match="bias='all': the model's adapter 'first' already trains biases"): call()
        assert lt.adapter_names(ours) == ["first"] and grads == [p.requires_grad for p in ours.parameters()]
        assert all(torch.equal(v, ours.state_dict()[k]) for k, v in before.items())
    lt.delete_adapter(ours, "first")  # its biases keep their values, frozen; another adapter may then train biases
    lt.import_peft(ours, tmp_path / "p", name="b")
    assert list(_adapter_biases(ours, "b"))[:1] == ["bert.embeddings.LayerNorm.bias"]


@pytest.mark.parametrize("config,kw", [
    (peft.LoHaConfig, dict(rank_dropout=0.3, module_dropout=0.2)),
    (peft.LoKrConfig, dict(rank_dropout=0.3, module_dropout=0.2, rank_dropout_scale=True))])
def test_lycoris_train_options_round_trip(tmp_path, config, kw):
    "PEFT's folder → import_peft (the options on the update) → export_peft (the same values) → PEFT's config."
    theirs = peft.get_peft_model(_bert(), config(r=2, alpha=4, target_modules=["query"], init_weights=False, **kw))
    theirs.save_pretrained(tmp_path / "p")
    ours = lt.import_peft(_bert(), tmp_path / "p")
    for layer in adapter_layers(ours).values():
        assert {k: getattr(layer.updates["default"], k) for k in kw} == kw
    lt.export_peft(ours, tmp_path / "back")
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert {k: cfg[k] for k in kw} == kw
    loaded = peft.PeftConfig.from_pretrained(tmp_path / "back")
    assert {k: getattr(loaded, k) for k in kw} == kw
    again = lt.load_adapter(_bert(), lt.save_adapter(ours, tmp_path / "lt"))
    assert {k: getattr(adapter_layers(again)["bert.encoder.layer.0.attention.self.query"].updates["default"], k)
            for k in kw} == kw


def test_lora_only_beside_another_adapter_as_peft(tmp_path):
    "PEFT's lora_only file of one adapter also holds the biases of layers another adapter adapts; its load ignores them."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_bert(), peft.LoraConfig(r=2, target_modules=["query"], bias="lora_only"))
        theirs.add_adapter("b", peft.LoraConfig(r=2, target_modules=["key"]))
        trained(theirs)
        with torch.no_grad(): theirs.base_model.model.bert.encoder.layer[0].attention.self.key.base_layer.bias.add_(1)
        theirs.save_pretrained(tmp_path, selected_adapters=["default"])
        assert "base_model.model.bert.encoder.layer.0.attention.self.key.base_layer.bias" in keys(tmp_path)
        ref = peft.PeftModel.from_pretrained(_bert(), tmp_path).eval()
    ours = lt.import_peft(_bert(), tmp_path).eval()
    torch.testing.assert_close(out(ours), out(ref), atol=1e-5, rtol=1e-5)
    assert list(_adapter_biases(ours, "default")) == ["bert.encoder.layer.0.attention.self.query.bias"]
