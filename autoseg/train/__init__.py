"""Training components: losses, patch sampling, augmentation, data loading, the log, early stopping, the run lock,
splits and the time promise; and what the trainers' loop calls: the run length, checkpoints, validation, the
handlers attached to the loop (``events``) and the compute budget's choices for this machine (``resources``).
May import ``autoseg.evaluate`` and everything below it."""
