"""Silent shortfalls (issue 14): what `prune` was asked for against what it did, said out loud.

- per target: achieved sparsity more than 2 points below its own request (the default pattern's or
  its [[layers]] rule's) is a warning line (table, stderr, --json notes); --strict makes it exit 4
  before anything is written;
- the whole checkpoint: achieved beside requested in the table's total row and in --json;
- --include / --exclude globs matching nothing: a warning naming the glob (exit 0);
- options the chosen pattern ignores: exit 2 naming the option and the pattern, before any file is
  opened (also with the pattern from --config; the config's own contradictions are exit 4).
"""

from __future__ import annotations

import json

import pytest
import torch
from test_bad_inputs import Guard, assert_fails

from balprune.save import save_state_dict


def _ckpt(tmp_path, shapes: dict[str, tuple[int, ...]], name="m.safetensors"):
    g = torch.Generator().manual_seed(0)
    p = tmp_path / name
    save_state_dict({n: torch.randn(*s, generator=g) for n, s in shapes.items()}, p)
    return p


def _json(cli, *args):
    r = cli("prune", *args, "--json")
    assert r.code == 0, r
    return json.loads(r.out), r


def _warnings(report):
    return [n for n in report["notes"] if n.startswith("warning: ")]


def _tensor(report, name):
    return next(t for t in report["tensors"] if t["name"] == name)


# --------------------------------------------------------------------------- per-layer shortfall


def test_k40_at_90_percent_is_50_percent_and_says_so(cli, tmp_path):
    """K = 40 with 32 blocks: L = 2, k = 1, so 50% for a 90% request: one warning, exit 0."""
    src = _ckpt(tmp_path, {"short.weight": (8, 40), "long.weight": (8, 1000)})
    rep, r = _json(cli, src, "-s", "0.9", "-o", tmp_path / "o.safetensors")
    short, long_ = _tensor(rep, "short.weight"), _tensor(rep, "long.weight")
    assert (short["sparsity_requested"], short["sparsity_achieved"], short["shortfall"]) == (0.9, 0.5, True)
    assert long_["shortfall"] is False and long_["sparsity_achieved"] == pytest.approx(0.904)  # 32 blocks of 32 (1024 padded), 3 kept
    (w,) = _warnings(rep)
    assert "'short.weight'" in w and "50.0%" in w and "90.0% requested" in w and "L=2 k=1" in w
    # stderr carries the same line, once
    assert [ln for ln in r.err.splitlines() if ln.startswith("warning:")] == [w]
    # totals over the targets, weighted by size, and over every element
    n_s, n_l = 8 * 40, 8 * 1000
    assert rep["sparsity_requested"] == pytest.approx(0.9)
    expect = (0.5 * n_s + long_["sparsity_achieved"] * n_l) / (n_s + n_l)
    assert rep["sparsity_achieved"] == pytest.approx(expect)
    assert rep["sparsity_achieved_all"] == pytest.approx(expect)


def test_table_marks_the_layer_and_shows_requested_vs_achieved_total(cli, tmp_path):
    src = _ckpt(tmp_path, {"short.weight": (8, 40), "long.weight": (8, 1000), "bias": (8,)})
    r = cli("prune", src, "-s", "0.9", "-o", tmp_path / "o.safetensors")
    assert r.code == 0, r
    row = next(ln for ln in r.out.splitlines() if "short.weight" in ln and "│" in ln)
    assert "50.0% ! 90.0% req" in row
    long_row = next(ln for ln in r.out.splitlines() if "long.weight" in ln and "│" in ln)
    assert "!" not in long_row
    total = next(ln for ln in r.out.splitlines() if "total (" in ln)
    assert "of 90.0% req" in total
    assert "of all weights removed" in r.out
    assert "warning:" not in r.out  # said once, on stderr (the row carries the mark)
    assert [ln for ln in r.err.splitlines() if ln.startswith("warning:")] == \
        [ln for ln in r.err.splitlines() if "short.weight" in ln]
    assert sum("warning: tensor 'short.weight'" in ln for ln in r.err.splitlines()) == 1


