"""Planner classes, chosen by name with ``autoseg_plan -pl NAME``.

A planner turns a dataset fingerprint into ``Plans``. To add one, subclass ``Planner`` (or a planner
here) in a module of this package; it registers itself under its class name. A planner defined elsewhere (a
script, a notebook) is available by name once registered with ``register_planner`` (also a class decorator);
names resolve to nothing else.
"""

from planners.base import Planner, available_planners, get_planner, register_planner

__all__ = ["Planner", "available_planners", "get_planner", "register_planner"]
