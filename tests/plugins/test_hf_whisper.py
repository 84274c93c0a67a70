"""The transformers Whisper ASR plugin on a tiny random checkpoint in the released file layout.

The random model's words are nonsense, so the tests check what does not depend on weights being
trained: the plugin feeds the model exactly as ``WhisperProcessor`` + ``model.generate`` do (same
features, same language logits, same token ids), timestamps are offset by each window's start,
language detection answers with one of the checkpoint's codes, and bad checkpoints fail clearly.
The window-offset arithmetic is also checked with a scripted decoder whose output is known.
"""

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from plugins.speech.hf_whisper import (
    WHISPER_RATE,
    HFWhisperASR,
    LanguageTranscript,
    plan_chunks,
    split_segments,
)
from vcritic import registry
from vcritic.protocols import ASR
from vcritic.testing.tiny_whisper import LANGUAGES, write_tiny_whisper_checkpoint

SR = WHISPER_RATE


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: a tiny model's ops are too small to split, and on a shared 2-core
    machine the thread pool's waiting made each decoder step ~10x slower (measured here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # a short decoder limit: a random decoder always runs to it
    return write_tiny_whisper_checkpoint(
        tmp_path_factory.mktemp("tiny_whisper"), seed=0, max_target_positions=32
    )


@pytest.fixture(scope="module")
def reference(ckpt):
    """The checkpoint loaded the standard way, independently of the plugin."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(ckpt, local_files_only=True)
    model = WhisperForConditionalGeneration.from_pretrained(ckpt, local_files_only=True).eval()
    return processor, model


def voice_like(seconds, seed, sr=SR, gaps=()):
    """Harmonic bursts with pitch glides (not speech, but not stationary noise); ``gaps`` are silent (start, end) s."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    audio = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    audio = 0.3 * audio + 0.01 * rng.standard_normal(t.size)
    for a, b in gaps:
        audio[int(a * sr) : int(b * sr)] = 0.0
    return audio.astype(np.float32)


def processor_inputs(processor, audio):
    return processor(audio, sampling_rate=SR, return_tensors="pt", return_attention_mask=True)


# ---- configuration errors ------------------------------------------------------------------


def test_missing_or_invalid_model_path_names_the_option_and_layout(ckpt, tmp_path):
    with pytest.raises(ValueError, match="model_path") as exc:
        HFWhisperASR()
    assert "preprocessor_config.json" in str(exc.value)
    with pytest.raises(ValueError, match=r"model_path=.*is not a directory"):
        HFWhisperASR(str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "preprocessor_config.json").unlink()
    (broken / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="lacks preprocessor_config.json, weights") as exc:
        HFWhisperASR(str(broken))
    assert "tokenizer" in str(exc.value)  # says what a checkpoint must hold
    with pytest.raises(ValueError, match="chunk_length_s"):
        HFWhisperASR(str(ckpt), chunk_length_s=45)
    with pytest.raises(ValueError, match="task"):
        HFWhisperASR(str(ckpt), task="summarise")
    with pytest.raises(ValueError, match="language='xx' is not one of this checkpoint's languages: de, en"):
        HFWhisperASR(str(ckpt), language="xx", device="cpu").transcribe(np.zeros(SR, np.float32), SR)


def test_english_only_checkpoint_always_decodes_english(ckpt, tmp_path):
    english = tmp_path / "english"
    shutil.copytree(ckpt, english)
    gen_file = english / "generation_config.json"
    gen = json.loads(gen_file.read_text())
    gen["is_multilingual"] = False
    gen_file.write_text(json.dumps(gen))
    assert HFWhisperASR(str(english), device="cpu").detect_language(voice_like(2, 0), SR) == "en"
    with pytest.raises(ValueError, match="English-only"):
        HFWhisperASR(str(english), language="zh", device="cpu").detect_language(voice_like(2, 0), SR)


def test_registered_as_an_asr_plugin(ckpt):
    asr = registry.create("asr", "hf_whisper", model_path=str(ckpt), device="cpu")
    assert isinstance(asr, ASR)
    assert asr.transcribe(np.zeros(0, np.float32), SR) == []


# ---- parity with WhisperProcessor + model.generate -----------------------------------------


