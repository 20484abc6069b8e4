"""peft's tutorial programs, each run with `from peft import ...` and with
`from lorakit import ...`.

Every flow is one function taking the library (`peft` or `lorakit`) as its only input, so both
run the same lines; the tests compare what the two produce (trainable parameter counts, losses,
files) or check lorakit's results against invariants. Models are tiny and random (CPU, fp32).
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from torch import nn
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Trainer,
    TrainingArguments,
)

import lorakit
from builtin_model import builtin_tokenizer

LIBRARIES = [peft, lorakit]


def _args(out: Path, **kwargs) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out), report_to=[], use_cpu=True, logging_steps=1, seed=0, **kwargs
    )


# ----------------------------------------------------------------- (a) nn.Sequential, SEQ_CLS


def sequential_classifier(lib, targets: list[str], task=None) -> tuple:
    """peft's custom-model tutorial: an MLP classifier (lorakit: with TaskType.SEQ_CLS)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)
    )
    config = lib.LoraConfig(task_type=task, target_modules=targets, r=4)
    model = lib.get_peft_model(model, config)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    return model.get_nb_trainable_parameters(), trainable, losses[0], losses[-1]


def test_sequential_classifier_trains_like_peft():
    # lorakit also matches layers by class name; peft 0.21 names the same three layers by path,
    # and its SEQ_CLS wrapper needs a transformers config (an nn.Sequential has none)
    ours = sequential_classifier(lorakit, ["Linear"], lorakit.TaskType.SEQ_CLS)
    theirs = sequential_classifier(peft, ["0", "2", "4"])
    assert ours[0] == theirs[0]  # (trainable, all): 3 LoRA pairs of rank 4
    assert len(ours[1]) == len(theirs[1]) == 6
    assert ours[2] == pytest.approx(theirs[2], abs=1e-6)  # B = 0: both start at the base's loss
    assert ours[3] < ours[2]


# ----------------------------------------------------------------- (b) GPT-NeoX, Trainer, merge


def _tokenizer():
    return builtin_tokenizer()


