"""Which weights to keep: the one owner of pruning criteria, each working inside every pattern.

Three criteria (``Criterion``), each a pure function of one weight matrix W [R, K] (rows are output
units, columns input features, as torch's nn.Linear stores them), its pattern, and for the
activation-aware two the statistics of the layer's calibration inputs X [N, K] (``InputStats``):

- **magnitude**: keep the largest |W_ij| (what ``balprune prune`` always did; the same selection as
  the engine's packers, so the same bytes).
- **wanda** (Sun et al. 2023): score_ij = |W_ij| * ||X_j||_2, the column norm over every calibration
  token. The scores replace |W| as the input of the pattern's own selection (prune.masks), so
  balanced keeps exactly k per block of every row, N:M exactly N of every M, unstructured exactly its
  keep count per tensor, block and vector whole tiles by the L2 norm of their scores. Kept values
  are the original weights.
- **sparsegpt** (Frantar & Alistarh 2023): optimal-brain-surgeon pruning with the layer Hessian
  H = 2 X^T X (dampened by 1% of its mean diagonal). Columns are swept left to right in groups of
  128 with lazy batch updates; the error of every pruned weight is compensated on the columns not
  yet swept through the upper Cholesky factor U of H^-1. The mask is chosen inside the sweep, one
  *pattern unit* at a time, by the OBS saliency w^2 / U_jj^2 of the weights as updated so far:

  - balanced (and N:M): a block's k kept entries per row are chosen when the sweep reaches the
    block's first column, over that block's columns. A group never ends inside a block that started
    after the group did (the group is cut at that block's start instead), so every block is chosen
    from fully updated weights;
  - unstructured (per tensor): each group of columns keeps its share of the tensor's keep count
    (cumulative rounding: the shares add up to exactly the count);
  - block and vector: groups are whole tile columns; each keeps its share of the kept tiles, ranked
    by the sum of the saliencies inside each tile.

  Pruned weights are exactly zero (set, not computed); the Hessian and its factors are float64, the
  sweep float32, on the device the inputs are on.

Selection ties follow the project's one ranking rule (patterns.ranking: larger score first, then
lower position), so identical inputs give identical masks. Every function returns the dense-with-zeros
matrix (the hand-off to packing: it has at most the pattern's count of non-zeros per unit) and the
bool mask of kept entries.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from ..errors import InvalidInputError
from ..patterns.balanced import geometry_for
from ..patterns.block import padded_tiles, tile_grid, tiles_to_mask
from ..patterns.kinds import BalancedPattern, Pattern, UnstructuredPattern, keep_count
from ..patterns.ranking import top_positions
from .masks import one_shot_mask

#: Columns per lazy-update group of the SparseGPT sweep (the paper's block size).
SPARSEGPT_GROUP = 128
#: Dampening added to H's diagonal, as a fraction of its mean diagonal (the paper's 1%).
SPARSEGPT_DAMP = 0.01


class Criterion(str, enum.Enum):
    MAGNITUDE = "magnitude"
    WANDA = "wanda"
    SPARSEGPT = "sparsegpt"

    @property
    def calibrated(self) -> bool:
        """Whether it needs calibration inputs (then only for linears of a model it can run)."""
        return self is not Criterion.MAGNITUDE

    @property
    def needs_gram(self) -> bool:
        """Whether its statistics include X^T X (K x K), not only the column sums of squares."""
        return self is Criterion.SPARSEGPT


class InputStats:
    """Statistics of one linear's calibration inputs, accumulated batch by batch in float64.

    ``sum_sq`` [K]: sum over tokens of x_j^2 (wanda's ||X_j||_2 is its square root); ``gram`` [K, K]:
    X^T X (sparsegpt's Hessian is 2 X^T X), only when built with ``gram=True``; ``tokens``: N.
    Batches are added in the caller's order, so the same batches give the same sums.
    """

    def __init__(self, cols: int, *, gram: bool, device: torch.device | str = "cpu") -> None:
        self.cols = cols
        self.tokens = 0
        self.sum_sq = torch.zeros(cols, dtype=torch.float64, device=device)
        self.gram = torch.zeros(cols, cols, dtype=torch.float64, device=device) if gram else None

    def add(self, x: torch.Tensor) -> None:
        """Add inputs x [..., K] (any float dtype; every leading index is one token)."""
        if x.shape[-1] != self.cols:
            raise ValueError(f"inputs have {x.shape[-1]} features, the statistics {self.cols}")
        x = x.reshape(-1, self.cols).to(torch.float64)
        self.tokens += x.shape[0]
        self.sum_sq += x.square().sum(0)
        if self.gram is not None:
            self.gram.addmm_(x.T, x)


@dataclass(frozen=True)
class Pruned:
    """One pruned matrix: ``weight`` [R, K] dense-with-zeros in the input's dtype (pruned entries exactly
    zero), ``mask`` bool [R, K] (True: kept; a kept weight may itself be zero)."""

    weight: torch.Tensor
    mask: torch.Tensor


def prune_matrix(criterion: Criterion, weight: torch.Tensor, pattern: Pattern, stats: InputStats | None = None, *,
                 keep: int | None = None) -> Pruned:
    """Prune ``weight`` [R, K] (a float dtype) to ``pattern`` by ``criterion``.

    ``stats``: the statistics of the matrix's inputs (wanda, sparsegpt; ignored by magnitude).
    ``keep``: the tensor's keep count for unstructured (nnz) and block / vector (tiles) patterns, as
    the plan fixed it (prune.plan); None computes it from the pattern's sparsity. Balanced patterns
    take k from their geometry.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be a matrix [R, K], got shape {list(weight.shape)}")
    if criterion is Criterion.MAGNITUDE:
        return _keep(weight, one_shot_mask(weight.cpu(), pattern, keep_override=keep))
    if stats is None:
        raise ValueError(f"criterion {criterion.value} needs the statistics of the matrix's inputs")
    if stats.cols != weight.shape[1]:
        raise ValueError(f"weight has {weight.shape[1]} columns, its input statistics {stats.cols}")
    if criterion is Criterion.WANDA:
        return wanda_prune(weight, pattern, stats.sum_sq, keep=keep)
    if stats.gram is None:
        raise ValueError("sparsegpt needs X^T X: build the statistics with gram=True")
    return sparsegpt_prune(weight, pattern, stats.gram, keep=keep)


def _keep(weight: torch.Tensor, mask: torch.Tensor) -> Pruned:
    mask = mask.to(weight.device)
    return Pruned(torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)), mask)


