"""``train_loop_per_worker``: the one training loop, run by every Ray Train worker.

Everything comes from the :class:`WorkerTask` it is handed (never from driver globals): the
typed config, a small typed record of what data preparation produced (:class:`PreparedInputs`),
the MLflow run to log into (rank 0 only) and the driver's progress board.

Fault tolerance: a checkpoint every ``train.checkpoint_every_steps`` optimizer steps stores, beside
DeepSpeed's state, the :class:`DataPosition` (the keys of the examples this epoch has consumed, from
all ranks). A restarted worker group resumes from the latest checkpoint, skips exactly those
examples for the rest of the epoch and keeps every rank in lockstep (see :func:`lockstep`), so no
example is repeated or skipped, whatever the number of workers after the restart.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from vcritic.models.sequence import batch_from_rows, collate, row_streams

T = TypeVar("T")
log = logging.getLogger(__name__)

RANK_KEY = "checkpoint_rank"
"""What Ray Train ranks checkpoints by (lower is better): val_loss at epoch ends; mid-epoch
checkpoints, which exist only to resume from, get :data:`MID_EPOCH_RANK` and are never picked as
best (Ray always keeps the latest checkpoint, so the newest one survives until the next)."""
MID_EPOCH_RANK = 1e30


@dataclass(frozen=True)
class PreparedInputs:
    """What data preparation produced that a train worker needs (small and picklable)."""

    backbone_spec: dict[str, Any]
    """The materialised backbone plugin spec (name + options with local paths)."""
    audio_codes: int
    audio_feature_dim: int
    audio_num_codebooks: int
    audio_frame_rate: float
    audio_tokenizer_dir: str
    train_rows: int
    """Rows in the train split: sizes the learning-rate schedule (0: unknown, constant lr)."""


@dataclass(frozen=True)
class MlflowTarget:
    """The MLflow run rank 0 logs into; an empty ``run_id`` logs nothing."""

    tracking_uri: str
    run_id: str = ""


@dataclass(frozen=True)
class WorkerTask:
    """Everything ``train_loop_per_worker`` gets: Ray Train hands it over as ``{"task": WorkerTask}``."""

    config: dict[str, Any]
    """``vcritic.config.to_dict(cfg)``; the worker rebuilds the typed config with ``from_dict``."""
    inputs: PreparedInputs
    mlflow: MlflowTarget
    board: Any = None
    """The driver's ``vcritic.progress.ProgressBoard`` actor handle (None: no live progress)."""


