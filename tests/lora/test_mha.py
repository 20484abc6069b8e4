"""LoRA on `nn.MultiheadAttention` (`lora/mha.py`): the forward is the base layer run with
W_in + dW_in and W_out + dW_out (written out with torch.func, no peft), its gradients are
autograd's of that, merging, several adapters, refusals, files."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call

from lorakit import LoraConfig, LoraModel, get_peft_model
from lorakit.errors import ConfigError
from lorakit.lora.mha import LoraMHA, LoraOutProj

E, HEADS, R, ALPHA = 8, 2, 4, 8


class Net(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(E, HEADS, batch_first=True, **kwargs)
        self.head = nn.Linear(E, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.mha(x, x, x)
        return self.head(out)


def _model(seed: int = 0, **config) -> tuple[Net, LoraModel, torch.Tensor]:
    torch.manual_seed(seed)
    base = Net()
    settings = dict(r=R, lora_alpha=ALPHA, target_modules=["mha"], init_lora_weights=False)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(**{**settings, **config}))
    return base, lora, torch.randn(2, 5, E)


def _updates(layer: LoraMHA, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    out = layer.base_layer.out_proj
    s = layer.scaling[name]
    return (
        s * layer.lora_B[name].weight @ layer.lora_A[name].weight,
        s * out.lora_B[name].weight @ out.lora_A[name].weight,
    )


def _reference(base: Net, d_in: torch.Tensor, d_out: torch.Tensor, x: torch.Tensor):
    mha = base.mha
    weights = {
        "in_proj_weight": mha.in_proj_weight + d_in,
        "out_proj.weight": mha.out_proj.weight + d_out,
    }
    out, _ = functional_call(mha, weights, (x, x, x))
    return base.head(out)


def test_forward_and_gradients_are_the_updated_layers():
    base, lora, x = _model()
    layer = lora.get_base_model().mha
    assert isinstance(layer, LoraMHA) and isinstance(layer.base_layer.out_proj, LoraOutProj)
    assert layer.lora_A["default"].weight.shape == (R, E)
    assert layer.lora_B["default"].weight.shape == (3 * E, R)
    d_in, d_out = _updates(layer, "default")
    expected = _reference(base, d_in, d_out, x)
    assert not torch.allclose(expected, base(x), atol=1e-4)  # a zero update cannot pass
    got = lora(x)
    torch.testing.assert_close(got, expected)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    params += [layer.base_layer.out_proj.lora_A["default"].weight]
    params += [layer.base_layer.out_proj.lora_B["default"].weight]
    grads = torch.autograd.grad(got.square().sum(), params)
    reference = torch.autograd.grad(expected.square().sum(), params)
    for grad, ref in zip(grads, reference, strict=True):
        torch.testing.assert_close(grad, ref)
    assert layer.base_layer.in_proj_weight.grad is None
    trainable = {n for n, p in lora.get_base_model().named_parameters() if p.requires_grad}
    assert trainable == {
        "mha.lora_A.default.weight",
        "mha.lora_B.default.weight",
        "mha.base_layer.out_proj.lora_A.default.weight",
        "mha.base_layer.out_proj.lora_B.default.weight",
    }


def test_the_base_layers_attributes_show_through():
    base, lora, _ = _model()
    layer = lora.get_base_model().mha
    for name in ("embed_dim", "num_heads", "batch_first", "head_dim", "dropout", "kdim"):
        assert getattr(layer, name) == getattr(base.mha, name)
    assert layer.out_proj is layer.base_layer.out_proj  # the LoraOutProj, not peft's base
    d_in, d_out = _updates(layer, "default")  # read directly, the weights carry the update
    torch.testing.assert_close(layer.in_proj_weight, base.mha.in_proj_weight + d_in)
    torch.testing.assert_close(layer.out_proj.weight, base.mha.out_proj.weight + d_out)
    with lora.disable_adapter():
        torch.testing.assert_close(layer.in_proj_weight, base.mha.in_proj_weight)
        torch.testing.assert_close(layer.out_proj.weight, base.mha.out_proj.weight)


def test_merge_unmerge_and_unload():
    base, lora, x = _model()
    layer = lora.get_base_model().mha
    d_in, d_out = _updates(layer, "default")
    expected = lora(x).detach()
    with torch.no_grad():
        lora.merge_adapter()
        in_proj, out_proj = layer.base_layer.in_proj_weight, layer.out_proj.base_layer.weight
        torch.testing.assert_close(in_proj, base.mha.in_proj_weight + d_in)
        torch.testing.assert_close(out_proj, base.mha.out_proj.weight + d_out)
        assert layer.merged_adapters == layer.base_layer.out_proj.merged_adapters == ["default"]
        torch.testing.assert_close(lora(x), expected)
        lora.unmerge_adapter()
        torch.testing.assert_close(in_proj, base.mha.in_proj_weight)
        torch.testing.assert_close(out_proj, base.mha.out_proj.weight)
        with lora.disable_adapter():
            torch.testing.assert_close(lora(x), base(x))
        merged = lora.merge_and_unload()
    assert type(merged.mha) is nn.MultiheadAttention
    assert type(merged.mha.out_proj) is type(base.mha.out_proj)
    assert set(merged.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(merged(x), expected)
    _, lora, _ = _model()
    assert type(lora.unload().mha.out_proj) is type(base.mha.out_proj)


def test_several_adapters_set_and_delete():
    base, lora, x = _model()
    lora.add_adapter(
        "other", LoraConfig(r=2, target_modules=["MultiheadAttention"], init_lora_weights=False)
    )
    layer = lora.get_base_model().mha
    first = lora(x)
    lora.set_adapter("other")
    assert layer.base_layer.out_proj.active_adapters == ["other"]
    torch.testing.assert_close(lora(x), _reference(base, *_updates(layer, "other"), x))
    lora.set_adapter(["default", "other"])
    both = [
        a + b for a, b in zip(_updates(layer, "default"), _updates(layer, "other"), strict=True)
    ]
    torch.testing.assert_close(lora(x), _reference(base, *both, x))
    lora.set_adapter("default")
    lora.delete_adapter("other")
    assert list(layer.r) == list(layer.base_layer.out_proj.r) == ["default"]
    torch.testing.assert_close(lora(x), first)


def test_refusals():
    with pytest.raises(ValueError, match="does not support DoRA"):
        _model(use_dora=True)
    with pytest.raises(ConfigError, match="init_lora_weights='olora'"):
        _model(init_lora_weights="olora")
    torch.manual_seed(0)
    separate = Net(kdim=4, vdim=6)
    with pytest.raises(ConfigError, match="Only same embed for query/key/value"):
        get_peft_model(separate, LoraConfig(target_modules=["mha"]))
    _, lora, x = _model()
    with pytest.raises(TypeError, match="does not support mixed adapter batches"):
        lora(x, adapter_names=["default", "__base__"])


def test_saved_file_has_both_projections_and_loads_back(tmp_path):
    _, lora, x = _model()
    lora.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    prefix = "base_model.model.mha."
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        prefix + "lora_A.weight": (R, E),
        prefix + "lora_B.weight": (3 * E, R),
        prefix + "base_layer.out_proj.lora_A.weight": (R, E),
        prefix + "base_layer.out_proj.lora_B.weight": (E, R),
    }
    torch.manual_seed(0)
    loaded = LoraModel.from_pretrained(Net(), tmp_path)
    torch.testing.assert_close(loaded(x), lora(x))


def test_out_proj_targeted_alone_takes_effect():
    # the attention reads out_proj.weight without calling out_proj (peft's adapter is ignored)
    torch.manual_seed(0)
    base = Net()
    x = torch.randn(2, 5, E)
    config = LoraConfig(target_modules=["out_proj"], init_lora_weights=False)
    lora = get_peft_model(copy.deepcopy(base), config)
    out = lora.get_base_model().mha.out_proj
    assert isinstance(out, LoraOutProj)
    d_out = out.scaling["default"] * out.lora_B["default"].weight @ out.lora_A["default"].weight
    torch.testing.assert_close(lora(x), _reference(base, torch.zeros(3 * E, E), d_out, x))


def test_transformer_encoder_layers_fast_path_sees_the_update():
    # nn.TransformerEncoderLayer in eval mode reads self_attn's weights itself (no MHA forward)
    torch.manual_seed(0)
    base = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, E)
    config = LoraConfig(target_modules=["self_attn"], init_lora_weights=False)
    lora = get_peft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():
        fast = lora(x)
        with lora.disable_adapter():
            torch.testing.assert_close(lora(x), base(x))
    slow = lora(x)  # the adapter's parameters need gradients here: no fast path
    assert not torch.allclose(fast, base(x), atol=1e-4)
    torch.testing.assert_close(fast, slow.detach(), atol=1e-5, rtol=1e-5)


def test_the_update_reaches_the_layer_inside_fsdp():
    # FSDP(use_orig_params=True) keeps the weights as plain attributes during its forward
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    _, lora, x = _model()
    with torch.no_grad():
        expected = lora(x)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = FullyShardedDataParallel(
            lora, use_orig_params=True, device_id=torch.device("cpu")
        )
        with torch.no_grad():
            torch.testing.assert_close(wrapped(x), expected)
    finally:
        dist.destroy_process_group()