# --------------------------------------------------------------------------- wanda


def wanda_scores(weight: torch.Tensor, sum_sq: torch.Tensor) -> torch.Tensor:
    """float32 [R, K]: |W_ij| * ||X_j||_2, with ``sum_sq`` [K] the column sums of squares of the inputs."""
    norms = sum_sq.to(torch.float64).clamp_min(0).sqrt().to(torch.float32)
    return weight.abs().to(torch.float32) * norms.to(weight.device)[None, :]


def wanda_prune(weight: torch.Tensor, pattern: Pattern, sum_sq: torch.Tensor, *, keep: int | None = None) -> Pruned:
    """Wanda in ``pattern``: the pattern's selection (prune.masks) run on ``wanda_scores`` instead of |W|."""
    scores = wanda_scores(weight, sum_sq)
    if not bool(torch.isfinite(scores).all()):
        raise InvalidInputError("wanda scores are not finite (the calibration inputs overflow float32)",
                                hint="check the calibration data and the model's weights")
    return _keep(weight, one_shot_mask(scores.cpu(), pattern, keep_override=keep))


# --------------------------------------------------------------------------- sparsegpt


@dataclass(frozen=True)
class _Unit:
    """Columns [start, end) whose mask is chosen at once: ``per_row`` keeps ``count`` entries in every row
    (balanced blocks), otherwise ``count`` entries of the whole [R, end - start] slice (``tile`` None) or
    ``count`` whole tiles of shape ``tile``."""

    start: int
    end: int
    count: int
    per_row: bool = False
    tile: tuple[int, int] | None = None


def _share(total: int, part: int, whole: int) -> int:
    """floor(total * part / whole + 1/2) in integers: the cumulative share that splits ``total`` exactly."""
    return (2 * total * part + whole) // (2 * whole)


