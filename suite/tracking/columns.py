"""The column names of ``Tracker.runs``'s frame: one per param (``params.<key>``), metric
(``metrics.<key>``) and tag (``tags.<key>``), as MLflow names them. The one place that spells
those prefixes: the studies and the report name a column through these functions."""

from __future__ import annotations

PARAM_PREFIX = "params."
METRIC_PREFIX = "metrics."
TAG_PREFIX = "tags."


def param_col(key: str) -> str:
    """The column of the param ``key`` (a dotted config key, e.g. ``model.name``)."""
    return PARAM_PREFIX + key


def metric_col(key: str) -> str:
    """The column of the metric ``key`` (its latest value)."""
    return METRIC_PREFIX + key


def tag_col(key: str) -> str:
    """The column of the tag ``key``."""
    return TAG_PREFIX + key


def is_param_col(col: str, *under: str) -> bool:
    """Whether ``col`` is a param's column; with ``under``, one whose key starts with one of
    them (``is_param_col(c, "search.")``)."""
    return col.startswith(tuple(PARAM_PREFIX + u for u in under or ("",)))


def is_param_or_tag_col(col: str) -> bool:
    """Whether ``col`` holds a param or a tag (strings: an empty one is a missing key)."""
    return col.startswith((PARAM_PREFIX, TAG_PREFIX))


def param_key(col: str, under: str = "") -> str:
    """The param key of the column ``col``, less ``under`` (``param_key(c, "search.")``); any
    other column as it is."""
    return col.removeprefix(PARAM_PREFIX + under)
