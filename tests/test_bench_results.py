"""The saved benchmark results are readable by the performance chapter: every file parses, records its machine, and
every target row gets a verdict. (Benchmarks are not run here: `make bench` does that.)"""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the results reader lives beside the benchmarks, not in the package
from report import adapter_targets, als_targets, load_results, results_dir, structured_targets  # noqa: E402

NAMES = ("adapters", "als", "structured")


@pytest.mark.parametrize("name", NAMES)
def test_results_load_and_record_their_machine(name):
    res = load_results(name, results_dir())
    machine = res.get("machine") or res.get("info")
    assert machine and machine.get("torch"), f"{name}.json records no machine"


def test_every_target_has_a_verdict():
    res = {n: load_results(n, results_dir()) for n in NAMES}
    rows = adapter_targets(res["adapters"]) + als_targets(res["als"]) + structured_targets(res["structured"])
    assert rows and all(r["verdict"] in ("MET", "NOT MET", "not measured") for r in rows)
    if "gpu" not in res["adapters"]:
        assert all(r["verdict"] == "not measured" for r in rows if r["area"] == "adapters gpu")
