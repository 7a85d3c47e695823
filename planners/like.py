"""Planning a dataset like a trained model (``autoseg_plan -d DATASET --like MODEL``), so the model's weights fit the
planned network and ``autoseg_train --init-from MODEL`` can start from them (``autoseg.train.transfer``).

One configuration is planned: the model's (``3d_resunet``, ``3d_resunet_sym`` or their ``_histeq`` twins; the
residual 3-D U-Nets). What it inherits and what is planned for the new data, each with its reason:

- inherited: the network (architecture, features, strides, kernels, deep supervision: every weight fits), each
  channel's normalization scheme (matched by name; a ``clip_zscore_dataset`` channel takes its clip range, mean and
  std from this dataset, as nnU-Net's ``nnUNetv2_move_plans_between_datasets`` takes the target's intensity
  properties), the symmetric channels (the first convolution reads them) and, where the model's trainer built a
  network of its own from the plan (``AcuteStrokeTrainer``), that trainer;
- planned as for any dataset: target spacing, patch and batch (fitted to the memory budget for the inherited network),
  loss, sampling, post-processing, mirroring and the schedule; with a compute budget, the ladder
  (:mod:`planners.compute_ladder`) varies resolution, patch and batch only;
- fine-tuning: a warm-up stage (:data:`WARMUP_STAGE`) leads the planned stages: :data:`WARMUP_SHARE` of the epochs
  (at least one) at :data:`WARMUP_LR_FACTOR` times the first stage's learning rate, on its patch and batch.

A new channel (not among the model's) gets this planner's own normalization; a channel the model needs that the
dataset lacks is an error naming it (:func:`autoseg.train.transfer.channel_sources`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

from autoseg.plan.fingerprint import ChannelFingerprint
from autoseg.plan.topology import Topology, channel_normalization, scheme_normalization
from autoseg.plans import Configuration, Normalization, Schedule, Stage, asymmetric_name, zscore_name
from autoseg.train.run_length import round_half_up
from autoseg.train.transfer import SourceModel, TransferError, channel_sources, describe_channels

if TYPE_CHECKING:
    from planners.default import DefaultPlanner

#: The configuration family a model may be planned like: the residual 3-D U-Net (``_sym``/``_histeq`` variants too).
LIKE_CONFIGURATION = "3d_resunet"
#: The fine-tuning warm-up: the stage's name, its share of the epochs (at least one epoch) and its learning rate as a
#: factor of the first planned stage's.
WARMUP_STAGE = "warmup"
WARMUP_SHARE = 0.05
WARMUP_LR_FACTOR = 0.1


def plan_like(planner: DefaultPlanner, source: SourceModel) -> tuple[Configuration, dict[str, str]]:
    """The model's configuration planned for ``planner``'s dataset (see the module docstring), and the plans'
    reasons (``default_configuration``, ``like``).

    Raises:
        TransferError: the model is not a residual 3-D U-Net configuration, or it needs a channel the dataset lacks.
    """
    model = source.planned
    _check_supported(source)
    fingerprint = planner.fingerprint
    names = [channel.name for channel in fingerprint.channels]
    sources = channel_sources(source.plans.channels, names, source.describe(), fingerprint.dataset)
    spacing, spacing_reason = planner.target_spacing(fingerprint.aggregate)
    same = tuple(spacing) == tuple(model.target_spacing)
    spacing_reason += (
        f"; {'the same as the model' if same else 'the model'} was trained at {list(model.target_spacing)} mm"
    )
    histeq = all(n.scheme == "histogram_equalization" for n in model.normalization)
    normalization = [
        _normalization(channel, index, source, histeq) for channel, index in zip(fingerprint.channels, sources)
    ]
    network = model.network
    topology = Topology(strides=network.strides, kernel_sizes=network.kernel_sizes, features=network.features)
    build = functools.partial(planner.plan_resunet, symmetry=model.symmetry, topology=topology)
    planned = planner.plan_unet_within_compute(build, spacing, spacing_reason, normalization, inherited=topology)
    if any(n.scheme == "histogram_equalization" for n, _ in normalization):  # its name and data folder: NAME_histeq
        planned = dataclasses.replace(planner.histeq_variant(planned), normalization=tuple(n for n, _ in normalization))
    schedule, schedule_reason = fine_tuning_schedule(planned.schedule, source)
    inherited = f"inherited from {source.describe()}"
    reasons = {
        **planned.reasons,
        "network": f"{inherited}: {network.architecture} with features {list(network.features)}, strides "
        f"{[list(s) for s in network.strides]}, kernels {[list(k) for k in network.kernel_sizes]}, deep supervision "
        f"{network.deep_supervision}, layout {network.layout}: the same topology, so every weight of the model fits",
        "normalization": "; ".join(reason for _, reason in normalization),
        "schedule": f"{schedule_reason}; {planned.reasons['schedule']}",
        "like": f"planned like {source.describe()} (autoseg_plan --like); channels by name: "
        f"{describe_channels(source.plans.channels, names, sources)}",
    }
    if model.symmetry is not None:
        reasons["symmetry"] = (
            f"{inherited}: its first convolution reads each channel's registered mirror too; "
            + planned.reasons.get("symmetry", "")
        )
    configuration = dataclasses.replace(
        planned, network=dataclasses.replace(network, pretrained=None), schedule=schedule, reasons=reasons
    )
    return configuration, {
        "default_configuration": f"{configuration.name}: the model's configuration, the only one planned like it",
        "like": f"planned like {source.describe()}: inherited are its network topology, each channel's "
        "normalization scheme and its symmetric channels, so its weights fit; spacing, patch, batch, "
        "loss, sampling, post-processing and schedule (led by a fine-tuning warm-up) are planned for this "
        f"dataset. Channels by name: {describe_channels(source.plans.channels, names, sources)}. Start from its "
        f"weights with: autoseg_train -d {fingerprint.dataset} -f 0 --init-from {source.name}",
    }


def _check_supported(source: SourceModel) -> None:
    """Refuse a model whose configuration is not a residual 3-D U-Net of the ``3d_resunet`` family."""
    model = source.planned
    family = asymmetric_name(zscore_name(model.name))
    if model.network.architecture != "ResidualUNet" or model.dimension != 3 or family != LIKE_CONFIGURATION:
        raise TransferError(
            f"{source.describe()}: a {model.dimension}-D {model.network.architecture} ({model.name}); --like plans "
            f"the residual 3-D U-Net configurations ({LIKE_CONFIGURATION}, {LIKE_CONFIGURATION}_sym and their _histeq "
            "twins); start a PSPNet's backbone from weights with autoseg_train --pretrained instead"
        )


def _normalization(
    channel: ChannelFingerprint, index: int | None, source: SourceModel, histeq: bool
) -> tuple[Normalization, str]:
    """The normalization of a dataset channel: the scheme of the model's channel ``index`` (with this dataset's
    statistics), or, for a new channel, the planner's own (histogram equalization when the model equalizes every
    channel)."""
    if index is None:
        normalization, reason = channel_normalization(channel, "histeq" if histeq else "zscore")
        return normalization, f"{reason} (a new channel, not among the model's: planned for it)"
    scheme = source.planned.normalization[index].scheme
    normalization = scheme_normalization(channel, scheme)
    reason = (
        f"{channel.name}: {scheme}, inherited from the model's {source.plans.channels[index]} (its weights expect "
        "inputs normalized this way)"
    )
    if scheme == "clip_zscore_dataset":
        reason += (
            f", with this dataset's statistics: clip {list(normalization.clip)}, mean {normalization.mean}, std "
            f"{normalization.std} (as nnU-Net does when it moves plans between datasets)"
        )
    return normalization, reason


def fine_tuning_schedule(schedule: Schedule, source: SourceModel) -> tuple[Schedule, str]:
    """``schedule`` led by a warm-up stage (see the module docstring), with the reason. Its trainer is the planned
    one, unless the model's trainer built a network of its own from the plan (``source.network_options``, e.g.
    ``AcuteStrokeTrainer``'s asymmetric U-Net): then the model's, the only one whose network its weights fit. Without
    room for a warm-up (a single epoch, or a later stage that would start within it) the planned stages are kept as
    they are, and the reason says so."""
    first = schedule.stages[0]
    epochs = max(1, round_half_up(schedule.epochs * WARMUP_SHARE))
    later = [stage.start_epoch for stage in schedule.stages[1:]]
    trainer = source.trainer if source.network_options else schedule.trainer
    why_trainer = (
        f"trainer {trainer}: the model's, which builds the network its weights belong to ({source.network_options})"
        if source.network_options
        else f"trainer {trainer}: as planned (the model's {source.trainer} trained the plan's own network, which "
        "any residual U-Net trainer builds)"
    )
    if schedule.epochs < 2 or any(start <= epochs for start in later):
        return dataclasses.replace(schedule, trainer=trainer), (
            f"fine-tuning: no warm-up stage (the {schedule.epochs} epochs leave no room for one before stage "
            f"{schedule.stages[-1].name}); {why_trainer}"
        )
    warmup = Stage(
        name=WARMUP_STAGE,
        start_epoch=0,
        patch_size=first.patch_size,
        batch_size=first.batch_size,
        learning_rate=first.learning_rate * WARMUP_LR_FACTOR,
        trainable=first.trainable,
    )
    stages = (warmup, dataclasses.replace(first, start_epoch=epochs), *schedule.stages[1:])
    return dataclasses.replace(schedule, trainer=trainer, stages=stages), (
        f"fine-tuning: a warm-up stage of {epochs} epoch(s) ({WARMUP_SHARE:.0%} of {schedule.epochs}) at lr "
        f"{warmup.learning_rate:g} ({WARMUP_LR_FACTOR:g} x {first.name}'s {first.learning_rate:g}) on its patch and batch, so that "
        "the first updates, made while the network meets the new data (and a new channel's zero weights), do not "
        f"undo the model's weights; {first.name} then starts at epoch {epochs}; {why_trainer}"
    )
