"""File integrity of saved adapters: random corruption and truncation of either file (50 seeded cases) is refused with a
ValueError and leaves the model bit-for-bit unchanged, or loads the intact values; checksums are written and checked."""
import json
import random

import torch
import pytest
from safetensors.torch import save_file

import lowrank_tales as lt
from lowrank_tales.adapter_files import factor_tensors
from reliability_catalogue import (damaged, fixture_folder, fuzz_adapter_files, fuzz_case, same_state, small_model,
                                   state, trained)


def test_fuzz_50_corruptions():
    cases = fuzz_adapter_files(50, seed=0)
    bad = [c for c in cases if not c["ok"]]
    assert not bad, bad
    assert {c["file"] for c in cases} == {"adapter.safetensors", "adapter_config.json"}


@pytest.mark.parametrize("source", ["lora", "lokh"])
def test_fuzz_other_methods(source):
    rng = random.Random(1)
    # lokh has no rank: fuzz_case injects with rank=2 for the adapted model, so only the plain model applies there
    for _ in range(5):
        if source == "lokh":
            folder = damaged("lokh", lambda d: (d / "adapter.safetensors").write_bytes((d / "adapter.safetensors").read_bytes()[:rng.randrange(200)]))
            m = small_model(); before = state(m)
            with pytest.raises(ValueError): lt.load_adapter(m, folder)
            assert same_state(before, state(m))
        else: assert fuzz_case(rng, source)["ok"]


def test_checksum_written_and_round_trip_exact(tmp_path):
    model = trained("loha")
    lt.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    import hashlib
    assert cfg["sha256"] == hashlib.sha256((tmp_path / "adapter.safetensors").read_bytes()).hexdigest()
    back = lt.load_adapter(small_model(), tmp_path)
    assert same_state(state(back), state(model))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # the save's journal is gone


def test_files_without_checksum_still_load(tmp_path):
    model = trained("lora")
    lt.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    del cfg["sha256"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: p.detach().contiguous() for k, p in factor_tensors(model).items()}, tmp_path / "adapter.safetensors")
    assert same_state(state(lt.load_adapter(small_model(), tmp_path)), state(model))


def test_import_peft_truncations_leave_model_unchanged():
    rng = random.Random(2)
    for _ in range(10):
        cut = rng.random()
        file = rng.choice(["adapter_model.safetensors", "adapter_config.json"])
        folder = damaged("peft", lambda d: (d / file).write_bytes((d / file).read_bytes()[:int(cut * (d / file).stat().st_size)]))
        m = small_model(); before = state(m)
        try: lt.import_peft(m, folder)
        except ValueError: assert same_state(before, state(m))


def test_write_files_keeps_the_old_files_when_writing_fails(tmp_path, monkeypatch):
    "A save is atomic as a whole: a write that fails half-way leaves the previous files, every one, as they were."
    import os
    from lowrank_tales import adapter_files
    model = trained("lora")
    lt.save_adapter(model, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    real, calls = os.write, []
    def failing(fd, data):
        calls.append(1)
        if len(calls) == 2: raise OSError("disk full")
        return real(fd, data)
    monkeypatch.setattr(os, "write", failing)
    with pytest.raises(OSError, match="disk full"):
        adapter_files.write_files(tmp_path / "a", {"adapter.safetensors": b"new", "adapter_config.json": b"{}"})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before  # no journal left behind
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    assert same_state(state(lt.load_adapter(small_model(), tmp_path / "a")), state(model))


def test_numpy_scalars_are_accepted_and_saved_as_plain_numbers(tmp_path):
    import numpy as np
    model = lt.inject(small_model(), "lora", targets=["0", "2"], rank=np.int64(2), alpha=np.float32(4.0), dropout=np.float64(0.1))
    lt.save_adapter(model, tmp_path)
    spec = json.loads((tmp_path / "adapter_config.json").read_text())["modules"]["0"]["spec"]
    assert (spec["rank"], spec["alpha"], spec["dropout"]) == (2, 4.0, 0.1)
    assert same_state(state(lt.load_adapter(small_model(), tmp_path)), state(model))
