"""Initialisations that read the base weight W (out × in) and change it: PiSSA, OLoRA, LoftQ.

With s = scaling and r the rank:

* PiSSA: W = U S V^T (full SVD, or `torch.svd_lowrank` with N power iterations for
  "pissa_niter_N"); with S_r the top r singular values divided by s,
  A = sqrt(S_r) V_r^T, B = U_r sqrt(S_r), and the base keeps the residual W - s * B @ A.
* OLoRA: W = Q R (reduced QR); A = R[:r], B = Q[:, :r]; the base keeps W - s * B @ A.
* LoftQ (`loftq_config={"loftq_bits": 4 | 8, "loftq_iter": T}`): T rounds of
  Q = quantize(W - B @ A) (lorakit's NF4 without double quantization, or int8 rows), then
  B @ A = the best rank-r approximation of W - dequantize(Q) (B = U_r sqrt(S_r),
  A = sqrt(S_r) V_r^T; as in peft, not divided by s). The base becomes dequantize(Q), a weight
  the same quantizer stores exactly, so the base can be quantized afterwards without loss.

The base and the adapter together compute W at the start (up to the quantization error with LoftQ,
which is what B @ A reduces). An adapter trained from a PiSSA / OLoRA start belongs to the residual
base; `converted_to_lora` rewrites it as a plain LoRA of twice the rank for the original W:
s * B @ A - s * B0 @ A0 = s * [B | -B0] @ [A ; A0] (peft's conversion, same file format).
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from lorakit.errors import AdapterError, ConfigError

MUTATING = ("pissa", "olora", "loftq")
LOFTQ_BITS = (4, 8)


def is_mutating(init: bool | str) -> bool:
    """Whether `init_lora_weights` changes the base weight (PiSSA, OLoRA, LoftQ)."""
    return isinstance(init, str) and (init == "olora" or init == "loftq" or is_pissa(init))


def is_pissa(init: bool | str) -> bool:
    """'pissa' or 'pissa_niter_N' with N >= 1 an integer."""
    return isinstance(init, str) and re.fullmatch(r"pissa(_niter_[1-9][0-9]*)?", init) is not None


@torch.no_grad()
def initialise(layer: nn.Module, name: str, init: str, loftq_config: dict | None) -> None:
    """Set adapter `name`'s A and B from the base weight and write the changed base back."""
    if layer.kind == "embedding":
        raise ConfigError(
            f"init_lora_weights={init!r} on an embedding layer is not supported by lorakit; "
            "exclude the embedding from target_modules or use init_lora_weights=True"
        )
    if init != "olora" and not _float_base(layer):
        raise ConfigError(
            f"init_lora_weights={init!r} on a quantized base layer is not supported by lorakit: "
            "initialise on the full-precision model, then quantize the changed base (for LoftQ: "
            "with the method loftq_bits names, nf4 without double quantization or int8)"
        )
    weight = layer.dense_weight().float()  # (out, in)
    r, scaling = layer.r[name], layer.scaling[name]
    if is_pissa(init):
        a, b = _pissa(weight, r, scaling, init)
        residual = weight - scaling * b @ a
    elif init == "olora":
        q, upper = torch.linalg.qr(weight)
        a, b = upper[:r], q[:, :r]
        residual = weight - scaling * b @ a
    else:
        loftq_config = loftq_config or {}
        bits, iters = loftq_config.get("loftq_bits", 4), loftq_config.get("loftq_iter", 1)
        residual, a, b = _loftq(weight, r, bits, iters)
    a_param, b_param = layer.lora_weights(name)
    a_param.copy_(a.contiguous())
    b_param.copy_(b.contiguous())
    layer.set_dense_weight(residual)


