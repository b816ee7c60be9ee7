"""Every import and load gives the file's meaning or refuses it: PEFT configs field by field against PEFT itself
(residual-base initialisations, lora_alpha null, wrong types, fields we do not know), dtypes and ranges after the cast
to the model's dtype, and the inference mode (trainable=False) against PEFT's is_trainable=False."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowrank_tales as lt
from lowrank_tales.injection import adapter_layers
from lowrank_tales.peft_interop import PEFT_APPLIED, PEFT_INERT, UNSUPPORTED_PEFT
from reliability_catalogue import same_state, small_model, state, trained

peft = pytest.importorskip("peft")
x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))


def peft_trained(tmp_path, init, seed=0, **kw):
    "A PEFT LoRA model with `init_lora_weights=init`, its factors moved as training would, saved the default way."
    torch.manual_seed(seed)
    model = peft.get_peft_model(small_model(), peft.LoraConfig(target_modules=["0", "2"], r=2, lora_alpha=4,
                                                               init_lora_weights=init, **kw))
    init_dir = tmp_path / "init"
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter, for the conversion
    model.save_pretrained(init_dir)
    model.peft_config["default"].init_lora_weights = init
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n: p.add_(0.1 * torch.randn(p.shape))
    model.save_pretrained(tmp_path / "plain")
    return model, init_dir


def test_every_peft_config_field_is_classified():
    "Each field of PEFT's own config classes is applied, inert or refused: none is silently ignored."
    known = PEFT_INERT | PEFT_APPLIED | set(UNSUPPORTED_PEFT)
    for cls in (peft.LoraConfig, peft.LoHaConfig, peft.LoKrConfig):
        assert not {f.name for f in dataclasses.fields(cls)} - known, cls.__name__


@pytest.mark.parametrize("init, kw", [("pissa", {}), ("olora", {}),
                                      ("pissa", dict(use_rslora=True, rank_pattern={"^2": 3}, alpha_pattern={"^0": 3}))])
def test_pissa_and_olora_import_with_peft_meaning(tmp_path, init, kw):
    "PEFT rebuilds the residual base at load; our import, on the unchanged base, computes the same function."
    model, init_dir = peft_trained(tmp_path, init, **kw)
    theirs = peft.PeftModel.from_pretrained(small_model(), tmp_path / "plain")
    torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=1e-5)
    ours = lt.import_peft(small_model(), tmp_path / "plain")
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    # the same factors as a plain delta of the unchanged base compute something else (what the rebuild prevents)
    cfg = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    (tmp_path / "plain" / "adapter_config.json").write_text(json.dumps(cfg | dict(init_lora_weights=True)))
    assert (lt.import_peft(small_model(), tmp_path / "plain")(x) - model(x)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="on nn.Linear in float32, float16 or bfloat16"):  # as PEFT refuses float64
        (tmp_path / "plain" / "adapter_config.json").write_text(json.dumps(cfg))
        lt.import_peft(small_model().double(), tmp_path / "plain")


@pytest.mark.parametrize("init", ["pissa_niter_2", "pissa", "olora"])
def test_random_residual_inits_are_refused_and_conversions_import_exactly(tmp_path, init):
    model, init_dir = peft_trained(tmp_path, init)
    if init == "pissa_niter_2":  # PEFT's own load of it is random (a randomised SVD): refused, model unchanged
        m = small_model(); before = state(m)
        with pytest.raises(ValueError, match="init_lora_weights='pissa_niter_2'.*path_initial_model_for_weight_conv"):
            lt.import_peft(m, tmp_path / "plain")
        assert same_state(before, state(m))
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(init_dir))
    ours = lt.import_peft(small_model(), tmp_path / "converted")
    torch.testing.assert_close(ours(x), peft.PeftModel.from_pretrained(small_model(), tmp_path / "converted")(x),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x), model(x), atol=1e-5, rtol=1e-5)  # the trained model's function


@pytest.mark.parametrize("init", [False, "gaussian", "orthogonal"])
def test_inits_that_keep_the_base_import_as_peft_loads_them(tmp_path, init):
    peft_trained(tmp_path, init, use_rslora=True, rank_pattern={"^2": 4}, alpha_pattern={"^0": 3})
    theirs = peft.PeftModel.from_pretrained(small_model(), tmp_path / "plain")
    ours = lt.import_peft(small_model(), tmp_path / "plain")
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


def edited(tmp_path, **changes):
    "Our PEFT export of a trained LoRA model, its config edited."
    folder = lt.export_peft(trained("lora"), tmp_path / "e")
    cfg = json.loads((folder / "adapter_config.json").read_text()) | changes
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("changes, msg", [
    (dict(lora_alpha=None), "lora_alpha: null, which PEFT itself cannot load"),
    (dict(rank_pattern="^0"), "field rank_pattern must be a map"),
    (dict(alpha_pattern=[["^0", 2]]), "field alpha_pattern must be a map"),
    (dict(r="2"), "field r must be a positive integer"),
    (dict(use_rslora=1), "field use_rslora must be true or false"),
    (dict(modules_to_save="2"), "field modules_to_save must be a list of module names"),
    (dict(brand_new_option=True), "fields ['brand_new_option'] that lowrank_tales does not know"),
    (dict(init_lora_weights="corda"), "replaces by residual ones"),
    (dict(init_lora_weights="pissa", use_dora=True), "with DoRA or fan_in_fan_out is not supported")])
def test_config_fields_refused_by_name(tmp_path, changes, msg):
    folder = edited(tmp_path, **changes)
    m = small_model(); before = state(m)
    with pytest.raises(ValueError) as e: lt.import_peft(m, folder)
    assert msg in str(e.value)
    assert same_state(before, state(m))


def test_lora_alpha_null_fails_in_peft_itself(tmp_path):
    "The oracle for refusing it: PEFT has no meaning for it either."
    with pytest.raises(TypeError): peft.PeftModel.from_pretrained(small_model(), edited(tmp_path, lora_alpha=None))


def test_range_is_checked_after_the_cast_to_the_model_dtype(tmp_path):
    big = trained("lora").double()
    with torch.no_grad(): adapter_layers(big)["2"].updates["default"].B.fill_(1e39)  # finite in float64 only
    for save, load in [(lt.save_adapter, lt.load_adapter), (lt.export_peft, lt.import_peft)]:
        folder = save(big, tmp_path / save.__name__)
        m = small_model(); before = state(m)  # float32
        with pytest.raises(ValueError, match="beyond the range of the model's torch.float32"): load(m, folder)
        assert same_state(before, state(m))
        assert torch.isfinite(load(small_model().double(), folder)(x.double())).all()  # a float64 model takes it


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32, torch.float8_e4m3fn])
def test_complex_integer_float8_tensors_are_refused(tmp_path, dtype):
    folder = lt.export_peft(trained("lora"), tmp_path / "p")
    tensors = load_file(folder / "adapter_model.safetensors")
    k = next(iter(tensors))
    save_file(tensors | {k: tensors[k].to(dtype)}, folder / "adapter_model.safetensors")
    m = small_model(); before = state(m)
    with pytest.raises(ValueError, match=f"has dtype {dtype}, but adapter factors are float16, bfloat16"):
        lt.import_peft(m, folder)
    assert same_state(before, state(m))


def test_inference_mode_matches_peft_is_trainable(tmp_path):
    folder = lt.export_peft(trained("lora"), tmp_path / "p")
    lt.save_adapter(trained("lora"), tmp_path / "o")
    for trainable in (False, True):
        theirs = peft.PeftModel.from_pretrained(small_model().train(), folder, is_trainable=trainable)
        ours = lt.import_peft(small_model().train(), folder, trainable=trainable)
        ours_own = lt.load_adapter(small_model().train(), tmp_path / "o", trainable=trainable)
        n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
        assert n_theirs == sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
            sum(p.numel() for p in ours_own.parameters() if p.requires_grad) == (48 if trainable else 0)  # r = 2 on 8→6 and 6→4
        for model in (ours, ours_own):  # the adapted modules: eval for inference, as PEFT's (which sets all of it)
            assert [a.training for a in adapter_layers(model).values()] == [trainable] * 2
        assert theirs.base_model.model[0].training == trainable
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="trainable must be True or False, got 'no'"):
        lt.import_peft(small_model(), folder, trainable="no")
