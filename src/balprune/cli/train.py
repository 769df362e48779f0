"""The fine-tuning commands: finetune, sweep, sensitivity (registered on the app by ``register``).

Same shape as the other commands: strict option parsing (usage errors, exit 2, before any file
is opened), one library call (balprune.finetune), rich rendering (balprune.cli.render_train).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import typer

from ..config import (
    check_cli_pattern_options,
    load_config,
    prune_options_from_config,
)
from ..container import check_output_path
from ..errors import ConfigError, Interrupted, UsageError
from ..values import parse_block_shape, parse_positive_int
from . import render, render_train
from .options import (
    csv_items,
    parse_int_list,
    parse_shape_list,
    parse_sparsity_list,
    parse_tolerance,
    usage,
)


def _progress(enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    return render_train.progress_bar(render.console(stderr=True))


@contextlib.contextmanager
def _resumable(folder: Path):
    """An interruption says what was kept: the last finished stage, to continue with --resume."""
    try:
        yield
    except Interrupted as exc:
        exc.message = (f"{exc.message.split(';')[0]}; {folder} keeps every finished stage; "
                       "continue with --resume")
        raise


def _default_out(recipe: Path, suffix: str) -> Path:
    return Path(f"{recipe.stem}-{suffix}")


# --------------------------------------------------------------------------- finetune


def finetune(
    recipe: Path = typer.Argument(..., help="A fine-tuning recipe (TOML): [task], [train], [prune], [schedule]."),
    data: Path | None = typer.Option(None, "--data", help="Data folder of the task (PTB text, ImageFolder)."),
    out: Path | None = typer.Option(None, "--out", help="Run folder (default: <recipe name>-run)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Start over, replacing an earlier run in --out."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA when present)."),
    no_export: bool = typer.Option(False, "--no-export", help="Do not write the packed model."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON instead of a table."),
) -> None:
    """Algorithm 1 end to end: train dense, then prune a schedule step, fine-tune, evaluate, until the target."""
    from ..finetune.recipe import load_recipe
    from ..finetune.run import resolve_device, run_finetune

    if resume and force:
        raise UsageError("--resume and --force exclude each other")
    r = load_recipe(recipe)
    resolve_device(device)
    folder = out if out is not None else _default_out(recipe, "run")
    err = render.console(stderr=True)
    bar = _progress(not as_json)
    with _resumable(folder):
        if bar is None:
            def on_event(e):
                if e.phase == "stage":
                    err.print(render.literal(render_train.stage_line(e)))
            result = run_finetune(r, folder, data=data, resume=resume, force=force, device=device,
                                  export=not no_export, progress=on_event)
        else:
            with bar:
                task = bar.add_task("starting", total=1, loss="-", metric="")
                result = run_finetune(r, folder, data=data, resume=resume, force=force, device=device,
                                      export=not no_export,
                                      progress=lambda e: render_train.update_bar(bar, task, e, err))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    con = render.console()
    con.print(render_train.finetune_table(result))
    if result.packed:
        con.print(render.literal(f"packed model: {result.packed} ({render.human_bytes(result.packed_bytes)}, "
                                 f"{100 * result.packed_bytes / result.dense_bytes:.1f}% of "
                                 f"{render.human_bytes(result.dense_bytes)} dense)"))
    con.print(render.literal(f"metrics: {Path(folder) / 'metrics.json'}"))


# --------------------------------------------------------------------------- sweep


def sweep(
    recipe: Path = typer.Argument(..., help="A fine-tuning recipe (TOML); its pattern and sparsity are swept."),
    patterns: str = typer.Option("balanced,unstructured,block,vector", "--patterns",
                                 callback=usage(lambda v: csv_items(v, "--patterns")),
                                 help="Patterns, comma-separated: balanced, unstructured, block, vector."),
    sparsities: str = typer.Option("0.5,0.6,0.7,0.8,0.9,0.95", "--sparsities", callback=usage(parse_sparsity_list),
                                   help="Target sparsities, comma-separated (at most 64)."),
    blocks: str | None = typer.Option(None, "--blocks", callback=usage(lambda v: parse_int_list(v, "--blocks")),
                                      help="Balanced: blocks per row, one line each (e.g. 8,16,32,64)."),
    block_sizes: str | None = typer.Option(None, "--block-sizes",
                                           callback=usage(lambda v: parse_int_list(v, "--block-sizes")),
                                           help="Balanced: block lengths (balance range), one line each (e.g. 8,16,32)."),
    block_shapes: str | None = typer.Option(None, "--block-shapes", callback=usage(parse_shape_list),
                                            help="Block: tile shapes, one line each (e.g. 4x4,8x8,16x16)."),
    vector_lengths: str | None = typer.Option(None, "--vector-lengths",
                                              callback=usage(lambda v: parse_int_list(v, "--vector-lengths")),
                                              help="Vector: vector lengths, one line each (e.g. 4,8)."),
    data: Path | None = typer.Option(None, "--data", help="Data folder of the task."),
    out: Path | None = typer.Option(None, "--out", help="Sweep folder (default: <recipe name>-sweep)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a sweep: finished runs are kept."),
    force: bool = typer.Option(False, "--force", help="Start over, replacing an earlier sweep in --out."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA when present)."),
    no_plot: bool = typer.Option(False, "--no-plot", help="Skip the PNG plot (no matplotlib needed)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of a table."),
) -> None:
    """The paper's figure: prune + fine-tune every pattern at every sparsity with the same budget; table, JSON, PNG."""
    from ..finetune.recipe import load_recipe
    from ..finetune.run import resolve_device
    from ..finetune.sweep import run_sweep, variants_for

    if resume and force:
        raise UsageError("--resume and --force exclude each other")
    for option, values, owner in (("--blocks", blocks, "balanced"), ("--block-sizes", block_sizes, "balanced"),
                                  ("--block-shapes", block_shapes, "block"),
                                  ("--vector-lengths", vector_lengths, "vector")):
        if values and owner not in patterns:
            raise UsageError(f"{option} applies to the {owner} pattern, which --patterns ({','.join(patterns)}) "
                             "does not sweep")
    r = load_recipe(recipe)
    variants = variants_for(r, patterns, blocks, block_shapes, vector_lengths, block_sizes)
    resolve_device(device)
    folder = out if out is not None else _default_out(recipe, "sweep")
    err = render.console(stderr=True)
    bar = _progress(not as_json)
    with _resumable(folder):
        if bar is None:
            def on_event(label, e):
                if e.phase == "stage" and e.stage == e.stages:
                    err.print(render.literal(f"{label}: {render_train.stage_line(e)}"))
            result = run_sweep(r, folder, variants, sparsities, data=data, device=device, resume=resume,
                               force=force, plot=not no_plot, progress=on_event)
        else:
            with bar:
                task = bar.add_task("starting", total=1, loss="-", metric="")
                result = run_sweep(r, folder, variants, sparsities, data=data, device=device, resume=resume,
                                   force=force, plot=not no_plot,
                                   progress=lambda label, e: render_train.update_bar(bar, task, e, err, label=label))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    con = render.console()
    con.print(render_train.sweep_table(result))
    con.print(render.literal(f"results: {Path(folder) / 'sweep.json'}"
                             + ("" if no_plot else f", plot: {Path(folder) / 'sweep.png'}")))


