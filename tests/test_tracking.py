"""Registration: a new version takes the alias only when it beats the champion (real sqlite MLflow)."""

from __future__ import annotations

import pytest

from vcritic.config import ConfigError, load

NAME = "critic-under-test"


@pytest.fixture
def mlflow_db(tmp_path):
    """A fresh sqlite tracking store and registry, global for the test, restored after."""
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("tracking-test")
    yield mlflow
    mlflow.set_tracking_uri(before)


def logged_model(mlflow, metrics: dict[str, float]) -> str:
    """A run with ``metrics`` and a tiny pyfunc model in it; returns the model's URI."""

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str], params=None) -> list[str]:
            return model_input

    with mlflow.start_run():
        if metrics:
            mlflow.log_metrics(metrics)
        return mlflow.pyfunc.log_model(name="critic", python_model=Echo(), pip_requirements=[]).model_uri


def champion(mlflow) -> int:
    return int(mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion").version)


def register_run(mlflow, value: float | None, direction: str = "min", **kwargs):
    from vcritic.tracking import register

    uri = logged_model(mlflow, {} if value is None else {"best_val_loss": value})
    return register(uri, NAME, "champion", value, "best_val_loss", direction, **kwargs)


def version_tags(mlflow, version: int) -> dict[str, str]:
    return mlflow.MlflowClient().get_model_version(NAME, str(version)).tags


def test_only_better_versions_take_the_alias(mlflow_db):
    mlflow = mlflow_db
    first = register_run(mlflow, 0.44)
    assert (first.version, first.promoted, first.champion_version) == (1, True, None)
    assert "no current champion" in first.reason
    assert champion(mlflow) == 1

    worse = register_run(mlflow, 0.51)
    assert (worse.version, worse.promoted, worse.champion_version, worse.champion_value) == (2, False, 1, 0.44)
    assert worse.reason.startswith(
        "registered version 2 without 'champion': best_val_loss 0.51 does not beat champion version 1's 0.44")
    assert champion(mlflow) == 1
    assert version_tags(mlflow, 2) == {"promoted": "false", "promote_reason": worse.reason}
    source = mlflow.MlflowClient().get_model_version(NAME, "2").run_id
    run_tags = mlflow.get_run(source).data.tags
    assert (run_tags["promoted"], run_tags["promote_reason"], run_tags["registered_version"]) == (
        "false", worse.reason, "2")

    tie = register_run(mlflow, 0.44)
    assert not tie.promoted and champion(mlflow) == 1

    better = register_run(mlflow, 0.40)
    assert (better.version, better.promoted, better.champion_version) == (4, True, 1)
    assert "best_val_loss 0.4 beats champion version 1's 0.44" in better.reason
    assert champion(mlflow) == 4
    assert version_tags(mlflow, 4)["promoted"] == "true"


def test_direction_max(mlflow_db):
    mlflow = mlflow_db
    assert register_run(mlflow, 0.5, "max").promoted
    lower = register_run(mlflow, 0.4, "max")
    assert not lower.promoted and "higher is better" in lower.reason
    assert register_run(mlflow, 0.6, "max").promoted
    assert champion(mlflow) == 3


def test_champion_run_without_the_metric_is_replaced_and_the_reason_says_so(mlflow_db):
    mlflow = mlflow_db
    register_run(mlflow, None)
    result = register_run(mlflow, 0.9)
    assert result.promoted and result.champion_version == 1 and result.champion_value is None
    assert "has no best_val_loss" in result.reason
    assert champion(mlflow) == 2


def test_a_run_without_the_metric_does_not_displace_a_champion(mlflow_db):
    mlflow = mlflow_db
    register_run(mlflow, 0.44)
    result = register_run(mlflow, None)
    assert not result.promoted and "this run has no best_val_loss" in result.reason
    assert champion(mlflow) == 1


def test_always_promotes_and_keeps_the_comparison_in_the_reason(mlflow_db):
    mlflow = mlflow_db
    register_run(mlflow, 0.44)
    result = register_run(mlflow, 0.51, always=True)
    assert result.promoted and "mlflow.promote=always" in result.reason and "does not beat" in result.reason
    assert champion(mlflow) == 2


def test_promotion_config_is_validated():
    cfg = load("demo")
    assert (cfg.mlflow.promote_metric, cfg.mlflow.promote_direction, cfg.mlflow.promote) == (
        "best_val_loss", "min", "if_better")
    assert load("demo", ["mlflow.promote_direction=max"]).mlflow.promote_direction == "max"
    with pytest.raises(ConfigError, match=r"mlflow\.promote_direction"):
        load("demo", ["mlflow.promote_direction=lower"])
    with pytest.raises(ConfigError, match=r"mlflow\.promote\b"):
        load("demo", ["mlflow.promote=sometimes"])
