"""Hostile rerun of Part II (issue 24): regression guards for cases that pass on main.

Each test is one attack: files (saves touch only their own files), names, state vs output against a plain-tensor
reference, torch.func, PEFT imports, and failed calls that must leave the model bit-identical."""
import copy, json, os, random, signal, stat, subprocess, time, warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file, load_file

import lowrank_tales as lt

pytestmark = pytest.mark.filterwarnings("ignore")


# ---------------------------------------------------------------- helpers
def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))


KW = {"lora": dict(rank=2, alpha=3.0), "loha": dict(rank=2, alpha=3.0), "lokr": dict(rank=2, alpha=3.0),
      "lokh": dict(p=2), "dora": dict(rank=2, alpha=3.0, dora=True)}


def add(m, method, name="default", **kw):
    lt.inject(m, "lora" if method == "dora" else method, targets=["0", "2"], name=name, **{**KW[method], **kw})
    return m


def adapted(method="lora", names=("default",), seed=0):
    m = tiny(seed)
    for n in names: add(m, method, n)
    randomize(m)
    return m


def randomize(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".updates." in n: p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def snapshot(m):
    "Everything a refused call must leave unchanged: parameters, buffers, requires_grad, modes, adapter states."
    sd = {k: v.detach().clone() for k, v in m.state_dict(keep_vars=True).items()}
    grads = {n: p.requires_grad for n, p in m.named_parameters()}
    modes = {n: mod.training for n, mod in m.named_modules()}
    states = {n: mod._state for n, mod in m.named_modules() if isinstance(mod, lt.AdaptedLayer)}
    raw = {n: p.detach().clone() for n, p in m.named_parameters()}
    return sd, grads, modes, states, raw, [type(x).__name__ for x in m.modules()]


def same(a, b):
    sa, sb = snapshot(a) if isinstance(a, nn.Module) else a, snapshot(b) if isinstance(b, nn.Module) else b
    assert sa[0].keys() == sb[0].keys()
    for k in sa[0]: assert torch.equal(sa[0][k], sb[0][k]), k
    assert sa[4].keys() == sb[4].keys()
    for k in sa[4]: assert torch.equal(sa[4][k], sb[4][k]), k
    assert sa[1:4] == sb[1:4] and sa[5] == sb[5]


def tree(root):
    "Every entry under `root` with its bytes (files), target (links) or None (folders)."
    out = {}
    for d, dirs, files in os.walk(root):
        for e in dirs + files:
            p = os.path.join(d, e)
            r = os.path.relpath(p, root)
            link, folder = os.path.islink(p), os.path.isdir(p)
            out[r] = ("L", os.readlink(p)) if link else (None if folder else Path(p).read_bytes())
    return out


def ours(entries):
    return {e for e in entries if os.path.basename(e) in ("adapter_config.json", "adapter.safetensors",
                                                           "adapter_model.safetensors") or e in ("b", "c")}


X = torch.randn(7, 8, generator=torch.Generator().manual_seed(5))


def out(m, x=X):
    with torch.no_grad(): return m(x)


# ---------------------------------------------------------------- 1. files
def saved_roundtrip(path, save=lt.save_adapter, load=lt.load_adapter, method="lora"):
    m = adapted(method)
    save(m, path)
    f = add(tiny(), method)
    load(f, path) if load is lt.load_adapter else load(f, path, "default")
    torch.testing.assert_close(out(f), out(m))


@pytest.mark.parametrize("method", ["lora", "loha", "lokr", "lokh", "dora"])
def test_save_load_roundtrip(tmp_path, method):
    saved_roundtrip(tmp_path / "a", method=method)


@pytest.mark.parametrize("method", ["lora", "loha", "lokr"])
def test_export_import_roundtrip(tmp_path, method):
    m = adapted(method)
    lt.export_peft(m, tmp_path / "p")
    f = tiny()
    lt.import_peft(f, tmp_path / "p")
    torch.testing.assert_close(out(f), out(m))


@pytest.mark.parametrize("save", [lt.save_adapter, lt.export_peft])
def test_save_into_dot_touches_only_ours(tmp_path, monkeypatch, save):
    (tmp_path / "keep.txt").write_text("mine")
    (tmp_path / ".hidden").mkdir(); (tmp_path / ".hidden" / "x").write_text("h")
    (tmp_path / ".env").write_text("SECRET=1")
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    save(adapted(), ".")
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if k not in ours(after)} == before


@pytest.mark.parametrize("save", [lt.save_adapter, lt.export_peft])
def test_save_into_empty_string_refused_or_cwd(tmp_path, monkeypatch, save):
    (tmp_path / "keep.txt").write_text("mine")
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    try: save(adapted(), "")
    except (ValueError, TypeError) as e: assert "path" in str(e)
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if k not in ours(after)} == before


@pytest.mark.parametrize("save", [lt.save_adapter, lt.export_peft])
def test_git_tree_only_our_files(tmp_path, save):
    g = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "README.md").write_text("r"); (tmp_path / "sub").mkdir(); (tmp_path / "sub" / "f.py").write_text("x")
    subprocess.run(g + ["add", "-A"], check=True); subprocess.run(g + ["commit", "-qm", "c"], check=True)
    before = tree(tmp_path)
    m = adapted(names=("default", "b"))
    lt.set_adapter(m, ["default", "b"])
    save(m, tmp_path)
    st = subprocess.run(g + ["status", "--porcelain", "-uall"], capture_output=True, text=True, check=True).stdout
    names = sorted(l[3:] for l in st.splitlines())
    assert set(names) <= {"adapter_config.json", "adapter.safetensors", "adapter_model.safetensors",
                          "b/adapter_config.json", "b/adapter.safetensors", "b/adapter_model.safetensors"}, names
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before


@pytest.mark.parametrize("save", [lt.save_adapter, lt.export_peft])
def test_existing_file_in_the_way(tmp_path, save):
    (tmp_path / "f").write_text("mine")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="not a folder"): save(adapted(), tmp_path / "f")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("save", [lt.save_adapter, lt.export_peft])
def test_file_as_parent_in_the_way(tmp_path, save):
    (tmp_path / "f").write_text("mine")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="not a folder"): save(adapted(), tmp_path / "f" / "g")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("save", [lt.save_adapter, lt.export_peft])
def test_symlink_to_dir_refused(tmp_path, save):
    (tmp_path / "real").mkdir(); (tmp_path / "real" / "x").write_text("1")
    os.symlink(tmp_path / "real", tmp_path / "link")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="symbolic link"): save(adapted(), tmp_path / "link")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("save,fname", [(lt.save_adapter, "adapter_config.json"),
                                        (lt.save_adapter, "adapter.safetensors"),
                                        (lt.export_peft, "adapter_config.json"),
                                        (lt.export_peft, "adapter_model.safetensors")])
@pytest.mark.parametrize("kind", ["dir", "symlink", "dangling"])
def test_our_file_replaced_by_dir_or_link(tmp_path, save, fname, kind):
    d = tmp_path / "a"; d.mkdir(); (tmp_path / "target").write_text("t")
    if kind == "dir": (d / fname).mkdir(); (d / fname / "x").write_text("y")
    elif kind == "symlink": os.symlink(tmp_path / "target", d / fname)
    else: os.symlink(tmp_path / "nowhere", d / fname)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="not a file"): save(adapted(), d)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("save", [lt.save_adapter, lt.export_peft])
def test_subfolder_collides_with_user_file(tmp_path, save):
    m = adapted(names=("default", "b")); lt.set_adapter(m, ["default", "b"])
    (tmp_path / "b").write_text("user file named b")
    before = tree(tmp_path)
    with pytest.raises(ValueError): save(m, tmp_path)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("save", [lt.save_adapter, lt.export_peft])
def test_subfolder_keeps_user_files(tmp_path, save):
    m = adapted(names=("default", "b")); lt.set_adapter(m, ["default", "b"])
    (tmp_path / "b").mkdir(); (tmp_path / "b" / "notes.txt").write_text("n"); (tmp_path / "b" / ".git").mkdir()
    save(m, tmp_path)
    assert (tmp_path / "b" / "notes.txt").read_text() == "n" and (tmp_path / "b" / ".git").is_dir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
@pytest.mark.parametrize("save", [lt.save_adapter, lt.export_peft])
def test_read_only_folder(tmp_path, save):
    d = tmp_path / "ro"; d.mkdir(); (d / "x").write_text("1"); d.chmod(0o555)
    try:
        before = tree(tmp_path)
        with pytest.raises(PermissionError): save(adapted(), d)
        assert tree(tmp_path) == before
    finally: d.chmod(0o755)


