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
from typing import Any

import mlflow
import ray

from vcritic import progress, storage
from vcritic.config import flatten, to_dict
from vcritic.data import report as data_report
from vcritic.data.pipeline import PreparedData, prepare
from vcritic.tracking import log_critic, register, tracking_uri
from vcritic.train.loop import RANK_KEY, MlflowTarget, PreparedInputs, WorkerTask

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
    train_history: dict[str, Any] = field(default_factory=dict)
    """Worker-group starts, optimizer steps run and resume points (see :func:`_train_history`)."""
    scq_file: str | None = None
    """The SCQ questions of the held-out split as a public-format JSONL file (None: none)."""


def connect_ray(cfg) -> None:
    """Join ``ray.address`` or ``$RAY_ADDRESS`` (set by ``ray job submit``), else start a local Ray."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        # Worker output stays in Ray's log files (the console prints where), not in the driver's.
        ray.init(address=address, log_to_driver=False)
    else:
        # "local" always starts a new instance; a bare ray.init() would attach to any Ray
        # already running on this machine.
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": WORKER_ENV})


@dataclass
class ScqPlan:
    """The SCQ evaluation a run can do: the held-out rows and bank it uses, or why it is skipped."""

    rows: list[dict[str, Any]]
    bank: list[dict[str, Any]]
    questions: int = 0
    skipped_reason: str | None = None


def scq_split(prepared: PreparedData) -> tuple[str, str]:
    """``(split name, shard dir)`` SCQ asks about: the test split, which neither training nor
    checkpoint selection has seen; val only when there is no test split (``data.test_fraction=0``
    or too few songs), with a warning, since val also picked the checkpoint."""
    if prepared.counts.get("test") and prepared.test_dir:
        return "test", prepared.test_dir
    log.warning("no test split (data.test_fraction=0 or too few songs): SCQ asks about the val split, "
                "which also picked the best checkpoint, so its accuracy is optimistic")
    return "val", prepared.val_dir


def scq_plan(cfg, val_dir: str) -> ScqPlan:
    """Decide whether SCQ runs: only when some of the first ``eval.scq_max_clips`` held-out rows
    (``val_dir``: the shards of the split asked about, see :func:`scq_split`) state (in ``facts``)
    a fact the question bank asks about. A user's own manifest usually has no facts, so SCQ is
    then skipped with a reason instead of failing the job."""
    from vcritic.evaluate.scq import load_bank, make_questions

    if not cfg.eval.scq:
        return ScqPlan([], [], skipped_reason="eval.scq=false")
    bank = load_bank(cfg.eval.scq_bank)
    rows = storage.read_parquet_rows(val_dir, int(cfg.eval.scq_max_clips))  # local or a URI
    if not rows:
        return ScqPlan([], bank, skipped_reason="no held-out (test or val) rows to ask questions about")
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


def _scq(critic, plan: ScqPlan, name: str | None = None) -> dict[str, float]:
    """Cloze SCQ metrics of ``critic``; with ``name`` the full report (per-question results,
    confusion per category) is logged as the artifact ``scq/<name>.json`` of the active run."""
    from vcritic.evaluate.scq import scq_report

    report = scq_report(critic, plan.rows, plan.bank)
    if name:
        mlflow.log_dict(report.to_dict(), f"scq/{name}.json")
    return report.metrics(confusion=False)


def write_scq_file(plan: ScqPlan, prepared: PreparedData, split: str) -> str | None:
    """The plan's questions as a public-format SCQ file ``scq_<split>.jsonl`` beside this node's
    prepared data, for ``jobs/evaluate.py MODEL eval.scq_file=...`` (generative and loglik modes);
    None when the rows have no clip paths or the bank does not fit them."""
    from pathlib import Path

    from vcritic.data.demo import write_scq_file as write

    if plan.skipped_reason or not prepared.local_root:
        return None
    try:
        return str(write(plan.rows, Path(prepared.local_root) / f"scq_{split}.jsonl", plan.bank))
    except (KeyError, ValueError) as exc:
        log.warning("no SCQ file written: %s", exc)
        return None


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


def prepared_inputs(prepared: PreparedData) -> PreparedInputs:
    """The typed record of what data preparation produced that every train worker needs.

    With a URI ``run.output_dir`` the directories are the shared copies (URIs), which each
    worker fetches once per node (``storage.local_copy``), wherever Ray placed it."""
    spec = {**prepared.backbone_spec, "options": dict(prepared.backbone_spec["options"])}
    if prepared.shared_backbone_dir:
        spec["options"]["path"] = prepared.shared_backbone_dir
    return PreparedInputs(
        backbone_spec=spec, audio_codes=int(prepared.audio_codes),
        audio_feature_dim=int(prepared.audio_feature_dim), audio_num_codebooks=int(prepared.audio_num_codebooks),
        audio_frame_rate=float(prepared.audio_frame_rate),
        audio_tokenizer_dir=str(prepared.shared_audio_tokenizer_dir or prepared.audio_tokenizer_dir),
        train_rows=int(prepared.counts.get("train", 0)))


def _trainer(cfg, prepared: PreparedData, mlflow_target: dict[str, str], board=None, name: str | None = None):
    """The Ray Train trainer of this run. ``name`` (default ``run.name``) names its folder in the
    storage: a trainer with the same storage and name resumes from that folder's latest checkpoint."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from vcritic.train.loop import train_loop_per_worker

    t = cfg.train
    resources = {"CPU": float(t.cpus_per_worker), **{k: float(v) for k, v in t.worker_resources.items()}}
    if t.use_gpu:
        resources["GPU"] = float(t.gpus_per_worker)
    task = WorkerTask(config=to_dict(cfg), inputs=prepared_inputs(prepared),
                      mlflow=MlflowTarget(mlflow_target["tracking_uri"], mlflow_target.get("run_id") or ""), board=board)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"task": task},
        scaling_config=ScalingConfig(num_workers=int(t.num_workers), use_gpu=bool(t.use_gpu), resources_per_worker=resources),
        run_config=RunConfig(
            name=name or cfg.run.name,
            storage_path=storage.train_storage_path(cfg),  # absolute, or a URI such as s3://bucket/prefix
            # Epoch ends rank by val_loss, mid-epoch checkpoints last (loop.RANK_KEY); the latest
            # checkpoint is always kept, so a restart finds it.
            checkpoint_config=CheckpointConfig(
                num_to_keep=int(t.checkpoints_to_keep), checkpoint_score_attribute=RANK_KEY, checkpoint_score_order="min"
            ),
            failure_config=FailureConfig(max_failures=int(t.max_failures)),
            worker_runtime_env={"env_vars": WORKER_ENV},
        ),
        datasets={"train": ray.data.read_parquet(prepared.train_dir), "val": ray.data.read_parquet(prepared.val_dir)},
        dataset_config=DataConfig(execution_options=ingest_options()),
    )


