"""Throughput of each data-stage operator, at 1 and 2 CPU workers side by side.

Runs the real ``vcritic.data.pipeline.prepare`` on the demo set (reactions off, so every row is
a manifest clip; ``hpss_harmonic`` separation on, so that stage runs too) in a fresh local Ray
with ``num_cpus`` = 1, then 2. Ray Data records, for every operator it finishes, the seconds
spent inside the operator's function (``function_body_time_s``, summed over its tasks) and the
rows it produced; this script reads those records from the session's ``ray-data.log``.

Columns, per operator and worker count:

- ``rows``: rows the operator produced;
- ``fn s``: seconds inside the function, over all tasks (core-seconds of work; Ray Data's
  scheduling, serialisation and worker start-up are not in it);
- ``audio s/s/core``: seconds of music the stage got through (its rows times the mean clip
  length of the manifest's clips that decode) per second of function time, i.e. per busy core;
- (operators that spent under 0.05 s, Ray's own column selects and drops, are left out;)
- and at the end the whole ``prepare()`` wall time and its audio seconds per second per core
  (music seconds / wall / workers), which does include Ray's overheads.

The ratio column is the 2-worker figure over the 1-worker one: per-core throughput that holds
at 2 workers gives ~1.0; the wall-clock speed-up of the whole stage is in the last row.

    python benchmarks/pipeline.py                      # 24 songs x 3 clips of 4 s
    python benchmarks/pipeline.py --songs 48 --clips-per-song 4 --workers 1 2
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
import ray
import soundfile as sf

from vcritic import progress
from vcritic.config import load
from vcritic.data.pipeline import manifest_path, prepare

# One line per finished operator: "Operator TaskPoolMapOperator[MapBatches(curate)] completed.
# Operator Metrics:" then a dict on the next line (Ray 2.60, DEBUG level, always written).
_DONE = re.compile(r"Operator (\w+)\[(.+?)\] completed\. Operator Metrics:")
_FIELD = r"'{}': ([0-9.eE+-]+)"


def operator_records(log_path: Path) -> list[dict]:
    """(operator, function seconds, rows produced) for every operator a Ray Data log says finished."""
    lines = log_path.read_text(errors="replace").splitlines()
    out = []
    for i, line in enumerate(lines[:-1]):
        m = _DONE.search(line)
        if not m or "MapBatches" not in m.group(2):
            continue
        metrics = lines[i + 1]
        fn = re.search(_FIELD.format("function_body_time_s"), metrics)
        rows = re.search(_FIELD.format("rows_task_outputs_generated"), metrics)
        if fn and rows:
            out.append({"operator": m.group(2), "fn_s": float(fn.group(1)), "rows": int(float(rows.group(1)))})
    return out


def music_seconds(manifest: Path) -> tuple[float, int]:
    """Seconds of music in the manifest's clips that decode (the corrupt demo file does not), and
    how many clips that is."""
    total, clips = 0.0, 0
    for path in pd.read_json(manifest, lines=True)["audio_path"]:
        try:
            total += sf.info(str(manifest.parent / path) if not Path(path).is_absolute() else path).duration
            clips += 1
        except (RuntimeError, sf.LibsndfileError):
            pass
    return total, clips


def run(workers: int, args, work: Path) -> tuple[dict, float, tuple[float, int]]:
    out = work / f"w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load("demo", [f"run.output_dir={out}", f"data.demo.songs={args.songs}",
                        f"data.demo.clips_per_song={args.clips_per_song}", "data.demo.reactions=0",
                        f"data.demo.near_duplicates={min(6, args.songs * args.clips_per_song // 4)}",
                        "data.separator.name=hpss_harmonic"])
    audio_s = music_seconds(manifest_path(cfg))  # generates the demo set before the clock starts
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        logs = Path(progress.ray_logs_dir())
        start = time.perf_counter()
        prepare(cfg)
        wall = time.perf_counter() - start
        time.sleep(2)  # the last operator's record is flushed after the dataset returns
        per_op: dict[str, dict] = defaultdict(lambda: {"fn_s": 0.0, "rows": 0})
        for rec in operator_records(logs / "ray-data" / "ray-data.log"):
            per_op[rec["operator"]]["fn_s"] += rec["fn_s"]
            per_op[rec["operator"]]["rows"] += rec["rows"]
    finally:
        ray.shutdown()
    return dict(per_op), wall, audio_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--songs", type=int, default=24)
    parser.add_argument("--clips-per-song", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work-dir", default=None, help="default: a temporary directory, removed afterwards")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="vcritic-bench-pipeline-"))
    try:
        results = {w: run(w, args, work) for w in args.workers}
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    audio_s, clips = next(iter(results.values()))[2]
    clip_s = audio_s / max(clips, 1)
    # Operators doing real work; Ray's own column selects and drops take milliseconds.
    ops = list(dict.fromkeys(op for per_op, _, _ in results.values() for op, rec in per_op.items()
                             if rec["fn_s"] >= 0.05))
    print(f"demo set: {args.songs} songs x {args.clips_per_song} clips: {clips} decodable clips, {audio_s:.0f} s of music")
    head = f"{'operator':44s}" + "".join(f"{f'{w}w rows':>9s}{f'{w}w fn s':>10s}{f'{w}w audio s/s/core':>20s}"
                                          for w in args.workers)
    print(head + (f"{'ratio':>8s}" if len(args.workers) == 2 else ""))

    def rate(w: int, op: str) -> float:
        rec = results[w][0].get(op)
        return rec["rows"] * clip_s / rec["fn_s"] if rec and rec["fn_s"] > 0 else float("nan")

    for op in ops:
        line = f"{op[:44]:44s}"
        for w in args.workers:
            rec = results[w][0].get(op, {"rows": 0, "fn_s": float("nan")})
            line += f"{rec['rows']:9d}{rec['fn_s']:10.2f}{rate(w, op):20.1f}"
        if len(args.workers) == 2:
            line += f"{rate(args.workers[1], op) / rate(args.workers[0], op):8.2f}"
        print(line)
    line = f"{'prepare() wall s / audio s/s/core':44s}"
    for w in args.workers:
        wall = results[w][1]
        line += f"{'':9s}{wall:10.1f}{audio_s / wall / w:20.1f}"
    if len(args.workers) == 2:
        w0, w1 = args.workers
        line += f"{results[w0][1] / results[w1][1]:8.2f}"  # wall-clock speed-up
    print(line)
    print("ratio: per-core throughput at the second worker count over the first; last row: wall speed-up")


if __name__ == "__main__":
    main()
