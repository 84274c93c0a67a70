"""The critic as a reward: probe math, batching, the learnable toy's ranking, and the Ray actor pool.

Heavy (trains a tiny critic, starts Ray): run under the shared lock,
``flock /tmp/vcritic-heavy.lock .venv/bin/python -m pytest tests/test_reward.py -q -x``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from vcritic.reward import DEFAULT_PROBES, Probe, RewardModel, combine, expected_value, probes_from_config
from vcritic.testing import FakeJudge
from vcritic.testing import reward_toy as rt

HELD_OUT = range(24, 36)  # melodies the trained toy never heard
STRONG = (("badly off", "clean"), ("spot on", "very noisy"))


@pytest.fixture(scope="module")
def tunes():
    return rt.melodies(40, seed=0)


@pytest.fixture(scope="module")
def small(tmp_path_factory, tunes):
    """An untrained toy critic (the probe math holds for any critic)."""
    clips = rt.toy_clips(range(3), tunes, seed=1)
    return rt.build_toy_critic(tmp_path_factory.mktemp("small"), [c.samples for c in clips])


def test_probe_checks_name_the_probe():
    with pytest.raises(ValueError, match="'pitch'.*at least two options"):
        Probe("pitch", " The pitch is", {"fine": 1.0})
    with pytest.raises(ValueError, match=r"'pitch'.*\[0, 1\]"):
        Probe("pitch", " The pitch is", {"fine": 1.0, "bad": -0.5})
    with pytest.raises(ValueError, match="prefix is empty"):
        Probe("pitch", "  ", {"fine": 1.0, "bad": 0.0})
    with pytest.raises(ValueError, match=r"reward.probes\[0\] lacks \['prefix'\]"):
        probes_from_config([{"name": "x", "options": {"a": 1.0, "b": 0.0}}])
    assert probes_from_config(None) == list(DEFAULT_PROBES)
    assert combine({"a": 1.0, "b": 0.0}, {"a": 3.0, "b": 1.0}) == 0.75
    assert combine({"a": 1.0}, {"a": 1.0}, judge=0.0, judge_weight=1.0) == 0.5
    p, s = expected_value([0.0, math.log(3.0)], [0.0, 1.0])
    assert p == pytest.approx([0.25, 0.75]) and s == pytest.approx(0.75)


def test_expected_value_is_the_softmax_of_the_option_likelihoods(small, tunes):
    critic = small.critic
    probes = [Probe("intonation", " The intonation is", {"spot on": 1.0, "a little off": 0.5, "badly off": 0.0}, 2.0),
              Probe("sound", " The sound is", {"clean": 1.0, "very noisy": 0.0}, 1.0, template=" {}")]
    model = RewardModel(critic, probes, persona=rt.PERSONA)
    clip = rt.render(tunes[5], "a little off", "a little noisy", seed=3)
    [result] = model.score([clip])
    heard = critic.hear(clip, rt.PERSONA, "")
    for probe in probes:
        ll = np.array([critic.continuation_logprob(heard, probe.prefix, c) for c in probe.continuations()])
        p = np.exp(ll) / np.exp(ll).sum()  # by hand
        assert [result.logliks[probe.name][o] for o in probe.options] == pytest.approx(ll, abs=1e-5)
        assert [result.probabilities[probe.name][o] for o in probe.options] == pytest.approx(p, abs=1e-5)
        assert result.scores[probe.name] == pytest.approx(float(p @ probe.values()), abs=1e-5)
    expected = (2 * result.scores["intonation"] + result.scores["sound"]) / 3
    assert result.reward == pytest.approx(expected, abs=1e-12)
    assert 0.0 <= result.reward <= 1.0 and result.judge is None


def test_batched_scores_equal_one_by_one(small, tunes):
    clips = [rt.render(tunes[m], i, s, seed=m) for m, (i, s) in enumerate(
        [("spot on", "clean"), ("badly off", "clean"), ("spot on", "very noisy"), ("a little off", "a little noisy")])]
    clips[1] = clips[1][: len(clips[1]) // 2]  # different lengths pad differently
    together = RewardModel(small.critic, batch_size=7).score(clips)
    alone = [RewardModel(small.critic, batch_size=1).score([c])[0] for c in clips]
    for a, b in zip(together, alone, strict=True):
        assert a.reward == pytest.approx(b.reward, abs=1e-5)
        for name in a.scores:
            assert a.logliks[name] == pytest.approx(b.logliks[name], abs=1e-4)


def test_score_batch_resamples_and_checks_its_input(small, tunes):
    import soxr

    model = RewardModel(small.critic)
    clip = rt.render(tunes[0], seed=1)
    at_22k = soxr.resample(clip, 16000, 22050).astype(np.float32)
    [direct] = model.score([soxr.resample(at_22k, 22050, 16000).astype(np.float32)])
    [batched] = model.score_batch([at_22k], 22050)
    assert batched.reward == pytest.approx(direct.reward, abs=1e-6)
    with pytest.raises(ValueError, match=r"samples\[0\] must be a non-empty finite mono array"):
        model.score_batch([np.zeros((2, 10), np.float32)], 16000)
    with pytest.raises(ValueError, match=r"clip 0 \(/no/such.wav\) cannot be heard"):
        model.score(["/no/such.wav"])
    with pytest.raises(ValueError, match="2 contexts for 1 clips"):
        model.score([clip], contexts=["a", "b"])


def test_the_judge_term_scores_the_generated_critique(small, tunes):
    judge = FakeJudge(0.8)
    model = RewardModel(small.critic, persona=rt.PERSONA, judges=[judge], judge_weight=2.0, max_text_tokens=4)
    [result] = model.score([rt.render(tunes[1], seed=2)], references=["The sound is clean."])
    weighted = judge.fixed.weighted()
    assert result.judge == pytest.approx(weighted)
    plain = (result.scores["intonation"] + result.scores["sound"]) / 2
    assert result.reward == pytest.approx((2 * plain + 2.0 * weighted) / 4)
    assert len(judge.calls) == 1 and judge.calls[0][1] == "The sound is clean."
    with pytest.raises(ValueError, match="no judges"):
        RewardModel(small.critic, judge_weight=1.0)


def _pairs(model: RewardModel, tunes) -> dict[tuple[str, str], np.ndarray]:
    """Per degradation: reward(clean) - reward(degraded) for each held-out melody."""
    clean = np.array([r.reward for r in model.score([rt.render(tunes[m], seed=1000 + m) for m in HELD_OUT])])
    return {lv: clean - np.array([r.reward for r in model.score([rt.render(tunes[m], *lv, seed=1000 + m)
                                                                  for m in HELD_OUT])]) for lv in STRONG}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tunes):
    """The toy critic before and after training on 24 melodies, and its export."""
    root = tmp_path_factory.mktemp("toy")
    clips = rt.toy_clips(range(24), tunes, seed=0)
    toy = rt.build_toy_critic(root / "work", [c.samples for c in clips])
    before = _pairs(RewardModel(toy.critic), tunes)
    losses = rt.train_toy_critic(toy, clips, steps=250)
    return {"before": before, "losses": losses, "export": rt.save_toy_export(toy, root / "export"), "toy": toy}


@pytest.mark.slow  # trains a critic: ~4 min under load on 2 cores
def test_trained_reward_ranks_clean_above_degraded(trained, tunes):
    assert trained["losses"][-1] < 0.3 * trained["losses"][0]
    model = RewardModel.from_uri(trained["export"])  # through the export, as a user loads it
    after = _pairs(model, tunes)
    for lv in STRONG:
        untrained, gap = trained["before"][lv], after[lv]
        print(f"{lv}: untrained gap {untrained.mean():+.4f} ({np.mean(untrained > 0):.2f} ranked right), "
              f"trained gap {gap.mean():+.3f} ({np.mean(gap > 0):.2f} ranked right)")
        assert np.mean(gap > 0) >= 0.9, lv  # held-out melodies: clean ranked above degraded
        assert gap.mean() > 0.05, lv
        assert abs(untrained.mean()) < 0.02, lv  # untrained: the audio barely moves the reward


@pytest.mark.slow  # shares the trained toy
def test_actor_pool_gives_the_in_process_scores(trained, tunes, ray_local):
    from vcritic.reward import reward_actor_pool

    clips = [rt.render(tunes[m], *lv, seed=m) for m in (30, 31) for lv in (("spot on", "clean"), *STRONG)]
    local = RewardModel.from_uri(trained["export"]).score(clips)
    pool = reward_actor_pool(trained["export"], num_actors=2)
    try:
        remote = pool.score(clips)
        again = pool.score_batch(clips, 16000)
    finally:
        pool.shutdown()
    assert len(remote) == len(clips)
    for a, b, c in zip(local, remote, again, strict=True):
        assert math.isclose(a.reward, b.reward, abs_tol=1e-6) and math.isclose(a.reward, c.reward, abs_tol=1e-6)
        assert a.scores == pytest.approx(b.scores, abs=1e-6)


@pytest.mark.slow  # shares the trained toy
def test_the_example_ranks_a_held_out_clip_above_its_degraded_versions(trained, tunes):
    """jobs/reward_example.py's own degradations (not the toy's renderer) on a melody never heard."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "jobs" / "reward_example.py"
    spec = importlib.util.spec_from_file_location("reward_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    ranking = example.rank(str(trained["export"]), rt.render(tunes[30], seed=7), 16000, cents=150, snr_db=3)
    names = [name for name, _ in ranking]
    assert names[0] == "clean" and names[-1] == "detuned + noisy", names
    assert ranking[0][1].reward - ranking[-1][1].reward > 0.05
