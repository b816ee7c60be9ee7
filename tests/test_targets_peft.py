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