def test_k256_makes_70_and_80_percent_identical(cli, tmp_path):
    """K = 256 with 32 blocks: L = 8; 0.7 and 0.8 both keep k = 2 (75%): 0.8 is 5 points short, 0.7 is not."""
    src = _ckpt(tmp_path, {"w": (4, 256)})
    got = {}
    for s in ("0.7", "0.8"):
        rep, _ = _json(cli, src, "-s", s, "-o", tmp_path / f"o{s}.safetensors")
        got[s] = (_tensor(rep, "w")["sparsity_achieved"], len(_warnings(rep)))
    assert got == {"0.7": (0.75, 0), "0.8": (0.75, 1)}


def test_row_too_short_to_prune_is_a_shortfall_too(cli, tmp_path):
    """K = 20 with 32 blocks: block length 1 prunes nothing; the tensor passes through at 0%, and says so."""
    src = _ckpt(tmp_path, {"tiny.weight": (4, 20), "w": (4, 1000)})
    rep, _ = _json(cli, src, "-s", "0.9", "-o", tmp_path / "o.safetensors")
    t = _tensor(rep, "tiny.weight")
    assert t["action"] == "passed" and t["shortfall"] is True and t["sparsity_requested"] == 0.9
    (w,) = _warnings(rep)
    assert "'tiny.weight'" in w and "0.0% sparsity" in w and "row too short" in w


def test_rules_compare_against_their_own_request(cli, tmp_path):
    """A [[layers]] rule asking 50% of a K = 40 layer gets exactly 50%: no warning; asking 90% of it: a warning."""
    src = _ckpt(tmp_path, {"a.weight": (8, 40), "b.weight": (8, 40), "w": (8, 1000)})
    cfg = tmp_path / "c.toml"
    cfg.write_text('[prune]\nsparsity = 0.9\n\n[[layers]]\nmatch = "a.*"\nsparsity = 0.5\n\n'
                   '[[layers]]\nmatch = "b.*"\nsparsity = 0.9\n')
    rep, _ = _json(cli, src, "--config", cfg, "-o", tmp_path / "o.safetensors")
    assert _tensor(rep, "a.weight")["sparsity_requested"] == 0.5 and not _tensor(rep, "a.weight")["shortfall"]
    (w,) = _warnings(rep)
    assert "'b.weight'" in w
    assert rep["sparsity_requested"] == pytest.approx((0.5 * 320 + 0.9 * 320 + 0.9 * 8000) / 8640)


def test_global_scope_is_judged_in_total_not_per_layer(cli, tmp_path):
    """One global ranking spreads the zeros unevenly by design: no per-layer warning, the total meets the request."""
    g = torch.Generator().manual_seed(0)
    sd = {"big.weight": torch.randn(16, 64, generator=g) * 10, "small.weight": torch.randn(16, 64, generator=g) * 0.1}
    src = tmp_path / "m.safetensors"
    save_state_dict(sd, src)
    rep, _ = _json(cli, src, "-p", "unstructured", "--scope", "global", "-s", "0.8",
                   "-o", tmp_path / "o.safetensors")
    assert _tensor(rep, "big.weight")["sparsity_achieved"] < 0.7  # far below 80%, by design
    assert _warnings(rep) == []
    assert rep["sparsity_achieved"] == pytest.approx(0.8, abs=1e-3)


def test_strict_refuses_a_shortfall_before_writing(cli, tmp_path):
    src = _ckpt(tmp_path, {"short.weight": (8, 40), "w": (8, 1000)})
    out = tmp_path / "o.safetensors"
    g = Guard(tmp_path)
    line = assert_fails(cli("prune", src, "-s", "0.9", "--strict", "-o", out), 4, g,
                        mentions=("'short.weight'", "--strict", "50.0%"), output=out)
    assert "90.0% requested" in line
    # two short layers: the first is named, the count of the rest given, still one line
    src2 = _ckpt(tmp_path, {"a.weight": (8, 40), "b.weight": (8, 64)}, "two.safetensors")
    g = Guard(tmp_path)
    line = assert_fails(cli("prune", src2, "-s", "0.9", "--strict", "-o", out, "--json"), 4, g, output=out)
    assert "'a.weight'" in line and "1 more" in line


