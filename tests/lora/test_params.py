"""LoRA on parameters (`lora/params.py`): the per-expert formula written out, several adapters,
merging, what is refused, and per-row batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import ConfigError
from lorakit.lora.params import LoraParams

E, HIDDEN, INTER = 3, 6, 5


class Experts(nn.Module):
    """A fused experts block: token t goes through expert `route[t]` only."""

    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = transposed
        up = torch.randn(E, HIDDEN, INTER) if transposed else torch.randn(E, INTER, HIDDEN)
        down = torch.randn(E, INTER, HIDDEN) if transposed else torch.randn(E, HIDDEN, INTER)
        self.up_proj = nn.Parameter(up)
        self.down_proj = nn.Parameter(down)

    def slice(self, name: str, e: int) -> torch.Tensor:
        """Expert e's weight as (out, in)."""
        w = getattr(self, name)[e]
        return w.T if self.is_transposed else w

    def forward(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            e = int(route[t])
            h = torch.relu(x[t] @ self.slice("up_proj", e).T)
            out[t] = h @ self.slice("down_proj", e).T
        return out


class Block(nn.Module):
    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.router = nn.Linear(HIDDEN, E, bias=False)
        self.experts = Experts(transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.router(x).argmax(-1))


def lora_block(transposed=False, **config):
    torch.manual_seed(0)
    fields = {"r": 2, "lora_alpha": 4, "init_lora_weights": False, **config}
    fields.setdefault("target_parameters", ["up_proj", "down_proj"])
    return lorakit.get_peft_model(Block(transposed), lorakit.LoraConfig(**fields))


def plain(model, x: torch.Tensor) -> torch.Tensor:
    """The block's output without any adapter (the wrapped experts called directly)."""
    block = model.get_base_model()
    return block.experts.base_layer(x, block.router(x).argmax(-1))


def by_hand(model, x: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    """y for every token from W_e + scaling * B_e @ A_e, the experts' slices of A and B."""
    wrapper = model.get_base_model().experts
    base = wrapper.base_layer
    route = model.get_base_model().router(x).argmax(-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        e, h = int(route[t]), x[t]
        for name in ("up_proj", "down_proj"):
            a, b = wrapper.lora_weights(adapter, name)
            r = a.shape[0] // E
            a_e, b_e = a[e * r : (e + 1) * r], b[:, e::E]
            w = base.slice(name, e) + wrapper.scaling[adapter][name] * b_e @ a_e
            h = h @ w.T
            h = torch.relu(h) if name == "up_proj" else h
        out[t] = h
    return out


@pytest.mark.parametrize("transposed", [False, True])
def test_forward_is_the_per_expert_formula(transposed):
    model = lora_block(transposed)
    x = torch.randn(9, HIDDEN)
    wrapper = model.get_base_model().experts
    assert isinstance(wrapper, LoraParams)
    assert wrapper.lora_weights("default", "up_proj")[0].shape == (E * 2, HIDDEN)
    assert wrapper.lora_weights("default", "up_proj")[1].shape == (INTER, 2 * E)
    torch.testing.assert_close(model(x), by_hand(model, x))
    assert not torch.allclose(model(x), plain(model, x), atol=1e-3)


def test_gradients_reach_only_the_factors():
    model = lora_block()
    model(torch.randn(9, HIDDEN)).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    report = lorakit.check_injection(model.get_base_model())
    assert report.lora_layers == ["experts"] and not report.trainable_base


def test_a_router_weight_and_rank_pattern():
    model = lora_block(target_parameters=["router.weight"], rank_pattern={"router.weight": 3})
    wrapper = model.get_base_model().router
    a, b = wrapper.lora_weights("default", "weight")
    assert a.shape == (3, HIDDEN) and b.shape == (E, 3)
    x = torch.randn(4, HIDDEN)
    expected = x @ (wrapper.base_layer.weight + wrapper.scaling["default"]["weight"] * b @ a).T
    torch.testing.assert_close(wrapper(x), expected)


def test_merge_unmerge_and_merge_and_unload():
    model = lora_block()
    x = torch.randn(9, HIDDEN)
    before = model.get_base_model().experts.base_layer.up_proj.detach().clone()
    expected = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected)
    model.unmerge_adapter()
    torch.testing.assert_close(model.get_base_model().experts.base_layer.up_proj, before)
    merged = model.merge_and_unload()
    assert isinstance(merged.experts, Experts)
    torch.testing.assert_close(merged(x), expected)


def test_several_adapters_switch_disable_and_delete():
    model = lora_block()
    model.add_adapter(
        "other",
        lorakit.LoraConfig(r=1, target_parameters=["down_proj"], init_lora_weights=False),
    )
    x = torch.randn(9, HIDDEN)
    first = model(x)
    model.set_adapter("other")
    second = model(x)
    assert not torch.allclose(first, second)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), plain(model, x))
    model.delete_adapter("other")
    assert model.active_adapters == ["default"]
    torch.testing.assert_close(model(x), first)
    assert model.get_base_model().experts.r == {"default": {"up_proj": 2, "down_proj": 2}}


def test_a_batch_mixing_adapters_gives_each_row_its_own():
    model = lora_block()
    model.add_adapter(
        "other",
        lorakit.LoraConfig(r=1, target_parameters=["up_proj"], init_lora_weights=False),
    )
    x = torch.randn(4, HIDDEN)  # one token per row here
    mixed = model(x, adapter_names=["default", "other", "default", "__base__"])
    alone = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        alone[name] = model(x)
    torch.testing.assert_close(mixed[[0, 2]], alone["default"][[0, 2]])
    torch.testing.assert_close(mixed[1], alone["other"][1])
    torch.testing.assert_close(mixed[3], plain(model, x)[3])
    model.merge_adapter()
    with pytest.raises(ConfigError, match="unmerge"):
        model(x, adapter_names=["default", "other", "default", "__base__"])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lora_dropout", 0.1),
        ("use_dora", True),
        ("init_lora_weights", "pissa"),
        ("init_lora_weights", "olora"),
    ],
)
def test_what_peft_refuses_on_parameters_is_refused(field, value):
    with pytest.raises(ConfigError, match="experts.up_proj"):
        lora_block(**{field: value})


def test_a_name_matching_nothing_is_a_clear_error():
    with pytest.raises(ConfigError, match="matched no parameter.*up_proj"):
        lora_block(target_parameters=["gate_up_proj"])


def test_a_parameter_of_a_wrapped_layer_is_refused():
    with pytest.raises(ConfigError, match="adapt it one way only"):
        lora_block(target_modules=["router"], target_parameters=["router.weight"])


def test_an_expert_update_beyond_float16_is_refused_by_expert(tmp_path):
    from safetensors.torch import load_file, save_file

    from lorakit.errors import AdapterError
    from lorakit.lora.adapters import check_adapter, read_adapter

    model = lora_block()
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.experts.lora_B.weight"  # down_proj's (the later parameter)
    tensors[key][:, 1::E] = 1e5  # expert 1's columns only
    save_file(tensors, path)
    with pytest.raises(AdapterError, match=r"experts \(expert 1\)"):
        check_adapter(Block(), read_adapter(tmp_path))
