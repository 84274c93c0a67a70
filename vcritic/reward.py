"""The critic as a reward model: a clip in, per-dimension scores and one weighted reward out.

A *probe* is the start of a critique sentence plus the ways the critic could finish it, each
worth a value in [0, 1]::

    Probe("intonation", " The intonation is", {"spot on": 1.0, "a little off": 0.5, "badly off": 0.0})

The critic hears the clip (with a persona and context prompt), and each option is scored as the
continuation of a critique that starts with the prefix: ``prefix + template.format(option)``,
by default ``" The intonation is spot on."``. No text is generated, so scoring is deterministic
and cheap, and it reads the critic's own beliefs rather than a sampled sentence.

How a dimension's score is computed (``s_d``):

1. ``ℓ_k`` = the **mean** log-probability of the option's tokens (length-normalised, as
   :meth:`vcritic.critic.Critic.continuation_logprob`): without the mean, longer phrasings
   would lose just for having more tokens. The template's full stop is scored too, which tells
   "a little" from "a little off".
2. ``p = softmax(ℓ / temperature)`` over the probe's options: a distribution over the verdicts.
3. ``s_d = Σ_k p_k · value_k``, the expected value, in [0, 1].

The reward is ``Σ_d w_d·s_d / Σ_d w_d``; with judges, their score of a generated critique is one
more term of weight ``judge_weight`` (see :class:`RewardModel`).

All the option likelihoods of a batch of clips are computed together: one padded forward pass
per ``batch_size`` (clip, option) rows, sorted by length so rows of a batch pad little.
:func:`reward_actor_pool` spreads clips over Ray actors (one GPU each where the cluster has GPUs)
for an RL loop that scores its rollouts with ``pool.score(clips)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_PERSONA = "A strict vocal coach who judges intonation and sound quality."


@dataclass(frozen=True)
class Probe:
    """One reward dimension: a critique prefix and the values of the ways to finish it.

    Args:
        name: the dimension (a key of :attr:`RewardResult.scores`).
        prefix: the start of the critique sentence, with the leading space critiques start with.
        options: continuation text → value in [0, 1].
        weight: the dimension's weight in the reward (>= 0).
        template: how an option is written after the prefix (``" {}."``: a space, the option, a stop).

    Raises:
        ValueError: fewer than two options, a value outside [0, 1], a negative weight, an empty
            prefix, or a template without ``{}``.
    """

    name: str
    prefix: str
    options: Mapping[str, float]
    weight: float = 1.0
    template: str = " {}."

    def __post_init__(self) -> None:
        where = f"reward probe {self.name!r}"
        if not self.prefix.strip():
            raise ValueError(f"{where}: prefix is empty; give the start of a critique sentence, e.g. ' The intonation is'")
        if len(self.options) < 2:
            raise ValueError(f"{where}: needs at least two options, got {dict(self.options)}")
        bad = {k: v for k, v in self.options.items() if not 0.0 <= float(v) <= 1.0}
        if bad:
            raise ValueError(f"{where}: option values must lie in [0, 1], got {bad}")
        if float(self.weight) < 0 or not math.isfinite(float(self.weight)):
            raise ValueError(f"{where}: weight must be a finite number >= 0, got {self.weight}")
        if "{}" not in self.template:
            raise ValueError(f"{where}: template {self.template!r} has no '{{}}' for the option")
        object.__setattr__(self, "options", {str(k): float(v) for k, v in self.options.items()})

    def continuations(self) -> list[str]:
        return [self.template.format(option) for option in self.options]

    def values(self) -> np.ndarray:
        return np.array(list(self.options.values()), dtype=np.float64)


DEFAULT_PROBES: tuple[Probe, ...] = (
    Probe("intonation", " The intonation is", {"spot on": 1.0, "a little off": 0.5, "badly off": 0.0}),
    Probe("sound", " The sound is", {"clean": 1.0, "a little noisy": 0.5, "very noisy": 0.0}),
)
"""Two dimensions: pitch accuracy and recording quality (the toy in vcritic.testing.reward_toy uses these phrasings)."""


def probes_from_config(items: Sequence[Any] | None) -> list[Probe]:
    """Probes from config entries (dicts or OmegaConf nodes with the :class:`Probe` fields);
    None or empty gives :data:`DEFAULT_PROBES`."""
    if not items:
        return list(DEFAULT_PROBES)
    probes = []
    for i, item in enumerate(items):
        data = dict(item)
        missing = {"name", "prefix", "options"} - set(data)
        if missing:
            raise ValueError(f"reward.probes[{i}] lacks {sorted(missing)}; each probe needs name, prefix and options")
        probes.append(Probe(str(data["name"]), str(data["prefix"]), dict(data["options"]),
                            float(data.get("weight", 1.0)), str(data.get("template", " {}."))))
    names = [p.name for p in probes]
    if len(set(names)) != len(names):
        raise ValueError(f"reward.probes has repeated names {names}; each dimension needs its own name")
    return probes


def options_from_config(reward_cfg: Any) -> dict[str, Any]:
    """:class:`RewardModel` keyword options from the ``reward`` config section (judges built
    through the plugin registry)."""
    from vcritic import registry

    judges = [registry.create("judges", j.name, **dict(j.options or {})) for j in (reward_cfg.judges or [])]
    return {"probes": probes_from_config(list(reward_cfg.probes or [])), "persona": str(reward_cfg.persona),
            "context": str(reward_cfg.context), "batch_size": int(reward_cfg.batch_size),
            "temperature": float(reward_cfg.temperature), "judges": judges,
            "judge_weight": float(reward_cfg.judge_weight)}


@dataclass
class RewardResult:
    """The reward of one clip."""

    reward: float
    """Σ w_d·s_d (+ judge_weight·judge) / Σ weights, in [0, 1]."""
    scores: dict[str, float]
    """Per dimension: the expected option value s_d in [0, 1]."""
    probabilities: dict[str, dict[str, float]]
    """Per dimension: softmax over its options."""
    logliks: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per dimension: each option's mean token log-probability (before the softmax)."""
    judge: float | None = None
    """The judges' score of the generated critique, in [0, 1] (None: no judge term)."""
    critique: str | None = None
    """The critique the judges read (only with judges)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expected_value(logliks: Sequence[float], values: Sequence[float], temperature: float = 1.0) -> tuple[np.ndarray, float]:
    """``(softmax(logliks / temperature), Σ p·values)``: a probe's option probabilities and score."""
    z = np.asarray(logliks, dtype=np.float64) / float(temperature)
    p = np.exp(z - z.max())
    p /= p.sum()
    return p, float(p @ np.asarray(values, dtype=np.float64))


