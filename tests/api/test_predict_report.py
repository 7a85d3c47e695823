"""The review page of a prediction run (``autoseg_predict --report``, ``autoseg.api.predict_report``), on generated
output folders that follow the lesion report's contract: flagged cases first, then by QC score; each case's numbers,
reasons and warnings; overlays through the largest lesions (the central slice of an empty prediction) in the stated
convention and whatever the stored orientation, with the uncertainty where it was saved; nothing fetched from outside;
clear errors; and, in headless Chromium, that the page loads cleanly and shows it all."""

from __future__ import annotations

import base64
import html
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import nibabel
import numpy as np
import PIL.Image
import pytest
import SimpleITK as sitk
from matplotlib import colormaps
from scipy import ndimage

from autoseg.api.predict_outputs import LESION_REPORT_ENDING, write_lesion_tables
from autoseg.api.predict_report import (
    draw_overlay,
    load_run,
    review_page_path,
    write_review_page,
)
from autoseg.commands import predict as predict_command
from autoseg.errors import DataError, InvalidFileError, MissingFileError
from autoseg.io.files import OutputPathError
from autoseg.io.geometry import Geometry
from autoseg.io.images import write_image

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

SHAPE = (32, 36, 20)
#: Stored as LPS (SimpleITK's identity direction): stored x runs towards the patient's left.
GEOMETRY = Geometry(SHAPE, (1.5, 1.25, 2.5), (-24.0, -20.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
#: Case -> lesion balls (stored centre, radius in voxels), QC (score, review, reasons), input warnings, whether the
#: uncertainty map was saved, and the orientation the files are stored in (None: as GEOMETRY).
CASES: dict[str, dict[str, Any]] = {
    "unflagged": dict(balls=[((22, 18, 9), 3)], qc=(0.5, False, []), warnings=[], uncertainty=True, stored=None),
    "flagged": dict(
        balls=[((9, 14, 5), 4), ((22, 22, 14), 2)],
        qc=(0.3, True, ["members disagree (pairwise Dice 0.41)"]),
        warnings=[],
        uncertainty=True,
        stored=None,
    ),  # fmt: skip
    "empty": dict(balls=[], qc=(0.7, False, []), warnings=[], uncertainty=False, stored=None),
    "warned": dict(
        balls=[((20, 12, 11), 3)],
        qc=(0.55, True, ["volume 0.1 ml below the training range"]),
        warnings=[
            "spacing [1.5, 1.25, 2.5] mm outside the training range",
            "channel 0: 99th percentile 4.1 above the training range",
        ],
        uncertainty=False,
        stored="ASL",
    ),  # fmt: skip
}
#: The order the page must show them in: flagged first (by score), then the others by score.
EXPECTED_ORDER = ["flagged", "warned", "unflagged", "empty"]
FAILED = {"case": "broken", "files": ["/data/broken_0000.nii.gz"], "problem": "truncated or unreadable image"}


def _stored(path: Path, orientation: str | None) -> None:
    if orientation is not None:
        sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), orientation), str(path))


def _lesions_of(mask_path: Path) -> list[dict[str, Any]]:
    """The lesions of a written mask, computed here with SimpleITK and scipy (26-connected, largest first)."""
    image = sitk.ReadImage(str(mask_path))
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0) > 0  # (x, y, z) as stored
    labelled, count = ndimage.label(array, structure=np.ones((3, 3, 3)))
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000
    lesions = []
    for label in range(1, count + 1):
        component = labelled == label
        centre = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in ndimage.center_of_mass(component)])
        where = np.argwhere(component)
        lesions.append({
            "label": 1, "voxels": int(component.sum()), "volume_ml": float(component.sum()) * voxel_ml,
            "centroid_ras_mm": [-centre[0], -centre[1], centre[2]], "centroid_lps_mm": list(centre),
            "bounding_box": {"start": where.min(axis=0).tolist(), "stop": (where.max(axis=0) + 1).tolist()},
            "hemisphere": "left" if centre[0] > 0 else "right", "mean_probability": 0.8, "max_probability": 0.97,
        })  # fmt: skip
    lesions.sort(key=lambda lesion: -lesion["voxels"])
    return [{"index": index, **lesion} for index, lesion in enumerate(lesions, start=1)]


