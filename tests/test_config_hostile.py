"""Hostile configs, recipes and option values (issue 14, classes 2, 3 and 4), through the real CLI.

--config files, sensitivity plans (read back as --config), fine-tuning recipes and their [train]
init checkpoint: FIFOs and devices refused before any read, nesting bombs refused (exit 4, never
a RecursionError), and every size, count, step or seed bounded before anything is allocated or
trained: exit 2 for an option, exit 4 for a file value, the bound named in the message.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_refused, listing, one_error_line, run_subprocess, small_state_dict

from balprune.values import MAX_SCHEDULE_STEPS

TIMEOUT = 120




def refused(tmp_path: Path, args: list, code: int, *mentions: str, cli=None) -> str:
    """``balprune ARGS`` fails with ``code`` and one line naming ``mentions``; nothing under tmp_path changes.

    Without ``cli`` it runs in a subprocess with a timeout (FIFOs, devices: a hang fails the test).
    """
    before = listing(tmp_path)
    start = time.monotonic()
    if cli is None:
        p = run_subprocess(*args, timeout=TIMEOUT, cwd=tmp_path)
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    else:
        # In-process there is no subprocess timeout: an alarm turns a run that failed to refuse (and
        # trains or hangs) into a failure instead of a stalled suite.
        def too_long(signum, frame):
            raise TimeoutError(f"balprune {args[0]} ran past {TIMEOUT} s instead of refusing")

        previous = signal.signal(signal.SIGALRM, too_long)
        signal.alarm(TIMEOUT)
        try:
            r = cli(*args)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        rc, stdout, stderr = r.code, r.out, r.err
    return assert_refused(rc, stdout, stderr, code=code, mentions=mentions, folder=tmp_path, before=before,
                          started=start, timeout=TIMEOUT)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    p = tmp_path / "model.pt"
    torch.save(small_state_dict(), p)
    return p


DIGITS_RECIPE = """\
[task]
name = "digits"
hidden = 16

[train]
dense_steps = 1
steps_per_stage = 1

