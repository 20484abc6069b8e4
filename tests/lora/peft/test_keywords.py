"""`compat.check_peft_kwargs`: peft's inert keywords pass, refused ones raise, others are
unknown."""

from __future__ import annotations

import pytest

from lorakit.errors import ConfigError
from lorakit.lora.compat import check_peft_kwargs


def test_inert_keywords_pass():
    check_peft_kwargs("get_peft_model", {"low_cpu_mem_usage": True, "revision": "main"})
    check_peft_kwargs("load_adapter", {"torch_device": "cpu", "device_map": "cpu"})
    check_peft_kwargs("get_peft_model", {"mixed": False})  # refused only when set


@pytest.mark.parametrize(
    ("function", "kwargs", "message"),
    [
        ("get_peft_model", {"mixed": True}, "PeftMixedModel"),
        ("from_pretrained", {"ephemeral_gpu_offload": True}, "ephemeral_gpu_offload"),
        ("load_adapter", {"key_mapping": {"a": "b"}}, "key_mapping"),
        ("inject_adapter_in_model", {"state_dict": {}}, "state_dict"),
    ],
)
def test_refused_keywords_raise_config_error(function, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        check_peft_kwargs(function, kwargs)


def test_unknown_keyword_is_a_type_error_as_in_python():
    with pytest.raises(
        TypeError, match=r"^add_adapter\(\) got an unexpected keyword argument 'x'$"
    ):
        check_peft_kwargs("add_adapter", {"x": 1, "low_cpu_mem_usage": True})


def test_adapter_call_reads_every_shape():
    from lorakit.lora.compat.keywords import adapter_call

    config, active = object(), object()
    assert adapter_call(("a", config), {}, active) == ("a", config)
    assert adapter_call((), {"adapter_name": "a", "peft_config": config}, active) == ("a", config)
    assert adapter_call((config,), {"adapter_name": "a"}, active) == ("a", config)
    assert adapter_call((config,), {}, active) == ("default", config)
    assert adapter_call((), {"adapter_name": "a"}, active) == ("a", active)
    kwargs = {"config": config, "adapter_name": "b", "low_cpu_mem_usage": True}
    assert adapter_call((), kwargs, None) == ("b", config)
    assert kwargs == {"low_cpu_mem_usage": True}  # the rest is check_peft_kwargs' to judge
    with pytest.raises(TypeError, match="needs an adapter name and a config"):
        adapter_call(("a",), {}, None)
    with pytest.raises(TypeError, match="multiple values for argument 'adapter_name'"):
        adapter_call(("a", config), {"adapter_name": "b"}, None)
    with pytest.raises(TypeError, match="at most 2 positional"):
        adapter_call(("a", config, True), {}, None)