def test_strict_passes_when_every_target_meets_its_request(cli, tmp_path):
    src = _ckpt(tmp_path, {"w": (8, 1000), "v": (8, 2000)})
    rep, _ = _json(cli, src, "-s", "0.9", "--strict", "-o", tmp_path / "o.safetensors")
    assert _warnings(rep) == [] and (tmp_path / "o.safetensors").exists()


def test_strict_still_refuses_non_float_matrices(cli, tmp_path):
    src = tmp_path / "m.safetensors"
    save_state_dict({"w": torch.randn(8, 1000), "q.weight": torch.zeros(8, 1000, dtype=torch.int8)}, src)
    out = tmp_path / "o.safetensors"
    assert_fails(cli("prune", src, "-s", "0.9", "--strict", "-o", out), 4, Guard(tmp_path),
                 mentions=("'q.weight'", "--strict"), output=out)


# --------------------------------------------------------------------------- globs matching nothing


def test_globs_that_match_nothing_warn_and_name_the_glob(cli, tmp_path):
    src = _ckpt(tmp_path, {"fc1.weight": (8, 1000), "fc2.weight": (8, 1000)})
    out = tmp_path / "o.safetensors"
    r = cli("prune", src, "-s", "0.9", "--include", "fc*", "--include", "decoder.*", "--exclude", "fc2.*",
            "--exclude", "enc?der.*", "-o", out)
    assert r.code == 0, r
    warned = [ln for ln in r.err.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 2
    assert "include glob 'decoder.*' matches no tensor" in warned[0]
    assert "exclude glob 'enc?der.*' matches no tensor" in warned[1]
    rep, r = _json(cli, src, "-s", "0.9", "--include", "fc*", "--include", "decoder.*",
                   "--exclude", "enc?der.*", "-o", out, "--force")
    assert [n for n in rep["notes"] if "glob" in n] == ["warning: include glob 'decoder.*' matches no tensor",
                                                       "warning: exclude glob 'enc?der.*' matches no tensor"]
    assert len([ln for ln in r.err.splitlines() if "glob" in ln]) == 2


def test_glob_warning_shows_a_hostile_glob_literally(cli, tmp_path):
    src = _ckpt(tmp_path, {"w": (8, 1000)})
    r = cli("prune", src, "-s", "0.9", "--exclude", "[bold red]x\x1b[2J", "-o", tmp_path / "o.safetensors")
    assert r.code == 0, r
    (w,) = [ln for ln in r.err.splitlines() if ln.startswith("warning:")]
    assert "\x1b" not in r.err and "[bold red]x" in w and "\\x1b[2J" in w


# --------------------------------------------------------------------------- options the pattern ignores


@pytest.mark.parametrize("args,option,pattern", [
    (["--pattern", "block", "--blocks", "16"], "--blocks", "block"),
    (["--pattern", "unstructured", "--block-size", "8"], "--block-size", "unstructured"),
    (["--block-shape", "4x4"], "--block-shape", "balanced"),
    (["--pattern", "balanced", "--block-shape", "4x4"], "--block-shape", "balanced"),
    (["--pattern", "block", "--vector-length", "4"], "--vector-length", "block"),
    (["--pattern", "unstructured", "--vector-length", "4"], "--vector-length", "unstructured"),
    (["--scope", "global"], "--scope", "balanced"),
    (["--pattern", "vector", "--scope", "tensor"], "--scope", "vector"),
    (["--pattern", "unstructured", "--nm", "2:4"], "--nm", "unstructured"),
    (["--pattern", "block", "--nm", "2:4"], "--nm", "block"),
])
def test_an_option_the_pattern_ignores_is_a_usage_error_before_any_file(cli, tmp_path, args, option, pattern):
    missing = tmp_path / "nowhere.pt"  # never opened: the usage error comes first
    g = Guard(tmp_path)
    extra = [] if "--nm" in args else ["-s", "0.5"]
    line = assert_fails(cli("prune", missing, *extra, *args), 2, g, mentions=(option, pattern))
    assert "nowhere.pt" not in line


def test_pattern_from_config_still_makes_a_cli_option_a_usage_error(cli, tmp_path):
    src = _ckpt(tmp_path, {"w": (8, 1000)})
    cfg = tmp_path / "c.toml"
    cfg.write_text('[prune]\npattern = "block"\nsparsity = 0.5\n')
    out = tmp_path / "o.safetensors"
    assert_fails(cli("prune", src, "--config", cfg, "--blocks", "16", "-o", out), 2, Guard(tmp_path),
                 mentions=("--blocks", "block"), output=out)


def test_a_config_contradicting_itself_is_exit_4(cli, tmp_path):
    src = _ckpt(tmp_path, {"w": (8, 1000)})
    out = tmp_path / "o.safetensors"
    cfg = tmp_path / "c.toml"
    cfg.write_text('[prune]\npattern = "block"\nsparsity = 0.5\nblocks = 16\n')
    assert_fails(cli("prune", src, "--config", cfg, "-o", out), 4, Guard(tmp_path),
                 mentions=("[prune] blocks", "block"), output=out)
    cfg.write_text('[prune]\nsparsity = 0.5\n\n[[layers]]\nmatch = "w"\nblock_shape = "4x4"\n')
    assert_fails(cli("prune", src, "--config", cfg, "-o", out), 4, Guard(tmp_path),
                 mentions=("layer rule 'w'", "block_shape", "balanced"), output=out)


def test_pattern_flag_replaces_the_configs_pattern_and_its_keys(cli, tmp_path):
    """A balanced recipe (blocks = 16) used with --pattern block: its balanced keys are dropped, not an error."""
    src = _ckpt(tmp_path, {"w": (16, 1024)})
    cfg = tmp_path / "c.toml"
    cfg.write_text('[prune]\npattern = "balanced"\nsparsity = 0.5\nblocks = 16\n')
    rep, _ = _json(cli, src, "--config", cfg, "--pattern", "block", "--block-shape", "4x4",
                   "-o", tmp_path / "o.safetensors")
    assert _tensor(rep, "w")["reason"].startswith("block")


def test_sensitivity_and_sweep_refuse_options_their_patterns_ignore(cli, tmp_path):
    missing = tmp_path / "nowhere.pt"
    assert_fails(cli("sensitivity", missing, "--pattern", "block", "--blocks", "16"), 2, Guard(tmp_path),
                 mentions=("--blocks", "block"))
    assert_fails(cli("sensitivity", missing, "--vector-length", "4"), 2, Guard(tmp_path),
                 mentions=("--vector-length", "balanced"))
    recipe = tmp_path / "nowhere.toml"
    for args, option in ((["--patterns", "unstructured,block", "--blocks", "8"], "--blocks"),
                         (["--patterns", "balanced", "--block-shapes", "4x4"], "--block-shapes"),
                         (["--patterns", "balanced", "--vector-lengths", "4"], "--vector-lengths"),
                         (["--patterns", "vector", "--block-sizes", "8"], "--block-sizes")):
        line = assert_fails(cli("sweep", recipe, *args), 2, Guard(tmp_path), mentions=(option,))
        assert "nowhere" not in line


def test_notes_are_one_line_each_even_in_a_narrow_terminal(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    src = _ckpt(tmp_path, {"a_rather_long_tensor_name.weight": (8, 40)})
    r = cli("prune", src, "-s", "0.9", "-o", tmp_path / "o.safetensors", "--json")
    assert r.code == 0, r
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: tensor 'a_rather_long_tensor_name.weight'")


def test_finetune_with_a_strict_recipe_refuses_a_shortfall_before_training(cli, tmp_path):
    """The export would refuse it after the last stage; the run refuses it before the first (no folder)."""
    from test_finetune_cli import TINY_DIGITS, write_recipe

    text = TINY_DIGITS.replace("sparsity = 0.75\nblocks = 4", "sparsity = 0.9\nblocks = 32\nstrict = true")
    assert "strict = true" in text
    recipe = write_recipe(tmp_path, text)
    g = Guard(tmp_path)
    assert_fails(cli("finetune", recipe, "--out", tmp_path / "run", "--device", "cpu"), 4, g,
                 mentions=("fc2.weight", "50.0%", "--strict"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,needle", [
    (["--nm", "2:4", "-s", "0.5"], "--nm"),
    (["--nm", "2:4", "--blocks", "8"], "--nm"),
    (["-s", "0.5", "--blocks", "8", "--block-size", "4"], "--blocks and --block-size"),
])
def test_contradicting_cli_options_are_usage_errors_with_or_without_config(cli, tmp_path, args, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[prune]\nsparsity = 0.5\n")
    for extra in ([], ["--config", cfg]):
        assert_fails(cli("prune", tmp_path / "nowhere.pt", *args, *extra), 2, Guard(tmp_path), mentions=(needle,))


def test_nan_in_a_target_that_passes_through_dense_is_refused(cli, tmp_path):
    """A 2-D weight too short to prune (passes through dense) is still a weight: NaN/Inf is exit 4 naming it,
    as for a pruned one; nothing is written."""
    w = torch.randn(64, 4)
    w[3, 1] = float("nan")
    src = tmp_path / "m.pt"
    torch.save({"short.weight": w, "long.weight": torch.randn(8, 256)}, src)
    r = cli("prune", src, "-s", "0.9", "-o", tmp_path / "o.safetensors")
    assert r.code == 4 and "short.weight" in r.err and "NaN" in r.err and r.err.count("\n") == 1, r
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("args", [["-p", "block", "--block-shape", "16384x16384"],
                                  ["-p", "vector", "--vector-length", "100000000000"]])
def test_tiles_larger_than_the_matrix_pass_it_through_with_a_warning(cli, tmp_path, args):
    """Padded to whole tiles, a tile larger than the matrix would be far larger than dense (a 0.5 MB checkpoint
    became 4.3 GB) and prune nothing: such a layer passes through dense, said per layer; --strict refuses."""
    src = _ckpt(tmp_path, {"fc.weight": (32, 144)})
    out = tmp_path / "o.safetensors"
    r = cli("prune", src, "-s", "0.5", *args, "-o", out)
    assert r.code == 0 and "is larger than the [32, 144] matrix" in r.err, r
    assert out.stat().st_size < 2 * src.stat().st_size
    r = cli("prune", src, "-s", "0.5", *args, "--strict", "-o", tmp_path / "s.safetensors", "--force")
    assert r.code == 4 and not (tmp_path / "s.safetensors").exists(), r


def test_many_unmatched_globs_print_a_bounded_number_of_lines():
    """A config of 10^6 [[layers]] rules matching nothing printed 10^6 warning lines: the first
    MAX_GLOB_WARNINGS, then one line counting the rest."""
    from balprune.config import PruneOptions
    from balprune.patterns.kinds import BalancedPattern
    from balprune.prune.plan import MAX_GLOB_WARNINGS, unmatched_globs

    pattern = BalancedPattern(0.5, blocks=4)
    options = PruneOptions(pattern, include=tuple(f"nothing{i}.*" for i in range(100)))
    out = unmatched_globs(["fc1.weight"], options)
    assert len(out) == MAX_GLOB_WARNINGS + 1
    assert out[0] == "include glob 'nothing0.*' matches no tensor"
    assert out[-1] == f"... and {100 - MAX_GLOB_WARNINGS} more globs that match no tensor"
    assert unmatched_globs(["fc1.weight"], PruneOptions(pattern, include=("fc*",))) == []
