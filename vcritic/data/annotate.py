"""The MLLM stage: song clips → an annotator's critiques, one per (clip, persona) → example rows.

``data.annotate.manifest`` lists song clips, one JSONL/Parquet row each:

============  ========  ============================================================
column        required  meaning
============  ========  ============================================================
audio_path    yes       the recording (any format soundfile reads)
song_id       yes       grouping key (the split never separates a song's rows)
clip_id       no        stable id of the clip (default: song_id + a hash of the window)
offset_s      no        start of the clip in the recording (0)
duration_s    no        its length (None: to the end)
context       no        what is known about the song, as text
metadata      no        the same as a mapping (title, artist, genre, era, ...) or its JSON
personas      no        persona ids from the library (a list, or comma-separated text);
                        default: ``data.annotate.personas_per_clip`` drawn by seed
facts         no        JSON of checkable facts, passed on to the rows (SCQ questions)
============  ========  ============================================================

Each request goes to the annotator plugin from a Ray Data task. Its reply is cached in
``data.annotate.cache_dir`` under a hash of everything that shapes it (the decoded audio, the
prompt, the model and its settings), so rerunning the stage, or preparing the data again with
other settings, sends no request twice. A reply that fails after the plugin's own retries
becomes a quarantined row (stage ``annotate``, with the reason); the job goes on unless more
than ``data.annotate.max_failures_fraction`` of the requests fail.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
from ray.data.expressions import col

from vcritic import storage
from vcritic.config import to_dict
from vcritic.data import audio, personas, stages
from vcritic.data.schema import AudioRef, Example

log = logging.getLogger(__name__)
STAGE = "annotate"
CACHE_FORMAT = 1  # bump when the cache key's recipe changes
QUARANTINE_COLUMNS = ["example_id", "stage", "error", "raw"]
TRANSPORT_OPTIONS = {"timeout", "max_retries", "initial_delay", "max_delay", "max_retry_after", "api_key_env"}
"""Plugin options that change how a request is sent, not what it answers: left out of the cache key."""


class AnnotateError(RuntimeError):
    """The stage cannot run (bad manifest, annotator that cannot be built) or too many requests failed."""


@dataclass
class Annotated:
    """What the stage adds to the pipeline."""

    rows: ray.data.Dataset | None
    """Example rows (source "mllm", ``manifest_row`` after the main manifest's); None if none."""
    failed: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=QUARANTINE_COLUMNS))
    """Quarantine rows of clips or requests that failed."""
    counts: dict[str, int] = field(default_factory=dict)
    """annotate_requested (requests sent), annotate_cached (replies read from the cache),
    annotate_failed (quarantined rows), annotate_rows (example rows made)."""


def cache_dir(cfg) -> Path:
    if cfg.data.annotate.cache_dir:
        return Path(cfg.data.annotate.cache_dir)
    return storage.staging_dir(storage.resolve_output_dir(str(cfg.run.output_dir))) / "annotate_cache"


def hash_inputs(h, cfg) -> None:
    """Feed what the stage reads into the pipeline's fingerprint: the clip manifest's bytes, its
    audio files' identities and the persona library's bytes (the settings are hashed with the
    rest of ``data``)."""
    from vcritic.data import pipeline

    if not cfg.data.annotate.manifest:
        return
    manifest = _manifest(cfg)
    pipeline._hash_manifest(h, manifest)
    pipeline.hash_audio_files(h, pipeline._audio_paths(manifest))
    h.update(Path(cfg.data.personas or personas.DEFAULT_PATH).read_bytes())


def _manifest(cfg) -> Path:
    path = Path(cfg.data.annotate.manifest)
    if not path.exists():
        raise AnnotateError(f"data.annotate.manifest={cfg.data.annotate.manifest!r} does not exist; give a "
                            f"JSONL/Parquet of song clips (audio_path, song_id, ...) or leave it unset")
    return path


def add_to(cfg, rows: ray.data.Dataset) -> tuple[ray.data.Dataset, Annotated]:
    """``rows`` (the manifest's, with ``manifest_row``) plus the annotated rows, and the stage's
    quarantine and counts; ``rows`` unchanged when ``data.annotate.manifest`` is unset."""
    if not cfg.data.annotate.manifest:
        return rows, Annotated(None)
    first_row = int(rows.max(stages.ROW_COLUMN) or 0) + 1 if rows.count() else 1
    annotated = run(cfg, first_row)
    if annotated.rows is not None:
        rows = rows.union(annotated.rows).materialize()
    return rows, annotated


