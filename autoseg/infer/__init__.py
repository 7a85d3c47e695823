"""Inference: sliding-window prediction, ensembles and test-time mirroring, post-processing of probabilities.
May import ``autoseg.networks``, ``autoseg.preprocess`` and everything below them."""
