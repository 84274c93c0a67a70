"""KV-cached, batched generation gives the recompute path's greedy tokens, text and speech.

The recompute path (``cache=False``) re-runs the whole sequence for every token of one clip at a
time: the reference. The cached path runs each prompt once (music heard once) and decodes many clips
together, left-padded. Covered on the three backbone kinds: a plain causal LM hearing through
vcritic's music encoder (1 and 3 codebooks), Qwen2.5-Omni's thinker (its own audio tower, mrope
positions) and Kimi-Audio (Whisper features + adaptor, its own audio layers).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vcritic.config import GENERATE_KEYS, ConfigError, load
from vcritic.critic import Critic, CritiqueRequest
from vcritic.models import build
from vcritic.models.generation import GenerationSettings, Sampler
from vcritic.models.sequence import Heard, vcritic_prompt

MODEL_CFG = dict(audio_head_layers=1, loss_lambda=0.5, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                 lora_target_modules=None, train_text_head=False, max_prompt_tokens=64, max_text_tokens=64,
                 max_audio_tokens=64)
PERSONAS = [("A fan.", ""), ("A strict vocal coach.", "A ballad in D minor."), ("A producer.", "Fast.")]
SHORT = dict(max_text_tokens=12, max_audio_tokens=8)


class SilentCodec:
    """Stands in for an audio tokenizer when only the generated ids matter (decode: 160 zeros per frame)."""

    sample_rate = 16000

    def decode(self, ids: np.ndarray) -> np.ndarray:
        return np.zeros(len(ids) * 160, np.float32)


class FrameCodec(SilentCodec):
    """A minimal audio tokenizer that hears: 8 band energies per 80 ms frame, the loudest band's id."""

    num_codebooks, codebook_size, feature_dim, frame_rate = 1, 16, 8, 12.5

    def features(self, samples: np.ndarray) -> np.ndarray:
        frames = np.asarray(samples, np.float32)[: len(samples) // 1280 * 1280].reshape(-1, 1280)
        spectrum = np.abs(np.fft.rfft(frames, axis=1))[:, :640].reshape(len(frames), 8, 80).mean(axis=2)
        return np.log1p(spectrum).astype(np.float32)

    def encode(self, samples: np.ndarray) -> np.ndarray:
        f = self.features(samples)
        return (f.argmax(axis=1) * 2 + (f.max(axis=1) > 1.0)).astype(np.int64)


def plain_critic(spec, num_codebooks: int = 1, seed: int = 0) -> Critic:
    torch.manual_seed(seed)
    model, tok = build.build_critic(spec, MODEL_CFG, audio_codes=16, feature_dim=8, num_codebooks=num_codebooks)
    return Critic(model, tok, SilentCodec(), {"model": dict(MODEL_CFG)})


def plain_heards(critic: Critic, lengths=(5, 9, 3)) -> list[Heard]:
    """Clips as vcritic's music encoder hears them: random codec ids and continuous frames."""
    rng = np.random.default_rng(1)
    q = critic.vocab.num_codebooks
    return [Heard(vcritic_prompt(critic.tokenizer, critic.vocab, persona, context, 64), n,
                  rng.integers(0, 16, (n, q)), rng.standard_normal((n, 8)).astype(np.float32))
            for n, (persona, context) in zip(lengths, PERSONAS, strict=False)]


def tokens(critiques) -> list[tuple[list[int], list[list[int]]]]:
    return [(c.text_tokens, c.audio_tokens.tolist()) for c in critiques]


def sharpen(critic: Critic, std: float = 0.15) -> Critic:
    """Redraw every weight matrix larger than the 0.02 init. A freshly initialised critic's logits
    are nearly flat, so a misplaced position or a stale cache entry barely moves them and greedy
    tokens hide the bug (one did: every generated token sat one position too far); sharp logits
    turn such an error into different tokens."""
    with torch.no_grad():
        for weight in critic.model.parameters():
            if weight.ndim == 2:
                weight.normal_(0.0, std)
    return critic


def assert_cached_equals_recompute(critic: Critic, heards: list[Heard], **settings) -> list:
    cached = critic.generate(heards, settings=critic.settings(cache=True, batch_size=len(heards), **settings))
    recomputed = critic.generate(heards, settings=critic.settings(cache=False, **settings))
    assert tokens(cached) == tokens(recomputed)
    assert any(len(c.audio_tokens) for c in cached)  # speech was produced, not just skipped
    return cached


@pytest.fixture(scope="module")
def critic(spec):
    return plain_critic(spec)


# --- exactness: cached == recompute ---------------------------------------------------------------
def test_cached_greedy_equals_recompute_text_and_speech(spec):
    critic = sharpen(plain_critic(spec, seed=3))
    out = assert_cached_equals_recompute(critic, plain_heards(critic), **SHORT)
    assert all(len(c.text_tokens) <= 12 and len(c.audio_tokens) <= 8 for c in out)


def test_long_cached_logits_equal_one_full_forward(spec):
    """Over 200 forced tokens, batched and left-padded, the logits the cached path picks each token
    from equal those of one teacher-forced forward of the whole sequence: the cache neither drifts
    nor misplaces positions however long the critique gets. (Token-for-token equality with the
    recompute path is checked on short critiques only: a random critic's near-flat logits let float
    rounding flip an argmax somewhere in hundreds of tokens, and from there the critiques differ.)"""
    from vcritic.models.generation import generate_text

    class Recording(Sampler):
        seen: list[torch.Tensor] = []

        def text_logits(self, logits, history, step, end_id):
            self.seen.append(logits.float().clone())
            return super().text_logits(logits, history, step, end_id)

    critic = sharpen(plain_critic(spec, seed=2))
    heards = plain_heards(critic)
    n = 200
    sampler = Recording(critic.settings(max_text_tokens=n, min_text_tokens=n))
    texts = generate_text(critic.model, [critic._streams(h, None) for h in heards], sampler)
    cached = torch.stack(sampler.seen, dim=1)  # [clips, n, vocab]
    for i, (heard, text) in enumerate(zip(heards, texts, strict=True)):
        assert len(text) == n
        streams = critic._streams(heard, text)
        full, _ = critic._logits(streams.cut(len(streams) - 1), with_audio=False)
        torch.testing.assert_close(cached[i], full[0, -(n + 1):-1].float(), atol=1e-3, rtol=1e-4)


def test_cached_greedy_equals_recompute_with_three_codebooks(spec):
    critic = sharpen(plain_critic(spec, num_codebooks=3, seed=1))
    out = assert_cached_equals_recompute(critic, plain_heards(critic), max_text_tokens=6, max_audio_tokens=6,
                                         min_audio_tokens=3)
    assert all(c.audio_tokens.shape[1] == 3 and len(c.audio_tokens) >= 3 for c in out)


def test_cached_equals_recompute_on_qwen_omni(tmp_path_factory):
    from vcritic.testing.tiny_qwen_omni import write_tiny_qwen_omni_checkpoint

    path = write_tiny_qwen_omni_checkpoint(tmp_path_factory.mktemp("qwen") / "Qwen2.5-Omni-tiny")
    spec = {"name": "qwen2_5_omni_thinker", "options": {"path": str(path), "dtype": "float32"}}
    torch.manual_seed(0)
    model, tok = build.build_critic(spec, MODEL_CFG, audio_codes=16, feature_dim=8)
    critic = sharpen(Critic(model, tok, SilentCodec(), {"model": dict(MODEL_CFG)}))
    hearing, rng = critic.hearing, np.random.default_rng(0)
    heards = []
    for seconds, (persona, context) in zip((0.7, 1.3), PERSONAS, strict=False):  # two lengths: padding + mrope
        features = hearing.features((0.3 * rng.standard_normal(int(seconds * 16000))).astype(np.float32))
        heards.append(Heard(hearing.prompt(tok, persona, context), hearing.num_audio_tokens(len(features)),
                            native_features=features))
    assert_cached_equals_recompute(critic, heards, max_text_tokens=8, max_audio_tokens=6, min_audio_tokens=2)


def test_cached_equals_recompute_on_kimi_audio(tmp_path_factory):
    from vcritic.testing.tiny_kimi import write_tiny_kimi_checkpoint

    path = write_tiny_kimi_checkpoint(tmp_path_factory.mktemp("kimi"))
    spec = {"name": "kimi_audio", "options": {"path": str(path), "dtype": "float32"}}
    cfg = {**MODEL_CFG, "audio_head_layers": 2}
    model, tok = build.build_critic(spec, cfg, audio_codes=40, feature_dim=64)
    critic = sharpen(Critic(model, tok, SilentCodec(), {"model": cfg}))
    rng = np.random.default_rng(0)
    heards = [Heard(critic.hearing.prompt(tok, persona, context), n, rng.integers(0, 40, (n, 1)),
                    native_features=rng.standard_normal((n, 64)).astype(np.float32))
              for n, (persona, context) in zip((4, 7), PERSONAS, strict=False)]
    assert_cached_equals_recompute(critic, heards, max_text_tokens=8, max_audio_tokens=6, min_audio_tokens=2)


def test_a_backbone_without_cached_layers_speaks_on_the_recompute_path(spec, caplog):
    """Third-party backbones that lack run_layers_cached keep working (same tokens), with a warning."""
    critic = plain_critic(spec)
    heards = plain_heards(critic)[:2]
    expected = tokens(critic.generate(heards, settings=critic.settings(**SHORT)))

    class Plain:  # the Backbone protocol only
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            if name == "run_layers_cached":
                raise AttributeError(name)
            return getattr(self.inner, name)

    critic.model.backbone = Plain(critic.model.backbone)
    assert not critic.model.can_cache_speech
    with caplog.at_level("WARNING"):
        assert tokens(critic.generate(heards, settings=critic.settings(**SHORT))) == expected
    assert "recompute path" in caplog.text


def test_cached_backbone_layers_match_run_layers(critic):
    from vcritic.testing.backbones import assert_cached_layers_match

    trunk = critic.model.trunk.get_base_model()
    hidden = torch.randn(2, 9, trunk.config.hidden_size)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    assert_cached_layers_match(critic.model.backbone, trunk, hidden, mask, k=1, position_ids=positions)


# --- batching -------------------------------------------------------------------------------------
def test_critique_batch_equals_one_critique_per_clip(critic):
    clips = [np.sin(np.arange(n) / 9.0).astype(np.float32) for n in (4000, 9000, 6000)]
    critic = Critic(critic.model, critic.tokenizer, FrameCodec(), critic.meta)  # hears real clips
    items = [CritiqueRequest(clip, persona, context) for clip, (persona, context) in zip(clips, PERSONAS, strict=True)]
    batched = critic.critique_batch(items, batch_size=2, **SHORT)
    single = [critic.critique(c, p, x, **SHORT) for c, (p, x) in zip(clips, PERSONAS, strict=True)]
    assert tokens(batched) == tokens(single) and [b.text for b in batched] == [s.text for s in single]
    assert tokens(critic.critique_batch([(clips[0], PERSONAS[0][0])], **SHORT)) == tokens(single[:1])
    with pytest.raises(TypeError, match="critique_batch items"):
        critic.critique_batch(["not an item"])


# --- sampling -------------------------------------------------------------------------------------
def test_sampling_is_reproducible_with_a_seed_and_top_p_tiny_is_greedy(critic):
    heards = plain_heards(critic)
    greedy = tokens(critic.generate(heards, settings=critic.settings(**SHORT)))
    hot = dict(SHORT, temperature=1.5, min_text_tokens=12)

    def sample(**extra):
        return tokens(critic.generate(heards, settings=critic.settings(**hot, **extra)))

    assert sample(seed=3) == sample(seed=3)
    assert sample(seed=3) != sample(seed=4)
    assert sample(seed=3) != greedy
    # top_p so small that only the most likely token survives: sampling is greedy again.
    assert tokens(critic.generate(heards, settings=critic.settings(**SHORT, temperature=1.5, top_p=1e-6,
                                                                    seed=9))) == greedy


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    sampler = Sampler(GenerationSettings(repetition_penalty=2.0))
    logits = torch.tensor([[4.0, -3.0, 1.0, 0.5]])
    history = torch.tensor([[0, 1, 1]])
    out = sampler.text_logits(logits, history, step=5, end_id=3)
    assert out.tolist() == [[2.0, -6.0, 1.0, 0.5]]
    assert Sampler(GenerationSettings()).text_logits(logits, history, 5, 3).tolist() == logits.tolist()
    # Before min_text_tokens the end token cannot be chosen.
    masked = Sampler(GenerationSettings(min_text_tokens=2)).text_logits(logits, history[:, :0], 0, end_id=0)
    assert masked[0, 0] == float("-inf") and int(masked.argmax()) == 2


def test_repetition_penalty_changes_the_greedy_critique(critic):
    heards = plain_heards(critic)[:1]
    plain = critic.generate(heards, speak=False, settings=critic.settings(max_text_tokens=20, min_text_tokens=20))[0]
    assert len(set(plain.text_tokens)) < len(plain.text_tokens)  # a random critic repeats itself
    penalised = critic.generate(heards, speak=False, settings=critic.settings(max_text_tokens=20, min_text_tokens=20,
                                                                  repetition_penalty=50.0))[0]
    assert penalised.text_tokens != plain.text_tokens
    assert len(set(penalised.text_tokens)) > len(set(plain.text_tokens))


# --- settings -------------------------------------------------------------------------------------
def test_limits_come_from_the_exports_settings_and_calls_override_them(critic):
    heards = plain_heards(critic)
    meta = {"model": {**MODEL_CFG, "generate": {"max_text_tokens": 5, "min_text_tokens": 5, "max_audio_tokens": 4,
                                                  "min_audio_tokens": 4}}}
    limited = Critic(critic.model, critic.tokenizer, critic.audio_tokenizer, meta)
    out = limited.generate(heards)
    assert all(len(c.text_tokens) == 5 and len(c.audio_tokens) == 4 for c in out)
    shorter = limited.generate(heards, settings=limited.settings(max_text_tokens=3))  # min follows a lower max
    assert all(len(c.text_tokens) == 3 for c in shorter)
    assert critic.settings() == GenerationSettings()  # an export without model.generate: the defaults
    assert GenerationSettings().max_text_tokens == 512 and GenerationSettings().max_audio_tokens == 768


@pytest.mark.parametrize("override, message", [
    ({"top_p": 0.0}, "top_p must be in"), ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"max_text_tokens": 0}, "max_text_tokens must be an integer >= 1"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"), ({"nucleus": 0.9}, "nucleus is not a"),
])
def test_bad_settings_are_refused_by_name(critic, override, message):
    with pytest.raises(ValueError, match=message):
        critic.settings(**override)


