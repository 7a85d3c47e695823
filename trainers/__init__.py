"""Trainer classes, chosen by name with ``autoseg_train -tr NAME`` (default: the plans' ``schedule.trainer``).

A trainer owns nothing but what differs between training recipes: the base class ``Trainer`` runs the loop,
``ResidualUNetTrainer`` (nnU-Net's SGD + poly recipe) and ``ZoomInOutTrainer`` (zoom-in&out stages, Adam with
cosine warm restarts, snapshots) fill in network, optimizer and learning-rate schedule. To add one, subclass a
trainer here in a module of this package; it registers itself under its class name. A trainer defined elsewhere
(a script, a notebook) is available by name once registered with ``register_trainer`` (also a class decorator);
names resolve to nothing else.
"""

from trainers.base import Trainer, TrainerSettings, available_trainers, get_trainer, register_trainer

__all__ = ["Trainer", "TrainerSettings", "available_trainers", "get_trainer", "register_trainer"]
