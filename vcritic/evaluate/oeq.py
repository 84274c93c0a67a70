"""Open-ended-question (OEQ) evaluation: LLM judges grade critiques on three rubrics.

Every judge plugin only answers chat messages (``Judge.complete``); this module owns what is
asked and how the answer is read, so all judges grade alike:

* **completeness** (16 points): how much of what a full critique covers this one covers:
  music understanding 6, vocal technique 3, background and context 3, language 2, persona 2.
* **accuracy**: correct facts ÷ stated facts, each checkable claim checked against the
  reference record of the song.
* **novelty** (10 points): insight beyond the obvious: novelty 4, musical relevance 3, depth 3.

Each dimension is normalised to [0, 1]; the composite is ``Σ w·s / Σ w`` with the weights from
``eval.oeq_weights`` (default 0.2 / 0.6 / 0.2: accuracy matters most). A reply the parser
cannot read is *unparsed* (None): it is counted and excluded from the means, never scored 0.

Replies are cached on disk by a hash of the judge model and the exact messages, so rerunning
an evaluation does not call the API again, and every raw reply is kept for inspection.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import unicodedata
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vcritic.protocols import Judge, JudgeScore

log = logging.getLogger(__name__)

DIMENSIONS: tuple[str, str, str] = ("completeness", "accuracy", "novelty")
DEFAULT_WEIGHTS: tuple[float, float, float] = (0.2, 0.6, 0.2)
_JUDGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------------------------
# Rubrics
# --------------------------------------------------------------------------------------------

_REPLY_LANGUAGE = (
    "You may reason in English or in Chinese (中文), whichever suits the critique, but finish "
    "with the final line exactly in the form shown, with nothing after it."
)

COMPLETENESS_PROMPT = f"""You are an experienced music editor who checks whether a critique of a sung
recording covers everything a well-rounded critique should. You are given the listener persona the
critic was asked to adopt, what is known about the song, a reference record of the song written by
an expert, and the critique. Judge coverage only: whether a topic is addressed at all and with some
substance, not whether what is said about it is right (that is checked separately).

Award points in five areas, 16 in total:
- Music understanding, up to 6: melody and its contour, harmony or key, rhythm and tempo, the
  arrangement and instrumentation or timbre, the song's form (verse, chorus, bridge), its genre or
  style. About one point for each of these the critique discusses concretely.
- Vocal technique, up to 3: intonation, breath support and phrasing, expressive devices such as
  vibrato, dynamics or ornaments.
- Background and context, up to 3: the song's origin, artist, era or purpose, and how the
  performance relates to the context that was provided.
- Language, up to 2: the lyrics, what they say and how clearly they are sung or pronounced.
- Persona, up to 2: whether the critique speaks in the voice, priorities and vocabulary of the
  given persona throughout.

Give one short line per area with its points, for example "Vocal technique: 2/3".
{_REPLY_LANGUAGE}
Final line: "Score: <total>/16"."""

ACCURACY_PROMPT = f"""You are a careful fact-checker for music journalism. You are given what is known
about a song, a reference record of the song written by an expert (treat it as the ground truth),
and a critique of a recording of that song.

1. List every checkable factual statement the critique makes about the music: key, tempo, meter,
   instruments, genre, structure, the singer's voice type, the lyrics' language or content,
   the song's background. Opinions and impressions ("the chorus is moving") are not facts; skip them.
2. Mark each statement correct if the reference record or the song information supports it, and
   incorrect if they contradict it or if it cannot possibly hold for this song. A statement the
   reference neither supports nor contradicts counts as correct only if it is plainly consistent
   with everything given.
3. Count the statements.

Write one line per statement ending in "correct" or "incorrect", then a line
"Correct facts: <C> of <S>". If the critique states no checkable fact at all, write
"Correct facts: 0 of 0" and give an accuracy of 0%.
{_REPLY_LANGUAGE}
Final line: "Accuracy: <C divided by S, as a percentage>%"."""

NOVELTY_PROMPT = f"""You are a seasoned music critic who judges how much insight a critique of a sung
recording offers beyond the obvious. You are given what is known about the song, a reference
record of the song written by an expert, and the critique. Basic facts that anyone reading the
song information could repeat do not count as insight.

