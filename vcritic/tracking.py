"""MLflow: where runs go, rank-0 metric logging, and the registered critic model."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def tracking_uri(configured: str | None) -> str:
    """The configured URI, else ``$MLFLOW_TRACKING_URI``, else an absolute sqlite file in the
    working directory (absolute so Ray workers, whose working directory differs, log to it too).

    Under ``ray job submit`` the working directory is Ray's temporary copy, deleted with the
    session: the default file is then ``$VCRITIC_HOME/mlflow.db`` (``~/.vcritic/mlflow.db``), and
    a relative ``sqlite:///`` path is refused with the fix. For jobs on a cluster, an MLflow
    tracking server is the way (clusters/README.md).
    """
    import logging

    from vcritic import storage

    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    in_job = storage.in_ray_job()
    if not uri:
        if not in_job:
            return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        db = storage.home() / "mlflow.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        logging.getLogger(__name__).warning(
            "running under a Ray job with no mlflow.tracking_uri or MLFLOW_TRACKING_URI: tracking to %s on this "
            "node (look at it with `mlflow ui --backend-store-uri sqlite:///%s`); for a cluster, pass "
            "mlflow.tracking_uri=http://<mlflow server>:5000", db, db)
        return f"sqlite:///{db}"
    db_path = storage.sqlite_path(uri)
    if in_job and db_path is not None and not Path(db_path).is_absolute():
        raise ValueError(
            f"mlflow tracking URI {uri!r} is a relative sqlite path; under a Ray job it would be created in Ray's "
            f"temporary copy of the working directory and deleted with the Ray session. Pass an absolute one "
            f"(sqlite:////abs/path/mlflow.db, four slashes) or a tracking server (http://host:5000)")
    return uri


class RankZeroLogger:
    """Logs into an existing run from a training worker; a no-op on every other rank.

    ``buffered``: metrics wait in memory until :meth:`flush` (the loop flushes once a checkpoint
    holding their steps is saved), so steps redone after a restart are never logged twice.
    """

    def __init__(self, target: dict[str, str], enabled: bool, buffered: bool = False) -> None:
        self.enabled = enabled and bool(target.get("run_id"))
        self.run_id = target.get("run_id")
        self.buffered = buffered
        self.logged_through: dict[str, int] = {}
        """Per metric, the last step the run already holds: not logged again (see :meth:`resume`)."""
        self.pending: list[Any] = []
        self.pending_params: list[Any] = []
        if self.enabled:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=target["tracking_uri"])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items()
                            if step > self.logged_through.get(k, -1))
        if not self.buffered:
            self.flush()

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        self.pending_params.extend(Param(k, str(v)) for k, v in params.items())
        if not self.buffered:
            self.flush()

    def resume(self) -> int:
        """After a restart: skip, metric by metric, the steps the run already holds, so each step
        stays logged once. A worker may flush a step's metrics after uploading its checkpoint but
        before Ray Train registers it; if it dies then, those steps are redone, and their first
        values stay. Returns the last step already logged (any metric)."""
        if not self.enabled:
            return 0
        for key in self.client.get_run(self.run_id).data.metrics:
            self.logged_through[key] = max((m.step for m in self.client.get_metric_history(self.run_id, key)),
                                           default=-1)
        return max(self.logged_through.values(), default=0)

    def flush(self) -> None:
        """Write what is pending (MLflow takes at most 1000 metrics per batch)."""
        if not self.enabled:
            return
        if self.pending_params:
            self.client.log_batch(self.run_id, params=self.pending_params)
            self.pending_params = []
        while self.pending:
            chunk, self.pending = self.pending[:1000], self.pending[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)


def code_paths() -> list[str]:
    """The source trees a logged critic needs to load in a fresh environment."""
    root = Path(__file__).resolve().parent.parent
    return [str(root / "vcritic"), str(root / "plugins")]


PIP_REQUIREMENTS_PACKAGES = ("torch", "transformers", "tokenizers", "peft", "safetensors", "librosa", "soundfile",
                             "soxr", "faiss-cpu", "numpy", "pandas", "omegaconf", "mlflow")


def pip_requirements() -> list[str]:
    """Pins of what is installed now, so a served critic gets the versions it was trained with."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in PIP_REQUIREMENTS_PACKAGES:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return pins


