"""The model runtime times every walk of the bitmask kernel and keeps the bound one's layout only
(runtime.model.stages: sparse_alternatives builds one BitmaskLinear per walk, launch_variants labels the
ones that are not the default, Projection.release_unbound drops the others). Host logic, no GPU: the
operators are stand-ins with the real class's type and walk."""

from __future__ import annotations

import torch

from balprune.patterns.registry import MODEL_BITMASK_PATH
from balprune.runtime.bitmask import WALK, WALKS, BitmaskLinear
from balprune.runtime.model.stages import Choice, Projection, launch_variants


class _Walk(BitmaskLinear):
    """A BitmaskLinear that launches nothing: its walk and byte count only."""

    def __init__(self, walk: int, nbytes: int) -> None:  # no device arrays
        self.walk, self._bytes, self.launched = walk, nbytes, 0

    @property
    def weight_bytes(self) -> int:
        return self._bytes

    def prepared_launch(self, x, y, batch, packed=True, *, bias=None, relu=False, overlap=False):
        def run():
            self.launched += 1
        return run


OTHER = next(w for w in WALKS if w != WALK)


def test_the_default_walk_is_the_plain_path_and_another_walk_a_labelled_variant():
    default, other = _Walk(WALK, 10), _Walk(OTHER, 12)
    assert launch_variants(default, 1) == {"": default}
    assert launch_variants(other, 1) == {f"walk {OTHER}": other}


def _projection(ops):
    dense = torch.zeros(4, 8)
    return Projection("layer", dense, torch.zeros(8), torch.zeros(4), dtype="float32", kernels=None,
                      views=lambda t: t, pattern="balanced", alternatives=[(MODEL_BITMASK_PATH, o) for o in ops])


def test_binding_one_walk_keeps_that_walks_operator_only():
    default, other = _Walk(WALK, 10), _Walk(OTHER, 12)
    proj = _projection([default, other])
    key = f"{MODEL_BITMASK_PATH} (walk {OTHER})"
    assert set(proj.candidates()) == {"dense", MODEL_BITMASK_PATH, key}
    assert proj.bytes_of(MODEL_BITMASK_PATH) == 10 and proj.bytes_of(key) == 12
    proj.bind(key)
    proj.choice = Choice("layer", (4, 8), 1, "balanced", MODEL_BITMASK_PATH, "fastest")
    proj.release_unbound(keep_dense=True)
    assert proj.alternatives == [(MODEL_BITMASK_PATH, other)]
    proj.launch()
    assert (other.launched, default.launched) == (1, 0)
    proj.set_overlap(True)  # rebinding finds the same candidate on the kept operator
    proj.launch()
    assert (other.launched, default.launched) == (2, 0) and proj.bytes_of(key) == 12


def test_binding_the_default_walk_drops_the_other_layout():
    default, other = _Walk(WALK, 10), _Walk(OTHER, 12)
    proj = _projection([default, other])
    proj.bind(MODEL_BITMASK_PATH)
    proj.choice = Choice("layer", (4, 8), 1, "balanced", MODEL_BITMASK_PATH, "fastest")
    proj.release_unbound(keep_dense=True)
    assert proj.alternatives == [(MODEL_BITMASK_PATH, default)]


def test_bench_times_the_other_walks_of_a_bitmask_stored_layer_only():
    """bench's per-layer table (patterns.registry: balanced's bench_alternatives) times the mask walks beside the
    subject (the default walk, the delta walk) for a bitmask-stored layer, so its path column can name the
    runtime's choice; an offsets-stored layer has no such path."""
    from helpers import balanced_conv_weight

    from balprune.bench.report import ALTERNATIVES
    from balprune.patterns.registry import ENCODINGS

    others = [w for w in WALKS if w != WALK]
    assert others == [5, 6]
    for walk in others:
        kernel = f"balanced_walk{walk}"
        assert kernel in ALTERNATIVES["balanced"]
        alt = next(a for a in ENCODINGS["balanced"].bench_alternatives if a.kernel == kernel)
        assert alt.operator.path.endswith(f":walk{walk}_from_tensor")
        bt, _ = balanced_conv_weight(8, 16, 1, 1, 0.5, blocks=4)
        bm = bt.with_encoding("bitmask")
        assert alt.convert(bm) is bm
        assert alt.convert(bt.with_encoding("offsets")) is None
    assert f"balanced_walk{WALK}" not in ALTERNATIVES["balanced"]  # the subject is the default walk


