"""report.html: one self-contained page with every section, valid embedded charts and the JSON's figures."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnxsmith.optimizer import report_plots
from onnxsmith.optimizer.layer_fidelity import GrowingHistogram
from onnxsmith.optimizer.pipeline import optimize_file
from onnxsmith.optimizer.report import HTML_SECTIONS, _fmt, activation_ranges, html_report, write_report
from onnxsmith.optimizer.report_plots import TwinRange, UniformRange

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """Sections of report.html: their heading, images, table rows, paragraphs; plus every link and script."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.order: list[str] = []
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self._section: dict | None = None
        self._text: list[str] | None = None
        self._row: list[str] | None = None
        self._tag: str | None = None
        self._class: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.urls += [attrs[key] for key in ("src", "href") if key in attrs]
        if tag == "section":
            self._section = {"h2": "", "images": [], "rows": [], "paragraphs": []}
            self.sections[attrs["id"]] = self._section
            self.order.append(attrs["id"])
        elif self._section is not None:
            if tag == "img":
                self._section["images"].append(attrs["src"])
            elif tag == "tr":
                self._row = []
            elif tag in ("td", "th", "h2", "p"):
                self._text, self._tag, self._class = [], tag, attrs.get("class")

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None
        elif self._text is not None and tag == self._tag:
            text = "".join(self._text).strip()
            if tag in ("td", "th") and self._row is not None:
                self._row.append(text)
            elif tag == "h2":
                self._section["h2"] = text
            elif tag == "p":
                self._section["paragraphs"].append((self._class, text))
            self._text = None
        elif tag == "tr" and self._row is not None:
            self._section["rows"].append(self._row)
            self._row = None


def _png_size(uri: str) -> tuple[int, int, int]:
    """(bytes, width, height) of a base64 PNG data URI; fails unless it is one."""
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    png = base64.b64decode(uri[len(prefix):], validate=True)
    assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    return len(png), width, height


@pytest.fixture(scope="module")
def twin_run(tmp_path_factory):
    """vit-digits, INT8 QDQ with PTQ4ViT's twin-uniform post-Softmax/GELU quantizers (the MSE step search of
    ``int8-qdq``: the ``ptq4vit`` recipe's Hessian search costs ~30 s)."""
    folder = tmp_path_factory.mktemp("twin")
    result = optimize_file("zoo:vit-digits", folder / "m.onnx", recipe="w8a8", pass_options={"twin": True},
                           progress=False)
    write_report(result, folder / "rep")
    return folder / "rep"


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sparse")
    result = optimize_file("zoo:vit-digits", folder / "m.onnx", recipe="esparse24-w8a8", progress=False)
    write_report(result, folder / "rep")
    return folder / "rep"


def _load(folder: Path) -> tuple[dict, Page]:
    return json.loads((folder / "report.json").read_text()), Page((folder / "report.html").read_text())


@pytest.mark.parametrize("run", ["twin_run", "sparse_run"])
def test_page_has_every_section_and_only_embedded_pngs(run, request):
    data, page = _load(request.getfixturevalue(run))
    assert page.order == list(HTML_SECTIONS)
    assert all(page.sections[key]["h2"] for key in HTML_SECTIONS)
    assert "script" not in page.tags and "link" not in page.tags
    assert all(url.startswith(("data:image/png;base64,", "#")) for url in page.urls)
    images = [uri for section in page.sections.values() for uri in section["images"]]
    # layer SQNR + one histogram per stored activation + size/latency (+ sparsity)
    assert len(images) >= 2 + len(data["evaluation"]["activation_histograms"])
    for uri in images:
        size, width, height = _png_size(uri)
        assert size > 3000 and width >= 300 and height >= 150
    for key in ("layer-sqnr", "activation-ranges", "size-latency"):
        assert page.sections[key]["images"], key


