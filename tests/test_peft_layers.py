"""LoRA on a parameter (`inject(..., target_parameters=...)`) against PEFT 0.21's own `ParamWrapper`: forward and
gradients, merge, export to `PeftModel.from_pretrained`, import from `save_pretrained`, on a small expert module
(stored either way round, and a 2-D parameter) and on transformers' tiny Qwen3-MoE."""
import pytest
import torch
from torch import nn

import lowrank_tales as lt
from lowrank_tales.injection import adapter_layers

peft = pytest.importorskip("peft")


class Experts(nn.Module):
    "E experts in one parameter, `(E, d_out, d_in)` or, with `is_transposed` (as PEFT reads it), `(E, d_in, d_out)`."
    def __init__(self, E=3, d=6, transposed=False):
        super().__init__()
        self.is_transposed = transposed
        self.w = nn.Parameter(torch.randn(E, d, d, dtype=torch.float64) / d ** 0.5)
        self.scale = nn.Parameter(torch.randn(d, d, dtype=torch.float64) / d ** 0.5)  # a plain 2-D parameter

    def forward(self, x, expert):
        eq = "bi,bio->bo" if self.is_transposed else "bi,boi->bo"
        return torch.einsum(eq, x, self.w[expert]) @ self.scale.T


class Net(nn.Module):
    def __init__(self, transposed=False):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(6, 6).double()
        self.block = nn.ModuleDict(dict(experts=Experts(transposed=transposed)))

    def forward(self, x, expert): return self.block["experts"](self.proj(x), expert)


def randomize(model, seed=1):
    "Every adapter factor drawn at random (stands in for training)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad: p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def peft_model(net, targets, r=2, alpha=4, **kw):
    return peft.get_peft_model(net, peft.LoraConfig(target_modules=["proj"], target_parameters=targets, r=r,
                                                    lora_alpha=alpha, **kw))


X, EXPERT = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("param", ["w", "scale"])
def test_forward_gradients_merge_as_peft(tmp_path, transposed, param):
    theirs = randomize(peft_model(Net(transposed), [f"experts.{param}"], rank_pattern={f"experts.{param}": 3},
                                  use_rslora=True))
    ours = lt.inject(Net(transposed), "lora", targets=["proj"], target_parameters=[f"experts.{param}"], rank=2,
                     alpha=4, rslora=True, rank_pattern={f"experts.{param}": 3})
    layer = ours.block["experts"]
    assert type(layer).__name__ == "ParamLayer" and layer.updates["default"].rank == 3
    wrapper = theirs.base_model.model.block["experts"]
    u = layer.updates["default"]
    with torch.no_grad():  # PEFT's factors into ours, in PEFT's own shapes: the layouts are the same
        u.A.copy_(wrapper.lora_A["default"].weight); u.B.copy_(wrapper.lora_B["default"].weight)
        ours.proj.updates["default"].A.copy_(theirs.base_model.model.proj.lora_A["default"].weight)
        ours.proj.updates["default"].B.copy_(theirs.base_model.model.proj.lora_B["default"].weight)
    y, yp = ours(X, EXPERT), theirs(X, EXPERT)
    torch.testing.assert_close(y, yp)
    y.square().sum().backward(); yp.square().sum().backward()
    torch.testing.assert_close(u.A.grad, wrapper.lora_A["default"].weight.grad)
    torch.testing.assert_close(u.B.grad, wrapper.lora_B["default"].weight.grad)
    P0 = getattr(layer.base, param).detach().clone()
    lt.merge(ours); theirs.merge_adapter()
    torch.testing.assert_close(getattr(layer.base, param), getattr(wrapper.base_layer, param))
    torch.testing.assert_close(ours(X, EXPERT), yp.detach())
    lt.unmerge(ours)
    assert torch.equal(getattr(layer.base, param), P0)


