"""The file layer touches only what it wrote, and every save is one commit: saves into ".", "", a git working tree or
a folder of other things leave every foreign entry byte-identical; a failure at any OS call (raised in-process, or a
hard kill of a forked saver before or after that call), or a real SIGKILL of a saver racing a loader, leaves a folder
that loads as exactly the old save or the new one, several adapters together."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from safetensors.torch import save as to_bytes

import lowrank_tales as lt
from lowrank_tales import adapter_files
from lowrank_tales.adapter_files import factor_tensors
from lowrank_tales.injection import adapter_layers
from reliability_catalogue import same_state, small_model, state, trained

HOOKED = ["open", "write", "fsync", "close", "replace", "mkdir", "rmdir", "unlink"]


def listing(d):
    "Every entry below `d` with its bytes (or kind), following no links."
    return {str(p.relative_to(d)): ("link", os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file()
            else "dir" for p in sorted(d.rglob("*"))}


def two_adapters(seed):
    "A model with adapter 'default' on both layers and adapter 'other' on the first, random factors from `seed`."
    model = trained("lora", seed=seed)
    lt.inject(model, "lora", targets=["0"], rank=2, name="other")
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for f in adapter_layers(model)["0"].updates["other"].parameters(): f.copy_(torch.randn(f.shape, generator=gen))
    return model


def signature(model, name):
    return {k: v.detach().clone() for k, v in factor_tensors(model, name).items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def which(root, saves, names):
    "Which of `saves` (label → model) the folder `root` loads as, for every adapter in `names` together."
    got = {n: signature(lt.load_adapter(small_model(), root if n == "default" else root / n, name=n), n)
           for n in names}
    found = [k for k, m in saves.items() if all(same(got[n], signature(m, n)) for n in names)]
    assert len(found) == 1, f"the folder loads as none of the saves (adapters {names})"
    return found[0]


class Fault:
    "Counts calls of the hooked `os` functions; at call `at` raises OSError, or (kill=) ends the process there."
    def __init__(self, monkeypatch, at=None, kill=None):
        self.n, self.at, self.kill = 0, at, kill
        for f in HOOKED: monkeypatch.setattr(os, f, self.wrap(getattr(os, f)))

    def wrap(self, real):
        def call(*a, **kw):
            self.n += 1
            if self.n == self.at and self.kill == "before": os._exit(0)
            if self.n == self.at and self.kill is None: raise OSError(f"injected fault at call {self.n}")
            out = real(*a, **kw)
            if self.n == self.at and self.kill == "after": os._exit(0)
            return out
        return call


def test_saves_into_cwd_keep_every_foreign_entry(tmp_path, monkeypatch):
    for k, (save, arg) in enumerate([(lt.save_adapter, "."), (lt.save_adapter, ""), (lt.export_peft, ".")]):
        d = tmp_path / str(k)
        for f, data in [(".git/HEAD", b"ref"), (".gitattributes", b"*"), (".cache/c", b"1"), ("keep.txt", b"mine")]:
            (d / f).parent.mkdir(parents=True, exist_ok=True); (d / f).write_bytes(data)
        before = listing(d)
        monkeypatch.chdir(d)
        save(trained("lora"), arg)
        after = listing(d)
        assert {k: v for k, v in after.items() if k in before} == before
        assert sorted(set(after) - set(before)) == sorted(["adapter_config.json", "adapter.safetensors" if
                                                           save is lt.save_adapter else "adapter_model.safetensors"])
        load = lt.load_adapter if save is lt.save_adapter else lt.import_peft
        assert same_state(state(load(small_model(), ".")), state(trained("lora")))


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_save_into_a_git_working_tree(tmp_path, monkeypatch):
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=tmp_path,
                                    check=True, capture_output=True, text=True).stdout
    git("init", "-q")
    (tmp_path / "README").write_text("hello\n"); (tmp_path / ".gitattributes").write_text("* text\n")
    git("add", "-A"); git("commit", "-qm", "first")
    (tmp_path / "untracked.txt").write_text("u")
    before = listing(tmp_path)
    monkeypatch.chdir(tmp_path)
    lt.save_adapter(two_adapters(1), ".", name=["default", "other"])
    lt.save_adapter(two_adapters(2), ".", name=["default", "other"])  # a second save over the first
    assert sorted(git("status", "--porcelain", "--untracked-files=all").splitlines()) == [
        "?? adapter.safetensors", "?? adapter_config.json", "?? other/adapter.safetensors",
        "?? other/adapter_config.json", "?? untracked.txt"]
    after = listing(tmp_path)
    assert {k: after.get(k) for k in before} == before  # .git included, byte for byte
    assert which(tmp_path, {"2": two_adapters(2)}, ["default", "other"]) == "2"


@pytest.mark.parametrize("save", [lt.save_adapter, lt.export_peft])
def test_files_and_links_in_the_way_are_refused_before_anything_changes(tmp_path, save):
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "d").mkdir(); (tmp_path / "d" / "other").write_bytes(b"a file where the subfolder goes")
    (tmp_path / "e").mkdir(); (tmp_path / "e" / "other").symlink_to(tmp_path / "real")
    (tmp_path / "g" / "adapter_config.json").mkdir(parents=True)
    before = listing(tmp_path)
    model = two_adapters(1)
    for path, msg in [("f", "exists and is not a folder"), ("f/sub", "exists and is not a folder"),
                      ("link", "is a symbolic link"), ("d", "exists and is not a folder"), ("e", "is a symbolic link"),
                      ("g", "is a folder or a symbolic link, not a file")]:
        with pytest.raises(ValueError, match=msg) as e:
            save(model, tmp_path / path, name=["default", "other"])
        assert str(tmp_path / path.split("/")[0]) in str(e.value)
        assert listing(tmp_path) == before


def test_names_that_are_paths_are_refused(tmp_path):
    for bad in ["a/b", "../up", ".hidden", "a\\b", "x\0y", ""]:  # one rule: inject refuses what a save would refuse
        model = small_model(); before = state(model)
        with pytest.raises(ValueError, match="name must be an adapter name"):
            lt.inject(model, "lora", targets=["0"], rank=2, name=bad)
        assert same_state(before, state(model)) and lt.adapter_names(model) == []
    assert list(tmp_path.iterdir()) == []
    lt.save_adapter(trained("lora"), tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    for bad in ["../evil", "/tmp/evil", ".git", "x\0y"]:  # a file whose (sealed) name is a path: resealed by hand
        tensors, meta = adapter_files.parse_safetensors((tmp_path / "ok" / "adapter.safetensors").read_bytes(),
                                                        "f", "t")[:2]
        conf = dict({k: v for k, v in cfg.items() if k != "sha256"}, name=bad)
        data = to_bytes(tensors, metadata=dict(meta, lowrank_config=json.dumps(conf, sort_keys=True)))
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "adapter.safetensors").write_bytes(data)
        (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(dict(conf, sha256=adapter_files.file_digest(data))))
        m = small_model(); before = state(m)
        with pytest.raises(ValueError, match="the name in adapter .* must be an adapter name"):
            lt.load_adapter(m, tmp_path / "bad")
        assert same_state(before, state(m))
        lt.load_adapter(m, tmp_path / "bad", name="fine")  # the caller may rename it
    for load in (lt.load_adapter, lt.import_peft):
        with pytest.raises(ValueError, match="name must be an adapter name"): load(small_model(), tmp_path / "ok", name="../x")


@pytest.mark.parametrize("several", [False, True])
def test_a_fault_at_any_os_call_leaves_old_or_new(tmp_path, monkeypatch, several):
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # counted, not done: it matters for power loss, not for this
    names = ["default", "other"] if several else ["default"]
    old, new = two_adapters(1), two_adapters(2)
    root = tmp_path / "a"
    lt.save_adapter(old, root, name=names)
    (root / ".git").mkdir(); (root / ".git" / "x").write_bytes(b"foreign")
    clean = tmp_path / "clean"
    shutil.copytree(root, clean)
    with monkeypatch.context() as mp:
        count = Fault(mp)
        lt.save_adapter(new, clean, name=names)
    new_listing = listing(clean)
    assert count.n > 20
    for k in range(1, count.n + 1):
        shutil.rmtree(root)
        lt.save_adapter(old, root, name=names); (root / ".git").mkdir(); (root / ".git" / "x").write_bytes(b"foreign")
        old_listing = listing(root)  # (safetensors may order its metadata differently from one save to the next)
        with monkeypatch.context() as mp:
            Fault(mp, at=k)
            try: lt.save_adapter(new, root, name=names); raised = False
            except OSError: raised = True
        now = listing(root)  # no journal left either way; a failed save changed nothing at all
        assert now == old_listing if raised else (set(now) == set(new_listing) and now[".git/x"] == b"foreign"), k
        assert which(root, {"old": old, "new": new}, names) == ("old" if raised else "new")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("several", [True])  # (one adapter's calls are a subset of these; the fault test runs both)
def test_a_kill_before_or_after_any_os_call_leaves_old_or_new(tmp_path, monkeypatch, several):
    torch.set_num_threads(1)
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # counted, not done: it matters for power loss, not for a kill
    names = ["default", "other"] if several else ["default"]
    old, new, newer = two_adapters(1), two_adapters(2), two_adapters(3)
    with monkeypatch.context() as mp:
        count = Fault(mp)
        lt.save_adapter(new, tmp_path / "count", name=names)
    seen = set()
    for k in range(1, count.n + 1):
        for kill in ("before", "after"):
            root = tmp_path / f"{k}{kill}"
            lt.save_adapter(old, root, name=names)
            pid = os.fork()
            if pid == 0:  # the child saves and dies at call k, as a crash or a SIGKILL would leave it
                Fault(monkeypatch, at=k, kill=kill)
                try: lt.save_adapter(new, root, name=names)
                finally: os._exit(0)
            os.waitpid(pid, 0)
            seen.add(got := which(root, {"old": old, "new": new}, names))
            lt.save_adapter(newer, root, name=names)  # a later save finishes or drops what the crash left
            assert which(root, {"newer": newer}, names) == "newer", (k, kill, got)
            assert not [p for p in root.iterdir() if p.name.startswith(".")]
            shutil.rmtree(root)
    assert seen == {"old", "new"}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("peft", [False, True])
def test_sigkill_of_a_saver_racing_a_loader(tmp_path, peft):
    "A child saves A and B in turn, forever; the parent loads meanwhile, then SIGKILLs it at a random moment."
    torch.set_num_threads(1)
    names = ["default"] if peft else ["default", "other"]
    saves = {"A": two_adapters(1), "B": two_adapters(2)}
    save = (lambda m: lt.export_peft(m, tmp_path, name="default")) if peft else \
        (lambda m: lt.save_adapter(m, tmp_path, name=names))
    def loads_as(together=True):
        "The save the folder loads as; while a save runs, each adapter on its own (two loads are not one)."
        if peft:
            got = signature(lt.import_peft(small_model(), tmp_path), "default")
            return [k for k, m in saves.items() if same(got, signature(m, "default"))][0]
        return which(tmp_path, saves, names) if together else "".join(which(tmp_path, saves, [n]) for n in names)[0]
    save(saves["A"])
    rng, seen = torch.Generator().manual_seed(0), []
    for _ in range(6):
        pid = os.fork()
        if pid == 0:
            try:
                while True: save(saves["A"]); save(saves["B"])
            finally: os._exit(0)
        deadline = time.monotonic() + 0.05 + 0.3 * torch.rand(1, generator=rng).item()
        while time.monotonic() < deadline: seen.append(loads_as(together=False))  # racing the saver
        os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)
        seen.append(loads_as())  # after the kill
    assert set(seen) == {"A", "B"}
    save(saves["B"])
    assert loads_as() == "B" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.skipif(adapter_files.fcntl is None, reason="needs advisory locks")
def test_a_live_journal_is_left_alone_and_a_dead_one_is_cleared(tmp_path):
    "A journal another save holds locked stays; once released (its process died) the next save clears it."
    lt.save_adapter(trained("lora"), tmp_path)
    live = tmp_path / f"{adapter_files._JOURNAL}1-live"
    (live / "x").mkdir(parents=True); (live / "x" / "adapter_config.json").write_bytes(b"half written")
    (live / adapter_files._MARK).write_bytes(adapter_files._magic(live.name))  # what every save writes first
    fd = os.open(live, os.O_RDONLY)
    adapter_files.fcntl.flock(fd, adapter_files.fcntl.LOCK_EX)
    lt.save_adapter(trained("lora", seed=2), tmp_path)
    assert (live / "x" / "adapter_config.json").read_bytes() == b"half written"  # another save's, still writing
    assert same_state(state(lt.load_adapter(small_model(), tmp_path)), state(trained("lora", seed=2)))
    os.close(fd)  # as when that process dies: its lock goes with it
    lt.save_adapter(trained("lora", seed=3), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