def _limits(model_cfg, data_cfg, frame_rate: float) -> dict[str, int]:
    return {
        "prompt": int(model_cfg.max_prompt_tokens),
        "text": int(model_cfg.max_text_tokens),
        "audio": int(model_cfg.max_audio_tokens),
        "music": int(data_cfg.max_clip_seconds * frame_rate) + 1,
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


def row_key(row: dict[str, Any]) -> str:
    """A stable key of a prepared row: its ``example_id``, else a hash of what makes it an example
    (a user's manifest may leave ``example_id`` empty)."""
    eid = row.get("example_id")
    if eid:
        return str(eid)
    text = "\x1f".join(str(row.get(k, "")) for k in ("audio_path", "offset_s", "target_text", "target_audio_path"))
    return "sha1:" + hashlib.sha1(text.encode()).hexdigest()


def chunk_args(buffer_rows: int, seed: int) -> dict[str, Any]:
    """How :func:`epoch_groups` reads a shard: shuffle buffers of ``buffer_rows`` rows, as pandas."""
    return {"batch_size": buffer_rows, "batch_format": "pandas", "local_shuffle_buffer_size": buffer_rows,
            "local_shuffle_seed": seed}


class ReadAhead:
    """One epoch of a shard whose first chunk is fetched in a background thread from now on.

    Each epoch of a Ray Data shard starts a new streaming execution (through the split
    coordinator, Parquet read tasks, a whole shuffle buffer) before its first chunk arrives:
    seconds that the step loop would otherwise wait for at every epoch. Started while the worker
    does something else (builds the model, or validates and checkpoints the previous epoch),
    that start overlaps with it. Stands in for the shard in :func:`epoch_groups`; the read
    arguments must be the ones it was started with. An error in the thread is raised on use.
    """

    def __init__(self, shard, **read_args: Any) -> None:
        self._shard, self._args = shard, read_args
        self._chunks: Iterator[Any] = iter(())
        self._first: list[Any] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch, name="vcritic-read-ahead", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            # One iterator: Ray Data's iter_batches returns an iterable that starts over on each iter().
            self._chunks = iter(self._shard.iter_batches(**self._args))
            self._first.extend(itertools.islice(self._chunks, 1))
        except BaseException as exc:  # handed to the step loop, which owns the failure
            self._error = exc

    def iter_batches(self, **read_args: Any) -> Iterator[Any]:
        if read_args != self._args:
            raise ValueError(f"read ahead with {self._args}, asked for {read_args}")
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        yield from self._chunks


def epoch_groups(shard, batch_size: int, buffer_rows: int, group_by_length: bool, seed: int,
                 prepare: Callable[[dict[str, Any]], T], length: Callable[[T], int] = len,
                 skip: frozenset[str] = frozenset(), keys: list[str] | None = None,
                 spare: list[T] | None = None) -> Iterator[list[T]]:
    """One epoch of a Ray Data shard as micro-batches of prepared rows.

    Ray Data's local shuffle (seeded with ``seed``) draws ``buffer_rows`` rows at a time; each
    buffer's rows are ``prepare``-d and cut by :func:`plan_batches`. Every buffer yields
    ``ceil(len(buffer) / batch_size)`` batches, so ranks with equal shards take equal steps.
    Rows whose :func:`row_key` is in ``skip`` (consumed before a restart) are left out; when
    ``keys`` is given, the keys of each yielded batch's rows are appended to it just before the
    batch is yielded. ``spare`` receives one prepared skipped row (for :func:`lockstep`'s
    zero-weight steps on a rank that has nothing left).
    """
    rng = np.random.default_rng(seed)
    for chunk in shard.iter_batches(**chunk_args(buffer_rows, seed)):
        rows = [(row_key(r), r) for r in _rows(chunk)]
        if skip:
            if spare is not None and not spare and rows:
                spare.append(prepare(rows[0][1]))
            rows = [(k, r) for k, r in rows if k not in skip]
        items = [prepare(r) for _, r in rows]
        for idx in plan_batches([length(x) for x in items], batch_size, group_by_length, rng):
            if keys is not None:
                keys.extend(rows[i][0] for i in idx)
            yield [items[i] for i in idx]


def lockstep(batches: Iterable[list[T]], device) -> Iterator[list[T] | None]:
    """Keep every rank stepping until all ranks are out of batches.

    After a mid-epoch restart each rank's shard holds a different number of not-yet-consumed
    rows, but DeepSpeed's gradient all-reduce needs every rank in every step. Before each
    micro-batch the ranks agree (one all-reduce of a flag) whether anyone still has data; a rank
    that has none yields ``None`` and runs a zero-weight step. Only used in resumed epochs: full
    epochs have equal shards and equal batch counts.
    """
    it = iter(batches)
    while True:
        batch = next(it, None)
        (anyone,) = _all_reduce_sum([0.0 if batch is None else 1.0], device)
        if anyone == 0:
            return
        yield batch


@dataclass
class DataPosition:
    """Where in the data a checkpoint was taken (``data_position.json`` in the checkpoint)."""

    epoch: int
    """The epoch in progress, or the last finished one when ``epoch_complete``."""
    global_step: int
    epoch_step: int
    epoch_complete: bool
    world_size: int
    consumed: list[str] = field(default_factory=list)
    """Keys (:func:`row_key`) of the examples ``epoch`` has trained on so far, from every rank."""

    FILE = "data_position.json"

    def save(self, directory: Path) -> None:
        (Path(directory) / self.FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, directory: str | Path) -> DataPosition | None:
        path = Path(directory) / cls.FILE
        return cls(**json.loads(path.read_text())) if path.exists() else None

    def resume_point(self) -> tuple[int, frozenset[str]]:
        """(epoch to continue with, example keys to skip in it)."""
        if self.epoch_complete:
            return self.epoch + 1, frozenset()
        return self.epoch, frozenset(self.consumed)


def check_resumable(position: DataPosition | None, world_size: int, zero_stage: int, directory: str) -> None:
    """Fail early, saying what to do, when a checkpoint cannot be resumed on this worker group.

    ZeRO stages 1-3 partition the optimizer state (stage 3 the weights too) over the workers that
    wrote the checkpoint, so they resume only on as many workers; stage 0 resumes on any number.
    (DeepSpeed's elastic ZeRO checkpoints would lift this for stages 1-2 but fail to load with
    the client AdamW optimizer vcritic passes in: ``BASE_OPTIMIZER_STATE_STEP`` is never saved.)
    The data position itself is global and fits any worker count.
    """
    if position is None or position.world_size == world_size or zero_stage == 0:
        return
    raise RuntimeError(
        f"checkpoint {directory} was written by {position.world_size} workers with train.zero_stage={zero_stage}, "
        f"and this run has {world_size}: ZeRO partitions the optimizer state per worker. Resume with "
        f"train.num_workers={position.world_size} (or train.zero_stage=0), or start a new run "
        f"(run.resume=false or another run.name).")


def _gather_keys(keys: list[str]) -> list[str]:
    """Every rank's ``keys``, concatenated (rank order)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(keys)
    out: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(keys))
    return [k for part in out for k in (part or [])]


def _notify(board, method: str, *args: Any) -> None:
    """Tell the driver's progress board something, fire-and-forget: never fails training."""
    if board is None:
        return
    try:
        getattr(board, method).remote(*args)
    except Exception:  # a dead or missing board only costs the live display
        log.debug("progress board call %s failed", method, exc_info=True)


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


def _save_checkpoint(engine, critic, tokenizer, cfg, inputs: PreparedInputs, position: DataPosition,
                     directory: Path, export: bool) -> None:
    """Every rank writes its DeepSpeed shard; rank 0 writes the data position and, at epoch ends,
    a self-contained export (the critic the driver may pick and register)."""
    import ray.train

    from vcritic.config import to_dict
    from vcritic.models.build import save_export

    engine.save_checkpoint(str(directory), tag="deepspeed",
                           client_state={"epoch": position.epoch, "global_step": position.global_step})
    rank = ray.train.get_context().get_world_rank()
    if rank == 0:
        position.save(directory)
    if not export:
        return
    gather = None
    if int(cfg.train.zero_stage) == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(critic.parameters()), modifier_rank=None)
        gather.__enter__()
    try:
        if rank == 0:
            model_cfg = to_dict(cfg.model)
            save_export(critic, tokenizer, inputs.backbone_spec, model_cfg["audio_tokenizer"],
                        inputs.audio_tokenizer_dir, model_cfg, directory / "export")
    finally:
        if gather is not None:
            gather.__exit__(None, None, None)