def test_twin_tensors_carry_their_ranges_and_are_drawn_with_two(twin_run, monkeypatch):
    data, _ = _load(twin_run)
    twins = {d["tensor"]: d for r in data["passes"] for d in r["details"] if str(d.get("dtype", "")).startswith("twin")}
    assert len(twins) == 4  # two post-Softmax, two post-GELU
    histograms = data["evaluation"]["activation_histograms"]
    assert set(twins) <= set(histograms) and len(histograms) <= 32
    for histogram in histograms.values():
        assert len(histogram["edges"]) == len(histogram["counts"]) + 1 <= 65
        assert np.all(np.diff(histogram["edges"]) > 0) and sum(histogram["counts"]) > 0
    drawn = {}

    def spy(tensor, edges, counts, quant_range):  # the real charts are checked in the test above
        drawn[tensor] = quant_range
        return PNG_SIGNATURE

    monkeypatch.setattr(report_plots, "activation_histogram_chart", spy)
    html_report(data)
    assert set(drawn) == set(histograms)
    for tensor, detail in twins.items():
        twin = drawn[tensor]
        assert isinstance(twin, TwinRange)
        assert (twin.delta_r1, twin.delta_r2, twin.split) == (detail["delta_r1"], detail["delta_r2"], detail["split"])
        assert twin.r1_low < twin.split < twin.r2_high
        if detail["dtype"] == "twin-softmax":
            assert twin.r1_low == 0 and twin.split == 128 * detail["delta_r1"]
        else:
            assert twin.split == 0 and twin.r1_low == -128 * detail["delta_r1"]
    plain = [t for t in drawn if t not in twins]
    assert plain and all(isinstance(drawn[t], UniformRange) and drawn[t].low < drawn[t].high for t in plain)


def test_uniform_range_follows_scale_and_zero_point():
    data = {"passes": [{"details": [
        {"tensor": "a", "kind": "activation", "dtype": "uint8", "scale": 0.5, "zero_point": 10},
        {"tensor": "b", "kind": "activation", "dtype": "int8", "scale": 0.25, "zero_point": 0},
        {"tensor": "c", "kind": "activation", "dtype": "uint8", "bits": 4, "scale": 1.0},
        {"tensor": "d", "kind": "activation", "dtype": "fake-quant", "scale": [1.0, 2.0]},
    ]}]}
    assert activation_ranges(data) == {"a": UniformRange(-5.0, 122.5), "b": UniformRange(-32.0, 31.75),
                                       "c": UniformRange(-8.0, 7.0), "d": None}


def test_fidelity_and_size_tables_hold_the_json_figures(twin_run):
    data, page = _load(twin_run)
    evaluation = data["evaluation"]
    rows = {row[0]: row[1:] for row in page.sections["fidelity"]["rows"]}
    metrics = evaluation["metrics"]
    assert {"accuracy", "accuracy_fp", "top1_agreement"} <= set(metrics)
    assert rows["metric: accuracy"] == [_fmt(metrics["accuracy_fp"]), _fmt(metrics["accuracy"])]
    assert rows["metric: top1_agreement"] == ["-", _fmt(metrics["top1_agreement"])]
    assert "metric: accuracy_fp" not in rows  # shown as the FP32 column of accuracy
    assert rows["output SQNR of logits (dB)"][1] == _fmt(evaluation["output_sqnr_db"]["logits"])
    sizes = {row[0]: row[1:] for row in page.sections["size-latency"]["rows"]}
    assert sizes["size (MB)"] == [f"{evaluation['size_bytes'][k] / 1e6:.3f}" for k in ("reference", "candidate")]


def test_sparsity_section_shows_the_pruned_layers(sparse_run, twin_run):
    data, page = _load(sparse_run)
    pruned = next(r for r in data["passes"] if r["name"] == "prune-nm")["changes"]["pruned"]
    rows = data["sparsity"]["rows"]
    assert sum(1 for r in rows if r["pattern"] == "2:4") == pruned == 8
    assert all(abs(r["zero_fraction"] - 0.5) < 0.01 for r in rows if r["pattern"] == "2:4")
    assert len(page.sections["sparsity"]["images"]) == 1
    assert page.sections["trt-lint"]["paragraphs"][0][1].startswith("0 errors")  # int8 activations: TensorRT
    dense, dense_page = _load(twin_run)
    assert dense["sparsity"] == {"weights": 10, "rows": []}
    assert not dense_page.sections["sparsity"]["images"]
    assert dense_page.sections["sparsity"]["paragraphs"][0][0] == "none"


def test_sections_without_data_say_so_in_one_line():
    data = {"source": "m.onnx", "input": "m.onnx", "output": "o.onnx", "recipe": {"name": "cleanup", "source": "b"},
            "seconds": 0.5, "verification": "v", "passes": [], "evaluation": None, "trt_lint": None,
            "sparsity": {"error": "cannot read"}}
    page = Page(html_report(data))
    assert page.order == list(HTML_SECTIONS)
    for key in HTML_SECTIONS:
        section = page.sections[key]
        assert not section["images"] and not section["rows"], key
        assert len(section["paragraphs"]) == 1 and section["paragraphs"][0][0] == "none", key
    assert "cannot read" in page.sections["sparsity"]["paragraphs"][0][1]


