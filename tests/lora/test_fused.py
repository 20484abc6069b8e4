"""Decode steps with the layers that read one input fused (`lorakit.lora.fused`)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.ops import prepack_weight

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS = ["a", "__base__", "b", "a", "b", "b"]

pytestmark = pytest.mark.skipif(
    prepack_weight(torch.randn(4, 4)) is None, reason="this torch build has no oneDNN prepacking"
)


def model_with(adapters: dict[str, tuple[int, list[str]]]):
    """A tiny Llama with non-zero adapters name -> (rank, targets)."""
    model = None
    for seed, (name, (rank, targets)) in enumerate(adapters.items()):
        torch.manual_seed(seed + 1)
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False
        )
        if model is None:
            model = get_peft_model(make_tiny_llama(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model.eval()


def decode(model, ids, packed, fused=None):
    with torch.inference_mode(), model.mixed_adapters(ROWS, packed, fused):
        return model(input_ids=ids).logits


def fused_steps_equal_packed(model, rows: list[str], ids: torch.Tensor):
    """Two decode-shaped forwards with fused groups (learning, then fused) equal the packed
    path's; returns the FusedDecode."""
    packed = model.pack_adapters()
    fused = model.fuse_for_decoding(packed)
    with torch.inference_mode():
        with model.mixed_adapters(rows, packed):
            want = model(input_ids=ids).logits
        for _ in range(2):
            with model.mixed_adapters(rows, packed, fused):
                got = model(input_ids=ids).logits
            fused.learn()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return fused


def test_fused_steps_equal_the_packed_path_and_group_the_shared_inputs():
    model = model_with({"a": (2, ALL), "b": (4, ALL)})  # A rows within half the outputs
    ids = torch.randint(0, 128, (len(ROWS), 1), generator=torch.Generator().manual_seed(0))
    packed = model.pack_adapters()
    want = decode(model, ids, packed)
    fused = model.fuse_for_decoding(packed)
    learning = decode(model, ids, packed, fused)  # the first step runs the ordinary path
    assert fused.learn() and not fused.learn()
    got = decode(model, ids, packed, fused)
    torch.testing.assert_close(learning, want, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # q, k, v read one tensor and gate, up another; o and down alone, their A's stacked
    groups = {id(g): g for g in fused._groups.values()}.values()
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    shapes = sorted(tuple(names[id(m)] for m in g.members) for g in groups)
    assert shapes == sorted(
        [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)] * 2
    )
    assert all(g.blocks is not None for g in groups)
    assert fused.nbytes > 0 and len(fused.grouped_bases()) == 14


def test_biased_projections_keep_their_biases_in_the_group():
    # Qwen2-style attention: q, k and v carry biases (o_proj none), so the stacked group adds
    # each member's bias to its own columns and none to the A columns
    model = model_with({"a": (2, ALL), "b": (4, ALL)})
    for layer in model.get_base_model().model.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            base = getattr(attn, name).base_layer
            base.bias = torch.nn.Parameter(torch.randn(base.out_features))
    ids = torch.randint(0, 128, (len(ROWS), 1), generator=torch.Generator().manual_seed(4))
    fused = fused_steps_equal_packed(model, ROWS, ids)
    qkv = [g for g in fused._groups.values() if len(g.members) == 3]
    assert qkv and all(g.bias is not None and g.blocks is not None for g in qkv)


def test_layers_whose_adapters_differ_stack_only_the_base_weights():
    # adapter c targets q and v only, so q, k and v carry different adapters: their base
    # weights are still stacked, each adds its own adapters as packed rows do
    model = model_with({"a": (4, ALL), "b": (8, ALL), "c": (2, ["q_proj", "v_proj"])})
    rows = ["c", "a", "__base__", "b"]
    ids = torch.randint(0, 128, (len(rows), 1), generator=torch.Generator().manual_seed(1))
    fused = fused_steps_equal_packed(model, rows, ids)
    qkv = [g for g in fused._groups.values() if len(g.members) == 3]
    assert qkv and all(g.blocks is None for g in qkv)


def test_a_layer_called_on_another_tensor_computes_its_own_output():
    model = model_with({"a": (4, ALL)})
    attn = model.get_base_model().model.layers[0].self_attn
    packed = model.pack_adapters()
    fused = model.fuse_for_decoding(packed)
    x, other = torch.randn(2, 1, 32), torch.randn(2, 1, 32)
    with torch.inference_mode():
        with model.mixed_adapters(["a", "a"], packed):
            want_k = attn.k_proj(other)
        with model.mixed_adapters(["a", "a"], packed, fused):
            attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)  # learning: q, k, v read x
        fused.learn()
        with model.mixed_adapters(["a", "a"], packed, fused):
            attn.q_proj(x)  # computes q, k and v for x
            got_k = attn.k_proj(other)  # not x: k's own output for `other`
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)


def test_groups_are_built_by_the_second_step_when_learn_is_never_called():
    model = model_with({"a": (2, ALL), "b": (4, ALL)})
    ids = torch.randint(0, 128, (len(ROWS), 1), generator=torch.Generator().manual_seed(3))
    packed = model.pack_adapters()
    want = decode(model, ids, packed)
    fused = model.fuse_for_decoding(packed)
    for _ in range(3):
        torch.testing.assert_close(decode(model, ids, packed, fused), want, rtol=1e-5, atol=1e-5)
    assert fused._groups and not fused._calls  # nothing held from the learning step
    assert fused.learn() and not fused.learn()  # reported once


def test_training_and_prefill_never_take_the_fused_path():
    model = model_with({"a": (4, ALL)})
    packed = model.pack_adapters()
    fused = model.fuse_for_decoding(packed)
    ids = torch.randint(0, 128, (2, 5))  # several tokens per row: not a decode step
    with model.mixed_adapters(["a", "a"], packed, fused):
        model(input_ids=ids)
    with torch.inference_mode(), model.mixed_adapters(["a", "a"], packed, fused):
        model(input_ids=ids)
    assert fused.learn() and fused._groups == {}


def test_too_many_adapter_columns_stack_only_the_base_and_excluded_layers_stay_ordinary():
    # r=8 on q, k, v: 24 A rows against 64 output rows, within half; three such adapters (72
    # rows) are not, so the A's stay with the packed path and only the base weights are stacked
    model = model_with({"a": (8, ALL), "b": (8, ALL), "c": (8, ALL)})
    layer = model.get_base_model().model.layers[0]
    layer.mlp.down_proj.register_forward_hook(lambda *a: None)  # a hooked layer stays ordinary
    rows = ["a", "b", "c", "__base__"]
    ids = torch.randint(0, 128, (len(rows), 1), generator=torch.Generator().manual_seed(2))
    fused = fused_steps_equal_packed(model, rows, ids)
    qkv = fused._groups[layer.self_attn.q_proj]
    assert len(qkv.members) == 3 and qkv.blocks is None
    assert layer.mlp.down_proj not in fused._groups
    assert layer.self_attn.o_proj not in fused._groups  # alone and nothing to stack with
