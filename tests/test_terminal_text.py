"""Text from a file reaches the terminal literally (bad-inputs item 27).

Tensor names, manifest strings (source, tool version), report fields and config values may hold rich
markup (``w[/]``, ``[bold red]x``), terminal escape sequences (set the title, clear the screen),
Unicode line separators and bidi overrides, lone surrogates, or characters the terminal's encoding
lacks. Every command shows them as written, control characters escaped (``\\x1b``, ``\\u2028``):
never a markup error (exit 70 after prune had committed its output), never lost text, never a raw
ESC byte, never a UnicodeEncodeError on an ascii or latin-1 stdout. One owner: render.visible /
render.literal, and the error printer's escape (cli._fail).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

from balprune.bench.report import BenchReport, Measurement
from balprune.save import save_state_dict

#: name -> how it must appear (utf-8 output): markup kept as text, control characters escaped.
HOSTILE = {
    "w[/]": "w[/]",
    "[bold red]x": "[bold red]x",
    "t\x1b]0;pwned\x07": "t\\x1b]0;pwned\\x07",  # sets the terminal title
    "c\x1b[2Jz": "c\\x1b[2Jz",  # clears the screen
    "l\u2028s": "l\\u2028s",  # a line separator
    "b\u202eevil": "b\\u202eevil",  # right-to-left override
    "r\rq": "r\\x0dq",  # carriage return: overwrites the line
    ":smile:e": ":smile:e",  # rich's emoji codes are not replaced
}
NONASCII = "e\u00e9\u2603"  # é (latin-1 has it) and a snowman (latin-1 lacks it)
SHOWN = {"utf-8": NONASCII, "latin-1": "e\u00e9\\u2603", "ascii": "e\\xe9\\u2603"}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _run(*args, encoding: str = "utf-8", cwd=None) -> tuple[int, str, str]:
    """``python -m balprune ARGS`` with stdout/stderr in ``encoding``; output decoded strictly in it
    (a byte the encoding cannot hold would fail the test), returned as (code, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONIOENCODING=encoding, COLUMNS="200")
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    p = subprocess.run([sys.executable, "-m", "balprune", *argv], capture_output=True, env=env, timeout=300, cwd=cwd)
    for stream in (p.stdout, p.stderr):
        assert b"\x1b" not in stream and b"\x07" not in stream, stream  # no escape sequence reaches the terminal
    return p.returncode, p.stdout.decode(encoding), p.stderr.decode(encoding)


def _checkpoint(folder: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    sd = {f"{n}.weight": torch.randn(16, 64, generator=g) for n in [*HOSTILE, NONASCII]}
    sd["[red]bias"] = torch.randn(16, generator=g)  # passed through: its reason column, too
    path = folder / "m.safetensors"
    save_state_dict(sd, path)
    return path


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    src = _checkpoint(folder)
    code, out, err = _run("prune", src, "-s", "0.5", "--blocks", "4", "-o", folder / "p.safetensors")
    assert code == 0, err
    return folder / "p.safetensors"


def _assert_names_shown(text: str, encoding: str = "utf-8") -> None:
    for shown in HOSTILE.values():
        assert f"{shown}.weight" in text, (shown, text)
    assert f"{SHOWN[encoding]}.weight" in text, text


@pytest.mark.parametrize("encoding", ["utf-8", "ascii", "latin-1"])
def test_prune_shows_every_name_literally_and_commits_once(tmp_path, encoding):
    src = _checkpoint(tmp_path)
    before = _sha(src)
    code, out, err = _run("prune", src, "-s", "0.5", "--blocks", "4", encoding=encoding)
    assert code == 0, err
    _assert_names_shown(out, encoding)
    assert "[red]bias" in out and "passed: 1-D" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.balanced.safetensors", "m.safetensors"]
    assert _sha(src) == before


def test_prune_in_process_shows_markup_as_text(cli, tmp_path):
    src = _checkpoint(tmp_path)
    r = cli("prune", src, "-s", "0.5", "--blocks", "4", "-o", tmp_path / "o.safetensors")
    assert r.code == 0, r
    assert "[bold red]x.weight" in r.out and "w[/].weight" in r.out and "\x1b" not in r.out + r.err
    r = cli("prune", src, "-s", "0.5", "--blocks", "4", "-o", tmp_path / "j.safetensors", "--json")
    names = {t["name"] for t in json.loads(r.out)["tensors"]}  # JSON carries the exact names
    assert {f"{n}.weight" for n in HOSTILE} <= names


def test_inspect_verify_unpack_show_names_literally(packed, tmp_path):
    before = _sha(packed)
    code, out, err = _run("inspect", packed)
    assert code == 0 and err == "", err
    _assert_names_shown(out)
    code, out, err = _run("verify", packed)
    assert code == 0 and out == f"ok: {packed}: 10 tensors (9 packed) satisfy format v2\n" and err == "", (out, err)
    code, out, err = _run("unpack", packed, "-o", tmp_path / "d.safetensors")
    assert code == 0 and out == f"wrote 10 tensors to {tmp_path / 'd.safetensors'}\n", (out, err)
    assert _sha(packed) == before


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_inspect_on_a_narrow_stdout_escapes_what_it_cannot_encode(packed, encoding):
    code, out, err = _run("inspect", packed, encoding=encoding)
    assert code == 0 and err == "", err
    _assert_names_shown(out, encoding)


def _rewrite_metadata(src: Path, dst: Path, edit) -> None:
    """A copy of a packed file whose __metadata__ went through ``edit`` (tensor bytes and offsets kept)."""
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header["__metadata__"])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def test_inspect_shows_manifest_strings_literally(packed, tmp_path):
    def edit(md):
        md["tool_version"] = "0.1[/]\x1b]2;owned\x07"
        manifest = json.loads(md["manifest"])
        manifest["source"]["name"] = "[bold]src\x1b[2J\u2028.pt"
        md["manifest"] = json.dumps(manifest)

    hostile = tmp_path / "h.safetensors"
    _rewrite_metadata(packed, hostile, edit)
    code, out, err = _run("inspect", hostile)
    assert code == 0, err
    assert "written by balprune 0.1[/]\\x1b]2;owned\\x07" in out
    assert "source          [bold]src\\x1b[2J\\u2028.pt sha256" in out
    assert json.loads(_run("inspect", hostile, "--json")[1])["tool_version"] == "0.1[/]\x1b]2;owned\x07"


