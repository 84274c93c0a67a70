"""Import chat-style fine-tuning data from other frameworks into vcritic manifest rows, and back.

People who already fine-tune audio LLMs keep their data in one of three shapes, and ``vcritic
import`` reads each of them so that data can train a critic without hand conversion:

``ms-swift``
    One JSON object per line with a ``messages`` list (``role`` system/user/assistant, ``content``
    text) and an ``audios`` list of paths. Each ``<audio>`` tag in the message text stands for the
    next path of ``audios``, in reading order, so the tag count must equal the list's length.
    ``audio`` is accepted for ``audios``, and a single string for a one-item list, as ms-swift does.
``llama-factory``
    The "sharegpt" layout (a message list under ``conversations`` or ``messages``, ``from``/``value``
    with human/gpt, or ``role``/``content`` with user/assistant, an optional ``system`` column or a
    leading system message) and the "alpaca" layout (``instruction`` + ``input`` → user,
    ``output`` → assistant, ``system``; ``history`` pairs are not read, since they hold no audio of
    their own), both with an ``audios`` column and ``<audio>`` tags. Column
    and tag names that differ from these defaults are read from the dataset's ``dataset_info.json``
    entry when one is given. A JSON array file (LLaMA-Factory's usual ``.json``) works as well as JSONL.
``kimi-audio``
    Kimi-Audio's fine-tuning JSONL: ``task_type`` plus a ``conversation`` list whose messages each
    carry ``role``, ``message_type`` (``text`` or ``audio``) and ``content`` (the text, or a path).
    An assistant ``audio`` message is the spoken critique.

How a conversation becomes rows (the choices, and why):

* **One row per answered clip.** vcritic's example is single-turn (prompt + music → critique), so a
  row is made for each assistant turn that answers a user turn holding audio; the first audio of that
  user turn is ``audio_path``. An assistant turn answering a text-only follow-up is skipped (it leans
  on history a row cannot hold) and counted in :attr:`ImportResult.skipped_turns`; further audios in
  the same user turn are counted in :attr:`ImportResult.extra_audios`.
* **Persona and context.** The system text is the persona (``default_persona`` when there is none);
  the user turn's text, with its ``<audio>`` tags removed, is the context (song facts). A user text
  written by :func:`vcritic.data.schema.critic_prompt` (what :func:`export_rows` writes) is split
  back into its persona and context, so import → export → import is lossless.
* **Paths.** A relative audio path resolves against ``audio_root``, by default the input file's own
  directory; rows hold absolute paths. URLs and inline base64 are refused (vcritic reads local files).
* **Language.** ``language`` is the record's metadata tag, else the critique's detected language
  (``language="auto"``), unless a tag is given for the whole file.
* **Ids.** ``example_id`` comes from ``id_column`` when given, otherwise from a sha256 of the record's
  canonical JSON and the turn's position, so re-importing the same file gives the same ids.
  ``song_id`` comes from the audio file's stem (``song_id_from="stem"``), its folder
  (``"parent"``), or any other name as a top-level column of the record.
* **Bad records** (not JSON, no audio, no assistant answer, ``<audio>`` count ≠ ``audios`` length,
  an unknown role, a missing audio file, a row :func:`~vcritic.data.schema.parse_row` refuses) are
  collected as :class:`Reject` with ``file:line`` and the reason; the import carries on.

Exports write the framework's documented shape with the critic's own prompt
(:func:`~vcritic.data.schema.critic_prompt`) as the user message and the music after it, so a model
fine-tuned there reads exactly what vcritic's critic reads. Columns a framework has no place for
(ids, windows, facts, language, a spoken critique outside Kimi-Audio) travel in one extra ``vcritic``
key holding a JSON string; the frameworks ignore unknown keys, and a string keeps their
Arrow-based loaders from tripping over columns that are null in some rows and numbers in others.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from vcritic.data.schema import SOURCES, Example, RowError, critic_prompt, parse_row

FORMATS = ("ms-swift", "llama-factory", "kimi-audio")
DEFAULT_PERSONA = "A music critic who reviews the singing in the clip."
AUDIO_TAG = "<audio>"
META_KEY = "vcritic"
# Example fields the chat shapes have no place for; they ride in the ``vcritic`` key.
META_FIELDS = ("example_id", "song_id", "source", "offset_s", "duration_s", "target_offset_s", "target_duration_s",
               "facts", "language")
_ID_PREFIX = {"ms-swift": "swift", "llama-factory": "lf", "kimi-audio": "kimi"}
_PROMPT_RE = re.compile(r"\APersona: (?P<persona>.*?)(?:\nAbout the song: (?P<context>.*?))?\nListen and critique:\Z",
                        re.DOTALL)


class FormatError(ValueError):
    """A whole input cannot be read (wrong format name, unreadable file, bad dataset_info entry)."""


@dataclass(frozen=True)
class Reject:
    """A record that produced no row: where it is and why."""

    file: str
    line: int
    reason: str
    record: Any = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def to_json(self) -> dict[str, Any]:
        return {"where": self.where, "file": self.file, "line": self.line, "reason": self.reason, "record": self.record}


@dataclass
class ImportResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    records: int = 0
    skipped_turns: int = 0
    extra_audios: int = 0


@dataclass
class ImportOptions:
    """How records become rows; see the module docstring for each choice."""

    source: str | None = None  # None: the record's vcritic metadata, else "mllm"
    song_id_from: str | None = None  # None: metadata, else "stem"; "stem" | "parent" | a column name
    id_column: str | None = None
    default_persona: str = DEFAULT_PERSONA
    language: str = "auto"  # "auto": the record's metadata, else detected from the critique text
    audio_root: str | None = None  # None: the input file's directory
    check_files: bool = True
    # LLaMA-Factory column/tag names (from a dataset_info.json entry); empty = auto-detect.
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    formatting: str | None = None  # "sharegpt" | "alpaca" | None (detect per record)

    def __post_init__(self) -> None:
        if self.source is not None and self.source not in SOURCES:
            raise FormatError(f"source={self.source!r} is not one of {SOURCES}")
        if self.formatting not in (None, "sharegpt", "alpaca"):
            raise FormatError(f"formatting={self.formatting!r}: LLaMA-Factory formats are 'sharegpt' and 'alpaca'")


class _BadRecord(Exception):
    """Raised inside one record's conversion; becomes a :class:`Reject`."""


