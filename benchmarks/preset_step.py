"""Train-step cost of each paper preset's critic on its tiny checkpoint, against the demo preset.

    python benchmarks/preset_step.py [--steps 10] [--clip-seconds 4] [--batch 2]

Builds every preset's critic exactly as the job does (its backbone plugin, its audio tokenizer,
its hearing, LoRA, K, λ and codebook weights) on tiny random checkpoints in the real file layouts
from ``vcritic.testing``, then times forward + backward + AdamW step on CPU in fp32 over the same
synthetic clips (a melody and a hummed reply), and prints trainable parameters, ms per step and
the ratio to the demo preset (vcritic's music encoder + k-means tokens, the baseline).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vcritic import registry  # noqa: E402
from vcritic.config import load, to_dict  # noqa: E402
from vcritic.data.stages import music_columns  # noqa: E402
from vcritic.models.build import build_critic, materialize_backbone, prompt_parts, trainable_summary  # noqa: E402
from vcritic.models.sequence import build_streams, collate  # noqa: E402

CRITIQUE = " A warm tone with steady breath support; the chorus sits a little flat in the last bar."


def clip(seconds: float, rate: int, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t) * (1 + 0.3 * np.sin(2 * np.pi * 2 * t))).astype(np.float32)


def presets(root: Path) -> dict[str, list[str]]:
    from vcritic.testing.tiny_codecs import write_tiny_mimi
    from vcritic.testing.tiny_kimi import write_tiny_kimi_checkpoint
    from vcritic.testing.tiny_qwen_omni import write_tiny_qwen_omni_checkpoint

    qwen = write_tiny_qwen_omni_checkpoint(root / "qwen")
    mimi = write_tiny_mimi(root / "mimi")
    kimi = write_tiny_kimi_checkpoint(root / "kimi", num_layers=8, mimo_layers=6, from_layer=1)
    # Kimi's GLM-4-Voice tokenizer needs its kimia_infer package and a GPU: k-means tokens stand in.
    from omegaconf import OmegaConf

    from vcritic.config import preset_path

    kimi_preset = OmegaConf.load(preset_path("kimi_audio_joint"))
    kimi_preset.model.audio_tokenizer = {"name": "mel_kmeans", "options": {"codebook_size": 32}}
    OmegaConf.save(kimi_preset, root / "kimi_audio_joint.yaml")
    return {
        "demo": [],
        "qwen2_5_omni_text": [f"model.backbone.options.path={qwen}", "model.backbone.options.dtype=float32"],
        "joint_text_audio": [f"model.backbone.options.path={qwen}", "model.backbone.options.dtype=float32",
                             f"model.audio_tokenizer.options.path={mimi}", "model.audio_tokenizer.options.num_codebooks=4",
                             "model.codebook_weights=[100.0, 1.0, 1.0, 1.0]", "model.audio_head_layers=2"],
        str(root / "kimi_audio_joint.yaml"): [f"model.backbone.options.path={kimi}",
                                              "model.backbone.options.dtype=float32"],
    }


def measure(name: str, overrides: list[str], root: Path, args) -> dict[str, float]:
    cfg = load(name, [*overrides, "train.precision=fp32"])
    audio_tok = registry.create("audio_tokenizers", cfg.model.audio_tokenizer.name,
                                **dict(cfg.model.audio_tokenizer.options))
    rate = audio_tok.sample_rate
    clips = [clip(args.clip_seconds, rate, f) for f in (220.0, 330.0, 440.0, 550.0)]
    audio_tok.fit(clips)
    spec = materialize_backbone(to_dict(cfg.model.backbone), [CRITIQUE] * 50, root / f"{Path(name).stem}-base")
    torch.manual_seed(0)
    critic, tok = build_critic(spec, to_dict(cfg.model), int(audio_tok.codebook_size), int(audio_tok.feature_dim),
                               num_codebooks=int(audio_tok.num_codebooks))
    v = critic.vocab
    streams = []
    for i in range(args.batch):
        music = clip(args.clip_seconds, rate if critic.hearing is None else int(critic.hearing.sample_rate), 220.0 + 110 * i)
        heard = critic.hearing  # None: vcritic's music encoder
        cols = music_columns(music, heard, audio_tok)
        parts = prompt_parts(tok, heard, v, "A vocal coach.", "A ballad.", 128)
        speech = audio_tok.encode(clip(1.5, rate, 180.0))
        native = None
        if cols["native_frames"]:
            native = np.asarray(cols["native_features"], np.float32).reshape(cols["native_frames"], -1)
        frames = np.asarray(cols["music_features"], np.float32).reshape(-1, v.feature_dim) if cols["music_features"] else None
        streams.append(build_streams(v, parts, cols["music_positions"], cols["music_tokens"] or None,
                                     tok(CRITIQUE, add_special_tokens=False)["input_ids"], speech,
                                     music_features=frames, native_features=native))
    batch = collate(streams, v)
    opt = torch.optim.AdamW([p for p in critic.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        critic(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if step:  # the first step pays one-off allocation costs
            times.append(time.perf_counter() - start)
    counts = trainable_summary(critic)
    return {"ms": 1000 * float(np.median(times)), "tokens": int(batch["attention_mask"].sum()), **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--clip-seconds", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results = {name: measure(name, o, root, args) for name, o in presets(root).items()}
    base = results["demo"]["ms"]
    print(f"CPU fp32, batch {args.batch} x {args.clip_seconds:.0f} s clips, median of {args.steps} steps "
          f"({torch.get_num_threads()} threads)")
    print(f"{'preset':<20} {'trainable':>10} {'total':>10} {'tokens':>7} {'ms/step':>9} {'vs demo':>8}")
    for name, r in results.items():
        print(f"{Path(name).stem:<20} {r['params_trainable']:>10,} {r['params_total']:>10,} {r['tokens']:>7} "
              f"{r['ms']:>9.1f} {r['ms'] / base:>7.2f}x")


if __name__ == "__main__":
    main()
