"""The one config mechanism: a typed OmegaConf schema, YAML presets, ``key=value`` overrides.

``load("demo", ["train.epochs=2"])`` merges, in order: the schema defaults below, the preset
``jobs/configs/<name>.yaml`` (or any YAML path), then the overrides. An unknown key or a
value of the wrong type raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PRESETS_DIR = Path(__file__).resolve().parent.parent / "jobs" / "configs"


@dataclass
class PluginSpec:
    """Names a plugin and the keyword options it is built with."""

    name: str = "???"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    name: str = "vcritic-demo"
    """Run name in MLflow and Ray Train."""
    seed: int = 0
    output_dir: str = "vcritic_runs"
    """Where prepared data, Ray Train results and reports go: a local path (relative to the working
    directory; under `ray job submit`, relative to $VCRITIC_HOME, default ~/.vcritic) or a pyarrow
    filesystem URI such as s3://bucket/prefix for storage every node reaches (vcritic/storage.py)."""
    resume: bool = True
    """Continue an unfinished run of the same ``run.name`` (same MLflow experiment, same storage,
    same training-relevant config) from its latest checkpoint: a rerun of a killed job's command
    picks up where it stopped. False always starts a new run."""


@dataclass
class RayConfig:
    address: str | None = None
    """Ray cluster to join; None starts (or joins, under `ray job submit`) a local one."""
    num_cpus: int | None = None
    """CPUs for a locally started Ray; None lets Ray count them."""


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None
    """None → $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory (under
    `ray job submit`: $VCRITIC_HOME/mlflow.db, default ~/.vcritic). On a cluster: an MLflow server."""
    experiment: str = "vcritic"
    registered_model: str = "vcritic-critic"
    alias: str = "champion"
    register: bool = True
    promote_metric: str = "best_val_loss"
    """Run metric a new version must beat the alias holder's (its source run's) on to take the alias."""
    promote_direction: str = "min"
    """min: lower promote_metric is better; max: higher is better."""
    promote: str = "if_better"
    """if_better: the alias moves only to a better version; always: to every new version."""


@dataclass
class DemoDataConfig:
    songs: int = 40
    clips_per_song: int = 3
    clip_seconds: float = 4.0
    hum_seconds: float = 1.5
    near_duplicates: int = 6
    """Extra rows that are near copies of others, for the dedup stage to remove."""
    bad_rows: bool = True
    """Add one corrupt audio file and one row with a missing field, for the quarantine."""
    reactions: int = 4
    """Reaction recordings (synthesised music, spoken comments made with espeak-ng) the demo adds
    for the reaction stage when data.reactions.manifest is unset; 0: none. Skipped, with a log
    line, when espeak-ng is not installed."""


@dataclass
class ReactionsConfig:
    """The reaction stage: recordings of people listening to a song and talking about it, turned
    into examples (music heard before each turn → the turn's words and speech) inside the data
    pipeline. See vcritic/data/reactions.py for the manifest columns."""

    manifest: str | None = None
    """JSONL or Parquet, one row per recording (recording_path, song_id, persona, context,
    optional language, subtitles, recording_id). None: the demo's reactions when data.manifest is
    unset (data.demo.reactions), else no reaction stage."""
    asr: PluginSpec = field(default_factory=lambda: PluginSpec("faster_whisper"))
    """Transcribes recordings without a subtitle sidecar (a vcritic.asr plugin)."""
    separator: PluginSpec = field(default_factory=lambda: PluginSpec("hpss_harmonic"))
    """Removes talk-over from the music windows (a vcritic.separators plugin). hpss_harmonic by
    default: on the demo's interjections over music (8 mixes, measured 2026-12) it left the voice
    at -27 dB (least-squares share) with music SI-SDR 14.8 dB, no worse than the unseparated
    14.6 dB; vad_gate missed most sub-second interjections (voice left at -2.8 dB) and needs
    silero-vad. HPSS dulls percussive attacks (a bell's worst case: 3.8 dB)."""
    max_music_seconds: float = 30.0
    """Longest music window before a turn (its last seconds are kept); at most data.max_clip_seconds."""
    min_music_seconds: float = 3.0
    """Turns with less music before them are skipped (the turn still ends the listening stretch)."""
    min_turn_seconds: float = 1.0
    """Shorter speech (an interjection over the music) is not a turn; the separator removes it."""
    target_speech_seconds: float | None = None
    """Longer turns are trimmed to this many seconds (at a word boundary), never quarantined;
    None: data.max_target_audio_seconds, the longest a target may be."""


