"""Per-row work of the data pipeline, written as plain functions over pandas batches.

Each function runs inside Ray Data tasks. Plugins are built once per worker process and
cached (keyed by their spec), so no registration or model load happens per row.
A row that fails gets an ``error`` (the quarantine reason) instead of stopping the job.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vcritic import registry
from vcritic.data import audio, filters
from vcritic.data.schema import Example, RowError, parse_row

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
    from vcritic.models.build import text_tokenizer

    return text_tokenizer(directory)


@functools.lru_cache(maxsize=2)
def _hearing(backbone_json: str):
    """The backbone's NativeHearing (or None), once per process: it may load a feature extractor."""
    spec = json.loads(backbone_json)
    return plugin("backbones", {"name": spec["name"], "options": spec.get("options") or {}}).native_hearing()


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


ROW_COLUMN = "manifest_row"
"""Added by the manifest reader: each row's 1-based position in manifest order (files by name)."""


def repeated_ids(ids: pd.DataFrame) -> dict[int, str]:
    """Rows whose ``example_id`` an earlier manifest row already has: the first occurrence (smallest
    ``manifest_row``) is kept, every later one gets a quarantine reason.

    Args:
        ids: ``example_id`` and ``manifest_row`` columns, any order (rows without an id are ignored:
            validation quarantines them anyway).
    Returns:
        ``{manifest_row: reason}`` for each later occurrence; deterministic for a given manifest.
    """
    first: dict[str, int] = {}
    reasons: dict[int, str] = {}
    pairs = zip(ids[ROW_COLUMN].astype("int64").tolist(), ids["example_id"].tolist(), strict=True)
    for row, eid in sorted(pairs, key=lambda pair: pair[0]):
        eid = _nan_to_none(eid)
        if eid is None or eid == "":
            continue
        keep = first.setdefault(str(eid), row)
        if keep != row:
            reasons[row] = f"example_id {str(eid)!r} repeats manifest row {keep} (this is row {row}); " \
                           "the first occurrence is kept"
    return reasons


def _check(raw: dict[str, Any], sample_rate: int, min_s: float, max_s: float, max_target_s: float,
           min_words: int, max_words: int, repeats: dict[int, str] | None,
           settings: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray | None]:
    """One manifest row parsed, checked and decoded: (its flat row, its music) or (the row with an
    ``error``, None)."""
    raw = {k: _nan_to_none(v) for k, v in raw.items()}
    row_number = raw.pop(ROW_COLUMN, None)
    try:
        example = parse_row(raw)
    except RowError as exc:
        return _flat(None, raw, f"row {raw.get('example_id')!r}: {exc}", "validate"), None
    if repeats and row_number is not None and int(row_number) in repeats:
        return _flat(example, raw, f"example {example.example_id!r}: {repeats[int(row_number)]}", "validate"), None
    rejected = filters.check_text(example.target_text, example.language, settings, min_words, max_words)
    if rejected is not None:
        return _flat(example, raw, f"example {example.example_id!r}: {rejected.reason()}", "validate"), None
    try:
        music = audio.load(example.music, sample_rate)
        speech = audio.load(example.target_audio, sample_rate) if example.target_audio is not None else None
    except audio.AudioError as exc:
        return _flat(example, raw, f"example {example.example_id!r}: {exc}", "validate"), None
    rejected = filters.check_audio(music, speech, example.source, sample_rate, settings, min_s, max_s, max_target_s)
    if rejected is not None:
        return _flat(example, raw, f"example {example.example_id!r}: {rejected.reason()}", "validate"), None
    return _flat(example, raw, None, "validate"), music


def validate(batch: pd.DataFrame, sample_rate: int, min_s: float, max_s: float, max_target_s: float,
             min_words: int = 1, max_words: int = 5000, repeats: dict[int, str] | None = None,
             filter_settings: dict[str, Any] | None = None) -> pd.DataFrame:
    """Parse each row, check it, decode its audio and run the curation filters on what was decoded
    (:mod:`vcritic.data.filters`); bad rows get an ``error``. :func:`curate` does this and the
    separation and embedding in one pass.

    Args:
        min_words, max_words: allowed length of ``target_text`` in words (see ``filters.tokens``).
        repeats: ``{manifest_row: reason}`` of rows that repeat an earlier row's id (:func:`repeated_ids`).
        filter_settings: ``data.filters`` as a dict; None: the schema's defaults.
    """
    settings = filter_settings if filter_settings is not None else filters.defaults()
    return pd.DataFrame([_check(raw, sample_rate, min_s, max_s, max_target_s, min_words, max_words, repeats,
                                settings)[0] for raw in batch.to_dict("records")])