def _surrogate_copy(src: Path, dst: Path, name: str) -> None:
    """A copy of a safetensors file with tensor ``name`` renamed to hold a lone surrogate (a JSON \\udc80
    escape: valid JSON, not valid Unicode), in the header keys and, for a packed file, in its manifest."""
    def rename(x):
        if isinstance(x, dict):
            return {rename(k): rename(v) for k, v in x.items()}
        if isinstance(x, list):
            return [rename(v) for v in x]
        return x.replace(name, name.replace(".", "\udc80.", 1)) if isinstance(x, str) else x

    def edit_header(header):
        md = header.get("__metadata__", {})
        if "manifest" in md:
            md["manifest"] = json.dumps(rename(json.loads(md["manifest"])))
        return {rename(k) if k != "__metadata__" else k: v for k, v in header.items()}

    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    text = json.dumps(edit_header(json.loads(data[8:8 + n]))).encode()  # ASCII: the surrogate as \udc80
    text += b" " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_a_lone_surrogate_name_in_a_packed_file_is_shown_escaped(packed, tmp_path, command):
    """Not Unicode text: refused by the reader (exit 4), the name shown escaped in the error line."""
    hostile = tmp_path / "s.safetensors"
    _surrogate_copy(packed, hostile, "w[/].weight")
    for encoding in ("utf-8", "ascii"):
        code, out, err = _run(command, hostile, encoding=encoding)
        assert code == 4 and out == "" and "UnicodeEncodeError" not in err, err
        assert "\\udc80" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("command", ["prune", "unpack"])
def test_a_lone_surrogate_name_that_cannot_be_written_is_refused(packed, tmp_path, command):
    src = _checkpoint(tmp_path) if command == "prune" else packed
    hostile = tmp_path / "s.safetensors"
    _surrogate_copy(src, hostile, "w[/].weight")
    out_path = tmp_path / "o.safetensors"
    code, out, err = _run(command, hostile, "-o", out_path, *(("-s", "0.5", "--blocks", "4") if command == "prune" else ()))
    assert code == 4 and err.startswith("balprune: error: ") and "\\udc80" in err and err.count("\n") == 1, err
    assert not out_path.exists()


def test_paths_from_the_command_line_are_shown_literally(packed, tmp_path):
    out_path = tmp_path / "o[red]\x1b[2J.safetensors"  # as markup, [red] would vanish
    code, out, err = _run("unpack", packed, "-o", out_path)
    assert code == 0 and out == f"wrote 10 tensors to {tmp_path}/o[red]\\x1b[2J.safetensors\n", (out, err)
    assert out_path.exists()  # written once, under its real name


