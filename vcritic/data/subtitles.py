"""Subtitle sidecars of reaction recordings: SRT, WebVTT or a JSON list of cues.

Uploaders often publish subtitles they have checked by hand; when a recording has them they
are a better transcript than ASR, so the reaction stage uses them instead of running ASR.
Every format is read into the same :class:`~vcritic.protocols.Transcript` list an ASR plugin
returns (no word timings), so the segmentation that follows does not care where the text came
from. SRT is parsed by the ``srt`` package and WebVTT by ``webvtt-py``; the JSON form is ours:
``[{"start": 1.0, "end": 2.5, "text": "..."}, ...]`` with times in seconds.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

from vcritic.protocols import Transcript

FORMATS = (".srt", ".vtt", ".json")
_TAG = re.compile(r"<[^>]+>")  # inline markup such as <i>, <b>, <c.colour>, <v Speaker>


class SubtitleError(ValueError):
    """A sidecar that cannot be read; the message names the file and the problem."""


def _clean(text: str) -> str:
    """Cue text as one line of plain words: markup removed, line breaks and runs of spaces joined."""
    return " ".join(_TAG.sub("", text).split())


def _cue(path: str, index: int, start: Any, end: Any, text: Any) -> Transcript:
    try:
        start, end = float(start), float(end)
    except (TypeError, ValueError) as exc:
        raise SubtitleError(f"{path}: cue {index} has non-numeric times ({start!r}, {end!r})") from exc
    if not 0 <= start <= end:
        raise SubtitleError(f"{path}: cue {index} runs from {start} to {end} s; need 0 <= start <= end")
    return Transcript(_clean(str(text or "")), start, end)


def _parse_srt(path: str, text: str) -> list[Transcript]:
    import srt

    try:
        subs = list(srt.parse(text))
    except srt.SRTParseError as exc:
        raise SubtitleError(f"{path}: not valid SRT ({exc})") from exc
    return [_cue(path, s.index, s.start.total_seconds(), s.end.total_seconds(), s.content) for s in subs]


def _parse_vtt(path: str, text: str) -> list[Transcript]:
    import webvtt
    from webvtt.errors import MalformedFileError

    try:
        captions = webvtt.from_buffer(io.StringIO(text))
    except MalformedFileError as exc:
        raise SubtitleError(f"{path}: not valid WebVTT ({exc})") from exc
    # start_in_seconds truncates to whole seconds; the millisecond timestamps keep the precision.
    return [_cue(path, i, c.start_time.in_milliseconds() / 1000.0, c.end_time.in_milliseconds() / 1000.0, c.text)
            for i, c in enumerate(captions, start=1)]


def _parse_json(path: str, text: str) -> list[Transcript]:
    try:
        cues = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SubtitleError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(cues, list) or not all(isinstance(c, dict) for c in cues):
        raise SubtitleError(f'{path}: expected a JSON list of {{"start", "end", "text"}} objects')
    out = []
    for i, cue in enumerate(cues, start=1):
        missing = [k for k in ("start", "end", "text") if k not in cue]
        if missing:
            raise SubtitleError(f"{path}: cue {i} lacks {', '.join(missing)}")
        out.append(_cue(path, i, cue["start"], cue["end"], cue["text"]))
    return out


def read_subtitles(path: str | Path) -> list[Transcript]:
    """The cues of a sidecar, by its suffix (``.srt``, ``.vtt``, ``.json``), in file order.

    Cues with no text left after removing markup are kept out. Times are seconds from the start
    of the recording.

    Raises:
        SubtitleError: unknown suffix, unreadable file, malformed cues or times.
    """
    path = str(path)
    suffix = Path(path).suffix.lower()
    parsers = {".srt": _parse_srt, ".vtt": _parse_vtt, ".json": _parse_json}
    if suffix not in parsers:
        raise SubtitleError(f"{path}: subtitles must be {', '.join(FORMATS)} files, got {suffix or 'no suffix'!r}")
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # -sig: editors often save SRT with a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise SubtitleError(f"{path}: cannot read subtitles ({type(exc).__name__}: {exc})") from exc
    return [cue for cue in parsers[suffix](path, text) if cue.text]