def test_the_default_walk_is_the_delta_operator():
    """BitmaskLinear() and BitmaskLinear(walk=7) are a DeltaLinear (its own layout and kernel, the same call
    contract); the mask walks the mask kernel's operator."""
    import copy

    from balprune.runtime.bitmask import DELTA_WALK, DeltaLinear

    assert WALK == DELTA_WALK
    args = (None, None)  # (values, indices): __new__ looks at the walk only
    assert type(BitmaskLinear.__new__(BitmaskLinear, *args)) is DeltaLinear
    assert type(BitmaskLinear.__new__(BitmaskLinear, *args, walk=DELTA_WALK)) is DeltaLinear
    assert type(BitmaskLinear.__new__(BitmaskLinear, *args, walk=6)) is BitmaskLinear
    assert type(BitmaskLinear.__new__(BitmaskLinear, *args, walk=5)) is BitmaskLinear
    # a copy (launch_variants' shallow copies) keeps its class: cls.__new__(cls) with no arguments
    mask = BitmaskLinear.__new__(BitmaskLinear, *args, walk=5)
    mask.walk = 5
    assert type(copy.copy(mask)) is BitmaskLinear and copy.copy(mask).walk == 5
    delta = BitmaskLinear.__new__(BitmaskLinear, *args)
    delta.walk = DELTA_WALK
    assert type(copy.copy(delta)) is DeltaLinear


# -- which timed path runs (measure.pick_path) -----------------------------------------------------------------

def test_the_fastest_path_runs_when_it_is_clearly_faster():
    from balprune.runtime.measure import pick_path

    path, why = pick_path({"dense": 10.0, "balanced_bitmask": 6.0}, {"dense": 4_000_000, "balanced_bitmask": 1_500_000})
    assert path == "balanced_bitmask" and why == "balanced_bitmask 6.0 us vs dense 10.0 us (1.67x)"
    # a faster path with more bytes beyond the tie band still wins
    path, _ = pick_path({"dense": 5.0, "balanced": 5.5}, {"dense": 4_000_000, "balanced": 1_500_000})
    assert path == "dense"


def test_a_near_tie_goes_to_the_path_that_reads_fewer_bytes():
    from balprune.runtime.measure import TIE_FRACTION, pick_path

    near = 5.0 * (1 + TIE_FRACTION) * 0.999
    path, why = pick_path({"dense": 5.0, "balanced_bitmask": near}, {"dense": 12_600_000, "balanced_bitmask": 4_500_000})
    assert path == "balanced_bitmask"
    assert why.startswith(f"balanced_bitmask {near:.1f} us vs dense 5.0 us") and "4.50 MB read against 12.60 MB" in why
    # equal bytes: the faster of the tie
    assert pick_path({"balanced": 5.0, "balanced_walk6": 5.1}, {"balanced": 10, "balanced_walk6": 10})[0] == "balanced"


def test_one_timed_path_is_the_only_one():
    from balprune.runtime.measure import pick_path

    assert pick_path({"dense": 3.0}, {"dense": 1}) == ("dense", "the only correct path")