Award points in three parts, 10 in total:
- Novelty, up to 4: observations that go beyond the song information and the reference record:
  a fresh comparison, an unexpected detail, a personal but well-argued perspective.
- Musical relevance, up to 3: whether those observations are about the music and the performance
  (not generic praise or off-topic remarks) and would help a singer or producer.
- Depth, up to 3: whether points are explained with reasons and concrete moments in the recording,
  rather than only asserted.

Give one short line per part with its points, for example "Depth: 1/3".
{_REPLY_LANGUAGE}
Final line: "Score: <total>/10"."""


@dataclass(frozen=True)
class Rubric:
    """One scored dimension: the judge's instructions and the scale its score is on.

    ``max_points`` is the rubric's full score (16 or 10); None for accuracy, a ratio.
    """

    name: str
    system_prompt: str
    max_points: float | None


RUBRICS: dict[str, Rubric] = {
    "completeness": Rubric("completeness", COMPLETENESS_PROMPT, 16.0),
    "accuracy": Rubric("accuracy", ACCURACY_PROMPT, None),
    "novelty": Rubric("novelty", NOVELTY_PROMPT, 10.0),
}


@dataclass
class OeqItem:
    """One critique to grade: what the critic wrote and what it is checked against."""

    item_id: str
    critique: str
    reference: str
    context: str = ""
    persona: str = ""


def rubric_messages(rubric: str, item: OeqItem) -> list[dict[str, str]]:
    """The chat messages that ask a judge to grade ``item`` on ``rubric``."""
    spec = RUBRICS[rubric]
    parts = []
    if rubric == "completeness":
        parts.append(f"Persona the critic was asked to adopt:\n{item.persona or '(none given)'}")
    parts.append(f"What is known about the song:\n{item.context or '(nothing given)'}")
    parts.append(f"Reference record of the song (expert):\n{item.reference or '(none given)'}")
    parts.append(f"Critique to grade:\n{item.critique}")
    return [{"role": "system", "content": spec.system_prompt}, {"role": "user", "content": "\n\n".join(parts)}]


def rubric_of(messages: Sequence[Mapping[str, Any]]) -> str | None:
    """Which rubric a list of messages asks about (None: not an OEQ rubric prompt).

    For fakes and tools that answer OEQ prompts without being told the rubric.
    """
    system = next((m.get("content") for m in messages if m.get("role") == "system"), None)
    return next((name for name, r in RUBRICS.items() if r.system_prompt == system), None)


# --------------------------------------------------------------------------------------------
# Reading scores out of replies
# --------------------------------------------------------------------------------------------

_NUM = r"(\d+(?:\.\d+)?)"
# "12/16", "12 / 16", "12 out of 16", "12 of 16", "75%", "12分", "12 points"
_VALUE = re.compile(
    _NUM + r"\s*(?:(?:/|out\s+of|of)\s*" + _NUM + r")?\s*(%|分|points?|pts?)?", re.IGNORECASE
)
# Labels, strongest first. Within a tier the last match wins (a reply ends with its verdict).
_TOTAL_LABELS = r"total\s+score|overall\s+score|final\s+score|total|overall|总分|总得分|最终得分|总评分|综合得分"
_SCORE_LABELS = r"score|rating|得分|评分|分数|打分"
_ACCURACY_LABELS = r"accuracy|准确率|正确率|准确度"
_NAME_LABELS = {
    "completeness": r"completeness|完整性|完整度",
    "novelty": r"novelty|新颖性|新颖度|创新性",
}
# After a label: an optional "(0-16)" or "（满分16分）", then ":", "=", "is", "为", "of" ...
_GLUE = r"\s*(?:\([^)]*\)|（[^）]*）)?\s*(?:[:=]|is|was|为|是|of)?\s*"
# "3 of 4 facts are correct", "3/4 facts correct", "3 out of 4 statements were accurate"
_FACT_COUNT = re.compile(
    _NUM + r"\s*(?:/|out\s+of|of)\s*" + _NUM + r"\s*(?:stated\s+|checkable\s+|factual\s+)?"
    r"(?:facts?|statements?|claims?|points?)?\s*(?:are|were|is)?\s*(?:correct|accurate|true|right)",
    re.IGNORECASE,
)
# "Correct facts: 3 of 4", "正确事实：3/4"
_CORRECT_OF = re.compile(
    r"(?:correct\s+(?:facts|statements|claims)|正确(?:的)?(?:事实|陈述)?(?:数|数量)?)\s*:?\s*" + _NUM
    + r"\s*(?:/|out\s+of|of)\s*" + _NUM,
    re.IGNORECASE,
)
# "正确事实数：3 ... 事实总数：4" / "correct facts: 3 ... stated facts: 4"
_ZH_COUNTS = re.compile(r"正确(?:的)?(?:事实)?(?:数|数量)?\s*:?\s*" + _NUM + r".*?(?:事实)?总数\s*:?\s*" + _NUM, re.DOTALL)
_EN_COUNTS = re.compile(
    r"correct\s+(?:facts|statements|claims)\s*:?\s*" + _NUM + r"(?!\s*(?:/|of|out))"
    r".*?(?:stated|total)\s+(?:facts|statements|claims)\s*:?\s*" + _NUM,
    re.IGNORECASE | re.DOTALL,
)
_JSON_KEYS_FIRST = ("total_score", "total", "final_score", "overall", "score", "总分", "得分", "评分")


def _normalise(text: str) -> str:
    """Full-width digits and punctuation (：／％) to ASCII, so one set of patterns reads both."""
    return unicodedata.normalize("NFKC", text)


def _scale(rubric: Rubric, num: float, den: float | None, unit: str | None, bare_ok: bool) -> float | None:
    """One number (with its "/den" or "%" if given) on ``rubric``'s scale → [0, 1], or None."""
    if unit == "%":
        value = num / 100.0
    elif den is not None:
        if den <= 0:
            return None
        value = num / den
    elif not bare_ok:
        return None
    elif rubric.max_points is None:  # a ratio: 0.75, or 75 meaning percent
        value = num if num <= 1.0 else num / 100.0
    else:
        value = num / rubric.max_points
    return value if 0.0 <= value <= 1.0 else None


