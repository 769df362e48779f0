"""The pattern / encoding registry: every record complete, and what the switches it replaced decided."""

from __future__ import annotations

import subprocess
import sys

import pytest

from balprune import config
from balprune.formats import PACKED_CLASSES
from balprune.patterns.kinds import PatternKind
from balprune.patterns.registry import ENCODINGS, PATTERN_KEY_OWNER, PATTERNS, pattern_spec


def test_every_pattern_kind_has_one_record():
    assert set(PATTERNS) == set(PatternKind)
    for kind, spec in PATTERNS.items():
        assert spec.kind is kind and spec.encoding in ENCODINGS
        assert callable(spec.plan.get())


def test_every_encoding_resolves_to_the_formats_class():
    assert set(ENCODINGS) == set(PACKED_CLASSES)
    for name, enc in ENCODINGS.items():
        assert enc.packed_class.get() is PACKED_CLASSES[name]
        assert callable(enc.pack.get())


def test_config_keys_list_the_registry_keys():
    assert set(config._PATTERN_KEYS) == {"sparsity", *PATTERN_KEY_OWNER}
    assert list(PATTERN_KEY_OWNER) == ["blocks", "block_size", "nm", "block_shape", "vector_length", "scope"]


def test_operator_options_filtering():
    opts = {"threads": 128, "team_lanes": 4, "layout": "rows", "defines": ()}
    assert ENCODINGS["balanced"].operator_kwargs(opts) == {"threads": 128, "layout": "rows", "defines": ()}
    assert ENCODINGS["block"].operator_kwargs(opts) == {"threads": 128, "team_lanes": 4, "defines": ()}
    assert ENCODINGS["unstructured"].operator is None


@pytest.mark.parametrize("kind", list(PatternKind))
def test_build_goes_through_the_record(kind):
    p = config.build_pattern(kind.value, sparsity="0.5")
    assert isinstance(p, pattern_spec(kind).cls) and p.kind is kind


def test_patterns_and_runtime_import_light():
    code = ("import sys, balprune.patterns.registry, balprune.runtime; "
            "assert 'cupy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    code = "import sys, balprune.patterns.kinds; assert 'balprune.config' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
