"""Thresholds that several layers share (the job's render flags and gates, the comparison and its page)."""

from __future__ import annotations

FALSE_MATCH_SIMILARITY = 0.8  # the default similarity at and above which a label-0 pair is a false match
MOVED_BELOW = 0.99  # a pair's maps moved when they correlate below this (the same maps, stored as float16, correlate above)
