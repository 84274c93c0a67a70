"""SCQ: questions from the bank and from public-format files, reading answers, the three modes,
failed clips and the report."""

import json

import numpy as np
import pytest

from vcritic.data.demo import SCQ_QUESTIONS, scq_file_questions, write_scq_file
from vcritic.data.schema import AudioRef
from vcritic.evaluate.scq import (
    Question,
    ScqFileError,
    ScqReport,
    ScqResult,
    load_bank,
    load_questions,
    make_questions,
    option_logprobs,
    parse_choice,
    prompt_context,
    run_scq,
    scq_accuracy,
    slug,
    write_questions,
)
from vcritic.testing.dummies import sine, write_wav

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
    assert good["scq_unparsed"] == 0 and good["scq_failed_clips"] == 0
    assert not any("confusion" in k for k in good)  # the training job logs the table as an artifact
    bad = scq_accuracy(OracleCritic(False), [ROW], SCQ_QUESTIONS)
    assert bad["scq_accuracy"] == 0.0
    with pytest.raises(ValueError, match="no SCQ questions"):
        scq_accuracy(OracleCritic(True), [{**ROW, "facts": ""}], SCQ_QUESTIONS)


def test_bank_from_module_and_json(tmp_path):
    assert load_bank("vcritic.data.demo:SCQ_QUESTIONS") == list(SCQ_QUESTIONS)
    path = tmp_path / "bank.json"
    path.write_text(json.dumps([{"fact": "key", "question": "?", "stem": "in", "options": ["A", "B"]}]))
    assert load_bank(str(path))[0]["options"] == ["A", "B"]


# -- reading an answer -------------------------------------------------------------------------
KEYS = ["C major", "E major", "G major", "A major"]


@pytest.mark.parametrize(("reply", "want"), [
    ("B", 1), ("b", 1), ("(B)", 1), ("B.", 1), ("[B]", 1), ("Ｂ", 1),
    ("Answer: B", 1), ("answer:b", 1), ("The answer is (A).", 0), ("ANSWER IS C", 2), ("the answer is b", 1),
    ("the answer is B, since the drone is low", 1), ("答案：B", 1), ("答案是B", 1), ("答案为 C。", 2), ("答案: (D)", 3),
    ("C. E major", 2), ("(C) because of the drone", 2), ("I'd pick (D), clearly", 3),
    ("E major", 1), ("I think it sits in E major. And the pulse is around 130 bpm.", 1),
    # Unreadable: nothing, a letter past the options, an article, two options named, neither.
    ("", None), ("Answer: E", None), ("the answer is a flute", None), ("hmm, hard to say", None),
    ("It sits in A major, or maybe C major", None), ("E", None),
])
def test_parse_choice(reply, want):
    assert parse_choice(reply, KEYS) == want


def test_parse_choice_prefers_the_longer_option_and_reads_chinese_options():
    assert parse_choice("it is a minor third", ["minor", "minor third", "fifth"]) == 1
    assert parse_choice("这是真声唱法", ["假声", "真声", "气声", "混声", "咽音"]) == 1
    assert parse_choice("选项 E", ["假声", "真声", "气声", "混声", "咽音"]) == 4


# -- question files ----------------------------------------------------------------------------
def _clip(path, freq=440.0):
    return write_wav(str(path), sine(freq, 1.5))


def _public_file(tmp_path):
    (tmp_path / "clips").mkdir()
    _clip(tmp_path / "clips" / "one.wav")
    lines = [
        {"audio_path": "clips/one.wav", "question": "Which technique?", "options": ["falsetto", "belting", "vibrato"],
         "answer": "C", "category": "vocal technique"},
        {"audio_path": "clips/one.wav", "question": "这段演唱的情感是？", "options": ["悲伤", "喜悦", "愤怒", "平静", "紧张"],
         "answer": "e", "category": "emotion & expression", "id": "q-zh"},
        {"audio_path": str(tmp_path / "clips" / "one.wav"), "question": "Key?", "options": KEYS, "answer": "(A)"},
    ]
    path = tmp_path / "scq.jsonl"
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n", encoding="utf-8")
    return path