def test_undecodable_path_bytes_are_shown_escaped(packed, tmp_path):
    """A path with bytes that are not UTF-8 arrives as lone surrogates (surrogateescape): shown escaped."""
    out_path = os.fsencode(tmp_path) + b"/d\xff.safetensors"
    for encoding in ("utf-8", "ascii"):
        if os.path.exists(out_path):
            os.unlink(out_path)
        code, out, err = _run("unpack", packed, "-o", out_path, encoding=encoding)
        assert code == 0 and out == f"wrote 10 tensors to {tmp_path}/d\\udcff.safetensors\n", (out, err)
    missing = os.fsencode(tmp_path) + b"/no\xfe/x.safetensors"
    code, out, err = _run("unpack", packed, "-o", missing)
    assert code == 5 and err.startswith("balprune: error: ") and "no\\udcfe" in err and err.count("\n") == 1, err


def test_error_lines_escape_what_they_quote(packed, tmp_path):
    code, out, err = _run("unpack", packed, "-o", tmp_path / "gone\x1b[2J" / "x.safetensors")
    assert code == 5 and "gone\\x1b[2J" in err and err.count("\n") == 1, err
    code, out, err = _run("compare", tmp_path / "r[/]\x1b]0;t\x07.json", tmp_path / "b.json")
    assert code == 4 and "r[/]\\x1b]0;t\\x07.json" in err and err.count("\n") == 1, err


def test_error_lines_are_bounded_keeping_head_and_tail(packed, tmp_path):
    """A quoted name can be any length (a --key, a recipe's task name, a path): the line keeps what is wrong
    and the hint, says how much it left out, and stays one line; a line within the bound is printed whole."""
    from balprune.cli import MAX_ERROR_CHARS, bounded

    report = tmp_path.joinpath(*["d" * 200 + "\x1b"] * 30, "r.json")  # escaped to 4 characters, then bounded
    code, out, err = _run("compare", report, tmp_path / "b.json")
    assert code == 4 and err.count("\n") == 1 and err.startswith("balprune: error: "), err[:300]
    assert len(err) < MAX_ERROR_CHARS + 100 and "characters left out" in err, len(err)
    assert err.startswith(f"balprune: error: report {tmp_path}/{'d' * 200}\\x1b/"), err[:300]
    assert err.endswith("\\x1b/r.json: cannot read: File name too long\n"), err[-200:]
    short = "x" * MAX_ERROR_CHARS
    assert bounded(short) == short
    long = "head " + "m" * 5000 + " tail"
    cut = bounded(long)
    assert cut.startswith("head m") and cut.endswith("m tail") and len(cut) <= MAX_ERROR_CHARS
    assert f"[... {len(long) - 1900} characters left out ...]" in cut


def test_config_globs_in_warnings_are_shown_literally(tmp_path):
    src = _checkpoint(tmp_path)
    code, out, err = _run("prune", src, "-s", "0.5", "--blocks", "4", "--exclude", "[bold]\x1b[2J*",
                          "--include", "*", "-o", tmp_path / "o.safetensors")
    assert code == 0, err
    assert "\\x1b[2J" in err and "[bold]" in err, err  # the glob that matched nothing, as written


def _report(path: Path, layers: list[str], median: float, device: dict | None = None) -> Path:
    ms = [Measurement(layer, (16, 64), "F32", 1, "cold", False, "balanced", median, median, median, 4096, 1.0, 1.0,
                      1e-6, True, "note [/]\x1b[2J") for layer in layers]
    BenchReport("m[/].safetensors", device or {"name": "GPU"}, 1000.0, ms,
                [{"layer": layers[0], "batch": 1, "kernel": "csr\x1b[2J", "reason": "[bold]x"}]).write(path)
    return path


@pytest.mark.parametrize("encoding", ["utf-8", "ascii", "latin-1"])
def test_compare_shows_report_fields_literally(tmp_path, encoding):
    layers = [f"{n}.weight" for n in [*HOSTILE, NONASCII]]
    base = _report(tmp_path / "a.json", layers, 10.0)
    new = _report(tmp_path / "b.json", layers, 20.0)
    before = {p: _sha(p) for p in (base, new)}
    code, out, err = _run("compare", base, new, encoding=encoding)
    assert code == 1, err
    _assert_names_shown(out, encoding)
    assert err == f"{len(layers)} regression(s) beyond 10% (slower, missing or incorrect)\n"
    code, out, err = _run("compare", base, base, encoding=encoding)
    assert code == 0 and out.startswith(f"ok: {len(layers)} measurement(s)") and err == "", (out, err)
    assert {p: _sha(p) for p in (base, new)} == before


