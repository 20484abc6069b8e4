"""The training loop's settings (`TrainConfig`): optimizer, schedule, precision, evaluation,
checkpoints and logging, as typed data with one description per field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PreferenceSettings(BaseModel):
    """Preference tuning's settings, with TRL's names (`DPOConfig`, `ORPOConfig`, `CPOConfig`)."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(
        0.1,
        gt=0,
        description="dpo: how far the policy may move from the reference (the KL weight); orpo: "
        "weight of the odds-ratio term; simpo: the reward scale.",
    )
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid",
        description="dpo only: sigmoid (DPO) or ipo (IPO, squared loss on the per-token mean "
        "log-ratio margin).",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="dpo sigmoid / simpo: the share of pairs assumed mislabelled (conservative "
        "DPO); 0: off.",
    )
    simpo_gamma: float = Field(
        0.5, ge=0, description="simpo only: the target reward margin gamma (as beta * margin)."
    )
    cpo_alpha: float = Field(
        0.0, ge=0, description="simpo only: weight of the NLL of the chosen responses; 0: none."
    )


class PreferenceConfig(PreferenceSettings):
    """Preference tuning in the loop: the method and its settings."""

    method: Literal["dpo", "orpo", "simpo"] = Field(
        "dpo",
        description="dpo: against the reference (the model with its adapter off); orpo: odds "
        "ratio + NLL, no reference; simpo: length-normalised margin, no reference.",
    )


class TrainConfig(BaseModel):
    """How to train: optimizer, schedule, precision, evaluation, checkpoints, logging."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, description="Seed for Python, NumPy, torch and the data order.")
    batch_size: int = Field(
        8, ge=1, description="Rows per micro-batch of a tokenized dataset, over all processes."
    )
    epochs: int = Field(
        1, ge=1, description="Passes over the training data (ignored with max_steps)."
    )
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps to run; overrides epochs."
    )
    grad_accum_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step, summed over all processes."
    )
    shuffle: bool = Field(True, description="Shuffle the batch order each epoch (seeded).")
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw",
        description="adamw: fp32 moments; adamw_8bit: both moments in 8 bits, block-wise "
        "(bitsandbytes; about 0.25x the state memory).",
    )
    lr: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    lora_b_lr: float | None = Field(
        None,
        gt=0,
        description="LoRA+: learning rate of the lora_B matrices and every 1-D trainable tensor "
        "(biases, norms, DoRA magnitudes), peft's LoRA+ rule; embedding adapters and the rest "
        "stay at lr. None: lr.",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not on biases/norms).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (wins over warmup_ratio).")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Warmup as a fraction of all steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a fraction of lr.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm; None: off.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="fp32, bf16/fp16 autocast (fp16: loss scaling, CUDA only); auto: fastest.",
    )
    base_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Storage of frozen weights; auto: bf16 when precision is bf16."
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="Compile the decoder blocks' training forward and backward with "
        "torch.compile (inductor; dynamic shapes, compiled once per run, the time in the log); "
        "auto: on CUDA only (on a CPU the compiled step measured slower than the eager one).",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute decoder activations in backward to save memory."
    )
    loss_chunk_size: int = Field(1024, ge=1, description="Supervised tokens per chunk of the loss.")
    device: str = Field("auto", description="auto, cpu or cuda (torchrun: this rank's GPU).")
    eval_every: int | None = Field(
        None, ge=1, description="Evaluate every N steps (and at the end); None: at the end only."
    )
    eval_max_batches: int | None = Field(None, ge=1, description="Cap on eval batches; None: all.")
    eval_prompts: list[str] = Field(
        default_factory=list,
        description="Prompts answered greedily before training, every eval_every steps and at "
        "the end (with or without eval data): samples.jsonl and the console.",
    )
    eval_max_new_tokens: int = Field(64, ge=1, description="Tokens generated per sample prompt.")
    save_every: int | None = Field(
        None, ge=1, description="Checkpoint every N steps (and at the end); None: at the end only."
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many newest checkpoints to keep.")
    log_every: int = Field(1, ge=1, description="Print a progress line every N steps.")
    progress: Literal["auto", "rich", "plain", "none"] = Field(
        "auto", description="Progress display; auto: rich on a terminal, plain lines otherwise."
    )
    tensorboard: bool = Field(True, description="Write TensorBoard events when it is installed.")
    plots: bool = Field(True, description="Write plots/loss.png and plots/lr.png at the end.")
    preference: PreferenceConfig | None = Field(
        None,
        description="Preference tuning (pairs of chosen / rejected answers); None: supervised. "
        "A run config sets it from `method` and its `preference` section.",
    )
    # -- distributed (torchrun) --
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: ddp (model replicated, gradients summed) "
        "or fsdp (base sharded).",
    )
    fsdp_cpu_offload: bool = Field(
        False, description="fsdp only: keep sharded parameters in CPU memory between uses."
    )
