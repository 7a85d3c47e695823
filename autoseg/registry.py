"""Classes chosen by name on the command line (``-pl NAME``, ``-tr NAME``).

A base class owns a ``Registry`` and registers every subclass defined in the registry's package from
``__init_subclass__``. A subclass defined anywhere else (a script, a notebook) is left out until it is
registered explicitly (``register_trainer`` / ``register_planner``, or ``Registry.register(cls,
explicit=True)``); so a name on the command line resolves only to the package's classes and to classes
the running program registered itself, never to code it did not choose to load. An unknown name is
answered with the sorted list of known ones.

The library never imports the plugin packages (``planners``, ``trainers``: they import the library). Where it
takes a planner or trainer by name (``autoseg.api.train.train(trainer="ZoomInOutTrainer")``, the plans'
``schedule.trainer``, ``autoseg.api.plan.plan_and_preprocess(planner="CPUPlanner")``), it asks
:func:`plugin_class`, which imports the kind's package (:data:`PLUGIN_PACKAGES`) by name when first needed and
looks the name up in the registry that package's base class owns.
"""

from __future__ import annotations

import importlib
import pkgutil

from autoseg.errors import UnknownNameError

__all__ = ["PLUGIN_PACKAGES", "Registry", "plugin_class"]

#: The package whose classes each kind of name resolves to.
PLUGIN_PACKAGES = {"planner": "planners", "trainer": "trainers"}
#: Kind -> the registry of its package, as the package's base class created it.
_REGISTRIES: dict[str, Registry] = {}


class Registry:
    """Classes of one kind (``kind``, e.g. "planner"), keyed by class name, all from ``package``."""

    def __init__(self, package: str, kind: str):
        self.package = package
        self.kind = kind
        self._classes: dict[str, type] = {}
        self._explicit: set[str] = set()
        if PLUGIN_PACKAGES.get(kind) == package:  # the plugin package's own registry, for plugin_class
            _REGISTRIES[kind] = self

    def register(self, cls: type, explicit: bool = False) -> type:
        """Add ``cls`` under its class name and return it. Without ``explicit`` (the automatic registration of
        every subclass) a class from outside the package is skipped; with it, it is added, replacing an earlier
        explicitly registered class of that name (a notebook cell run again).

        Raises:
            TypeError: the name belongs to another class of the package (or, automatically, is taken).
        """
        inside = cls.__module__.split(".")[0] == self.package
        if not inside and not explicit:
            return cls
        previous = self._classes.get(cls.__name__)
        if previous is not None and previous is not cls and not (explicit and cls.__name__ in self._explicit):
            raise TypeError(f"two {self.kind}s are named {cls.__name__} ({previous.__module__} and {cls.__module__})")
        self._classes[cls.__name__] = cls
        if explicit and not inside:
            self._explicit.add(cls.__name__)
        return cls

    def names(self) -> list[str]:
        """Sorted names of every class in the package."""
        self._import_package()
        return sorted(self._classes)

    def get(self, name: str) -> type:
        """The class called ``name``.

        Raises:
            KeyError: unknown name; the message lists the known ones.
        """
        self._import_package()
        if name not in self._classes:
            raise UnknownNameError(f"unknown {self.kind} '{name}'; available: {', '.join(sorted(self._classes))}")
        return self._classes[name]

    def _import_package(self) -> None:
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")


def plugin_class(kind: str, name: str) -> type:
    """The class called ``name`` of a plugin kind (``"planner"``, ``"trainer"``), its package imported by name.

    Example:
        >>> plugin_class("trainer", "ZoomInOutTrainer").__module__
        'trainers.residual_unet'

    Raises:
        UnknownNameError: unknown name; the message lists the known ones.
    """
    importlib.import_module(PLUGIN_PACKAGES[kind])  # its base class creates the kind's registry
    return _REGISTRIES[kind].get(name)
