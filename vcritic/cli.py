"""Command line: ``vcritic plugins list`` and ``vcritic train [preset] [key=value ...]``."""

from __future__ import annotations

import argparse
import sys

from vcritic import registry
from vcritic.config import ConfigError, load


def _split_preset(args: list[str]) -> tuple[str, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return "demo", args


def train_main(args: list[str]) -> int:
    """Run the training job; prints where results went. Returns a process exit code."""
    preset, overrides = _split_preset(args)
    try:
        cfg = load(preset, overrides)
    except ConfigError as exc:
        print(f"vcritic: config error: {exc}", file=sys.stderr)
        return 2
    from vcritic import progress

    # Before the driver's imports, so what libraries log as they load goes to the file too.
    progress.setup_logging(cfg, owner=train_main)
    from vcritic.train.driver import run

    summary = run(cfg)
    counts = summary.prepared.counts
    m = summary.metrics
    print("\n=== vcritic run finished ===")
    print(f"data           : {counts['input']} rows in, {counts['train']} train / {counts['val']} val / {counts.get('test', 0)} test, "
          f"{counts['quarantined']} quarantined, {counts['near_duplicates']} near-duplicates dropped")
    if counts.get("clips_cut"):
        print(f"clips cut      : {counts['clips_cut']} clips longer than the backbone's audio limit were cut "
              f"({summary.prepared.music_seconds_cut:.1f} s of music dropped)")
    print(f"quarantine     : {summary.prepared.quarantine_path}")
    print(f"best checkpoint: {summary.best_checkpoint} (val_loss {summary.best_val_loss:.4f})")
    if "scq_accuracy_after" in m:
        print(f"SCQ accuracy   : {m['scq_accuracy_before']:.3f} before -> {m['scq_accuracy_after']:.3f} after training "
              f"({int(m['scq_questions_after'])} questions)")
    elif getattr(summary, "scq_skipped_reason", None):
        print(f"SCQ accuracy   : skipped ({summary.scq_skipped_reason})")
    print(f"MLflow         : {summary.tracking_uri} experiment={summary.experiment!r} run_id={summary.run_id}")
    if summary.registered_version is not None:
        name, alias = cfg.mlflow.registered_model, cfg.mlflow.alias
        where = f"models:/{name}@{alias}" if summary.promoted else f"models:/{name}/{summary.registered_version}"
        print(f"registered     : {where} (version {summary.registered_version})")
        print(f"promotion      : {summary.promote_reason}")
    print(f"log file       : {progress.log_file()}")
    return 0


def plugins_list() -> int:
    rows = registry.describe_all()
    width = max(len(info.name) for info, _ in rows)
    print(f"{'KIND':<17} {'NAME':<{width}}  {'ORIGIN':<28} STATUS")
    for info, status in rows:
        print(f"{info.kind:<17} {info.name:<{width}}  {info.origin:<28} {status}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vcritic", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    plugins = sub.add_parser("plugins", help="plugin registry")
    plugins.add_argument("action", choices=["list"])
    train = sub.add_parser("train", help="run the training job (same as python jobs/train.py)")
    train.add_argument("args", nargs="*", help="[preset] key=value ...")
    ns = parser.parse_args(argv)
    if ns.command == "plugins":
        return plugins_list()
    return train_main(ns.args)


if __name__ == "__main__":
    sys.exit(main())
