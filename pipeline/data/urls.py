"""Which shard files a ``data.url`` (or ``data.val_url``) names.

Two kinds of value:

* a **folder** (local dir or ``s3://bucket/prefix``): a set written by ``cacr prepare`` (index.json,
  ``<split>-NNNNNN.tar``), or any folder of ``.tar`` shards (then every ``.tar`` in it is the
  training set, whatever its name);
* an **explicit shard list**, as other webdataset tools write and name them: one or more shard URLs
  joined by ``::`` (webdataset's separator; a YAML list is joined the same way), each of which may
  hold brace patterns - ``{0000..1023}`` (a zero-padded numeric range; the width of the first
  bound is kept) and ``{a,b,c}`` (alternatives), several per URL::

      s3://bucket/imagenet1k-train-{0000..1023}.tar
      /data/cc3m/{00000..00331}.tar::/data/extra/more-{0..9}.tar

  The list is the training set as given (no split): the kNN monitor's set comes from
  ``data.val_url``.

Expansion is pure string work (no listing): a pattern that matches no file is found by the
pre-scan (:func:`pipeline.data.validate.scan_shards`), which says so in one line before Ray starts.
"""
from __future__ import annotations

import re

from pipeline.data.format import DataError

SEPARATOR = "::"
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?$")
MAX_SHARDS = 1_000_000  # a typo like {0..99999999} fails in one line instead of filling memory


def is_shard_list(spec: str) -> bool:
    """True when ``spec`` names shard files (braces, ``::`` or a ``.tar`` URL), not a folder."""
    return SEPARATOR in spec or "{" in spec or spec.rstrip("/").endswith(".tar")


def parts(spec: str) -> list[str]:
    """The ``::``-separated URLs of ``spec`` (one for a plain URL), unexpanded."""
    return [p.strip() for p in spec.split(SEPARATOR) if p.strip()]


def join(urls: list[str] | tuple[str, ...]) -> str:
    """A list of URLs (a YAML list) as one ``data.url`` value."""
    return SEPARATOR.join(str(u).strip() for u in urls)


def _alternatives(body: str, spec: str) -> list[str]:
    m = _RANGE.match(body)
    if m:
        lo, hi, step = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
        if step <= 0 or hi < lo:
            raise DataError(f"brace range {{{body}}} in '{spec}' is empty (write {{low..high}}, "
                            "low <= high)")
        if (hi - lo) // step + 1 > MAX_SHARDS:
            raise DataError(f"brace range {{{body}}} in '{spec}' names more than {MAX_SHARDS} shards")
        width = len(m.group(1).lstrip("-")) if m.group(1).lstrip("-").startswith("0") else 0
        return [str(i).zfill(width) for i in range(lo, hi + 1, step)]
    if "," in body:
        return body.split(",")
    raise DataError(f"cannot expand {{{body}}} in '{spec}': use {{0000..0099}} or {{a,b}}")


def expand_one(url: str) -> list[str]:
    """One URL's brace patterns expanded, left to right (``a-{0..1}-{x,y}`` -> 4 URLs, in order)."""
    m = _BRACE.search(url)
    if m is None:
        if "{" in url or "}" in url:
            raise DataError(f"unbalanced brace in '{url}'")
        return [url]
    head, tail = url[:m.start()], url[m.end():]
    out: list[str] = []
    for alt in _alternatives(m.group(1), url):
        out.extend(expand_one(head + alt + tail))
        if len(out) > MAX_SHARDS:
            raise DataError(f"'{url}' names more than {MAX_SHARDS} shards")
    return out


def expand(spec: str) -> list[str]:
    """Every shard URL ``spec`` names, in order, duplicates dropped (first kept)."""
    seen: dict[str, None] = {}
    for p in parts(spec):
        for u in expand_one(p):
            seen.setdefault(u, None)
    if not seen:
        raise DataError(f"data.url '{spec}' names no shard")
    return list(seen)


def store_url(spec: str) -> str:
    """One concrete URL of ``spec`` (its first shard, or the folder): which store it is on."""
    return expand_one(parts(spec)[0])[0] if is_shard_list(spec) else spec


def resolve(spec: str, resolve_url) -> str:
    """``spec`` with each of its URLs passed through ``resolve_url`` (local paths made absolute on
    the driver), braces left for :func:`expand`."""
    return join([resolve_url(p) for p in parts(spec)]) if spec else spec


__all__ = ["SEPARATOR", "is_shard_list", "parts", "join", "expand_one", "expand", "store_url", "resolve"]
