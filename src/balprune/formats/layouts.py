"""Index encodings of a balanced matrix and every device re-layout of its arrays: the one owner.

A balanced matrix [rows, cols] has B blocks of length L per row (the row zero-padded to B*L
columns) and keeps exactly k entries per block (FORMAT.md). Its positions are stored in one of two
index encodings:

* ``offsets``: per kept entry its column within the block, uint8 when L <= 256, else uint16
  (``offsets_index_dtype``); values and indices [rows, k, B] (slot-major: entry (r, t, j) is the
  t-th kept entry of block j).
* ``bitmask``: one bit per column of the padded row, least significant bit first
  (column c of row r is bit c % 8 of byte r * mask_row_bytes + c // 8; trailing bits of a row's
  last byte are 0); values [rows, B, k], the kept entries of each block in column order, so a
  row's values are in column order.

In memory a BalancedTensor always holds the offsets form (the canonical arrays); ``mask_from_offsets``
and ``offsets_from_mask`` convert exactly. ``choose_encoding`` is the rule for ``--index auto``.
``check_balanced_arrays`` and ``check_bitmask_arrays`` are THE validators of the two encodings
(formats and the runtime's host validation call them). ``interleave_rows``,
``bitmask_segments`` and ``delta_segments`` are the device layouts of kernels/balanced_spmv.cu and
kernels/balanced_bitmask.cu (its mask walks and its delta walk; kernels/README.md); the kernel-side constants they assume
(UNIT_BYTES, WORD_BITS; DELTA_STEP_ENTRIES, DELTA_MAX_STEP) are checked against the .cu sources by
tests/test_layouts.py.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import FormatError
from ..patterns.balanced import MAX_BLOCK_LENGTH
from ..safeio import check_fits_memory
from .base import CHECK_CHUNK_ENTRIES, VALUE_DTYPES, check_finite_values, positive_int

OFFSETS, BITMASK = "offsets", "bitmask"
#: The stored index encodings of a balanced tensor.
ENCODINGS = (OFFSETS, BITMASK)
#: Values of ``prune --index``: auto picks, per tensor, the encoding with fewer index bytes.
INDEX_CHOICES = ("auto", OFFSETS, BITMASK)
#: Bytes of one value unit of the bitmask kernel's layout (one 16-byte vector load).
UNIT_BYTES = 16
#: Bits of one mask word the bitmask kernel walks.
WORD_BITS = 32


def offsets_index_dtype(block_length: int) -> torch.dtype:
    """The offsets encoding's index type: uint8 when L <= 256, else uint16."""
    return torch.uint8 if block_length <= 256 else torch.uint16


