"""MLflow: where runs go, rank-0 metric logging, and the registered critic model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def tracking_uri(configured: str | None) -> str:
    """The configured URI, else ``$MLFLOW_TRACKING_URI``, else an absolute sqlite file in the
    working directory (absolute so Ray workers, whose working directory differs, log to it too)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


class RankZeroLogger:
    """Logs into an existing run from a training worker; a no-op on every other rank."""

    def __init__(self, target: dict[str, str], enabled: bool) -> None:
        self.enabled = enabled and bool(target.get("run_id"))
        self.run_id = target.get("run_id")
        if self.enabled:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=target["tracking_uri"])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])


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
    ``speech_path`` when the ``speech_dir`` param is given)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "audio_path"), ColSpec("string", "persona"),
                       ColSpec("string", "context", required=False)]),
        outputs=Schema([ColSpec("string", "critique"), ColSpec("string", "speech_path", required=False)]),
        params=ParamSchema([ParamSpec("speech_dir", "string", "")]),
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


def register(model_uri: str, registered_name: str, alias: str) -> int:
    """Register ``model_uri`` under ``registered_name`` and point ``alias`` at the new version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    version = mlflow.register_model(model_uri, registered_name)
    MlflowClient().set_registered_model_alias(registered_name, alias, version.version)
    return int(version.version)
