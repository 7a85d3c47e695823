"""What each planned option changed on the cross-validation, for ``autoseg_find_best`` (``model_selection.json``).

An *option* is a member (configuration/trainer) that differs from its *baseline* member in one respect:

- ``symmetric channels``: ``3d_resunet_sym`` against ``3d_resunet`` (likewise ``2d_pspnet_sym``, and the
  ``_histeq`` twins), same trainer;
- ``histogram equalization``: ``NAME_histeq`` against ``NAME``, same trainer;
- ``trainer``: a configuration with another trainer (e.g. ``AcuteStrokeTrainer``) against the same configuration
  with its planned trainer (``schedule.trainer``).

Pairs are found from the configuration names (``autoseg.plans``: ``BASE[_sym][_histeq]``) and the trainer folders
under ``AUTOSEG_RESULTS/<dataset>/``. A pair is listed when at least one side was trained; for each,
:func:`describe_options` gives a verdict: ``kept`` (the candidate is among the members find_best chose) or
``dropped``, with the paired differences candidate − baseline in Dice, lesion-wise F1 and HD95 on the cases both
validated (under a challenge's protocol its metrics instead: Dice, lesion F1, volume difference and lesion count
difference, :func:`option_metrics`; each with a paired bootstrap 95% CI over cases,
:func:`autoseg.evaluate.evaluation.bootstrap_ci`, fixed seed);
``not trained`` or ``not planned`` with the commands that would make the comparison possible; ``left out`` when
both sides exist but ``-c``/``-tr`` excluded one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoseg.evaluate.evaluation import bootstrap_ci
from autoseg.evaluate.protocols import DEFAULT_PROTOCOL, Protocol, get_protocol
from autoseg.plans import Configuration, asymmetric_name, histeq_name, symmetric_name, zscore_name

__all__ = [
    "ALTERNATIVE_TRAINERS",
    "BOOTSTRAP",
    "OPTION_METRICS",
    "SYMMETRIC_BASES",
    "VERDICTS",
    "Pairing",
    "describe_options",
    "find_pairings",
    "option_metrics",
    "paired_differences",
]

Member = tuple[str, str]
"""(configuration, trainer)."""

#: Every verdict, in the order the options are listed.
VERDICTS = ("kept", "dropped", "not comparable", "left out", "not trained", "not planned")
#: Metrics compared per option under the autoseg protocol: name -> (label, unit, decimals).
OPTION_METRICS = {"dice": ("Dice", "", 3), "lesion_f1": ("lesion F1", "", 3), "hausdorff95": ("HD95", " mm", 1)}
#: How the metrics of the challenges' protocols are printed: name -> (label, unit, decimals).
_CHALLENGE_METRICS = {
    "dice": ("Dice", "", 3),
    "lesion_f1": ("lesion F1", "", 3),
    "volume_difference_ml": ("|volume diff.|", " ml", 3),
    "volume_difference_voxels": ("|volume diff.|", " voxels", 1),
    "lesion_count_difference": ("|lesion count diff.|", "", 2),
}
#: The paired bootstrap of every option: resamples of the cases, seed, coverage.
BOOTSTRAP = {"resamples": 1000, "seed": 0, "confidence": 0.95}
#: Configurations the planner can give symmetric channels (``autoseg.preprocess.symmetry``).
SYMMETRIC_BASES = ("3d_resunet", "2d_pspnet")
#: Recipes worth comparing with a network's planned trainer: the acute stroke paper's on a residual U-Net, the CTP
#: paper's cross-entropy variant on a PSPNet. Trainers run on a configuration are compared with its planned one too.
ALTERNATIVE_TRAINERS = {"ResidualUNet": ("AcuteStrokeTrainer",), "PSPNet": ("PSPNetCETrainer",)}


def _name(member: Member) -> str:
    return "/".join(member)


@dataclass(frozen=True)
class Pairing:
    """One option: ``candidate`` differs from ``baseline`` by ``option``; ``missing``: why the candidate's
    configuration is not in the plans (it cannot be trained before it is planned), None when it is."""

    option: str
    candidate: Member
    baseline: Member
    missing: str | None = None


def find_pairings(
    configurations: Mapping[str, Configuration],
    trained: Mapping[str, Sequence[str]],
    symmetry_reason: str | None = None,
) -> list[Pairing]:
    """Every option pair with at least one side trained.

    Args:
        configurations: name -> configuration, from the plans (the results' copies for trained configurations).
        trained: configuration -> trainers with cross-validation outputs.
        symmetry_reason: the plans' ``reasons.symmetry`` (why no symmetric configuration was planned).
    """
    names = sorted(set(configurations) | set(trained))

    def trainers(*names_: str) -> list[str]:
        return sorted({t for n in names_ for t in trained.get(n, ())})

    # Without any symmetric configuration the plans' reason says why (e.g. no mid-sagittal plane was found).
    ruled_out = None if any(c.symmetry is not None for c in configurations.values()) else symmetry_reason
    pairings = []
    for name in names:
        if zscore_name(asymmetric_name(name)) in SYMMETRIC_BASES and symmetric_name(name) != name:
            pairings += _variant_pairings(
                "symmetric channels",
                name,
                symmetric_name(name),
                configurations,
                trainers(name, symmetric_name(name)),
                ruled_out or f"{symmetric_name(name)} is not in the plans",
            )
        if histeq_name(name) != name:
            pairings += _variant_pairings(
                "histogram equalization",
                name,
                histeq_name(name),
                configurations,
                trainers(name, histeq_name(name)),
                f"{histeq_name(name)} is not in the plans (autoseg_plan --normalization histeq adds it)",
            )
        if name in configurations and trained.get(name):
            planned = configurations[name].schedule.trainer
            others = {*ALTERNATIVE_TRAINERS.get(configurations[name].network.architecture, ()), *trained[name]}
            pairings += [Pairing("trainer", (name, t), (name, planned)) for t in sorted(others - {planned})]
    return pairings


def _variant_pairings(
    option: str,
    baseline: str,
    candidate: str,
    configurations: Mapping[str, Configuration],
    trainers: Sequence[str],
    missing: str,
) -> list[Pairing]:
    if not trainers:
        return []
    if candidate not in configurations:
        return [Pairing(option, (candidate, t), (baseline, t), missing) for t in trainers]
    return [Pairing(option, (candidate, t), (baseline, t)) for t in trainers]


def option_metrics(protocol: str | Protocol = DEFAULT_PROTOCOL) -> dict[str, tuple[str, str, int]]:
    """The metrics an option is compared on: :data:`OPTION_METRICS` under the autoseg protocol, a challenge
    protocol's own metrics under it (name -> (label, unit, decimals))."""
    protocol = get_protocol(protocol)
    if not protocol.is_challenge:
        return dict(OPTION_METRICS)
    return {name: _CHALLENGE_METRICS[name] for name in protocol.metrics}


def paired_differences(
    candidate: Mapping[str, Mapping[str, float]],
    baseline: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str] = tuple(OPTION_METRICS),
) -> dict[str, Any]:
    """Candidate − baseline on the cases both validated, per metric of ``metrics`` (default :data:`OPTION_METRICS`;
    :func:`option_metrics` for a protocol).

    Args:
        candidate, baseline: case -> its metrics (:func:`autoseg.evaluate.metrics.score_case`, one value per metric by
            :func:`autoseg.evaluate.metrics.mean_over_labels`).
        metrics: the metrics to compare; each must be among every case's.

    Returns:
        ``cases`` (validated by both) and per metric ``mean`` of the differences, ``ci95`` (paired percentile
        bootstrap over cases, :data:`BOOTSTRAP`) and ``n`` (cases where both values are finite: HD95 is NaN where a
        mask is empty); mean and interval are None when ``n`` is 0.
    """
    cases = sorted(set(candidate) & set(baseline))
    result: dict[str, Any] = {"cases": len(cases)}
    for metric in metrics:
        differences = np.array([candidate[c][metric] - baseline[c][metric] for c in cases], np.float64)
        finite = differences[np.isfinite(differences)]
        low, high = bootstrap_ci(finite, BOOTSTRAP["resamples"], BOOTSTRAP["seed"], BOOTSTRAP["confidence"])
        result[metric] = {
            "mean": float(finite.mean()) if finite.size else None,
            "ci95": [low, high] if finite.size else None,
            "n": int(finite.size),
        }
    return result


