"""The `meliad` command line.

Importing this module does not import Keras: `meliad run` must set KERAS_BACKEND before the first
Keras import, and plugins (which may import Keras) are only loaded when a command needs them.
Bad input of any kind ends with exactly one line on stderr, prefixed `meliad: error: `, and exit
status 2.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import click
import yaml

from meliad_core import plugins
from meliad_core.config import RecipeError

BACKENDS = ("jax", "torch", "tensorflow")
# backend -> (module that must be importable, human name)
FRAMEWORKS = {"jax": ("jax", "JAX"), "torch": ("torch", "PyTorch"), "tensorflow": ("tensorflow", "TensorFlow")}

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
ERROR_PREFIX = "meliad: error: "
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


@cli.command()
@click.argument("recipe")
@click.option("--backend", type=click.Choice(BACKENDS), envvar="KERAS_BACKEND", required=True,
              help="Keras backend to run on (default: $KERAS_BACKEND).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where checkpoints and reports go (default: runs/<recipe name>).")
@click.option("--load-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A run folder whose latest checkpoint to start from.")
@_set_option()
def run(recipe: str, backend: str, workdir: Path | None, load_dir: Path | None, overrides: tuple[str, ...]) -> None:
    """Train and evaluate RECIPE (a file or a bundled recipe name)."""
    os.environ["KERAS_BACKEND"] = backend  # before anything below can import keras
    _require_framework(backend)
    mismatch = _keras_backend_mismatch(backend)
    if mismatch:
        raise BadInput(f"--backend {backend}: Keras was already imported with the {mismatch} backend")
    from meliad_core import recipes, runner

    loaded = recipes.load_recipe(recipe, overrides, backend=backend)
    if workdir is None:
        workdir = Path("runs") / (loaded.name or Path(recipe).stem)
    runner.run_training(loaded, workdir=workdir, load_dir=load_dir)


@cli.command("report")
@click.argument("workdir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--batches", type=click.IntRange(min=1), default=None, metavar="K",
              help="Eval batches to stream from the start of the eval split (default: the recipe's eval.steps, "
                   "or 10 if that is 0).")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Keras backend (default: the one the run was trained on, from its checkpoint).")
@click.option("--bucket-width", type=click.IntRange(min=1), default=None, metavar="TOKENS",
              help="Position buckets of this many tokens (default: log-spaced, 0, N/4, N/2, N, 2N, 4N, ...).")
def report(workdir: Path, batches: int | None, backend: str | None, bucket_width: int | None) -> None:
    """Bits/token by position in the document and on long-range tokens, for the run in WORKDIR.

    Loads the weights of WORKDIR's newest intact checkpoint, streams K batches of a fresh eval stream
    through them and writes WORKDIR/report/long_range.json and long_range.png.
    """
    from meliad_core import checkpoint as ckpt  # numpy only: keras is not imported yet

    found = ckpt.latest_valid_checkpoint(workdir, warn=lambda m: click.echo(f"meliad: warning: {m}", err=True))
    if found is None:
        raise BadInput(f"{workdir}: no intact checkpoint found there; train first with 'meliad run'")
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
    os.environ["KERAS_BACKEND"] = backend  # before anything below can import keras
    _require_framework(backend)
    mismatch = _keras_backend_mismatch(backend)
    if mismatch:
        raise BadInput(f"--backend {backend}: Keras was already imported with the {mismatch} backend")
    from meliad_core.report import long_range_report

    long_range_report(workdir, batches, bucket_width=bucket_width, checkpoint=found)


@cli.group("recipe")
def recipe_group() -> None:
    """Inspect one recipe."""


@recipe_group.command("show")
@click.argument("recipe")
@_set_option()
def recipe_show(recipe: str, overrides: tuple[str, ...]) -> None:
    """Print RECIPE resolved (includes and overrides applied) and validated, as YAML."""
    from meliad_core import recipes

    default_backend()
    loaded = recipes.load_recipe(recipe, overrides)
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
            "available" if reason is None else f"unavailable: {reason}",
        ))
    if rows:
        _print_table(("KIND", "NAME", "DISTRIBUTION", "BACKENDS", "STATUS"), rows)
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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Runs the command line and returns the exit status; errors go to stderr as one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = cli.main(args=args, prog_name="meliad", standalone_mode=False)
    except click.UsageError as exc:
        if _NO_ARGS_IS_HELP is not None and isinstance(exc, _NO_ARGS_IS_HELP) and exc.ctx is not None:
            click.echo(exc.ctx.get_help())  # plain `meliad`: help, not an error
            return EXIT_OK
        where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
        hint = f" (try '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(ERROR_PREFIX + _one_line(where + exc.format_message()) + hint, err=True)
        return EXIT_BAD_INPUT
    except click.ClickException as exc:
        click.echo(ERROR_PREFIX + _one_line(exc.format_message()), err=True)
        return exc.exit_code
    except (RecipeError, plugins.PluginError) as exc:
        click.echo(ERROR_PREFIX + _one_line(str(exc)), err=True)
        return EXIT_BAD_INPUT
    except click.Abort:
        click.echo(ERROR_PREFIX + "aborted", err=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        click.echo(ERROR_PREFIX + "interrupted; a run keeps its last checkpoint and resumes from it", err=True)
        return 130
    except Exception as exc:
        # never imported here: they may import keras
        runner = sys.modules.get("meliad_core.runner")
        data = sys.modules.get("meliad_core.data")
        report = sys.modules.get("meliad_core.report")
        if (runner is not None and isinstance(exc, runner.RunError)) or (
                data is not None and isinstance(exc, data.DataError)) or (
                report is not None and isinstance(exc, report.ReportError)):
            click.echo(ERROR_PREFIX + _one_line(str(exc)), err=True)
            return EXIT_BAD_INPUT
        raise
    return result if isinstance(result, int) else EXIT_OK


def main() -> None:
    """Console-script entry point (`meliad`)."""
    sys.exit(run_cli())


if __name__ == "__main__":
    main()