@dataclass
class DurationFilterConfig:
    """Music length in [data.min_clip_seconds, data.max_clip_seconds], spoken critique at most
    data.max_target_audio_seconds (those keys keep their place, so older overrides still work)."""

    enabled: bool = True


@dataclass
class SilenceFilterConfig:
    """Music that is (mostly) silence teaches the critic to critique nothing."""

    enabled: bool = True
    min_dbfs: float = -60.0
    """Music whose RMS level is below this (dB re full scale) is silent; so is each frame below it."""
    frame_ms: float = 50.0
    """Frame length for the silent-frame share."""
    max_silent_fraction: float = 0.9
    """Music with a larger share of silent frames is quarantined (1.0 turns this part off)."""


@dataclass
class ClippingFilterConfig:
    """A recording driven into full scale is distorted; a critic would learn to praise the distortion."""

    enabled: bool = True
    level: float = 0.999
    """|sample| at or above this counts as clipped (after decoding and resampling)."""
    max_fraction: float = 0.01
    """Music with a larger share of clipped samples is quarantined."""


@dataclass
class TextLengthFilterConfig:
    """Critique length in [data.min_critique_words, data.max_critique_words] (keys kept in place)."""

    enabled: bool = True


@dataclass
class RepetitionFilterConfig:
    """An LLM stuck in a loop repeats the same phrase; natural critiques rarely repeat a 3-gram."""

    enabled: bool = True
    n: int = 3
    """Length of the word n-grams compared."""
    max_fraction: float = 0.4
    """Critiques whose share of repeated n-grams is larger are quarantined."""
    min_ngrams: int = 8
    """Shorter critiques are not judged (a few words repeat by chance)."""


@dataclass
class LanguageFilterConfig:
    """The critique must be in the language the row says (and, optionally, in an allowed list)."""

    enabled: bool = True
    match_tag: bool = True
    """Quarantine a critique whose detected language differs from the row's language tag."""
    allowed: list[str] = field(default_factory=list)
    """ISO 639-1 codes a critique may be in (e.g. [en, zh]); empty: any."""
    min_confidence: float = 0.9
    """Only a detection at least this probable rejects a row (short or mixed texts stay)."""
    min_chars: int = 20
    """Critiques shorter than this are not judged (detection on a few characters is a guess)."""


@dataclass
class SpeechFilterConfig:
    """A human reaction recording (target audio of a ``human`` row) without speech is just noise.
    Off by default: the demo's human rows carry hums. Needs the speech extra (silero-vad)."""

    enabled: bool = False
    min_speech_seconds: float = 0.5
    """Reactions with less speech (silero-vad) than this are quarantined."""
    threshold: float = 0.5
    """silero-vad's speech probability threshold."""


@dataclass
class FiltersConfig:
    """Curation rules run during validation; see vcritic/data/filters.py. Rejections are counted
    per filter in prepared.counts["filtered_<name>"]."""

    duration: DurationFilterConfig = field(default_factory=DurationFilterConfig)
    silence: SilenceFilterConfig = field(default_factory=SilenceFilterConfig)
    clipping: ClippingFilterConfig = field(default_factory=ClippingFilterConfig)
    text_length: TextLengthFilterConfig = field(default_factory=TextLengthFilterConfig)
    repetition: RepetitionFilterConfig = field(default_factory=RepetitionFilterConfig)
    language: LanguageFilterConfig = field(default_factory=LanguageFilterConfig)
    speech: SpeechFilterConfig = field(default_factory=SpeechFilterConfig)


@dataclass
class DedupConfig:
    """How near-duplicates are searched for (vcritic/data/dedup.py); the cut is data.dedup_threshold."""

    device: str = "auto"
    """auto: GPU when this faiss build has GPU support and a GPU is visible, else CPU; cpu; gpu
    (fails with a message when faiss has no GPU support)."""
    exact_max: int = 20000
    """Up to this many rows the search is exact (every pair compared)."""
    nlist: int = 0
    """Clusters of the approximate search above exact_max; 0: about 2 sqrt(rows), at most 4096."""
    nprobe: int = 10
    """Clusters each row is compared against; more finds more pairs near the threshold, slower."""
    kmeans_iters: int = 10
    """k-means iterations when the clusters are trained."""