@dataclass
class _Turn:
    """One user turn (texts + audios) and the assistant answer that follows it."""

    texts: list[str] = field(default_factory=list)
    audios: list[str] = field(default_factory=list)
    answer_texts: list[str] = field(default_factory=list)
    answer_audios: list[str] = field(default_factory=list)


@dataclass
class _Conversation:
    system: str
    turns: list[_Turn]


# ---------------------------------------------------------------- reading files


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def read_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, record)`` from a JSONL file or a JSON array file; a line that is not JSON
    yields a :class:`_BadRecord` as its record so the caller can reject it and go on."""
    text = path.read_text(encoding="utf-8")
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] == "[":
        yield from _array_records(text, start + 1)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, _BadRecord(f"not valid JSON: {exc.msg} (column {exc.colno})")


def _array_records(text: str, pos: int) -> Iterator[tuple[int, Any]]:
    """Walk a JSON array element by element so each record keeps the line it starts on."""
    decoder = json.JSONDecoder()
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield line, _BadRecord(f"not valid JSON: {exc.msg}; the rest of the array cannot be read")
            return
        yield line, record


def load_dataset_info(path: str | Path, name: str | None = None) -> dict[str, Any]:
    """One entry of a LLaMA-Factory ``dataset_info.json`` (``name`` may be omitted when it holds one)."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"cannot read dataset_info {path}: {exc}") from exc
    if not isinstance(info, dict) or not info:
        raise FormatError(f"dataset_info {path} is not a JSON object of dataset entries")
    if name is None:
        if len(info) != 1:
            raise FormatError(f"dataset_info {path} has {len(info)} entries ({', '.join(info)}); name one")
        name = next(iter(info))
    if name not in info:
        raise FormatError(f"dataset_info {path} has no entry {name!r} (it has {', '.join(info)})")
    return info[name]


def options_from_dataset_info(entry: dict[str, Any], **kwargs: Any) -> ImportOptions:
    """:class:`ImportOptions` carrying a dataset_info entry's formatting, columns and tags."""
    return ImportOptions(formatting=entry.get("formatting", "alpaca"), columns=dict(entry.get("columns", {})),
                         tags=dict(entry.get("tags", {})), **kwargs)


