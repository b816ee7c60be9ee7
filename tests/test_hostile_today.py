"""A hostile pass over the day's adapter options: PEFT's `bias` beside `target_parameters`, `trainable_token_indices`
and `nn.MultiheadAttention` (as the real PEFT 0.21 trains and saves it), bad option values refused with nothing
changed, and the layer invariant (base + active updates; none while disabled) through merge, disable, state dicts,
files, `torch.compile` and two adapters with different options on one model."""
import pytest
import torch
from torch import nn

import lowrank_tales as lt

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def llama(tie=False):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=tie, attention_bias=True)).eval()


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mha, self.h = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, q): return self.h(self.mha(q, q, q)[0])


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.scale = nn.Parameter(torch.randn(3, 6, 6) / 3), nn.Parameter(torch.randn(6, 6) / 3)
        self.register_buffer("buf", torch.randn(6, 6))

    def forward(self, x, e): return torch.einsum("bi,boi->bo", x, self.w[e]) @ self.scale.T


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.ex = nn.Linear(6, 6), Experts()

    def forward(self, x, e): return self.ex(self.proj(x), e)


X, E, Q = torch.randn(5, 6), torch.tensor([0, 2, 1, 1, 0]), torch.randn(2, 4, 8)


def snap(m):
    "Everything a failing call must leave as it was: tensors, requires_grad flags, module tree, training flags."
    return ({k: v.detach().clone() for k, v in m.state_dict(keep_vars=True).items()},
            {k: p.requires_grad for k, p in m.named_parameters()}, [(n, type(x)) for n, x in m.named_modules()],
            [x.training for x in m.modules()])


def refuses(call, m, contains=None):
    "`call()` raises ValueError/TypeError (naming `contains`) and `m` is unchanged."
    before = snap(m)
    with pytest.raises((ValueError, TypeError)) as e: call()
    after = snap(m)
    assert before[1:] == after[1:] and before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    if contains: assert contains in str(e.value), str(e.value)


def randomize(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad: p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return m


def trained_biases(m, strip=""):
    return sorted(n.replace(strip, "").replace("base_layer.", "").replace("base.", "") for n, p in m.named_parameters()
                  if p.requires_grad and n.endswith("bias"))


BIAS_CASES = {  # our inject keywords and PEFT's LoraConfig keywords on tiny Llama
    "tokens": (dict(targets=["q_proj"], trainable_token_indices=[1, 2]),
               dict(target_modules=["q_proj"], trainable_token_indices=[1, 2])),
    "parameters": (dict(target_parameters=["v_proj.weight"]),
                   dict(target_modules=[], target_parameters=["v_proj.weight"])),
}


@pytest.mark.parametrize("bias", ["all", "lora_only"])
@pytest.mark.parametrize("case", list(BIAS_CASES))
def test_bias_beside_tokens_and_parameters_as_peft(tmp_path, case, bias):
    "Was: bias silently ignored with trainable_token_indices, refused with target_parameters (even bias='none')."
    ours_kw, peft_kw = BIAS_CASES[case]
    ours = lt.inject(llama(), "lora", rank=2, bias=bias, **ours_kw)
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(r=2, bias=bias, **peft_kw))
    assert trained_biases(ours) == trained_biases(theirs, "base_model.model.")
    randomize(ours)
    y = ours(IDS).logits
    lt.export_peft(ours, tmp_path / "p")
    torch.testing.assert_close(peft.PeftModel.from_pretrained(llama(), tmp_path / "p")(IDS).logits, y)
    torch.testing.assert_close(lt.import_peft(llama(), tmp_path / "p")(IDS).logits, y)
    lt.save_adapter(ours, tmp_path / "a")
    back = lt.load_adapter(llama(), tmp_path / "a")
    torch.testing.assert_close(back(IDS).logits, y)
    assert trained_biases(back) == trained_biases(ours)
    refuses(lambda: lt.inject(ours, "lora", targets=["k_proj"], trainable_token_indices=[5], rank=2, name="b",
                              bias=bias), ours, contains="only one adapter")
    lt.inject(llama(), "lora", rank=2, bias="none", **ours_kw)  # PEFT's default, given


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_on_multihead_attention_as_peft(tmp_path, bias):
    "PEFT's LoRA on an MHA wraps its out_proj: 'lora_only' trains out_proj.bias (was: no bias at all)."
    ours = lt.inject(Attn(), "lora", targets=["mha"], rank=2, bias=bias)
    theirs = peft.get_peft_model(Attn(), peft.LoraConfig(r=2, bias=bias, target_modules=["mha"]))
    assert trained_biases(ours) == trained_biases(theirs, "base_model.model.")
    y = randomize(ours)(Q)
    lt.save_adapter(ours, tmp_path / "a")
    torch.testing.assert_close(lt.load_adapter(Attn(), tmp_path / "a")(Q), y)