def _signed(value: float, decimals: int) -> str:
    return f"{value:+.{decimals}f}".replace("-", "\u2212")


def describe_difference(metric: str, difference: Mapping[str, Any]) -> str:
    """E.g. ``Dice −0.030 [−0.080, +0.020]``, or ``HD95 n/a`` without a finite pair."""
    label, unit, decimals = {**_CHALLENGE_METRICS, **OPTION_METRICS}[metric]
    if difference["mean"] is None:
        return f"{label} n/a"
    low, high = difference["ci95"]
    return (
        f"{label} {_signed(difference['mean'], decimals)}{unit} [{_signed(low, decimals)}, {_signed(high, decimals)}]"
    )


def describe_options(
    pairings: Sequence[Pairing],
    dataset: str,
    available: Sequence[Member],
    compared: Sequence[Member],
    scores: Mapping[Member, Mapping[str, Mapping[str, float]]],
    chosen: Sequence[Member],
    metrics: Sequence[str] = tuple(OPTION_METRICS),
) -> list[dict[str, Any]]:
    """The ``options`` of ``model_selection.json``: one entry per pairing (see the module docstring).

    Entries (listed in the order of :data:`VERDICTS`): ``option``, ``candidate``, ``baseline`` (members as
    ``configuration/trainer``), ``verdict``, ``reason``; ``differences`` (:func:`paired_differences`) for compared
    pairs; ``commands`` for pairs not trained or not planned.

    Args:
        pairings: from :func:`find_pairings`.
        dataset: the dataset's folder name, for the commands.
        available: members with cross-validation outputs.
        compared: members find_best compared (``-c``/``-tr`` may leave some out).
        scores: member -> case -> its metrics (as for :func:`paired_differences`), for the compared members.
        chosen: the members find_best chose.
        metrics: the metrics the differences are given in (:func:`option_metrics` of the protocol).
    """
    entries = []
    for pairing in pairings:
        entry: dict[str, Any] = {
            "option": pairing.option,
            "candidate": _name(pairing.candidate),
            "baseline": _name(pairing.baseline),
        }
        absent = [m for m in (pairing.candidate, pairing.baseline) if m not in available]
        if pairing.missing is not None:  # symmetric channels the fingerprint ruled out cannot be asked for
            histeq = pairing.option == "histogram equalization"
            entry.update(
                verdict="not planned",
                reason=f"not planned: {pairing.missing}",
                commands=_commands(dataset, absent, plan=True) if histeq else [],
            )
        elif absent:
            entry.update(
                verdict="not trained",
                reason=f"not trained: no cross-validation outputs of {' and '.join(map(_name, absent))}",
                commands=_commands(dataset, absent),
            )
        elif not all(m in compared for m in (pairing.candidate, pairing.baseline)):
            entry.update(verdict="left out", reason="left out: not among the members compared (-c/-tr)")
        else:
            entry.update(_verdict(pairing, scores, chosen, metrics))
        entries.append(entry)
    return sorted(entries, key=lambda e: VERDICTS.index(e["verdict"]))  # what was compared first