def test_public_format_file_is_read_with_relative_paths_categories_and_any_number_of_options(tmp_path):
    qs = load_questions(_public_file(tmp_path))
    assert [len(q.options) for q in qs] == [3, 5, 4]
    assert [q.answer for q in qs] == [2, 4, 0]
    assert qs[0].audio == AudioRef(str((tmp_path / "clips" / "one.wav").resolve()))
    assert qs[2].audio.path == str(tmp_path / "clips" / "one.wav")  # absolute paths stay
    assert [q.group for q in qs] == ["vocal technique", "emotion & expression", "all"]
    assert qs[0].example_id == "scq.jsonl:1" and qs[1].example_id == "q-zh"
    context = prompt_context(qs[0])
    assert "Question: Which technique?" in context and "A. falsetto B. belting C. vibrato" in context


@pytest.mark.parametrize(("line", "problem"), [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"audio_path": "a.wav", "question": "?", "options": ["x", "y"]}', "missing field(s) answer"),
    ('{"audio_path": "a.wav", "question": "?", "options": "x, y", "answer": "A"}', "options must be a list"),
    ('{"audio_path": "a.wav", "question": "?", "options": ["x"], "answer": "A"}', "options must be a list of 2"),
    ('{"audio_path": "a.wav", "question": "?", "options": ["x", "x"], "answer": "A"}', "options repeat 'x'"),
    ('{"audio_path": "a.wav", "question": "?", "options": ["x", "y"], "answer": "C"}', "letter of one of the 2 options (A-B)"),
    ('{"audio_path": "a.wav", "question": "?", "options": ["x", "y"], "answer": 1}', "letter of one of the 2"),
    ('{"audio_path": "", "question": "?", "options": ["x", "y"], "answer": "A"}', "audio_path must be a non-empty"),
    ('{"audio_path": "a.wav", "question": "?", "options": ["x", "y"], "answer": "A", "category": 3}', "category must be a string"),
])
def test_bad_lines_name_the_file_line_and_the_fix(tmp_path, line, problem):
    good = '{"audio_path": "a.wav", "question": "?", "options": ["x", "y"], "answer": "A"}'
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{line}\n{good}\n")
    with pytest.raises(ScqFileError) as err:
        load_questions(path)
    assert f"{path}:2: " in str(err.value) and problem in str(err.value)
    assert f"{path}:1" not in str(err.value) and "1 bad line(s)" in str(err.value)


