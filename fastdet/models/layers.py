"""Small building blocks shared by backbones, necks and heads: frozen batch norm, conv-norm-activation blocks, the
wrapper returning a network's intermediate layers (torchvision's module and state-dict names) and the weight
initialisations torchvision's SSD / SSDlite use."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["FrozenBatchNorm2d", "IntermediateLayers", "classifier_init", "conv_norm_activation", "normal_init",
           "xavier_init"]


class FrozenBatchNorm2d(nn.Module):
    """Batch normalisation with fixed statistics and affine parameters, all stored as buffers (never trained).

    Computes ``x * scale + shift`` with ``scale = weight * rsqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale``, the same sequence of float operations as torchvision's
    ``FrozenBatchNorm2d``, so results are bitwise identical. State dicts of ``nn.BatchNorm2d`` load too: their
    ``num_batches_tracked`` entry is ignored.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps})"


def conv_norm_activation(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                         groups: int = 1, norm_layer: Callable[[int], nn.Module] | None = None,
                         activation_layer: Callable[..., nn.Module] | None = nn.ReLU, dilation: int = 1,
                         bias: bool | None = None) -> nn.Sequential:
    """``Sequential(conv, [norm], [activation])`` laid out as torchvision's ``Conv2dNormActivation`` (so keys are
    ``<name>.0.weight``, ``<name>.1.*``): "same" padding ``(k - 1) // 2 * dilation``, a conv bias only without a norm
    layer (unless ``bias`` says otherwise), an in-place activation."""
    if bias is None:
        bias = norm_layer is None
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                                         (kernel_size - 1) // 2 * dilation, dilation=dilation, groups=groups,
                                         bias=bias)]
    if norm_layer is not None:
        layers.append(norm_layer(out_channels))
    if activation_layer is not None:
        layers.append(activation_layer(inplace=True))
    return nn.Sequential(*layers)


class IntermediateLayers(nn.ModuleDict):
    """Runs the direct children of ``model`` in registration order up to the last one named in ``return_layers`` and
    returns ``OrderedDict(new_name -> output)`` for those named (torchvision's ``IntermediateLayerGetter``). Children
    after the last returned one (pooling, ``fc``) are dropped, so state-dict keys are the model's own."""

    def __init__(self, model: nn.Module, return_layers: dict[str, str]):
        children = dict(model.named_children())
        missing = set(return_layers) - set(children)
        if missing:
            raise ValueError(f"return_layers names modules the model does not have: {sorted(missing)}")
        remaining = dict(return_layers)
        kept = OrderedDict()
        for name, module in children.items():
            kept[name] = module
            remaining.pop(name, None)
            if not remaining:
                break
        super().__init__(kept)
        self.return_layers = dict(return_layers)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def xavier_init(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.constant_(layer.bias, 0.0)


def normal_init(module: nn.Module, std: float = 0.03) -> None:
    """SSDlite's initialisation: every conv N(0, std), biases 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, mean=0.0, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def classifier_init(module: nn.Module, linear_init: Callable[[nn.Linear], None]) -> None:
    """torchvision's initialisation of its ImageNet classifiers (MobileNetV3, EfficientNet): convs Kaiming-normal
    (fan out) with zero bias, norm layers weight 1 and bias 0, and ``linear_init`` for the fully connected layers
    (the one part in which the architectures differ)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            linear_init(m)
