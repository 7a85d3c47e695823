"""2-D PSPNet with a dilated ResNet backbone and an initializer for multi-channel inputs (CTP paper).

The backbone repeats torchvision's ResNet layout (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1``..``layer4``
of ``BasicBlock``/``Bottleneck``) with the same parameter names, so a torchvision ResNet state dict loads into
``PSPNet.backbone`` unchanged (its ``fc.*`` classifier is ignored). For output stride 8, ``layer3`` and
``layer4`` keep their resolution and dilate their convolutions by 2 and 4 instead (torchvision's
``replace_stride_with_dilation``, which torchvision itself refuses for ``BasicBlock``; the tensors are the same).

Shapes: input (B, C, X, Y) -> logits (B, K, X, Y); X and Y need not be multiples of the output stride (the
logits are upsampled bilinearly to the input size).

Example:
    >>> net = PSPNet(in_channels=5, num_classes=1, backbone="resnet18")
    >>> report = net.load_pretrained("resnet18-f37072fd.pth")  # torchvision weights, fc ignored
    >>> net(torch.zeros(2, 5, 64, 64)).shape
    torch.Size([2, 1, 64, 64])
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.errors import InvalidFileError
from autoseg.io.checkpoints import load_checkpoint
from autoseg.networks.cost import CountsItsCost, parameter_count

#: torchvision's ResNets: block type and blocks per layer.
RESNET_LAYOUTS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
#: How to plan for a backbone other than the plan's, said when a ``--pretrained`` file holds another one.
_PLAN_FOR_BACKBONE = (
    "set network.backbone of the configuration in plans.json to '{theirs}' (the CPUPlanner, autoseg_plan -pl "
    "CPUPlanner, plans resnet18; the DefaultPlanner the largest that fits the memory budget), or make a {ours} "
    "file: autoseg_pretrain --backbone {ours}"
)
#: Dilation of (layer3, layer4) per output stride.
_DILATIONS = {8: (2, 4), 16: (1, 2), 32: (1, 1)}


class _ResNetBlock(nn.Module):
    """What :class:`BasicBlock` and :class:`Bottleneck` share: how they count their stored activations."""

    def stored_activations(self, pixels: float) -> float:
        """Elements one sample leaves stored for backward, modelled as three tensors (output, normalized output,
        activation) per convolution of the main path: ``3 x (their output channels) x pixels``, ``pixels`` being
        the block's output resolution (X x Y / stride**2). The projection shortcut is counted by the backbone."""
        convs = [module for name, module in self.named_children() if name.startswith("conv")]
        return 3 * sum(conv.out_channels for conv in convs) * pixels


