"""`meliad generate` and `meliad eval`: a trained run's checkpoint read and written with, state live.

    meliad generate runs/quickstart --prompt "The ledger of" --max-tokens 200 --top-p 0.9 --seed 1
    meliad generate quickstart --prompt-file prompt.txt --max-tokens 50          # a recipe: untrained weights
    meliad eval runs/quickstart --token-losses losses.npz        # every eval document, each to its end
    meliad eval runs/quickstart --batches 48 --report              # at most 48 batches, with the report
    meliad eval runs/quickstart --data data.source=text_files --data 'data.options.paths=[book.txt]'

`eval` reads each eval document once, from its start, in the run's batch slots: a slot keeps its
document to its end and then takes the next one; a slot with none left gets padding (never scored)
until every slot has run out. With the run's eval settings and documents that run out together, the
figure is the run's own eval figure (tests/test_generate_cli.py).

Registered on the `meliad` group by `add_generation_commands(cli)`. Like every command, bad input ends
with one line on stderr and exit status 2 before anything is written; Keras is imported only once the
backend is chosen.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import click
import numpy as np


def _base():
    from meliad_core import cli as base  # at call time: cli.py registers these commands at its end

    return base


def _checkpoint(workdir: Path, step: int | None):
    """(path, manifest, arrays) of the newest intact checkpoint, or of step `step`; BadInput if none."""
    from meliad_core import checkpoint as ckpt

    base = _base()
    if step is not None:
        path = workdir / ckpt.CHECKPOINT_DIR / f"step_{step}"
        if not path.is_dir():
            steps = ", ".join(p.name.removeprefix("step_") for p in ckpt.list_checkpoints(workdir)) or "none"
            raise base.BadInput(f"--checkpoint {step}: {workdir} has no checkpoint of step {step} (steps: {steps})")
        try:
            manifest, arrays = ckpt.read_checkpoint(path)
        except ckpt.CheckpointError as exc:
            raise base.BadInput(str(exc)) from None
        return path, manifest, arrays
    found = ckpt.latest_valid_checkpoint(workdir, warn=lambda m: click.echo(f"meliad: warning: {m}", err=True))
    if found is None:
        what = "no intact checkpoint" if ckpt.list_checkpoints(workdir) else "no checkpoint (it is not a run's workdir)"
        raise base.BadInput(f"{workdir}: {what} found there; train first with 'meliad run'")
    return found


def _choose_backend(backend: str | None, saved: str | None) -> None:
    """--backend, else the Keras already imported, else the checkpoint's backend if installed, else the default."""
    base = _base()
    if backend is None:
        loaded = sys.modules.get("keras")
        if loaded is not None:
            backend = loaded.backend.backend()
        elif saved in base.BACKENDS and importlib.util.find_spec(base.FRAMEWORKS[saved][0]) is not None:
            backend = saved
        else:
            backend = base.default_backend()
        if backend is None:
            raise base.BadInput('no Keras backend framework is installed; install one with: pip install "meliad[jax]"')
    base.use_backend(backend)


def load_target(target: str, step: int | None, backend: str | None, overrides=(), batch_size: int = 1,
                streams=("predict",)):
    """(model, recipe, vocabulary, checkpoint or None) for a run's workdir (its checkpoint's weights) or
    a recipe (untrained weights, with a warning). Checks everything before building the model."""
    from meliad_core import checkpoint as ckpt

    base = _base()
    path = Path(target)
    found = None
    if path.is_dir():
        found = _checkpoint(path, step)
        _choose_backend(backend, found[1].get("backend"))
        try:
            recipe = ckpt.stored_recipe(*found[:2])
        except ckpt.CheckpointError as exc:
            raise base.BadInput(str(exc)) from None
    else:
        if step is not None:
            raise base.BadInput(f"--checkpoint: {target} is a recipe, not a run's workdir with checkpoints")
        _choose_backend(backend, None)
        from meliad_core import recipes

        recipe = recipes.load_recipe(target, overrides, backend=None)
    from meliad_core.model import build_model
    from meliad_core.vocab import load_vocabulary

    vocabulary = load_vocabulary(recipe.data)
    vocab_size = recipe.model.vocab_size or vocabulary.vocab_size
    model = build_model(recipe, vocab_size=vocab_size, batch_size=batch_size, streams=streams)
    if found is not None:
        try:
            ckpt.restore(model, None, found[1], found[2], weights_only=True)
        except ckpt.CheckpointError as exc:
            raise base.BadInput(str(exc)) from None
    else:
        click.echo(f"meliad: warning: {target} is a recipe, not a trained run: its weights are random", err=True)
    return model, recipe, vocabulary, found


