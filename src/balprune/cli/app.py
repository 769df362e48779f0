"""The Typer commands: parse, build a config, call one library function, render the result.

Option values are parsed by the strict parsers of balprune.values inside Click callbacks, so a
bad value is a usage error (exit 2) before any file is opened.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List

import typer

from .. import __version__
from ..config import (
    PruneOptions,
    check_cli_pattern_options,
    load_config,
    prune_options_from_config,
)
from ..container import check_output_path
from ..errors import EXIT_REGRESSION, ConfigError, GpuRuntimeError, InvalidInputError, UsageError
from ..values import (
    MAX_NEW_TOKENS,
    parse_block_shape,
    parse_nm,
    parse_positive_int,
    parse_sparsity,
)
from . import render
from .options import csv_items, parse_int_list, parse_sparsity_list, usage

app = typer.Typer(
    name="balprune",
    help="Balanced Sparsity pruning: prune checkpoints, write packed balanced-sparse safetensors, "
    "verify and inspect them.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_STATE = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"balprune {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    _STATE["debug"] = debug


def _progress_bar(enabled: bool):
    """A rich progress bar on stderr, or None when output is not for a person."""
    if not enabled or not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    # markup=False: the description is a tensor name (file text), shown as written (render.visible).
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
                    TimeRemainingColumn(),
                    console=render.console(stderr=True), transient=True)


def _parse_criterion(value: str) -> str:
    from ..prune.criteria import Criterion

    if value not in {c.value for c in Criterion}:
        raise UsageError(f"--criterion must be {', '.join(c.value for c in Criterion)}, got {value!r}")
    return value


def _parse_calibration_device(value: str) -> str:
    from ..config import CALIBRATION_DEVICES

    if value not in CALIBRATION_DEVICES:
        raise UsageError(f"--device must be {' or '.join(CALIBRATION_DEVICES)}, got {value!r}")
    return value


@app.command()
def prune(
    checkpoint: Path = typer.Argument(..., help="A .pt/.pth/.bin state dict, a .safetensors file, or a sharded folder / *.index.json."),
    sparsity: str | None = typer.Option(None, "--sparsity", "-s", callback=usage(parse_sparsity),
                                           help="Fraction of weights to remove, in [0, 1), e.g. 0.9."),
    blocks: str | None = typer.Option(None, "--blocks", "-b", callback=usage(lambda v: parse_positive_int(v, what="--blocks")),
                                         help="Balanced: blocks per row (default 32)."),
    block_size: str | None = typer.Option(None, "--block-size", callback=usage(lambda v: parse_positive_int(v, what="--block-size")),
                                             help="Balanced: block length L instead of --blocks."),
    nm: str | None = typer.Option(None, "--nm", callback=usage(lambda v: (parse_nm(v), v)[1]),
                                     help="Balanced N:M, e.g. 2:4 (block length M, keep N); replaces --sparsity."),
    pattern: str | None = typer.Option(None, "--pattern", "-p", help="balanced (default), unstructured, block or vector."),
    block_shape: str | None = typer.Option(None, "--block-shape", callback=usage(lambda v: ("x".join(map(str, parse_block_shape(v))))),
                                              help="Block pattern: tile shape HxW (default 8x8)."),
    vector_length: str | None = typer.Option(None, "--vector-length", callback=usage(lambda v: parse_positive_int(v, what="--vector-length")),
                                                help="Vector pattern: weights per 1-D vector (default 8)."),
    scope: str | None = typer.Option(None, "--scope", help="Unstructured: tensor (default) or global."),
    include: List[str] = typer.Option([], "--include", help="Only prune tensors matching this glob (repeatable; "
                                                            "one matching nothing is a warning)."),
    exclude: List[str] = typer.Option([], "--exclude", help="Never prune tensors matching this glob (repeatable; "
                                                            "one matching nothing is a warning)."),
    config: Path | None = typer.Option(None, "--config", help="TOML recipe: [prune], [schedule], [[layers]] rules."),
    steps: str | None = typer.Option(None, "--steps", callback=usage(lambda v: parse_positive_int(v, what="--steps")),
                                        help="Schedule steps of Algorithm 1 (one-shot without fine-tuning)."),
    schedule: str | None = typer.Option(None, "--schedule", help="cubic (default) or linear."),
    key: str | None = typer.Option(None, "--key", help="Entry of a torch checkpoint holding the state dict (dotted path)."),
    index: str | None = typer.Option(None, "--index", help="How balanced tensors store positions: auto (default: "
                                     "per tensor the smaller of the two), offsets (a byte per kept value; format v1) "
                                     "or bitmask (a bit per weight; format v2)."),
    strict: bool = typer.Option(False, "--strict", help="Refuse non-float matrices instead of passing them through, "
                                                         "and targets more than 2 points short of their sparsity (exit 4)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output file (default: <input>.<pattern>.safetensors beside the input)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file (atomically)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
    criterion: str | None = typer.Option(None, "--criterion", callback=usage(_parse_criterion),
                                         help="Which weights to keep: magnitude (default), wanda or sparsegpt "
                                              "(these two run a Llama-family HF folder on --calibration data)."),
    calibration: Path | None = typer.Option(None, "--calibration", help="wanda/sparsegpt: calibration data: token ids "
                                            "(.npy, or decimal ids separated by whitespace) or UTF-8 text."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="wanda/sparsegpt: a folder holding tokenizer.json, "
                                          "or the file, for text data (default: the model folder's)."),
    samples: str | None = typer.Option(None, "--samples", callback=usage(
        lambda v: parse_positive_int(v, what="--samples")),
        help="wanda/sparsegpt: calibration windows (default 128)."),
    seq_len: str | None = typer.Option(None, "--seq-len", callback=usage(
        lambda v: parse_positive_int(v, what="--seq-len")),
        help="wanda/sparsegpt: tokens per calibration window (default 512)."),
    device: str | None = typer.Option(None, "--device", callback=usage(_parse_calibration_device),
                                      help="wanda/sparsegpt: cpu (default) or cuda."),
) -> None:
    """Prune a checkpoint and write the packed balanced-sparse safetensors file."""
    from ..checkpoint import open_checkpoint
    from ..iopaths import check_io
    from ..prune.engine import default_output

    inputs = [("checkpoint", checkpoint), ("--config", config), ("--calibration", calibration),
              ("--tokenizer", tokenizer)]
    check_io(inputs=inputs, outputs=[("-o/--output", output)])  # before the config is read
    calibration_values = {"criterion": criterion, "calibration": calibration, "tokenizer": tokenizer,
                          "samples": samples, "seq_len": seq_len, "device": device}
    options = _prune_options(config, pattern, sparsity, blocks, block_size, nm, block_shape, scope,
                             include, exclude, steps, schedule, strict, vector_length, index, calibration_values)
    if options.calibration is not None:  # the config's own paths (relative to it), known only now
        inputs += [("calibration data", options.calibration.data), ("tokenizer", options.calibration.tokenizer)]
        check_io(inputs=inputs, outputs=[("-o/--output", output)])
    err = render.console(stderr=True)
    if options.pattern.sparsity == 0:
        err.print("warning: sparsity 0 prunes nothing; tensors pass through unchanged")
    out = output if output is not None else default_output(checkpoint, options.pattern.kind.value)
    if output is None:  # the default output path, known only now
        check_io(inputs=inputs, outputs=[("-o/--output", out)])  # the shards of a folder: prune_checkpoint
    if options.calibration is not None:
        report = _prune_calibrated(checkpoint, out, options, key=key, force=force, as_json=as_json)
    else:
        report = _prune_by_magnitude(open_checkpoint(checkpoint, key=key), out, options, force=force, as_json=as_json)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        render.console().print(render.prune_table(report))
    for note in report.notes:  # "warning: ..." / "note: ...", one line each; names are file text, not markup
        err.print(render.literal(note), soft_wrap=True)


def _prune_by_magnitude(ckpt, out: Path, options: PruneOptions, *, force: bool, as_json: bool):
    from ..prune.engine import prune_checkpoint

    bar = _progress_bar(not as_json)
    if bar is None:
        report = prune_checkpoint(ckpt, out, options, force=force)
    else:
        with bar:
            task = bar.add_task("pruning", total=sum(t.nbytes for t in ckpt.tensors))
            report = prune_checkpoint(ckpt, out, options, force=force,
                                      progress=lambda done, total, name: bar.update(
                                          task, completed=done, description=render.visible(name[-40:])))
    return report


def _prune_calibrated(checkpoint: Path, out: Path, options: PruneOptions, *, key: str | None, force: bool,
                      as_json: bool):
    """wanda / sparsegpt: the decoder linears of a Llama-family folder pruned layer by layer on the
    calibration windows (llm.calibrate), every other target by magnitude, in one packed file."""
    from ..finetune.run import resolve_device
    from ..llm.calibrate import calibration_windows, prune_layers, with_default_targets
    from ..llm.family import open_llm
    from ..prune.engine import prune_checkpoint

    cal, criterion = options.calibration, options.criterion
    folder = checkpoint.parent if checkpoint.name.endswith(".index.json") else checkpoint
    if not (folder.is_dir() and (folder / "config.json").exists()):
        raise UsageError(f"--criterion {criterion.value} runs the model on its calibration data: it needs a Hugging "
                         f"Face folder of the Llama family (config.json and safetensors), not {checkpoint}",
                         hint="use --criterion magnitude for other checkpoints")
    if key is not None:
        raise UsageError("--key applies to torch pickles; an HF folder's weights are found by its index")
    device = resolve_device(cal.device)  # exit 6 for cuda without a GPU, before any file is read
    options, targets_note = with_default_targets(options)
    cfg, ckpt = open_llm(folder)
    windows = calibration_windows(cfg, folder, cal.data, tokenizer=cal.tokenizer, samples=cal.samples,
                                  seq_len=cal.seq_len, seed=cal.seed)
    bar = None if as_json or not sys.stderr.isatty() else _count_bar()
    task = bar.add_task(f"{criterion.value}: decoder layers", total=cfg.num_hidden_layers) if bar else None

    def pruned_weights(plans):
        return prune_layers(cfg, ckpt, plans, windows, criterion, device=device,
                            progress=None if bar is None else lambda done, total: bar.update(task, completed=done))

    if bar is None:
        report = prune_checkpoint(ckpt, out, options, force=force, pruned_weights=pruned_weights)
    else:
        with bar:
            report = prune_checkpoint(ckpt, out, options, force=force, pruned_weights=pruned_weights)
    report.notes.append(f"note: criterion {criterion.value}: decoder linears pruned on {cal.samples} calibration "
                        f"windows of {cal.seq_len} tokens from {cal.data} ({device.type}); other targets by magnitude")
    if targets_note is not None:
        report.notes.append(targets_note)
    return report


def _prune_options(config, pattern, sparsity, blocks, block_size, nm, block_shape, scope, include, exclude,
                   steps, schedule, strict, vector_length=None, index=None, calibration=None) -> PruneOptions:
    overrides = {"sparsity": sparsity, "blocks": blocks, "block_size": block_size, "block_shape": block_shape,
                 "vector_length": vector_length, "nm": nm, "scope": scope}
    if pattern is not None or config is None:
        # An option the pattern ignores (--pattern block --blocks 16) is a usage error before any file is
        # opened; with the pattern from --config, prune_options_from_config checks it after reading it.
        check_cli_pattern_options(pattern, overrides)
    data = load_config(config) if config is not None else {}
    # CLI values win over the config's [prune] table, which wins over the defaults.
    return prune_options_from_config(data, overrides=overrides, pattern=pattern, schedule_kind=schedule,
                                     steps=steps, include=tuple(include), exclude=tuple(exclude), strict=strict,
                                     index=index, calibration=calibration or {},
                                     config_dir=None if config is None else config.parent,
                                     error=UsageError if config is None else ConfigError)


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_shard_size(text: str) -> int:
    """``--shard-size``: a positive byte count, plain (``1000000``) or with a unit as transformers writes
    them (``5GB`` = 5 * 10^9, ``500MiB`` = 500 * 2^20; units in any case), below 2^63."""
    import re

    m = re.fullmatch(r"([0-9]{1,19})\s*([A-Za-z]{0,3})", str(text).strip())
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise UsageError(f"--shard-size: expected a byte count such as 5GB, 500MiB or 1000000, got {str(text)[:40]!r}")
    size = int(m.group(1)) * _SIZE_UNITS[unit]
    if not 1 <= size < 2**63:
        raise UsageError(f"--shard-size: must be at least 1 byte and below 2^63, got {str(text)[:40]!r}")
    return size


@app.command()
def unpack(
    packed: Path = typer.Argument(..., help="A packed file written by `balprune prune`."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Dense safetensors file to write."),
    hf_folder: Path | None = typer.Option(None, "--hf-folder", help="Write a Hugging Face folder instead "
                                          "(sharded weights, index, config and tokenizer files): from_pretrained loads it."),
    like: Path | None = typer.Option(None, "--like", help="--hf-folder: take config.json and the tokenizer files "
                                     "from this source folder instead of the packed file's record."),
    shard_size: str | None = typer.Option(None, "--shard-size", callback=usage(parse_shard_size),
                                          help="--hf-folder: largest shard, e.g. 5GB (default), 500MiB or bytes."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file (or model folder)."),
) -> None:
    """Write the dense-with-zeros checkpoint back: every tensor at its name, shape and dtype (as one
    safetensors file, or with --hf-folder as a folder from_pretrained loads)."""
    if (output is None) == (hf_folder is None):
        raise UsageError("give exactly one of -o/--output (a safetensors file) and --hf-folder (a Hugging Face folder)")
    if hf_folder is None:
        given = [o for o, v in (("--like", like), ("--shard-size", shard_size)) if v is not None]
        if given:
            raise UsageError(f"{given[0]} applies to --hf-folder only, not to -o/--output")
        from ..formats.packed_file import unpack as unpack_file

        n = unpack_file(packed, output, force=force)
        render.console().print(render.literal(f"wrote {n} tensors to {output}"))
        return
    from ..llm.examples import MAX_SHARD_BYTES
    from ..llm.hfexport import export_hf_folder

    done = export_hf_folder(packed, hf_folder, like=like, force=force,
                            max_shard_bytes=MAX_SHARD_BYTES if shard_size is None else shard_size)
    err = render.console(stderr=True)
    for note in done.notes:
        err.print(render.literal(f"warning: {note}"), soft_wrap=True)
    render.console().print(render.literal(
        f"wrote {done.folder}: {done.tensors} tensors in {len(done.shards)} shard(s), {', '.join(done.files)}"),
        soft_wrap=True)


@app.command()
def verify(
    packed: Path = typer.Argument(..., help="A packed file."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check every invariant of a packed file; exit 4 naming the first violation."""
    from ..formats.packed_file import summarize, verify_packed
    from ..llm.family import check_recorded

    pf = verify_packed(packed)
    files = pf.hf_files()
    if files is not None:  # bad-inputs rule 31: a recorded Llama-family config.json the LLM commands can read
        check_recorded(files.config, f"{packed}: recorded config.json")
    rows = summarize(pf)
    if as_json:
        typer.echo(json.dumps({"schema": "balprune.verify/1", "file": str(packed), "ok": True, "tensors": len(rows)}))
    else:
        pruned = sum(r.pattern != "dense" for r in rows)
        render.console().print(render.literal(f"ok: {packed}: {len(rows)} tensors ({pruned} packed) satisfy format v{pf.format_version}"))


