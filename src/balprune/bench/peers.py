"""The kernels ``balprune bench`` times for one packed layer: ours and the libraries a user would use.

Every candidate computes y = W' x for a matrix W' it states (``weight``): for ours, dense and
CSR, the layer's own pruned matrix; for the block-sparse and 2:4 peers of a balanced layer, the
same weights pruned to that pattern (tiles / 2:4 groups chosen by magnitude) at the layer's
sparsity (2:4: its fixed 50%), so their times compare equal sparsity, not equal outputs. Each is
gated against float64 W' x before it is timed. A peer that cannot run here (dtype, shape, library
support) is returned as an ``Unavailable`` with the reason, never silently dropped.

Each candidate states the precision it accumulates in (``accumulate``), which sets its gate
(runtime.measure.product_tolerance): balprune's kernels accumulate in float32; the libraries do
not promise it for 16-bit values (cuBLAS under torch's default allow_fp16_reduced_precision_reduction,
cuSPARSE, torch's BSR and 2:4 paths), so they are held to 16-bit accumulation (``None``: as the
storage dtype). The libraries' own notices (torch's "Sparse CSR tensor support is in beta",
"SparseSemiStructuredTensor ... prototype", ...) are silenced where they are called
(``quiet_libraries``): only balprune's own lines reach stderr. This module imports no CuPy: it
reaches CuPy through runtime._gpu.

Kernels (the ``kernel`` field of a measurement):
    balanced   balprune's balanced kernel (kernels/balanced_spmv.cu)
    bsr        balprune's block-sparse kernel (kernels/bsr_spmv.cu), 8x8 tiles unless the layer has its own
    dense      cuBLAS through torch (torch.mv / torch.mm in the layer's dtype; tensor cores where cuBLAS uses them)
    csr        cuSPARSE CSR: cupyx for float32, torch's CSR for 16-bit types
    torch_bsr  torch's BSR tensor (torch.sparse_bsr_tensor @ x)
    torch_2:4  torch's 2:4 semi-structured sparse tensor (hardware sparse tensor cores; 16-bit only)
    stream     a plain streaming read of as many bytes as the subject kernel moves: the achievable
               time for this transfer size on this GPU (no computation; not gated)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..formats.base import as_matrix
from ..formats.bsr import BsrTensor
from ..patterns.balanced import balanced_mask, geometry_for
from ..patterns.block import kept_tiles, tiles_to_mask
from ..patterns.kinds import BalancedPattern
from ..patterns.registry import ENCODINGS

#: The subject kernel of each packed pattern: balprune's own path for it (patterns.registry's
#: Encoding.bench_subject).
SUBJECT = {enc.name: enc.bench_subject for enc in ENCODINGS.values()}
#: Tile of the block-sparse peer of a balanced layer (the paper's block baseline).
PEER_TILE = (8, 8)

Launch = Callable[[], object]
#: Accumulation precision of balprune's own kernels (fp32 sums of exact fp32 products).
OWN_ACCUMULATION = "float32"


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence Python warnings (torch's beta / prototype notices, CuPy's) inside: put it around a
    peer library's construction and calls, never around a timed closure's body (no cost per launch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@dataclass
class Candidate:
    """One kernel ready to time: ``make(n)`` returns n launch closures over n weight copies."""

    kernel: str
    nbytes: int  # bytes one launch must move (weights as stored + x + y)
    make: Callable[[int], list[Launch]]
    run: Callable[[], torch.Tensor] | None  # one call returning y (torch, on the device); None: not gated
    weight: torch.Tensor | None  # the matrix it computes with (CPU), for the float64 gate
    graphable: bool
    note: str = ""
    accumulate: str | None = None  # accumulation precision (its gate); None: as the storage dtype (a library)


@dataclass(frozen=True)
class Unavailable:
    kernel: str
    reason: str


@dataclass
class LayerCase:
    """A layer at one batch size: x, and the candidates that compute with it."""

    x: torch.Tensor  # [cols] or [cols, batch], on the device, in the layer's dtype
    candidates: list[Candidate] = field(default_factory=list)
    unavailable: list[Unavailable] = field(default_factory=list)


def _op_candidate(kernel, make_op, x_t, batch, rows, xy_bytes, note, weight) -> Candidate:
    """A candidate over one of the runtime's operators (BalancedLinear, BsrLinear)."""
    from ..runtime._gpu import as_cupy, as_torch, cupy

    x_cp = as_cupy(x_t)
    y_cp = cupy().empty((rows,) if x_t.dim() == 1 else (rows, batch), dtype=x_cp.dtype)
    # The packed tensor comes from PackedFile.load (checked on the bytes it returned) or was built here
    # (bench-sweep): the operators check only their kernel's limits, not the format a second time.
    first = make_op()

    def make(n):
        ops = [first] + [make_op() for _ in range(n - 1)]
        return [o.prepared_launch(x_cp, y_cp, batch) for o in ops]

    def run():
        first.prepared_launch(x_cp, y_cp, batch)()
        return as_torch(y_cp, x_t.dtype)

    return Candidate(kernel, first.weight_bytes + xy_bytes, make, run, weight, True, note, OWN_ACCUMULATION)


