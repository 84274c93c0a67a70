"""Critique a folder of audio files (or a manifest) with a trained critic, on Ray Data actors.

    python jobs/critique.py MODEL_URI INPUT [preset] [key=value ...]
    python jobs/critique.py models:/vcritic-critic@champion clips/ critique.concurrency=2
    python jobs/critique.py vcritic_runs/export manifest.jsonl critique.persona="A blunt vocal coach."
    ray job submit --working-dir . -- python jobs/critique.py models:/vcritic-critic@champion /data/clips

MODEL_URI is an export directory or an MLflow model URI (``models:/name@alias``, ``runs:/id/critic``).
INPUT is a folder (every audio file under it, by ``critique.extensions``) or a JSONL / CSV manifest
with an ``audio_path`` column (relative to the manifest's folder, or absolute) and optional
``persona``, ``context``, ``id``, ``offset_s``, ``duration_s``. Settings: the ``critique`` section of
vcritic/config.py (plus ``ray`` and ``mlflow``).

Each clip becomes one line of ``critiques.jsonl`` (``id``, ``audio_path``, ``persona``,
``context``, ``critique``, ``speech_path``, ``error``); a clip that cannot be read or critiqued
gets its ``error`` and the job goes on. The spoken critiques are wav files under ``speech/``;
``report.html`` plays each clip beside its spoken critique. Everything is logged as the
artifacts of one MLflow run in ``mlflow.experiment``. On a multi-node cluster,
``critique.output_dir`` must be storage every node reaches (actors write the wavs).
"""

from __future__ import annotations

import csv
import html
import inspect
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

# Run from a checkout without installing: `ray job submit --working-dir .` ships this tree.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("vcritic.critique")

COLUMNS = ("id", "audio_path", "offset_s", "duration_s", "persona", "context")


class InputError(ValueError):
    """INPUT cannot be read as a folder of clips or a manifest; the message says how to fix it."""


# -- inputs ------------------------------------------------------------------------------------
def _row(i: int, path: str, base: Path, persona: str, context: str, raw: dict[str, Any] | None = None) -> dict[str, Any]:
    raw = raw or {}
    audio_path = Path(path) if Path(path).is_absolute() else base / path
    stem = Path(path).with_suffix("").as_posix().replace("/", "__")
    return {"index": i, "id": str(raw.get("id") or f"{i:05d}_{stem}"), "audio_path": str(audio_path),
            "offset_s": float(raw.get("offset_s") or 0.0),
            "duration_s": float(raw["duration_s"]) if raw.get("duration_s") not in (None, "") else -1.0,
            "persona": str(raw.get("persona") or persona), "context": str(raw.get("context") or context)}


