"""The `meliad` command line.

Importing this module does not import Keras: `meliad run` must set KERAS_BACKEND before the first
Keras import, and plugins (which may import Keras) are only loaded when a command needs them.
Bad input of any kind ends with exactly one line on stderr, prefixed `meliad: error: `, and exit
status 2. A fault (full disk, read-only folder, out of memory, a workdir in use or damaged) ends the
same way with exit status 1, and so does an unexpected error, as "internal error". `--debug` (or
MELIAD_DEBUG=1) prints the full traceback before that line. Python warnings are printed as one
`meliad: warning: ` line each.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Sequence

import click
import yaml

from meliad_core import plugins
from meliad_core.config import RecipeError
from meliad_core.units import one_line

BACKENDS = ("jax", "torch", "tensorflow")
# backend -> (module that must be importable, human name)
FRAMEWORKS = {"jax": ("jax", "JAX"), "torch": ("torch", "PyTorch"), "tensorflow": ("tensorflow", "TensorFlow")}

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
ERROR_PREFIX = "meliad: error: "
DEBUG_ENV = "MELIAD_DEBUG"  # set (not 0): errors show their full traceback, as --debug does
MAX_LINE = 2000  # characters of an error line; longer messages are cut
_DEBUG = [False]  # --debug or $MELIAD_DEBUG, for this invocation
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", None)  # click >= 8.2


class BadInput(click.ClickException):
    """A problem with what the user asked for: one line, exit status 2."""

    exit_code = EXIT_BAD_INPUT


class MeliadGroup(click.Group):
    """A command group that adds plugin commands only when they are needed.

    Loading plugins imports their modules (and maybe Keras), so the built-in commands are found
    without it; plugin commands are added when an unknown command is asked for or all are listed.
    A plugin may not replace a built-in command (the plugin manager keeps the original).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plugin_commands_added = False

    def add_plugin_commands(self) -> None:
        if self._plugin_commands_added:
            return
        self._plugin_commands_added = True
        default_backend()
        plugins.get_plugin_manager().add_commands(self)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            self.add_plugin_commands()
            command = super().get_command(ctx, cmd_name)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.add_plugin_commands()
        return super().list_commands(ctx)


@click.group(cls=MeliadGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="meliad", prog_name="meliad")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=lambda c, p, v: _set_debug(c, p, v),
              help="On an error, show the full traceback (also: MELIAD_DEBUG=1).")
def cli() -> None:
    """Long-context transformers (meliad) on every Keras 3 backend."""


def _set_option() -> Any:
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help="Override a recipe key (dotted), value parsed as YAML. Repeatable.")


def installed_backends() -> list[str]:
    """The Keras backends whose framework can be imported here."""
    return [b for b in BACKENDS if importlib.util.find_spec(FRAMEWORKS[b][0]) is not None]


def default_backend() -> str | None:
    """$KERAS_BACKEND, or else the first installed backend, exported so plugins import Keras on it.

    Keras on its own would fall back to TensorFlow, which may not be installed; commands other than
    `run` (which needs an explicit choice) use this before loading plugins.
    """
    backend = os.environ.get("KERAS_BACKEND") or None
    if backend is None and "keras" not in sys.modules:
        installed = installed_backends()
        if installed:
            backend = os.environ["KERAS_BACKEND"] = installed[0]
    return backend


def _require_framework(backend: str) -> None:
    module, human = FRAMEWORKS[backend]
    if importlib.util.find_spec(module) is None:
        raise BadInput(f"--backend {backend} needs {human}, which is not installed; "
                       f'install it with: pip install "meliad[{backend}]"')


def _keras_backend_mismatch(backend: str) -> str | None:
    keras = sys.modules.get("keras")
    if keras is None:
        return None
    try:
        current = keras.backend.backend()
    except Exception:  # a half-imported keras: nothing sensible to compare
        return None
    return current if current != backend else None


