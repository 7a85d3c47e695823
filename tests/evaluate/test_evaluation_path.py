"""One evaluation path: end-of-fold validation, ``autoseg_find_best`` and ``autoseg_evaluate`` score a case alike.

All three score with ``autoseg.evaluate.metrics.score_case`` (each label as ``== label``). These tests run them on the same
predictions, the session's tiny trained folds (conftest ``tiny_model_home``), and on a two-label version of them
where the union ``> 0`` and ``== label`` disagree, with the right values recomputed independently with numpy.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from autoseg.api.predict_models import load_model
from autoseg.api.select import find_best
from autoseg.evaluate.evaluation import evaluate_folders
from autoseg.infer.postprocessing import postprocess_probabilities
from autoseg.infer.predictor import Predictor
from autoseg.io.files import read_json, write_json
from autoseg.io.images import read_image, write_image
from autoseg.plans import Plans
from autoseg.preprocess.cases import load_case
from autoseg.train.validation import validate_cases

NAME = "Dataset961_ATLASPredict"  # what conftest's tiny_model_home trains, with TRAINER
TRAINER = "ResidualUNetTrainer"
CONFIGURATION = "3d_resunet"
FOLDS = (0, 1)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _folder(home: Path, fold: int) -> Path:
    return home / "results" / NAME / CONFIGURATION / TRAINER / f"fold_{fold}" / "validation"


def _evaluate(home: Path, fold: int, tmp_path: Path, label: int) -> dict[str, dict[str, float]]:
    """``autoseg_evaluate`` of a fold's validation predictions against the raw labels of its cases."""
    summary = read_json(_folder(home, fold) / "summary.json")
    references = tmp_path / f"references_{fold}"
    references.mkdir(exist_ok=True)
    for case in summary["cases"]:
        shutil.copy(home / "raw" / NAME / "labelsTr" / f"{case}.nii.gz", references)
    result = evaluate_folders(references, _folder(home, fold), label=label, num_bootstrap=10, progress=False)
    return result.per_case.to_dict(orient="index")


def _same(written: float | None, computed: float) -> bool:
    """A value of summary.json (NaN written as null) equals one computed here."""
    return math.isnan(computed) if written is None else written == computed


def _assert_evaluate_agrees(summary: dict, evaluated: dict[str, dict[str, float]]) -> None:
    """Each case's values in a validation summary are ``autoseg_evaluate``'s for the same prediction and label."""
    assert sorted(evaluated) == sorted(summary["cases"]) and evaluated
    for case, written in summary["cases"].items():
        for metric in ("dice", "hausdorff95", "lesion_f1"):
            assert _same(written[metric], evaluated[case][metric]), (case, metric, written, evaluated[case])
        assert written["reference_voxels"] == evaluated[case]["tp_voxels"] + evaluated[case]["fn_voxels"]
        assert written["predicted_voxels"] == evaluated[case]["tp_voxels"] + evaluated[case]["fp_voxels"]


def test_validation_evaluate_and_find_best_agree_on_the_trained_folds(trained_home: Path, tmp_path: Path) -> None:
    # as trained, at the plans' post-processing (which removes lesions below its min_lesion_mm3)
    for fold in FOLDS:
        summary = read_json(_folder(trained_home, fold) / "summary.json")
        assert summary["postprocessing"]["min_lesion_mm3"] > 0
        _assert_evaluate_agrees(summary, _evaluate(trained_home, fold, tmp_path, label=1))

    # find_best compares members at the plans' threshold without a minimum size: validated that way, the same
    # predictions score the same on all three paths (find_best remaking them from the .npz files)
    validation_dice = []
    for fold in FOLDS:
        model = load_model(NAME, CONFIGURATION, TRAINER, folds=[fold])
        planned = model.plans.configuration(CONFIGURATION)
        configuration = dataclasses.replace(
            planned, postprocessing=dataclasses.replace(planned.postprocessing, min_lesion_mm3=0.0)
        )
        folder = _folder(trained_home, fold)
        cases = sorted(read_json(folder / "summary.json")["cases"])
        references = {case: trained_home / "raw" / NAME / "labelsTr" / f"{case}.nii.gz" for case in cases}
        summary = validate_cases(
            Predictor(configuration, model.networks, device="cpu"),
            trained_home / "preprocessed" / NAME / planned.data_identifier,
            cases,
            references,
            folder,
        )
        _assert_evaluate_agrees(read_json(folder / "summary.json"), _evaluate(trained_home, fold, tmp_path, label=1))
        validation_dice += [summary["cases"][case]["dice"] for case in cases]
    selection = find_best(metric="dice", progress=False)
    assert selection["cases"] == len(validation_dice)
    assert selection["candidates"][0]["mean_dice"] == pytest.approx(np.mean(validation_dice), abs=1e-12)
    default = next(g for g in selection["grid"] if g["threshold"] == 0.5 and g["min_lesion_voxels"] == 0)
    assert default["score"] == pytest.approx(np.mean(validation_dice), abs=1e-12)