# ---------------------------------------------------------------- record → conversation


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _BadRecord(f"{where} is {type(value).__name__}, not text (content blocks are not supported)")
    return value


def _audio_list(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise _BadRecord(f"'{key}' must be a list of paths")


def _tagged(messages: list[tuple[str, str]], audios: list[str], system: str) -> _Conversation:
    """Turn (role, text) messages whose ``<audio>`` tags index ``audios`` into turns."""
    n_tags = sum(text.count(AUDIO_TAG) for _, text in messages)
    if n_tags != len(audios):
        raise _BadRecord(f"{n_tags} {AUDIO_TAG} tag(s) but {len(audios)} audio path(s)")
    queue = list(audios)
    turns: list[_Turn] = []
    for role, text in messages:
        if role == "system":
            system = text if not turns else system
            continue
        if role == "assistant":
            if AUDIO_TAG in text:
                raise _BadRecord(f"{AUDIO_TAG} in an assistant turn is not supported")
            if not turns:
                raise _BadRecord("an assistant turn comes before any user turn")
            turns[-1].answer_texts.append(text)
            continue
        if not turns or turns[-1].answer_texts:
            turns.append(_Turn())
        n = text.count(AUDIO_TAG)
        turns[-1].audios.extend(queue[:n])
        del queue[:n]
        turns[-1].texts.append(text.replace(AUDIO_TAG, ""))
    return _Conversation(system=system, turns=turns)


def _swift_conversation(record: dict[str, Any], opts: ImportOptions) -> _Conversation:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRecord("no 'messages' list (ms-swift's standard format)")
    pairs = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise _BadRecord(f"messages[{i}] has no 'role'")
        role = msg["role"]
        if role not in ("system", "user", "assistant"):
            raise _BadRecord(f"messages[{i}] has role {role!r}; only system/user/assistant are supported")
        pairs.append((role, _text(msg.get("content"), f"messages[{i}].content")))
    key = "audios" if "audios" in record else "audio"
    return _tagged(pairs, _audio_list(record.get(key), key), system="")


_LF_USER, _LF_ASSISTANT, _LF_SYSTEM = ("human", "user"), ("gpt", "assistant"), ("system",)


def _lf_conversation(record: dict[str, Any], opts: ImportOptions) -> _Conversation:
    cols = opts.columns
    formatting = opts.formatting
    if formatting is None:
        has_messages = any(isinstance(record.get(k), list) for k in (cols.get("messages"), "conversations", "messages") if k)
        formatting = "sharegpt" if has_messages else "alpaca"
    audios_key = cols.get("audios", "audios")
    audios = _audio_list(record.get(audios_key), audios_key)
    system_key = cols.get("system", "system")
    system = record.get(system_key) or ""
    system = _text(system, f"'{system_key}'")
    if formatting == "alpaca":
        prompt_key, query_key, response_key = cols.get("prompt", "instruction"), cols.get("query", "input"), cols.get("response", "output")
        if not isinstance(record.get(prompt_key), str):
            raise _BadRecord(f"no '{prompt_key}' text (alpaca format) and no message list (sharegpt format)")
        query = [record[prompt_key]] + ([record[query_key]] if record.get(query_key) else [])
        pairs = [("user", "\n".join(_text(q, "the query") for q in query))]
        if record.get(response_key):
            pairs.append(("assistant", _text(record[response_key], f"'{response_key}'")))
        return _tagged(pairs, audios, system)
    messages_key = cols.get("messages") or ("conversations" if "conversations" in record else "messages")
    messages = record.get(messages_key)
    if not isinstance(messages, list) or not messages:
        raise _BadRecord(f"no '{messages_key}' list (sharegpt format)")
    tags = opts.tags
    pairs = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _BadRecord(f"{messages_key}[{i}] is not an object")
        role_tag = tags.get("role_tag") or ("from" if "from" in msg else "role")
        content_tag = tags.get("content_tag") or ("value" if "value" in msg else "content")
        who = msg.get(role_tag)
        user = (tags["user_tag"],) if "user_tag" in tags else _LF_USER
        assistant = (tags["assistant_tag"],) if "assistant_tag" in tags else _LF_ASSISTANT
        system_tag = (tags["system_tag"],) if "system_tag" in tags else _LF_SYSTEM
        role = "user" if who in user else "assistant" if who in assistant else "system" if who in system_tag else None
        if role is None:
            raise _BadRecord(f"{messages_key}[{i}] has {role_tag}={who!r}; only user/assistant/system turns are supported")
        pairs.append((role, _text(msg.get(content_tag), f"{messages_key}[{i}].{content_tag}")))
    return _tagged(pairs, audios, system)


def _kimi_conversation(record: dict[str, Any], opts: ImportOptions) -> _Conversation:
    messages = record.get("conversation")
    if not isinstance(messages, list) or not messages:
        raise _BadRecord("no 'conversation' list (Kimi-Audio fine-tuning format)")
    system, turns = "", []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _BadRecord(f"conversation[{i}] is not an object")
        role, kind = msg.get("role"), msg.get("message_type")
        if kind not in ("text", "audio"):
            raise _BadRecord(f"conversation[{i}] has message_type {kind!r}; expected 'text' or 'audio'")
        content = _text(msg.get("content"), f"conversation[{i}].content")
        if role == "system":
            if kind != "text":
                raise _BadRecord(f"conversation[{i}] is a system audio message")
            system = content
        elif role == "user":
            if not turns or turns[-1].answer_texts or turns[-1].answer_audios:
                turns.append(_Turn())
            (turns[-1].audios if kind == "audio" else turns[-1].texts).append(content)
        elif role == "assistant":
            if not turns:
                raise _BadRecord("an assistant message comes before any user message")
            (turns[-1].answer_audios if kind == "audio" else turns[-1].answer_texts).append(content)
        else:
            raise _BadRecord(f"conversation[{i}] has role {role!r}; expected user or assistant")
    return _Conversation(system=system, turns=turns)


_READERS = {"ms-swift": _swift_conversation, "llama-factory": _lf_conversation, "kimi-audio": _kimi_conversation}


# ---------------------------------------------------------------- conversation → rows


@lru_cache(maxsize=1)
def _language_identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def guess_language(text: str) -> str:
    """ISO 639-1 code of ``text`` (py3langid, the identifier the language filter uses), so an imported
    Chinese critique is tagged ``zh`` and not dropped by that filter as mislabelled ``en``."""
    return str(_language_identifier().classify(text)[0])


def split_prompt(text: str) -> tuple[str, str] | None:
    """``(persona, context)`` when ``text`` is exactly what :func:`critic_prompt` writes, else None."""
    m = _PROMPT_RE.match(text)
    if not m:
        return None
    persona, context = m.group("persona"), m.group("context") or ""
    return (persona, context) if critic_prompt(persona, context) == text else None


def _resolve(path: str, root: Path, check: bool) -> str:
    if re.match(r"\A(?:[a-zA-Z][a-zA-Z0-9+.-]*://|data:)", path):
        raise _BadRecord(f"audio {path[:60]!r} is not a local file (URLs and inline data are not supported)")
    resolved = Path(path).expanduser()
    resolved = (resolved if resolved.is_absolute() else root / resolved).resolve()
    if check and not resolved.is_file():
        raise _BadRecord(f"audio file {resolved} does not exist (relative paths resolve against {root})")
    return str(resolved)


def _meta(record: dict[str, Any]) -> dict[str, Any]:
    meta = record.get(META_KEY)
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError as exc:
            raise _BadRecord(f"'{META_KEY}' is not valid JSON: {exc.msg}") from exc
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise _BadRecord(f"'{META_KEY}' must be a JSON object")
    return meta


def _song_id(how: str, audio_path: str, record: dict[str, Any]) -> str:
    if how == "stem":
        return Path(audio_path).stem
    if how == "parent":
        return Path(audio_path).parent.name
    value = record.get(how)
    if value is None or value == "":
        raise _BadRecord(f"no '{how}' column for song_id")
    return str(value)


def _record_rows(record: Any, fmt: str, opts: ImportOptions, root: Path, result: ImportResult) -> list[dict[str, Any]]:
    if isinstance(record, _BadRecord):
        raise record
    if not isinstance(record, dict):
        raise _BadRecord(f"a record is a JSON object, not {type(record).__name__}")
    conv = _READERS[fmt](record, opts)
    meta = _meta(record)
    system = conv.system.strip()
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    answered = [t for t in conv.turns if t.answer_texts or t.answer_audios]
    if not answered:
        raise _BadRecord("no assistant turn")
    with_audio = [t for t in answered if t.audios]
    if not with_audio:
        raise _BadRecord("no user audio before an assistant turn")
    rows, extra_audios = [], 0
    for index, turn in enumerate(with_audio):
        if not turn.answer_texts:
            raise _BadRecord("the assistant answers with audio only; a critique text is required")
        extra_audios += len(turn.audios) - 1
        audio_path = _resolve(turn.audios[0], root, opts.check_files)
        user_text = "\n".join(t.strip() for t in turn.texts if t.strip())
        parsed = split_prompt(user_text)
        persona, context = parsed if parsed else (system or opts.default_persona, user_text)
        if opts.id_column:
            if record.get(opts.id_column) in (None, ""):
                raise _BadRecord(f"no '{opts.id_column}' column for example_id")
            example_id = str(record[opts.id_column]) + (f"-{index}" if len(with_audio) > 1 else "")
        elif "example_id" in meta and len(with_audio) == 1:
            example_id = str(meta["example_id"])
        else:
            example_id = f"{_ID_PREFIX[fmt]}-{digest[:16]}-{index}"
        song_how = opts.song_id_from or ("meta" if "song_id" in meta else "stem")
        if song_how == "meta" and "song_id" not in meta:
            raise _BadRecord(f"song_id_from='meta' but the record's '{META_KEY}' has no song_id")
        row: dict[str, Any] = {k: meta[k] for k in META_FIELDS if k in meta}
        row.update(
            example_id=example_id,
            song_id=str(meta["song_id"]) if song_how == "meta" else _song_id(song_how, audio_path, record),
            source=opts.source or meta.get("source") or "mllm",
            audio_path=audio_path,
            persona=persona,
            context=context,
            target_text="\n".join(turn.answer_texts).strip(),
        )
        if opts.language != "auto":
            row["language"] = opts.language
        elif "language" not in meta:
            row["language"] = guess_language(row["target_text"])
        if turn.answer_audios:
            row["target_audio_path"] = _resolve(turn.answer_audios[0], root, opts.check_files)
        elif meta.get("target_audio_path"):
            row["target_audio_path"] = _resolve(str(meta["target_audio_path"]), root, opts.check_files)
        try:
            rows.append(parse_row(row).to_row())
        except RowError as exc:
            raise _BadRecord(f"not a valid vcritic row: {exc}") from exc
    result.skipped_turns += len(answered) - len(with_audio)
    result.extra_audios += extra_audios
    return rows


def import_file(path: str | Path, fmt: str, options: ImportOptions | None = None) -> ImportResult:
    """Read one file of ``fmt`` into rows plus rejects (see the module docstring for the mapping)."""
    _check_format(fmt)
    opts = options or ImportOptions()
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"input {path} does not exist")
    root = Path(opts.audio_root).expanduser().resolve() if opts.audio_root else path.resolve().parent
    result = ImportResult()
    for line, record in read_records(path):
        result.records += 1
        try:
            result.rows.extend(_record_rows(record, fmt, opts, root, result))
        except _BadRecord as exc:
            kept = None if isinstance(record, _BadRecord) else record
            result.rejects.append(Reject(file=str(path), line=line, reason=str(exc), record=kept))
    return result


