"""What Ray Train + DeepSpeed cost per optimizer step, against a bare PyTorch + PEFT loop.

    python benchmarks/train_overhead.py                      # demo preset, 30 steps, 3 repeats
    python benchmarks/train_overhead.py --steps 40 --repeats 5 --workers 1 2
    python benchmarks/train_overhead.py --preset qwen2_5_omni_text   # tiny Qwen2.5-Omni checkpoint

Both paths train the same critic (``build_critic``, same seed, same LoRA), in fp32, on the same
rows: the demo data is prepared once by vcritic's own pipeline (``vcritic.data.pipeline.prepare``)
and both read its train shards.

* bare: one plain process (no Ray, no DeepSpeed). Rows come from the Parquet shards via pandas
  and go through the loop's own ``row_streams`` / ``plan_batches`` / ``collate``; then forward,
  backward, gradient clipping, ``torch.optim.AdamW`` and the learning-rate schedule, with the same
  micro-batch size and gradient accumulation. One epoch of warmup, then the timed epochs.
* vcritic: the real ``TorchTrainer`` from ``vcritic.train.driver._trainer`` (Ray Data shards,
  DeepSpeed ZeRO, Ray Train reporting and checkpoints) with 1 and 2 workers, two epochs of
  ``--steps`` optimizer steps; the first is warmup, the second is timed by the loop itself
  (``epoch_train_seconds``: this rank's step loop, without eval or checkpointing).

An epoch is exactly one shuffle buffer (``train.shuffle_buffer_rows = steps x batch x accum``) so
neither path prepares rows it does not train on. Threads: a Ray worker runs torch with as many
threads as Ray's OMP_NUM_THREADS gives it (floor of its CPU request, at least 1); the bare
process gets that many too (``--bare-threads``), and both print what torch really used.
The ratio is time per optimizer step, vcritic / bare: 1.05 means 5 % overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET = 1.05  # issue 6, item 8: at most 5 % slower per step than the bare loop at one worker


# --- pure helpers ----------------------------------------------------------------------------


def songs_needed(rows: int, clips_per_song: int, kept: float = 0.75) -> int:
    """Demo songs whose clips leave at least ``rows`` train rows after dedup, quarantine and the
    validation split (``kept``: the fraction that survives; the demo set lost 20 % here)."""
    return max(1, math.ceil(rows / (clips_per_song * kept)))


def rates(steps: float, seconds: float, tokens: float, workers: int = 1) -> dict[str, float]:
    """steps/s of one rank and tokens/s of the whole job (every rank trains as many tokens)."""
    return {"steps_per_s": steps / seconds, "tokens_per_s": workers * tokens / seconds,
            "s_per_step": seconds / steps}


def median_spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return float(statistics.median(values)), float(min(values)), float(max(values))


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    """Set environment variables for the block (a spawned child inherits them at start)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- configuration ---------------------------------------------------------------------------


def preset_overrides(preset: str, root: Path) -> list[str]:
    """Extra overrides that make a preset run on this CPU machine (tiny checkpoints from
    ``vcritic.testing`` in the real file layouts for the paper presets)."""
    if preset == "demo":
        return []
    if preset == "qwen2_5_omni_text":
        from vcritic.testing.tiny_qwen_omni import write_tiny_qwen_omni_checkpoint

        path = root / "qwen"
        if not (path / "config.json").exists():
            write_tiny_qwen_omni_checkpoint(path)
        return [f"model.backbone.options.path={path}", "model.backbone.options.dtype=float32"]
    raise SystemExit(f"--preset {preset!r}: this benchmark knows demo and qwen2_5_omni_text")


def make_cfg(args, root: Path, name: str, workers: int, uri: str, preset_extra: list[str]):
    """The job's config for one run: the preset, then this benchmark's settings."""
    from vcritic.config import load

    base = load(args.preset, preset_extra)
    batch = args.batch_size or int(base.train.batch_size)
    accum = args.grad_accum or int(base.train.grad_accum)
    rows = args.steps * batch * accum  # one epoch of one rank = one shuffle buffer
    overrides = [
        *preset_extra,
        f"run.output_dir={root / 'runs'}", f"run.name={name}", f"mlflow.tracking_uri={uri}",
        f"data.demo.songs={songs_needed(rows * max(args.workers), int(base.data.demo.clips_per_song))}",
        "data.val_fraction=0.05", "eval.scq=false",
        f"train.num_workers={workers}", f"train.cpus_per_worker={args.cpus_per_worker}",
        "train.use_gpu=false", "train.precision=fp32", "train.epochs=2",
        f"train.max_steps_per_epoch={args.steps}", f"train.batch_size={batch}", f"train.grad_accum={accum}",
        f"train.shuffle_buffer_rows={rows}", "train.checkpoints_to_keep=2",
    ]
    return load(args.preset, overrides)


