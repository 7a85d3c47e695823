"""A planner for training on a CPU: coarser voxels, smaller patches, shorter schedules."""

from __future__ import annotations

from autoseg.plan.fingerprint import DatasetAggregate
from planners.default import DefaultPlanner

#: No axis finer than this (mm): 8x fewer voxels than 1 mm data, which makes CPU training practical.
CPU_MIN_SPACING_MM = 2.0


class CPUPlanner(DefaultPlanner):
    """``DefaultPlanner`` for a CPU: spacing at least 2 mm, half the network width (16 to 256 features,
    about a quarter of the operations), a 2 GB memory budget (fast iterations on a few cores) and
    200 epochs of 50 iterations (PSPNet: a ResNet18 backbone, 100 epochs). Predictions are still written on the input grid."""

    default_memory_budget_gb = 2.0
    widths = (16, 256)
    epochs = 200
    iterations_per_epoch = 50
    pspnet_epochs = 100
    #: ResNet18: about a third of ResNet50's operations per slice (1.0 vs 3.6 s per batch of 8 112x112 slices
    #: on 2 cores).
    pspnet_backbones = ("resnet18",)

    def target_spacing(self, aggregate: DatasetAggregate) -> tuple[tuple[float, ...], str]:
        spacing, reason = super().target_spacing(aggregate)
        coarser = tuple(max(s, CPU_MIN_SPACING_MM) for s in spacing)
        if coarser == spacing:
            return spacing, reason
        return coarser, f"{reason}; raised to at least {CPU_MIN_SPACING_MM} mm per axis for CPU training"
