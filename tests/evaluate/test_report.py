"""The results page of ``autoseg_evaluate --report``: its content against summary.json, every case worst first, no
external reference, atomic writing, clear errors; and, in headless Chromium, that it loads cleanly and shows it all."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pytest

from autoseg.commands import evaluate as evaluate_command
from autoseg.evaluate.evaluation import DISPLAY_NAMES, QUARTILE_METRICS, EvaluationError, format_number
from autoseg.evaluate.report import REPORT_NAME, case_order, load_evaluation, write_report
from autoseg.io.geometry import Geometry
from autoseg.io.images import read_image, write_image

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

SHAPE = (24, 28, 12)
GEOMETRY = Geometry(SHAPE, (2.0, 2.0, 3.0), (-20.0, 10.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
#: Case -> (lesion radius in voxels, shift of the prediction along x; None: empty prediction).
CASES = {"sub_a": (2, None), "sub_b": (3, 2), "sub_c": (4, 0), "sub_d": (5, 1), "sub_e": (3, 3)}


def _write_cases(root: Path) -> dict[str, Path]:
    """Images (channel 0 and, for one case, a channel 1 that must be ignored), references and predictions whose
    Dice differs per case; returns the folders and the output folder."""
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    head = ((x - 12) / 11) ** 2 + ((y - 14) / 13) ** 2 + ((z - 6) / 6) ** 2 < 1
    folders = {name: root / name for name in ("images", "ref", "pred")}
    for index, (case, (radius, shift)) in enumerate(CASES.items()):
        reference = ((x - 8 - index) ** 2 + (y - 14) ** 2 + (z - 6) ** 2 < radius**2).astype(np.uint8)
        prediction = np.zeros_like(reference) if shift is None else np.roll(reference, shift, axis=0)
        image = (head * (100 + 15 * rng.standard_normal(SHAPE)) + 50 * reference).astype(np.float32)
        write_image(image, GEOMETRY, folders["images"] / f"{case}_0000.nii.gz")
        write_image(reference, GEOMETRY, folders["ref"] / f"{case}.nii.gz")
        write_image(prediction, GEOMETRY, folders["pred"] / f"{case}.nii.gz")
    write_image(np.zeros(SHAPE, np.float32), GEOMETRY, folders["images"] / "sub_a_0001.nii.gz")
    folders["out"] = root / "evaluation"
    return folders


def _evaluate(folders: dict[str, Path], *extra: str) -> int:
    argv = ["-ref", str(folders["ref"]), "-pred", str(folders["pred"]), "-o", str(folders["out"]),
            "--bootstrap", "100", "--no-progress", "--report", *extra]  # fmt: skip
    return evaluate_command.main(argv)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One evaluation with a report and images, shared by the tests that only read it."""
    folders = _write_cases(tmp_path_factory.mktemp("report"))
    assert _evaluate(folders, "--images", str(folders["images"])) == 0
    return folders


class _PageParser(HTMLParser):
    """Collects what the tests check: case cards in page order, image sources, link targets and table rows."""

    def __init__(self) -> None:
        super().__init__()
        self.cases: list[tuple[str, float]] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.rows: dict[str, list[str]] = {}
        self._row: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "article":
            self.cases.append((attributes["data-case"], float(attributes["data-dice"])))
        elif tag == "img":
            self.images.append(attributes["src"])
        elif tag == "a":
            self.links.append(attributes["href"])
        elif tag == "tr" and ("data-metric" in attributes or "data-quartile" in attributes):
            self._row = attributes.get("data-metric") or attributes["data-quartile"]
            self.rows[self._row] = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._row is not None and data.strip():
            self.rows[self._row].append(data.strip())