@app.command()
def inspect(
    packed: Path = typer.Argument(..., help="A packed file."),
    as_json: bool = typer.Option(False, "--json", help="Print header, manifest and layers as JSON."),
) -> None:
    """Show the header, manifest and per-layer pattern, sparsity and bytes of a packed file."""
    from ..formats.packed_file import read_packed, summarize

    pf = read_packed(packed)
    rows = summarize(pf)
    if as_json:
        typer.echo(json.dumps({
            "schema": "balprune.inspect/1", "file": str(packed), "file_bytes": pf.parsed.file_size,
            "header_bytes": len(pf.parsed.header_bytes), "format_version": pf.format_version, "tool_version": pf.tool_version,
            "manifest": json.loads(pf.parsed.metadata["manifest"]),  # as stored: tensors in source order
            "layers": [{"name": r.name, "pattern": r.pattern, "shape": list(r.shape), "dtype": r.dtype,
                        "detail": r.detail, "sparsity_achieved": r.sparsity_achieved,
                        "dense_bytes": r.dense_bytes, "packed_bytes": r.packed_bytes} for r in rows],
        }, indent=2))
        return
    con = render.console()
    for line in render.header_lines(pf):
        con.print(line)
    con.print(render.layers_table("layers", rows))


@app.command()
def example(
    name: str = typer.Argument(..., help="vgg16, resnet18, resnet50, lstm-lm, ctc-bilstm, tiny-cnn, llama-tiny, llama-100m, llama-1b or llama-8b "
                                         "('list' to describe them)."),
    output: Path | None = typer.Option(None, "--output", "-o",
                                       help="Checkpoint to write (.pt or .safetensors); a folder for llama-*."),
    seed: str = typer.Option("0", "--seed", callback=usage(lambda v: parse_positive_int(v, what="--seed", minimum=0)),
                             help="Random seed of the weights, in [0, 2^63)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file (or folder's files)."),
) -> None:
    """Write a checkpoint of one of the paper's workloads, or a Llama-family HF folder, with random weights."""
    from ..examples import EXAMPLES, example_state_dict
    from ..llm.examples import PRESETS, write_example
    from ..save import save_state_dict

    if name == "list":
        for n, (desc, _) in {**EXAMPLES, **PRESETS}.items():
            typer.echo(f"{n:12s} {desc}")
        return
    if name not in EXAMPLES and name not in PRESETS:
        raise UsageError(f"unknown example {name!r}; choose one of {', '.join([*EXAMPLES, *PRESETS])}")
    if output is None:
        raise UsageError("--output/-o is required")
    if name in PRESETS:  # an HF folder: config.json, sharded safetensors with their index, streamed shard by shard
        bar = _progress_bar(True)
        if bar is None:
            folder = write_example(name, output, seed=int(seed), force=force)
        else:
            with bar:
                task = bar.add_task(name, total=None)
                folder = write_example(name, output, seed=int(seed), force=force,
                                       progress=lambda t, done, total: bar.update(task, completed=done, total=total,
                                                                                  description=render.visible(t[-40:])))
        render.console().print(render.literal(f"wrote {name} (Hugging Face folder: {PRESETS[name][0]}) to {folder}"))
        return
    sd = example_state_dict(name, int(seed))
    save_state_dict(sd, output, force=force)
    n = sum(t.numel() for t in sd.values())
    render.console().print(render.literal(f"wrote {name} ({len(sd)} tensors, {n / 1e6:.1f}M parameters) to {output}"))


