"""The serving engine: continuous batching, cancellation, packed and grouped LoRA rows, padded
prefill, long mixed batches against peft. Sampling and stop strings: test_decode.py; the batch
KV cache: test_kvcache.py."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_decode import GREEDY

from lorakit.serve import build_state
from lorakit.serve.decode import SamplingParams, TextStream
from serve_support import BASE_NAME, make_adapters, make_model, make_tokenizer


@pytest.fixture(scope="module")
def adapter_paths(tmp_path_factory):
    return make_adapters(tmp_path_factory.mktemp("adapters"), ["a", "b"])


@pytest.fixture(params=[True, False], ids=["packed", "grouped"])
def state(adapter_paths, request):
    state = build_state(
        make_model(),
        make_tokenizer(),
        base_name=BASE_NAME,
        adapters=adapter_paths,
        max_batch=16,
        threads=1,
        packed=request.param,
    )
    yield state
    state.engine.shutdown()


def _prompts(tokenizer, count):
    words = ["alpha", "bravo charlie", "delta", "echo foxtrot golf", "hotel", "india juliet"]
    return [tokenizer(" ".join(words[: 1 + i % 6]) + f" {i}")["input_ids"] for i in range(count)]


def test_batched_greedy_equals_alone(state):
    prompts = _prompts(state.tokenizer, 12)
    adapters = [[None, "a", "b"][i % 3] for i in range(12)]
    alone = [
        state.engine.generate(p, a, GREEDY, timeout=60)
        for p, a in zip(prompts, adapters, strict=True)
    ]
    steps_alone = state.engine.steps
    results: list[list[int] | None] = [None] * 12
    all_done = threading.Event()

    def sink_for(i):
        parts = []

        def sink(event):  # runs on the engine thread: never block here
            parts.append(event)
            if event.finish_reason:
                results[i] = [t for e in parts for t in e.token_ids]
                if all(r is not None for r in results):
                    all_done.set()

        return sink

    for i, (p, a) in enumerate(zip(prompts, adapters, strict=True)):
        state.engine.submit(p, a, GREEDY, sink_for(i))
    assert all_done.wait(timeout=60)
    assert results == [event.token_ids for event in alone]
    assert state.engine.steps - steps_alone < steps_alone / 3  # the decode steps were shared
    assert len({tuple(r) for r in results}) > 6  # adapters and prompts really differ


def test_cancel_frees_the_slot(adapter_paths):
    state = build_state(make_model(), make_tokenizer(), base_name=BASE_NAME, max_batch=1, threads=1)
    decode = state.engine._decode_step

    def slow_decode():  # 200 tokens take over a second, so the cancel always lands first
        time.sleep(0.005)
        decode()

    state.engine._decode_step = slow_decode
    try:
        events, started = [], threading.Event()

        def sink(event):
            events.append(event)
            started.set()

        long = SamplingParams(max_tokens=200, temperature=0)
        seq = state.engine.submit([1, 2, 3], None, long, sink)
        assert started.wait(30)
        state.engine.cancel(seq)
        short = state.engine.generate([4, 5], None, GREEDY, timeout=30)  # needs the only slot
        assert short.finish_reason in ("stop", "length")
        deadline = time.monotonic() + 10
        while (events[-1].finish_reason is None or state.engine.load != (0, 0)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.01)
        assert events[-1].finish_reason == "cancelled"
        assert len(events) < 200 and state.engine.load == (0, 0)
    finally:
        state.engine.shutdown()


def test_packed_rows_equal_the_cores_grouped_rows(adapter_paths):
    """The packed decode path computes the same LoRA as the core's mixed-adapter forward."""
    state = build_state(make_model(), make_tokenizer(), base_name=BASE_NAME, adapters=adapter_paths)
    state.engine.shutdown()
    host, model = state.host, state.host.forward_model
    rows = ["a", "__base__", "b", "a", "b"]
    ids = torch.randint(0, 200, (len(rows), 6))
    with torch.inference_mode():
        host.packed = False
        with host.rows(rows):
            grouped = model(input_ids=ids).logits
        host.packed = True
        with host.rows(rows):
            packed = model(input_ids=ids).logits
        with host.rows(["__base__"] * len(rows)):
            base = model(input_ids=ids).logits
    torch.testing.assert_close(packed, grouped, rtol=1e-5, atol=1e-5)
    assert (grouped - base).abs().amax(-1).amax(-1)[[0, 2, 3, 4]].min() > 1e-2  # LoRA is on
    torch.testing.assert_close(packed[1], base[1], rtol=0, atol=0)


def _seq(prompt, adapter=None):
    from lorakit.serve.engine import Sequence

    return Sequence(list(prompt), adapter, GREEDY, lambda event: None, TextStream(None))


def test_prefill_groups_bound_padding_and_size():
    from lorakit.serve.engine import prefill_groups

    def lengths(groups):
        return [[len(seq.prompt_ids) for seq in group] for group in groups]

    seqs = [_seq([1] * n) for n in (41, 10, 100, 11, 10, 40)]
    assert lengths(prefill_groups(seqs, 4096)) == [[10, 10, 11], [40, 41], [100]]
    # 10 and 30 tokens padded to 2 x 30: 20 of 60 are padding (> 1/4), so two groups
    assert lengths(prefill_groups([_seq([1] * 10), _seq([1] * 30)], 4096)) == [[10], [30]]
    assert lengths(prefill_groups([_seq([1] * 50) for _ in range(3)], 120)) == [[50, 50], [50]]
    mixed = [_seq([1] * 8, adapter) for adapter in ("b", None, "a", "b", "a")]
    (group,) = prefill_groups(mixed, 4096)
    assert [seq.adapter for seq in group] == [None, "a", "a", "b", "b"]  # one block per adapter


