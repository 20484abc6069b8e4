"""`LoraModel`: a base model with named LoRA adapters, and `get_peft_model`.

`LoraModel.base_model` is the tuner level (peft's naming, `compat.tuner`) and
`get_base_model()` the wrapped base model (also `base_model.model`). What only peft programs
and Hugging Face `Trainer` use is `compat.surface.PeftSurface`, which `LoraModel` inherits.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorakit.lora.adapters as adapter_io
from lorakit.errors import AdapterError, ConfigError
from lorakit.lora import registry, replication, shared
from lorakit.lora.combine import combine_adapters
from lorakit.lora.compat.hf_face import HFFace
from lorakit.lora.compat.keywords import adapter_call, check_peft_kwargs
from lorakit.lora.compat.reading import read_for_loading
from lorakit.lora.compat.surface import PeftSurface, peft_model_config
from lorakit.lora.compat.tuner import LoraTuner
from lorakit.lora.config import LoraConfig
from lorakit.lora.fused import FusedDecode
from lorakit.lora.inits import loading_config
from lorakit.lora.inject import (
    add_adapter_layers,
    mark_trainable,
    replace_module,
    saved_targets,
)
from lorakit.lora.layers import LoraLayer, LoraLinear, ModulesToSave, is_quantized_linear
from lorakit.lora.params import LoraParams
from lorakit.lora.rows import BASE, PackedAdapters, RowPlan, reading_rows
from lorakit.lora.ties import untie_for_merge
from lorakit.lora.tokens import TrainableTokens


class LoraModel(PeftSurface, HFFace):
    """A base model whose target layers carry named adapters; attributes fall through to it.

    Calling it calls the wrapped model (its `forward` is the wrapped model's, see `hf_face`);
    forward hooks belong on the wrapped model or its layers, not on the wrapper. The wrapped
    model is `get_base_model()` (also `base_model.model`, peft's nesting).
    """

    def __init__(
        self,
        model: nn.Module,
        config: LoraConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
    ):
        nn.Module.__init__(self)
        self.base_model = LoraTuner(model, self)
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapters: list[str] = []
        self.chat_template: str | None = None
        self._wrapper_cache: list[nn.Module] | None = None
        self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str) -> Any:
        if "_modules" not in self.__dict__:  # before __init__ ran (DeepSpeed's init wrapper)
            raise AttributeError(name)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---------------------------------------------------------------- adapters
    @property
    def active_peft_config(self) -> LoraConfig:
        """The config of the first active adapter."""
        return self.peft_config[self.active_adapter]

    @property
    def active_adapter(self) -> str:
        """The first active adapter's name."""
        return self.active_adapters[0]

    def lora_layers(self) -> Iterator[tuple[str, LoraLinear]]:
        """(name, layer) for every `LoraLinear` in the base model."""
        for name, module in self.base_model.model.named_modules():
            if isinstance(module, LoraLinear):
                yield name, module

    def param_layers(self) -> Iterator[tuple[str, LoraParams]]:
        """(name, wrapper) for every module whose parameters carry LoRA (`target_parameters`)."""
        for name, module in self.base_model.model.named_modules():
            if isinstance(module, LoraParams):
                yield name, module

    def custom_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        """(name, layer) for every layer of a registered class (`lorakit.lora.registry`)."""
        for name, module in self.base_model.model.named_modules():
            if registry.is_custom(module):
                yield name, module

    def _mergeable(self) -> list[LoraLayer | LoraParams | TrainableTokens]:
        layers = [m for _, m in self.lora_layers()] + [m for _, m in self.custom_layers()]
        rows = [m for m in self.base_model.model.modules() if isinstance(m, TrainableTokens)]
        return layers + [m for _, m in self.param_layers()] + rows

    def _wrappers(self) -> list[LoraLinear | ModulesToSave | LoraParams]:
        """Every LoRA / modules_to_save wrapper, cached until adapters are added or removed."""
        if self._wrapper_cache is None:
            self._wrapper_cache = [
                m
                for m in self.base_model.model.modules()
                if isinstance(m, (LoraLayer, ModulesToSave, LoraParams, TrainableTokens))
            ]
        return self._wrapper_cache

    def add_adapter(
        self, *args: Any, autocast_adapter_dtype: bool = True, **peft_kwargs: Any
    ) -> None:
        """Add a fresh adapter; the active adapters stay as they are.

        peft's call `add_adapter(adapter_name, peft_config)` (by position or keyword),
        transformers' `add_adapter(peft_config, adapter_name=...)` (no name: 'default'), and a
        name only, peft's quicktour call: the new adapter takes the active adapter's settings
        (`compat.keywords.adapter_call`). With a float16 / bfloat16 base the adapter is made in
        float32 (peft's `autocast_adapter_dtype=True`); `autocast_adapter_dtype=False` makes it in
        the base layer's dtype. `peft_kwargs`: see `compat.keywords`.
        """
        active = self.peft_config[self.active_adapter] if self.active_adapters else None
        adapter_name, config = adapter_call(args, peft_kwargs, active)
        check_peft_kwargs("add_adapter", peft_kwargs)
        if adapter_name in self.peft_config:
            raise ConfigError(f"an adapter named `{adapter_name}` exists; delete it or pick a name")
        if not isinstance(config, LoraConfig):
            raise TypeError(f"expected a lorakit LoraConfig, got {type(config).__name__}")
        biased = [n for n, c in self.peft_config.items() if c.bias != "none"]
        if self.peft_config and (config.bias != "none" or biased):
            raise ConfigError(
                f"adapter `{adapter_name}`: LoRA supports only 1 adapter with bias. When using "
                "multiple adapters, only one of a model may train biases (they are "
                f"the base's own, shared by all adapters); `{(biased or [adapter_name])[0]}` has "
                "bias != 'none'. Use bias='none' for every adapter when loading several"
            )
        config = copy.deepcopy(config)  # add_adapter_layers makes it name what it adapts
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = _name_or_path(self.base_model.model)
        add_adapter_layers(self.base_model.model, config, adapter_name)
        self._wrapper_cache = None
        if not autocast_adapter_dtype:
            for _, layer in self.lora_layers():
                layer.cast_adapter_to_base(adapter_name)
        self.peft_config[adapter_name] = config
        if self.active_adapters:
            self.set_adapter(self.active_adapters)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters active (and the only trainable ones, unless inference mode)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._require(name)
        for module in self._wrappers():
            module.active_adapters = names
        self.active_adapters = names
        config = self.peft_config[names[0]]
        if config.inference_mode:
            self.base_model.model.requires_grad_(False)
        else:
            mark_trainable(self.base_model.model, names, config.bias)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer; a merged adapter must be unmerged first."""
        self._require(adapter_name)
        if any(adapter_name in layer.merged_adapters for layer in self._mergeable()):
            raise AdapterError(
                f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge "
                "them first. (lorakit: call unmerge_adapter(), then delete_adapter().)"
            )
        for module in self._wrappers():
            if isinstance(module, (LoraLayer, LoraParams, TrainableTokens)):
                module.delete_adapter(adapter_name)
            elif adapter_name in module.modules_to_save:
                del module.modules_to_save[adapter_name]
                module.active_adapters = [a for a in module.active_adapters if a != adapter_name]
        del self.peft_config[adapter_name]
        remaining = [a for a in self.active_adapters if a != adapter_name]
        self.active_adapters = remaining or list(self.peft_config)[:1]
        if self.active_adapters:
            self.set_adapter(self.active_adapters)

    def _require(self, name: str) -> None:
        if name not in self.peft_config:
            raise AdapterError(
                f"Adapter {name} does not exist; loaded adapters: {sorted(self.peft_config)}"
            )

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the context the model computes exactly the base model's output; on leaving,
        each layer's enabled / disabled state is what it was before."""
        wrappers = self._wrappers()
        before = [module.disable_adapters for module in wrappers]
        for module in wrappers:
            module.disable_adapters = True
        try:
            yield
        finally:
            for module, state in zip(wrappers, before, strict=True):
                module.disable_adapters = state

    def disable_adapter_layers(self) -> None:
        """Turn every adapter off until `enable_adapter_layers()` (the base model's output)."""
        for module in self._wrappers():
            module.disable_adapters = True

    def enable_adapter_layers(self) -> None:
        """Undo `disable_adapter_layers()`."""
        for module in self._wrappers():
            module.disable_adapters = False

    @property
    def targeted_module_names(self) -> list[str]:
        """Names (in the wrapped model) of the modules that carry LoRA adapters (layers and the
        modules whose parameters are adapted)."""
        layers = [name for name, _ in self.lora_layers()] + [n for n, _ in self.custom_layers()]
        return layers + [n for n, _ in self.param_layers()]

    @contextlib.contextmanager
    def mixed_adapters(
        self,
        adapter_names: list[str | None],
        packed: PackedAdapters | None = None,
        fused: FusedDecode | None = None,
    ) -> Iterator[None]:
        """Per-row adapters for one batch: row i uses adapter_names[i] (None / '__base__': none).

        `packed` (from `pack_adapters()`) makes inference batches that mix adapters cost two
        matmuls per layer instead of two per adapter; training always uses grouped rows.
        `fused` (from `fuse_for_decoding()`) computes the layers that read one input together
        in decode steps (one token per row).
        """
        for name in dict.fromkeys(adapter_names):
            if name is not None and name != BASE:
                self._require(name)
        device = next(self.base_model.model.parameters()).device
        with reading_rows(self._wrappers(), RowPlan(list(adapter_names), device, packed, fused)):
            yield

    def pack_adapters(self, adapter_names: list[str] | None = None) -> PackedAdapters:
        """Every LoRA layer's adapters side by side, for `mixed_adapters(..., packed=...)`.

        A snapshot: build it again after loading, deleting, merging or training adapters.
        """
        names = list(self.peft_config) if adapter_names is None else list(adapter_names)
        for name in names:
            self._require(name)
        with torch.no_grad():
            return PackedAdapters([m for m in self._wrappers() if isinstance(m, LoraLinear)], names)

    def fuse_for_decoding(self, packed: PackedAdapters) -> FusedDecode:
        """Fused groups of the LoRA layers reading one input, for decode steps with `packed`
        (see `lorakit.lora.fused`). A snapshot, like `pack_adapters()`."""
        return FusedDecode([m for m in self._wrappers() if isinstance(m, LoraLinear)], packed)

    # ---------------------------------------------------------------- running
    def __call__(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """Call the wrapped model; `adapter_names` gives one adapter per batch row."""
        try:
            if adapter_names is None:
                return self.base_model.model(*args, **kwargs)
            with self.mixed_adapters(adapter_names):
                return self.base_model.model(*args, **kwargs)
        finally:
            shared.clear()  # the layers' shared input is this forward's only

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's `generate`, optionally with one adapter per batch row."""
        try:
            if adapter_names is None:
                return self.base_model.model.generate(*args, **kwargs)
            with self.mixed_adapters(adapter_names):
                return self.base_model.model.generate(*args, **kwargs)
        finally:
            shared.clear()

    def get_base_model(self) -> nn.Module:
        """The wrapped model (its target layers hold LoRA wrappers)."""
        return self.base_model.model

    # ---------------------------------------------------------------- parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, counting quantized base weights at full size."""
        trainable = all_params = 0
        for param in self.parameters():
            all_params += param.numel()
            trainable += param.numel() if param.requires_grad else 0
        for module in self.base_model.model.modules():
            if is_quantized_linear(module):
                all_params += module.in_features * module.out_features
        return trainable, all_params

    # ---------------------------------------------------------------- merging
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False):
        """Merge adapters into the base weights in place (undo with `unmerge_adapter`)."""
        names = adapter_names or self.active_adapters
        layers = self._mergeable()
        if layers and all(set(names) <= set(layer.merged_adapters) for layer in layers):
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
            return
        for _, layer in self.lora_layers():
            layer.check_merge(names)  # a layer that cannot merge refuses before any is written
        untie_for_merge(self.base_model.model, list(self.lora_layers()), names)  # own copies
        replication.unshare(self.base_model.model)  # replicated layers: own weights per copy
        for layer in layers:
            layer.merge(names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Undo `merge_adapter`: the base weights return to their values before the merge."""
        for layer in self._mergeable():
            layer.unmerge()

    def merge_and_unload(
        self, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge the adapters and return the plain base model (LoRA wrappers removed)."""
        return self._unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every LoRA wrapper without merging and return the plain base model."""
        return self._unload(merge=False)

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        names = adapter_names or self.active_adapters
        if merge:
            for _, layer in self.lora_layers():
                layer.check_merge(names)
            untie_for_merge(self.base_model.model, list(self.lora_layers()), names, stacklevel=4)
            replication.unshare(self.base_model.model)
        replacements = []
        for name, module in self.base_model.model.named_modules():
            if isinstance(module, (LoraLayer, LoraParams, TrainableTokens)):
                replacements.append(
                    (name, module.unwrap(names, merge=merge, safe_merge=safe_merge))
                )
            elif isinstance(module, ModulesToSave):
                chosen = [a for a in names if a in module.modules_to_save]
                keep = module.modules_to_save[chosen[0]] if merge and chosen else None
                replacements.append((name, keep or module.original_module))
        self._wrapper_cache = None
        for name, new in replacements:
            replace_module(self.base_model.model, name, new)
        return self.base_model.model

    # ---------------------------------------------------------------- combining
    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """A new adapter combining `adapters` with `weights`; the combination types (linear,
        cat, svd, ties, dare_linear, dare_ties, magnitude_prune and their `_svd` forms) are
        described in `lorakit.lora.combine`."""
        for name in adapters:
            self._require(name)
        layers = list(self.lora_layers())
        config = combine_adapters(
            self.peft_config,
            layers,
            adapters=adapters,
            weights=weights,
            adapter_name=adapter_name,
            combination_type=combination_type,
            svd_rank=svd_rank,
            density=density,
            majority_sign_method=majority_sign_method,
        )
        mark_trainable(self.base_model.model, self.active_adapters, config.bias)
        self.peft_config[adapter_name] = config

    # ---------------------------------------------------------------- files
    def save_pretrained(
        self,
        save_directory: str | Path,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write each adapter in peft's format; adapters other than 'default' go in subfolders.

        With `path_initial_model_for_weight_conversion=` (the adapter folder saved right after a
        PiSSA / OLoRA initialisation), the adapter is written as the plain LoRA of twice the rank
        that gives the same model on the original base (see `lorakit.lora.inits`). Called as
        `Trainer` calls it (with a `state_dict=` keyword), it also writes the trainable tensors
        as `model.safetensors` (`compat.surface.TRAINER_WEIGHTS`).
        """
        if not is_main_process:
            return
        for name in selected_adapters or list(self.peft_config):
            target = Path(save_directory) if name == "default" else Path(save_directory) / name
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            config.target_modules = saved_targets(self.base_model.model, config, name)
            adapter_io.save_adapter(
                self.base_model.model,
                target,
                name,
                config,
                self.chat_template,
                kwargs.get("path_initial_model_for_weight_conversion"),
                kwargs.get("save_embedding_layers", "auto"),
            )
        if "state_dict" in kwargs:
            self._save_trainer_weights(save_directory)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        autocast_adapter_dtype: bool = True,
        **peft_kwargs: Any,
    ) -> LoraModel:
        """Attach the adapter saved in `model_id` to `model` (strictly checked first).

        As in peft, an adapter loaded for inference (`is_trainable=False`) leaves the whole
        model in eval mode, so LoRA dropout is off. `config` replaces the folder's
        adapter_config.json; `subfolder` reads `model_id/subfolder`. The adapter's tensors go
        where each base layer is, so `torch_device` / `device_map` are accepted and need nothing
        (`peft_kwargs`: see `compat.keywords`).
        """
        adapter = read_for_loading(model_id, config, "from_pretrained", peft_kwargs)
        if adapter.config.layer_replication:  # the adapter's layers exist once replicated
            replication.replicate(model, adapter.config.layer_replication)
        adapter_io.check_adapter(model, adapter)
        config = adapter.config
        config.inference_mode = not is_trainable
        lora_model = cls(model, loading_config(config), adapter_name, autocast_adapter_dtype)
        lora_model.peft_config[adapter_name].init_lora_weights = config.init_lora_weights  # kept
        adapter_io.copy_into(model, adapter.tensors, adapter_name)
        lora_model.chat_template = adapter.chat_template
        lora_model.set_adapter(adapter_name)
        if not is_trainable:
            lora_model.eval()
        return lora_model

    def load_adapter(
        self,
        model_id: str | Path,
        adapter_name: str,
        is_trainable: bool = False,
        *,
        config: LoraConfig | None = None,
        autocast_adapter_dtype: bool = True,
        **peft_kwargs: Any,
    ) -> adapter_io.LoadResult:
        """Load a saved adapter under `adapter_name`; on any error the model is unchanged.

        With `is_trainable=False` the model is put in eval mode, as peft does. Returns peft's
        load result; both key lists are empty, since the adapter was checked to fit exactly.
        `config` replaces the folder's adapter_config.json (`peft_kwargs`: `compat.keywords`).
        """
        if adapter_name in self.peft_config:
            raise AdapterError(f"an adapter named `{adapter_name}` is already loaded")
        adapter = read_for_loading(model_id, config, "load_adapter", peft_kwargs)
        wanted = adapter.config.layer_replication
        if wanted and replication.replicated_map(self.base_model.model) != wanted:
            replication.replicate(self.base_model.model, wanted, adapted=True)  # refuses
        check = adapter_io.check_adapter(self.base_model.model, adapter)
        if check.base_copies:
            raise AdapterError(
                f"{adapter.directory}: {check.base_copies[0]} replaces a base weight the loaded "
                "adapters share; load this adapter alone (LoraModel.from_pretrained)"
            )
        adapter.config.inference_mode = not is_trainable
        self.add_adapter(
            adapter_name,
            loading_config(adapter.config),
            autocast_adapter_dtype=autocast_adapter_dtype,
        )  # a loaded adapter never re-initialises (and so never changes) the base
        self.peft_config[adapter_name].init_lora_weights = adapter.config.init_lora_weights
        adapter_io.copy_into(self.base_model.model, adapter.tensors, adapter_name)
        if self.chat_template is None:
            self.chat_template = adapter.chat_template
        if not is_trainable:
            self.eval()
        return adapter_io.LoadResult([], [])


def _name_or_path(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or None


def get_peft_model(
    model: nn.Module,
    peft_config: LoraConfig,
    adapter_name: str = "default",
    *,
    autocast_adapter_dtype: bool = True,
    **peft_kwargs: Any,
) -> LoraModel:
    """Wrap `model` with a fresh adapter; the base is frozen, only the adapter trains.

    As in peft, `task_type` SEQ_CLS / TOKEN_CLS / QUESTION_ANS also trains the model's task head
    in full (`compat.surface.peft_model_config`). With a float16 / bfloat16 base the adapter is
    float32 unless `autocast_adapter_dtype=False`. `peft_kwargs`: see `compat.keywords`.
    """
    config = peft_model_config(model, peft_config, peft_kwargs)
    return LoraModel(model, config, adapter_name, autocast_adapter_dtype)
