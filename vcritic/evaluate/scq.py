"""Single-choice questions (SCQ) about clips: a benchmark of what a critic hears.

Where questions come from
-------------------------
* **A JSONL file in the public benchmark format**, one question per line::

      {"audio_path": "clips/0001.wav", "question": "Which technique ...?",
       "options": ["falsetto", "belting", "vibrato", "growl"], "answer": "C",
       "category": "vocal technique"}

  ``audio_path`` is relative to the file's folder (or absolute); ``options`` may hold 2 to 26
  choices; ``answer`` is the letter of the right one; ``category`` is optional (any string,
  e.g. vocal technique, emotion & expression, musical knowledge, instrumentation). vcritic
  also reads, when present: ``id`` (names the question in reports), ``persona`` and
  ``context`` (the prompt the critic reads; default :data:`DEFAULT_PERSONA` and none),
  ``stem`` (the words an answer continues in ``loglik`` mode, default :data:`ANSWER_PREFIX`),
  ``offset_s`` / ``duration_s`` (a window of the file). See :func:`load_questions`.
* **vcritic's own bank** over tokenized held-out rows with ``facts`` (what the training job
  uses)::

      {"fact": "key", "question": "Which key is the song in?", "stem": "it sits in",
       "options": ["C major", ...], "answer_format": "{}", "format": "{}."}

  For each row whose ``facts`` JSON states that fact, ``answer_format.format(value)`` is the
  text of the right option (:func:`make_questions`).

How a critic answers (``mode``)
-------------------------------
* ``generative``: the critic hears the clip with the question and the lettered options in its
  prompt context, writes a reply, and :func:`parse_choice` reads the letter from it ("B",
  "(B)", "Answer: B", "答案：B", or the text of exactly one option). A reply it cannot read
  counts as ``unparsed`` and wrong. This is how a critic is used, but it measures whether the
  critic follows the answer format as well as what it heard.
* ``loglik``: the same prompt, then every option is scored by the mean log-probability of
  ``" " + option`` after the answer prefix (the question's ``stem``, else "Answer:"); the best
  scoring option is the answer. Deterministic, never unparsed, cheap (one batched forward per
  question), and fair to a critic that was trained to write critiques, not to quiz answers.
* ``cloze`` (bank questions only): no question in the prompt; every option is scored as the
  continuation of the reference critique's own words up to and including the stem (just the
  stem if the critique does not contain it). A critic is trained to write critiques, so a
  stem where no critique ever starts would measure that mismatch rather than what it heard;
  facts preceding the stem must not give the answer away, which holds when facts vary
  independently across songs (as in the demo set).

A clip that cannot be read at scoring time is counted and reported (``failed_clips``), and its
questions are left out of the accuracy; it never stops the run. :class:`ScqReport` has the
metrics (MLflow-ready, :meth:`ScqReport.metrics`) and a JSON-ready summary with a confusion
table per category (:meth:`ScqReport.to_dict`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vcritic import registry

log = logging.getLogger(__name__)

MODES = ("generative", "loglik", "cloze")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DEFAULT_PERSONA = "A music expert who listens closely and answers a single-choice question about the clip."
ANSWER_PREFIX = "Answer:"
ANSWER_INSTRUCTION = "Answer with the letter of one option."
PUBLIC_FIELDS = ("audio_path", "question", "options", "answer")


class ScqFileError(ValueError):
    """A question file has lines that do not fit the format; the message names each file:line."""


@dataclass(frozen=True)
class Question:
    """One single-choice question about one clip.

    Bank questions (:func:`make_questions`) carry the held-out row's ``example_id`` and a cloze
    ``prefix``; file questions (:func:`load_questions`) carry the clip in ``audio``."""

    example_id: str
    fact: str
    question: str
    stem: str
    options: tuple[str, ...]
    answer: int
    format: str = "{}"
    prefix: str = ""  # cloze context: the reference critique up to and including the stem
    category: str = ""
    """Report group (default: the fact)."""
    audio: Any = None
    """The clip: a :class:`vcritic.data.schema.AudioRef` (None: hear the bank row instead)."""
    persona: str = ""
    context: str = ""
    source: str = ""
    """Where the question came from (``file:line``), for messages."""

    @property
    def group(self) -> str:
        return self.category or self.fact or "all"


# -- loading -----------------------------------------------------------------------------------
def load_bank(target: str) -> list[dict[str, Any]]:
    """A bank from a ``"module:attr"`` string or a JSON file path."""
    if target.endswith(".json"):
        with open(target) as f:
            return json.load(f)
    return list(registry.import_target(target))


def make_questions(rows: Iterable[dict[str, Any]], bank: Sequence[dict[str, Any]]) -> list[Question]:
    """One question per (row, bank entry) whose fact the row's ``facts`` JSON states."""
    from vcritic.data.schema import AudioRef

    questions = []
    for row in rows:
        facts = json.loads(row["facts"]) if row.get("facts") else {}
        for entry in bank:
            if entry["fact"] not in facts:
                continue
            options = tuple(entry["options"])
            answer_text = entry.get("answer_format", "{}").format(facts[entry["fact"]])
            if answer_text not in options:
                raise ValueError(f"example {row['example_id']!r}: fact {entry['fact']}={facts[entry['fact']]!r} gives "
                                 f"answer {answer_text!r}, which is not among the options {options}")
            reference = " " + str(row.get("target_text") or "").strip()
            cut = reference.find(" " + entry["stem"])
            prefix = reference[: cut + 1 + len(entry["stem"])] if cut >= 0 else " " + entry["stem"]
            audio = None
            if row.get("audio_path"):
                duration = row.get("duration_s")
                audio = AudioRef(str(row["audio_path"]), float(row.get("offset_s") or 0.0),
                                 None if duration is None or duration != duration else float(duration))
            questions.append(Question(
                row["example_id"], entry["fact"], entry["question"], entry["stem"], options,
                options.index(answer_text), entry.get("format", "{}"), prefix,
                category=str(entry.get("category") or entry["fact"]), audio=audio,
                persona=str(row.get("persona") or ""), context=str(row.get("context") or ""),
                source=f"bank entry {entry['fact']!r}, example {row['example_id']!r}"))
    return questions