def import_rows(path: str | Path, fmt: str, rejects: list[Reject] | None = None, **options: Any) -> list[dict[str, Any]]:
    """Rows of a file of ``fmt``; bad records are appended to ``rejects`` when a list is given.

    ``options`` are :class:`ImportOptions` fields (``source``, ``song_id_from``, ``id_column``,
    ``default_persona``, ``language``, ``audio_root``, ``check_files``, ``columns``, ``tags``,
    ``formatting``).
    """
    result = import_file(path, fmt, ImportOptions(**options))
    if rejects is not None:
        rejects.extend(result.rejects)
    return result.rows


# ---------------------------------------------------------------- export


def _meta_json(ex: Example, extra: Iterable[str] = ()) -> str:
    row = ex.to_row()
    meta = {k: row[k] for k in (*META_FIELDS, *extra) if row.get(k) is not None}
    return json.dumps(meta, ensure_ascii=False, sort_keys=True)


def _export_one(ex: Example, fmt: str, include_meta: bool) -> dict[str, Any]:
    prompt = critic_prompt(ex.persona, ex.context)
    if fmt == "kimi-audio":
        conversation = [{"role": "user", "message_type": "text", "content": prompt},
                        {"role": "user", "message_type": "audio", "content": ex.audio_path},
                        {"role": "assistant", "message_type": "text", "content": ex.target_text}]
        if ex.target_audio_path:
            conversation.append({"role": "assistant", "message_type": "audio", "content": ex.target_audio_path})
        out: dict[str, Any] = {"task_type": "speech2speech" if ex.target_audio_path else "understanding",
                               "conversation": conversation}
        extra: tuple[str, ...] = ()
    else:
        out = {"messages": [{"role": "user", "content": prompt + AUDIO_TAG},
                            {"role": "assistant", "content": ex.target_text}],
               "audios": [ex.audio_path]}
        extra = ("target_audio_path",)
    if include_meta:
        out[META_KEY] = _meta_json(ex, extra)
    return out