@app.command("eval")
def eval_command(
    model: Path = typer.Argument(..., help="An HF causal-LM folder, a packed file pruned from one, or a safetensors "
                                 "file (dense or packed) with --like."),
    data: Path = typer.Option(..., "--data", help="Token ids (.npy, or decimal ids separated by whitespace) or "
                                                  "UTF-8 text (tokenized with the tokenizer)."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer",
                                          help="A folder holding tokenizer.json, or the file (default: the model "
                                               "folder's, or --like's)."),
    like: Path | None = typer.Option(None, "--like", help="The HF folder whose config.json a single-file MODEL follows "
                                     "(default for a packed file: the config it recorded)."),
    seq_len: str = typer.Option("512", "--seq-len",
                                callback=usage(lambda v: parse_positive_int(v, what="--seq-len", minimum=2)),
                                help="Tokens per evaluation window (consecutive, non-overlapping)."),
    max_tokens: str | None = typer.Option(None, "--max-tokens",
                                          callback=usage(lambda v: parse_positive_int(v, what="--max-tokens")),
                                          help="Evaluate only the first N tokens of the data."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA when present)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16: the weights' and "
                                                         "activations' dtype."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (schema balprune.eval/1)."),
) -> None:
    """Perplexity of a Llama-family model on a text or token file: exp(mean next-token NLL) over consecutive windows."""
    from ..finetune.run import resolve_device
    from ..llm.evaluate import DTYPES, evaluate

    if dtype not in DTYPES:
        raise UsageError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    dev = resolve_device(device)  # exit 2 for a bad name, 6 for cuda without a GPU: before any file is read
    bar = None if as_json or not sys.stderr.isatty() else _count_bar()
    if bar is None:
        result = evaluate(model, data, like=like, tokenizer=tokenizer, seq_len=int(seq_len),
                          max_tokens=None if max_tokens is None else int(max_tokens), dtype=dtype, device=dev)
    else:
        with bar:
            task = bar.add_task("windows", total=None)
            result = evaluate(model, data, like=like, tokenizer=tokenizer, seq_len=int(seq_len),
                              max_tokens=None if max_tokens is None else int(max_tokens), dtype=dtype, device=dev,
                              progress=lambda done, total: bar.update(task, completed=done, total=total))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    render.console().print(render.literal(
        f"perplexity {result.perplexity:.4f} over {result.tokens} tokens ({result.windows} windows of {result.seq_len})"))