@pytest.mark.parametrize("save", [lt.save_adapter, lt.export_peft])
def test_saving_twice_latest_wins(tmp_path, save):
    m = adapted(); save(m, tmp_path)
    randomize(m, seed=9); save(m, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(ours(os.listdir(tmp_path)))
    f = tiny()
    if save is lt.save_adapter: add(f, "lora"); lt.load_adapter(f, tmp_path)
    else: lt.import_peft(f, tmp_path)
    torch.testing.assert_close(out(f), out(m))


def test_load_missing_folder_clear(tmp_path):
    m = add(tiny(), "lora"); s = snapshot(m)
    with pytest.raises((ValueError, FileNotFoundError), match="adapter"): lt.load_adapter(m, tmp_path / "none")
    same(s, m)


def _kill_during_save(path, save, seeds=6):
    "Save in a child, SIGKILL it at random moments; the folder then holds one complete save (old or new)."
    m0 = adapted(); save(m0, path); y0 = out(m0)
    ys = [y0]
    for k in range(seeds):
        m = adapted(); randomize(m, seed=100 + k); ys.append(out(m))
        pid = os.fork()
        if pid == 0:
            try:
                for _ in range(50): save(m, path)
            finally: os._exit(0)
        time.sleep(0.01 + 0.02 * k)
        os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)
        f = tiny()
        if save is lt.save_adapter: add(f, "lora"); lt.load_adapter(f, path)
        else: lt.import_peft(f, path)
        y = out(f)
        assert any(torch.allclose(y, r) for r in ys)


@pytest.mark.parametrize("save", [lt.save_adapter, lt.export_peft])
def test_sigkill_during_save(tmp_path, save):
    _kill_during_save(tmp_path / "a", save)


# ---------------------------------------------------------------- 1b. names
BAD_NAMES = ["/abs", "..", "a/b", "", ".hidden", "a\0b", "a\\b", 3, 2.5, ["default"]]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_bad_name_inject(bad):
    m = adapted(); s = snapshot(m)
    with pytest.raises((ValueError, TypeError), match="name"): lt.inject(m, "lora", targets=["0"], name=bad, rank=2)
    same(s, m)


@pytest.mark.parametrize("bad", BAD_NAMES[:7], ids=repr)
def test_bad_name_load_and_import(tmp_path, bad):
    m = adapted(); lt.save_adapter(m, tmp_path / "a"); lt.export_peft(m, tmp_path / "p")
    f = adapted(seed=3); s = snapshot(f)
    with pytest.raises(ValueError, match="name"): lt.load_adapter(f, tmp_path / "a", name=bad)
    with pytest.raises(ValueError, match="name"): lt.import_peft(f, tmp_path / "p", name=bad)
    same(s, f)
    assert sorted(os.listdir(tmp_path)) == ["a", "p"]


@pytest.mark.parametrize("bad", BAD_NAMES[:7], ids=repr)
def test_bad_name_save_writes_nothing(tmp_path, bad):
    with pytest.raises((ValueError, TypeError)): lt.save_adapter(adapted(), tmp_path / "s", name=bad)
    with pytest.raises((ValueError, TypeError)): lt.export_peft(adapted(), tmp_path / "s", name=bad)
    assert os.listdir(tmp_path) == []


