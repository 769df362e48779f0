"""balprune.vision: torchvision imports next to the installed torch (its fallback for a CPU torch beside a
CUDA torchvision tested on a stand-in package), and its model code runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from balprune.vision import torchvision

_FAKE_TORCHVISION = """
import torch

# Like torchvision's __init__ next to a CPU torch: it registers fake kernels for an operator whose schema
# its C++ extension should have declared, and fails when that extension did not load.
if not hasattr(torch.ops.torchvision, "nms"):
    raise RuntimeError({message!r})
__version__ = "fake"
"""


def _import_through_balprune(tmp_path, message: str) -> subprocess.CompletedProcess:
    """balprune.vision.torchvision() in a fresh interpreter that finds a fake torchvision package first."""
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(_FAKE_TORCHVISION.format(message=message))
    code = ("import torch; from balprune.vision import torchvision; tv = torchvision(); "
            "print(tv.__version__, tv.__file__); print(torch.ops.torchvision.nms.default._schema)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO / "src")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_missing_operator_failure_declares_the_schemas_and_imports_again(tmp_path):
    """The case balprune.vision exists for: the first import fails with "operator torchvision::nms does
    not exist"; torchvision() declares nms/qnms (schemas only) and the second import succeeds."""
    r = _import_through_balprune(tmp_path, "operator torchvision::nms does not exist")
    assert r.returncode == 0, r.stderr
    version, where = r.stdout.splitlines()[0].split(" ", 1)
    assert version == "fake" and where == str(tmp_path / "torchvision" / "__init__.py")
    assert "torchvision::nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor" in r.stdout


def test_any_other_import_failure_is_raised_unchanged(tmp_path):
    r = _import_through_balprune(tmp_path, "libtorch_cuda.so: cannot open shared object file")
    assert r.returncode == 1
    assert r.stderr.rstrip().splitlines()[-1] == "RuntimeError: libtorch_cuda.so: cannot open shared object file"


def test_vgg_definitions_and_transforms_work():
    tv = torchvision()
    vgg = tv.models.vgg
    model = vgg.VGG(vgg.make_layers([4, "M", 8, "M"]), num_classes=3, init_weights=False).eval()
    image = tv.transforms.functional.to_tensor(tv.transforms.functional.to_pil_image(torch.rand(3, 32, 32)))
    model.classifier = torch.nn.Linear(8 * 7 * 7, 3)  # VGG pools to 7x7; its default head wants 512 channels
    with torch.no_grad():
        assert model.features(image[None]).shape == (1, 8, 8, 8)
        assert model(image[None]).shape == (1, 3)


def test_compiled_operators_work_or_fail_with_torchvisions_own_error():
    """With the extension loaded (GPU installs) nms runs; without it (CPU torch next to the
    registry's CUDA torchvision, where balprune.vision declared the schemas) it fails loudly."""

    tv = torchvision()
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    scores = torch.tensor([0.9, 0.8])
    if tv.extension._has_ops():
        assert tv.ops.nms(boxes, scores, 0.5).tolist() == [0]
    else:
        with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):
            tv.ops.nms(boxes, scores, 0.5)
