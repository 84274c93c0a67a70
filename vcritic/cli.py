"""Command line: ``vcritic plugins list``, ``vcritic train [preset] [key=value ...]``, and
``vcritic import`` / ``vcritic export`` between manifests and ms-swift, LLaMA-Factory or Kimi-Audio
fine-tuning files (``vcritic/data/formats.py``)."""

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
    if counts.get("reaction_recordings"):
        print(f"reactions      : {counts['reaction_recordings']} recordings -> {counts['reaction_rows']} rows, "
              f"{counts['reaction_failed']} recordings quarantined")
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


def _add_format_commands(sub) -> None:
    """``import`` and ``export``: their options mirror :class:`vcritic.data.formats.ImportOptions`."""
    from vcritic.data.formats import DEFAULT_PERSONA, FORMATS

    imp = sub.add_parser("import", help="ms-swift / LLaMA-Factory / Kimi-Audio JSONL -> vcritic manifest")
    imp.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    imp.add_argument("input", help="the framework's JSONL (or JSON array) file")
    imp.add_argument("output", help="the manifest to write (.jsonl); rejects go to <stem>.rejects.jsonl beside it")
    imp.add_argument("--source", choices=["human", "mllm"], default=None,
                     help="row source (default: the record's vcritic metadata, else mllm)")
    imp.add_argument("--song-id-from", default=None,
                     help="stem (audio file stem, default), parent (its folder) or a column name")
    imp.add_argument("--id-column", default=None, help="column holding example ids (default: a hash of the record)")
    imp.add_argument("--default-persona", default=DEFAULT_PERSONA, help="persona when a record has no system text")
    imp.add_argument("--language", default="auto",
                     help="BCP-47 tag for every row (default auto: metadata, else detected from the critique)")
    imp.add_argument("--audio-root", default=None, help="base of relative audio paths (default: the input's folder)")
    imp.add_argument("--no-check-files", action="store_true", help="do not reject rows whose audio file is missing")
    imp.add_argument("--dataset-info", default=None, metavar="PATH[:NAME]",
                     help="LLaMA-Factory dataset_info.json (and entry) naming columns and tags")
    exp = sub.add_parser("export", help="vcritic manifest -> ms-swift / LLaMA-Factory / Kimi-Audio JSONL")
    exp.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    exp.add_argument("manifest", help="a vcritic manifest (.jsonl or .parquet)")
    exp.add_argument("output", help="the file to write (.jsonl)")
    exp.add_argument("--no-vcritic-meta", action="store_true",
                     help="leave out the 'vcritic' key that makes a re-import lossless")


def import_main(ns) -> int:
    from pathlib import Path

    from vcritic.data import formats

    try:
        kwargs = dict(source=ns.source, song_id_from=ns.song_id_from, id_column=ns.id_column,
                      default_persona=ns.default_persona, language=ns.language, audio_root=ns.audio_root,
                      check_files=not ns.no_check_files)
        if ns.dataset_info:
            path, _, name = ns.dataset_info.partition(":")
            opts = formats.options_from_dataset_info(formats.load_dataset_info(path, name or None), **kwargs)
        else:
            opts = formats.ImportOptions(**kwargs)
        result = formats.write_import(ns.input, ns.output, ns.fmt, opts)
    except formats.FormatError as exc:
        print(f"vcritic import: {exc}", file=sys.stderr)
        return 2
    print(f"{result.records} records -> {len(result.rows)} rows in {ns.output}; {len(result.rejects)} rejected "
          f"({formats.rejects_path(Path(ns.output))})")
    if result.skipped_turns or result.extra_audios:
        print(f"skipped {result.skipped_turns} assistant turns without a new audio; "
              f"ignored {result.extra_audios} extra audios (only a turn's first audio is the music)")
    for reject in result.rejects[:5]:
        print(f"  {reject.where}: {reject.reason}", file=sys.stderr)
    return 0 if result.rows or not result.records else 1


def export_main(ns) -> int:
    from vcritic.data import formats
    from vcritic.data.schema import RowError

    try:
        n = formats.write_export(ns.manifest, ns.output, ns.fmt, include_meta=not ns.no_vcritic_meta)
    except (formats.FormatError, RowError) as exc:
        print(f"vcritic export: {exc}", file=sys.stderr)
        return 2
    print(f"{n} records written to {ns.output} ({ns.fmt})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vcritic", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    plugins = sub.add_parser("plugins", help="plugin registry")
    plugins.add_argument("action", choices=["list"])
    train = sub.add_parser("train", help="run the training job (same as python jobs/train.py)")
    train.add_argument("args", nargs="*", help="[preset] key=value ...")
    _add_format_commands(sub)
    ns = parser.parse_args(argv)
    if ns.command == "plugins":
        return plugins_list()
    if ns.command in ("import", "export"):
        return import_main(ns) if ns.command == "import" else export_main(ns)
    return train_main(ns.args)


if __name__ == "__main__":
    sys.exit(main())
