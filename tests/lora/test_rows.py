"""Per-row adapters (`lorakit.lora.rows`) and prepacked linear layers
(`lorakit.ops.PrepackedLinears`).

The packed and block paths are checked against the grouped path and against each row run alone
with `set_adapter`, the definition of what a mixed batch must compute.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_tiny_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.lora import rows as row_paths
from lorakit.lora.rows import RowPlan
from lorakit.ops import FEW_ROWS, PrepackedLinear, PrepackedLinears, few_rows, prepack_weight

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _three_adapters():
    """Adapters a (r=4), b (r=2, attention only, rank/alpha patterns), c (r=8) on a tiny Llama."""
    model = get_peft_model(
        make_tiny_llama(),
        LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False),
        adapter_name="a",
    )
    model.add_adapter(
        "b",
        LoraConfig(
            r=2,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 3},
            alpha_pattern={"q_proj": 5},
            init_lora_weights=False,
        ),
    )
    model.add_adapter(
        "c", LoraConfig(r=8, lora_alpha=4, target_modules=ALL, init_lora_weights=False)
    )
    return model.eval()


def _alone(model, ids, names):
    """Each row through the model by itself, with its adapter set the ordinary way."""
    rows = []
    for row, name in enumerate(names):
        if name is None:
            with model.disable_adapter():
                rows.append(model(input_ids=ids[row : row + 1]).logits[0])
        else:
            model.set_adapter(name)
            rows.append(model(input_ids=ids[row : row + 1]).logits[0])
    return torch.stack(rows)


@pytest.mark.parametrize("tokens", [1, 3, FEW_ROWS])
def test_packed_rows_equal_each_row_alone(tokens, monkeypatch):
    """Few tokens per batch take the packed path; many take grouped rows; all equal solo runs."""
    model = _three_adapters()
    packed = model.pack_adapters()
    names = ["c", None, "a", "b", "c", "a"]
    ids = torch.randint(0, 128, (len(names), tokens))
    calls = []
    add_packed = row_paths.add_packed
    monkeypatch.setattr(row_paths, "add_packed", lambda *args: calls.append(1) or add_packed(*args))
    with torch.no_grad():
        with model.mixed_adapters(names, packed=packed):
            fast = model(input_ids=ids).logits
        assert len(calls) == (14 if len(names) * tokens <= FEW_ROWS else 0)  # 2 layers x 7
        with model.mixed_adapters(names):
            grouped = model(input_ids=ids).logits
        alone = _alone(model, ids, names)
    torch.testing.assert_close(fast, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped, alone, rtol=1e-5, atol=1e-5)
    assert (alone[0] - alone[1]).abs().max() > 1e-3  # the adapters do change the logits


def test_packed_span_covers_only_the_adapters_present():
    model = _three_adapters()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    packed = model.pack_adapters()
    entry = packed.get(layer)
    assert [block[:3] for block in entry.blocks] == [("a", 0, 4), ("b", 4, 2), ("c", 6, 8)]
    assert entry.a.shape == (14, 32) and entry.b.shape == (32, 14)
    a_only = RowPlan(["a", None, "a"], packed=packed).packed_layout(layer)
    assert a_only[0].shape == (4, 32) and a_only[1].shape == (32, 4)
    scaling = layer.scaling["a"]
    assert a_only[2].tolist() == [[scaling] * 4, [0.0] * 4, [scaling] * 4]
    b_and_c = RowPlan(["c", "b"], packed=packed).packed_layout(layer)
    assert b_and_c[0].shape == (10, 32)  # columns 4..14: b and c, not a
    assert torch.equal(b_and_c[2][0, :2], torch.zeros(2))  # row 0 (c) gets nothing from b
    assert torch.equal(b_and_c[2][0, 2:], torch.full((8,), layer.scaling["c"]))
    # a and c present: span 14 for 12 used columns is fine; the rule refuses mostly-empty spans
    assert RowPlan(["a", "c"], packed=packed).packed_layout(layer)[0].shape == (14, 32)


def test_plan_groups_single_and_blocks():
    plan = RowPlan(["x", "x", None, "y", "x"])
    assert plan.single is None
    assert [(name, rows.tolist(), block) for name, rows, block in plan.groups] == [
        ("x", [0, 1, 4], None),
        ("y", [3], (3, 4)),
    ]
    assert RowPlan(["x", "x"]).single == "x"
    assert RowPlan([None, "__base__"]).single is None and RowPlan([None]).groups == []


def test_block_rows_add_in_place_and_equal_alone():
    """Rows of one adapter side by side (as the server's prefill orders them) skip the gather."""
    model = _three_adapters()
    names = ["a", "a", "c", "c", "c", None]
    ids = torch.randint(0, 128, (len(names), FEW_ROWS))  # many tokens: not packed
    with torch.no_grad():
        with model.mixed_adapters(names):
            mixed = model(input_ids=ids).logits
        alone = _alone(model, ids, names)
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)