def test_every_bad_line_is_listed_and_an_empty_or_missing_file_is_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{\n[1]\n")
    with pytest.raises(ScqFileError, match=r"2 bad line\(s\)") as err:
        load_questions(path)
    assert f"{path}:1:" in str(err.value) and f"{path}:2:" in str(err.value)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ScqFileError, match="holds no questions"):
        load_questions(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_questions(tmp_path / "nope.jsonl")


def test_the_demo_writes_its_facts_as_a_public_file_that_reads_back(tmp_path):
    (tmp_path / "audio").mkdir()
    clip = _clip(tmp_path / "audio" / "x.wav")
    row = {**ROW, "audio_path": clip, "persona": "A casual listener.", "context": "Genre: folk.", "offset_s": 0.0,
           "duration_s": 1.5}
    raw = scq_file_questions([row])
    assert {q["category"] for q in raw} == {"musical knowledge", "instrumentation"}
    assert {q["fact"]: q["answer"] for q in raw} == {"key": "B", "timbre": "B", "tempo_bpm": "C"}
    path = write_scq_file([row], tmp_path / "out" / "scq_test.jsonl")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["audio_path"] == "../audio/x.wav"  # relative to the file's folder
    qs = load_questions(path)
    assert len(qs) == 3 and all(q.audio.path == str((tmp_path / "audio" / "x.wav").resolve()) for q in qs)
    assert {q.stem for q in qs} == {e["stem"] for e in SCQ_QUESTIONS}
    assert all(q.persona == "A casual listener." and q.context == "Genre: folk." for q in qs)
    with pytest.raises(ValueError, match="no SCQ questions"):
        write_scq_file([{**row, "facts": "{}"}], tmp_path / "none.jsonl")


# -- asking: fakes for the report, a tiny real critic for the model path ----------------------
class ScriptedCritic:
    """Answers generative questions from a script keyed by question text; loglik by option."""

    def __init__(self, replies):
        self.replies = replies
        self.calls = []

    def critique(self, audio, persona, context="", *, speak=True, max_text_tokens=64):
        self.calls.append({"audio": audio, "persona": persona, "context": context, "speak": speak,
                           "max_text_tokens": max_text_tokens})
        question = next(line for line in context.splitlines() if line.startswith("Question: "))[len("Question: "):]

        class Reply:
            text = self.replies[question]

        return Reply()


def test_generative_mode_report_counts_unparsed_failed_clips_and_confusion(tmp_path):
    clip = _clip(tmp_path / "ok.wav")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF" + bytes(200))

    def q(i, question, answer, category, audio):
        return Question(f"q{i}", category, question, "", ("red", "green", "blue"), answer, category=category,
                        audio=AudioRef(audio), source=f"f:{i}")

    questions = [q(1, "one", 0, "colour", clip), q(2, "two", 1, "colour", clip), q(3, "three", 2, "情感", clip),
                 q(4, "four", 0, "colour", str(tmp_path / "missing.wav")), q(5, "five", 0, "colour", str(corrupt)),
                 q(6, "six", 1, "colour", str(corrupt))]
    critic = ScriptedCritic({"one": "Answer: A", "two": "(C)", "three": "no idea"})
    seen = []
    report = run_scq(critic, questions, "generative", max_text_tokens=7, on_question=lambda d, n: seen.append((d, n)))
    assert seen[-1] == (6, 6)
    assert all(c["speak"] is False and c["max_text_tokens"] == 7 for c in critic.calls) and len(critic.calls) == 3
    m = report.metrics()
    zh = slug("情感")
    assert zh.startswith("c") and zh.isascii()
    assert m["scq_accuracy"] == pytest.approx(1 / 3) and m["scq_questions"] == 3 and m["scq_correct"] == 1
    assert m["scq_unparsed"] == 1 and m[f"scq_unparsed_{zh}"] == 1
    assert m["scq_failed_clips"] == 2 and m["scq_failed_questions"] == 3  # two bad files, three questions on them
    assert m["scq_accuracy_colour"] == 0.5 and m[f"scq_accuracy_{zh}"] == 0.0
    assert m["scq_confusion_true_A_pred_A"] == 1 and m["scq_confusion_true_B_pred_C"] == 1
    assert m[f"scq_confusion_{zh}_true_C_pred_none"] == 1 and m["scq_confusion_colour_true_B_pred_C"] == 1
    summary = json.loads(json.dumps(report.to_dict()))
    assert summary["categories"]["colour"]["confusion"] == {"A": {"A": 1}, "B": {"C": 1}}
    assert {f["id"] for f in summary["failed"]} == {"q4", "q5", "q6"}
    assert "cannot decode audio" in next(f["error"] for f in summary["failed"] if f["id"] == "q5")
    assert summary["results"][2]["unparsed"] is True and summary["results"][2]["reply"] == "no idea"
    assert all(k.replace("_", "").replace(".", "").isalnum() for k in m)  # MLflow-safe names


def test_unknown_mode_and_questions_a_mode_cannot_ask_raise():
    q = make_questions([ROW], SCQ_QUESTIONS[:1])[0]
    with pytest.raises(ValueError, match="unknown SCQ mode 'quiz'"):
        run_scq(OracleCritic(True), [q], "quiz")
    with pytest.raises(ValueError, match="cloze mode asks bank questions"):
        run_scq(OracleCritic(True), [q], "cloze")  # no rows given
    with pytest.raises(ValueError, match="needs the question's clip"):
        run_scq(OracleCritic(True), [q], "loglik")  # ROW has no audio_path


def test_report_slugs_stay_unique():
    a = Question("1", "x", "?", "", ("p", "q"), 0, category="a b")
    b = Question("2", "x", "?", "", ("p", "q"), 0, category="a-b")
    report = ScqReport("loglik", [ScqResult(a, 0), ScqResult(b, 1)])
    assert sorted(report.slugs().values()) == ["a_b", "a_b_2"]
    m = report.metrics()
    assert m["scq_accuracy_a_b"] + m["scq_accuracy_a_b_2"] == 1.0


@pytest.fixture(scope="module")
def tiny_critic(tmp_path_factory):
    """A randomly initialised critic with the demo's layout (vcritic's music encoder), built in seconds."""
    import torch

    from vcritic.config import load, to_dict
    from vcritic.critic import Critic
    from vcritic.models import build
    from vcritic.registry import create

    root = tmp_path_factory.mktemp("tiny")
    corpus = ["Persona: a fan.\nAbout the song: Question: Key? Options: A. C major B. E major\nListen and critique:",
              " the lead sounds like a flute. it sits in G major. Answer: B"] * 10
    spec = build.materialize_backbone(
        {"name": "causal_lm", "options": {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                     "num_attention_heads": 4, "num_key_value_heads": 2},
                                          "tokenizer_vocab_size": 300}}, corpus, root / "base")
    tok = create("audio_tokenizers", "mel_kmeans", codebook_size=8, frame_rate=12.5)
    tok.fit([sine(f, 1.5) for f in (220.0, 330.0, 440.0, 550.0)])
    model_cfg = to_dict(load(None).model)
    torch.manual_seed(0)
    model, tokenizer = build.build_critic(spec, model_cfg, tok.codebook_size, tok.feature_dim,
                                          num_codebooks=tok.num_codebooks)
    return Critic(model, tokenizer, tok, {"model": model_cfg})