def run(cfg, first_row: int) -> Annotated:
    """Annotate every clip of ``data.annotate.manifest`` on Ray Data tasks (needs a running Ray).

    Raises:
        AnnotateError: the manifest or the annotator is unusable, or more than
            ``data.annotate.max_failures_fraction`` of the (clip, persona) pairs failed.
        vcritic.data.personas.PersonaError: the persona library is malformed.
    """
    from vcritic.data import pipeline

    a = cfg.data.annotate
    manifest = _manifest(cfg)
    library = personas.load(cfg.data.personas)
    if a.personas_per_clip > len(library.personas):
        raise AnnotateError(f"data.annotate.personas_per_clip={a.personas_per_clip} but the persona library "
                            f"{library.path} holds only {len(library.personas)}")
    spec = to_dict(a.annotator)
    try:
        stages.plugin("annotators", spec)  # a missing key or bad option fails here, once, not per row
    except Exception as exc:
        raise AnnotateError(f"data.annotate.annotator ({spec['name']!r}) cannot be built: {exc}") from exc
    clips = ray.data.read_datasource(pipeline._ManifestDatasource(pipeline.manifest_files(manifest)))
    n_clips = clips.count()
    if not n_clips:
        return Annotated(None)
    out = clips.repartition(max(1, min(n_clips, 4 * int(a.concurrency)))).map_batches(
        annotate_batch, batch_format="pandas", batch_size=4, concurrency=int(a.concurrency),
        num_cpus=float(a.cpus_per_task), fn_kwargs={
            "spec": spec, "library": library, "per_clip": int(a.personas_per_clip), "seed": int(cfg.run.seed),
            "sample_rate": int(cfg.data.sample_rate), "cache_dir": str(cache_dir(cfg)), "first_row": first_row},
    ).materialize()
    status = out.select_columns(["status", "sent"]).to_pandas()
    failed = out.filter(expr=col("status") == "failed").to_pandas()[QUARANTINE_COLUMNS] \
        if (status["status"] == "failed").any() else pd.DataFrame(columns=QUARANTINE_COLUMNS)
    total = len(status)
    counts = {"annotate_requested": int(status["sent"].sum()), "annotate_cached": int((status["status"] == "cached").sum()),
              "annotate_failed": len(failed), "annotate_rows": total - len(failed)}
    log.info("annotate: %d rows (%d requests sent, %d replies from the cache, %d failed)",
             counts["annotate_rows"], counts["annotate_requested"], counts["annotate_cached"], len(failed))
    if total and len(failed) / total > float(a.max_failures_fraction):
        reasons = "; ".join(failed["error"].head(3))
        raise AnnotateError(f"{len(failed)} of {total} annotations failed, over data.annotate.max_failures_fraction="
                            f"{a.max_failures_fraction} (is the endpoint up and the key right?); first: {reasons}")
    ok = out.filter(expr=col("status") != "failed").drop_columns(["status", "sent", "error", "raw", "stage"]) \
        if counts["annotate_rows"] else None
    return Annotated(ok.materialize() if ok is not None else None, failed, counts)


# ----------------------------------------------------------------------------- per task


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


def _context(row: dict[str, Any]) -> str:
    """``context`` text plus ``metadata`` rendered as "key: value" pairs (a mapping or its JSON)."""
    parts = [] if _missing(row.get("context")) else [str(row["context"]).strip()]
    meta = row.get("metadata")
    if isinstance(meta, str) and not _missing(meta):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            parts.append(meta.strip())
            meta = None
    if isinstance(meta, dict):
        parts.append("; ".join(f"{k}: {v}" for k, v in meta.items() if not _missing(v)))
    return ". ".join(p for p in parts if p)


def _persona_ids(row: dict[str, Any]) -> list[str] | None:
    value = row.get("personas")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        ids = [v.strip() for v in value.split(",") if v.strip()]
    else:
        ids = [str(v).strip() for v in list(value)]
    return ids or None


def _num(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if _missing(value):
        return None
    out = float(value)
    if out < 0 or math.isnan(out):
        raise ValueError(f"{key}={value!r} must be a non-negative number")
    return out


def _clip_id(row: dict[str, Any], offset: float, duration: float | None) -> str:
    if not _missing(row.get("clip_id")):
        return str(row["clip_id"])
    window = hashlib.sha256(json.dumps([str(row["audio_path"]), offset, duration]).encode()).hexdigest()[:10]
    return f"{row['song_id']}-{window}"


def cache_key(annotator: Any, spec: dict[str, Any], samples: np.ndarray, sample_rate: int, context: str,
              persona: str) -> str:
    """Hash of what shapes the reply: the decoded clip, the prompt, the model and its settings.

    A plugin's ``request_identity(context, persona)`` (the first-party ones have it) gives the
    prompt and settings it really sends; for another plugin its spec stands in (transport
    options such as timeouts left out)."""
    if hasattr(annotator, "request_identity"):
        identity = annotator.request_identity(context, persona)
    else:
        options = {k: v for k, v in (spec.get("options") or {}).items() if k not in TRANSPORT_OPTIONS}
        identity = {"plugin": spec["name"], "options": options, "context": context, "persona": persona}
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "plugin": spec["name"], "sample_rate": sample_rate,
                                   "request": identity}, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(samples, dtype=np.float32).tobytes())
    return h.hexdigest()


def _cached(directory: str, key: str) -> str | None:
    path = Path(directory) / key[:2] / f"{key}.json"
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["text"])
    except (OSError, ValueError, KeyError):
        return None  # absent, or a torn/foreign file: ask again