def _craft(folder, config, tensors, meta=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter.safetensors"), metadata=meta)


def _good(tmp_path):
    m = adapted(); lt.save_adapter(m, tmp_path / "g")
    config = json.loads((tmp_path / "g" / "adapter_config.json").read_text()); config.pop("sha256")
    return config, load_file(str(tmp_path / "g" / "adapter.safetensors"))


def test_crafted_unsealed_file_loads(tmp_path):
    config, t = _good(tmp_path)
    _craft(tmp_path / "c", config, t)
    f = add(tiny(), "lora"); lt.load_adapter(f, tmp_path / "c")
    m = adapted(); torch.testing.assert_close(out(f), out(m))


@pytest.mark.parametrize("edit", [
    lambda c, t: c.update(name="../x"), lambda c, t: c.update(name="/etc"), lambda c, t: c.update(name=""),
    lambda c, t: c.update(name=7), lambda c, t: c.update(name=".h"),
    lambda c, t: c["modules"]["0"]["spec"].update(method="evil"),
    lambda c, t: c["modules"]["0"]["spec"].update(rank=-1),
    lambda c, t: c["modules"]["0"]["spec"].update(rank="2"),
    lambda c, t: c["modules"]["0"]["spec"].update(alpha="3"),
    lambda c, t: c["modules"]["0"]["spec"].update(dropout=1.5),
    lambda c, t: c["modules"]["0"]["spec"].update(path="nowhere"),
    lambda c, t: c["modules"]["0"]["spec"].update(dtype="complex64"),
    lambda c, t: c["modules"]["0"]["shapes"].update(A=[3, 8]),
    lambda c, t: c["modules"].update({"nope": c["modules"]["0"]}),
    lambda c, t: c["modules"].update({"..": c["modules"]["0"]}),
    lambda c, t: c.update(modules={}),
    lambda c, t: c.update(modules=[1]),
    lambda c, t: c.update(library="peft"),
    lambda c, t: c.update(modules_to_save={"0": {"weight": [6, 8]}}),
    lambda c, t: t.update({"0.A": t["0.A"].to(torch.complex64)}),
    lambda c, t: t.update({"0.A": t["0.A"].to(torch.int32)}),
    lambda c, t: t.update({"0.A": torch.zeros(3, 8)}),
    lambda c, t: t.pop("0.A"),
    lambda c, t: t.update({"0.C": torch.zeros(1)}),
], ids=lambda f: str(id(f))[-4:])
def test_crafted_file_refused_model_unchanged(tmp_path, edit):
    config, t = _good(tmp_path)
    edit(config, t)
    _craft(tmp_path / "c", config, t)
    before = tree(tmp_path)
    f = adapted(seed=4); s = snapshot(f)
    with pytest.raises((ValueError, TypeError)): lt.load_adapter(f, tmp_path / "c")
    same(s, f)
    assert tree(tmp_path) == before


# ---------------------------------------------------------------- 2. state vs output
def oracle_delta(u):
    "`s·ΔW` of update `u` from its factors by the textbook formula (LoKH: the library's own, checked elsewhere)."
    f = {k: p.detach().double() for k, p in u.named_parameters()}
    if u.method == "lora": D = f["B"] @ f["A"]
    elif u.method == "loha": D = (f["B1"] @ f["A1"]) * (f["B2"] @ f["A2"])
    elif u.method == "lokr": D = torch.kron(f["A"], f["B"])
    else: return u.delta_weight().double()
    return D * u.scale


class Ref:
    "The model's meaning from plain tensors: `W0 + Σ s·ΔW` over the active adapters, unless disabled."
    def __init__(self, m):
        self.W0 = {i: (m[i].weight.detach().double().clone(), m[i].bias.detach().double().clone()) for i in (0, 2)}
        self.names, self.active, self.merged, self.disabled, self.gone = {}, [], set(), False, None

    def weights(self, m):
        if self.gone is not None: return self.gone
        out = {}
        for i in (0, 2):
            W, b = self.W0[i]
            if not self.disabled:
                for n in self.active: W = W + oracle_delta(m[i].updates[n])
            out[i] = (W, b)
        return out

    def forward(self, m, x=X):
        w = self.weights(m)
        h = torch.relu(x.double() @ w[0][0].T + w[0][1])
        return h @ w[2][0].T + w[2][1]


def check(m, ref):
    torch.testing.assert_close(out(m).double(), ref.forward(m), atol=1e-5, rtol=1e-5)
    if ref.gone is None and ref.names:
        assert lt.active_adapters(m) == ref.active
        assert sorted(m[0].merged) == sorted(ref.merged)


def _refused(m, fn, ref):
    s = snapshot(m)
    with pytest.raises(ValueError): fn()
    same(s, m); check(m, ref)


def step(m, ref, rng, k):
    names = list(ref.names)
    ops = ["inject", "set", "merge", "unmerge", "delete", "sd", "disable", "set_dup", "merge_idle"]
    op = rng.choice(ops if names else ["inject"])
    if op == "inject" and len(names) < 3:
        n = f"n{k}"; meth = rng.choice(["lora", "loha", "lokr", "lokh"])
        add(m, meth, n); randomize_one(m, n, k)
        ref.names[n] = meth
        if not ref.active and not names: ref.active = [n]
        elif not names: ref.active = [n]
    elif op == "set":
        sub = rng.sample(names, rng.randint(1, len(names)))
        lt.set_adapter(m, sub); ref.active, ref.merged = sub, set()
    elif op == "merge" and ref.active:
        sub = rng.sample(ref.active, rng.randint(1, len(ref.active)))
        if set(sub) & ref.merged: _refused(m, lambda: lt.merge(m, sub), ref)
        else: lt.merge(m, sub); ref.merged |= set(sub)
    elif op == "unmerge":
        if ref.merged: lt.unmerge(m); ref.merged = set()
        else: _refused(m, lambda: lt.unmerge(m), ref)
    elif op == "delete":
        n = rng.choice(names)
        if n in ref.merged: _refused(m, lambda: lt.delete_adapter(m, n), ref)
        else:
            lt.delete_adapter(m, n); del ref.names[n]
            ref.active = [a for a in ref.active if a != n]
    elif op == "sd":
        m.load_state_dict(m.state_dict())
    elif op == "disable":
        with lt.disable_adapters(m):
            ref.disabled = True; check(m, ref)
            if ref.merged and rng.random() < 0.5: lt.unmerge(m); ref.merged = set(); check(m, ref)
            elif ref.active and rng.random() < 0.5:
                lt.merge(m, ref.active[0]) if ref.active[0] not in ref.merged else None
                ref.merged.add(ref.active[0]); check(m, ref)
        ref.disabled = False
    elif op == "set_dup":
        _refused(m, lambda: lt.set_adapter(m, [names[0], names[0]]), ref)
    elif op == "merge_idle":
        idle = [n for n in names if n not in ref.active]
        if idle: _refused(m, lambda: lt.merge(m, idle[0]), ref)
    if not ref.names: ref.active, ref.merged = [], set()
    check(m, ref)


def randomize_one(m, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if f".updates.{name}." in n: p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("seed", range(25))
def test_random_sequences_match_reference(seed):
    rng = random.Random(seed)
    m = tiny(seed).eval(); ref = Ref(m)
    for k in range(14): step(m, ref, rng, k)
    end = rng.choice(["unload", "merge_and_unload", "none"])
    if ref.names and end == "unload":
        lt.unload(m); ref.gone = ref.W0; check(m, ref)
        assert all(type(x) is nn.Linear for x in (m[0], m[2]))
    elif ref.names and end == "merge_and_unload":
        w = ref.weights(m); lt.merge_and_unload(m); ref.gone = w; check(m, ref)
        assert all(type(x) is nn.Linear for x in (m[0], m[2]))


@pytest.mark.parametrize("verb", ["unload", "delete", "set", "inject", "load", "merge", "unmerge", "sd"])
def test_disable_with_verb_inside(tmp_path, verb):
    m = adapted(names=("default", "b")); lt.set_adapter(m, ["default", "b"])
    if verb == "unmerge": lt.merge(m)
    y0, yA = out(tiny()), out(m)
    lt.save_adapter(m, tmp_path, name="b")
    with lt.disable_adapters(m):
        if verb == "unload": lt.unload(m)
        elif verb == "delete": lt.delete_adapter(m, "b")
        elif verb == "set": lt.set_adapter(m, "b")
        elif verb == "inject": add(m, "loha", "c")
        elif verb == "load": lt.load_adapter(m, tmp_path / "b", name="c")
        elif verb == "merge": lt.merge(m)
        elif verb == "unmerge": lt.unmerge(m)
        else: m.load_state_dict(m.state_dict())
        torch.testing.assert_close(out(m), y0)
    if verb in ("inject", "load", "merge", "unmerge", "sd"):
        torch.testing.assert_close(out(m), yA, atol=1e-5, rtol=1e-5)
    elif verb == "unload": torch.testing.assert_close(out(m), y0)
    else: assert lt.active_adapters(m) == (["default"] if verb == "delete" else ["b"])


def test_merge_and_unload_inside_disable_refused():
    m = adapted(); s = snapshot(m)
    with lt.disable_adapters(m):
        with pytest.raises(ValueError, match="disable_adapters"): lt.merge_and_unload(m)
    same(s, m)


def test_merged_state_dict_into_fresh():
    m = adapted(); y = out(m); lt.merge(m)
    f = adapted(); randomize(f, seed=7); f.load_state_dict(m.state_dict())
    torch.testing.assert_close(out(f), y, atol=1e-5, rtol=1e-5)


def test_fresh_state_dict_into_merged():
    m = adapted(); randomize(m, seed=7); lt.merge(m); f = adapted()
    m.load_state_dict(f.state_dict())
    torch.testing.assert_close(out(m), out(f), atol=1e-5, rtol=1e-5); assert m[0].merged == ["default"]
    lt.unmerge(m); torch.testing.assert_close(m[0].base.weight, tiny()[0].weight)


def test_strict_false_factors_into_merged():
    m = adapted(); lt.merge(m)
    part = {k: v * 2 for k, v in adapted().state_dict().items() if ".updates." in k}
    m.load_state_dict(part, strict=False)
    torch.testing.assert_close(m[0].base.weight, tiny()[0].weight + m[0].updates["default"].delta_weight(),
                               atol=1e-5, rtol=1e-5)


def test_strict_false_base_weight_into_merged():
    m = adapted(); lt.merge(m); W = tiny(seed=9)[0].weight.detach()
    m.load_state_dict({"0.base.weight": W}, strict=False)
    torch.testing.assert_close(m[0].base.weight, W + m[0].updates["default"].delta_weight(), atol=1e-5, rtol=1e-5)
    lt.unmerge(m); torch.testing.assert_close(m[0].base.weight, W, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dropout_follows_mode(mode):
    m = getattr(tiny(), mode)(); lt.inject(m, "lora", targets=["0", "2"], rank=2, dropout=0.9); randomize(m)
    assert all(x.training == (mode == "train") for x in m.modules())
    m.eval(); assert torch.equal(out(m), out(m))
    m.train(); assert not torch.equal(out(m), out(m))


def test_trainable_flags_follow_set_adapter():
    m = adapted(names=("default", "b"))
    rg = lambda: {n.split(".")[2] for n, p in m.named_parameters() if p.requires_grad}
    assert rg() == {"default"}
    lt.set_adapter(m, "b"); assert rg() == {"b"}
    lt.set_adapter(m, ["b", "default"]); assert rg() == {"b", "default"}


# ---------------------------------------------------------------- 3. torch.func
def _func_setup(method):
    m = adapted(method).double(); Xd = X.double()
    params = {k: v.detach() for k, v in m.named_parameters()}
    pr = {k: v for k, v in params.items() if ".updates." in k}
    f = lambda p: torch.func.functional_call(m, {**params, **p}, (Xd,))
    return m, Xd, pr, f


@pytest.mark.parametrize("method", ["lora", "loha", "lokr", "lokh", "dora"])
def test_func_grad_and_vmap_equal_eager(method):
    m, Xd, pr, f = _func_setup(method)
    g = torch.func.grad(lambda p: (f(p) ** 2).sum())(pr)
    ge = torch.autograd.grad((m(Xd) ** 2).sum(), [p for n, p in m.named_parameters() if n in pr])
    for k, e in zip(pr, ge): torch.testing.assert_close(g[k], e)
    v = torch.func.vmap(lambda xi: torch.func.functional_call(m, dict(m.named_parameters()), (xi[None],))[0])(Xd)
    torch.testing.assert_close(v, out(m, Xd))


@pytest.mark.parametrize("method", ["lora", "loha", "lokr", "lokh"])
def test_func_jvp_and_hvp_match_finite_differences(method):
    m, Xd, pr, f = _func_setup(method)
    g = torch.Generator().manual_seed(3)
    t = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in pr.items()}
    sh = lambda s: {k: v + s * t[k] for k, v in pr.items()}
    eps = 1e-5
    torch.testing.assert_close(torch.func.jvp(f, (pr,), (t,))[1], (f(sh(eps)) - f(sh(-eps))) / (2 * eps),
                               atol=1e-6, rtol=1e-6)
    L = lambda p: (f(p) ** 2).sum()
    h = torch.func.jvp(torch.func.grad(L), (pr,), (t,))[1]
    g1, g2 = torch.func.grad(L)(sh(eps)), torch.func.grad(L)(sh(-eps))
    for k in pr: torch.testing.assert_close(h[k], (g1[k] - g2[k]) / (2 * eps), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- 4. imports
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(cfg).eval()


def _bert():
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=16,
                                                          intermediate_size=32, vocab_size=50,
                                                          max_position_embeddings=16)).eval()


GT = ["c_attn", "c_proj", "c_fc"]
PEFT_CASES = {
    "gpt2_plain": (_gpt2, lambda: peft.LoraConfig(r=2, lora_alpha=5, target_modules=GT, fan_in_fan_out=True)),
    "gpt2_rslora": (_gpt2, lambda: peft.LoraConfig(r=2, lora_alpha=5, target_modules=GT, fan_in_fan_out=True,
                                                   use_rslora=True)),
    "gpt2_patterns": (_gpt2, lambda: peft.LoraConfig(r=2, lora_alpha=5, target_modules=GT, fan_in_fan_out=True,
                                                     rank_pattern={"c_fc": 4}, alpha_pattern={"h.1.attn.c_attn": 9})),
    "gpt2_dora": (_gpt2, lambda: peft.LoraConfig(r=2, lora_alpha=5, target_modules=GT, fan_in_fan_out=True,
                                                 use_dora=True)),
    "gpt2_regex": (_gpt2, lambda: peft.LoraConfig(r=2, lora_alpha=5, target_modules=r".*\.1\.attn\.c_(attn|proj)",
                                                  fan_in_fan_out=True)),
    "gpt2_modules_to_save": (_gpt2, lambda: peft.LoraConfig(r=2, lora_alpha=5, target_modules=["c_attn"],
                                                            fan_in_fan_out=True, modules_to_save=["ln_f"])),
    "gpt2_init_false": (_gpt2, lambda: peft.LoraConfig(r=2, lora_alpha=5, target_modules=GT, fan_in_fan_out=True,
                                                       init_lora_weights=False)),
    "gpt2_gaussian": (_gpt2, lambda: peft.LoraConfig(r=2, lora_alpha=5, target_modules=GT, fan_in_fan_out=True,
                                                     init_lora_weights="gaussian")),
    "bert_pissa": (_bert, lambda: peft.LoraConfig(r=2, lora_alpha=5, target_modules=["query", "value"],
                                                  init_lora_weights="pissa")),
    "bert_olora": (_bert, lambda: peft.LoraConfig(r=2, lora_alpha=5, target_modules=["query", "value"],
                                                  init_lora_weights="olora")),
    "bert_dora": (_bert, lambda: peft.LoraConfig(r=2, lora_alpha=5, target_modules=["query", "value"],
                                                 use_dora=True)),
    "bert_loha": (_bert, lambda: peft.LoHaConfig(r=2, alpha=5, target_modules=["query", "value"],
                                                 init_weights=False)),
    "bert_lokr": (_bert, lambda: peft.LoKrConfig(r=2, alpha=5, target_modules=["query", "value"],
                                                 init_weights=False)),
    "bert_embedding": (_bert, lambda: peft.LoraConfig(r=2, lora_alpha=5, target_modules=["word_embeddings", "query"])),
    "bert_exclude": (_bert, lambda: peft.LoraConfig(r=2, lora_alpha=5, target_modules=["query", "value"],
                                                    exclude_modules=["encoder.layer.0.attention.self.value"])),
    "bert_float_alpha": (_bert, lambda: peft.LoraConfig(r=3, lora_alpha=2.5, target_modules=["query"])),
    "bert_lokr_decompose_both": (_bert, lambda: peft.LoKrConfig(r=1, alpha=5, target_modules=["query"],
                                                                init_weights=False, decompose_both=True)),
    "bert_bias_all": (_bert, lambda: peft.LoraConfig(r=2, lora_alpha=5, target_modules=["query"], bias="all")),
    "bert_bias_lora_only": (_bert, lambda: peft.LoraConfig(r=2, lora_alpha=5, target_modules=["query"],
                                                           bias="lora_only")),
    "gpt2_layers_to_transform": (_gpt2, lambda: peft.LoraConfig(r=2, lora_alpha=5, target_modules=GT,
                                 fan_in_fan_out=True, layers_to_transform=[1], layers_pattern="h")),
}
PEFT_REFUSED = {
    "bert_pissa_niter": (_bert, lambda: peft.LoraConfig(r=2, lora_alpha=5, target_modules=["query"],
                                                        init_lora_weights="pissa_niter_2"), "pissa_niter"),
}


def _peft_folder(tmp_path, mk, cfg):
    pm = peft.get_peft_model(mk(), cfg())
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if any(s in n for s in ("lora_B", "lora_embedding", "hada_", "lokr_", "magnitude")):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_import_peft_equals_peft(tmp_path, case):
    mk, cfg = PEFT_CASES[case]
    d = _peft_folder(tmp_path / "p", mk, cfg)
    before = tree(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(mk(), d).eval()
    m = lt.import_peft(mk(), d)
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).last_hidden_state, ref(IDS).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("case", list(PEFT_REFUSED))
def test_import_peft_refuses_clearly(tmp_path, case):
    mk, cfg, word = PEFT_REFUSED[case]
    d = _peft_folder(tmp_path / "p", mk, cfg)
    m = mk(); s = snapshot(m)
    with pytest.raises(ValueError, match=word): lt.import_peft(m, d)
    same(s, m)


def _peft_crafted(tmp_path, ce=None, te=None):
    m = adapted(); lt.export_peft(m, tmp_path / "src")
    c = json.loads((tmp_path / "src" / "adapter_config.json").read_text())
    t = load_file(str(tmp_path / "src" / "adapter_model.safetensors"))
    if ce: ce(c)
    if te: te(t)
    d = tmp_path / "c"; d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(c)); save_file(t, str(d / "adapter_model.safetensors"))
    return d, m