def _write_run(root: Path, cases: dict[str, dict[str, Any]] = CASES) -> Path:
    """Inputs under ``root/inputs`` and, under ``root/predictions``, what ``autoseg_predict`` writes by the lesion
    report's contract: masks, uncertainty maps, ``CASE_lesions.json``, the summary and the run's lesion tables."""
    inputs, output = root / "inputs", root / "predictions"
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    head = ((x - 15.5) / 14) ** 2 + ((y - 17.5) / 16) ** 2 + ((z - 9.5) / 9) ** 2 < 1
    rng = np.random.default_rng(0)
    per_case = {}
    for case, spec in cases.items():
        mask = np.zeros(SHAPE, np.uint8)
        for centre, radius in spec["balls"]:
            mask[(x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= radius**2] = 1
        image = (head * (100 + 10 * rng.standard_normal(SHAPE)) + 60 * mask).astype(np.float32)
        files = {"image": inputs / f"{case}_0000.nii.gz", "mask": output / f"{case}.nii.gz"}
        write_image(image, GEOMETRY, files["image"])
        write_image(mask, GEOMETRY, files["mask"])
        if spec["uncertainty"]:
            files["uncertainty"] = output / f"{case}_uncertainty.nii.gz"
            edge = ndimage.binary_dilation(mask, iterations=1) & ~ndimage.binary_erosion(mask, iterations=1)
            write_image((0.9 * edge + 0.05 * head).astype(np.float32), GEOMETRY, files["uncertainty"])
        for path in files.values():
            _stored(path, spec["stored"])
        lesions = _lesions_of(files["mask"])
        score, review, reasons = spec["qc"]
        report = {
            "case": case, "files": [str(files["image"].resolve())], "mask": files["mask"].name,
            "probabilities": None, "uncertainty": files["uncertainty"].name if "uncertainty" in files else None,
            "conventions": {"connectivity": 26, "volume": "ml = voxels x the input's voxel volume (mm3) / 1000"},
            "voxel_volume_ml": float(np.prod(GEOMETRY.spacing)) / 1000, "lesion_count": len(lesions),
            "total_volume_ml": sum(lesion["volume_ml"] for lesion in lesions), "lesions": lesions,
            "qc": {"score": score, "review": review, "reasons": reasons, "components": {}, "threshold": 0.6,
                   "calibrated": False},
            "input_warnings": spec["warnings"],
        }  # fmt: skip
        (output / f"{case}{LESION_REPORT_ENDING}").write_text(json.dumps(report), encoding="utf-8")
        per_case[case] = {"lesion_count": len(lesions), "total_volume_ml": report["total_volume_ml"],
                          "qc_score": score, "review": review, "input_warnings": spec["warnings"]}  # fmt: skip
    names = list(cases)
    summary = {
        "input": str(inputs), "list": None, "part": {"id": 0, "of": 1}, "cases": len(names) + 1,
        "counts": {"written": len(names) - 1, "skipped": 1, "failed": 1,
                   "review": sum(spec["qc"][1] for spec in cases.values()),
                   "input_warnings": sum(bool(spec["warnings"]) for spec in cases.values())},
        "written": names[:-1], "skipped": names[-1:], "failed": [FAILED], "stale_temporaries_removed": 0,
        "input_checks": {"against": "fingerprint.json"}, "per_case": per_case,
    }  # fmt: skip
    (output / "prediction_summary.json").write_text(json.dumps(summary), encoding="utf-8")
    write_lesion_tables([output / f"{case}{LESION_REPORT_ENDING}" for case in names], output)
    return output


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated output folder with its review page, shared by the tests that only read it."""
    output = _write_run(tmp_path_factory.mktemp("review"))
    assert write_review_page(output) == output / "report.html"
    return output


class _PageParser(HTMLParser):
    """Collects the case cards in page order (their data attributes and text), images, links and index rows."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict[str, Any]] = []
        self.images: list[dict[str, str | None]] = []
        self.links: list[str] = []
        self.index: list[str] = []
        self.failed: list[str] = []
        self._in_card = False
        self._in_index = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "article":
            self.cards.append({**attributes, "text": ""})
            self._in_card = True
        elif tag == "img":
            self.images.append(attributes)
            if self._in_card:
                self.cards[-1]["img"] = attributes
        elif tag == "a":
            self.links.append(attributes["href"])
            if self._in_index and attributes["href"].startswith("#case-"):
                self.index.append(attributes["href"])
        elif tag == "table" and attributes.get("class") == "index":
            self._in_index = True
        elif tag == "li" and "data-case" in attributes:
            self.failed.append(attributes["data-case"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "article":
            self._in_card = False
        elif tag == "table":
            self._in_index = False

    def handle_data(self, data: str) -> None:
        if self._in_card:
            self.cards[-1]["text"] += data


def _parse(page: Path) -> _PageParser:
    parser = _PageParser()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def _png(src: str) -> PIL.Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    return PIL.Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :]))).convert("RGB")


