"""Training components: losses, patch sampling, augmentation, data loading, the log, early stopping, the run lock,
splits and the time promise. May import ``autoseg.evaluate`` and everything below it."""
