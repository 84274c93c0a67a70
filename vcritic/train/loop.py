"""``train_loop_per_worker``: the one training loop, run by every Ray Train worker.

Everything comes from the ``config`` dict it is handed (never from driver globals):
the full vcritic config, the materialised backbone spec, the audio vocabulary size,
where the audio tokenizer lives, and the MLflow run to log into (rank 0 only).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vcritic.models.sequence import batch_from_rows


def _limits(model_cfg: dict[str, Any], data_cfg: dict[str, Any], frame_rate: float) -> dict[str, int]:
    return {
        "prompt": int(model_cfg["max_prompt_tokens"]),
        "text": int(model_cfg["max_text_tokens"]),
        "audio": int(model_cfg["max_audio_tokens"]),
        "music": int(data_cfg["max_clip_seconds"] * frame_rate) + 1,
    }


def _rows(batch) -> list[dict[str, Any]]:
    return batch.to_dict("records")


def _all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


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
    text_sum, n_text, audio_sum, n_audio = _all_reduce_sum(sums)
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
    critic.to(device)
    params = [p for p in critic.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(train_cfg["lr"]), weight_decay=float(train_cfg["weight_decay"]))
    warmup = int(train_cfg["warmup_steps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
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
    logger.log_params(trainable_summary(critic))
    limits = _limits(model_cfg, cfg["data"], float(payload["audio_frame_rate"]))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    batch_size = int(train_cfg["batch_size"])
    lam = float(model_cfg["loss_lambda"])
    max_steps = train_cfg.get("max_steps_per_epoch")

    for epoch in range(start_epoch, int(train_cfg["epochs"])):
        window = [0.0] * 6  # loss, text, audio, micro-batches, tokens, examples (since last log)
        window_start = time.perf_counter()
        epoch_steps = 0
        for batch in train_shard.iter_batches(batch_size=batch_size, batch_format="pandas"):
            rows = _rows(batch)
            tensors = {k: v.to(device) for k, v in batch_from_rows(rows, critic.vocab, limits).items()}
            out = engine(**tensors)
            engine.backward(out.loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            window = [w + x for w, x in zip(window, [float(out.loss), float(out.text_loss), float(out.audio_loss), 1,
                                                     int(tensors["attention_mask"].sum()), len(rows)], strict=True)]
            if not boundary:
                continue
            step += 1
            epoch_steps += 1
            if step % int(train_cfg["log_every_steps"]) == 0:
                loss, text, audio, n, tokens, examples = _all_reduce_sum(window)
                seconds = time.perf_counter() - window_start
                logger.log_metrics({
                    "train_loss": loss / n, "train_text_loss": text / n, "train_audio_loss": audio / n,
                    "tokens_per_s": tokens / seconds, "examples_per_s": examples / seconds,
                    "lr": scheduler.get_last_lr()[0], "epoch": epoch,
                }, step)
                window, window_start = [0.0] * 6, time.perf_counter()
            if max_steps is not None and epoch_steps >= int(max_steps):
                break
        metrics = evaluate_loss(engine, val_shard, critic.vocab, limits, batch_size, device, lam)
        metrics.update({"epoch": epoch, "global_step": step})
        logger.log_metrics({k: v for k, v in metrics.items() if k.startswith("val_")}, step)
        with tempfile.TemporaryDirectory(prefix="vcritic-ckpt-") as tmp:
            _save_checkpoint(engine, critic, tokenizer, payload, epoch, step, Path(tmp))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