def expected_threads(cpus_per_worker: float) -> int:
    """Ray's rule for OMP_NUM_THREADS in a worker that did not set it (ray._private.utils)."""
    return max(math.floor(cpus_per_worker), 1)


# --- the bare loop ---------------------------------------------------------------------------


def bare(job: dict[str, Any]) -> dict[str, Any]:
    """Run the bare loop in a fresh process (its own threads, no Ray state) and return its figures."""
    with env(OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"])):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_bare, (job,))


def _bare(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import pandas as pd
    import torch
    from omegaconf import OmegaConf

    from vcritic.models.build import build_critic
    from vcritic.models.sequence import collate, row_streams
    from vcritic.train.loop import _limits, epoch_seed, lr_factor, plan_batches, total_optimizer_steps

    torch.set_num_threads(int(job["threads"]))
    cfg, p = job["cfg"], job["prepared"]
    t, model_cfg = cfg["train"], cfg["model"]
    torch.manual_seed(int(cfg["run"]["seed"]))
    critic, _ = build_critic(p["backbone_spec"], model_cfg, int(p["audio_codes"]), int(p["audio_feature_dim"]),
                             num_codebooks=int(p["audio_num_codebooks"]))
    critic.float()
    critic.train()
    params = [q for q in critic.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(t["lr"]), weight_decay=float(t["weight_decay"]))
    batch, accum, steps = int(t["batch_size"]), int(t["grad_accum"]), int(t["max_steps_per_epoch"])
    total = total_optimizer_steps(int(p["counts"]["train"]), batch, accum, 1, int(job["epochs"]), steps,
                                  int(t["shuffle_buffer_rows"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, warmup=int(t["warmup_steps"]), total=total,
                                                           schedule=str(t["lr_schedule"]),
                                                           min_ratio=float(t["min_lr_ratio"])))
    rows = pd.read_parquet(p["train_dir"]).to_dict("records")
    typed = OmegaConf.create(cfg)  # the loop's own helper reads the config as the worker has it
    limits = _limits(typed.model, typed.data, float(p["audio_frame_rate"]))
    buffer = int(t["shuffle_buffer_rows"])
    epochs = []
    clock = PhaseClock()
    for epoch in range(int(job["epochs"])):
        seed = epoch_seed(int(cfg["run"]["seed"]), epoch)
        chosen = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))[:buffer]]

        def groups(chosen: list[dict[str, Any]] = chosen, seed: int = seed) -> Iterator[list[Any]]:
            # As epoch_groups does for a buffer: prepare its rows, cut them into length-grouped batches.
            items = [row_streams(r, critic.vocab, limits) for r in chosen]
            for idx in plan_batches([len(x) for x in items], batch, bool(t["group_by_length"]),
                                    np.random.default_rng(seed)):
                yield [items[j] for j in idx]

        start = time.perf_counter()
        done, tokens, loss_sum = 0, 0, 0.0
        for i, streams in enumerate(clock.batches(groups())):
            tensors = collate(streams, critic.vocab)
            t0, c0 = time.perf_counter(), time.thread_time()
            out = critic(**tensors)
            t1, c1 = time.perf_counter(), time.thread_time()
            (out.loss / accum).backward()
            t2, c2 = time.perf_counter(), time.thread_time()
            clock.add("forward", t1 - t0)
            clock.add("backward", t2 - t1)
            clock.add("forward_cpu", c1 - c0)
            clock.add("backward_cpu", c2 - c1)
            loss_sum += float(out.loss.detach())  # a loop that logs its loss reads it every micro-batch too
            tokens += int(tensors["attention_mask"].sum())
            if (i + 1) % accum == 0:
                torch.nn.utils.clip_grad_norm_(params, float(t["grad_clip"]))
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                done += 1
            clock.add("step", time.perf_counter() - t2)
            clock.add("step_cpu", time.thread_time() - c2)
            if done >= steps:
                break
        epochs.append({"epoch": epoch, "steps": done, "seconds": time.perf_counter() - start, "tokens": tokens})
    return {"epochs": epochs, "phases": clock.epochs, "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


# --- the vcritic path -------------------------------------------------------------------------


class PhaseClock:
    """Per-epoch wall times of each micro-batch's phases: ``data`` (waiting on the batch
    generator; the epoch's first wait is its startup), ``forward``, ``backward``, ``step`` and
    ``iter`` (one whole micro-batch, yield to yield). Medians of these survive CPU contention far
    better than an epoch's total."""

    PHASES = ("data", "forward", "backward", "step", "iter", "forward_cpu", "backward_cpu", "step_cpu")
    """``*_cpu``: the CPU time of the training thread in that phase (``time.thread_time``): the
    work done, without the time spent waiting for a core that another process holds."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, list[float]]] = []
        self._last: float | None = None

    def new_epoch(self) -> None:
        self.epochs.append({k: [] for k in self.PHASES})
        self._last = None

    def add(self, phase: str, seconds: float) -> None:
        if self.epochs:
            self.epochs[-1][phase].append(seconds)

    def batches(self, gen: Iterator[Any]) -> Iterator[Any]:
        """``gen``, timing each wait and each whole micro-batch; a new epoch per call."""
        self.new_epoch()
        while True:
            start = time.perf_counter()
            try:
                item = next(gen)
            except StopIteration:
                return
            now = time.perf_counter()
            self.add("data", now - start)
            if self._last is not None:
                self.add("iter", now - self._last)
            self._last = now
            yield item

    def wrap(self, phase: str, fn, only_training: Any = None):
        def timed(*args, **kwargs):
            if only_training is not None and not only_training.training:
                return fn(*args, **kwargs)  # evaluation forwards are not train steps
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - start)
                self.add(f"{phase}_cpu", time.thread_time() - cpu)
        return timed


def _probed_loop(payload: dict[str, Any], probe_dir: str) -> None:
    """vcritic's ``train_loop_per_worker`` unchanged, watched from outside: notes what threads this
    worker's torch has and times each micro-batch's phases (by wrapping the loop module's
    ``epoch_groups`` and the DeepSpeed engine's forward/backward/step in this worker only)."""
    import deepspeed
    import ray.train
    import torch

    import vcritic
    from vcritic.train import loop

    rank = ray.train.get_context().get_world_rank()
    note: dict[str, Any] = {"rank": rank, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                            "torch_threads_start": torch.get_num_threads(), "vcritic": vcritic.__file__}
    clock = PhaseClock()
    groups, initialize = loop.epoch_groups, deepspeed.initialize
    loop.epoch_groups = lambda *a, **k: clock.batches(groups(*a, **k))

    def watched_initialize(*args, **kwargs):
        out = initialize(*args, **kwargs)
        engine = out[0]
        engine.forward = clock.wrap("forward", engine.forward, only_training=engine)
        engine.backward = clock.wrap("backward", engine.backward)
        engine.step = clock.wrap("step", engine.step)
        return out

    deepspeed.initialize = watched_initialize
    try:
        loop.train_loop_per_worker(payload)
    finally:
        loop.epoch_groups, deepspeed.initialize = groups, initialize
        note["torch_threads_end"] = torch.get_num_threads()
        note["phases"] = clock.epochs
        (Path(probe_dir) / f"rank{rank}.json").write_text(json.dumps(note))


def vcritic_fit(cfg, prepared, uri: str, probe_dir: Path) -> dict[str, Any]:
    """One real fit; the per-epoch figures rank 0 reported, the fit's wall time and the probes."""
    from vcritic.train.driver import _trainer

    trainer = _trainer(cfg, prepared, {"tracking_uri": uri, "run_id": ""})  # empty run_id: no MLflow on workers
    trainer.train_loop_per_worker = partial(_probed_loop, probe_dir=str(probe_dir))
    start = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start
    epochs = sorted(({"epoch": int(m["epoch"]), "steps": m["epoch_steps"], "seconds": m["epoch_train_seconds"],
                      "tokens": m["epoch_tokens"]} for _, m in result.best_checkpoints
                     if "epoch_train_seconds" in m), key=lambda e: e["epoch"])
    probes = [json.loads(p.read_text()) for p in sorted(probe_dir.glob("rank*.json"))]
    return {"epochs": epochs, "wall_s": wall, "probes": probes, "phases": probes[0]["phases"]}


# --- report ----------------------------------------------------------------------------------


def timed(epochs: list[dict[str, Any]]) -> dict[str, float]:
    """Sum of the epochs after the first (warmup)."""
    rest = epochs[1:]
    if not rest:
        raise RuntimeError(f"no timed epoch after warmup in {epochs}")
    return {k: float(sum(e[k] for e in rest)) for k in ("steps", "seconds", "tokens")}


def phase_medians(phases: list[dict[str, list[float]]]) -> dict[str, float]:
    """Median seconds per micro-batch of each phase over the epochs after warmup; ``first`` is
    the wait for an epoch's first batch (its startup), left out of ``data`` and ``iter``."""
    rest = phases[1:]
    out = {"first": float(statistics.median(e["data"][0] for e in rest))}
    for phase in PhaseClock.PHASES:
        # The engine's eval forwards (between epochs) land after the train ones: keep one per backward.
        values = [v for e in rest for v in (e["data"][1:] if phase == "data" else
                                            e[phase][: len(e["backward"])] if phase.startswith("forward")
                                            else e.get(phase, []))]
        out[phase] = float(statistics.median(values)) if values else float("nan")
    return out


def fmt(spread: tuple[float, float, float], digits: int) -> str:
    return f"{spread[0]:.{digits}f} ({spread[1]:.{digits}f}-{spread[2]:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per epoch (warmup epoch + timed epoch)")
    parser.add_argument("--batch-size", type=int, default=None, help="micro-batch per worker (default: the preset's)")
    parser.add_argument("--grad-accum", type=int, default=None, help="default: the preset's")
    parser.add_argument("--preset", default="demo", help="demo | qwen2_5_omni_text (tiny checkpoint)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus-per-worker", type=float, default=0.5,
                        help="Ray CPU request of a train worker (the demo preset's 0.5 keeps CPUs for Ray Data)")
    parser.add_argument("--bare-threads", type=int, default=None,
                        help="torch threads of the bare loop (default: what Ray gives a worker)")
    parser.add_argument("--work-dir", default=None, help="keep prepared data here and reuse it (default: a temp dir)")
    args = parser.parse_args()

    import ray

    from vcritic.config import to_dict
    from vcritic.data.pipeline import prepare
    from vcritic.train.driver import WORKER_ENV

    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    threads = args.bare_threads or expected_threads(args.cpus_per_worker)
    with contextlib.ExitStack() as stack:
        root = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        extra = preset_overrides(args.preset, root)
        # Workers import vcritic from this tree, as the driver does.
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {**WORKER_ENV, "PYTHONPATH": str(ROOT)}})
        start = time.perf_counter()
        prepared = prepare(make_cfg(args, root, "prepare", 1, uri, extra))
        print(f"prepared data in {time.perf_counter() - start:.1f} s: {prepared.counts}", flush=True)
        results: dict[tuple[str, int], list[dict[str, Any]]] = {}
        stamp = int(time.time())
        for rep in range(args.repeats):  # the paths interleave, so contention hits each alike
            cfg = make_cfg(args, root, f"bare-r{rep}", 1, uri, extra)
            out = bare({"cfg": to_dict(cfg), "prepared": dict(prepared.__dict__), "threads": threads, "epochs": 2})
            results.setdefault(("bare", 1), []).append(out)
            print(f"[repeat {rep}] bare: {timed(out['epochs'])}, torch threads {out['torch_threads']}", flush=True)
            for workers in args.workers:
                probe = root / "probes" / f"{stamp}-r{rep}-w{workers}"
                probe.mkdir(parents=True, exist_ok=True)
                # A fresh name per fit: a trainer with a used name would resume from its checkpoint.
                cfg = make_cfg(args, root, f"ovh-{stamp}-r{rep}-w{workers}", workers, uri, extra)
                out = vcritic_fit(cfg, prepared, uri, probe)
                results.setdefault(("vcritic", workers), []).append(out)
                print(f"[repeat {rep}] vcritic {workers}w: {timed(out['epochs'])}, fit {out['wall_s']:.1f} s, "
                      f"threads {[(p['omp_num_threads'], p['torch_threads_end']) for p in out['probes']]}", flush=True)
        ray.shutdown()
        report(args, results, threads, prepared)


