"""Row schema shared by every data stage.

Following lhotse, *where audio is* (:class:`AudioRef`: a file plus a time window) stays
separate from *what the trainer sees* (:class:`Example`). Rows are flat dicts (Parquet
rows for Ray Data); audio bytes are never copied into them, only referenced and loaded
on demand.

Input manifest columns (JSONL or Parquet, one example per row):

===================  ========  ==================================================
column               required  meaning
===================  ========  ==================================================
example_id           yes       unique id (a repeat of an earlier row's id is quarantined)
song_id              yes       grouping key: the 90/10 split never splits a song
source               yes       ``human`` (reaction recordings) or ``mllm``
audio_path           yes       music recording (any format soundfile reads)
offset_s             no        start of the music segment in the recording (0)
duration_s           no        length of the segment (None = to the end)
persona              yes       critic persona prompt
context              no        song facts given to the critic ("")
target_text          yes       the critique text (data.min/max_critique_words words)
target_audio_path    no        recording of the spoken critique (or a hum)
target_offset_s      no        start of the spoken critique (0)
target_duration_s    no        its length (None = to the end)
facts                no        JSON object of checkable facts, used to make SCQs
language             no        BCP-47 tag ("en")
===================  ========  ==================================================
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

SOURCES = ("human", "mllm")
REQUIRED = ("example_id", "song_id", "source", "audio_path", "persona", "target_text")


@dataclass(frozen=True)
class AudioRef:
    """A time window of an audio file; nothing is read until asked."""

    path: str
    offset_s: float = 0.0
    duration_s: float | None = None


@dataclass(frozen=True)
class Example:
    example_id: str
    song_id: str
    source: str
    audio_path: str
    persona: str
    target_text: str
    offset_s: float = 0.0
    duration_s: float | None = None
    context: str = ""
    target_audio_path: str | None = None
    target_offset_s: float = 0.0
    target_duration_s: float | None = None
    facts: str | None = None
    language: str = "en"

    @property
    def music(self) -> AudioRef:
        return AudioRef(self.audio_path, self.offset_s, self.duration_s)

    @property
    def target_audio(self) -> AudioRef | None:
        if not self.target_audio_path:
            return None
        return AudioRef(self.target_audio_path, self.target_offset_s, self.target_duration_s)

    def facts_dict(self) -> dict[str, Any]:
        return json.loads(self.facts) if self.facts else {}

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


class RowError(ValueError):
    """A row that cannot become an :class:`Example`; the message is the quarantine reason."""


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def parse_row(row: dict[str, Any]) -> Example:
    """Turn a raw manifest row into an :class:`Example`.

    Raises:
        RowError: a required field is missing or empty, or a value is out of range.
    """
    missing = [k for k in REQUIRED if _missing(row.get(k))]
    if missing:
        raise RowError(f"missing required field(s) {', '.join(missing)}")
    if row["source"] not in SOURCES:
        raise RowError(f"source {row['source']!r} is not one of {SOURCES}")

    def num(key: str, default: float | None) -> float | None:
        value = row.get(key)
        if _missing(value):
            return default
        try:
            out = float(value)
        except (TypeError, ValueError) as exc:
            raise RowError(f"{key}={value!r} is not a number") from exc
        if out < 0:
            raise RowError(f"{key}={out} is negative")
        return out

    facts = row.get("facts")
    if not _missing(facts):
        facts = facts if isinstance(facts, str) else json.dumps(facts)
        try:
            json.loads(facts)
        except json.JSONDecodeError as exc:
            raise RowError(f"facts is not valid JSON: {exc}") from exc
    else:
        facts = None
    return Example(
        example_id=str(row["example_id"]),
        song_id=str(row["song_id"]),
        source=str(row["source"]),
        audio_path=str(row["audio_path"]),
        persona=str(row["persona"]),
        target_text=str(row["target_text"]),
        offset_s=num("offset_s", 0.0) or 0.0,
        duration_s=num("duration_s", None),
        context="" if _missing(row.get("context")) else str(row["context"]),
        target_audio_path=None if _missing(row.get("target_audio_path")) else str(row["target_audio_path"]),
        target_offset_s=num("target_offset_s", 0.0) or 0.0,
        target_duration_s=num("target_duration_s", None),
        facts=facts,
        language="en" if _missing(row.get("language")) else str(row["language"]),
    )


# Columns the tokenize stage adds; training shards hold Example columns plus these.
TOKEN_COLUMNS = ("prompt_ids", "prompt_tail_ids", "music_positions", "target_text_ids", "music_tokens", "music_features",
                 "native_features", "native_frames", "music_cut_s", "target_audio_tokens")
"""What the tokenize stage adds (lists are flat):

* ``prompt_ids`` / ``prompt_tail_ids``: the prompt before and after the music (a
  :class:`~vcritic.protocols.PromptParts`), ``music_positions``: how many positions the music takes;
* ``music_tokens``: the audio tokenizer's ids of the music ([frames * Q]; empty for a backbone
  that hears only through its own encoder), ``music_features``: the tokenizer's continuous frames
  ([frames * feature_dim]) for vcritic's music encoder;
* ``native_features`` / ``native_frames``: the backbone's own feature-extractor frames
  ([frames * D]) for a backbone that hears natively; ``music_cut_s``: seconds cut off a clip
  longer than that backbone's limit;
* ``target_text_ids``, ``target_audio_tokens`` ([frames * Q]).
"""


def critic_prompt(persona: str, context: str) -> str:
    """The text the critic reads before the music: persona, then song facts."""
    facts = f"\nAbout the song: {context}" if context else ""
    return f"Persona: {persona}{facts}\nListen and critique:"
