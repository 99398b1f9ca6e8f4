"""Shard pre-scan: which shards are usable, how many rows each will yield, what is broken.

Cheap by default: one listing call; a shard whose size equals the size index.json recorded is
trusted without reading it. Shards that differ (or all shards when there is no index, or with
``deep=True``) are scanned in parallel threads by walking the tar headers (seeking over member
data, never decoding or unpickling anything):

* 0 bytes, or a valid tar with no members         -> ``empty_shard`` (excluded)
* the first header is not a tar header             -> ``corrupt_shard`` (excluded)
* a member's data runs past the end of the file,
  a later header is garbage, or the end-of-archive
  block is missing (cut on a member boundary)      -> ``truncated_shard``: every complete sample is
  kept; the last sample before the cut may be partial and is dropped, unless index.json shows that
  all samples and members are present (only the end-of-archive trailer was lost).
* ``lost_samples`` = what index.json promised minus what the damaged shards can still deliver.

The reader (:mod:`pipeline.data.read`) is handed, per shard, the number of samples to read, so a
truncated shard is read up to its last complete sample and never raises.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator

from pipeline.config import StorageConfig
from pipeline.data.format import (INDEX_NAME, LABEL_EXT, SHARD_RE, DataError, load_index, split_key)
from pipeline.data.urls import expand, is_shard_list, store_url
from pipeline.storage import StorageError, check_location, classify_s3_error, fsspec_fs, is_remote, \
    join_url, list_files, parse_url

log = logging.getLogger(__name__)

_TAR_ERRORS = (tarfile.TarError, EOFError)


@dataclass
class TarScan:
    status: str            # ok | empty | corrupt | truncated
    groups: int = 0        # sample keys seen (the last may be partial when truncated)
    members: int = 0       # regular files seen
    detail: str = ""
    exts: frozenset = frozenset()  # member extensions seen (cls, json, jpg, ...)


def scan_tar(fileobj, size: int) -> TarScan:
    """Walk the headers of one tar (random access: data is skipped by seeking)."""
    if size == 0:
        return TarScan("empty", detail="0 bytes")
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r:")
    except _TAR_ERRORS as e:
        return TarScan("corrupt", detail=f"not a tar file ({e})")
    groups = members = 0
    last_key = None
    exts: set[str] = set()
    try:
        while True:
            ti = tf.next()
            if ti is None:
                break
            tf.members = []  # headers only, keep memory flat on big shards
            if not ti.isreg():
                continue
            key, ext = split_key(ti.name)
            if key is None:
                continue
            members += 1
            exts.add(ext)
            if key != last_key:
                groups += 1
                last_key = key
    except _TAR_ERRORS as e:
        return TarScan("truncated", groups, members, detail=f"cut mid-member ({e})", exts=frozenset(exts))
    # tarfile stops silently at EOF or at a garbage/short header after the first member: a complete
    # archive has a zero end-of-archive block right after the last member.
    end = tf.offset
    fileobj.seek(end)
    block = fileobj.read(512)
    if len(block) == 512 and block == b"\0" * 512:
        return TarScan("ok" if groups else "empty", groups, members,
                       detail="" if groups else "tar has no members", exts=frozenset(exts))
    if groups == 0:
        return TarScan("corrupt", detail="no valid tar members")
    return TarScan("truncated", groups, members, exts=frozenset(exts),
                   detail="cut on a member boundary" if len(block) == 0 else "damaged tail")


@dataclass
class ShardInfo:
    name: str
    path: str                    # filesystem path (local abs path or bucket/key)
    size: int | None             # bytes on storage (None: missing)
    expected: int | None = None  # samples per index.json
    status: str = "ok"           # ok | truncated | corrupt | empty | missing
    rows: int = 0                # rows the reader will emit for this shard
    keep: int | None = None      # read at most this many samples (None: all)
    detail: str = ""

    @property
    def readable(self) -> bool:
        return self.status in ("ok", "truncated") and self.rows > 0


@dataclass
class ShardScan:
    """Result of :func:`scan_shards`: the plan for one split plus the pre-scan skip counts."""

    url: str
    split: str
    shards: list[ShardInfo]
    index: dict[str, Any] | None
    skipped: dict[str, int] = field(default_factory=dict)
    label_key: str | None = None   # labels from this JSON field (data.label_key), else .cls
    exts: frozenset = frozenset()  # member extensions the pre-scan saw (shards it read)

    @property
    def readable(self) -> list[ShardInfo]:
        return [s for s in self.shards if s.readable]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.readable)

    @property
    def labeled(self) -> bool:
        """Whether samples carry labels: index.json says so for our sets; a set of other tools is
        labelled when ``label_key`` is set (checked by the pre-scan) or its shards hold ``.cls``
        members (an img2dataset-style set has none: unlabelled, no missing_label counts)."""
        if self.index is not None:
            return bool(self.index.get("labeled", bool(self.index.get("classes"))))
        if self.label_key:
            return True
        return LABEL_EXT in self.exts or not self.exts

    @property
    def classes(self) -> list[str]:
        return list((self.index or {}).get("classes") or [])

    @property
    def image_size(self) -> int | None:
        return (self.index or {}).get("image_size")

    def summary(self) -> str:
        bad = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()) if v)
        return (f"{self.url} [{self.split}]: {len(self.readable)}/{len(self.shards)} shards readable, "
                f"{self.rows} samples to read" + (f"; skipped: {bad}" if bad else ""))


def read_index(url: str, storage: StorageConfig | None = None) -> dict[str, Any] | None:
    """index.json under ``url`` (JSON), or None if absent. An unparsable index is logged and ignored."""
    fs, path = fsspec_fs(join_url(url, INDEX_NAME), storage)
    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001
        if is_remote(url):
            raise classify_s3_error(e, url, storage) from None
        raise
    try:
        return load_index(raw)
    except (ValueError, UnicodeDecodeError) as e:
        log.warning("ignoring unreadable %s under %s (%s); listing shards instead", INDEX_NAME, url, e)
        return None


def _scan_one(url: str, storage: StorageConfig | None, info: ShardInfo) -> TarScan:
    fs, _ = fsspec_fs(url, storage)
    try:
        with fs.open(info.path, "rb", block_size=1 << 20) as f:
            return scan_tar(f, info.size or 0)
    except FileNotFoundError:
        return TarScan("missing", detail="vanished during the scan")
    except _TAR_ERRORS as e:
        return TarScan("corrupt", detail=str(e))


def _index_entry_complete(scan: TarScan, entry: dict[str, Any] | None) -> bool:
    return (entry is not None and scan.groups == entry.get("samples")
            and scan.members == entry.get("members", -1))


def scan_shards(url: str, split: str = "train", storage: StorageConfig | None = None, *,
                deep: bool = False, threads: int = 8, label_key: str | None = None,
                whole_set: bool = False) -> ShardScan:
    """List and pre-scan the shards of ``split`` under ``url``.

    ``url``: a folder, or a shard list (:mod:`pipeline.data.urls`: brace patterns, ``::``), which
    is the set as given, whatever ``split``. ``whole_set``: a folder without ``<split>-*`` shards
    (nor an index) is one set, every ``.tar`` in it (``data.val_url``). ``label_key``: labels come
    from that JSON field; the first samples are read to check that it exists.

    Raises :class:`~pipeline.storage.StorageError` (endpoint, bucket, credentials, missing prefix)
    or :class:`DataError` (no shards for the split, none readable, a pattern that matches no file,
    a label key no sample has) with a one-line message, fast. Works without Ray (threads), so the
    trainer can call it before starting anything."""
    if is_shard_list(url):
        where, fs_url, index, entries = url, store_url(url), None, {}
        shards = _listed_shards(url, storage)
    else:
        loc = parse_url(url)
        where = fs_url = loc.url
        check_location(url, storage, must_exist=True)
        index = read_index(url, storage)
        listing = {n: s for n, s in list_files(url, storage, suffix=".tar").items()
                   if not n.startswith((".", "_"))}
        names, entries = _split_shards(loc.url, split, index, listing, whole_set)
        base = loc.path.rstrip("/")
        shards = [ShardInfo(name=n, path=f"{base}/{n}", size=listing.get(n),
                            expected=entries[n]["samples"] if n in entries else None) for n in names]
    to_scan = _trust_index(shards, entries, deep)
    exts: set[str] = set()
    if to_scan:
        exts = _scan_into(fs_url, storage, to_scan, entries, threads)
    scan = ShardScan(where, split, shards, index, _skip_counts(where, shards), label_key=label_key,
                     exts=frozenset(exts))
    if not scan.readable:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(scan.skipped.items()))
        if is_shard_list(url):
            raise DataError(f"no readable shards in {where} ({len(shards)} listed: {counts})")
        raise DataError(f"no readable '{split}' shards under {where} ({len(shards)} listed: {counts}): "
                        f"re-run `cacr prepare SOURCE {where}`")
    if label_key:
        check_label_key(scan, fs_url, storage)
    return scan


def _listed_shards(spec: str, storage: StorageConfig | None) -> list[ShardInfo]:
    """The shards a shard list names, with their sizes (one listing per folder they are in); a
    shard that does not exist is ``missing`` (counted), none existing is one clear error."""
    urls = expand(spec)
    locs = [parse_url(u) for u in urls]
    if len({loc.scheme for loc in locs}) > 1:
        raise DataError(f"data.url '{spec}' mixes local paths and s3:// URLs: one store per set")
    folders: dict[str, dict[str, int]] = {}
    for loc in locs:
        folder = loc.url.rsplit("/", 1)[0]
        if folder not in folders:
            folders[folder] = (list_files(folder, storage) if check_location(folder, storage, must_exist=False)
                               else {})
    common = os.path.commonpath([loc.path for loc in locs]) if len(locs) > 1 else locs[0].path.rsplit("/", 1)[0]
    shards = []
    for loc in locs:
        folder, name = loc.url.rsplit("/", 1)
        rel = loc.path[len(common):].lstrip("/") or name
        shards.append(ShardInfo(name=rel, path=loc.path, size=folders[folder].get(name)))
    found = [s for s in shards if s.size is not None]
    if not found:
        raise DataError(f"data.url '{spec}' matches no file: none of its {len(shards)} shard(s) exist "
                        f"(e.g. {urls[0]}); check the pattern (braces like {{0000..0099}}) and the folder")
    for s in shards:
        if s.size is None:
            s.status, s.detail = "missing", "named by the pattern but absent"
    return shards


LABEL_CHECK_SAMPLES = 64


def check_label_key(scan: ShardScan, fs_url: str, storage: StorageConfig | None) -> None:
    """``data.label_key`` present in the .json of at least one of the first samples of the first
    readable shard, else one :class:`DataError` naming the fields that are there."""
    from pipeline.data.format import JSON_EXT, json_field

    first = scan.readable[0]
    fs, _ = fsspec_fs(fs_url, storage)
    fields: set[str] = set()
    seen = with_json = 0
    with fs.open(first.path, "rb", block_size=1 << 20) as f:
        for _, members in iter_samples(f, min(LABEL_CHECK_SAMPLES, first.rows)):
            if members is None:
                break
            seen += 1
            raw = members.get(JSON_EXT)
            if raw is None:
                continue
            with_json += 1
            found, _ = json_field(raw, scan.label_key)
            if found:
                return
            ok, top = json_field(raw, scan.label_key.split(".")[0]) if "." in scan.label_key else (False, None)
            try:
                doc = json.loads(raw)
                node = top if ok and isinstance(top, dict) else doc
                fields.update(node.keys() if isinstance(node, dict) else ())
            except (ValueError, UnicodeDecodeError):
                pass
    if not with_json:
        raise DataError(f"data.label_key='{scan.label_key}': the samples of {scan.url} have no .json "
                        f"member (first {seen} of {first.name} read); unset data.label_key for .cls "
                        "labels or an unlabelled set")
    raise DataError(f"data.label_key='{scan.label_key}': no such field in the .json of the first {seen} "
                    f"samples of {first.name} (fields there: {', '.join(sorted(fields)[:12]) or 'none'})")


def _split_shards(where: str, split: str, index: dict[str, Any] | None, listing: dict[str, int],
                  whole_set: bool = False) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """(shard names of ``split``, name -> index entry): the index's list when there is one (files
    it does not list are ignored, with a warning), else the listing's ``<split>-*.tar`` files (a
    foreign shard set without our names: every .tar is training data, or the val set with
    ``whole_set``)."""
    entries: dict[str, dict[str, Any]] = {}
    if index is not None:
        if split not in index["splits"]:
            raise DataError(f"no split '{split}' in {where}/{INDEX_NAME} (has: "
                            f"{', '.join(sorted(index['splits'])) or 'none'}): pick --split / data.val_split")
        entries = {e["name"]: e for e in index["splits"][split]["shards"]}
        names = list(entries)
        extra = [n for n in listing if n not in entries and (m := SHARD_RE.match(n)) and m.group("split") == split]
        if extra:
            log.warning("%s: ignoring %d '%s' shard file(s) not listed in %s (e.g. %s)", where, len(extra),
                        split, INDEX_NAME, extra[0])
    else:
        names = sorted(n for n in listing if (m := SHARD_RE.match(n)) and m.group("split") == split)
        if not names and (split == "train" or whole_set):
            names = sorted(listing)
    if not names:
        raise DataError(f"no '{split}' shards under {where}: run `cacr prepare SOURCE {where}` "
                        "or check the URL and split")
    return names, entries


def _trust_index(shards: list[ShardInfo], entries: dict[str, dict[str, Any]], deep: bool) -> list[ShardInfo]:
    """Settle what the listing alone decides (missing; size as indexed -> the index's count, unless
    ``deep``); return the shards whose tar headers must be read."""
    to_scan = []
    for s in shards:
        e = entries.get(s.name)
        if s.size is None:
            s.status, s.detail = "missing", s.detail or "listed in index.json but absent"
        elif e is not None and s.size == e["bytes"] and not deep:
            s.rows = e["samples"]
            if s.rows == 0:
                s.status = "empty"
        else:
            to_scan.append(s)
    return to_scan


def _scan_into(url: str, storage: StorageConfig | None, to_scan: list[ShardInfo],
               entries: dict[str, dict[str, Any]], threads: int) -> None:
    """Walk the headers of ``to_scan`` in parallel threads and record status and rows in each;
    returns the member extensions seen."""
    with concurrent.futures.ThreadPoolExecutor(min(threads, len(to_scan))) as ex:
        try:
            results = list(ex.map(lambda s: _scan_one(url, storage, s), to_scan))
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - storage trouble mid-scan: one clear error
            if is_remote(url):
                raise classify_s3_error(e, url, storage) from None
            raise DataError(f"cannot read shards under {parse_url(url).url}: {type(e).__name__}: {e}") from None
    exts: set[str] = set()
    for s, r in zip(to_scan, results):
        exts |= r.exts
        s.status, s.detail = r.status, r.detail
        if r.status == "ok":
            s.rows = r.groups
        elif r.status == "truncated":
            s.keep = r.groups if _index_entry_complete(r, entries.get(s.name)) else max(0, r.groups - 1)
            s.rows = s.keep
            s.detail += f"; keeping {s.keep} complete samples"
        if s.expected is not None and s.rows > s.expected:  # members out of order: more key
            s.rows = s.expected                               # groups than samples written
            s.keep = s.expected if s.keep is not None else None
    return exts


def _skip_counts(where: str, shards: list[ShardInfo]) -> dict[str, int]:
    """The pre-scan's skip counts (reason -> count, zeros left out); each damaged shard is logged."""
    skipped = {k: 0 for k in ("corrupt_shard", "empty_shard", "missing_shard", "truncated_shard",
                              "lost_samples")}
    for s in shards:
        if s.status in ("corrupt", "empty", "missing", "truncated"):
            skipped[f"{s.status}_shard"] += 1
            log.warning("shard %s of %s: %s (%s)", s.name, where, s.status, s.detail)
        if s.expected is not None and s.rows < s.expected:
            skipped["lost_samples"] += s.expected - (s.rows if s.readable else 0)
        elif s.expected is None and s.status == "truncated":
            skipped["lost_samples"] += 1  # the dropped partial sample (nothing else is known)
    return {k: v for k, v in skipped.items() if v}