def export_rows(rows: Iterable[dict[str, Any]], fmt: str, include_meta: bool = True) -> list[dict[str, Any]]:
    """Records of ``fmt`` for manifest rows (each is checked with :func:`parse_row` first).

    Every record has the critic prompt then the music as its user turn and the critique as the
    assistant turn; Kimi-Audio records add the spoken critique as an assistant audio message.
    Paths are written as they are in the rows (absolute after an import): ms-swift asks for
    absolute paths and Kimi-Audio resolves against the working directory.

    Raises:
        RowError: a row is not a valid manifest row (the message says which one).
    """
    _check_format(fmt)
    out = []
    for i, row in enumerate(rows, start=1):
        try:
            ex = parse_row(row)
        except RowError as exc:
            raise RowError(f"manifest row {i} ({row.get('example_id', '?')}): {exc}") from exc
        out.append(_export_one(ex, fmt, include_meta))
    return out


def llama_factory_entry(file_name: str) -> dict[str, Any]:
    """The dataset_info.json entry LLaMA-Factory needs to load an exported file."""
    return {"file_name": file_name, "formatting": "sharegpt",
            "columns": {"messages": "messages", "audios": "audios"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                     "system_tag": "system"}}


# ---------------------------------------------------------------- files


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def rejects_path(output: Path) -> Path:
    """Where the rejects of an import into ``output`` go: beside it, ``<stem>.rejects.jsonl``."""
    return output.with_name(output.stem + ".rejects.jsonl")