@dataclass
class AnnotateConfig:
    """The MLLM stage: an annotator plugin listens to song clips and writes critiques as personas
    from the persona library (data.personas); each (clip, persona) reply becomes an example row
    with source "mllm", unioned with the manifest's rows. See vcritic/data/annotate.py for the
    manifest columns."""

    manifest: str | None = None
    """JSONL or Parquet, one row per song clip (audio_path, song_id, optional clip_id, context or
    metadata, offset_s, duration_s, personas). None: no annotate stage."""
    annotator: PluginSpec = field(default_factory=lambda: PluginSpec("openai_chat"))
    """A vcritic.annotators plugin (openai_chat: any OpenAI-compatible endpoint that takes audio;
    gemini), with its options (model, base_url, api_key_env, ...)."""
    personas_per_clip: int = 1
    """Personas drawn (deterministically from run.seed and the clip) for clips whose row names none."""
    cache_dir: str | None = None
    """Where replies are kept, one file per request hash, so a rerun sends no request twice; None:
    annotate_cache/ in run.output_dir's local staging directory. Use a directory every node sees
    on a multi-node cluster."""
    concurrency: int = 2
    """Ray tasks sending requests at the same time (each sends its batch's requests one by one)."""
    cpus_per_task: float = 0.25
    """CPUs each request task asks Ray for (the work is waiting on the network, not computing)."""
    max_failures_fraction: float = 0.5
    """The job stops when more than this share of the requests fail (a wrong key or a dead
    endpoint is not worth a dataset without MLLM rows); below it, failed replies are quarantined."""


@dataclass
class DataConfig:
    manifest: str | None = None
    """JSONL or Parquet of example rows; None generates the demo set under run.output_dir."""
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    reactions: ReactionsConfig = field(default_factory=ReactionsConfig)
    """The reaction stage (reaction recordings → examples, unioned with the manifest's rows)."""
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    """The MLLM stage (song clips → an annotator's critiques as library personas → examples)."""
    personas: str | None = None
    """The persona library, a YAML file (vcritic/data/personas.py says the format); None: the
    packaged vcritic/data/personas.yaml."""
    sample_rate: int = 16000
    min_clip_seconds: float = 1.0
    max_clip_seconds: float = 30.0
    max_target_audio_seconds: float = 10.0
    dedup_threshold: float = 0.95
    """Cosine similarity above which two examples are near-duplicates (one is dropped); in (0, 1],
    where 1.0 drops only exact duplicates (identical embeddings up to float32 rounding)."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Search settings of the near-duplicate removal (device, index)."""
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    """Curation rules (silence, clipping, repetition, language, ...), each with ``enabled``."""
    min_critique_words: int = 1
    max_critique_words: int = 5000
    """Rows whose target_text has fewer or more words are quarantined (words: whitespace-separated
    runs; each CJK character counts as one); data.filters.text_length.enabled turns this off."""
    val_fraction: float = 0.1
    """Share of songs held out for validation (picks the best checkpoint)."""
    test_fraction: float = 0.1
    """Share of songs held out for the final evaluation only (the job's SCQ before and after
    training), disjoint from val, so the reported accuracy is not biased by checkpoint choice.
    0 disables the test split; SCQ then falls back to val (and says so)."""
    tokenizer_fit_clips: int = 64
    """Clips sampled from the train split to fit an audio tokenizer that needs fitting."""
    embedder: PluginSpec = field(default_factory=lambda: PluginSpec("logmel_hash"))
    separator: PluginSpec = field(default_factory=lambda: PluginSpec("identity"))
    separate_sources: list[str] = field(default_factory=lambda: ["human"])
    """Rows from these sources go through the separator (speech over music is removed)."""