def has_shards(url: str, storage: StorageConfig | None = None) -> bool:
    """Whether ``url`` already holds a shard set (index.json or any .tar). ``False`` for a missing
    local directory or an empty S3 prefix (e.g. to decide whether to run ``prepare`` first); raises
    :class:`~pipeline.storage.StorageError` for an unreachable endpoint, missing bucket or denied access.
    A shard list (braces, ``::``) is never prepared into: True (the pre-scan says what is missing)."""
    if is_shard_list(url):
        return True
    if not check_location(url, storage, must_exist=False):
        return False
    if read_index(url, storage) is not None:
        return True
    return any(not n.startswith((".", "_")) for n in list_files(url, storage, suffix=".tar"))


def iter_samples(fileobj, keep: int | None = None) -> Iterator[tuple[str, dict[str, bytes] | None]]:
    """Stream one tar: yield ``(key, {ext: bytes})`` per sample; on a tar error yield
    ``(detail, None)`` once and stop (the sample in progress is dropped). At most ``keep`` samples.

    Only member bytes are returned - nothing is decoded here."""
    if keep is not None and keep <= 0:
        return
    done = 0
    key, members = None, {}
    try:
        stream = tarfile.open(fileobj=fileobj, mode="r|")
        for ti in stream:
            stream.members = []
            if not ti.isreg():
                continue
            k, ext = split_key(ti.name)
            if k is None:
                continue
            if k != key:
                if key is not None:
                    yield key, members
                    done += 1
                    if keep is not None and done >= keep:
                        return
                key, members = k, {}
            f = stream.extractfile(ti)
            members[ext] = f.read() if f is not None else b""
        if key is not None and (keep is None or done < keep):
            yield key, members
    except _TAR_ERRORS as e:
        yield f"{type(e).__name__}: {e}", None


def scan_report(scan: ShardScan) -> str:
    return json.dumps({"url": scan.url, "split": scan.split, "skipped": scan.skipped,
                       "shards": [s.__dict__ for s in scan.shards]}, default=str)