def _resume(engine, cfg, world_size: int) -> tuple[DataPosition | None, str | None]:
    """Load the latest checkpoint of this run (after a restart) or ``train.resume_from``."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    directory = checkpoint.to_directory() if checkpoint is not None else cfg.train.resume_from
    if directory is None:
        return None, None
    position = DataPosition.load(directory)
    check_resumable(position, world_size, int(cfg.train.zero_stage), str(directory))
    _, client = engine.load_checkpoint(str(directory), tag="deepspeed")
    if client is None:
        raise RuntimeError(f"checkpoint {directory} has no DeepSpeed state under 'deepspeed/'; "
                           "is it a vcritic training checkpoint?")
    if position is None:  # written before data positions existed: an epoch-end checkpoint
        position = DataPosition(int(client["epoch"]), int(client["global_step"]), 0, True, world_size)
    return position, str(directory)


def _on_this_node(inputs: PreparedInputs) -> PreparedInputs:
    """``inputs`` with shared (URI) directories replaced by this node's local copies."""
    from dataclasses import replace

    from vcritic.storage import local_copy

    spec = {**inputs.backbone_spec, "options": dict(inputs.backbone_spec.get("options", {}))}
    if spec["options"].get("path"):
        spec["options"]["path"] = local_copy(str(spec["options"]["path"]))
    return replace(inputs, backbone_spec=spec, audio_tokenizer_dir=local_copy(inputs.audio_tokenizer_dir))


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    from vcritic.config import from_dict, to_dict
    from vcritic.models.build import build_critic, trainable_summary
    from vcritic.tracking import RankZeroLogger
    from vcritic.train.ds_config import deepspeed_config

    task: WorkerTask = payload["task"]
    from vcritic.progress import BoardClient

    # Never raises, and stops calling (warning once) if the driver's board is gone.
    cfg, board = from_dict(task.config), BoardClient(task.board)
    inputs = _on_this_node(task.inputs)
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(int(cfg.run.seed))
    if not t.cpu_shm_comm:
        # Skip DeepSpeed's shared-memory all-reduce op: it compiles C++ on first use.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    device = _device(bool(t.use_gpu))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    batch_size, buffer_rows = int(t.batch_size), int(t.shuffle_buffer_rows)
    # Next epochs' first chunks, read while the worker does other work. Epoch 0's read overlaps
    # with building the model; a resumed run's first epoch is only known once its checkpoint loads.
    ahead: dict[int, ReadAhead] = {}
    if ray.train.get_checkpoint() is None and t.resume_from is None and int(t.epochs) > 0:
        ahead[0] = ReadAhead(train_shard, **chunk_args(buffer_rows, epoch_seed(int(cfg.run.seed), 0, rank)))

    model_cfg = to_dict(cfg.model)
    critic, tokenizer = build_critic(inputs.backbone_spec, model_cfg, inputs.audio_codes, inputs.audio_feature_dim,
                                     num_codebooks=inputs.audio_num_codebooks)
    if t.precision == "fp32":
        critic.float()  # a bf16-loaded backbone trains in fp32 when asked; bf16 runs are cast by DeepSpeed
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(critic)
    critic.to(device)
    params = [p for p in critic.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(t.lr), weight_decay=float(t.weight_decay))
    total_steps = total_optimizer_steps(inputs.train_rows, batch_size, int(t.grad_accum), world, int(t.epochs),
                                        t.max_steps_per_epoch, buffer_rows)
    schedule = str(t.lr_schedule) if inputs.train_rows else "constant"
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup=int(t.warmup_steps), total=total_steps, schedule=schedule, min_ratio=float(t.min_lr_ratio)))
    engine, _, _, _ = deepspeed.initialize(model=critic, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(to_dict(t)))

    position, resumed_from = _resume(engine, cfg, world)
    start_epoch, skip = position.resume_point() if position else (0, frozenset())
    step = position.global_step if position else 0
    epoch_steps = position.epoch_step if position and not position.epoch_complete else 0

    # Metrics reach MLflow when the checkpoint holding their steps is saved: a restart redoes
    # the steps after the last checkpoint, and MLflow then holds each step once.
    logger = RankZeroLogger({"tracking_uri": task.mlflow.tracking_uri, "run_id": task.mlflow.run_id},
                            enabled=(rank == 0), buffered=True)
    if resumed_from is not None:
        logger.resume()
    else:
        logger.log_params({**trainable_summary(critic), "train_device": str(device),
                           "train_dist_backend": dist.get_backend() if dist.is_initialized() else "none",
                           "train_param_dtype": str(next(engine.module.parameters()).dtype).replace("torch.", ""),
                           "train_total_steps": total_steps})
        logger.flush()
    if rank == 0:
        _notify(board, "train_started", {"world_size": world, "resumed_from_step": step, "total_steps": total_steps,
                                         "epochs": int(t.epochs)})
        if resumed_from:
            log.warning("resumed from %s at epoch %d, step %d (%d examples of this epoch already consumed)",
                        resumed_from, start_epoch, step, len(skip))
    limits = _limits(cfg.model, cfg.data, inputs.audio_frame_rate)
    lam = float(cfg.model.loss_lambda)
    every = int(t.checkpoint_every_steps) if t.checkpoint_every_steps else None
    prepare = partial(row_streams, vocab=critic.vocab, limits=limits)

    def checkpoint(position: DataPosition, metrics: dict[str, Any], export: bool) -> None:
        with tempfile.TemporaryDirectory(prefix="vcritic-ckpt-") as tmp:
            _save_checkpoint(engine, critic, tokenizer, cfg, inputs, position, Path(tmp), export)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        logger.flush()  # after the report: the checkpoint with these steps is persisted

    for epoch in range(start_epoch, int(t.epochs)):
        resumed = epoch == start_epoch and bool(skip)
        consumed: list[str] = []  # this rank's keys since the epoch (re)started
        spare: list[Any] = []
        # loss, text, audio, micro-batches, tokens, examples, padded positions (since last log)
        window = [0.0] * 7
        window_start = epoch_start = time.perf_counter()
        step_loss, step_micro, step_examples, step_tokens = 0.0, 0, 0, 0  # this optimizer step, this rank
        epoch_tokens, epoch_steps = 0, epoch_steps if resumed else 0
        seed = epoch_seed(int(cfg.run.seed), epoch, rank)
        batches: Iterable[list[Any] | None] = epoch_groups(
            ahead.pop(epoch, train_shard), batch_size, buffer_rows, bool(t.group_by_length), seed, prepare,
            skip=skip if resumed else frozenset(), keys=consumed, spare=spare)
        if resumed:
            batches = lockstep(batches, device)
        filler: list[Any] | None = None
        first_batch_seconds = None  # Ray Data's per-epoch start and the first shuffle buffer
        for streams in batches:
            if first_batch_seconds is None:
                first_batch_seconds = time.perf_counter() - epoch_start
            idle = streams is None
            if idle:  # this rank is out of rows: a zero-weight step on rows it already has
                streams = filler or spare[:1]
            filler = streams
            tensors = {k: v.to(device) for k, v in collate(streams, critic.vocab).items()}
            out = engine(**tensors)
            engine.backward(out.loss * 0.0 if idle else out.loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            if not idle:
                mask = tensors["attention_mask"]
                tokens = int(mask.sum())
                epoch_tokens += tokens
                loss = float(out.loss)
                step_loss, step_micro = step_loss + loss, step_micro + 1
                step_examples, step_tokens = step_examples + len(streams), step_tokens + tokens
                window = [w + x for w, x in zip(window, [loss, float(out.text_loss), float(out.audio_loss), 1, tokens,
                                                         len(streams), mask.numel() - tokens], strict=True)]
            if not boundary:
                continue
            step += 1
            epoch_steps += 1
            if rank == 0:
                _notify(board, "train_step", epoch, step, step_loss / max(step_micro, 1), step_examples * world,
                        step_tokens * world)  # rank 0's share times the ranks: no collective per step
            step_loss, step_micro, step_examples, step_tokens = 0.0, 0, 0, 0
            if step % int(t.log_every_steps) == 0:
                loss, text, audio, n, tokens, examples, padded = _all_reduce_sum(window, device)
                seconds = time.perf_counter() - window_start
                logger.log_metrics({
                    "train_loss": loss / max(n, 1), "train_text_loss": text / max(n, 1),
                    "train_audio_loss": audio / max(n, 1),
                    "tokens_per_s": tokens / seconds, "examples_per_s": examples / seconds,
                    "padding_fraction": padded / max(tokens + padded, 1.0),
                    "lr": scheduler.get_last_lr()[0], "epoch": epoch,
                }, step)
                window, window_start = [0.0] * 7, time.perf_counter()
            if t.max_steps_per_epoch is not None and epoch_steps >= int(t.max_steps_per_epoch):
                break
            if every and step % every == 0:
                done = sorted(skip | set(_gather_keys(consumed))) if resumed else _gather_keys(consumed)
                checkpoint(DataPosition(epoch, step, epoch_steps, False, world, done),
                           {"epoch": epoch, "global_step": step, "mid_epoch": 1, RANK_KEY: MID_EPOCH_RANK}, export=False)
        # This rank's time in the step loop (data, forward, backward, step; not eval or checkpoint).
        train_seconds = time.perf_counter() - epoch_start
        seen = _gather_keys(consumed) + (sorted(skip) if resumed else [])
        if epoch + 1 < int(t.epochs):  # the next epoch's Ray Data start overlaps with validation and the checkpoint
            ahead[epoch + 1] = ReadAhead(train_shard, **chunk_args(buffer_rows, epoch_seed(int(cfg.run.seed), epoch + 1, rank)))
        metrics: dict[str, Any] = evaluate_loss(engine, val_shard, critic.vocab, limits, batch_size, device, lam)
        metrics.update({"epoch": epoch, "global_step": step, "epoch_steps": epoch_steps, "mid_epoch": 0,
                        RANK_KEY: metrics["val_loss"],
                        "epoch_train_seconds": train_seconds, "epoch_tokens": epoch_tokens,
                        "epoch_first_batch_seconds": first_batch_seconds or 0.0,
                        "epoch_examples": len(set(seen)), "epoch_repeated_examples": len(seen) - len(set(seen))})
        logger.log_metrics({k: v for k, v in metrics.items() if k.startswith("val_") or k.startswith("epoch_")}, step)
        if rank == 0:
            _notify(board, "epoch_done", epoch, float(metrics["val_loss"]))
        checkpoint(DataPosition(epoch, step, epoch_steps, True, world), metrics, export=True)