def test_batched_option_scores_equal_one_by_one(tiny_critic, tmp_path):
    heard = tiny_critic.hear(_clip(tmp_path / "c.wav"), "A fan.", prompt_context(
        Question("x", "", "Key?", "", tuple(KEYS), 0)))
    options = [" " + k for k in KEYS] + [" a much longer option than the others, to pad the batch"]
    batched = option_logprobs(tiny_critic, heard, " it sits in", options, batch_size=3)
    single = [tiny_critic.continuation_logprob(heard, " it sits in", o) for o in options]
    assert batched == pytest.approx(single, abs=1e-4)


def test_every_mode_runs_on_a_tiny_critic_and_bad_clips_are_counted(tiny_critic, tmp_path):
    good = load_questions(_public_file(tmp_path))
    broken = tmp_path / "broken.wav"
    broken.write_bytes(np.random.default_rng(0).bytes(512))
    questions = [*good, Question("bad", "", "Key?", "", tuple(KEYS), 0, audio=AudioRef(str(broken)))]
    for mode in ("loglik", "generative"):
        report = run_scq(tiny_critic, questions, mode, max_text_tokens=4)
        assert len(report.results) == 3 and [f["id"] for f in report.failed] == ["bad"], mode
        m = report.metrics(prefix=f"scq_{mode}")
        assert 0.0 <= m[f"scq_{mode}_accuracy"] <= 1.0 and m[f"scq_{mode}_failed_clips"] == 1
        if mode == "loglik":
            assert all(len(r.scores) == len(r.question.options) for r in report.results) and m["scq_loglik_unparsed"] == 0
        else:
            assert all(isinstance(r.reply, str) for r in report.results)
    # cloze hears the tokenized row; the tiny critic can hear a clip and stand in for the row.
    row = {**ROW, "audio_path": str(tmp_path / "clips" / "one.wav")}

    class RowHearing:
        def __getattr__(self, name):
            return getattr(tiny_critic, name)

        def heard_row(self, r):
            return tiny_critic.hear(r["audio_path"], "A fan.", "")

    metrics = scq_accuracy(RowHearing(), [row], SCQ_QUESTIONS)
    assert metrics["scq_questions"] == 3 and 0.0 <= metrics["scq_accuracy"] <= 1.0


def test_write_questions_makes_paths_relative(tmp_path):
    clip = _clip(tmp_path / "a.wav")
    path = write_questions([{"audio_path": clip, "question": "?", "options": ["x", "y"], "answer": "B"}],
                           tmp_path / "sub" / "q.jsonl")
    assert json.loads(path.read_text())["audio_path"] == "../a.wav"
    assert load_questions(path)[0].answer == 1