def ingest_options():
    """Ray Train's ingest options with ``preserve_order``: the shard files (written in a fixed
    layout, see ``pipeline.in_order``) reach the workers in name order, so which rows each worker
    gets, and in what order, is the same on every rerun. Without it blocks go to whichever worker
    asks first. (What is fitted on the data, the audio tokenizer and a from-scratch BPE, is fitted
    on a seeded sample of the ids, ``pipeline.sample_rows``, so it repeats too.)"""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


# Settings that may change between a killed run and the command that resumes it.
RESUME_NEUTRAL = ("ray", "mlflow.tracking_uri", "run.resume", "train.num_workers", "train.use_gpu",
                  "train.cpus_per_worker", "train.gpus_per_worker", "train.max_failures", "train.worker_resources",
                  "train.resume_from", "train.log_every_steps")


def run_key(cfg) -> str:
    """Identity of a run for resuming: its name, storage and every training-relevant setting."""
    import hashlib
    import json

    data = to_dict(cfg)
    for dotted in RESUME_NEUTRAL:
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    data["storage"] = storage.resolve_output_dir(str(cfg.run.output_dir))
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def unfinished_run(cfg, key: str) -> str | None:
    """The MLflow run id of the newest unfinished run (killed, failed or still marked running)
    with this :func:`run_key`, which a rerun of the same command continues."""
    if not cfg.run.resume:
        return None
    experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        return None
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list", max_results=1,
                              filter_string=f"tags.`vcritic.run_key` = '{key}' and attributes.status != 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _log_new_metrics(metrics: dict[str, float]) -> None:
    """Log what the active run does not hold yet (a resumed run keeps its earlier values once)."""
    have = mlflow.get_run(mlflow.active_run().info.run_id).data.metrics
    new = {k: float(v) for k, v in metrics.items() if k not in have}
    if new:
        mlflow.log_metrics(new)