@pytest.mark.parametrize("transposed", [False, True])
def test_files_both_ways_with_peft(tmp_path, transposed):
    ours = randomize(lt.inject(Net(transposed), "lora", targets=["proj"], target_parameters=["experts.w"], rank=2,
                               alpha=3))
    y = ours(X, EXPERT)
    lt.export_peft(ours, tmp_path / "to_peft")
    theirs = peft.PeftModel.from_pretrained(Net(transposed), tmp_path / "to_peft")
    torch.testing.assert_close(theirs(X, EXPERT), y)
    lt.save_adapter(ours, tmp_path / "ours")
    torch.testing.assert_close(lt.load_adapter(Net(transposed), tmp_path / "ours")(X, EXPERT), y)
    made = randomize(peft_model(Net(transposed), ["experts.w"], r=3, alpha=5), seed=2)
    made.save_pretrained(tmp_path / "from_peft")
    back = lt.import_peft(Net(transposed), tmp_path / "from_peft")
    torch.testing.assert_close(back(X, EXPERT), made(X, EXPERT))
    with lt.disable_adapters(back): torch.testing.assert_close(back(X, EXPERT), Net(transposed)(X, EXPERT))
    lt.delete_adapter(back, "default")
    assert adapter_layers(back) == {}


def test_refusals_by_name(tmp_path):
    bad = peft_model(Net(), ["experts.w", "experts.scale"])  # PEFT nests two wrappers on one module
    bad.save_pretrained(tmp_path / "nested")
    with pytest.raises(ValueError, match="does not have|nests a wrapper"): lt.import_peft(Net(), tmp_path / "nested")
    with pytest.raises(ValueError, match="nests a wrapper"):
        lt.inject(Net(), "lora", target_parameters=["experts.w", "experts.scale"], rank=2)
    with pytest.raises(ValueError, match="lora_dropout"):
        lt.inject(Net(), "lora", target_parameters=["experts.w"], rank=2, dropout=0.1)
    with pytest.raises(ValueError, match="per-row batch"):
        with lt.adapter_batch(lt.inject(Net(), "lora", target_parameters=["experts.w"], rank=2), ["default"] * 5) as m:
            m(X, EXPERT)
    with pytest.raises(ValueError, match="trainable_token_indices"):
        lt.inject(Net(), "lora", targets=["proj"], trainable_token_indices=[0, 1])
    with pytest.raises(ValueError, match="equal sizes"):  # PEFT: "Only same embed for query/key/value"
        lt.inject(nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4)), "lora", targets=["0"], rank=2)


def test_tiny_qwen3_moe_both_ways(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         num_experts=4, num_experts_per_tok=2, head_dim=8)
    def base(): torch.manual_seed(0); return transformers.Qwen3MoeForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = randomize(lt.inject(base(), "lora", targets=["q_proj"], target_parameters=["experts.gate_up_proj"],
                               rank=2, alpha=4))
    logits = ours(ids).logits
    assert not torch.allclose(logits, base()(ids).logits)
    lt.export_peft(ours, tmp_path / "to_peft")
    theirs = peft.PeftModel.from_pretrained(base(), tmp_path / "to_peft")
    torch.testing.assert_close(theirs(ids).logits, logits)
    made = randomize(peft.get_peft_model(base(), peft.LoraConfig(target_modules=["v_proj"], r=2, lora_alpha=2,
                                                                 target_parameters=["experts.down_proj"])), seed=3)
    made.save_pretrained(tmp_path / "from_peft")
    back = lt.import_peft(base(), tmp_path / "from_peft")
    torch.testing.assert_close(back(ids).logits, made(ids).logits)
    lt.merge(back); made.merge_adapter()
    torch.testing.assert_close(back(ids).logits, made(ids).logits)


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
        self.head = nn.Linear(8, 3).double()

    def forward(self, q): return self.head(self.mha(q, q, q)[0])


