"""`meliad generate` and `meliad eval`: a trained run's checkpoint read and written with, state live.

    meliad generate runs/quickstart --prompt "The ledger of" --max-tokens 200 --top-p 0.9 --seed 1
    meliad generate quickstart --prompt-file prompt.txt --max-tokens 50          # a recipe: untrained weights
    meliad eval runs/quickstart --batches 48 --token-losses losses.npz
    meliad eval runs/quickstart --data data.source=text_files --data 'data.options.paths=[book.txt]'

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
        recipe_map = found[1].get("recipe")
        if not isinstance(recipe_map, dict):
            raise base.BadInput(f"{found[0]}: the checkpoint's manifest holds no recipe")
        _choose_backend(backend, found[1].get("backend"))
        from meliad_core.config import validate_recipe

        recipe = validate_recipe(recipe_map)
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
                  help="Batches from the start of the eval split (default: the run's eval.steps, or 10).")
    @click.option("--token-losses", type=click.Path(path_type=Path, dir_okay=False), default=None,
                  metavar="OUT.npz", help="Write every token's loss (bits), id, position and scored flag.")
    @click.option("--report", "with_report", is_flag=True,
                  help="Also write the long-range report (WORKDIR/report/eval_step_<N>/, the run's own data).")
    @click.option("--backend", type=click.Choice(base.BACKENDS), default=None,
                  help="Keras backend (default: the run's, from its checkpoint).")
    @click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=base._set_debug,
                  help="On an error, show the full traceback.")
    def eval_command(workdir, step, data, batches, token_losses, with_report, backend):
        """Evaluate WORKDIR's checkpoint on whole held-out documents, each from its start.

        Streams K eval batches from the first document with empty caches, memories and states and prints
        bits/token and bits/char, computed as the run's eval metric is.
        """
        import yaml

        found = _checkpoint(workdir, step)
        recipe_map = found[1].get("recipe")
        if not isinstance(recipe_map, dict):
            raise base.BadInput(f"{found[0]}: the checkpoint's manifest holds no recipe")
        if token_losses is not None and token_losses.suffix != ".npz":
            raise base.BadInput(f"--token-losses: got {str(token_losses)!r}, expected a file name ending in .npz")
        _choose_backend(backend, found[1].get("backend"))
        from meliad_core import recipes
        from meliad_core.config import RecipeError, validate_recipe

        mapping = {**recipe_map, "data": dict(recipe_map["data"])}
        for item in data:
            if "=" in item:
                key, _, value = item.partition("=")
                key = key.strip()
                parts = key.split(".")
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
            recipe = validate_recipe(mapping)
        except RecipeError as exc:
            raise base.BadInput(f"--data: {exc}") from None
        from meliad_core import checkpoint as ckpt
        from meliad_core.data import stream
        from meliad_core.model import build_model, token_losses as losses_of
        from meliad_core.units import LOG2E
        from meliad_core.vocab import load_vocabulary

        vocabulary = load_vocabulary(recipe.data)
        model = build_model(recipe, vocab_size=recipe.model.vocab_size or vocabulary.vocab_size, streams=("eval",))
        try:
            ckpt.restore(model, None, found[1], found[2], weights_only=True)
        except ckpt.CheckpointError as exc:
            raise base.BadInput(str(exc)) from None
        count = batches or recipe.eval.steps or 10
        batches_of = stream(recipe, split="eval")
        nats_total = chars = scored = 0.0
        kept = {"bits": [], "tokens": [], "scored": [], "start_of_sequence": []}
        with model.inference_stream("eval"):
            for _ in range(count):
                batch = next(batches_of)
                logits = model.predict_on_batch({"tokens": batch["tokens"],
                                                 "start_of_sequence": batch["start_of_sequence"]})
                nats, valid, _ = losses_of(batch["tokens"], logits, model.loss_mask_ids)
                nats = np.asarray(model_numpy(nats), np.float64)
                valid = np.asarray(model_numpy(valid)) > 0
                nats_total += float(nats[valid].sum())
                scored += float(valid.sum())
                chars += float(np.sum(batch["num_chars"]))
                if token_losses is not None:
                    kept["bits"].append((nats * LOG2E).astype(np.float32))
                    kept["tokens"].append(np.asarray(batch["tokens"], np.int32))
                    kept["scored"].append(valid)
                    kept["start_of_sequence"].append(np.asarray(batch["start_of_sequence"], bool))
        bits_token = nats_total * LOG2E / max(scored, 1.0)
        bits_char = nats_total * LOG2E / max(chars, 1e-6)
        if token_losses is not None:
            token_losses.parent.mkdir(parents=True, exist_ok=True)
            np.savez(token_losses, **{key: np.stack(value) for key, value in kept.items()})
        click.echo(f"eval of {found[0]} (step {found[1].get('step')}): {count} batches of "
                   f"{recipe.data.batch_size} x {recipe.data.segment_length} tokens, {int(scored):,} scored tokens: "
                   f"{bits_token:.4f} bits/token, {bits_char:.4f} bits/char")
        if with_report:
            from meliad_core import report

            previous, report.REPORT_DIR = report.REPORT_DIR, f"{report.REPORT_DIR}/eval_step_{found[1].get('step')}"
            try:
                report.long_range_report(workdir, count, checkpoint=found)
            finally:
                report.REPORT_DIR = previous


def model_numpy(x) -> np.ndarray:
    import keras

    return keras.ops.convert_to_numpy(x)
