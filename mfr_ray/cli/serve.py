"""`mfr export`, `mfr enrol`, `mfr verify`, `mfr identify` and `mfr serve`: the recogniser in service."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer

DEFAULT_FAR = 1e-3
FAR_HELP = "False accept rate of the decision: one of the FARs the package was exported with."
FPIR_HELP = ("Decide at this per-search false-positive identification rate instead (share of people never "
             "enrolled answered match; the package needs --search-calibration).")
# Exit status of verify/identify when no decision could be made (no face, unreadable image).
NO_DECISION_EXIT = 3
RUNTIME_HELP = "What runs the network: openvino | onnxruntime | torch (default: the package's choice)."


def _read_image(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        typer.secho(f"cannot read {path}: {exc.strerror or exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _package_or_exit(uri: str, runtime: str | None = None):
    from mfr_ray.serve.package import PackageError, load_package

    try:
        return load_package(uri).use_runtime(runtime)
    except (PackageError, ValueError) as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _describe_images(images) -> str:
    return ", ".join(f"{i.status} ({i.align_method}" + (f", mask p={i.mask_probability:.2f}"
                                                         if i.mask_probability is not None else "") + ")"
                     for i in images)


def _kind(result) -> str:
    if getattr(result, "fpir", None) is not None:
        return f"{result.comparison_kind.removeprefix('search-')} probes"
    return f"{result.comparison_kind} pairs" + ("" if result.kind_calibrated else " (not calibrated: strictest used)")


def _answer(decide, as_json: bool, describe) -> None:
    """Run one decision and print it (JSON, "no decision: why", or `describe(result)`); a package error
    exits 2, an image without a face exits 3."""
    from mfr_ray.serve.package import PackageError
    from mfr_ray.serve.recognise import NO_DECISION

    try:
        result = decide()
    except PackageError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(asdict(result), indent=2))
    elif result.decision == NO_DECISION:
        typer.echo(f"no decision: {result.reason}")
    else:
        typer.echo(describe(result))
    if result.decision == NO_DECISION:
        raise typer.Exit(NO_DECISION_EXIT)


def _add_search_calibration(package: str, folder: Path, per_identity: int) -> None:
    from mfr_ray.serve.search_calibration import add_search_calibration, summary

    if not folder.is_dir():
        raise ValueError(f"--search-calibration {folder}: not a folder of <identity>/<photo> files")
    found = summary(add_search_calibration(package, folder, per_identity))
    typer.echo(f"  search calibration: {found['faces']} never-enrolled faces ({found['masked']} masked or unsure, "
               f"{found['bare']} bare or unsure) from {folder}")


def _print_export(result, register_name: str | None) -> None:
    """What `mfr export` wrote: the thresholds per FAR and kind, and where it logged or registered them."""
    typer.echo(f"package: {result.path}")
    for p in result.operating_points:
        flag = "" if p.resolvable else f"  NOT RESOLVABLE ({p.n_impostor} impostor pairs < 1/FAR)"
        typer.echo(f"  FAR {p.far_target:g}: threshold {p.threshold:.4f}  measured FAR {p.far:.5f}  "
                   f"TPR {p.tpr * 100:.2f}%  ({p.n_impostor} impostor pairs){flag}")
    for kind, entry in list(result.kinds.items())[1:]:
        typer.echo(f"  {kind} ({', '.join(entry['variants'])}): " + ", ".join(
            f"FAR {p['far_target']:g} threshold {p['threshold']:.4f}" for p in entry["operating_points"]))
    if result.operating_points and len(result.kinds) <= 1:
        typer.echo("  masked comparisons not calibrated (the evaluation had no masked variants): a masked face "
                   "is judged by the strictest threshold")
    if not result.operating_points:
        typer.echo("  no thresholds (no --eval-run): verify/identify need a calibrated package")
    if result.run_id:
        typer.echo(f"mlflow run: {result.run_id} (artifacts package/)")
    if result.model_version:
        typer.echo(f"registered: models:/{register_name}/{result.model_version}")


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        source: str = typer.Argument(..., help="Checkpoint file, models:/NAME/VERSION, or an MLflow run id "
                                     "(a training run, or an evaluation run: then it also calibrates)."),
        out: Path = typer.Argument(..., help="Package folder to write."),
        eval_run: str = typer.Option(None, "--eval-run", help="MLflow evaluation run whose pairs calibrate the "
                                     "thresholds (it must have evaluated these weights)."),
        far: list[float] = typer.Option(None, "--far", help="FARs to calibrate at (repeat; default 1e-2 1e-3 1e-4)."),
        backbone: str = typer.Option("mobilefacenet", "--backbone", help="Backbone of a checkpoint file."),
        register_name: str = typer.Option(None, "--register", help="Also register the package as a new version "
                                          "of this MLflow model."),
        tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow store (default: env / ./mlflow.db)."),
        no_mlflow: bool = typer.Option(False, "--no-mlflow", help="Write the folder only, log nothing."),
        runtime: str = typer.Option(None, "--runtime", help="Runtime the package runs on: openvino | onnxruntime "
                                    "| torch (default: the fastest measured, mfr_ray.runtime.DEFAULT_RUNTIME)."),
        search_calibration: Path = typer.Option(None, "--search-calibration", help="Folder of <identity>/<photo> "
                                                "of people nobody will enrol (e.g. celeba299): their faces, bare "
                                                "and masked, calibrate per-search rates (/identify?fpir=)."),
        search_per_identity: int = typer.Option(1, "--search-per-identity", min=1, help="Photos per identity "
                                                "of --search-calibration."),
    ) -> None:
        """A model package: plain weights, preprocessing, thresholds at FARs, model card; logged to MLflow."""
        from mfr_ray.config.common import TrackingConfig
        from mfr_ray.serve.export import export_package
        from mfr_ray.serve.package import DEFAULT_FARS, PackageError

        try:
            result = export_package(
                source, out, eval_run=eval_run, fars=tuple(far or DEFAULT_FARS), backbone=backbone,
                tracking=TrackingConfig(tracking_uri=tracking_uri, enabled=not no_mlflow),
                register_name=register_name, runtime=runtime,
            )
            if search_calibration is not None:
                _add_search_calibration(result.path, search_calibration, search_per_identity)
        except (PackageError, ValueError) as exc:
            typer.secho(str(exc), fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        _print_export(result, register_name)

    @app.command("enrol")
    def enrol(
        package: str = typer.Argument(..., help="Package folder or URI (mfr export)."),
        root: str = typer.Argument(..., help="Folder or s3:// prefix of <identity>/<image> files."),
        out: str = typer.Option(..., "--out", help="Gallery folder or s3:// prefix (created if missing)."),
        actors: int = typer.Option(1, "--actors", min=1, help="Ray Data actors, each holding the package."),
        batch_size: int = typer.Option(16, "--batch-size", min=1),
        synthetic_masks: int = typer.Option(0, "--synthetic-masks", min=0, max=16, help="Also enrol this many "
                                            "masked copies of each photo (seeded) as synthetic:<type> templates."),
        runtime: str = typer.Option(None, "--runtime", help=RUNTIME_HELP),
    ) -> None:
        """Embed new <identity>/<image> files into a Parquet gallery; every file a row with a status."""
        from mfr_ray.serve.audit import AuditLog, default_audit_path
        from mfr_ray.serve.enrolment import enrol as run_enrol
        from mfr_ray.serve.package import PackageError
        from mfr_ray.serve.synthetic import SyntheticMasks

        try:
            summary = run_enrol(package, root, out, num_actors=actors, batch_size=batch_size,
                                synthetic=SyntheticMasks(count=synthetic_masks), runtime=runtime)
        except (PackageError, ValueError) as exc:
            typer.secho(str(exc), fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        audit = AuditLog(default_audit_path(out), echo=False)
        for identity in summary.identities_added:
            audit.record("enrol", key_id="cli", identity=identity, decision="ok")
        if audit.path and summary.identities_added:
            typer.echo(f"audit: {len(summary.identities_added)} enrol events appended to {audit.path}")
        if summary.files != summary.rows_written + summary.already_enrolled:
            raise typer.Exit(1)

    @app.command("unenrol")
    def unenrol(
        identity: str = typer.Argument(..., help="Identity (folder name) to remove."),
        gallery: str = typer.Option(..., "--gallery", help="Gallery folder or s3:// prefix."),
    ) -> None:
        """Remove every template and row of one identity from a gallery."""
        from mfr_ray.serve.audit import AuditLog, default_audit_path
        from mfr_ray.serve.gallery import Gallery
        from mfr_ray.serve.package import PackageError

        try:
            removed = Gallery(gallery).remove(identity)
        except PackageError as exc:
            typer.secho(str(exc), fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        AuditLog(default_audit_path(gallery), echo=False).record("unenrol", key_id="cli", identity=identity,
                                                     decision="removed" if removed else "absent", rows=removed)
        typer.echo(f"removed {removed} rows of {identity!r} from {gallery}; a running `mfr serve` on this "
                   "gallery stops returning them within its --gallery-poll-s (2 s by default)")
        if not removed:
            raise typer.Exit(1)

    @app.command("verify")
    def verify(
        image_a: Path = typer.Argument(..., help="First image file."),
        image_b: Path = typer.Argument(..., help="Second image file."),
        package: str = typer.Option(..., "--package", help="Package folder or URI (mfr export)."),
        far: float = typer.Option(DEFAULT_FAR, "--far", help=FAR_HELP),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
        runtime: str = typer.Option(None, "--runtime", help=RUNTIME_HELP),
    ) -> None:
        """Same person? Decision at a FAR, score, threshold, alignment; exit 3 if an image has no face."""
        from mfr_ray.serve.recognise import verify as run_verify

        model = _package_or_exit(package, runtime)
        a, b = _read_image(image_a), _read_image(image_b)
        _answer(lambda: run_verify(model, a, b, far), as_json, lambda result: (
            f"{result.decision}: score {result.score:.4f} vs threshold {result.threshold:.4f} at "
            f"FAR {far:g} for {_kind(result)}"
            f"{'' if result.far_resolvable else ' (FAR not resolvable by the calibration set)'}"
            f"; alignment {_describe_images(result.images)}"))

    @app.command("identify")
    def identify(
        image: Path = typer.Argument(..., help="Probe image file."),
        gallery: str = typer.Option(..., "--gallery", help="Gallery folder or s3:// prefix (mfr enrol)."),
        package: str = typer.Option(None, "--package", help="Package (default: the one the gallery was made with)."),
        far: float = typer.Option(DEFAULT_FAR, "--far", help=FAR_HELP),
        fpir: float = typer.Option(None, "--fpir", min=0, max=1, help=FPIR_HELP),
        k: int = typer.Option(5, "--k", min=1, help="Candidates to list."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
        runtime: str = typer.Option(None, "--runtime", help=RUNTIME_HELP),
    ) -> None:
        """Who is this? Best identity above the FAR's threshold, else unknown; exit 3 if no face."""
        from mfr_ray.serve.gallery import Gallery
        from mfr_ray.serve.recognise import identify as run_identify

        opened = Gallery(gallery)
        if not opened.manifest:
            typer.secho(f"{gallery} is not a gallery (no gallery.json): make one with `mfr enrol`",
                        fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
        model = _package_or_exit(package or opened.package_uri, runtime)
        probe = _read_image(image)

        def describe(result) -> str:
            head = result.identity if result.identity else f"unknown ({result.reason})"
            rate = f"FAR {far:g}" if fpir is None else f"FPIR {fpir:g} per search, {result.gallery_identities} identities"
            lines = [(f"{head}: threshold {result.threshold:.4f} at {rate} for {_kind(result)}; alignment "
                      f"{result.image.status} ({result.image.align_method})")]
            return "\n".join(lines + [f"  {c.score:.4f}  {c.identity}  ({c.source_key})" for c in result.candidates])

        _answer(lambda: run_identify(model, opened, probe, far, k, fpir), as_json, describe)

    @app.command("serve")
    def serve(
        package: str = typer.Argument(..., help="Package folder or URI (mfr export)."),
        gallery: str = typer.Option(..., "--gallery", help="Gallery folder or s3:// prefix (created if missing)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Bind address (anything but loopback needs a key)."),
        port: int = typer.Option(8000, "--port"),
        api_key_file: str = typer.Option(None, "--api-key-file", help="File holding the API key (else "
                                         "$MFR_SERVE_API_KEY_FILE / $MFR_SERVE_API_KEY)."),
        far: float = typer.Option(DEFAULT_FAR, "--far", help="Default FAR of decisions (one the package has)."),
        fpir: float = typer.Option(None, "--fpir", min=0, max=1, help="Default per-search rate of /identify "
                                   "(the package needs --search-calibration); /verify stays per comparison."),
        replicas: int = typer.Option(1, "--replicas", min=1, help="Embedder replicas (without autoscaling)."),
        autoscale_max: int = typer.Option(None, "--autoscale-max", min=1, help="Autoscale the embedder up to "
                                          "this many replicas."),
        no_batching: bool = typer.Option(False, "--no-batching", help="One forward pass per request."),
        max_batch_size: int = typer.Option(8, "--max-batch-size", min=1),
        batch_wait_ms: float = typer.Option(0.0, "--batch-wait-ms", min=0, help="How long a pass that "
                                            "starts on an idle network waits for company (under load batches "
                                            "fill while a pass runs)."),
        torch_threads: int = typer.Option(1, "--torch-threads", min=1, help="Threads of each embedder replica."),
        enrol_key_file: str = typer.Option(None, "--enrol-key-file", help="File holding the key /enrol "
                                           "requires (else $MFR_SERVE_ENROL_KEY_FILE); without one /enrol is off."),
        tls_certfile: str = typer.Option(None, "--tls-certfile", help="HTTPS certificate (PEM)."),
        tls_keyfile: str = typer.Option(None, "--tls-keyfile", help="HTTPS private key (PEM)."),
        behind_tls_proxy: bool = typer.Option(False, "--behind-tls-proxy", help="A TLS-terminating proxy is in "
                                              "front: allow plain HTTP on a non-loopback bind."),
        audit_log: str = typer.Option("default", "--audit-log", help="Audit file (JSON lines); default "
                                      "<gallery>/audit.jsonl for a local gallery."),
        gallery_poll_s: float = typer.Option(2.0, "--gallery-poll-s", help="How stale an answer may be after "
                                             "`mfr unenrol` / `mfr enrol` change the gallery outside the service."),
        synthetic_masks: int = typer.Option(0, "--synthetic-masks", min=0, max=16, help="Masked copies of each "
                                            "/enrol photo stored as synthetic:<type> templates."),
        runtime: str = typer.Option(None, "--runtime", help=RUNTIME_HELP),
    ) -> None:
        """The Ray Serve application: /verify, /identify, /enrol, /healthz."""
        from mfr_ray.config.base import ConfigError
        from mfr_ray.serve.app import run

        batching = {"enabled": not no_batching, "max_batch_size": max_batch_size,
                    "wait_timeout_s": batch_wait_ms / 1000}
        autoscaling = {"min_replicas": 1, "max_replicas": autoscale_max} if autoscale_max else None
        tls = {"certfile": tls_certfile, "keyfile": tls_keyfile} if tls_certfile or tls_keyfile else None
        try:
            run(package=package, gallery=gallery, host=host, port=port, api_key_file=api_key_file, far=far, fpir=fpir,
                num_replicas=replicas, autoscaling=autoscaling, batching=batching, torch_threads=torch_threads,
                enrol_key_file=enrol_key_file, tls=tls, behind_tls_proxy=behind_tls_proxy, audit_log=audit_log,
                gallery_poll_s=gallery_poll_s, synthetic_masks={"count": synthetic_masks}, runtime=runtime)
        except (ConfigError, ValueError) as exc:
            typer.secho(str(exc), fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