K0 = "base_model.model.0.lora_A.weight"
PEFT_BAD = {
    "alpha_none": (lambda c: c.update(lora_alpha=None), None, "lora_alpha"),
    "alpha_missing": (lambda c: c.pop("lora_alpha"), None, "lora_alpha"),
    "r_str": (lambda c: c.update(r="2"), None, "r must"),
    "r_float": (lambda c: c.update(r=2.0), None, "r must"),
    "r_zero": (lambda c: c.update(r=0), None, "r must"),
    "r_bool": (lambda c: c.update(r=True), None, "r must"),
    "alpha_str": (lambda c: c.update(lora_alpha="3"), None, "lora_alpha"),
    "alpha_nan": (lambda c: c.update(lora_alpha=float("nan")), None, "lora_alpha"),
    "alpha_inf": (lambda c: c.update(lora_alpha=float("inf")), None, "lora_alpha"),
    "targets_int": (lambda c: c.update(target_modules=5), None, "target_modules"),
    "dora_str": (lambda c: c.update(use_dora="yes"), None, "use_dora"),
    "rslora_str": (lambda c: c.update(use_rslora="no"), None, "use_rslora"),
    "fifo_str": (lambda c: c.update(fan_in_fan_out="false"), None, "fan_in_fan_out"),
    "fifo_on_linear": (lambda c: c.update(fan_in_fan_out=True), None, "fan_in_fan_out"),
    "ia3": (lambda c: c.update(peft_type="IA3"), None, "peft_type"),
    "no_peft_type": (lambda c: c.pop("peft_type"), None, "peft_type"),
    "rank_pattern_list": (lambda c: c.update(rank_pattern=[1]), None, "rank_pattern"),
    "rank_pattern_mismatch": (lambda c: c.update(rank_pattern={"0": 4}), None, "shape"),
    "alpha_pattern_str": (lambda c: c.update(alpha_pattern={"0": "9"}), None, "alpha_pattern"),
    "dropout_str": (lambda c: c.update(lora_dropout="0.1"), None, "lora_dropout"),
    "mts_str": (lambda c: c.update(modules_to_save="2"), None, "modules_to_save"),
    "huge_f64": (None, lambda t: t.update({K0: t[K0].double() * 1e300}), "range"),
    "complex": (None, lambda t: t.update({K0: t[K0].to(torch.complex64)}), "dtype"),
    "int": (None, lambda t: t.update({K0: t[K0].to(torch.int64)}), "dtype"),
    "bool": (None, lambda t: t.update({K0: t[K0] > 0}), "dtype"),
    "float8": (None, lambda t: t.update({K0: t[K0].to(torch.float8_e4m3fn)}), "dtype"),
    "nan": (None, lambda t: t[K0].fill_(float("nan")), "NaN"),
    "inf": (None, lambda t: t[K0].fill_(float("inf")), "NaN or infinite"),
    "unknown_factor": (None, lambda t: t.update({"base_model.model.0.lora_C.weight": torch.zeros(2)}), "factor"),
    "unknown_module": (None, lambda t: t.update({"base_model.model.7.lora_A.weight": torch.zeros(2, 8)}), "7"),
    "dotdot_module": (None, lambda t: t.update({"base_model.model.../x.lora_A.weight": torch.zeros(2, 8)}), "model"),
    "missing": (None, lambda t: t.pop(K0), "lacks"),
    "wrong_shape": (None, lambda t: t.update({K0: torch.zeros(3, 8)}), "shape"),
    "transposed": (None, lambda t: t.update({K0: t[K0].T.contiguous()}), "shape"),
    "scalar": (None, lambda t: t.update({K0: torch.tensor(1.0)}), "shape"),
}


