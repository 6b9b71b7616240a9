"""The `appliance` command."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def _up(args) -> None:
    from appliance import entrypoint

    entrypoint.up()


def _run(args) -> None:
    from appliance import orphans, programs, runtime, secrets, supervise

    parent = int(os.environ.get("APPLIANCE_SUPERVISOR_PID") or 0) or None  # set by `appliance up`
    supervise.tie_to(parent)
    settings = runtime.load()
    lock = orphans.hold_programs_lock(settings.run_dir)  # inherited by the child: orphans can be found later
    argv, env = programs.command(args.name, settings)
    raise SystemExit(supervise.run_prefixed(args.name, argv, env, secrets.secret_values(settings),
                                            keep_fds=(lock,), parent=parent))


def _bootstrap(args) -> None:
    from appliance import bootstrap, runtime
    from appliance.gcs import GcsError
    from appliance.template import TemplateError

    settings = runtime.load()
    runtime.setup_logging(settings)
    try:
        bootstrap.run(settings)
    except (TemplateError, GcsError) as error:
        # A configuration problem: retrying cannot help, so exit 2, which supervisord accepts without a restart.
        print(f"bootstrap failed: {error}", flush=True)
        raise SystemExit(2) from None
    except TimeoutError as error:
        print(f"bootstrap failed: {error}", flush=True)
        raise SystemExit(1) from None


TRAINER_NICENESS = 10  # the trainer and its training runs yield the CPU to clicks, Label Studio and start-up


def _trainer(args) -> None:
    from appliance import runtime
    from appliance.trainer import service

    os.nice(TRAINER_NICENESS)
    settings = runtime.load()
    runtime.setup_logging(settings)
    service.serve(settings)


def _train(args) -> None:
    from appliance import runtime
    from appliance.shared.run_requests import request_run

    settings = runtime.load()
    request_run(settings, "manual (appliance train)")
    print("training requested: the trainer starts within seconds; follow it with `appliance status`")


def _status(args) -> None:
    from appliance import runtime, status

    raise SystemExit(status.main(runtime.load(), as_json=args.json))


def _model(args) -> None:
    from appliance import runtime
    from appliance.models.registry import UnknownVersionError
    from appliance.shared.registry import open_registry

    settings = runtime.load()
    registry = open_registry(settings)
    if args.action == "import":
        from appliance.models.detection.pretrained import import_pretrained, resolve_classes

        try:
            version = import_pretrained(Path(args.weights), registry, resolve_classes(args.classes),
                                        args.arch or settings.train_arch)
        except (OSError, ValueError, RuntimeError) as error:
            raise SystemExit(f"error: {error}") from None
        print(f"published {args.weights} as {version}")
        return
    if args.action == "use":
        try:
            info = registry.use(args.version)
        except UnknownVersionError as error:
            raise SystemExit(f"error: {error}") from None
        print(f"current -> {info.version}; the prediction backend swaps to it within seconds")
        return
    versions = registry.list()
    if not versions:
        print("no model versions yet: the trainer publishes one after enough annotations")
    for info in versions:
        print(f"{'*' if info.is_current else ' '} {info.version}  {info.created:%Y-%m-%d %H:%M}  "
              f"{_version_figures(info.metrics)}")


def _version_figures(metrics: dict) -> str:
    """What a version saves on held-out, its thresholds and its plain figures (AP, image counts)."""
    from appliance.models.detection.cost import saving

    plain = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                      if isinstance(v, (int, float, str)) and k != "journal_until")
    thresholds = metrics.get("thresholds")
    data = (f"trained on {metrics['train_images']} images ({metrics.get('train_objects', '?')} objects), held out "
            f"{metrics.get('holdout_images', '?')}") if "train_images" in metrics else None
    parts = [saving(metrics), data, f"thresholds {json.dumps(thresholds)}" if thresholds else None, plain]
    return "; ".join(p for p in parts if p)


def _predict(args) -> None:
    from appliance import runtime
    from appliance.labelstudio import bulk_predict

    settings = runtime.load()
    try:
        summary = bulk_predict.predict_all(settings, batch=args.batch)
    except bulk_predict.BulkError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"{summary.predicted} task(s) pre-annotated with {summary.version} in {summary.seconds:.1f} s "
          f"({summary.tasks_per_second:.2f}/s); {summary.skipped} already had it; {len(summary.failed)} failed")
    _print_failed(summary.failed)


def _print_failed(failed: list[str], most: int = 20) -> None:
    for line in failed[:most]:
        print(f"  failed: {line}")


def _import(args) -> None:
    from appliance import manifest, runtime

    settings = runtime.load()
    try:
        summary = manifest.import_manifest(settings, args.manifest, batch=args.batch)
    except manifest.ManifestError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"{summary.created} task(s) created from {summary.rows} manifest row(s) in {summary.seconds:.1f} s; "
          f"{summary.skipped} already in the project")
    for line in summary.warnings:
        print(f"  warning: {line}")


def _gcs(args) -> None:
    from appliance import gcs, runtime

    try:
        names = gcs.configure_cors(runtime.load())
    except gcs.GcsError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"CORS rule set on {', '.join(names)}: {gcs.CORS_RULE}")


def _credentials(args) -> None:
    from appliance import runtime
    from appliance.accounts import SECRET_PREFIX
    from appliance.secrets import read_secrets_file

    settings = runtime.load()
    print(f"url:      http://localhost:{settings.port}\nlogin:    {settings.username}\n"
          f"password: {settings.secret('password')}\napi key:  {settings.secret('api_key')}")
    stored = read_secrets_file(settings.secrets_file)
    for email in settings.annotators:
        if SECRET_PREFIX + email in stored:
            print(f"annotator {email}: password {stored[SECRET_PREFIX + email]}")


def _users(args) -> None:
    from appliance import accounts, runtime
    from appliance.settings import check_email

    settings = runtime.load()
    try:
        if args.action == "add":
            password = accounts.add(settings, check_email(args.email), args.name or "")
            if password is None:
                raise SystemExit(f"error: {args.email} has an account already (its password is unchanged)")
            print(f"account {args.email.lower()} created in the project's organization\npassword: {password}\n"
                  f"(shown once: give it to the annotator, who can change it under Account & Settings)")
            return
        for user in accounts.listing(settings):
            role = "admin" if user["admin"] else "annotator"
            print(f"{user['email']:<40} {role:<9} {'active' if user['active'] else 'inactive':<8} "
                  f"{user['annotations']:>6} annotations  last seen {user['last_activity'] or 'never'}")
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f"error: {error}") from None


def _export_onnx(args) -> None:
    from appliance.models.sam import prompt_decoder
    from appliance.models.sam.engine import SamEngine
    from appliance.models.sam.onnx_encoder import INSTALLED_DIR, cache_path, export

    engine = SamEngine(device="cpu")  # the bundled MobileSAM
    folder = Path(args.output) if args.output else INSTALLED_DIR
    path = cache_path(folder, engine.checkpoint, engine.model_type)
    print(path if path.is_file() else export(engine.model.image_encoder, engine.image_size, path))
    path = cache_path(folder, engine.checkpoint, engine.model_type, prompt_decoder.PART)
    print(path if path.is_file() else prompt_decoder.export(engine.model, path))


def _export(args) -> None:
    from appliance import runtime
    from appliance.export.run import export
    from appliance.export.source import ExportError
    from appliance.gcs import GcsError
    from appliance.labelstudio.client import StudioError

    try:
        summary = export(runtime.load(), args.format, args.output, version=args.version,
                         include_images=args.include_images, with_predictions=args.with_predictions)
    except (ExportError, GcsError, StudioError, OSError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"exported {summary.images} image(s), {summary.objects} object(s) of {summary.source} as {summary.format} "
          f"to {summary.output} in {summary.seconds:.1f} s; {len(summary.failed)} failed")
    _print_failed(summary.failed)


def _build_template(args) -> None:
    from appliance import studio

    studio.build_template(Path(args.output), dict(os.environ))
    print(f"migrated Label Studio database template written to {args.output}")


def _backup(args) -> None:
    from appliance import backup

    backup.backup_command(args.output)


def _restore(args) -> None:
    from appliance import backup

    backup.restore_command(args.archive, force=args.force)


def _config(args) -> None:
    from appliance.settings import env_table

    print(env_table())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appliance", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start everything under supervisord (the container entrypoint)").set_defaults(func=_up)
    sub.add_parser("demo", help="the offline demo: `up` on the embedded defaults").set_defaults(func=_up)
    run = sub.add_parser("run", help="run one supervised program (used by supervisord)")
    run.add_argument("name", choices=["studio", "sam", "predict", "train", "bootstrap"])
    run.set_defaults(func=_run)
    sub.add_parser("bootstrap", help="converge project, storage and ML connections").set_defaults(func=_bootstrap)
    sub.add_parser("trainer", help="the trainer process").set_defaults(func=_trainer)
    sub.add_parser("train", help="ask the trainer for a run now").set_defaults(func=_train)
    st = sub.add_parser("status", help="processes, project, ML connections, serving model")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)
    model = sub.add_parser("model", help="list model versions or roll back to one")
    model_sub = model.add_subparsers(dest="action", required=True)
    model_sub.add_parser("list", help="versions with their metrics; * marks the serving one")
    use = model_sub.add_parser("use", help="make VERSION the serving model (rollback)")
    use.add_argument("version")
    imp = model_sub.add_parser("import", help="publish pretrained MMDetection weights as a version")
    imp.add_argument("--weights", required=True, help="a .pth checkpoint (e.g. a COCO-pretrained RTMDet-Ins)")
    imp.add_argument("--classes", default="coco", help="coco, or a comma list of class names")
    imp.add_argument("--arch", default=None, help="rtmdet-ins-tiny (default), rtmdet-ins-s, mask-rcnn-r50")
    model.set_defaults(func=_model)
    pred = sub.add_parser("predict", help="pre-annotate every task with the serving model (resumable)")
    pred.add_argument("--all", action="store_true", required=True, help="every task of the project")
    pred.add_argument("--batch", type=int, default=None, help="tasks per backend call")
    pred.set_defaults(func=_predict)
    imp = sub.add_parser("import", help="create tasks from a CSV or JSON manifest (no duplicates on re-run)")
    imp.add_argument("--manifest", required=True, help="a local file or gs://bucket/path (.csv or .json)")
    imp.add_argument("--batch", type=int, default=500, help="tasks per import request")
    imp.set_defaults(func=_import)
    gcs = sub.add_parser("gcs", help="Google Cloud Storage setup")
    gcs.add_subparsers(dest="action", required=True).add_parser(
        "cors", help="let browsers load images from the source and target buckets (one-time)")
    gcs.set_defaults(func=_gcs)
    users = sub.add_parser("users", help="annotator accounts (sign-up stays closed)")
    users_sub = users.add_subparsers(dest="action", required=True)
    add = users_sub.add_parser("add", help="create an account with a generated password (printed once)")
    add.add_argument("email")
    add.add_argument("--name", help="the annotator's name, e.g. \"Ana Silva\"")
    users_sub.add_parser("list", help="every account: role, annotations, last activity")
    users.set_defaults(func=_users)
    sub.add_parser("credentials", help="print the admin login, password and API key").set_defaults(func=_credentials)
    ex = sub.add_parser("export", help="write the labels for training: COCO, YOLO-seg, mask PNGs or Label Studio JSON")
    ex.add_argument("--format", required=True, choices=["coco", "yolo-seg", "masks", "label-studio"])
    ex.add_argument("--output", required=True, help="a new folder, or gs://bucket/prefix")
    ex.add_argument("--version", help="the exact training and held-out sets of model version vNNNN")
    ex.add_argument("--include-images", action="store_true", help="copy the images too (images/)")
    group = ex.add_mutually_exclusive_group()
    group.add_argument("--only-submitted", action="store_true", default=True,
                       help="tasks with a submitted annotation (the default)")
    group.add_argument("--with-predictions", action="store_true",
                       help="also tasks with only a prediction (the newest one is exported)")
    ex.set_defaults(func=_export)
    bt = sub.add_parser("build-template", help="migrate an empty Label Studio database (install time)")
    bt.add_argument("--output", required=True)
    bt.set_defaults(func=_build_template)
    ox = sub.add_parser("export-onnx", help="export the bundled SAM encoder and prompt decoder to ONNX (install time)")
    ox.add_argument("--output", help="folder (default: inside this Python environment, where the SAM backend looks)")
    ox.set_defaults(func=_export_onnx)
    sub.add_parser("config", help="print the environment variables as a Markdown table").set_defaults(func=_config)
    bk = sub.add_parser("backup", help="write a consistent .tar.gz of the data volume (while running is fine)")
    bk.add_argument("--output", required=True, help="the archive to write, e.g. backup.tar.gz (mode 0600)")
    bk.set_defaults(func=_backup)
    rs = sub.add_parser("restore", help="unpack a backup into the data dir (the appliance must be stopped)")
    rs.add_argument("archive", help="a .tar.gz written by `appliance backup`")
    rs.add_argument("--force", action="store_true", help="replace the content of a non-empty data dir")
    rs.set_defaults(func=_restore)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.func(args)
