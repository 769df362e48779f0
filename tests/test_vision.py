"""balprune.vision: torchvision imports next to the installed torch, and its model code runs."""

from __future__ import annotations

import pytest
import torch

from balprune.vision import torchvision


def test_torchvision_is_the_release_paired_with_torch():
    """torch 2.N ships with torchvision 0.(N+15); any other pair fails in ways unrelated to us."""
    tv = torchvision()
    torch_minor = int(torch.__version__.split(".")[1])
    major, minor = (int(p) for p in tv.__version__.split("+")[0].split(".")[:2])
    assert (major, minor) == (0, torch_minor + 15), (torch.__version__, tv.__version__)


def test_vgg_definitions_and_transforms_work():
    tv = torchvision()
    vgg = tv.models.vgg
    model = vgg.VGG(vgg.make_layers([4, "M", 8, "M"]), num_classes=3, init_weights=False).eval()
    image = tv.transforms.functional.to_tensor(tv.transforms.functional.to_pil_image(torch.rand(3, 32, 32)))
    model.classifier = torch.nn.Linear(8 * 7 * 7, 3)  # VGG pools to 7x7; its default head wants 512 channels
    with torch.no_grad():
        assert model.features(image[None]).shape == (1, 8, 8, 8)
        assert model(image[None]).shape == (1, 3)


def test_second_call_returns_the_same_module():
    assert torchvision() is torchvision()


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