@app.command("generate")
def generate_command(
    model: Path = typer.Argument(..., help="A packed file pruned from an HF folder, an HF causal-LM folder, or a "
                                 "single safetensors file with --like."),
    prompt: str = typer.Option(..., "--prompt", help="The text to continue (tokenized with the model's tokenizer.json)."),
    max_new_tokens: str = typer.Option("64", "--max-new-tokens", callback=usage(
        lambda v: parse_positive_int(v, what="--max-new-tokens", maximum=MAX_NEW_TOKENS)),
        help="Tokens to generate."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="A folder holding tokenizer.json, or the file "
                                          "(default: the model's, or the one a packed file recorded)."),
    like: Path | None = typer.Option(None, "--like", help="The HF folder whose config.json a single-file MODEL follows."),
    max_context: str = typer.Option("2048", "--max-context", callback=usage(
        lambda v: parse_positive_int(v, what="--max-context")),
        help="Positions of the static KV cache (at most the model's max_position_embeddings)."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 (default): greedy; > 0: sample from softmax(logits / T)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Sampling: keep the most likely ids up to this probability mass."),
    seed: str = typer.Option("0", "--seed", callback=usage(lambda v: parse_positive_int(v, what="--seed", minimum=0)),
                             help="Sampling: the generator's seed."),
    device: str = typer.Option("cuda", "--device", help="cuda (default), cuda:N or cpu."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 (default), bfloat16 or float32."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (schema balprune.generate/1)."),
) -> None:
    """Continue a prompt with a Llama-family model at batch 1 (greedy by default) and report tokens/s."""
    from ..finetune.run import resolve_device
    from ..llm.generate import generate

    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 on the command line arrive as lone surrogates
        raise UsageError("--prompt is not valid UTF-8 text") from None
    dev = resolve_device(device)  # exit 6 for cuda without a GPU, before any file is read
    result = generate(model, prompt, like=like, tokenizer=tokenizer, max_new_tokens=int(max_new_tokens),
                      max_context=int(max_context), temperature=float(temperature), top_p=float(top_p),
                      seed=int(seed), dtype=dtype, device=dev)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    out = render.console()
    out.print(render.literal_lines(result.text.split("\n")), soft_wrap=True)  # file-derived text: escaped
    rate = result.tokens_per_s
    render.console(stderr=True).print(render.literal(
        f"{len(result.new_tokens)} tokens after a {result.prompt_tokens}-token prompt: prefill "
        f"{result.prefill_s * 1e3:.1f} ms, {'-' if rate is None else f'{rate:.1f}'} tokens/s "
        f"({result.device}, {result.dtype}; {result.runtime})"), soft_wrap=True)



def _count_bar():
    """A rich progress bar on stderr counting items (done/total), for a person at a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=render.console(stderr=True), transient=True)


@app.command()
def compare(
    base: Path = typer.Argument(..., help="Baseline report (bench --json)."),
    new: Path = typer.Argument(..., help="New report to check against the baseline."),
    max_slowdown: str = typer.Option("0.10", "--max-slowdown",
                                               callback=usage(lambda v: parse_sparsity(v, what="--max-slowdown")),
                                               help="Allowed slowdown as a fraction of the baseline (0.10 = 10%)."),
    kernel: List[str] = typer.Option([], "--kernel",
                                     help="Kernels to compare (repeatable; each must be in the base report, else exit 2; "
                                          "default: balprune's own: balanced and bsr layers, balprune for a model "
                                          "report's whole model)."),
    allow_device_change: bool = typer.Option(False, "--allow-device-change",
                                             help="Compare reports from different devices (name or compute "
                                                  "capability; refused with exit 4 otherwise), saying so."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
) -> None:
    """Compare two benchmark reports; exit 1 if anything got slower beyond the bound, went missing or failed
    its gate. Prints one summary line when nothing regressed, else the table of every compared measurement."""
    from ..bench.compare import compare_reports, compared, device_change, regressions, resolve_kernels
    from ..bench.report import finite_json, load_report

    b, n = load_report(base), load_report(new)
    kernels = resolve_kernels(b, n, tuple(kernel))
    change = device_change(b, n)
    if change is not None and not allow_device_change:
        raise InvalidInputError(f"the reports come from different devices ({change}); their timings are not "
                                "comparable", hint="pass --allow-device-change to compare them anyway")
    notes = () if change is None else (f"devices differ (--allow-device-change): {change}",)
    changes = compare_reports(b, n, max_slowdown=max_slowdown, kernels=kernels)
    bad = regressions(changes)
    if not compared(changes):
        raise InvalidInputError(f"nothing was compared: the base report has no timed measurement of "
                                f"{', '.join(kernels)} (every one failed its gate)", hint="bench a new baseline")
    if as_json:
        # a ratio of two extreme (accepted) timings can overflow to inf: strict JSON says null there
        typer.echo(json.dumps(finite_json({"schema": "balprune.compare/1", "max_slowdown": max_slowdown,
                               "kernels": list(kernels), "device_change": change,
                               "regressions": len(bad),
                               "changes": [{"layer": c.layer, "dtype": c.dtype, "batch": c.batch, "mode": c.mode,
                                            "graph": c.graph, "kernel": c.kernel, "base_us": c.base_us, "new_us": c.new_us,
                                            "ratio": c.ratio, "status": c.status} for c in changes]}),
                              indent=2, allow_nan=False))
    elif bad:
        render.console().print(render.compare_table(changes, max_slowdown, notes))
    else:
        render.console().print(render.compare_summary(changes, max_slowdown, notes), soft_wrap=True)
    if bad:
        render.console(stderr=True).print(
            f"{len(bad)} regression(s) beyond {100 * max_slowdown:.0f}% (slower, missing or incorrect)")
        raise typer.Exit(EXIT_REGRESSION)


def _modes(cold: bool, hot: bool) -> tuple[str, ...]:
    return ("cold",) if cold and not hot else ("hot",) if hot and not cold else ("cold", "hot")


def _gate_failures(report) -> None:
    """Exit 7 when one of balprune's own paths failed its correctness gate (bench.report.own_failures);
    a peer library that fails is shown as failed in the table and the JSON, and is not fatal."""
    from ..bench.report import own_failures

    bad = own_failures(report)
    if bad:
        m = bad[0]
        raise GpuRuntimeError(f"balprune's {m.kernel} path failed its correctness gate on {m.layer!r} "
                              f"({m.dtype}, batch {m.batch}; {len(bad)} failure(s), see the table); not timed")


@app.command()
def bench(
    packed: Path = typer.Argument(..., help="A packed file written by `balprune prune`."),
    batch: str = typer.Option("1", "--batch", callback=usage(lambda v: tuple(parse_int_list(v, "--batch"))),
                              help="Batch sizes, comma-separated (e.g. 1,8)."),
    cold: bool = typer.Option(False, "--cold", help="Only cold timings (weights rotated through > 4.5x L2)."),
    hot: bool = typer.Option(False, "--hot", help="Only hot timings (one weight copy)."),
    graph: bool = typer.Option(False, "--graph", help="Also time CUDA-graph replay."),
    layer: List[str] = typer.Option([], "--layer", help="Only layers matching this glob (repeatable)."),
    no_peers: bool = typer.Option(False, "--no-peers",
                                  help="Only balprune's kernel and dense (skip CSR, BSR and 2:4 peers)."),
    iters: str = typer.Option("200", "--iters", callback=usage(lambda v: parse_positive_int(v, what="--iters")),
                              help="Timed launches per measurement."),
    device: str = typer.Option("0", "--device", callback=usage(lambda v: parse_positive_int(v, what="--device", minimum=0)),
                               help="CUDA device index."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the report (schema balprune.bench/2) here."),
    model: bool = typer.Option(False, "--model",
                               help="End to end: the whole packed model (lstm-lm, ctc-bilstm, vgg, resnet, llama family) at batch 1 against "
                                    "dense torch, eager and CUDA graph, with each layer on its fastest path."),
    dtype: str = typer.Option("float32,float16", "--dtype", callback=usage(lambda v: tuple(csv_items(v, "--dtype"))),
                              help="--model: precisions to run, comma-separated (float32, float16, bfloat16)."),
    frames: str = typer.Option("50", "--frames", callback=usage(lambda v: parse_positive_int(v, what="--frames")),
                               help="--model, ctc-bilstm: frames per utterance."),
    paths: str = typer.Option("auto", "--paths",
                              help="--model: auto (fastest correct path per layer), sparse or dense."),
) -> None:
    """Time every pruned layer on the GPU: balprune's kernel against dense cuBLAS, cuSPARSE CSR, block-sparse
    and 2:4 peers, and a plain read of the same bytes; the path the runtime takes per layer. With --model:
    the whole model end to end against dense torch."""
    from ..bench.report import rows
    from ..bench.run import bench_file
    from ..iopaths import check_io

    check_io(inputs=[("packed file", packed)], outputs=[("--json", json_out)])
    check_output_path(json_out, force=True)  # a report is replaced, as it always was
    err = render.console(stderr=True)
    if model:
        _bench_model(packed, batch=batch, layer=layer, no_peers=no_peers, modes=_modes(cold, hot), iters=iters,
                     device=device, json_out=json_out, dtypes=dtype, frames=frames, paths=paths, err=err)
        return
    report = bench_file(packed, batches=batch, modes=_modes(cold, hot), graph=graph, iters=iters, device=device,
                        layers=tuple(layer), peers=not no_peers,
                        progress=lambda name: err.print(render.literal(f"benchmarking {name}")))
    if json_out is not None:
        report.write(json_out)
    render.console().print(render.bench_table(report, rows(report)))
    _gate_failures(report)


def _bench_model(packed, *, batch, layer, no_peers, modes, iters, device, json_out, dtypes, frames, paths, err):
    from ..bench.model import bench_model

    if batch != (1,) or layer or no_peers:
        raise UsageError("--batch, --layer and --no-peers are per-layer options; --model runs the whole model at batch 1")
    bad = [d for d in dtypes if d not in ("float32", "float16", "bfloat16")]
    if bad or not dtypes:
        raise UsageError(f"--dtype takes float32, float16 and/or bfloat16, got {','.join(dtypes) or 'nothing'}")
    if paths not in ("auto", "sparse", "dense"):
        raise UsageError(f"--paths must be auto, sparse or dense, got {paths!r}")
    report = bench_model(packed, dtypes=dtypes, modes=modes, graph=True, iters=iters, frames=frames, device=device,
                         paths=paths, progress=lambda what: err.print(render.literal(what)))
    if json_out is not None:
        report.write(json_out)
    for t in render.model_tables(report):
        render.console().print(t)
    _gate_failures(report)


@app.command("bench-sweep")
def bench_sweep(
    rows_: str = typer.Option("16384", "--rows", callback=usage(lambda v: parse_positive_int(v, what="--rows")),
                              help="Matrix rows."),
    cols: str = typer.Option("8192", "--cols", callback=usage(lambda v: parse_positive_int(v, what="--cols")),
                             help="Matrix columns."),
    sparsities: str = typer.Option("0.5,0.6,0.7,0.8,0.9,0.95,0.97", "--sparsities",
                                   callback=usage(lambda v: tuple(parse_sparsity_list(v))),
                                   help="Sparsities, comma-separated (at most 64)."),
    batch: str = typer.Option("1,8", "--batch", callback=usage(lambda v: tuple(parse_int_list(v, "--batch"))), help="Batch sizes, comma-separated."),
    dtype: str = typer.Option("float16", "--dtype", help="float32, float16 or bfloat16."),
    blocks: str = typer.Option("32", "--blocks", callback=usage(lambda v: parse_positive_int(v, what="--blocks")),
                               help="Balanced blocks per row."),
    cold: bool = typer.Option(False, "--cold", help="Only cold timings (the default is cold only)."),
    hot: bool = typer.Option(False, "--hot", help="Hot timings (with --cold: both)."),
    graph: bool = typer.Option(False, "--graph", help="Also time CUDA-graph replay."),
    iters: str = typer.Option("100", "--iters", callback=usage(lambda v: parse_positive_int(v, what="--iters")),
                              help="Timed launches per measurement."),
    device: str = typer.Option("0", "--device", callback=usage(lambda v: parse_positive_int(v, what="--device", minimum=0)),
                               help="CUDA device index."),
    json_out: Path = typer.Option(Path("sweep.json"), "--json", help="The report (schema balprune.bench/2)."),
    plot: Path | None = typer.Option(None, "--plot", help="Also write a PNG of latency against sparsity."),
) -> None:
    """The paper's micro-benchmark: one random matrix pruned balanced at each sparsity, timed against dense,
    CSR, BSR, 2:4 and the ideal (bytes / measured read bandwidth); JSON report and a PNG plot."""
    from ..bench.report import rows
    from ..bench.sweep import paper_sweep, plot_sweep

    if dtype not in ("float32", "float16", "bfloat16"):
        raise UsageError(f"--dtype must be float32, float16 or bfloat16, got {dtype!r}")
    from ..iopaths import check_io

    check_io(outputs=[("--json", json_out), ("--plot", plot)])
    for out in (json_out, plot):
        check_output_path(out, force=True)
    if plot is not None:
        try:
            import matplotlib  # noqa: F401 - checked before the run, not after it
        except ImportError:
            raise UsageError("--plot needs matplotlib", hint="pip install 'balprune[plot]'") from None
    modes = ("cold", "hot") if cold and hot else ("hot",) if hot else ("cold",)
    err = render.console(stderr=True)
    report = paper_sweep(rows=rows_, cols=cols, sparsities=sparsities, batches=batch, dtype=dtype, blocks=blocks,
                         modes=modes, graph=graph, iters=iters, device=device,
                         progress=lambda what: err.print(render.literal(f"benchmarking {what}")))
    report.write(json_out)
    if plot is not None:
        plot_sweep(report, plot, mode=modes[0])
    render.console().print(render.bench_table(report, rows(report)))
    _gate_failures(report)


# --------------------------------------------------------------------------- fine-tuning (issue 4)
# finetune, sweep and sensitivity live in balprune.cli.train; registered here, after the other commands.
from .train import register as _register_training  # noqa: E402

_register_training(app)