def use_backend(backend: str) -> None:
    """Makes `backend` the Keras backend of this process (before anything imports Keras), or BadInput."""
    os.environ["KERAS_BACKEND"] = backend
    _require_framework(backend)
    mismatch = _keras_backend_mismatch(backend)
    if mismatch:
        raise BadInput(f"--backend {backend}: Keras was already imported with the {mismatch} backend")
    from meliad_core.threads import configure_threads

    configure_threads(backend=backend)  # before the framework starts its thread pools (what it can't set, it skips)


def _debug_option() -> Any:
    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                        help=f"On an error, show the full traceback (also: {DEBUG_ENV}=1).")


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        _DEBUG[0] = True


@cli.command()
@click.argument("recipe")
@click.option("--backend", type=click.Choice(BACKENDS), envvar="KERAS_BACKEND", required=True,
              help="Keras backend to run on (default: $KERAS_BACKEND).")
@click.option("--workdir", default=None, metavar="DIR",
              help="Where checkpoints and reports go (default: runs/<recipe name>, or RECIPE itself when it is "
                   "a run's workdir).")
@click.option("--load-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A run folder whose latest checkpoint's weights a new run starts from.")
@click.option("--extend", type=click.IntRange(min=1), default=None, metavar="STEPS",
              help="Continue the workdir's run for STEPS more steps than its train.steps (like "
                   "--set train.steps=N; the learning-rate schedule keeps its length).")
@click.option("--restart", is_flag=True,
              help="Move the workdir's previous run (checkpoints, metrics, report) into previous_<time>/ and "
                   "start again from step 0.")
@click.option("--devices", default=None, metavar="N|all",
              help="Data-parallel training over N (or all) JAX devices, each taking whole batch rows and their "
                   "state (the recipe's distribution section; jax backend only).")
@click.option("--coordinator", default=None, metavar="HOST:PORT",
              help="Multi-host: process 0's address (jax.distributed); with --num-processes and --process-id.")
@click.option("--num-processes", type=click.IntRange(min=1), default=None, metavar="P",
              help="Multi-host: how many processes (one per host) take part.")
@click.option("--process-id", type=click.IntRange(min=0), default=None, metavar="I",
              help="Multi-host: this process's number, 0 to P-1 (0 logs and writes checkpoints).")
@click.option("--multihost", is_flag=True,
              help="Multi-host, the cluster found by JAX (Cloud TPU pod slices, SLURM, Open MPI) or given by "
                   "KERAS_DISTRIBUTION_JOB_ADDRESSES, _NUM_PROCESSES and _PROCESS_ID.")
@_set_option()
@_debug_option()
def run(recipe: str, backend: str, workdir: str | None, load_dir: Path | None, extend: int | None, restart: bool,
        devices: str | None, coordinator: str | None, num_processes: int | None, process_id: int | None,
        multihost: bool, overrides: tuple[str, ...]) -> None:
    """Train and evaluate RECIPE (a file, a bundled recipe name, or a run's workdir to continue).

    A workdir that holds a checkpoint is resumed; with a larger train.steps (or --extend) its run
    continues to more steps.
    """
    if workdir is not None and not workdir.strip():
        raise BadInput("--workdir: got '', expected a folder for the run's files")
    hosts = _multihost(coordinator, num_processes, process_id, multihost, backend)
    use_backend(backend)
    from meliad_core import recipes, runner

    if devices is not None:
        if devices != "all" and not (devices.isdigit() and int(devices) > 0):
            raise BadInput(f"--devices: got {devices!r}, expected a positive number of devices or 'all'")
        # the recipe's (or --set's) other distribution keys stay: --devices sets only the count
        overrides = (*overrides, f"distribution.devices={'null' if devices == 'all' else int(devices)}")
    loaded = recipes.load_recipe(recipe, overrides, backend=backend)
    if hosts is not None:
        from meliad_core.distribution import start_processes

        if loaded.distribution is None:  # several hosts: data parallel over all their devices unless the recipe says
            loaded = recipes.load_recipe(recipe, (*overrides, "distribution.devices=null"), backend=backend)
        start_processes(*hosts)
    if workdir is None:
        is_workdir = Path(recipe).is_dir() and (Path(recipe) / runner.RECIPE_NAME).is_file()
        workdir = recipe if is_workdir else str(Path("runs") / (loaded.name or Path(recipe).stem))
    options = {"extend": extend} if extend else {}
    if restart:
        options["restart"] = True
    runner.run_training(loaded, workdir=Path(workdir), load_dir=load_dir, **options)


