"""Starting a network from another model's weights (``autoseg_train --init-from MODEL``; planned for by
``autoseg_plan --like MODEL``).

A *source model* (:class:`SourceModel`) is one member (configuration/trainer) of a trained dataset or of a model file,
with one checkpoint per fold; ``autoseg.api.source_model.find_source_model`` finds it from the name a user gives.
Which of its folds starts which fold of the new run (:func:`choose_initial_weights`): fold ``k`` starts from the
model's fold ``k`` when it has one, else from its ``fold_full`` (trained on every case), else from its first fold;
``init_fold`` (``--init-fold K``) takes fold ``K`` for every fold.

Channels are matched by name (:func:`channel_sources`): a channel of the new dataset the model also has takes that
channel's weights wherever the network reads its input, a new channel starts from zero weights in the first
convolution (so the network first computes exactly what the model computed from the channels they share), and a
channel the model needs that the dataset lacks is an error naming it. Which tensors read the input channels, and
along which axis, is asked of the network itself (:func:`input_axes`: the layouts of the network with one channel
more and without it differ exactly there), so no layer name is hard-wired. Every other tensor must have the planned
network's name, shape and dtype (:func:`autoseg.networks.factory.weight_mismatches`); the first that does not is
named in the error. Checkpoints are read with ``torch.load(..., weights_only=True)``
(:func:`autoseg.io.checkpoints.load_checkpoint`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from autoseg.errors import AutosegError
from autoseg.io.checkpoints import load_checkpoint
from autoseg.networks.factory import (
    WeightLayout,
    checkpoint_network_options,
    expected_weights,
    weight_mismatches,
)
from autoseg.plans import Configuration, Plans

__all__ = [
    "InitialWeights",
    "SourceModel",
    "TransferError",
    "channel_sources",
    "choose_initial_weights",
    "describe_channels",
    "initial_state",
    "input_axes",
    "load_initial_weights",
    "transferred_state",
]


class TransferError(AutosegError, ValueError):
    """A model's weights cannot start the planned network: a channel the model needs that the dataset lacks, a fold
    it does not have, another network class, or a tensor whose shape differs (the message names the layer)."""


@dataclass(frozen=True)
class SourceModel:
    """A trained model to start from: one member of a trained dataset or of a model file.

    Attributes:
        name: how the user named it (a model file's path, or a trained dataset's name), for messages.
        dataset: its dataset folder under ``AUTOSEG_RESULTS``.
        configuration: its configuration.
        trainer: its trainer folder (the trainer that made its weights).
        plans: the plans its folds were trained with (the first fold's ``plans.json``).
        checkpoints: fold (``"0"``, ``"full"``) -> the checkpoint that holds its weights.
        network_options: what its trainer built beyond the plan (``autoseg.networks.factory.NETWORK_OPTIONS_KEY``, as
            its first checkpoint records it): ``{}`` for the plan's own network.
    """

    name: str
    dataset: str
    configuration: str
    trainer: str
    plans: Plans
    checkpoints: dict[str, Path]
    network_options: dict[str, str | bool] = dataclasses.field(default_factory=dict)

    @property
    def planned(self) -> Configuration:
        """The configuration its weights were trained for."""
        return self.plans.configuration(self.configuration)

    def describe(self) -> str:
        """E.g. ``atlas.zip (Dataset002_ATLAS2mm, 3d_resunet/ZoomInOutTrainer)``."""
        member = f"{self.configuration}/{self.trainer}"
        return f"{self.dataset} ({member})" if self.name == self.dataset else f"{self.name} ({self.dataset}, {member})"

    def folds(self) -> list[str]:
        """Its folds, numbered ones first (``["0", "1", "full"]``)."""
        return sorted(self.checkpoints, key=lambda fold: (not fold.isdigit(), fold.zfill(9)))


@dataclass(frozen=True)
class InitialWeights:
    """The checkpoint one run starts from: ``source``'s fold ``fold`` (``checkpoint``), chosen for ``reason``."""

    source: SourceModel
    fold: str
    checkpoint: Path
    reason: str


def choose_initial_weights(source: SourceModel, fold: int | str, init_fold: int | str | None = None) -> InitialWeights:
    """The fold of ``source`` that starts fold ``fold`` of a run (see the module docstring for the rule).

    Raises:
        TransferError: ``init_fold`` names a fold the model does not have (the message lists its folds).
    """
    folds = source.folds()
    if init_fold is not None:
        chosen = str(init_fold)
        if chosen not in source.checkpoints:
            raise TransferError(f"{source.describe()} has no fold {chosen}; its folds: {', '.join(folds)}")
        reason = f"its fold {chosen} for every fold, as asked"
    elif str(fold) in source.checkpoints:
        chosen, reason = str(fold), "its fold of the same name"
    elif "full" in source.checkpoints:
        chosen, reason = "full", f"it has no fold {fold}: its model trained on every case"
    else:
        chosen, reason = folds[0], f"it has no fold {fold} and no fold_full: its first fold"
    return InitialWeights(source, chosen, source.checkpoints[chosen], reason)


def channel_sources(
    model_channels: Sequence[str], channels: Sequence[str], model: str, dataset: str
) -> list[int | None]:
    """For each of the dataset's ``channels`` (by name), the index of the model's channel of the same name, or None
    for a channel the model does not have (it starts from zero weights).

    Args:
        model_channels: the channels the model was trained on, in its order.
        channels: the dataset's channels, in its order.
        model, dataset: what the message calls them.

    Example:
        >>> channel_sources(["T1"], ["FLAIR", "T1"], "atlas.zip", "Dataset010_Lab")
        [None, 0]

    Raises:
        TransferError: a channel of the model the dataset lacks (named, with the dataset's channels), or a channel
            name that appears twice on either side.
    """
    for names, whose in ((model_channels, model), (channels, dataset)):
        twice = sorted({name for name in names if list(names).count(name) > 1})
        if twice:
            raise TransferError(
                f"{whose}: channel name {twice[0]} appears more than once; channels are matched by name"
            )
    missing = [name for name in model_channels if name not in channels]
    if missing:
        raise TransferError(
            f"{model} needs channel{'s' if len(missing) > 1 else ''} {', '.join(missing)}, which {dataset} lacks (its "
            f"channels: {', '.join(channels)}); channels are matched by name (dataset.json channel_names): add or "
            "rename the channel, or start from a model trained without it"
        )
    return [list(model_channels).index(name) if name in model_channels else None for name in channels]


def describe_channels(model_channels: Sequence[str], channels: Sequence[str], sources: Sequence[int | None]) -> str:
    """E.g. ``FLAIR: new (zero weights); T1 <- the model's T1 (its channel 0)``."""
    return "; ".join(
        f"{name}: new (zero weights)"
        if index is None
        else f"{name} <- the model's {model_channels[index]} (its channel {index})"
        for name, index in zip(channels, sources)
    )


def input_axes(plans: Plans, configuration: str, **options: object) -> dict[str, int]:
    """The tensors of the network of ``configuration`` (built with ``options``, as ``build_network``) that read the
    input channels, each with the axis that runs over them: those whose shape changes with one channel more (1 for a
    convolution's weight (out, in, *kernel); 0 for a per-channel normalization of the input). Built on the meta device.
    """
    layout = expected_weights(plans, configuration, **options)
    wider = expected_weights(dataclasses.replace(plans, channels=(*plans.channels, "")), configuration, **options)
    axes = {}
    for name, (shape, _) in layout.items():
        changed = [axis for axis, (a, b) in enumerate(zip(shape, wider[name][0])) if a != b]
        if changed:
            axes[name] = changed[0]
    return axes


def transferred_state(
    weights: Mapping[str, object],
    layout: WeightLayout,
    axes: Mapping[str, int],
    sources: Sequence[int | None],
    model_channels: int,
    own: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The model's state dict ``weights`` made to fit the planned network: along each input axis (``axes``), input
    channel ``r·C + c`` (``C`` image channels, replica ``r``: the image, its mirror, their difference) takes the
    model's input channel ``r·C_model + sources[c]``; a new channel (``sources[c]`` None) is zero in a convolution's
    weight (axis 1) and keeps ``own``'s value (the freshly built network's; zeros without it) elsewhere. Every other
    tensor is the model's as it is.

    Args:
        weights: the model's network state dict.
        layout: the planned network's names, shapes and dtypes (:func:`autoseg.networks.factory.expected_weights`).
        axes: :func:`input_axes` of the planned network.
        sources: :func:`channel_sources`.
        model_channels: the model's image channels ``C_model``.
        own: the planned network's own tensors, for the new channels' non-convolution entries.

    Raises:
        TransferError: a tensor missing, unexpected, or of another shape or dtype than the planned network's
            (``NAME: shape [..] float32, the network has [..] float32 (and N more)``).
    """
    if not isinstance(weights, Mapping):
        raise TransferError(f"not a state dict but {type(weights).__name__}")
    mapped = dict(weights)
    problems = []
    for name, axis in axes.items():
        tensor = weights.get(name)
        if not isinstance(tensor, torch.Tensor) or name not in layout:
            continue  # named below as missing
        shape, _ = layout[name]
        replicas = shape[axis] // len(sources)
        if tensor.ndim != len(shape) or any(a != b for i, (a, b) in enumerate(zip(tensor.shape, shape)) if i != axis):
            continue  # another layer than the planned one: named below as it is
        if tensor.shape[axis] != replicas * model_channels:
            problems.append(
                f"{name}: shape {list(tensor.shape)} reads {tensor.shape[axis]} input channels (axis {axis}), the "
                f"model's plans {replicas * model_channels} ({model_channels} channel(s) x {replicas})"
            )
            continue
        base = own[name].detach().cpu().clone() if own is not None else torch.zeros(shape, dtype=tensor.dtype)
        result = base.to(tensor.dtype)
        for replica in range(replicas):
            for channel, index in enumerate(sources):
                target = replica * len(sources) + channel
                if index is not None:
                    result.select(axis, target).copy_(tensor.select(axis, replica * model_channels + index))
                elif axis == 1:
                    result.select(axis, target).zero_()
        mapped[name] = result
    problems += weight_mismatches(layout, mapped)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise TransferError(f"the weights do not fit the planned network: {problems[0]}{more}")
    return mapped


def initial_state(
    initial: InitialWeights,
    plans: Plans,
    configuration: str,
    network_options: Mapping[str, object],
    own: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict that starts ``configuration`` of ``plans`` (built with ``network_options``, the trainer's) from
    ``initial``, and a line saying so for the log.

    Raises:
        TransferError: see :func:`channel_sources` and :func:`transferred_state`; or the model's weights are of
            another network class than the trainer builds (the message says which trainer builds it). The message
            starts with the checkpoint's path.
        CheckpointError: the checkpoint is unreadable or holds pickled objects (``weights_only=True``).
    """
    source, path = initial.source, initial.checkpoint
    state = load_checkpoint(path)
    theirs = checkpoint_network_options(state, source.trainer, path)
    if theirs != dict(network_options):
        raise TransferError(
            f"{path}: the model's network was built with {theirs or 'the plan alone'} (its trainer "
            f"{source.trainer}), this run's with {dict(network_options) or 'the plan alone'}: the weights fit only the "
            f"network they were trained in; train with -tr {source.trainer}"
        )
    sources = channel_sources(source.plans.channels, plans.channels, source.describe(), plans.dataset)
    model_symmetry, symmetry = source.planned.symmetry, plans.configuration(configuration).symmetry
    per_model = model_symmetry.channels_per_input if model_symmetry else 1
    per_run = symmetry.channels_per_input if symmetry else 1
    if per_model != per_run:
        raise TransferError(
            f"{path}: the model reads {per_model} input(s) per channel (symmetric channels: "
            f"{model_symmetry is not None}), configuration {configuration} {per_run}; plan it with autoseg_plan --like"
        )
    layout = expected_weights(plans, configuration, **network_options)
    axes = input_axes(plans, configuration, **network_options)
    try:
        mapped = transferred_state(state.get("network"), layout, axes, sources, len(source.plans.channels), own)
    except TransferError as error:
        raise TransferError(f"{path}: {error}") from None
    new = [name for name, index in zip(plans.channels, sources) if index is None]
    zeroed = [name for name, axis in axes.items() if axis == 1]
    line = (
        f"weights: from {source.describe()}, fold {initial.fold} ({path.name}; {initial.reason}): "
        f"{len(mapped)} tensors; channels by name: {describe_channels(source.plans.channels, plans.channels, sources)}"
    )
    if new:
        line += f"; new channels start from zero weights in {', '.join(zeroed) or 'no layer'}"
    return mapped, line


def load_initial_weights(
    network: nn.Module,
    initial: InitialWeights,
    plans: Plans,
    configuration: str,
    network_options: Mapping[str, object],
) -> str:
    """Load :func:`initial_state` into ``network`` (freshly built for ``configuration``); returns the log line.

    Raises:
        see :func:`initial_state`.
    """
    state, line = initial_state(initial, plans, configuration, network_options, own=network.state_dict())
    network.load_state_dict(state)
    return line