_MISSING = object()  # a reader found nothing (as opposed to a score that is out of range)


def _labelled(rubric: Rubric, text: str, labels: str, bare_ok: bool, den_must_match: bool = False) -> Any:
    """The last ``label: value`` in ``text`` on ``rubric``'s scale (None if that one is out of
    range: the reply's verdict decides, an earlier sub-score never stands in for it)."""
    pattern = re.compile(r"(?<![A-Za-z])(?:" + labels + r")" + _GLUE + r"(?=\d)", re.IGNORECASE)
    found: Any = _MISSING
    for match in pattern.finditer(text):
        value = _VALUE.match(text, match.end())
        if value is None:
            continue
        num, den, unit = float(value.group(1)), value.group(2), value.group(3)
        den_f = float(den) if den is not None else None
        if den_must_match and unit != "%" and (den_f is None or den_f != rubric.max_points):
            continue  # "Novelty: 3/4" is a sub-score of the novelty rubric, not its total
        if not bare_ok and den_f is None and unit != "%":
            continue  # "Total: 4" (facts) is no accuracy
        found = _scale(rubric, num, den_f, unit, bare_ok)
    return found


def _from_json_value(rubric: Rubric, value: Any) -> float | None:
    if isinstance(value, bool):
        return None  # true/false is not a score
    if isinstance(value, int | float):
        return _scale(rubric, float(value), None, None, bare_ok=True)
    if isinstance(value, str):
        match = _VALUE.fullmatch(_normalise(value).strip())
        if match:
            den = float(match.group(2)) if match.group(2) else None
            return _scale(rubric, float(match.group(1)), den, match.group(3), bare_ok=True)
    return None


def _json_objects(text: str) -> list[dict[str, Any]]:
    """Every JSON object embedded in ``text`` (whole reply, code fence or inline)."""
    decoder, found, start = json.JSONDecoder(), [], text.find("{")
    while start != -1:
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
        start = text.find("{", end)
    return found


