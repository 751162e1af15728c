"""A fuzzer of bad recipes and command lines, as a generated table (issue 10).

Every case is a recipe file, a `--set` or a command line that must be refused: `meliad run` and
`meliad recipe show` both exit with status 2 and exactly one stderr line (`meliad: error: ...`) that
names the key (or the file), print no traceback, and leave the workdir untouched. The table is built
from the recipe dataclasses themselves, so a key added later is fuzzed without editing this file.

Everything runs in this process through `cli.run_cli` and stops at validation: nothing is trained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import types
import typing
from pathlib import Path

import pytest
import yaml

from meliad_core import cli, config, plugins

BACKEND = os.environ.get("KERAS_BACKEND") or "jax"

BASE = {  # valid, tiny, one step: a case that is wrongly accepted trains for one step, never long
    "name": "fuzz",
    "model": {"num_layers": 2, "embed_dim": 16, "num_heads": 2, "head_dim": 8, "mlp_dim": 32},
    "attention": {"window": 16},
    "data": {"segment_length": 32, "batch_size": 1,
             "options": {"num_documents": 2, "num_eval_documents": 1, "document_length": 200}},
    "train": {"steps": 1, "warmup": 0, "checkpoint_every": 1, "log_every": 1},
    "eval": {"every": 1, "steps": 1},
}
SECTIONS = {  # the optional sections, valid on top of BASE
    "memory": {"attention": {"window": 32}, "memory": {"layers": [-1], "size": 64, "neighbors": 8}},
    "recurrence": {"recurrence": {"layers": [0], "num_states": 8}},
}
PLUGIN_KEYS = {"model.position_bias", "attention.kernel", "memory.store", "recurrence.gate", "data.source",
               "data.vocabulary"}
NEGATIVE_OK = {"memory.gate_init"}  # numeric keys for which -1 is a valid value


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set(mapping: dict, dotted: str, value) -> dict:
    out = _merge(mapping, {})
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node[part] = dict(node.get(part) or {})
        node = node[part]
    node[parts[-1]] = value
    return out


def _leaves(cls, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, dotted = hints[f.name], f"{prefix}.{f.name}" if prefix else f.name
        args = typing.get_args(tp)
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
        inner = [a for a in args if a is not type(None)][0] if optional else tp
        if dataclasses.is_dataclass(inner):
            yield from _leaves(inner, dotted)
        else:
            yield dotted, inner, optional, f.metadata.get("choices")


def _bad_values(dotted: str, tp, optional: bool, choices) -> list:
    """Values of the wrong type, out of range or absurd for one key."""
    values: list = []
    if tp is int:
        values = ["abc", 1.5, True, [1], {"a": 1}]
        values += [] if dotted in NEGATIVE_OK else [-1]
        values += [10**13] if dotted in config.SIZE_LIMITS else []
    elif tp is float:
        values = ["abc", True, [1.0], {"a": 1}, math.nan, math.inf]
        values += [] if dotted in NEGATIVE_OK else [-1.0]
    elif tp is bool:
        values = ["maybe", 1, [True]] + ([] if optional else [None])  # null is a value of an optional key
    elif tp is str:
        values = [3, [1], {"a": 1}]
        values += ["bogus_choice"] if choices else []
        values += ["no_such_plugin"] if dotted in PLUGIN_KEYS else []
    elif typing.get_origin(tp) is tuple:
        values = ["abc", [1.5], [True], {"a": 1}, ["x"]]
    elif tp is dict:
        values = [3, "abc", [1]]
    if not optional and tp in (int, float, str) and dotted not in ("name", "description"):
        values.append(None)
    return values


def _yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def _key_cases() -> list[tuple[str, dict, str | None, dict, str]]:
    """(id, bad recipe mapping, the same change as a --set on `base` (or None), base, fragment the error
    must hold) per key and bad value."""
    cases = []
    for dotted, tp, optional, choices in _leaves(config.Recipe):
        section = dotted.split(".")[0]
        base = _merge(BASE, SECTIONS.get(section, {}))
        for i, value in enumerate(_bad_values(dotted, tp, optional, choices)):
            override = None if isinstance(value, float) and math.isnan(value) else f"{dotted}={_yaml(value)}"
            cases.append((f"{dotted}={value!r}"[:60] + f"#{i}", _set(base, dotted, value), override, base, dotted))
        if tp is dict:  # an option no plugin declares
            cases.append((f"{dotted}.no_such_option", _set(base, f"{dotted}.no_such_option", 1),
                          f"{dotted}.no_such_option=1", base, dotted))
    for section in ("model", "attention", "memory", "recurrence", "data", "train", "eval"):
        base = _merge(BASE, SECTIONS.get(section, {}))
        cases.append((f"{section}.unknown", _set(base, f"{section}.no_such_key", 1), f"{section}.no_such_key=1",
                      base, f"{section}.no_such_key"))
        for value in (3, [1], "text"):
            cases.append((f"{section}={value!r}", {**base, section: value}, f"{section}={_yaml(value)}", base,
                          section))
    cases.append(("unknown section", {**BASE, "no_such_section": {}}, "no_such_section.x=1", BASE,
                  "no_such_section"))

    def changed(case_id: str, base: dict, dotted: str, value, fragment: str | None = None):
        return (case_id, _set(base, dotted, value), f"{dotted}={_yaml(value)}", base, fragment or dotted)

    text_files = _set(BASE, "data.source", "text_files")
    with_memory = _merge(BASE, SECTIONS["memory"])
    big_model = _set(BASE, "model.embed_dim", 60000)
    big_batch = _set(_set(BASE, "data.segment_length", 1 << 20), "attention.window", 1 << 20)
    # values that only the data plugins or the vocabulary can judge: checked by run and show alike
    cases += [
        changed("data.options unknown", BASE, "data.options.num_docs", 3),
        changed("num_documents=0", BASE, "data.options.num_documents", 0),
        changed("document_length=-5", BASE, "data.options.document_length", -5),
        changed("document_length=x", BASE, "data.options.document_length", "x"),
        changed("shuffle=3", BASE, "data.options.shuffle", 3),
        changed("value_letters=-1", BASE, "data.options.value_letters", -1),
        changed("value_words=x", BASE, "data.options.value_words", "x"),
        changed("layout=grid", BASE, "data.options.layout", "grid"),
        changed("read_back_distance=-3", BASE, "data.options.read_back_distance", -3),
        changed("read_back_rate=yes", BASE, "data.options.read_back_rate", "yes"),
        changed("vocab below vocabulary", BASE, "model.vocab_size", 100),
        changed("text_files without paths", text_files, "data.options", {}, "data.options.paths"),
        changed("text_files missing file", text_files, "data.options", {"paths": "/nonexistent/*.txt"},
                "data.options.paths"),
        changed("chunk_bytes=0", text_files, "data.options", {"paths": "/nonexistent/*.txt", "chunk_bytes": 0},
                "data.options.chunk_bytes"),
        changed("seed=-1", BASE, "train.seed", -1),
        changed("seed=2**32", BASE, "train.seed", 2**32),
        changed("seed=2**64", BASE, "train.seed", 2**64),
        changed("name with slash", BASE, "name", "../elsewhere"),
        changed("lr.max<0", BASE, "train.learning_rate.max", -0.01),
        changed("spike_lr<0", BASE, "train.learning_rate.spike_lr", -1.0),
        changed("max_steps<0", BASE, "train.learning_rate.max_steps", -10),
        changed("spike_steps<0", BASE, "train.learning_rate.spike_steps", -10),
        changed("weights too many", big_model, "model.mlp_dim", 1 << 20, "model.num_layers"),
        changed("state too big", big_batch, "data.batch_size", 60000),
        changed("memory layer out of range", with_memory, "memory.layers", [5]),
        changed("window not dividing", BASE, "attention.window", 24),
    ]
    return cases


def _override_cases() -> list[tuple[str, dict, list[str], str]]:
    """Bad `--set`s on a valid recipe."""
    bad = [
        ("train.steps", "train.steps"), ("=3", "=3"), ("train..steps=1", "train..steps"), (".x=1", ".x"),
        ("1abc=2", "1abc"), ("include=other", "include"), ("train.steps=[", "train.steps"),
        ("train.steps={", "train.steps"), ("model.num_layers.x=3", "model.num_layers"),
        ("train.steps=&a [*a]", "train.steps"), ("model={a: 1, a: 2}", "duplicate key"),
        ("model.num_layers=!!python/object:os.system ls", "model.num_layers"),
        ("train.steps=" + "[" * 2000, "train.steps"), ("train.steps=1" + "0" * 5000, "train.steps"),
        ("train.steps=-3", "train.steps"), ("model.embed_dim=1e400", "model.embed_dim"),
        ("train.seed=4294967296", "train.seed"), ("data.batch_size=0x7fffffffffff", "data.batch_size"),
    ]
    return [(f"--set {text[:40]}", BASE, [text], fragment) for text, fragment in bad]


def _file_cases(tmp: Path) -> list[tuple[str, Path | str, list[str], str]]:
    """Bad recipe files: (id, the RECIPE argument, --sets, fragment)."""
    def write(name: str, data: str | bytes) -> Path:
        path = tmp / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path

    laughs = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        laughs.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 10) + "]")
    laughs.append("model: {num_layers: *l}")
    cases = [
        ("empty", write("empty.yaml", ""), "empty.yaml"),
        ("comments only", write("comments.yaml", "# nothing\n   # here\n"), "comments.yaml"),
        ("null", write("null.yaml", "null\n"), "null.yaml"),
        ("tilde", write("tilde.yaml", "~\n"), "tilde.yaml"),
        ("list", write("list.yaml", "[1, 2]\n"), "list.yaml"),
        ("scalar", write("scalar.yaml", "42\n"), "scalar.yaml"),
        ("string", write("string.yaml", "just words\n"), "string.yaml"),
        ("binary", write("binary.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe"), "binary.yaml"),
        ("latin-1", write("latin.yaml", "name: caf\xe9\n".encode("latin-1")), "latin.yaml"),
        ("nul byte", write("nul.yaml", "name: a\x00b\n"), "nul.yaml"),
        ("alias bomb", write("bomb.yaml", "\n".join(laughs) + "\n"), "bomb.yaml"),
        ("alias bomb in a key", write("bomb2.yaml", "\n".join(laughs[:-1]) + "\nmodel: {num_layers: *k}\n"),
         "bomb2.yaml"),
        ("recursive alias", write("cycle_alias.yaml", "model: &m {num_layers: 2, x: *m}\n"), "cycle_alias.yaml"),
        ("deep nesting", write("deep.yaml", "model: " + "[" * 3000 + "]" * 3000 + "\n"), "deep.yaml"),
        ("deep mappings", write("deep_map.yaml", "model: " + "{a: " * 40 + "1" + "}" * 40 + "\n"), "deep_map.yaml"),
        ("duplicate top key", write("dup.yaml", "model:\n  num_layers: 2\nmodel:\n  num_layers: 3\n"),
         "line 1, again at line 3"),
        ("duplicate nested key", write("dup2.yaml", yaml.safe_dump(BASE) + "train:\n  steps: 1\n  steps: 2\n"),
         "duplicate key"),
        ("python tag", write("tag.yaml", "model: !!python/object/apply:os.system ['true']\n"), "tag.yaml"),
        ("unhashable key", write("unhash.yaml", "? [a, b]\n: 1\n"), "unhash.yaml"),
        ("huge int", write("hugeint.yaml", "train:\n  steps: 1" + "0" * 5000 + "\n"), "hugeint.yaml"),
        ("tabs", write("tabs.yaml", "model:\n\tnum_layers: 2\n"), "tabs.yaml"),
        ("too big", write("big.yaml", "# " + "x" * (1 << 20) + "\nname: big\n"), "big.yaml"),
        ("not yaml", write("broken.yaml", "model: [1, 2\n"), "broken.yaml"),
        ("missing file", str(tmp / "does_not_exist.yaml"), "does_not_exist.yaml"),
        ("empty name", "", "empty name"),
        ("a folder", str(_folder(tmp / "a_folder")), "a_folder"),
    ]
    write("cycle_a.yaml", "include: cycle_b.yaml\nname: a\n")
    write("cycle_b.yaml", "include: cycle_a.yaml\nname: b\n")
    cases.append(("include cycle", tmp / "cycle_a.yaml", "include cycle"))
    cases.append(("include self", write("self.yaml", "include: self.yaml\n"), "include cycle"))
    cases.append(("include missing", write("inc_missing.yaml", "include: nowhere_to_be_found\n"),
                  "nowhere_to_be_found"))
    cases.append(("include a number", write("inc_number.yaml", "include: 3\n"), "include"))
    cases.append(("include a folder", write("inc_folder.yaml", "include: a_folder\n"), "a_folder"))
    cases.append(("include an empty file", write("inc_empty.yaml", "include: empty.yaml\nname: x\n"), "empty.yaml"))
    for i in range(40):
        write(f"chain_{i}.yaml", f"include: chain_{i + 1}.yaml\n" if i < 39 else yaml.safe_dump(BASE))
    cases.append(("include chain", tmp / "chain_0.yaml", "include"))
    return [(name, arg, [], fragment) for name, arg, fragment in cases]


def _folder(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path


def _snapshot(folder: Path) -> dict:
    found = {}
    for path in sorted(folder.rglob("*")):
        stat = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        found[str(path.relative_to(folder))] = (stat.st_mtime_ns, stat.st_size, digest)
    return found


def _assert_refused(status: int, captured, fragment: str, what: str) -> None:
    out, err = captured.out, captured.err
    assert "Traceback" not in out + err, f"{what}: {err}"
    assert status == 2, f"{what}: exit {status}; stderr: {err[-2000:]!r}"
    lines = err.splitlines()
    assert len(lines) == 1, f"{what}: {len(lines)} stderr lines: {err[-2000:]!r}"
    assert lines[0].startswith("meliad: error: "), f"{what}: {lines[0]!r}"
    assert len(lines[0]) <= cli.MAX_LINE + len(cli.ERROR_PREFIX), what
    assert fragment in lines[0], f"{what}: {fragment!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """A workdir that holds a run's files (must stay untouched) and the path of one that must never appear."""
    root = tmp_path_factory.mktemp("fuzz_workdirs")
    used = root / "used"
    (used / "checkpoints" / "step_1").mkdir(parents=True)
    (used / "recipe.yaml").write_text(yaml.safe_dump(BASE))
    (used / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\n')
    (used / "checkpoints" / "step_1" / "manifest.json").write_text("{}")
    return used, root / "never"


def _run_case(capsys, argv: list[str]) -> tuple[int, object]:
    capsys.readouterr()
    status = cli.run_cli(argv)
    return status, capsys.readouterr()


def _check_case(capsys, workdirs, case_id: str, recipe_arg, overrides: list[str], fragment: str) -> None:
    used, never = workdirs
    sets = [a for text in overrides for a in ("--set", text)]
    before = _snapshot(used)
    for workdir in (never, used):
        status, captured = _run_case(capsys, ["run", str(recipe_arg), "--backend", BACKEND, "--workdir", str(workdir),
                                              *sets])
        _assert_refused(status, captured, fragment, f"run {case_id}")
    status, captured = _run_case(capsys, ["recipe", "show", str(recipe_arg), *sets])
    _assert_refused(status, captured, fragment, f"recipe show {case_id}")
    assert not never.exists(), f"{case_id}: run created its workdir"
    assert _snapshot(used) == before, f"{case_id}: run touched a workdir"


@pytest.fixture(autouse=True)
def _backend(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", BACKEND)
    monkeypatch.delenv("MELIAD_DEBUG", raising=False)
    plugins.set_plugin_manager(None)
    yield
    plugins.set_plugin_manager(None)


def test_the_table_has_enough_cases(tmp_path):
    count = len(_key_cases()) + len(_override_cases()) + len(_file_cases(tmp_path))
    assert count >= 300, count


def test_bad_keys_and_values(capsys, tmp_path, workdirs):
    """Every key of every section with values of the wrong type, out of range or absurd; each case goes
    in a file (run and recipe show) and as a --set on the valid recipe (run)."""
    path, base_path = tmp_path / "case.yaml", tmp_path / "base.yaml"
    for case_id, mapping, override, base, fragment in _key_cases():
        path.write_text(yaml.safe_dump(mapping, sort_keys=False))
        _check_case(capsys, workdirs, case_id, path, [], fragment)
        if override is not None:
            base_path.write_text(yaml.safe_dump(base, sort_keys=False))
            status, captured = _run_case(capsys, ["run", str(base_path), "--backend", BACKEND, "--workdir",
                                                  str(workdirs[1]), "--set", override])
            _assert_refused(status, captured, fragment, f"run --set {override}")


def test_bad_overrides(capsys, workdirs, tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    for case_id, _, overrides, fragment in _override_cases():
        _check_case(capsys, workdirs, case_id, path, overrides, fragment)


def test_bad_files(capsys, workdirs, tmp_path):
    for case_id, argument, overrides, fragment in _file_cases(tmp_path):
        _check_case(capsys, workdirs, case_id, argument, overrides, fragment)


@pytest.mark.parametrize("args, fragment", [
    (["--workdir", ""], "--workdir"),
    (["--extend", "0"], "--extend"),
    (["--extend", "-3"], "--extend"),
    (["--extend", "x"], "--extend"),
    (["--backend", "numpy"], "--backend"),
    (["--load-dir", "/nonexistent/run"], "--load-dir"),
    (["--no-such-option"], "--no-such-option"),
    (["--set"], "--set"),
])
def test_bad_command_lines(capsys, tmp_path, workdirs, args, fragment):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    argv = ["run", str(path), "--backend", BACKEND]
    if "--workdir" not in args:
        argv += ["--workdir", str(workdirs[1])]
    argv += args
    status, captured = _run_case(capsys, argv)
    _assert_refused(status, captured, fragment, " ".join(args))
    assert not workdirs[1].exists()