def combine(scores: Mapping[str, float], weights: Mapping[str, float], judge: float | None = None,
            judge_weight: float = 0.0) -> float:
    """Σ w_d·s_d / Σ w_d, with the judge as one more term when it is given and weighted."""
    total = sum(weights[d] * scores[d] for d in scores)
    norm = sum(weights[d] for d in scores)
    if judge is not None and judge_weight > 0:
        total, norm = total + judge_weight * judge, norm + judge_weight
    if norm <= 0:
        raise ValueError("every reward weight is 0: give some probe (or the judge) a positive weight")
    return float(total / norm)


def resolve_export(uri: str | Path) -> Path:
    """A local export directory for ``uri``: an export dir itself, a logged pyfunc model's folder,
    or an MLflow model URI (``models:/name@alias``, ``runs:/id/critic``; downloaded from the
    current tracking URI). The logged model's own code is not imported.

    Raises:
        FileNotFoundError: nothing that holds a critic export is there.
    """
    path = Path(str(uri))
    if not path.exists():
        if "://" not in str(uri) and not str(uri).startswith(("models:/", "runs:/")):
            raise FileNotFoundError(f"{uri} does not exist; give an export directory or an MLflow model URI "
                                    f"(models:/name@alias, runs:/<run_id>/critic)")
        import mlflow

        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(uri)))
    if (path / "critic.json").exists():
        return path
    if (path / "MLmodel").exists():
        import yaml

        flavour = (yaml.safe_load((path / "MLmodel").read_text()).get("flavors") or {}).get("python_function") or {}
        logged = (flavour.get("artifacts") or {}).get("critic") or {}
        if logged.get("path") and (path / logged["path"] / "critic.json").exists():
            return path / logged["path"]
    found = sorted(path.rglob("critic.json"))
    if found:
        return found[0].parent
    raise FileNotFoundError(f"{uri} holds no vcritic export (no critic.json); log one with vcritic.tracking.log_critic "
                            f"or pass the export directory a training run wrote")