def answer_letter(value: Any, n_options: int) -> int | None:
    """The option index of an ``answer`` field ("B", "b", "(B)", "B."), or None."""
    if not isinstance(value, str):
        return None
    m = re.fullmatch(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:]?", unicodedata.normalize("NFKC", value).strip())
    if not m:
        return None
    index = LETTERS.index(m[1].upper())
    return index if index < n_options else None


def _line_problem(obj: Any) -> str | None:
    """What is wrong with one parsed line (None: nothing), phrased with the fix."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    missing = [k for k in PUBLIC_FIELDS if k not in obj]
    if missing:
        return f"missing field(s) {', '.join(missing)}; every line needs {', '.join(PUBLIC_FIELDS)}"
    if not isinstance(obj["audio_path"], str) or not obj["audio_path"].strip():
        return "audio_path must be a non-empty string (a path relative to this file's folder, or absolute)"
    if not isinstance(obj["question"], str) or not obj["question"].strip():
        return "question must be a non-empty string"
    options = obj["options"]
    if (not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS)
            or not all(isinstance(o, str) and o.strip() for o in options)):
        return f"options must be a list of 2 to {len(LETTERS)} non-empty strings, got {options!r}"
    repeats = sorted({o for o in options if options.count(o) > 1})
    if repeats:
        return f"options repeat {repeats[0]!r}; each option must be distinct"
    if answer_letter(obj["answer"], len(options)) is None:
        return (f"answer must be the letter of one of the {len(options)} options (A-{LETTERS[len(options) - 1]}), "
                f"got {obj['answer']!r}")
    for key in ("category", "id", "persona", "context", "stem"):
        if key in obj and obj[key] is not None and not isinstance(obj[key], str):
            return f"{key} must be a string when given, got {obj[key]!r}"
    for key in ("offset_s", "duration_s"):
        if key in obj and obj[key] is not None and (isinstance(obj[key], bool) or not isinstance(obj[key], int | float)
                                                     or obj[key] < 0):
            return f"{key} must be a non-negative number of seconds when given, got {obj[key]!r}"
    return None


def load_questions(path: str | Path) -> list[Question]:
    """Questions from a JSONL file in the public format (see the module docstring).

    Blank lines are skipped. Audio files are not opened here: a clip that fails to load is
    counted at scoring time.

    Raises:
        FileNotFoundError: no such file.
        ScqFileError: lines that do not fit, each named ``file:line`` with what to change.
    """
    from vcritic.data.schema import AudioRef

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SCQ file {str(path)!r} does not exist; give a JSONL file of questions "
                                f"({{\"audio_path\", \"question\", \"options\", \"answer\"}} per line)")
    folder = path.resolve().parent
    questions: list[Question] = []
    problems: list[str] = []
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); write one JSON object per "
                                f"line, e.g. {{\"audio_path\": \"a.wav\", \"question\": \"...\", \"options\": "
                                f"[\"x\", \"y\"], \"answer\": \"A\"}}")
                continue
            problem = _line_problem(obj)
            if problem:
                problems.append(f"{where}: {problem}")
                continue
            options = tuple(str(o).strip() for o in obj["options"])
            audio_path = Path(obj["audio_path"])
            audio_path = audio_path if audio_path.is_absolute() else Path(os.path.normpath(folder / audio_path))
            duration = obj.get("duration_s")
            category = str(obj.get("category") or "").strip()
            questions.append(Question(
                example_id=str(obj.get("id") or f"{path.name}:{lineno}"), fact=category,
                question=obj["question"].strip(), stem=str(obj.get("stem") or "").strip(), options=options,
                answer=answer_letter(obj["answer"], len(options)), category=category,
                audio=AudioRef(str(audio_path), float(obj.get("offset_s") or 0.0),
                               None if duration is None else float(duration)),
                persona=str(obj.get("persona") or ""), context=str(obj.get("context") or ""), source=where))
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ScqFileError(f"{len(problems)} bad line(s) in SCQ file {path}:\n  {shown}{more}")
    if not questions:
        raise ScqFileError(f"SCQ file {path} holds no questions; write one JSON object per line")
    return questions


def write_questions(questions: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write question dicts as JSONL (public format plus any extra fields), with ``audio_path``
    made relative to the file's folder so the file and its clips can move together."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.resolve().parent
    lines = []
    for q in questions:
        q = dict(q)
        q["audio_path"] = os.path.relpath(Path(q["audio_path"]).resolve(), folder)
        lines.append(json.dumps(q, ensure_ascii=False) + "\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


# -- reading an answer -------------------------------------------------------------------------
_WHOLE = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:)]?")
# "Answer: B", "the answer is b", "answer (B)", "答案：B" / "答案是B" (NFKC turns ： into :).
# The words are matched in any case, the letter is not: "the answer is a flute" names no letter.
_MARKER = re.compile(r"(?i:answer|答案|选项)\s*(?i:is|是|为|应该是|:)?\s*(?i:option\s*)?[(\[]?\s*"
                     r"(?:([A-Z])(?![A-Za-z])|([a-z])\s*(?=$|[.,;:!?)\]]))")
_LEADING = re.compile(r"[(\[]\s*([A-Za-z])\s*[)\]]|([A-Z])\s*[.:)](?:\s|$)")
_PAREN = re.compile(r"[(\[]\s*([A-Z])\s*[)\]]")


def _index(letter: str, n_options: int) -> int | None:
    index = LETTERS.index(letter.upper())
    return index if index < n_options else None


def _mentions(text: str, option: str) -> bool:
    """Whether ``option`` occurs in ``text`` (case-insensitive; as whole words for ASCII text)."""
    option = unicodedata.normalize("NFKC", option).strip().lower()
    if not option:
        return False
    if option.isascii():
        return re.search(rf"(?<![0-9a-z]){re.escape(option)}(?![0-9a-z])", text.lower()) is not None
    return option in text.lower()


def parse_choice(reply: str, options: Sequence[str]) -> int | None:
    """The option a free-text reply picks, or None when it cannot be read.

    Tried in order: the whole reply is a letter ("B", "(B)", "b."); an answer marker ("Answer: B",
    "the answer is b", "答案：B", "答案是B"); a leading label ("B. E major", "(B) ..."); exactly one
    parenthesised capital letter; the text of exactly one option (an option contained in another
    mentioned option does not count). Letters past the last option are ignored.
    """
    n = len(options)
    text = unicodedata.normalize("NFKC", reply or "").strip()
    if not text:
        return None
    m = _WHOLE.fullmatch(text)
    if m:
        return _index(m[1], n)
    for m in _MARKER.finditer(text):
        index = _index(m[1] or m[2], n)
        if index is not None:
            return index
    m = _LEADING.match(text)
    if m and (index := _index(m[1] or m[2], n)) is not None:
        return index
    letters = {i for i in (_index(x, n) for x in _PAREN.findall(text)) if i is not None}
    if len(letters) == 1:
        return letters.pop()
    found = [i for i, option in enumerate(options) if _mentions(text, option)]
    found = [i for i in found if not any(j != i and _mentions(options[j], options[i]) for j in found)]
    return found[0] if len(found) == 1 else None


# -- asking ------------------------------------------------------------------------------------
def prompt_context(q: Question) -> str:
    """The context the critic reads in ``generative`` and ``loglik`` mode: the question's own
    context, then the question and its lettered options."""
    options = " ".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(q.options))
    lines = [q.context.strip(), f"Question: {q.question}", f"Options: {options}", ANSWER_INSTRUCTION]
    return "\n".join(line for line in lines if line)


def option_logprobs(critic, heard, prefix: str, continuations: Sequence[str], batch_size: int = 16) -> list[float]:
    """Mean log-probability of each continuation after ``prefix``, as
    ``critic.continuation_logprob`` computes it, in batched forwards (all options of a question
    share the clip and prompt). Critics without a joint model (test fakes) are asked one by one."""
    model, vocab = getattr(critic, "model", None), getattr(critic, "vocab", None)
    if model is None or vocab is None or not hasattr(model, "hidden_and_logits"):
        return [float(critic.continuation_logprob(heard, prefix, c)) for c in continuations]
    import torch

    from vcritic.models.sequence import IGNORE, collate, heard_streams

    tok = critic.tokenizer
    prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"]
    out: list[float] = []
    for first in range(0, len(continuations), batch_size):
        streams, spans = [], []
        for c in continuations[first : first + batch_size]:
            full = tok(prefix + c, add_special_tokens=False)["input_ids"]
            spans.append((len(prefix_ids) if full[: len(prefix_ids)] == prefix_ids else 0, len(full)))
            streams.append(heard_streams(vocab, heard, full))
        batch = collate(streams, vocab)
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            text_logits, _ = model.hidden_and_logits(
                batch["text_ids"], batch["audio_ids"], batch["music_mask"], batch["attention_mask"],
                batch.get("music_features"), False, batch.get("native_features"), batch.get("native_lengths"))
        logp = torch.log_softmax(text_logits.float(), dim=-1)
        for row, (start, end) in enumerate(spans):
            labels = batch["text_labels"][row]
            positions = (labels != IGNORE).nonzero().flatten()[start:end]
            out.append(float(logp[row, positions, labels[positions]].mean()))
    return out


@dataclass
class ScqResult:
    """One question as asked: what the critic chose (None: unparsed) and why."""

    question: Question
    predicted: int | None
    reply: str = ""
    scores: list[float] | None = None

    @property
    def correct(self) -> bool:
        return self.predicted == self.question.answer

    def to_dict(self) -> dict[str, Any]:
        q = self.question
        return {"id": q.example_id, "category": q.group, "answer": LETTERS[q.answer],
                "predicted": None if self.predicted is None else LETTERS[self.predicted], "correct": self.correct,
                "unparsed": self.predicted is None, "reply": self.reply, "scores": self.scores,
                "audio_path": getattr(q.audio, "path", None)}


def slug(name: str) -> str:
    """An MLflow-safe metric-name part for a category: "emotion & expression" → "emotion_expression";
    a name with no ASCII letters or digits (e.g. Chinese) → "c" + a short hash of it."""
    text = re.sub(r"[^0-9a-z]+", "_", unicodedata.normalize("NFKC", name).lower()).strip("_")
    return text or "c" + hashlib.blake2b(name.encode(), digest_size=4).hexdigest()


def _confusion(results: Iterable[ScqResult]) -> dict[str, dict[str, int]]:
    """{answer letter: {predicted letter or "none": count}}."""
    table: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        table[LETTERS[r.question.answer]]["none" if r.predicted is None else LETTERS[r.predicted]] += 1
    return {true: dict(sorted(preds.items())) for true, preds in sorted(table.items())}


@dataclass
class ScqReport:
    """What one SCQ run found: every asked question's result and the clips that failed to load."""

    mode: str
    results: list[ScqResult] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    """One entry per question whose clip could not be read: id, audio_path, error."""

    def _groups(self) -> dict[str, list[ScqResult]]:
        groups: dict[str, list[ScqResult]] = defaultdict(list)
        for r in self.results:
            groups[r.question.group].append(r)
        return dict(sorted(groups.items()))

    def slugs(self) -> dict[str, str]:
        """{category: metric-name part}, unique even when two names slug alike."""
        out: dict[str, str] = {}
        for name in sorted({r.question.group for r in self.results} | {f["category"] for f in self.failed}):
            base = candidate = slug(name)
            k = 2
            while candidate in out.values():
                candidate, k = f"{base}_{k}", k + 1
            out[name] = candidate
        return out

    @property
    def accuracy(self) -> float:
        return sum(r.correct for r in self.results) / len(self.results) if self.results else 0.0

    def metrics(self, prefix: str = "scq", confusion: bool = True) -> dict[str, float]:
        """MLflow-ready metrics: ``<prefix>_accuracy`` (over the questions asked), ``_questions``,
        ``_correct``, ``_unparsed``, ``_failed_clips`` (distinct clips), ``_failed_questions``;
        per category ``_accuracy_<slug>``, ``_questions_<slug>``, ``_unparsed_<slug>``; with
        ``confusion`` the nonzero cells ``_confusion_true_<A>_pred_<B|none>`` overall and
        ``_confusion_<slug>_true_<A>_pred_<B>`` per category."""
        out = {f"{prefix}_accuracy": self.accuracy, f"{prefix}_questions": float(len(self.results)),
               f"{prefix}_correct": float(sum(r.correct for r in self.results)),
               f"{prefix}_unparsed": float(sum(r.predicted is None for r in self.results)),
               f"{prefix}_failed_clips": float(len({f["audio_path"] for f in self.failed})),
               f"{prefix}_failed_questions": float(len(self.failed))}
        names = self.slugs()
        groups = self._groups()
        for name, results in groups.items():
            s = names[name]
            out[f"{prefix}_accuracy_{s}"] = sum(r.correct for r in results) / len(results)
            out[f"{prefix}_questions_{s}"] = float(len(results))
            out[f"{prefix}_unparsed_{s}"] = float(sum(r.predicted is None for r in results))
        if confusion:
            for true, preds in _confusion(self.results).items():
                for pred, n in preds.items():
                    out[f"{prefix}_confusion_true_{true}_pred_{pred}"] = float(n)
            for name, results in groups.items():
                for true, preds in _confusion(results).items():
                    for pred, n in preds.items():
                        out[f"{prefix}_confusion_{names[name]}_true_{true}_pred_{pred}"] = float(n)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: metrics, per-category counts with confusion tables, failed
        clips and every question's result."""
        names = self.slugs()
        categories = {}
        for name, results in self._groups().items():
            correct = sum(r.correct for r in results)
            categories[name] = {"slug": names[name], "questions": len(results), "correct": correct,
                                "accuracy": correct / len(results),
                                "unparsed": sum(r.predicted is None for r in results),
                                "confusion": _confusion(results)}
        return {"mode": self.mode, "accuracy": self.accuracy, "questions": len(self.results),
                "unparsed": sum(r.predicted is None for r in self.results),
                "failed_clips": len({f["audio_path"] for f in self.failed}), "failed_questions": len(self.failed),
                "confusion": _confusion(self.results), "categories": categories, "failed": list(self.failed),
                "metrics": self.metrics(), "results": [r.to_dict() for r in self.results]}