def _prompt_text(prompt: str | None, prompt_file: Path | None, prompt_ids: str | None) -> str | None:
    """The prompt's text (from --prompt or --prompt-file), checked; None with --prompt-ids."""
    base = _base()
    given = [name for name, value in (("--prompt", prompt), ("--prompt-file", prompt_file),
                                      ("--prompt-ids", prompt_ids)) if value is not None]
    if len(given) != 1:
        raise base.BadInput("give exactly one of --prompt TEXT, --prompt-file FILE or --prompt-ids IDS"
                            + (f" (got {', '.join(given)})" if given else ""))
    if prompt_ids is not None:
        return None
    where = "--prompt"
    if prompt_file is not None:
        where = f"--prompt-file: {prompt_file}"
        try:
            raw = Path(prompt_file).read_bytes()
        except FileNotFoundError:
            raise base.BadInput(f"{where}: no such file") from None
        except IsADirectoryError:
            raise base.BadInput(f"{where}: is a folder, expected a UTF-8 text file") from None
        except OSError as exc:
            raise base.BadInput(f"{where}: {exc.strerror or exc}") from None
        try:
            prompt = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise base.BadInput(f"{where}: not UTF-8 text (byte {exc.start})") from None
    if not prompt:
        raise base.BadInput(f"{where}: the prompt is empty; give some text to continue")
    return prompt