def _groups(pattern: Pattern, rows: int, cols: int, keep: int | None,
            group_size: int) -> list[tuple[int, int, list[_Unit]]]:
    """The sweep's column groups [(start, end, units starting in it)] for ``pattern`` (module docstring)."""
    out: list[tuple[int, int, list[_Unit]]] = []
    if isinstance(pattern, BalancedPattern):
        g = geometry_for(rows, cols, pattern)
        length = g.block_length
        i1 = 0
        while i1 < cols:
            i2 = min(i1 + group_size, cols)
            last = (i2 - 1) // length * length  # the last block starting inside [i1, i2)
            if i1 < last and min(last + length, cols) > i2:
                i2 = last  # never end inside a block that started after the group did
            first = -(-i1 // length) * length
            units = [_Unit(s, min(s + length, cols), min(g.keep, min(s + length, cols) - s), per_row=True)
                     for s in range(first, i2, length)]
            out.append((i1, i2, units))
            i1 = i2
        return out
    if isinstance(pattern, UnstructuredPattern):
        total = keep if keep is not None else keep_count(pattern.sparsity, rows * cols)
        for i1 in range(0, cols, group_size):
            i2 = min(i1 + group_size, cols)
            count = _share(total, i2, cols) - _share(total, i1, cols)
            out.append((i1, i2, [_Unit(i1, i2, count)]))
        return out
    shape = pattern.block_shape  # block, or vector (1 x V tiles)
    bw = shape[1]
    rb, cb = tile_grid(rows, cols, shape)
    total = keep if keep is not None else keep_count(pattern.sparsity, rb * cb)
    width = bw * max(1, group_size // bw)
    for i1 in range(0, cols, width):
        i2 = min(i1 + width, cols)
        c1, c2 = i1 // bw, -(-i2 // bw)  # tile columns of the group
        count = _share(total, c2, cb) - _share(total, c1, cb)
        out.append((i1, i2, [_Unit(i1, i2, count, tile=shape)]))
    return out


def _choose(unit: _Unit, saliency: torch.Tensor) -> torch.Tensor:
    """bool [R, end - start] on the CPU: the unit's kept entries by ``saliency`` (float32 >= 0, larger
    kept first; ties: lower position) under the project's ranking rule."""
    rows, width = saliency.shape
    saliency = saliency.cpu()
    mask = torch.zeros(rows, width, dtype=torch.bool)
    if unit.per_row:
        mask.scatter_(1, top_positions(saliency, unit.count), True)
    elif unit.tile is None:
        mask.view(-1)[top_positions(saliency.reshape(-1), unit.count)] = True
    else:
        tile_scores = padded_tiles(saliency, unit.tile).sum(dim=(2, 3)).reshape(-1)
        tiles = torch.zeros(tile_scores.numel(), dtype=torch.bool)
        tiles[top_positions(tile_scores, unit.count)] = True
        mask = tiles_to_mask(tiles, rows, width, unit.tile)
    return mask


def inverse_hessian_factor(gram: torch.Tensor, damp: float = SPARSEGPT_DAMP) -> torch.Tensor:
    """float64 [K, K]: the upper Cholesky factor U of H^-1 (H^-1 = U^T U), H = 2 gram + damp * mean(diag) I.

    All-zero inputs give H = I (nothing to compensate). Should rounding leave H not positive definite,
    the dampening is raised tenfold, up to three times (deterministically); past that the inputs are
    refused (InvalidInputError).
    """
    h = 2 * gram.to(torch.float64)
    mean_diag = float(h.diagonal().mean())
    if not mean_diag > 0:
        h = torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
        mean_diag = 1.0
    for attempt in range(4):
        damped = h.clone()
        damped.diagonal().add_(damp * 10**attempt * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            break
    else:
        raise InvalidInputError("the calibration inputs give a Hessian that is not positive definite even "
                                f"with {100 * damp * 1000:g}% dampening", hint="give more calibration data")
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def sparsegpt_prune(weight: torch.Tensor, pattern: Pattern, gram: torch.Tensor, *, keep: int | None = None,
                    group_size: int = SPARSEGPT_GROUP, damp: float = SPARSEGPT_DAMP) -> Pruned:
    """SparseGPT in ``pattern`` (module docstring): ``gram`` [K, K] is X^T X of the matrix's inputs.

    The sweep runs on ``gram``'s device; the result is in ``weight``'s dtype and on its device.
    """
    rows, cols = weight.shape
    if tuple(gram.shape) != (cols, cols):
        raise ValueError(f"gram must be [{cols}, {cols}], got {list(gram.shape)}")
    device = gram.device
    u = inverse_hessian_factor(gram, damp).to(torch.float32)
    diag = u.diagonal().clone()
    w = weight.to(device=device, dtype=torch.float32).clone()
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    for i1, i2, units in _groups(pattern, rows, cols, keep, group_size):
        starts = {unit.start: unit for unit in units}
        block = w[:, i1:i2].clone()
        u_block = u[i1:i2, i1:i2]
        errors = torch.zeros_like(block)
        for i in range(i2 - i1):
            col = i1 + i
            unit = starts.get(col)
            if unit is not None:
                # The unit's weights as updated so far: inside the group the running copy; a unit reaching
                # past the group starts at its first column, where ``w`` holds every update already.
                current = block[:, i:unit.end - i1] if unit.end <= i2 else w[:, col:unit.end]
                saliency = current.square() / diag[col:unit.end].square()[None, :]
                mask[:, col:unit.end] = _choose(unit, saliency).to(device)
            x = block[:, i]
            q = torch.where(mask[:, col], x, torch.zeros((), dtype=x.dtype, device=device))
            err = (x - q) / u_block[i, i]
            block[:, i:] -= err[:, None] * u_block[i, i:][None, :]
            block[:, i] = q  # exactly the kept value, exactly zero where pruned (no rounding residue)
            errors[:, i] = err
        w[:, i1:i2] = block
        if i2 < cols:  # the group's compensation of every later column, in one product
            w[:, i2:] -= errors @ u[i1:i2, i2:]
    out = torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=device)).to(weight.dtype)
    return Pruned(out.to(weight.device), mask.to(weight.device))
