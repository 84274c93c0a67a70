"""The driver: one readable path from config to a registered critic.

``run(cfg)`` = connect Ray → prepare data (Ray Data) → score the untrained critic →
train (Ray Train + DeepSpeed) → pick the checkpoint with the lowest validation loss →
score it → log and register it in MLflow. Heavy imports stay inside functions so the
driver starts fast and workers import only what they use.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import ray

from vcritic.config import flatten, to_dict
from vcritic.data.pipeline import PreparedData, prepare
from vcritic.tracking import log_critic, register, tracking_uri

log = logging.getLogger(__name__)

# Set for the driver and every Ray worker: no hub access, quiet and predictable threading.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


@dataclass
class RunSummary:
    run_id: str
    tracking_uri: str
    experiment: str
    prepared: PreparedData
    best_checkpoint: str
    best_val_loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    model_uri: str | None = None
    registered_version: int | None = None
    promoted: bool | None = None
    """Whether the registered version took ``mlflow.alias`` (None: nothing was registered)."""
    promote_reason: str | None = None
    """Why it did or did not, e.g. "registered version 3 without 'champion': best_val_loss ..."."""
    scq_skipped_reason: str | None = None
    """Why SCQ accuracy was not measured (None: it was); also the MLflow tag ``scq_skipped_reason``."""


def connect_ray(cfg) -> None:
    """Join ``ray.address`` or ``$RAY_ADDRESS`` (set by ``ray job submit``), else start a local Ray."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local" always starts a new instance; a bare ray.init() would attach to any Ray
        # already running on this machine.
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": WORKER_ENV})


@dataclass
class ScqPlan:
    """The SCQ evaluation a run can do: the held-out rows and bank it uses, or why it is skipped."""

    rows: list[dict[str, Any]]
    bank: list[dict[str, Any]]
    questions: int = 0
    skipped_reason: str | None = None


def scq_plan(cfg, val_dir: str) -> ScqPlan:
    """Decide whether SCQ runs: only when some of the first ``eval.scq_max_clips`` held-out rows
    state (in ``facts``) a fact the question bank asks about. A user's own manifest usually has no
    facts, so SCQ is then skipped with a reason instead of failing the job."""
    from vcritic.evaluate.scq import load_bank, make_questions

    if not cfg.eval.scq:
        return ScqPlan([], [], skipped_reason="eval.scq=false")
    bank = load_bank(cfg.eval.scq_bank)
    shards = Path(val_dir)
    has_rows = shards.is_dir() and any(shards.glob("*.parquet"))
    rows = pd.read_parquet(val_dir).head(int(cfg.eval.scq_max_clips)).to_dict("records") if has_rows else []
    if not rows:
        return ScqPlan([], bank, skipped_reason="no held-out (val) rows to ask questions about")
    try:
        questions = make_questions(rows, bank)
    except ValueError as exc:
        return ScqPlan(rows, bank, skipped_reason=f"question bank {cfg.eval.scq_bank!r} does not fit the data: {exc}")
    if not questions:
        facts = ", ".join(sorted({str(e["fact"]) for e in bank}))
        with_facts = sum(bool(r.get("facts")) and r.get("facts") != "{}" for r in rows)
        return ScqPlan(rows, bank, skipped_reason=(
            f"no question source: none of {len(rows)} held-out rows states a fact the question bank "
            f"{cfg.eval.scq_bank!r} asks about ({facts}); {with_facts} of them have any facts"))
    return ScqPlan(rows, bank, len(questions))


def _scq(critic, plan: ScqPlan) -> dict[str, float]:
    from vcritic.evaluate.scq import scq_accuracy

    return scq_accuracy(critic, plan.rows, plan.bank)


def _untrained_critic(cfg, prepared: PreparedData):
    """The critic as training starts (same seed as the workers): the 'before' baseline."""
    import torch

    from vcritic.critic import Critic
    from vcritic.models.build import build_critic, load_audio_tokenizer

    torch.manual_seed(int(cfg.run.seed))
    model, tokenizer = build_critic(prepared.backbone_spec, to_dict(cfg.model), prepared.audio_codes,
                                   prepared.audio_feature_dim, num_codebooks=prepared.audio_num_codebooks)
    audio_tok = load_audio_tokenizer(prepared.audio_tokenizer_spec, prepared.audio_tokenizer_dir)
    return Critic(model, tokenizer, audio_tok, {"model": to_dict(cfg.model)})


