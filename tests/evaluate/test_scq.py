"""SCQ questions from facts, cloze prefixes, and accuracy."""

import json

import pytest

from vcritic.data.demo import SCQ_QUESTIONS
from vcritic.evaluate.scq import load_bank, make_questions, scq_accuracy

ROW = {
    "example_id": "a",
    "facts": json.dumps({"key": "E major", "tempo_bpm": 130, "timbre": "reed"}),
    "target_text": "Nice. The lead sounds like a reed. I think it sits in E major. And the pulse is around 130 bpm.",
    "prompt_ids": [1, 2],
    "music_tokens": [3, 4],
}


def test_questions_with_answers_and_cloze_prefixes():
    qs = {q.fact: q for q in make_questions([ROW], SCQ_QUESTIONS)}
    assert set(qs) == {"key", "tempo_bpm", "timbre"}
    assert qs["key"].options[qs["key"].answer] == "E major"
    assert qs["tempo_bpm"].options[qs["tempo_bpm"].answer] == "130 bpm"
    assert qs["key"].prefix == " Nice. The lead sounds like a reed. I think it sits in"
    # A critique without the stem falls back to the stem alone.
    q = make_questions([{**ROW, "target_text": "Short."}], SCQ_QUESTIONS[:1])[0]
    assert q.prefix == " it sits in"


def test_rows_without_the_fact_are_skipped_and_bad_answers_raise():
    assert make_questions([{**ROW, "facts": "{}"}], SCQ_QUESTIONS) == []
    with pytest.raises(ValueError, match="not among the options"):
        make_questions([{**ROW, "facts": json.dumps({"key": "F minor"})}], SCQ_QUESTIONS)


class OracleCritic:
    """Scores the continuation that matches the row's true fact highest."""

    def __init__(self, right: bool):
        self.right = right

    def heard_row(self, row):
        return row

    def continuation_logprob(self, heard, prefix, continuation):
        truth = ("E major", "130 bpm", "reed")
        hit = any(t in continuation for t in truth)
        return (0.0 if hit else -1.0) if self.right else (-1.0 if hit else 0.0)


def test_accuracy_overall_and_per_fact():
    good = scq_accuracy(OracleCritic(True), [ROW], SCQ_QUESTIONS)
    assert good["scq_accuracy"] == 1.0 and good["scq_accuracy_key"] == 1.0 and good["scq_questions"] == 3
    bad = scq_accuracy(OracleCritic(False), [ROW], SCQ_QUESTIONS)
    assert bad["scq_accuracy"] == 0.0
    with pytest.raises(ValueError, match="no SCQ questions"):
        scq_accuracy(OracleCritic(True), [{**ROW, "facts": ""}], SCQ_QUESTIONS)


def test_bank_from_module_and_json(tmp_path):
    assert load_bank("vcritic.data.demo:SCQ_QUESTIONS") == list(SCQ_QUESTIONS)
    path = tmp_path / "bank.json"
    path.write_text(json.dumps([{"fact": "key", "question": "?", "stem": "in", "options": ["A", "B"]}]))
    assert load_bank(str(path))[0]["options"] == ["A", "B"]
