"""Seconds per training iteration and achieved convolution throughput of autoseg's CPU step, by variant, against a
plain convolution and a rebuilt nnU-Net network at the same patch, batch and features (documentation/benchmarks.md,
"A faster CPU step").

For each planned configuration (``--plans PLANS.json [-c NAME]``, the network built from the plans) or a network
given by its numbers (``--features 32 64 128 256 320 --patch 80 96 80 --batch 2``: 3x3x3 kernels, stride 2), every
variant's training step (forward with the plans' loss, backward, gradient clipping and an SGD step) is timed in
interleaved rounds in this one process (variant A, B, C, A, B, C, ...; one untimed warm-up each), the fastest round
of each kept, so all variants see the same load. Beside each, the step probe's plain convolution
(``autoseg.plan.step_probe.PLAIN_CONVOLUTION``, forward + backward) in the variant's precision and memory format,
in the same rounds. Reported per variant: seconds per step and its parts (forward + loss, backward, optimizer),
achieved GFLOP/s from the network's own operation count (``forward_macs``; a step is 3 x 2 x the forward's
multiply-accumulates), the plain convolution's GFLOP/s and the step's share of it, and the ratio to the first
variant. With ``--data`` (plans in a preprocessed dataset folder) the seconds one process takes to sample and
augment a training batch (mean of ``--data-batches``, CPU time: the augmentation runs on one core).

With ``--layouts residual residual_encoder`` autoseg's variants are timed at both U-Net layouts in the same rounds.

Variants:
  contiguous         autoseg's step, contiguous memory format (the default)
  channels_last      channels_last_3d with autoseg's channels-last GroupNorm backward (autoseg.networks.normalization)
  channels_last_native_norm   channels_last_3d with PyTorch's own channels-last GroupNorm backward
  compiled           contiguous through torch.compile (its compile time is reported from the warm-up)
  nnunet             nnU-Net v2's PlainConvUNet rebuilt here (2 conv-InstanceNorm-LeakyReLU per stage, transposed
                     convolutions, deep supervision, softmax Dice + CE, SGD), float32 and contiguous as nnU-Net
                     trains on a CPU, with the same features, strides, kernels, patch and batch

Usage (one plan; a busy machine: interleaved rounds, ratios matter, not absolute times):

    PYTHONPATH=. .venv/bin/python tools/step_throughput.py --plans $AUTOSEG_HOME/preprocessed/Dataset002_ATLAS2mm/plans.json \\
        --stage zoom_in --patch 48 48 48 --variants contiguous channels_last channels_last_native_norm nnunet --rounds 5

Prints one table per configuration and, with ``--json``, writes every number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.machine import Precision, choose_precision, configure_threads, cpu_model, load_average
from autoseg.networks import ResidualUNet
from autoseg.networks.normalization import GroupNorm
from autoseg.plan.step_probe import PLAIN_CONVOLUTION, StepTimer, plain_convolution_step
from autoseg.plan.topology import PLANNED_UNET_LAYOUT
from autoseg.plans import UNET_LAYOUTS, Configuration, Loss, Plans
from autoseg.train.losses import build_loss

VARIANTS = ("contiguous", "channels_last", "channels_last_native_norm", "compiled", "nnunet")
FP32 = Precision("fp32", None, False, "nnU-Net trains in float32 on a CPU")


# ---------------------------------------------------------------------------------------------- nnU-Net's network
class _ConvNormAct(nn.Sequential):
    """nnU-Net's ConvDropoutNormReLU: conv (bias) -> InstanceNorm (affine, eps 1e-5) -> LeakyReLU(0.01)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int], stride: Sequence[int]) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, tuple(kernel), stride=tuple(stride), padding=[k // 2 for k in kernel]),
            nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class PlainConvUNet(nn.Module):
    """nnU-Net v2's ``PlainConvUNet`` (dynamic-network-architectures) as ``3d_fullres`` builds it: per encoder stage
    two conv-norm-nonlinearity blocks (the first strided), per decoder stage a transposed convolution (kernel =
    stride), concatenation with the skip and two blocks, a 1x1x1 segmentation layer per decoder stage (deep
    supervision, full resolution first). Input (B, C, X, Y, Z); ``num_classes`` 2 (background and lesion, softmax)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        features: Sequence[int],
        strides: Sequence[Sequence[int]],
        kernel_sizes: Sequence[Sequence[int]],
    ) -> None:
        super().__init__()
        self.encoder = nn.ModuleList()
        width_in = in_channels
        for width, stride, kernel in zip(features, strides, kernel_sizes):
            self.encoder.append(
                nn.Sequential(
                    _ConvNormAct(width_in, width, kernel, stride), _ConvNormAct(width, width, kernel, (1,) * 3)
                )
            )
            width_in = width
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for level in reversed(range(len(features) - 1)):
            stride = tuple(strides[level + 1])
            self.up.append(nn.ConvTranspose3d(features[level + 1], features[level], stride, stride=stride))
            kernel = kernel_sizes[level]
            self.decoder.append(
                nn.Sequential(
                    _ConvNormAct(2 * features[level], features[level], kernel, (1,) * 3),
                    _ConvNormAct(features[level], features[level], kernel, (1,) * 3),
                )
            )
            self.heads.append(nn.Conv3d(features[level], num_classes, 1))
        self.apply(_he_init)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        outputs = []
        for index, (up, stage, head) in enumerate(zip(self.up, self.decoder, self.heads)):
            x = stage(torch.cat((up(x), skips[-(index + 2)]), dim=1))
            outputs.append(head(x))
        return outputs[::-1]


def _he_init(module: nn.Module) -> None:
    """nnU-Net's InitWeights_He(1e-2)."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        nn.init.zeros_(module.bias)