def _commands(dataset: str, members: Sequence[Member], plan: bool = False) -> list[str]:
    commands = [f"autoseg_plan -d {dataset} --normalization histeq"] if plan else []
    return commands + [f"autoseg_train -d {dataset} -c {c} -f all -tr {t}" for c, t in members]


def _verdict(
    pairing: Pairing,
    scores: Mapping[Member, Mapping[str, Mapping[str, float]]],
    chosen: Sequence[Member],
    metrics: Sequence[str] = tuple(OPTION_METRICS),
) -> dict[str, Any]:
    differences = paired_differences(scores[pairing.candidate], scores[pairing.baseline], metrics)
    cases = differences["cases"]
    if not cases:
        return {
            "verdict": "not comparable",
            "reason": "not comparable: no case was validated by both",
            "differences": differences,
        }
    dice_text = f"{describe_difference('dice', differences['dice'])} on {cases} case{'s' * (cases != 1)}"
    winner = " + ".join(map(_name, chosen))
    gain = differences["dice"]["mean"]
    if pairing.candidate in chosen and (len(chosen) == 1 or gain is None or math.isnan(gain) or gain > 0):
        verdict, reason = "kept", f"kept: {dice_text}; in the chosen {winner}"
    elif pairing.candidate in chosen:
        verdict, reason = (
            "kept",
            (
                f"kept as a member of the chosen ensemble {winner}, although alone it scores "
                f"below its baseline: {dice_text}"
            ),
        )
    elif gain is not None and not math.isnan(gain) and gain > 0:
        verdict, reason = "dropped", f"dropped: {dice_text}, but the chosen {winner} scored higher"
    else:
        verdict, reason = "dropped", f"dropped: {dice_text}"
    return {"verdict": verdict, "reason": reason, "differences": differences}