def _clip_error(q: Question, sample_rate: int) -> str | None:
    """Why the question's clip cannot be read (None: it can). Decoding a few seconds is cheap
    next to the critic's forward, and it separates a bad clip from a bug in scoring."""
    from vcritic.data import audio

    if q.audio is None:
        return None
    try:
        audio.load(q.audio, sample_rate)
    except Exception as exc:  # AudioError, a missing file, a window past the end...
        return f"{type(exc).__name__}: {exc}"
    return None


def run_scq(critic, questions: Sequence[Question], mode: str = "loglik", rows: Sequence[dict[str, Any]] = (),
            persona: str | None = None, max_text_tokens: int = 64,
            on_question: Callable[[int, int], None] | None = None) -> ScqReport:
    """Ask ``questions`` in ``mode`` (see the module docstring).

    Args:
        critic: a :class:`vcritic.critic.Critic` (or anything with its methods).
        rows: the tokenized rows bank questions refer to (``cloze`` hears the row itself).
        persona: the prompt persona for questions without their own (default :data:`DEFAULT_PERSONA`).
        max_text_tokens: longest reply in ``generative`` mode.
        on_question: called with (done, total) after each question (progress display).

    Raises:
        ValueError: an unknown mode, or a question the mode cannot ask (``cloze`` needs bank
            questions and their rows; the other modes need a clip).
    """
    if mode not in MODES:
        raise ValueError(f"unknown SCQ mode {mode!r}; modes are {', '.join(MODES)}")
    by_id = {r["example_id"]: r for r in rows}
    sample_rate = int(getattr(getattr(critic, "audio_tokenizer", None), "sample_rate", 16000))
    report = ScqReport(mode)
    heard_cache: dict[Any, Any] = {}
    clip_errors: dict[Any, str | None] = {}
    for k, q in enumerate(questions):
        if mode == "cloze":
            if q.example_id not in by_id or not q.prefix:
                raise ValueError(f"cloze mode asks bank questions about tokenized rows; {q.source or q.example_id} "
                                 f"has no row (use mode loglik or generative for question files)")
            if q.example_id not in heard_cache:
                heard_cache = {q.example_id: critic.heard_row(by_id[q.example_id])}  # questions come grouped by row
            scores = option_logprobs(critic, heard_cache[q.example_id], q.prefix,
                                     [" " + q.format.format(o) for o in q.options])
            report.results.append(ScqResult(q, max(range(len(scores)), key=scores.__getitem__), scores=scores))
        else:
            if q.audio is None:
                raise ValueError(f"{mode} mode needs the question's clip; {q.source or q.example_id} has none")
            if q.audio not in clip_errors:
                clip_errors[q.audio] = _clip_error(q, sample_rate)
            if clip_errors[q.audio]:
                report.failed.append({"id": q.example_id, "category": q.group, "audio_path": q.audio.path,
                                      "error": clip_errors[q.audio]})
                log.warning("SCQ %s: clip %s failed to load: %s", q.example_id, q.audio.path, clip_errors[q.audio])
            else:
                report.results.append(_ask(critic, q, mode, persona or q.persona or DEFAULT_PERSONA, max_text_tokens))
        if on_question is not None:
            on_question(k + 1, len(questions))
    return report