class DiceCELoss(nn.Module):
    """nnU-Net's deep-supervised ``DC_and_CE_loss``: cross-entropy + soft Dice of the foreground (batch Dice),
    weights 1/2^level with the coarsest level's set to 0, normalized. Targets: one (B, 1, ...) int64 per level."""

    def forward(self, outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        weights = [1 / 2**level for level in range(len(outputs))]
        if len(weights) > 1:
            weights[-1] = 0.0
        total = sum(weights)
        value = outputs[0].new_zeros((), dtype=torch.float32)
        for weight, logits, target in zip(weights, outputs, targets):
            if not weight:
                continue
            labels = target[:, 0]
            cross_entropy = F.cross_entropy(logits.float(), labels)
            probabilities = torch.softmax(logits.float(), 1)[:, 1:]
            reference = (labels == 1).unsqueeze(1).float()
            intersection = (probabilities * reference).sum()
            dice = (2 * intersection + 1e-5) / (probabilities.sum() + reference.sum() + 1e-5)
            value = value + weight / total * (cross_entropy - dice)
        return value


# ---------------------------------------------------------------------------------------------- what is timed
@dataclass
class Measured:
    """One timed thing of a configuration: a variant's step or a plain convolution."""

    name: str
    run: Callable[[], float]
    parts: Callable[[], dict[str, float]] = dict
    warm_up_seconds: float = 0.0
    rounds: list[tuple[float, dict[str, float]]] = field(default_factory=list)

    def fastest(self) -> tuple[float, dict[str, float]]:
        return min(self.rounds, key=lambda entry: entry[0])


@dataclass(frozen=True)
class Network:
    """The network to time: its numbers and the plans' loss."""

    label: str
    in_channels: int
    num_classes: int
    features: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    patch: tuple[int, ...]
    batch: int
    loss: Loss
    plans: Plans | None = None
    configuration: Configuration | None = None
    layout: str = PLANNED_UNET_LAYOUT


def _autoseg_network(network: Network) -> nn.Module:
    """The residual U-Net of ``network``'s numbers and layout, with deep supervision as ``build_network`` gives it."""
    return ResidualUNet(
        in_channels=network.in_channels,
        num_classes=network.num_classes,
        features=network.features,
        strides=network.strides,
        kernel_sizes=network.kernel_sizes,
        deep_supervision=len(network.features) > 2,  # as the plans: deep supervision needs two decoder levels
        layout=network.layout,
    )


def _variant_step(variant: str, network: Network, precision: Precision) -> tuple[StepTimer, Callable[[], float]]:
    """(the StepTimer, the callable to time) of ``variant``: same seed, same data for every variant."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    data = torch.randn((network.batch, network.in_channels, *network.patch), generator=generator)
    target = (data[:, :1] > 1).to(torch.int16)
    if variant == "nnunet":
        model: nn.Module = PlainConvUNet(
            network.in_channels, 2, network.features, network.strides, network.kernel_sizes
        )
        targets = [target.long()]
        for stride in network.strides[1:-1]:
            previous = targets[-1]
            targets.append(previous[(slice(None), slice(None), *(slice(None, None, s) for s in stride))])
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
        timer = StepTimer(model.train(), DiceCELoss(), optimizer, data, targets, FP32, torch.device("cpu"))
        return timer, timer
    memory_format = _variant_format(variant)
    model = _autoseg_network(network).to(memory_format=memory_format).train()
    levels = len(network.features) - 1
    loss = build_loss(network.loss, levels if levels > 1 else 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.99, nesterov=True, weight_decay=3e-5)
    forward = torch.compile(model) if variant == "compiled" else model  # the compiled wrapper shares the parameters
    timer = StepTimer(
        forward, loss, optimizer, data.contiguous(memory_format=memory_format), target, precision, torch.device("cpu")
    )
    own_norm = variant != "channels_last_native_norm"

    def run() -> float:
        GroupNorm.channels_last_backward = own_norm
        try:
            return timer()
        finally:
            GroupNorm.channels_last_backward = True

    return timer, run


def _variant_precision(variant: str, precision: Precision) -> Precision:
    return FP32 if variant == "nnunet" else precision


def _variant_format(variant: str) -> torch.memory_format:
    return torch.channels_last_3d if variant.startswith("channels_last") else torch.contiguous_format


def _format_name(variant: str) -> str:
    return "channels_last_3d" if variant.startswith("channels_last") else "contiguous"


def _on_threads(threads: int, run: Callable[[], float]) -> Callable[[], float]:
    def on_threads() -> float:
        torch.set_num_threads(threads)
        return run()

    return on_threads


def measure(
    network: Network,
    variants: Sequence[str],
    precision: Precision,
    rounds: int,
    threads: Sequence[int],
    layouts: Sequence[str] = (),
) -> dict[str, Any]:
    """Every variant's step at every thread count (and every one of ``layouts``; default the network's) and the
    plain convolutions, one untimed warm-up each, then ``rounds`` interleaved rounds; per variant (``NAME``,
    ``NAME [LAYOUT]`` with several layouts, ``... @N threads`` with several counts) the fastest round with its
    parts."""
    items: dict[str, tuple[str, int, Network, Measured]] = {}
    convolutions: dict[tuple[str, str, int], Measured] = {}
    chosen = list(layouts) or [network.layout]
    for count in threads:
        for variant in variants:
            for layout in chosen if variant != "nnunet" else chosen[:1]:  # nnU-Net's network has no layouts
                timed = replace(network, layout=layout)
                timer, run = _variant_step(variant, timed, precision)
                label = variant + (f" [{layout}]" if len(chosen) > 1 and variant != "nnunet" else "")
                label += "" if len(threads) == 1 else f" @{count} threads"
                measured = Measured(label, _on_threads(count, run), lambda t=timer: dict(t.last))
                items[label] = (variant, count, timed, measured)
            key = (_variant_precision(variant, precision).name, _format_name(variant), count)
            if key not in convolutions:
                step = plain_convolution_step(
                    torch.device("cpu"), _variant_precision(variant, precision), _variant_format(variant)
                )
                convolutions[key] = Measured(f"plain convolution {key}", _on_threads(count, step))
    everything = [item for *_, item in items.values()] + list(convolutions.values())
    for item in everything:
        start = time.perf_counter()
        item.run()
        item.warm_up_seconds = time.perf_counter() - start
    for _ in range(rounds):
        for item in everything:
            seconds = item.run()
            item.rounds.append((seconds, item.parts()))
    results = {}
    for label, (variant, count, timed, item) in items.items():
        seconds, parts = item.fastest()
        plain = convolutions[(_variant_precision(variant, precision).name, _format_name(variant), count)].fastest()[0]
        macs = _nnunet_macs(timed) if variant == "nnunet" else _autoseg_network_on_meta_macs(timed)
        gflop = 6 * timed.batch * macs / 1e9
        results[label] = {
            "layout": None if variant == "nnunet" else timed.layout,
            "precision": _variant_precision(variant, precision).name,
            "threads": count,
            "seconds": seconds,
            "parts": parts,
            "all_rounds": [round(s, 4) for s, _ in item.rounds],
            "warm_up_seconds": item.warm_up_seconds,
            "gflop": gflop,
            "gflops": gflop / seconds,
            "plain_convolution_gflops": PLAIN_CONVOLUTION.gflop() / plain,
            "share_of_plain": (gflop / seconds) / (PLAIN_CONVOLUTION.gflop() / plain),
        }
    return results


def _autoseg_network_on_meta_macs(network: Network) -> int:
    with torch.device("meta"):
        return _autoseg_network(network).forward_macs(network.patch)


def _nnunet_macs(network: Network) -> int:
    """Forward multiply-accumulates of :class:`PlainConvUNet` (its convolutions, bias left out), counted from its
    layers with the same rule as autoseg's networks (``autoseg.networks.cost.conv_macs``)."""
    from autoseg.networks.cost import conv_macs, conv_output_size

    with torch.device("meta"):
        model = PlainConvUNet(network.in_channels, 2, network.features, network.strides, network.kernel_sizes)
    total, size, sizes = 0, tuple(network.patch), []
    for stage in model.encoder:
        for block in stage:
            total += conv_macs(block[0], size)
            size = conv_output_size(block[0], size)
        sizes.append(size)
    for index, (up, stage, head) in enumerate(zip(model.up, model.decoder, model.heads)):
        total += conv_macs(up, size)
        size = sizes[-(index + 2)]
        for block in stage:
            total += conv_macs(block[0], size)
        total += conv_macs(head, size)
    return total


