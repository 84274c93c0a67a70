"""DeepSpeed settings derived from the ``train`` config section."""

from __future__ import annotations

from typing import Any


def deepspeed_config(train: dict[str, Any]) -> dict[str, Any]:
    """ZeRO stage, micro-batch, accumulation, clipping and precision for ``deepspeed.initialize``.

    The optimizer is passed in as a client ``torch.optim.AdamW`` rather than named here, so
    DeepSpeed never JIT-compiles FusedAdam/CPUAdam (a minute each on CPU machines).
    """
    stage = int(train["zero_stage"])
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(train["batch_size"]),
        "gradient_accumulation_steps": int(train["grad_accum"]),
        "gradient_clipping": float(train["grad_clip"]),
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": train["precision"] == "bf16"},
        "steps_per_print": 10**9,  # vcritic logs to MLflow itself
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if stage == 3:
        # Gather full weights when saving so an export holds whole tensors.
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return config
