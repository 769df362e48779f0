"""Balanced conv2d at batch 1..8 on a GPU: kernels/balanced_conv.cu (direct convolution, no im2col).

``BalancedConv2d`` holds one conv weight balanced over its [C_out, C_in*kh*kw] view and computes
``y = act(conv2d(x, W, stride, padding) + bias)`` for NCHW torch CUDA tensors, fp32 accumulation, on
one of three kernels (the .cu file has the layout and the launches): "tiled" and "map" stage input
tiles in shared memory once per CTA and let its warps walk the kept taps of their output channels
against them (the tiled kernel for large maps, the small-map kernel for maps of up to MAP_NAMED_RUNS
runs of pixels); "gather" stages nothing (a CTA per output channel and pixel run, the input read
through L1/L2 per tap), which wins where a staged word would be reused little (1x1 and stride-2 convs
at 90%: kernels/NOTES.md v25).

Status: correct on the GPU (tests/gpu/test_conv_gpu.py, every kernel and dtype) and held to its CPU
models (formats.layouts.conv_taps_reference, tests/test_conv_layout.py; the thread emulations
tests/test_conv_kernel_emulation.py, test_conv_map_emulation.py, test_conv_gather_emulation.py). The
model runtimes time every kernel that takes a layer (runtime.model.conv_stage, path "balanced_conv")
through ``prepared_launch`` and keep the fastest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..formats.layouts import CONV_TILE_COLS, conv_taps
from ._linear import TORCH_OF
from ._linear import VALUE_DTYPES as _VALUE_DTYPES
from .balanced import checked_arrays

DTYPES = ("float32", "float16", "bfloat16")
#: Output rows per lane (PY: the kernel's register accumulators).
ROWS_PER_LANE = (4, 8)
#: Threads per CTA at most (32 lanes x row warps x channels).
MAX_THREADS = 512
#: Shared memory for the staged input tile (the default dynamic limit: no attribute needed).
TILE_BYTES = 48 * 1024
#: CTAs wanted on the whole GPU (two per SM on 132 SMs) before channels per CTA are lowered.
TARGET_CTAS = 264
#: Largest batch one launch takes (grid z).
MAX_BATCH = 8
_T = {"float32": "float", "float16": "bp::f16", "bfloat16": "bp::bf16"}


#: Accumulators per lane of the small-map kernel (NP: a CTA's run of output pixels is 32 * NP).
PIXELS_PER_LANE = (1, 2, 4, 8)
#: Pixel runs per map at most for the small-map kernel when "auto" picks without measuring (the tiled kernel
#: past it).
MAP_MAX_RUNS = 4
#: Pixel runs at most when the small-map kernel is asked for by name (kernel="map"): a model runtime offers it
#: up to here beside the tiled kernel and keeps whichever its dispatcher measures faster (conv_stage).
MAP_NAMED_RUNS = 64
#: Warps (output channels) per CTA of the small-map kernel at most (its __launch_bounds__(512)).
MAP_MAX_WARPS = 16
#: CTAs the small-map kernel wants (one per SM of a 132-SM GPU) before it lowers the warps per CTA: each CTA
#: stages its input slice once for all of its warps, so fewer, wider CTAs read the input fewer times.
MAP_TARGET_CTAS = 132
#: Warps per CTA of the gather kernel at most (kGatherMaxWarps in the .cu file), and the kept taps a warp
#: should walk at least before another warp shares the channel's taps.
GATHER_MAX_WARPS = 8
GATHER_TAPS_PER_WARP = 48
#: Pixels per lane of the gather kernel (NP = 8 spills at the 64-register budget of 4 CTAs of 256 per SM).
GATHER_PIXELS_PER_LANE = (1, 2, 4)
#: The kernels a BalancedConv2d can run: "tiled" (balanced_conv2d), "map" (balanced_conv2d_map), "gather"
#: (balanced_conv2d_gather: nothing staged; offered by name only, a model runtime measures it).
KERNELS = ("auto", "tiled", "map", "gather")


def kernel_name(dtype: str, rows_per_lane: int) -> str:
    """The CuPy name expression of bp::balanced_conv2d<T, PY>."""
    return f"bp::balanced_conv2d<{_T[dtype]}, {rows_per_lane}>"


def map_kernel_name(dtype: str, pixels_per_lane: int) -> str:
    """The CuPy name expression of bp::balanced_conv2d_map<T, NP>."""
    return f"bp::balanced_conv2d_map<{_T[dtype]}, {pixels_per_lane}>"


def gather_kernel_name(dtype: str, pixels_per_lane: int) -> str:
    """The CuPy name expression of bp::balanced_conv2d_gather<T, NP>."""
    return f"bp::balanced_conv2d_gather<{_T[dtype]}, {pixels_per_lane}>"


def epilogue_kernel_name(dtype: str) -> str:
    return f"bp::conv_epilogue<{_T[dtype]}>"


def kernel_variants() -> list[str]:
    """Every instantiation the runtime can launch (the compile test builds them all)."""
    return ([kernel_name(d, py) for d in DTYPES for py in ROWS_PER_LANE]
            + [map_kernel_name(d, n) for d in DTYPES for n in PIXELS_PER_LANE]
            + [gather_kernel_name(d, n) for d in DTYPES for n in GATHER_PIXELS_PER_LANE]
            + [epilogue_kernel_name(d) for d in DTYPES])


@dataclass(frozen=True)
class ConvShape:
    """One conv launch's sizes: input [C, H, W], weight [C_out, C, kh, kw], stride, zero padding."""

    in_channels: int
    height: int
    width: int
    out_channels: int
    kh: int
    kw: int
    stride: int = 1
    padding: int = 0

    @property
    def out_height(self) -> int:
        return (self.height + 2 * self.padding - self.kh) // self.stride + 1

    @property
    def out_width(self) -> int:
        return (self.width + 2 * self.padding - self.kw) // self.stride + 1