def _from_json(rubric: Rubric, text: str) -> float | None:
    keys = (*_JSON_KEYS_FIRST, rubric.name)
    for obj in reversed(_json_objects(text)):
        lowered = {str(k).lower(): v for k, v in obj.items()}
        for key in keys:
            if key in lowered:
                value = _from_json_value(rubric, lowered[key])
                if value is not None:
                    return value
        if rubric.name == "accuracy":
            correct = lowered.get("correct", lowered.get("correct_facts"))
            stated = lowered.get("stated", lowered.get("stated_facts", lowered.get("total_facts")))
            if isinstance(correct, int | float) and isinstance(stated, int | float) and stated > 0:
                if 0 <= correct <= stated:
                    return float(correct) / float(stated)
    return None


def _fact_counts(text: str) -> float | None:
    """Accuracy from counts of correct and stated facts (the last statement of them)."""
    candidates: list[tuple[int, float, float]] = []
    for pattern in (_FACT_COUNT, _CORRECT_OF, _EN_COUNTS, _ZH_COUNTS):
        candidates += [(m.start(), float(m.group(1)), float(m.group(2))) for m in pattern.finditer(text)]
    for _, correct, stated in sorted(candidates, reverse=True):
        if stated > 0 and 0 <= correct <= stated:
            return correct / stated
    return None


def _or_missing(value: float | None) -> Any:
    return _MISSING if value is None else value


def parse_score(reply: str | None, rubric: str) -> float | None:
    """Read the score of a judge's ``reply`` to ``rubric`` as a number in [0, 1].

    Understands English and Chinese, full- or half-width: "Score: 15.5/16", "总分：12分",
    "得分 8/10", "accuracy 75%", "3 of 4 facts are correct", JSON such as {"score": 7}. A bare
    number is on the rubric's own scale (completeness /16, novelty /10, accuracy a ratio or
    percent); an explicit "/N" or "%" wins. Returns None (unparsed) when no score is found or
    it falls outside the scale: the caller must never treat that as 0.
    """
    if not reply or not reply.strip():
        return None
    spec = RUBRICS[rubric]
    text = _normalise(reply)
    readers: list[Callable[[], Any]] = [
        lambda: _or_missing(_from_json(spec, text)),
        lambda: _labelled(spec, text, _TOTAL_LABELS, bare_ok=rubric != "accuracy"),
        lambda: _labelled(spec, text, _SCORE_LABELS + ("|" + _ACCURACY_LABELS if rubric == "accuracy" else ""),
                          bare_ok=True),
    ]
    if rubric == "accuracy":
        readers.append(lambda: _or_missing(_fact_counts(text)))
    else:
        readers.append(lambda: _labelled(spec, text, _NAME_LABELS[rubric], bare_ok=False, den_must_match=True))
    readers.append(lambda: _from_json_value(spec, text.strip()))  # the whole reply is "12/16" or "7": last
    for read in readers:
        value = read()
        if value is not _MISSING:
            return value
    return None


def composite(scores: Mapping[str, float | None], weights: Sequence[float] = DEFAULT_WEIGHTS) -> float | None:
    """``Σ w·s / Σ w`` over the three dimensions; None when any of them is unparsed."""
    values = [scores.get(d) for d in DIMENSIONS]
    if any(v is None for v in values):
        return None
    return sum(w * v for w, v in zip(weights, values, strict=True)) / float(sum(weights))  # type: ignore[misc]


def check_weights(weights: Sequence[float]) -> tuple[float, float, float]:
    """The weights as a 3-tuple of floats.

    Raises:
        ValueError: not 3 numbers, one is negative, or they sum to 0.
    """
    try:
        values = tuple(float(w) for w in weights)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"OEQ weights must be 3 numbers (completeness, accuracy, novelty), got {weights!r}") from exc
    if len(values) != 3 or min(values) < 0 or sum(values) <= 0 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"OEQ weights must be 3 non-negative numbers (completeness, accuracy, novelty) with a "
                         f"positive sum, e.g. eval.oeq_weights=[0.2,0.6,0.2]; got {list(values)}")
    return values  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Reply cache