def _prompt_ids(prompt: str | None, prompt_ids: str | None, vocabulary, vocab_size: int) -> np.ndarray:
    """The prompt's token ids: --prompt-ids checked against the vocabulary, or the text encoded."""
    base = _base()
    if prompt is None:
        try:
            ids = [int(t) for t in prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise base.BadInput(f"--prompt-ids: got {prompt_ids!r}, expected integers separated by commas") from None
        if not ids:
            raise base.BadInput("--prompt-ids: got no ids, expected at least one")
        bad = [i for i in ids if not 0 < i < vocabulary.vocab_size]
        if bad:
            raise base.BadInput(f"--prompt-ids: id {bad[0]} is outside the vocabulary (ids 1..{vocabulary.vocab_size - 1};"
                                " 0 is padding)")
        return np.asarray(ids, "int32")
    ids = np.asarray(vocabulary.encode(prompt), "int32")
    if ids.size == 0:
        raise base.BadInput("the prompt encodes to no tokens")
    if ids.max() >= vocab_size:
        raise base.BadInput(f"the vocabulary gives id {ids.max()}, outside the model's {vocab_size}")
    return ids


def _sampler(temperature, top_k, top_p, sampler_name):
    base = _base()
    options = {}
    if temperature is not None:
        options["temperature"] = temperature
    if sampler_name is not None:
        name = sampler_name
    elif top_p is not None:
        name = "top_p"
    elif top_k is not None:
        name = "top_k"
    elif temperature is not None:
        name = "temperature"
    else:
        name = "greedy"
    if top_p is not None:
        options["p"] = top_p
    if top_k is not None:
        options["k"] = top_k
    if top_k is not None and top_p is not None:
        raise base.BadInput("--top-k and --top-p: give one of them")
    from meliad_core import assemble

    return assemble.sampler(name, options)  # RecipeError / PluginError: one line, exit 2


class _TextStream:
    """Writes the text of the ids generated so far as it grows (holding back a partial UTF-8 character)."""

    def __init__(self, vocabulary, out):
        self.vocabulary, self.out = vocabulary, out
        self.ids: list[int] = []
        self.written = 0

    def __call__(self, ids) -> None:
        self.ids.append(int(np.asarray(ids).reshape(-1)[0]))
        text = self.vocabulary.decode(self.ids)
        end = len(text.rstrip("\ufffd"))
        if end > self.written:
            self.out.write(text[self.written:end])
            self.out.flush()
            self.written = end

    def finish(self) -> None:
        text = self.vocabulary.decode(self.ids)
        self.out.write(text[self.written:] + "\n")
        self.out.flush()


def add_generation_commands(cli: click.Group) -> None:
    """Adds `generate` and `eval` to the `meliad` command group."""
    base = _base()

    @cli.command("generate")
    @click.argument("target", metavar="WORKDIR|RECIPE")
    @click.option("--checkpoint", "step", type=click.IntRange(min=0), default=None, metavar="STEP",
                  help="The checkpoint of this step (default: the newest intact one).")
    @click.option("--prompt", default=None, help="The text to continue.")
    @click.option("--prompt-file", type=click.Path(path_type=Path, dir_okay=True), default=None,
                  help="A UTF-8 file holding the text to continue.")
    @click.option("--prompt-ids", default=None, metavar="IDS", help="The prompt as token ids, e.g. 12,7,99.")
    @click.option("--max-tokens", type=click.IntRange(min=0), required=True, metavar="N",
                  help="Generate at most N tokens.")
    @click.option("--temperature", type=float, default=None, metavar="T", help="Sample at temperature T.")
    @click.option("--top-k", type=int, default=None, metavar="K", help="Sample among the K most likely tokens.")
    @click.option("--top-p", type=float, default=None, metavar="P", help="Nucleus sampling with mass P.")
    @click.option("--sampler", "sampler_name", default=None, metavar="NAME",
                  help="A sampler by name (a plugin's); default: greedy, or what the options above imply.")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler.")
    @click.option("--stop-id", "stop_ids", type=int, multiple=True, metavar="ID",
                  help="Stop after generating this token id (repeatable).")
    @click.option("--backend", type=click.Choice(base.BACKENDS), default=None,
                  help="Keras backend (default: the run's, from its checkpoint).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a key of RECIPE.")
    @click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=base._set_debug,
                  help="On an error, show the full traceback.")
    def generate(target, step, prompt, prompt_file, prompt_ids, max_tokens, temperature, top_k, top_p,
                 sampler_name, seed, stop_ids, backend, overrides):
        """Continue a prompt with a run's model (memory and recurrent state live), streaming text to stdout.

        The prompt's whole segments go through the segment path, the rest and the generated text token by
        token through the compiled decoding step. Without sampling options decoding is greedy.
        """
        prompt = _prompt_text(prompt, prompt_file, prompt_ids)  # checked before anything heavy happens
        model, recipe, vocabulary, _ = load_target(target, step, backend, overrides)
        ids = _prompt_ids(prompt, prompt_ids, vocabulary, model.vocab_size)
        sampler = _sampler(temperature, top_k, top_p, sampler_name)
        out = _TextStream(vocabulary, sys.stdout)
        banned = [0] + list(range(vocabulary.vocab_size, model.vocab_size))
        model.generate(ids, max_tokens=max_tokens, sampler=sampler, seed=seed, stop_ids=stop_ids,
                       banned_ids=banned, on_tokens=out)
        out.finish()

    @cli.command("eval")
    @click.argument("workdir", type=click.Path(exists=True, file_okay=False, path_type=Path))
    @click.option("--checkpoint", "step", type=click.IntRange(min=0), default=None, metavar="STEP",
                  help="The checkpoint of this step (default: the newest intact one).")
    @click.option("--data", "data", multiple=True, metavar="RECIPE|KEY=VALUE",
                  help="The data to evaluate on: a recipe (its data section) or data.KEY=VALUE overrides of the "
                       "run's data (repeatable; default: the run's eval split).")
    @click.option("--batches", type=click.IntRange(min=1), default=None, metavar="K",
                  help="Stop after K batches (default: read every eval document to its end).")
    @click.option("--token-losses", type=click.Path(path_type=Path, dir_okay=False), default=None,
                  metavar="OUT.npz", help="Write every token's loss (bits), id, scored flag and document starts.")
    @click.option("--report", "with_report", is_flag=True,
                  help="Also write the long-range report of these batches (WORKDIR/report/eval_step_<N>/).")
    @click.option("--backend", type=click.Choice(base.BACKENDS), default=None,
                  help="Keras backend (default: the run's, from its checkpoint).")
    @click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=base._set_debug,
                  help="On an error, show the full traceback.")
    def eval_command(workdir, step, data, batches, token_losses, with_report, backend):
        """Evaluate WORKDIR's checkpoint on whole held-out documents, each from its start.

        Every batch slot reads eval documents from the first one, with empty caches, memories and states,
        until the split is exhausted (or K batches with --batches); a slot with no document left is fed
        padding, which is not scored. Prints bits/token and bits/char as the run's eval metric computes them.
        """
        found = _checkpoint(workdir, step)
        recipe_map = found[1].get("recipe")
        if not isinstance(recipe_map, dict):
            raise base.BadInput(f"{found[0]}: the checkpoint's manifest holds no recipe")
        if token_losses is not None and token_losses.suffix != ".npz":
            raise base.BadInput(f"--token-losses: got {str(token_losses)!r}, expected a file name ending in .npz")
        _choose_backend(backend, found[1].get("backend"))
        from meliad_core.config import migrate_stored_recipe

        recipe = _eval_recipe(migrate_stored_recipe(recipe_map), data)
        from meliad_core import checkpoint as ckpt
        from meliad_core.data import stream
        from meliad_core.model import build_model
        from meliad_core.vocab import load_vocabulary

        vocabulary = load_vocabulary(recipe.data)
        batches_of = stream(recipe, split="eval")
        model = build_model(recipe, vocab_size=recipe.model.vocab_size or vocabulary.vocab_size, streams=("eval",))
        try:
            ckpt.restore(model, None, found[1], found[2], weights_only=True)
        except ckpt.CheckpointError as exc:
            raise base.BadInput(str(exc)) from None
        result = evaluate_documents(model, batches_of, batches, keep=token_losses is not None or with_report)
        if token_losses is not None:
            token_losses.parent.mkdir(parents=True, exist_ok=True)
            np.savez(token_losses, **{key: result.kept[key] for key in TOKEN_LOSS_KEYS})
        ending = ("every document read to its end" if result.exhausted
                  else f"stopped at --batches {batches}, documents left unread")
        click.echo(f"eval of {found[0]} (step {found[1].get('step')}) on {recipe.data.source!r} eval documents: "
                   f"{result.batches} batches of {recipe.data.batch_size} x {recipe.data.segment_length} tokens, "
                   f"{result.documents_complete} documents complete ({ending}), {int(result.scored):,} scored "
                   f"tokens: {result.bits_per_token:.4f} bits/token, {result.bits_per_char:.4f} bits/char")
        if with_report:
            write_eval_report(workdir, found, recipe, result)


