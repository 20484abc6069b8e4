"""LoRA on convolutions (`lora/conv.py`): the formula written out with torch's conv functions
(no peft), merging, DoRA, several adapters, per-row adapters, files, and a small conv net
trained through the public API."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lorakit import LoraConfig, LoraModel, get_peft_model
from lorakit.errors import ConfigError
from lorakit.lora.conv import LoraConv

# For a base convolution conv(x; W, stride, padding, dilation, groups g) and adapter (A, B):
#     forward(x) = base(x) + scaling * conv(conv(x; A, stride, padding, dilation); B, groups=g)
# A (r, in, *k), B (out, r / g, 1, ...). With g = 1 the update is the kernel
#     dW[o, i, *k] = scaling * sum_j B[o, j] A[j, i, *k]
# and conv(x; W + dW) + bias is the forward.

CONV = {1: (nn.Conv1d, F.conv1d), 2: (nn.Conv2d, F.conv2d), 3: (nn.Conv3d, F.conv3d)}
CASES = {  # name: (dims, constructor kwargs, input spatial size)
    "conv1d": (1, dict(kernel_size=3, stride=2, padding=1), (11,)),
    "conv2d": (2, dict(kernel_size=(3, 2), stride=(2, 1), padding=1, dilation=2), (9, 9)),
    "conv2d_1x1": (2, dict(kernel_size=1), (5, 5)),
    "conv3d": (3, dict(kernel_size=3, padding="same", bias=False), (5, 5, 5)),
    "conv2d_groups": (2, dict(kernel_size=3, groups=2), (6, 6)),
}
IN, OUT, R, ALPHA = 4, 6, 2, 6
MERGED = dict(atol=1e-6, rtol=1e-5)  # merging computes in float32 (`update.py`)


class Net(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _case(name: str, seed: int = 0) -> tuple[Net, torch.Tensor]:
    dims, kwargs, size = CASES[name]
    torch.manual_seed(seed)
    out = 8 if kwargs.get("groups") else OUT
    model = Net(CONV[dims][0](IN, out, dtype=torch.float64, **kwargs))
    return model, torch.randn(3, IN, *size, dtype=torch.float64)


def _wrap(model: Net, **extra) -> LoraModel:
    config = dict(r=R, lora_alpha=ALPHA, target_modules=["conv"], init_lora_weights=False)
    return get_peft_model(model, LoraConfig(**{**config, **extra}))


def _formula(base: nn.Module, layer: LoraConv, name: str, x: torch.Tensor) -> torch.Tensor:
    fn = CONV[base.weight.dim() - 2][1]
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    h = fn(x, a, None, base.stride, base.padding, base.dilation)
    return base(x) + layer.scaling[name] * fn(h, b, groups=base.groups)


def _kernel_update(layer: LoraConv, name: str) -> torch.Tensor:
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.scaling[name] * torch.einsum("oj,ji...->oi...", b.flatten(1), a)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_is_the_formula(case):
    model, x = _case(case)
    base = copy.deepcopy(model.conv)
    lora = _wrap(model)
    layer = lora.get_base_model().conv
    assert isinstance(layer, LoraConv) and layer.scaling["default"] == ALPHA / R
    assert layer.lora_A["default"].weight.shape == (R, IN, *base.kernel_size)
    assert layer.lora_B["default"].weight.shape[1:] == (R // base.groups,) + (1,) * (x.dim() - 2)
    expected = _formula(base, layer, "default", x)
    assert not torch.allclose(expected, base(x))  # a zero update cannot pass
    torch.testing.assert_close(lora(x), expected)


def test_the_base_kernel_shows_through_and_dropout_trains():
    model, x = _case("conv2d")
    base = copy.deepcopy(model.conv)
    lora = _wrap(model, lora_dropout=0.5)
    layer = lora.get_base_model().conv
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    lora.train()
    torch.manual_seed(3)
    dropped = lora(x)
    torch.manual_seed(3)
    mask = F.dropout(torch.ones_like(x), 0.5)
    torch.testing.assert_close(
        dropped, _formula(base, layer, "default", x * mask) - base(x * mask) + base(x)
    )


@pytest.mark.parametrize("case", [c for c in CASES if "groups" not in c])
def test_merge_writes_the_kernel_update_and_unmerge_restores(case):
    model, x = _case(case)
    base = copy.deepcopy(model.conv)
    lora = _wrap(model)
    layer = lora.get_base_model().conv
    delta = _kernel_update(layer, "default")
    torch.testing.assert_close(layer.get_delta_weight("default"), delta, **MERGED)
    unmerged = lora(x)
    lora.merge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, base.weight + delta, **MERGED)
    torch.testing.assert_close(lora(x), unmerged, **MERGED)
    lora.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, base.weight, **MERGED)
    plain = lora.merge_and_unload()
    assert type(plain.conv) is type(base)
    torch.testing.assert_close(plain(x), unmerged, **MERGED)


def test_grouped_conv_refuses_merging_and_ranks_not_divisible():
    model, x = _case("conv2d_groups")
    with pytest.warns(UserWarning, match="groups=2"):
        lora = _wrap(model)
    with pytest.raises(NotImplementedError, match="groups=2"):
        lora.merge_adapter()
    assert lora.get_base_model().conv.merged_adapters == []
    with pytest.raises(NotImplementedError, match="groups=2"):
        lora.merge_and_unload()
    model, _ = _case("conv2d_groups")
    with pytest.raises(ConfigError, match="r=3"):
        _wrap(model, r=3)


@pytest.mark.parametrize("case", ["conv1d", "conv2d", "conv3d"])
def test_dora_forward_merge_and_unmerge(case):
    # DoRA: m * conv(x; W + dW) / ||W + dW|| per output channel, + bias
    model, x = _case(case)
    base = copy.deepcopy(model.conv)
    lora = _wrap(model, use_dora=True)
    layer = lora.get_base_model().conv
    magnitude = layer.lora_magnitude_vector["default"]
    assert magnitude.shape == (1, base.out_channels) + (1,) * (x.dim() - 2)
    with torch.no_grad():
        magnitude.mul_(torch.linspace(0.5, 1.5, base.out_channels).reshape(magnitude.shape))
    weight = base.weight + _kernel_update(layer, "default")
    norm = weight.flatten(1).norm(dim=1).reshape(magnitude.shape)
    plain = base._conv_forward(x, weight * (magnitude / norm).transpose(0, 1), None)
    expected = plain if base.bias is None else plain + base.bias.reshape(magnitude.shape)
    torch.testing.assert_close(lora(x), expected)
    lora.merge_adapter()
    torch.testing.assert_close(lora(x), expected, **MERGED)
    lora.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, base.weight, **MERGED)


def test_dora_norm_is_detached_and_gradients_reach_every_factor():
    model, x = _case("conv2d")
    lora = _wrap(model, use_dora=True)
    lora(x).square().sum().backward()
    layer = lora.get_base_model().conv
    for param in layer.adapter_parameters("default"):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None


def test_adapters_set_disable_delete_and_per_row():
    model, x = _case("conv2d")
    base = copy.deepcopy(model.conv)
    lora = _wrap(model)
    lora.add_adapter("other", LoraConfig(r=4, target_modules=["Conv2d"], init_lora_weights=False))
    layer = lora.get_base_model().conv
    first = lora(x)
    lora.set_adapter("other")
    second = lora(x)
    torch.testing.assert_close(second, _formula(base, layer, "other", x))
    with lora.disable_adapter():
        torch.testing.assert_close(lora(x), base(x))
    mixed = lora(x, adapter_names=["default", "__base__", "other"])
    torch.testing.assert_close(mixed, torch.stack([first[0], base(x)[1], second[2]]))
    lora.delete_adapter("other")
    assert list(layer.r) == ["default"] and lora.active_adapters == ["default"]
    torch.testing.assert_close(lora(x), first)


def test_saved_file_has_the_kernel_shapes_and_loads_back(tmp_path):
    model, x = _case("conv2d_groups")
    with pytest.warns(UserWarning):
        lora = _wrap(model, use_dora=True, r=4)
    lora.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "base_model.model.conv.lora_A.weight": (4, IN, 3, 3),
        "base_model.model.conv.lora_B.weight": (8, 2, 1, 1),
        "base_model.model.conv.lora_magnitude_vector": (1, 8, 1, 1),
    }
    fresh, _ = _case("conv2d_groups")
    with pytest.warns(UserWarning):
        loaded = LoraModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(loaded(x), lora(x))


def test_inits_that_factor_a_linear_weight_are_refused():
    model, _ = _case("conv2d")
    with pytest.raises(ConfigError, match="pissa"):
        _wrap(model, init_lora_weights="pissa")
    model, x = _case("conv2d")
    loftq = dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    lora = _wrap(model, **loftq)  # peft's fallback: the default init
    torch.testing.assert_close(lora(x), model.conv.base_layer(x))


# ---------------------------------------------------------------- a small conv net, trained


class TinyConvNet(nn.Module):
    """Three 3x3 convolutions (one strided) and a linear head: 10 classes from 1 x 12 x 12."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.mix = nn.Conv2d(16, 16, 3, padding=1, groups=groups)
        self.head = nn.Linear(16 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.down(x))
        x = F.relu(self.mix(x))
        return self.head(x.flatten(1))


