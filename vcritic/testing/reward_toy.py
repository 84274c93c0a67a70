"""A learnable toy for the critic-as-reward: clean and degraded clips, critiques that say which.

Each *melody* is a few notes of a harmonic tone (the "singer"). A clip of it is rendered with
two independent degradations:

* **intonation**: a second voice sings the same notes, in unison (``spot on``) or detuned by
  :data:`DETUNE_CENTS` (``a little off``: 50 cents, ``badly off``: 150 cents), so the partials
  beat or split as a chorus of out-of-tune singers does;
* **sound**: white noise at the SNRs of :data:`NOISE_SNR_DB` (``clean``: none, ``a little
  noisy``: 15 dB, ``very noisy``: 3 dB).

The critique states both verdicts in the fixed phrasings of :data:`vcritic.reward.DEFAULT_PROBES`
(" The intonation is badly off. The sound is clean."), in a random order per clip so each
sentence also opens critiques (where a probe asks). :func:`build_toy_critic` builds a tiny critic
(the small random causal-LM backbone plus a mel k-means tokenizer fitted on the clips),
:func:`train_toy_critic` fits it with a plain torch loop, and :func:`save_toy_export` writes an
export that :meth:`vcritic.reward.RewardModel.from_uri` and ``jobs/critique.py`` load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16000
NOTE_S = 0.375
NOTES = 4
PENTATONIC = (0, 2, 4, 7, 9, 12)  # semitones above the melody's root
DETUNE_CENTS = {"spot on": 0.0, "a little off": 50.0, "badly off": 150.0}
NOISE_SNR_DB: dict[str, float | None] = {"clean": None, "a little noisy": 15.0, "very noisy": 3.0}
PERSONA = "A strict vocal coach who judges intonation and sound quality."

BACKBONE = {"name": "causal_lm", "options": {"config": {"hidden_size": 64, "intermediate_size": 128,
                                                        "num_hidden_layers": 2, "num_attention_heads": 4,
                                                        "num_key_value_heads": 2}, "tokenizer_vocab_size": 300}}
AUDIO_TOKENIZER = {"name": "mel_kmeans", "options": {"codebook_size": 64, "n_mels": 64}}
MODEL_CFG: dict[str, Any] = dict(audio_head_layers=1, loss_lambda=1.0, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                                 lora_target_modules=None, train_text_head=True, max_prompt_tokens=64,
                                 max_text_tokens=64, max_audio_tokens=64, codebook_weights=None,
                                 train_audio_encoder=False, train_audio_projection=False)


@dataclass(frozen=True)
class Melody:
    root_midi: int
    degrees: tuple[int, ...]


@dataclass
class ToyClip:
    melody: int
    intonation: str
    sound: str
    samples: np.ndarray
    critique: str

    @property
    def clean(self) -> bool:
        return self.intonation == "spot on" and self.sound == "clean"


def melodies(n: int, seed: int = 0) -> list[Melody]:
    rng = np.random.default_rng(seed)
    return [Melody(int(rng.integers(64, 76)), tuple(int(d) for d in rng.choice(PENTATONIC, NOTES))) for _ in range(n)]


def _voice(melody: Melody, cents: float, rng: np.random.Generator) -> np.ndarray:
    """The melody as a 4-partial harmonic tone with short fades, shifted by ``cents``."""
    n = int(NOTE_S * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.02)
    notes = []
    for degree in melody.degrees:
        f0 = 440.0 * 2 ** ((melody.root_midi + degree - 69) / 12 + cents / 1200)
        note = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)) / h for h in range(1, 5))
        notes.append(note * fade)
    return np.concatenate(notes)


def render(melody: Melody, intonation: str = "spot on", sound: str = "clean", seed: int = 0) -> np.ndarray:
    """One clip of ``melody`` with the given verdicts (keys of :data:`DETUNE_CENTS` / :data:`NOISE_SNR_DB`)."""
    if intonation not in DETUNE_CENTS or sound not in NOISE_SNR_DB:
        raise ValueError(f"intonation must be one of {list(DETUNE_CENTS)} and sound one of {list(NOISE_SNR_DB)}; "
                         f"got {intonation!r}, {sound!r}")
    rng = np.random.default_rng(seed)
    x = _voice(melody, 0.0, rng) + _voice(melody, DETUNE_CENTS[intonation], rng)
    x = 0.4 * x / np.abs(x).max()
    snr = NOISE_SNR_DB[sound]
    if snr is not None:
        power = float(np.mean(x**2))
        x = x + rng.standard_normal(x.size) * np.sqrt(power / 10 ** (snr / 10))
    return np.clip(x, -1, 1).astype(np.float32)


def critique_text(intonation: str, sound: str, flip: bool) -> str:
    first, second = f"The intonation is {intonation}.", f"The sound is {sound}."
    return f"{second} {first}" if flip else f"{first} {second}"


def toy_clips(melody_ids: Sequence[int], all_melodies: Sequence[Melody], seed: int = 0,
              combos: Sequence[tuple[str, str]] | None = None) -> list[ToyClip]:
    """Every (intonation, sound) combination (or ``combos``) of each melody in ``melody_ids``."""
    combos = combos or [(i, s) for i in DETUNE_CENTS for s in NOISE_SNR_DB]
    rng = np.random.default_rng(seed)
    out = []
    for m in melody_ids:
        for intonation, sound in combos:
            samples = render(all_melodies[m], intonation, sound, seed=int(rng.integers(1 << 30)))
            out.append(ToyClip(m, intonation, sound, samples, critique_text(intonation, sound, bool(rng.integers(2)))))
    return out


def corpus() -> list[str]:
    """Text the toy backbone's tokenizer is trained on: the prompt and every critique phrasing."""
    from vcritic.data.schema import critic_prompt

    texts = [critic_prompt(PERSONA, "")]
    for intonation in DETUNE_CENTS:
        for sound in NOISE_SNR_DB:
            texts += [" " + critique_text(intonation, sound, flip) for flip in (False, True)]
    return texts * 8