# --------------------------------------------------------------------------- sensitivity


def sensitivity(
    source: Path = typer.Argument(..., help="A checkpoint (data-free proxy) or a fine-tuning recipe .toml (task metric)."),
    pattern: str | None = typer.Option(None, "--pattern", "-p", help="balanced (default), unstructured, block or vector."),
    blocks: str | None = typer.Option(None, "--blocks", "-b",
                                      callback=usage(lambda v: parse_positive_int(v, what="--blocks")),
                                      help="Balanced: blocks per row (default 32)."),
    block_shape: str | None = typer.Option(None, "--block-shape",
                                           callback=usage(lambda v: "x".join(map(str, parse_block_shape(v)))),
                                           help="Block pattern: tile shape HxW (default 8x8)."),
    vector_length: str | None = typer.Option(None, "--vector-length",
                                             callback=usage(lambda v: parse_positive_int(v, what="--vector-length")),
                                             help="Vector pattern: weights per vector (default 8)."),
    config: Path | None = typer.Option(None, "--config", help="Checkpoint mode: a prune config for pattern, include, exclude."),
    sparsities: str = typer.Option("0.5,0.6,0.7,0.8,0.9,0.95", "--sparsities", callback=usage(parse_sparsity_list),
                                   help="Sparsities to try per layer, comma-separated (at most 64)."),
    tolerance: str | None = typer.Option(None, "--tolerance", callback=usage(parse_tolerance),
                                         help="Largest degradation a layer's plan allows (metric: 0.02 relative; "
                                              "proxy: 0.3 relative output error)."),
    samples: str = typer.Option("64", "--samples", callback=usage(lambda v: parse_positive_int(v, what="--samples")),
                                help="Proxy: random input vectors per layer."),
    seed: str = typer.Option("0", "--seed", callback=usage(lambda v: parse_positive_int(v, what="--seed", minimum=0)),
                             help="Proxy: seed of the random inputs."),
    key: str | None = typer.Option(None, "--key", help="Checkpoint mode: entry holding the state dict (dotted path)."),
    data: Path | None = typer.Option(None, "--data", help="Recipe mode: data folder of the task."),
    device: str | None = typer.Option(None, "--device", help="Recipe mode: cpu, cuda or cuda:N."),
    dense: Path | None = typer.Option(None, "--dense", help="Recipe mode: the dense model (a sweep's dense.pt) "
                                                            "instead of training it."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Plan to write (default: <source name>.plan.toml)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing plan / JSON file."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the full result (JSON) here."),
) -> None:
    """Per-layer sensitivity (one layer pruned at a time) and a per-layer sparsity plan for `prune --config`."""
    from ..finetune.sensitivity import sensitivity_from_checkpoint, sensitivity_from_recipe, write_plan
    from ..iopaths import check_io

    recipe_mode = source.suffix == ".toml"
    grid = sparsities
    overrides = {"sparsity": max(grid), "blocks": blocks, "block_size": None, "block_shape": block_shape,
                 "vector_length": vector_length, "nm": None, "scope": None}
    plan_path = output if output is not None else Path(f"{source.stem}.plan.toml")
    io = {"inputs": [("recipe" if recipe_mode else "checkpoint", source), ("--config", config), ("--dense", dense),
                     ("--data", data)],
          "outputs": [("-o/--output", plan_path), ("--json", json_out)]}
    check_io(**io)  # two outputs on one file (exit 2) or over an input (exit 3): before anything is read
    if pattern is not None or (not recipe_mode and config is None):
        check_cli_pattern_options(pattern, overrides)  # else after the recipe / config is read
    check_output_path(plan_path, force=force)
    check_output_path(json_out, force=force)
    err = render.console(stderr=True)
    bar = _progress(True)
    if recipe_mode:
        from ..finetune.recipe import load_recipe
        from ..finetune.run import resolve_device

        if config is not None or key is not None:
            raise UsageError("--config and --key apply to a checkpoint; a recipe carries its own [prune] table")
        r = load_recipe(source)
        io["inputs"].append(("[train] init", r.train.init or None))
        check_io(**io)
        opts = prune_options_from_config(r.prune_config, overrides=overrides, pattern=pattern, error=ConfigError)
        r = r.with_options(opts)
        resolve_device(device)
        tol = 0.02 if tolerance is None else tolerance
        run = lambda progress: sensitivity_from_recipe(r, grid, data=data, device=device, tolerance=tol,  # noqa: E731
                                                       dense=dense, progress=progress)
    else:
        if data is not None or dense is not None or device is not None:
            raise UsageError("--data, --dense and --device apply to a recipe; a checkpoint gets the data-free proxy")
        cfg = load_config(config) if config is not None else {}
        opts = prune_options_from_config(cfg, overrides=overrides, pattern=pattern,
                                         error=UsageError if config is None else ConfigError)
        tol = 0.3 if tolerance is None else tolerance
        run = lambda progress: sensitivity_from_checkpoint(source, opts, grid, samples=samples, seed=seed,  # noqa: E731
                                                           tolerance=tol, key=key, progress=progress,
                                                           outputs=io["outputs"])
    if bar is None:
        result = run(None)
    else:
        with bar:
            task = bar.add_task("sensitivity", total=1, loss="", metric="")
            result = run(lambda done, total, name: bar.update(task, completed=done, total=total,
                                                              description=render.visible(name[-40:])))
    write_plan(result, opts.pattern, plan_path, force=force)
    if json_out is not None:
        from ..finetune.run import write_json

        write_json(json_out, result.to_dict())
    con = render.console()
    con.print(render_train.sensitivity_table(result))
    err.print(render.literal(f"plan: {plan_path} (balprune prune CKPT --config {plan_path})"))


def register(app: typer.Typer) -> None:
    """Add the fine-tuning commands to ``app``."""
    app.command("finetune")(finetune)
    app.command("sweep")(sweep)
    app.command("sensitivity")(sensitivity)
