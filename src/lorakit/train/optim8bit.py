"""`AdamW8bit`: AdamW with both moments stored in 8 bits, from bitsandbytes.

bitsandbytes quantizes each moment block-wise: blocks of 256 values share one fp32 scale (the
block's largest magnitude), and each value is one byte indexing a 256-entry dynamic code (a
signed one for the first moment, an unsigned one for the second). A step dequantizes both
moments to fp32, applies the AdamW update (decoupled weight decay, bias correction, as
`torch.optim.AdamW`), and quantizes them again. That is 2 bytes per value plus 8 bytes per 256
values, against fp32 AdamW's 8 bytes per value.

bitsandbytes keeps fp32 moments for tensors under `min_8bit_size` values (4096 by default
there). LoRA's matrices are mostly that small (a 576 × 8 matrix is 4608 values, 192 × 8 only
1536), so lorakit's default quantizes every tensor; pass min_8bit_size=4096 for bitsandbytes'
behaviour. It runs on CPU and CUDA.
"""

from __future__ import annotations

import logging
from typing import Any

from lorakit.errors import ConfigError

_bnb_log = logging.getLogger("bitsandbytes")
_previous = _bnb_log.level
_bnb_log.setLevel(logging.ERROR)  # its import notes optional CPU kernels that are not installed
try:
    import bitsandbytes as bnb
except ImportError as err:
    raise ConfigError(
        "the 8-bit AdamW optimizer (train.optimizer: adamw_8bit) needs bitsandbytes; install it "
        "with `pip install 'lorakit[optim8bit]'` (bitsandbytes==0.50.2), or use "
        "train.optimizer: adamw"
    ) from err
finally:
    _bnb_log.setLevel(_previous)

_NESTED = bnb.optim.optimizer.Optimizer8bit._FSDP_WRAPPED_QUANT_STATE_KEY


class AdamW8bit(bnb.optim.AdamW8bit):
    """AdamW (a `torch.optim.Optimizer`) whose moments are 8-bit, block-wise quantized."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: int = 0,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            min_8bit_size=min_8bit_size,
        )

    def state_dict(self) -> dict[str, Any]:
        """bitsandbytes' state dict with the quantization tensors (codes, scales, code maps)
        next to the other entries of each parameter, so every value is a tensor or a number
        (bitsandbytes nests them one level down for FSDP)."""
        saved = super().state_dict()
        for state in saved["state"].values():
            state.update(state.pop(_NESTED, {}))
        return saved

    def load_state_dict(self, state_dict: dict[str, Any], move_to_device: bool = True) -> None:
        """Load a state dict in either form; quantization tensors keep their dtype."""
        nested = {"state": {}, "param_groups": state_dict["param_groups"]}
        for index, state in state_dict["state"].items():
            plain = {k: v for k, v in state.items() if k not in self.non_castable_tensor_keys}
            quant = {k: v for k, v in state.items() if k in self.non_castable_tensor_keys}
            if quant:
                plain[_NESTED] = {**plain.get(_NESTED, {}), **quant}
            nested["state"][index] = plain
        super().load_state_dict(nested, move_to_device=move_to_device)