def _colour_map_pixels(picture: PIL.Image.Image) -> int:
    """Pixels of the uncertainty colour map (viridis, away from its darkest end), counted by colour."""
    entries = colormaps["viridis"](np.linspace(0.15, 1, 40))[:, :3] * 255
    pixels = np.asarray(picture, dtype=np.float32).reshape(-1, 3)
    distance = np.abs(pixels[:, None, :] - entries[None]).max(axis=2).min(axis=1)
    return int((distance <= 3).sum())


def test_cases_flagged_first_then_by_qc_score_with_their_numbers(run: Path) -> None:
    parsed = _parse(run / "report.html")
    assert [card["data-case"] for card in parsed.cards] == EXPECTED_ORDER
    assert parsed.index == [f"#case-{rank}" for rank in range(1, len(CASES) + 1)]
    for card in parsed.cards:
        report = json.loads((run / f"{card['data-case']}{LESION_REPORT_ENDING}").read_text())
        spec = CASES[card["data-case"]]
        assert card["data-review"] == str(spec["qc"][1]).lower()
        assert float(card["data-qc-score"]) == spec["qc"][0]
        assert int(card["data-lesions"]) == len(spec["balls"]) == report["lesion_count"]
        # the volume shown is the report's, which is an independent count on the mask times the voxel volume
        volume = sum(lesion["voxels"] for lesion in report["lesions"]) * np.prod(GEOMETRY.spacing) / 1000
        assert float(card["data-volume-ml"]) == pytest.approx(volume)
        assert f"{volume:.2f} ml" in card["text"]
        for line in spec["qc"][2] + spec["warnings"]:
            assert line in card["text"]
        assert int(card["data-warnings"]) == len(spec["warnings"])
        assert ("none" in card["text"]) == (not spec["warnings"])
    assert parsed.failed == ["broken"]
    text = html.unescape((run / "report.html").read_text(encoding="utf-8"))
    assert FAILED["problem"] in text
    assert "radiological convention: the patient's right on the left of the picture" in text