@dataclass
class GenerateConfig:
    """How a critic writes and speaks a critique (travels in the export: serving uses it)."""

    max_text_tokens: int = 512
    """Longest critique text, in text tokens."""
    max_audio_tokens: int = 768
    """Longest spoken critique, in audio-tokenizer frames."""
    min_text_tokens: int = 0
    """The critique's end token is masked out until this many text tokens (benchmarks force a length)."""
    min_audio_tokens: int = 0
    """Speech's end (the first codebook's EOS) is masked out until this many frames."""
    temperature: float = 0.0
    """0: greedy (argmax); above 0: sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens whose probabilities sum to top_p."""
    repetition_penalty: float = 1.0
    """Above 1 discourages text tokens the critique already holds (logit / p if > 0, else logit * p)."""
    audio_temperature: float | None = None
    """Temperature of the speech rows (None: temperature)."""
    audio_top_p: float | None = None
    """top_p of the speech rows (None: top_p)."""
    batch_size: int = 8
    """Clips generated together (critique_batch and the served model split longer lists)."""
    seed: int = 0
    """Seed of the sampler (each critique_batch call restarts it: the same inputs give the same critiques)."""
    cache: bool = True
    """KV-cached decoding; false recomputes the whole sequence per token (the slow reference)."""


GENERATE_KEYS = tuple(GenerateConfig.__dataclass_fields__)


def generate_problems(values: dict[str, Any], where: str = "model.generate") -> list[str]:
    """What is wrong with generation settings (empty: nothing), each naming ``where.<key>`` and the fix."""
    unknown = sorted(set(values) - set(GENERATE_KEYS))
    problems = [f"{where}.{k} is not a generation setting (known: {', '.join(GENERATE_KEYS)})" for k in unknown]
    v = {**{k: f.default for k, f in GenerateConfig.__dataclass_fields__.items()}, **values}
    for key in ("max_text_tokens", "max_audio_tokens", "batch_size"):
        if not isinstance(v[key], int) or v[key] < 1:
            problems.append(f"{where}.{key} must be an integer >= 1, got {v[key]!r}")
    for key, limit in (("min_text_tokens", "max_text_tokens"), ("min_audio_tokens", "max_audio_tokens")):
        if not isinstance(v[key], int) or not 0 <= v[key] <= (v[limit] if isinstance(v[limit], int) else v[key]):
            problems.append(f"{where}.{key} must be an integer in [0, {where}.{limit}], got {v[key]!r}")
    for key in ("temperature", "audio_temperature"):
        if v[key] is not None and not (isinstance(v[key], (int, float)) and v[key] >= 0):
            problems.append(f"{where}.{key} must be >= 0 (0 = greedy), got {v[key]!r}")
    for key in ("top_p", "audio_top_p"):
        if v[key] is not None and not (isinstance(v[key], (int, float)) and 0 < v[key] <= 1):
            problems.append(f"{where}.{key} must be in (0, 1], got {v[key]!r}")
    if not (isinstance(v["repetition_penalty"], (int, float)) and v["repetition_penalty"] > 0):
        problems.append(f"{where}.repetition_penalty must be > 0 (1 = none), got {v['repetition_penalty']!r}")
    if not isinstance(v["seed"], int) or isinstance(v["seed"], bool):
        problems.append(f"{where}.seed must be an integer, got {v['seed']!r}")
    if not isinstance(v["cache"], bool):
        problems.append(f"{where}.cache must be true or false, got {v['cache']!r}")
    return problems