def load_critic(uri: str | Path, device: str | None = None, base_models_dir: str | None = None):
    """The :class:`~vcritic.critic.Critic` at ``uri`` (see :func:`resolve_export`), on ``device``
    (None: CUDA when there is one, else CPU)."""
    import torch

    from vcritic.critic import Critic

    critic = Critic.from_export(resolve_export(uri), base_models_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu":
        critic.model.to(device)
    return critic


class RewardModel:
    """Scores clips with a critic's option likelihoods (see the module docstring).

    Args:
        critic: a :class:`~vcritic.critic.Critic` (or anything with ``hear``, ``tokenizer``,
            ``vocab`` and ``model.hidden_and_logits``).
        probes: the dimensions (default :data:`DEFAULT_PROBES`).
        persona, context: the prompt the critic reads with every clip (``score`` takes
            per-clip contexts too).
        batch_size: (clip, option) rows per forward pass.
        temperature: of the softmax over a probe's options.
        judges, judge_weights, judge_weight: optional judge term. ``judges`` are
            :class:`~vcritic.protocols.Judge` plugins; each clip's critique is generated
            (text only) and scored by every judge against the clip's reference (empty by
            default), ``JudgeScore.weighted()`` averaged over judges with ``judge_weights``
            (default equal). The term enters the reward with weight ``judge_weight``.
        max_text_tokens: length limit of the critique the judges read.
    """

    def __init__(self, critic, probes: Sequence[Probe] | None = None, persona: str = DEFAULT_PERSONA,
                 context: str = "", batch_size: int = 32, temperature: float = 1.0, judges: Sequence[Any] = (),
                 judge_weights: Sequence[float] | None = None, judge_weight: float = 0.0,
                 max_text_tokens: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if judge_weight < 0:
            raise ValueError(f"judge_weight must be >= 0, got {judge_weight}")
        if judge_weight > 0 and not judges:
            raise ValueError("judge_weight > 0 but no judges were given; pass judges=[...] or set judge_weight=0")
        if judge_weights is not None and len(judge_weights) != len(judges):
            raise ValueError(f"{len(judge_weights)} judge_weights for {len(judges)} judges")
        self.critic = critic
        self.probes = list(probes) if probes else list(DEFAULT_PROBES)
        self.persona, self.context = persona, context
        self.batch_size, self.temperature = int(batch_size), float(temperature)
        self.judges, self.judge_weight = list(judges), float(judge_weight)
        self.judge_weights = list(judge_weights) if judge_weights is not None else [1.0] * len(self.judges)
        self.max_text_tokens = int(max_text_tokens)
        self._encoded = self._encode_options()

    @classmethod
    def from_uri(cls, uri: str | Path, device: str | None = None, base_models_dir: str | None = None,
                 **options: Any) -> RewardModel:
        """Load the critic at ``uri`` (an export dir or an MLflow model URI) as a reward model."""
        return cls(load_critic(uri, device, base_models_dir), **options)

    @classmethod
    def from_config(cls, uri: str | Path, reward_cfg: Any, device: str | None = None) -> RewardModel:
        """Load the critic at ``uri`` with the ``reward`` section of a vcritic config."""
        return cls.from_uri(uri, device, **options_from_config(reward_cfg))

    @property
    def sample_rate(self) -> int:
        """The rate the critic reads samples at (``score`` takes arrays at this rate)."""
        hearing = getattr(self.critic, "hearing", None)
        return int(hearing.sample_rate if hearing is not None else self.critic.audio_tokenizer.sample_rate)

    def _encode_options(self) -> list[tuple[int, int, list[int], int]]:
        """(probe, option, token ids of prefix + continuation, first continuation token) for every option."""
        tok = self.critic.tokenizer
        encoded = []
        for j, probe in enumerate(self.probes):
            prefix_ids = tok(probe.prefix, add_special_tokens=False)["input_ids"]
            for k, continuation in enumerate(probe.continuations()):
                full = tok(probe.prefix + continuation, add_special_tokens=False)["input_ids"]
                start = len(prefix_ids) if full[: len(prefix_ids)] == prefix_ids else 0
                encoded.append((j, k, list(full), start))
        return encoded

    # -- scoring ------------------------------------------------------------------------
    def score(self, clips: Sequence[Any], contexts: Sequence[str] | None = None,
              references: Sequence[str] | None = None) -> list[RewardResult]:
        """Rewards of ``clips`` (paths, :class:`~vcritic.data.schema.AudioRef` windows, or mono
        float arrays at :attr:`sample_rate`), in order.

        Raises:
            ValueError: ``contexts`` / ``references`` do not have one entry per clip, or a clip
                cannot be read (the message names it).
        """
        from vcritic.data.schema import AudioRef

        contexts = self._per_clip(contexts, len(clips), self.context, "contexts")
        heards = []
        for i, (clip, context) in enumerate(zip(clips, contexts, strict=True)):
            ref = AudioRef(str(clip)) if isinstance(clip, (str, Path)) else clip
            try:
                heards.append(self.critic.hear(ref, self.persona, context))
            except ValueError as exc:  # AudioError is a ValueError
                raise ValueError(f"reward: clip {i} ({clip if not isinstance(clip, np.ndarray) else 'array'}) "
                                 f"cannot be heard: {exc}") from exc
        logliks = self.option_logliks(heards)
        judged = self._judge(clips, contexts, references) if self.judges and self.judge_weight > 0 else None
        return [self._result(row, None if judged is None else judged[i]) for i, row in enumerate(logliks)]

    def score_batch(self, samples: Sequence[np.ndarray], sample_rate: int, contexts: Sequence[str] | None = None,
                    references: Sequence[str] | None = None) -> list[RewardResult]:
        """Rewards of many clips given as mono float arrays at ``sample_rate`` (an RL rollout's
        output): resampled to the critic's rate, then scored together."""
        import soxr

        rate = self.sample_rate
        clips = []
        for i, clip in enumerate(samples):
            x = np.asarray(clip, dtype=np.float32)
            if x.ndim != 1 or x.size == 0 or not np.all(np.isfinite(x)):
                raise ValueError(f"reward: samples[{i}] must be a non-empty finite mono array, got shape {x.shape}")
            clips.append(x if sample_rate == rate else soxr.resample(x, sample_rate, rate).astype(np.float32))
        return self.score(clips, contexts, references)

    @staticmethod
    def _per_clip(values: Sequence[str] | None, n: int, default: str, name: str) -> list[str]:
        if values is None:
            return [default] * n
        if len(values) != n:
            raise ValueError(f"reward: {len(values)} {name} for {n} clips; give one per clip or none")
        return list(values)

    def option_logliks(self, heards: Sequence[Any]) -> np.ndarray:
        """Mean log-probability of every option of every probe for every heard clip:
        float64 [clips, options] in probe order; batched (see the module docstring)."""
        import torch

        from vcritic.models.sequence import IGNORE, collate, heard_streams

        rows = [(i, o) for i in range(len(heards)) for o in range(len(self._encoded))]
        streams = [heard_streams(self.critic.vocab, heards[i], self._encoded[o][2]) for i, o in rows]
        order = sorted(range(len(rows)), key=lambda r: len(streams[r]))
        out = np.zeros((len(heards), len(self._encoded)), dtype=np.float64)
        model = self.critic.model
        device = next(model.parameters()).device
        for first in range(0, len(order), self.batch_size):
            chunk = order[first : first + self.batch_size]
            batch = {k: v.to(device) for k, v in collate([streams[r] for r in chunk], self.critic.vocab).items()}
            with torch.no_grad():
                text_logits, _ = model.hidden_and_logits(
                    batch["text_ids"], batch["audio_ids"], batch["music_mask"], batch["attention_mask"],
                    batch.get("music_features"), False, batch.get("native_features"), batch.get("native_lengths"))
            for b, r in enumerate(chunk):
                i, o = rows[r]
                _, _, full, start = self._encoded[o]
                labels = batch["text_labels"][b]
                positions = (labels != IGNORE).nonzero().flatten()[start : len(full)]
                logp = torch.log_softmax(text_logits[b, positions].float(), dim=-1)
                out[i, o] = float(logp.gather(1, labels[positions].unsqueeze(1)).mean())
        return out

    def _result(self, logliks: np.ndarray, judge: float | None) -> RewardResult:
        scores, probs, raw = {}, {}, {}
        for j, probe in enumerate(self.probes):
            ll = [logliks[o] for o, (pj, *_rest) in enumerate(self._encoded) if pj == j]
            p, s = expected_value(ll, probe.values(), self.temperature)
            scores[probe.name] = s
            probs[probe.name] = dict(zip(probe.options, p.tolist(), strict=True))
            raw[probe.name] = dict(zip(probe.options, [float(x) for x in ll], strict=True))
        reward = combine(scores, {p.name: p.weight for p in self.probes}, judge, self.judge_weight)
        return RewardResult(reward, scores, probs, raw, judge)

    def _judge(self, clips: Sequence[Any], contexts: Sequence[str], references: Sequence[str] | None) -> list[float]:
        """Each clip's critique (generated, text only) scored by every judge: the weighted mean of
        ``JudgeScore.weighted()`` over judges."""
        references = self._per_clip(references, len(clips), "", "references")
        norm = sum(self.judge_weights)
        if norm <= 0:
            raise ValueError("judge_weights sum to 0")
        out = []
        for clip, context, reference in zip(clips, contexts, references, strict=True):
            text = self.critic.critique(clip, self.persona, context, max_text_tokens=self.max_text_tokens, speak=False).text
            scores = [float(j.score(text, reference, context).weighted()) for j in self.judges]
            out.append(sum(w * s for w, s in zip(self.judge_weights, scores, strict=True)) / norm)
        return out


# -- Ray -------------------------------------------------------------------------------------
class _RewardActor:
    """Holds one RewardModel; made a Ray actor by :func:`reward_actor_pool`."""

    def __init__(self, uri: str, tracking_uri: str | None, options: dict[str, Any]) -> None:
        if tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
        self.model = RewardModel.from_uri(uri, **options)

    def score(self, clips: Sequence[Any], contexts: Sequence[str] | None = None) -> list[RewardResult]:
        return self.model.score(clips, contexts)

    def score_batch(self, samples: Sequence[np.ndarray], sample_rate: int,
                    contexts: Sequence[str] | None = None) -> list[RewardResult]:
        return self.model.score_batch(samples, sample_rate, contexts)


class RewardPool:
    """Reward actors behind one call: ``pool.score(clips)`` splits the clips into one chunk per
    actor, scores the chunks in parallel and returns the results in the clips' order."""

    def __init__(self, actors: list[Any]) -> None:
        from ray.util import ActorPool

        self.actors = actors
        self._pool = ActorPool(actors)

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        size = max(1, math.ceil(n / len(self.actors)))
        return [(a, min(n, a + size)) for a in range(0, n, size)]

    def score(self, clips: Sequence[Any], contexts: Sequence[str] | None = None) -> list[RewardResult]:
        spans = self._chunks(len(clips))
        parts = self._pool.map(lambda actor, s: actor.score.remote(
            list(clips[s[0]:s[1]]), None if contexts is None else list(contexts[s[0]:s[1]])), spans)
        return [r for part in parts for r in part]

    def score_batch(self, samples: Sequence[np.ndarray], sample_rate: int,
                    contexts: Sequence[str] | None = None) -> list[RewardResult]:
        spans = self._chunks(len(samples))
        parts = self._pool.map(lambda actor, s: actor.score_batch.remote(
            list(samples[s[0]:s[1]]), sample_rate, None if contexts is None else list(contexts[s[0]:s[1]])), spans)
        return [r for part in parts for r in part]

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def reward_actor_pool(model_uri: str | Path, num_actors: int = 1, num_gpus_per_actor: float | None = None,
                      num_cpus_per_actor: float = 0.5, tracking_uri: str | None = None, **options: Any) -> RewardPool:
    """Start ``num_actors`` Ray actors, each holding the reward model at ``model_uri``.

    Args:
        num_gpus_per_actor: None: 1 when the Ray cluster has a GPU per actor, else 0 (CPU actors).
        num_cpus_per_actor: below 1 by default, so a small machine keeps CPUs for other Ray work.
        tracking_uri: where an MLflow model URI is looked up (default: this process's tracking URI).
        options: passed to :class:`RewardModel` (probes, persona, batch_size, ...).

    Ray must be initialised (``ray.init``) first; actors load the critic in parallel.
    """
    import ray

    if num_actors < 1:
        raise ValueError(f"num_actors must be >= 1, got {num_actors}")
    if not ray.is_initialized():
        raise RuntimeError("reward_actor_pool needs Ray: call ray.init() (or ray.init(address=...)) first")
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1 if ray.cluster_resources().get("GPU", 0) >= num_actors else 0
    uri = str(Path(model_uri).resolve()) if Path(str(model_uri)).exists() else str(model_uri)
    if tracking_uri is None and not Path(str(model_uri)).exists():
        import mlflow

        tracking_uri = mlflow.get_tracking_uri()
    actor_cls = ray.remote(num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor)(_RewardActor)
    device = "cuda" if num_gpus_per_actor else "cpu"
    actors = [actor_cls.remote(uri, tracking_uri, {"device": device, **options}) for _ in range(num_actors)]
    return RewardPool(actors)