def test_multihead_attention_as_peft_but_its_double_out_proj(tmp_path):
    "PEFT's attention LoRA, but for PEFT 0.21's out_proj update added twice (huggingface/peft#3774): refused at its files."
    q = torch.randn(2, 5, 8, dtype=torch.float64)
    theirs = randomize(peft.get_peft_model(Attn(), peft.LoraConfig(target_modules=["mha"], r=2, lora_alpha=4)))
    ours = lt.inject(Attn(), "lora", targets=["mha"], rank=2, alpha=4)
    u, wrapper = ours.mha.updates["default"], theirs.base_model.model.mha
    pairs = [(u.A, wrapper.lora_A["default"].weight), (u.B, wrapper.lora_B["default"].weight),
             (u.out_A, wrapper.base_layer.out_proj.lora_A["default"].weight),
             (u.out_B, wrapper.base_layer.out_proj.lora_B["default"].weight)]
    with torch.no_grad():
        for ours_f, theirs_f in pairs: ours_f.copy_(theirs_f)
        u.out_B.mul_(2)  # PEFT computes W_out + 2·s·B'A': ours with B' doubled is the same function
    y, yp = ours(q), theirs(q)
    torch.testing.assert_close(y, yp)
    y.square().sum().backward(); yp.square().sum().backward()
    for ours_f, theirs_f in pairs[:2]: torch.testing.assert_close(ours_f.grad, theirs_f.grad)
    # PEFT's second addition goes through `.data`: its gradients are those of W_out + s·B'A', not of its forward
    torch.testing.assert_close(u.out_A.grad, 2 * pairs[2][1].grad)
    torch.testing.assert_close(u.out_B.grad, pairs[3][1].grad)
    lt.merge(ours); theirs.merge_adapter()
    torch.testing.assert_close(ours.mha.base.in_proj_weight, wrapper.base_layer.in_proj_weight)
    torch.testing.assert_close(ours.mha.base.out_proj.weight, wrapper.base_layer.out_proj.base_layer.weight)
    with lt.disable_adapters(ours): torch.testing.assert_close(ours(q), Attn()(q))
    lt.unmerge(ours)
    assert torch.equal(ours.mha.base.in_proj_weight, Attn().mha.in_proj_weight)
    with pytest.raises(ValueError, match="peft#3774"): lt.export_peft(ours, tmp_path / "to_peft")
    assert not (tmp_path / "to_peft").exists()
    theirs.unmerge_adapter(); theirs.save_pretrained(tmp_path / "from_peft")
    with pytest.raises(ValueError, match="peft#3774"): lt.import_peft(Attn(), tmp_path / "from_peft")
    with pytest.raises(ValueError, match="DoRA"):
        peft.get_peft_model(Attn(), peft.LoraConfig(target_modules=["mha"], r=2, use_dora=True))
    with pytest.raises(ValueError, match="use_dora"): lt.inject(Attn(), "lora", targets=["mha"], rank=2, dora=True)


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_trainable_tokens_both_ways_with_peft(tmp_path):
    ids = torch.tensor([[1, 5, 7, 2, 5, 30]])
    made = randomize(peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=4,
                                                                       trainable_token_indices=[5, 7])), seed=4)
    made.save_pretrained(tmp_path / "from_peft")
    ours = lt.import_peft(tiny_llama(), tmp_path / "from_peft")
    assert type(ours.model.embed_tokens.updates["default"]).__name__ == "TokenUpdate"
    logits = made(ids).logits
    assert not torch.allclose(logits, tiny_llama()(ids).logits)
    torch.testing.assert_close(ours(ids).logits, logits)
    lt.merge(ours); made.merge_adapter()
    torch.testing.assert_close(ours.model.embed_tokens.base.weight, made.base_model.model.model.embed_tokens
                               .token_adapter.base_layer.weight)
    torch.testing.assert_close(ours(ids).logits, logits)
    with lt.disable_adapters(ours): torch.testing.assert_close(ours(ids).logits, tiny_llama()(ids).logits)
    lt.unmerge(ours)
    assert torch.equal(ours.model.embed_tokens.base.weight, tiny_llama().model.embed_tokens.weight)
    theirs = lt.inject(tiny_llama(), "lora", targets=["v_proj"], rank=2, alpha=2,
                       trainable_token_indices={"embed_tokens": [3, 4]})
    randomize(theirs, seed=5)
    y = theirs(ids := torch.tensor([[3, 4, 9, 4]])).logits
    lt.export_peft(theirs, tmp_path / "to_peft")
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "to_peft")
    torch.testing.assert_close(again(ids).logits, y)
    torch.testing.assert_close(lt.load_adapter(tiny_llama(), lt.save_adapter(theirs, tmp_path / "ours"))(ids).logits, y)
    lt.delete_adapter(theirs, "default")
    assert type(theirs.model.embed_tokens) is nn.Embedding