def _synthetic_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is the position of a bright 3x3 patch on noise."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (n,), generator=generator)
    images = 0.1 * torch.randn(n, 1, 12, 12, generator=generator)
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 5)
        images[i, 0, 2 + 5 * row : 5 + 5 * row, 1 + 2 * col : 4 + 2 * col] += 1.0
    return images, labels


def test_conv_net_trains_with_lora_on_its_convolutions_and_merges():
    torch.manual_seed(0)
    net = TinyConvNet()
    images, labels = _synthetic_images(32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["Conv2d"])  # the head stays frozen
    lora = get_peft_model(net, config)
    trainable = {n for n, p in lora.get_base_model().named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trainable if "lora_" in n} == {"stem", "down", "mix"}
    assert not any("base_layer" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(lora(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.25 * sum(losses[:5])  # 2.3 -> near 0 in 30 steps
    lora.eval()
    with torch.no_grad():
        unmerged = lora(images)
        merged = lora.merge_and_unload()
        assert not any(isinstance(m, LoraConv) for m in merged.modules())
        torch.testing.assert_close(merged(images), unmerged, atol=1e-5, rtol=1e-5)


def test_a_refused_merge_writes_nothing():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="groups=2"):
        lora = get_peft_model(TinyConvNet(groups=2), LoraConfig(target_modules=["Conv2d"]))
    stem = lora.get_base_model().stem
    before = stem.base_layer.weight.clone()
    with pytest.raises(NotImplementedError, match="groups=2"):
        lora.merge_adapter()
    assert stem.merged_adapters == [] and torch.equal(stem.base_layer.weight, before)
    with pytest.raises(NotImplementedError, match="groups=2"):
        lora.merge_and_unload()
    assert isinstance(lora.get_base_model().stem, LoraConv)