class BasicBlock(_ResNetBlock):
    """torchvision's ``BasicBlock`` (two 3x3 convolutions), with dilation allowed."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, *, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(_ResNetBlock):
    """torchvision's ``Bottleneck`` (1x1, 3x3 with the stride, 1x1 expanding by 4)."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, *, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNetBackbone(nn.Module):
    """torchvision-layout ResNet without ``avgpool``/``fc``: (B, 3, X, Y) -> (layer3, layer4) features.

    Args:
        name: ``resnet18``, ``resnet34`` or ``resnet50``.
        output_stride: 8 (layer3 and layer4 dilated by 2 and 4), 16 or 32.
    """

    def __init__(self, name: str = "resnet50", *, output_stride: int = 8) -> None:
        super().__init__()
        if name not in RESNET_LAYOUTS:
            raise ValueError(f"unknown backbone '{name}'; use one of {sorted(RESNET_LAYOUTS)}")
        if output_stride not in _DILATIONS:
            raise ValueError(f"output_stride must be one of {sorted(_DILATIONS)}, got {output_stride}")
        kind, depths = RESNET_LAYOUTS[name]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.name = name
        self.inplanes, self.dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        dilate3, dilate4 = _DILATIONS[output_stride]
        self.layer1 = self._make_layer(block, 64, depths[0], stride=1, dilation=1)
        self.layer2 = self._make_layer(block, 128, depths[1], stride=2, dilation=1)
        self.layer3 = self._make_layer(block, 256, depths[2], stride=2, dilation=dilate3)
        self.layer4 = self._make_layer(block, 512, depths[3], stride=2, dilation=dilate4)
        self.layer3_channels = 256 * block.expansion
        self.out_channels = 512 * block.expansion

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, *, stride: int, dilation: int
    ) -> nn.Sequential:
        """As torchvision: a dilated layer replaces its stride by dilation; its first block keeps the previous
        dilation; the shortcut is projected when resolution or width change."""
        previous = self.dilation
        if dilation > 1:
            stride, self.dilation = 1, dilation
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride=stride, dilation=previous, downsample=downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x, self.layer4(x)

    def stored_activations(self, pixels: float) -> float:
        """Elements one sample of ``pixels`` (X x Y of the input) leaves stored for backward, as modelled by
        :meth:`PSPNet.stored_activations`: the stem's conv (three tensors at 1/2 of each axis) and max-pooling's
        output (at 1/4), each layer's blocks at the layer's resolution, and one projection shortcut per layer
        (three tensors of the layer's output width). That last term also charges ``layer1`` of the basic ResNets,
        which has no projection (see :meth:`PSPNet.stored_activations`)."""
        reduction = self.conv1.stride[0]
        count = 3 * self.conv1.out_channels * pixels / reduction**2
        reduction *= self.maxpool.stride
        count += self.conv1.out_channels * pixels / reduction**2
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            first = layer[0]
            reduction *= first.downsample[0].stride[0] if first.downsample is not None else 1
            scale = pixels / reduction**2
            count += sum(block.stored_activations(scale) for block in layer)
            count += 3 * first.conv1.out_channels * first.expansion * scale
        return count


