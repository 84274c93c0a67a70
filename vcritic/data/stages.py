"""Per-row work of the data pipeline, written as plain functions over pandas batches.

Each function runs inside Ray Data tasks. Plugins are built once per worker process and
cached (keyed by their spec), so no registration or model load happens per row.
A row that fails gets an ``error`` (the quarantine reason) instead of stopping the job.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vcritic import registry
from vcritic.data import audio
from vcritic.data.schema import Example, RowError, critic_prompt, parse_row

EXAMPLE_COLUMNS = list(Example.__dataclass_fields__)


@functools.lru_cache(maxsize=8)
def _plugin(kind: str, spec_json: str):
    spec = json.loads(spec_json)
    return registry.create(kind, spec["name"], **(spec.get("options") or {}))


def plugin(kind: str, spec: dict[str, Any]):
    """Build (once per process) the plugin described by ``spec``."""
    return _plugin(kind, json.dumps(spec, sort_keys=True))


@functools.lru_cache(maxsize=2)
def _text_tokenizer(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


@functools.lru_cache(maxsize=2)
def _audio_tokenizer(spec_json: str, directory: str):
    tok = _plugin("audio_tokenizers", spec_json)
    tok.load(directory)
    return tok


def _nan_to_none(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _flat(example: Example | None, raw: dict[str, Any], error: str | None, stage: str) -> dict[str, Any]:
    """A row with every Example column (NaN/"" for unparsable rows) plus error bookkeeping."""
    if example is not None:
        row = example.to_row()
    else:
        row = {k: "" for k in EXAMPLE_COLUMNS}
        row.update({"offset_s": 0.0, "target_offset_s": 0.0, "example_id": str(raw.get("example_id") or "")})
    for key in ("duration_s", "target_duration_s"):
        row[key] = float("nan") if row.get(key) in (None, "") else float(row[key])
    row["target_audio_path"] = row.get("target_audio_path") or ""
    row["facts"] = row.get("facts") or ""
    row["error"] = error or ""
    row["stage"] = stage if error else ""
    row["raw"] = json.dumps({k: _nan_to_none(v) for k, v in raw.items()}, default=str)
    return row


def example_of(row: dict[str, Any]) -> Example:
    return parse_row({k: _nan_to_none(row.get(k)) for k in EXAMPLE_COLUMNS})


def validate(batch: pd.DataFrame, sample_rate: int, min_s: float, max_s: float, max_target_s: float) -> pd.DataFrame:
    """Parse each row and decode its audio; bad rows get an ``error``."""
    out = []
    for raw in batch.to_dict("records"):
        raw = {k: _nan_to_none(v) for k, v in raw.items()}
        try:
            example = parse_row(raw)
        except RowError as exc:
            out.append(_flat(None, raw, f"row {raw.get('example_id')!r}: {exc}", "validate"))
            continue
        try:
            music = audio.load(example.music, sample_rate)
            seconds = music.size / sample_rate
            if not min_s <= seconds <= max_s:
                raise audio.AudioError(f"music is {seconds:.2f}s, outside [{min_s}, {max_s}]s")
            if float(np.abs(music).max()) < 1e-4:
                raise audio.AudioError("music is silent")
            if example.target_audio is not None:
                speech = audio.load(example.target_audio, sample_rate)
                if speech.size / sample_rate > max_target_s:
                    raise audio.AudioError(f"target audio is {speech.size / sample_rate:.2f}s, over {max_target_s}s")
        except audio.AudioError as exc:
            out.append(_flat(example, raw, f"example {example.example_id!r}: {exc}", "validate"))
            continue
        out.append(_flat(example, raw, None, "validate"))
    return pd.DataFrame(out)


def separate(batch: pd.DataFrame, spec: dict[str, Any], sources: list[str], sample_rate: int, out_dir: str) -> pd.DataFrame:
    """Remove speech from the music of rows whose source is in ``sources``; the separated
    segment is written to ``out_dir`` and the row points at it."""
    import soundfile as sf

    separator = plugin("separators", spec)
    rows = batch.to_dict("records")
    for row in rows:
        if row["source"] not in sources:
            continue
        ex = example_of(row)
        music = separator.separate(audio.load(ex.music, sample_rate), sample_rate)
        path = Path(out_dir) / f"{ex.example_id}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, music, sample_rate, subtype="FLOAT")
        row.update({"audio_path": str(path), "offset_s": 0.0, "duration_s": music.size / sample_rate})
    return pd.DataFrame(rows)


def embed(batch: pd.DataFrame, spec: dict[str, Any], sample_rate: int) -> pd.DataFrame:
    """Add an ``embedding`` column (audio of the music + the critique text)."""
    embedder = plugin("embedders", spec)
    rows = batch.to_dict("records")
    clips = [audio.load(example_of(r).music, sample_rate) for r in rows]
    vectors = embedder.embed(clips, [r["target_text"] for r in rows], sample_rate)
    batch = batch.copy()
    batch["embedding"] = list(np.asarray(vectors, dtype=np.float32))
    return batch


def tokenize(batch: pd.DataFrame, tokenizer_dir: str, audio_spec: dict[str, Any], audio_dir: str) -> pd.DataFrame:
    """Add the token columns the trainer reads; a row that fails gets an ``error``."""
    text_tok = _text_tokenizer(tokenizer_dir)
    audio_tok = _audio_tokenizer(json.dumps(audio_spec, sort_keys=True), audio_dir)
    rate = audio_tok.sample_rate
    out = []
    for row in batch.to_dict("records"):
        row = dict(row)
        row.pop("embedding", None)
        try:
            ex = example_of(row)
            row["prompt_ids"] = text_tok(critic_prompt(ex.persona, ex.context))["input_ids"]
            row["target_text_ids"] = text_tok(" " + ex.target_text.strip(), add_special_tokens=False)["input_ids"]
            music = audio.load(ex.music, rate)
            row["music_tokens"] = audio_tok.encode(music).astype(np.int64).tolist()
            row["music_features"] = audio_tok.features(music).astype(np.float32).reshape(-1).tolist()
            target = ex.target_audio
            row["target_audio_tokens"] = [] if target is None else audio_tok.encode(audio.load(target, rate)).astype(np.int64).tolist()
        except (RowError, audio.AudioError, ValueError) as exc:
            row.update({"prompt_ids": [], "target_text_ids": [], "music_tokens": [], "music_features": [],
                        "target_audio_tokens": [],
                        "error": f"example {row.get('example_id')!r}: tokenize: {exc}", "stage": "tokenize"})
        out.append(row)
    return pd.DataFrame(out)