@pytest.mark.parametrize("case", list(PEFT_BAD))
def test_import_peft_bad_file_refused(tmp_path, case):
    ce, te, word = PEFT_BAD[case]
    d, _ = _peft_crafted(tmp_path, ce, te)
    m = tiny(seed=3); s = snapshot(m)
    with pytest.raises(ValueError, match=word): lt.import_peft(m, d)
    same(s, m)


@pytest.mark.parametrize("dt", [torch.float64, torch.bfloat16, torch.float16])
def test_import_peft_other_float_dtypes_load_values(tmp_path, dt):
    d, m = _peft_crafted(tmp_path, te=lambda t: t.update({k: v.to(dt) for k, v in t.items()}))
    f = lt.import_peft(tiny(), d)
    assert all(p.dtype == torch.float32 for p in f.parameters())
    tol = {torch.float64: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dt]
    torch.testing.assert_close(out(f), out(m), atol=tol, rtol=tol)


@pytest.mark.parametrize("method,kw", [("lora", {}), ("lora", dict(rslora=True)), ("dora", {}), ("loha", {}),
                                       ("lokr", {}), ("lora", dict(dropout=0.1)), ("lora", dict(alpha=None)),
                                       ("lora", dict(rank_pattern={"2": 1}, alpha_pattern={"0": 7.0}))])
def test_export_peft_equals_peft_loading_it(tmp_path, method, kw):
    m = add(tiny(), method, **kw).eval(); randomize(m)
    lt.export_peft(m, tmp_path)
    ref = peft.PeftModel.from_pretrained(tiny(), tmp_path).eval()
    torch.testing.assert_close(out(ref), out(m), atol=1e-5, rtol=1e-5)


def test_export_peft_two_adapters_equals_peft(tmp_path):
    m = adapted(names=("default", "b")); lt.set_adapter(m, ["default", "b"])
    lt.export_peft(m, tmp_path)
    ref = peft.PeftModel.from_pretrained(tiny(), tmp_path).eval()
    ref.load_adapter(str(tmp_path / "b"), adapter_name="b"); ref.base_model.set_adapter(["default", "b"])
    torch.testing.assert_close(out(ref), out(m), atol=1e-5, rtol=1e-5)


def test_export_peft_lokh_refused_writes_nothing(tmp_path):
    m = adapted("lokh"); s = snapshot(m)
    with pytest.raises(ValueError, match="save_adapter"): lt.export_peft(m, tmp_path / "x")
    same(s, m); assert os.listdir(tmp_path) == []


def test_load_while_another_process_saves(tmp_path):
    "A child saves two different adapters in turn, as fast as it can; every load gives one of them whole."
    a, b = adapted(), adapted(); randomize(b, seed=42)
    lt.save_adapter(a, tmp_path); ys = [out(a), out(b)]
    pid = os.fork()
    if pid == 0:
        try:
            while True:
                for m in (a, b): lt.save_adapter(m, tmp_path)
        finally: os._exit(0)
    try:
        for _ in range(25):
            f = add(tiny(), "lora"); lt.load_adapter(f, tmp_path)
            assert any(torch.equal(out(f), y) for y in ys)
    finally: os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)


# ---------------------------------------------------------------- 5. failed calls leave the model as it was
def _inj(method="lora", **kw):
    return lambda m: lt.inject(m, method, **{"targets": ["0", "2"], "name": "b", "rank": 2, **kw})


FT, T2 = tiny(5), ["0", "2"]
REFUSED = {
    "rank0": (_inj(rank=0), ValueError, "rank"), "rank-1": (_inj(rank=-1), ValueError, "rank"),
    "rank_float": (_inj(rank=2.0), TypeError, "rank"), "rank_bool": (_inj(rank=True), TypeError, "rank"),
    "rank_huge": (_inj(rank=10 ** 6), ValueError, "rank"), "rank_str": (_inj(rank="2"), TypeError, "rank"),
    "alpha_nan": (_inj(alpha=float("nan")), ValueError, "alpha"),
    "alpha_inf": (_inj(alpha=float("inf")), ValueError, "alpha"),
    "alpha_neg": (_inj(alpha=-1.0), ValueError, "alpha"), "alpha_complex": (_inj(alpha=1j), TypeError, "alpha"),
    "alpha_bool": (_inj(alpha=True), TypeError, "alpha"),
    "dropout_1": (_inj(dropout=1.0), ValueError, "dropout"), "dropout_neg": (_inj(dropout=-0.1), ValueError, "dropout"),
    "dropout_nan": (_inj(dropout=float("nan")), ValueError, "dropout"),
    "dtype_complex": (_inj(dtype=torch.complex64), ValueError, "dtype"),
    "dtype_int": (_inj(dtype=torch.int32), ValueError, "dtype"),
    "dtype_f8": (_inj(dtype=torch.float8_e4m3fn), ValueError, "dtype"),
    "dtype_str": (_inj(dtype="float32"), TypeError, "dtype"),
    "targets_none": (_inj(targets=["zz"]), ValueError, "targets"),
    "targets_partial": (_inj(targets=["0", "zz"]), ValueError, "zz"),
    "targets_int": (_inj(targets=3), TypeError, "targets"), "targets_empty": (_inj(targets=[]), ValueError, "targets"),
    "targets_empty_str": (_inj(targets=""), ValueError, "targets"),
    "targets_relu": (_inj(targets=["1"]), TypeError, "ReLU"),
    "method_bad": (_inj(method="ia3"), ValueError, "method"), "method_int": (_inj(method=3), ValueError, "method"),
    "lokh_rank": (_inj(method="lokh"), ValueError, "p="),
    "lokh_p_huge": (_inj(method="lokh", rank=None, p=99), ValueError, "p="),
    "rslora_loha": (_inj(method="loha", rslora=True), ValueError, "rslora"),
    "unknown_option": (_inj(foo=1), TypeError, "foo"),
    "rank_pattern_0": (_inj(rank_pattern={"0": 0}), ValueError, "rank"),
    "alpha_pattern_nan": (_inj(alpha_pattern={"0": float("nan")}), ValueError, "alpha"),
    "mts_is_target": (_inj(modules_to_save=["0"]), ValueError, "modules_to_save"),
    "mts_missing": (_inj(modules_to_save=["zz"]), ValueError, "modules_to_save"),
    "existing_name": (_inj(name="default"), ValueError, "default"),
    "path_bad": (_inj(path="nope"), ValueError, "path"),
    "merge_dup": (lambda m: lt.merge(m, ["default", "default"]), ValueError, "twice"),
    "merge_unknown": (lambda m: lt.merge(m, "zz"), ValueError, "zz"),
    "unmerge_unmerged": (lambda m: lt.unmerge(m), ValueError, "no adapter is merged"),
    "set_unknown": (lambda m: lt.set_adapter(m, ["default", "zz"]), ValueError, "zz"),
    "set_comma": (lambda m: lt.set_adapter(m, "default,b"), ValueError, "default,b"),
    "delete_unknown": (lambda m: lt.delete_adapter(m, "zz"), ValueError, "zz"),
    "delete_none": (lambda m: lt.delete_adapter(m, None), ValueError, "name"),
    "sd_wrong_shape": (lambda m: m.load_state_dict({**m.state_dict(), "0.updates.default.A": torch.zeros(3, 8)}),
                       RuntimeError, "size mismatch"),
    "extract_existing": (lambda m: lt.extract_adapters(m, FT, "lora", targets=T2, rank=2), ValueError, "default"),
    "init_existing": (lambda m: lt.init_from_weight(m, "lora", targets=["0", "2"], rank=2), ValueError, "default"),
}
PLAIN_REFUSED = {
    "extract_alpha0": (lambda m: lt.extract_adapters(m, FT, "lora", targets=T2, rank=2, alpha=0), ValueError, "alpha"),
    "extract_rank0": (lambda m: lt.extract_adapters(m, FT, "lora", targets=["0", "2"], rank=0), ValueError, "rank"),
    "extract_rank_huge": (lambda m: lt.extract_adapters(m, FT, "lora", targets=T2, rank=100), ValueError, "rank"),
    "extract_shapes": (lambda m: lt.extract_adapters(m, nn.Sequential(nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 4)),
                                                     "lora", targets=["0", "2"], rank=2), ValueError, "shape"),
    "extract_missing": (lambda m: lt.extract_adapters(m, {"0.weight": FT[0].weight}, "lora", targets=T2, rank=2),
                        ValueError, "2.weight"),
    "extract_method": (lambda m: lt.extract_adapters(m, FT, "ia3", targets=["0", "2"], rank=2), ValueError, "method"),
    "extract_budget": (lambda m: lt.extract_adapters(m, FT, "lora", targets=T2, budget=1), ValueError, "budget"),
    "extract_rank_budget": (lambda m: lt.extract_adapters(m, FT, "lora", targets=["0", "2"], rank=2, budget=100),
                            ValueError, "budget"),
    "extract_alpha_nan": (lambda m: lt.extract_adapters(m, FT, "lora", targets=["0", "2"], rank=2, alpha=float("nan")),
                          ValueError, "alpha"),
    "extract_fit_option": (lambda m: lt.extract_adapters(m, FT, "loha", targets=["0", "2"], rank=2, n_iter=-1),
                           TypeError, "n_iter"),
    "extract_max_iter": (lambda m: lt.extract_adapters(m, FT, "loha", targets=["0", "2"], rank=2, max_iter="x"),
                         TypeError, "max_iter"),
    "init_alpha0": (lambda m: lt.init_from_weight(m, "lora", targets=["0", "2"], rank=2, alpha=0), ValueError, "alpha"),
    "init_rank_huge": (lambda m: lt.init_from_weight(m, "lora", targets=["0", "2"], rank=100), ValueError, "rank"),
    "init_rank_neg": (lambda m: lt.init_from_weight(m, "lora", targets=["0", "2"], rank=-1), ValueError, "rank"),
    "init_no_match": (lambda m: lt.init_from_weight(m, "lora", targets=["zz"], rank=2), ValueError, "targets"),
    "init_lokh_p": (lambda m: lt.init_from_weight(m, "lokh", targets=["0", "2"], p=50), ValueError, "p="),
    "init_dtype_int": (lambda m: lt.init_from_weight(m, "lora", targets=["0", "2"], rank=2, dtype=torch.int32),
                       ValueError, "dtype"),
    "init_fit_option": (lambda m: lt.init_from_weight(m, "lora", targets=T2, rank=2, fit_bad=1), TypeError, "fit_bad"),
    "init_max_iter": (lambda m: lt.init_from_weight(m, "loha", targets=T2, rank=2, max_iter=-1),
                      ValueError, "max_iter"),
    "plain_merge": (lambda m: lt.merge(m), ValueError, "no adapters"),
    "plain_unmerge": (lambda m: lt.unmerge(m), ValueError, "no adapters"),
    "plain_unload": (lambda m: lt.unload(m), ValueError, "no adapters"),
    "plain_merge_and_unload": (lambda m: lt.merge_and_unload(m), ValueError, "no adapters"),
    "plain_set": (lambda m: lt.set_adapter(m, "a"), ValueError, "no adapters"),
    "plain_disable": (lambda m: lt.disable_adapters(m).__enter__(), ValueError, "no adapters"),
}