TOKEN_LOSS_KEYS = ("bits", "tokens", "scored", "start_of_sequence", "live")


def _eval_recipe(recipe_map: dict, data_args):
    """The run's recipe with its data section replaced by a recipe's (--data RECIPE) or overridden
    (--data data.KEY=VALUE), validated; BadInput naming the bad key."""
    import yaml

    from meliad_core import recipes
    from meliad_core.config import RecipeError, validate_recipe

    base = _base()
    mapping = {**recipe_map, "data": dict(recipe_map["data"])}
    for item in data_args:
        if "=" in item:
            key, _, value = item.partition("=")
            parts = key.strip().split(".")
            if parts[0] != "data" or len(parts) < 2:
                raise base.BadInput(f"--data {item}: expected data.KEY=VALUE or a recipe")
            node = mapping
            for part in parts[:-1]:
                node[part] = dict(node.get(part) or {})
                node = node[part]
            node[parts[-1]] = yaml.safe_load(value)
        else:
            mapping["data"] = dict(recipes.load_recipe(item).to_dict()["data"])
    try:
        return validate_recipe(mapping)
    except RecipeError as exc:
        raise base.BadInput(f"--data: {exc}") from None


class EvalResult:
    """What `evaluate_documents` measured: sums over scored tokens, counts, and (keep=True) per-token arrays."""

    def __init__(self):
        self.nats = self.scored = self.chars = 0.0
        self.batches = self.documents_started = self.documents_complete = 0
        self.exhausted = False
        self.kept: dict[str, np.ndarray] = {}

    @property
    def bits_per_token(self) -> float:
        from meliad_core.units import LOG2E

        return self.nats * LOG2E / max(self.scored, 1.0)

    @property
    def bits_per_char(self) -> float:
        from meliad_core.units import LOG2E

        return self.nats * LOG2E / max(self.chars, 1e-6)


