"""The HTML report: structure, escaping, auditor ordering, and a real browser render."""

from __future__ import annotations

import re
import subprocess
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.render import render_pair_png, render_report, safe_href
from pipeline.render.histogram import Series, histogram_svg
from pipeline.render.report_html import GALLERY_CAP, LOOK_FIRST_CAP

EVIL_ID = "<script>alert(1)</script>"
SUMMARY = {
    "run_id": "nightly-2026-11-26",
    "model_id": "resnet50@sha256:ab12",
    "metric": "cosine",
    "target_layer": "layer4",
    "counts": {"ok": 8, "error": 1},
    "pairs_per_second": 41.23456,
    "wall_time_s": 0.22,
    "created": "2026-11-26T03:00:00Z",
    "note": "<b>not bold</b>",
}


def _row(pair_id: str, label: int | None, similarity: float | None, energies: tuple[float, float] | None = None,
         **extra: object) -> dict:
    q, r = energies if energies else (None, None)
    return {
        "pair_id": pair_id, "query_uri": f"img/{pair_id}_q.jpg", "reference_uri": f"img/{pair_id}_r.jpg",
        "label": label, "rank": 1, "score": 0.5, "similarity": similarity, "status": "ok", "error": None,
        "query_energy_in_box": q, "reference_energy_in_box": r,
        "query_pointing_hit": None if q is None else q > 0.5, "reference_pointing_hit": None if r is None else r > 0.5,
        "png_uri": f"png/{pair_id}.png", **extra,
    }


ROWS = [
    _row("neg-mid", 0, 0.40, (0.5, 0.6)),
    _row("neg-top", 0, 0.95, (0.5, 0.6)),
    _row("neg-high", 0, 0.80),
    _row("pos-off", 1, 0.90, (0.70, 0.10)),
    _row("pos-on", 1, 0.85, (0.80, 0.90)),
    _row("pos-nobox", 1, 0.70),
    _row(EVIL_ID, None, 0.50),
    _row("bad-href", 1, 0.60, (0.3, 0.4)),
    _row("broken", 1, None, status="error", error="image too large: 60000000 pixels > max_image_pixels"),
]


def _href(row: dict) -> str | None:
    if row["status"] == "error":
        return None
    return "javascript:alert(2)" if row["pair_id"] == "bad-href" else row["png_uri"]