@pytest.mark.parametrize("case,merged", [(c, g) for c in REFUSED for g in (False, True)
                                         if not (g and c == "unmerge_unmerged")])
def test_refused_call_on_adapted_model_changes_nothing(case, merged):
    fn, exc, word = REFUSED[case]
    m = adapted()
    if merged: lt.merge(m)
    s = snapshot(m); y = out(m)
    with pytest.raises(exc, match=word): fn(m)
    same(s, m); assert torch.equal(out(m), y)


@pytest.mark.parametrize("case", list(PLAIN_REFUSED))
def test_refused_call_on_plain_model_changes_nothing(case):
    fn, exc, word = PLAIN_REFUSED[case]
    m = tiny(); s = snapshot(m)
    with pytest.raises(exc, match=word): fn(m)
    same(s, m)


# ---------------------------------------------------------------- loads into adapters in every state
@pytest.fixture
def sources(tmp_path):
    src = adapted(); randomize(src, seed=11)
    lt.save_adapter(src, tmp_path / "s"); lt.export_peft(src, tmp_path / "p")
    return src, {"load": lambda m, **kw: lt.load_adapter(m, tmp_path / "s", **kw),
                 "import": lambda m, **kw: lt.import_peft(m, tmp_path / "p", **kw)}


@pytest.mark.parametrize("how", ["load", "import"])
def test_load_into_merged_adapter_refused(sources, how):
    src, load = sources
    m = adapted(); lt.merge(m); s = snapshot(m)
    with pytest.raises(ValueError, match="merged"): load[how](m)
    same(s, m)


@pytest.mark.parametrize("how", ["load", "import"])
def test_load_inside_disable(sources, how):
    src, load = sources
    m = adapted()
    with lt.disable_adapters(m):
        load[how](m); torch.testing.assert_close(out(m), out(tiny()))
    torch.testing.assert_close(out(m), out(src), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["load", "import"])
def test_load_into_inactive_adapter_keeps_it_inactive(sources, how):
    src, load = sources
    m = adapted(names=("default", "b")); lt.set_adapter(m, "b")
    load[how](m)
    assert lt.active_adapters(m) == ["b"]
    assert {n.split(".")[2] for n, p in m.named_parameters() if p.requires_grad} == {"b"}


@pytest.mark.parametrize("how", ["load", "import"])
def test_load_for_inference(sources, how):
    src, load = sources
    m = tiny(); load[how](m, trainable=False)
    assert not any(p.requires_grad for p in m.parameters())
    torch.testing.assert_close(out(m), out(src), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["load", "import"])
@pytest.mark.parametrize("model", ["wider", "subset"])
def test_load_into_other_architecture_refused(sources, how, model):
    src, load = sources
    wide = nn.Sequential(nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 4))
    m = wide if model == "wider" else nn.Sequential(nn.Linear(8, 6))
    s = snapshot(m)
    with pytest.raises(ValueError, match="shape|does not have"): load[how](m)
    same(s, m)


def test_merged_model_saves_its_factors(tmp_path):
    m = adapted(); y = out(m); lt.merge(m); lt.save_adapter(m, tmp_path)
    f = add(tiny(), "lora"); lt.load_adapter(f, tmp_path)
    torch.testing.assert_close(out(f), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_half_model_merge_unmerge_restores_w0(dt):
    m = tiny().to(dt); W = m[0].weight.detach().clone(); add(m, "lora"); randomize(m)
    lt.merge(m); lt.unmerge(m)
    assert torch.equal(m[0].base.weight, W)


def test_adapter_subfolder_symlink_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir(); (tmp_path / "root").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "root" / "b")
    m = adapted(names=("default", "b")); lt.set_adapter(m, ["default", "b"])
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="symbolic link"): lt.save_adapter(m, tmp_path / "root")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name,word", [(["default", "default"], "twice"), ("zz", "zz")])
def test_save_bad_name_lists_write_nothing(tmp_path, name, word):
    with pytest.raises(ValueError, match=word): lt.save_adapter(adapted(), tmp_path / "s", name=name)
    assert os.listdir(tmp_path) == []


def test_save_only_named_nondefault_goes_to_subfolder(tmp_path):
    m = adapted(names=("default", "b"))
    lt.save_adapter(m, tmp_path, name=["b"])
    assert sorted(tree(tmp_path)) == ["b", "b/adapter.safetensors", "b/adapter_config.json"]


# ---------------------------------------------------------------- modules_to_save and DoRA against plain tensors
def _mts_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).eval()
    for n in ("a", "b"): lt.inject(m, "lora", targets=["0"], rank=2, name=n, modules_to_save=["2"])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".updates." in n or ".copies." in n: p.add_(torch.randn(p.shape, generator=g) * 0.3)
    W0 = m[0].base.weight.detach().double().clone()
    return m, W0


def _mts_ref(m, W0, act):
    "Layer 0 `W0 + s·BA` of `act`, layer 2 the copy of `act` (the original for `None`)."
    W = W0 if act is None else W0 + oracle_delta(m[0].updates[act])
    l2 = m[2].original if act is None else m[2].copies[act]
    h = torch.relu(X.double() @ W.T + m[0].base.bias.double())
    return h @ l2.weight.double().T + l2.bias.double()


