"""Built-in models, built by name.

Flat models (the papers' experiments; they flatten their input *inside* the model, so an image batch
(B, C, H, W) and its flattened (B, C·H·W) give bit-identical outputs):

* ``logreg``  — multinomial logistic regression (a single linear layer).
* ``mlp``     — the papers' MLP, D-200-100-C (784-200-100-10 on (F)MNIST) with a selectable activation;
  the bayes-admm reference hard-codes sigmoid, which is our default too.
* ``linreg``  — linear regression with a single output (Gaussian likelihood).

Image models (input (B, C, H, W): Fashion-MNIST and MNIST as 1×28×28, digits as 1×8×8):

* ``cnn``      — the shape of Flower's quickstart network ``Net``: Conv2d(C, 6, 5) → ReLU → MaxPool 2 →
  Conv2d(6, 16, 5) → ReLU → MaxPool 2 → fc 120 → fc 84 → fc classes (ReLU between).  One change: the
  convolutions are padded by 2 ("same" padding).  Flower's unpadded 5×5 convolutions need at least 12×12 inputs
  (32 → 28 → 14 → 10 → 5 on CIFAR), so digits (8×8 → 4 → 4 → 0) would not fit; with padding every image of
  side ≥ 4 works with the same kernels, 28×28 gives 16·7·7 = 784 features into fc 120 and 8×8 gives 16·2·2 = 64.
* ``resnet20`` — ResNet-20 (He et al. 2016, the CIFAR version): a 3×3 convolution with 16 channels, then 3 stages
  of 3 basic blocks with 16, 32 and 64 channels (stride 2 at the start of stages 2 and 3), global average pooling
  and a linear layer.  Normalisation is GroupNorm with 2 groups (as the bayes-admm papers' ResNet-20:
  ``reference/algorithms-papers.md``) instead of BatchNorm: fedbayes federates parameters only, and BatchNorm's
  running statistics are state outside them (:func:`fedbayes.local.check_stateless` refuses such models).  A
  block that changes the width or the stride has a 1×1 convolution + GroupNorm shortcut (option B); the others
  add their input.  Convolutions have no bias (the GroupNorm after each has one).

Every built-in model carries ``input_shape`` (one example's shape) as an attribute; the batched clients use it for
their trial forward (:func:`fedbayes.batched.check_batchable`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["IMAGE_MODELS", "MODELS", "ResNet20", "build_model", "model_names"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}


def _logreg(in_features: int, num_outputs: int, **_: object) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_outputs))


def _mlp(
    in_features: int,
    num_outputs: int,
    hidden: Sequence[int] = (200, 100),
    activation: str = "sigmoid",
    **_: object,
) -> nn.Module:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation '{activation}'; valid: {sorted(_ACTIVATIONS)}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        if int(h) <= 0:
            raise ValueError(f"mlp hidden widths must be positive, got {list(hidden)}")
        layers += [nn.Linear(width, int(h)), _ACTIVATIONS[activation]()]
        width = int(h)
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def _linreg(in_features: int, num_outputs: int = 1, **_: object) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 1))


def _cnn(in_features: int, num_outputs: int, *, input_shape: tuple[int, ...], **_: object) -> nn.Module:
    c, h, w = input_shape
    flat = 16 * (h // 2 // 2) * (w // 2 // 2)
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_outputs),
    )  # fmt: skip


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(2, channels)


class _BasicBlock(nn.Module):
    """conv3×3 → GN → ReLU → conv3×3 → GN, plus the shortcut, → ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _norm(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 with GroupNorm(2, ·) for (B, C, H, W) images (see the module docstring)."""

    def __init__(self, in_channels: int, num_outputs: int, widths: Sequence[int] = (16, 32, 64), blocks: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.norm = _norm(widths[0])
        stages: list[nn.Module] = []
        c_in = widths[0]
        for i, c_out in enumerate(widths):
            stage = [_BasicBlock(c_in if j == 0 else c_out, c_out, 2 if (i > 0 and j == 0) else 1)
                     for j in range(blocks)]
            stages.append(nn.Sequential(*stage))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.norm(self.stem(x)))
        h = self.stages(h)
        return self.fc(h.mean(dim=(2, 3)))


def _resnet20(in_features: int, num_outputs: int, *, input_shape: tuple[int, ...], **_: object) -> nn.Module:
    return ResNet20(input_shape[0], num_outputs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "logreg": _logreg, "mlp": _mlp, "linreg": _linreg, "cnn": _cnn, "resnet20": _resnet20,
}
IMAGE_MODELS = frozenset({"cnn", "resnet20"})
"""Models that take images (B, C, H, W) and need ``input_shape = (C, H, W)``."""


def model_names() -> list[str]:
    return sorted(MODELS)


def build_model(
    name: str,
    in_features: int,
    num_outputs: int,
    seed: int = 0,
    *,
    input_shape: Sequence[int] | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build model ``name`` with a seeded initialisation.

    Parameters
    ----------
    name
        One of :func:`model_names`.
    in_features
        Features of one flattened example (the flat models' input width).
    num_outputs
        Classes (classification) or 1 (regression).
    seed
        Seed of the initialisation (the global torch generator is restored afterwards).
    input_shape
        One example's shape; the image models need it as (channels, height, width) with the product
        ``in_features``.  None: ``(in_features,)``.
    **kwargs
        Model options (``mlp``: ``hidden``, ``activation``).

    Raises
    ------
    ValueError
        Unknown name (the message lists the valid ones), bad sizes, or an image model without an image shape.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; valid: {model_names()}")
    if in_features <= 0 or num_outputs <= 0:
        raise ValueError(f"model sizes must be positive (in_features={in_features}, num_outputs={num_outputs})")
    shape = (int(in_features),) if input_shape is None else tuple(int(s) for s in input_shape)
    if math.prod(shape) != in_features:
        raise ValueError(f"input_shape {shape} does not hold in_features={in_features} values")
    if name in IMAGE_MODELS:
        if len(shape) != 3 or min(shape) <= 0 or min(shape[1:]) < 4:
            raise ValueError(
                f"model '{name}' takes images (channels, height, width) of side >= 4, got input shape {shape}; "
                "use it with an image dataset (fmnist, mnist, digits) or a flat model "
                f"({sorted(set(MODELS) - IMAGE_MODELS)})"
            )
        kwargs = {**kwargs, "input_shape": shape}
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = MODELS[name](in_features, num_outputs, **kwargs)
    finally:
        torch.random.set_rng_state(gen_state)
    setattr(model, "input_shape", shape)  # noqa: B010 (nn.Module's typed __setattr__ takes tensors/modules)
    return model
