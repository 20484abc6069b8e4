"""The training loop on tiny models: learning, exact resume, crash safety, NaN, full fine-tuning."""

from __future__ import annotations

import contextlib
import json
import re
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.errors import ConfigError, StorageError
from lorakit.train import NonFiniteError, TrainConfig, train
from lorakit.train.checkpoint import MARKER, DamagedCheckpoint, find_resume, latest_checkpoint
from lorakit.train.runtime import Interrupted


def make_batches(n: int = 6, rows: int = 2, length: int = 12, seed: int = 0) -> list[dict]:
    """Learnable batches: each row counts up from a random start; the first 3 labels masked."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n):
        start = torch.randint(0, 100, (rows, 1), generator=g)
        ids = (start + torch.arange(length)) % 128  # (rows, length)
        labels = ids.clone()
        labels[:, :3] = -100
        batches.append(
            {
                "input_ids": ids,
                "labels": labels,
                "sample_ids": list(range(i * rows, i * rows + rows)),
            }
        )
    return batches


def lora_model(dropout: float = 0.1):
    """A tiny Llama with LoRA on q/v (and attention dropout, so RNG matters for resume)."""
    base = make_tiny_llama()
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"]
    )
    return get_peft_model(base, config)


def quick(**overrides) -> TrainConfig:
    """A fast fp32 config for unit tests."""
    base = dict(
        precision="fp32",
        lr=1e-2,
        max_steps=8,
        grad_accum_steps=2,
        warmup_steps=2,
        progress="none",
        tensorboard=False,
        plots=False,
    )
    return TrainConfig(**{**base, **overrides})


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loss_goes_down_and_only_adapter_changes(tmp_path):
    model = lora_model(dropout=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = make_batches(2)
    config = quick(max_steps=20, grad_accum_steps=1, lr=3e-2, plots=True, tensorboard=True)
    result = train(model, None, batches, batches, config, tmp_path)
    # two fixed batches, 20 steps: a tiny random model memorises a little (4.88 -> ~4.75)
    assert result.losses[-1] < result.losses[0] - 0.05
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed)
    # outputs a person and the CLI rely on
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 21))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "memory_mb"} <= set(train_rows[0])
    assert any(r["kind"] == "eval" for r in rows)
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 0
    assert (tmp_path / "plots" / "lr.png").stat().st_size > 0
    assert json.loads((tmp_path / "config.json").read_text())["train"]["lr"] == 3e-2
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "best" / "adapter_config.json").is_file()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def _crash_at_forward(model, calls: int):
    """Raise (a simulated kill) at the `calls`-th forward of the decoder."""
    count = {"n": 0}

    def hook(module, args, kwargs):
        count["n"] += 1
        if count["n"] == calls:
            raise RuntimeError("simulated crash")

    return model.base_model.model.model.register_forward_pre_hook(hook, with_kwargs=True)


def test_resume_after_crash_is_bitwise_identical(tmp_path):
    batches = make_batches(6)
    straight = lora_model()
    expected = train(straight, None, batches, None, quick(save_every=4), tmp_path / "a")

    crashed = lora_model()
    handle = _crash_at_forward(crashed, 9)  # 2 micro-batches per step: step 5, first forward
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashed, None, batches, None, quick(save_every=4), tmp_path / "b")
    handle.remove()
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-00000004"

    resumed = lora_model()
    got = train(resumed, None, batches, None, quick(save_every=4), tmp_path / "b", resume="auto")
    assert got.losses == expected.losses  # exact, not approximate
    for name, value in trainable(straight).items():
        assert torch.equal(value, trainable(resumed)[name]), name


def test_final_and_best_hold_only_the_adapter_files(tmp_path):
    model = lora_model(dropout=0.0)
    model.chat_template = "{{ messages[0]['content'] }}"
    batches = make_batches(2)
    config = quick(max_steps=2, grad_accum_steps=1)
    result = train(model, None, batches, batches, config, tmp_path)
    adapter = [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "chat_template.jinja",
    ]
    assert sorted(p.name for p in result.final_dir.iterdir()) == adapter  # no COMPLETE marker
    assert sorted(p.name for p in result.best_dir.iterdir()) == [*adapter, "eval.json"]
    # Checkpoints keep their marker; resume finds them and never takes final/ for one.
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    assert checkpoint.name == "step-00000002" and (checkpoint / MARKER).is_file()
    assert find_resume(tmp_path, "auto") == checkpoint
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        find_resume(tmp_path, tmp_path / "final")
    # Continuing the finished run replaces final/, still without the marker.
    more = quick(max_steps=3, grad_accum_steps=1)
    model = lora_model(dropout=0.0)
    model.chat_template = "{{ messages[0]['content'] }}"
    again = train(model, None, batches, None, more, tmp_path, resume="auto", force=True)
    assert again.steps == 3 and again.losses[:2] == result.losses
    assert sorted(p.name for p in again.final_dir.iterdir()) == adapter


def test_half_written_checkpoint_is_ignored(tmp_path):
    batches = make_batches(6)
    expected = train(lora_model(), None, batches, None, quick(save_every=4), tmp_path / "a")

    crashed = lora_model()
    handle = _crash_at_forward(crashed, 13)  # step 7
    with pytest.raises(RuntimeError):
        train(crashed, None, batches, None, quick(save_every=4), tmp_path / "b")
    handle.remove()
    root = tmp_path / "b" / "checkpoints"
    # A newer checkpoint cut off mid-write: files present, no completion marker ...
    cut = root / "step-00000006"
    cut.mkdir()
    (cut / "state.json").write_text('{"step": 6, "settin')
    (cut / "trainable.safetensors").write_bytes(b"\x00" * 10)
    # ... and a staging directory left by a killed writer.
    (root / ".tmp-step-00000007-99999").mkdir()
    assert latest_checkpoint(root).name == "step-00000004"

    resumed = lora_model()
    got = train(resumed, None, batches, None, quick(save_every=4), tmp_path / "b", resume="auto")
    assert got.losses == expected.losses


def _signal_at_forward(model, calls: dict[int, signal.Signals]):
    """Send the process a signal at given forwards of the decoder ({forward number: signal})."""
    count = {"n": 0}

    def hook(module, args, kwargs):
        count["n"] += 1
        if count["n"] in calls:
            signal.raise_signal(calls[count["n"]])

    return model.base_model.model.model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_checkpoints_the_current_step_and_resume_continues(tmp_path, signum):
    batches = make_batches(6)
    straight = lora_model()
    expected = train(straight, None, batches, None, quick(), tmp_path / "a")

    interrupted = lora_model()
    handle = _signal_at_forward(interrupted, {5: signum})  # during step 3
    first = train(interrupted, None, batches, None, quick(), tmp_path / "b")
    handle.remove()
    assert first.interrupted and first.steps == 3 and first.final_dir is None
    assert first.stop_signal == signum
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-00000003"
    assert signal.getsignal(signum) is signal.default_int_handler or signum == signal.SIGTERM

    resumed = lora_model()
    got = train(resumed, None, batches, None, quick(), tmp_path / "b", resume="auto")
    assert got.losses == expected.losses
    for name, value in trainable(straight).items():
        assert torch.equal(value, trainable(resumed)[name]), name


def test_a_second_signal_stops_at_once(tmp_path):
    model = lora_model()
    handle = _signal_at_forward(model, {5: signal.SIGTERM, 6: signal.SIGINT})  # both in step 3
    with pytest.raises(Interrupted, match="second SIGINT") as stopped:
        train(model, None, make_batches(6), None, quick(save_every=2), tmp_path)
    handle.remove()
    assert stopped.value.signum == signal.SIGINT
    root = tmp_path / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-00000002"]  # step 3 never finished


def test_resume_auto_skips_a_damaged_newest_checkpoint(tmp_path):
    batches = make_batches(6)
    expected = train(lora_model(), None, batches, None, quick(), tmp_path / "a")
    crashed = lora_model()
    handle = _crash_at_forward(crashed, 13)  # step 7
    with pytest.raises(RuntimeError):
        train(crashed, None, batches, None, quick(save_every=2, keep_checkpoints=3), tmp_path / "b")
    handle.remove()
    root = tmp_path / "b" / "checkpoints"
    newest = root / "step-00000006" / "optimizer.safetensors"
    data = bytearray(newest.read_bytes())
    data[-4:] = b"\xff\xff\xff\x7f"  # one value changed: the file still parses
    newest.write_bytes(bytes(data))
    (root / "step-00000004" / "state.json").write_text('{"step": 4, "sett')  # cut off

    with pytest.raises(DamagedCheckpoint, match="optimizer.safetensors has changed"):
        train(
            lora_model(),
            None,
            batches,
            None,
            quick(),
            tmp_path / "b",
            resume=root / "step-00000006",
        )
    resumed = lora_model()
    got = train(resumed, None, batches, None, quick(save_every=2), tmp_path / "b", resume="auto")
    assert got.losses == expected.losses  # continued from step 2, exactly
    log = (tmp_path / "b" / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in log.splitlines()] == list(range(1, 9))


def test_nonfinite_loss_stops_with_step_and_samples(tmp_path):
    model = lora_model()
    count = {"n": 0}

    def poison(module, args, output):
        count["n"] += 1
        # step 3, first micro-batch: 1 eval forward before training, then 2 train + 1 eval a step
        if count["n"] == 8:
            output[0].fill_(float("nan")) if isinstance(output, tuple) else output.fill_(
                float("nan")
            )
        return output

    model.base_model.model.model.layers[0].register_forward_hook(poison)
    batches = make_batches(6)
    with pytest.raises(NonFiniteError, match=r"step 3.*samples") as err:
        train(model, None, batches, batches[:1], quick(save_every=1, eval_every=1), tmp_path)
    assert re.search(r"samples on rank 0: \[\d+, \d+, \d+, \d+\]", str(err.value))
    assert not (tmp_path / "final").exists()
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000002"
    for path in tmp_path.rglob("*.safetensors"):
        for name, tensor in load_file(str(path)).items():
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f"{path}: {name}"


def test_full_finetuning_through_the_same_loop(tmp_path):
    from transformers import LlamaForCausalLM

    model = make_tiny_llama()
    batches = make_batches(2)
    result = train(
        model, None, batches, None, quick(max_steps=10, lr=3e-3, grad_accum_steps=1), tmp_path
    )
    assert result.losses[-1] < result.losses[0]
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "final")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value, rtol=0, atol=0)


def test_resume_with_other_settings_lists_them_and_needs_force(tmp_path):
    batches = make_batches(4)
    train(lora_model(), None, batches, None, quick(max_steps=2), tmp_path)
    with pytest.raises(ConfigError, match=r"lr: 0.01 -> 0.02.*seed: 0 -> 1"):
        train(
            lora_model(),
            None,
            batches,
            None,
            quick(max_steps=4, seed=1, lr=2e-2),
            tmp_path,
            resume="auto",
        )
    with pytest.raises(ConfigError, match="data"):
        train(
            lora_model(),
            None,
            make_batches(4, seed=1),
            None,
            quick(max_steps=2),
            tmp_path,
            resume="auto",
        )
    result = train(
        lora_model(),
        None,
        batches,
        None,
        quick(max_steps=4, seed=1),
        tmp_path,
        resume="auto",
        force=True,
    )
    assert result.steps == 4
    with pytest.raises(ConfigError, match="resume"):  # a fresh run never overwrites a run
        train(lora_model(), None, batches, None, quick(max_steps=2), tmp_path)


def test_unwritable_output_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model = lora_model()
    before = trainable(model)
    with pytest.raises(ConfigError, match="not writable"):
        train(model, None, make_batches(2), None, quick(), blocker / "run")
    for name, value in trainable(model).items():
        assert torch.equal(value, before[name])


def test_bf16_base_dtype_keeps_adapter_fp32(tmp_path):
    model = lora_model(dropout=0.0)
    batches = make_batches(2)
    result = train(
        model,
        None,
        batches,
        None,
        quick(precision="bf16", max_steps=6, grad_accum_steps=1),
        tmp_path,
    )
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert model.base_model.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert result.losses[-1] < result.losses[0]


def test_gradient_checkpointing_with_frozen_base_gives_the_same_training(tmp_path):
    batches = make_batches(2)
    config = quick(max_steps=3, grad_accum_steps=1)
    plain = train(lora_model(0.0), None, batches, None, config, tmp_path / "a")
    checkpointed_model = lora_model(0.0)
    config = quick(max_steps=3, grad_accum_steps=1, gradient_checkpointing=True)
    checkpointed = train(checkpointed_model, None, batches, None, config, tmp_path / "b")
    assert checkpointed_model.base_model.is_gradient_checkpointing
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-6)


@pytest.mark.parametrize("progress", ["rich", "plain"])
def test_progress_shows_loss_and_speed(tmp_path, capsys, progress):
    config = quick(max_steps=2, grad_accum_steps=1, progress=progress)
    train(lora_model(0.0), None, make_batches(2), None, config, tmp_path)
    err = capsys.readouterr().err
    assert "loss" in err and "tok/s" in err


def test_a_fresh_run_leaves_the_users_files_byte_identical(tmp_path):
    mine = {
        "config.yaml": b"output_dir: .\n",
        "metrics.jsonl": b'{"mine": 1}\n',
        "final/adapter_model.safetensors": b"another run's",
    }
    for name, data in mine.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    for resume in (None, "auto"):  # no checkpoint to resume: a fresh run either way
        with pytest.raises(ConfigError, match="already holds config.yaml, metrics.jsonl, final/"):
            train(lora_model(), None, make_batches(2), None, quick(), tmp_path, resume=resume)
    assert {n: (tmp_path / n).read_bytes() for n in mine} == mine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "final", "metrics.jsonl"]


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only), unmounted afterwards."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_a_clear_error_and_nothing_half_written_is_left(small_disk):
    batches = make_batches(6)
    expected = train(lora_model(), None, batches, None, quick(), small_disk / "a")
    filler = small_disk / "filler"

    def fill_the_disk(module, args, kwargs):  # from step 5 on, another program fills the disk
        if count["n"] == 8 and not filler.exists():
            with open(filler, "wb") as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        count["n"] += 1

    count = {"n": 0}
    model = lora_model()
    model.base_model.model.model.register_forward_pre_hook(fill_the_disk, with_kwargs=True)
    with pytest.raises(StorageError, match="No space left on device. The files being written"):
        train(model, None, batches, None, quick(save_every=4), small_disk / "b")
    root = small_disk / "b" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]  # no staging left
    filler.unlink()
    resumed = lora_model()
    got = train(resumed, None, batches, None, quick(save_every=4), small_disk / "b", resume="auto")
    assert got.losses == expected.losses


def _tied_llama():
    """A tiny Llama whose lm_head shares the embedding (as the built-in model's does)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _samples_of_mixed_length(n: int = 24):
    """A tokenized dataset of counting rows, 6..30 tokens, the first 3 labels masked."""
    from lorakit.data.pipeline import DataConfig, Sample, TokenizedDataset

    g = torch.Generator().manual_seed(3)
    samples = []
    for i in range(n):
        length = int(torch.randint(6, 31, (1,), generator=g))
        ids = (
            (int(torch.randint(0, 100, (1,), generator=g)) + torch.arange(length)) % 128
        ).tolist()
        samples.append(Sample(ids, [-100] * 3 + ids[3:], f"row {i}"))
    return TokenizedDataset(samples, DataConfig(max_length=64), "counting", 0, n)


def test_full_finetuning_equals_transformers_trainer_step_for_step(tmp_path):
    # The reference: transformers.Trainer with its defaults (AdamW, cosine, clip 1.0), fed the
    # samples in lorakit's default batch order; lorakit's full fine-tune must make the same
    # updates (every parameter, the tied embedding / lm_head included).
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    from lorakit.data.pipeline import plan_epoch

    data = _samples_of_mixed_length()
    steps, batch, lr = 4, 4, 3e-3
    ours, theirs = _tied_llama(), _tied_llama()
    start = trainable(ours)
    config = quick(max_steps=steps, batch_size=batch, lr=lr, grad_accum_steps=1, warmup_steps=0)
    result = train(ours.requires_grad_(True), None, data, None, config, tmp_path / "lorakit")

    order = [i for rows in plan_epoch(data, batch, seed=0) for row in rows for i in row]
    rows = [
        {"input_ids": data.samples[i].input_ids, "labels": data.samples[i].labels} for i in order
    ]

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        remove_unused_columns=False,
    )
    trainer = InOrder(model=theirs, args=args, train_dataset=rows, data_collator=_pad_rows)
    trainer.train()
    logged = [r for r in trainer.state.log_history if "loss" in r]
    torch.testing.assert_close(result.losses, [r["loss"] for r in logged], rtol=1e-4, atol=1e-5)
    assert all(r["grad_norm"] > 1.0 for r in logged)  # the clipping is exercised
    ours_now, theirs_now = trainable(ours), trainable(theirs)
    assert ours_now.keys() == theirs_now.keys() and "model.embed_tokens.weight" in ours_now
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    for name, before in start.items():
        update, reference = ours_now[name] - before, theirs_now[name] - before
        assert reference.abs().max() > lr / 2, name  # every parameter moved
        torch.testing.assert_close(update, reference, rtol=0, atol=lr * 1e-3, msg=name)


def _pad_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Trainer's batches: right padding with token 0, labels -100, an attention mask."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = (
            torch.tensor(r["input_ids"]),
            torch.tensor(r["labels"]),
            1,
        )
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
