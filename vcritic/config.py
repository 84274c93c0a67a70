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


@dataclass
class DataConfig:
    manifest: str | None = None
    """JSONL or Parquet of example rows; None generates the demo set under run.output_dir."""
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    sample_rate: int = 16000
    min_clip_seconds: float = 1.0
    max_clip_seconds: float = 30.0
    max_target_audio_seconds: float = 10.0
    dedup_threshold: float = 0.95
    """Cosine similarity above which two examples are near-duplicates (one is dropped); in (0, 1],
    where 1.0 drops only exact duplicates (identical embeddings up to float32 rounding)."""
    min_critique_words: int = 1
    max_critique_words: int = 5000
    """Rows whose target_text has fewer or more whitespace-separated words are quarantined."""
    val_fraction: float = 0.1
    tokenizer_fit_clips: int = 64
    """Clips sampled from the train split to fit an audio tokenizer that needs fitting."""
    embedder: PluginSpec = field(default_factory=lambda: PluginSpec("logmel_hash"))
    separator: PluginSpec = field(default_factory=lambda: PluginSpec("identity"))
    separate_sources: list[str] = field(default_factory=lambda: ["human"])
    """Rows from these sources go through the separator (speech over music is removed)."""


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


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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
    weights = cfg.model.codebook_weights
    if weights is not None and (not len(weights) or min(weights) < 0 or sum(weights) <= 0):
        raise ConfigError(f"model.codebook_weights must be non-negative and not all zero, got {list(weights)}")
    if not 0.0 < cfg.data.dedup_threshold <= 1.0:
        raise ConfigError(f"data.dedup_threshold must be in (0, 1], got {cfg.data.dedup_threshold}")
    if not 0 <= cfg.data.min_critique_words <= cfg.data.max_critique_words or cfg.data.max_critique_words < 1:
        raise ConfigError(f"data.min_critique_words and data.max_critique_words must satisfy 0 <= min <= max, max >= 1; "
                          f"got {cfg.data.min_critique_words} and {cfg.data.max_critique_words}")
    if cfg.mlflow.promote_direction not in ("min", "max"):
        raise ConfigError(f"mlflow.promote_direction must be 'min' or 'max', got {cfg.mlflow.promote_direction!r}")
    if cfg.mlflow.promote not in ("if_better", "always"):
        raise ConfigError(f"mlflow.promote must be 'if_better' or 'always', got {cfg.mlflow.promote!r}")


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