def _parse(page: Path) -> _PageParser:
    parser = _PageParser()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def test_command_writes_the_page_and_prints_its_path(evaluated: dict[str, Path]) -> None:
    page = evaluated["out"] / REPORT_NAME
    assert page.is_file() and page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in evaluated["out"].iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_metric_and_quartile_tables_equal_summary_json(evaluated: dict[str, Path]) -> None:
    summary = json.loads((evaluated["out"] / "summary.json").read_text())
    rows = _parse(evaluated["out"] / REPORT_NAME).rows
    for name, stats in summary["metrics"].items():
        title, digits = DISPLAY_NAMES[name]
        interval = f"[{format_number(stats['ci_low'], digits)}, {format_number(stats['ci_high'], digits)}]"
        assert rows[name][:3] == [title, format_number(stats["mean"], digits), interval], name
    for quartile in summary["quartiles"]:
        cells = rows[quartile["quartile"]]
        for metric in QUARTILE_METRICS:
            digits = min(DISPLAY_NAMES[metric][1], 3)
            mean = format_number(quartile[f"{metric}_mean"], digits)
            interval = f"[{format_number(quartile[f'{metric}_ci_low'], digits)}, " \
                       f"{format_number(quartile[f'{metric}_ci_high'], digits)}]"  # fmt: skip
            assert f"{mean} {interval}" in " ".join(cells), (quartile["quartile"], metric)


def test_every_case_once_worst_dice_first_with_its_overlay(evaluated: dict[str, Path]) -> None:
    parsed = _parse(evaluated["out"] / REPORT_NAME)
    per_case = pd.read_csv(evaluated["out"] / "per_case.csv", index_col="case")
    assert [case for case, _ in parsed.cases] == case_order(per_case)
    assert sorted(case for case, _ in parsed.cases) == sorted(CASES)
    dice = [value for _, value in parsed.cases]
    assert dice == sorted(dice) and dice[0] == 0.0 and dice[-1] == 1.0  # empty prediction first, exact last
    assert len({value for value in dice}) >= 4  # the cases really differ
    # The plot and one overlay per case, each an embedded PNG.
    assert len(parsed.images) == 1 + len(CASES)
    assert all(src.startswith("data:image/png;base64,iVBORw0KGgo") for src in parsed.images)


def test_page_is_self_contained_and_links_resolve(evaluated: dict[str, Path]) -> None:
    page = evaluated["out"] / REPORT_NAME
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"https?:", text, re.IGNORECASE)
    assert "<script" not in text and "<link" not in text
    files = [link for link in _parse(page).links if not link.startswith("#")]
    assert sorted(files) == ["dice_vs_volume.png", "per_case.csv", "quartiles.csv", "summary.json"]
    assert all((page.parent / unquote(link)).is_file() for link in files)
    assert page.stat().st_size < 100_000 * (1 + len(CASES))  # about 100 kB per case at most


def test_page_elsewhere_links_back_to_the_evaluation(evaluated: dict[str, Path], tmp_path: Path) -> None:
    page = write_report(evaluated["out"], output=tmp_path / "pages" / "results.html")
    links = [link for link in _parse(page).links if not link.startswith("#")]
    assert links and all((page.parent / unquote(link)).resolve().is_file() for link in links)
    assert "black background" in page.read_text(encoding="utf-8")  # no images given this time


def test_without_images_the_page_says_so(tmp_path: Path) -> None:
    folders = _write_cases(tmp_path)
    assert _evaluate(folders) == 0
    text = (folders["out"] / REPORT_NAME).read_text(encoding="utf-8")
    assert "without <code>--images</code>" in text and len(_parse(folders["out"] / REPORT_NAME).cases) == len(CASES)


def test_case_names_that_look_like_numbers_stay_names_on_the_page(tmp_path: Path) -> None:
    """``001``, ``010``, ``1e3`` and ``NaN`` are case names: the page shows each once as written (pandas would read
    them back as 1.0, 10.0, 1000.0 and a missing value), with the masks stored as 0/255 and scored with --binarize."""
    folders = _write_cases(tmp_path)
    names = dict(zip(CASES, ("001", "010", "1e3", "NaN", "0x1")))
    for kind in ("images", "ref", "pred"):
        for path in sorted(folders[kind].iterdir()):
            case = next(c for c in CASES if path.name.startswith(c))
            renamed = path.with_name(path.name.replace(case, names[case]))
            if kind == "images":
                path.rename(renamed)
                continue
            mask = read_image(path, np.uint8, canonical=False)[0] * np.uint8(255)
            write_image(mask, GEOMETRY, renamed)
            path.unlink()
    assert _evaluate(folders, "--images", str(folders["images"]), "--binarize") == 0
    parsed = _parse(folders["out"] / REPORT_NAME)
    assert sorted(case for case, _ in parsed.cases) == sorted(names.values())
    assert sorted(load_evaluation(folders["out"]).per_case.index) == sorted(names.values())
    dice = dict(parsed.cases)
    assert dice["001"] == 0.0 and dice["1e3"] == 1.0  # sub_a (empty prediction) and sub_c (exact) under their names
    assert "any non-zero value (--binarize)" in (folders["out"] / REPORT_NAME).read_text(encoding="utf-8")