def test_overlays_are_embedded_and_go_through_the_largest_lesions(run: Path) -> None:
    parsed = _parse(run / "report.html")
    assert len(parsed.images) == len(CASES)
    for card in parsed.cards:
        case, image = card["data-case"], card["img"]
        picture = _png(image["src"])
        slices = [int(z) for z in image["data-slices"].split()]
        # Independently: the canonical (RAS) mask, its 26-connected lesions and their centroids' slices.
        canonical = sitk.DICOMOrient(sitk.ReadImage(str(run / f"{case}.nii.gz")), "RAS")
        mask = sitk.GetArrayFromImage(canonical).transpose(2, 1, 0) > 0
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        if count == 0:
            assert slices == [SHAPE[2] // 2]
        else:
            sizes = ndimage.sum(mask, labelled, range(1, count + 1))
            largest = np.argsort(-sizes)[:3] + 1
            expected = [int(round(ndimage.center_of_mass(labelled == label)[2])) for label in largest]
            assert slices == list(dict.fromkeys(expected))
            assert all(mask[:, :, z].any() for z in slices)
        # One row of panels, and a second of the uncertainty (with its colour map) where it was saved.
        rows = 2 if CASES[case]["uncertainty"] else 1
        assert picture.height / picture.width == pytest.approx(1.19 * rows / len(slices), rel=0.25)
        assert (_colour_map_pixels(picture) > 200) == CASES[case]["uncertainty"]
        assert any(pixel == (255, 0, 0) for _, pixel in picture.getcolors(1 << 16)) == bool(CASES[case]["balls"])


def test_page_is_self_contained_and_its_links_resolve(run: Path) -> None:
    page = run / "report.html"
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page.read_text(encoding="utf-8"))
    assert not re.search(r"https?:|//|file:", text, re.IGNORECASE)
    assert "<script" not in text and "<link" not in text and "@import" not in text and "url(" not in text
    assert "default-src 'none'" in text
    parsed = _parse(page)
    assert all(image["src"].startswith("data:image/png;base64,iVBORw0KGgo") for image in parsed.images)
    files = sorted(unquote(link) for link in parsed.links if not link.startswith("#"))
    masks = [f"{case}.nii.gz" for case in CASES] + [f"{c}_uncertainty.nii.gz" for c in CASES if CASES[c]["uncertainty"]]
    assert files == sorted(["prediction_summary.json", "lesions.csv", "lesion_table.csv", *masks])
    assert all((page.parent / file).is_file() for file in files)
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_a_reoriented_case_gets_the_same_overlay_as_its_canonical_copy(run: Path, tmp_path: Path) -> None:
    """The ``warned`` case is stored as ASL (sagittal): read in the canonical orientation, its overlay equals the one
    of a RAS-stored copy of the same files, pixel for pixel."""
    report = json.loads((run / f"warned{LESION_REPORT_ENDING}").read_text())
    copies = []
    for source in (Path(report["files"][0]), run / "warned.nii.gz"):
        target = tmp_path / source.name
        sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(source)), "RAS"), str(target))
        copies.append(target)
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        sitk.ReadImage(str(run / "warned.nii.gz")).GetDirection()
    ) == "ASL"  # fmt: skip
    stored = draw_overlay((Path(report["files"][0]), run / "warned.nii.gz", None, report["lesions"]))
    canonical = draw_overlay((copies[0], copies[1], None, _lesions_of(copies[1])))
    assert stored.slices == canonical.slices and stored.png == canonical.png


@pytest.mark.parametrize("convention, side", [("radiological", "right"), ("neurological", "left")])
def test_a_left_lesion_is_drawn_on_the_side_the_convention_says(run: Path, convention: str, side: str) -> None:
    """The ``unflagged`` case's lesion lies in the patient's left hemisphere (LPS x > 0): radiological shows it on the
    right of the picture, neurological on the left."""
    report = json.loads((run / f"unflagged{LESION_REPORT_ENDING}").read_text())
    assert report["lesions"][0]["centroid_lps_mm"][0] > 5
    overlay = draw_overlay((Path(report["files"][0]), run / "unflagged.nii.gz", None, report["lesions"]), convention)
    pixels = np.asarray(PIL.Image.open(io.BytesIO(overlay.png)).convert("RGB")).astype(int)
    head = np.flatnonzero((np.abs(pixels - 255).sum(axis=2) > 30).any(axis=0))  # columns that are not white
    red = np.flatnonzero(((pixels[:, :, 0] > 200) & (pixels[:, :, 1] < 60) & (pixels[:, :, 2] < 60)).any(axis=0))
    centre = (head[0] + head[-1]) / 2
    assert red.size and ((red.mean() > centre) == (side == "right"))
    assert abs(red.mean() - centre) > 0.15 * (head[-1] - head[0])