[prune]
pattern = "balanced"
sparsity = 0.5
block_size = 16
"""


def recipe(tmp_path: Path, text: str = DIGITS_RECIPE, name: str = "r.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def set_key(text: str, table: str, line: str) -> str:
    """``text`` with ``line`` added at the top of [table] (a later duplicate key is a TOML error)."""
    head = f"[{table}]\n"
    if head not in text:
        return text + f"\n{head}{line}\n"
    key = line.split("=")[0].strip()
    kept = [ln for ln in text.splitlines() if not ln.startswith(f"{key} =")]
    return "\n".join(kept).replace(head, head + line + "\n", 1) + "\n"


# --------------------------------------------------------------------------- 3. non-regular files


def test_prune_config_fifo_refused_without_hanging(tmp_path, ckpt):
    os.mkfifo(tmp_path / "c.toml")
    refused(tmp_path, ["prune", ckpt, "-s", "0.5", "--config", tmp_path / "c.toml", "-o", tmp_path / "o.safetensors"],
            4, "FIFO")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_prune_config_linked_to_a_device_refused(tmp_path, ckpt, device):
    (tmp_path / "c.toml").symlink_to(device)
    refused(tmp_path, ["prune", ckpt, "--config", tmp_path / "c.toml", "-o", tmp_path / "o.safetensors"], 4,
            "character device")


def test_sensitivity_config_fifo_refused(tmp_path, ckpt):
    os.mkfifo(tmp_path / "c.toml")
    refused(tmp_path, ["sensitivity", ckpt, "--config", tmp_path / "c.toml", "-o", tmp_path / "plan.toml"], 4, "FIFO")


@pytest.mark.parametrize("command", ["finetune", "sweep", "sensitivity"])
def test_recipe_fifo_refused(tmp_path, command):
    os.mkfifo(tmp_path / "r.toml")
    refused(tmp_path, [command, tmp_path / "r.toml", "--out" if command != "sensitivity" else "-o",
                       tmp_path / "run"], 4, "FIFO")


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "/dev/urandom", "fifo-in-folder"])
def test_recipe_init_not_a_regular_file_refused(tmp_path, kind):
    if kind == "fifo":
        os.mkfifo(tmp_path / "init.pt")
        init = "init.pt"
    elif kind == "fifo-in-folder":
        (tmp_path / "init").mkdir()
        torch.save({"fc1.weight": torch.zeros(16, 64)}, tmp_path / "init" / "pytorch_model-1.bin")
        os.mkfifo(tmp_path / "init" / "pytorch_model-2.bin")
        init = "init"
    else:
        (tmp_path / "init.pt").symlink_to(kind)
        init = "init.pt"
    r = recipe(tmp_path, set_key(DIGITS_RECIPE, "train", f'init = "{init}"'))
    line = refused(tmp_path, ["finetune", r, "--out", tmp_path / "run", "--device", "cpu"], 4, "init")
    assert "FIFO" in line or "character device" in line


def test_recipe_init_symlink_loop_refused(tmp_path):
    (tmp_path / "init.pt").symlink_to("init.pt")
    r = recipe(tmp_path, set_key(DIGITS_RECIPE, "train", 'init = "init.pt"'))
    refused(tmp_path, ["finetune", r, "--out", tmp_path / "run", "--device", "cpu"], 4, "init", "loop")


def test_recipe_init_linking_out_of_its_folder_refused(tmp_path):
    (tmp_path / "init").mkdir()
    torch.save({"w": torch.zeros(2)}, tmp_path / "elsewhere.bin")
    (tmp_path / "init" / "pytorch_model.bin").symlink_to(tmp_path / "elsewhere.bin")
    r = recipe(tmp_path, set_key(DIGITS_RECIPE, "train", 'init = "init"'))
    refused(tmp_path, ["finetune", r, "--out", tmp_path / "run"], 4, "links outside")


# --------------------------------------------------------------------------- 2. nesting bombs

DEEP = 100_000
NESTED_TOML = {
    "array": "x = " + "[" * DEEP + "]" * DEEP + "\n",
    "inline-table": "x = " + "{a = " * DEEP + "1" + "}" * DEEP + "\n",
}


@pytest.mark.parametrize("bomb", sorted(NESTED_TOML))
def test_nested_prune_config_refused(cli, tmp_path, ckpt, bomb):
    (tmp_path / "c.toml").write_text("[prune]\nsparsity = 0.5\n" + NESTED_TOML[bomb].replace("x =", "[bomb]\nx ="))
    refused(tmp_path, ["prune", ckpt, "--config", tmp_path / "c.toml", "-o", tmp_path / "o.safetensors"], 4,
            "nested", cli=cli)


@pytest.mark.parametrize("bomb", sorted(NESTED_TOML))
def test_nested_plan_given_to_sensitivity_refused(cli, tmp_path, ckpt, bomb):
    (tmp_path / "plan.toml").write_text("[prune]\n" + NESTED_TOML[bomb].replace("x =", "include ="))
    refused(tmp_path, ["sensitivity", ckpt, "--config", tmp_path / "plan.toml", "-o", tmp_path / "p2.toml"], 4,
            "nested", cli=cli)


@pytest.mark.parametrize("command", ["finetune", "sweep", "sensitivity"])
def test_nested_recipe_refused(cli, tmp_path, command):
    r = recipe(tmp_path, DIGITS_RECIPE.replace("hidden = 16", "hidden = 16\n" + NESTED_TOML["array"]))
    refused(tmp_path, [command, r, "--out" if command != "sensitivity" else "-o", tmp_path / "run"], 4, "nested",
            cli=cli)


def test_nested_recipe_refused_by_the_pruner_api(tmp_path):
    from balprune.errors import ConfigError
    from balprune.finetune import Pruner

    r = recipe(tmp_path, DIGITS_RECIPE + NESTED_TOML["inline-table"].replace("x =", "[bomb]\nx ="))
    model = torch.nn.Sequential(torch.nn.Linear(64, 16))
    with pytest.raises(ConfigError, match="nested") as info:
        Pruner(model, r, every=1)
    assert info.value.exit_code == 4


# --------------------------------------------------------------------------- 4. bounded values: options


@pytest.mark.parametrize("value", ["1000000000", "1e9", str(MAX_SCHEDULE_STEPS + 1), "9" * 5000])
def test_prune_steps_bounded_as_a_usage_error(cli, tmp_path, ckpt, value):
    line = refused(tmp_path, ["prune", ckpt, "-s", "0.5", "--steps", value, "-o", tmp_path / "o.safetensors"], 2,
                   "--steps", cli=cli)
    if value != "1e9":
        assert str(MAX_SCHEDULE_STEPS) in line


def test_prune_steps_at_the_bound_is_accepted_by_the_parser(tmp_path):
    from balprune.values import parse_positive_int

    assert parse_positive_int(str(MAX_SCHEDULE_STEPS), what="--steps") == MAX_SCHEDULE_STEPS


@pytest.mark.parametrize("option,value,bound", [
    ("--seed", str(2**63), str(2**63 - 1)),
    ("--seed", "-1", ">= 0"),
    ("--samples", str(1 << 40), str(1 << 16)),
    ("--blocks", "9" * 30, "at most"),
])
def test_sensitivity_options_bounded(cli, tmp_path, ckpt, option, value, bound):
    refused(tmp_path, ["sensitivity", ckpt, option, value, "-o", tmp_path / "p.toml"], 2, option, bound, cli=cli)


# --------------------------------------------------------------------------- 4. bounded values: files


def test_prune_config_steps_bounded_as_a_file_error(cli, tmp_path, ckpt):
    (tmp_path / "c.toml").write_text("[prune]\nsparsity = 0.5\n[schedule]\nsteps = 1000000000\n")
    refused(tmp_path, ["prune", ckpt, "--config", tmp_path / "c.toml", "-o", tmp_path / "o.safetensors"], 4,
            "steps", str(MAX_SCHEDULE_STEPS), cli=cli)


@pytest.mark.parametrize("table,line,mentions", [
    ("schedule", "steps = 1000000000", ("steps", "10000")),
    ("train", "seed = 9223372036854775808", ("seed", "9223372036854775807")),
    ("train", "seed = -1", ("seed", ">= 0")),
    ("train", "batch_size = 1000000000", ("batch_size", "65536")),
    ("train", "dense_steps = 1000000000000", ("dense_steps", "10000000")),
    ("train", "steps_per_stage = 1000000000000", ("steps_per_stage", "10000000")),
    ("train", "lr = inf", ("lr", "finite")),
    ("train", "momentum = nan", ("momentum", "finite")),
    ("task", "hidden = 1000000000", ("hidden", "16384")),
    # finite, but beyond float32 inside the optimizer (exit 70 before), or beyond a float (exit 70 before)
    ("train", "lr = 1e39", ("lr", "at most 10000.0")),
    ("train", "weight_decay = 1e308", ("weight_decay", "at most")),
    ("train", "momentum = 2.0", ("momentum", "at most 1.0")),
    ("train", "lr = " + "9" * 400, ("lr", "integer of 400 digits")),
])
def test_recipe_values_bounded_before_any_training(cli, tmp_path, table, line, mentions):
    r = recipe(tmp_path, set_key(DIGITS_RECIPE, table, line))
    start = time.monotonic()
    refused(tmp_path, ["finetune", r, "--out", tmp_path / "run", "--device", "cpu"], 4, *mentions, cli=cli)
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("line,mentions", [
    ("hidden = 100000000", ("hidden", "32768")),
    ("layers = 100000", ("layers", "256")),
    ("bptt = 1000000000000", ("bptt",)),
    ("vocab_size = 1000000000000", ("vocab_size",)),
    ("dropout = 2.0", ("dropout", "1.0")),
])
def test_lstm_task_sizes_bounded(cli, tmp_path, line, mentions):
    text = DIGITS_RECIPE.replace('name = "digits"\nhidden = 16', f'name = "lstm-lm"\n{line}')
    refused(tmp_path, ["finetune", recipe(tmp_path, text), "--out", tmp_path / "run"], 4, *mentions, cli=cli)


def test_model_too_large_for_memory_refused_before_any_allocation(cli, tmp_path):
    """Every size within its bound, the product not: 256 LSTM layers of 32768 (2.2e12 parameters)."""
    text = DIGITS_RECIPE.replace('name = "digits"\nhidden = 16', 'name = "lstm-lm"\nhidden = 32768\nlayers = 256')
    start = time.monotonic()
    line = refused(tmp_path, ["finetune", recipe(tmp_path, text), "--out", tmp_path / "run"], 4, "parameters",
                   "GiB", cli=cli)
    assert "available" in line
    assert time.monotonic() - start < 30


def test_honest_recipe_still_parses(tmp_path):
    from balprune.finetune.recipe import load_recipe

    r = load_recipe(recipe(tmp_path, set_key(DIGITS_RECIPE, "train", f"seed = {2**63 - 1}")))
    assert r.train.seed == 2**63 - 1
    assert r.options.pattern.sparsity == 0.5


# --------------------------------------------------------------------------- 3. task data files

LM_RECIPE = """\
[task]
name = "lstm-lm"
hidden = 16
vocab_size = 50
bptt = 5
max_train_tokens = 200
max_eval_tokens = 100

