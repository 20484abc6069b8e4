"""Programs from peft's own documentation, with `peft` changed to `lorakit` and nothing else:
LoRA+ (`peft.optimizers`), `add_adapter` as the quicktour and the troubleshooting guide call it,
`layer_replication`, and a custom layer type registered with `_register_custom_module`.

Each snippet is peft's text, cut to a tiny random model (a `...` of the docs filled in); it runs
with lorakit, and with peft too where peft runs it, so the two are checked on the same program.
"""

from __future__ import annotations

import re
import textwrap

import pytest
import torch
from tests.conftest import make_tiny_llama

# docs/source/package_reference/lora.md, "LoRA+ optimized LoRA" (bitsandbytes' Adam8bit is a
# CUDA optimizer; torch's Adam stands in for it)
LORAPLUS = """
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from transformers import Trainer, TrainingArguments
import torch

base_model = make_tiny_llama()
config = LoraConfig(target_modules=["q_proj", "v_proj"])
model = get_peft_model(base_model, config)

optimizer = create_loraplus_optimizer(
    model=model,
    optimizer_cls=torch.optim.Adam,
    lr=5e-5,
    loraplus_lr_ratio=16,
)
scheduler = None

trainer = Trainer(
    model=model,
    args=TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True),
    train_dataset=[{"input_ids": ids, "labels": ids} for _ in range(4)],
    optimizers=(optimizer, scheduler),
)
trainer.train()
result = [group["lr"] for group in optimizer.param_groups]
"""

# docs/source/quicktour.md, "Multiple adapters"
QUICKTOUR_ADD_ADAPTER = """
from peft import LoraConfig, get_peft_model

peft_model = get_peft_model(make_tiny_llama(), LoraConfig(target_modules=["q_proj"]))
peft_model.add_adapter(adapter_name='new_adapter')
peft_model.set_adapter('new_adapter')
result = peft_model.active_adapters
"""

# docs/source/developer_guides/troubleshooting.md, training two adapters at once
TROUBLESHOOTING_ADD_ADAPTER = """
from peft import LoraConfig, get_peft_model

base_model = make_tiny_llama()
lora_config_0 = LoraConfig(target_modules=["q_proj"])
lora_config_1 = LoraConfig(target_modules=["v_proj"])
model = get_peft_model(base_model, lora_config_0)
model.add_adapter(adapter_name="other", peft_config=lora_config_1)
model.base_model.set_adapter(["default", "other"])
optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad])
result = sorted(n for n, p in model.named_parameters() if p.requires_grad)
"""

# docs/source/package_reference/lora.md, "Memory efficient Layer Replication with LoRA"
LAYER_REPLICATION = """
from peft import LoraConfig, get_peft_model

base_model = make_tiny_llama(layers=5)
config = LoraConfig(layer_replication=[[0,4], [2,5]], target_modules=["q_proj", "v_proj"])
model = get_peft_model(base_model, config)
result = (len(model.get_base_model().model.layers), model(ids).logits.shape)
"""

# docs/source/developer_guides/custom_models.md, "Experimental support for dynamic dispatch of
# custom modules in LoRA": a LoRA layer for nn.LSTM (its input weights), then train, save, load
CUSTOM_MODULE = """
import torch
from torch import nn
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer

class MyLoraLSTMLayer(nn.Module, LoraLayer):
    def __init__(self, base_layer, adapter_name, config=None, r=8, lora_alpha=8, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.in_features = base_layer.input_size
        self.out_features = 4 * base_layer.hidden_size
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def forward(self, x, *args, **kwargs):
        weights = dict(self.base_layer.named_parameters())
        if not (self.disable_adapters or self.merged):
            for name in self.active_adapters:
                if name in self.lora_A:
                    delta = self.lora_B[name].weight @ self.lora_A[name].weight
                    weights["weight_ih_l0"] = weights["weight_ih_l0"] + delta * self.scaling[name]
        return torch.func.functional_call(self.base_layer, weights, (x, *args), kwargs)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0])

torch.manual_seed(0)
base_model = Net()
# add the LSTM layer names to target_modules
config = LoraConfig(target_modules=["lstm"], init_lora_weights=False)
# define a mapping from base layer type to LoRA layer type
custom_module_mapping = {nn.LSTM: MyLoraLSTMLayer}
# register the new mapping
config._register_custom_module(custom_module_mapping)
# after registration, create the PEFT model
peft_model = get_peft_model(base_model, config)
# do training
x = torch.randn(3, 5, 4)
optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
peft_model(x).square().mean().backward()
optimizer.step()
trained = peft_model(x)

# saving works as always and includes the parameters of the custom modules
peft_model.save_pretrained(tmp_path / "lora-custom-module")

# loading the model later:
torch.manual_seed(0)
base_model = Net()
# load the LoRA config that you saved earlier
config = LoraConfig.from_pretrained(tmp_path / "lora-custom-module")
# register the custom module again, the same way as the first time
custom_module_mapping = {nn.LSTM: MyLoraLSTMLayer}
config._register_custom_module(custom_module_mapping)
# pass the config instance to from_pretrained:
peft_model = PeftModel.from_pretrained(base_model, tmp_path / "lora-custom-module", config=config)
torch.testing.assert_close(peft_model(x), trained)
result = sorted(peft_model.state_dict())
"""


def run(snippet: str, library: str, tmp_path) -> object:
    """Run a docs snippet with `peft` replaced by `library` in its text; returns its `result`."""
    source = re.sub(r"\bpeft\b", library, textwrap.dedent(snippet))
    namespace = {
        "make_tiny_llama": make_tiny_llama,
        "tmp_path": tmp_path / library,
        "ids": torch.tensor([[1, 5, 9, 2, 7, 3]]),
        "torch": torch,
    }
    exec(compile(source, f"<docs snippet, {library}>", "exec"), namespace)
    return namespace["result"]


@pytest.mark.parametrize(
    "snippet",
    [LORAPLUS, TROUBLESHOOTING_ADD_ADAPTER, LAYER_REPLICATION, CUSTOM_MODULE],
    ids=["loraplus", "add_adapter(peft_config=)", "layer_replication", "custom_module"],
)
def test_docs_snippet_runs_with_only_the_import_changed_as_with_peft(snippet, tmp_path):
    assert run(snippet, "lorakit", tmp_path) == run(snippet, "peft", tmp_path)


def test_the_quicktour_add_adapter_call_runs(tmp_path):
    # peft's quicktour shows add_adapter with a name only; peft itself needs a config there
    # (TypeError), lorakit gives the new adapter the active adapter's settings
    assert run(QUICKTOUR_ADD_ADAPTER, "lorakit", tmp_path) == ["new_adapter"]
    with pytest.raises(TypeError, match="peft_config"):
        run(QUICKTOUR_ADD_ADAPTER, "peft", tmp_path)