def data_seconds(network: Network, plans_path: Path, batches: int) -> float | None:
    """Mean CPU seconds this process takes to sample and augment one training batch of the configuration (as one
    background worker does), over ``batches`` batches; None without preprocessed data beside the plans."""
    from autoseg.train.loading import case_identifiers, make_loader

    configuration = network.configuration
    folder = plans_path.parent / configuration.data_identifier
    cases = case_identifiers(folder) if folder.is_dir() else []
    if not cases:
        return None
    stage = replace(configuration.schedule.stages[0], patch_size=network.patch, batch_size=network.batch)
    with make_loader(folder, cases, configuration, stage, 0, seed=0, train=True) as stream:
        next(stream)
        start = time.process_time()
        for _ in range(batches):
            next(stream)
        return (time.process_time() - start) / batches


# ---------------------------------------------------------------------------------------------- the command
def _networks(args: argparse.Namespace) -> list[tuple[Network, Path | None]]:
    if args.plans:
        found = []
        for path in args.plans:
            plans = Plans.from_json(path)
            configuration = plans.configuration(args.configuration or plans.default_configuration)
            stage = (
                next(s for s in configuration.schedule.stages if s.name == args.stage)
                if args.stage
                else replace(configuration.schedule.stages[-1], patch_size=configuration.patch_size)
            )
            n = configuration.network
            found.append(
                (
                    Network(
                        label=f"{plans.planner} {configuration.name} ({path})",
                        in_channels=configuration.input_channels(len(plans.channels)),
                        num_classes=sum(1 for v in plans.labels.values() if v != 0),
                        features=tuple(n.features),
                        strides=tuple(map(tuple, n.strides)),
                        kernel_sizes=tuple(map(tuple, n.kernel_sizes)),
                        patch=tuple(args.patch or stage.patch_size),
                        batch=args.batch or stage.batch_size,
                        loss=configuration.loss,
                        plans=plans,
                        configuration=configuration,
                        layout=n.layout,
                    ),
                    Path(path),
                )
            )
        return found
    stages = len(args.features)
    return [
        (
            Network(
                label="given configuration",
                in_channels=args.in_channels,
                num_classes=1,
                features=tuple(args.features),
                strides=((1, 1, 1),) + ((2, 2, 2),) * (stages - 1),
                kernel_sizes=((3, 3, 3),) * stages,
                patch=tuple(args.patch),
                batch=args.batch or 2,
                loss=Loss(name="dice_bce", dice_weight=1.0, bce_weight=1.0),
            ),
            None,
        )
    ]


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni")
    return " ".join(flag for flag in (flags.group(1).split() if flags else []) if flag in wanted)


