"""One-file models: ``autoseg_export`` and ``autoseg_import`` as a library.

:func:`export_model` writes the trained members of one dataset into a zip whose entries have the layout of
``AUTOSEG_RESULTS/<dataset>/``, so that installing it is a plain extraction:

``manifest.json``
    ``format`` (:data:`MANIFEST_FORMAT`), ``autoseg_version``, ``created`` (UTC, ISO 8601), ``dataset``, ``members``
    (``configuration/trainer``), ``folds`` per member, ``checkpoint`` (``final``, ``best`` or ``snapshots``),
    ``network_options`` per fold folder (``CONFIGURATION/TRAINER/fold_K``: the keyword arguments of
    ``autoseg.networks.build_network`` its network was built with, as its checkpoints record them; a model file from
    before they were recorded has none, and its trainers' built-in ones apply,
    ``autoseg.networks.factory.BUILT_IN_NETWORK_OPTIONS``) and ``files``: the SHA-256 and size in bytes of every
    other entry.
``CONFIGURATION/TRAINER/fold_K/plans.json`` and ``checkpoint_*.pth``
    each member fold's plans and the checkpoints prediction uses, re-saved weights-only: the network's state dict
    and a few plain values (trainer, configuration, fold, epoch, network options), no optimizer state, random generator states or
    training history.
``postprocessing.json``
    when ``autoseg_find_best`` tuned it for exactly the exported members; ``model_selection.json`` when the
    members came from it.
``fingerprint_summary.json``
    the dataset-wide figures the planner read from ``fingerprint.json`` (channels and intensity statistics, labels,
    the aggregate of spacings, shapes, lesions and symmetry) and ``training_ranges``, the (min, max) over the
    training cases that ``autoseg_predict`` checks new cases against (``autoseg.api.input_checks``); nothing per
    case: case names and per-case figures can identify patients.
``dataset.json``
    channel names, labels and the file ending: what a user needs to name the scans to predict.

:func:`import_model` checks a zip before anything is installed: a readable manifest of a format this autoseg reads,
every entry a file of the layout above and listed in the manifest with the right SHA-256 and size (no absolute path,
no ``..``, no link, nothing that would land outside the target folder), every member bringing its checkpoints and
every checkpoint its ``plans.json``; the sizes the zip declares against limits (:data:`MAX_JSON_BYTES`,
:data:`MAX_CHECKPOINT_BYTES`, :data:`MAX_COMPRESSION_RATIO`, the disk's free space) before anything is read; every
``plans.json`` valid (``Plans.from_json``, with its limits) and ``postprocessing.json`` too; each checkpoint's size
against the network its plans describe before it is extracted, then its tensors (read with
``torch.load(..., weights_only=True)``) against that network's names, shapes and dtypes. ``postprocessing.json``
and ``model_selection.json`` are accepted only for exactly the zip's members and never replace an installed one of
other members: a model file changes nothing of a member it does not bring. It then extracts into a locked temporary
folder beside ``AUTOSEG_RESULTS/<dataset>/`` (never more bytes than an entry declares) and renames it (or each fold
folder and file) into place, so a refused or interrupted import leaves nothing half-written; the next import removes
temporary folders a killed one left. A fold folder or file that already exists with other content is refused unless
``overwrite``; an identical install is checked as a new one would be, and reused as it is.

``autoseg_predict -m model.zip`` calls :func:`install_for_prediction`: the zip is imported into
``AUTOSEG_RESULTS`` as by ``autoseg_import`` (or an identical install found there) and predicted with its own
members, folds and checkpoints. Prediction reads nothing from ``AUTOSEG_RAW`` or ``AUTOSEG_PREPROCESSED``.

Modules: ``layout`` (entry names, :class:`ModelFileError`, what export and import return), ``export``
(:func:`export_model`), ``archive`` (the zip's checks before anything is read out: manifest, entries, declared
sizes, checksums), ``contents`` (plans, networks, checkpoints, post-processing and model selection as extracted),
``install`` (:func:`import_model`, :func:`install_for_prediction`: staging, extraction, moving into place).
"""

from autoseg.api.model_files.archive import MAX_CHECKPOINT_BYTES, MAX_COMPRESSION_RATIO, MAX_JSON_BYTES
from autoseg.api.model_files.contents import CHECKPOINT_OVERHEAD_BYTES
from autoseg.api.model_files.export import export_model, summarize_fingerprint
from autoseg.api.model_files.install import STALE_IMPORT_SECONDS, import_model, install_for_prediction
from autoseg.api.model_files.layout import MANIFEST_FILE, MANIFEST_FORMAT, ExportedModel, InstalledModel, ModelFileError

__all__ = [
    "CHECKPOINT_OVERHEAD_BYTES",
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "MAX_CHECKPOINT_BYTES",
    "MAX_COMPRESSION_RATIO",
    "MAX_JSON_BYTES",
    "STALE_IMPORT_SECONDS",
    "ExportedModel",
    "InstalledModel",
    "ModelFileError",
    "export_model",
    "import_model",
    "install_for_prediction",
    "summarize_fingerprint",
]