def read_inputs(source: str | Path, persona: str, context: str, extensions: list[str]) -> list[dict[str, Any]]:
    """The clips to critique, one row each (see the module docstring).

    Raises:
        InputError: INPUT does not exist, holds no audio, or is a manifest without ``audio_path``.
    """
    src = Path(source)
    if src.is_dir():
        exts = {e.lower().lstrip(".") for e in extensions}
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in exts)
        if not files:
            raise InputError(f"{src} holds no audio files with extensions {sorted(exts)}; "
                             f"set critique.extensions or point INPUT at a manifest")
        return [_row(i, p.relative_to(src).as_posix(), src, persona, context) for i, p in enumerate(files)]
    if not src.is_file():
        raise InputError(f"INPUT {src} does not exist; give a folder of audio files or a JSONL/CSV manifest")
    if src.suffix.lower() in (".jsonl", ".json"):
        records = []
        for n, line in enumerate(src.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{src} line {n} is not JSON ({exc}); one object per line") from exc
    elif src.suffix.lower() == ".csv":
        with src.open(newline="") as fh:
            records = list(csv.DictReader(fh))
    else:
        raise InputError(f"INPUT {src} is neither a folder nor a .jsonl/.csv manifest")
    if not records or any(not r.get("audio_path") for r in records):
        raise InputError(f"{src}: every manifest row needs an audio_path (columns: {', '.join(COLUMNS)})")
    return [_row(i, str(r["audio_path"]), src.parent, persona, context, r) for i, r in enumerate(records)]


# -- the Ray Data actor ------------------------------------------------------------------------
def _accepted(fn, options: dict[str, Any]) -> dict[str, Any]:
    """The keyword options ``fn`` takes (critics differ in their generation keywords)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return options
    return {k: v for k, v in options.items() if k in params}


class CritiqueActor:
    """Holds one critic; turns a batch of rows into critiques and speech files (a Ray Data
    ``map_batches`` callable class: built once per actor)."""

    def __init__(self, model_uri: str, tracking_uri: str | None, speech_dir: str, options: dict[str, Any],
                 device: str) -> None:
        if tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
        from vcritic.reward import load_critic

        self.critic = load_critic(model_uri, device)
        self.speech_dir = Path(speech_dir)
        self.options = {k: v for k, v in options.items() if v is not None}

    @property
    def _rate(self) -> int:
        hearing = self.critic.hearing
        return int(hearing.sample_rate if hearing is not None else self.critic.audio_tokenizer.sample_rate)

    def _load(self, row: dict[str, Any]):
        from vcritic.data import audio
        from vcritic.data.schema import AudioRef

        duration = None if float(row["duration_s"]) < 0 else float(row["duration_s"])
        return audio.load(AudioRef(row["audio_path"], float(row["offset_s"]), duration), self._rate)

    def _critiques(self, items: list[tuple[Any, str, str]]) -> list[Any]:
        """``critic.critique_batch`` when the critic has it, else one ``critique`` per clip."""
        batch = getattr(self.critic, "critique_batch", None)
        if batch is not None and len(items) > 1:
            try:
                return list(batch(items, **_accepted(batch, self.options)))
            except Exception:  # noqa: BLE001 - one bad clip must not fail the batch: retry one by one
                log.warning("critique_batch failed; critiquing the %d clips one by one", len(items), exc_info=True)
        one = self.critic.critique
        return [one(a, p, c, **_accepted(one, self.options)) for a, p, c in items]

    def __call__(self, batch):
        import numpy as np
        import soundfile as sf

        rows = batch.to_dict("records")
        out = [{**r, "critique": "", "speech_path": "", "error": "", "seconds": 0.0} for r in rows]
        ok: list[int] = []
        items = []
        for i, row in enumerate(rows):
            try:
                items.append((self._load(row), row["persona"], row["context"]))
                ok.append(i)
            except Exception as exc:  # noqa: BLE001 - recorded per clip, never fatal
                out[i]["error"] = f"load: {exc}"
        start = time.perf_counter()
        results: list[Any] = []
        try:
            results = self._critiques(items)
        except Exception:  # noqa: BLE001 - isolate the clip that fails
            for a, p, c in items:
                try:
                    results.append(self._critiques([(a, p, c)])[0])
                except Exception as exc:  # noqa: BLE001
                    results.append(exc)
        per_clip = (time.perf_counter() - start) / max(1, len(items))
        for i, result in zip(ok, results, strict=True):
            if isinstance(result, Exception):
                out[i]["error"] = f"critique: {type(result).__name__}: {result}"
                continue
            out[i].update(critique=result.text, seconds=per_clip)
            speech = np.asarray(result.speech, dtype=np.float32)
            if speech.size:
                path = self.speech_dir / f"{rows[i]['id']}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(path, speech, int(result.sample_rate))
                out[i]["speech_path"] = str(path)
        import pandas as pd

        return pd.DataFrame(out)


# -- outputs -----------------------------------------------------------------------------------
def _rel(path: str, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return Path(path).resolve().as_uri()


def write_outputs(rows: list[dict[str, Any]], out: Path, model_uri: str, copy_clips: bool) -> dict[str, Path]:
    """``critiques.jsonl`` and ``report.html`` in ``out`` (clips copied to ``clips/`` with ``copy_clips``,
    so the report plays them from the MLflow artifacts too)."""
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "critiques.jsonl"
    with jsonl.open("w") as fh:
        for r in rows:
            line = {k: r[k] for k in ("id", "audio_path", "persona", "context", "critique", "error")}
            line["speech_path"] = _rel(r["speech_path"], out) if r["speech_path"] else ""
            fh.write(json.dumps(line) + "\n")
    cells = []
    for r in rows:
        clip_src = r["audio_path"]
        if copy_clips and Path(clip_src).is_file():
            dest = out / "clips" / f"{r['id']}{Path(clip_src).suffix}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(clip_src, dest)
            clip_src = str(dest)
        clip = f'<audio controls preload="none" src="{html.escape(_rel(clip_src, out))}"></audio>'
        spoken = (f'<audio controls preload="none" src="{html.escape(_rel(r["speech_path"], out))}"></audio>'
                  if r["speech_path"] else "")
        text = f'<span class="error">{html.escape(r["error"])}</span>' if r["error"] else html.escape(r["critique"])
        cells.append(f"<tr><td>{html.escape(r['id'])}</td><td>{clip}</td><td>{html.escape(r['persona'])}</td>"
                     f"<td>{text}</td><td>{spoken}</td></tr>")
    failed = sum(1 for r in rows if r["error"])
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>vcritic critiques</title><style>"
            "body{font-family:sans-serif}td{vertical-align:top;padding:4px;border-bottom:1px solid #ddd}"
            ".error{color:#b00}</style></head><body>"
            f"<h1>Critiques by {html.escape(model_uri)}</h1><p>{len(rows)} clips, {failed} failed.</p>"
            "<table><tr><th>clip</th><th>audio</th><th>persona</th><th>critique</th><th>spoken critique</th></tr>"
            + "".join(cells) + "</table></body></html>")
    report = out / "report.html"
    report.write_text(page)
    return {"jsonl": jsonl, "report": report}


# -- the job -----------------------------------------------------------------------------------
def run(model_uri: str, source: str, cfg) -> dict[str, Any]:
    """Critique every clip of ``source``; returns a summary (paths, counts, MLflow run id)."""
    import mlflow
    import ray
    import ray.data

    from vcritic import storage
    from vcritic.tracking import tracking_uri
    from vcritic.train.driver import connect_ray  # the training job's: same Ray, same worker env

    c = cfg.critique
    rows = read_inputs(source, c.persona, c.context, list(c.extensions))
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_tracking_uri(uri)
    local_model = Path(model_uri).exists()
    model = str(Path(model_uri).resolve()) if local_model else model_uri
    base = Path(c.output_dir) if c.output_dir else storage.home() / "critiques" if storage.in_ray_job() else \
        Path(cfg.run.output_dir) / "critiques"
    out = (base / time.strftime("%Y%m%d-%H%M%S")).resolve()
    connect_ray(cfg)
    gpus = c.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    options = {"max_text_tokens": c.max_text_tokens, "max_audio_tokens": c.max_audio_tokens, "speak": c.speak}
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    started = time.perf_counter()
    ds = ray.data.from_items(rows).map_batches(
        CritiqueActor, batch_format="pandas", batch_size=int(c.batch_size), concurrency=int(c.concurrency),
        num_gpus=gpus or None, num_cpus=float(c.cpus_per_actor),
        fn_constructor_kwargs={"model_uri": model, "tracking_uri": None if local_model else uri,
                               "speech_dir": str(out / "speech"), "options": options,
                               "device": "cuda" if gpus else "cpu"})
    results = sorted(ds.take_all(), key=lambda r: int(r["index"]))
    wall = time.perf_counter() - started
    paths = write_outputs(results, out, model_uri, bool(c.copy_clips))
    failed = sum(1 for r in results if r["error"])
    mlflow.set_experiment(cfg.mlflow.experiment)
    with mlflow.start_run(run_name=c.run_name) as active:
        mlflow.set_tags({"vcritic.job": "critique", "model_uri": model_uri, "input": str(source)})
        mlflow.log_params({"model_uri": model_uri, "input": str(source), "clips": len(results),
                           "concurrency": c.concurrency, "batch_size": c.batch_size, "gpus_per_actor": gpus,
                           "max_text_tokens": c.max_text_tokens, "max_audio_tokens": c.max_audio_tokens})
        mlflow.log_metrics({"clips": len(results), "clips_failed": failed, "clips_critiqued": len(results) - failed,
                            "wall_seconds": wall, "clips_per_second": len(results) / max(wall, 1e-9)})
        mlflow.log_artifacts(str(out), artifact_path="critiques")
        run_id = active.info.run_id
    return {"output_dir": out, "jsonl": paths["jsonl"], "report": paths["report"], "clips": len(results),
            "failed": failed, "run_id": run_id, "tracking_uri": uri, "experiment": cfg.mlflow.experiment}


def main(argv: list[str]) -> int:
    from vcritic.config import ConfigError, load

    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    model_uri, source, rest = argv[0], argv[1], argv[2:]
    preset, overrides = (rest[0], rest[1:]) if rest and "=" not in rest[0] else ("demo", rest)
    try:
        cfg = load(preset, overrides)
    except ConfigError as exc:
        print(f"vcritic critique: config error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = run(model_uri, source, cfg)
    except (InputError, FileNotFoundError) as exc:
        print(f"vcritic critique: {exc}", file=sys.stderr)
        return 2
    print("\n=== vcritic critiques written ===")
    print(f"clips     : {summary['clips']} ({summary['failed']} failed to load or critique; see their error)")
    print(f"critiques : {summary['jsonl']}")
    print(f"report    : {summary['report']}")
    print(f"MLflow    : {summary['tracking_uri']} experiment={summary['experiment']!r} run_id={summary['run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