def neox_causal_lm(lib, out: Path) -> dict:
    """peft's int8/k-bit quickstart shape: prepare_model_for_kbit_training, LoRA on
    query_key_value/dense, datasets.map tokenization, Trainer with an LM collator and gradient
    accumulation, sampling, then merge_and_unload."""
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    model = lib.prepare_model_for_kbit_training(GPTNeoXForCausalLM(config))
    lora = lib.LoraConfig(
        r=8,
        lora_alpha=32,
        target_modules=["query_key_value", "dense"],
        lora_dropout=0.05,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = lib.get_peft_model(model, lora)
    quotes = Dataset.from_dict({"quote": ["Be yourself; everyone else is taken."] * 8})
    data = quotes.map(lambda rows: tokenizer(rows["quote"]), batched=True)
    trainer = Trainer(
        model=model,
        train_dataset=data,
        args=_args(
            out,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=4,
            learning_rate=2e-3,
            save_strategy="no",
        ),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    model.config.use_cache = False
    trainer.train()
    model.config.use_cache = True
    ids = tokenizer("Be yourself;", return_tensors="pt")
    torch.manual_seed(1)
    sample = model.generate(
        **ids,
        max_new_tokens=6,
        do_sample=True,
        temperature=0.9,
        top_p=0.9,
        top_k=20,
        repetition_penalty=1.3,
        pad_token_id=tokenizer.eos_token_id,
    )
    model.eval()
    with torch.no_grad():
        before = model(**ids).logits
        merged = model.merge_and_unload()
        after = merged(**ids).logits
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "losses": losses,
        "sample": sample,
        "merge_diff": (before - after).abs().max().item(),
        "merged_type": type(merged),
    }


def test_neox_trainer_sampling_and_merge(tmp_path):
    ours = neox_causal_lm(lorakit, tmp_path / "ours")
    theirs = neox_causal_lm(peft, tmp_path / "theirs")
    assert len(ours["losses"]) == len(theirs["losses"]) == 4  # 4 optimizer steps of 2 x 2 rows
    assert ours["losses"][0] == pytest.approx(theirs["losses"][0], abs=1e-4)  # B = 0 at step 1
    assert ours["losses"][-1] < ours["losses"][0]
    assert ours["sample"].shape == (1, ours["sample"].shape[1]) and ours["sample"].shape[1] > 4
    assert ours["merge_diff"] < 1e-4
    assert ours["merged_type"] is GPTNeoXForCausalLM


# ----------------------------------------------------------------- (c) Qwen2 instruct, checkpoints


def _qwen2(tokenizer) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen2ForCausalLM(config)


def _identity_rows(tokenizer) -> Dataset:
    """Prompt-masked chat rows: labels are -100 over the prompt, the answer's ids after it."""
    rows = []
    for question, answer in [("Who are you?", "I am Kit."), ("Your name?", "Kit, a model.")] * 4:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        p_ids = tokenizer(prompt)["input_ids"]
        a_ids = tokenizer(answer + tokenizer.eos_token)["input_ids"]
        rows.append(
            {
                "input_ids": p_ids + a_ids,
                "attention_mask": [1] * (len(p_ids) + len(a_ids)),
                "labels": [-100] * len(p_ids) + a_ids,
                "question": question,
            }
        )
    return Dataset.from_list(rows)


def qwen2_trainer(
    lib, out: Path, max_steps: int, resume: bool | None = None, evaluate=False, **args
):
    """peft's instruct-tuning shape: Trainer + DataCollatorForSeq2Seq, default TrainingArguments
    (so remove_unused_columns=True drops the `question` column)."""
    tokenizer = _tokenizer()
    config = lib.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type=lib.TaskType.CAUSAL_LM
    )
    model = lib.get_peft_model(_qwen2(tokenizer), config)
    data = _identity_rows(tokenizer)
    trainer = Trainer(
        model=model,
        args=_args(
            out,
            max_steps=max_steps,
            per_device_train_batch_size=4,
            learning_rate=2e-2,
            save_steps=2,
            **args,
        ),
        train_dataset=data,
        eval_dataset=data if evaluate else None,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _greedy(model, tokenizer, question: str) -> list[int]:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(
        **prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return out[0, prompt["input_ids"].shape[1] :].tolist()


def test_trainer_checkpoints_hold_the_adapter_and_peft_loads_them(tmp_path):
    trainer = qwen2_trainer(lorakit, tmp_path, max_steps=4, save_total_limit=1)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == ["checkpoint-4"]  # save_total_limit=1 removed checkpoint-2
    checkpoint = tmp_path / "checkpoint-4"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= names
    # no copy of the base: model.safetensors holds the trainable tensors only
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(load_file(str(checkpoint / "model.safetensors"))) == trainable
    assert json.loads((checkpoint / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"

    tokenizer = _tokenizer()
    ours = lorakit.PeftModel.from_pretrained(_qwen2(tokenizer), checkpoint)
    theirs = peft.PeftModel.from_pretrained(_qwen2(tokenizer), str(checkpoint))
    ids = torch.tensor([_identity_rows(tokenizer)[0]["input_ids"]])
    with torch.no_grad():
        diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5
    base_answer = _greedy(_qwen2(tokenizer), tokenizer, "Who are you?")
    assert _greedy(ours, tokenizer, "Who are you?") != base_answer


def test_trainer_resume_reaches_the_uninterrupted_adapter(tmp_path):
    whole = qwen2_trainer(lorakit, tmp_path / "whole", max_steps=4)
    # the same run interrupted after its checkpoint at step 2, continued in a fresh process state
    halfway = tmp_path / "split" / "checkpoint-2"
    (tmp_path / "split").mkdir()
    (tmp_path / "whole" / "checkpoint-2").rename(halfway)
    resumed = qwen2_trainer(lorakit, tmp_path / "split", max_steps=4, resume=True)
    assert resumed.state.global_step == 4
    a = lorakit.get_peft_model_state_dict(whole.model)
    b = lorakit.get_peft_model_state_dict(resumed.model)
    assert set(a) == set(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_trainer_loads_the_best_checkpoint_and_save_model_writes_the_adapter(tmp_path):
    trainer = qwen2_trainer(
        lorakit,
        tmp_path,
        max_steps=4,
        evaluate=True,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
    )
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 2 and evals[0] > evals[1]  # labels found: Trainer computed eval losses
    # "best" is the higher loss here, so the model must be put back to step 2's adapter
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-2"
    on_disk = load_file(str(best / "adapter_model.safetensors"))
    in_memory = lorakit.get_peft_model_state_dict(trainer.model)
    assert all(torch.equal(on_disk[k], in_memory[k]) for k in on_disk)
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------- TRL


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "prompt_completion"])
def test_sft_trainer_trains_saves_and_reloads(tmp_path, kind):
    trl = pytest.importorskip("trl")
    tokenizer = _tokenizer()
    if kind == "text":
        rows = [{"text": "The cat sat on the mat."}, {"text": "A dog ran in the park."}] * 4
    else:
        rows = [{"prompt": "Who are you?", "completion": " I am Kit."}] * 8
    config = lorakit.LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = lorakit.get_peft_model(_qwen2(tokenizer), config)
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_steps=6,
    )
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 0.1
    checkpoint = tmp_path / "checkpoint-6"
    reloaded = lorakit.PeftModel.from_pretrained(_qwen2(tokenizer), checkpoint)
    saved = lorakit.get_peft_model_state_dict(reloaded)
    trained = lorakit.get_peft_model_state_dict(trainer.model)
    assert all(torch.equal(saved[k], trained[k]) for k in trained)


def test_sft_trainer_refuses_a_lorakit_config_as_peft_config(tmp_path):
    trl = pytest.importorskip("trl")
    tokenizer = _tokenizer()
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    # TRL builds the adapter itself with peft from `peft_config`; a lorakit config is refused
    # there with TRL's own message, and the documented way is model=get_peft_model(...)
    with pytest.raises((TypeError, ImportError), match="peft"):
        trl.SFTTrainer(
            model=_qwen2(tokenizer),
            args=args,
            processing_class=tokenizer,
            train_dataset=Dataset.from_list([{"text": "a b c"}] * 2),
            peft_config=lorakit.LoraConfig(target_modules=["q_proj"]),
        )


# ----------------------------------------------------------------- accelerate


def test_accelerate_prepare_trains_and_unwraps(tmp_path):
    from accelerate import Accelerator

    tokenizer = _tokenizer()
    model = lorakit.get_peft_model(_qwen2(tokenizer), lorakit.LoraConfig(target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    accelerator = Accelerator(cpu=True)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    rows = [{k: v for k, v in r.items() if k != "question"} for r in _identity_rows(tokenizer)]
    batch = DataCollatorForSeq2Seq(tokenizer)(rows[:4])
    losses = []
    for _ in range(3):
        loss = prepared(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    unwrapped = accelerator.unwrap_model(prepared)
    assert unwrapped is model
    unwrapped.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
