"""`select_targets` against real PEFT: for a grid of `LoraConfig` choosing options (`target_modules` as names, a regex
or "all-linear", `exclude_modules`, `layers_to_transform`, `layers_pattern`, `modules_to_save`) on tiny random BERT,
GPT-2, Llama and T5 models, the modules we select are exactly those `get_peft_model` adapts. Skipped without peft."""
import copy
import logging
import warnings

import pytest

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lowrank_tales.injection import adapter_layers, exact_targets, inject, select_targets  # noqa: E402


def bert():
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32))


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_embd=16, n_layer=3, n_head=2, n_positions=32))


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2))


def t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=3, num_decoder_layers=2, num_heads=2))


# model, suffix targets, a regex target, the layer segment's name, its head
MODELS = {"bert": (bert, ["query", "value", "dense"], r".*attention\.self\.(query|key)", "layer", "classifier"),
          "gpt2": (gpt2, ["c_attn", "c_proj"], r"transformer\.h\.\d\.mlp\.c_.*", "h", "lm_head"),
          "llama": (llama, ["q_proj", "v_proj", "down_proj"], r".*\.(k|o)_proj", "layers", "lm_head"),
          "t5": (t5, ["q", "v", "wo"], r"(en|de)coder\.block\.\d\.layer\.0\..*\.(q|k)", "block", "lm_head")}


def cases(suffixes, regex, segment, head):
    "A grid of choosing options, as PEFT's `LoraConfig` takes them."
    return [dict(target_modules="all-linear"),
            dict(target_modules="all-linear", exclude_modules=[suffixes[0]]),
            dict(target_modules="all-linear", exclude_modules=rf".*{segment}\.0\..*"),
            dict(target_modules="all-linear", modules_to_save=[head]),
            dict(target_modules=suffixes),
            dict(target_modules=suffixes, exclude_modules=suffixes[1:2]),
            dict(target_modules=suffixes, layers_to_transform=[0, 2]),
            dict(target_modules=suffixes, layers_to_transform=1, layers_pattern=segment),
            dict(target_modules=suffixes, layers_to_transform=[1], layers_pattern=["nothing", segment]),
            dict(target_modules=suffixes[:1] + ["layer"], layers_to_transform=[0], layers_pattern="layer"),
            dict(target_modules=regex),
            dict(target_modules=regex, exclude_modules=rf".*{segment}\.1\..*"),
            dict(target_modules=suffixes, modules_to_save=[head])]


def peft_names(model, options: dict) -> list[str]:
    "The modules `get_peft_model` adapts under `LoraConfig(**options)`."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's Conv1D fan_in_fan_out notice
        logging.disable(logging.WARNING)
        try: pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, **options))
        finally: logging.disable(logging.NOTSET)
    return sorted(pm.base_model.targeted_module_names)


def ours(model, options: dict) -> list[str]:
    o = dict(options)
    return sorted(select_targets(model, o.pop("target_modules"), **o))


@pytest.mark.parametrize("arch", list(MODELS))
def test_select_targets_matches_peft(arch):
    make, suffixes, regex, segment, head = MODELS[arch]
    model = make()
    for options in cases(suffixes, regex, segment, head):
        try: expected = peft_names(model, options)
        except ValueError as e:  # PEFT finds nothing to adapt: we refuse too
            if "not found" not in str(e): raise
            with pytest.raises(ValueError, match="select no module"): ours(model, options)
            continue
        assert ours(model, options) == expected, (arch, options)


@pytest.mark.parametrize("arch", list(MODELS))
def test_inject_on_selected_targets_adapts_what_peft_adapts(arch):
    "Through `exact_targets`, `inject` adapts the same modules as PEFT for a model card's all-linear recipe."
    make, _, _, _, head = MODELS[arch]
    model = make()
    options = dict(target_modules="all-linear", modules_to_save=[head])
    expected = peft_names(model, options)
    inject(model, "lora", targets=exact_targets(select_targets(model, "all-linear", modules_to_save=[head])),
           rank=2, modules_to_save=[head])
    assert sorted(adapter_layers(model)) == expected


def test_peft_refusals_are_ours():
    "The combinations `LoraConfig` refuses, we refuse (with the option named)."
    model = llama()
    for options, words in [(dict(target_modules="all-linear", layers_to_transform=[0]), "needs targets as a list"),
                           (dict(target_modules=r".*q_proj", layers_to_transform=0), "needs targets as a list"),
                           (dict(target_modules=["q_proj"], layers_pattern="layers"), "needs layers_to_transform")]:
        with pytest.raises(ValueError): peft.LoraConfig(r=2, **options)
        with pytest.raises(ValueError, match=words): ours(model, options)


# Property: on random module trees, the names we select are those PEFT's own predicate accepts, option for option.
from hypothesis import example, given, settings, strategies as st  # noqa: E402
from torch import nn  # noqa: E402

WORDS = ["model", "layers", "h", "block", "layer", "attn", "mlp", "q", "q_proj", "v", "0", "1", "2"]
PATTERNS = ["layers", "h", "block", "layer"]
numbered = st.tuples(st.sampled_from(PATTERNS), st.sampled_from(["0", "1", "2"])).map(".".join)
layered = st.tuples(st.lists(st.sampled_from(["model", "encoder", "h", "layer"]), max_size=1),
                    st.lists(numbered, min_size=1, max_size=2),
                    st.lists(st.sampled_from(["attn", "mlp", "q", "q_proj", "v", "layer", "0"]), min_size=1,
                             max_size=2)).map(lambda t: ".".join(t[0] + t[1] + t[2]))  # model.layers.1.attn.q