def _check_sizes(s: ConvShape) -> None:
    """UsageError unless the output is non-empty and one image's input indexes in 32 bits (the kernels'
    stage_input offsets are int)."""
    oh, ow = s.out_height, s.out_width
    if oh < 1 or ow < 1:
        raise UsageError(f"conv output would be {oh}x{ow}: the input is smaller than the kernel")
    if s.in_channels * s.height * s.width > 2**31 - 1:
        raise UsageError(f"conv input of {s.in_channels}x{s.height}x{s.width} values per image: over 2^31 - 1, "
                         "which the conv kernels index in 32 bits")


def launch_config(s: ConvShape, batch: int = 1) -> dict:
    """Rows per lane, row warps, channels per CTA, channels per staged chunk, grid, block and shared
    memory of one launch (a pure function: the CPU tests check its bounds). UsageError when no tile of
    this kernel side and stride fits TILE_BYTES."""
    _check_sizes(s)
    oh, ow = s.out_height, s.out_width
    py = ROWS_PER_LANE[1] if oh >= ROWS_PER_LANE[1] else ROWS_PER_LANE[0]
    wr = max(1, min(4, -(-min(oh, 16) // py)))
    tiw = (CONV_TILE_COLS - 1) * s.stride + s.kw

    def tih() -> int:
        return (py * wr - 1) * s.stride + s.kh

    while 4 * tih() * tiw > TILE_BYTES and (wr > 1 or py > ROWS_PER_LANE[0]):
        if wr > 1:
            wr -= 1
        else:
            py = ROWS_PER_LANE[0]
    if 4 * tih() * tiw > TILE_BYTES:
        raise UsageError(f"a {s.kh}x{s.kw} conv at stride {s.stride}: one channel's input tile "
                         f"({tih()}x{tiw} floats) exceeds the kernel's {TILE_BYTES} bytes of shared memory")
    tiles = math.ceil(ow / CONV_TILE_COLS) * math.ceil(oh / (py * wr))
    co = max(1, min(MAX_THREADS // (32 * wr), s.out_channels))
    while co > 1 and tiles * math.ceil(s.out_channels / co) * batch < TARGET_CTAS:
        co //= 2
    if math.ceil(s.out_channels / co) > 65535 or tiles > 2**31 - 1:
        raise UsageError(f"a conv of {s.out_channels} output channels and {tiles} tiles exceeds the kernel's grid")
    cc = max(1, min(s.in_channels, TILE_BYTES // (4 * tih() * tiw)))
    return {"rows_per_lane": py, "row_warps": wr, "channels": co, "chunk_channels": cc,
            "chunks": math.ceil(s.in_channels / cc),
            "grid": (tiles, math.ceil(s.out_channels / co), batch), "block": (CONV_TILE_COLS, wr, co),
            "shared_mem": 4 * cc * tih() * tiw}


def tap_values(values) -> np.ndarray:
    """The kept values as float32 numbers for conv_taps (the layout stores every tap in float32; f16 and
    bf16 convert exactly). Not the raw 16-bit containers the SpMV operators upload: bf16 has no numpy
    dtype, and its bits read as integers were the values of the first bf16 runs (error ~2e4)."""
    import torch

    return torch.as_tensor(values).detach().to("cpu", torch.float32).contiguous().numpy()


def map_launch_config(s: ConvShape, batch: int = 1, max_runs: int = MAP_MAX_RUNS) -> dict | None:
    """The small-map kernel's launch (kernels/balanced_conv.cu, balanced_conv2d_map), or None when it
    does not take this shape: more than ``max_runs`` runs of 256 pixels, or one input channel's rows
    of a run over TILE_BYTES. A pure function (the CPU tests check its bounds and emulate it)."""
    oh, ow = s.out_height, s.out_width
    _check_sizes(s)
    pixels = oh * ow
    np_ = next((n for n in PIXELS_PER_LANE if 32 * n >= pixels), PIXELS_PER_LANE[-1])
    run = 32 * np_
    runs = math.ceil(pixels / run)
    if runs > max_runs:
        return None
    pw = (ow - 1) * s.stride + s.kw
    # the padded input rows of each run's output rows (the kernel's TR); shared memory takes the largest
    tr = max(((min(pixels, p0 + run) - 1) // ow - p0 // ow) * s.stride + s.kh for p0 in range(0, pixels, run))
    cs = min(s.in_channels, TILE_BYTES // (4 * tr * pw))
    if cs < 1:
        return None
    slices = math.ceil(s.in_channels / cs)
    co = min(MAP_MAX_WARPS, s.out_channels)
    while co > 1 and runs * math.ceil(s.out_channels / co) * slices * batch < MAP_TARGET_CTAS:
        co //= 2
    groups = math.ceil(s.out_channels / co)
    if runs * groups > 2**31 - 1 or slices > 65535:
        return None
    return {"pixels_per_lane": np_, "runs": runs, "channels": co, "slice_channels": cs, "slices": slices,
            "rows": tr, "grid": (runs * groups, slices, batch), "block": (32, co), "shared_mem": 4 * cs * tr * pw}


def gather_launch_config(s: ConvShape, taps: int, batch: int = 1) -> dict:
    """The gather kernel's launch (balanced_conv2d_gather) for ``taps`` kept taps per output channel: NP
    pixels per lane (the fewest whose 32 * NP covers the map, at most 4), runs of 32 * NP pixels, warps
    sharing a channel's taps (about GATHER_TAPS_PER_WARP each, 1..GATHER_MAX_WARPS). Any shape whose
    input indexes in 32 bits takes it (nothing is staged); a pure function (the CPU tests emulate it)."""
    _check_sizes(s)
    if not 1 <= s.out_channels <= 65535:
        raise UsageError(f"the gather conv kernel takes 1..65535 output channels, not {s.out_channels}")
    pixels = s.out_height * s.out_width
    np_ = next((n for n in GATHER_PIXELS_PER_LANE if 32 * n >= pixels), GATHER_PIXELS_PER_LANE[-1])
    runs = math.ceil(pixels / (32 * np_))
    warps = max(1, min(GATHER_MAX_WARPS, math.ceil(taps / GATHER_TAPS_PER_WARP)))
    return {"pixels_per_lane": np_, "runs": runs, "warps": warps, "grid": (runs, s.out_channels, batch),
            "block": (32, warps), "shared_mem": 0}


class BalancedConv2d:
    """conv2d with one balanced weight on a GPU (module doc). Built from the offsets-form arrays of the
    [C_out, C_in*kh*kw] view (validated on the host first unless ``validate=False``), or with
    ``from_tensor(BalancedTensor)``; ``bias`` a float tensor [C_out] or None."""

    def __init__(self, values, indices, *, in_channels: int, kh: int, kw: int, block_length: int, stride: int = 1,
                 padding: int = 0, bias=None, device: int = 0, validate: bool = True, name: str = "conv",
                 defines: tuple[str, ...] = (), kernel: str = "auto") -> None:
        from . import _gpu

        for what, v, lo in (("in_channels", in_channels, 1), ("kh", kh, 1), ("kw", kw, 1), ("stride", stride, 1),
                            ("padding", padding, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise UsageError(f"{name}: {what} must be an integer >= {lo}, got {v!r}")
        v, i, rows, keep, blocks = checked_arrays(values, indices, in_channels * kh * kw, block_length, name=name,
                                                  validate=validate)
        self.dtype = _VALUE_DTYPES[v.dtype]
        if self.dtype not in DTYPES:
            raise UsageError(f"{name}: the balanced conv kernel takes {', '.join(DTYPES)} weights, not {self.dtype}")
        if kernel not in KERNELS:
            raise UsageError(f"{name}: kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.name, self.defines, self.kernel = name, tuple(defines), kernel
        self.out_channels, self.in_channels, self.kh, self.kw = rows, in_channels, kh, kw
        self.stride, self.padding, self.block_length = stride, padding, block_length
        self._values, self._indices = tap_values(v), i.numpy()
        cp = _gpu.cupy()
        self.device = _gpu.require_device(device)
        with cp.cuda.Device(self.device):
            self.bias_dev = None
            if bias is not None:
                import torch

                b = torch.as_tensor(bias).detach().to("cpu", torch.float32).contiguous()
                if tuple(b.shape) != (rows,):
                    raise UsageError(f"{name}: bias must be [{rows}], got {list(b.shape)}")
                self.bias_dev = cp.asarray(b.numpy())
        self._taps: dict[int, tuple] = {}
        self._kernels: dict[str, object] = {}

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights a call reads: each kept tap's fp32 value and int32 position (the layout)."""
        return int(self._values.size) * 8

    @classmethod
    def from_tensor(cls, bt, *, stride: int = 1, padding: int = 0, bias=None, **kw):
        """From a balprune.formats.BalancedTensor of a conv weight [C_out, C_in, kh, kw]."""
        if len(bt.shape) != 4:
            raise UsageError(f"a conv weight is [C_out, C_in, kh, kw], got {list(bt.shape)}")
        _, cin, kh, kwid = bt.shape
        return cls(bt.values, bt.indices, in_channels=cin, kh=kh, kw=kwid, block_length=bt.geometry.block_length,
                   stride=stride, padding=padding, bias=bias, validate=False, **kw)

    def _taps_for(self, chunk_channels: int):
        from . import _gpu

        taps = self._taps.get(chunk_channels)
        if taps is None:
            cp = _gpu.cupy()
            w, pos, starts = conv_taps(self._values, self._indices, self.block_length, self.in_channels, self.kh,
                                       self.kw, chunk_channels)
            with cp.cuda.Device(self.device):
                taps = self._taps[chunk_channels] = (cp.asarray(w), cp.asarray(pos), cp.asarray(starts))
        return taps

    def _kernel(self, rows_per_lane: int):
        return self._function(kernel_name(self.dtype, rows_per_lane))

    def _function(self, name: str):
        k = self._kernels.get(name)
        if k is None:
            from .kernels import load_module

            k = self._kernels[name] = load_module("balanced_conv.cu", (name,), device=self.device,
                                                   defines=self.defines).get_function(name)
        return k

    def _checked_input(self, x):
        """x as [N, C, H, W] (a [C, H, W] gets N = 1), checked against the operator (UsageError)."""
        import torch

        want = TORCH_OF[self.dtype]
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or x.dtype != want or not x.is_cuda \
                or x.device.index != self.device:
            raise UsageError(f"{self.name}: x must be a CUDA {want} tensor [C, H, W] or [N, C, H, W] on device "
                             f"{self.device}")
        xb = x[None] if x.dim() == 3 else x
        n, c = int(xb.shape[0]), int(xb.shape[1])
        if c != self.in_channels or not 1 <= n <= MAX_BATCH:
            raise UsageError(f"{self.name}: x must have {self.in_channels} channels and a batch of 1..{MAX_BATCH}, "
                             f"got {list(x.shape)}")
        return xb

    def out_shape(self, height: int, width: int) -> ConvShape:
        """The launch sizes of an input [C_in, height, width]."""
        return ConvShape(self.in_channels, height, width, self.out_channels, self.kh, self.kw, self.stride,
                         self.padding)

    def kernels_for(self, height: int, width: int, batch: int = 1) -> list[str]:
        """The kernels that take an input [C_in, height, width] by name: "tiled" when its tile fits, "map" while
        the map has at most MAP_NAMED_RUNS pixel runs, "gather" within its grid limits (any map)."""
        s = self.out_shape(height, width)
        out = []
        for kernel, config in (("tiled", lambda: launch_config(s, batch)),
                               ("map", lambda: map_launch_config(s, batch, MAP_NAMED_RUNS)),
                               ("gather", lambda: gather_launch_config(s, self.taps_per_channel, batch))):
            try:
                if config() is not None:
                    out.append(kernel)
            except UsageError:  # a shape past the kernel's limits: not offered
                pass
        return out

    @property
    def taps_per_channel(self) -> int:
        """Kept taps of each output channel (balanced: the same for every channel)."""
        return int(self._values.size) // self.out_channels

    def prepared_launch(self, x, y, *, relu: bool = False, packed: bool = True, kernel: str | None = None):
        """A zero-argument callable computing y = act(conv2d(x) + bias) into ``y`` on CuPy's current stream,
        its arguments built once (runtime._launch.prepared): the form a model runtime binds. ``x``: a
        contiguous CUDA tensor [C, H, W] / [N, C, H, W] of the weight's dtype; ``y``: a contiguous tensor of
        the output's shape and dtype. Both must outlive the callable (raw pointers). ``kernel``: "tiled", "map"
        (up to MAP_NAMED_RUNS pixel runs), "gather" or "auto"; default: the operator's. One launch, or three
        where the small-map kernel splits the input channels: the fp32 partial sums zeroed (torch, on its
        current stream: run it inside measure.cupy_on_torch_stream), the map kernel, conv_epilogue."""
        import torch

        from ._launch import prepared

        xb = self._checked_input(x)
        if not xb.is_contiguous():
            raise UsageError(f"{self.name}: x must be contiguous for a prepared launch")
        n, c, h, w = (int(d) for d in xb.shape)
        s = self.out_shape(h, w)
        want = (n, self.out_channels, s.out_height, s.out_width)
        if not isinstance(y, torch.Tensor) or y.dtype != xb.dtype or y.device != xb.device or not y.is_contiguous() \
                or y.numel() != n * self.out_channels * s.out_height * s.out_width:
            raise UsageError(f"{self.name}: y must be a contiguous {xb.dtype} tensor of {list(want)} on {xb.device}")
        bias = self.bias_dev if self.bias_dev is not None else np.uint64(0)
        act = np.int32(1 if relu else 0)
        head = (np.uint64(xb.data_ptr()), np.int32(c), np.int32(h), np.int32(w), np.int64(c * h * w))
        sizes = (np.int32(self.out_channels), np.int32(self.kh), np.int32(self.kw), np.int32(self.stride),
                 np.int32(self.padding), np.int32(s.out_height), np.int32(s.out_width))
        kernel = self.kernel if kernel is None else kernel
        if kernel not in KERNELS:
            raise UsageError(f"{self.name}: kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        if kernel == "gather":
            gcfg = gather_launch_config(s, self.taps_per_channel, n)
            tap_w, tap_pos, starts = self._taps_for(self.in_channels)  # one chunk: all of a channel's taps
            args = head + (tap_w, tap_pos, starts) + sizes + (bias, act, np.uint64(y.data_ptr()))
            return prepared(self._function(gather_kernel_name(self.dtype, gcfg["pixels_per_lane"])), gcfg["grid"],
                            gcfg["block"], args, 0, packed=packed)
        mcfg = (map_launch_config(s, n, MAP_NAMED_RUNS if kernel == "map" else MAP_MAX_RUNS)
                if kernel in ("auto", "map") else None)
        if kernel == "map" and mcfg is None:
            raise UsageError(f"{self.name}: the small-map kernel does not take a {s.out_height}x{s.out_width} output "
                             f"of a {self.kh}x{self.kw} conv at stride {self.stride}")
        if mcfg is None:
            cfg = launch_config(s, n)
            tap_w, tap_pos, starts = self._taps_for(cfg["chunk_channels"])
            args = head + (tap_w, tap_pos, starts) + sizes + (
                np.int32(cfg["chunk_channels"]), np.int32(cfg["chunks"]), bias, act,
                np.uint64(y.data_ptr()), np.int64(self.out_channels * s.out_height * s.out_width))
            return prepared(self._kernel(cfg["rows_per_lane"]), cfg["grid"], cfg["block"], args, cfg["shared_mem"],
                            packed=packed)
        tap_w, tap_pos, starts = self._taps_for(mcfg["slice_channels"])
        part = torch.empty(y.numel(), dtype=torch.float32, device=xb.device) if mcfg["slices"] > 1 else None
        args = head + (tap_w, tap_pos, starts) + sizes + (
            np.int32(mcfg["slice_channels"]), np.int32(mcfg["slices"]), np.int32(mcfg["runs"]), bias, act,
            np.uint64(y.data_ptr()), np.uint64(part.data_ptr() if part is not None else 0))
        conv = prepared(self._function(map_kernel_name(self.dtype, mcfg["pixels_per_lane"])), mcfg["grid"],
                        mcfg["block"], args, mcfg["shared_mem"], packed=packed)
        if part is None:
            return conv
        total = y.numel()
        epilogue = prepared(self._function(epilogue_kernel_name(self.dtype)), (min(4096, -(-total // 256)),), (256,),
                            (np.uint64(part.data_ptr()), np.int64(total), np.int32(s.out_height * s.out_width),
                             np.int32(self.out_channels), bias, act, np.uint64(y.data_ptr())), packed=packed)

        def run() -> None:
            part.zero_()  # the slices' partial sums meet here by atomicAdd
            conv()
            epilogue()
        run.part = part  # keeps the buffer alive with the callable
        return run

    def __call__(self, x, *, relu: bool = False):
        """y = act(conv2d(x) + bias): x a torch CUDA tensor [C, H, W] or [N, C, H, W] (N <= MAX_BATCH) of the
        weight's dtype on the operator's device; returns a new tensor [C_out, OH, OW] / [N, C_out, OH, OW]
        (computed on torch's current stream)."""
        import torch

        from . import _gpu

        cp = _gpu.cupy()
        xb = self._checked_input(x).contiguous()
        n, _, h, w = (int(d) for d in xb.shape)
        s = self.out_shape(h, w)
        y = torch.empty((n, self.out_channels, s.out_height, s.out_width), dtype=xb.dtype, device=xb.device)
        stream = cp.cuda.ExternalStream(torch.cuda.current_stream(self.device).cuda_stream, self.device)
        with cp.cuda.Device(self.device), stream:
            self.prepared_launch(xb, y, relu=relu, packed=False)()
        return y[0] if x.dim() == 3 else y

    def __repr__(self) -> str:
        return (f"BalancedConv2d({self.name!r}, [{self.out_channels}, {self.in_channels}, {self.kh}, {self.kw}], "
                f"stride {self.stride}, padding {self.padding}, {self.dtype}, device={self.device})")


__all__ = ["GATHER_PIXELS_PER_LANE", "KERNELS", "MAP_MAX_RUNS", "MAP_NAMED_RUNS", "BalancedConv2d", "ConvShape",
           "DTYPES", "gather_kernel_name", "gather_launch_config", "kernel_name", "kernel_variants", "launch_config",
           "map_kernel_name", "map_launch_config", "tap_values"]
