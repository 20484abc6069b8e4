"""Evaluation: token-weighted loss and perplexity, greedy samples (the figures: test_plots.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lorakit.train.evaluate import eval_loss, generate_samples, greedy_answers


def tiny_tokenizer():
    """A word-level tokenizer of 128 ids (w0..w124 plus specials) with a ChatML-like template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(125)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tok.chat_template = "{% for m in messages %}w1 {{ m['content'] }} {% endfor %}w2"
    return tok


def test_eval_loss_is_token_weighted_mean(tiny_llama):
    ids = torch.randint(0, 128, (4, 10))
    labels = ids.clone()
    labels[:2, :7] = -100  # batch 1 has far fewer supervised tokens than batch 2
    batches = [
        {"input_ids": ids[:2], "labels": labels[:2]},
        {"input_ids": ids[2:], "labels": labels[2:]},
    ]
    got = eval_loss(tiny_llama, batches)
    want = tiny_llama(input_ids=ids, labels=labels).loss.item()  # HF: mean over all tokens
    assert got["eval_loss"] == pytest.approx(want, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    assert got["eval_tokens"] == 2 * 3 + 2 * 9  # labels 7..9, and 1..9, after the shift


def test_eval_loss_refuses_fully_masked_data(tiny_llama):
    ids = torch.randint(0, 128, (1, 6))
    with pytest.raises(ValueError, match="no supervised tokens"):
        eval_loss(tiny_llama, [{"input_ids": ids, "labels": torch.full_like(ids, -100)}])


def test_generate_samples_greedy_and_deterministic(tiny_llama):
    tok = tiny_tokenizer()
    first = generate_samples(tiny_llama, tok, ["w5 w6", "w7"], max_new_tokens=5)
    again = generate_samples(tiny_llama, tok, ["w5 w6", "w7"], max_new_tokens=5)
    assert first == again and [s["prompt"] for s in first] == ["w5 w6", "w7"]
    assert all(isinstance(s["completion"], str) for s in first)


def test_training_writes_samples_and_eval_rows(tmp_path):
    from test_loop import lora_model, make_batches, quick

    from lorakit.train import train

    batches = make_batches(2)
    config = quick(
        max_steps=2, grad_accum_steps=1, eval_every=1, eval_prompts=["w3 w4"], eval_max_new_tokens=3
    )
    result = train(lora_model(0.0), tiny_tokenizer(), batches, batches, config, tmp_path)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    # step 0: the eval before training (the "before" of before -> after); never the best
    assert [s["step"] for s in samples] == [0, 1, 2] and samples[0]["prompt"] == "w3 w4"
    evals = [r for r in result.history if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert result.best_eval_loss == min(r["eval_loss"] for r in evals[1:])


def test_greedy_answers_batched_equal_one_at_a_time(tiny_llama):
    # prompts of 1..4 words: left padding and the attention mask must not change an answer
    tok = tiny_tokenizer()
    conversations = [
        [{"role": "user", "content": " ".join(f"w{5 + j}" for j in range(n))}]
        for n in (3, 1, 4, 2, 1)
    ]
    alone = [greedy_answers(tiny_llama, tok, [c], tok.chat_template, 6)[0] for c in conversations]
    together = greedy_answers(tiny_llama, tok, conversations, tok.chat_template, 6, batch_size=3)
    assert together == alone and all(a.strip() for a in alone)


def test_eval_prompts_sample_without_eval_data(tmp_path, capsys):
    from test_loop import lora_model, make_batches, quick

    from lorakit.train import train

    batches = make_batches(2)
    config = quick(max_steps=2, grad_accum_steps=1, eval_prompts=["w3 w4"], eval_max_new_tokens=3)
    config = config.model_copy(update={"progress": "plain"})
    result = train(lora_model(0.0), tiny_tokenizer(), batches, None, config, tmp_path)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 2]  # before training, and at the end
    assert not [r for r in result.history if r["kind"] == "eval"]  # no eval loss without data
    shown = capsys.readouterr().err
    assert f"step 2 sample: 'w3 w4' -> {samples[1]['completion']!r}" in shown