anything = st.lists(st.sampled_from(WORDS), min_size=1, max_size=5).map(".".join)
paths = st.lists(st.one_of(layered, anything), min_size=1, max_size=12)


def tree(names) -> nn.Module:
    "A module whose `named_modules()` holds every prefix of `names`, each leaf an `nn.Linear`."
    root = nn.Module()
    for name in sorted(set(names), key=len, reverse=True):
        node = root
        for i, part in enumerate(parts := name.split(".")):
            if not hasattr(node, part) or not isinstance(getattr(node, part), nn.Module):
                node.add_module(part, nn.Linear(1, 1) if i == len(parts) - 1 else nn.Module())
            node = getattr(node, part)
    return root


def tails(names) -> list[str]:
    "The last one or two path segments of each of `names`: targets that match something."
    return sorted({".".join(n.split(".")[-k:]) for n in names for k in (1, 2)})


@settings(max_examples=150, deadline=None)
@example(names=["model.layers.1.experts.0.q"], data=None, layers={1}, pattern=None)  # the first index, not the last
@example(names=["model.h.0.mlp.h.1.v"], data=None, layers={0}, pattern=["h"])  # likewise after a pattern
@example(names=["layer.h.0.h.1.q_proj.mlp", "mlp"], data=None, layers={1}, pattern=None)
@given(names=paths, data=st.data(), layers=st.one_of(st.none(), st.sets(st.sampled_from([0, 1, 2]), min_size=1)),
       pattern=st.one_of(st.none(), st.sampled_from(PATTERNS), st.lists(st.sampled_from(PATTERNS), min_size=1,
                                                                        max_size=2)))
def test_selection_agrees_with_peft_predicate(names, data, layers, pattern):
    from types import SimpleNamespace
    from peft.tuners.tuners_utils import check_target_module_exists
    pick = st.lists(st.one_of(st.sampled_from(tails(names)), st.sampled_from(WORDS)), min_size=1, max_size=3)
    if data is None: targets, exclude, saved = [names[0].split(".")[-1]], None, None  # an explicit example
    else:
        targets, exclude = data.draw(pick), data.draw(st.one_of(st.none(), pick))
        saved = data.draw(st.one_of(st.none(), st.sampled_from(WORDS).map(lambda w: [w])))
    if layers is None: pattern = None  # PEFT refuses a pattern without indices, and so do we
    model = tree(names)
    keys = [k for k, _ in model.named_modules() if k]
    cfg = SimpleNamespace(target_modules=set(targets), exclude_modules=None if exclude is None else set(exclude),
                          layers_to_transform=None if layers is None else sorted(layers), layers_pattern=pattern,
                          modules_to_save=saved, target_parameters=None)
    expected = [k for k in keys if check_target_module_exists(cfg, k)]
    options = dict(exclude_modules=exclude, layers_to_transform=None if layers is None else sorted(layers),
                   layers_pattern=pattern, modules_to_save=saved)
    if not expected:
        with pytest.raises(ValueError, match="select no module"): select_targets(model, targets, **options)
    else: assert select_targets(model, targets, **options) == expected


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_inject_takes_peft_choosing_options(arch):
    "`inject` given PEFT's choosing options itself adapts exactly what `get_peft_model` adapts (or refuses likewise)."
    make, suffixes, regex, segment, head = MODELS[arch]
    model = make()
    for options in cases(suffixes, regex, segment, head):
        o = dict(options)
        targets = o.pop("target_modules")
        try: expected = peft_names(model, options)
        except ValueError as e:
            if "not found" not in str(e): raise
            with pytest.raises(ValueError, match="select no module"):
                inject(copy.deepcopy(model), "lora", targets=targets, rank=2, **o)
            continue
        adapted = inject(copy.deepcopy(model), "lora", targets=targets, rank=2, **o)
        assert sorted(adapter_layers(adapted)) == expected, (arch, options)


@pytest.mark.parametrize("method", ["lora", "loha"])
def test_import_peft_honours_choosing_options(tmp_path, method):
    """A PEFT folder saved with `layers_to_transform`, `layers_pattern` and `exclude_modules` imports with the outputs
    of `PeftModel.from_pretrained` on it."""
    import torch
    from lowrank_tales.peft_interop import import_peft
    torch.manual_seed(0)
    base = llama().eval()
    choose = dict(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[0, 2],
                  layers_pattern="layers", exclude_modules=["v_proj"])
    config = (peft.LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, **choose) if method == "lora" else
              peft.LoHaConfig(r=2, alpha=3, init_weights=False, **choose))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), config)
        pm.save_pretrained(tmp_path)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    mine = import_peft(copy.deepcopy(base), tmp_path).eval()
    assert sorted(adapter_layers(mine)) == sorted(theirs.base_model.targeted_module_names)
    assert len(adapter_layers(mine)) == 4  # q_proj and down_proj of layers 0 and 2
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        ref, got, plain = theirs(ids).logits, mine(ids).logits, base(ids).logits
    assert (ref - plain).abs().max() > 1e-3  # the adapter changes the output: the comparison can fail
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
