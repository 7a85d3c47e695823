"""The planner registry and the base class every planner derives from."""

from __future__ import annotations

from typing import Any, ClassVar

from autoseg.errors import UsageError
from autoseg.plan.budget import BudgetRequest
from autoseg.plan.fingerprint import Fingerprint
from autoseg.plan.topology import NORMALIZATION_OPTIONS, PLANNED_UNET_LAYOUT
from autoseg.plans import UNET_LAYOUTS, Plans
from autoseg.registry import Registry
from autoseg.train.transfer import SourceModel

_REGISTRY = Registry("planners", "planner")


class Planner:
    """Turns a fingerprint (``autoseg.plan.fingerprint.compute_fingerprint``) into ``Plans``.

    Subclasses register themselves by class name. The constructor only stores its arguments;
    ``plan()`` does the work and has no side effects (nothing is written).

    Args:
        fingerprint: the dataset fingerprint.
        memory_budget_gb: GPU memory one training run may use; patch and batch sizes are fitted to it.
        compute: a compute budget (minutes on a device, with that machine's probe); the planner then also
            chooses resolution, width, patch and iterations so one fold fits it. None: plan for memory only.
        normalization: ``zscore`` (default: each modality's z-score scheme) or ``histeq`` (histogram equalization
            of every channel; its configurations get their own data folders), see
            ``autoseg.plan.topology.NORMALIZATION_OPTIONS``.
        like: a trained model to plan like (``autoseg_plan --like MODEL``): the planner keeps its network and
            normalization, so its weights fit, and plans the rest for this dataset (:mod:`planners.like`).
        unet_layout: the block layout of the residual U-Nets it plans (``autoseg.plans.UNET_LAYOUTS``); default
            :data:`autoseg.plan.topology.PLANNED_UNET_LAYOUT`. Not with ``like``: the model's network is kept.

    Raises:
        UsageError: an unknown ``normalization`` or ``unet_layout``, or a ``unet_layout`` with ``like``.
    """

    default_memory_budget_gb: ClassVar[float] = 8.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY.register(cls)

    def __init__(
        self,
        fingerprint: Fingerprint,
        memory_budget_gb: float | None = None,
        compute: BudgetRequest | None = None,
        normalization: str = "zscore",
        like: SourceModel | None = None,
        unet_layout: str | None = None,
    ):
        if normalization not in NORMALIZATION_OPTIONS:
            raise UsageError(f"unknown normalization '{normalization}', use one of {list(NORMALIZATION_OPTIONS)}")
        if unet_layout is not None and unet_layout not in UNET_LAYOUTS:
            raise UsageError(f"unknown U-Net layout '{unet_layout}', use one of {list(UNET_LAYOUTS)}")
        if unet_layout is not None and like is not None:
            raise UsageError(f"the U-Net layout is the model's when planning like {like.describe()}; leave it out")
        self.fingerprint = fingerprint
        self.normalization = normalization
        self.memory_budget_gb = memory_budget_gb if memory_budget_gb is not None else self.default_memory_budget_gb
        self.compute = compute
        self.like = like
        #: The layout of the U-Nets it plans (and whose memory and time it estimates): the model's when planning
        #: like one.
        self.unet_layout = like.planned.network.layout if like is not None else unet_layout or PLANNED_UNET_LAYOUT

    def plan(self) -> Plans:
        """Decide every configuration; each decision carries its reason."""
        raise NotImplementedError(f"{type(self).__name__} must implement plan()")


def available_planners() -> list[str]:
    """Sorted names of every planner in the package."""
    return _REGISTRY.names()


def register_planner(cls: type[Planner]) -> type[Planner]:
    """Make a planner defined outside the ``planners`` package (a script, a notebook) available by name, e.g. to
    ``autoseg.api.plan.plan_and_preprocess(..., planner="MyPlanner")``; usable as a class decorator.
    Planners in the package register themselves."""
    if not (isinstance(cls, type) and issubclass(cls, Planner)):
        raise TypeError(f"{cls!r} is not a Planner subclass")
    return _REGISTRY.register(cls, explicit=True)


def get_planner(name: str) -> type[Planner]:
    """The planner class called ``name``.

    Raises:
        KeyError: unknown name; the message lists the known planners.
    """
    return _REGISTRY.get(name)