def test_a_run_without_uncertainty_and_a_part_page(tmp_path: Path) -> None:
    cases = {name: {**spec, "uncertainty": False} for name, spec in CASES.items()}
    output = _write_run(tmp_path, cases)
    summary = json.loads((output / "prediction_summary.json").read_text())
    part = output / "prediction_summary_part1of2.json"
    part.write_text(json.dumps({**summary, "part": {"id": 1, "of": 2}, "written": ["empty"], "skipped": [],
                                "failed": []}), encoding="utf-8")  # fmt: skip
    write_lesion_tables([output / f"empty{LESION_REPORT_ENDING}"], output, 2, 1)
    page = write_review_page(output, part)
    assert page == review_page_path(output, 2, 1) == output / "report_part1of2.html"
    parsed = _parse(page)
    assert [card["data-case"] for card in parsed.cards] == ["empty"] and parsed.failed == []
    links = [link for link in parsed.links if not link.startswith("#")]
    assert sorted(links) == sorted(
        [
            "prediction_summary_part1of2.json",
            "lesions_part1of2.csv",
            "lesion_table_part1of2.csv",
            "empty.nii.gz",
        ]
    )
    assert "2 of 2 (part id 1)" in page.read_text(encoding="utf-8")
    page = write_review_page(output, convention="neurological")
    parsed = _parse(page)
    assert [card["data-case"] for card in parsed.cards] == EXPECTED_ORDER
    assert all(_colour_map_pixels(_png(image["src"])) == 0 for image in parsed.images)
    assert "neurological convention: the patient's right on the right of the picture" in html.unescape(page.read_text())


def _drop_report(output: Path) -> None:
    (output / f"warned{LESION_REPORT_ENDING}").unlink()


def _break_report(output: Path) -> None:
    path = output / f"flagged{LESION_REPORT_ENDING}"
    report = json.loads(path.read_text())
    del report["qc"]["review"]
    path.write_text(json.dumps(report))


def _move_input(output: Path) -> None:
    report = json.loads((output / f"empty{LESION_REPORT_ENDING}").read_text())
    Path(report["files"][0]).unlink()


def _shift_uncertainty(output: Path) -> None:
    moved = Geometry(SHAPE, GEOMETRY.spacing, (0.0, 0.0, 0.0), GEOMETRY.direction)
    write_image(np.zeros(SHAPE, np.float32), moved, output / "flagged_uncertainty.nii.gz")


@pytest.mark.parametrize(
    "damage, error, message",
    [
        (_drop_report, MissingFileError, r"warned_lesions\.json not found: .*predict it again"),
        (_break_report, InvalidFileError, r"flagged_lesions\.json: qc\.review: missing"),
        (_move_input, MissingFileError, r"empty_0000\.nii\.gz not found \(named by the lesion report of empty"),
        (_shift_uncertainty, DataError, r"flagged_uncertainty\.nii\.gz: not on the grid of the mask .*origin"),
    ],
)
def test_a_bad_output_folder_is_one_clear_error_and_no_page(tmp_path: Path, damage, error, message: str) -> None:
    output = _write_run(tmp_path)
    damage(output)
    with pytest.raises(error, match=message) as raised:
        write_review_page(output)
    assert "\n" not in str(raised.value)
    assert not (output / "report.html").exists()
    assert [p.name for p in output.iterdir() if p.name.startswith(".")] == []


def test_no_summary_and_a_page_that_cannot_be_written(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="prediction_summary.json not found: run autoseg_predict with -o"):
        load_run(tmp_path)
    output = _write_run(tmp_path)
    (output / "report.html").mkdir()
    with pytest.raises(OutputPathError, match="report.html: is a folder"):
        write_review_page(output)
    with pytest.raises(ValueError, match="unknown display convention 'sideways'"):
        write_review_page(output, convention="sideways")


def test_report_flag_refuses_an_unwritable_page_before_predicting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "out" / "report_part0of2.html").mkdir(parents=True)
    argv = ["-i", str(tmp_path / "nothing"), "-o", str(tmp_path / "out"), "--report", "--num-parts", "2"]
    assert predict_command.main(argv) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "review page (--report)" in error and "report_part0of2.html: is a folder" in error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report_part0of2.html"]


