"""A console a person can read: one live status line, everything else in a log file.

Three parts:

* :class:`Board` (as the Ray actor :data:`ProgressBoard`): a tiny store on the driver's node that
  the driver and rank 0 of the training loop report into, fire-and-forget. It holds the current
  stage, training progress (epoch, step, loss, examples/s) and a history of training attempts, so
  the console can show them and a test can check what was reported.
* :class:`BoardClient`: the caller's side. ``client.train_step.remote(...)`` has the same shape
  as a call on the actor handle, but never raises: a missing or dead board is logged once and
  then ignored, because a progress display must never fail a training run.
* :func:`console`: the driver's context manager. It routes Python logging (vcritic, Ray, MLflow,
  warnings) to ``<run.output_dir>/logs/<run name>-<timestamp>.log``, keeps vcritic warnings and
  any error on the console, turns Ray Data's progress bars off on a terminal, prints where the
  log file and the Ray worker logs are, and draws the status line: redrawn in place on a
  terminal (rich), or as a plain line at most every ``VCRITIC_PROGRESS_INTERVAL_S`` seconds
  (default 20) plus one line per finished stage when the output is a file or a pipe (CI,
  ``ray job submit`` logs).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import ray
import ray.data

log = logging.getLogger(__name__)

# How many recent optimizer steps the examples/s and ETA figures are averaged over.
RATE_WINDOW = 20
DEFAULT_PLAIN_INTERVAL_S = 20.0


# --- the board --------------------------------------------------------------------------------


class Board:
    """What the console shows, reported by the driver (stages) and rank 0 (training).

    Times are taken when a report arrives, so senders need no synchronised clocks. A plain class,
    so it can be tested without Ray; :data:`ProgressBoard` is the actor.
    """

    def __init__(self, started_at: float | None = None) -> None:
        self._started = started_at or time.time()
        self._stage = ""
        self._detail = ""
        self._stage_started = self._started
        self._rows: int | None = None
        self._finished: list[dict[str, Any]] = []
        self._attempt: dict[str, Any] = {}
        self._starts = 0
        self._resumed_from: list[int] = []
        self._steps_run = 0
        self._epoch: int | None = None
        self._step: int | None = None
        self._loss: float | None = None
        self._examples = 0
        self._tokens = 0
        self._val_losses: dict[int, float] = {}
        self._window: deque[tuple[float, int, int]] = deque(maxlen=RATE_WINDOW)
        self._attempt_first: tuple[float, int] | None = None  # (time, step) of this attempt's first step

    # driver side

    def stage(self, name: str, detail: str = "", at: float | None = None) -> None:
        """Start stage ``name`` (the previous one is kept as finished), or with the current
        stage's name, just update its detail. ``at``: the sender's clock (the driver's calls can
        arrive late while the actor is still starting); default: on arrival."""
        now = at or time.time()
        if name != self._stage:
            if self._stage:
                self._finished.append({"name": self._stage, "detail": self._detail, "rows": self._rows,
                                       "seconds": now - self._stage_started})
            self._stage, self._stage_started, self._rows = name, now, None
        self._detail = detail

    def stage_rows(self, rows: int) -> None:
        """Rows the current stage has processed so far (its rows/s is rows over its elapsed time)."""
        self._rows = int(rows)

    # training side (rank 0)

    def train_started(self, attempt_info: dict[str, Any]) -> None:
        """A training attempt began: ``world_size``, ``resumed_from_step``, ``total_steps``, ``epochs``."""
        self._starts += 1
        self._attempt = dict(attempt_info)
        resumed = int(attempt_info.get("resumed_from_step") or 0)
        self._resumed_from.append(resumed)
        self._step = resumed
        self._window.clear()
        self._attempt_first = None

    def train_step(self, epoch: int, step: int, loss: float, examples: int, tokens: int) -> None:
        """One optimizer step: ``examples``/``tokens`` are those of this step (all ranks or rank 0's)."""
        self._steps_run += 1
        self._epoch, self._step, self._loss = int(epoch), int(step), float(loss)
        self._examples += int(examples)
        self._tokens += int(tokens)
        self._window.append((time.time(), int(step), int(examples)))
        if self._attempt_first is None:
            self._attempt_first = (time.time(), int(step))

    def epoch_done(self, epoch: int, val_loss: float) -> None:
        self._val_losses[int(epoch)] = float(val_loss)

    # readers

    def snapshot(self) -> dict[str, Any]:
        """Everything the console needs, as plain values."""
        now = time.time()
        steps_per_s = examples_per_s = None
        if len(self._window) >= 2:
            (t0, s0, _), (t1, s1, _) = self._window[0], self._window[-1]
            if t1 > t0 and s1 > s0:
                steps_per_s = (s1 - s0) / (t1 - t0)
                examples_per_s = sum(e for _, _, e in list(self._window)[1:]) / (t1 - t0)
        total = self._attempt.get("total_steps")
        eta = None
        # ETA from this attempt's average pace since its first step, so the time spent on
        # validation and checkpoints between epochs counts too (the window above would miss it).
        if self._attempt_first is not None and total is not None and self._step is not None:
            t0, s0 = self._attempt_first
            if self._step > s0 and now > t0:
                eta = max(int(total) - self._step, 0) * (now - t0) / (self._step - s0)
        stage_s = now - self._stage_started
        return {
            "elapsed_s": now - self._started,
            "stage": self._stage, "detail": self._detail, "stage_s": stage_s,
            "rows": self._rows, "rows_per_s": (self._rows / stage_s) if self._rows and stage_s > 0 else None,
            "finished": list(self._finished),
            "training": bool(self._starts), "attempt": dict(self._attempt), "starts": self._starts,
            "epoch": self._epoch, "epochs": self._attempt.get("epochs"),
            "step": self._step, "total_steps": total,
            "loss": self._loss, "val_losses": dict(self._val_losses),
            "steps_per_s": steps_per_s, "examples_per_s": examples_per_s, "eta_s": eta,
            "examples": self._examples, "tokens": self._tokens,
        }

    def history(self) -> dict[str, Any]:
        """What training reported over all attempts (a retried or resumed run has several)."""
        return {"steps_run": self._steps_run, "starts": self._starts, "resumed_from": list(self._resumed_from)}


# No CPU (it must not take a slot Ray Data or a train worker needs); not restarted (a fresh
# board would only show zeros, and callers already cope with a dead one).
ProgressBoard = ray.remote(num_cpus=0, max_restarts=0)(Board)


def create_board():
    """A :data:`ProgressBoard` on this (the driver's) node; needs a connected Ray."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    strategy = NodeAffinitySchedulingStrategy(node, soft=False)
    return ProgressBoard.options(scheduling_strategy=strategy).remote(started_at=time.time())


class _SafeMethod:
    def __init__(self, client: BoardClient, name: str):
        self._client, self._name = client, name

    def remote(self, *args: Any, **kwargs: Any) -> None:
        self._client._call(self._name, args, kwargs)


class BoardClient:
    """Fire-and-forget calls into a board that never raise.

    ``BoardClient(handle).train_step.remote(epoch, step, loss, examples, tokens)`` sends the call
    and returns at once. Replies are checked later without waiting; the first failure (the board
    died, or ``handle`` is not a board) is logged once as a warning and every later call is
    skipped. ``BoardClient(None)`` does nothing, so code can call it unconditionally.
    """

    MAX_PENDING = 64

    def __init__(self, board: Any):
        self._board = board
        self._dead = board is None
        self._pending: list[Any] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> _SafeMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _SafeMethod(self, name)

    @property
    def alive(self) -> bool:
        return not self._dead

    def _call(self, name: str, args: tuple, kwargs: dict) -> None:
        with self._lock:
            if self._dead:
                return
            try:
                self._reap()
                if self._dead:
                    return
                self._pending.append(getattr(self._board, name).remote(*args, **kwargs))
                if len(self._pending) > self.MAX_PENDING:
                    self._pending = self._pending[-self.MAX_PENDING:]
            except Exception as exc:  # noqa: BLE001 - a display must never fail the caller
                self._give_up(exc)

    def _reap(self) -> None:
        """Collect replies that have arrived; a failed one means the board is gone."""
        if not self._pending:
            return
        ready, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001
                self._give_up(exc)
                return

    def _give_up(self, exc: BaseException) -> None:
        self._dead, self._pending = True, []
        log.warning("progress board unavailable (%s: %s); going on without live progress",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")


# --- log routing -------------------------------------------------------------------------------


def log_dir_for(output_dir: str) -> tuple[Path, str | None]:
    """Where the driver's log file goes: ``<run.output_dir>/logs`` when that is a local path.

    The path is resolved as the driver resolves it (:func:`vcritic.storage.resolve_output_dir`:
    under ``ray job submit`` a relative one lies under ``$VCRITIC_HOME``). A URI (``s3://...``)
    cannot take a log file as it is written, so the log then goes to this node's staging directory
    for it (:func:`vcritic.storage.staging_dir`); the second value says so (None when local).
    """
    from vcritic import storage

    resolved = storage.resolve_output_dir(str(output_dir))
    directory = storage.staging_dir(resolved) / "logs"
    if storage.is_uri(resolved):
        return directory, f"run.output_dir={output_dir} is not a local path, so the log file is kept locally"
    return directory, None


def log_file_for(cfg, now: datetime | None = None) -> tuple[Path, str | None]:
    directory, why = log_dir_for(cfg.run.output_dir)
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(cfg.run.name)) or "run"
    return directory / f"{name}-{stamp}.log", why


class _ConsoleFilter(logging.Filter):
    """What still reaches the console: vcritic warnings and errors, anyone's errors. Records
    Ray Data marks ``hide`` stay off the console, as they do under Ray Data's own handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "hide", False):
            return False
        if record.levelno >= logging.ERROR:
            return True
        return record.levelno >= logging.WARNING and (record.name == "vcritic" or record.name.startswith("vcritic."))


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time, so lines land above a live display
    that has redirected it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            self.handleError(record)


def _is_console_handler(handler: logging.Handler) -> bool:
    """A library's own handler that writes to the terminal: a stream handler that is not a file
    (Ray's and MLflow's look ``sys.stderr`` up when they write, so their streams vary)."""
    if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
        return False
    return not isinstance(getattr(handler, "stream", None), io.StringIO)


# Loggers that stop propagation even where they end up without a console handler of their own.
_CHAIN_STOPPERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "DeepSpeed")


@dataclass
class _Routing:
    path: Path
    reason: str | None
    file: logging.Handler
    console: logging.Handler
    root_level: int
    taken: dict[str, tuple[list[logging.Handler], bool]]
    owner: object  # who set it up; only they undo it


_ROUTING: _Routing | None = None
_LAST_LOG_FILE: Path | None = None


def _take_over_console_handlers() -> None:
    """Send libraries' own console handlers' records to ours instead (Ray, Ray Data, MLflow,
    DeepSpeed install theirs at import): drop those handlers and let records propagate to the
    root logger, remembering what was removed so :func:`_undo_routing` can put it back."""
    if _ROUTING is None:
        return
    for name, obj in list(logging.root.manager.loggerDict.items()):
        if not isinstance(obj, logging.Logger) or name.startswith("vcritic"):
            continue
        consoles = [h for h in obj.handlers if _is_console_handler(h)]
        if not consoles and (obj.propagate or name not in _CHAIN_STOPPERS):
            continue
        removed, propagate = _ROUTING.taken.get(name, ([], obj.propagate))
        for h in consoles:
            obj.removeHandler(h)
        _ROUTING.taken[name] = (removed + consoles, propagate)
        obj.propagate = True


def _import_quietly(module: str) -> None:
    """Import ``module`` now, catching what it prints while importing, so its console handlers
    can be taken over. DeepSpeed creates its logger with a stdout handler at import and at once
    logs a notice ("Setting accelerator to CPU") through it; that notice goes to the log file."""
    import importlib

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            importlib.import_module(module)
    except Exception:  # noqa: BLE001 - not installed, or broken: the run will say so where it needs it
        return
    for obj in list(logging.root.manager.loggerDict.values()):
        for h in getattr(obj, "handlers", []):
            if isinstance(h, logging.StreamHandler) and h.stream is buf:
                h.setStream(sys.stdout)  # its real destination; the takeover removes it
    if buf.getvalue().strip():
        log.info("%s printed on import: %s", module, buf.getvalue().strip())


def setup_logging(cfg, owner: object = None) -> Path:
    """Route Python logging to this run's log file (idempotent); returns the file's path.

    Everything at INFO and above goes to the file; vcritic warnings and all errors also go to
    stderr. Libraries that print through their own handlers are imported first so their
    handlers can be taken over.
    """
    global _ROUTING, _LAST_LOG_FILE
    if _ROUTING is not None:
        _take_over_console_handlers()
        return _ROUTING.path
    import mlflow  # noqa: F401 - installs its console handler at import (Ray and Ray Data did above)

    path, reason = log_file_for(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(path, encoding="utf-8")
    file.setLevel(logging.INFO)  # Ray Data's DEBUG records stay in its own ray-data.log
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = _StderrHandler(logging.WARNING)
    console.addFilter(_ConsoleFilter())
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    _ROUTING = _Routing(path, reason, file, console, root.level, {}, owner)
    root.setLevel(logging.INFO)
    root.addHandler(file)
    root.addHandler(console)
    logging.captureWarnings(True)
    _import_quietly("deepspeed")  # the driver imports it anyway (through the model code)
    # MLflow draws a tqdm bar per artifact download (the best checkpoint's export); no bars here.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    _take_over_console_handlers()
    _LAST_LOG_FILE = path
    if reason:
        log.info("%s: %s", reason, path)
    return path


def _undo_routing() -> None:
    global _ROUTING
    if _ROUTING is None:
        return
    r, _ROUTING = _ROUTING, None
    root = logging.getLogger()
    for h in (r.file, r.console):
        root.removeHandler(h)
    r.file.close()
    root.setLevel(r.root_level)
    logging.captureWarnings(False)
    for name, (handlers, propagate) in r.taken.items():
        logger = logging.getLogger(name)
        for h in handlers:
            logger.addHandler(h)
        logger.propagate = propagate


def teardown_logging(owner: object = None) -> None:
    """Undo :func:`setup_logging` if ``owner`` set it up (the CLI keeps it until the process ends)."""
    if _ROUTING is not None and _ROUTING.owner is owner:
        _undo_routing()


def log_file() -> Path | None:
    """This process's current (or last) log file."""
    return _ROUTING.path if _ROUTING is not None else _LAST_LOG_FILE


def ray_logs_dir() -> str:
    """Where this Ray session keeps worker logs (on each node of a cluster)."""
    try:
        return str(ray._private.worker._global_node.get_logs_dir_path())  # no public API for it in Ray 2.60
    except Exception:  # noqa: BLE001
        return "/tmp/ray/session_latest/logs"


def quiet_ray_data(interactive: bool) -> None:
    """Ray Data's operator bars would redraw on the terminal: off there. Without a terminal
    Ray Data logs its progress instead, which now lands in the log file, so it stays on."""
    ctx = ray.data.DataContext.get_current()
    if interactive:
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False


class _RayDataWatcher(logging.Handler):
    """Reads Ray Data's "Execution plan of Dataset ...: A -> B[Op]" log records in the driver to
    show which operators are running (cleared when the execution finishes)."""

    PLAN = re.compile(r"Execution plan of Dataset \S+: (.*)$")
    OP = re.compile(r"\w+\[(.+?)\]")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.current = ""
        self.executions = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001
            return
        match = self.PLAN.search(msg)
        if match:
            ops = [m.group(1) for m in self.OP.finditer(match.group(1)) if m.group(1) != "Input"]
            self.current = " -> ".join(ops[-2:])
        elif "execution finished" in msg or "execution failed" in msg:
            self.current = ""
            self.executions += 1


# --- rendering ---------------------------------------------------------------------------------


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(max(seconds, 0)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_rate(per_s: float) -> str:
    """A rate with sensible digits: 1234, 12.3, 0.05."""
    if per_s >= 100:
        return f"{per_s:.0f}"
    if per_s >= 1:
        return f"{per_s:.1f}"
    return f"{per_s:.2g}"


def status_line(snap: dict[str, Any], data_op: str = "") -> str:
    """One line: stage, what is running, and for training epoch, step, loss, examples/s, ETA."""
    parts = [f"[{fmt_duration(snap.get('elapsed_s'))}] {snap.get('stage') or 'starting'}"]
    if snap.get("detail"):
        parts.append(str(snap["detail"]))
    if snap.get("stage") == "training":
        if not snap.get("training"):
            parts.append("starting workers")
        else:
            if snap.get("epoch") is not None and snap.get("epochs"):
                parts.append(f"epoch {int(snap['epoch']) + 1}/{snap['epochs']}")
            if snap.get("step") is not None:
                parts.append(f"step {snap['step']}/{snap.get('total_steps') or '?'}")
            if snap.get("loss") is not None:
                parts.append(f"loss {snap['loss']:.4f}")
            vals = snap.get("val_losses") or {}
            if vals:
                last = max(vals, key=int)
                parts.append(f"val {vals[last]:.4f}")
            if snap.get("examples_per_s"):
                parts.append(f"{fmt_rate(snap['examples_per_s'])} ex/s")
            parts.append(f"ETA {fmt_duration(snap.get('eta_s'))}")
    elif data_op:
        parts.append(f"Ray Data: {data_op}")
    if snap.get("rows_per_s"):
        parts.append(f"{snap['rows']} rows, {fmt_rate(snap['rows_per_s'])} rows/s")
    parts.append(f"{fmt_duration(snap.get('stage_s'))} in stage")
    return " | ".join(parts)


def finished_line(stage: dict[str, Any]) -> str:
    """One line for a finished stage: its time, detail and rows/s."""
    parts = [f"done: {stage['name']} in {fmt_duration(stage['seconds'])}"]
    if stage.get("detail"):
        parts.append(str(stage["detail"]))
    if stage.get("rows"):
        rate = stage["rows"] / stage["seconds"] if stage["seconds"] > 0 else 0.0
        parts.append(f"{stage['rows']} rows, {fmt_rate(rate)} rows/s")
    return " | ".join(parts)


class Console:
    """The driver's live display; use :func:`console`.

    A poller thread reads the board's snapshot; on a terminal a rich ``Live`` line is updated in
    place (finished stages are printed above it), otherwise a plain line goes out when a stage
    finishes and at most every ``interval_s`` seconds in between.
    """

    def __init__(self, board: Any, stream: TextIO, interactive: bool, interval_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.board = board
        self.clock = clock
        self.client = BoardClient(board)
        self.stream = stream
        self.interactive = interactive
        self.interval_s = interval_s
        self.lines = 0  # plain lines printed (what a CI log gets)
        self.watcher = _RayDataWatcher()
        self._snap: dict[str, Any] = {}
        self._printed_finished = 0
        self._last_plain = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live = None

    # driver API

    def stage(self, name: str, detail: str = "") -> None:
        _take_over_console_handlers()  # libraries imported since the last call
        self.client.stage.remote(name, detail, at=time.time())

    def rows(self, rows: int) -> None:
        self.client.stage_rows.remote(int(rows))

    def say(self, text: str) -> None:
        """A permanent line (above the live line on a terminal)."""
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.lines += 1

    # loop

    def _poll(self) -> dict[str, Any]:
        if self.client.alive:
            try:
                self._snap = ray.get(self.board.snapshot.remote(), timeout=5)
            except Exception as exc:  # noqa: BLE001
                if not isinstance(exc, ray.exceptions.GetTimeoutError):
                    self.client._give_up(exc)
        return self._snap

    def _tick(self, final: bool = False) -> None:
        snap = self._poll()
        if not snap:
            return
        finished = snap.get("finished", [])
        for stage in finished[self._printed_finished:]:
            self.say(finished_line(stage))
        self._printed_finished = len(finished)
        line = status_line(snap, self.watcher.current)
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text(line, no_wrap=True, overflow="ellipsis"))
        elif not final and self.clock() - self._last_plain >= self.interval_s:
            self.say(line)
            self._last_plain = self.clock()

    def _run(self) -> None:
        period = 0.5 if self.interactive else 1.0
        while not self._stop.wait(period):
            try:
                self._tick()
            except Exception as exc:  # noqa: BLE001 - the display must not take the job down
                log.info("progress display error: %s", exc)

    def start(self) -> None:
        if self.interactive:
            from rich.console import Console as RichConsole
            from rich.live import Live

            self._live = Live(console=RichConsole(file=self.stream), refresh_per_second=4, transient=True,
                              redirect_stdout=True, redirect_stderr=True)
            self._live.start()
        self._last_plain = self.clock()  # the first plain status line comes after one interval
        self._thread = threading.Thread(target=self._run, name="vcritic-progress", daemon=True)
        self._thread.start()

    def stop(self, failed: BaseException | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        # The stage running at the end finished too: close it on the board, then print it.
        stage = self._snap.get("stage") if self._snap else None
        if failed is None:
            self.client.stage.remote("", at=time.time())  # "" closes the current stage
        with contextlib.suppress(Exception):
            self._tick(final=True)
        if failed is not None and stage:
            self.say(f"failed: {stage} after {fmt_duration(self._snap.get('stage_s'))}: "
                     f"{type(failed).__name__}: {failed}")
        if self._live is not None:
            self._live.stop()
            self._live = None


def _interval() -> float:
    raw = os.environ.get("VCRITIC_PROGRESS_INTERVAL_S")
    if not raw:
        return DEFAULT_PLAIN_INTERVAL_S
    try:
        return max(float(raw), 1.0)
    except ValueError:
        raise ValueError(f"VCRITIC_PROGRESS_INTERVAL_S={raw!r} must be a number of seconds, e.g. 20") from None


@contextlib.contextmanager
def console(cfg, board: Any = None, stream: TextIO | None = None, interactive: bool | None = None) -> Iterator[Console]:
    """The driver's console for one run (needs a connected Ray).

    Sets up the log file (unless the CLI already did), prints where it, the run's outputs
    (``run.output_dir``, as the driver resolved it) and Ray's worker logs are,
    and shows live progress until the block ends. Without ``board`` it creates one and kills it on
    exit. ``interactive`` defaults to whether ``stream`` (stderr) is a terminal.
    """
    stream = stream or sys.stderr
    if interactive is None:
        interactive = bool(getattr(stream, "isatty", lambda: False)())
    owner = object()
    path = setup_logging(cfg, owner=owner)
    own_board = board is None
    if own_board:
        try:
            board = create_board()
        except Exception as exc:  # noqa: BLE001 - run without live progress rather than not at all
            log.warning("could not start the progress board (%s); going on without live progress", exc)
    quiet_ray_data(interactive)
    data_logger = logging.getLogger("ray.data")
    con = Console(board, stream, interactive, _interval())
    data_logger.addHandler(con.watcher)
    reason = _ROUTING.reason if _ROUTING is not None else None
    con.say(f"vcritic: log file: {path}" + (f" ({reason})" if reason else ""))
    con.say(f"vcritic: outputs: {cfg.run.output_dir}")
    con.say(f"vcritic: Ray worker logs: {ray_logs_dir()}")
    con.start()
    failed: BaseException | None = None
    try:
        yield con
    except BaseException as exc:
        failed = exc
        log.info("run failed", exc_info=True)
        raise
    finally:
        con.stop(failed)
        data_logger.removeHandler(con.watcher)
        if own_board and board is not None:
            with contextlib.suppress(Exception):
                ray.kill(board)
        teardown_logging(owner)