def run(cfg) -> RunSummary:
    """Run the whole job described by ``cfg``; returns where everything went."""
    from vcritic.critic import Critic

    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    connect_ray(cfg)
    storage.resolve_run_output(cfg)  # logs where outputs go (under $VCRITIC_HOME for a relative one in a Ray job)
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_tracking_uri(uri)
    storage.set_experiment(cfg.mlflow.experiment, uri)  # artifacts kept outside Ray's working-dir copy
    key = run_key(cfg)
    resume_id = unfinished_run(cfg, key)
    with (mlflow.start_run(run_id=resume_id, run_name=None if resume_id else cfg.run.name) as active,
          progress.console(cfg) as con):  # live status line; logs to the run's log file
        run_id = active.info.run_id
        if resume_id:
            log.warning("continuing unfinished MLflow run %s (same run.name, storage and settings; "
                        "run.resume=false starts afresh)", run_id)
        else:
            mlflow.set_tag("vcritic.run_key", key)
            mlflow.log_params(flatten(cfg))
        con.stage("preparing data")
        prepared = prepare(cfg)
        con.rows(prepared.counts["input"])
        _log_new_metrics({f"data_{k}": float(v) for k, v in prepared.counts.items()})
        mlflow.log_artifact(prepared.quarantine_path, "data")
        mlflow.log_artifact(prepared.duplicates_path, "data")
        data_report.log_to_mlflow(prepared)  # rows per split and source, quarantine per stage, samples
        log.info("data: %s", prepared.counts)

        metrics: dict[str, float] = {}
        split_name, split_dir = scq_split(prepared)
        plan = scq_plan(cfg, split_dir)
        mlflow.set_tag("scq_split", split_name)
        scq_file = write_scq_file(plan, prepared, split_name)
        if plan.skipped_reason:
            log.warning("SCQ skipped: %s", plan.skipped_reason)
            mlflow.set_tag("scq_skipped_reason", plan.skipped_reason)
        else:
            con.stage("SCQ before")
            have = mlflow.get_run(run_id).data.metrics
            before = ({k[: -len("_before")]: v for k, v in have.items() if k.endswith("_before")}
                      if "scq_accuracy_before" in have else _scq(_untrained_critic(cfg, prepared), plan, "before"))
            metrics.update({f"{k}_before": v for k, v in before.items()})
            _log_new_metrics({f"{k}_before": v for k, v in before.items()})

        # One Ray Train folder per MLflow run: a rerun that continues this run resumes its checkpoints.
        con.stage("training")
        result = _trainer(cfg, prepared, {"tracking_uri": uri, "run_id": run_id},
                          name=f"{cfg.run.name}-{run_id[:8]}", board=con.board).fit()
        history = _train_history(con.board)
        if history.get("starts"):
            redone = int(history["steps_run"]) - int(result.metrics.get("global_step", 0)) + int(history["resumed_from"][0])
            history["steps_redone"] = redone
            _log_new_metrics({"train_starts": history["starts"], "train_steps_redone": redone,
                              "train_resumed_from_step": int(history["resumed_from"][0])})
        epoch_ends = [(c, m) for c, m in result.best_checkpoints if not m.get("mid_epoch")]
        best, best_metrics = min(epoch_ends, key=lambda cm: cm[1]["val_loss"])
        best_dir = storage.checkpoint_uri(best)
        export_dir = storage.local_export_dir(best, cfg)  # downloaded first when the storage is remote
        mlflow.log_metrics({"best_val_loss": best_metrics["val_loss"], "best_epoch": best_metrics["epoch"]})
        metrics.update({"best_val_loss": best_metrics["val_loss"], "best_epoch": best_metrics["epoch"]})

        if not plan.skipped_reason:
            con.stage("SCQ after")
            after = _scq(Critic.from_export(export_dir), plan, "after")
            metrics.update({f"{k}_after": v for k, v in after.items()})
            mlflow.log_metrics({f"{k}_after": v for k, v in after.items()})

        con.stage("registering")
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
                      metrics, info.model_uri, version, promoted, reason, scq_skipped_reason=plan.skipped_reason,
                      train_history=history, scq_file=scq_file)


def _train_history(board) -> dict[str, Any]:
    """The board's record of training over all attempts: ``starts`` (worker-group starts, so
    restarts = starts - 1), ``steps_run`` (optimizer steps taken, redone ones included) and
    ``resumed_from`` (the step each start continued from). Empty when the board is gone."""
    try:
        return ray.get(board.history.remote(), timeout=30) if board is not None else {}
    except Exception:  # the live display's board is not worth failing a finished run over
        log.warning("progress board unavailable; restart counts are not in the summary", exc_info=True)
        return {}