@dataclass
class ModelConfig:
    backbone: PluginSpec = field(default_factory=lambda: PluginSpec("causal_lm"))
    audio_tokenizer: PluginSpec = field(default_factory=lambda: PluginSpec("mel_kmeans"))
    audio_head_layers: int = 1
    """K: top trunk layers copied into the parallel audio branch."""
    loss_lambda: float = 2.0 / 3.0
    """Weight of the text loss; 1.0 is text-only SFT."""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    """None → the backbone's own default list."""
    train_text_head: bool = False
    """Also train the LM head (useful for randomly initialised demo backbones)."""
    max_prompt_tokens: int = 128
    max_text_tokens: int = 512
    max_audio_tokens: int = 768
    """Longest spoken critique trained on, in audio-tokenizer frames."""
    codebook_weights: list[float] | None = None
    """Weight of each codebook's CE in the audio loss (one per codebook of the audio tokenizer;
    None: equal). Speech trainers weight the first, semantic codebook far higher, e.g.
    [100, 1, 1, 1, 1, 1, 1, 1] for 8 Mimi codebooks. Normalised, so L_audio stays one CE."""
    train_audio_encoder: bool = False
    """Fine-tune a backbone's own pretrained audio encoder (Qwen2.5-Omni's audio tower); frozen by default."""
    train_audio_projection: bool = False
    """Train only the audio encoder's output projection into the LLM (with the encoder frozen)."""
    base_models_dir: str | None = None
    """Where to find pretrained base models (and codec checkpoints) an export names when they are
    not at their recorded path (by directory name, checked by hash); also $VCRITIC_BASE_MODELS."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """Generation settings (lengths, sampling, batching), saved in the export for serving."""


@dataclass
class TrainConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    """Below 1 on small machines so Ray Data keeps CPUs for its tasks."""
    gpus_per_worker: float = 1.0
    epochs: int = 3
    batch_size: int = 4
    """Micro-batch per worker."""
    grad_accum: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    zero_stage: int = 2
    precision: str = "fp32"
    """fp32 | bf16"""
    cpu_shm_comm: bool = False
    """DeepSpeed's shared-memory all-reduce on CPU (compiles a C++ op on first use, ~40 s)."""
    log_every_steps: int = 5
    """Optimizer steps between training-metric writes to MLflow."""
    checkpoints_to_keep: int = 2
    """Epoch-end checkpoints kept (best val_loss first); the latest checkpoint is always kept too."""
    checkpoint_every_steps: int | None = None
    """Also checkpoint every this many optimizer steps inside an epoch, with the data position
    (which examples this epoch has consumed), so a restart repeats and skips no example and loses
    at most this many steps. None: epoch ends only. Training metrics reach MLflow at checkpoints."""
    max_failures: int = 0
    """Restarts of the worker group after a worker or node dies (Ray Train's FailureConfig); each
    restart resumes from the latest checkpoint. -1: no limit."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources each train worker asks for, e.g. {accelerator_type:A800: 0.001} or a custom
    node label resource, to place workers on particular nodes."""
    resume_from: str | None = None
    """A Ray Train checkpoint directory to start from (a restarted run resumes by itself)."""
    max_steps_per_epoch: int | None = None
    """Cap optimizer steps per epoch (smoke tests)."""
    lr_schedule: str = "cosine"
    """cosine | constant: after the linear warmup, cosine decay to min_lr_ratio·lr over all optimizer steps."""
    min_lr_ratio: float = 0.1
    """Where the cosine schedule ends, as a fraction of train.lr."""
    gradient_checkpointing: bool = False
    """Recompute the trunk's activations in the backward pass (less memory, ~30% more compute)."""
    shuffle_buffer_rows: int = 256
    """Rows each worker shuffles among (reseeded from run.seed every epoch) and groups by length."""
    group_by_length: bool = True
    """Batch rows of similar stream length together within the shuffle buffer (less padding)."""


@dataclass
class EvalConfig:
    scq: bool = True
    scq_bank: str = "vcritic.data.demo:SCQ_QUESTIONS"
    """Question bank: a "module:attr" list or a .json file (see vcritic.evaluate.scq)."""
    scq_max_clips: int = 64
    max_new_text_tokens: int = 64
    max_new_audio_tokens: int = 40
    scq_file: str | None = None
    """jobs/evaluate.py: a JSONL file of single-choice questions in the public benchmark format
    (audio_path relative to the file, question, options, answer letter, optional category)."""
    scq_mode: str = "loglik"
    """jobs/evaluate.py: how the critic answers, one or more of generative, loglik (comma-separated).
    loglik (option likelihood) is the default: deterministic, never unparsed, and fair to a critic
    trained to write critiques rather than to answer quizzes; generative also tests following the format."""
    oeq_file: str | None = None
    """jobs/evaluate.py: open-ended questions, JSONL rows of audio_path, persona, context, reference."""
    human_ratings: str | None = None
    """jobs/evaluate.py: human ratings of the OEQ critiques, for judge agreement (JSON {item_id:
    {dimension: rating}} or JSONL rows with item_id and the dimensions)."""
    judges: list[dict[str, Any]] = field(default_factory=list)
    """OEQ judges: [{name, plugin, params}] (plugin: a vcritic.judges plugin name)."""
    oeq_weights: list[float] = field(default_factory=lambda: [0.2, 0.6, 0.2])
    """OEQ composite weights of completeness, accuracy, novelty."""


