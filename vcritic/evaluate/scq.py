"""Single-choice questions (SCQ) about held-out clips, answered by likelihood.

A question bank entry describes one checkable fact::

    {"fact": "key", "question": "Which key is the song in?", "stem": "it sits in",
     "options": ["C major", ...], "answer_format": "{}", "suffix": "."}

For each held-out clip whose ``facts`` JSON has that fact, the critic hears the clip, reads
its persona prompt, and every option is scored by the mean log-probability of
``" " + option + suffix`` following ``" " + stem`` at the start of its critique. The
highest-scoring option is its answer; accuracy is the share answered correctly.
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
    suffix: str = ""


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
            questions.append(Question(row["example_id"], entry["fact"], entry["question"], entry["stem"], options,
                                      options.index(answer_text), entry.get("suffix", "")))
    return questions


def scq_accuracy(critic, rows: Sequence[dict[str, Any]], bank: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy overall and per fact.

    Args:
        critic: a :class:`vcritic.critic.Critic`.
        rows: tokenized shard rows (``prompt_ids``, ``music_tokens``, ``facts``, ``example_id``).
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
        row = by_id[q.example_id]
        scores = [
            critic.continuation_logprob(list(row["prompt_ids"]), list(row["music_tokens"]), " " + q.stem,
                                        " " + option + q.suffix)
            for option in q.options
        ]
        right[q.fact].append(max(range(len(scores)), key=scores.__getitem__) == q.answer)
    every = [ok for oks in right.values() for ok in oks]
    out = {"scq_accuracy": sum(every) / len(every), "scq_questions": float(len(every))}
    out.update({f"scq_accuracy_{fact}": sum(oks) / len(oks) for fact, oks in right.items()})
    return out