class PyramidPooling(nn.Module):
    """Average-pool the features to each ``bins`` x ``bins`` grid, 1x1 conv + BN + ReLU to
    ``channels / len(bins)``, upsample bilinearly and concatenate with the features: (B, F, h, w) -> (B, 2F, h, w).

    The 1x1 branch's BatchNorm sees one value per channel and sample, so training needs batches of 2 or more.
    """

    def __init__(self, channels: int, bins: Sequence[int]) -> None:
        super().__init__()
        reduced = channels // len(bins)
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b),
                nn.Conv2d(channels, reduced, 1, bias=False),
                nn.BatchNorm2d(reduced),
                nn.ReLU(inplace=True),
            )
            for b in bins
        )
        self.out_channels = channels + reduced * len(bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return torch.cat(
            [x] + [F.interpolate(branch(x), size, mode="bilinear", align_corners=False) for branch in self.branches],
            dim=1,
        )

    def stored_activations(self, pixels: float) -> float:
        """Elements one sample of ``pixels`` (h x w of the features) leaves stored for backward, modelled as two
        tensors each for the concatenation (2F channels) and the branches' upsampled outputs (F channels)."""
        reduced = sum(branch[1].out_channels for branch in self.branches)
        return (self.out_channels + reduced) * pixels * 2


def _head(in_channels: int, mid_channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(mid_channels),
        nn.ReLU(inplace=True),
        nn.Dropout2d(dropout),
        nn.Conv2d(mid_channels, num_classes, 1),
    )


def backbone_of(state: Mapping[str, object]) -> str | None:
    """The ResNet of :data:`RESNET_LAYOUTS` whose layout the names of ``state`` (a torchvision-layout ResNet state
    dict) follow: bottleneck blocks (``conv3``) or basic ones, and the number of blocks in ``layer1``..``layer4``;
    None when the names follow none of them (or hold no ``layerN`` at all).

    Example:
        >>> backbone_of(ResNetBackbone("resnet18").state_dict())
        'resnet18'
    """
    kind = "bottleneck" if any(name.endswith(".conv3.weight") for name in state) else "basic"
    depths = tuple(
        len({name.split(".")[1] for name in state if name.startswith(f"layer{layer}.")}) for layer in range(1, 5)
    )
    return next((name for name, layout in RESNET_LAYOUTS.items() if layout == (kind, depths)), None)


@dataclass
class PretrainedReport:
    """What :meth:`PSPNet.load_pretrained` did.

    Attributes:
        path: the weights file.
        layout: ``torchvision`` (a ResNet state dict, loaded into the backbone) or ``autoseg`` (a whole PSPNet).
        loaded: names (in the file) of the tensors copied.
        missing: names (in the target module) the file did not provide; they keep their current values.
        unexpected: names in the file with no tensor in the target module (not loaded).
        ignored: names skipped on purpose (torchvision's ``fc.*`` classifier).
    """

    path: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        target = "backbone" if self.layout == "torchvision" else "network"
        lines = [
            f"pre-trained weights {self.path} ({self.layout} layout): {len(self.loaded)} tensors loaded into "
            f"the {target}" + (f", {len(self.ignored)} classifier tensors ignored" if self.ignored else "")
        ]
        for what, names in (
            ("missing (kept as initialised)", self.missing),
            ("unexpected (not loaded)", self.unexpected),
        ):
            if names:
                lines.append(f"  {len(names)} {what}: " + ", ".join(names[:8]) + (", ..." if len(names) > 8 else ""))
        return "\n".join(lines)


class PSPNet(CountsItsCost, nn.Module):
    """Initializer (BatchNorm + learned 1x1 conv C -> 3), dilated ResNet, pyramid pooling, segmentation head.

    Args:
        in_channels: C, input channels (e.g. 5 CT perfusion maps).
        num_classes: K, output channels (one sigmoid logit per foreground label).
        backbone: ``resnet18``, ``resnet34`` or ``resnet50``. Default ``resnet50``.
        pyramid_bins: grid sizes of the pyramid pooling module. Default (1, 2, 3, 6).
        output_stride: resolution of the backbone's last features relative to the input: 8 (default), 16 or 32.
        aux_head: add an auxiliary head on ``layer3``; in training mode ``forward`` then returns (main, aux)
            logits, both (B, K, X, Y). Default False.
        dropout: dropout probability of the heads. Default 0.1 (PSPNet).

    Raises:
        ValueError: unknown backbone, unsupported output stride, or no pyramid bins.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        backbone: str = "resnet50",
        pyramid_bins: Sequence[int] = (1, 2, 3, 6),
        output_stride: int = 8,
        aux_head: bool = False,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if not pyramid_bins or any(int(b) < 1 for b in pyramid_bins):
            raise ValueError(f"pyramid_bins must be positive grid sizes, got {list(pyramid_bins)}")
        self.in_channels, self.num_classes, self.output_stride = in_channels, num_classes, output_stride
        self.initializer = nn.Sequential(nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, 3, 1))
        self.backbone = ResNetBackbone(backbone, output_stride=output_stride)
        self.pyramid = PyramidPooling(self.backbone.out_channels, [int(b) for b in pyramid_bins])
        self.head = _head(self.pyramid.out_channels, 512, num_classes, dropout)
        self.aux_head = _head(self.backbone.layer3_channels, 256, num_classes, dropout) if aux_head else None
        self.backbone_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        size = x.shape[-2:]
        middle, features = self.backbone(self.initializer(x))
        logits = F.interpolate(self.head(self.pyramid(features)), size, mode="bilinear", align_corners=False)
        if self.aux_head is not None and self.training:
            aux = F.interpolate(self.aux_head(middle), size, mode="bilinear", align_corners=False)
            return logits, aux
        return logits

    # ------------------------------------------------------------------ its own cost, for the planner
    def stored_activations(self, input_size: Sequence[int]) -> float:
        """Elements (not bytes) one training sample of spatial size ``input_size`` (X, Y) leaves stored for
        backward, as a model rather than a count of autograd's saved tensors: three tensors per convolution (its
        output, the normalized output and the activation) of the initializer (its C input and 3 output channels) and
        of the backbone (:meth:`ResNetBackbone.stored_activations`), the pyramid pooling
        (:meth:`PyramidPooling.stored_activations`) and the head's 3x3 conv (four tensors, with the dropout) at
        the output stride, and two tensors of upsampled logits. Resolutions are ``X x Y / stride**2``, fractional
        where the stride does not divide the patch. The auxiliary head is left out.

        The model over-counts somewhat (e.g. a projection shortcut for ``layer1`` of resnet18/34, which has
        none); it is kept as it was when it lived apart from the network, so plans do not change.
        """
        pixels = float(math.prod(input_size))
        count = 3 * pixels * (self.in_channels + self.initializer[1].out_channels)
        count += self.backbone.stored_activations(pixels)
        features = pixels / self.output_stride**2
        count += self.pyramid.stored_activations(features)
        return count + 4 * self.head[0].out_channels * features + 2 * self.num_classes * pixels

    def counted_parameters(self) -> int:
        """Parameters the memory estimate charges: the backbone's and the weights of the pyramid's and the head's
        convolutions. The initializer, the BatchNorms and the last bias outside the backbone, and the auxiliary
        head are left out (about 0.01% of the parameters; kept so plans do not change)."""
        convs = [branch[1] for branch in self.pyramid.branches] + [self.head[0], self.head[4]]
        return parameter_count(self.backbone) + sum(conv.weight.numel() for conv in convs)

    # ------------------------------------------------------------------ fine-tuning
    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The ResNet's parameters (the pre-trained ones)."""
        return self.backbone.parameters()

    def new_layer_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter outside the backbone: initializer, pyramid pooling, head(s)."""
        return (p for name, p in self.named_parameters() if not name.startswith("backbone."))

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Stop (or resume) training the backbone: no gradients for its parameters, and its BatchNorm layers stay
        in eval mode, even under ``train()``, so their running statistics do not move."""
        self.backbone_frozen = frozen
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> PSPNet:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    # ------------------------------------------------------------------ weights
    def load_pretrained(self, path: str | Path) -> PretrainedReport:
        """Load a torchvision-layout ResNet state dict into the backbone, or an autoseg PSPNet state dict (or an
        autoseg checkpoint, whose ``network`` entry is one) into the whole network.

        Only tensors are read (``torch.load(..., weights_only=True)``); tensors the file lacks keep their values.

        Returns:
            A :class:`PretrainedReport` (``str()`` of it is a readable summary).

        Raises:
            InvalidFileError (a ValueError): the file holds pickled objects other than tensors, is not a state dict,
                holds another ResNet than this network's backbone (the message says which, and how to plan for
                it), matches no tensor of the network, or has a tensor whose shape differs from the network's
                (named).
        """
        path = Path(path)
        state = load_checkpoint(path)  # weights_only=True; pickled payloads are refused with the file's name
        if isinstance(state, dict) and isinstance(state.get("network"), dict):
            state = state["network"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InvalidFileError(f"{path}: not a state dict (a mapping of names to tensors)")
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
        if any(k.startswith("backbone.") for k in state):
            report, target = PretrainedReport(str(path), "autoseg"), self
            backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        else:
            report, target = PretrainedReport(str(path), "torchvision"), self.backbone
            report.ignored = sorted(k for k in state if k.startswith("fc."))
            state = backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
        theirs, ours = backbone_of(backbone), self.backbone.name
        if theirs is not None and theirs != ours:
            raise InvalidFileError(
                f"{path}: holds a {theirs} backbone ({report.layout} layout), this PSPNet's is {ours}: "
                + _PLAN_FOR_BACKBONE.format(theirs=theirs, ours=ours)
            )
        own = target.state_dict()
        for name, tensor in state.items():
            if name in own and own[name].shape != tensor.shape:
                raise InvalidFileError(
                    f"{path}: tensor '{name}' has shape {list(tensor.shape)}, the {report.layout} "
                    f"target expects {list(own[name].shape)} (another backbone or class count?)"
                )
        report.loaded = sorted(k for k in state if k in own)
        report.unexpected = sorted(k for k in state if k not in own)
        report.missing = sorted(k for k in own if k not in state)
        if not report.loaded:
            raise InvalidFileError(
                f"{path}: no tensor matches the network ({len(state)} in the file, e.g. "
                f"{sorted(state)[:3]}); expected torchvision ResNet names such as 'conv1.weight'"
            )
        with torch.no_grad():
            for name in report.loaded:
                own[name].copy_(state[name])
        return report