def _store(directory: str, key: str, text: str, meta: dict[str, Any]) -> None:
    path = Path(directory) / key[:2] / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"text": text, **meta}, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)  # never a half-written reply under the final name


def _failure(example_id: str, raw: dict[str, Any], error: str, row_number: int, sent: bool) -> dict[str, Any]:
    return {"example_id": example_id, "song_id": str(raw.get("song_id") or ""), "stage": STAGE, "error": error,
            "status": "failed", "sent": sent,
            "raw": json.dumps(raw, default=str, ensure_ascii=False), stages.ROW_COLUMN: row_number}


def annotate_batch(batch: pd.DataFrame, spec: dict[str, Any], library: personas.PersonaLibrary, per_clip: int,
                   seed: int, sample_rate: int, cache_dir: str, first_row: int) -> pd.DataFrame:
    """Each clip of ``batch`` × its personas → one row: an Example (status "requested" or
    "cached") or a quarantine record (status "failed", stage "annotate", the reason)."""
    annotator = stages.plugin("annotators", spec)
    stride = len(library.personas)  # a clip has at most this many distinct personas
    out: list[dict[str, Any]] = []
    for raw in batch.to_dict("records"):
        clip_row = int(raw.pop(stages.ROW_COLUMN))
        raw = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in raw.items()}
        raw = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in raw.items()}
        base = first_row + (clip_row - 1) * stride
        label = raw.get("clip_id") or f"clip row {clip_row}"
        try:
            missing = [k for k in ("audio_path", "song_id") if _missing(raw.get(k))]
            if missing:
                raise ValueError(f"missing required field(s) {', '.join(missing)}")
            offset, duration = _num(raw, "offset_s") or 0.0, _num(raw, "duration_s")
            clip_id = _clip_id(raw, offset, duration)
            label = clip_id
            ids = _persona_ids(raw)
            if ids is None:
                chosen = library.choose(per_clip, clip_id, seed)
            else:
                if len(set(ids)) != len(ids):
                    raise ValueError(f"personas {ids} repeat an id")
                try:
                    chosen = [library.get(i) for i in ids]
                except KeyError as exc:
                    raise ValueError(exc.args[0]) from None
            samples = audio.load(AudioRef(str(raw["audio_path"]), offset, duration), sample_rate)
        except (ValueError, audio.AudioError) as exc:
            out.append(_failure(str(label), raw, f"clip {label!r}: {exc}", base, False))
            continue
        context = _context(raw)
        facts = None if _missing(raw.get("facts")) else \
            (raw["facts"] if isinstance(raw["facts"], str) else json.dumps(raw["facts"]))
        for j, persona in enumerate(chosen):
            example_id = f"{clip_id}-{persona.id}"
            text_persona = persona.text()
            key = cache_key(annotator, spec, samples, sample_rate, context, text_persona)
            reply, status = _cached(cache_dir, key), "cached"
            if reply is None:
                try:
                    reply = annotator.annotate(samples, sample_rate, context, text_persona)
                except Exception as exc:  # noqa: BLE001 - any plugin failure is recorded, the job goes on
                    out.append(_failure(example_id, {**raw, "persona_id": persona.id},
                                        f"example {example_id!r}: request failed: {type(exc).__name__}: {exc}", base + j, True))
                    continue
                reply, status = str(reply).strip(), "requested"
                if reply:
                    _store(cache_dir, key, reply, {"example_id": example_id, "persona_id": persona.id,
                                                   "plugin": spec["name"]})
            if not reply:
                out.append(_failure(example_id, {**raw, "persona_id": persona.id},
                                    f"example {example_id!r}: the annotator returned no text", base + j, status == "requested"))
                continue
            example = Example(example_id=example_id, song_id=str(raw["song_id"]), source="mllm",
                              audio_path=str(raw["audio_path"]), persona=text_persona, target_text=reply,
                              offset_s=offset, duration_s=duration, context=context, facts=facts,
                              language=persona.language)
            out.append({**example.to_row(), stages.ROW_COLUMN: base + j, "status": status,
                        "sent": status == "requested", "error": "",
                        "stage": "", "raw": ""})
    return _frame(out)


NUMERIC = ("offset_s", "duration_s", "target_offset_s", "target_duration_s")


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One schema for every batch (failed rows lack the Example columns), so blocks concatenate."""
    columns = [*Example.__dataclass_fields__, stages.ROW_COLUMN, "status", "sent", "error", "stage", "raw"]
    frame = pd.DataFrame(rows, columns=columns)
    for key in columns:
        if key in NUMERIC:
            frame[key] = pd.to_numeric(frame[key], errors="coerce").astype("float64")
        elif key == stages.ROW_COLUMN:
            frame[key] = frame[key].astype("int64")
        elif key == "sent":
            frame[key] = frame[key].astype(bool)
        else:
            frame[key] = frame[key].astype(object).where(frame[key].notna(), None)
    return frame