def write_import(input_path: str | Path, output: str | Path, fmt: str,
                 options: ImportOptions | None = None) -> ImportResult:
    """Import ``input_path`` and write the manifest (JSONL) plus its rejects file (always written, so
    a stale one from an earlier run never lingers)."""
    output = Path(output)
    if output.suffix != ".jsonl":
        raise FormatError(f"output {output} must end in .jsonl (a vcritic manifest)")
    result = import_file(input_path, fmt, options)
    write_jsonl(output, result.rows)
    write_jsonl(rejects_path(output), (r.to_json() for r in result.rejects))
    return result


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a vcritic manifest (JSONL, or Parquet read with pyarrow)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"manifest {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    for line, record in read_records(path):
        if isinstance(record, _BadRecord):
            raise FormatError(f"{path}:{line}: {record}")
        rows.append(record)
    return rows


def write_export(manifest: str | Path, output: str | Path, fmt: str, include_meta: bool = True) -> int:
    """Export a manifest to ``output`` in ``fmt``; returns the record count.

    For LLaMA-Factory the entry that loads the file is also merged into ``dataset_info.json``
    beside it (under the file's stem), since LLaMA-Factory reads nothing without one.
    """
    output = Path(output)
    records = export_rows(read_manifest(manifest), fmt, include_meta=include_meta)
    n = write_jsonl(output, records)
    if fmt == "llama-factory":
        info_path = output.with_name("dataset_info.json")
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
        info[output.stem] = llama_factory_entry(output.name)
        info_path.write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return n