def test_page_in_headless_chromium(run: Path, chromium: WebDriver) -> None:
    chromium.get((run / "report.html").resolve().as_uri())
    assert [entry for entry in chromium.get_log("browser") if entry["level"] == "SEVERE"] == []
    cards = chromium.execute_script(
        "return [...document.querySelectorAll('article.case')].map(card => ({case: card.dataset.case,"
        " review: card.dataset.review, width: card.querySelector('img').naturalWidth,"
        " complete: card.querySelector('img').complete, visible: card.getBoundingClientRect().height > 0}))"
    )
    assert [card["case"] for card in cards] == EXPECTED_ORDER
    assert [card["review"] for card in cards] == ["true", "true", "false", "false"]
    assert all(card["complete"] and card["width"] > 0 and card["visible"] for card in cards)
    # Nothing was fetched: no resource but the page itself (data URIs are not fetched).
    assert chromium.execute_script("return performance.getEntriesByType('resource').length") == 0
    links = chromium.execute_script(
        "return [...document.querySelectorAll('a[href]')].map(a => a.href).filter(h => !h.includes('#'))"
    )
    assert links and all(
        urlparse(link).scheme == "file" and Path(unquote(urlparse(link).path)).is_file() for link in links
    )
    assert chromium.title.startswith("Prediction review: ")


@pytest.mark.usefixtures("one_torch_thread")
def test_autoseg_predict_report_end_to_end(
    trained_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``autoseg_predict --report --save-uncertainty`` with the session's tiny model: the page lists every case in the
    order its lesion reports give, with their numbers (the volume an independent count on the mask), overlays with an
    uncertainty row through slices holding the lesion; a re-run that skips every case writes the same cases again."""
    images = trained_home / "raw" / "Dataset961_ATLASPredict" / "imagesTr"
    output = tmp_path / "out"
    argv = ["-i", str(images), "-o", str(output), "--save-uncertainty", "--report", "--tta", "none", "--no-progress",
            "--device", "cpu"]  # fmt: skip
    assert predict_command.main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == f"review page: {output / 'report.html'}"
    summary = json.loads((output / "prediction_summary.json").read_text())
    reports = {case: json.loads((output / f"{case}{LESION_REPORT_ENDING}").read_text()) for case in summary["per_case"]}
    assert len(reports) == 5
    expected = sorted(reports, key=lambda c: (not reports[c]["qc"]["review"], reports[c]["qc"]["score"], c))
    parsed = _parse(output / "report.html")
    assert [card["data-case"] for card in parsed.cards] == expected
    for card in parsed.cards:
        case = card["data-case"]
        report = reports[case]
        mask = nibabel.load(output / f"{case}.nii.gz")
        voxel_ml = float(np.prod(nibabel.load(images / f"{case}_0000.nii.gz").header.get_zooms())) / 1000
        assert float(card["data-volume-ml"]) == pytest.approx(np.count_nonzero(mask.get_fdata()) * voxel_ml)
        assert int(card["data-lesions"]) == report["lesion_count"]
        assert card["data-review"] == str(report["qc"]["review"]).lower()
        assert float(card["data-qc-score"]) == report["qc"]["score"]
        assert all(reason in card["text"] for reason in report["qc"]["reasons"])
        picture, slices = _png(card["img"]["src"]), [int(z) for z in card["img"]["data-slices"].split()]
        assert picture.height / picture.width == pytest.approx(1.19 * 2 / len(slices), rel=0.25)  # uncertainty row
        canonical = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(output / f"{case}.nii.gz")), "RAS"))
        canonical = canonical.transpose(2, 1, 0) > 0
        if report["lesion_count"]:
            assert all(canonical[:, :, z].any() for z in slices)
        else:
            assert slices == [canonical.shape[2] // 2]
    assert predict_command.main(argv) == 0  # every case skipped: the page still shows them all
    assert sorted(card["data-case"] for card in _parse(output / "report.html").cards) == sorted(reports)