def critic_signature():
    """Inputs ``audio_path``, ``persona`` (and optional ``context``) → ``critique`` (and
    ``speech_path`` when the ``speech_dir`` param is given); the generation settings are optional
    params (``vcritic.serving.GENERATION_PARAMS``)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from vcritic.serving import generation_param_specs

    return ModelSignature(
        inputs=Schema([ColSpec("string", "audio_path"), ColSpec("string", "persona"),
                       ColSpec("string", "context", required=False)]),
        outputs=Schema([ColSpec("string", "critique"), ColSpec("string", "speech_path", required=False)]),
        params=ParamSchema([ParamSpec("speech_dir", "string", ""), *generation_param_specs()]),
    )


def log_critic(export_dir: str | Path, name: str = "critic"):
    """Log an export as an MLflow pyfunc model in the active run; returns its ModelInfo."""
    import mlflow

    from vcritic.serving import CriticPyfunc

    return mlflow.pyfunc.log_model(
        name=name,
        python_model=CriticPyfunc(),
        signature=critic_signature(),
        artifacts={"critic": str(export_dir)},
        code_paths=code_paths(),
        pip_requirements=pip_requirements(),
    )


DIRECTIONS = ("min", "max")
PROMOTE_MODES = ("if_better", "always")


@dataclass
class RegistrationResult:
    """What :func:`register` did: the new version, whether it took the alias, and why."""

    version: int
    promoted: bool
    reason: str
    champion_version: int | None = None
    """The version that held the alias before this registration (None: nothing did)."""
    champion_value: float | None = None
    """That version's source run's value of the promotion metric (None: it had none)."""


def _number(value: float | None) -> float | None:
    return None if value is None or math.isnan(float(value)) else float(value)


def _decide(value: float | None, metric: str, direction: str, champion_version: int | None,
            champion_value: float | None, champion_note: str) -> tuple[bool, str]:
    """(promote?, why) for a new version whose run scored ``value``; the reason names no new version."""
    if champion_version is None:
        return True, "no current champion"
    if champion_value is None:
        return True, f"champion version {champion_version}'s run {champion_note}"
    if value is None:
        return False, f"this run has no {metric} to compare with champion version {champion_version}'s {champion_value:.6g}"
    better = value < champion_value if direction == "min" else value > champion_value
    verb = "beats" if better else "does not beat"
    return better, (f"{metric} {value:.6g} {verb} champion version {champion_version}'s {champion_value:.6g} "
                    f"({'lower' if direction == 'min' else 'higher'} is better)")


def register(model_uri: str, registered_name: str, alias: str, metric_value: float | None = None,
             metric: str = "best_val_loss", direction: str = "min", always: bool = False) -> RegistrationResult:
    """Register ``model_uri`` as a new version of ``registered_name``; point ``alias`` at it only if
    it beats the version holding the alias now on ``metric`` (``direction`` ``min``: lower is better).

    The champion's value is read from its version's source run. The new version always takes the
    alias when there is no champion yet, when the champion's run lacks the metric, or with
    ``always``; a tie does not take it. The decision is recorded as tags ``promoted`` and
    ``promote_reason`` on the new version and on its source run.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
    from mlflow.tracking import MlflowClient

    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    missing = ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)
    client = MlflowClient()
    champion_version = champion_value = None
    champion_note = ""
    try:
        aliases = client.get_registered_model(registered_name).aliases
    except MlflowException as exc:
        if exc.error_code != missing:
            raise
        aliases = {}
    if alias in aliases:
        champion = client.get_model_version_by_alias(registered_name, alias)
        champion_version = int(champion.version)
        if not champion.run_id:
            champion_note = "is unknown (the version has no source run)"
        else:
            try:
                champion_value = _number(client.get_run(champion.run_id).data.metrics.get(metric))
                champion_note = f"{champion.run_id} has no {metric}"
            except MlflowException as exc:
                if exc.error_code != missing:
                    raise
                champion_note = f"{champion.run_id} no longer exists"

    value = _number(metric_value)
    promoted, why = _decide(value, metric, direction, champion_version, champion_value, champion_note)
    if always and not promoted:
        promoted, why = True, f"mlflow.promote=always ({why})"

    created = mlflow.register_model(model_uri, registered_name)
    version = int(created.version)
    if promoted:
        client.set_registered_model_alias(registered_name, alias, str(version))
        reason = f"version {version} is '{alias}': {why}"
    else:
        reason = f"registered version {version} without '{alias}': {why}"
    tags = {"promoted": str(promoted).lower(), "promote_reason": reason}
    for key, text in tags.items():
        client.set_model_version_tag(registered_name, str(version), key, text)
        if created.run_id:
            client.set_tag(created.run_id, key, text)
    if created.run_id:
        client.set_tag(created.run_id, "registered_version", str(version))
    return RegistrationResult(version, promoted, reason, champion_version, champion_value)