def test_config_section_is_validated():
    cfg = load("demo")
    assert cfg.model.generate.max_text_tokens == 512 and cfg.model.generate.temperature == 0.0
    with pytest.raises(ConfigError, match="model.generate.top_p"):
        load("demo", ["model.generate.top_p=1.5"])
    with pytest.raises(ConfigError, match="model.generate.min_text_tokens"):
        load("demo", ["model.generate.min_text_tokens=600"])


# --- serving --------------------------------------------------------------------------------------
def test_pyfunc_uses_the_exports_limits_and_per_call_params(spec, tmp_path):
    import pandas as pd

    from plugins.dsp.mel_kmeans import MelKMeansTokenizer
    from vcritic.serving import GENERATION_PARAMS, CriticPyfunc, generation_overrides
    from vcritic.testing.dummies import sine, write_wav

    assert set(GENERATION_PARAMS) == set(GENERATE_KEYS)
    clips = [write_wav(str(tmp_path / f"{f}.wav"), sine(f, 0.6)) for f in (220.0, 440.0, 330.0)]
    atok = MelKMeansTokenizer(codebook_size=16, n_mels=8)
    atok.fit([sine(f, 0.6) for f in (220.0, 440.0)])
    atok.save(str(tmp_path / "atok"))
    torch.manual_seed(0)
    cfg = {**MODEL_CFG, "generate": {"max_text_tokens": 6, "min_text_tokens": 6, "batch_size": 2}}
    model, tok = build.build_critic(spec, cfg, atok.codebook_size, atok.feature_dim)
    export = build.save_export(model, tok, spec, {"name": "mel_kmeans", "options": {"codebook_size": 16, "n_mels": 8}},
                               tmp_path / "atok", cfg, tmp_path / "export")
    pyfunc = CriticPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"critic": str(export)}))
    assert pyfunc.critic.settings().max_text_tokens == 6 and pyfunc.critic.settings().batch_size == 2
    rows = pd.DataFrame({"audio_path": clips, "persona": ["A fan."] * 3, "context": ["", None, "Slow."]})
    served = pyfunc.predict(None, rows)
    expected = [pyfunc.critic.critique(c, "A fan.", x, speak=False) for c, x in zip(clips, ["", "", "Slow."], strict=True)]
    assert list(served["critique"]) == [e.text for e in expected] and all(len(e.text_tokens) == 6 for e in expected)
    params = {"speech_dir": "", "max_text_tokens": 3, "temperature": None}
    assert generation_overrides(params) == {"max_text_tokens": 3}
    short = pyfunc.predict(None, rows, params=params)
    want = [pyfunc.critic.critique(c, "A fan.", x, speak=False, max_text_tokens=3).text
            for c, x in zip(clips, ["", "", "Slow."], strict=True)]
    assert list(short["critique"]) == want