def _float_base(layer: nn.Module) -> bool:
    weight = getattr(layer.base_layer, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.is_floating_point()


def _pissa(weight: torch.Tensor, r: int, scaling: float, init: str):
    """(A (r, in), B (out, r)) of PiSSA: the top-r singular triplets, split as sqrt(S / s)."""
    if init == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(weight, r, niter=int(init.rsplit("_", 1)[1]))
        vh = v.t()
    root = torch.sqrt(s / scaling)
    return root[:, None] * vh, u * root[None, :]


def _loftq(weight: torch.Tensor, r: int, bits: int, iters: int):
    """(dequantize(Q), A, B) after `iters` rounds of LoftQ's alternating minimisation."""
    from lorakit.quant import codes

    residual = weight
    for step in range(iters):
        if bits == 4:
            packed, absmax = codes.quantize_4bit(residual, "nf4")
            flat = codes.dequantize_4bit(packed, absmax, "nf4", weight.numel(), torch.float32)
            dequantized = flat.view(weight.shape)
        else:
            q, absmax = codes.quantize_int8_rows(residual)
            dequantized = codes.dequantize_int8_rows(q, absmax, torch.float32)
        u, s, vh = torch.linalg.svd(weight - dequantized, full_matrices=False)
        root = torch.sqrt(s[:r])
        b, a = u[:, :r] * root[None, :], root[:, None] * vh[:r]
        if step + 1 < iters:
            residual = weight - b @ a
    return dequantized, a, b


def check_loftq_config(init: bool | str, loftq_config: dict) -> str | None:
    """What is wrong with `loftq_config` for `init` (None when it is fine)."""
    if init != "loftq":
        return None
    if not loftq_config:
        return "init_lora_weights='loftq' needs loftq_config={'loftq_bits': 4, 'loftq_iter': 1}"
    unknown = set(loftq_config) - {"loftq_bits", "loftq_iter"}
    if unknown:
        return f"loftq_config has unknown keys {sorted(unknown)}; allowed: loftq_bits, loftq_iter"
    bits, iters = loftq_config.get("loftq_bits", 4), loftq_config.get("loftq_iter", 1)
    if bits not in LOFTQ_BITS:
        return f"loftq_config['loftq_bits']={bits!r}; expected 4 (NF4) or 8 (int8)"
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        return f"loftq_config['loftq_iter']={iters!r}; expected an integer >= 1"
    return None


def loading_config(config):
    """The config to build an adapter that saved tensors will fill. As in peft, a PiSSA / OLoRA
    adapter saved as it is (not converted) is loaded onto the *original* base: its init runs
    again, turning the base into the same residual it was trained on (PiSSA's SVD and OLoRA's QR
    are deterministic; `pissa_niter_N` is randomised, so convert such adapters when saving).
    LoftQ is not run again: its adapter is loaded onto the base it was saved with."""
    if config.init_lora_weights != "loftq":
        return config
    config = copy.deepcopy(config)
    config.init_lora_weights = True
    return config


# ----------------------------------------------------------------- conversion at save time


def converted_to_lora(tensors: dict[str, torch.Tensor], config, initial: dict[str, torch.Tensor]):
    """(tensors, config) of the plain LoRA equal to a PiSSA / OLoRA adapter on the original base.

    `initial` holds the adapter's tensors as they were right after initialisation (the file
    saved then), under the same keys.
    """
    if getattr(config, "use_dora", False):
        raise AdapterError(
            "converting a DoRA adapter with path_initial_model_for_weight_conversion is not "
            "supported by lorakit (the magnitude depends on the changed base); save it as it is"
        )
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise AdapterError(
            "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` with "
            "use_rslora and rank_pattern / alpha_pattern is not supported by lorakit (the doubled "
            "rank would change each pattern's scaling); save the adapter as it is"
        )
    out = {}
    for key, tensor in tensors.items():
        if key.endswith((".lora_A.weight", ".lora_B.weight")) and key not in initial:
            raise AdapterError(
                f"the initial adapter lacks {key}; path_initial_model_for_weight_conversion must "
                "name the adapter saved right after initialisation, for this model"
            )
        if key.endswith(".lora_A.weight"):
            out[key] = torch.cat([tensor, initial[key].to(tensor.dtype)], dim=0)
        elif key.endswith(".lora_B.weight"):
            out[key] = torch.cat([tensor, -initial[key].to(tensor.dtype)], dim=1)
        else:
            out[key] = tensor
    config = copy.deepcopy(config)
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha *= 2**0.5 if config.use_rslora else 2
    config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    config.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return out, config
