"""The `meliad` command line, run as a user runs it: in a subprocess, on $KERAS_BACKEND.

Third-party plugins are made "installed" without pip: a folder holding the package next to a
`<name>-<version>.dist-info` (METADATA, entry_points.txt), passed to the subprocess on PYTHONPATH.
"""

from __future__ import annotations

import importlib.metadata
import io
import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from meliad_core import cli, plugins, recipes
from meliad_core.hookspecs import hookimpl
from plugin_dists import BROKEN_IMPORT, install_example, make_distribution

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FRAMEWORKS = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}


def current_backend() -> str:
    """$KERAS_BACKEND, or the first backend whose framework is installed."""
    backend = os.environ.get("KERAS_BACKEND")
    if backend:
        return backend
    for name, module in FRAMEWORKS.items():
        if importlib.util.find_spec(module) is not None:
            return name
    pytest.skip("no Keras backend framework is installed")


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory) -> Path:
    """tests/third_party_plugin as if pip-installed."""
    return install_example(tmp_path_factory.mktemp("example"))


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory) -> Path:
    """A third-party distribution whose module cannot be imported."""
    return make_distribution(tmp_path_factory.mktemp("broken"), "meliad-broken-import", "1.0",
                             {"broken_import": "meliad_broken_import"},
                             modules=BROKEN_IMPORT)