# --------------------------------------------------------------------------------------------


def cache_key(model: str, messages: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of the judge model and the exact messages (what determines a reply at temperature 0)."""
    blob = json.dumps({"model": model, "messages": list(messages)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ReplyCache:
    """One JSON file per reply, named by its :func:`cache_key` (atomic writes, safe to share)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> str | None:
        path = self._path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:  # a damaged entry is re-asked, not fatal
            log.warning("judge cache entry %s is unreadable (%s); asking the judge again", path, exc)
            return None
        reply = entry.get("reply") if isinstance(entry, dict) else None
        return reply if isinstance(reply, str) else None

    def put(self, key: str, model: str, messages: Sequence[Mapping[str, Any]], reply: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"model": model, "messages": list(messages), "reply": reply}, f, ensure_ascii=False)
        os.replace(tmp, self._path(key))


# --------------------------------------------------------------------------------------------
# Judges and the evaluation
# --------------------------------------------------------------------------------------------


class OeqError(RuntimeError):
    """A judge could not be built, or every request to it failed."""


def build_judges(specs: Sequence[Mapping[str, Any]]) -> dict[str, Judge]:
    """Judges from ``eval.judges`` specs: ``[{"name": ..., "plugin": ..., "params": {...}}]``.

    ``plugin`` is a ``vcritic.judges`` plugin name (``openai_chat``, ``gemini``) or a
    ``"module:Class"``; ``params`` are its keyword options.

    Raises:
        OeqError: a spec is malformed, two judges share a name, or the plugin rejects its params
            (e.g. its API-key variable is unset); the message names the spec.
    """
    from vcritic import registry

    judges: dict[str, Judge] = {}
    for i, spec in enumerate(specs):
        where = f"eval.judges[{i}]"
        if not isinstance(spec, Mapping):
            raise OeqError(f"{where} must be a mapping {{name, plugin, params}}, got {spec!r}")
        unknown = sorted(set(spec) - {"name", "plugin", "params"})
        if unknown:
            raise OeqError(f"{where} has unknown key(s) {', '.join(unknown)}; a judge is {{name, plugin, params}}")
        name, plugin, params = spec.get("name"), spec.get("plugin"), spec.get("params") or {}
        if not isinstance(name, str) or not _JUDGE_NAME.match(name):
            raise OeqError(f"{where}.name must be letters, digits, '_', '.' or '-' (it names metrics), got {name!r}")
        if name in judges:
            raise OeqError(f"{where}.name {name!r} is used by two judges; give each a different name")
        if not isinstance(plugin, str) or not plugin:
            raise OeqError(f"{where}.plugin must name a judge plugin (openai_chat, gemini, or 'module:Class')")
        if not isinstance(params, Mapping):
            raise OeqError(f"{where}.params must be a mapping of the plugin's options, got {params!r}")
        try:
            judges[name] = registry.create("judges", plugin, **dict(params))
        except (registry.PluginError, ValueError) as exc:
            raise OeqError(f"{where} ({name!r}, plugin {plugin!r}): {exc}") from exc
    return judges


@dataclass
class OeqReport:
    """What :func:`judge_oeq` found.

    ``metrics``: per judge ``oeq_<judge>_<dimension>`` means (dimensions plus ``composite``, over
    the parsed scores only), ``oeq_<judge>_unparsed`` and ``oeq_<judge>_errors`` counts, and the
    same across judges (``oeq_completeness`` ... the mean of the judges' means; ``oeq_unparsed``
    the total). ``rows``: one per item and judge. ``raw_replies``: one per request.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    raw_replies: list[dict[str, Any]] = field(default_factory=list)

    def write(self, directory: str | os.PathLike[str]) -> dict[str, str]:
        """Write ``oeq_rows.jsonl``, ``oeq_raw_replies.jsonl`` and ``oeq_metrics.json``; return their paths."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"rows": out / "oeq_rows.jsonl", "raw_replies": out / "oeq_raw_replies.jsonl",
                 "metrics": out / "oeq_metrics.json"}
        for key in ("rows", "raw_replies"):
            with open(paths[key], "w", encoding="utf-8") as f:
                for record in getattr(self, key):
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
        paths["metrics"].write_text(json.dumps(self.metrics, indent=2, sort_keys=True), encoding="utf-8")
        return {k: str(v) for k, v in paths.items()}