[train]
dense_steps = 1
steps_per_stage = 1

[prune]
sparsity = 0.5
blocks = 4
"""


@pytest.mark.parametrize("kind", ["fifo", "/dev/urandom"])
def test_ptb_data_file_not_regular_refused(tmp_path, kind):
    data = tmp_path / "ptb"
    data.mkdir()
    for split in ("valid", "test"):
        (data / f"ptb.{split}.txt").write_text("a b c d e f g\n" * 20)
    if kind == "fifo":
        os.mkfifo(data / "ptb.train.txt")
    else:
        (data / "ptb.train.txt").symlink_to(kind)
    r = recipe(tmp_path, LM_RECIPE)
    before = listing(data)
    p = run_subprocess("finetune", r, "--data", data, "--out", tmp_path / "run", "--device", "cpu", timeout=TIMEOUT)
    assert p.returncode == 4, p.stderr
    line = one_error_line(p.stderr, p.stdout)
    assert "ptb.train.txt" in line and ("FIFO" in line or "character device" in line)
    assert listing(data) == before


def test_image_that_is_a_fifo_refused(tmp_path):
    from PIL import Image

    data = tmp_path / "imgs"
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            (data / split / name).mkdir(parents=True)
            px = torch.full((16, 16, 3), 40 * c, dtype=torch.uint8)
            Image.fromarray(px.numpy()).save(data / split / name / "0.png")
    os.mkfifo(data / "val" / "dog" / "1.png")  # every evaluation reads every val image
    text = DIGITS_RECIPE.replace('name = "digits"\nhidden = 16',
                                 'name = "vgg16"\nwidth = 0.03125\nimage_size = 32\nclassifier_hidden = 8')
    r = recipe(tmp_path, text.replace("block_size = 16", "block_size = 4"))
    before = listing(data)
    p = run_subprocess("finetune", r, "--data", data, "--out", tmp_path / "run", "--device", "cpu", "--no-export",
                       timeout=TIMEOUT)
    assert p.returncode == 4, p.stderr
    line = one_error_line(p.stderr, p.stdout)
    assert "1.png" in line and "FIFO" in line
    assert listing(data) == before


@pytest.mark.parametrize("table,words", [
    ('[prune]\nsparsity = "0.5"\n', 'sparsity must be a number, got str'),
    ('[prune]\nblocks = "4"\n', "blocks must be an integer, got str"),
    ("[prune]\nblocks = 4.0\n", "blocks must be an integer, got float"),
    ('[schedule]\nsteps = "3"\n', "steps must be an integer, got str"),
    ('[[layers]]\nmatch = "*"\nsparsity = "0.9"\n', "sparsity must be a number, got str"),
])
def test_config_values_must_have_their_toml_type(cli, tmp_path, table, words):
    """The option parsers read command-line strings, so a file's "0.5" would pass them: a --config value of
    the wrong TOML type is exit 4 naming the key, nothing written."""
    src = tmp_path / "m.pt"
    torch.save({"w": torch.randn(8, 32)}, src)
    cfg = tmp_path / "c.toml"
    cfg.write_text(table)
    r = cli("prune", src, "--config", cfg, "-s", "0.5", "-o", tmp_path / "o.safetensors")
    assert r.code == 4 and words in one_error_line(r.err), r
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("args", [["-s", "\u0660.\u0665"], ["-s", "0.5", "--blocks", "\u0661\u0662"]])
def test_option_numbers_take_ascii_digits_only(cli, tmp_path, args):
    """float() and int() read Arabic-Indic digits; an option value must be a plain ASCII decimal (exit 2)."""
    src = tmp_path / "m.pt"
    torch.save({"w": torch.randn(8, 32)}, src)
    r = cli("prune", src, *args, "-o", tmp_path / "o.safetensors")
    assert r.code == 2 and r.err.count("\n") == 1, r


def test_sensitivity_samples_are_checked_against_memory_before_work(cli, tmp_path, monkeypatch):
    """--samples decides the proxy's allocations (x [K, samples], two [rows, samples] products): checked
    against the memory available before any tensor is read (exit 4 with the figure, never exit 70)."""
    import balprune.safeio as safeio

    src = tmp_path / "tall.pt"
    torch.save({"w": torch.randn(1000, 64)}, src)
    monkeypatch.setattr(safeio, "memory_available", lambda: 1 << 20)
    r = cli("sensitivity", src, "--blocks", "4", "--samples", "4096", "-o", tmp_path / "plan.toml")
    assert r.code == 4 and "--samples 4096 needs" in one_error_line(r.err), r
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tall.pt"]


@pytest.mark.parametrize("text,mentions", [
    ("[prune]\nsparsity = " + "9" * 400 + "\n", ("sparsity",)),
    ("x = " + "9" * 5000 + "\n", ("not valid TOML", "4300 digits")),
    (".".join(["a"] * 50000) + " = 1\n", ("dotted key", "more than 64 parts", "line 1")),
    ("[" + ".".join(["a"] * 50000) + "]\n", ("dotted key", "more than 64 parts")),
])
def test_prune_config_integers_and_dotted_keys_that_break_the_parser(cli, tmp_path, ckpt, text, mentions):
    """A 400-digit integer overflowed float() (exit 70), a 5000-digit one hit Python's int() limit inside
    tomllib (exit 70), a dotted key of 50,000 parts (100 KB) took tomllib minutes and gigabytes: exit 4 now,
    at once."""
    (tmp_path / "c.toml").write_text(text)
    start = time.monotonic()
    refused(tmp_path, ["prune", ckpt, "--config", tmp_path / "c.toml", "-o", tmp_path / "o.safetensors"], 4,
            *mentions, cli=cli)
    assert time.monotonic() - start < 20


def test_a_training_batch_that_cannot_fit_is_refused_with_its_figure(cli, tmp_path):
    """Only the parameters were checked: batch_size 65536 x bptt 100000 made the first batch ask for 52 GB of
    token ids (exit 70 from the allocator, or the OOM killer). Its inputs and logits are counted first."""
    text = ('[task]\nname = "lstm-lm"\nhidden = 8\nvocab_size = 100\nbptt = 100000\nmax_train_tokens = 200000\n'
            'max_eval_tokens = 200000\n[train]\nbatch_size = 65536\ndense_steps = 1\nsteps_per_stage = 1\n'
            '[prune]\nsparsity = 0.5\nblock_size = 4\n')
    r = recipe(tmp_path, text)
    start = time.monotonic()
    refused(tmp_path, ["finetune", r, "--out", tmp_path / "run", "--device", "cpu"], 4, "batches of 65536",
            "batch_size", cli=cli)
    assert time.monotonic() - start < 30


def test_schedule_values_are_numbers_as_the_file_types_them(cli, tmp_path, ckpt):
    (tmp_path / "c.toml").write_text('[prune]\nsparsity = 0.5\n[schedule]\nkind = "list"\nvalues = ["0.1", 0.5]\n')
    refused(tmp_path, ["prune", ckpt, "--config", tmp_path / "c.toml", "-o", tmp_path / "o.safetensors"], 4,
            "[schedule] values", "'0.1'", cli=cli)


def test_the_toml_depth_scan_reads_a_multiline_string_ending_in_extra_quotes():
    """A multi-line string may end in up to two more quotes (`\"\"\"a\"\"\"\"` is `a\"`); the scan closed it early
    and read the rest as strings, so 400 levels of arrays behind it passed the 64-level limit."""
    from balprune import safeio
    from balprune.errors import InvalidInputError

    text = 'include = ["""a"""", ' + "[" * 400 + "]" * 400 + "]"
    assert safeio.toml_depth(text) == 401
    assert safeio.toml_depth('x = """a"""""\ny = [[1]]\n') == 2
    assert safeio.toml_depth("x = '''a'''''\ny = [[1]]\n") == 2
    with pytest.raises(InvalidInputError, match="nested 401 levels"):
        safeio.loads_toml(text, "c.toml")