@pytest.mark.parametrize("act", ["a", "b"])
def test_modules_to_save_follow_state(tmp_path, act):
    m, W0 = _mts_model(); lt.set_adapter(m, act)
    ok = lambda a: torch.testing.assert_close(out(m).double(), _mts_ref(m, W0, a), atol=1e-5, rtol=1e-5)
    ok(act)
    with lt.disable_adapters(m): ok(None)
    lt.merge(m); ok(act); lt.unmerge(m); ok(act)
    assert {n.split(".")[2] for n, p in m.named_parameters() if p.requires_grad} == {act}
    s = snapshot(m)
    with pytest.raises(ValueError, match="trained copy"): lt.set_adapter(m, ["a", "b"])
    same(s, m)
    lt.save_adapter(m, tmp_path / "s", name=act); lt.export_peft(m, tmp_path / "p", name=act)
    sub = lambda d: d / act if act != "default" else d
    for load in (lambda f: lt.load_adapter(f, sub(tmp_path / "s")), lambda f: lt.import_peft(f, sub(tmp_path / "p"))):
        torch.manual_seed(0); f = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).eval(); load(f)
        torch.testing.assert_close(out(f).double(), _mts_ref(m, W0, act), atol=1e-5, rtol=1e-5)
    r = _mts_ref(m, W0, act); lt.merge_and_unload(m)
    torch.testing.assert_close(out(m).double(), r, atol=1e-5, rtol=1e-5)
    assert all(type(x) in (nn.Linear, nn.ReLU) for x in m)


def test_modules_to_save_unload_gives_original():
    m, W0 = _mts_model(); r = _mts_ref(m, W0, None); lt.unload(m)
    torch.testing.assert_close(out(m).double(), r, atol=1e-6, rtol=1e-6)


def _dora_W(W0, u):
    f = {k: p.detach().double() for k, p in u.named_parameters()}
    V = W0 + u.scale * (f["B"] @ f["A"])
    return f["magnitude"][:, None] * V / V.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("act", [["d"], ["l"], ["d", "l"], ["l", "d"]])
def test_dora_mixed_with_lora_matches_formula(act):
    m = tiny().eval(); W0 = [m[i].weight.detach().double().clone() for i in (0, 2)]
    b = [m[i].bias.detach().double() for i in (0, 2)]
    add(m, "dora", "d"); add(m, "lora", "l"); randomize(m, seed=3)
    with torch.no_grad():
        for i in (0, 2): m[i].updates["d"].magnitude.mul_(1.3)
    Ws = [W0[j] + sum(_dora_W(W0[j], m[i].updates[n]) - W0[j] if n == "d" else oracle_delta(m[i].updates[n])
                      for n in act) for j, i in enumerate((0, 2))]
    r = torch.relu(X.double() @ Ws[0].T + b[0]) @ Ws[1].T + b[1]
    lt.set_adapter(m, act)
    torch.testing.assert_close(out(m).double(), r, atol=1e-5, rtol=1e-5)
    lt.merge(m); torch.testing.assert_close(out(m).double(), r, atol=1e-5, rtol=1e-5)
    lt.unmerge(m); assert torch.equal(m[0].base.weight.double(), W0[0])


def test_crafted_file_on_unadaptable_module_refused(tmp_path):
    config, t = _good(tmp_path)
    config["modules"]["1"] = copy.deepcopy(config["modules"]["2"])
    t["1.A"], t["1.B"] = t["2.A"].clone(), t["2.B"].clone()
    _craft(tmp_path / "c", config, t)
    f = adapted(seed=4); s = snapshot(f)
    with pytest.raises(ValueError, match="ReLU"): lt.load_adapter(f, tmp_path / "c", name="new")
    same(s, f)


def test_crafted_peft_file_on_unadaptable_module_refused(tmp_path):
    d, _ = _peft_crafted(tmp_path, te=lambda t: t.update({"base_model.model.1.lora_A.weight": torch.zeros(2, 6),
                                                          "base_model.model.1.lora_B.weight": torch.zeros(4, 2)}))
    f = tiny(); s = snapshot(f)
    with pytest.raises(ValueError, match="ReLU"): lt.import_peft(f, d)
    same(s, f)


def test_load_under_another_name_adds_inactive(tmp_path):
    f = adapted(); lt.save_adapter(adapted(seed=9), tmp_path); y = out(f)
    lt.load_adapter(f, tmp_path, name="other")
    assert lt.adapter_names(f) == ["default", "other"] and lt.active_adapters(f) == ["default"]
    assert torch.equal(out(f), y)


def test_copies_and_pickles_of_a_merged_model_unmerge_to_w0(tmp_path):
    m = adapted(); y = out(m); lt.merge(m)
    torch.save(m, tmp_path / "m.pt")
    for c in (copy.deepcopy(m), torch.load(tmp_path / "m.pt", weights_only=False)):
        torch.testing.assert_close(out(c), y, atol=1e-5, rtol=1e-5)
        assert c[0].merged == ["default"]
        lt.unmerge(c); assert torch.equal(c[0].base.weight, tiny()[0].weight)


@pytest.mark.parametrize("dt", [torch.float64, torch.float16])
def test_dtype_change_while_merged_unmerges_to_w0(dt):
    m = adapted(); lt.merge(m); m.to(dt); lt.unmerge(m)
    assert torch.equal(m[0].base.weight, tiny()[0].weight.to(dt))


def test_assign_load_into_merged_model():
    m = adapted(); y = out(m); lt.merge(m)
    m.load_state_dict(adapted().state_dict(), assign=True)
    torch.testing.assert_close(out(m), y, atol=1e-5, rtol=1e-5)
    lt.unmerge(m); assert torch.equal(m[0].base.weight, tiny()[0].weight)


def test_merge_of_tied_lm_head_refused():
    torch.manual_seed(0)
    g = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50,
                                                             n_positions=16, bos_token_id=0, eos_token_id=0)).eval()
    lt.inject(g, "lora", targets=["lm_head"], rank=2); s = snapshot(g)
    with pytest.raises(ValueError, match="tied"): lt.merge(g)
    same(s, g)


# ---------------------------------------------------------------- fixes of the findings (F1-F14)
@pytest.mark.parametrize("save", ["save_adapter", "export_peft"])
@pytest.mark.parametrize("committed", [False, True])
def test_f12_a_folder_named_like_a_journal_is_never_touched(tmp_path, save, committed):
    "F12: a user folder named like our journal (even with a commit marker) is neither removed, moved nor read."
    mine = tmp_path / ".lowrank_tales-save-00000000000000000001-deadbeef"
    mine.mkdir(); (mine / "thesis.tex").write_text("precious"); (mine / "adapter_config.json").write_text("{}")
    if committed: (mine / ".committed").touch()
    m = adapted("lora")
    getattr(lt, save)(m, tmp_path)
    assert sorted(p.name for p in mine.iterdir()) == sorted(["thesis.tex", "adapter_config.json"]
                                                            + [".committed"] * committed)
    assert (mine / "thesis.tex").read_text() == "precious"
    getattr(lt, save)(m, tmp_path / "clean")
    ours = sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(ours + [mine.name, "clean"])
    load = lt.load_adapter if save == "save_adapter" else lt.import_peft
    out = load(tiny(), tmp_path)  # the crafted folder's config is not read in place of the visible one
    X = torch.randn(5, 8)
    torch.testing.assert_close(out(X), m(X), rtol=0, atol=0)


def _hvp_by_autograd_and_func(m, X, functional):
    "The Hessian-vector product of Σ m(X)² along ones, by eager double backward and by torch.func's jvp(grad)."
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    ps = tuple(p.detach() for n, p in m.named_parameters() if p.requires_grad)
    v = tuple(torch.ones_like(p) for p in ps)
    f = lambda *p: (torch.func.functional_call(m, dict(zip(names, p)), (X,)) ** 2).sum()
    if functional: eager = torch.autograd.functional.hvp(f, ps, v)[1]  # allow_unused inside: a gap reads as 0
    else:
        live = [p for p in m.parameters() if p.requires_grad]
        g = torch.autograd.grad((m(X) ** 2).sum(), live, create_graph=True)
        eager = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, v)), live)
    ref = torch.func.jvp(torch.func.grad(lambda p: f(*p)), (ps,), (v,))[1]
    return eager, ref