def _multihost(coordinator: str | None, num_processes: int | None, process_id: int | None, multihost: bool,
               backend: str) -> tuple | None:
    """(coordinator, num_processes, process_id) for `start_processes` (all None: found by JAX), or None
    for a single-host run; BadInput for an incomplete or inconsistent set of options."""
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if not multihost and all(v is None for v in given.values()):
        return None
    if backend != "jax":
        raise BadInput(f"--backend {backend}: multi-host training needs the jax backend (torch and tensorflow "
                       "train on one device)")
    if multihost:
        if any(v is not None for v in given.values()):
            raise BadInput("--multihost: expected either --multihost (the cluster found by JAX) or --coordinator, "
                           "--num-processes and --process-id, not both")
        return None, None, None
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise BadInput(f"{', '.join(missing)}: missing; a multi-host run needs --coordinator, --num-processes and "
                       "--process-id together (or --multihost)")
    if ":" not in coordinator or not coordinator.rsplit(":", 1)[1].isdigit():
        raise BadInput(f"--coordinator: got {coordinator!r}, expected HOST:PORT (process 0's address)")
    if process_id >= num_processes:
        raise BadInput(f"--process-id: got {process_id}, expected 0 to {num_processes - 1} (--num-processes "
                       f"{num_processes})")
    return coordinator, num_processes, process_id


@cli.command("report")
@click.argument("workdir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--batches", type=click.IntRange(min=1, max=1 << 20), default=None, metavar="K",
              help="Eval batches to stream from the start of the eval split (default: the recipe's eval.steps, "
                   "or 10 if that is 0).")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Keras backend (default: the one the run was trained on, from its checkpoint).")
@click.option("--bucket-width", type=click.IntRange(min=1), default=None, metavar="TOKENS",
              help="Position buckets of this many tokens (default: log-spaced, 0, N/4, N/2, N, 2N, 4N, ...).")
@click.option("--replace", is_flag=True,
              help="Overwrite WORKDIR/report/ even when it holds a report (by default a new one goes beside it).")
@_debug_option()
def report(workdir: Path, batches: int | None, backend: str | None, bucket_width: int | None, replace: bool) -> None:
    """Bits/token by position in the document and on long-range tokens, for the run in WORKDIR.

    Loads the weights of WORKDIR's newest intact checkpoint, streams K batches of a fresh eval stream
    through them and writes WORKDIR/report/long_range.json and long_range.png. When WORKDIR/report/
    already holds a report (the run's own, say), the new one goes beside it, into
    WORKDIR/report/step_<N>_batches_<K>/, unless --replace is given.
    """
    from meliad_core import checkpoint as ckpt  # numpy only: keras is not imported yet

    found = ckpt.latest_valid_checkpoint(workdir, warn=lambda m: click.echo(f"meliad: warning: {m}", err=True))
    if found is None:
        why = "" if ckpt.list_checkpoints(workdir) else " (no checkpoint at all: it is not a run's workdir)"
        raise BadInput(f"{workdir}: no intact checkpoint found there{why}; train first with 'meliad run'")
    if backend is None:
        loaded = sys.modules.get("keras")
        saved = found[1].get("backend")
        if loaded is not None:  # Keras already chosen in this process: checkpoints load on every backend
            backend = loaded.backend.backend()
        elif saved in BACKENDS and importlib.util.find_spec(FRAMEWORKS[saved][0]) is not None:
            backend = saved
        else:
            backend = default_backend()
        if backend is None:
            raise BadInput("no Keras backend framework is installed; install one with: pip install \"meliad[jax]\"")
    use_backend(backend)
    from meliad_core.report import JSON_NAME, REPORT_DIR, long_range_report

    folder = REPORT_DIR
    if not replace and (workdir / REPORT_DIR / JSON_NAME).exists():
        recipe = found[1].get("recipe") or {}
        count = batches or (recipe.get("eval") or {}).get("steps") or 10
        width = f"_width_{bucket_width}" if bucket_width else ""
        folder = f"{REPORT_DIR}/step_{found[1]['step']}_batches_{count}{width}"
    long_range_report(workdir, batches, bucket_width=bucket_width, checkpoint=found, folder=folder)


