"""What every packed-model runtime shares: the dtype and device, the dispatch record, one forward
on static buffers (``run``), and its CUDA graph."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...errors import UsageError
from .._linear import TORCH_OF
from ..measure import capture_graph, cupy_on_torch_stream
from .stages import Choice, CupyViews, ModelKernels, Projection, dispatch, ptr

Progress = Callable[[str], None]


class PackedModel:
    """Base of the model runtimes. A subclass builds its buffers and Projections in ``__init__``
    (calling ``_dispatch`` on each with sample data in its input buffer), and implements:

    - ``load_inputs(inputs)``: copy one request (the dict of models.reference.sample_inputs) into
      the static input buffers and reset any state;
    - ``run()``: one unit of work on the static buffers, on torch's current stream, with no host
      synchronisation and no allocation by balprune (so it can be captured in a CUDA graph):
      lstm-lm one token step, ctc-bilstm one utterance, vgg one image;
    - ``forward(inputs) -> torch.Tensor``: the whole request as models.reference.reference_outputs
      computes it (float32, on the CPU), for correctness checks.
    """

    unit = "forward"  # what one run() is, for reports

    def __init__(self, arch, *, dtype: str, device: int, paths: str, measure: bool, progress: Progress | None) -> None:
        from .. import _gpu

        if dtype not in TORCH_OF:
            raise UsageError(f"dtype must be one of {', '.join(TORCH_OF)}, got {dtype!r}")
        if paths not in ("auto", "sparse", "dense"):
            raise UsageError(f"paths must be 'auto', 'sparse' or 'dense', got {paths!r}")
        self.device = _gpu.require_device(device)
        torch.cuda.set_device(self.device)
        self.arch, self.dtype, self.paths, self.measure = arch, dtype, paths, measure
        self.tdt = TORCH_OF[dtype]
        self.dev = torch.device("cuda", self.device)
        self.kernels = ModelKernels(dtype, self.device)
        self.views = CupyViews()
        self.choices: list[Choice] = []
        self._progress = progress
        self._held: list[torch.Tensor] = []  # every buffer a bound launch holds a raw pointer to
        self._gen = torch.Generator(device=self.dev).manual_seed(0)

    # -- building ---------------------------------------------------------------------------------

    def _random_(self, t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Fill ``t`` with N(0, scale^2) sample data (dispatch inputs), in place."""
        t.copy_(torch.randn(t.shape, generator=self._gen, device=self.dev) * scale)
        return t

    def _ptr(self, t: torch.Tensor | None, offset_elems: int = 0):
        """``stages.ptr`` for a bound launch, keeping ``t`` alive as long as the model: a raw pointer
        does not own its memory, and a freed buffer is soon another tensor's."""
        if t is not None:
            self._held.append(t)
        return ptr(t, offset_elems)

    def _projection(self, name: str, dense: torch.Tensor, x: torch.Tensor, y: torch.Tensor, packed, *,
                    bias=None, relu: bool = False, pattern: str | None = None, sparse=None,
                    overlap: bool = False) -> Projection:
        """A Projection of ``dense`` on buffers x -> y whose sparse paths are balprune's kernels for
        ``packed`` (sparse_operator and sparse_alternatives), or ``sparse``, a prebuilt (path, operator),
        when given. ``overlap``: its sparse launches are programmatic dependent launches (Projection)."""
        from .stages import sparse_alternatives, sparse_operator

        alternatives, unavailable = [], {}
        if sparse is not None:
            reason = ""
        else:
            path, op = sparse_operator(packed, self.dtype, self.device, name)
            sparse, reason = ((path, op), "") if path is not None else (None, op)
            if self.paths != "dense":  # a forced-dense runtime times nothing else
                alternatives, unavailable = sparse_alternatives(packed, self.dtype, self.device, name)
        return Projection(name, dense.to(self.dev, self.tdt).contiguous(), x, y, dtype=self.dtype,
                          kernels=self.kernels, views=self.views, sparse=sparse, sparse_reason=reason,
                          alternatives=alternatives, unavailable=unavailable,
                          pattern=pattern or getattr(packed, "pattern", "dense"), bias=bias, relu=relu,
                          overlap=overlap)

    def _dispatch(self, stage, *, settle: bool = False) -> Choice:
        """Gate, time and bind ``stage`` (stages.dispatch) and record the choice. ``settle``: the stage is
        only ever launched from now on, so what its bound path does not read is released
        (``stage.release_unbound()``: a VGG / ResNet layer; not an LSTM's projections, whose recurrence
        asks them for their candidates later)."""
        if self._progress:
            self._progress(f"dispatching {stage.name}")
        choice = dispatch(stage, self.paths, self.measure)
        self.choices.append(choice)
        if settle:
            stage.release_unbound()
        return choice

    # -- running ----------------------------------------------------------------------------------

    @staticmethod
    def _launch_all(launches) -> None:
        with cupy_on_torch_stream():
            for f in launches:
                f()

    def run(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights the bound paths read per run (each matrix once)."""
        return sum(c.bytes[c.path] for c in self.choices)

    def capture(self) -> torch.cuda.CUDAGraph:
        """A CUDA graph of one ``run()`` (replay it after ``load_inputs``; state advances per replay)."""
        return capture_graph(self.run, warmup=2)

    def describe(self) -> list[dict]:
        return [c.to_dict() for c in self.choices]


#: How a vision runtime holds its activations between conv stages: "NCHW" (a [C, H, W] tensor, contiguous)
#: or "channels-last" (the same [C, H, W] tensor over H x W x C storage: cuDNN's NHWC, which its tensor-core
#: convolutions run natively; in NCHW they transpose around the conv, or the runtime did, per stage).
ACTIVATION_LAYOUTS = ("NCHW", "channels-last")


def activation_layout(dtype: str, activations: str) -> str:
    """The activation layout a vision runtime of ``dtype`` uses for ``activations`` ("auto" or one of
    ACTIVATION_LAYOUTS; UsageError for another). auto: channels-last for float16 / bfloat16 (cuDNN's fused
    conv + bias + ReLU (+ add) all channels-last was 1.5-2.6x faster than the runtime's best NCHW stage on
    every ResNet-50 shape in fp16: BENCHMARKS.md, cudnn_fused_probe.py), NCHW for float32 (IEEE float32
    convs, no tensor cores: the layout the runtime was measured in)."""
    if activations == "auto":
        return "NCHW" if dtype == "float32" else "channels-last"
    if activations not in ACTIVATION_LAYOUTS:
        raise UsageError(f"activations must be 'auto' or one of {', '.join(ACTIVATION_LAYOUTS)}, got {activations!r}")
    return activations


def activation_buffer(shape, layout: str, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised [C, H, W] activation buffer stored in ``layout`` (one of ACTIVATION_LAYOUTS)."""
    c, h, w = (int(d) for d in shape)
    if layout == "channels-last":
        return torch.empty(h, w, c, dtype=dtype, device=device).permute(2, 0, 1)
    return torch.empty(c, h, w, dtype=dtype, device=device)


def batch_view(t: torch.Tensor) -> torch.Tensor:
    """The [C, H, W] activation ``t`` as a batch of one, [1, C, H, W], with the batch stride of a real batch
    (C*H*W). ``t[None]`` gives a channels-last tensor a batch stride of C, which torch's memory-format
    suggestion does not take for channels-last: cuDNN (conv, its fused ops) and max_pool2d would then run NCHW
    around transposes, and a 1x1 conv's weight cannot say otherwise (its NCHW and channels-last strides agree)."""
    return t.as_strided((1, *t.shape), (t.numel(), *t.stride()))


def layout_of(t: torch.Tensor) -> str | None:
    """Which of ACTIVATION_LAYOUTS the [C, H, W] tensor ``t`` is stored in ("NCHW" where both hold, as for
    a 1x1 map), or None for any other striding."""
    if t.dim() != 3:
        return None
    if t.is_contiguous():
        return "NCHW"
    return "channels-last" if t.permute(1, 2, 0).is_contiguous() else None


class PackedImageModel(PackedModel):
    """Base of the vision runtimes (vgg.py, resnet.py): one arch.image_size square image per ``run()`` in
    the static buffer ``image`` (NCHW; sample data until ``load_inputs``); the subclass ends each run in
    ``fc_out[-1]`` (the class scores). ``activations`` ("auto" or one of ACTIVATION_LAYOUTS) is the layout
    of the buffers between its conv stages (``self.activations``, resolved by activation_layout)."""

    unit = "image"

    def __init__(self, arch, *, activations: str = "auto", **kw) -> None:
        self.activations = activation_layout(kw["dtype"], activations)
        super().__init__(arch, **kw)
        S = arch.image_size
        self.image = self._random_(torch.empty(3, S, S, dtype=self.tdt, device=self.dev))
        self.fc_out: list[torch.Tensor] = []

    def load_inputs(self, inputs: dict) -> None:
        img = check_image(inputs["image"], self.arch.image_size)
        self.image.copy_(img.to(self.dev, self.tdt))

    def forward(self, inputs: dict) -> torch.Tensor:
        """[classes] float32 on the CPU."""
        self.load_inputs(inputs)
        self.run()
        return self.fc_out[-1].float().cpu()


def check_image(image, size: int) -> torch.Tensor:
    """An image as a float tensor [3, size, size]; UsageError (one line) for another shape, a
    non-float dtype or non-finite values."""
    return check_float_request(image, (3, size, size), "image", f"{size}x{size}")


def check_float_request(value, shape: tuple[int, ...], what: str, built_for: str) -> torch.Tensor:
    """``value`` as a float tensor of ``shape``; UsageError (one line) for another shape (the
    runtime is built for ``built_for``), a non-float dtype or non-finite values."""
    t = torch.as_tensor(value)
    if tuple(t.shape) != tuple(shape):
        raise UsageError(f"{what} must be [{', '.join(map(str, shape))}] (the runtime is built for {built_for}), "
                         f"got {list(t.shape)}")
    if not t.dtype.is_floating_point:
        raise UsageError(f"{what} must be floating point, got dtype {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise UsageError(f"{what}: NaN or infinite values")
    return t


def load_packed(pf, name: str):
    """The packed object of state-dict tensor ``name`` (following a tied-weight alias to its entry)."""
    from ...models.arch import stored_name

    return pf.load(stored_name(pf, name))


def load_dense(pf, name: str) -> torch.Tensor:
    """The dense (masked) tensor of state-dict tensor ``name`` (following a tied-weight alias)."""
    from ...models.arch import stored_name

    return pf.dense(stored_name(pf, name))