def evaluate_documents(model, batches, max_batches: int | None = None, keep: bool = False) -> EvalResult:
    """Scores the eval documents of `batches` (a fresh BatchStream) on the model's eval stream.

    A slot's documents are those of the stream's first epoch (its `epoch` 0): once a slot has run out
    (the stream would hand it a document of the next epoch) it is fed padding (id 0, no document start,
    no characters), which the loss never scores, and the pass ends when every slot has run out, or
    after `max_batches`. Losses are the run's: `token_losses`, summed in float64.
    """
    from meliad_core.model import token_losses
    from meliad_core.report import DocumentPositions
    from meliad_core.units import LOG2E

    result = EvalResult()
    size, length = batches.batch_size, batches.segment_length
    positions = DocumentPositions(size, length)
    kept: dict[str, list] = {key: [] for key in (*TOKEN_LOSS_KEYS, "positions", "segments", "long_range")}
    with model.inference_stream("eval"):
        batch = next(batches)
        while True:
            live = np.asarray(batch["epoch"]) == 0
            if not live.any():
                result.exhausted = True
                break
            if max_batches is not None and result.batches >= max_batches:
                break
            tokens = np.where(live[:, None], batch["tokens"], 0).astype("int32")
            start = np.asarray(batch["start_of_sequence"], bool) & live
            slots = batches.get_state()["slots"]  # [epoch, position, segment, segments] after this batch
            logits = model.predict_on_batch({"tokens": tokens, "start_of_sequence": start})
            nats, valid, _ = token_losses(tokens, logits, model.loss_mask_ids)
            nats = np.asarray(model_numpy(nats), np.float64)
            valid = np.asarray(model_numpy(valid)) > 0
            result.nats += float(nats[valid].sum())
            result.scored += float(valid.sum())
            result.chars += float(np.sum(np.where(live, batch["num_chars"], 0)))
            result.batches += 1
            result.documents_started += int(start.sum())
            result.documents_complete += sum(1 for i, slot in enumerate(slots) if live[i] and slot[2] == slot[3])
            where = positions.update(start)
            if keep:
                target_long = np.concatenate([batch["long_range"][:, 1:], np.zeros((size, 1), bool)], axis=1)
                for key, value in (("bits", (nats * LOG2E).astype(np.float32)), ("tokens", tokens),
                                   ("scored", valid), ("start_of_sequence", start), ("live", live),
                                   ("positions", where), ("long_range", target_long & live[:, None]),
                                   ("segments", np.broadcast_to(positions.segments[:, None], (size, length)))):
                    kept[key].append(np.asarray(value))
            batch = next(batches)  # read ahead: it says whether any document is left
    if keep:
        empty = {"bits": np.float32, "tokens": np.int32, "positions": np.int64, "segments": np.int64}
        result.kept = {key: np.stack(value) if value else np.zeros((0, size, length), empty.get(key, bool))
                       for key, value in kept.items()}
    return result


def write_eval_report(workdir: Path, found, recipe, result: EvalResult) -> dict:
    """The long-range report (`meliad_core.report`) of an eval pass, on the data it read, written to
    WORKDIR/report/eval_step_<N>/ (long_range.json, and the plot when matplotlib is installed)."""
    import keras

    from meliad_core import report

    kept = result.kept
    scored = kept["scored"]
    stats = report.summarize(kept["positions"][scored], kept["bits"][scored], kept["long_range"][scored],
                             kept["segments"][scored], recipe.data.segment_length)
    out = {"format": report.FORMAT, "workdir": str(workdir), "checkpoint": str(found[0]),
           "step": int(found[1].get("step", 0)), "recipe": recipe.name, "backend": keras.backend.backend(),
           "data": recipe.to_dict()["data"],
           "batches": result.batches, "batch_size": recipe.data.batch_size,
           "segment_length": recipe.data.segment_length, "window": recipe.attention.window,
           "documents_started": result.documents_started, "documents_complete": result.documents_complete,
           "all_documents": result.exhausted, **stats, "plot": None}
    return report.write_report(out, workdir / report.REPORT_DIR / f"eval_step_{found[1].get('step')}")


def model_numpy(x) -> np.ndarray:
    import keras

    return keras.ops.convert_to_numpy(x)