def _declare(home: Path, labels: dict[str, int]) -> None:
    """Declare ``labels`` in the raw dataset's ``dataset.json``."""
    path = home / "raw" / NAME / "dataset.json"
    write_json({**read_json(path), "labels": labels}, path)


def test_a_dataset_declared_0_255_is_validated_and_selected_as_0_1(trained_home: Path, tmp_path: Path) -> None:
    """Reference lesions stored as 255 (declared so) and the predictions written back as 255: validation counts
    every reference voxel (it counted none), and the scores of validation and find_best are those of the same
    predictions against the 0/1 references."""
    model = load_model(NAME, CONFIGURATION, TRAINER, folds=[0])
    configuration = model.plans.configuration(CONFIGURATION)
    folder = _folder(trained_home, 0)
    cases = sorted(read_json(folder / "summary.json")["cases"])
    labels_folder = trained_home / "raw" / NAME / "labelsTr"
    references = {case: labels_folder / f"{case}.nii.gz" for case in cases}
    data_folder = trained_home / "preprocessed" / NAME / configuration.data_identifier

    def validate(labels: dict[str, int]) -> dict:
        predictor = Predictor(configuration, model.networks, device="cpu")
        return validate_cases(predictor, data_folder, cases, references, folder, labels=labels)

    as_one = validate({"background": 0, "lesion": 1})
    predicted = {case: read_image(folder / f"{case}.nii.gz", np.uint8)[0] for case in cases}
    selected_as_one = find_best(metric="dice", progress=False)
    lesion_voxels = {}
    for path in sorted(labels_folder.iterdir()):  # every case: find_best scores fold 1's too
        reference, geometry = read_image(path, np.uint8, canonical=False)
        write_image(np.where(reference > 0, 255, 0).astype(np.uint8), geometry, path)
        lesion_voxels[path.name.removesuffix(".nii.gz")] = int(np.count_nonzero(read_image(path, np.float64)[0] == 255))
    _declare(trained_home, {"background": 0, "lesion": 255})
    as_255 = validate({"background": 0, "lesion": 255})
    for case in cases:
        assert as_255["cases"][case]["reference_voxels"] == lesion_voxels[case] > 0
        assert as_255["cases"][case] == as_one["cases"][case]
        written = read_image(folder / f"{case}.nii.gz", np.float64)[0]
        np.testing.assert_array_equal(written, predicted[case] * 255.0)
    selection = find_best(metric="dice", progress=False)
    assert selection["candidates"] == selected_as_one["candidates"] and selection["grid"] == selected_as_one["grid"]


def _two_labels(lesion: np.ndarray, axis: int) -> np.ndarray:
    """``lesion`` split in two halves along ``axis`` at its centre: label 1 below, 2 from it on."""
    labels = np.zeros(lesion.shape, np.uint8)
    if lesion.any():
        centre = int(np.round(np.nonzero(lesion)[axis].mean()))
        shape = [1] * lesion.ndim
        shape[axis] = lesion.shape[axis]
        below = (np.arange(lesion.shape[axis]) < centre).reshape(shape)
        labels[lesion & below] = 1
        labels[lesion & ~below] = 2
    return labels