@dataclass
class CritiqueConfig:
    """jobs/critique.py: critique a folder or manifest of clips on Ray Data actors."""

    persona: str = "A blunt vocal coach who comments on melody, technique and sound quality."
    """Prompt persona for clips whose manifest row gives none (and for folders)."""
    context: str = ""
    """Song context for clips whose row gives none."""
    extensions: list[str] = field(default_factory=lambda: ["wav", "flac", "mp3", "ogg", "opus"])
    """Audio files a folder INPUT is searched for (recursively)."""
    output_dir: str | None = None
    """Where critiques.jsonl, speech/ and report.html go (a new timestamped folder inside); None:
    run.output_dir/critiques. On a multi-node cluster: storage every node reaches."""
    max_text_tokens: int | None = None
    """Critique length limit; None: the critic's own default."""
    max_audio_tokens: int | None = None
    """Spoken critique limit, in audio-tokenizer frames; None: the critic's own default."""
    speak: bool = True
    """Also write the spoken critique (wav files)."""
    batch_size: int = 4
    """Rows per actor call (given to critic.critique_batch when the critic has it)."""
    concurrency: int = 1
    """Critic actors (each loads the critic once)."""
    cpus_per_actor: float = 0.5
    """Below 1 on small machines so Ray Data keeps CPUs for its own tasks."""
    gpus_per_actor: float | None = None
    """None: 1 when the Ray cluster has a GPU, else 0 (CPU actors)."""
    copy_clips: bool = True
    """Copy the clips next to the report so it (and the MLflow artifacts) play them anywhere."""
    run_name: str = "vcritic-critique"
    """MLflow run name (in mlflow.experiment)."""


@dataclass
class RewardProbeConfig:
    """One reward dimension (vcritic.reward.Probe)."""

    name: str = "???"
    prefix: str = "???"
    """The start of a critique sentence, with its leading space, e.g. " The intonation is"."""
    options: dict[str, float] = field(default_factory=dict)
    """Continuation -> value in [0, 1], e.g. {"spot on": 1.0, "a little off": 0.5, "badly off": 0.0}."""
    weight: float = 1.0
    template: str = " {}."


