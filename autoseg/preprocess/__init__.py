"""Preprocessing: crop, normalize, resample and store each case, the inverse back to the input grid, mirror channels.
May import ``autoseg.data`` and everything below it."""
