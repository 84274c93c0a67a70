"""OEQ evaluation: score parsing, composites, unparsed handling, the reply cache, artifacts, agreement."""

import json
import re

import pytest
from scipy import stats

from plugins.http.openai_chat import OpenAIChatJudge
from vcritic.config import ConfigError, load
from vcritic.evaluate import oeq
from vcritic.evaluate.oeq import OeqError, OeqItem, agreement, build_judges, judge_oeq, parse_score
from vcritic.protocols import JudgeScore
from vcritic.testing import FakeJudge
from vcritic.testing.chat_server import ChatServer

ITEMS = [
    OeqItem("song1", "The melody of this folk ballad sits in E major; the vibrato is wide.", "A folk ballad in E major.",
            "Genre: folk.", "A strict vocal coach."),
    OeqItem("song2", "A waltz in D minor, sung with tight breath control and clear lyrics in the chorus.",
            "A waltz in D major.", "Meter 3/4.", "A fan."),
]


@pytest.mark.parametrize(
    "reply, rubric, expected",
    [
        ("Score: 15.5/16", "completeness", 15.5 / 16),
        ("Music understanding: 5/6\nVocal technique: 2/3\nScore: 12/16", "completeness", 0.75),
        ("总分：12分", "completeness", 0.75),
        ("总分：１２／１６", "completeness", 0.75),  # full-width digits and slash
        ("Total: 13/16", "completeness", 13 / 16),
        ("12/16", "completeness", 0.75),
        ("得分 8/10", "novelty", 0.8),
        ("新颖性：3/4\n总分：7/10", "novelty", 0.7),
        ("Novelty: 3/4\nMusical relevance: 2/3\nDepth: 1/3\nScore: 6/10", "novelty", 0.6),
        ("Score: 8 out of 10", "novelty", 0.8),
        ("7", "novelty", 0.7),
        ('{"score": 7}', "novelty", 0.7),
        ('```json\n{"score": "12/16", "reason": "broad"}\n```', "completeness", 0.75),
        ('Here you go: {"completeness": 8}', "completeness", 0.5),
        ("accuracy 75%", "accuracy", 0.75),
        ("准确率：80%", "accuracy", 0.8),
        ("Accuracy: 0.6", "accuracy", 0.6),
        ("3 of 4 facts are correct", "accuracy", 0.75),
        ("- E major: correct\n- folk: incorrect\nCorrect facts: 1 of 2", "accuracy", 0.5),
        ("正确事实数：3，事实总数：4", "accuracy", 0.75),
        ('{"correct": 2, "stated": 5}', "accuracy", 0.4),
        ("Correct facts: 0 of 0\nAccuracy: 0%", "accuracy", 0.0),
    ],
)
def test_parse_score_reads_english_chinese_fractions_percentages_and_json(reply, rubric, expected):
    assert parse_score(reply, rubric) == pytest.approx(expected)


@pytest.mark.parametrize(
    "reply, rubric",
    [
        ("I think it deserves a 7.", "novelty"),  # no score line
        ("Novelty: 3/4\nDepth: 1/3", "novelty"),  # only sub-scores, no total
        ("Score: 20/16", "completeness"),  # out of range: the verdict is broken, not clipped
        ("Correct: 3, Total: 4", "accuracy"),  # ambiguous
        ('{"score": true}', "novelty"),
        ("", "accuracy"),
        (None, "accuracy"),
    ],
)
def test_unreadable_replies_are_none_never_zero(reply, rubric):
    assert parse_score(reply, rubric) is None


def test_rubric_prompts_carry_the_point_structure():
    c, a, n = (oeq.RUBRICS[d].system_prompt for d in oeq.DIMENSIONS)
    assert [int(x) for x in re.findall(r"up to (\d+)", c)] == [6, 3, 3, 2, 2] and "Score: <total>/16" in c
    assert [int(x) for x in re.findall(r"up to (\d+)", n)] == [4, 3, 3] and "Score: <total>/10" in n
    assert "Correct facts: <C> of <S>" in a and "Accuracy:" in a
    messages = oeq.rubric_messages("completeness", ITEMS[0])
    assert oeq.rubric_of(messages) == "completeness" and "A strict vocal coach." in messages[1]["content"]
    assert "A strict vocal coach." not in oeq.rubric_messages("accuracy", ITEMS[0])[1]["content"]