def _separate_row(row: dict[str, Any], music: np.ndarray, separator, sample_rate: int, out_dir: str) -> np.ndarray:
    """``music`` with the speech removed, written to ``out_dir``; ``row`` is pointed at the file."""
    import soundfile as sf

    music = separator.separate(music, sample_rate)
    path = Path(out_dir) / f"{row['example_id']}.wav"
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, music, sample_rate, subtype="FLOAT")  # float32 on disk: a later decode gives these samples
    row.update({"audio_path": str(path), "offset_s": 0.0, "duration_s": music.size / sample_rate})
    return music


def curate(batch: pd.DataFrame, sample_rate: int, checks: dict[str, Any], embedder: dict[str, Any],
           separator: dict[str, Any] | None = None, sources: Sequence[str] = (), out_dir: str = "",
           cache_dir: str = "") -> pd.DataFrame:
    """:func:`validate`, then separation (when ``separator`` is given) and embedding, with
    each clip decoded once: the samples validation decoded are the ones separated and embedded.

    Args:
        checks: :func:`validate`'s keyword arguments (``min_s`` ... ``filter_settings``).
        embedder, separator: plugin specs; rows whose ``source`` is in ``sources`` are separated into
            ``out_dir``.
        cache_dir: where each finished batch is kept, keyed by a hash of its input rows (the
            directory is per data fingerprint, so the settings are in its name). A rerun after a
            crash reads the batches that finished instead of decoding, separating and embedding them
            again. Empty: no cache.

    Returns:
        every row, with ``error`` set on the bad ones; good rows get their ``embedding``, bad rows a
        zero vector of the same size (drop them before dedup).
    """
    cached = Path(cache_dir) / f"{_batch_key(batch)}.parquet" if cache_dir else None
    if cached is not None and cached.exists():
        return _read_cached(cached)
    out = _curate(batch, sample_rate, checks, embedder, separator, sources, out_dir)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        part = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        out.to_parquet(part, index=False)
        os.replace(part, cached)  # atomic: a crash leaves no half-written batch behind
    return out


def _batch_key(batch: pd.DataFrame) -> str:
    return hashlib.sha256(batch.to_json(orient="records", date_format="iso").encode("utf-8")).hexdigest()[:32]


def _read_cached(path: Path) -> pd.DataFrame:
    out = pd.read_parquet(path)
    out["embedding"] = [np.asarray(v, dtype=np.float32) for v in out["embedding"]]
    return out


def _curate(batch: pd.DataFrame, sample_rate: int, checks: dict[str, Any], embedder: dict[str, Any],
            separator: dict[str, Any] | None, sources: Sequence[str], out_dir: str) -> pd.DataFrame:
    checks = dict(checks)
    settings = checks.pop("filter_settings", None)
    settings = settings if settings is not None else filters.defaults()
    args = {"min_words": 1, "max_words": 5000, "repeats": None, **checks}
    sep = plugin("separators", separator) if separator is not None else None
    rows, clips = [], []
    for raw in batch.to_dict("records"):
        row, music = _check(raw, sample_rate, settings=settings, **args)
        if music is not None and sep is not None and row["source"] in sources:
            music = _separate_row(row, music, sep, sample_rate, out_dir)
        rows.append(row)
        clips.append(music)
    emb = plugin("embedders", embedder)
    good = [i for i, clip in enumerate(clips) if clip is not None]
    vectors = np.zeros((len(rows), int(emb.dim)), dtype=np.float32)
    if good:
        vectors[good] = emb.embed([clips[i] for i in good], [rows[i]["target_text"] for i in good], sample_rate)
    out = pd.DataFrame(rows)
    out["embedding"] = list(vectors)
    return out