def test_features_language_logits_and_tokens_match_the_reference(ckpt, reference):
    processor, model = reference
    audio = voice_like(8.0, seed=1)
    ref_in = processor_inputs(processor, audio)
    asr = HFWhisperASR(str(ckpt), device="cpu", word_timestamps=False)
    features, mask = asr._features([audio])
    torch.testing.assert_close(features, ref_in.input_features, rtol=0, atol=0)
    assert torch.equal(mask, ref_in.attention_mask)

    # detection: the plugin's language distribution has model.detect_language's argmax
    probs, speech = asr.language_probabilities(features)
    ref_lang = int(model.detect_language(ref_in.input_features)[0])
    lang_to_id = model.generation_config.lang_to_id
    detected = max(probs, key=lambda c: probs[c][0])
    assert lang_to_id[f"<|{detected}|>"] == ref_lang
    assert asr.detect_language(audio, SR) == detected and detected in LANGUAGES
    assert 0.0 <= speech[0] <= 1.0
    # ... and the logits under it are the model's own first-step logits
    start = torch.tensor([[model.generation_config.decoder_start_token_id]])
    with torch.no_grad():
        logits = model(input_features=ref_in.input_features, decoder_input_ids=start).logits[0, -1]
    ids = list(lang_to_id.values())
    np.testing.assert_allclose(
        [probs[c][0] for c in probs], torch.softmax(logits[ids], -1).numpy(), rtol=1e-5, atol=1e-7
    )

    common = dict(task="transcribe", return_timestamps=True, force_unique_generate_call=True)
    for language in ("zh", None):  # forced, and left to generate's own detection
        with torch.no_grad():
            ref_ids = model.generate(
                ref_in.input_features, attention_mask=ref_in.attention_mask, language=language, **common
            )
        used = language or detected
        ids_out, _ = asr._generate(features, mask, used)
        assert ids_out == ref_ids.tolist(), language
        # the transcripts are the reference's tokens, decoded and split at its timestamps
        asr.language = language
        turns = asr.transcribe(audio, SR)
        ref_text = processor.tokenizer.decode(ref_ids[0], skip_special_tokens=True).replace(" ", "")
        assert "".join(t.text for t in turns).replace(" ", "") == ref_text
        # segments closed by a timestamp carry the tokenizer's own offsets (it drops an unclosed
        # tail), clamped to the 8 s of real audio (a random decoder writes times up to 30 s)
        offsets = processor.tokenizer.decode(ref_ids[0], output_offsets=True)["offsets"]
        closed = [
            (o["text"].strip(), *(min(x, 8.0) for x in o["timestamp"])) for o in offsets if o["text"].strip()
        ]
        assert closed and [t.text for t in turns[: len(closed)]] == [c[0] for c in closed]
        np.testing.assert_allclose(
            [(t.start, t.end) for t in turns[: len(closed)]], [c[1:] for c in closed], atol=1e-6
        )
        assert all(isinstance(t, LanguageTranscript) and t.language == used for t in turns)
        for t in turns:
            assert 0.0 <= t.start <= t.end <= 8.0


# ---- chunking and offsets ------------------------------------------------------------------


def test_plan_chunks_cuts_in_pauses_and_covers_the_recording():
    audio = voice_like(75.0, seed=2, gaps=[(26.0, 26.6), (53.0, 53.5)])
    spans = plan_chunks(audio, SR, 30.0)
    assert spans[0][0] == 0 and spans[-1][1] == len(audio)
    assert all(a < b and b - a <= 30 * SR for a, b in spans)
    assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    cuts = [b / SR for _, b in spans[:-1]]
    assert len(cuts) == 2 and 26.0 <= cuts[0] <= 26.6 and 53.0 <= cuts[1] <= 53.5, cuts
    assert plan_chunks(audio[: 10 * SR], SR, 30.0) == [(0, 10 * SR)]


def test_split_segments_reads_whisper_timestamp_layout():
    tb = 1000  # timestamp tokens from here, 0.02 s each
    ts = lambda s: tb + round(s / 0.02)  # noqa: E731
    is_text = lambda tok: tok < 900  # noqa: E731  (900+ are prompt specials here)
    ids = [901, 902, ts(0.0), 1, 2, ts(1.5), ts(1.5), 3, ts(4.0), ts(4.0), 4, 5]  # the last one is cut off
    segs = split_segments(ids, tb, is_text, duration=6.0)
    assert [(s, e, toks) for s, e, toks, _ in segs] == [
        (0.0, 1.5, [1, 2]),
        (1.5, 4.0, [3]),
        (4.0, 6.0, [4, 5]),
    ]
    assert segs[0][3] == [3, 4]  # positions in the sequence, for token times
    # a timestamp past the window's real length is clamped to it
    assert split_segments([ts(0.5), 7, ts(29.0)], tb, is_text, duration=3.0)[0][:2] == (0.5, 3.0)