def _dense(w: torch.Tensor, x_t: torch.Tensor, xy_bytes: int) -> Candidate:
    def fn(wi):
        return (lambda: torch.mv(wi, x_t)) if x_t.dim() == 1 else (lambda: torch.mm(wi, x_t))

    def make(n):
        return [fn(wi) for wi in [w] + [w.clone() for _ in range(n - 1)]]

    return Candidate("dense", w.numel() * w.element_size() + xy_bytes, make, fn(w), None, True,
                     "cuBLAS via torch")


def _csr(w: torch.Tensor, x_t: torch.Tensor, xy_bytes: int) -> Candidate | Unavailable:
    from ..runtime._gpu import as_cupy, cupyx_sparse

    if w.dtype == torch.float32:
        m = cupyx_sparse().csr_matrix(as_cupy(w))
        x_cp = as_cupy(x_t)
        nbytes = m.data.nbytes + m.indices.nbytes + m.indptr.nbytes + xy_bytes

        def make(n):
            return [(lambda mi=mi: mi @ x_cp) for mi in [m] + [m.copy() for _ in range(n - 1)]]

        return Candidate("csr", nbytes, make, lambda: torch.from_dlpack(m @ x_cp), None, False,
                         "cuSPARSE via cupyx; not graph-captured")
    try:
        with quiet_libraries():
            s = w.to_sparse_csr()
            x2 = x_t if x_t.dim() == 2 else x_t.reshape(-1, 1)
            _ = s @ x2
    except (RuntimeError, NotImplementedError) as exc:
        return Unavailable("csr", f"torch CSR {w.dtype} on CUDA: {_short(exc)}")
    nbytes = sum(t.numel() * t.element_size() for t in (s.values(), s.col_indices(), s.crow_indices())) + xy_bytes

    def fn(si):
        return lambda: si @ x2

    def make(n):
        with quiet_libraries():
            return [fn(si) for si in [s] + [s.clone() for _ in range(n - 1)]]

    return Candidate("csr", nbytes, make, lambda: (s @ x2).reshape(y_shape(w, x_t)), None, False,
                     "cuSPARSE via torch CSR; not graph-captured")


def y_shape(w: torch.Tensor, x_t: torch.Tensor) -> tuple[int, ...]:
    return (w.shape[0],) if x_t.dim() == 1 else (w.shape[0], x_t.shape[1])


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__