class Page(HTMLParser):
    """Cards per section, scripts, link targets, error-table cells and all text."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.cards: dict[str, list[dict[str, str | None]]] = defaultdict(list)
        self.scripts = 0
        self.urls: list[str] = []
        self.text: list[str] = []
        self.error_cells: list[str] = []
        self._section = self._look = ""
        self._in_td = False
        self.feed(markup)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.scripts += tag == "script"
        self.urls += [v for k, v in attrs if k in ("href", "src") and v is not None]
        if tag == "section":
            self._section, self._look = a.get("id") or "", ""
        elif tag == "div" and "look" in (a.get("class") or "").split():
            self._look = a.get("id") or ""
        elif tag == "article":
            self.cards[self._look or self._section].append(a)
        self._in_td = tag == "td" and self._section == "errors"

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_td:
            self.error_cells.append(data)


def _ids(cards: list[dict[str, str | None]]) -> list[str | None]:
    return [c["data-pair-id"] for c in cards]


@pytest.fixture(scope="module")
def page() -> Page:
    return Page(render_report(SUMMARY, ROWS, png_href=_href))


def test_one_gallery_card_per_pair(page: Page) -> None:
    assert _ids(page.cards["gallery"]) == [r["pair_id"] for r in ROWS]
    statuses = {c["data-pair-id"]: c["data-status"] for c in page.cards["gallery"]}
    assert statuses["broken"] == "error" and statuses["neg-top"] == "ok"
    top = next(c for c in page.cards["gallery"] if c["data-pair-id"] == "neg-top")
    data = [top[f"data-{k}"] for k in ("similarity", "label", "energy", "rank")]
    assert data == ["0.95", "0", "0.5", "1"]


def test_untrusted_text_is_escaped() -> None:
    markup = render_report(SUMMARY, ROWS, png_href=_href)
    page = Page(markup)
    assert page.scripts == 1  # the report's own inline script only
    assert "<script>alert" not in markup and "<b>not bold" not in markup
    assert EVIL_ID in "".join(page.text)
    assert "<b>not bold</b>" in "".join(page.text)


def test_control_and_direction_characters_are_shown_not_obeyed() -> None:
    """NUL bytes made the report a 'binary' file to grep; U+202E reordered what an id showed."""
    spoof = _row("invoice\u202egnp.exe\x00", 1, 0.5)
    markup = render_report(SUMMARY, [spoof], png_href=_href)
    assert "\u202e" not in markup and "\x00" not in markup
    assert "invoice\ufffdgnp.exe\ufffd" in markup


def test_unsafe_hrefs_are_dropped(page: Page) -> None:
    assert not any(u.strip().lower().startswith("javascript:") for u in page.urls)
    assert "png/neg-top.png" in page.urls
    assert sum("bad-href" in u for u in page.urls) == 0


@pytest.mark.parametrize(
    ("href", "expected"),
    [
        ("png/run=1/a.png", "png/run=1/a.png"),
        ("../png/a%20b.png", "../png/a%20b.png"),
        ("https://bucket.example/png/a.png", "https://bucket.example/png/a.png"),
        ("file:///tmp/a.png", "file:///tmp/a.png"),
        ("javascript:alert(1)", None),
        ("  JaVaScRiPt:alert(1)", None),
        ("java\tscript:alert(1)", None),
        ("data:text/html,<script>alert(1)</script>", None),
        ("vbscript:msgbox", None),
        ("//evil.example/a.png", None),
        ("", None),
        (None, None),
    ],
)
def test_safe_href(href: str | None, expected: str | None) -> None:
    assert safe_href(href) == expected


def test_errors_are_listed_with_reasons(page: Page) -> None:
    assert "broken" in page.error_cells
    assert "image too large: 60000000 pixels > max_image_pixels" in page.error_cells
    assert not any("neg-top" in c for c in page.error_cells)


def test_errors_never_show_credentials() -> None:
    """A manifest's image URI with user:password (or a presigned URL's signature) fails its row: the
    report, a file people pass around, shows neither in the URI nor in the reason."""
    leaky = _row("leaky", 1, None, status="error", query_uri="http://u:SEK/RET@host/x.png",
                 reference_uri="https://b.s3.amazonaws.com/y.jpg?X-Amz-Signature=SIGNED",
                 error="query: http://u:SEK/RET@host/x.png: corrupt or truncated image")
    html_text = render_report(SUMMARY, [leaky], png_href=_href)
    assert "SEK" not in html_text and "SIGNED" not in html_text
    assert "http://***@host/x.png" in html_text


def test_look_first_sections_order_the_auditors_cases(page: Page) -> None:
    # at or above the default false_match_similarity, 0.8: neg-mid (0.40) is no false match
    assert _ids(page.cards["false-matches"]) == ["neg-top", "neg-high"]
    # label-1 rows with boxes, lowest energy-in-box of the two images first; error rows never
    assert _ids(page.cards["off-object"]) == ["pos-off", "bad-href", "pos-on"]


def test_false_matches_are_read_at_the_runs_own_threshold() -> None:
    stricter = {**SUMMARY, "config": {"gates": {"false_match_similarity": 0.9}}}
    assert _ids(Page(render_report(stricter, ROWS, png_href=_href)).cards["false-matches"]) == ["neg-top"]
    none = {**SUMMARY, "config": {"gates": {"false_match_similarity": 0.99}}}
    markup = render_report(none, ROWS, png_href=_href)
    assert "no different-label (label 0) pair reaches similarity 0.99; the most similar is at 0.950" in markup
    # a Euclidean similarity (-1/2 |u - v|^2) never reaches the default 0.8: the most similar are shown
    euclidean = [{**row, "similarity": None if row["similarity"] is None else row["similarity"] - 2} for row in ROWS]
    page = Page(render_report({**SUMMARY, "metric": "euclidean"}, euclidean, png_href=_href))
    assert _ids(page.cards["false-matches"]) == ["neg-top", "neg-high", "neg-mid"]


def test_summary_and_figures(page: Page) -> None:
    text = " ".join(page.text)
    assert "nightly-2026-11-26" in text and "resnet50@sha256:ab12" in text
    assert '{"ok": 8, "error": 1}' in text  # nested values shown compactly
    assert "41.2346" in text
    assert re.search(r"mean similarity, different \(n=3\)", text)
    assert "0.717" in text  # mean of 0.95, 0.80, 0.40


def test_histogram_counts_every_value() -> None:
    svg = histogram_svg([Series("a<b", "#111", [0.0, 0.5, 1.0, float("nan")]), Series("empty", "#222", [])], bins=4)
    assert svg.count("<rect") == 1 + 3  # legend swatch + one bar per non-empty bin
    assert "a&lt;b (n=3)" in svg and "empty" not in svg
    assert "no data to plot" in histogram_svg([Series("x", "#111", [])])


def test_histogram_ticks_tell_close_similarities_apart() -> None:
    """Near-duplicate pairs (similarities 0.9951 to 0.9989) drew six ticks of 0.99 and 1.00."""
    svg = histogram_svg([Series("same", "#111", [0.9951, 0.9960, 0.9975, 0.9989])])
    ticks = re.findall(r'text-anchor="middle" fill="#333">([0-9.]+)</text>', svg)
    assert len(ticks) == 6 and len(set(ticks)) == 6, ticks
    wide = histogram_svg([Series("all", "#111", [-0.2, 0.3, 0.8])])
    assert re.findall(r'text-anchor="middle" fill="#333">([-0-9.]+)</text>', wide)[:2] == ["-0.20", "0.00"]


def test_large_runs_are_capped() -> None:
    rows = [_row(f"p{i:05d}", i % 2, (i % 997) / 997, (0.5, (i % 89) / 89)) for i in range(GALLERY_CAP + 500)]
    page = Page(render_report(SUMMARY, rows, png_href=_href))
    assert len(page.cards["gallery"]) == GALLERY_CAP
    assert len(page.cards["false-matches"]) == len(page.cards["off-object"]) == LOOK_FIRST_CAP
    assert f"first {GALLERY_CAP:,} of {GALLERY_CAP + 500:,} pairs" in "".join(page.text)
    assert "the sorting, filters and search below see these only" in "".join(page.text)  # not the whole run


def test_a_failed_run_says_so_first() -> None:
    reason = "3 of 9 pairs failed, more than max_error_fraction"
    markup = render_report({**SUMMARY, "status": "failed", "reason": reason, "warnings": ["a residual"]}, ROWS,
                           png_href=_href)
    warnings = markup.split('<section id="warnings"', 1)[1].split("</section>", 1)[0]
    assert warnings.index("This run failed and committed nothing") < warnings.index("a residual")
    assert reason in warnings
    assert "This run failed" not in render_report({**SUMMARY, "status": "succeeded"}, ROWS, png_href=_href)
    # no overlay drawn: sfam render reads committed runs only, so the page does not offer its command
    undrawn = [{**row, "png_uri": None} for row in ROWS]
    for uncommitted in ("failed", "running"):
        assert "--pair-id PAIR_ID" not in render_report({**SUMMARY, "status": uncommitted}, undrawn, png_href=_href)
    assert "--pair-id PAIR_ID" in render_report({**SUMMARY, "status": "succeeded"}, undrawn, png_href=_href)


def test_a_first_attempt_running_or_killed_says_so_first() -> None:
    """A run's record says running from its first attempt's start: until it ends, or for good where it was killed."""
    markup = render_report({**SUMMARY, "status": "running", "warnings": ["a residual"]}, ROWS, png_href=_href)
    warnings = markup.split('<section id="warnings"', 1)[1].split("</section>", 1)[0]
    assert warnings.index("This run has committed nothing: its attempt is running, or was stopped") < warnings.index(
        "a residual")


def test_a_run_that_broke_a_gate_says_so_first() -> None:
    gates = [{"name": "min_same_label_pointing", "passed": False, "value": 0.5, "threshold": 0.8, "note": None},
             {"name": "max_false_match_rate", "passed": True, "value": 0.01, "threshold": 0.05, "note": None},
             {"name": "max_similarity_drop", "passed": True, "value": None, "threshold": 0.02,
              "note": "no earlier successful run of this manifest with metric cosine to compare with"}]
    markup = render_report({**SUMMARY, "status": "gates_failed", "gates": gates, "warnings": ["a residual"]}, ROWS,
                           png_href=_href)
    warnings = markup.split('<section id="warnings"', 1)[1].split("</section>", 1)[0]
    assert warnings.index("broke its quality gate(s) min_same_label_pointing:") < warnings.index("a residual")
    assert "max_false_match_rate" not in warnings
    table = markup.split('<section id="gates">', 1)[1].split("</section>", 1)[0]  # every gate, whole
    assert '<tr class="fail"><td>min_same_label_pointing</td><td>0.5</td><td>0.8</td><td>FAILED</td>' in table
    assert "<td>max_similarity_drop</td><td>n/a</td><td>0.02</td><td>passed</td><td>no earlier successful run" in table


def test_the_render_command_names_the_config_where_the_output_root_is_not_enough() -> None:
    undrawn = [{**row, "png_uri": None} for row in ROWS]
    configs = {"hive": {"output": "/audits"}, "iceberg": {"output": "/audits", "table": {"format": "iceberg"}},
               "s3": {"output": "s3://b/a", "storage_options": {"endpoint_url": "http://minio:9000"}}}
    pages = {name: render_report({**SUMMARY, "status": "succeeded", "config": config}, undrawn, png_href=_href)
             for name, config in configs.items()}
    assert f"sfam render /audits --run-id {SUMMARY['run_id']}" in pages["hive"]
    assert all(f"sfam render --config JOB_CONFIG.yaml --run-id {SUMMARY['run_id']}" in pages[name] for name in ("iceberg", "s3"))


def test_the_heading_names_the_runs_metric_and_weighting() -> None:
    record = {**{k: v for k, v in SUMMARY.items() if k != "metric"},  # run.json keeps them in its config
              "config": {"model": {"metric": "dot", "weighting": "matched"}}}
    heading = render_report(record, ROWS, png_href=_href).split('<p class="sub">', 1)[1].split("</p>", 1)[0]
    assert "metric dot" in heading and "weighting matched" in heading


def test_pairs_without_boxes_show_no_box_figures() -> None:
    """A manifest without boxes has no localisation: its cards and sort options do not offer them."""
    box_less = [{k: v for k, v in row.items() if "box" not in k and "pointing" not in k} for row in ROWS]
    for rows, boxed in ((ROWS, True), (box_less, False)):
        markup = render_report(SUMMARY, rows, png_href=_href)
        assert ("<dt>in box</dt>" in markup, "<dt>pointing</dt>" in markup, "energy in box, low first" in markup) == (boxed,) * 3
    card = render_report(SUMMARY, [ROWS[2]], png_href=_href)  # neg-high: a pair of a boxed run whose boxes are null
    assert "<dt>in box</dt>" not in card and "<dt>score</dt>" in card


def test_empty_run() -> None:
    page = Page(render_report({}, [], png_href=_href))
    assert not page.cards["gallery"]
    assert "No errors." in page.text


def _chromium(binary: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=60, check=True)


@pytest.fixture(scope="module")
def report_on_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report with real overlay PNGs next to it, as the job lays them out."""
    tmp_path = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    (tmp_path / "png").mkdir()
    for i, row in enumerate(ROWS):
        if row["status"] == "ok":
            image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            png = render_pair_png(image, image, rng.random((7, 7)), rng.random((7, 7)), similarity=row["similarity"],
                                  metric="cosine", title=row["pair_id"])
            (tmp_path / "png" / f"{i}.png").write_bytes(png)
    path = tmp_path / "report.html"
    path.write_text(render_report(SUMMARY, ROWS, png_href=lambda r: f"png/{ROWS.index(r)}.png"), encoding="utf-8")
    return path


def test_report_renders_in_chromium(chromium_binary: str, report_on_disk: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    _chromium(chromium_binary, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", report_on_disk.as_uri())
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (2000, 1280, 3)
    assert image.std() > 15


def test_filters_run_in_chromium_from_the_url_hash(chromium_binary: str, report_on_disk: Path, tmp_path: Path) -> None:
    url = report_on_disk.as_uri() + "#label=0&sort=similarity:asc"
    dom = _chromium(chromium_binary, tmp_path, "--dump-dom", url).stdout
    cards = Page(dom).cards["gallery"]
    visible = [c["data-pair-id"] for c in cards if "hidden" not in c]
    assert visible == ["neg-mid", "neg-high", "neg-top"]
    assert len(cards) == len(ROWS)