def test_compare_device_names_are_escaped_in_the_error_and_the_table(tmp_path):
    base = _report(tmp_path / "a.json", ["fc"], 10.0, {"name": "H200\x1b]0;x\x07[/]"})
    new = _report(tmp_path / "b.json", ["fc"], 20.0, {"name": "\u202eA100"})
    code, out, err = _run("compare", base, new)
    assert code == 4 and "base H200\\x1b]0;x\\x07[/], new \\u202eA100" in err and err.count("\n") == 1, err
    code, out, err = _run("compare", base, new, "--allow-device-change")
    assert code == 1 and "H200\\x1b]0;x\\x07[/]" in " ".join(out.split()), out


def test_compare_names_with_lone_surrogates_are_refused_and_shown_escaped(tmp_path):
    """A report's JSON may spell a lone surrogate (\\udc80): not Unicode text, so the report is refused
    (exit 4, as every JSON balprune reads), the name shown escaped in the error line, in any encoding."""
    base = _report(tmp_path / "a.json", ["s\udc80x"], 10.0)
    new = _report(tmp_path / "b.json", ["s\udc80x"], 20.0)
    assert "\\udc80" in base.read_text()  # JSON escapes it: the file is plain ASCII
    for encoding in ("utf-8", "ascii"):
        code, out, err = _run("compare", base, new, encoding=encoding)
        assert code == 4 and out == "" and "s\\udc80x" in err and err.count("\n") == 1, (out, err)


def test_kernel_option_values_are_escaped_in_the_usage_error(tmp_path):
    base = _report(tmp_path / "a.json", ["fc"], 10.0)
    code, out, err = _run("compare", base, base, "--kernel", "cu\x1b[2Jblas")
    assert code == 2 and "cu\\x1b[2Jblas" in err and "the base report holds: balanced" in err and err.count("\n") == 1, err


def test_sensitivity_table_shows_layer_names_literally(tmp_path):
    src = _checkpoint(tmp_path)
    code, out, err = _run("sensitivity", src, "--blocks", "4", "--sparsities", "0.5", "--samples", "4",
                          "-o", tmp_path / "plan.toml")
    assert code == 0, err
    _assert_names_shown(out)
    assert (tmp_path / "plan.toml").exists()


def test_render_literal_is_the_one_escape():
    """The owner itself: markup untouched, controls escaped, unencodable characters escaped per encoding."""
    from balprune.cli.render import literal, visible

    assert visible("a[/]b\\x", ()) == "a[/]b\\x"  # printable text, markup and backslashes as they are
    assert visible("\x1b\x00\x7f\x85\u200b\u2028\u2029\ud800 \t\n", ()) == \
        "\\x1b\\x00\\x7f\\x85\\u200b\\u2028\\u2029\\ud800 \\x09\\x0a"
    assert visible("\U000e0041\U0001f600", ()) == "\\U000e0041\U0001f600"  # tag character; emoji is printable
    assert visible("\u00e9\u2603", ("latin-1",)) == "\u00e9\\u2603"
    assert visible("\u00e9\u2603", ("ascii",)) == "\\xe9\\u2603"
    text = literal("[bold red]x\x1b")
    assert text.plain == "[bold red]x\\x1b" and not text.spans


def _render(table) -> str:
    import io

    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=200, highlight=False).print(table)
    return buf.getvalue()


def test_training_tables_show_recipe_text_literally():
    """finetune / sweep tables: recipe names, task labels and variant labels are config text."""
    from types import SimpleNamespace as NS

    from balprune.cli import render_train

    stage = NS(stage=1, stages=1, sparsity=0.5, achieved=0.5, after_prune={"accuracy": 0.5},
               metrics={"val[/]": {"accuracy": 0.9}}, steps=10, seconds=1.0)
    ft = NS(metric="accuracy", recipe="r[/]\x1b]0;t\x07", task="[bold]task", device="cpu", stages=[stage])
    text = _render(render_train.finetune_table(ft))
    assert "r[/]\\x1b]0;t\\x07" in text and "[bold]task" in text and "accuracy val[/]" in text
    point = NS(value=0.8, achieved=0.4)
    sw = NS(metric="accuracy", recipe="r\u2028", task="t", split="val", dense_value=0.9, dense_budget_value=None,
            budget={"stages": 1, "steps_per_stage": 2}, sparsities=[0.5], variants=["unstructured", "[red]bal\x1b[2J"],
            point=lambda label, s: point, higher_is_better=True)
    text = _render(render_train.sweep_table(sw))
    assert "r\\u2028" in text and "[red]bal\\x1b[2J" in text and "80.00% (+0.0%) @40.0%" in text
    assert "\x1b" not in text
