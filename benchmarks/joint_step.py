"""What the parallel audio branch costs per training step.

Baseline: text-only SFT (λ = 1, the audio branch is not run). Candidates: the joint
objective with K = 1 and K = 2 copied layers. Prints ms/step, tokens/s, trainable
parameters and peak resident memory side by side, with ratios to the baseline.

    python benchmarks/joint_step.py                 # demo-sized backbone, CPU
    python benchmarks/joint_step.py --hidden 512 --layers 8 --steps 10
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vcritic.models import build  # noqa: E402
from vcritic.models.sequence import build_streams, collate  # noqa: E402
from vcritic.protocols import PromptParts  # noqa: E402

FEATURE_DIM, AUDIO_CODES = 64, 64


def make_batch(critic, batch: int, music: int, text: int, speech: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    vocab = critic.vocab
    text_vocab = critic.trunk.get_input_embeddings().num_embeddings - 8
    streams = [
        build_streams(vocab, PromptParts([*rng.integers(0, text_vocab, 24).tolist(), vocab.music_start], [vocab.music_end],
                                         vocab.slot, vocab.end), music, rng.integers(0, AUDIO_CODES, music).tolist(),
                      rng.integers(0, text_vocab, text).tolist(), rng.integers(0, AUDIO_CODES, speech).tolist(),
                      music_features=rng.standard_normal((music, FEATURE_DIM)).astype(np.float32))
        for _ in range(batch)
    ]
    return collate(streams, vocab)


def measure(spec, lam: float, k: int, args) -> dict[str, float]:
    """One setting, run in a fresh process so its peak RSS is its own."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, (spec, lam, k, args))


def _measure(spec, lam: float, k: int, args) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_cfg = dict(audio_head_layers=k, loss_lambda=lam, lora_r=16, lora_alpha=32, lora_dropout=0.0,
                     lora_target_modules=None, train_text_head=True)
    critic, _ = build.build_critic(spec, model_cfg, AUDIO_CODES, FEATURE_DIM)
    opt = torch.optim.AdamW([p for p in critic.parameters() if p.requires_grad], lr=1e-3)
    batch = make_batch(critic, args.batch, args.music, args.text, args.speech)
    tokens = int(batch["attention_mask"].sum())
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        critic(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    ms = 1000 * float(np.median(times))
    return {"ms_per_step": ms, "tokens_per_s": tokens / (ms / 1000), "trainable_m": build.trainable_summary(critic)["params_trainable"] / 1e6,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--music", type=int, default=50, help="music frames per example (4 s at 12.5 Hz)")
    parser.add_argument("--text", type=int, default=60)
    parser.add_argument("--speech", type=int, default=19)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    corpus = [f"word{i} word{i + 1} and some critique text {i}" for i in range(200)]
    backbone = {"name": "causal_lm", "options": {"tokenizer_vocab_size": 512, "config": {
        "hidden_size": args.hidden, "intermediate_size": 2 * args.hidden, "num_hidden_layers": args.layers,
        "num_attention_heads": 4, "num_key_value_heads": 2}}}
    with tempfile.TemporaryDirectory() as tmp:
        spec = build.materialize_backbone(backbone, corpus, Path(tmp) / "base")
        rows = [("text-only (λ=1)  [baseline]", 1.0, 1), ("joint λ=2/3, K=1", 2 / 3, 1), ("joint λ=2/3, K=2", 2 / 3, 2)]
        results = [(name, measure(spec, lam, k, args)) for name, lam, k in rows]
    base = results[0][1]
    print(f"backbone: hidden={args.hidden} layers={args.layers}; batch={args.batch}, "
          f"{args.music} music + {args.text} text + {args.speech} speech tokens/example; {args.threads} threads")
    print(f"{'setting':<30} {'ms/step':>9} {'ratio':>6} {'tokens/s':>9} {'trainable M':>12} {'peak RSS MB':>12}")
    for name, r in results:
        print(f"{name:<30} {r['ms_per_step']:>9.1f} {r['ms_per_step'] / base['ms_per_step']:>6.2f} "
              f"{r['tokens_per_s']:>9.0f} {r['trainable_m']:>12.2f} {r['peak_rss_mb']:>12.0f}")


if __name__ == "__main__":
    main()
