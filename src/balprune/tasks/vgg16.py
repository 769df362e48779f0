"""`vgg16`: VGG-16 (torchvision's layer names) on an ImageFolder directory, metric top-1 accuracy.

--data DIR holds ``train/`` and ``val/`` (the ImageNet layout: one sub-folder per class, the same
classes in both). Training images get a random resized crop and a horizontal flip, evaluation
images a resize and a centre crop; both are normalised with the ImageNet statistics. Images are
decoded in-process (no loader workers) so every step's batch and augmentation follow the run's
seed, which resume relies on.

``width`` scales every conv's channels and ``classifier_hidden`` the two hidden fully connected
layers, with ``image_size`` the input side: ``width = 1, image_size = 224, classifier_hidden = 4096``
is torchvision's ``vgg16`` exactly (138M parameters); small values make CPU tests take seconds.
Parameter names are torchvision's (``features.N.weight``, ``classifier.{0,3,6}.weight``), so
the recipes of ``balprune prune`` (configs/vgg16-balanced.toml) apply unchanged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from .. import safeio
from ..errors import InvalidInputError
from ..vision import torchvision
from .base import Option, Task, TaskSpec, evaluation_batches

_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_vgg16(num_classes: int, width: float, classifier_hidden: int, image_size: int) -> nn.Module:
    vgg = torchvision().models.vgg
    VGG, cfgs, make_layers = vgg.VGG, vgg.cfgs, vgg.make_layers

    if width == 1.0 and classifier_hidden == 4096 and image_size == 224:
        return vgg.vgg16(weights=None, num_classes=num_classes)
    cfg = [c if c == "M" else max(1, round(c * width)) for c in cfgs["D"]]
    model = VGG(make_layers(cfg), num_classes=num_classes)
    pool = max(1, min(7, image_size // 32))
    last = cfg[-2]
    model.avgpool = nn.AdaptiveAvgPool2d(pool)
    model.classifier = nn.Sequential(
        nn.Linear(last * pool * pool, classifier_hidden), nn.ReLU(True), nn.Dropout(),
        nn.Linear(classifier_hidden, classifier_hidden), nn.ReLU(True), nn.Dropout(),
        nn.Linear(classifier_hidden, num_classes),
    )
    for m in model.classifier:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


def _load_image(path: str):
    """An RGB PIL image from a regular file (a FIFO or device named like an image is refused, exit 4;
    so is an image PIL refuses as a decompression bomb)."""
    from PIL import Image

    with safeio.open_regular(path, "--data image") as f:
        try:
            return Image.open(f).convert("RGB")
        except Image.DecompressionBombError as exc:
            raise InvalidInputError(f"--data image {path}: {exc}") from None


class Vgg16Task(Task):
    name = "vgg16"
    metric = "accuracy"
    higher_is_better = True
    splits = ("val",)

    def __init__(self, options: dict, data: Path) -> None:
        tv = torchvision()
        datasets, transforms = tv.datasets, tv.transforms

        self.o = options
        root = Path(data)
        for sub in ("train", "val"):
            if not (root / sub).is_dir():
                raise InvalidInputError(f"--data {root}: no {sub}/ folder",
                                        hint="vgg16 reads an ImageFolder with train/ and val/ (one sub-folder per class)")
        size = options["image_size"]
        norm = transforms.Normalize(_MEAN, _STD)
        train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                       transforms.ToTensor(), norm])
        eval_tf = transforms.Compose([transforms.Resize(max(size, round(size * 256 / 224))), transforms.CenterCrop(size),
                                      transforms.ToTensor(), norm])
        try:
            self.train = datasets.ImageFolder(str(root / "train"), transform=train_tf, loader=_load_image)
            self.val = datasets.ImageFolder(str(root / "val"), transform=eval_tf, loader=_load_image)
        except (FileNotFoundError, OSError) as exc:
            raise InvalidInputError(f"--data {root}: {exc}") from None
        if self.train.classes != self.val.classes:
            raise InvalidInputError(f"--data {root}: train/ and val/ hold different classes")
        if len(self.train.classes) < 2:
            raise InvalidInputError(f"--data {root}: at least two classes are needed")
        limit = options["max_eval_images"]
        self.val_indices = list(range(len(self.val) if not limit else min(limit, len(self.val))))
        h = hashlib.sha256()
        for path, label in self.train.samples + self.val.samples:
            h.update(f"{Path(path).relative_to(root).as_posix()}\0{label}\n".encode())
        self.digest = h.hexdigest()[:16]
        self.root = root

    def _load(self, dataset, indices):
        try:
            items = [dataset[i] for i in indices]
        except OSError as exc:  # a damaged or unreadable image
            raise InvalidInputError(f"--data {self.root}: cannot read an image: {exc}") from None
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])

    def build_model(self) -> nn.Module:
        return build_vgg16(len(self.train.classes), self.o["width"], self.o["classifier_hidden"], self.o["image_size"])

    def batch(self, generator, batch_size):
        idx = torch.randint(0, len(self.train), (batch_size,), generator=generator).tolist()
        return self._load(self.train, idx)

    def loss(self, model, batch, device):
        x, y = batch
        return nn.functional.cross_entropy(model(x.to(device)), y.to(device))

    @torch.no_grad()
    def evaluate(self, model, split, device):
        was_training = model.training
        model.eval()
        top1 = top5 = loss = 0.0
        n = len(self.val_indices)
        k = min(5, len(self.val.classes))
        for a, b in evaluation_batches(n, self.o["eval_batch_size"]):
            x, y = self._load(self.val, self.val_indices[a:b])
            logits = model(x.to(device)).cpu()
            loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            best = logits.topk(k, dim=-1).indices
            top1 += (best[:, 0] == y).sum().item()
            top5 += (best == y[:, None]).any(-1).sum().item()
        model.train(was_training)
        return {"accuracy": top1 / n, "top5": top5 / n, "loss": loss / n}

    def describe(self) -> dict:
        return {"data": f"ImageFolder {self.root}", "digest": self.digest, "classes": len(self.train.classes),
                "train_images": len(self.train), "val_images": len(self.val_indices),
                **{k: self.o[k] for k in ("width", "image_size", "classifier_hidden")}}

    def data_id(self) -> str:
        return self.digest


#: torchvision's VGG-16 convolutions ("D"): output channels, "M" for a max-pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _model_params(o: dict, num_classes: int = 1000) -> int:
    """Parameters of ``build_vgg16`` for these options (the classes, set by the data, counted as 1000)."""
    total, cin = 0, 3
    for c in _VGG16_CFG:
        if c != "M":
            cout = max(1, round(c * o["width"]))
            total += 9 * cin * cout + cout
            cin = cout
    pool = max(1, min(7, o["image_size"] // 32))
    h = o["classifier_hidden"]
    return total + cin * pool * pool * h + h + h * h + h + h * num_classes + num_classes


def _factory(options: dict, data: Path | None) -> Task:
    assert data is not None  # the runner enforces data="required"
    return Vgg16Task(options, data)


SPEC = TaskSpec(
    name="vgg16",
    description="VGG-16 (torchvision layer names) on an ImageFolder with train/ and val/ from --data",
    options={
        "width": Option(1.0, 0.001, "channel multiplier of the convolutions (1 = VGG-16)", maximum=64.0),
        "image_size": Option(224, 8, "input side in pixels", maximum=4096),
        "classifier_hidden": Option(4096, 1, "width of the two hidden fully connected layers", maximum=1 << 17),
        "eval_batch_size": Option(32, 1, "images per evaluation batch", maximum=1 << 16),
        "max_eval_images": Option(0, 0, "evaluate on the first N val images only (0: all)", maximum=1 << 40),
    },
    data="required",
    data_help="an ImageFolder with train/ and val/ sub-folders (ImageNet layout)",
    factory=_factory,
    model_params=_model_params,
    # the images (float32) and the first conv's output, which backward keeps
    batch_bytes=lambda o, b: b * 3 * o["image_size"] ** 2 * 4 + b * max(1, round(64 * o["width"])) * o["image_size"] ** 2 * 4,
)
