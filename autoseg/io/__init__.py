"""Reading and writing files: images (array order and spacing fixed in ``images``), their headers, JSON and arrays,
checkpoints. Imports only the shared basics (``autoseg.errors``, ``autoseg.machine``, ...); every import names its module."""