def test_long_recording_times_are_offset_by_each_window(ckpt, monkeypatch):
    """A scripted decoder: every window says two words at 1.0-2.0 s and 3.0-4.5 s of the window."""
    audio = voice_like(75.0, seed=3, gaps=[(26.0, 26.6), (53.0, 53.5)])
    asr = HFWhisperASR(str(ckpt), language="en", device="cpu", batch_size=2)
    asr._load()
    tok = asr._tokenizer
    gen = asr._model.generation_config
    tb = gen.no_timestamps_token_id + 1
    ts = lambda s: tb + round(s / 0.02)  # noqa: E731
    prompt = [gen.decoder_start_token_id, gen.lang_to_id["<|en|>"], gen.task_to_id["transcribe"]]
    hello, world = (
        tok.encode(" hello", add_special_tokens=False),
        tok.encode(" world", add_special_tokens=False),
    )
    script = prompt + [ts(1.0), *hello, ts(2.0), ts(3.0), *world, ts(4.5)]
    # token k's time: its segment's start, words spread inside it
    times = [0.0] * len(prompt) + [1.0] + [1.0 + 0.1 * i for i in range(len(hello))] + [2.0, 3.0]
    times += [3.0 + 0.2 * i for i in range(len(world))] + [4.5]
    batches = []

    def scripted(features, mask, language):
        batches.append((features.shape[0], language))
        return [script] * features.shape[0], [times] * features.shape[0]

    monkeypatch.setattr(asr, "_generate", scripted)
    turns = asr.transcribe(audio, SR)
    assert batches == [(2, "en"), (1, "en")]  # three windows, two at a time
    starts = [a / SR for a, _ in plan_chunks(audio, SR, 30.0)]
    assert len(turns) == 6
    for k, offset in enumerate(starts):
        first, second = turns[2 * k], turns[2 * k + 1]
        assert (first.text, second.text) == ("hello", "world")
        assert first.start == pytest.approx(offset + 1.0) and first.end == pytest.approx(offset + 2.0)
        assert second.start == pytest.approx(offset + 3.0) and second.end == pytest.approx(offset + 4.5)
        assert [w.text for w in first.words] == ["hello"] and first.words[0].start == pytest.approx(
            offset + 1.0
        )
        assert second.words[0].end == pytest.approx(offset + 4.5)
    assert starts[1] > 26.0 and starts[2] > 53.0


def test_language_vote_weights_windows_by_speech(ckpt, monkeypatch):
    """Two music windows lean German, one speech window is Chinese: the recording is Chinese."""
    asr = HFWhisperASR(str(ckpt), device="cpu", batch_size=1)
    votes = iter(
        [
            ({"de": np.array([0.9]), "zh": np.array([0.1])}, np.array([0.05])),
            ({"de": np.array([0.9]), "zh": np.array([0.1])}, np.array([0.05])),
            ({"de": np.array([0.2]), "zh": np.array([0.8])}, np.array([0.95])),
        ]
    )
    monkeypatch.setattr(asr, "language_probabilities", lambda features: next(votes))
    assert asr.detect_language(voice_like(75.0, seed=4), SR) == "zh"


# ---- end to end through the tiny model -----------------------------------------------------


def test_long_recording_end_to_end_through_the_tiny_model(ckpt, reference):
    processor, model = reference
    audio = voice_like(65.0, seed=5, sr=22050, gaps=[(27.0, 27.5)])  # resampled by the plugin
    asr = HFWhisperASR(str(ckpt), device="cpu", batch_size=2)
    turns = asr.transcribe(audio, 22050)
    language = asr.detect_language(audio, 22050)
    assert language in LANGUAGES
    assert turns and all(t.language == language for t in turns)
    assert all(0.0 <= t.start <= t.end <= 65.0 + 1e-6 for t in turns)
    for t in turns:
        assert all(t.start - 1e-6 <= w.start <= w.end <= t.end + 1e-6 for w in t.words), t
    # each window decodes as the reference decodes that window alone, with the recording's language
    import soxr

    audio16 = soxr.resample(audio, 22050, SR).astype(np.float32)
    spans = plan_chunks(audio16, SR, 30.0)
    assert len(spans) == 3 and 27.0 <= spans[0][1] / SR <= 27.5
    ref_text = ""
    for a, b in spans:
        ref_in = processor_inputs(processor, audio16[a:b])
        with torch.no_grad():
            ids = model.generate(
                ref_in.input_features,
                attention_mask=ref_in.attention_mask,
                language=language,
                task="transcribe",
                return_timestamps=True,
                force_unique_generate_call=True,
            )
        ref_text += processor.tokenizer.decode(ids[0], skip_special_tokens=True)
    assert "".join(t.text for t in turns).replace(" ", "") == ref_text.replace(" ", "")
    for t in turns:  # a window's segments stay inside the window
        span = next((a, b) for a, b in spans if a / SR - 1e-6 <= t.start < b / SR + 1e-6)
        assert t.end <= span[1] / SR + 1e-6

    clone = pickle.loads(pickle.dumps(asr))  # the model is dropped, and reloaded on first use
    assert clone._model is None and clone.detect_language(audio[: 5 * 22050], 22050) in LANGUAGES