def env_with(*dirs: Path, **extra: str) -> dict[str, str]:
    """Environment for a subprocess that sees the distributions in `dirs`.

    TensorFlow writes C++ start-up log lines to stderr before Python can silence them; they are
    switched off here so that stderr holds only what meliad prints.
    """
    env = dict(os.environ)
    env["KERAS_BACKEND"] = current_backend()
    env["PYTHONPATH"] = os.pathsep.join([str(d) for d in dirs] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    env.pop("MELIAD_DISABLE_PLUGINS", None)
    env.update(extra)
    return env


def meliad(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs `python -m meliad_core.cli ARGS`."""
    return subprocess.run([sys.executable, "-m", "meliad_core.cli", *args], capture_output=True, text=True,
                          env=env if env is not None else env_with(), cwd=cwd, timeout=600)


def assert_bad_input(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, exactly one stderr line with the error prefix, no traceback; returns the line."""
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert proc.returncode == 2, output
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("meliad: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


SMALL_RECIPE = {  # standalone (no include), so loading it needs no plugin until names are checked
    "name": "small",
    "description": "a small recipe that each test breaks in one place",
    "model": {"num_layers": 2, "embed_dim": 16, "num_heads": 2, "head_dim": 8, "mlp_dim": 32},
    "attention": {"window": 128},
    "data": {"segment_length": 256, "batch_size": 1},
}


def write_recipe(path: Path, **sections) -> Path:
    recipe = {key: dict(value) if isinstance(value, dict) else value for key, value in SMALL_RECIPE.items()}
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# imports


def test_importing_meliad_imports_no_framework():
    code = ("import sys, json, meliad_core, meliad_core.cli, meliad_core.recipes, meliad_core.config, "
            "meliad_core.plugins; print(json.dumps(sorted(m for m in ('keras', 'jax', 'torch', 'tensorflow') "
            "if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_with(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_keras_and_the_plugins_import_only_the_chosen_framework():
    backend = current_backend()
    code = ("import sys, json, keras; from meliad_core import plugins; manager = plugins.get_plugin_manager(); "
            "manager.entries(); print(json.dumps([keras.backend.backend(), sorted(m for m in "
            "('jax', 'torch', 'tensorflow') if m in sys.modules)]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_with(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == [backend, [FRAMEWORKS[backend]]]


# ----------------------------------------------------------------------------------------------
# bad input: exit 2, one line


def test_run_misspelled_key(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", model={"num_layer": 3})
    assert_bad_input(meliad("run", str(recipe), "--backend", current_backend()),
                     "model.num_layer: unknown key; did you mean 'model.num_layers'?")


def test_run_wrong_type(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", train={"steps": "many"})
    assert_bad_input(meliad("run", str(recipe), "--backend", current_backend()),
                     "train.steps: got 'many', expected an integer")


def test_run_window_must_divide_segment_length(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", attention={"window": 100})
    assert_bad_input(meliad("run", str(recipe), "--backend", current_backend()),
                     "data.segment_length: got 256, expected a multiple of attention.window (100)")


def test_run_bad_override_and_yaml_syntax(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml")
    assert_bad_input(meliad("run", str(recipe), "--backend", current_backend(), "--set", "train.steps"),
                     "--set 'train.steps': expected key=value")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  num_layers: [2\n", encoding="utf-8")
    assert_bad_input(meliad("recipe", "show", str(broken)), f"{broken}:", "invalid YAML")


def test_missing_recipe_file(tmp_path):
    assert_bad_input(meliad("run", str(tmp_path / "nope.yaml"), "--backend", current_backend()),
                     "nope.yaml", "no such file")
    assert_bad_input(meliad("recipe", "show", "no_such_bundled_recipe"), "no such file")


def test_unknown_plugin_name(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", data={"source": "no_such_source"})
    line = assert_bad_input(meliad("recipe", "show", str(recipe)),
                            "data.source: got 'no_such_source', expected one of the installed data sources: ")
    assert "synthetic" in line


@pytest.mark.parametrize("args, fragment", [
    (["run"], "meliad run: Missing argument 'RECIPE'"),
    (["run", "x.yaml", "--backend", "numpy"], "Invalid value for '--backend'"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["recipes", "--no-such-option"], "No such option"),
    (["recipe", "show"], "meliad recipe show: Missing argument 'RECIPE'"),
])
def test_usage_errors_are_one_line(args, fragment):
    assert_bad_input(meliad(*args), fragment)


def test_missing_backend_framework_says_which_extra_to_install(tmp_path):
    missing = [b for b, module in FRAMEWORKS.items() if importlib.util.find_spec(module) is None]
    if not missing:
        pytest.skip("every backend framework is installed here")
    recipe = write_recipe(tmp_path / "r.yaml")
    assert_bad_input(meliad("run", str(recipe), "--backend", missing[0]),
                     f'pip install "meliad[{missing[0]}]"')


# ----------------------------------------------------------------------------------------------
# recipe show, recipes, plugins


def test_recipe_show_prints_the_resolved_recipe(tmp_path):
    proc = meliad("recipe", "show", "sizes/tiny_test", "--set", "train.steps=12", "--set", "model.dropout=0")
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["name"] == "tiny_test" and shown["train"]["steps"] == 12 and shown["model"]["dropout"] == 0.0
    assert shown["model"]["num_layers"] == 2 and shown["model"]["position_bias"] == "t5"  # from base via include
    expected = recipes.load_recipe("sizes/tiny_test", ["train.steps=12", "model.dropout=0"], check_plugins=False)
    assert shown == expected.to_dict()
    # what it prints is itself a recipe that loads back to the same thing
    again = tmp_path / "shown.yaml"
    again.write_text(proc.stdout, encoding="utf-8")
    assert recipes.load_recipe(again, check_plugins=False) == expected


def test_recipes_lists_bundled_recipes():
    proc = meliad("recipes")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["RECIPE", "DESCRIPTION"]
    for name, _path, description in recipes.list_bundled_recipes():
        assert any(line.split(None, 1) == [name, description] for line in lines[1:]), name


def plugin_table(stdout: str) -> list[list[str]]:
    """The rows of the "Plugins:" section, split into cells."""
    section = stdout.split("Plugins:\n", 1)[1].split("\n\n", 1)[0]
    return [line.split() for line in section.splitlines()[1:]]


def test_plugins_lists_the_builtins():
    proc = meliad("plugins")
    assert proc.returncode == 0, proc.stderr
    version = importlib.metadata.version("meliad")
    builtin = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["entry-points"]["meliad"]
    rows = plugin_table(proc.stdout)
    for name in builtin:
        assert [name, "meliad", version] in rows
    assert f"Registered (availability for the {current_backend()} backend):" in proc.stdout
    assert "Failures: none" in proc.stdout
    manager = plugins.load_plugin_manager()
    for entry in manager.entries():  # every registered strategy has a row with its kind and name
        assert any(line.split()[:3] == [entry.kind, entry.name, "meliad"] for line in proc.stdout.splitlines())


def test_third_party_plugin_in_plugins_recipes_and_recipe_show(example_dir, broken_dir, tmp_path):
    env = env_with(example_dir, broken_dir)
    proc = meliad("plugins", env=env)
    assert proc.returncode == 0, proc.stderr
    assert ["example_memory", "meliad-example-memory", "0.3.0"] in plugin_table(proc.stdout)
    row = next(line.split() for line in proc.stdout.splitlines() if "example_recent" in line)
    # its declared option is listed with its default
    assert row == ["memory_store", "example_recent", "meliad-example-memory", "0.3.0", "all", "newest_first=True",
                   "available"]
    failures = proc.stdout.split("Failures:\n", 1)[1].splitlines()
    assert failures[0].split() == ["PLUGIN", "DISTRIBUTION", "STAGE", "ERROR"]
    assert failures[1].split(None, 3) == ["broken_import", "meliad-broken-import", "import",
                                          "ImportError: broken on purpose at import"]
    assert ["base", "meliad", importlib.metadata.version("meliad")] not in plugin_table(proc.stdout)

    proc = meliad("recipe", "show", "sizes/tiny_test", "--set", "memory.store=example_recent", "--set",
                  "memory.size=1024", "--set", "memory.neighbors=16", "--set", "memory.layers=[-1]",
                  "--set", "attention.window=256", env=env)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["memory"]["store"] == "example_recent"

    mine = tmp_path / "mine.yaml"  # the plugin's own recipe folder is searched for includes
    mine.write_text("include: [sizes/tiny_test, example_recent_memory]\nattention: {window: 256}\n", encoding="utf-8")
    proc = meliad("recipe", "show", str(mine), env=env)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["memory"]["neighbors"] == 16
    assert "example_recent_memory" in meliad("recipes", env=env).stdout

    # without the plugin installed, the same recipe is refused with the known stores listed
    assert_bad_input(meliad("recipe", "show", "sizes/tiny_test", "--set", "memory.store=example_recent",
                            "--set", "memory.size=1024", "--set", "memory.neighbors=16", "--set",
                            "memory.layers=[-1]", "--set", "attention.window=256"),
                     "memory.store: got 'example_recent', expected one of the installed memory stores: ", "bucketed")


def test_help_and_version():
    proc = meliad()
    assert proc.returncode == 0 and "Commands:" in proc.stdout and "run" in proc.stdout
    proc = meliad("--version")
    assert proc.returncode == 0 and importlib.metadata.version("meliad") in proc.stdout


# ----------------------------------------------------------------------------------------------
# `meliad run` in process, with the runner replaced (the real one trains)


@pytest.fixture
def calls(monkeypatch):
    """Replaces the runner with a recorder; KERAS_BACKEND is restored after the test."""
    from meliad_core import runner

    monkeypatch.setenv("KERAS_BACKEND", current_backend())
    recorded = []
    monkeypatch.setattr(runner, "run_training", lambda recipe, workdir, load_dir=None, **options:
                        recorded.append((recipe, workdir, load_dir)))
    plugins.set_plugin_manager(None)
    yield recorded
    plugins.set_plugin_manager(None)


def test_run_calls_the_runner_with_the_validated_recipe(calls, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.run_cli(["run", "sizes/tiny_test", "--backend", current_backend(), "--set", "train.steps=5"]) == 0
    recipe, workdir, load_dir = calls[-1]
    assert recipe.name == "tiny_test" and recipe.train.steps == 5
    assert workdir == Path("runs") / "tiny_test" and load_dir is None
    assert os.environ["KERAS_BACKEND"] == current_backend()
    previous = tmp_path / "previous"
    previous.mkdir()
    assert cli.run_cli(["run", "sizes/tiny_test", "--backend", current_backend(), "--workdir", "out",
                        "--load-dir", str(previous)]) == 0
    assert calls[-1][1:] == (Path("out"), previous)


def test_run_rejects_a_missing_load_dir(calls, tmp_path, capsys):
    status = cli.run_cli(["run", "sizes/tiny_test", "--backend", current_backend(), "--load-dir",
                          str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert status == 2 and not calls
    assert len(err.splitlines()) == 1 and err.startswith("meliad: error: meliad run: Invalid value for '--load-dir'")


def test_plugins_can_add_commands_but_not_replace_builtins(monkeypatch, capsys):
    class Commands:
        @hookimpl
        def meliad_register_commands(self, cli):
            import click

            @cli.command("hello")
            def hello():
                click.echo("hello from a plugin")

            @cli.command("run")
            def fake_run():
                click.echo("hijacked")

    plugins.set_plugin_manager(plugins.load_plugin_manager(extra_plugins=[("commands", Commands())]))
    monkeypatch.setattr(cli.cli, "_plugin_commands_added", False)
    monkeypatch.setattr(cli.cli, "commands", dict(cli.cli.commands))
    try:
        assert cli.run_cli(["hello"]) == 0
        assert capsys.readouterr().out == "hello from a plugin\n"
        assert cli.run_cli(["run", "--help"]) == 0
        assert "Train and evaluate RECIPE" in capsys.readouterr().out
        failures = plugins.get_plugin_manager().failures
        assert any(f.plugin == "commands" and "replace the command 'run'" in f.error for f in failures)
    finally:
        plugins.set_plugin_manager(None)


# ----------------------------------------------------------------------------------------------
# `meliad report` never overwrites a report unless asked (issue 10)


def test_report_on_a_folder_that_is_not_a_workdir(tmp_path, capsys):
    status = cli.run_cli(["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1
    assert "no intact checkpoint found there (no checkpoint at all: it is not a run's workdir)" in err


@pytest.mark.skipif(current_backend() != "jax", reason="slow: runs on the jax environment only")
def test_report_goes_beside_the_runs_own_report_unless_replace(tmp_path, capsys, monkeypatch):
    from meliad_core.config import validate_recipe
    from meliad_core.runner import run_training

    monkeypatch.setenv("KERAS_BACKEND", current_backend())
    recipe = {"name": "reported", "model": {"num_layers": 1, "embed_dim": 16, "num_heads": 2, "head_dim": 8,
                                            "mlp_dim": 32},
              "attention": {"window": 16},
              "data": {"segment_length": 32, "batch_size": 1,
                       "options": {"num_documents": 2, "num_eval_documents": 2, "document_length": 200}},
              "train": {"steps": 2, "warmup": 1, "checkpoint_every": 2, "log_every": 2},
              "eval": {"every": 2, "steps": 1, "report_batches": 2}}
    workdir = tmp_path / "run"
    run_training(validate_recipe(recipe), workdir, out=io.StringIO())
    own = (workdir / "report" / "long_range.json").read_bytes()
    assert json.loads(own)["batches"] == 2

    capsys.readouterr()
    assert cli.run_cli(["report", str(workdir), "--batches", "1"]) == 0
    beside = workdir / "report" / "step_2_batches_1" / "long_range.json"
    assert json.loads(beside.read_text())["batches"] == 1 and str(beside) in capsys.readouterr().out
    assert (workdir / "report" / "long_range.json").read_bytes() == own  # the run's own report is kept

    assert cli.run_cli(["report", str(workdir), "--batches", "1", "--replace"]) == 0
    assert json.loads((workdir / "report" / "long_range.json").read_text())["batches"] == 1