class _Replay:
    """A stand-in for :class:`autoseg.infer.predictor.Predictor`: hands out the given (K, X', Y', Z') probabilities in turn
    (validate_cases predicts the cases in the order given) and post-processes at ``threshold`` without a minimum."""

    def __init__(self, outputs: list[np.ndarray], threshold: float) -> None:
        self.outputs, self.threshold = iter(outputs), threshold
        self.configuration = SimpleNamespace(postprocessing=SimpleNamespace(threshold=threshold))

    def predict_preprocessed(self, data: np.ndarray, agreement: object = None) -> np.ndarray:
        return next(self.outputs)  # no views: the agreement between mirrorings stays unmeasured

    def postprocess(self, probabilities: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
        return postprocess_probabilities(probabilities, spacing, self.threshold)


def _numpy_dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    both = int(prediction.sum()) + int(reference.sum())
    return 1.0 if both == 0 else 2.0 * int((prediction & reference).sum()) / both


def test_two_labels_are_scored_label_by_label_on_every_path(trained_home: Path, tmp_path: Path) -> None:
    """The prediction splits each lesion across x, the reference across y: the union ``> 0`` scores the lesion as
    found, ``== label`` scores each half-overlapping label; validation, evaluate and find_best all say the latter."""
    plans = Plans.from_json(trained_home / "preprocessed" / NAME / "plans.json")
    configuration = plans.configuration(CONFIGURATION)
    data_folder = trained_home / "preprocessed" / NAME / configuration.data_identifier
    labels_folder = trained_home / "raw" / NAME / "labelsTr"
    threshold = configuration.postprocessing.threshold
    labels = {"background": 0, "lower": 1, "upper": 2}
    _declare(trained_home, labels)
    validation_dice, union_dice = [], []
    for fold in FOLDS:
        cases = sorted(read_json(_folder(trained_home, fold) / "summary.json")["cases"])
        outputs = []
        for case in cases:
            reference, geometry = read_image(labels_folder / f"{case}.nii.gz", np.uint8)
            write_image(_two_labels(reference > 0, axis=1), geometry, labels_folder / f"{case}.nii.gz")
            _, seg, _ = load_case(data_folder, case, mmap=False)
            predicted = _two_labels(seg > 0, axis=0)
            outputs.append(np.stack([0.1 + 0.8 * (predicted == k) for k in (1, 2)]).astype(np.float32))
        predictor = _Replay(outputs, threshold)
        references = {case: labels_folder / f"{case}.nii.gz" for case in cases}
        summary = validate_cases(predictor, data_folder, cases, references, _folder(trained_home, fold), labels=labels)
        evaluated = {label: _evaluate(trained_home, fold, tmp_path, label) for label in (1, 2)}
        for case in cases:
            prediction = read_image(_folder(trained_home, fold) / f"{case}.nii.gz", np.uint8)[0]
            reference = read_image(labels_folder / f"{case}.nii.gz", np.uint8)[0]
            written = summary["cases"][case]
            right = [_numpy_dice(prediction == k, reference == k) for k in (1, 2)]
            for label in (1, 2):
                per_label = written["labels"][str(label)]
                assert per_label["dice"] == pytest.approx(right[label - 1], abs=1e-12)
                for metric in ("dice", "hausdorff95", "lesion_f1"):
                    assert _same(per_label[metric], evaluated[label][case][metric]), (case, label, metric)
            assert written["dice"] == pytest.approx(np.mean(right), abs=1e-12)
            validation_dice.append(written["dice"])
            union_dice.append(_numpy_dice(prediction > 0, reference > 0))
    # the two readings really disagree here: the union finds the lesions, the labels overlap by about half
    assert np.mean(union_dice) > 0.8 and np.mean(validation_dice) < 0.7
    selection = find_best(metric="dice", progress=False)
    assert selection["candidates"][0]["mean_dice"] == pytest.approx(np.mean(validation_dice), abs=1e-12)
