"""``train_loop_per_worker``: the one training loop, run by every Ray Train worker.

Everything comes from the ``config`` dict it is handed (never from driver globals):
the full vcritic config, the materialised backbone spec, the audio vocabulary size,
where the audio tokenizer lives, and the MLflow run to log into (rank 0 only).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from vcritic.models.sequence import batch_from_rows, collate, row_streams

T = TypeVar("T")


def _limits(model_cfg: dict[str, Any], data_cfg: dict[str, Any], frame_rate: float) -> dict[str, int]:
    return {
        "prompt": int(model_cfg["max_prompt_tokens"]),
        "text": int(model_cfg["max_text_tokens"]),
        "audio": int(model_cfg["max_audio_tokens"]),
        "music": int(data_cfg["max_clip_seconds"] * frame_rate) + 1,
    }


def _rows(batch) -> list[dict[str, Any]]:
    return batch.to_dict("records")


def _all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum ``values`` over all ranks. The tensor lives on the training ``device``: under NCCL
    (Ray Train on GPUs) the process group has no CPU backend, so a CPU tensor would fail."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


# --- learning-rate schedule -------------------------------------------------------------------


def total_optimizer_steps(train_rows: int, batch_size: int, grad_accum: int, num_workers: int, epochs: int,
                          max_steps_per_epoch: int | None = None, buffer_rows: int | None = None) -> int:
    """Optimizer steps of a whole run, as the loop takes them.

    Each worker gets ``train_rows // num_workers`` rows an epoch (Ray Train splits the dataset
    equally), read in shuffle buffers of ``buffer_rows`` rows, each cut into micro-batches of
    ``batch_size``; DeepSpeed steps every ``grad_accum`` micro-batches, counting across epochs.
    """
    rows = int(train_rows) // max(int(num_workers), 1)
    buffer = int(buffer_rows) if buffer_rows else max(rows, 1)
    full, rest = divmod(rows, buffer)
    micro = full * math.ceil(buffer / batch_size) + math.ceil(rest / batch_size)
    if max_steps_per_epoch is None:
        total = (micro * int(epochs)) // int(grad_accum)
    else:
        total = int(epochs) * min(int(max_steps_per_epoch), micro // int(grad_accum))
    return max(total, 1)


def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine", min_ratio: float = 0.0) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of the peak.

    Linear warmup over ``warmup`` steps (step ``warmup - 1`` is at the peak), then ``constant``
    or ``cosine`` decay that reaches ``min_ratio`` at the last step (``total - 1``) and stays there.
    """
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r} (cosine | constant)")
    progress = min(1.0, (step - warmup + 1) / max(total - warmup, 1))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- epoch order: seeded shuffle, length-grouped batches ------------------------------------


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A shuffle seed per (run seed, epoch, rank): a new order every epoch, the same on a rerun."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1)[0])


def plan_batches(lengths: Sequence[int], batch_size: int, group_by_length: bool,
                 rng: np.random.Generator) -> list[list[int]]:
    """Indices of one buffer's rows, cut into micro-batches.

    Rows are shuffled; with ``group_by_length`` they are then sorted by length (ties keep the
    random order) so each batch holds rows of similar length, and the batches are shuffled so
    an epoch does not run from short to long.
    """
    order = [int(i) for i in rng.permutation(len(lengths))]
    if group_by_length:
        order.sort(key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[int(i)] for i in rng.permutation(len(batches))]
    return batches