@pytest.mark.parametrize("tokens", [[], [1, 1], [50], [-1], [1.0], [True], "1", {"nope": [1]}, {"": [1]},
                                    {"embed_tokens": [1, 99]}, torch.tensor([1, 2]), {"q_proj": [1]}])
def test_bad_token_indices_change_nothing(tokens):
    m = llama()
    refuses(lambda: lt.inject(m, "lora", targets=["q_proj"], trainable_token_indices=tokens, rank=2), m)


@pytest.mark.parametrize("params", [[], "ex.w", ["nothing"], ["ex.buf"], [1], [""], ["proj.weight", "ex.w"]])
def test_bad_target_parameters_change_nothing(params):
    m = Net()
    refuses(lambda: lt.inject(m, "lora", targets=["proj"], target_parameters=params, rank=2), m)


@pytest.mark.parametrize("kw", [dict(rank=0), dict(rank=-1), dict(rank=2.5), dict(rank=7), dict(alpha=-1),
                                dict(alpha="x"), dict(rank="2"), dict(bias=True), dict(bias="some"), dict(dropout=0.1)])
def test_bad_options_on_a_parameter_change_nothing(kw):
    m = lt.inject(Net(), "lora", targets=["proj"], rank=2).train()
    refuses(lambda: lt.inject(m, "lora", target_parameters=["ex.w"], name="b", **{"rank": 2, **kw}), m)


@pytest.mark.parametrize("method,kw", [("loha", dict(use_effective_conv2d="yes")), ("lokr", dict(decompose_both=1)),
                                       ("lora", dict(use_effective_conv2d=True)), ("loha", dict(decompose_both=True)),
                                       ("lokr", dict(use_effective_conv2d=None)), ("loha", dict(bias="all")),
                                       ("lokr", dict(bias="lora_only"))])
def test_bad_tucker_and_bias_options_change_nothing(method, kw):
    m = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Linear(8, 8))
    refuses(lambda: lt.inject(m, method, targets=["0"], rank=2, **kw), m)


def test_attention_refusals_change_nothing():
    for method, kw in [("lora", dict(dropout=0.1)), ("lora", dict(dora=True)), ("lora", dict(rank=9)),
                       ("loha", {}), ("lora", dict(targets=["mha", "mha.out_proj"]))]:
        m = Attn()
        refuses(lambda: lt.inject(m, method, **{"targets": ["mha"], "rank": 2, **kw}), m)


def test_failed_second_adapter_on_parameters_changes_nothing():
    m = lt.inject(Net(), "lora", target_parameters=["ex.w"], rank=2).train()
    refuses(lambda: lt.inject(m, "lora", target_parameters=["ex.w"], rank=2, name="default"), m)
    refuses(lambda: lt.inject(m, "lora", targets=["ex"], rank=2, name="c"), m)


def test_token_inputs_not_modified_nor_aliased():
    toks = [3, 1, 2]
    given = {"embed_tokens": toks}
    m = lt.inject(llama(), "lora", targets=["q_proj"], trainable_token_indices=given, rank=2)
    assert toks == [3, 1, 2] and given == {"embed_tokens": [3, 1, 2]}
    toks.append(7)
    assert m.model.embed_tokens.updates["default"].tokens == [3, 1, 2]


@pytest.mark.parametrize("tie", [False, True])
def test_tokens_invariant_through_merge_disable_state_dict_unload(tie):
    y0 = llama(tie)(IDS).logits.detach()
    build = lambda: lt.inject(llama(tie), "lora", targets=["q_proj"], trainable_token_indices=[1, 2, 3], rank=2)
    m = randomize(build())
    y = m(IDS).logits.detach()
    assert not torch.allclose(y, y0)
    with lt.disable_adapters(m): torch.testing.assert_close(m(IDS).logits, y0)
    lt.merge(m)
    torch.testing.assert_close(m(IDS).logits, y)
    with lt.disable_adapters(m): torch.testing.assert_close(m(IDS).logits, y0)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    lt.unmerge(m)
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())  # a state dict means the same merged
    other = lt.merge(build())
    other.load_state_dict(state)
    torch.testing.assert_close(other(IDS).logits, y)
    lt.unmerge(other)
    torch.testing.assert_close(other(IDS).logits, y)
    torch.testing.assert_close(lt.merge_and_unload(m)(IDS).logits, y)
    plain = lt.unload(other)
    torch.testing.assert_close(plain(IDS).logits, y0)
    assert type(plain.lm_head) is nn.Linear and (plain.lm_head.weight is plain.model.embed_tokens.weight) == tie


