"""autoseg: a self-configuring pipeline for stroke lesion segmentation.

Stages, each in one module, each handing the next a file:

``dataset`` (raw folder) -> ``verify`` -> ``fingerprint`` (fingerprint.json) ->
``planners`` (plans.json) -> ``preprocessing`` (arrays + properties) -> training -> inference.
"""

#: The one version of autoseg (setup.py reads it; model files record it).
__version__ = "0.1.0"
