"""The ``rlhf`` command line."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="RLHF alignment pipeline: SFT, reward model, PPO and DPO as versioned, validated, tracked stages.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect datasets the pipeline can read.", no_args_is_help=True)
app.add_typer(data_app, name="data")

WORKSPACE = typer.Option(Path("."), "--workspace", "-w", help="Project folder (a git + DVC repo of this project).")


@app.command()
def run(
    workspace: Path = WORKSPACE,
    set_: list[str] = typer.Option([], "--set", "-S", help="Override a parameter, e.g. --set dpo.beta=0.2 (repeatable)."),
    stage: list[str] = typer.Option([], "--stage", help="Run only this stage (repeatable); default: all."),
    push: bool = typer.Option(True, "--push/--no-push", help="Push outputs to the DVC remote at the end."),
    remote: str | None = typer.Option(None, help="DVC remote to push to (default: the repo's default remote)."),
    ref: str | None = typer.Option(None, "--ref", help="Run isolated from this git ref's committed state (as the "
                                      "deployments do) instead of in the workspace; overrides then stay in that run."),
) -> None:
    """Run the whole pipeline as a Prefect flow (embedded defaults: no servers needed).

    Without --ref this is DVC's workspace model: --set values are written into params.yaml (as
    `dvc exp run -S`), so dvc.lock records what ran and they stay for the next run. A failure or
    Ctrl-C ends it with one message saying what is intact and what to do (README: "When things go wrong").
    """
    import os
    import sys
    import time
    from contextlib import ExitStack

    from flows import env_defaults
    from flows.console import INTERRUPTED, REPORTED, fail, prefect_server_lost, quiet_reported_failures, server_lost_message
    from tasks.params import ParamsError, load_params

    started = time.time()  # the compute share is of the whole command, the Prefect server's start included
    root = workspace.resolve()
    try:
        load_params(root / "params.yaml")  # not a workspace: say so before Prefect makes its home in the folder
    except ParamsError as err:
        raise fail(str(err), 2) from None
    lock = ExitStack()
    if not ref:  # DVC's workspace model: one run at a time in the folder (tasks.workspace_lock)
        from tasks.workspace_lock import WorkspaceBusy, workspace_run_lock

        try:
            lock.enter_context(workspace_run_lock(root))
        except WorkspaceBusy as err:
            raise fail(str(err), 2) from None
    with lock:
        env_defaults.apply(root)
        from flows.alignment import alignment_flow
        from flows.prefect_server import temporary_server
        from flows.report import print_run_summary
        from tasks.preflight import preflight
        from tasks.process_groups import stop_orphans
        from tasks.stage_host import hosted
        from tasks.tracking.client import warm_up
        from tasks.workspace import state_dir

        try:
            params = preflight(root, list(set_), push=push, remote=remote)
        except ParamsError as err:
            raise fail(str(err), 2) from None
        quiet_reported_failures()
        kept = f"\n(params.yaml keeps this run's overrides {list(set_)}: `git checkout params.yaml` undoes them)" if set_ and not ref else ""
        try:
            stop_orphans(state_dir(root), echo=typer.echo)  # what a killed run left behind
            # While the Prefect server starts, a thread here imports MLflow and opens its store; the stage host then imports
            # the stages' libraries beside the flow's first steps (all three at once on 2 cores slowed the server's start).
            warming = warm_up(root, params.get("tracking"))
            with temporary_server(state_dir(root), echo=typer.echo), hosted(export=True):
                warming.join()
                result = alignment_flow(workspace=str(root), overrides=list(set_), push=push, remote=remote,
                                        stages=list(stage) or None, ref=ref, started_at=started)
        except KeyboardInterrupt:
            raise fail(INTERRUPTED, 130) from None
        except REPORTED as err:
            raise fail(f"{err}{kept}", 1) from None
        except Exception as err:
            if not prefect_server_lost(err):
                raise
            fail(f"{server_lost_message(err, os.environ.get('PREFECT_API_URL'))}{kept}", 1)
            # Not a normal exit: Prefect would retry each event it still holds for the lost server, ~7 s apiece.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        print_run_summary(result)
        if set_ and not ref:
            typer.echo(f"overrides written to {root / 'params.yaml'} (DVC's workspace model, as `dvc exp run -S`): they stay for "
                       "the next run; `git checkout params.yaml` undoes them, `--ref HEAD` runs isolated instead")


@app.command()
def sync(workspace: Path = WORKSPACE) -> None:
    """Send to MLflow what runs could not log while the tracking server was down (kept under .rlhf/tracking_pending)."""
    from flows import env_defaults
    from flows.console import fail
    from tasks.tracking.client import connect
    from tasks.tracking.outage import TrackingUnavailable, pending_dir, sync_pending

    root = workspace.resolve()
    env_defaults.apply(root)
    store = connect(root, _tracking(root))  # also bounds every request by tracking.timeout_s / max_retries

    def client_for(uri: str):
        from mlflow import MlflowClient

        return store.client if uri == store.uri else MlflowClient(tracking_uri=uri)

    try:
        done = sync_pending(root, client_for)
    except TrackingUnavailable as err:
        raise fail(str(err), 1) from None
    for meta, sent in done:
        typer.echo(f"{meta['name']}: run {meta['run_id']} at {meta['uri']}: {sent} call(s) sent")
    typer.echo(f"nothing waits in {pending_dir(root)}" if not done else "every run is complete in MLflow now")


@app.command("stage")
def stage_cmd(name: str = typer.Argument(..., help="prepare | validate | sft | reward | ppo | dpo | evaluate")) -> None:
    """Run one stage in the current directory (what dvc.yaml's `python -m tasks.<stage>` does)."""
    import importlib

    try:
        module = importlib.import_module(f"tasks.{name}")
    except ModuleNotFoundError:
        typer.secho(f"unknown stage {name!r}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    module.main()


def _tracking(root: Path) -> dict | None:
    from tasks.params import load_params
    from tasks.tracking.client import resolve_tracking_uri

    params_file = root / "params.yaml"
    tracking = (load_params(params_file).get("tracking") if params_file.exists() else None) or {}
    return {**tracking, "uri": resolve_tracking_uri(tracking.get("uri"), root)}


@app.command()
def reproduce(
    run_id: str = typer.Argument(..., help="Parent MLflow run id of a pipeline run (printed by `rlhf run`)."),
    workspace: Path = WORKSPACE,
    recompute: bool = typer.Option(False, "--recompute", help="Recompute every stage instead of pulling outputs."),
    worktree: Path | None = typer.Option(None, help="Where to rebuild (default: a new temporary folder)."),
) -> None:
    """Rebuild a past run from its logged params.yaml, dvc.lock and git commit; report whether it matches."""
    from flows import env_defaults
    from flows.report import print_reproduce_report
    from tasks.reproduce import reproduce as do_reproduce

    root = workspace.resolve()
    env_defaults.apply(root)
    try:
        report = do_reproduce(root, run_id, recompute=recompute, tracking=_tracking(root), worktree=worktree)
    except ValueError as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    print_reproduce_report(report)
    raise typer.Exit(0 if report.matches else 1)


@app.command()
def compare(
    run_ids: list[str] = typer.Argument(None, help="Parent run ids to compare."),
    last: int = typer.Option(2, "--last", "-n", help="Without run ids: the newest N finished pipeline runs."),
    workspace: Path = WORKSPACE,
) -> None:
    """Parameters that differ and key metrics of pipeline runs, read from MLflow."""
    from flows import env_defaults
    from flows.report import print_comparison
    from tasks.compare import compare as do_compare
    from tasks.compare import pipeline_runs

    root = workspace.resolve()
    env_defaults.apply(root)
    runs = pipeline_runs(root, _tracking(root), run_ids=run_ids or None, last=last)
    if len(runs) < 1:
        typer.secho("no finished pipeline runs found (run `rlhf run` first)", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    print_comparison(do_compare(runs))


@app.command()
def status(
    workspace: Path = WORKSPACE,
    last: int = typer.Option(10, "--last", "-n", help="How many recent pipeline runs to list."),
) -> None:
    """The champion in service, and the recent pipeline runs with their promotion decisions."""
    from flows import env_defaults
    from flows.report import print_status
    from tasks.service import service_status

    root = workspace.resolve()
    env_defaults.apply(root)
    print_status(service_status(root, _tracking(root), last=last))


@app.command()
def promote(
    run_id: str = typer.Argument(..., help="Pipeline (parent) run id whose registered policy should serve."),
    force: bool = typer.Option(False, "--force", help="Required: move @champion whatever the evidence (recorded as forced)."),
    workspace: Path = WORKSPACE,
) -> None:
    """Make a run's registered policy the @champion by hand (the pipeline's `promote` stage decides by itself)."""
    from flows import env_defaults
    from tasks.service import force_promote

    if not force:
        typer.secho("promoting by hand overrides the pipeline's criteria: add --force to do it", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    root = workspace.resolve()
    env_defaults.apply(root)
    try:
        new, previous = force_promote(root, _tracking(root), run_id)
    except ValueError as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"@champion -> version {new} (was {previous or 'none'}); recorded as forced")


def _pair(text: str) -> tuple[str, str]:
    old, sep, new = text.partition("=")
    if not sep:
        raise ValueError(f"--column {text!r}: expected OLD=NEW, e.g. --column question=prompt")
    return old.strip(), new.strip()


@data_app.command("inspect")
def data_inspect(
    source: str = typer.Argument(..., help="File, folder, s3:// URI or hub name."),
    kind: str = typer.Option("preference", help="sft | preference | prompt"),
    format: str = typer.Option("auto", "--format", help="Force a format instead of detecting it."),
    rows: int = typer.Option(2, help="Example rows to show."),
    column: list[str] = typer.Option([], "--column", help="OLD=NEW: rename a column first (prepare.<kind>_columns); repeatable."),
) -> None:
    """Read a dataset as `prepare` does: detect its format, normalise and clean it, show what the pipeline would see
    (the rows `prepare.invalid_rows: drop` would set aside, per rule, and example rows it would keep)."""
    from rlhf_core.data.cleaning import clean
    from rlhf_core.data.columns import check_mapping
    from rlhf_core.data.formats import OUTPUT_COLUMNS, DataFormatError
    from rlhf_core.data.loading import DataLoadError
    from rlhf_core.data.rows import read_rows

    try:
        mapping = check_mapping(dict(_pair(c) for c in column), "--column")
        raw = read_rows(source)
        result = clean(raw, kind, format, columns=mapping)
    except (DataFormatError, DataLoadError, ValueError) as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{source}: {len(raw.rows)} rows, columns {raw.columns}" + (f" (renamed: {mapping})" if mapping else ""))
    typer.echo(f"format: {result.format} -> {kind} records with columns {list(OUTPUT_COLUMNS[kind])}")
    typer.echo(result.report())
    ds = result.dataset
    for i in range(min(rows, len(ds))):
        typer.echo(f"--- row {i} ({ds[i]['source_file']} {ds[i]['source_unit']} {ds[i]['source_row']})")
        for col in OUTPUT_COLUMNS[kind]:
            if col != "prompt_messages":
                typer.echo(f"{col}: {str(ds[i][col])[:300]!s}")


if __name__ == "__main__":
    app()