def padding_counts(batch_lengths: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(padded positions, all positions) of right-padded batches with these row lengths."""
    padded = total = 0
    for lengths in batch_lengths:
        if len(lengths):
            positions = len(lengths) * max(lengths)
            padded, total = padded + positions - sum(lengths), total + positions
    return padded, total


def padding_fraction(batch_lengths: Sequence[Sequence[int]]) -> float:
    """Padded positions / all positions over these batches (0 for no batches)."""
    padded, total = padding_counts(batch_lengths)
    return padded / total if total else 0.0


def epoch_groups(shard, batch_size: int, buffer_rows: int, group_by_length: bool, seed: int,
                 prepare: Callable[[dict[str, Any]], T], length: Callable[[T], int] = len) -> Iterator[list[T]]:
    """One epoch of a Ray Data shard as micro-batches of prepared rows.

    Ray Data's local shuffle (seeded with ``seed``) draws ``buffer_rows`` rows at a time; each
    buffer's rows are ``prepare``-d and cut by :func:`plan_batches`. Every buffer yields
    ``ceil(len(buffer) / batch_size)`` batches, so ranks with equal shards take equal steps.
    """
    rng = np.random.default_rng(seed)
    for chunk in shard.iter_batches(batch_size=buffer_rows, batch_format="pandas",
                                    local_shuffle_buffer_size=buffer_rows, local_shuffle_seed=seed):
        items = [prepare(r) for r in _rows(chunk)]
        for idx in plan_batches([length(x) for x in items], batch_size, group_by_length, rng):
            yield [items[i] for i in idx]


def enable_gradient_checkpointing(critic) -> None:
    """Recompute the trunk's decoder activations in backward (Hugging Face checkpointing).

    Non-reentrant checkpointing gives LoRA weights their gradients even though the frozen
    embeddings' outputs do not require grad (no ``enable_input_require_grads`` needed).
    """
    trunk = critic.trunk
    kwargs = {"use_reentrant": False}
    if hasattr(trunk, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        trunk.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        trunk.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base = trunk.get_base_model() if hasattr(trunk, "get_base_model") else trunk
    if getattr(base, "config", None) is not None:
        base.config.use_cache = False


def evaluate_loss(engine, shard, vocab, limits, batch_size: int, device, loss_lambda: float) -> dict[str, float]:
    """Token-weighted text and audio CE over the whole validation set (summed across ranks)."""
    engine.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # text CE·n, n_text, audio CE·n, n_audio
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="pandas"):
            tensors = {k: v.to(device) for k, v in batch_from_rows(_rows(batch), vocab, limits).items()}
            out = engine(**tensors)
            sums[0] += float(out.text_loss) * int(out.text_tokens)
            sums[1] += int(out.text_tokens)
            sums[2] += float(out.audio_loss) * int(out.audio_tokens)
            sums[3] += int(out.audio_tokens)
    engine.train()
    text_sum, n_text, audio_sum, n_audio = _all_reduce_sum(sums, device)
    text = text_sum / max(n_text, 1)
    audio = audio_sum / max(n_audio, 1)
    total = text if loss_lambda >= 1.0 else loss_lambda * text + (1 - loss_lambda) * audio
    return {"val_loss": total, "val_text_loss": text, "val_audio_loss": audio}


def _save_checkpoint(engine, critic, tokenizer, payload: dict[str, Any], epoch: int, step: int, directory: Path) -> None:
    """Every rank writes its DeepSpeed shard; rank 0 also writes a self-contained export."""
    import ray.train

    from vcritic.models.build import save_export

    engine.save_checkpoint(str(directory), tag="deepspeed", client_state={"epoch": epoch, "global_step": step})
    stage = int(payload["cfg"]["train"]["zero_stage"])
    gather = None
    if stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(critic.parameters()), modifier_rank=None)
        gather.__enter__()
    try:
        if ray.train.get_context().get_world_rank() == 0:
            save_export(
                critic,
                tokenizer,
                payload["backbone_spec"],
                payload["cfg"]["model"]["audio_tokenizer"],
                payload["audio_tokenizer_dir"],
                payload["cfg"]["model"],
                directory / "export",
            )
    finally:
        if gather is not None:
            gather.__exit__(None, None, None)


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    from vcritic.models.build import build_critic, trainable_summary
    from vcritic.tracking import RankZeroLogger
    from vcritic.train.ds_config import deepspeed_config

    cfg = payload["cfg"]
    train_cfg, model_cfg = cfg["train"], cfg["model"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(int(cfg["run"]["seed"]))
    if not train_cfg["cpu_shm_comm"]:
        # Skip DeepSpeed's shared-memory all-reduce op: it compiles C++ on first use.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    device = _device(bool(train_cfg["use_gpu"]))

    critic, tokenizer = build_critic(payload["backbone_spec"], model_cfg, int(payload["audio_codes"]),
                                     int(payload["audio_feature_dim"]), num_codebooks=int(payload["audio_num_codebooks"]))
    if train_cfg["precision"] == "fp32":
        critic.float()  # a bf16-loaded backbone trains in fp32 when asked; bf16 runs are cast by DeepSpeed
    if train_cfg.get("gradient_checkpointing"):
        enable_gradient_checkpointing(critic)
    critic.to(device)
    params = [p for p in critic.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(train_cfg["lr"]), weight_decay=float(train_cfg["weight_decay"]))
    batch_size = int(train_cfg["batch_size"])
    buffer_rows = int(train_cfg.get("shuffle_buffer_rows") or 256)
    total_steps = total_optimizer_steps(
        int(payload.get("train_rows") or 0), batch_size, int(train_cfg["grad_accum"]), ctx.get_world_size(),
        int(train_cfg["epochs"]), train_cfg.get("max_steps_per_epoch"), buffer_rows)
    schedule = str(train_cfg.get("lr_schedule", "cosine")) if payload.get("train_rows") else "constant"
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup=int(train_cfg["warmup_steps"]), total=total_steps, schedule=schedule,
        min_ratio=float(train_cfg.get("min_lr_ratio", 0.0))))
    engine, _, _, _ = deepspeed.initialize(
        model=critic, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(train_cfg)
    )

    start_epoch, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    resume_dir = None
    if checkpoint is not None:
        resume_dir = checkpoint.to_directory()
    elif train_cfg.get("resume_from"):
        resume_dir = train_cfg["resume_from"]
    if resume_dir is not None:
        _, client = engine.load_checkpoint(str(resume_dir), tag="deepspeed")
        if client is None:
            raise RuntimeError(f"checkpoint {resume_dir} has no DeepSpeed state for rank {rank}; was it written with the same number of workers?")
        start_epoch, step = int(client["epoch"]) + 1, int(client["global_step"])

    logger = RankZeroLogger(payload["mlflow"], enabled=(rank == 0))
    logger.log_params({**trainable_summary(critic), "train_device": str(device),
                       "train_dist_backend": dist.get_backend() if dist.is_initialized() else "none",
                       "train_param_dtype": str(next(engine.module.parameters()).dtype).replace("torch.", ""),
                       "train_total_steps": total_steps})
    limits = _limits(model_cfg, cfg["data"], float(payload["audio_frame_rate"]))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    lam = float(model_cfg["loss_lambda"])
    max_steps = train_cfg.get("max_steps_per_epoch")
    group = bool(train_cfg.get("group_by_length", True))
    prepare = partial(row_streams, vocab=critic.vocab, limits=limits)

    for epoch in range(start_epoch, int(train_cfg["epochs"])):
        # loss, text, audio, micro-batches, tokens, examples, padded positions (since last log)
        window = [0.0] * 7
        window_start = time.perf_counter()
        epoch_steps = 0
        seed = epoch_seed(int(cfg["run"]["seed"]), epoch, rank)
        for streams in epoch_groups(train_shard, batch_size, buffer_rows, group, seed, prepare):
            tensors = {k: v.to(device) for k, v in collate(streams, critic.vocab).items()}
            out = engine(**tensors)
            engine.backward(out.loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            mask = tensors["attention_mask"]
            window = [w + x for w, x in zip(window, [float(out.loss), float(out.text_loss), float(out.audio_loss), 1,
                                                     int(mask.sum()), len(streams), mask.numel() - int(mask.sum())],
                                            strict=True)]
            if not boundary:
                continue
            step += 1
            epoch_steps += 1
            if step % int(train_cfg["log_every_steps"]) == 0:
                loss, text, audio, n, tokens, examples, padded = _all_reduce_sum(window, device)
                seconds = time.perf_counter() - window_start
                logger.log_metrics({
                    "train_loss": loss / n, "train_text_loss": text / n, "train_audio_loss": audio / n,
                    "tokens_per_s": tokens / seconds, "examples_per_s": examples / seconds,
                    "padding_fraction": padded / max(tokens + padded, 1.0),
                    "lr": scheduler.get_last_lr()[0], "epoch": epoch,
                }, step)
                window, window_start = [0.0] * 7, time.perf_counter()
            if max_steps is not None and epoch_steps >= int(max_steps):
                break
        metrics = evaluate_loss(engine, val_shard, critic.vocab, limits, batch_size, device, lam)
        metrics.update({"epoch": epoch, "global_step": step})
        logger.log_metrics({k: v for k, v in metrics.items() if k.startswith("val_")}, step)
        with tempfile.TemporaryDirectory(prefix="vcritic-ckpt-") as tmp:
            _save_checkpoint(engine, critic, tokenizer, payload, epoch, step, Path(tmp))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