def tokenize(batch: pd.DataFrame, tokenizer_dir: str, audio_spec: dict[str, Any], audio_dir: str,
             backbone_spec: dict[str, Any], max_prompt_tokens: int) -> pd.DataFrame:
    """Add the token columns the trainer reads (``schema.TOKEN_COLUMNS``); a row that fails gets an ``error``.

    A backbone that hears natively gets its own feature-extractor frames of the music (cut to its
    limit, with the seconds cut recorded) and its own prompt layout; any other backbone gets the
    audio tokenizer's ids and frames of the music between vcritic's music tokens.
    """
    from vcritic.models.build import make_vocab, prompt_parts
    from vcritic.models.codebooks import as_frames

    text_tok = _text_tokenizer(tokenizer_dir)
    audio_tok = _audio_tokenizer(json.dumps(audio_spec, sort_keys=True), audio_dir)
    hearing = _hearing(json.dumps(backbone_spec, sort_keys=True))
    q = int(audio_tok.num_codebooks)
    vocab = make_vocab(text_tok, hearing, int(audio_tok.codebook_size), int(audio_tok.feature_dim), q)
    rate = audio_tok.sample_rate
    out = []
    for row in batch.to_dict("records"):
        row = dict(row)
        row.pop("embedding", None)
        try:
            ex = example_of(row)
            parts = prompt_parts(text_tok, hearing, vocab, ex.persona, ex.context, max_prompt_tokens)
            row["prompt_ids"], row["prompt_tail_ids"] = list(parts.before_music), list(parts.after_music)
            row["target_text_ids"] = text_tok(" " + ex.target_text.strip(), add_special_tokens=False)["input_ids"]
            row.update(music_columns(ex.music, hearing, audio_tok))
            target = ex.target_audio
            row["target_audio_tokens"] = [] if target is None else \
                as_frames(audio_tok.encode(audio.load(target, rate)), q).reshape(-1).tolist()
        except (RowError, audio.AudioError, ValueError) as exc:
            row.update({"prompt_ids": [], "prompt_tail_ids": [], "music_positions": 0, "target_text_ids": [],
                        "music_tokens": [], "music_features": [], "native_features": [], "native_frames": 0,
                        "music_cut_s": 0.0, "target_audio_tokens": [],
                        "error": f"example {row.get('example_id')!r}: tokenize: {exc}", "stage": "tokenize"})
        out.append(row)
    return pd.DataFrame(out)


def music_columns(ref, hearing, audio_tok) -> dict[str, Any]:
    """The music at ``ref`` (an :class:`~vcritic.data.schema.AudioRef`, or mono samples at the rate
    the critic reads) as the critic hears it: the music columns of ``schema.TOKEN_COLUMNS``."""
    from vcritic.models.codebooks import as_frames

    q = int(audio_tok.num_codebooks)

    def load(rate: int) -> np.ndarray:
        return np.asarray(ref, dtype=np.float32) if isinstance(ref, np.ndarray) else audio.load(ref, rate)

    if hearing is None:
        music = load(audio_tok.sample_rate)
        ids = as_frames(audio_tok.encode(music), q)
        frames = audio_tok.features(music)[: len(ids)]
        return {"music_tokens": ids.reshape(-1).tolist(), "music_positions": len(ids),
                "music_features": frames.astype(np.float32).reshape(-1).tolist(), "native_features": [],
                "native_frames": 0, "music_cut_s": 0.0}
    samples = load(int(hearing.sample_rate))
    limit = int(float(hearing.max_seconds) * int(hearing.sample_rate))
    cut_s = max(0, samples.size - limit) / int(hearing.sample_rate)
    samples = samples[:limit]
    feats = np.asarray(hearing.features(samples), dtype=np.float32)
    n = int(hearing.num_audio_tokens(len(feats)))
    ids: list[int] = []
    if hearing.uses_audio_tokens:
        # The same cut clip, decoded again only when the tokenizer reads another sample rate.
        music = samples if audio_tok.sample_rate == int(hearing.sample_rate) else \
            load(audio_tok.sample_rate)[: int(float(hearing.max_seconds) * audio_tok.sample_rate)]
        grid = as_frames(audio_tok.encode(music), q)
        if len(grid) == 0:
            raise ValueError("the audio tokenizer gave no frames for the music")
        # Align the tokenizer's frames with the encoder's positions (they differ by rounding at the clip end).
        grid = grid[:n] if len(grid) >= n else np.concatenate([grid, np.repeat(grid[-1:], n - len(grid), axis=0)])
        ids = grid.reshape(-1).tolist()
    return {"music_tokens": ids, "music_positions": n, "music_features": [],
            "native_features": feats.reshape(-1).tolist(), "native_frames": len(feats), "music_cut_s": float(cut_s)}