@dataclass
class ToyCritic:
    """What a toy critic is made of (enough to train it and to write an export)."""

    critic: Any  # vcritic.critic.Critic
    backbone_spec: dict[str, Any]
    audio_tokenizer_dir: Path
    model_cfg: dict[str, Any]


def build_toy_critic(work_dir: str | Path, fit_clips: Sequence[np.ndarray], seed: int = 0,
                     **model_overrides: Any) -> ToyCritic:
    """An untrained tiny critic: the toy backbone (materialised under ``work_dir``) and a mel
    k-means tokenizer fitted on ``fit_clips``."""
    import torch

    from plugins.dsp.mel_kmeans import MelKMeansTokenizer
    from vcritic.critic import Critic
    from vcritic.models import build

    work = Path(work_dir)
    atok = MelKMeansTokenizer(**AUDIO_TOKENIZER["options"], seed=seed)
    atok.fit(list(fit_clips))
    atok.save(str(work / "audio_tokenizer"))
    spec = build.materialize_backbone(BACKBONE, corpus(), work / "base")
    model_cfg = {**MODEL_CFG, **model_overrides}
    torch.manual_seed(seed)
    model, tokenizer = build.build_critic(spec, model_cfg, atok.codebook_size, atok.feature_dim)
    critic = Critic(model, tokenizer, atok, {"model": model_cfg})
    return ToyCritic(critic, spec, work / "audio_tokenizer", model_cfg)


def train_toy_critic(toy: ToyCritic, clips: Sequence[ToyClip], steps: int = 200, batch_size: int = 16,
                     lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Fit the critic's critique text on ``clips`` with AdamW; returns the loss of every step."""
    import torch

    from vcritic.models.sequence import collate, heard_streams

    critic = toy.critic
    tok, vocab, model = critic.tokenizer, critic.vocab, critic.model
    streams = []
    for clip in clips:
        heard = critic.hear(clip.samples, PERSONA, "")
        target = tok(" " + clip.critique, add_special_tokens=False)["input_ids"]
        streams.append(heard_streams(vocab, heard, target))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    rng = np.random.default_rng(seed)
    losses = []
    model.train()
    for _ in range(steps):
        picked = rng.choice(len(streams), size=min(batch_size, len(streams)), replace=False)
        out = model(**collate([streams[i] for i in picked], vocab))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    model.eval()
    return losses


def save_toy_export(toy: ToyCritic, out_dir: str | Path) -> Path:
    """Write the toy critic as a vcritic export (``critic.json`` + adapter + heads + base)."""
    from vcritic.models.build import save_export

    return save_export(toy.critic.model, toy.critic.tokenizer, toy.backbone_spec, AUDIO_TOKENIZER,
                       toy.audio_tokenizer_dir, toy.model_cfg, out_dir)


def make_toy(work_dir: str | Path, train_melodies: int = 24, steps: int = 200, seed: int = 0,
             **model_overrides: Any) -> tuple[ToyCritic, list[Melody]]:
    """Build (and, with ``steps`` > 0, train) a toy critic on every combination of the first
    ``train_melodies`` of the seeded melodies; later melodies are held out."""
    tunes = melodies(train_melodies + 16, seed)
    clips = toy_clips(range(train_melodies), tunes, seed)
    toy = build_toy_critic(work_dir, [c.samples for c in clips], seed, **model_overrides)
    if steps > 0:
        train_toy_critic(toy, clips, steps=steps, seed=seed)
    return toy, tunes
