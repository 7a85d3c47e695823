"""Evaluation: metrics, the evaluation of predictions against labels, the results page and its plots, option effects.
May import ``autoseg.infer`` and everything below it."""