def _trainer(cfg, prepared: PreparedData, mlflow_target: dict[str, str]):
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from vcritic.train.loop import train_loop_per_worker

    t = cfg.train
    resources = {"CPU": float(t.cpus_per_worker)}
    if t.use_gpu:
        resources["GPU"] = float(t.gpus_per_worker)
    payload: dict[str, Any] = {
        "cfg": to_dict(cfg),
        "backbone_spec": prepared.backbone_spec,
        "audio_codes": prepared.audio_codes,
        "audio_feature_dim": prepared.audio_feature_dim,
        "audio_num_codebooks": prepared.audio_num_codebooks,
        "audio_frame_rate": prepared.audio_frame_rate,
        "audio_tokenizer_dir": prepared.audio_tokenizer_dir,
        "train_rows": int(prepared.counts.get("train", 0)),  # sizes the learning-rate schedule
        "mlflow": mlflow_target,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload,
        scaling_config=ScalingConfig(num_workers=int(t.num_workers), use_gpu=bool(t.use_gpu), resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=str(Path(cfg.run.output_dir).resolve() / "ray_results"),
            checkpoint_config=CheckpointConfig(
                num_to_keep=int(t.checkpoints_to_keep), checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
            ),
            worker_runtime_env={"env_vars": WORKER_ENV},
        ),
        datasets={"train": ray.data.read_parquet(prepared.train_dir), "val": ray.data.read_parquet(prepared.val_dir)},
    )


def run(cfg) -> RunSummary:
    """Run the whole job described by ``cfg``; returns where everything went."""
    from vcritic.critic import Critic

    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    connect_ray(cfg)
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.mlflow.experiment)
    with mlflow.start_run(run_name=cfg.run.name) as active:
        run_id = active.info.run_id
        mlflow.log_params(flatten(cfg))
        prepared = prepare(cfg)
        mlflow.log_metrics({f"data_{k}": float(v) for k, v in prepared.counts.items()})
        mlflow.log_artifact(prepared.quarantine_path, "data")
        mlflow.log_artifact(prepared.duplicates_path, "data")
        log.info("data: %s", prepared.counts)

        metrics: dict[str, float] = {}
        plan = scq_plan(cfg, prepared.val_dir)
        if plan.skipped_reason:
            log.warning("SCQ skipped: %s", plan.skipped_reason)
            mlflow.set_tag("scq_skipped_reason", plan.skipped_reason)
        else:
            before = _scq(_untrained_critic(cfg, prepared), plan)
            metrics.update({f"{k}_before": v for k, v in before.items()})
            mlflow.log_metrics({f"{k}_before": v for k, v in before.items()})

        result = _trainer(cfg, prepared, {"tracking_uri": uri, "run_id": run_id}).fit()
        best, best_metrics = min(result.best_checkpoints, key=lambda cm: cm[1]["val_loss"])
        best_dir = best.path
        export_dir = Path(best_dir) / "export"
        mlflow.log_metrics({"best_val_loss": best_metrics["val_loss"], "best_epoch": best_metrics["epoch"]})
        metrics.update({"best_val_loss": best_metrics["val_loss"], "best_epoch": best_metrics["epoch"]})

        if not plan.skipped_reason:
            after = _scq(Critic.from_export(export_dir), plan)
            metrics.update({f"{k}_after": v for k, v in after.items()})
            mlflow.log_metrics({f"{k}_after": v for k, v in after.items()})

        mlflow.log_dict(to_dict(cfg), "config.yaml")
        info = log_critic(export_dir)
        version = promoted = reason = None
        if cfg.mlflow.register:
            reg = register(info.model_uri, cfg.mlflow.registered_model, cfg.mlflow.alias,
                           mlflow.get_run(run_id).data.metrics.get(cfg.mlflow.promote_metric),
                           cfg.mlflow.promote_metric, cfg.mlflow.promote_direction, cfg.mlflow.promote == "always")
            version, promoted, reason = reg.version, reg.promoted, reg.reason
            log.info("registry: %s", reason)
    return RunSummary(run_id, uri, cfg.mlflow.experiment, prepared, str(best_dir), float(best_metrics["val_loss"]),
                      metrics, info.model_uri, version, promoted, reason, scq_skipped_reason=plan.skipped_reason)