def test_training_mixed_rows_get_gradients_and_never_pack():
    model = _three_adapters()
    packed = model.pack_adapters()
    model.set_adapter(["a", "c"])  # both trainable
    model.train()
    names = ["a", "c"]
    ids = torch.randint(0, 128, (2, 3))
    with model.mixed_adapters(names, packed=packed):
        model(input_ids=ids).logits.square().mean().backward()
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert layer.lora_B["a"].weight.grad.abs().sum() > 0
    assert layer.lora_B["c"].weight.grad.abs().sum() > 0


def test_packed_snapshot_and_row_count_errors():
    model = _three_adapters()
    with pytest.raises(Exception, match="Adapter zz does not exist"):
        model.pack_adapters(["zz"])
    rows = pytest.raises(ValueError, match="3 rows but 2 adapter names")
    with torch.no_grad(), model.mixed_adapters(["a", "c"]), rows:
        model(input_ids=torch.zeros(3, 2, dtype=torch.long))


@pytest.mark.parametrize("rows", [1, 2, 8, FEW_ROWS + 1, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_prepacked_linear_equals_f_linear(rows, bias):
    layer = nn.Linear(48, 80, bias=bias)
    packs = PrepackedLinears([layer])
    if not packs.linears:
        pytest.skip("this torch build has no oneDNN prepacked linear")
    x = torch.randn(rows, 1, 48)
    with torch.no_grad(), packs.active():
        assert type(layer) is PrepackedLinear
        got = layer(x)
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert got.shape == (rows, 1, 80) and type(layer) is nn.Linear


def test_prepacked_linear_keeps_autograd_and_other_dtypes_plain():
    layer = nn.Linear(8, 4)
    packs = PrepackedLinears([layer])
    x = torch.randn(3, 8, requires_grad=True)
    with packs.active():
        layer(x).sum().backward()  # autograd on: F.linear, gradients flow
    assert x.grad is not None and layer.weight.grad is not None
    assert prepack_weight(torch.randn(4, 8, dtype=torch.bfloat16)) is None
    assert prepack_weight(torch.randn(4, 8, 2)) is None
    assert PrepackedLinears([nn.Linear(8, 4).to(torch.float64)]).linears == []


def test_few_rows_only_outside_autograd_on_cpu():
    x = torch.randn(8, 4)
    assert not few_rows(x)  # autograd on: training keeps F.linear
    with torch.no_grad():
        assert few_rows(x) and not few_rows(torch.randn(1, 4))
        assert not few_rows(torch.randn(FEW_ROWS + 1, 4))


def test_prepacked_linears_swap_and_restore():
    model = make_tiny_llama()
    packs = PrepackedLinears([m for m in model.modules() if type(m) is nn.Linear])
    ids = torch.randint(0, 128, (4, 1))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with packs.active():
            assert all(type(m) is PrepackedLinear for m in packs.linears)
            fast = model(input_ids=ids).logits
    assert all(type(m) is nn.Linear for m in packs.linears)
    assert model.lm_head.weight is model.get_output_embeddings().weight
    assert packs.nbytes == sum(m.weight.numel() * 4 for m in packs.linears)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_prepacked_linears_drop_and_restore():
    model = make_tiny_llama()
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    packs = PrepackedLinears(linears)
    if not packs.linears:
        pytest.skip("this torch build has no oneDNN prepacked linear")
    q = model.model.layers[0].self_attn.q_proj
    packs.drop([q])
    assert q not in packs.linears and not hasattr(q, "_lorakit_packed")
    with packs.active():
        assert type(q) is nn.Linear  # a dropped layer stays plain
    packs.restore()
    assert q in packs.linears and len(packs.linears) == len(linears)
    with torch.no_grad(), packs.active():
        x = torch.randn(3, 32)
        torch.testing.assert_close(
            q(x), torch.nn.functional.linear(x, q.weight), rtol=1e-5, atol=1e-5
        )
    packs.restore()  # nothing dropped: nothing to do
    assert len(packs.linears) == len(linears)