def test_tokens_two_adapters_and_delete_restore_the_tied_head():
    y0 = llama(True)(IDS).logits
    m = lt.inject(llama(True), "lora", targets=["q_proj"], trainable_token_indices=[1, 2], rank=2)
    refuses(lambda: lt.inject(m, "lora", targets=["k_proj"], trainable_token_indices=[2, 3], rank=2, name="b"), m)
    lt.inject(m, "lora", targets=["k_proj"], trainable_token_indices=[4, 5], rank=3, name="b")
    randomize(m)
    lt.delete_adapter(m, "default")
    lt.delete_adapter(m, "b")
    assert type(m.lm_head) is nn.Linear
    torch.testing.assert_close(m(IDS).logits, y0)


def test_two_parameter_adapters_merge_state_dict_compile():
    m = Net()
    y0 = m(X, E).detach()
    lt.inject(m, "lora", target_parameters=["ex.w"], rank=2, alpha=3)
    lt.inject(m, "lora", target_parameters=["ex.w"], rank=1, alpha=1, rslora=True, name="b")
    randomize(m)
    lt.set_adapter(m, ["default", "b"])
    W = m.ex.base.w.detach() + sum(u.delta_weight() for u in m.ex.updates.values())
    ref = torch.einsum("bi,boi->bo", m.proj(X), W[E]) @ m.ex.base.scale.T  # an independent forward
    torch.testing.assert_close(m(X, E), ref)
    lt.merge(m, "b")
    torch.testing.assert_close(m(X, E), ref)
    with lt.disable_adapters(m): torch.testing.assert_close(m(X, E), y0)
    lt.unmerge(m)
    lt.merge(m)
    torch.testing.assert_close(m(X, E), ref)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    lt.unmerge(m)
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    torch.testing.assert_close(torch.compile(m)(X, E), ref)
    lt.delete_adapter(m, "b")
    lt.delete_adapter(m, "default")
    torch.testing.assert_close(m(X, E), y0)


def test_peft_folder_of_parameters_alone(tmp_path):
    "PEFT's own advice for a transformers model, target_modules=[] with target_parameters: imported (was: refused)."
    made = randomize(peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=[],
                                                                   target_parameters=["v_proj.weight"])))
    made.save_pretrained(tmp_path / "p")
    torch.testing.assert_close(lt.import_peft(llama(), tmp_path / "p")(IDS).logits, made(IDS).logits)


@pytest.mark.parametrize("call", ["set_adapter", "merge", "save_adapter"])
@pytest.mark.parametrize("bad", [3, b"x", {"default": 1}])
def test_adapter_names_of_the_wrong_type_are_named(tmp_path, call, bad):
    "Was: `'int' object is not iterable`, or a dict's keys / bytes' ints taken as names."
    m = lt.inject(llama(), "lora", targets=["q_proj"], trainable_token_indices=[1], rank=2, bias="all")
    args = (tmp_path / "a", bad) if call == "save_adapter" else (bad,)
    refuses(lambda: getattr(lt, call)(m, *args), m, contains="a name or a list of names")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_parameter_lora_on_an_attention_weight_both_ways_with_peft(tmp_path, bias):
    "target_parameters on an MHA's in_proj_weight is PEFT's ParamWrapper, not its attention LoRA (was: imported as"
    " the attention LoRA and refused; with 'lora_only', out_proj.bias trained, which PEFT does not)."
    ours = lt.inject(Attn(), "lora", target_parameters=["mha.in_proj_weight"], rank=2, alpha=3, bias=bias)
    theirs = peft.get_peft_model(Attn(), peft.LoraConfig(r=2, lora_alpha=3, target_modules=[], bias=bias,
                                                         target_parameters=["mha.in_proj_weight"]))
    assert trained_biases(ours) == trained_biases(theirs, "base_model.model.") == []
    y = randomize(ours)(Q)
    lt.export_peft(ours, tmp_path / "to_peft")
    torch.testing.assert_close(peft.PeftModel.from_pretrained(Attn(), tmp_path / "to_peft")(Q), y)
    torch.testing.assert_close(lt.import_peft(Attn(), tmp_path / "to_peft")(Q), y)
    randomize(theirs, seed=2).save_pretrained(tmp_path / "from_peft")
    torch.testing.assert_close(lt.import_peft(Attn(), tmp_path / "from_peft")(Q), theirs(Q))


