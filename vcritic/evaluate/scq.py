"""Single-choice questions (SCQ) about held-out clips, answered by likelihood.

A question bank entry describes one checkable fact::

    {"fact": "key", "question": "Which key is the song in?", "stem": "it sits in",
     "options": ["C major", ...], "answer_format": "{}", "format": "{}."}

For each held-out clip whose ``facts`` JSON has that fact, the critic hears the clip, reads
its persona prompt, and every option is scored by the mean log-probability of
``" " + format.format(option)`` as the continuation of a cloze: the reference critique's
own words up to and including the stem (just the stem if the critique does not contain it).
``answer_format`` turns the fact's value into the text of the right option. The
highest-scoring option is the critic's answer; accuracy is the share answered correctly.

Why a cloze in the critique's own words: a critic is trained to write critiques, not to
answer quiz prompts, and a stem placed where no critique ever starts measures that
mismatch rather than what the critic heard. Other facts that precede the stem in the
reference must not give the answer away, which holds when facts vary independently
across songs (as in the demo set).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vcritic import registry


@dataclass(frozen=True)
class Question:
    example_id: str
    fact: str
    question: str
    stem: str
    options: tuple[str, ...]
    answer: int
    format: str = "{}"
    prefix: str = ""  # cloze context: the reference critique up to and including the stem


def load_bank(target: str) -> list[dict[str, Any]]:
    """A bank from a ``"module:attr"`` string or a JSON file path."""
    if target.endswith(".json"):
        with open(target) as f:
            return json.load(f)
    return list(registry.import_target(target))


def make_questions(rows: Iterable[dict[str, Any]], bank: Sequence[dict[str, Any]]) -> list[Question]:
    """One question per (row, bank entry) whose fact the row's ``facts`` JSON states."""
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
            questions.append(Question(row["example_id"], entry["fact"], entry["question"], entry["stem"], options,
                                      options.index(answer_text), entry.get("format", "{}"), prefix))
    return questions


def scq_accuracy(critic, rows: Sequence[dict[str, Any]], bank: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy overall and per fact.

    Args:
        critic: a :class:`vcritic.critic.Critic`.
        rows: tokenized shard rows (``vcritic.data.schema.TOKEN_COLUMNS``, ``facts``, ``target_text``, ``example_id``).
        bank: question bank entries (see module docstring).

    Returns:
        ``{"scq_accuracy": ..., "scq_accuracy_<fact>": ..., "scq_questions": n}``.
    """
    by_id = {r["example_id"]: r for r in rows}
    questions = make_questions(rows, bank)
    if not questions:
        raise ValueError("no SCQ questions: no held-out row states a fact the question bank asks about")
    right: dict[str, list[bool]] = defaultdict(list)
    for q in questions:
        heard = critic.heard_row(by_id[q.example_id])
        scores = [critic.continuation_logprob(heard, q.prefix, " " + q.format.format(option)) for option in q.options]
        right[q.fact].append(max(range(len(scores)), key=scores.__getitem__) == q.answer)
    every = [ok for oks in right.values() for ok in oks]
    out = {"scq_accuracy": sum(every) / len(every), "scq_questions": float(len(every))}
    out.update({f"scq_accuracy_{fact}": sum(oks) / len(oks) for fact, oks in right.items()})
    return out