def test_shared_memory_is_x_plus_each_walks_mask_words():
    """BitmaskLinear.shared_bytes: x staged [seg_cols, Q*P, NB] (16-byte rounded), then per warp and lane the mask
    words the walk keeps (walk 5: W; walk 6: 2 * (W + 1)); the delta walk keeps none (its steps stream from global)."""
    from balprune.formats.layouts import DeltaGeometry, SegmentGeometry
    from balprune.runtime.bitmask import THREADS, DeltaLinear

    def shell(cls, walk, geometry):
        op = BitmaskLinear.__new__(cls)
        op.walk, op.dtype, op.segments = walk, "float16", geometry
        return op

    sg = SegmentGeometry(32, 128, 64, 2)  # 8B q/o at 50%: 4096 staged columns, W = 4 words per segment
    dg = DeltaGeometry(32, 128, 64, 2)
    assert sg.staged_cols == dg.staged_cols == 4096 and sg.words == 4
    warps_words = THREADS // 32 * 32 * 4  # bytes of one mask word per lane of every warp
    assert shell(BitmaskLinear, 5, sg).shared_bytes(1, False) == 4096 * 4 + 4 * warps_words
    assert shell(BitmaskLinear, 6, sg).shared_bytes(1, False) == 4096 * 4 + 10 * warps_words
    assert shell(DeltaLinear, 7, dg).shared_bytes(1, False) == 4096 * 4
    assert shell(DeltaLinear, 7, dg).shared_bytes(4, True) == 4096 * 4 * 2


def _kernel_params(name: str) -> list[tuple[str, str]]:
    """(C type, name) of each parameter of __global__ ``name`` in kernels/balanced_bitmask.cu."""
    from helpers import global_kernels, strip_comments

    from balprune.runtime.kernels import kernels_dir

    text = strip_comments((kernels_dir() / "balanced_bitmask.cu").read_text())
    params = next(p for n, p, _ in global_kernels(text) if n == name)
    out = []
    for p in params[: params.rindex(")")].split(","):
        words = p.replace("__restrict__", " ").replace("*", " * ").split()
        out.append((" ".join(w for w in words[:-1] if w != "const"), words[-1]))
    return out


def test_launch_arguments_match_the_kernels_parameter_lists():
    """BitmaskLinear._launch_args (mask walks) and DeltaLinear._launch_args (the delta walk) pass, in order, an
    array for each pointer parameter up to y, a uint32 for each unsigned and an int32 for each int: a wrong order
    or type would otherwise first show on a GPU as a wrong product. The epilogue's bias and act follow y."""
    import numpy as np

    from balprune.formats.layouts import DeltaGeometry, SegmentGeometry
    from balprune.runtime.bitmask import DeltaLinear

    def shell(cls, walk, geometry, arrays):
        op = BitmaskLinear.__new__(cls)
        op.walk, op.dtype, op.segments, op.rows, op.cols = walk, "float16", geometry, 64, 4096
        for attr, n in arrays.items():
            setattr(op, attr, np.zeros(n, np.uint32))
        return op

    x, y = object(), object()
    cases = [("balanced_bitmask_spmm", shell(BitmaskLinear, 5, SegmentGeometry(32, 128, 64, 2),
                                             {"units_dev": 8, "words_dev": 8})),
             # (48 blocks: S = 48 segments, P = 32 lanes, Q = 2 rounds -- a swap of any two is seen)
             ("balanced_delta_spmm", shell(DeltaLinear, 7, DeltaGeometry(48, 128, 64, 2),
                                           {"units_dev": 8, "deltas_dev": (5, 32), "starts_dev": 3}))]
    for kernel, op in cases:
        params = _kernel_params(kernel)
        names = [n for _, n in params]
        params = params[: names.index("y") + 1]
        args = op._launch_args(x, y, 1, {})
        assert len(args) == len(params), (kernel, names)
        for (ctype, pname), arg in zip(params, args):
            if pname == "x":
                assert arg is x
            elif pname == "y":
                assert arg is y
            elif "*" in ctype:
                assert isinstance(arg, np.ndarray), (kernel, pname)
            else:
                assert type(arg) is {"unsigned": np.uint32, "int": np.int32}[ctype], (kernel, pname, type(arg))
    delta_names = [n for _, n in _kernel_params("balanced_delta_spmm")]
    delta_args = dict(zip(delta_names, cases[1][1]._launch_args(x, y, 1, {})))
    dg = cases[1][1].segments
    assert len({dg.segments, dg.lanes, dg.rounds, dg.seg_cols}) == 4, dg.as_tuple()
    assert (delta_args["rows"], delta_args["Q"], delta_args["P"], delta_args["seg_cols"], delta_args["S"]) == \
        (64, dg.rounds, dg.lanes, dg.seg_cols, dg.segments)