def test_padded_prefill_equals_each_prompt_alone(state):
    """A left-padded prefill batch gives each row the logits and cache of its solo prefill."""
    state.engine.shutdown()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15, 16, 17], [18]]
    adapters = ["a", None, "b", "a"]
    group = [_seq(p, a) for p, a in zip(prompts, adapters, strict=True)]
    with torch.inference_mode():
        logits, cache, mask = state.engine._prefill(group)
        assert mask.sum(1).tolist() == [3, 6, 4, 1]
        for row, seq in enumerate(group):
            solo_logits, solo_cache, _ = state.engine._prefill([seq])
            torch.testing.assert_close(logits[row], solo_logits[0], rtol=1e-5, atol=1e-5)
            n = len(seq.prompt_ids)
            for layer, solo in zip(cache.layers, solo_cache.layers, strict=True):
                assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
                torch.testing.assert_close(layer.keys[row, :, -n:], solo.keys[0])
                torch.testing.assert_close(layer.values[row, :, -n:], solo.values[0])


def test_long_mixed_batch_equals_peft_generate(state, adapter_paths):
    """80 greedy tokens per request (past the cache's spare room, so its buffers grow), three
    requests on the base and two adapters decoded together: each equals peft's own `generate`
    of that request alone."""
    import peft

    from serve_support import make_model

    state.engine.eos_token_ids = set()
    params = SamplingParams(max_tokens=80, temperature=0)
    requests = [([5, 6, 7, 8], "a"), ([9, 10], None), ([11, 12, 13, 14, 15, 16, 17], "b")]
    outputs: list[list[int]] = [[] for _ in requests]
    done = threading.Event()

    def sink_for(row):
        def sink(event):
            outputs[row].extend(event.token_ids)
            if event.finish_reason and all(len(o) == 80 for o in outputs):
                done.set()

        return sink

    for row, (prompt, adapter) in enumerate(requests):
        state.engine.submit(prompt, adapter, params, sink_for(row))
    assert done.wait(120)

    reference = peft.PeftModel.from_pretrained(make_model(), adapter_paths["a"], adapter_name="a")
    reference.load_adapter(adapter_paths["b"], adapter_name="b")
    reference.eval()
    for (prompt, adapter), got in zip(requests, outputs, strict=True):
        ids = torch.tensor([prompt])
        kwargs = {"max_new_tokens": 80, "min_new_tokens": 80, "do_sample": False, "pad_token_id": 0}
        with torch.no_grad():
            if adapter is None:
                with reference.disable_adapter():
                    want = reference.generate(input_ids=ids, **kwargs)
            else:
                reference.set_adapter(adapter)
                want = reference.generate(input_ids=ids, **kwargs)
                with reference.disable_adapter():
                    plain = reference.generate(input_ids=ids, **kwargs)
                assert not torch.equal(want, plain)  # the adapter changes the tokens
        assert got == want[0, len(prompt) :].tolist()
    if state.host.packed:  # decode steps ran q_proj and v_proj (one input) fused (lora/fused.py)
        groups = {id(g): g for g in state.host._fused._groups.values()}.values()
        assert sorted(len(g.members) for g in groups) == [1, 1, 2, 2]  # down alone, per layer


def test_dora_adapter_is_served_and_equals_peft_generate(adapter_paths, tmp_path):
    """A DoRA adapter served next to a plain one (DoRA layers take grouped rows, not packed):
    each request's greedy tokens equal peft's `generate` with that adapter alone."""
    import peft

    from lorakit import LoraConfig, get_peft_model

    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    dora = get_peft_model(make_model(), config)
    with torch.no_grad():
        for param in dora.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    dora.save_pretrained(tmp_path / "d")
    paths = {"a": adapter_paths["a"], "d": tmp_path / "d"}
    state = build_state(
        make_model(),
        make_tokenizer(),
        base_name=BASE_NAME,
        adapters=paths,
        max_batch=4,
        threads=1,
        packed=True,
    )
    try:
        requests = [([5, 6, 7, 8], "d"), ([9, 10, 11], "a"), ([12, 13], "d")]
        outputs: list[list[int] | None] = [None] * len(requests)
        done = threading.Event()

        def sink_for(row):
            parts = []

            def sink(event):
                parts.extend(event.token_ids)
                if event.finish_reason:
                    outputs[row] = parts
                    if all(o is not None for o in outputs):
                        done.set()

            return sink

        state.engine.eos_token_ids = set()
        for row, (prompt, adapter) in enumerate(requests):
            state.engine.submit(prompt, adapter, GREEDY, sink_for(row))
        assert done.wait(60)
    finally:
        state.engine.shutdown()
    reference = peft.PeftModel.from_pretrained(make_model(), paths["d"], adapter_name="d")
    reference.load_adapter(paths["a"], adapter_name="a")
    reference.eval()
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    for (prompt, adapter), got in zip(requests, outputs, strict=True):
        reference.set_adapter(adapter)
        with torch.no_grad():
            want = reference.generate(input_ids=torch.tensor([prompt]), **kwargs)
        assert got == want[0, len(prompt) :].tolist()