def _torch_bsr(bt: BsrTensor, x_t: torch.Tensor, xy_bytes: int, device) -> Candidate | Unavailable:
    rows, cols = bt.rows, bt.cols
    bh, bw = bt.block_shape
    # torch wants the tile grid to cover the matrix exactly: pad to whole tiles, crop the result
    rp, cpad = -(-rows // bh) * bh, -(-cols // bw) * bw
    x2 = x_t if x_t.dim() == 2 else x_t.reshape(-1, 1)
    if cpad != cols:
        x2 = torch.nn.functional.pad(x2, (0, 0, 0, cpad - cols))
    try:
        with quiet_libraries():
            s = torch.sparse_bsr_tensor(bt.crow_indices.to(device), bt.col_indices.to(device),
                                        bt.values.to(device), size=(rp, cpad))
            _ = s @ x2
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return Unavailable("torch_bsr", f"torch BSR {bt.dtype} on CUDA: {_short(exc)}")
    nbytes = sum(t.numel() * t.element_size() for t in (bt.values, bt.col_indices, bt.crow_indices)) + xy_bytes

    def fn(si):
        return lambda: si @ x2

    def make(n):
        with quiet_libraries():
            return [fn(si) for si in [s] + [s.clone() for _ in range(n - 1)]]

    def run():
        return (s @ x2)[:rows].reshape(y_shape(bt.values.new_empty(rows, 1), x_t))

    return Candidate("torch_bsr", nbytes, make, run, None, False, "torch BSR; not graph-captured")


def _torch_24(w: torch.Tensor, x_t: torch.Tensor, xy_bytes: int) -> tuple[Candidate | Unavailable, torch.Tensor | None]:
    """torch's 2:4 semi-structured path on W pruned 2:4 (by magnitude, the balanced rule with L = 4)."""
    if w.dtype not in (torch.float16, torch.bfloat16):
        return Unavailable("torch_2:4", f"2:4 sparse tensor cores take float16/bfloat16, the layer is {w.dtype}"), None
    rows, cols = w.shape
    if cols % 4:
        return Unavailable("torch_2:4", f"cols {cols} is not a multiple of 4"), None
    g = geometry_for(rows, cols, BalancedPattern(0.5, blocks=None, block_size=4))
    w24 = torch.where(balanced_mask(w.cpu(), g), w.cpu(), torch.zeros((), dtype=w.dtype)).to(w.device)
    x2 = x_t if x_t.dim() == 2 else x_t.reshape(-1, 1)
    try:
        from torch.sparse import to_sparse_semi_structured

        with quiet_libraries():
            s = to_sparse_semi_structured(w24)
            y = torch.mm(s, x2)
        del y
    except (RuntimeError, NotImplementedError, ValueError, ImportError) as exc:
        return Unavailable("torch_2:4", f"torch semi-structured {list(w.shape)} {w.dtype}: {_short(exc)}"), None
    nbytes = rows * cols // 2 * w.element_size() + rows * cols // 16 + xy_bytes  # values + 2-bit metadata

    def make(n):
        with quiet_libraries():
            ss = [s] + [to_sparse_semi_structured(w24.clone()) for _ in range(n - 1)]
        return [(lambda si=si: torch.mm(si, x2)) for si in ss]

    return Candidate("torch_2:4", nbytes, make, lambda: torch.mm(s, x2).reshape(y_shape(w, x_t)), None, False,
                     "torch 2:4 semi-structured at its fixed 50% sparsity; not graph-captured"), w24.cpu()


def block_peer(dense: torch.Tensor, sparsity: float, tile=PEER_TILE) -> BsrTensor:
    """The block-sparse version of ``dense`` at ``sparsity``: tiles kept by L2 norm, packed as BSR."""
    tiles = kept_tiles(dense, tile, sparsity)
    mask = tiles_to_mask(tiles, *dense.shape, tile)
    return BsrTensor.from_dense(torch.where(mask, dense, torch.zeros((), dtype=dense.dtype)), tile, int(tiles.sum()),
                                sparsity)


def candidates(packed, pattern: str, x_t: torch.Tensor, batch: int, *, device: int, stream: Callable | None,
               peers: bool = True) -> LayerCase:
    """The candidates for one packed layer (BalancedTensor / BsrTensor / CsrTensor) at one batch.

    ``stream(nbytes)`` returns a Candidate timing a plain read of nbytes (runtime.measure.Timer.read_launch), or None.
    ``peers`` False: only the subject kernel and dense (what the runtime chooses between).
    """
    dev = torch.device("cuda", device)
    w_host = as_matrix(packed.to_dense())
    rows, cols = w_host.shape
    w = w_host.to(dev)
    y_bytes = rows * batch * w.element_size()
    xy_bytes = x_t.numel() * x_t.element_size() + y_bytes
    case = LayerCase(x_t)
    enc = ENCODINGS[pattern]  # what bench does per pattern: its record in patterns.registry
    subject = enc.bench_subject
    if enc.operator is not None:  # balprune's own operator (balanced, bsr); csr's subject is a library's
        case.candidates.append(_op_candidate(
            subject, lambda: enc.operator(packed, device=device, validate=False), x_t, batch,
            rows, xy_bytes, enc.bench_note(packed), w_host))
    for alt in enc.bench_alternatives:  # the encoding's other own paths (patterns.registry)
        other = alt.convert(packed)
        if other is not None:
            case.candidates.append(_op_candidate(
                alt.kernel, lambda alt=alt, other=other: alt.operator(other, device=device, validate=False), x_t,
                batch, rows, xy_bytes, alt.note, w_host))
    case.candidates.append(_dense(w, x_t, xy_bytes))
    if subject == "csr" or peers:
        c = _csr(w, x_t, xy_bytes)
        (case.candidates if isinstance(c, Candidate) else case.unavailable).append(c)
        if isinstance(c, Candidate):
            c.weight = w_host
    if peers and enc.bench_block_peer is not None:
        bt = packed if enc.bench_block_peer == "self" else block_peer(w_host, float(packed.sparsity_target))
        if enc.bench_block_peer == "built":
            case.candidates.append(_bsr_candidate(bt, x_t, batch, xy_bytes, device, as_matrix(bt.to_dense()),
                                                  note=f"{PEER_TILE[0]}x{PEER_TILE[1]} tiles at the same sparsity"))
        c = _torch_bsr(bt, x_t, xy_bytes, dev)
        if isinstance(c, Candidate):
            c.weight = as_matrix(bt.to_dense())
            case.candidates.append(c)
        else:
            case.unavailable.append(c)
        c, w24 = _torch_24(w, x_t, xy_bytes)
        if isinstance(c, Candidate):
            c.weight = w24
            case.candidates.append(c)
        else:
            case.unavailable.append(c)
    for c in case.candidates:
        if c.weight is None and c.run is not None:
            c.weight = w_host
    if stream is not None:
        subj = next((c for c in case.candidates if c.kernel == subject), None)
        if subj is not None:
            case.candidates.append(stream(subj.nbytes))
    return case


def _bsr_candidate(bt: BsrTensor, x_t, batch, xy_bytes, device, weight, note="") -> Candidate:
    from ..runtime import BsrLinear

    return _op_candidate("bsr", lambda: BsrLinear.from_tensor(bt, device=device, validate=False), x_t, batch, bt.rows,
                         xy_bytes, note, weight)