def _ask(critic, q: Question, mode: str, persona: str, max_text_tokens: int) -> ScqResult:
    context = prompt_context(q)
    if mode == "generative":
        reply = critic.critique(q.audio, persona, context, speak=False, max_text_tokens=max_text_tokens).text
        return ScqResult(q, parse_choice(reply, q.options), reply=reply)
    heard = critic.hear(q.audio, persona, context)
    scores = option_logprobs(critic, heard, " " + (q.stem or ANSWER_PREFIX), [" " + o for o in q.options])
    return ScqResult(q, max(range(len(scores)), key=scores.__getitem__), scores=scores)


def scq_report(critic, rows: Sequence[dict[str, Any]], bank: Sequence[dict[str, Any]], mode: str = "cloze",
               **kwargs: Any) -> ScqReport:
    """Bank questions about ``rows`` asked in ``mode`` (the training job's SCQ: ``cloze``)."""
    questions = make_questions(rows, bank)
    if not questions:
        raise ValueError("no SCQ questions: no held-out row states a fact the question bank asks about")
    return run_scq(critic, questions, mode, rows=rows, **kwargs)


def scq_accuracy(critic, rows: Sequence[dict[str, Any]], bank: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Cloze accuracy overall and per fact (the training job's before/after figure).

    Args:
        critic: a :class:`vcritic.critic.Critic`.
        rows: tokenized shard rows (``vcritic.data.schema.TOKEN_COLUMNS``, ``facts``, ``target_text``, ``example_id``).
        bank: question bank entries (see module docstring).

    Returns:
        ``{"scq_accuracy": ..., "scq_accuracy_<fact>": ..., "scq_questions": n, ...}`` (see
        :meth:`ScqReport.metrics`, without the confusion cells).
    """
    return scq_report(critic, rows, bank).metrics(confusion=False)