def test_trainable_tokens_on_gpt2_untied(tmp_path):
    "GPT-2 (Conv1D layers, PEFT's fan_in_fan_out) untied, both ways with PEFT (tied: the test below)."
    transformers = pytest.importorskip("transformers")
    def gpt2(tie=True):
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2,
                                                                    n_positions=16, tie_word_embeddings=tie)).eval()
    ids = torch.tensor([[1, 2, 5, 2]])
    made = randomize(peft.get_peft_model(gpt2(False), peft.LoraConfig(target_modules=["c_attn"], r=2,
                                                                      trainable_token_indices=[1, 2])), seed=6)
    made.save_pretrained(tmp_path / "untied")
    torch.testing.assert_close(lt.import_peft(gpt2(False), tmp_path / "untied")(ids).logits, made(ids).logits)
    ours = randomize(lt.inject(gpt2(False), "lora", targets=["c_attn"], rank=2, trainable_token_indices=[2, 5]))
    lt.export_peft(ours, tmp_path / "to_peft")
    again = peft.PeftModel.from_pretrained(gpt2(False), tmp_path / "to_peft")
    torch.testing.assert_close(again(ids).logits, ours(ids).logits)


def tied_models():
    "Tiny GPT-2 (Conv1D layers, lm_head tied to wte) and tiny Llama with tie_word_embeddings=True."
    transformers = pytest.importorskip("transformers")
    def gpt2():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2,
                                                                    n_positions=16)).eval()
    def llama():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, tie_word_embeddings=True)).eval()
    return dict(gpt2=(gpt2, "c_attn", "transformer.wte"), llama=(llama, "q_proj", "model.embed_tokens"))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_trainable_tokens_on_a_tied_head_as_peft(tmp_path, arch):
    "The tied head uses the embedding's trained rows (one tensor, gradients added), both ways with PEFT's files."
    base, target, emb = tied_models()[arch]
    ids = torch.tensor([[1, 2, 5, 2, 9]])
    assert (b := base()).get_output_embeddings().weight is b.get_input_embeddings().weight
    made = randomize(peft.get_peft_model(base(), peft.LoraConfig(target_modules=[target], r=2, lora_alpha=4,
                                                                 trainable_token_indices=[2, 5])), seed=7)
    made.save_pretrained(tmp_path / "from_peft")
    ours = lt.import_peft(base(), tmp_path / "from_peft")
    assert type(ours.lm_head).__name__ == "TiedHead"
    y, yp = ours(ids).logits, made(ids).logits
    assert not torch.allclose(yp, base()(ids).logits)
    torch.testing.assert_close(y, yp)
    y.square().sum().backward(); yp.square().sum().backward()
    u = ours.get_submodule(emb).updates["default"]
    delta = made.base_model.model.get_submodule(emb).token_adapter.trainable_tokens_delta["default"]
    torch.testing.assert_close(u.values.grad, delta.grad)
    lora = [(n, p) for n, p in made.named_parameters() if "lora_A" in n][0]
    ours_A = ours.get_submodule(lora[0].split("base_model.model.")[1].split(".lora_A")[0]).updates["default"].A
    torch.testing.assert_close(ours_A.grad, lora[1].grad)
    for m in (ours, made): torch.optim.SGD([q for q in m.parameters() if q.requires_grad], lr=0.5).step()
    yp = made(ids).logits.detach()
    torch.testing.assert_close(ours(ids).logits, yp)  # one step: both uses moved by the summed gradient
    with torch.no_grad():
        lt.merge(ours); made.merge_adapter()
        torch.testing.assert_close(ours.lm_head.weight, made.base_model.model.lm_head.weight)
        torch.testing.assert_close(ours(ids).logits, yp)
        with lt.disable_adapters(ours): torch.testing.assert_close(ours(ids).logits, base()(ids).logits)
        lt.unmerge(ours)
        assert torch.equal(ours.lm_head.weight, base().lm_head.weight)
    mine = randomize(lt.inject(base(), "lora", targets=[target], rank=2, alpha=2, trainable_token_indices=[3, 4]),
                     seed=8)
    y = mine(ids := torch.tensor([[3, 4, 9, 4]])).logits
    lt.export_peft(mine, tmp_path / "to_peft")
    again = peft.PeftModel.from_pretrained(base(), tmp_path / "to_peft")
    torch.testing.assert_close(again(ids).logits, y)
    back = lt.load_adapter(base(), lt.save_adapter(mine, tmp_path / "ours"))
    torch.testing.assert_close(back(ids).logits, y)
    lt.merge_and_unload(back)
    assert type(back.lm_head) is nn.Linear and back.lm_head.weight is back.get_input_embeddings().weight
    torch.testing.assert_close(back(ids).logits, y)
    lt.delete_adapter(mine, "default")
    assert type(mine.lm_head) is nn.Linear and mine.lm_head.weight is mine.get_input_embeddings().weight
    torch.testing.assert_close(mine(ids).logits, base()(ids).logits)
