"""``lorakit run CONFIG``: the whole release pipeline from one YAML run config, in this process.

The CLI is lorakit's composition root, and this is its one upward import: the command imports ``flows`` (Prefect
flows over ``tasks`` over the ``lorakit`` library) lazily inside the function. The library itself never imports
``flows``/``tasks``/Prefect; only this entry point, which exists to run them, does.
"""

from __future__ import annotations

import contextlib
import os

import click

from lorakit.cli.options import compute_dtype_option
from lorakit.errors import EXIT_REJECTED, LorakitError

# An ephemeral Prefect server (SQLite under PREFECT_HOME) starts inside the process when no PREFECT_API_URL is
# set. On a loaded 2-core machine its cold start can exceed Prefect's 20 s default startup timeout.
_PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--route-gpu", is_flag=True, default=None,
              help="Run training and quantization as deployments on the CUDA work pool (overrides route_gpu).")
@click.option("-o", "--output-dir", help="Folder for every stage's output (overrides output_dir).")
@compute_dtype_option(None)
@click.option("--show-config", is_flag=True, help="Print the config with every default filled in, and exit.")
@click.option("--check", is_flag=True,
              help="Check the config and print the plan (each stage, its output folder, whether it exists), and exit.")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress lines, only warnings from Prefect; print only the verdict line.")
def run(config, route_gpu, output_dir, compute_dtype, show_config, check, quiet):
    """Run the release pipeline described by CONFIG (a YAML run config).

    \b
    For each dataset: prep -> train a LoRA adapter; then merge the adapters into the base with the
    configured weights -> quantize (GPTQ/AWQ) -> scorecard (base, each adapter, merged and quantized on
    every task: exact match, perplexity, retention, accuracy drop) -> gate the quantized model against the
    merged full-precision model (perplexity per task, and the scorecard's min_retention and
    max_accuracy_drop on val) -> register every artifact with lineage in the registry. On a passed gate the
    release gets the `candidate` alias (and `production` with auto_promote: true).

    \b
    Examples:
      lorakit run configs/default.yaml          embedded SmolLM2-135M + the bundled tasks (make demo)
      lorakit run my.yaml -o runs/              outputs under runs/
      lorakit run my.yaml --show-config         every key with its default
      lorakit run my.yaml --check               check everything, print the plan, run nothing

    \b
    Before any stage (and before Prefect starts) the whole config is checked in one pass: data files
    and their format, merge weights, group size against the base, every registry name the run creates,
    an explicit calibration size against the data, the devices. All problems are listed at once (exit 2)
    and nothing is written.

    \b
    Runs in this process with an ephemeral Prefect server (no server needed); with PREFECT_API_URL set,
    runs are recorded on that server. Steps whose code, arguments and input files are unchanged are
    taken from Prefect's cache, so a re-run only does what changed. Output folders are described in
    docs/pipeline.md (`lorakit-out/` by default). Exit codes: 0 released, 3 rejected by the gate (artifacts still
    registered, marked gate:failed), 2 bad input, 1 unexpected error.

    \b
    Progress: every stage prints `[mm:ss] <stage>: started` and `... done in 3m12s` (or `cached`) on
    stderr and into the Prefect logs; training, quantization and evaluation report steps/layers, s/step
    and ETA. Third-party INFO logs and banners are hidden unless `lorakit -v run ...`.
    """
    # noqa: the CLI's one upward import (composition root); both modules are Prefect-free
    from flows.config import dump_config, parse_config, read_config_data
    from flows.preflight import check_release, plan_lines

    data = read_config_data(config)
    overrides = {k: v for k, v in {"route_gpu": route_gpu, "output_dir": output_dir,
                                   "compute_dtype": compute_dtype}.items() if v is not None}
    if overrides and isinstance(data, dict):
        data = {**data, **overrides}
    if show_config:
        click.echo(dump_config(parse_config(data, str(config))), nl=False)
        return
    report = check_release(data, str(config))  # every problem at once, before Prefect starts or anything is written
    cfg = report.config
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    if check:
        for line in plan_lines(cfg, report.base_dir):
            click.echo(line)
        return
    from lorakit import progress
    from lorakit.runtime import configure_threads, is_verbose, quiet_third_party_logs

    for key, value in _PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if quiet:
        os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
        progress.configure(console=False)
    elif not is_verbose():
        # Prefect's own INFO lines ("Beginning flow run", "Finished in state Completed()") still reach the
        # Prefect logs; only its console handler is held to warnings. lorakit prints its own stage lines.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    progress.configure(restart_clock=True)
    api = os.environ.get("PREFECT_API_URL")
    progress.emit(f"release {cfg.registry.name}: " + (f"recording on the Prefect server at {api}" if api else
                  "starting a local Prefect server first (25-45 s on a cold start)"))

    configure_threads()
    quiet_third_party_logs()
    _exit_on_sigterm()
    with progress.activity("release"):
        from flows.release import release

        state = release(**cfg.flow_parameters(), return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        if isinstance(result, LorakitError):
            raise result
        raise LorakitError(f"the release run crashed: {type(result).__name__}: {result}", exit_code=1) from result
    if not state.is_completed():
        raise LorakitError(state.message or f"release run ended {state.name}", exit_code=EXIT_REJECTED)
    click.echo(result["summary"])
    if not quiet:
        for role, ref in result["refs"].items():
            click.echo(f"  {role:<20} {ref}")
        click.echo(f"release model: {result['release']} (aliases: {', '.join(result['aliases'])})")


def _exit_on_sigterm() -> None:
    """``kill PID`` (SIGTERM, what schedulers and ``systemctl stop`` send) stops the run and every process it
    started: Prefect's ephemeral API server and the adapters' training processes.

    Why: Prefect's flow engine turns SIGTERM into a crash report, then re-sends the signal to the handler it found.
    The default handler ends the process on the spot, so the server, a child process stopped only by an ``atexit``
    hook, stayed running, orphaned (measured: ``kill`` of a run left its uvicorn process alive). Exiting through
    Python instead waits for the stage threads, i.e. for training to finish. So this handler sends SIGTERM to the
    children itself (uvicorn and training stop on it), then exits at once. Nothing is half-written: every output is
    published atomically, and a re-run takes the finished stages from the cache. Exit status 143 = 128 + SIGTERM,
    as a shell reports it."""
    import signal

    def stop(signum: int, _frame) -> None:
        import sys

        import psutil

        children = psutil.Process().children(recursive=True)
        print(f"lorakit: stopped by signal {signum}; stopping {len(children)} child process(es) (the Prefect server, "
              "training); finished stages are kept and a re-run takes them from the cache", file=sys.stderr, flush=True)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.terminate()
        sys.stdout.flush()
        os._exit(128 + signum)  # now: waiting would let the stage threads report their children's deaths as errors

    signal.signal(signal.SIGTERM, stop)


COMMANDS = [run]