def test_images_without_report_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        evaluate_command.main(["-ref", "r", "-pred", "p", "-o", str(tmp_path), "--images", "i"])
    assert stop.value.code == 2 and "--images is only used with --report" in capsys.readouterr().err


def _drop_image(folders: dict[str, Path]) -> None:
    (folders["images"] / "sub_c_0000.nii.gz").unlink()


def _move_image(folders: dict[str, Path]) -> None:
    moved = Geometry(SHAPE, GEOMETRY.spacing, (0.0, 0.0, 0.0), GEOMETRY.direction)
    write_image(np.zeros(SHAPE, np.float32), moved, folders["images"] / "sub_b_0000.nii.gz")


@pytest.mark.parametrize(
    "damage, message",
    [(_drop_image, "missing image (CASE_0000 or CASE) for 1 of 5 cases"), (_move_image, "sub_b_0000.nii.gz: geometry")],
)
def test_image_problems_fail_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage, message: str
) -> None:
    folders = _write_cases(tmp_path)
    damage(folders)
    assert _evaluate(folders, "--images", str(folders["images"])) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error
    assert not folders["out"].exists()


def test_a_failure_while_drawing_leaves_no_page(tmp_path: Path) -> None:
    folders = _write_cases(tmp_path)
    assert evaluate_command.main(["-ref", str(folders["ref"]), "-pred", str(folders["pred"]), "-o",
                                  str(folders["out"]), "--bootstrap", "10", "--no-progress"]) == 0  # fmt: skip
    (folders["pred"] / "sub_d.nii.gz").unlink()
    with pytest.raises(EvaluationError, match="missing prediction for 1 of 5 cases"):
        write_report(folders["out"])
    (folders["out"] / "summary.json").unlink()
    with pytest.raises(EvaluationError, match=r"summary\.json not found"):
        write_report(folders["out"])
    assert sorted(p.name for p in folders["out"].iterdir()) == ["dice_vs_volume.png", "per_case.csv", "quartiles.csv"]


def test_page_in_headless_chromium(evaluated: dict[str, Path], chromium: WebDriver) -> None:
    page = (evaluated["out"] / REPORT_NAME).resolve()
    chromium.get(page.as_uri())
    severe = [entry for entry in chromium.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []
    cards = chromium.execute_script(
        "return [...document.querySelectorAll('article.case')].map(card => ({"
        " case: card.dataset.case, dice: parseFloat(card.dataset.dice),"
        " width: card.querySelector('img').naturalWidth, complete: card.querySelector('img').complete,"
        " visible: card.getBoundingClientRect().height > 0}))"
    )
    per_case = pd.read_csv(evaluated["out"] / "per_case.csv", index_col="case")
    assert [card["case"] for card in cards] == case_order(per_case)
    assert all(card["complete"] and card["width"] > 0 and card["visible"] for card in cards)
    dice = [card["dice"] for card in cards]
    assert dice == sorted(dice)
    assert chromium.execute_script("return document.querySelector('img.plot').naturalWidth") > 0
    links = chromium.execute_script(
        "return [...document.querySelectorAll('a[href]')].map(a => a.href).filter(h => !h.includes('#'))"
    )
    assert len(links) == 4
    for link in links:
        parsed = urlparse(link)
        assert parsed.scheme == "file" and Path(unquote(parsed.path)).is_file(), link
    assert not re.search(r"https?:", chromium.page_source, re.IGNORECASE)
    assert chromium.title.startswith("Evaluation: ")
