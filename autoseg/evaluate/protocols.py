"""The evaluation protocols of ``autoseg_evaluate --protocol`` and ``autoseg_find_best --protocol``: what a case is
scored with, and where that convention comes from.

A protocol fixes the metrics of a case, how lesions are counted (the connectivity of a lesion's voxels), the unit of
the volume difference and the values given to empty masks. ``autoseg`` is autoseg's own set
(:mod:`autoseg.evaluate.metrics`); ``isles22`` and ``atlas2`` reproduce the published evaluation code of the two
challenges, so that a mean over cases can be set beside the challenge's tables. The scoring itself is
:func:`autoseg.evaluate.metrics.score_case` with ``protocol=``; this module only describes the protocols.

The two challenges score a case alike in most respects: Dice 2|P∩R| / (|P| + |R|); a reference lesion (connected
component) is found (TP) if any predicted voxel overlaps it, else missed (FN); a predicted component that overlaps
no reference voxel is a false positive (FP); lesion F1 = TP / (TP + (FP + FN) / 2); the lesion count difference
|N_prediction - N_reference|; both masks empty gives Dice 1 and lesion F1 1, exactly one empty gives 0. They differ
in the connectivity of a lesion and the unit of the volume difference:

==========  ===========================  ==================================================================
protocol    lesion connectivity (3-D)    volume difference
==========  ===========================  ==================================================================
autoseg     26 (faces, edges, corners)   ``volume_difference_mm3``: |V_P - V_R| in mm³, and the relative one
isles22     26 (faces, edges, corners)   ``volume_difference_ml``: |V_P - V_R| in ml (voxel volume from the
                                         image's spacing, mm³ / 1000)
atlas2      6 (faces only)               ``volume_difference_voxels``: |N_P - N_R| in voxels
==========  ===========================  ==================================================================

Two voxels that touch only at an edge or a corner are one lesion with 26-connectivity and two with 6-connectivity,
so the ATLAS R2.0 code counts more lesions in a ragged mask, and its lesion F1 is usually lower.

Sources (read 2026-12; each protocol's ``sources`` names them, and ``summary.json`` repeats them):

- ISLES 2022: github.com/ezequieldlrosa/isles22, ``utils/eval_utils.py`` (commit a078995, 2022-06-09):
  ``compute_dice``, ``compute_absolute_volume_difference`` (ml), ``compute_absolute_lesion_difference`` and
  ``compute_lesion_f1_score``, components by ``cc3d.connected_components(connectivity=26)``, the voxel volume
  ``prod(header zooms) / 1000`` (``utils/isles22_evaluate.ipynb``); the grand-challenge container
  github.com/ezequieldlrosa/isles22_docker_evaluation, ``eval_metrics_isles.py`` and ``evaluation.py`` (commit
  8930df9), the same functions with ``scipy.ndimage.label`` and a 3x3x3 structure of ones (26-connectivity, although
  its comment says 18) and the voxel volume |det(affine[:3, :3])| / 1000 ml of the prediction image.
- ATLAS R2.0: github.com/npnl/atlas2_grand_challenge, ``isles/scoring.py``, ``settings.py`` and ``evaluation.py``
  (commit 55b9524, 2022-06-22; commit 129631c removed its cc3d dependency): ``dice_coef``, ``volume_difference``,
  ``simple_lesion_count_difference`` and ``lesion_f1_score``, called with ``batchwise=True``, components by
  ``scipy.ndimage.label`` with its default structure (6-connectivity); atlas.grand-challenge.org/Evaluation
  ("Volume Difference ... Measured in voxels"). The non-batchwise ``volume_difference`` of that file compares the
  prediction with itself (always 0); the evaluation calls the batchwise one, which this protocol reproduces.

The MICCAI 2022 challenges ranked teams by the mean rank over these metrics (atlas.grand-challenge.org/Evaluation,
"ISLES'22/ATLAS/MICCAI Score": "The overall rank is the mean rank across the metrics"); ``autoseg_find_best
--protocol`` ranks post-processing settings that way (``autoseg.api.select``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autoseg.errors import UnknownNameError

__all__ = ["DEFAULT_PROTOCOL", "HIGHER_IS_BETTER", "PROTOCOLS", "Protocol", "get_protocol"]


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol: its metrics, conventions and sources (see the module docstring).

    Attributes:
        name: the ``--protocol`` value.
        title: what it reproduces, in words.
        metrics: the per-case metrics summarised (``summary.json``, the terminal table, the results page), in the order
            the protocol's own code reports them.
        lesion_connectivity: neighbours of a voxel that join it to a lesion in 3-D: 6 (faces) or 26 (faces, edges and
            corners). autoseg's own protocol uses 8 in 2-D; the challenge protocols score 3-D masks only.
        volume_unit: unit of the volume difference: ``mm3``, ``ml`` or ``voxels``.
        empty_masks: the values given where a mask is empty, in words.
        official_names: metric -> its name in the protocol's own code or results table (empty for ``autoseg``).
        sources: repository, file and commit (or page) each convention was taken from.
    """

    name: str
    title: str
    metrics: tuple[str, ...]
    lesion_connectivity: int
    volume_unit: str
    empty_masks: str
    official_names: dict[str, str] = field(default_factory=dict)
    sources: tuple[str, ...] = ()

    @property
    def volume_metric(self) -> str:
        """The per-case column of the absolute volume difference, e.g. ``volume_difference_ml``."""
        return f"volume_difference_{self.volume_unit}"

    @property
    def is_challenge(self) -> bool:
        """Whether the protocol reproduces a challenge's evaluation (its metrics only, on 3-D masks)."""
        return self.name != DEFAULT_PROTOCOL

    def describe(self) -> str:
        """One line for the terminal and the results page, e.g. ``atlas2 (ATLAS R2.0 ...): lesions 6-connected, ...``."""
        unit = {"mm3": "mm³", "ml": "ml", "voxels": "voxels"}[self.volume_unit]
        return (
            f"{self.name} ({self.title}): lesions {self.lesion_connectivity}-connected, volume difference in {unit}; "
            f"{self.empty_masks}"
        )

    def to_json(self) -> dict[str, Any]:
        """What ``summary.json`` and ``model_selection.json`` record under ``protocol``."""
        return {
            "name": self.name,
            "title": self.title,
            "metrics": list(self.metrics),
            "lesion_connectivity": self.lesion_connectivity,
            "volume_unit": self.volume_unit,
            "empty_masks": self.empty_masks,
            "official_names": dict(self.official_names),
            "sources": list(self.sources),
        }