@cli.group("recipe")
def recipe_group() -> None:
    """Inspect one recipe."""


@recipe_group.command("show")
@click.argument("recipe")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Check the plugins' availability for this backend (default: $KERAS_BACKEND, or the first "
                   "installed).")
@_set_option()
@_debug_option()
def recipe_show(recipe: str, backend: str | None, overrides: tuple[str, ...]) -> None:
    """Print RECIPE resolved (includes and overrides applied) and validated, as YAML.

    It is checked exactly as 'meliad run' checks it before building a model, data options and files
    included, so a recipe that 'recipe show' prints is one that 'run' starts.
    """
    from meliad_core import recipes, runner

    if backend is not None:
        use_backend(backend)
    backend = default_backend()
    loaded = recipes.load_recipe(recipe, overrides, backend=backend)
    runner.prepare_data(loaded)
    click.echo(yaml.safe_dump(loaded.to_dict(), sort_keys=False, default_flow_style=False, width=1000), nl=False)


@cli.command("recipes")
def recipes_command() -> None:
    """List the bundled recipes (and those plugins provide)."""
    from meliad_core import recipes

    default_backend()
    rows = [(name, description) for name, _path, description in recipes.list_recipes()]
    if not rows:
        click.echo("no recipes found")
        return
    _print_table(("RECIPE", "DESCRIPTION"), rows)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths)]
        click.echo("  ".join(cells).rstrip())


@cli.command("plugins")
@click.pass_context
def plugins_command(ctx: click.Context) -> None:
    """List every installed plugin and what it registers, and the plugins that failed to load.

    Availability is evaluated for $KERAS_BACKEND (or, when unset, the first installed backend).
    """
    backend = default_backend()
    group = ctx.find_root().command
    if isinstance(group, MeliadGroup):
        group.add_plugin_commands()
    manager = plugins.get_plugin_manager()
    entries = manager.entries()  # collects every registry, which records hook failures
    manager.recipe_dirs()

    click.echo("Plugins:")
    plugin_rows = [(name, f"{dist} {version}".strip()) for name, (dist, version) in sorted(manager.origins.items())]
    if plugin_rows:
        _print_table(("PLUGIN", "DISTRIBUTION"), plugin_rows)
    else:
        click.echo("(none loaded)")

    click.echo("")
    click.echo(f"Registered (availability for the {backend} backend):" if backend else "Registered:")
    rows = []
    for entry in entries:
        reason = entry.unavailable_reason(backend)
        rows.append((
            entry.kind,
            entry.name,
            f"{entry.distribution} {entry.version}".strip(),
            ", ".join(entry.backends) if entry.backends is not None else "all",
            ", ".join(f"{key}={option.default}" for key, option in (entry.options or {}).items()) or "-",
            "available" if reason is None else f"unavailable: {reason}",
        ))
    if rows:
        _print_table(("KIND", "NAME", "DISTRIBUTION", "BACKENDS", "OPTIONS", "STATUS"), rows)
    else:
        click.echo("(nothing registered)")

    click.echo("")
    if manager.failures:
        click.echo("Failures:")
        _print_table(("PLUGIN", "DISTRIBUTION", "STAGE", "ERROR"),
                     [(f.plugin, f.distribution, f.stage, f.error) for f in manager.failures])
    else:
        click.echo("Failures: none")


