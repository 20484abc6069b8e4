"""From logits to tokens and from tokens to text: sampling settings, greedy and sampled picks,
stop strings and whole UTF-8 characters in the text stream."""

from __future__ import annotations

import pytest
import torch

from lorakit.serve.decode import (
    SamplingParams,
    TextStream,
    greedy_tokens,
    rows_finite,
    sample_token,
)
from serve_support import make_tokenizer

GREEDY = SamplingParams(max_tokens=8, temperature=0)


def test_sample_token_filters():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample_token(logits, GREEDY, None) == 1
    top1 = SamplingParams(max_tokens=1, temperature=1.0, top_k=1, seed=0)
    assert {sample_token(logits, top1, top1.generator()) for _ in range(20)} == {1}
    nucleus = SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-6, seed=0)
    assert sample_token(logits, nucleus, nucleus.generator()) == 1
    seeded = SamplingParams(max_tokens=1, temperature=1.5, seed=7)
    first, second = seeded.generator(), seeded.generator()
    draws = [sample_token(logits, seeded, first) for _ in range(30)]
    assert draws == [sample_token(logits, seeded, second) for _ in range(30)]
    assert len(set(draws)) > 1


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("max_tokens", 0, ">= 1"),
        ("temperature", -1.0, ">= 0"),
        ("temperature", float("nan"), ">= 0"),
        ("top_p", 0.0, r"in \(0, 1\]"),
        ("top_p", 1.5, r"in \(0, 1\]"),
        ("top_k", -1, ">= 0"),
        ("repetition_penalty", 0.0, "> 0"),
    ],
)
def test_sampling_settings_out_of_range_name_the_field(field, value, says):
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^{field}={value}: expected {says}"):
        SamplingParams(**{"max_tokens": 4, field: value})


def test_sampling_settings_as_generate_keywords():
    greedy = SamplingParams(max_tokens=4, temperature=0, top_k=5, repetition_penalty=1.1)
    assert greedy.generate_kwargs() == dict(
        max_new_tokens=4, repetition_penalty=1.1, do_sample=False
    )
    sampled = SamplingParams(max_tokens=4, temperature=0.7, top_p=0.9, top_k=20)
    assert sampled.generate_kwargs() == dict(
        max_new_tokens=4,
        repetition_penalty=1.0,
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        top_k=20,
    )


def test_batch_greedy_tokens_and_finite_rows():
    logits = torch.tensor(
        [
            [0.5, 2.0, 2.0, -1.0],  # a tie: the first maximum, as argmax
            [3e38, 3e38, -1.0, 0.0],  # finite, though its sum overflows to inf
            [0.0, float("nan"), 1.0, 2.0],
            [float("inf"), float("-inf"), 0.0, 0.0],  # its sum is NaN
        ]
    )
    assert greedy_tokens(logits[:2]) == [int(row.argmax()) for row in logits[:2]] == [1, 0]
    assert rows_finite(logits) == [True, True, False, False]
    assert rows_finite(logits[:2]) == [True, True]


def test_text_stream_holds_back_possible_stop():
    tokenizer = make_tokenizer()
    stream = TextStream(tokenizer, stop=("STOP",))
    sent = []
    for token in tokenizer("say ST then STOP now")["input_ids"]:
        delta, stopped = stream.push(token)
        sent.append(delta)
        if stopped:
            break
    assert stopped and "".join(sent) == "say ST then "
    assert "".join(sent[:4]) == "say "  # "S" and "T" waited until "T " ruled out "STOP"


def test_text_stream_waits_for_whole_utf8_character():
    tokenizer = make_tokenizer()
    stream = TextStream(tokenizer)
    first, second = tokenizer("é")["input_ids"]  # two bytes, two tokens
    assert stream.push(first) == ("", False)
    assert stream.push(second) == ("é", False)


def test_any_positive_temperature_samples_finite_probabilities():
    """(logits - max) / T: the best token scores 0, so T = 1e-45 is greedy, not NaN."""
    from lorakit.serve.decode import SamplingParams, sample_token

    logits = torch.tensor([3.0e4, -2.0, 2.9e4, 1.0])
    for temperature in (1e-45, 1e-30, 1e-8):
        params = SamplingParams(max_tokens=1, temperature=temperature, seed=0)
        assert sample_token(logits, params, params.generator()) == 0
    tied = SamplingParams(max_tokens=1, temperature=1e-45, seed=0)
    generator = tied.generator()
    draws = {sample_token(torch.tensor([5.0, 5.0, 1.0]), tied, generator) for _ in range(40)}
    assert draws == {0, 1}  # greedy among the tied best tokens


def test_greedy_has_no_generator_and_a_seed_repeats_its_draws():
    assert GREEDY.generator() is None
    seeded = SamplingParams(max_tokens=1, seed=3)
    first, second = seeded.generator(), seeded.generator()
    assert torch.equal(torch.rand(4, generator=first), torch.rand(4, generator=second))


def test_text_stream_flushes_what_it_held_back():
    tokenizer = make_tokenizer()  # one token per byte
    stream = TextStream(tokenizer, stop=("STOP",))
    sent = [stream.push(token) for token in tokenizer("say ST")["input_ids"]]
    # "S" and "ST" could still become "STOP": held back, not sent
    assert [delta for delta, _ in sent] == ["s", "a", "y", " ", "", ""]
    assert not any(stopped for _, stopped in sent)
    assert stream.flush() == "ST"  # generation ended without the stop string: send the rest
    assert stream.flush() == "" and stream.text == "say ST"
