"""Finding, reading and compiling the CUDA sources in kernels/: the one way kernels are loaded.

The sources live in the repository's ``kernels/`` folder; an installed wheel carries them as
``balprune/kernels`` (pyproject force-include). Local ``#include "x.cuh"`` lines are inlined
into the source string before compiling, because CuPy's kernel cache keys on the source text
and the options, not on files reached through -I: an edited header must change the key.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from ..errors import GpuRuntimeError

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.MULTILINE)

#: Options given to NVRTC besides the architecture, which CuPy takes from the current device.
COMPILE_OPTIONS = ("-std=c++17",)


def kernels_dir() -> Path:
    """The folder holding the .cu sources: $BALPRUNE_KERNELS_DIR, the wheel's copy, or the checkout's."""
    env = os.environ.get("BALPRUNE_KERNELS_DIR")
    here = Path(__file__).resolve()
    candidates = ([Path(env)] if env else []) + [here.parents[1] / "kernels", here.parents[3] / "kernels"]
    for c in candidates:
        if (c / "balanced_spmv.cu").is_file():
            return c
    raise GpuRuntimeError(f"kernel sources not found (looked in {', '.join(map(str, candidates))})",
                          hint="reinstall balprune or set BALPRUNE_KERNELS_DIR")


def kernel_source(filename: str) -> str:
    """The text of kernels/``filename`` with every local ``#include "x"`` inlined (once each)."""
    root = kernels_dir()
    seen: set[Path] = set()

    def expand(path: Path) -> str:
        if not path.is_file():
            raise GpuRuntimeError(f"kernel source {path} not found")
        seen.add(path)
        text = _PRAGMA_ONCE.sub("", path.read_text(encoding="utf-8"))

        def repl(m: re.Match) -> str:
            inc = (path.parent / m.group(1)).resolve()
            if inc in seen:
                return f"// (already inlined: {m.group(1)})"
            return f"// ---- begin {m.group(1)} ----\n{expand(inc)}\n// ---- end {m.group(1)} ----"

        return _INCLUDE.sub(repl, text)

    return expand((root / filename).resolve())


def load_module(filename: str, name_expressions: tuple[str, ...] = (), *, device: int = 0,
                defines: tuple[str, ...] = ()):
    """Compile kernels/``filename`` for ``device`` with CuPy (NVRTC), once per device and arguments.

    ``name_expressions`` names the template instantiations to build (fetch each with
    ``module.get_function(expr)``); extern "C" kernels need none. ``defines`` are extra -D
    options (e.g. ``("BP_WEIGHT_HINT=0",)``). Raises NoGpuError without CuPy or a GPU and
    GpuRuntimeError when compilation fails.
    """
    return _load_module(filename, tuple(name_expressions), int(device), tuple(defines))


@functools.cache
def _load_module(filename: str, name_expressions: tuple[str, ...], device: int, defines: tuple[str, ...]):
    from . import _gpu

    cp = _gpu.cupy()
    _gpu.require_device(device)
    source = kernel_source(filename)
    options = COMPILE_OPTIONS + tuple(f"-D{d}" for d in defines)
    try:
        with cp.cuda.Device(device):
            module = cp.RawModule(code=source, options=options, name_expressions=name_expressions or None)
            # Compile now, under this device (CuPy compiles lazily and takes the architecture
            # from the device current at that moment).
            if name_expressions:
                module.get_function(name_expressions[0])
            else:
                module.compile()
    except Exception as e:
        raise GpuRuntimeError(f"compiling kernels/{filename} failed: {type(e).__name__}: {e}") from e
    return module