#: The protocol used when none is named: autoseg's own metrics.
DEFAULT_PROTOCOL = "autoseg"
#: Metrics where a larger value is better; for every other metric of a protocol a smaller one is.
HIGHER_IS_BETTER = frozenset({"dice", "max_dice", "sensitivity", "precision", "dice_hd_score", "lesion_f1"})

_CHALLENGE_EMPTY = "both masks empty: Dice 1, lesion F1 1; exactly one empty: Dice 0, lesion F1 0"

#: Every protocol by name.
PROTOCOLS: dict[str, Protocol] = {
    "autoseg": Protocol(
        name="autoseg",
        title="autoseg's own metrics, documentation/evaluation.md",
        metrics=(
            "dice",
            "max_dice",
            "sensitivity",
            "precision",
            "hausdorff",
            "hausdorff95",
            "assd",
            "dice_hd_score",
            "volume_difference_mm3",
            "relative_volume_difference",
            "lesion_f1",
            "lesion_count_difference",
        ),
        lesion_connectivity=26,
        volume_unit="mm3",
        empty_masks="both masks empty: Dice 1, distances 0; exactly one empty: Dice 0, distances NaN (left out of means)",
        sources=("autoseg/evaluate/metrics.py",),
    ),
    "isles22": Protocol(
        name="isles22",
        title="ISLES 2022 challenge evaluation",
        metrics=("dice", "volume_difference_ml", "lesion_count_difference", "lesion_f1"),
        lesion_connectivity=26,
        volume_unit="ml",
        empty_masks=_CHALLENGE_EMPTY,
        official_names={
            "dice": "Dice",
            "volume_difference_ml": "Volume_difference",
            "lesion_count_difference": "Lesion_count_difference",
            "lesion_f1": "Lesion_F1_score",
        },
        sources=(
            "github.com/ezequieldlrosa/isles22 utils/eval_utils.py (commit a078995, 2022-06-09)",
            "github.com/ezequieldlrosa/isles22_docker_evaluation eval_metrics_isles.py, evaluation.py (commit 8930df9)",
        ),
    ),
    "atlas2": Protocol(
        name="atlas2",
        title="ATLAS R2.0 grand challenge evaluation",
        metrics=("dice", "volume_difference_voxels", "lesion_count_difference", "lesion_f1"),
        lesion_connectivity=6,
        volume_unit="voxels",
        empty_masks=_CHALLENGE_EMPTY,
        official_names={
            "dice": "Dice",
            "volume_difference_voxels": "Volume Difference",
            "lesion_count_difference": "Simple Lesion Count",
            "lesion_f1": "Lesionwise F1-Score",
        },
        sources=(
            "github.com/npnl/atlas2_grand_challenge isles/scoring.py, settings.py, evaluation.py "
            "(commit 55b9524, 2022-06-22)",
            "atlas.grand-challenge.org/Evaluation",
        ),
    ),
}


def get_protocol(protocol: str | Protocol) -> Protocol:
    """The protocol of that name (a :class:`Protocol` is returned as it is).

    Raises:
        UnknownNameError: no protocol of that name; the message lists the known ones.
    """
    if isinstance(protocol, Protocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise UnknownNameError(f"unknown evaluation protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[protocol]