@dataclass
class _Request:
    item: OeqItem
    judge: str
    rubric: str
    messages: list[dict[str, str]]
    key: str


def _ask(judge: Judge, request: _Request, cache: ReplyCache | None) -> dict[str, Any]:
    """One rubric question to one judge, through the cache; never raises (errors are recorded)."""
    record: dict[str, Any] = {"item_id": request.item.item_id, "judge": request.judge, "rubric": request.rubric,
                              "model": judge.model, "messages": request.messages, "reply": None,
                              "cached": False, "score": None, "error": None}
    reply = cache.get(request.key) if cache is not None else None
    if reply is not None:
        record["cached"] = True
    else:
        try:
            reply = judge.complete(request.messages)
        except Exception as exc:  # one failed request must not lose the rest of the evaluation
            record["error"] = f"{type(exc).__name__}: {exc}"
            return record
        if not isinstance(reply, str):
            record["error"] = f"judge returned {type(reply).__name__}, not text"
            return record
        if cache is not None:
            cache.put(request.key, judge.model, request.messages, reply)
    record["reply"] = reply
    record["score"] = parse_score(reply, request.rubric)
    return record


def score_critique(judge: Judge, critique: str, reference: str, context: str = "", persona: str = "",
                   cache_dir: str | None = None) -> JudgeScore:
    """One critique graded by one judge on the three rubrics (what ``Judge.score`` returns)."""
    report = judge_oeq([OeqItem("item", critique, reference, context, persona)], {"judge": judge},
                       cache_dir=cache_dir, concurrency=1, fail_if_all_error=False)
    row = report.rows[0]
    errors = [r["error"] for r in report.raw_replies if r["error"]]
    if len(errors) == len(report.raw_replies):
        raise OeqError(f"every rubric request to the judge failed: {errors[0]}")
    rationale = "\n\n".join(f"[{r['rubric']}] {r['reply'] or r['error']}" for r in report.raw_replies)
    return JudgeScore(row["completeness"], row["accuracy"], row["novelty"], rationale)


