"""autoseg: a self-configuring pipeline for stroke lesion segmentation.

Packages by stage, in the order data flows, each handing the next a file (the map, with what each may import:
documentation/overview.md): ``data`` (raw folder, verification) -> ``plan`` (fingerprint.json, plans.json, with the
``planners``) -> ``preprocess`` (arrays + properties) -> ``train`` (with the ``trainers``) -> ``infer`` ->
``evaluate``; ``io`` reads and writes files for all of them, ``api`` is what each command calls.
"""

#: The one version of autoseg (setup.py reads it; model files record it).
__version__ = "0.1.0"