def test_three_options_on_one_conv_each_both_ways_with_peft(tmp_path):
    "LoHa with the Tucker form, plain LoHa, LoKr Tucker with decompose_both on one Conv2d: each adapter's files (ours"
    " and PEFT's, read by PEFT and by us) give its output; all three active sum on the kernel; merge keeps the output."
    net = lambda: (torch.manual_seed(0), nn.Sequential(nn.Conv2d(4, 36, 3, padding=1), nn.Flatten(),
                                                       nn.Linear(36 * 9, 8)))[1]
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    m = lt.inject(net(), "loha", targets=["0"], rank=2, alpha=3, use_effective_conv2d=True)
    lt.inject(m, "loha", targets=["0", "2"], rank=3, name="b")
    lt.inject(m, "lokr", targets=["0"], rank=2, name="c", use_effective_conv2d=True, decompose_both=True)
    randomize(m)
    for n in ("default", "b", "c"):
        lt.set_adapter(m, n)
        y = m(x)
        lt.export_peft(m, tmp_path / n, name=n)
        lt.save_adapter(m, tmp_path / f"ours_{n}", name=n)
        sub = lambda p: p if n == "default" else p / n
        torch.testing.assert_close(peft.PeftModel.from_pretrained(net(), sub(tmp_path / n))(x), y)
        torch.testing.assert_close(lt.import_peft(net(), sub(tmp_path / n))(x), y)
        torch.testing.assert_close(lt.load_adapter(net(), sub(tmp_path / f"ours_{n}"))(x), y)
    lt.set_adapter(m, ["default", "b", "c"])
    y = m(x)
    W = m[0].base.weight.detach() + sum(u.delta_weight().reshape(m[0].base.weight.shape) for u in m[0].updates.values())
    torch.testing.assert_close(y, m[2](torch.flatten(nn.functional.conv2d(x, W, m[0].base.bias, padding=1), 1)))
    lt.merge(m)
    torch.testing.assert_close(m(x), y)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_trainable_counts_as_peft(tie, bias):
    ours = lt.inject(llama(tie), "lora", targets=["q_proj"], trainable_token_indices=[1, 2], rank=2, bias=bias)
    theirs = peft.get_peft_model(llama(tie), peft.LoraConfig(r=2, target_modules=["q_proj"], bias=bias,
                                                             trainable_token_indices=[1, 2]))
    assert lt.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()[0]


def gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50,
                                                                n_positions=16, bos_token_id=0, eos_token_id=0)).eval()


@pytest.mark.parametrize("arch,lora,kr,ha", [("llama", ["q_proj", "o_proj"], ["k_proj"], ["v_proj"]),
                                             ("gpt2", ["c_attn"], ["c_fc"], ["c_proj"])])
@pytest.mark.parametrize("dora", [False, True])
def test_adapted_layers_biases_get_their_gradient(arch, lora, kr, ha, dora):
    "Was: the adapted layers' autograd functions (FoldedLinear, LowRankLinear, KronLinear) gave no bias gradient, so"
    " bias='all'/'lora_only' never trained an adapted layer's bias. Oracle: the same model merged (plain layers)."
    import copy
    m = lt.inject({"llama": llama, "gpt2": gpt2}[arch](), "lora", targets=lora, rank=2, bias="all", dora=dora)
    lt.inject(m, "lokr", targets=kr, rank=2, name="kr")
    lt.inject(m, "loha", targets=ha, rank=2, name="ha")
    lt.set_adapter(m, ["default", "kr", "ha"])
    randomize(m)
    merged = lt.merge(copy.deepcopy(m))
    for x in (m, merged): x(IDS).logits.square().mean().backward()
    grads = lambda x: {n: p.grad for n, p in x.named_parameters() if p.requires_grad and n.endswith("bias")}
    ours, oracle = grads(m), grads(merged)
    assert ours.keys() == oracle.keys() and any(f"{t}.base.bias" in k for k in ours for t in lora + kr + ha)
    assert all(g is not None for g in ours.values()), [k for k, g in ours.items() if g is None]
    for k in ours: torch.testing.assert_close(ours[k], oracle[k], atol=1e-6, rtol=1e-4)


def test_lora_bias_gradient_as_peft():
    ours = lt.inject(llama(), "lora", targets=["q_proj"], rank=2, bias="lora_only")
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only"))
    for x in (ours, theirs): x(IDS).logits.square().mean().backward()  # B = 0 in both: the bias's gradient is W0's
    torch.testing.assert_close(ours.model.layers[0].self_attn.q_proj.base.bias.grad,
                               theirs.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias.grad)
