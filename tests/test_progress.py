"""The live progress display: the board on a real local Ray, the never-failing client, the plain
renderer, and the console's log routing (what reaches the terminal, what goes to the log file)."""

from __future__ import annotations

import io
import logging
import time

import pytest

from vcritic import progress
from vcritic.config import load


@pytest.fixture(scope="module")
def ray_local():
    """A 2-CPU local Ray of this module's own. Unlike conftest's, it starts a new instance
    (``address="local"``) even when another Ray runs on this machine (a test's ``ray start``)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _wait_until(predicate, tries: int = 200, pause: float = 0.05) -> bool:
    for _ in range(tries):
        if predicate():
            return True
        time.sleep(pause)
    return predicate()


def test_board_records_stages_steps_starts_and_history(ray_local):
    ray = ray_local
    board = progress.create_board()
    try:
        board.stage.remote("preparing data")
        board.stage_rows.remote(128)
        board.stage.remote("training")
        board.train_started.remote({"world_size": 2, "resumed_from_step": 0, "total_steps": 10, "epochs": 2})
        for step in (1, 2, 3):
            board.train_step.remote(0, step, 5.0 - step, 4, 100)
        # A retried attempt resumes from the step-2 checkpoint and takes two more steps.
        board.train_started.remote({"world_size": 2, "resumed_from_step": 2, "total_steps": 10, "epochs": 2})
        for step in (3, 4):
            board.train_step.remote(0, step, 1.5, 4, 100)
        board.epoch_done.remote(0, 1.25)
        snap = ray.get(board.snapshot.remote())
        history = ray.get(board.history.remote())
    finally:
        ray.kill(board)
    assert history == {"steps_run": 5, "starts": 2, "resumed_from": [0, 2]}
    assert snap["stage"] == "training"
    assert [s["name"] for s in snap["finished"]] == ["preparing data"]
    assert snap["finished"][0]["rows"] == 128
    assert (snap["epoch"], snap["epochs"], snap["step"], snap["total_steps"]) == (0, 2, 4, 10)
    assert snap["loss"] == 1.5 and snap["val_losses"] == {0: 1.25}
    assert snap["examples"] == 20 and snap["tokens"] == 500
    assert snap["examples_per_s"] > 0 and snap["eta_s"] is not None and snap["eta_s"] >= 0


def test_client_survives_a_killed_board_and_warns_once(ray_local, caplog):
    ray = ray_local
    board = progress.create_board()
    client = progress.BoardClient(board)
    client.train_step.remote(0, 1, 2.0, 4, 100)
    assert ray.get(board.history.remote())["steps_run"] == 1
    ray.kill(board)
    with caplog.at_level(logging.WARNING, logger="vcritic.progress"):
        assert _wait_until(lambda: (client.train_step.remote(0, 2, 1.0, 4, 100), not client.alive)[1])
        for step in range(3, 20):  # later calls are skipped quietly
            client.train_step.remote(0, step, 1.0, 4, 100)
    warnings = [r for r in caplog.records if "progress board unavailable" in r.getMessage()]
    assert len(warnings) == 1
    # No board at all: calls are accepted and do nothing.
    nothing = progress.BoardClient(None)
    nothing.epoch_done.remote(0, 1.0)
    assert not nothing.alive


def test_plain_renderer_prints_bounded_lines_with_the_fields(ray_local):
    board = progress.create_board()
    now = [0.0]
    out = io.StringIO()
    con = progress.Console(board, out, interactive=False, interval_s=20.0, clock=lambda: now[0])
    try:
        board.stage.remote("preparing data")
        board.stage_rows.remote(64)
        board.stage.remote("training")
        board.train_started.remote({"world_size": 2, "resumed_from_step": 0, "total_steps": 50, "epochs": 2})
        for second in range(1, 201):  # 200 "seconds" of one-second polls, a step each
            board.train_step.remote((second - 1) // 100, second // 4 + 1, 3.0, 8, 256)
            now[0] = float(second)
            con._tick()
        con.stop()
    finally:
        import ray

        ray.kill(board)
    lines = out.getvalue().splitlines()
    # One line for the finished data stage, one per 20 s of training, one for the final stage.
    assert len(lines) <= 1 + 200 // 20 + 1, lines
    assert lines[0].startswith("done: preparing data") and "64 rows" in lines[0] and "rows/s" in lines[0]
    status = [line for line in lines if "] training |" in line]
    assert len(status) >= 5
    last = status[-1]
    for field in ("epoch 2/2", "step ", "/50", "loss 3.0000", "ex/s", "ETA "):
        assert field in last, (field, last)
    assert lines[-1].startswith("done: training")


def test_status_line_names_the_stage_before_training_starts():
    board = progress.Board()
    board.stage("training")
    assert "training | starting workers" in progress.status_line(board.snapshot())
    board.stage("preparing data")
    line = progress.status_line(board.snapshot(), data_op="MapBatches(embed)")
    assert "preparing data" in line and "Ray Data: MapBatches(embed)" in line


def test_console_routes_logs_to_a_file_and_keeps_vcritic_warnings_visible(ray_local, tmp_path, capsys):
    ray = ray_local
    cfg = load("demo", [f"run.output_dir={tmp_path / 'out'}", "run.name=progress test"])
    root_handlers = list(logging.getLogger().handlers)
    out = io.StringIO()
    with progress.console(cfg, stream=out, interactive=False) as con:
        con.stage("preparing data")
        ray.data.range(20).map_batches(lambda b: b).materialize()
        logging.getLogger("vcritic.driver_test").info("an info line for the file only")
        logging.getLogger("vcritic.driver_test").warning("SCQ skipped: a warning for the console")
        logging.getLogger("ray.data").warning("a Ray Data warning for the file only")
        con.rows(20)
    path = progress.log_file()
    assert path is not None and path.parent == (tmp_path / "out" / "logs").resolve()
    assert path.name.startswith("progress_test-") and path.suffix == ".log"
    text = path.read_text()
    assert "Execution plan of Dataset" in text  # Ray Data's own lines
    assert "an info line for the file only" in text and "a Ray Data warning for the file only" in text
    shown = out.getvalue()
    assert f"log file: {path}" in shown and "Ray worker logs: " in shown
    assert f"outputs: {tmp_path / 'out'}" in shown
    assert "done: preparing data" in shown and "20 rows" in shown
    err = capsys.readouterr().err
    assert "SCQ skipped: a warning for the console" in err
    assert "an info line" not in err and "a Ray Data warning" not in err
    assert logging.getLogger().handlers == root_handlers  # routing undone on exit


def test_a_non_local_output_dir_keeps_the_log_file_locally(monkeypatch, tmp_path):
    monkeypatch.setenv("VCRITIC_HOME", str(tmp_path))
    directory, why = progress.log_dir_for("s3://bucket/prefix")
    assert directory == tmp_path.resolve() / "staging" / "s3" / "bucket" / "prefix" / "logs"
    assert why and "not a local path" in why
    assert progress.log_dir_for(str(tmp_path / "runs")) == ((tmp_path / "runs" / "logs").resolve(), None)


def test_a_bad_progress_interval_is_named(monkeypatch):
    monkeypatch.setenv("VCRITIC_PROGRESS_INTERVAL_S", "often")
    with pytest.raises(ValueError, match="VCRITIC_PROGRESS_INTERVAL_S='often'"):
        progress._interval()