@dataclass
class RewardConfig:
    """The critic as a reward (vcritic.reward.RewardModel.from_config)."""

    probes: list[RewardProbeConfig] = field(default_factory=list)
    """Empty: vcritic.reward.DEFAULT_PROBES (intonation and sound)."""
    persona: str = "A strict vocal coach who judges intonation and sound quality."
    context: str = ""
    batch_size: int = 32
    """(clip, option) rows per forward pass."""
    temperature: float = 1.0
    """Of the softmax over a probe's options."""
    judges: list[PluginSpec] = field(default_factory=list)
    """Optional judge plugins scoring a generated critique (vcritic.judges)."""
    judge_weight: float = 0.0
    """Weight of the judges' score in the reward (0: no judge term, nothing is generated)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    critique: CritiqueConfig = field(default_factory=CritiqueConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


class ConfigError(ValueError):
    """A preset or override does not fit the schema."""


def preset_path(preset: str) -> Path:
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ConfigError(f"config file {preset!r} does not exist")
        return path
    path = PRESETS_DIR / f"{preset}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"no preset named {preset!r}; presets are: {', '.join(names)} (or give a .yaml path)")
    return path


def load(preset: str | None = "demo", overrides: list[str] | None = None) -> DictConfig:
    """Build a validated config.

    Args:
        preset: a preset name under ``jobs/configs``, a YAML path, or None for bare defaults.
        overrides: ``key=value`` strings, e.g. ``["train.epochs=2", "model.lora_r=16"]``.

    Raises:
        ConfigError: unknown key, wrong type, malformed override or missing preset.
    """
    cfg = OmegaConf.structured(Config)
    layers: list[tuple[str, Any]] = []
    if preset is not None:
        path = preset_path(preset)
        layers.append((str(path), OmegaConf.load(path)))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.epochs=2)")
        layers.append((f"override {item!r}", OmegaConf.from_dotlist([item])))
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or "?"
            reason = str(exc).splitlines()[0]
            raise ConfigError(f"{source}: key {key!r}: {reason}") from exc
    _check(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _check(cfg: DictConfig) -> None:
    if not 0.0 <= cfg.model.loss_lambda <= 1.0:
        raise ConfigError(f"model.loss_lambda must be in [0, 1], got {cfg.model.loss_lambda}")
    if cfg.train.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {cfg.train.zero_stage}")
    if cfg.train.precision not in ("fp32", "bf16"):
        raise ConfigError(f"train.precision must be 'fp32' or 'bf16', got {cfg.train.precision!r}")
    if cfg.train.lr_schedule not in ("cosine", "constant"):
        raise ConfigError(f"train.lr_schedule must be 'cosine' or 'constant', got {cfg.train.lr_schedule!r}")
    if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {cfg.train.min_lr_ratio}")
    if cfg.train.checkpoint_every_steps is not None and cfg.train.checkpoint_every_steps < 1:
        raise ConfigError(f"train.checkpoint_every_steps must be at least 1 (or null), got {cfg.train.checkpoint_every_steps}")
    if cfg.train.max_failures < -1:
        raise ConfigError(f"train.max_failures must be -1 (no limit) or >= 0, got {cfg.train.max_failures}")
    if cfg.train.shuffle_buffer_rows < 1:
        raise ConfigError(f"train.shuffle_buffer_rows must be at least 1, got {cfg.train.shuffle_buffer_rows}")
    if cfg.train.precision == "bf16" and cfg.train.zero_stage == 0:
        raise ConfigError("train.precision=bf16 needs train.zero_stage >= 1 (ZeRO keeps fp32 master weights; "
                          "stage 0 would update the weights in bf16)")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    if not 0.0 <= cfg.data.test_fraction < 1.0 or cfg.data.val_fraction + cfg.data.test_fraction >= 1.0:
        raise ConfigError(f"data.test_fraction must be in [0, 1) with data.val_fraction + data.test_fraction < 1, "
                          f"got {cfg.data.test_fraction} (val_fraction {cfg.data.val_fraction})")
    weights = cfg.model.codebook_weights
    if weights is not None and (not len(weights) or min(weights) < 0 or sum(weights) <= 0):
        raise ConfigError(f"model.codebook_weights must be non-negative and not all zero, got {list(weights)}")
    if not 0.0 < cfg.data.dedup_threshold <= 1.0:
        raise ConfigError(f"data.dedup_threshold must be in (0, 1], got {cfg.data.dedup_threshold}")
    if not 0 <= cfg.data.min_critique_words <= cfg.data.max_critique_words or cfg.data.max_critique_words < 1:
        raise ConfigError(f"data.min_critique_words and data.max_critique_words must satisfy 0 <= min <= max, max >= 1; "
                          f"got {cfg.data.min_critique_words} and {cfg.data.max_critique_words}")
    _check_curation(cfg.data)
    _check_reactions(cfg.data)
    _check_annotate(cfg.data)
    problems = generate_problems(OmegaConf.to_container(cfg.model.generate))
    if problems:
        raise ConfigError("; ".join(problems))
    modes = [m.strip() for m in str(cfg.eval.scq_mode).split(",") if m.strip()]
    if not modes or any(m not in ("generative", "loglik", "cloze") for m in modes):
        raise ConfigError(f"eval.scq_mode must be one or more of generative, loglik, cloze (comma-separated), "
                          f"got {cfg.eval.scq_mode!r}")
    if len(cfg.eval.oeq_weights) != 3 or min(cfg.eval.oeq_weights) < 0 or sum(cfg.eval.oeq_weights) <= 0:
        raise ConfigError(f"eval.oeq_weights must be 3 non-negative weights (completeness, accuracy, novelty) "
                          f"with a positive sum, e.g. [0.2,0.6,0.2]; got {list(cfg.eval.oeq_weights)}")
    if cfg.mlflow.promote_direction not in ("min", "max"):
        raise ConfigError(f"mlflow.promote_direction must be 'min' or 'max', got {cfg.mlflow.promote_direction!r}")
    if cfg.mlflow.promote not in ("if_better", "always"):
        raise ConfigError(f"mlflow.promote must be 'if_better' or 'always', got {cfg.mlflow.promote!r}")


def _check_curation(data: DictConfig) -> None:
    """Ranges of data.filters.* and data.dedup.*, each error naming its key."""
    f, d = data.filters, data.dedup
    checks = [
        (0.0 <= f.silence.max_silent_fraction <= 1.0, "data.filters.silence.max_silent_fraction", "in [0, 1]"),
        (f.silence.min_dbfs <= 0.0, "data.filters.silence.min_dbfs", "<= 0 (dB below full scale)"),
        (f.silence.frame_ms > 0, "data.filters.silence.frame_ms", "> 0"),
        (0.0 < f.clipping.level <= 1.0, "data.filters.clipping.level", "in (0, 1]"),
        (0.0 <= f.clipping.max_fraction <= 1.0, "data.filters.clipping.max_fraction", "in [0, 1]"),
        (f.repetition.n >= 1, "data.filters.repetition.n", ">= 1"),
        (0.0 <= f.repetition.max_fraction <= 1.0, "data.filters.repetition.max_fraction", "in [0, 1]"),
        (f.repetition.min_ngrams >= 1, "data.filters.repetition.min_ngrams", ">= 1"),
        (0.0 <= f.language.min_confidence <= 1.0, "data.filters.language.min_confidence", "in [0, 1]"),
        (f.language.min_chars >= 0, "data.filters.language.min_chars", ">= 0"),
        (f.speech.min_speech_seconds >= 0, "data.filters.speech.min_speech_seconds", ">= 0"),
        (0.0 < f.speech.threshold < 1.0, "data.filters.speech.threshold", "in (0, 1)"),
        (d.device in ("auto", "cpu", "gpu"), "data.dedup.device", "one of auto, cpu, gpu"),
        (d.exact_max >= 0, "data.dedup.exact_max", ">= 0"),
        (d.nlist >= 0, "data.dedup.nlist", ">= 0 (0: automatic)"),
        (d.nprobe >= 1, "data.dedup.nprobe", ">= 1"),
        (d.kmeans_iters >= 1, "data.dedup.kmeans_iters", ">= 1"),
    ]
    for ok, key, rule in checks:
        if not ok:
            value = OmegaConf.select(data, key.removeprefix("data."))
            raise ConfigError(f"{key} must be {rule}, got {value!r}")
    if d.nlist and d.nprobe > d.nlist:
        raise ConfigError(f"data.dedup.nprobe ({d.nprobe}) must not exceed data.dedup.nlist ({d.nlist})")


def _check_annotate(data: DictConfig) -> None:
    """Ranges of data.annotate.*, each error naming its key."""
    a = data.annotate
    if a.personas_per_clip < 1:
        raise ConfigError(f"data.annotate.personas_per_clip must be >= 1, got {a.personas_per_clip}")
    if a.concurrency < 1:
        raise ConfigError(f"data.annotate.concurrency must be >= 1, got {a.concurrency}")
    if a.cpus_per_task <= 0:
        raise ConfigError(f"data.annotate.cpus_per_task must be > 0, got {a.cpus_per_task}")
    if not 0.0 <= a.max_failures_fraction <= 1.0:
        raise ConfigError(f"data.annotate.max_failures_fraction must be in [0, 1], got {a.max_failures_fraction}")
    if a.manifest and a.annotator.name in ("", "???"):
        raise ConfigError("data.annotate.annotator.name must name a vcritic.annotators plugin (openai_chat, gemini)")


def _check_reactions(data: DictConfig) -> None:
    """Ranges of data.reactions.* (and data.demo.reactions), each error naming its key."""
    r = data.reactions
    if data.demo.reactions < 0:
        raise ConfigError(f"data.demo.reactions must be >= 0, got {data.demo.reactions}")
    if not 0 < r.min_music_seconds <= r.max_music_seconds:
        raise ConfigError(f"data.reactions.min_music_seconds and data.reactions.max_music_seconds must satisfy "
                          f"0 < min <= max, got {r.min_music_seconds} and {r.max_music_seconds}")
    if r.max_music_seconds > data.max_clip_seconds:
        raise ConfigError(f"data.reactions.max_music_seconds ({r.max_music_seconds}) must not exceed "
                          f"data.max_clip_seconds ({data.max_clip_seconds}): longer windows would be quarantined")
    if r.min_turn_seconds < 0:
        raise ConfigError(f"data.reactions.min_turn_seconds must be >= 0, got {r.min_turn_seconds}")
    t = r.target_speech_seconds
    if t is not None and not 0 < t <= data.max_target_audio_seconds:
        raise ConfigError(f"data.reactions.target_speech_seconds must be in (0, data.max_target_audio_seconds="
                          f"{data.max_target_audio_seconds}] (or null), got {t}")


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """A plain, picklable dict (what Ray workers receive)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def from_dict(data: dict[str, Any]) -> DictConfig:
    """Rebuild a validated config from :func:`to_dict` output."""
    cfg = OmegaConf.merge(OmegaConf.structured(Config), data)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def flatten(cfg: DictConfig) -> dict[str, str]:
    """``{"train.lr": "0.0001", ...}`` for MLflow params."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(node)

    walk("", to_dict(cfg))
    return out
