"""The report's links to overlays: relative and URL-encoded, or copies next to a report on
another filesystem, made once each and only for the overlays the page shows."""

from __future__ import annotations

from pathlib import Path

import fsspec

from pipeline.io.storage import StorageOptions
from pipeline.render import render_report
from pipeline.render.report_html import GALLERY_CAP, LOOK_FIRST_CAP
from pipeline.reporting import _OverlayLinks

OPTIONS = StorageOptions()
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))


def overlay_rows(folder: Path, count: int) -> list[dict]:
    folder.mkdir(parents=True)
    rows = []
    for index in range(count):
        path = folder / f"p{index}.png"
        path.write_bytes(PNG)
        rows.append({"pair_id": f"p{index}", "query_uri": "q.jpg", "reference_uri": "r.jpg", "label": index % 2,
                     "similarity": 1 - index / count, "status": "ok", "png_uri": str(path)})
    return rows


def test_links_are_url_encoded(tmp_path: Path) -> None:
    """A folder named `audits #1`: the `#` would start a fragment and break every image."""
    links = _OverlayLinks(str(tmp_path / "reports" / "r.html"), OPTIONS)
    row = {"pair_id": "a", "png_uri": str(tmp_path / "audits #1" / "png" / "run_id=x" / "a%b.png")}
    assert links(row) == "../audits%20%231/png/run_id%3Dx/a%25b.png"


def test_copies_only_the_shown_overlays_once_and_a_missing_one_is_not_shown(tmp_path: Path) -> None:
    rows = overlay_rows(tmp_path / "png", GALLERY_CAP + 30)
    (tmp_path / "png" / "p3.png").unlink()  # deleted since the run
    links = _OverlayLinks(f"memory://{tmp_path.name}/r.html", OPTIONS)  # another filesystem than the overlays'
    page = render_report({"run_id": "r", "status": "succeeded", "config": {"render_png": "all"}}, rows, png_href=links)
    copies = fsspec.filesystem("memory").ls(f"/{tmp_path.name}/r_overlays", detail=False)
    assert len(copies) == GALLERY_CAP - 1  # the gallery's rows (look-first picks among them), less the missing one
    assert len(copies) < len(rows) and LOOK_FIRST_CAP > 0
    assert links({"pair_id": "p3", "png_uri": rows[3]["png_uri"]}) is None
    assert 'src="r_overlays/p0-' in page and 'src="r_overlays/p3-' not in page