# ----------------------------------------------------------------------------------------------
# Entry point


def _line(text: object) -> str:
    """An error message as one line of at most MAX_LINE characters."""
    line = one_line(text)
    return line if len(line) <= MAX_LINE else line[:MAX_LINE - 25] + f" ... ({len(line) - MAX_LINE + 25} more)"


def _error(message: object, status: int) -> int:
    if _DEBUG[0] and sys.exc_info()[0] is not None:
        traceback.print_exc()
    click.echo(ERROR_PREFIX + _line(message), err=True)
    return status


def _one_line_warnings(previous):
    """A `warnings.showwarning` that prints warnings for users as one line each (`meliad: warning: ...`,
    no source path); deprecation warnings, meant for developers, go to `previous` as before."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, (DeprecationWarning, PendingDeprecationWarning)):
            previous(message, category, filename, lineno, file, line)
        else:
            click.echo(f"meliad: warning: {_line(message)}", err=True)
    return show


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Runs the command line and returns the exit status; errors go to stderr as one line (with
    --debug or MELIAD_DEBUG=1, after the full traceback)."""
    args = list(sys.argv[1:] if argv is None else argv)
    _DEBUG[0] = os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    with warnings.catch_warnings():
        if not _DEBUG[0]:
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
        return _dispatch(args)


def _dispatch(args: list[str]) -> int:
    try:
        result = cli.main(args=args, prog_name="meliad", standalone_mode=False)
    except click.UsageError as exc:
        if _NO_ARGS_IS_HELP is not None and isinstance(exc, _NO_ARGS_IS_HELP) and exc.ctx is not None:
            click.echo(exc.ctx.get_help())  # plain `meliad`: help, not an error
            return EXIT_OK
        where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
        hint = f" (try '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        return _error(_line(where + exc.format_message()) + hint, EXIT_BAD_INPUT)
    except click.ClickException as exc:
        return _error(exc.format_message(), exc.exit_code)
    except (RecipeError, plugins.PluginError) as exc:
        return _error(str(exc), EXIT_BAD_INPUT)
    except click.Abort:
        return _error("aborted", EXIT_FAILED)
    except KeyboardInterrupt:
        return _error("interrupted; a run keeps its last checkpoint and resumes from it", 130)
    except Exception as exc:
        # never imported here: they may import keras
        runner = sys.modules.get("meliad_core.runner")
        data = sys.modules.get("meliad_core.data")
        report = sys.modules.get("meliad_core.report")
        if runner is not None and isinstance(exc, runner.RunError):
            return _error(str(exc), exc.exit_code)
        if (data is not None and isinstance(exc, data.DataError)) or (
                report is not None and isinstance(exc, report.ReportError)):
            return _error(str(exc), EXIT_BAD_INPUT)
        if isinstance(exc, OSError):
            describe = runner.describe_os_error if runner is not None else one_line
            return _error(describe(exc), EXIT_FAILED)
        oom = runner.out_of_memory_message(exc) if runner is not None else None
        if oom is not None:
            return _error(oom, EXIT_FAILED)
        return _error(f"internal error: {one_line(exc)} (rerun with --debug, or {DEBUG_ENV}=1, for the traceback, "
                      "and please report it)", EXIT_FAILED)
    return result if isinstance(result, int) else EXIT_OK


from meliad_core.generation_cli import add_generation_commands  # noqa: E402  (meliad generate, meliad eval)

add_generation_commands(cli)


def main() -> None:
    """Console-script entry point (`meliad`)."""
    sys.exit(run_cli())


if __name__ == "__main__":
    main()
