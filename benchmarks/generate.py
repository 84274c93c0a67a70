"""How much faster the KV-cached, batched critic writes (and speaks) than the recompute path.

A tiny random critic (the demo-sized causal-LM backbone, vcritic's music encoder) critiques
synthetic clips. Both paths generate exactly ``--text-tokens`` text tokens per clip (the end token
is masked out until then, ``min_text_tokens``), so they do the same work; the recompute path re-runs
the whole sequence per token, one clip at a time. Prints tokens/s and critiques/s side by side with
the cached/recompute ratio, at batch 1 and batch ``--batch`` (cached: the best of ``--repeats``
runs); ``--speech-frames N`` adds N forced speech frames per critique (their rows count as tokens
too). Compares the two paths' greedy tokens: how many each clip shares before the first difference
(float rounding can flip a near-tie argmax of a random critic late in a long critique).

    python benchmarks/generate.py                          # 512 text tokens, batch 1 and 8, CPU
    python benchmarks/generate.py --text-tokens 128 --batch 4 --speech-frames 32
    python benchmarks/generate.py --device cuda --hidden 512 --layers 8
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

from vcritic.critic import Critic  # noqa: E402
from vcritic.models import build  # noqa: E402
from vcritic.models.sequence import Heard, vcritic_prompt  # noqa: E402

FEATURE_DIM, AUDIO_CODES = 64, 64
CORPUS = ["Persona: a strict vocal coach.\nAbout the song: a ballad in D minor.\nListen and critique:",
          " the chorus lands on a bright sustained high note, but the second verse drifts flat."] * 20


class SilentCodec:
    """Decodes to silence: the benchmark times the critic, not a vocoder."""

    sample_rate = 16000

    def decode(self, ids: np.ndarray) -> np.ndarray:
        return np.zeros(len(ids) * 160, np.float32)


def tiny_critic(args, root: Path) -> Critic:
    config = {"hidden_size": args.hidden, "intermediate_size": 2 * args.hidden, "num_hidden_layers": args.layers,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}
    spec = build.materialize_backbone({"name": "causal_lm", "options": {"config": config, "tokenizer_vocab_size": 512}},
                                      CORPUS, root / "base")
    cfg = dict(audio_head_layers=1, loss_lambda=2 / 3, lora_r=8, lora_alpha=16, lora_dropout=0.0,
               lora_target_modules=None, train_text_head=False, max_prompt_tokens=64)
    torch.manual_seed(0)
    model, tokenizer = build.build_critic(spec, cfg, AUDIO_CODES, FEATURE_DIM)
    return Critic(model.to(args.device), tokenizer, SilentCodec(), {"model": cfg})


def clips(critic: Critic, count: int, music: int) -> list[Heard]:
    rng = np.random.default_rng(0)
    return [Heard(vcritic_prompt(critic.tokenizer, critic.vocab, "A strict vocal coach.", f"Take {i}.", 64), music,
                  rng.integers(0, AUDIO_CODES, (music, 1)), rng.standard_normal((music, FEATURE_DIM)).astype(np.float32))
            for i in range(count)]


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two critiques share. A random critic's logits are nearly flat, so
    over hundreds of tokens float rounding (a cached vs. a full forward sum in different orders)
    can flip one argmax; from there the two critiques differ."""
    n = 0
    for x, y in zip(a, b, strict=False):  # one may be shorter
        if x != y:
            break
        n += 1
    return n


def run(critic: Critic, heards: list[Heard], cache: bool, args) -> tuple[float, list]:
    settings = critic.settings(cache=cache, batch_size=len(heards), max_text_tokens=args.text_tokens,
                               min_text_tokens=args.text_tokens, max_audio_tokens=max(args.speech_frames, 1),
                               min_audio_tokens=args.speech_frames)
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = critic.generate(heards, speak=args.speech_frames > 0, settings=settings)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--speech-frames", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--music", type=int, default=50, help="music positions per clip (4 s at 12.5 Hz)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="cached runs per setting (the fastest is kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        critic = tiny_critic(args, Path(tmp))
        heards = clips(critic, args.batch, args.music)
        run(critic, heards[:1], True, argparse.Namespace(**{**vars(args), "text_tokens": 4}))  # warm-up
        per_row = args.text_tokens + (args.speech_frames + critic.vocab.num_codebooks if args.speech_frames else 0)
        print(f"device={args.device} hidden={args.hidden} layers={args.layers} music={args.music} "
              f"text_tokens={args.text_tokens} speech_frames={args.speech_frames} threads={args.threads}")
        print(f"{'batch':>5} {'path':>10} {'seconds':>9} {'tokens/s':>10} {'critiques/s':>12} {'ratio':>7}")
        for batch in sorted({1, args.batch}):
            seconds = {}
            outs = {}
            for cache in (False, True):
                # Best of --repeats for the short cached runs (a shared machine deschedules us at random);
                # one recompute run is long enough for that noise to average out.
                runs = [run(critic, heards[:batch], cache, args) for _ in range(args.repeats if cache else 1)]
                seconds[cache], outs[cache] = min(runs, key=lambda r: r[0])
            agree = [common_prefix(c.text_tokens, r.text_tokens) for c, r in zip(outs[True], outs[False], strict=True)]
            same = [(o.text_tokens, o.audio_tokens.tolist()) for o in outs[True]] == \
                   [(o.text_tokens, o.audio_tokens.tolist()) for o in outs[False]]
            for cache in (False, True):
                s = seconds[cache]
                ratio = seconds[False] / seconds[True] if cache else 1.0
                print(f"{batch:>5} {'cached' if cache else 'recompute':>10} {s:>9.2f} {batch * per_row / s:>10.1f} "
                      f"{batch / s:>12.3f} {ratio:>6.1f}x")
            print(f"      same tokens on both paths: {same}; text tokens equal before the first difference, "
                  f"per clip: {agree}")


if __name__ == "__main__":
    main()