def report(args, results: dict[tuple[str, int], list[dict[str, Any]]], threads: int, prepared) -> None:
    bare_runs = results[("bare", 1)]
    bare_s = statistics.median(timed(r["epochs"])["seconds"] / timed(r["epochs"])["steps"] for r in bare_runs)
    bare_iter = statistics.median(phase_medians(r["phases"])["iter"] for r in bare_runs)
    print(f"\n{args.preset} preset, fp32 on CPU, micro-batch {args.batch_size or 'of the preset'}, "
          f"{prepared.counts.get('train')} train rows; per run a warmup epoch and a timed epoch of {args.steps} "
          f"optimizer steps each; median of {args.repeats} repeats (min-max)")
    probes = [f"{w} worker(s): OMP_NUM_THREADS={r[0]['probes'][0]['omp_num_threads']}, torch threads "
              f"{r[0]['probes'][0]['torch_threads_end']}" for (path, w), r in results.items() if path == "vcritic"]
    print(f"threads: bare torch.set_num_threads({threads}) -> {bare_runs[0]['torch_threads']} "
          f"(OMP_NUM_THREADS={bare_runs[0]['omp_num_threads']}); Ray workers with cpus_per_worker="
          f"{args.cpus_per_worker}: {'; '.join(probes)}")
    print("\nWhole timed epoch, as the loop reports it (epoch_train_seconds; includes the epoch's data startup)")
    print(f"{'path':<8} {'workers':>7} {'steps/s':>18} {'tokens/s (job)':>20} {'tokens/step':>11} "
          f"{'ratio vs bare':>20} {'fit() wall s':>20}")
    for (path, workers), runs in results.items():
        figs = [rates(**timed(r["epochs"]), workers=workers) for r in runs]
        ratio = median_spread([f["s_per_step"] / bare_s for f in figs])
        tok_step = statistics.median(timed(r["epochs"])["tokens"] / timed(r["epochs"])["steps"] for r in runs)
        wall = fmt(median_spread([r["wall_s"] for r in runs]), 1) if "wall_s" in runs[0] else "-"
        print(f"{path:<8} {workers:>7} {fmt(median_spread([f['steps_per_s'] for f in figs]), 2):>18} "
              f"{fmt(median_spread([f['tokens_per_s'] for f in figs]), 0):>20} {tok_step:>11.0f} "
              f"{fmt(ratio, 2):>20} {wall:>20}")
    print("\nSteady state, median ms per micro-batch (rank 0), and the epoch's first-batch wait in s")
    print(f"{'path':<8} {'workers':>7} {'first batch s':>14} {'data':>7} {'forward':>8} {'backward':>9} "
          f"{'step':>7} {'iter':>7} {'iter ratio':>11}")
    for (path, workers), runs in results.items():
        meds = [phase_medians(r["phases"]) for r in runs]
        m = {k: statistics.median(x[k] for x in meds) for k in meds[0]}
        print(f"{path:<8} {workers:>7} {m['first']:>14.2f} {1e3 * m['data']:>7.1f} {1e3 * m['forward']:>8.1f} "
              f"{1e3 * m['backward']:>9.1f} {1e3 * m['step']:>7.1f} {1e3 * m['iter']:>7.1f} "
              f"{m['iter'] / bare_iter:>11.3f}")
    print("\nCPU time of the training thread, median ms per micro-batch (time.thread_time: work, not waits)")
    print(f"{'path':<8} {'workers':>7} {'forward':>8} {'backward':>9} {'step':>7} {'sum':>7} {'ratio':>7}")
    bare_cpu = statistics.median(sum(phase_medians(r["phases"])[f"{k}_cpu"] for k in ("forward", "backward", "step"))
                                 for r in bare_runs)
    for (path, workers), runs in results.items():
        meds = [phase_medians(r["phases"]) for r in runs]
        m = {k: statistics.median(x[k] for x in meds) for k in meds[0]}
        total = m["forward_cpu"] + m["backward_cpu"] + m["step_cpu"]
        print(f"{path:<8} {workers:>7} {1e3 * m['forward_cpu']:>8.1f} {1e3 * m['backward_cpu']:>9.1f} "
              f"{1e3 * m['step_cpu']:>7.1f} {1e3 * total:>7.1f} {total / bare_cpu:>7.3f}")
    if ("vcritic", 1) in results:
        one = statistics.median(timed(r["epochs"])["seconds"] / timed(r["epochs"])["steps"]
                                for r in results[("vcritic", 1)]) / bare_s
        steady = statistics.median(phase_medians(r["phases"])["iter"] for r in results[("vcritic", 1)]) / bare_iter
        print(f"\ntarget (1 worker, time per step <= {TARGET:.2f}x bare): whole epoch {one:.3f}x "
              f"({'meets' if one <= TARGET else 'misses'}); steady state {steady:.3f}x "
              f"({'meets' if steady <= TARGET else 'misses'})")
    print("caveat: 2 CPU cores shared with other people's jobs and tests; the paths interleave per repeat, "
          "and the medians per micro-batch are the figures that survive contention best")


if __name__ == "__main__":
    main()