def _print_table(network: Network, results: dict[str, Any], data: float | None) -> None:
    first = next(iter(results))
    print(
        f"\n{network.label}: features {list(network.features)}, patch {'x'.join(map(str, network.patch))}, "
        f"batch {network.batch}"
    )
    print(
        f"  {'variant':36s} {'prec':5s} {'s/step':>7s} {'fwd':>6s} {'bwd':>6s} {'opt':>6s} {'GFLOP':>7s} "
        f"{'GFLOP/s':>8s} {'conv GFLOP/s':>12s} {'of conv':>8s} {'vs ' + first:>16s}"
    )
    for variant, r in results.items():
        p = r["parts"]
        print(
            f"  {variant:36s} {r['precision']:5s} {r['seconds']:7.3f} {p.get('forward', math.nan):6.3f} "
            f"{p.get('backward', math.nan):6.3f} {p.get('optimizer', math.nan):6.3f} {r['gflop']:7.1f} "
            f"{r['gflops']:8.1f} {r['plain_convolution_gflops']:12.1f} {r['share_of_plain']:8.0%} "
            f"{r['seconds'] / results[first]['seconds']:16.3f}"
        )
    for label, r in results.items():
        if label.startswith("compiled"):
            print(f"  {label}: first step (compilation) {r['warm_up_seconds']:.1f} s")
    if data is not None:
        print(f"  data: {data:.3f} CPU s to sample and augment one batch in one process (mean)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--plans", nargs="+", help="plans.json file(s); their default configuration unless -c")
    source.add_argument("--features", nargs="+", type=int, help="a network's widths (3x3x3 kernels, stride 2)")
    parser.add_argument("-c", "--configuration", help="the configuration of the plans to time")
    parser.add_argument("--stage", help="a schedule stage's patch and batch (default: the configuration's)")
    parser.add_argument("--patch", nargs=3, type=int, help="patch (X Y Z) voxels, overriding the plans'")
    parser.add_argument("--batch", type=int, help="batch, overriding the plans'")
    parser.add_argument("--in-channels", type=int, default=1, help="input channels with --features (default 1)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument(
        "--threads",
        nargs="+",
        type=int,
        help="torch threads; several: every variant at each, interleaved (default: the cores)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up (default 3)")
    parser.add_argument("--variants", nargs="+", default=["contiguous", "channels_last", "nnunet"], choices=VARIANTS)
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=[],
        choices=UNET_LAYOUTS,
        help="time autoseg's variants at each of these U-Net layouts (default: the plans' layout, else "
        f"{PLANNED_UNET_LAYOUT})",
    )
    parser.add_argument("--data", action="store_true", help="also time making a training batch (needs the data)")
    parser.add_argument("--data-batches", type=int, default=4, help="batches for --data (default 4)")
    parser.add_argument("--json", type=Path, help="write every number to this file")
    args = parser.parse_args(argv)
    if args.features and not args.patch:
        parser.error("--features needs --patch")
    threads = args.threads or [configure_threads()]
    if any(count < 1 for count in threads):
        parser.error("--threads: counts must be at least 1")
    precision = choose_precision(torch.device("cpu"), args.precision)
    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "cpu": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": list(threads),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "precision": precision.name,
        "load_average_before": load_average(),
        "configurations": [],
    }
    print(
        f"{report['cpu']} ({report['capability']}; {report['cpu_flags']}), {'/'.join(map(str, threads))} thread(s), torch "
        f"{torch.__version__}, {precision.name}; load average {report['load_average_before']}; "
        f"{args.rounds} interleaved rounds, fastest kept"
    )
    for network, path in _networks(args):
        results = measure(network, args.variants, precision, args.rounds, threads, args.layouts)
        data = data_seconds(network, path, args.data_batches) if args.data and path is not None else None
        _print_table(network, results, data)
        report["configurations"].append(
            {
                "label": network.label,
                "features": list(network.features),
                "patch": list(network.patch),
                "batch": network.batch,
                "results": results,
                "data_cpu_seconds_per_batch": data,
            }
        )
    report["load_average_after"] = load_average()
    print(f"load average after: {report['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("KMP_WARNINGS", "0")
    sys.exit(main())