class RubricScoring:
    """Mixin for judge plugins: ``score`` runs the OEQ rubrics through the plugin's ``complete``."""

    def score(self, critique: str, reference: str, context: str) -> JudgeScore:
        return score_critique(self, critique, reference, context)  # type: ignore[arg-type]


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _summarise(rows: Sequence[Mapping[str, Any]], judge_names: Sequence[str],
               raw: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    per_dim: dict[str, list[float]] = {}
    total_unparsed = 0
    for name in judge_names:
        mine = [r for r in rows if r["judge"] == name]
        for dim in (*DIMENSIONS, "composite"):
            mean = _mean([r[dim] for r in mine if r[dim] is not None])
            if mean is not None:
                metrics[f"oeq_{name}_{dim}"] = mean
                per_dim.setdefault(dim, []).append(mean)
        unparsed = sum(len(r["unparsed"]) for r in mine)
        total_unparsed += unparsed
        metrics[f"oeq_{name}_unparsed"] = float(unparsed)
        metrics[f"oeq_{name}_errors"] = float(sum(1 for r in raw if r["judge"] == name and r["error"]))
        metrics[f"oeq_{name}_items"] = float(len(mine))
    for dim, means in per_dim.items():
        metrics[f"oeq_{dim}"] = float(sum(means) / len(means))
    metrics["oeq_unparsed"] = float(total_unparsed)
    return metrics


def judge_oeq(items: Sequence[OeqItem], judges: Mapping[str, Judge],
              weights: Sequence[float] = DEFAULT_WEIGHTS, cache_dir: str | None = None, *,
              concurrency: int = 4, fail_if_all_error: bool = True) -> OeqReport:
    """Grade every item with every judge on the three rubrics.

    Args:
        items: the critiques with their references.
        judges: name → judge (see :func:`build_judges`); names appear in metric keys.
        weights: composite weights of completeness, accuracy, novelty.
        cache_dir: folder of cached replies (None: no cache); a rerun with the same judge models
            and messages reads the replies from there instead of calling the judges.
        concurrency: requests in flight at once (judges are network-bound).
        fail_if_all_error: raise when every request to some judge failed (a dead endpoint or a
            bad key should stop the run, not produce an empty report).

    Raises:
        OeqError: see ``fail_if_all_error``; the message has the judge's first error, which names
            its endpoint.
    """
    weights = check_weights(weights)
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    ids = [i.item_id for i in items]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"OEQ item ids must be unique; repeated: {', '.join(dup[:5])}")
    cache = ReplyCache(cache_dir) if cache_dir else None
    requests = [
        _Request(item, name, rubric, msgs, cache_key(judge.model, msgs))
        for name, judge in judges.items() for item in items for rubric in DIMENSIONS
        for msgs in [rubric_messages(rubric, item)]
    ]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        raw = list(pool.map(lambda r: _ask(judges[r.judge], r, cache), requests))

    if fail_if_all_error:
        for name in judges:
            mine = [r for r in raw if r["judge"] == name]
            if mine and all(r["error"] for r in mine):
                raise OeqError(f"judge {name!r}: all {len(mine)} requests failed; first error: {mine[0]['error']}")
    by_key = {(r["item_id"], r["judge"], r["rubric"]): r for r in raw}
    rows = []
    for name in judges:
        for item in items:
            scores = {d: by_key[(item.item_id, name, d)]["score"] for d in DIMENSIONS}
            rows.append({"item_id": item.item_id, "judge": name, **scores,
                         "composite": composite(scores, weights),
                         "unparsed": [d for d in DIMENSIONS if scores[d] is None]})
    report = OeqReport(_summarise(rows, list(judges), raw), rows, raw)
    unparsed = int(report.metrics["oeq_unparsed"])
    if unparsed:
        log.warning("OEQ: %d of %d judge replies had no readable score (excluded from the means; see the raw "
                    "replies)", unparsed, len(raw))
    return report


# --------------------------------------------------------------------------------------------
# Agreement with human ratings
# --------------------------------------------------------------------------------------------


def agreement(rows: Sequence[Mapping[str, Any]], human: Mapping[str, Mapping[str, float]],
              min_pairs: int = 3) -> dict[str, float]:
    """Pearson and Spearman correlation of each judge's scores with human ratings.

    ``human`` is ``{item_id: {dimension: rating}}`` on any scale (correlation ignores it), with
    dimensions among completeness, accuracy, novelty, composite. Only items that both the judge
    scored and a human rated count; a dimension with fewer than ``min_pairs`` pairs is skipped.
    Keys: ``agree_<judge>_<dim>_pearson``, ``_spearman`` and ``_n`` (the pairs). A correlation is
    undefined, and left out, when either side is constant.

    Raises:
        ValueError: a human rating is not a number (named by item and dimension).
    """
    from scipy import stats

    out: dict[str, float] = {}
    for name in sorted({str(r["judge"]) for r in rows}):
        for dim in (*DIMENSIONS, "composite"):
            pairs = []
            for row in rows:
                rating = human.get(str(row["item_id"]), {}).get(dim)
                if row["judge"] != name or row.get(dim) is None or rating is None:
                    continue
                try:
                    pairs.append((float(row[dim]), float(rating)))
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"human rating {row['item_id']}.{dim}={rating!r} is not a number") from exc
            if len(pairs) < min_pairs:
                continue
            judged, rated = zip(*pairs, strict=True)
            out[f"agree_{name}_{dim}_n"] = float(len(pairs))
            if len(set(judged)) < 2 or len(set(rated)) < 2:
                log.warning("agreement %s/%s: %s scores are constant; correlation is undefined", name, dim,
                            "judge" if len(set(judged)) < 2 else "human")
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[f"agree_{name}_{dim}_pearson"] = float(stats.pearsonr(judged, rated).statistic)
                out[f"agree_{name}_{dim}_spearman"] = float(stats.spearmanr(judged, rated).statistic)
    return out
