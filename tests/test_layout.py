from __future__ import annotations

import posixpath

from pipeline.layout import RunLayout, safe_name

HOSTILE = ["../../etc/passwd", "a/b", "a?b", "nul\x00byte", "x" * 300, "Ünïcödé 画像 🙂", "..", "", " ", "a/b "]


def test_png_paths_stay_inside_the_prefix_and_are_unique_and_stable() -> None:
    layout = RunLayout("s3://bucket/audits", "r1", "2026-11-26", "a1")
    uris = [layout.png_uri(pair_id) for pair_id in HOSTILE]
    assert len(set(uris)) == len(HOSTILE)
    assert uris == [layout.png_uri(pair_id) for pair_id in HOSTILE]
    for uri in uris:
        path = uri.removeprefix("s3://")
        assert posixpath.normpath(path).startswith("bucket/audits/png/run_id=r1/")
        name = path.rsplit("/", 1)[1]
        assert len(name) <= 110 and "\x00" not in name and name.isascii()
        assert name not in (".png", "..png")


def test_safe_name_keeps_a_readable_prefix() -> None:
    assert safe_name("query-17_rank-3").startswith("query-17_rank-3-")
    assert safe_name("-rf").startswith("rf-")  # never a name that a shell tool reads as an option
