"""The bad-input catalogue of `reliability_catalogue.py` (beside this file; nbs/13_reliability.ipynb runs and shows it)
as tests: every misuse raises the documented exception and message (or, for legal but unusual inputs, returns a finite
result), and failed loads leave the model unchanged."""
import warnings

import pytest

from reliability_catalogue import catalogue, check_misuse

ENTRIES = catalogue()


@pytest.mark.parametrize("entry", ENTRIES, ids=[f"{m.function}: {m.misuse}" for m in ENTRIES])
def test_misuse(entry):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # overflow/invalid in numpy is a bug, not noise
        record = check_misuse(entry)
    assert record["ok"], f"expected {record['expected']}, got {record['received']}"


def test_catalogue_covers_every_public_function():
    import lowrank_tales as lt
    covered = {m.function for m in ENTRIES}
    public = {"lt.kron", "lt.khatri_rao", "lt.face_split", "lt.partition_khatri_rao", "lt.als", "lt.hadamard_als",
              "lt.kronecker_als", "lt.khatri_rao_als", "lt.inject", "lt.merge", "lt.unmerge", "lt.save_adapter",
              "lt.load_adapter", "lt.export_peft", "lt.import_peft", "lt.trainable_parameters"}
    assert public <= covered, public - covered
    assert all(hasattr(lt, f[3:]) for f in covered)