@pytest.mark.parametrize("method", ["lora", "loha", "lokr", "lokh", "dora"])
@pytest.mark.parametrize("path", ["factored", "folded"])
@pytest.mark.parametrize("functional", [False, True])
def test_f1_f2_double_backward_equals_torch_func(method, path, functional):
    "F1/F2: a second derivative by eager autograd (create_graph) through every fast path equals torch.func's."
    if method == "lokh" and path == "factored": pytest.skip("LoKH has no factored path")
    m = adapted(method).double()
    for i in (0, 2): m[i].path = path
    X = torch.randn(7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    eager, ref = _hvp_by_autograd_and_func(m, X, functional)
    assert any(r.abs().max() > 0.1 for r in ref)
    for a, b in zip(eager, ref): torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_f1_double_backward_through_the_input_and_two_adapters():
    "F1: the second derivative with respect to the input, with two adapters folded together, equals torch.func's."
    m = adapted("lora", names=("default", "other")).double()
    lt.set_adapter(m, ["default", "other"])
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad((m(x) ** 3).sum(), x, create_graph=True)
    (hx,) = torch.autograd.grad(gx.sum(), x)
    f = lambda x: (m(x) ** 3).sum()
    ref = torch.func.jvp(torch.func.grad(f), (x.detach(),), (torch.ones_like(x),))[1]
    torch.testing.assert_close(hx, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("others", ["same", "new"])
@pytest.mark.parametrize("bad", ["nan_factor", "inf_weight_sum"])
def test_f4_a_refused_load_into_a_merged_model_leaves_it_as_it_was(bad, others):
    """F4: a state dict whose re-merge is refused (NaN factor; a merge that overflows) leaves the merged model as it was
    -- also the first merged layer and the plain modules, loaded before the refused second layer (`others="new"`)."""
    m = adapted("lora")
    lt.merge(m)
    before, X = snapshot(m), torch.randn(5, 8)
    y = m(X)
    sd = m.state_dict()
    if others == "new": sd = {k: v * 0.5 + 0.25 for k, v in sd.items()}  # every entry, layer "0"'s included, changes
    if bad == "nan_factor": sd["2.updates.default.A"] = torch.full((2, 6), float("nan"))
    else: sd["2.updates.default.B"] = torch.full((4, 2), 3e38)
    with pytest.raises(ValueError, match="NaN or infinite"): m.load_state_dict(sd)
    same(m, before)
    assert m[0].merged == m[2].merged == ["default"]
    torch.testing.assert_close(m(X), y, rtol=0, atol=0)
    lt.unmerge(m)  # and W0 comes back exactly
    torch.testing.assert_close(m[2].base.weight, tiny()[2].weight, rtol=0, atol=0)


def _refused_unchanged(m, call, exc, match):
    "`call()` raises `exc` matching `match` and leaves `m` bit-identical."
    before = snapshot(m)
    with pytest.raises(exc, match=match): call()
    same(m, before)


def test_f3_a_path_a_method_lacks_is_refused_at_assignment():
    "F3: `layer.path = 'factored'` on LoKH (and 'folded' on an embedding's LoRA) is refused when set, naming the path."
    m = adapted("lokh")
    _refused_unchanged(m, lambda: setattr(m[0], "path", "factored"), ValueError,
                       r"path must be one of \('auto', 'folded'\) for adapter 'default' \(LoKHUpdate on a Linear\), "
                       r"got 'factored'")
    m[0].path = "folded"; m(torch.randn(2, 8))
    e = lt.LoRA(nn.Embedding(10, 4), rank=2)
    with pytest.raises(ValueError, match=r"path must be one of \('auto', 'factored'\)"): e.path = "folded"
    assert e.path == "auto"


@pytest.mark.parametrize("kw, what", [(dict(rank_pattern="0"), "rank_pattern"),
                                      (dict(alpha_pattern=[1]), "alpha_pattern"),
                                      (dict(rank_pattern={1: 2}), "rank_pattern")])
def test_f5_patterns_must_be_dicts(kw, what):
    "F5: rank_pattern / alpha_pattern that are not dicts of pattern → value raise a TypeError naming them."
    m = adapted("lora")
    _refused_unchanged(m, lambda: lt.inject(m, "lora", targets=["0", "2"], rank=2, name="b", **kw), TypeError,
                       f"{what} must be a dict of module pattern")


@pytest.mark.parametrize("call", ["inject", "extract_adapters", "init_from_weight", "rank_pattern"])
def test_f6_a_bad_regex_is_a_value_error_naming_targets(call):
    "F6: an invalid regex in targets (or a pattern key) is a ValueError naming the argument, the value and why."
    m = adapted("lora")
    calls = {"inject": lambda: lt.inject(m, "lora", targets="(", rank=2, name="b"),
             "extract_adapters": lambda: lt.extract_adapters(m, tiny(3), "lora", targets="(", rank=2),
             "init_from_weight": lambda: lt.init_from_weight(m, "lora", targets="(", rank=2),
             "rank_pattern": lambda: lt.inject(m, "lora", targets=["0"], rank=2, name="b", rank_pattern={"(": 1})}
    what = "rank_pattern" if call == "rank_pattern" else "targets"
    _refused_unchanged(m, calls[call], ValueError, rf"{what} must be a valid regular expression, got '\('")


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("where", ["finetuned", "model"])
def test_f7_non_finite_weights_are_named(value, where):
    "F7: NaN/inf weights in the fine-tuned state (or the model, for init_from_weight) raise a ValueError naming them."
    m = tiny()
    if where == "finetuned":
        sd = {k: v * float(value) for k, v in tiny(3).state_dict().items()}
        _refused_unchanged(m, lambda: lt.extract_adapters(m, sd, "lora", targets=["0", "2"], rank=2), ValueError,
                           r"finetuned '0.weight' contains \d+ NaN or infinite entries")
    else:
        with torch.no_grad(): m[2].weight[0, 0] = float(value)
        before = copy.deepcopy(m)
        with pytest.raises(ValueError, match=r"the model's '2.weight' contains 1 NaN or infinite entries"):
            lt.init_from_weight(m, "lora", targets=["0", "2"], rank=2)
        assert [type(x) for x in m.modules()] == [type(x) for x in before.modules()]
        for a, b in zip(m.state_dict().values(), before.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kw", [dict(alpha="3"), dict(dropout="0.1"), dict(alpha=b"3")])
def test_f8_numbers_given_as_text_are_refused(kw):
    "F8: alpha / dropout given as strings are a TypeError naming the argument, as rank='2' and alpha=True are."
    m = adapted("lora")
    what = next(iter(kw))
    _refused_unchanged(m, lambda: lt.inject(m, "lora", targets=["0", "2"], rank=2, name="b", **kw), TypeError,
                       f"{what} must be a number")


def test_f9_set_adapter_none_is_refused():
    "F9: set_adapter(model, None) is refused with a TypeError naming the argument; [] still deactivates all."
    m = adapted("lora")
    _refused_unchanged(m, lambda: lt.set_adapter(m, None), TypeError, "name_or_names must be an adapter name")
    lt.set_adapter(m, [])
    assert lt.active_adapters(m) == []


@pytest.mark.parametrize("name", ["x" * 101, "é" * 128])
def test_f10_a_name_too_long_for_a_folder_is_refused_at_inject(name, tmp_path):
    "F10: an adapter name longer than 100 characters (or 255 bytes) is refused by inject, before any change."
    m = adapted("lora")
    _refused_unchanged(m, lambda: lt.inject(m, "lora", targets=["0", "2"], rank=2, name=name), ValueError,
                       "must be at most 100 characters")
    lt.inject(m, "lora", targets=["0", "2"], rank=2, name="y" * 100)  # the limit itself is fine, and saves
    lt.set_adapter(m, ["default", "y" * 100]); lt.save_adapter(m, tmp_path)
    assert (tmp_path / ("y" * 100) / "adapter_config.json").is_file()


def test_f13_messages_name_adapters_and_modules():
    "F13: unmerge of an unmerged model, a load into a merged one and save(name=[]) say what is wrong."
    m = adapted("lora")
    with pytest.raises(ValueError, match=r"no adapter is merged \(modules \['0', '2'\] hold none\)"): lt.unmerge(m)
    with pytest.raises(ValueError, match=r"name must name at least one adapter, got \[\]"):
        lt.save_adapter(m, "/nonexistent/x", name=[])
    with pytest.raises(ValueError, match=r"name must name at least one adapter, got \[\]"): lt.merge(m, name=[])


@pytest.mark.parametrize("edit, match", [(dict(target_modules=["zzz"]), "matches no module of the model"),
                                         (dict(target_modules="0"), r"modules \['2'\] that its target_modules"),
                                         (dict(layers_to_transform=0), "matches no module of the model")])
def test_f14_import_peft_refuses_a_config_contradicting_its_tensors(tmp_path, edit, match):
    "F14: target_modules that select none of (or not all) the tensors' modules, or layers_to_transform=0, are refused."
    lt.export_peft(adapted("lora"), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, **edit}))
    m = tiny()
    _refused_unchanged(m, lambda: lt.import_peft(m, tmp_path), ValueError, match)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["0", "2"]}))
    lt.import_peft(m, tmp_path)  # a list selecting exactly the tensors' modules loads