def test_layer_chart_is_capped_with_a_note(monkeypatch):
    data = {"passes": [], "evaluation": {"activation_sqnr_db": {f"t{i}": float(i) for i in range(50)} | {"x": "inf"}}}
    png = report_plots.layer_sqnr_chart([(f"t{i}", "weight", float(i)) for i in range(50)])
    height = struct.unpack(">II", png[16:24])[1]
    assert png.startswith(PNG_SIGNATURE) and height < 0.25 * 80 * 50  # drawn for 40 bars, not 50
    given = []
    monkeypatch.setattr(report_plots, "layer_sqnr_chart", lambda rows: given.append(rows) or PNG_SIGNATURE)
    from onnxsmith.optimizer.report import _html_layer_sqnr

    page = Page(f'<section id="s">{_html_layer_sqnr(data)}</section>')
    notes = [text for _, text in page.sections["s"]["paragraphs"]]
    assert notes == ["1 layers with infinite SQNR (lossless) are not drawn.",
                     "Showing the worst 40 of 50; every layer is in report.json and report.md."]
    assert [value for _, _, value in given[0]] == [float(i) for i in range(50)]


def test_markdown_links_the_page(twin_run):
    assert "[report.html](report.html)" in (twin_run / "report.md").read_text()


def test_growing_histogram_counts_exactly():
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=500) * 0.1, rng.normal(size=700) * 3 + 2, rng.normal(size=90) - 20,
               np.array([np.nan, np.inf, 1.0])]
    histogram = GrowingHistogram(64)
    for batch in batches:
        histogram.add(batch)
    result = histogram.as_dict()
    values = np.concatenate(batches)
    values = values[np.isfinite(values)]
    assert 32 <= len(result["counts"]) <= 64 and sum(result["counts"]) == values.size
    assert result["edges"][0] <= values.min() and values.max() < result["edges"][-1]
    assert result["counts"] == np.histogram(values, bins=result["edges"])[0].tolist()


CHROMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
COLOURED = 30
"""Least spread (max minus min channel) of a chart's colour in a screenshot: the quantization-range lines and the
coloured bars have 60 or more, the twin-uniform R2 shading 35; a failed pass's pink table row 21; text, grey bars
and table borders 7 or less."""


def _screenshot(page: Path, folder: Path, width: int, height: int) -> np.ndarray:
    """RGB pixels of ``page`` drawn by headless Chromium in a ``width`` x ``height`` window."""
    binary = next((found for name in CHROMES if (found := shutil.which(name))), None)
    if binary is None:
        pytest.fail(f"no headless browser on PATH (looked for {', '.join(CHROMES)}); install one: "
                    "apt-get install chromium")
    shot = folder / "shot.png"
    run = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--hide-scrollbars", f"--user-data-dir={folder / 'profile'}",
                          f"--window-size={width},{height}", f"--screenshot={shot}", page.resolve().as_uri()],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and shot.exists(), run.stderr[-3000:]  # stderr is DBus noise unless this fails
    with Image.open(shot) as image:
        return np.asarray(image.convert("RGB"))


def _bands(rows: np.ndarray, gap: int = 16, least: int = 32) -> list[tuple[int, int]]:
    """(first, last) index of each run of True in ``rows`` at least ``least`` long, runs at most ``gap`` apart
    merged."""
    hits = np.flatnonzero(rows)
    breaks = np.flatnonzero(np.diff(hits) > gap + 1)
    runs = zip(hits[np.r_[0, breaks + 1]], hits[np.r_[breaks, len(hits) - 1]]) if len(hits) else ()
    return [(int(first), int(last)) for first, last in runs if last - first + 1 >= least]


def test_page_renders_in_headless_chromium(twin_run, tmp_path):
    """In a 480 px wide window the charts stack one under another, so the screenshot holds one band of rows with
    coloured pixels (bars, range lines, shading) per embedded image, plus one for the navigation's blue links."""
    data, page = _load(twin_run)
    images = sum(len(section["images"]) for section in page.sections.values())
    assert images == 2 + len(data["evaluation"]["activation_histograms"])  # layer SQNR, histograms, size/latency
    pixels = _screenshot(twin_run / "report.html", tmp_path, 480, 2000 + 300 * images)
    assert (pixels[-200:] >= 250).all(), "the page is taller than the window: raise the screenshot's height"
    assert (pixels[:150] < 96).all(axis=2).sum() > 1000, "no title text drawn: are fonts installed?"
    bands = _bands((pixels.max(axis=2) - pixels.min(axis=2) >= COLOURED).any(axis=1))
    assert len(bands) == images + 1, f"{len(bands)} bands of coloured rows for {images} charts: {bands}"