def test_composite_math_and_weights():
    judge = FakeJudge(JudgeScore(1.0, 0.5, 0.0))
    report = judge_oeq(ITEMS, {"fake": judge})
    assert [r["composite"] for r in report.rows] == pytest.approx([0.2 * 1 + 0.6 * 0.5, 0.5])
    assert report.metrics["oeq_fake_completeness"] == 1.0 and report.metrics["oeq_fake_accuracy"] == 0.5
    assert report.metrics["oeq_composite"] == pytest.approx(0.5) and report.metrics["oeq_unparsed"] == 0
    skewed = judge_oeq(ITEMS[:1], {"fake": judge}, weights=(1, 1, 2))
    assert skewed.rows[0]["composite"] == pytest.approx((1.0 + 0.5 + 0.0) / 4)  # normalised by Σw
    assert JudgeScore(1.0, 0.5, 0.0).weighted((1, 1, 2)) == pytest.approx(0.375)
    for bad in [(0, 0, 0), (1, -1, 1), (1, 1)]:
        with pytest.raises(ValueError, match="3 non-negative"):
            judge_oeq(ITEMS, {"fake": judge}, weights=bad)


def test_unparsed_is_excluded_from_means_and_counted():
    flaky = FakeJudge(0.5, replies={"novelty": "Lovely song!"})
    steady = FakeJudge(JudgeScore(1.0, 1.0, 0.25))
    report = judge_oeq(ITEMS, {"flaky": flaky, "steady": steady})
    flaky_rows = [r for r in report.rows if r["judge"] == "flaky"]
    assert all(r["novelty"] is None and r["composite"] is None and r["unparsed"] == ["novelty"] for r in flaky_rows)
    m = report.metrics
    assert "oeq_flaky_novelty" not in m and "oeq_flaky_composite" not in m  # not a 0
    assert m["oeq_flaky_unparsed"] == 2 and m["oeq_steady_unparsed"] == 0 and m["oeq_unparsed"] == 2
    assert m["oeq_novelty"] == pytest.approx(0.25)  # only the judge that produced novelty scores
    assert m["oeq_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError, match="novelty reply had no readable score"):
        JudgeScore(0.5, 0.5, None).weighted()


def test_failed_requests_are_recorded_and_a_dead_judge_stops_the_run():
    class Broken(FakeJudge):
        def complete(self, messages):
            if oeq.rubric_of(messages) == "accuracy":
                raise RuntimeError("POST http://judge/v1/chat/completions returned HTTP 500 after 4 attempt(s)")
            return super().complete(messages)

    report = judge_oeq(ITEMS, {"half": Broken(0.5)})
    assert report.metrics["oeq_half_errors"] == 2 and report.metrics["oeq_half_unparsed"] == 2
    errors = [r for r in report.raw_replies if r["error"]]
    assert {r["rubric"] for r in errors} == {"accuracy"} and "HTTP 500" in errors[0]["error"]

    class Dead(FakeJudge):
        def complete(self, messages):
            raise RuntimeError("POST http://judge/v1/chat/completions failed after 4 attempt(s)")

    with pytest.raises(OeqError, match="judge 'dead': all 6 requests failed.*http://judge/v1/chat/completions"):
        judge_oeq(ITEMS, {"dead": Dead()})


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("VCRITIC_TEST_KEY", "sk-oeq")
    with ChatServer() as s:
        yield s


def test_cache_hit_on_rerun_and_raw_replies_written(server, tmp_path):
    judges = build_judges([{"name": "gpt", "plugin": "openai_chat",
                            "params": {"model": "judge-model", "base_url": server.openai_base_url,
                                       "api_key_env": "VCRITIC_TEST_KEY"}}])
    cache = str(tmp_path / "cache")
    first = judge_oeq(ITEMS, judges, cache_dir=cache)
    assert len(server.requests) == 6 and not any(r["cached"] for r in first.raw_replies)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 6

    again = judge_oeq(ITEMS, judges, cache_dir=cache)
    assert len(server.requests) == 6  # nothing asked twice
    assert all(r["cached"] for r in again.raw_replies) and again.rows == first.rows
    assert again.metrics == first.metrics

    edited = [ITEMS[0], OeqItem("song2", ITEMS[1].critique + " Great!", ITEMS[1].reference, ITEMS[1].context)]
    judge_oeq(edited, judges, cache_dir=cache)
    assert len(server.requests) == 9  # only the changed critique's three prompts

    paths = again.write(tmp_path / "out")
    rows = [json.loads(line) for line in open(paths["rows"], encoding="utf-8")]
    raw = [json.loads(line) for line in open(paths["raw_replies"], encoding="utf-8")]
    assert rows == first.rows and len(raw) == 6
    assert {(r["item_id"], r["rubric"]) for r in raw} == {(i.item_id, d) for i in ITEMS for d in oeq.DIMENSIONS}
    novelty = next(r for r in raw if r["rubric"] == "novelty")
    assert "总分" in novelty["reply"] and novelty["messages"][0]["role"] == "system" and novelty["model"] == "judge-model"
    assert json.loads(open(paths["metrics"]).read())["oeq_gpt_accuracy"] == first.metrics["oeq_gpt_accuracy"]
    # the responder's visible rule: song1 states major + folk + ballad, all in the reference
    by = {(r["item_id"], r["judge"]): r for r in first.rows}
    assert by[("song1", "gpt")]["accuracy"] == 1.0 and by[("song2", "gpt")]["accuracy"] == 0.5


def test_judge_score_runs_the_three_rubrics(server):
    judge = OpenAIChatJudge(base_url=server.openai_base_url, api_key_env="VCRITIC_TEST_KEY")
    score = judge.score("In E major, a folk melody with vibrato.", "A folk song in E major.", "")
    assert score.accuracy == 1.0 and score.completeness == pytest.approx(4 / 16)  # melody, vibrato and not score.unparsed
    assert "[novelty]" in score.rationale and len(server.requests) == 3


def test_agreement_matches_scipy_and_skips_thin_dimensions():
    judge_scores = [0.1, 0.4, 0.35, 0.8, 0.9]
    human_scores = [1.0, 2.0, 4.0, 3.0, 5.0]
    rows = [{"item_id": f"i{k}", "judge": "gpt", "completeness": c, "accuracy": 0.5 if k < 2 else None,
             "novelty": 0.3, "composite": c} for k, c in enumerate(judge_scores)]
    human = {f"i{k}": {"completeness": h, "accuracy": h, "novelty": h} for k, h in enumerate(human_scores)}
    human["i4"].pop("novelty")
    human["unjudged"] = {"completeness": 3.0}
    out = agreement(rows, human)
    assert out["agree_gpt_completeness_pearson"] == pytest.approx(stats.pearsonr(judge_scores, human_scores)[0])
    assert out["agree_gpt_completeness_spearman"] == pytest.approx(stats.spearmanr(judge_scores, human_scores)[0])
    assert out["agree_gpt_completeness_n"] == 5
    assert not any(k.startswith("agree_gpt_accuracy") for k in out)  # 2 pairs < 3
    assert out["agree_gpt_novelty_n"] == 4 and "agree_gpt_novelty_pearson" not in out  # constant judge scores
    assert "agree_gpt_composite_pearson" not in out  # no human composite ratings
    with pytest.raises(ValueError, match="i0.completeness='high' is not a number"):
        agreement(rows, {"i0": {"completeness": "high"}})


def test_build_judges_validates_specs(monkeypatch):
    judges = build_judges([{"name": "fake", "plugin": "vcritic.testing.dummies:FakeJudge", "params": {"score": 0.4}}])
    assert isinstance(judges["fake"], FakeJudge) and judges["fake"].fixed.accuracy == 0.4
    assert build_judges([]) == {}
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cases = [
        ([{"name": "a", "plugin": "openai_chat"}], r"eval.judges\[0\] \('a', plugin 'openai_chat'\).*OPENAI_API_KEY"),
        ([{"name": "a b", "plugin": "openai_chat"}], "name must be letters"),
        ([{"name": "a", "plugin": "vcritic.testing.dummies:FakeJudge"}] * 2, "used by two judges"),
        ([{"name": "a", "plugin": "openai_chat", "model": "x"}], "unknown key.*model"),
        ([{"name": "a", "plugin": "no_such_judge"}], "no judges plugin named 'no_such_judge'"),
        ([{"name": "a", "plugin": "vcritic.testing.dummies:FakeJudge", "params": {"colour": 1}}], "rejected its options"),
    ]
    for specs, match in cases:
        with pytest.raises(OeqError, match=match):
            build_judges(specs)


def test_config_defaults_and_weight_validation():
    cfg = load("demo")
    assert list(cfg.eval.judges) == [] and list(cfg.eval.oeq_weights) == [0.2, 0.6, 0.2]
    for bad in ("[0,0,0]", "[1,-1,1]", "[1,1]"):
        with pytest.raises(ConfigError, match="eval.oeq_weights"):
            load("demo", [f"eval.oeq_weights={bad}"])