def mask_row_bytes(blocks: int, block_length: int) -> int:
    """Bytes of one row's bitmask: ceil(B * L / 8)."""
    return -(-blocks * block_length // 8)


def index_bytes(encoding: str, rows: int, blocks: int, block_length: int, keep: int) -> int:
    """Bytes the encoding spends on positions for a [rows, B blocks of L] matrix keeping k per block."""
    if encoding == BITMASK:
        return rows * mask_row_bytes(blocks, block_length)
    return rows * blocks * keep * offsets_index_dtype(block_length).itemsize


def choose_encoding(requested: str, rows: int, blocks: int, block_length: int, keep: int) -> tuple[str, str]:
    """(encoding, why) for ``--index requested``: auto takes the encoding with fewer index bytes
    (offsets on a tie, the format-v1 encoding); an explicit choice is taken as it is."""
    if requested not in INDEX_CHOICES:
        raise ValueError(f"index encoding must be one of {INDEX_CHOICES}, got {requested!r}")
    per_off = blocks * keep * offsets_index_dtype(block_length).itemsize
    per_bit = mask_row_bytes(blocks, block_length)
    figures = f"index bytes per row: offsets {per_off}, bitmask {per_bit}"
    if requested != "auto":
        return requested, f"--index {requested} ({figures})"
    choice = BITMASK if per_bit < per_off else OFFSETS
    return choice, f"auto: {figures}"


# ---------------------------------------------------------------------------------------------
# Conversions (exact, both directions; the arguments are assumed valid)
# ---------------------------------------------------------------------------------------------

def _row_chunk(rows: int, per_row: int) -> int:
    return max(1, min(rows, CHECK_CHUNK_ENTRIES // max(1, per_row)))


def mask_from_offsets(indices: torch.Tensor, blocks: int, block_length: int) -> torch.Tensor:
    """The bitmask [rows, mask_row_bytes] uint8 of offsets ``indices`` [rows, k, B]."""
    rows, keep, B = indices.shape
    L = block_length
    nbytes = mask_row_bytes(B, L)
    out = torch.empty(rows, nbytes, dtype=torch.uint8)
    base = (torch.arange(B, dtype=torch.int64) * L).view(1, 1, B)
    step = _row_chunk(rows, B * L)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        bits = torch.zeros(r1 - r0, nbytes * 8, dtype=torch.bool)
        cols = (indices[r0:r1].to(torch.int64) + base).reshape(r1 - r0, keep * B)
        bits.scatter_(1, cols, True)
        packed = np.packbits(bits.numpy(), axis=1, bitorder="little")
        out[r0:r1] = torch.from_numpy(packed)
    return out


def unpack_mask(mask: torch.Tensor, nbits: int) -> torch.Tensor:
    """[rows, nbits] bool: the first ``nbits`` bits of each row of a bitmask (LSB first)."""
    return torch.from_numpy(np.unpackbits(mask.numpy(), axis=1, count=nbits, bitorder="little").astype(bool))


def offsets_from_mask(mask: torch.Tensor, blocks: int, block_length: int, keep: int) -> torch.Tensor:
    """Offsets indices [rows, k, B] of a bitmask whose every block holds exactly k set bits."""
    rows = mask.shape[0]
    L = block_length
    out = torch.empty(rows, keep, blocks, dtype=offsets_index_dtype(L))
    out_np = out.numpy()
    step = _row_chunk(rows, blocks * L)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        bits = unpack_mask(mask[r0:r1], blocks * L).numpy()
        # exactly keep bits per block, found in row-major order: a set bit's flat position modulo L is its in-block
        # column (a row is blocks * L bits), ascending within each block (one index array, not torch.nonzero's
        # three: 0.85 -> 0.22 s on an 8B gate/up at 50%, BENCHMARKS.md)
        pos = np.flatnonzero(bits)
        if L & (L - 1) == 0:
            np.bitwise_and(pos, L - 1, out=pos)
        else:
            np.remainder(pos, L, out=pos)
        out_np[r0:r1] = pos.reshape(r1 - r0, blocks, keep).transpose(0, 2, 1)
    return out


# ---------------------------------------------------------------------------------------------
# The validators
# ---------------------------------------------------------------------------------------------

def _check_geometry(rows, cols, blocks, block_length, keep, where: str) -> tuple[int, int, int, int, int]:
    rows = positive_int(rows, f"{where}: rows")
    cols = positive_int(cols, f"{where}: cols")
    blocks = positive_int(blocks, f"{where}: blocks")
    L = positive_int(block_length, f"{where}: block_length")
    keep = positive_int(keep, f"{where}: keep")
    if L > MAX_BLOCK_LENGTH:
        raise FormatError(f"{where}: block_length {L} exceeds {MAX_BLOCK_LENGTH}, the most a uint16 index addresses")
    if keep > L:
        raise FormatError(f"{where}: keep {keep} exceeds block_length {L}")
    if blocks != -(-cols // L):
        raise FormatError(f"{where}: blocks {blocks} is not ceil(cols / block_length) = {-(-cols // L)}")
    return rows, cols, blocks, L, keep


def _check_arrays(where: str, arrays: tuple[tuple[str, torch.Tensor, tuple[int, ...], str], ...]) -> None:
    for what, t, shape, label in arrays:
        if tuple(t.shape) != shape:
            raise FormatError(f"{where}: {what} shape {list(t.shape)} is not {label} = {list(shape)}")
        if not t.is_contiguous():
            raise FormatError(f"{where}: {what} is not C-contiguous")


def check_balanced_arrays(values: torch.Tensor, indices: torch.Tensor, rows: int, cols: int, blocks: int,
                          block_length: int, keep: int, *, where: str) -> None:
    """THE validator of the offsets encoding (FORMAT.md, pattern ``balanced``); FormatError
    starting with ``where`` at the first violation. The runtime's ``validate_balanced`` calls it.

    ``values`` [rows, keep, blocks] F32/F16/BF16/F64 and ``indices`` [rows, keep, blocks] uint8
    (block_length <= 256) or uint16 (<= 65536), CPU torch tensors, C-contiguous. Geometry: all
    positive, blocks == ceil(cols / block_length), keep <= block_length. Content: every index <
    block_length; strictly increasing with the slot inside each block (sorted, no duplicates);
    padding columns (j*block_length + index >= cols, only in the last block) kept exactly where the
    block has fewer than keep real columns, and holding 0; values finite. Walks the rows in chunks,
    so its temporaries stay bounded whatever the size.
    """
    rows, cols, blocks, L, keep = _check_geometry(rows, cols, blocks, block_length, keep, where)
    v, i = values, indices
    if v.dtype not in VALUE_DTYPES:
        raise FormatError(f"{where}: values dtype {v.dtype} is not float32, float16, bfloat16 or float64")
    want_index = offsets_index_dtype(L)
    if i.dtype != want_index:
        raise FormatError(f"{where}: indices dtype {i.dtype} must be {want_index} for block_length {L}")
    shape = (rows, keep, blocks)
    _check_arrays(where, (("values", v, shape, "[rows, keep, blocks]"), ("indices", i, shape, "[rows, keep, blocks]")))
    pad_from = cols - (blocks - 1) * L  # in-block offsets >= this are padding (last block only)
    pad_want = max(0, keep - pad_from)  # padding slots the last block must keep (fill-up rule)
    step = max(1, CHECK_CHUNK_ENTRIES // (keep * blocks))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        idx = i[r0:r1].to(torch.int64)  # [n, keep, blocks]
        bad = idx >= L
        if bool(bad.any()):
            r, t, j = torch.nonzero(bad)[0].tolist()
            raise FormatError(f"{where}: index {int(idx[r, t, j])} >= block_length {L} at row {r0 + r}, "
                              f"block {j}, slot {t}")
        if keep > 1:
            bad = idx[:, 1:, :] <= idx[:, :-1, :]
            if bool(bad.any()):
                r, t, j = torch.nonzero(bad)[0].tolist()
                raise FormatError(f"{where}: indices of row {r0 + r}, block {j} are unsorted or duplicated "
                                  f"(slot {t + 1}: {int(idx[r, t + 1, j])} after {int(idx[r, t, j])})")
        if pad_from < L:
            last = idx[:, :, blocks - 1]
            on_pad = last >= pad_from
            bad = on_pad.sum(1) != pad_want
            if bool(bad.any()):
                r = int(torch.nonzero(bad)[0])
                raise FormatError(f"{where}: row {r0 + r}, block {blocks - 1} keeps {int(on_pad[r].sum())} padding "
                                  f"column(s), the fill-up rule gives {pad_want} (padding kept while real columns "
                                  f"were left out)")
            bad = on_pad & (v[r0:r1, :, blocks - 1] != 0)
            if bool(bad.any()):
                r, t = torch.nonzero(bad)[0].tolist()
                raise FormatError(f"{where}: non-zero value on padding column {(blocks - 1) * L + int(last[r, t])} "
                                  f"(cols = {cols}) at row {r0 + r}, block {blocks - 1}, slot {t}")
        check_finite_values(where, v[r0:r1])


def check_bitmask_arrays(values: torch.Tensor, mask: torch.Tensor, rows: int, cols: int, blocks: int,
                         block_length: int, keep: int, *, where: str) -> None:
    """THE validator of the bitmask encoding (FORMAT.md); FormatError starting with ``where`` at the
    first violation.

    ``values`` [rows, blocks, keep] F32/F16/BF16/F64 and ``mask`` [rows, ceil(blocks*L/8)] uint8,
    CPU torch tensors, C-contiguous; geometry as for offsets. Content: every block has exactly
    ``keep`` bits set (popcount); no bit past the padded row (B*L) in a row's last byte; padding
    columns (>= cols) set exactly as the fill-up rule gives (only where the last block has fewer
    than keep real columns) and their values (the block's last slots, in column order) 0; values
    finite. Chunked over rows like check_balanced_arrays.
    """
    rows, cols, blocks, L, keep = _check_geometry(rows, cols, blocks, block_length, keep, where)
    if values.dtype not in VALUE_DTYPES:
        raise FormatError(f"{where}: values dtype {values.dtype} is not float32, float16, bfloat16 or float64")
    if mask.dtype != torch.uint8:
        raise FormatError(f"{where}: mask dtype {mask.dtype} must be torch.uint8")
    nbytes = mask_row_bytes(blocks, L)
    _check_arrays(where, (("values", values, (rows, blocks, keep), "[rows, blocks, keep]"),
                          ("mask", mask, (rows, nbytes), "[rows, ceil(blocks * block_length / 8)]")))
    width = blocks * L
    pad_from = cols - (blocks - 1) * L
    pad_want = max(0, keep - pad_from)
    step = _row_chunk(rows, nbytes * 8)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        bits = unpack_mask(mask[r0:r1], nbytes * 8)
        if nbytes * 8 > width:
            bad = bits[:, width:].any(1)
            if bool(bad.any()):
                r = int(torch.nonzero(bad)[0])
                raise FormatError(f"{where}: row {r0 + r} has mask bits past its last column "
                                  f"(the padded row has {width} columns)")
        blk = bits[:, :width].view(r1 - r0, blocks, L)
        count = blk.sum(-1)
        bad = count != keep
        if bool(bad.any()):
            r, j = torch.nonzero(bad)[0].tolist()
            raise FormatError(f"{where}: row {r0 + r}, block {j} has {int(count[r, j])} mask bits set, "
                              f"keep is {keep} (the values hold exactly keep per block)")
        if pad_from < L:
            on_pad = blk[:, blocks - 1, pad_from:].sum(-1)
            bad = on_pad != pad_want
            if bool(bad.any()):
                r = int(torch.nonzero(bad)[0])
                raise FormatError(f"{where}: row {r0 + r}, block {blocks - 1} keeps {int(on_pad[r])} padding "
                                  f"column(s), the fill-up rule gives {pad_want} (padding kept while real columns "
                                  f"were left out)")
            if pad_want:
                tail = values[r0:r1, blocks - 1, keep - pad_want:]
                bad = tail != 0
                if bool(bad.any()):
                    r, t = torch.nonzero(bad)[0].tolist()
                    raise FormatError(f"{where}: non-zero value on a padding column (cols = {cols}) at row {r0 + r}, "
                                      f"block {blocks - 1}, slot {keep - pad_want + t}")
        check_finite_values(where, values[r0:r1])


# ---------------------------------------------------------------------------------------------
# Device layouts
# ---------------------------------------------------------------------------------------------

def interleave_rows(values, indices, vec: int, xp=np):
    """The interleaved layout of kernels/balanced_spmv.cu from offsets [R, k, B] arrays: ([R, S], [R, S], S).

    Works with numpy or cupy (``xp``). Per row: for g < G = k // vec, element (g*B + j)*vec + s
    is slot g*vec + s of block j; then the tail pieces of width W in (4, 2, 1) present in
    rem = k - G*vec, each laid out [B, W]. S = k*B rounded up to a multiple of 16 (so a row of
    1-byte indices is a whole number of 16-byte units, as bulk copies need; 16 is a multiple of
    vec); the rest is zero.
    """
    R, k, B = values.shape
    G = k // vec
    rem = k - G * vec
    S = -(-k * B // 16) * 16
    out = []
    for a in (values, indices):
        o = xp.zeros((R, S), dtype=a.dtype)
        main = a[:, : G * vec, :].reshape(R, G, vec, B).transpose(0, 1, 3, 2).reshape(R, G * B * vec)
        o[:, : G * B * vec] = main
        pos, slot = G * B * vec, G * vec
        for w in (4, 2, 1):
            if rem & w:
                piece = a[:, slot: slot + w, :].transpose(0, 2, 1).reshape(R, B * w)
                o[:, pos: pos + B * w] = piece
                pos += B * w
                slot += w
        out.append(o)
    return out[0], out[1], S


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class SegmentGeometry:
    """How kernels/balanced_bitmask.cu cuts a row (its module comment): S segments of g whole
    blocks (g*k values, g*L columns in W = ceil(g*L/32) mask words, the bits past g*L zero), P lanes
    per row, Q rounds, C 16-byte units of V values per segment, padded_cols = S*g*L, and
    staged_cols = g*L*Q*P columns of x in shared memory (interleaved by segment). ``paired``: P
    covers half the segments, so each lane has two rounds (the kernel's walk 6 walks them at once).

    g is the smallest number of blocks per segment (1 to 32) whose device bytes per row,
    S*(4W + 16C), are within 10% of the fewest: whole mask words (2:4 takes g = 8: one word per 8
    blocks of 4) and whole value units (80% of L = 128 in fp16 keeps 26 per block;
    g = 2 pads its 52 values to 56 where g = 1 pads 26 to 32), while a small g keeps more segments, so
    more lanes per row and more loads in flight.
    """

    def __init__(self, blocks: int, block_length: int, keep: int, itemsize: int, paired: bool = False) -> None:
        L = block_length
        self.per_unit = UNIT_BYTES // itemsize

        def row_bytes(g: int) -> int:
            s = -(-blocks // g)
            return s * (4 * -(-g * L // WORD_BITS) + UNIT_BYTES * -(-g * keep // self.per_unit))

        least = min(row_bytes(g) for g in range(1, WORD_BITS + 1))
        self.g = next(g for g in range(1, WORD_BITS + 1) if row_bytes(g) * 10 <= least * 11)
        self.segments = -(-blocks // self.g)
        self.seg_cols = self.g * L
        self.words = -(-self.seg_cols // WORD_BITS)
        self.seg_keep = self.g * keep
        self.units = -(-self.seg_keep // self.per_unit)
        # paired (the kernel's walk 6): two segments per lane where a row has more than one, walked at
        # once (two independent walks per lane hide each other's latency); else one per lane and round
        self.lanes = min(32, _next_pow2(-(-self.segments // 2) if paired else self.segments))
        self.rounds = -(-self.segments // self.lanes)
        self.padded_cols = self.segments * self.seg_cols
        self.staged_cols = self.seg_cols * self.rounds * self.lanes  # x as the kernel stages it

    def as_tuple(self) -> tuple[int, ...]:
        return (self.g, self.segments, self.seg_cols, self.words, self.seg_keep, self.per_unit, self.units,
                self.lanes, self.rounds, self.padded_cols)


def bitmask_segments(values: np.ndarray, indices: np.ndarray, block_length: int,
                     paired: bool = False) -> tuple[np.ndarray, np.ndarray, SegmentGeometry]:
    """The device layout of kernels/balanced_bitmask.cu from offsets [R, k, B] numpy arrays.

    Returns (units [R, Q, C, P, V] of the values' dtype, words [R, Q, W, P] uint32, geometry):
    unit c of lane l in round q holds values c*V .. of segment s = q*P + l in column order (zeros
    past g*k, and for s >= S); word w holds in bit 31 - b the mask bit of segment column 32*w + b,
    i.e. of row column s*g*L + 32*w + b (bit-reversed, so the kernel finds the next kept column with
    one count of leading zeros; bits past g*L zero). Phantom blocks filling the last segment keep their
    first k columns with value 0 (columns past the row, where the kernel stages x as 0). The
    values' bits are copied, never converted.
    """
    R, k, B = values.shape
    L = block_length
    sg = SegmentGeometry(B, L, k, values.dtype.itemsize, paired)
    g, S, P, Q, C, V, W = sg.g, sg.segments, sg.lanes, sg.rounds, sg.units, sg.per_unit, sg.words
    Bp = S * g  # blocks with the phantom ones
    # the re-layout's peak: the units twice, the values once more, two bool masks, the words twice
    peak = 3 * R * Q * P * C * UNIT_BYTES + R * Bp * k * values.dtype.itemsize + 2 * R * Bp * L + 8 * R * Q * P * W
    check_fits_memory(peak, f"the bitmask kernel's layout of a [{R}, {B * L}] tensor")
    # values in column order [R, B, k] -> [R, Bp, k] -> [R, S, g*k] -> [R, Q*P, C*V]
    vcol = np.zeros((R, Q * P, C * V), dtype=values.dtype)
    vb = np.zeros((R, Bp, k), dtype=values.dtype)
    vb[:, :B, :] = values.transpose(0, 2, 1)
    vcol[:, :S, : g * k] = vb.reshape(R, S, g * k)
    units = np.ascontiguousarray(vcol.reshape(R, Q, P, C, V).transpose(0, 1, 3, 2, 4))
    # mask bits [R, Bp, L] -> [R, S, W*32] (zero past g*L) -> words [R, S, W] -> [R, Q, W, P]
    bits = np.zeros((R, Bp, L), dtype=bool)
    np.put_along_axis(bits[:, :B, :], indices.transpose(0, 2, 1).astype(np.int64), True, axis=2)
    bits[:, B:, :k] = True
    seg_bits = np.zeros((R, S, W * WORD_BITS), dtype=bool)
    seg_bits[:, :, : sg.seg_cols] = bits.reshape(R, S, sg.seg_cols)
    # bit-reversed words: a word's first column is its bit 31 (big-endian bit and byte order)
    packed = np.packbits(seg_bits, axis=2, bitorder="big")  # [R, S, W*4] bytes = whole words
    words = np.zeros((R, Q * P, W), dtype=np.uint32)
    words[:, :S, :] = np.ascontiguousarray(packed).view(">u4").reshape(R, S, W)
    if Q * P > S:  # phantom segments are walked like real ones: their first g*k columns kept (values 0)
        phantom = np.zeros(W * WORD_BITS, dtype=bool)
        phantom[: sg.seg_keep] = True
        words[:, S:, :] = np.packbits(phantom, bitorder="big").view(">u4").astype(np.uint32)
    words = np.ascontiguousarray(words.reshape(R, Q, P, W).transpose(0, 1, 3, 2))
    return units, words, sg


def bitmask_reference(units: np.ndarray, words: np.ndarray, sg: SegmentGeometry, x: np.ndarray) -> np.ndarray:
    """y = W x computed from the bitmask device layout the way the kernel walks it (float64; x
    [cols] or [cols, N]): the CPU model of kernels/balanced_bitmask.cu that tests hold the layout to."""
    R = units.shape[0]
    xx = np.zeros((sg.padded_cols,) + x.shape[1:], dtype=np.float64)
    xx[: x.shape[0]] = x
    y = np.zeros((R,) + x.shape[1:], dtype=np.float64)
    for s in range(sg.segments):
        q, lane = divmod(s, sg.lanes)
        vals = units[:, q, :, lane, :].reshape(R, -1)[:, : sg.seg_keep].astype(np.float64)  # [R, g*k]
        w = np.ascontiguousarray(words[:, q, :, lane]).astype(">u4").view(np.uint8)  # [R, W*4], MSB first
        bits = np.unpackbits(w, axis=1, bitorder="big").astype(bool)  # [R, W*32], zero past seg_cols
        for r in range(R):
            cols = s * sg.seg_cols + np.nonzero(bits[r])[0]
            y[r] += vals[r, : len(cols)] @ xx[cols]
    return y



# -- the delta walk's layout (kernels/balanced_bitmask.cu, balanced_delta_spmm) -------------------------

#: Largest column step one 4-bit delta encodes; a longer gap between kept columns takes phantom entries.
DELTA_MAX_STEP = 15
#: Entries per delta word (eight 4-bit steps, the first in the low nibble): one step of the kernel.
DELTA_STEP_ENTRIES = 8


class DeltaGeometry:
    """How the delta walk (kernels/balanced_bitmask.cu, balanced_delta_spmm) cuts a row: like
    SegmentGeometry, S segments of g whole blocks (seg_cols = g*L columns; phantom blocks fill the
    last one), P lanes per row (32/P rows per warp: a row group), Q rounds, x staged interleaved by
    segment exactly as the bitmask kernel stages it. Instead of mask words a segment holds a list of
    entries in column order, each a 4-bit column step from the previous entry (the first from the
    segment's column 0) and a value; a gap of more than 15 columns takes phantom entries (step 15,
    value 0). Every segment of a row group is padded with (step 0, value 0) entries to the group's
    entry count E (a multiple of 8): the trip count is uniform over the warp, and one 32-bit word of
    steps covers 8 entries (one 16-byte unit of fp16/bf16 values, two of fp32).

    g is the smallest number of blocks per segment (1 to 32) whose bytes per row without phantoms,
    S * ceil8(g*k) * (itemsize + 1/2), are within 10% of the fewest (k = 19 of L = 64 takes g = 2:
    38 entries pad to 40 where g = 1 pads 19 to 24).
    """

    def __init__(self, blocks: int, block_length: int, keep: int, itemsize: int) -> None:
        L = block_length
        self.per_unit = UNIT_BYTES // itemsize
        self.units_per_step = DELTA_STEP_ENTRIES // self.per_unit if self.per_unit < DELTA_STEP_ENTRIES else 1

        def row_bytes(g: int) -> float:
            entries = -(-g * keep // DELTA_STEP_ENTRIES) * DELTA_STEP_ENTRIES
            return -(-blocks // g) * entries * (itemsize + 0.5)

        least = min(row_bytes(g) for g in range(1, WORD_BITS + 1))
        self.g = next(g for g in range(1, WORD_BITS + 1) if row_bytes(g) * 10 <= least * 11)
        self.segments = -(-blocks // self.g)
        self.seg_cols = self.g * L
        self.seg_keep = self.g * keep
        self.lanes = min(32, _next_pow2(self.segments))
        self.rounds = -(-self.segments // self.lanes)
        self.rows_per_group = 32 // self.lanes
        self.padded_cols = self.segments * self.seg_cols
        self.staged_cols = self.seg_cols * self.rounds * self.lanes  # x as the kernel stages it

    def as_tuple(self) -> tuple[int, ...]:
        return (self.g, self.segments, self.seg_cols, self.seg_keep, self.per_unit, self.lanes, self.rounds,
                self.padded_cols)


def delta_segments(values: np.ndarray, indices: np.ndarray,
                   block_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, DeltaGeometry]:
    """The delta walk's device layout from offsets [R, k, B] numpy arrays.

    Returns (units [steps * u, 32, V] of the values' dtype, deltas [steps, 32] uint32, starts
    [groups + 1] uint32, geometry), u = dg.units_per_step. Row group G (rows G*rpw .. G*rpw + rpw - 1,
    rpw = 32/P; rows past R hold only padding) owns steps starts[G] .. starts[G+1] - 1, Q rounds of
    D_G = (starts[G+1] - starts[G]) / Q steps; step starts[G] + q*D_G + d holds, at lane
    (row - G*rpw)*P + l, the entries 8d .. 8d + 7 of segment s = q*P + l: deltas[step, lane] their
    4-bit column steps (entry 8d + j in bits 4j .. 4j + 3), units[step*u + i, lane] their values
    (V per unit, in entry order). A segment past S holds padding only (x is staged 0 there). Values'
    bits are copied, never converted; identical input gives identical arrays.
    """
    R, k, B = values.shape
    L = block_length
    dg = DeltaGeometry(B, L, k, values.dtype.itemsize)
    g, S, P, Q, rpw = dg.g, dg.segments, dg.lanes, dg.rounds, dg.rows_per_group
    n = dg.seg_keep
    groups = -(-R // rpw)
    Rp = groups * rpw
    V, u = dg.per_unit, dg.units_per_step
    item = values.dtype.itemsize
    # before anything is allocated: the int32 temporaries per kept entry (columns, steps, phantoms, positions) and
    # the values in column order, then the entry arrays, the output and the packing's copies at the most entries a
    # segment can take (g*k plus a phantom per 15 columns), rounded to whole steps
    e_bound = -(-(n + -(-dg.seg_cols // DELTA_MAX_STEP)) // DELTA_STEP_ENTRIES) * DELTA_STEP_ENTRIES
    check_fits_memory(R * S * n * (16 + item) + Rp * Q * P * e_bound * (3 + 3 * item),
                      f"the delta walk's layout of a [{R}, {B * L}] tensor")
    # columns of a segment's kept entries in column order [R, S, g*k]; phantom blocks (past B) keep their
    # first k columns with value 0, as in bitmask_segments (past the row: x staged 0). int32: a segment has at
    # most 32 * MAX_BLOCK_LENGTH columns
    Bp = S * g
    col = np.empty((R, Bp, k), dtype=np.int32)
    col[:, :B, :] = indices.transpose(0, 2, 1)
    col[:, B:, :] = np.arange(k)
    col += (np.arange(Bp) % g)[None, :, None] * L
    col = col.reshape(R, S, n)
    vb = np.zeros((R, Bp, k), dtype=values.dtype)
    vb[:, :B, :] = values.transpose(0, 2, 1)
    vb = vb.reshape(R, S, n)
    # each entry's column step from the previous entry (the first from the segment's column 0)
    step = np.empty_like(col)
    step[..., :1] = col[..., :1]
    np.subtract(col[..., 1:], col[..., :-1], out=step[..., 1:])
    # segments with a gap longer than 15 (few at 50-70%) take phantom entries (step 15, value 0) before the entry
    # that ends the gap: their entries' positions are worked out for them alone; every other segment holds its
    # kept entries at positions 0 .. n-1
    r, sg = np.nonzero((step > DELTA_MAX_STEP).any(axis=2))
    sub_step = step[r, sg]  # [m, n]
    phantoms = np.maximum(0, (sub_step - 1) // DELTA_MAX_STEP)  # entries of step 15 before this one
    pos = np.arange(n, dtype=np.int32)[None, :] + np.cumsum(phantoms, axis=1, dtype=np.int32)
    count = np.full((R, S), n, dtype=np.int64)
    if len(r):
        count[r, sg] = pos[:, -1].astype(np.int64) + 1
    E_max = max(int(count.max()) if count.size else 0, n)  # (>= n: the block copy below writes n entries)
    per_group = np.zeros(groups, dtype=np.int64)
    if R:
        np.maximum.at(per_group, np.arange(R) // rpw, count.max(axis=1))
    per_group = -(-per_group // DELTA_STEP_ENTRIES) * DELTA_STEP_ENTRIES  # E_G, a multiple of 8
    E_cap = max(DELTA_STEP_ENTRIES, -(-E_max // DELTA_STEP_ENTRIES) * DELTA_STEP_ENTRIES)
    steps_total = int(per_group.sum()) // DELTA_STEP_ENTRIES * Q
    # entries [Rp, Q*P, E_cap]: phantoms step 15, the kept entries at pos, padding step 0 (value 0); rows past R and
    # segments past S padding only
    ent_d = np.zeros((Rp, Q * P, E_cap), dtype=np.uint8)
    ent_v = np.zeros((Rp, Q * P, E_cap), dtype=values.dtype)
    real_d, real_v = ent_d[:R, :S], ent_v[:R, :S]
    # one block copy for the segments without phantoms (the others' wrapped steps are rewritten next)
    real_d[:, :, :n] = step
    real_v[:, :, :n] = vb
    if len(r):
        sub_d = np.zeros((len(r), E_cap), dtype=np.uint8)
        sub_d[np.arange(E_cap)[None, :] < count[r, sg][:, None]] = DELTA_MAX_STEP
        sub_v = np.zeros((len(r), E_cap), dtype=values.dtype)
        np.put_along_axis(sub_d, pos, (sub_step - DELTA_MAX_STEP * phantoms).astype(np.uint8), axis=1)
        np.put_along_axis(sub_v, pos, vb[r, sg], axis=1)
        real_d[r, sg] = sub_d
        real_v[r, sg] = sub_v
    del col, vb, step, sub_step, phantoms, pos
    starts = np.zeros(groups + 1, dtype=np.int64)
    starts[1:] = np.cumsum(per_group // DELTA_STEP_ENTRIES * Q)
    deltas = np.zeros((steps_total, 32), dtype=np.uint32)
    units = np.zeros((steps_total * u, 32, V), dtype=values.dtype)
    for E in np.unique(per_group):
        gs = np.nonzero(per_group == E)[0]
        D = int(E) // DELTA_STEP_ENTRIES
        # (one entry count for every group, the usual case: the groups' rows in order, no gather)
        rows = slice(None) if len(gs) == groups else (gs[:, None] * rpw + np.arange(rpw)[None, :]).ravel()
        # two steps a byte (the first in the low nibble), four bytes a little-endian word: [.., D, 4] -> [.., D]
        e = ent_d[rows, :, :E]
        nib = (e[..., 0::2] | (e[..., 1::2] << 4)).reshape(len(gs), rpw, Q, P, D, DELTA_STEP_ENTRIES // 2)
        # [ng, rpw, Q, P, D, 4] -> [ng, Q, D, rpw, P, 4]: lane = (row in group) * P + l
        words = np.ascontiguousarray(nib.transpose(0, 2, 4, 1, 3, 5)).view("<u4")
        # values [ng, rpw, Q, P, D*u, V] -> [ng, Q, D*u, rpw, P, V]
        v = ent_v[rows, :, :E].reshape(len(gs), rpw, Q, P, D * u, V).transpose(0, 2, 4, 1, 3, 5)
        if len(gs) == groups:  # every group's steps, in order: the whole arrays
            deltas[:] = words.reshape(-1, 32)
            units[:] = v.reshape(-1, 32, V)
            continue
        at = (starts[gs][:, None] + np.arange(Q * D)[None, :]).ravel()
        deltas[at] = words.reshape(-1, 32)
        uat = (starts[gs][:, None] * u + np.arange(Q * D * u)[None, :]).ravel()
        units[uat] = v.reshape(-1, 32, V)
    if starts[-1] >= 1 << 32:
        raise FormatError(f"a [{R}, {B * L}] tensor needs {starts[-1]} delta steps: more than 32-bit indexing holds")
    return units, deltas, starts.astype(np.uint32), dg


def delta_reference(units: np.ndarray, deltas: np.ndarray, starts: np.ndarray, dg: DeltaGeometry, rows: int,
                    x: np.ndarray) -> np.ndarray:
    """y = W x computed from the delta walk's device layout the way the kernel walks it (float64; x
    [cols] or [cols, N]): the CPU model of balanced_delta_spmm that tests hold the layout to."""
    P, Q, rpw, u = dg.lanes, dg.rounds, dg.rows_per_group, dg.units_per_step
    xx = np.zeros((dg.staged_cols,) + x.shape[1:], dtype=np.float64)
    xx[: x.shape[0]] = x
    y = np.zeros((rows,) + x.shape[1:], dtype=np.float64)
    shifts = (4 * np.arange(DELTA_STEP_ENTRIES)).astype(np.uint32)
    for G in range(len(starts) - 1):
        D = (int(starts[G + 1]) - int(starts[G])) // Q
        for q in range(Q):
            s0 = int(starts[G]) + q * D
            w = deltas[s0:s0 + D]  # [D, 32]
            steps = ((w[:, :, None] >> shifts) & 15).transpose(1, 0, 2).reshape(32, -1)  # [lane, 8D]
            vals = units[s0 * u:(s0 + D) * u].transpose(1, 0, 2).reshape(32, -1).astype(np.float64)
            col = np.cumsum(steps.astype(np.int64), axis=1)
            for lane in range(32):
                r = G * rpw + lane // P
                s = q * P + lane % P
                if r >= rows or not col.shape[1]:
                    continue
                y[r] += vals[lane] @ xx[s * dg.seg_cols + col[lane]]
    return y

# -- the persistent decode step's lane records (kernels/llama_step.cu) ------------------------------

#: Lanes of a warp: lane j of the step kernel owns blocks j * B / 32 .. (j + 1) * B / 32 - 1 of every row
#: (B % 32 == 0), a contiguous 32nd of its columns.
LANES = 32
#: Bytes of one value unit of a lane record (one 4-byte shared-memory word: two 16-bit values or one fp32).
LANE_UNIT_BYTES = 4


class LaneGeometry:
    """How kernels/llama_step.cu reads one balanced row of B blocks of L keeping k (B a multiple of 32).

    Lane j owns the row's columns [j * C, (j + 1) * C), C = ``lane_cols`` = (B / 32) * L: its ``per_lane_blocks``
    whole blocks, so exactly ``kept`` = (B / 32) * k values. Its local column p (column j * C + p) is bit p % 32
    of its mask word p // 32 (``words`` = ceil(C / 32) of them); its values in column order, ``per_unit`` per
    4-byte unit, fill ``units`` units. A row's record is ``record_bytes`` = 128 * (words + units): the lanes'
    mask words [words][32], then their units [units][32] (u32 each), so a warp reading word w or unit u of a
    row reads 32 consecutive words of shared memory (one per bank).
    """

    def __init__(self, blocks: int, block_length: int, keep: int, itemsize: int) -> None:
        if blocks % LANES:
            raise ValueError(f"lane records need a multiple of {LANES} blocks per row, got {blocks}")
        self.blocks, self.block_length, self.keep = blocks, block_length, keep
        self.per_lane_blocks = blocks // LANES
        self.lane_cols = self.per_lane_blocks * block_length
        self.words = -(-self.lane_cols // WORD_BITS)
        self.kept = self.per_lane_blocks * keep
        self.per_unit = LANE_UNIT_BYTES // itemsize
        self.units = -(-self.kept // self.per_unit)
        self.record_words = LANES * (self.words + self.units)
        self.record_bytes = 4 * self.record_words


def lane_records(values: np.ndarray, indices: np.ndarray, block_length: int) -> tuple[np.ndarray, LaneGeometry]:
    """The step kernel's records from offsets [R, k, B] numpy arrays (values float32, or 16-bit floats as
    float16 / uint16 bits): ([R, record_words] uint32, geometry). Word w of lane j is at w * 32 + j (bit b:
    local column 32 * w + b, least significant bit first); unit u of lane j at 32 * (words + u) + j holds the
    lane's values u * V .. u * V + V - 1 (V = per_unit, the first in the low bits), zeros past ``kept``. The
    values' bits are copied, never converted. Offsets within a block are ascending (the format's rule), so a
    lane's values block by block, slot by slot, are in column order."""
    R, k, B = values.shape
    L = block_length
    lg = LaneGeometry(B, L, k, values.dtype.itemsize)
    nb, W, U, V = lg.per_lane_blocks, lg.words, lg.units, lg.per_unit
    check_fits_memory(R * (LANES * (W * WORD_BITS + 8 * U * 4) + 2 * lg.record_bytes),
                      f"the step kernel's records of a [{R}, {B * L}] tensor")
    out = np.zeros((R, lg.record_words), dtype=np.uint32)
    # block b = j * nb + i: [R, k, 32, nb] -> [R, 32, nb, k] (lane, its block i, slot)
    vals = values.reshape(R, k, LANES, nb).transpose(0, 2, 3, 1).reshape(R, LANES, nb * k)
    raw = np.zeros((R, LANES, U * V), dtype=values.dtype)
    raw[:, :, : nb * k] = vals
    unit_words = np.ascontiguousarray(raw).view(np.uint32).reshape(R, LANES, U)  # little endian: first value low
    out[:, LANES * W:] = unit_words.transpose(0, 2, 1).reshape(R, U * LANES)
    local = (indices.reshape(R, k, LANES, nb).transpose(0, 2, 3, 1).astype(np.int64)
             + (np.arange(nb, dtype=np.int64) * L)[None, None, :, None]).reshape(R, LANES, nb * k)
    bits = np.zeros((R, LANES, W * WORD_BITS), dtype=bool)
    np.put_along_axis(bits, local, True, axis=2)
    words = np.packbits(bits, axis=2, bitorder="little").view("<u4").astype(np.uint32)  # [R, 32, W]
    out[:, : LANES * W] = words.transpose(0, 2, 1).reshape(R, W * LANES)
    return out, lg


def lane_records_reference(records: np.ndarray, lg: LaneGeometry, value_dtype: str, x: np.ndarray) -> np.ndarray:
    """y = W x (float64; x [cols]) computed from lane records the way kernels/llama_step.cu walks them: lane j
    takes its set bits in order, the t-th one pairing value t with x at column j * C + p (C = lane_cols).
    ``value_dtype``: "float32", "float16" or "bfloat16" (the records' value bits)."""
    R = records.shape[0]
    W, U, V, C = lg.words, lg.units, lg.per_unit, lg.lane_cols
    xx = np.zeros(lg.blocks * lg.block_length, dtype=np.float64)
    xx[: x.shape[0]] = x
    words = records[:, : LANES * W].reshape(R, W, LANES).transpose(0, 2, 1)  # [R, 32, W]
    bits = np.unpackbits(np.ascontiguousarray(words).astype("<u4").view(np.uint8), axis=2, bitorder="little")
    units = np.ascontiguousarray(records[:, LANES * W:].reshape(R, U, LANES).transpose(0, 2, 1))
    if value_dtype == "bfloat16":  # the high half of a float32
        vals = (units.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        vals = units.view(np.dtype(value_dtype))
    vals = vals.reshape(R, LANES, U * V).astype(np.float64)
    y = np.zeros(R, dtype=np.float64)
    for r in range(R):
        for j in range(LANES):
            p = np.nonzero(bits[r, j])[0]
            y[r] += vals[r, j, : len(p)] @ xx[j * C + p]
    return y


# -- the 2:4 sparse tensor-core layout (kernels/nm24_sparse_mma.cu) --------------------------------

#: Bytes of one record of the 2:4 tensor-core layout: a row tile's two k-tiles (2 x 512 bytes of
#: A fragments) and their 32 metadata words.
NM24_RECORD_BYTES = 1152
#: Rows of a row tile and columns of a k-tile (the m16n8k32 sparse MMA's M and K).
NM24_TILE_ROWS = 16
NM24_TILE_COLS = 32
#: Lane (g, t) of a warp holds, in its four A registers, (row g, block t), (row g + 8, block t),
#: (row g, block t + 4), (row g + 8, block t + 4) of a k-tile: the MMA's A fragment.
_NM24_LANES = np.arange(32)
_NM24_ROW = (_NM24_LANES[:, None] >> 2) + 8 * (np.arange(4)[None, :] & 1)  # [lane, register]
_NM24_BLOCK = (_NM24_LANES[:, None] & 3) + 4 * (np.arange(4)[None, :] >> 1)


def is_nm24(block_length: int, keep: int) -> bool:
    """True for the geometry the sparse tensor cores take: blocks of 4 keeping 2 (2:4)."""
    return int(block_length) == 4 and int(keep) == 2


def nm24_records(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The device layout of kernels/nm24_sparse_mma.cu from a 2:4 matrix's offsets-form arrays
    (``values`` [R, 2, B] 16-bit, numpy; ``indices`` [R, 2, B] in-block offsets 0..3, distinct per
    block: check_balanced_arrays holds them to that): uint8 [ceil(R/16), ceil(ceil(B/8)/2), 1152],
    record (rt, kp) = A fragments of k-tiles 2kp and 2kp + 1 of row tile rt, then their metadata
    words (the .cu file's header states the bytes). Rows past R and blocks past B are zero values at
    in-block indices (0, 1), which the hardware takes as a valid 2:4 pattern."""
    R, k, B = values.shape
    if k != 2:
        raise FormatError(f"the 2:4 tensor-core layout needs keep = 2 per block of 4, got keep = {k}")
    rt, kt = -(-R // NM24_TILE_ROWS), -(-B // 8)
    kt += kt & 1  # whole pairs: an odd last k-tile is paired with an all-zero one
    Rp, Bp = rt * NM24_TILE_ROWS, kt * 8
    # the re-layout's peak: values and indices padded (and sorted, gathered) a few times, the records
    check_fits_memory(Rp * Bp * 2 * (3 * values.dtype.itemsize + 12) + rt * (kt // 2) * NM24_RECORD_BYTES,
                      f"the 2:4 tensor-core layout of a [{R}, {B * 4}] tensor")
    order = np.argsort(indices, axis=1, kind="stable")  # the two kept entries of a block in column order
    v = np.zeros((Rp, Bp, 2), dtype=values.dtype)
    i = np.zeros((Rp, Bp, 2), dtype=np.uint32)
    i[:, :, 1] = 1
    v[:R, :B] = np.take_along_axis(values, order, axis=1).transpose(0, 2, 1)
    i[:R, :B] = np.take_along_axis(indices, order, axis=1).transpose(0, 2, 1).astype(np.uint32)
    # A: [rt, kt, 16 rows, 8 blocks, 2] -> per lane and register -> [rt, kt, 32, 4, 2] (16 bytes a lane)
    v5 = v.reshape(rt, NM24_TILE_ROWS, kt, 8, 2).transpose(0, 2, 1, 3, 4)
    a = v5[:, :, _NM24_ROW, _NM24_BLOCK, :]
    # metadata: 4 bits per block (i0 | i1 << 2); word (g, h) = blocks 4h..4h+3 of rows g (low 16 bits), g + 8
    nib = (i[:, :, 0] | (i[:, :, 1] << 2)).reshape(rt, NM24_TILE_ROWS, kt, 8).transpose(0, 2, 1, 3)
    shifts = (4 * np.arange(4, dtype=np.uint32))
    half = (nib.reshape(rt, kt, NM24_TILE_ROWS, 2, 4) << shifts).sum(axis=-1, dtype=np.uint32)  # [rt, kt, 16, 2]
    words = half[:, :, :8, :] | (half[:, :, 8:, :] << np.uint32(16))  # [rt, kt, g, h]
    # lane (g, t): t < 2 -> even k-tile's word h = t; t >= 2 -> odd k-tile's word h = t - 2
    kp = kt // 2
    w2 = words.reshape(rt, kp, 2, 8, 2)  # [rt, kp, parity, g, h]
    meta = w2.transpose(0, 1, 3, 2, 4).reshape(rt, kp, 32)  # lane = g * 4 + parity * 2 + h
    rec = np.empty((rt, kp, NM24_RECORD_BYTES), dtype=np.uint8)
    a_bytes = np.ascontiguousarray(a).view(np.uint8).reshape(rt, kp, 2 * 32 * 16)
    rec[:, :, :1024] = a_bytes
    rec[:, :, 1024:] = np.ascontiguousarray(meta.astype("<u4")).view(np.uint8).reshape(rt, kp, 128)
    return rec


def nm24_reference(records: np.ndarray, rows: int, cols: int, x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """y = W x (float64) read back from ``nm24_records``'s layout the way the sparse MMA reads it
    (its A fragments, metadata words and selectors as kernels/nm24_sparse_mma.cu states them): the
    CPU model tests hold the layout to. ``dtype``: the values' numpy dtype (float16, or uint16 bits
    of bfloat16)."""
    rt, kp, _ = records.shape
    kt = 2 * kp
    a = records[:, :, :1024].copy().view(dtype).reshape(rt, kp, 2, 32, 4, 2)
    if dtype == np.uint16:  # bfloat16 bits -> float
        a = (a.astype(np.uint32) << 16).view(np.float32)
    a = a.astype(np.float64)
    meta = records[:, :, 1024:].copy().view("<u4").reshape(rt, kp, 8, 4)  # [.., g, t]
    W = np.zeros((rt * NM24_TILE_ROWS, kt * NM24_TILE_COLS))
    for p in range(kp):
        for par in range(2):
            c0 = (2 * p + par) * NM24_TILE_COLS
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                for reg in range(4):
                    row, blk = _NM24_ROW[lane, reg], _NM24_BLOCK[lane, reg]
                    h = blk // 4
                    word = meta[:, p, g, par * 2 + h]  # the selector's lanes: 0, 1 (even) or 2, 3 (odd)
                    nib = (word >> (16 * (row >= 8) + 4 * (blk % 4))) & 15
                    for s in range(2):
                        col = c0 + 4 * blk + ((nib >> (2 * s)) & 3)
                        W[np.arange(rt) * NM24_TILE_ROWS + row, col] += a[:, p, par, lane, reg, s]
                del t
    xx = np.zeros((W.shape[1],) + x.shape[1:])
    xx[: x.shape[0]] = x
    return (W @ xx)[:rows]


# --------------------------------------------------------------------------- balanced direct conv

#: kernels/balanced_conv.cu: ``tap_pos = c << CONV_POS_SHIFT | dy << 4 | dx`` (kConvPosShift), output
#: columns per tile (kConvTileCols), the largest kernel side the 4-bit dy / dx fields hold, and the
#: channel bound the remaining 23 bits of a non-negative int32 hold.
CONV_POS_SHIFT = 8
CONV_TILE_COLS = 32
CONV_MAX_KERNEL = 16
CONV_MAX_CHANNELS = 1 << 23


def conv_taps(values: np.ndarray, indices: np.ndarray, block_length: int, in_channels: int, kh: int, kw: int,
              chunk_channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The device layout of kernels/balanced_conv.cu from a conv weight's offsets-form arrays (``values``
    / ``indices`` [C_out, k, B] over the [C_out, C_in*kh*kw] view, validated by check_balanced_arrays):

    - ``tap_w`` float32 [C_out * (k * B - p)]: each output channel's kept values in column order, less the
      p fill-up padding taps a short last block keeps past the view's last column (the same p in every row),
    - ``tap_pos`` int32, same length: ``c << CONV_POS_SHIFT | dy << 4 | dx`` of each (column = c*kh*kw +
      dy*kw + dx),
    - ``chunk_start`` int32 [C_out, nchunks + 1], nchunks = ceil(C_in / chunk_channels): entry j of row o
      is the index of o's first tap with c >= j * chunk_channels (the last, the end of o's taps).

    FormatError for a kernel side over CONV_MAX_KERNEL or channels over CONV_MAX_CHANNELS."""
    R, k, B = values.shape
    kk = kh * kw
    if values.dtype.kind != "f":  # raw 16-bit containers would be taken as numbers
        raise FormatError(f"conv_taps takes float values, got numpy {values.dtype}")
    if not (1 <= kh <= CONV_MAX_KERNEL and 1 <= kw <= CONV_MAX_KERNEL):
        raise FormatError(f"the balanced conv kernel takes kernel sides 1..{CONV_MAX_KERNEL}, got {kh}x{kw}")
    if not 1 <= in_channels < CONV_MAX_CHANNELS:
        raise FormatError(f"the balanced conv kernel takes fewer than {CONV_MAX_CHANNELS} input channels, got {in_channels}")
    cc = positive_int(chunk_channels, "chunk_channels")
    nchunks = -(-in_channels // cc)
    per_row = k * B
    check_fits_memory(R * per_row * (8 + 8 + 8 + 4 + 4) + R * (nchunks + 1) * 4,
                      f"the balanced conv layout of a [{R}, {in_channels * kk}] weight")
    K = in_channels * kk
    if not (B - 1) * block_length < K <= B * block_length:
        raise FormatError(f"{B} blocks of {block_length} do not cover the {in_channels}x{kh}x{kw} conv view ({K} columns)")
    cols = (np.arange(B, dtype=np.int64)[None, None, :] * block_length + indices.astype(np.int64)).reshape(R, per_row)
    order = np.argsort(cols, axis=1, kind="stable")
    cols = np.take_along_axis(cols, order, axis=1)
    w = np.take_along_axis(values.reshape(R, per_row).astype(np.float32), order, axis=1)
    # A short last block keeps padding columns (>= K, value 0: the format's fill-up rule), as many in
    # every row; sorted, they are each row's last taps. The kernel has no column for them: drop them.
    pad = int((cols >= K).sum(axis=1).max()) if cols.size else 0
    if cols.size and ((cols[:, per_row - pad:] < K).any() or (w[:, per_row - pad:] != 0).any() or cols.min() < 0):
        raise FormatError(f"the padding taps past the {K} columns of the conv view are not the fill-up rule's")
    per_row -= pad
    cols, w = cols[:, :per_row], w[:, :per_row]
    c, r = cols // kk, cols % kk
    pos = (c << CONV_POS_SHIFT) | ((r // kw) << 4) | (r % kw)
    thresholds = np.arange(nchunks + 1, dtype=np.int64) * cc
    local = np.stack([np.searchsorted(row, thresholds, side="left") for row in c]) if R else \
        np.zeros((0, nchunks + 1), np.int64)
    local[:, -1] = per_row
    chunk_start = local + np.arange(R, dtype=np.int64)[:, None] * per_row
    if chunk_start.size and chunk_start.max() >= 2**31:
        raise FormatError(f"the balanced conv layout holds {R * per_row} taps, over the kernel's 32-bit tap index")
    return w.reshape(-1), pos.astype(np.int32).reshape(-1), chunk_start.astype(np.int32)


def conv_taps_reference(tap_w: np.ndarray, tap_pos: np.ndarray, chunk_start: np.ndarray, x: np.ndarray, kh: int,
                        kw: int, stride: int, padding: int, chunk_channels: int) -> np.ndarray:
    """What kernels/balanced_conv.cu computes from ``conv_taps``' arrays, on the CPU (float64): x [C, H, W]
    -> y [C_out, OH, OW] without bias or ReLU. Walks the chunks and taps as the kernel does and asserts
    every tap lies in its chunk's staged channels and inside the kernel window (the kernel's shared-
    memory reads are in bounds exactly then)."""
    C, H, W = x.shape
    R = chunk_start.shape[0]
    nchunks = chunk_start.shape[1] - 1
    OH = (H + 2 * padding - kh) // stride + 1
    OW = (W + 2 * padding - kw) // stride + 1
    xp = np.zeros((C, H + 2 * padding + stride, W + 2 * padding + stride), np.float64)
    xp[:, padding:padding + H, padding:padding + W] = x
    y = np.zeros((R, OH, OW), np.float64)
    for o in range(R):
        for j in range(nchunks):
            c0, c1 = j * chunk_channels, min(C, (j + 1) * chunk_channels)
            for t in range(int(chunk_start[o, j]), int(chunk_start[o, j + 1])):
                pos = int(tap_pos[t])
                c, dy, dx = pos >> CONV_POS_SHIFT, (pos >> 4) & 15, pos & 15
                assert c0 <= c < c1 and dy < kh and dx < kw, (o, j, t, c, dy, dx)
                y[o] += float(tap_w[t]) * xp[c, dy:dy + stride * OH:stride, dx:dx + stride * OW:stride]
    return y
