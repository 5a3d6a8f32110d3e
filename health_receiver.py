#!/usr/bin/env python3
"""Receive Health Export Pro syncs and keep every record in SQLite.

The iOS app Health Export Pro POSTs a JSON document (up to tens of MB) to a
server of your choice whenever it syncs.  This single file is that server:
standard library only, any CPython 3.8 or newer.

Usage::

    python3 health_receiver.py                 # serve on port 3000 into ./health.db
    python3 health_receiver.py --help          # every flag
    python3 health_receiver.py stats           # what is stored
    python3 health_receiver.py export --type HeartRate --format csv
    python3 health_receiver.py import export-*.json
    python3 health_receiver.py bench --mb 50   # can this machine keep up?

Open http://<this machine>:3000/ in a browser for the status page.

Set the key the app sends in the environment variable HEALTH_RECEIVER_TOKEN
(or put it in a file named by --token-file); without one, anyone who can
reach the port may post.

Map of this file, each section depending only on those above it:

    Errors        exceptions, and escaping client text for the log
    Ingest        dates, row functions, the SECTIONS registry, the JSON walker
    Storage       SQLite connections, schema derived from SECTIONS,
                  MIGRATIONS, writing one sync in one transaction
    Reporting     summary, CHART_KINDS and their daily data, export rows,
                  NDJSON export lines and their import (read-only)
    Presentation  the status page: HTML with inline SVG charts
    Sync workflow one sync from bytes to stored rows, shared by HTTP and import
    HTTP          configuration, request checks, body reading, handler, server
    Command line  serve, stats, export, import: COMMANDS
    Bench         `bench`: the receiver against a baseline, at any database size
    main          the entry point

Licensed under the MIT licence; see the LICENSE file.
"""

__version__ = "1.1.0"

import argparse
import base64
import contextlib
import csv
import dataclasses
import datetime
import gzip
import hashlib
import hmac
import html
import http.client
import ipaddress
import itertools
import json
import json.decoder
import json.scanner
import operator
import os
import re
import shutil
import signal
import socket
import socketserver
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import typing
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from urllib.parse import quote
from urllib.parse import urlsplit

try:
    import resource
except ImportError:  # Windows has no resource module; peak RSS is then unknown.
    resource = None

#: Default TCP port, the one the app's guide uses.
DEFAULT_PORT = 3000
#: Default endpoint path, the app's default "Endpoint Path".
DEFAULT_PATH = "/api/health-data"
#: Default database file, relative to the working directory.
DEFAULT_DB = "health.db"
#: Default body limit in MiB; the app needs at least 50.
DEFAULT_MAX_BODY_MB = 100
#: Default idle timeout of a connection, in seconds.
DEFAULT_TIMEOUT = 30.0
#: Default number of request bodies held in memory at once.
DEFAULT_MAX_INGESTS = 2
#: Path of the JSON summary the status page shows.
SUMMARY_PATH = "/api/summary"
#: Environment variable holding the key the app sends.
TOKEN_ENV = "HEALTH_RECEIVER_TOKEN"
#: Bytes in one MiB: limits are in MiB, as the app's "50 MB" is.
MIB = 1024 * 1024
#: Rows collected before one executemany; bounds memory, keeps SQLite busy.
BATCH_ROWS = 5000
#: Bytes read from the socket at a time.
READ_CHUNK = 1024 * 1024
#: Slowest body upload accepted, in bytes per second, for the body deadline.
MIN_UPLOAD_RATE = 64 * 1024
#: Seconds SQLite waits for another program's lock before giving up (503).
BUSY_TIMEOUT = 10.0
#: Seconds a POST waits for a free ingest slot before it gets 503.
INGEST_SLOT_WAIT = 20.0
#: Seconds a stop waits for the syncs in flight to be stored and answered.
SHUTDOWN_WAIT = 60
#: Seconds the app is told to wait before retrying after a 503.
RETRY_AFTER = 30
#: SQLite page size for new databases (bench: 16 KiB inserts ~20% faster than 4 KiB).
PAGE_SIZE = 16384
#: SQLite page cache of the writer in KiB: big enough to spare most index
#: page rewrites, small enough that a sync's peak memory is the body's.
CACHE_KIB = 8000
#: SQLite page cache of a migration in KiB: it rewrites whole tables.
MIGRATION_CACHE_KIB = 64000
#: Rows a migration copies between two progress lines.
MIGRATION_PROGRESS_ROWS = 1000000
#: Largest integer SQLite stores as INTEGER.
SQLITE_INT_MAX = 2 ** 63 - 1
#: Envelope fields longer than this (in bytes of JSON) are kept as text only.
ENVELOPE_VALUE_MAX = 4096
#: Client text quoted in a log line is cut to this many characters.
LOG_TEXT_MAX = 200
#: Years a date may fall in; anything else is taken as not a date.
DATE_YEARS = (1900, 2199)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

#: Escapes for control characters in client text that reaches the log.
_CONTROL_CHARS = str.maketrans({c: f"\\x{c:02x}" for c in itertools.chain(range(0x20), range(0x7F, 0xA0))})
_CONTROL_CHARS[ord("\\")] = r"\\"


def log_safe(text, limit=None):
    """Client text for a log line: control characters escaped, so a client
    cannot forge lines, and cut to ``limit`` characters."""
    text = str(text)
    if limit is not None:
        text = text[:limit]
    return text.translate(_CONTROL_CHARS)


class PayloadError(Exception):
    """The body is not a payload this receiver can store; nothing of it is."""

    @property
    def message(self):
        return str(self)


class StorageUnavailable(Exception):
    """The database cannot take the sync now; the app should retry later."""


class UsageError(Exception):
    """A command was given a value it cannot use (exit status 2)."""


class ClientError(Exception):
    """A request the client got wrong: answered with ``status`` and ``message``."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = HTTPStatus(status)
        self.message = message
        self.headers = tuple(headers)


# ---------------------------------------------------------------------------
# Ingest: dates, row functions, the sections registry, the JSON walker
# ---------------------------------------------------------------------------

def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
#: The json module's own scanner (C where available): one value at an offset.
_scan_value = json.scanner.make_scanner(_DECODER)
#: Decodes the JSON string whose opening quote precedes the offset.
_scan_string = json.decoder.scanstring
_skip_ws = re.compile(r"[ \t\n\r]*").match
_NONE_TYPE = type(None)

#: The app's own date form, the one stored: checked without parsing.
_is_canonical_date = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d\d\dZ").fullmatch
#: The canonical form with every digit a 0, and the table that makes it so:
#: a whole batch of dates is recognised with one join and one translate.
_CANONICAL_SHAPE = "0000-00-00T00:00:00.000Z"
_DIGITS_TO_ZERO = str.maketrans("123456789", "000000000")
#: The other ISO 8601 forms accepted: offsets with or without a colon, no
#: fraction or any number of digits, a space instead of T, a bare date.
_other_date = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)(?:[T ](\d\d):(\d\d)(?::(\d\d)(?:[.,](\d{1,9}))?)?)? ?(Z|z|[+-]\d\d(?::?\d\d)?)?"
).fullmatch


def utc_date(text):
    """``text`` as canonical UTC (``2026-02-24T08:00:00.000Z``), or None
    when it is not a date.  A date without an offset is taken as UTC."""
    if text.__class__ is not str:
        return None
    if len(text) == 24 and _is_canonical_date(text):
        return text
    match = _other_date(text.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        stamp = datetime.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                                  int(second or 0), int((fraction or "0")[:6].ljust(6, "0")))
        if zone and zone not in "Zz":
            digits = zone[1:].replace(":", "")
            hours, minutes = int(digits[:2]), int(digits[2:4] or 0)
            if hours > 23 or minutes > 59:
                return None
            offset = datetime.timedelta(hours=hours, minutes=minutes)
            stamp = stamp - offset if zone[0] == "+" else stamp + offset
    except (ValueError, OverflowError):
        return None
    if not DATE_YEARS[0] <= stamp.year <= DATE_YEARS[1]:
        return None
    return f"{stamp:%Y-%m-%dT%H:%M:%S}.{stamp.microsecond // 1000:03d}Z"


def _to_sql(value):
    """Return ``value`` as something sqlite3 binds without loss."""
    kind = value.__class__
    if kind is str or kind is float or kind is _NONE_TYPE:
        return value
    if kind is int or kind is bool:
        return value if -SQLITE_INT_MAX - 1 <= value <= SQLITE_INT_MAX else str(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _first(obj, names):
    for name in names:
        value = obj.get(name)
        if value is not None:
            return value
    return None


def _json_kind(value):
    """Name a JSON value's type the way a person reading the error would."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def content_key(section, obj):
    """Stable identity of an element without ``uuid``: hash of canonical JSON."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(f"{section}\x00{canonical}".encode("utf-8", "surrogatepass"))
    return "sha256:" + digest.hexdigest()[:40]


def _identity(section, obj):
    """The element's uuid, its content key when it has none, or None."""
    uuid = obj.get("uuid")
    if uuid is None:
        return content_key(section, obj)
    if uuid.__class__ is not str or not uuid:
        return None
    return uuid


def _bad_uuid(obj):
    return f"uuid is {_json_kind(obj.get('uuid'))}, not a non-empty string"


def _required_text(obj, names):
    """(the first of ``names`` present, None), or (None, why it is unusable).
    Dates are checked and made canonical per batch (see Payload)."""
    value = _first(obj, names)
    if value.__class__ is not str or not value:
        return None, f"{names[0]} missing or not a string"
    return value, None


def _text_or_none(value):
    return value if value.__class__ is str and value else None


# Row functions: (element, its JSON text, where it came from) -> a tuple in
# the section's column order, or a string saying why it cannot be a row.
# Date columns hold the text as sent, or None; the walker makes them
# canonical UTC (or rejects the row) a whole batch at a time.

def _sample_row(obj, raw, section):
    uuid = _identity(section, obj)
    if uuid is None:
        return _bad_uuid(obj)
    start = obj.get("startDate")
    if start is None:
        start = obj.get("date")
    if start.__class__ is not str or not start:
        return "startDate missing or not a string"
    end = obj.get("endDate")
    if end.__class__ is not str or not end:
        end = None  # the record keeps whatever was sent
    value = obj.get("value")
    if value.__class__ is not float and value.__class__ is not str:
        value = _to_sql(value)
    unit = obj.get("unit")
    if unit.__class__ is not str:
        unit = _to_sql(unit)
    source = obj.get("sourceName")
    if source.__class__ is not str:
        source = _to_sql(source)
    return (uuid, section, start, end, value, unit, source, raw)


def _sample_row_latin(obj, raw, section):
    """_sample_row for an element read from the latin-1 view (see Payload)."""
    row = _sample_row(obj, raw, section)
    if row.__class__ is str:
        return row
    uuid, section, start, end, value, unit, source, raw = row
    # Checked inline (no call per field): this runs for most samples of a
    # sync whose device name has a curly apostrophe.
    if not uuid.isascii():
        uuid = uuid.encode("latin-1").decode("utf-8")
    if not start.isascii():
        start = start.encode("latin-1").decode("utf-8")
    if end.__class__ is str and not end.isascii():
        end = end.encode("latin-1").decode("utf-8")
    if value.__class__ is str and not value.isascii():
        value = value.encode("latin-1").decode("utf-8")
    if unit.__class__ is str and not unit.isascii():
        unit = unit.encode("latin-1").decode("utf-8")
    if source.__class__ is str and not source.isascii():
        source = source.encode("latin-1").decode("utf-8")
    return (uuid, section, start, end, value, unit, source, raw)


def _workout_row(obj, raw, section):
    uuid = _identity(section, obj)
    if uuid is None:
        return _bad_uuid(obj)
    start, why = _required_text(obj, ("startDate", "date"))
    if why:
        return why
    return (uuid, _to_sql(_first(obj, ("workoutActivityType", "activityType", "type"))), start,
            _text_or_none(obj.get("endDate")), _to_sql(_first(obj, ("durationSeconds", "duration"))), raw)


def _dose_row(obj, raw, section):
    uuid = _identity(section, obj)
    if uuid is None:
        return _bad_uuid(obj)
    start, why = _required_text(obj, ("startDate", "date", "scheduledDate"))
    if why:
        return why
    medication = _first(obj, ("medicationConceptIdentifier", "conceptIdentifier", "medication"))
    return (uuid, _to_sql(medication), start, _to_sql(obj.get("logStatus")), raw)


def _medication_row(obj, raw, section):
    key = _first(obj, ("conceptIdentifier", "uuid", "id", "identifier"))
    if key is None:
        key = content_key(section, obj)
    elif key.__class__ is int:
        key = str(key)
    elif key.__class__ is not str or not key:
        return f"identifier is {_json_kind(key)}, not a string"
    return (key, _to_sql(_first(obj, ("displayText", "nickname", "name"))), raw)


def _route_point_row(obj, raw, workout):
    stamp, why = _required_text(obj, ("timestamp", "date", "startDate"))
    if why:
        return why
    return (workout, stamp, _to_sql(obj.get("latitude")), _to_sql(obj.get("longitude")),
            _to_sql(obj.get("altitude")), raw)


def _characteristic_row(name, value):
    return (name, _to_sql(value))


@dataclasses.dataclass(frozen=True)
class Section:
    """Everything the receiver knows about one kind of element.

    Storage, the answer to the app, totals, export and NDJSON import are all
    derived from these fields; nothing else lists the sections.
    """

    #: The one name of this section: in export, NDJSON, the CLI and the README.
    name: str
    #: Its table.
    table: str
    #: (column, SQL type) in the order ``make_row`` returns them; the sync
    #: column(s) follow.
    columns: typing.Tuple[typing.Tuple[str, str], ...]
    #: Identity: the primary key.  Rows are stored in this order.
    key: typing.Tuple[str, ...]
    #: (element, JSON text, section or workout) -> row tuple, or the reason
    #: it cannot be one; for shape "object", (name, value) -> row tuple.
    make_row: typing.Callable
    #: Where the app sends it: keys of ``data`` (and of the top level for
    #: shapes "routes" and "object").  Empty: every other key of ``data``.
    app_keys: typing.Tuple[str, ...] = ()
    #: "array" (an array of elements), "routes" (an object of arrays, one per
    #: workout) or "object" (an object of name: value).
    shape: str = "array"
    #: A re-sent element replaces the stored row (otherwise it is ignored).
    latest_wins: bool = False
    #: (column, the element's field) of the dates, held as canonical UTC.
    #: The first is the section's date: a row whose first date is not a
    #: date is rejected; other unreadable dates are stored as NULL.
    dates: typing.Tuple[typing.Tuple[str, str], ...] = ()
    #: The answer's ``inserted`` bucket that counts its new rows.
    bucket: typing.Optional[str] = None
    #: Its elements count in the answer's ``count`` (the app's records).
    counted: bool = True
    #: The answer's key for elements received, when not counted.
    received_key: typing.Optional[str] = None
    #: Columns that say which sync wrote the row; all get the sync id.
    sync_columns: typing.Tuple[str, ...] = ("sync_id",)
    #: Sync columns an update leaves alone (latest_wins).
    kept_on_update: typing.Tuple[str, ...] = ()
    #: Clustered by its key (WITHOUT ROWID): for tables read by key ranges.
    clustered: bool = False
    #: Extra indexes: (name, columns).
    indexes: typing.Tuple[typing.Tuple[str, typing.Tuple[str, ...]], ...] = ()

    @property
    def column_names(self):
        return tuple(name for name, _type in self.columns) + self.sync_columns

    @property
    def date_column(self):
        return self.dates[0][0] if self.dates else None

    @property
    def date_positions(self):
        """(position in a row tuple, field name) of each date."""
        names = [name for name, _type in self.columns]
        return tuple((names.index(column), field) for column, field in self.dates)

    @property
    def record_position(self):
        return [name for name, _type in self.columns].index("record")

    @property
    def create_sql(self):
        columns = [f"{name} {kind}".rstrip() for name, kind in self.columns]
        columns += [f"{name} INTEGER NOT NULL" for name in self.sync_columns]
        columns.append(f"PRIMARY KEY ({', '.join(self.key)})")
        statements = [f"CREATE TABLE IF NOT EXISTS {self.table} ({', '.join(columns)})"
                      + (" WITHOUT ROWID" if self.clustered else "")]
        statements += [f"CREATE INDEX IF NOT EXISTS {name} ON {self.table} ({', '.join(cols)})"
                       for name, cols in self.indexes]
        return statements

    @property
    def insert_sql(self):
        """The row's values, then the sync id as the last parameter."""
        values = ", ".join(["?"] * len(self.columns) + [f"?{len(self.columns) + 1}"] * len(self.sync_columns))
        names = ", ".join(self.column_names)
        if not self.latest_wins:
            return f"INSERT OR IGNORE INTO {self.table} ({names}) VALUES ({values})"
        updated = [name for name in self.column_names if name not in self.key and name not in self.kept_on_update]
        return (f"INSERT INTO {self.table} ({names}) VALUES ({values}) ON CONFLICT ({', '.join(self.key)}) "
                f"DO UPDATE SET {', '.join(f'{name} = excluded.{name}' for name in updated)}")

    @property
    def exists_sql(self):
        """Whether a row with the key of a row tuple is stored already."""
        return f"SELECT 1 FROM {self.table} WHERE {' AND '.join(f'{name} = ?' for name in self.key)}"

    @property
    def row_key(self):
        """A row tuple's key (a value, or a tuple for a key of several
        columns): batches are sorted by it, so rows go in in key order."""
        names = [name for name, _type in self.columns]
        return operator.itemgetter(*(names.index(name) for name in self.key))


#: Every section, in the order the answer, totals and export list them.
SECTIONS = (
    Section("samples", "samples",
            (("uuid", "TEXT"), ("type", "TEXT NOT NULL"), ("start_date", "TEXT NOT NULL"), ("end_date", "TEXT"),
             ("value", ""), ("unit", "TEXT"), ("source_name", "TEXT"), ("record", "TEXT NOT NULL")),
            key=("type", "start_date", "uuid"), make_row=_sample_row,
            dates=(("start_date", "startDate"), ("end_date", "endDate")),
            bucket="measurements", clustered=True),
    Section("workouts", "workouts",
            (("uuid", "TEXT"), ("activity_type", "TEXT"), ("start_date", "TEXT NOT NULL"), ("end_date", "TEXT"),
             ("duration_seconds", "REAL"), ("record", "TEXT NOT NULL")),
            key=("uuid",), make_row=_workout_row, app_keys=("workouts",),
            dates=(("start_date", "startDate"), ("end_date", "endDate")),
            bucket="workouts", indexes=(("workouts_start", ("start_date",)),)),
    Section("doses", "medication_dose_events",
            (("uuid", "TEXT"), ("medication", "TEXT"), ("start_date", "TEXT NOT NULL"), ("log_status", "TEXT"),
             ("record", "TEXT NOT NULL")),
            key=("uuid",), make_row=_dose_row, app_keys=("medicationDoseEvents",),
            dates=(("start_date", "startDate"),),
            bucket="medications"),
    Section("medications", "medications",
            (("key", "TEXT"), ("display_text", "TEXT"), ("record", "TEXT NOT NULL")),
            key=("key",), make_row=_medication_row, app_keys=("medications",), latest_wins=True,
            bucket="medications", sync_columns=("first_sync_id", "last_sync_id"),
            kept_on_update=("first_sync_id",)),
    Section("routes", "workout_route_points",
            (("workout_uuid", "TEXT NOT NULL"), ("timestamp", "TEXT NOT NULL"), ("latitude", "REAL"),
             ("longitude", "REAL"), ("altitude", "REAL"), ("record", "TEXT NOT NULL")),
            key=("workout_uuid", "timestamp"), make_row=_route_point_row, app_keys=("workoutRoutes",),
            shape="routes", dates=(("timestamp", "timestamp"),), bucket="workoutRoutes", counted=False,
            received_key="routePoints", clustered=True),
    Section("characteristics", "characteristics",
            (("name", "TEXT"), ("value", "")),
            key=("name",), make_row=_characteristic_row, app_keys=("characteristics",), shape="object",
            latest_wins=True, counted=False, received_key="characteristics"),
)

#: Sections by name.
SECTIONS_BY_NAME = {section.name: section for section in SECTIONS}
#: The section of every key of ``data`` not listed here.
DEFAULT_SECTION = next(section for section in SECTIONS if not section.app_keys)
#: Sections by the app's key, in ``data`` and at the top level.
_SECTIONS_BY_APP_KEY = {key: section for section in SECTIONS for key in section.app_keys}


class Payload:
    """Walks one sync's JSON text and yields ``(section, rows)`` batches.

    ``section`` is a Section, or None for rows of the ``rejected`` table
    ``(where, reason, text)``.  Every row ends with the sync id (``tag``).

    The text is the body decoded as latin-1: every byte is one character, so
    offsets are byte offsets and memory is one byte per byte whatever the
    content.  UTF-8 never uses bytes below 0x80 inside a multi-byte
    character, so JSON structure reads the same; an element holding
    non-ASCII bytes is re-read from its real text before use.

    Only one array element exists as Python objects at a time: the top-level
    object, ``data`` and ``workoutRoutes`` are walked by hand, each element is
    read with the json module's scanner.  After iteration, ``envelope`` holds
    the other top-level fields (small ones decoded, all as original JSON text
    in ``envelope_text``) and ``sections`` the names of the ``data`` sections.
    """

    def __init__(self, text, start=0):
        self.text = text
        self.start = start
        self.envelope = {}
        self.envelope_text = {}
        self.sections = []
        self._tag = None

    @classmethod
    def from_bytes(cls, body):
        """A payload over the latin-1 view of ``body`` (see the class).

        UTF-8 is checked where it matters, as each string-holding element or
        key is re-decoded: JSON outside strings is ASCII, so nothing escapes
        that check.  A UTF-8 byte order mark is skipped.
        """
        text = body.decode("latin-1")
        return cls(text, 3 if text.startswith("\xef\xbb\xbf") else 0)

    # -- reading JSON --------------------------------------------------------

    def _fail(self, message, pos):
        raise PayloadError(f"Invalid JSON at byte {pos}: {message}.")

    def _scan_error(self, exc, pos):
        """Turn an exception of the scanner at ``pos`` into a PayloadError."""
        if isinstance(exc, StopIteration):
            self._fail("expected a value", exc.value)
        if isinstance(exc, json.JSONDecodeError):
            self._fail(exc.msg[0].lower() + exc.msg[1:], exc.pos)
        if isinstance(exc, RecursionError):
            self._fail("nesting is too deep", pos)
        self._fail(str(exc).rstrip("."), pos)  # NaN/Infinity, oversized integers

    def _element(self, pos):
        """Scan the value at ``pos``; return (value, its real JSON text, end)."""
        try:
            value, end = _scan_value(self.text, pos)
        except (StopIteration, ValueError, RecursionError) as exc:
            self._scan_error(exc, pos)
        raw = self.text[pos:end]
        if not raw.isascii():
            raw = self._utf8(raw, pos)
            value = _scan_value(raw, 0)[0]
        return value, raw, end

    def _utf8(self, raw, pos):
        """The real text of the latin-1 view ``raw`` found at ``pos``."""
        try:
            return raw.encode("latin-1").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(f"The body is not valid UTF-8 (byte {pos + exc.start}).") from None

    def _key(self, pos):
        """Read the key at ``pos``; return (key, position of its value)."""
        text = self.text
        if text[pos:pos + 1] != '"':
            self._fail("expected a quoted key", pos)
        try:
            key, end = _scan_string(text, pos + 1, True)
        except json.JSONDecodeError as exc:
            self._scan_error(exc, pos)
        if not key.isascii():
            key = _scan_string(self._utf8(text[pos:end], pos), 1, True)[0]
        end = _skip_ws(text, end).end()
        if text[end:end + 1] != ":":
            self._fail("expected ':' after a key", end)
        return key, _skip_ws(text, end + 1).end()

    def _walk_object(self, pos, on_member):
        """For each member of the object at ``pos``, delegate to the generator
        ``on_member(key, value_pos)``, which returns the value's end.  Return
        the end of the object."""
        text = self.text
        pos = _skip_ws(text, pos + 1).end()
        if text[pos:pos + 1] == "}":
            return pos + 1
        while True:
            key, pos = self._key(pos)
            pos = yield from on_member(key, pos)
            pos = _skip_ws(text, pos).end()
            char = text[pos:pos + 1]
            if char == ",":
                pos = _skip_ws(text, pos + 1).end()
            elif char == "}":
                return pos + 1
            else:
                self._fail("expected ',' or '}' after an object member", pos)

    def _rejected(self, where, reason, raw):
        return None, [(where, reason, raw, self._tag)]

    def _settled(self, section, batch, where):
        """Yield the batch with its dates in canonical UTC.

        The common case, every date already in the app's own form, is
        recognised for the whole batch at once (one join, one translate);
        otherwise each date is converted, and a row whose first date is not
        a date goes to ``rejected`` with the reason.
        """
        positions = section.date_positions
        shape = _CANONICAL_SHAPE
        for position, _field in positions:
            joined = "".join([row[position] or shape for row in batch])
            if joined.translate(_DIGITS_TO_ZERO) != shape * len(batch):
                break
        else:
            yield section, batch
            return
        rows, rejected, record = [], [], section.record_position
        for row in batch:
            for number, (position, field) in enumerate(positions):
                value = row[position]
                if value is None or (len(value) == 24 and _is_canonical_date(value)):
                    continue
                value = utc_date(value)
                if value is None and number == 0:
                    rejected.append((where, f"{field} is not a date", row[record], self._tag))
                    break
                row = row[:position] + (value,) + row[position + 1:]
            else:
                rows.append(row)
        if rows:
            yield section, rows
        if rejected:
            yield None, rejected

    def _array(self, pos, section, label, where=None):
        """Yield batches of rows of ``section`` from the array at ``pos``;
        return its end.

        ``label`` is passed to the row function (the data key, or the
        workout of a route); elements that cannot be rows go to ``rejected``
        under ``where`` (by default ``label``).  This is the hot loop: most
        of a large sync's elements pass here, so the section is looked up
        once per array, never per element.
        """
        where = where or label
        text = self.text
        tag = self._tag
        scan = _scan_value
        make_row = section.make_row
        latin_row = _sample_row_latin if make_row is _sample_row else None
        batch = []
        pos = _skip_ws(text, pos + 1).end()
        if text[pos:pos + 1] == "]":
            return pos + 1
        while True:
            try:
                obj, end = scan(text, pos)
            except (StopIteration, ValueError, RecursionError) as exc:
                self._scan_error(exc, pos)
            raw = text[pos:end]
            if raw.isascii():
                row = make_row(obj, raw, label) if obj.__class__ is dict else None
            else:
                try:
                    raw = raw.encode("latin-1").decode("utf-8")
                except UnicodeDecodeError:
                    raw = self._utf8(raw, pos)  # raises with the offset
                # Scanning the real text again costs as much as the first
                # scan; a sample's own strings can instead be re-decoded one
                # by one, unless \u escapes (or a content key) need the real
                # value.
                if (latin_row is not None and obj.__class__ is dict and "\\u" not in raw
                        and obj.get("uuid").__class__ is str):
                    row = latin_row(obj, raw, label)
                else:
                    obj = scan(raw, 0)[0]
                    row = make_row(obj, raw, label) if obj.__class__ is dict else None
            if row is None:
                row = f"element is {_json_kind(obj)}, not an object"
            if row.__class__ is str:
                yield None, [(where, row, raw, tag)]
            else:
                batch.append(row + (tag,))
                if len(batch) >= BATCH_ROWS:
                    yield from self._settled(section, batch, where)
                    batch = []
            char = text[end:end + 1]
            if char not in ",]":
                end = _skip_ws(text, end).end()
                char = text[end:end + 1]
            if char == ",":
                pos = end + 1
                if text[pos:pos + 1] not in '{["':
                    pos = _skip_ws(text, pos).end()
            elif char == "]":
                if batch:
                    yield from self._settled(section, batch, where)
                return end + 1
            else:
                self._fail("expected ',' or ']' in an array", end)

    # -- the payload ---------------------------------------------------------

    def batches(self, tag=None):
        """Yield ``(section, rows)``; every row ends with ``tag`` (the sync id).

        Raises PayloadError, possibly after some batches were yielded: the
        caller must then discard them (storage rolls back).
        """
        self._tag = tag
        text = self.text
        pos = _skip_ws(text, self.start).end()
        if pos >= len(text):
            raise PayloadError("The body is empty; expected a JSON object.")
        if text[pos] != "{":
            value = self._element(pos)[0]
            raise PayloadError(f"The body must be a JSON object, not {_json_kind(value)}.")
        end = yield from self._walk_object(pos, self._top_member)
        end = _skip_ws(text, end).end()
        if end != len(text):
            self._fail("unexpected data after the top-level object", end)

    def _top_member(self, key, pos):
        if key == "data":
            if self.text[pos:pos + 1] != "{":
                value = self._element(pos)[0]
                raise PayloadError(f"'data' must be an object of sections, not {_json_kind(value)}.")
            return (yield from self._walk_object(pos, self._data_member))
        section = _SECTIONS_BY_APP_KEY.get(key)
        if section is not None and section.shape == "routes":
            return (yield from self._section(section, key, pos))
        value, raw, end = self._element(pos)
        self.envelope[key] = value if len(raw) <= ENVELOPE_VALUE_MAX else None
        self.envelope_text[key] = raw
        if section is not None and section.shape == "object":
            yield from self._object_section(section, value, raw, key)
        return end

    def _data_member(self, key, pos):
        self.sections.append(key)
        section = _SECTIONS_BY_APP_KEY.get(key, DEFAULT_SECTION)
        return (yield from self._section(section, key, pos, "data." + key if section.shape != "array" else key))

    def _section(self, section, key, pos, where=None):
        """Rows of one section's value at ``pos``, of whatever shape."""
        where = where or key
        if section.shape == "array":
            if self.text[pos:pos + 1] == "[":
                return (yield from self._array(pos, section, key))
            value, raw, end = self._element(pos)
            yield self._rejected(where, f"section is {_json_kind(value)}, not an array", raw)
            return end
        if self.text[pos:pos + 1] != "{":
            value, raw, end = self._element(pos)
            yield self._rejected(where, f"{key} is {_json_kind(value)}, not an object", raw)
            return end
        if section.shape == "object":
            value, raw, end = self._element(pos)
            yield from self._object_section(section, value, raw, where)
            return end
        return (yield from self._walk_object(pos, lambda workout, at: self._route(section, workout, at)))

    def _route(self, section, workout, pos):
        where = "workoutRoutes/" + workout  # rejected rows name the route they came from
        if self.text[pos:pos + 1] != "[":
            value, raw, end = self._element(pos)
            yield self._rejected(where, f"route is {_json_kind(value)}, not an array", raw)
            return end
        return (yield from self._array(pos, section, workout, where))

    def _object_section(self, section, value, raw, where):
        if value.__class__ is not dict:
            yield self._rejected(where, f"{section.app_keys[0]} is {_json_kind(value)}, not an object", raw)
            return
        rows = [section.make_row(name, item) + (self._tag,) for name, item in value.items()]
        if rows:
            yield section, rows


# ---------------------------------------------------------------------------
# Storage: connections, schema, migrations, writing a sync
# ---------------------------------------------------------------------------

#: The schema of version 1, as every receiver up to 1.0 wrote it.  History:
#: never edited; a change is a new step in MIGRATIONS.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS syncs (
    id INTEGER PRIMARY KEY,
    received_at TEXT NOT NULL,
    remote_addr TEXT,
    sync_source TEXT,
    export_date TEXT,
    start_date TEXT,
    end_date TEXT,
    body_bytes INTEGER,
    received INTEGER NOT NULL DEFAULT 0,
    inserted INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    route_points INTEGER NOT NULL DEFAULT 0,
    route_points_inserted INTEGER NOT NULL DEFAULT 0,
    sections INTEGER NOT NULL DEFAULT 0,
    duration_ms INTEGER,
    status TEXT NOT NULL,
    error TEXT,
    envelope TEXT
);
CREATE TABLE IF NOT EXISTS samples (
    uuid TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    start_date TEXT NOT NULL,
    end_date TEXT,
    value,
    unit TEXT,
    source_name TEXT,
    record TEXT NOT NULL,
    sync_id INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_type_start ON samples (type, start_date);
CREATE TABLE IF NOT EXISTS workouts (
    uuid TEXT PRIMARY KEY,
    activity_type TEXT,
    start_date TEXT NOT NULL,
    end_date TEXT,
    duration_seconds REAL,
    record TEXT NOT NULL,
    sync_id INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS workouts_start ON workouts (start_date);
CREATE TABLE IF NOT EXISTS workout_route_points (
    workout_uuid TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    latitude REAL,
    longitude REAL,
    altitude REAL,
    record TEXT NOT NULL,
    sync_id INTEGER NOT NULL,
    UNIQUE (workout_uuid, timestamp)
);
CREATE TABLE IF NOT EXISTS medication_dose_events (
    uuid TEXT PRIMARY KEY,
    medication TEXT,
    start_date TEXT NOT NULL,
    log_status TEXT,
    record TEXT NOT NULL,
    sync_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS medications (
    key TEXT PRIMARY KEY,
    display_text TEXT,
    record TEXT NOT NULL,
    first_sync_id INTEGER NOT NULL,
    last_sync_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS characteristics (
    name TEXT PRIMARY KEY,
    value,
    sync_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected (
    id INTEGER PRIMARY KEY,
    sync_id INTEGER NOT NULL,
    section TEXT,
    reason TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rejected_sync ON rejected (sync_id);
CREATE TABLE IF NOT EXISTS sample_types (
    type TEXT PRIMARY KEY,
    rows INTEGER NOT NULL,
    first_date TEXT,
    last_date TEXT
);
"""

_REJECTED_SQL = "INSERT INTO rejected (section, reason, record, sync_id) VALUES (?, ?, ?, ?)"
#: Tables kept by the receiver itself, besides the sections' tables.
BOOKKEEPING_TABLES = ("rejected", "syncs")


class Migration(typing.NamedTuple):
    """One step of MIGRATIONS: brings a database from its position to the next."""

    #: What the step does, for the progress lines.
    title: str
    #: ``apply(conn, report)``; ``report(text)`` prints a progress line.
    apply: typing.Callable
    #: Rewrites whole tables: needs free disk space for a copy of the database.
    rewrites: bool = False


def _create_v1(conn, report):
    for statement in SCHEMA_V1.split(";"):
        if statement.strip():
            conn.execute(statement)


#: Samples and route points clustered by key: the pages one sync touches no
#: longer grow with the history (version 2).
_V2_TABLES = {
    "samples": ("CREATE TABLE samples_v2 (uuid TEXT, type TEXT NOT NULL, start_date TEXT NOT NULL, end_date TEXT,"
                " value, unit TEXT, source_name TEXT, record TEXT NOT NULL, sync_id INTEGER NOT NULL,"
                " PRIMARY KEY (type, start_date, uuid)) WITHOUT ROWID",
                "SELECT uuid, type, start_date, end_date, value, unit, source_name, record, sync_id"
                " FROM samples ORDER BY rowid"),
    "workout_route_points": (
        "CREATE TABLE workout_route_points_v2 (workout_uuid TEXT NOT NULL, timestamp TEXT NOT NULL,"
        " latitude REAL, longitude REAL, altitude REAL, record TEXT NOT NULL, sync_id INTEGER NOT NULL,"
        " PRIMARY KEY (workout_uuid, timestamp)) WITHOUT ROWID",
        "SELECT workout_uuid, timestamp, latitude, longitude, altitude, record, sync_id"
        " FROM workout_route_points ORDER BY rowid"),
}


def _v2_sample(row):
    """A version-1 sample row in version 2's form, or the reason it cannot be."""
    uuid, type_name, start, end, value, unit, source, record, sync_id = row
    if uuid is None:
        return "uuid missing"
    start = utc_date(start)
    if start is None:
        return "startDate is not a date"
    return (uuid, type_name, start, utc_date(end), value, unit, source, record, sync_id)


def _v2_route_point(row):
    workout, stamp, latitude, longitude, altitude, record, sync_id = row
    stamp = utc_date(stamp)
    if stamp is None:
        return "timestamp is not a date"
    return (workout, stamp, latitude, longitude, altitude, record, sync_id)


def _copy_table(conn, table, convert, report, section_of):
    """Copy ``table`` into its version-2 twin, converting each row; rows
    that cannot be converted (or collide) go to ``rejected`` with the reason.
    Counts are compared before the caller commits."""
    create, select = _V2_TABLES[table]
    conn.execute(create)
    names = [column[1] for column in conn.execute(f"PRAGMA table_info({table}_v2)")]
    insert = f"INSERT INTO {table}_v2 ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
    copied = moved = 0
    rows = conn.execute(select)
    while True:
        batch = rows.fetchmany(50000)
        if not batch:
            break
        good, bad = [], []
        for row in batch:
            converted = convert(row)
            if converted.__class__ is str:
                bad.append((section_of(row), converted + " (migration to version 2)", row[-2], row[-1]))
            else:
                good.append(converted)
        conn.execute("SAVEPOINT copy")
        try:
            conn.executemany(insert, good)
        except sqlite3.IntegrityError:  # two rows whose dates became one key
            conn.execute("ROLLBACK TO copy")
            for row in good:
                try:
                    conn.execute(insert, row)
                except sqlite3.IntegrityError:
                    bad.append((section_of(row), "same key as another row (migration to version 2)", row[-2],
                                row[-1]))
        conn.execute("RELEASE copy")
        conn.executemany(_REJECTED_SQL, bad)
        before = copied
        copied += len(batch)
        moved += len(bad)
        if copied // MIGRATION_PROGRESS_ROWS != before // MIGRATION_PROGRESS_ROWS:
            report(f"  {table}: {copied:,} rows")
    kept = conn.execute(f"SELECT count(*) FROM {table}_v2").fetchone()[0]
    if kept + moved != copied:
        raise sqlite3.DatabaseError(f"migration of {table} lost rows ({kept} + {moved} of {copied})")
    conn.execute(f"DROP TABLE {table}")
    conn.execute(f"ALTER TABLE {table}_v2 RENAME TO {table}")
    if moved:
        report(f"  {table}: {moved:,} rows whose dates could not be read are kept in the rejected table")


def _migrate_v2(conn, report):
    """Samples and route points clustered by time; every date canonical UTC."""
    conn.create_function("utc_date", 1, utc_date)
    _copy_table(conn, "samples", _v2_sample, report, lambda row: row[1])
    _copy_table(conn, "workout_route_points", _v2_route_point, report, lambda row: "workoutRoutes/" + row[0])
    for table in ("workouts", "medication_dose_events"):
        section = "workouts" if table == "workouts" else "medicationDoseEvents"
        moved = conn.execute(
            f"INSERT INTO rejected (sync_id, section, reason, record) SELECT sync_id, ?, "
            f"'startDate is not a date (migration to version 2)', record FROM {table} "
            f"WHERE utc_date(start_date) IS NULL", (section,)).rowcount
        conn.execute(f"DELETE FROM {table} WHERE utc_date(start_date) IS NULL")
        if moved:
            report(f"  {table}: {moved:,} rows whose dates could not be read are kept in the rejected table")
    conn.execute("UPDATE workouts SET start_date = utc_date(start_date), end_date = utc_date(end_date)")
    conn.execute("UPDATE medication_dose_events SET start_date = utc_date(start_date)")
    # Envelope dates are shown, never keyed on: kept as sent when unreadable.
    conn.execute("UPDATE syncs SET received_at = coalesce(utc_date(received_at), received_at),"
                 " export_date = coalesce(utc_date(export_date), export_date),"
                 " start_date = coalesce(utc_date(start_date), start_date),"
                 " end_date = coalesce(utc_date(end_date), end_date)")
    _recount_sample_types(conn)


def _recount_sample_types(conn):
    conn.execute("DELETE FROM sample_types")
    conn.execute("INSERT INTO sample_types SELECT type, count(*), min(start_date), max(start_date)"
                 " FROM samples GROUP BY type")


#: Every schema change, in order: step N brings a database from version N
#: to N + 1, and PRAGMA user_version counts the steps applied.  A new column,
#: key or index is a new step at the end; a step once released is never
#: edited.  (A new section's table needs no step: tables of SECTIONS that a
#: database lacks are created at every start.)
MIGRATIONS = (
    Migration("the first schema", _create_v1),
    Migration("samples and route points clustered by time, dates in UTC", _migrate_v2, rewrites=True),
)
#: The schema version this receiver writes.
SCHEMA_VERSION = len(MIGRATIONS)


@dataclasses.dataclass
class SyncResult:
    """What one stored sync held; the HTTP layer turns it into the answer."""

    sync_id: typing.Optional[int] = None
    remote_addr: typing.Optional[str] = None
    body_bytes: int = 0
    #: Elements received and rows newly stored, per section name.
    received: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(SECTIONS_BY_NAME, 0))
    inserted: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(SECTIONS_BY_NAME, 0))
    rejected: int = 0
    sections: int = 0
    envelope: dict = dataclasses.field(default_factory=dict)
    duration: float = 0.0

    @property
    def records(self):
        """Elements of the ``data`` sections (what the app counts)."""
        return sum(self.received[section.name] for section in SECTIONS if section.counted)

    @property
    def new_records(self):
        return sum(self.inserted[section.name] for section in SECTIONS if section.counted)

    @property
    def duplicates(self):
        return self.records - self.new_records

    def response(self):
        """The JSON answer the app reads: ``count`` feeds its Sync Log."""
        inserted = {}
        for section in SECTIONS:
            if section.bucket:
                inserted[section.bucket] = inserted.get(section.bucket, 0) + self.inserted[section.name]
        answer = {"ok": True, "count": self.records, "inserted": inserted, "duplicates": self.duplicates,
                  "rejected": self.rejected}
        for section in SECTIONS:
            if section.received_key:
                answer[section.received_key] = self.received[section.name]
        answer["sync_id"] = self.sync_id
        return answer


@dataclasses.dataclass
class FailedSync:
    """A sync that stored nothing: kept as a ``syncs`` row with its reason."""

    remote_addr: typing.Optional[str]
    status: str  # "rejected" (the client's fault) or "failed" (the server's)
    error: str
    body_bytes: typing.Optional[int] = None
    duration: float = 0.0
    envelope_text: typing.Optional[dict] = None
    sync_source: typing.Any = None


def utc_now():
    """Now, as canonical UTC text."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"{now:%Y-%m-%dT%H:%M:%S}.{now.microsecond // 1000:03d}Z"


def _envelope_text(fields):
    return "{" + ",".join(f"{json.dumps(key)}:{value}" for key, value in fields.items()) + "}"


def _storable(value):
    """``value`` as sqlite3 can bind it, lone surrogates escaped."""
    value = _to_sql(value)
    if value.__class__ is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _rollback(conn):
    with contextlib.suppress(sqlite3.Error):
        if conn.in_transaction:
            conn.execute("ROLLBACK")


@contextlib.contextmanager
def _transaction(conn):
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        _rollback(conn)
        raise
    conn.execute("COMMIT")


def _describe_db_error(exc, path):
    """A sentence for the app and the log: what is wrong with the database."""
    text = str(exc)
    lowered = text.lower()
    if "locked" in lowered or "busy" in lowered:
        return "The database is locked by another program; try again later."
    if "readonly" in lowered or "read-only" in lowered:
        return f"The database is read-only; check the permissions of {path}."
    if "full" in lowered:
        return "The disk holding the database is full."
    if "unable to open" in lowered:
        return f"The database {path} cannot be opened; check that its folder exists and is writable."
    return f"Database error: {text.rstrip('.')}."


def database_size(path):
    """Bytes of the database file and its write-ahead log."""
    return sum(os.path.getsize(path + suffix) for suffix in ("", "-wal") if os.path.exists(path + suffix))


#: Errors sqlite3 raises for a value it cannot bind: the row's fault, not the database's.
_UNBINDABLE = (ValueError, OverflowError, sqlite3.InterfaceError, sqlite3.ProgrammingError)
#: The section whose per-type totals sample_types keeps.
SAMPLES = SECTIONS_BY_NAME["samples"]
#: The section whose counts the ``syncs`` table keeps apart (route_points).
ROUTES = SECTIONS_BY_NAME["routes"]
#: Keeps sample_types (rows, first and last date per type) current as rows
#: arrive: counting 5 million samples per type would take a second per page.
_SAMPLE_TYPES_SQL = (
    "INSERT INTO sample_types (type, rows, first_date, last_date) VALUES (?1, ?2, ?3, ?4)"
    " ON CONFLICT (type) DO UPDATE SET rows = rows + excluded.rows,"
    " first_date = min(coalesce(first_date, excluded.first_date), excluded.first_date),"
    " last_date = max(coalesce(last_date, excluded.last_date), excluded.last_date)")


class Store:
    """The SQLite database: schema, one writer at a time, short readers.

    Syncs are written one after another under a lock, each on a fresh
    connection: it notices a database file that was replaced, made
    read-only or repaired since the last sync, and hands its page cache's
    memory back between syncs.  Reads use their own short-lived connections
    and are never blocked by a running ingest (WAL).
    """

    def __init__(self, path, busy_timeout=BUSY_TIMEOUT):
        self.path = path
        self.busy_timeout = busy_timeout
        self._write_lock = threading.Lock()
        self._closed = False
        self._kept = None

    # -- connections and schema ---------------------------------------------

    def open(self, report=None):
        """Create the database or bring it to SCHEMA_VERSION, each migration
        step in its own transaction (``report(text)`` gets progress lines);
        raise StorageUnavailable on failure."""
        with self.writer() as conn:
            try:
                self._migrate(conn, report or (lambda text: None))
            except sqlite3.Error as exc:
                raise StorageUnavailable(_describe_db_error(exc, self.path)) from exc

    def _migrate(self, conn, report):
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StorageUnavailable(
                f"The database {self.path} is at schema version {version}, written by a newer version of this "
                f"receiver (this one knows up to {SCHEMA_VERSION}); upgrade health_receiver.py to use it.")
        fresh = version == 0 and not conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        for step in range(version, SCHEMA_VERSION):
            migration = MIGRATIONS[step]
            if migration.rewrites and not fresh:
                self._check_free_space(migration)
                report(f"Upgrading {self.path} to schema version {step + 1}: {migration.title}...")
            started = time.monotonic()
            if migration.rewrites and not fresh:
                # A rollback journal holds only the pages a rewrite changes;
                # the write-ahead log would hold a copy of every new page.
                conn.execute("PRAGMA journal_mode = DELETE")
                conn.execute(f"PRAGMA cache_size = -{MIGRATION_CACHE_KIB:d}")
            try:
                with _transaction(conn):
                    migration.apply(conn, report)
                    conn.execute(f"PRAGMA user_version = {step + 1:d}")
            finally:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA cache_size = -{CACHE_KIB:d}")
            if migration.rewrites and not fresh:
                report(f"Schema version {step + 1} in {time.monotonic() - started:.1f} s.")
        with _transaction(conn):
            for section in SECTIONS:
                for statement in section.create_sql:
                    conn.execute(statement)

    def free_space(self):
        """Bytes free on the disk that holds the database."""
        return shutil.disk_usage(os.path.dirname(os.path.abspath(self.path))).free

    def _check_free_space(self, migration):
        needed = database_size(self.path)
        free = self.free_space()
        if free < needed:
            raise StorageUnavailable(
                f"Upgrading {self.path} ({migration.title}) needs {needed / 1e6:,.0f} MB of free disk space beside "
                f"it, and {free / 1e6:,.0f} MB are free; free some space, then start again.")

    def schema_version(self):
        with self.reader() as conn:
            return conn.execute("PRAGMA user_version").fetchone()[0]

    def _open_writer(self):
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB:d}")
            # Rows hold whole JSON records: bigger pages mean fewer page
            # splits.  Only takes effect when the file is created.
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE:d}")
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StorageUnavailable(f"The database {self.path} was written by a newer version of this "
                                         "receiver; upgrade health_receiver.py to use it.")
            # Checkpoints run after the answer is sent (see checkpoint()), not
            # inside the COMMIT the app is waiting for.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute(f"PRAGMA journal_size_limit = {64 * MIB:d}")
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def writer(self, keep=False):
        """Hold the write lock and yield a fresh writer connection.

        With ``keep``, the connection stays open until checkpoint() (or the
        next write): closing the last connection makes SQLite fold the
        write-ahead log into the database, which belongs after the answer.
        """
        with self._write_lock:
            self._close_kept()
            if self._closed:
                raise StorageUnavailable("The receiver is shutting down.")
            try:
                conn = self._open_writer()
            except sqlite3.Error as exc:
                raise StorageUnavailable(_describe_db_error(exc, self.path)) from exc
            try:
                yield conn
            except BaseException:
                keep = False
                raise
            finally:
                _rollback(conn)
                if keep:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("PRAGMA shrink_memory")  # its page cache is not needed any more
                    self._kept = conn
                else:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()

    def _close_kept(self):
        if self._kept is not None:
            with contextlib.suppress(sqlite3.Error):
                self._kept.close()
            self._kept = None

    def open_reader(self):
        """A read-only connection; the caller closes it."""
        try:
            return sqlite3.connect(f"file:{quote(os.path.abspath(self.path))}?mode=ro", uri=True,
                                   timeout=self.busy_timeout, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StorageUnavailable(_describe_db_error(exc, self.path)) from exc

    @contextlib.contextmanager
    def reader(self):
        """A read-only connection for one short query."""
        conn = self.open_reader()
        try:
            yield conn
        except sqlite3.Error as exc:
            raise StorageUnavailable(_describe_db_error(exc, self.path)) from exc
        finally:
            conn.close()

    def checkpoint(self, mode="PASSIVE"):
        """Fold the write-ahead log into the database (after the answer)."""
        with contextlib.suppress(StorageUnavailable, sqlite3.Error):
            with self.writer() as conn:
                conn.execute(f"PRAGMA wal_checkpoint({mode})")

    def close(self):
        """Wait for the ingest in progress, then refuse further writes."""
        self.checkpoint("TRUNCATE")
        with self._write_lock:
            self._closed = True
            self._close_kept()

    # -- writing a sync ----------------------------------------------------

    def store_sync(self, payload, remote_addr=None, body_bytes=0):
        """Store every row of ``payload`` in one transaction; return the
        SyncResult once committed.

        A PayloadError rolls everything back and is raised again; a database
        error does the same as StorageUnavailable.  Neither is recorded here
        (see record_failure).
        """
        started = time.monotonic()
        result = SyncResult(remote_addr=remote_addr, body_bytes=body_bytes or 0)
        with self.writer(keep=True) as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
                cur = conn.execute(
                    "INSERT INTO syncs (received_at, remote_addr, body_bytes, status) VALUES (?, ?, ?, 'pending')",
                    (utc_now(), remote_addr, body_bytes))
                sync_id = result.sync_id = cur.lastrowid
                self._write_rows(conn, payload.batches(sync_id), sync_id, result)
                result.sections = len(payload.sections)
                result.envelope = payload.envelope
                result.duration = time.monotonic() - started
                self._finish_sync(conn, sync_id, result, payload.envelope_text)
                conn.execute("COMMIT")
                return result
            except PayloadError:
                _rollback(conn)
                raise
            except sqlite3.Error as exc:
                _rollback(conn)
                raise StorageUnavailable(_describe_db_error(exc, self.path)) from exc

    def record_failure(self, failure):
        """Keep a ``syncs`` row for a sync that stored nothing (best effort:
        the caller reports the original error whatever happens here)."""
        envelope = _envelope_text(failure.envelope_text) if failure.envelope_text else None
        with contextlib.suppress(StorageUnavailable, sqlite3.Error):
            with self.writer() as conn, _transaction(conn):
                conn.execute(
                    "INSERT INTO syncs (received_at, remote_addr, body_bytes, duration_ms, status, error, envelope,"
                    " sync_source) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (utc_now(), failure.remote_addr, failure.body_bytes, int(failure.duration * 1000),
                     failure.status, _storable(failure.error), _storable(envelope),
                     _storable(failure.sync_source)))

    def _write_rows(self, conn, batches, sync_id, result):
        pending = {}
        for section, rows in batches:
            if section is None:
                self._insert_rejected(conn, rows, result)
                continue
            waiting = pending.setdefault(section, [])
            waiting += rows
            if len(waiting) >= BATCH_ROWS:
                self._insert(conn, section, waiting, sync_id, result)
                waiting.clear()
        for section, waiting in pending.items():
            if waiting:
                self._insert(conn, section, waiting, sync_id, result)

    def _insert_rejected(self, conn, rows, result):
        conn.executemany(_REJECTED_SQL, rows)
        result.rejected += len(rows)

    def _insert(self, conn, section, batch, sync_id, result):
        """Insert one batch in key order, counting received and new rows."""
        key = section.row_key
        batch.sort(key=key)
        if section is SAMPLES:
            # One executemany per type, so that sample_types learns each
            # type's new rows, first and last date (the batch is sorted).
            for type_name, rows in itertools.groupby(batch, key=_row_type):
                rows = list(rows)
                new = self._execute_batch(conn, section, rows, sync_id, result)
                result.inserted[section.name] += new
                if new:  # otherwise every date is stored already
                    conn.execute(_SAMPLE_TYPES_SQL, (type_name, new, rows[0][2], rows[-1][2]))
            return
        if section.latest_wins:
            exists = section.exists_sql
            keys = {key(row) for row in batch}
            new = sum(conn.execute(exists, k if isinstance(k, tuple) else (k,)).fetchone() is None for k in keys)
            self._execute_batch(conn, section, batch, sync_id, result)
            result.inserted[section.name] += new
            return
        result.inserted[section.name] += self._execute_batch(conn, section, batch, sync_id, result)

    def _execute_batch(self, conn, section, batch, sync_id, result):
        """executemany one batch; count it as received; return new rows.

        A row sqlite3 cannot bind (a lone surrogate from a JSON escape, say)
        would fail the whole executemany: the batch is then redone row by
        row inside a savepoint and the unbindable rows go to ``rejected``.
        """
        sql = section.insert_sql
        conn.execute("SAVEPOINT batch")
        try:
            changed = conn.executemany(sql, batch).rowcount
        except _UNBINDABLE:
            conn.execute("ROLLBACK TO batch")
            changed = 0
            for row in batch:
                try:
                    changed += conn.execute(sql, row).rowcount
                except _UNBINDABLE as exc:
                    record = json.dumps(row[:-1], ensure_ascii=True, default=str)
                    self._insert_rejected(conn, [(section.name, f"cannot be stored: {exc}", record, sync_id)], result)
                    result.received[section.name] -= 1
        conn.execute("RELEASE batch")
        result.received[section.name] += len(batch)
        return changed

    def _finish_sync(self, conn, sync_id, result, envelope_text):
        env = result.envelope
        routes = ROUTES.name
        conn.execute(
            "UPDATE syncs SET sync_source = ?, export_date = ?, start_date = ?, end_date = ?, received = ?,"
            " inserted = ?, duplicates = ?, rejected = ?, route_points = ?, route_points_inserted = ?,"
            " sections = ?, duration_ms = ?, status = 'ok', envelope = ? WHERE id = ?",
            (_storable(env.get("syncSource")), *(_storable(utc_date(env.get(name)) or env.get(name))
                                                 for name in ("exportDate", "startDate", "endDate")),
             result.records, result.new_records, result.duplicates, result.rejected, result.received[routes],
             result.inserted[routes], result.sections, int(result.duration * 1000),
             _storable(_envelope_text(envelope_text)), sync_id))

    def recount_types(self):
        """Rebuild sample_types from the samples (after editing rows by hand)."""
        with self.writer() as conn, _transaction(conn):
            _recount_sample_types(conn)


def _row_type(row):
    return row[1]


# ---------------------------------------------------------------------------
# Reporting and export: what is stored, read only
# ---------------------------------------------------------------------------

#: Tables whose row counts the totals report, sections first.
TABLES = tuple(section.table for section in SECTIONS) + BOOKKEEPING_TABLES
#: Columns of the syncs table, in export order.
SYNC_COLUMNS = ("id", "received_at", "remote_addr", "sync_source", "export_date", "start_date", "end_date",
                "body_bytes", "received", "inserted", "duplicates", "rejected", "route_points",
                "route_points_inserted", "sections", "duration_ms", "status", "error", "envelope")
#: Columns of the syncs shown by the status page, /api/summary and stats.
SYNC_FIELDS = ("id", "received_at", "remote_addr", "sync_source", "received", "inserted", "duplicates",
               "rejected", "route_points", "body_bytes", "duration_ms", "status", "error")
#: Columns of a workout on the status page.
WORKOUT_FIELDS = ("uuid", "activity_type", "start_date", "duration_seconds", "route_points")


class Export(typing.NamedTuple):
    """What ``export --section NAME`` reads."""

    table: str
    columns: typing.Tuple[str, ...]
    #: The column --since and --until compare with (None: they do not apply).
    date_column: typing.Optional[str]
    order: str


def _export_of(section):
    order = ", ".join(section.key) if section.clustered else (section.date_column or ", ".join(section.key))
    return Export(section.table, section.column_names, section.date_column, order)


#: Export sections: every section by its name, and the syncs.
EXPORTS = {section.name: _export_of(section) for section in SECTIONS}
EXPORTS["syncs"] = Export("syncs", SYNC_COLUMNS, "received_at", "id")

#: Quantity types whose daily value is a total (the others are averaged).
CUMULATIVE_TYPES = frozenset((
    "StepCount", "DistanceWalkingRunning", "DistanceCycling", "DistanceSwimming", "DistanceWheelchair",
    "DistanceDownhillSnowSports", "DistanceCrossCountrySkiing", "DistancePaddleSports", "DistanceRowing",
    "DistanceSkatingSports", "ActiveEnergyBurned", "BasalEnergyBurned", "FlightsClimbed", "AppleExerciseTime",
    "AppleStandTime", "AppleMoveTime", "NikeFuel", "PushCount", "SwimmingStrokeCount", "NumberOfTimesFallen",
    "InhalerUsage", "InsulinDelivery", "NumberOfAlcoholicBeverages", "TimeInDaylight", "UVExposure"))

#: Prefixes HealthKit puts before a type's short name.
TYPE_PREFIXES = ("HKQuantityTypeIdentifier", "HKCategoryTypeIdentifier", "HKCorrelationTypeIdentifier",
                 "HKDataTypeIdentifier", "HKWorkoutTypeIdentifier")
_QUANTITY = TYPE_PREFIXES[0]


def short_type_name(type_name):
    """HKQuantityTypeIdentifierHeartRate -> HeartRate."""
    for prefix in TYPE_PREFIXES:
        if type_name.startswith(prefix) and len(type_name) > len(prefix):
            return type_name[len(prefix):]
    return type_name


_NUMERIC = "typeof(value) IN ('integer', 'real')"
_DAY_OF_TYPE = "FROM samples WHERE type = ? AND start_date >= ? AND start_date < ?"


class ChartKind(typing.NamedTuple):
    """How one kind of type is charted: a day's value and its drawing."""

    name: str
    #: What a day's value is, in words, under the chart's title.
    label: str
    #: One day's aggregate; parameters (type, first instant, end instant).
    sql: str
    #: The aggregate row -> the day's values (value first), or None.
    point: typing.Callable
    #: How it is drawn: a key of DRAWINGS ("bars" or "band").
    draw: str
    #: ``applies(type identifier, short name)``: the first kind that
    #: applies to a type charts it.
    applies: typing.Callable
    #: The value axis starts at zero.
    from_zero: bool = True
    #: The title shows the type's unit (a count has none).
    shows_unit: bool = True


#: Every chart kind, in the order they are tried on a type.
CHART_KINDS = (
    ChartKind("sum", "daily total",
              f"SELECT count(CASE WHEN {_NUMERIC} THEN 1 END), total(CASE WHEN {_NUMERIC} THEN value END) "
              + _DAY_OF_TYPE,
              lambda row: (row[1],) if row[0] else None, "bars",
              lambda type_name, short: type_name.startswith(_QUANTITY) and (
                  short in CUMULATIVE_TYPES or short.startswith("Dietary"))),
    ChartKind("mean", "daily mean, band from min to max",
              f"SELECT count(CASE WHEN {_NUMERIC} THEN 1 END), avg(CASE WHEN {_NUMERIC} THEN value END), "
              f"min(CASE WHEN {_NUMERIC} THEN value END), max(CASE WHEN {_NUMERIC} THEN value END) " + _DAY_OF_TYPE,
              lambda row: row[1:] if row[0] else None, "band",
              lambda type_name, short: type_name.startswith(_QUANTITY), from_zero=False),
    ChartKind("count", "samples per day", "SELECT count(*) " + _DAY_OF_TYPE,
              lambda row: (row[0],) if row[0] else None, "bars", lambda type_name, short: True,
              shows_unit=False),
)
#: Chart kinds by name.
CHART_KINDS_BY_NAME = {kind.name: kind for kind in CHART_KINDS}


def chart_kind(type_name):
    """The name of the chart kind for a type: the first that applies."""
    short = short_type_name(type_name)
    return next(kind.name for kind in CHART_KINDS if kind.applies(type_name, short))


def day_bounds(days, utc, now):
    """[(day, start, end)] of the last ``days`` days (today included) as
    stored timestamps: local days unless ``utc``, daylight saving included."""
    today = now.astimezone(datetime.timezone.utc if utc else None).date()
    bounds = []
    for back in range(days - 1, -2, -1):
        day = today - datetime.timedelta(days=back)
        midnight = datetime.datetime(day.year, day.month, day.day)
        midnight = midnight.replace(tzinfo=datetime.timezone.utc) if utc else midnight.astimezone()
        bounds.append((day.isoformat(), f"{midnight.astimezone(datetime.timezone.utc):%Y-%m-%dT%H:%M:%S}.000Z"))
    return [(day, start, end) for (day, start), (_next, end) in zip(bounds, bounds[1:])]


def local_zone_name(now):
    return now.astimezone().tzname() or "local"


def sample_types(conn):
    """[(type, rows, first_date, last_date)] from the kept totals."""
    return conn.execute("SELECT type, rows, first_date, last_date FROM sample_types ORDER BY type").fetchall()


def table_totals(conn):
    """Row counts per table."""
    return {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in TABLES}


def connection_facts(store):
    """What the endpoint's GET (the app's "Test Connection") answers: row
    counts per table and the last sync."""
    keys = ("id", "received_at", "sync_source", "status", "received", "inserted", "error")
    with store.reader() as conn:
        row = conn.execute(f"SELECT {', '.join(keys)} FROM syncs ORDER BY id DESC LIMIT 1").fetchone()
        return {"totals": table_totals(conn), "last_sync": None if row is None else dict(zip(keys, row))}


def summary(store, days=90, utc=False, now=None, sync_count=20, charts=True):
    """The facts the status page, /api/summary and ``stats`` show."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    bounds = day_bounds(days, utc, now)
    since = bounds[0][1]
    with store.reader() as conn:
        facts = {
            "ok": True,
            "version": __version__,
            "schema_version": conn.execute("PRAGMA user_version").fetchone()[0],
            "generated_at": f"{now:%Y-%m-%dT%H:%M:%SZ}",
            "database": {"path": os.path.abspath(store.path), "size_bytes": database_size(store.path)},
            "totals": table_totals(conn),
            "types": [{"type": t, "name": short_type_name(t), "rows": rows, "first": first, "last": last,
                       "chart": chart_kind(t)} for t, rows, first, last in sample_types(conn)],
            "syncs": [dict(zip(SYNC_FIELDS, row)) for row in conn.execute(
                f"SELECT {', '.join(SYNC_FIELDS)} FROM syncs ORDER BY id DESC LIMIT ?", (sync_count,))],
        }
        if not charts:
            return facts
        facts["days"] = {"count": days, "first": bounds[0][0], "last": bounds[-1][0],
                         "timezone": "UTC" if utc else local_zone_name(now)}
        facts["charts"] = [chart for chart in (chart_data(conn, t, bounds) for t in facts["types"]
                                               if (t["last"] or "") >= since) if chart]
        facts["workouts"] = [dict(zip(WORKOUT_FIELDS, row)) for row in conn.execute(
            "SELECT uuid, activity_type, start_date, duration_seconds, (SELECT count(*) FROM"
            " workout_route_points WHERE workout_uuid = workouts.uuid) FROM workouts"
            " WHERE start_date >= ? ORDER BY start_date DESC", (since,))]
    return facts


def chart_data(conn, type_info, bounds):
    """Daily points of one type over ``bounds``: one key range per day."""
    name, kind = type_info["type"], CHART_KINDS_BY_NAME[type_info["chart"]]
    points = []
    for day, low, high in bounds:
        values = kind.point(conn.execute(kind.sql, (name, low, high)).fetchone())
        points.append([day, *values] if values else [day, None])
    if not any(point[1] is not None for point in points):
        return None
    unit = conn.execute("SELECT unit FROM samples WHERE type = ? ORDER BY start_date DESC LIMIT 1",
                        (name,)).fetchone()
    return {"type": name, "name": type_info["name"], "kind": kind.name, "unit": unit[0] if unit else None,
            "points": points}


def date_bound(text, end=False):
    """A --since (or, with ``end``, --until) value as the canonical UTC
    bound rows are compared with; a bare --until date includes its day.
    Raises UsageError for anything that is not a date."""
    stamp = utc_date(text)
    if stamp is None:
        raise UsageError(f"not a date: {text!r} (expected 2026-01-31 or 2026-01-31T08:00:00Z)")
    if end and len(text.strip()) == 10:
        day = datetime.date.fromisoformat(stamp[:10]) + datetime.timedelta(days=1)
        return f"{day.isoformat()}T00:00:00.000Z", False
    return stamp, end


def export_rows(store, name, type_name=None, since=None, until=None):
    """(columns, rows) of one export section, streamed in key order; the
    caller closes ``rows``."""
    export = EXPORTS[name]
    where, params = [], []
    if type_name is not None:
        where.append("type = ?")
        params.append(type_name)
    if export.date_column and since:
        where.append(f"{export.date_column} >= ?")
        params.append(date_bound(since)[0])
    if export.date_column and until:
        bound, inclusive = date_bound(until, end=True)
        where.append(f"{export.date_column} {'<=' if inclusive else '<'} ?")
        params.append(bound)
    sql = (f"SELECT {', '.join(export.columns)} FROM {export.table}"
           f"{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY {export.order}")
    conn = store.open_reader()
    try:
        return export.columns, _closing_rows(conn, conn.execute(sql, params))
    except sqlite3.Error as exc:
        conn.close()
        raise StorageUnavailable(_describe_db_error(exc, store.path)) from exc


def _closing_rows(conn, cursor):
    """Yield the cursor's rows, then close its connection."""
    try:
        yield from cursor
    finally:
        conn.close()


def resolve_type(store, name):
    """Full identifier for --type: as given, or by short name in any case."""
    with store.reader() as conn:
        known = [row[0] for row in sample_types(conn)]
    for candidate in known:
        if candidate == name:
            return candidate
    wanted = name.lower()
    for candidate in known:
        if candidate.lower() == wanted or short_type_name(candidate).lower() == wanted:
            return candidate
    raise UsageError(f"no samples of type {name}; stored types: "
                     f"{', '.join(short_type_name(t) for t in known) or 'none'}")


#: NDJSON field that carries a section's label (the data key or the
#: workout), and the column it is stored in.
NDJSON_LABELS = {"samples": ("type", "type"), "routes": ("workout", "workout_uuid")}


def _compact(record):
    """A record on one line (pretty-printed ones hold newlines)."""
    if "\n" in record or "\r" in record:
        return json.dumps(json.loads(record), ensure_ascii=False, separators=(",", ":"))
    return record


def ndjson_line(name, columns, row):
    """One exported row; records stay as stored so ``import`` reproduces them."""
    fields = dict(zip(columns, row))
    section = SECTIONS_BY_NAME.get(name)
    if section is None:
        return json.dumps({"section": name, "row": fields}, ensure_ascii=False)
    if section.shape == "object":
        return json.dumps({"section": name, "name": fields["name"], "value": fields["value"]},
                          ensure_ascii=False)
    head = '{"section":' + json.dumps(name)
    if name in NDJSON_LABELS:
        field, column = NDJSON_LABELS[name]
        head += f',"{field}":' + json.dumps(fields[column], ensure_ascii=False)
    return head + ',"record":' + _compact(fields["record"]) + "}"


def object_members(text):
    """{key: original JSON text of its value} for the object that is the
    latin-1 view ``text`` (one NDJSON line); raises PayloadError."""
    payload = Payload(text)
    members = {}

    def member(key, pos):
        _value, raw, end = payload._element(pos)
        members[key] = raw
        return end
        yield  # a generator, as _walk_object delegates to it

    pos = _skip_ws(text, 0).end()
    if text[pos:pos + 1] != "{":
        raise PayloadError("not a JSON object")
    for _batch in payload._walk_object(pos, member):
        pass
    return members


def ndjson_payloads(lines, per_payload):
    """Turn NDJSON export lines (bytes) into payload bodies of at most
    ``per_payload`` lines each: the same shape the app sends."""
    data, routes, characteristics, count = {}, {}, [], 0

    def payload():
        parts = ['"data":{' + ",".join(f'{json.dumps(k)}:[{",".join(v)}]' for k, v in data.items()) + "}"]
        if routes:
            parts.append('"workoutRoutes":{' + ",".join(f'{json.dumps(k)}:[{",".join(v)}]'
                                                        for k, v in routes.items()) + "}")
        if characteristics:
            parts.append('"characteristics":{' + ",".join(characteristics) + "}")
        return ('{"syncSource":"import",' + ",".join(parts) + "}").encode("utf-8", "surrogatepass")

    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            members = object_members(line.decode("latin-1"))
            name = json.loads(members["section"])
            section = SECTIONS_BY_NAME.get(name)
            if section is None:
                if name != "syncs":
                    raise ValueError(f"unknown section {name!r}")
                continue
            if section.shape == "object":
                characteristics.append(f"{members['name']}:{members['value']}")
            elif section.shape == "routes":
                routes.setdefault(json.loads(members[NDJSON_LABELS[name][0]]), []).append(members["record"])
            else:
                label = json.loads(members[NDJSON_LABELS[name][0]]) if name in NDJSON_LABELS else None
                data.setdefault(label or section.app_keys[0], []).append(members["record"])
        except (ValueError, KeyError, TypeError, PayloadError) as exc:
            raise ValueError(f"line {number}: not an export line ({exc})") from None
        count += 1
        if count >= per_payload:
            yield payload()
            data, routes, characteristics, count = {}, {}, [], 0
    if count:
        yield payload()

# ---------------------------------------------------------------------------
# Presentation: the status page (HTML with inline SVG charts)
# ---------------------------------------------------------------------------

PAGE_CSS = """
body{font:14px/1.4 -apple-system,system-ui,sans-serif;margin:0 auto;max-width:760px;padding:12px;color:#222}
h1{font-size:20px;margin:4px 0}h2{font-size:16px;margin:22px 0 6px;border-bottom:1px solid #ddd}
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:3px 6px;text-align:right;white-space:nowrap;border-bottom:1px solid #eee}
th:first-child,td:first-child{text-align:left}tr.fail td{background:#fdecea;color:#8a1c12}
td.err{white-space:normal;text-align:left}.muted{color:#777}.chart{margin:10px 0 18px}
.chart h3{font-size:14px;margin:0}.chart p{margin:0;color:#777;font-size:12px}
svg{width:100%;max-width:560px;height:auto;display:block}svg text{font:10px sans-serif;fill:#555}
"""


def _esc(value):
    return html.escape("" if value is None else str(value), quote=True)


def _number(value, digits=0):
    if value is None:
        return ""
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    return f"{value:,.0f}" if isinstance(value, (int, float)) else _esc(value)


def _parse_stamp(text):
    """A stored timestamp as an aware datetime, or None."""
    if not isinstance(text, str) or len(text) < 19:
        return None
    try:
        stamp = datetime.datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return None
    return stamp.replace(tzinfo=datetime.timezone.utc)


def format_local(text, utc):
    stamp = _parse_stamp(text)
    if stamp is None:
        return _esc(text)
    stamp = stamp if utc else stamp.astimezone()
    return stamp.strftime("%Y-%m-%d %H:%M")


def format_ago(text, now):
    stamp = _parse_stamp(text)
    if stamp is None:
        return ""
    seconds = max(0, (now - stamp).total_seconds())
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min ago"
    if seconds < 48 * 3600:
        return f"{seconds // 3600:.0f} h ago"
    return f"{seconds // 86400:.0f} days ago"


def _tick(value):
    magnitude = abs(value)
    if magnitude >= 10000:
        return f"{value / 1000:.0f}k"
    if magnitude >= 100 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.2g}" if magnitude < 1 else f"{value:.1f}"


def _svg_bars(chart, x, y, span_x):
    bar = max(span_x * 0.8, 1)
    return [f'<rect x="{x(i) - bar / 2:.1f}" y="{y(point[1]):.1f}" width="{bar:.1f}" '
            f'height="{y(0) - y(point[1]):.1f}" fill="#3182bd"/>'
            for i, point in enumerate(chart["points"]) if point[1]]


def _svg_band_line(chart, x, y, span_x):
    points, parts = chart["points"], []
    for run in _runs(points):
        band = [f"{x(i):.1f},{y(points[i][3]):.1f}" for i in run]
        band += [f"{x(i):.1f},{y(points[i][2]):.1f}" for i in reversed(run)]
        parts.append(f'<polygon points="{" ".join(band)}" fill="#9ecae1" fill-opacity="0.5"/>')
        line = " ".join(f"{x(i):.1f},{y(points[i][1]):.1f}" for i in run)
        parts.append(f'<polyline points="{line}" fill="none" stroke="#08519c" stroke-width="1.5"/>')
        if len(run) == 1:
            parts.append(f'<circle cx="{x(run[0]):.1f}" cy="{y(points[run[0]][1]):.1f}" r="2" fill="#08519c"/>')
    return parts


def _runs(points):
    """Index runs of consecutive days that have a value."""
    run = []
    for i, point in enumerate(points):
        if point[1] is None:
            if run:
                yield run
            run = []
        else:
            run.append(i)
    if run:
        yield run


#: How chart kinds are drawn: ``draw(chart, x, y, span_x)`` -> SVG elements.
DRAWINGS = {"bars": _svg_bars, "band": _svg_band_line}


def svg_chart(chart):
    """One type's last days as an inline SVG sized for a phone."""
    width, height, left, right, top, bottom = 360, 140, 38, 6, 8, 20
    kind = CHART_KINDS_BY_NAME[chart["kind"]]
    points = chart["points"]
    values = [value for point in points if point[1] is not None for value in point[1:]]
    if kind.from_zero:
        low, high = 0, max(values) or 1
    else:
        low, high = min(values), max(values)
        pad = (high - low) * 0.1 or abs(high) * 0.1 or 1
        # Never below zero for values that are never negative.
        low, high = (max(low - pad, 0) if low >= 0 else low - pad), high + pad
    span_x = (width - left - right) / max(len(points) - 1, 1)

    def x(i):
        return left + i * span_x

    def y(v):
        return top + (height - top - bottom) * (1 - (v - low) / (high - low))

    parts = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(chart["name"])}">']
    for fraction in (0, 0.5, 1):
        value = low + (high - low) * fraction
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                     f'stroke="#e4e4e4"/><text x="{left - 3}" y="{y(value) + 3:.1f}" text-anchor="end">'
                     f'{_esc(_tick(value))}</text>')
    for i in range(0, len(points), max(1, len(points) // 4)):
        label = datetime.date.fromisoformat(points[i][0]).strftime("%b %d")
        anchor = "end" if x(i) > width - right - 20 else "start" if x(i) < left + 20 else "middle"
        parts.append(f'<text x="{x(i):.1f}" y="{height - 5}" text-anchor="{anchor}">{label}</text>')
    parts += DRAWINGS[kind.draw](chart, x, y, span_x)
    parts.append("</svg>")
    return "".join(parts)


def _duration(seconds):
    if not isinstance(seconds, (int, float)):
        return ""
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}:{minutes % 60:02d}"


def render_status_page(facts, utc, now=None):
    """The whole status page as one self-contained HTML document."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    zone = "UTC" if utc else f"local time ({_esc(facts['days']['timezone'])})"
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>Health receiver</title><style>{PAGE_CSS}</style></head><body>",
           "<h1>Health receiver</h1>",
           f'<p class="muted">{_esc(facts["database"]["path"])} &middot; '
           f'{_esc(_size(facts["database"]["size_bytes"]))} &middot; days in '
           f'{zone} &middot; version {_esc(facts["version"])}</p>']
    out.append("<h2>Last syncs</h2>")
    if not facts["syncs"]:
        out.append('<p class="muted">No sync has arrived yet.</p>')
    else:
        rows = []
        for sync in facts["syncs"]:
            failed = sync["status"] != "ok"
            duration = sync["duration_ms"]
            rows.append((' class="fail"' if failed else "", _cells(
                f'{format_local(sync["received_at"], utc)}<br>'
                f'<span class="muted">{format_ago(sync["received_at"], now)}</span>',
                _esc(sync["sync_source"] or "-"), _number(sync["received"]), _number(sync["inserted"]),
                _number(sync["duplicates"]), _number(sync["rejected"]), _esc(_size(sync["body_bytes"])),
                f"{duration / 1000:.2f} s" if duration is not None else "", _esc(sync["status"]))))
            if failed and sync["error"]:
                rows.append((' class="fail"', f"<td class=\"err\" colspan=\"9\">{_esc(sync['error'])}</td>"))
        out.append(_table(("When", "Source", "Records", "New", "Dup", "Rejected", "Size", "Time", "Status"), rows))
    out.append("<h2>Totals</h2>")
    out.append(_table(("Table", "Rows"), [("", _cells(_esc(table), _number(rows)))
                                           for table, rows in facts["totals"].items()]))
    out.append("<h2>Types</h2>")
    out.append(_table(("Type", "Rows", "First", "Last"), [("", _cells(
        f"<span title=\"{_esc(info['type'])}\">{_esc(info['name'])}</span>", _number(info["rows"]),
        format_local(info["first"], utc), format_local(info["last"], utc))) for info in facts["types"]]))
    out.append(f"<h2>Last {facts['days']['count']} days</h2>")
    if not facts["charts"]:
        out.append('<p class="muted">No samples in these days.</p>')
    for chart in facts["charts"]:
        kind = CHART_KINDS_BY_NAME[chart["kind"]]
        unit = f" ({_esc(chart['unit'])})" if chart["unit"] and kind.shows_unit else ""
        out.append(f'<div class="chart"><h3 title="{_esc(chart["type"])}">{_esc(chart["name"])}{unit}</h3>'
                   f'<p>{kind.label}</p>{svg_chart(chart)}</div>')
    out.append(f"<h2>Workouts, last {facts['days']['count']} days</h2>")
    if not facts["workouts"]:
        out.append('<p class="muted">No workouts in these days.</p>')
    else:
        out.append(_table(("Type", "Date", "Duration", "Route points"), [("", _cells(
            _esc(workout["activity_type"] or "-"), format_local(workout["start_date"], utc),
            _duration(workout["duration_seconds"]), _number(workout["route_points"])))
            for workout in facts["workouts"]]))
    out.append(f'<p class="muted">Generated {format_local(facts["generated_at"], utc)}. The same facts as JSON: '
               f'<a href="{SUMMARY_PATH}">{SUMMARY_PATH}</a>.</p></body></html>')
    return "".join(out)


def _cells(*cells):
    """Table cells from HTML that is already escaped."""
    return "".join(f"<td>{cell}</td>" for cell in cells)


def _table(headers, rows):
    """A table in a box that scrolls sideways on a phone; rows are
    (attributes of the tr, cells HTML)."""
    head = "".join(f"<th>{header}</th>" for header in headers)
    body = "".join(f"<tr{attributes}>{cells}</tr>" for attributes, cells in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _size(size):
    if not isinstance(size, (int, float)):
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000.0
    return ""




# ---------------------------------------------------------------------------
# Sync workflow: one sync from bytes to stored rows (HTTP and import)
# ---------------------------------------------------------------------------

def write_archive(directory, text, sync_id, now=None):
    """Save an accepted body as DIR/<UTC time>-<sync id>.json.gz; return its path.

    Written to a temporary name and renamed, so a file with the final name
    is always complete.  ``text`` is the latin-1 view of the body, so
    encoding it back gives the original bytes.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    name = f"{now:%Y%m%dT%H%M%SZ}-{sync_id}.json.gz"
    final = os.path.join(directory, name)
    temporary = os.path.join(directory, f".{name}.tmp")
    try:
        with gzip.open(temporary, "wb", compresslevel=1) as handle:
            for offset in range(0, len(text), MIB):
                handle.write(text[offset:offset + MIB].encode("latin-1"))
        os.replace(temporary, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return final


def describe_sync(result):
    """The one log line of a stored sync (client text escaped)."""
    env = result.envelope
    source = env.get("syncSource")
    source = source[:60] if isinstance(source, str) and source else "-"
    span = ""
    start, end = env.get("startDate"), env.get("endDate")
    if isinstance(start, str) and isinstance(end, str):
        span = f", {start[:10]} -> {end[:10]}"
    return log_safe(
        f"{result.remote_addr} {source} {result.records} records ({result.new_records} new, {result.duplicates} "
        f"dup, {result.rejected} rejected) in {result.sections} sections, {result.received[ROUTES.name]} route "
        f"points{span}, {result.body_bytes / 1e6:.1f} MB in {result.duration:.2f} s")


class Accepted(typing.NamedTuple):
    """A committed sync, and what remains to do once it is answered."""

    result: SyncResult
    #: The body's latin-1 view, kept only for the archive.
    text: typing.Optional[str]


class SyncIntake:
    """The one way a sync is stored, for the HTTP handler and ``import``:
    decode, ingest in one transaction, record a failure once, and after the
    answer archive and checkpoint."""

    def __init__(self, store, archive=None, log_error=None):
        self.store = store
        self.archive = archive
        self.log_error = log_error or (lambda remote, line: None)

    def refuse(self, remote_addr, status, message):
        """Record a request refused before its body was ingested."""
        self.store.record_failure(FailedSync(remote_addr, status, message))

    def ingest(self, body, remote_addr):
        """Store ``body`` (bytes; a bytearray is emptied once decoded, so its
        memory is returned before the database work).  Returns Accepted;
        raises PayloadError or StorageUnavailable with nothing stored and
        the failure recorded."""
        size = len(body)
        payload = Payload.from_bytes(body)
        if isinstance(body, bytearray):
            body.clear()
        started = time.monotonic()
        try:
            result = self.store.store_sync(payload, remote_addr, size)
        except (PayloadError, StorageUnavailable) as exc:
            self.store.record_failure(FailedSync(
                remote_addr, "rejected" if isinstance(exc, PayloadError) else "failed", str(exc), size,
                time.monotonic() - started, payload.envelope_text, payload.envelope.get("syncSource")))
            raise
        return Accepted(result, payload.text if self.archive else None)

    def after_answer(self, accepted):
        """What the app need not wait for: the archive, then a checkpoint."""
        if accepted.text is not None:
            try:
                write_archive(self.archive, accepted.text, accepted.result.sync_id)
            except OSError as exc:
                self.log_error(accepted.result.remote_addr, f"sync {accepted.result.sync_id} is stored but could "
                                                            f"not be archived in {self.archive}: {exc}")
        self.store.checkpoint()


# ---------------------------------------------------------------------------
# HTTP: configuration, request checks, body reading, handler, server
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class ReceiverConfig:
    """Runtime settings of one server, handed to the handler through it."""

    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    path: str = DEFAULT_PATH
    db: str = DEFAULT_DB
    token: typing.Optional[str] = dataclasses.field(default=None, repr=False)
    auth_header: typing.Optional[str] = None
    max_body: int = DEFAULT_MAX_BODY_MB * MIB
    quiet: bool = False
    timeout: float = DEFAULT_TIMEOUT
    max_ingests: int = DEFAULT_MAX_INGESTS
    tls_cert: typing.Optional[str] = None
    tls_key: typing.Optional[str] = None
    log_stream: typing.Any = dataclasses.field(default=None, repr=False)
    slot_wait: float = INGEST_SLOT_WAIT
    token_source: typing.Optional[str] = None
    archive: typing.Optional[str] = None
    utc: bool = False

    def __post_init__(self):
        self.path = "/" + self.path.strip("/") if self.path.strip("/") else "/"
        if self.token and not self.token_source:
            self.token_source = "configuration"

    def auth_mode(self):
        if not self.token:
            return "none (anyone who can reach this port may post)"
        if self.auth_header:
            return f"custom header {self.auth_header}: <key>"
        return "Authorization: Bearer <key>"


def check_content_length(values, limit):
    """Return the body length from the Content-Length header values.

    Raises ClientError 411 (absent), 400 (invalid) or 413 (over ``limit``).
    """
    if not values:
        raise ClientError(HTTPStatus.LENGTH_REQUIRED, "A Content-Length header or a chunked body is required.")
    lengths = set()
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part.isdigit() or not part.isascii():
                raise ClientError(HTTPStatus.BAD_REQUEST, "The Content-Length header is not a valid length.")
            lengths.add(int(part))
    if len(lengths) != 1:
        raise ClientError(HTTPStatus.BAD_REQUEST, "The request has conflicting Content-Length headers.")
    length = lengths.pop()
    if length > limit:
        raise ClientError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, too_large_message(limit))
    return length


def too_large_message(limit):
    return f"The body is larger than this receiver's limit of {_mib(limit)} MB (--max-body-mb)."


def _mib(size):
    value = size / MIB
    return f"{round(value, 2):g}"


def check_auth(config, headers):
    """Raise ClientError 401 unless the request carries the configured key."""
    if not config.token:
        return
    expected = config.token.encode("utf-8")
    if config.auth_header:
        sent = headers.get(config.auth_header)
        name = config.auth_header
        challenge = ()
    else:
        sent = headers.get("Authorization")
        name = "Authorization"
        challenge = (("WWW-Authenticate", 'Bearer realm="health_receiver"'),)
        if sent is not None:
            scheme, _, credentials = sent.strip().partition(" ")
            sent = credentials.strip() if scheme.lower() == "bearer" else None
    if sent is None:
        raise ClientError(HTTPStatus.UNAUTHORIZED, f"Missing {name} header with the key.", challenge)
    if not hmac.compare_digest(sent.strip().encode("utf-8", "surrogateescape"), expected):
        raise ClientError(HTTPStatus.UNAUTHORIZED, f"The key in the {name} header is wrong.", challenge)


def check_page_auth(config, headers):
    """The status page and /api/summary: the app's header, or HTTP Basic
    with the key as password (any user name), so a browser can log in."""
    if not config.token:
        return
    with contextlib.suppress(ClientError):
        check_auth(config, headers)
        return
    scheme, _, credentials = (headers.get("Authorization") or "").strip().partition(" ")
    if scheme.lower() == "basic":
        try:
            _user, _, password = base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            password = ""
        if hmac.compare_digest(password.encode("utf-8", "surrogateescape"), config.token.encode("utf-8")):
            return
    raise ClientError(HTTPStatus.UNAUTHORIZED, "This page needs the receiver's key: log in with any user name "
                      "and the key as password.", (("WWW-Authenticate", 'Basic realm="health_receiver", '
                                                                         'charset="UTF-8"'),))


def check_content_type(value):
    """Accept application/json with any parameters, or no type at all."""
    if value is None or not value.strip():
        return
    media = value.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ClientError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                          f"Content-Type must be application/json, not {media[:60]}.")


_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")


class BodyReader:
    """Reads a request body from a socket file within a size limit and deadline."""

    def __init__(self, rfile, limit, deadline):
        self.rfile = rfile
        self.limit = limit
        self.deadline = deadline

    # Reads use readinto1/read1 (one socket read each): a client dripping a
    # byte at a time must not keep one call busy past the deadline.

    def _check_deadline(self):
        if time.monotonic() > self.deadline:
            raise ClientError(HTTPStatus.REQUEST_TIMEOUT, "The body did not arrive in time.")

    def read_exact(self, length):
        """Read exactly ``length`` bytes into one bytearray."""
        body = bytearray(length)
        view = memoryview(body)
        got = 0
        try:
            while got < length:
                self._check_deadline()
                n = self.rfile.readinto1(view[got:got + READ_CHUNK])
                if not n:
                    raise ClientError(HTTPStatus.BAD_REQUEST,
                                      f"The body ended after {got} of {length} bytes.")
                got += n
        finally:
            view.release()
        return body

    def pieces(self, length, short_message):
        """Yield the next ``length`` bytes in pieces, as they arrive."""
        left = length
        while left:
            self._check_deadline()
            piece = self.rfile.read1(min(READ_CHUNK, left))
            if not piece:
                raise ClientError(HTTPStatus.BAD_REQUEST, short_message)
            left -= len(piece)
            yield piece

    def chunks_chunked(self):
        """Yield the data of a chunked body; enforce the limit as it arrives."""
        total = 0
        while True:
            self._check_deadline()
            line = self.rfile.readline(1026)
            if not line.endswith(b"\n"):
                raise ClientError(HTTPStatus.BAD_REQUEST, "Malformed chunked body: bad chunk size line.")
            size_text = line.split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.match(size_text):
                raise ClientError(HTTPStatus.BAD_REQUEST, "Malformed chunked body: bad chunk size.")
            size = int(size_text, 16)
            if size == 0:
                break
            total += size
            if total > self.limit:
                raise ClientError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, too_large_message(self.limit))
            yield from self.pieces(size, "Malformed chunked body: a chunk ended early.")
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise ClientError(HTTPStatus.BAD_REQUEST, "Malformed chunked body: missing CRLF after a chunk.")
        for _ in range(100):  # trailer fields, ignored
            line = self.rfile.readline(8192)
            if line in (b"\r\n", b"\n"):
                return
            if not line:
                raise ClientError(HTTPStatus.BAD_REQUEST, "Malformed chunked body: no final CRLF.")
        raise ClientError(HTTPStatus.BAD_REQUEST, "Malformed chunked body: too many trailer fields.")


def collect(chunks, limit):
    """Join body pieces into one bytearray, raising 413 past ``limit``."""
    body = bytearray()
    for piece in chunks:
        body += piece
        if len(body) > limit:
            raise ClientError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, too_large_message(limit))
    return body


def decompress(chunks, encoding, limit):
    """Inflate gzip/deflate pieces into one bytearray of at most ``limit``.

    Stops at limit + 1 decoded bytes, so a small bomb costs little.
    """
    wbits = 16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    body = bytearray()
    first = True
    try:
        for piece in chunks:
            if first and encoding == "deflate" and piece[:1] and (piece[0] & 0x0F) != 8:
                inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as some clients send
            first = False
            data = piece
            while data:
                out = inflater.decompress(data, limit + 1 - len(body))
                body += out
                if len(body) > limit:
                    raise ClientError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                      f"The decompressed body is larger than this receiver's limit of "
                                      f"{_mib(limit)} MB (--max-body-mb).")
                data = inflater.unconsumed_tail
        body += inflater.flush()
    except zlib.error:
        raise ClientError(HTTPStatus.BAD_REQUEST, f"The {encoding} body is corrupt.") from None
    if not inflater.eof:
        raise ClientError(HTTPStatus.BAD_REQUEST, f"The {encoding} body is truncated.")
    if len(body) > limit:
        raise ClientError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, too_large_message(limit))
    return body




class HealthRequestHandler(BaseHTTPRequestHandler):
    """Routes, checks and answers requests; the sync workflow does the rest."""

    protocol_version = "HTTP/1.1"
    server_version = "health_receiver/" + __version__
    error_content_type = "application/json"
    #: Until the request line is parsed (send_error may come first).
    path = None

    def setup(self):
        self.timeout = self.server.config.timeout
        super().setup()

    # -- plumbing ------------------------------------------------------------

    def handle_expect_100(self):
        # Decided in _receive, after auth and size: no 100 Continue before that.
        self._expects_continue = True
        return True

    def handle_one_request(self):
        self._expects_continue = False
        self._body_read = False
        try:
            super().handle_one_request()
        except (ConnectionError, ssl.SSLError) as exc:
            self.close_connection = True
            self.log_error(f"connection lost: {exc}")
        except socket.timeout:
            self.close_connection = True

    def log_request(self, code="-", size="-"):
        pass  # each request logs its own line, with what it did

    def log_message(self, format, *args):
        self.server.log_request_line(self.address_string(), log_safe((format % args) if args else format))

    def log_error(self, format, *args):
        self.server.log_error_line(self.address_string(), log_safe((format % args) if args else format))

    def send_error(self, code, message=None, explain=None):
        """The standard library's errors (bad request line, 431, ...) as JSON."""
        code = HTTPStatus(code)
        self.close_connection = True
        self._send_json(code, {"ok": False, "error": message or code.phrase}, log_error=message or code.phrase)

    def _respond(self, status, body, content_type, headers=()):
        """The one response writer.  A POST whose body was not read closes
        the connection: what the client still sends is not a request."""
        if self.command == "POST" and not self._body_read:
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status, obj, headers=(), log_error=None):
        # Logged first, so the line exists once the client has its answer.
        if log_error is not None:
            self.log_error(f"{self.command or '-'} {(self.path or '-')[:LOG_TEXT_MAX]} -> {int(status)} {log_error}")
        self._respond(status, (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"),
                      "application/json; charset=utf-8", headers)

    def _log_answered(self, status=HTTPStatus.OK):
        self.server.log_request_line(self.address_string(), f"{self.command} {log_safe(self.path, LOG_TEXT_MAX)} "
                                                            f"-> {int(status)}")

    # -- routing -------------------------------------------------------------

    def _dispatch(self):
        """Every method: find the route, answer errors as JSON."""
        route = self.server.routes.get(urlsplit(self.path).path.rstrip("/") or "/")
        try:
            if route is None:
                raise ClientError(HTTPStatus.NOT_FOUND, f"Nothing here; the endpoint is {self.server.config.path}.")
            action = route.get("GET" if self.command == "HEAD" else self.command)
            if action is None:
                raise ClientError(HTTPStatus.METHOD_NOT_ALLOWED,
                                  f"{self.command} is not supported here; use "
                                  f"{' or '.join(sorted(route))} instead.",
                                  (("Allow", ", ".join(sorted(set(route) | ({"HEAD"} if "GET" in route else set())))),))
            if self.command == "POST":
                with self.server.in_flight():
                    action(self)
            else:
                action(self)
        except ClientError as exc:
            self._send_json(exc.status, {"ok": False, "error": exc.message}, exc.headers, log_error=exc.message)
        except PayloadError as exc:
            self._send_json(HTTPStatus.BAD_REQUEST, {"ok": False, "error": exc.message}, log_error=exc.message)
        except StorageUnavailable as exc:
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"ok": False, "error": str(exc)},
                            (("Retry-After", str(RETRY_AFTER)),), log_error=str(exc))
        except (ConnectionError, socket.timeout, ssl.SSLError):
            raise
        except Exception:
            self.server.log_error_line(self.address_string(), f"internal error on {self.command} "
                                       f"{log_safe(self.path, LOG_TEXT_MAX)}:\n{traceback.format_exc().rstrip()}")
            self.close_connection = True
            with contextlib.suppress(Exception):
                self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR,
                                {"ok": False, "error": "Internal error; the receiver's log has the details."})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _dispatch

    # -- what the routes do --------------------------------------------------

    def status_page(self):
        config = self.server.config
        check_page_auth(config, self.headers)
        body = render_status_page(summary(self.server.store, utc=config.utc), config.utc).encode("utf-8")
        self._log_answered()
        self._respond(HTTPStatus.OK, body, "text/html; charset=utf-8")

    def summary_json(self):
        config = self.server.config
        check_page_auth(config, self.headers)
        facts = summary(self.server.store, utc=config.utc)
        self._log_answered()
        self._send_json(HTTPStatus.OK, facts)

    def connection_check(self):
        """GET on the endpoint: the app's "Test Connection"."""
        check_auth(self.server.config, self.headers)
        answer = {"ok": True, "service": "health_receiver", "version": __version__,
                  **connection_facts(self.server.store), "ingests_in_progress": self.server.ingests_in_progress}
        peak = peak_rss_mb()
        if peak is not None:
            answer["peak_rss_mb"] = round(peak, 1)
        self._log_answered()
        self._send_json(HTTPStatus.OK, answer)

    def receive_sync(self):
        server = self.server
        intake = server.intake
        remote = self.address_string()
        try:
            length, transfer, encoding = self._check_post_headers()
            with server.ingest_slot() as got_slot:
                if not got_slot:
                    raise ClientError(HTTPStatus.SERVICE_UNAVAILABLE, "The receiver is busy with other syncs; "
                                      "try again shortly.", (("Retry-After", str(RETRY_AFTER)),))
                if self._expects_continue:
                    self.send_response_only(HTTPStatus.CONTINUE)
                    self.end_headers()
                    self.wfile.flush()
                body = self._read_body(length, transfer, encoding)
                self._body_read = True
                accepted = intake.ingest(body, remote)  # records its own failures
        except ClientError as exc:
            intake.refuse(remote, "failed" if exc.status >= 500 else "rejected", exc.message)
            raise
        server.log_request_line(None, describe_sync(accepted.result))
        self._send_json(HTTPStatus.OK, accepted.result.response())
        self.wfile.flush()
        intake.after_answer(accepted)

    # -- reading a POST ------------------------------------------------------

    def _check_post_headers(self):
        """Decide auth, type, encodings and size from the headers alone."""
        config = self.server.config
        check_auth(config, self.headers)
        check_content_type(self.headers.get("Content-Type"))
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("identity", "gzip", "x-gzip", "deflate"):
            raise ClientError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                              f"Content-Encoding {encoding[:40]} is not supported; use gzip or deflate.")
        transfer = (self.headers.get("Transfer-Encoding") or "").strip().lower()
        if transfer and transfer != "chunked":
            raise ClientError(HTTPStatus.NOT_IMPLEMENTED, f"Transfer-Encoding {transfer[:40]} is not supported.")
        if not transfer:
            return check_content_length(self.headers.get_all("Content-Length"), config.max_body), None, encoding
        if self.headers.get("Content-Length") is not None:
            raise ClientError(HTTPStatus.BAD_REQUEST, "A request cannot have both Content-Length and "
                              "Transfer-Encoding.")
        return None, transfer, encoding

    def _read_body(self, length, transfer, encoding):
        config = self.server.config
        expected = length if length is not None else config.max_body
        deadline = time.monotonic() + config.timeout + expected / MIN_UPLOAD_RATE
        reader = BodyReader(self.rfile, config.max_body, deadline)
        try:
            if encoding == "identity":
                if length is not None:
                    return reader.read_exact(length)
                return collect(reader.chunks_chunked(), config.max_body)
            chunks = (reader.pieces(length, "The body ended before Content-Length bytes arrived.")
                      if length is not None else reader.chunks_chunked())
            return decompress(chunks, encoding, config.max_body)
        except socket.timeout:
            raise ClientError(HTTPStatus.REQUEST_TIMEOUT, "The body stopped arriving; connection closed.") from None


def peak_rss_mb():
    """This process's peak resident memory in MB, or None where unknown."""
    try:
        # Linux: VmHWM is this program's own peak; ru_maxrss would include
        # the parent's memory at fork time.
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1024


class HealthReceiverServer(ThreadingHTTPServer):
    """The HTTP server: owns the config, the store and the ingest slots."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, config, store=None, bind_and_activate=True):
        self.config = config
        self.store = store or Store(config.db)
        self.intake = SyncIntake(self.store, config.archive, self.log_error_line)
        #: {path: {method: handler function}}; the endpoint wins over "/".
        self.routes = {"/": {"GET": HealthRequestHandler.status_page},
                       SUMMARY_PATH: {"GET": HealthRequestHandler.summary_json},
                       config.path.rstrip("/") or "/": {"GET": HealthRequestHandler.connection_check,
                                                        "POST": HealthRequestHandler.receive_sync}}
        self._slots = threading.BoundedSemaphore(config.max_ingests)
        self._slots_taken = 0
        self._log_lock = threading.Lock()
        self._in_flight = 0
        self._idle = threading.Condition()
        self.ssl_context = None
        if config.tls_cert:
            self.ssl_context = make_ssl_context(config.tls_cert, config.tls_key)
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), HealthRequestHandler, bind_and_activate)

    def server_bind(self):
        # HTTPServer.server_bind would look the address up in DNS (getfqdn):
        # slow or hanging on a machine without a resolver, and never needed.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self):
        sock, addr = super().get_request()
        if self.ssl_context is not None:
            # The handshake happens in the request's own thread (see finish_request).
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def finish_request(self, request, client_address):
        if self.ssl_context is not None:
            request.settimeout(self.config.timeout)
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                self.log_error_line(client_address[0], f"TLS handshake failed: {exc}")
                return
        super().finish_request(request, client_address)

    @contextlib.contextmanager
    def in_flight(self):
        """Count a POST until its answer is written, for a clean shutdown."""
        with self._idle:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout):
        """Wait until no POST is being answered (or ``timeout`` passes)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    @contextlib.contextmanager
    def ingest_slot(self):
        """Yield whether a slot for a body was had within --slot-wait."""
        got = self._slots.acquire(timeout=self.config.slot_wait)
        if got:
            with self._idle:
                self._slots_taken += 1
        try:
            yield got
        finally:
            if got:
                with self._idle:
                    self._slots_taken -= 1
                self._slots.release()

    @property
    def ingests_in_progress(self):
        """Bodies being read or stored now."""
        return self._slots_taken

    def _write_log(self, line):
        stream = self.config.log_stream or sys.stderr
        line = f"{utc_now()} {line}\n".encode("utf-8", "backslashreplace").decode("utf-8")
        with self._log_lock:
            with contextlib.suppress(OSError, ValueError):  # a closed or full log must not fail a sync
                stream.write(line)
                stream.flush()

    def log_request_line(self, remote, line):
        """A line about a request that went well; --quiet drops it."""
        if not self.config.quiet:
            self._write_log(line if remote is None else f"{remote} {line}")

    def log_error_line(self, remote, line):
        self._write_log(f"{remote or '-'} ERROR {line}")

    def handle_error(self, request, client_address):
        self.log_error_line(client_address[0] if client_address else "-",
                            "unexpected error:\n" + traceback.format_exc().rstrip())



def make_ssl_context(cert, key):
    """A TLS 1.2+ server context; raise UsageError with a clear sentence."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for label, path in (("certificate", cert), ("key", key or cert)):
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise UsageError(f"TLS {label} file {path} does not exist or cannot be read.")
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"TLS certificate {cert} and key {key or cert} cannot be loaded: {exc}.") from None
    return context


# ---------------------------------------------------------------------------
# Command line: serve, stats, export, import
# ---------------------------------------------------------------------------

def local_addresses():
    """IPv4 addresses of this machine's interfaces, found without traffic."""
    found = set()
    try:
        import fcntl
        import struct
        for _index, name in socket.if_nameindex():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                with contextlib.suppress(OSError):
                    packed = fcntl.ioctl(probe.fileno(), 0x8915,  # SIOCGIFADDR
                                         struct.pack("256s", name[:15].encode()))
                    found.add(socket.inet_ntoa(packed[20:24]))
    except (ImportError, OSError, AttributeError):
        pass
    if not found:
        # connect() on a UDP socket only picks a route; no packet is sent.
        with contextlib.suppress(OSError):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect(("192.0.2.1", 9))
                found.add(probe.getsockname()[0])
    usable = [a for a in found if not ipaddress.ip_address(a).is_loopback and a != "0.0.0.0"]
    return sorted(usable, key=ipaddress.ip_address)


def _is_loopback(host):
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def banner_lines(config, port):
    """What startup prints: where to listen, what to type into the app."""
    scheme = "https" if config.tls_cert else "http"
    host = config.host
    shown_host = f"[{host}]" if ":" in host else host
    lines = [f"Listening on {scheme}://{shown_host}:{port}"]
    if host in ("0.0.0.0", "::", ""):
        urls = [f"{scheme}://{addr}:{port}" for addr in local_addresses()]
        urls = urls or [f"{scheme}://127.0.0.1:{port}"]
    else:
        urls = [f"{scheme}://{shown_host}:{port}"]
    lines.append("Server URL for Health Export Pro: " + "  or  ".join(urls))
    lines.append(f"Endpoint Path: {config.path}")
    if config.token:
        if config.auth_header:
            lines.append(f"Auth Type: Custom Header, header name {config.auth_header} (key from {config.token_source})")
        else:
            lines.append(f"Auth Type: Bearer (key from {config.token_source})")
    else:
        lines.append("Auth Type: None")
        if not _is_loopback(host):
            lines.append("WARNING: no key is set, so anyone who can reach this port can post data; "
                         f"set {TOKEN_ENV} to require one.")
    if config.path != "/":
        lines.append(f"Status page: {urls[0]}/ (in a browser)")
    lines.append(f"Database: {os.path.abspath(config.db)}")
    if config.archive:
        lines.append(f"Archive: {os.path.abspath(config.archive)}")
    return lines


def serve(config, out=None, ready=None):
    """Run the receiver until SIGINT/SIGTERM (or ``ready``'s server is shut down).

    ``ready``, if given, is called with the server once it listens.  Returns
    the exit code.
    """
    out = out or sys.stdout
    store = Store(config.db)
    try:
        store.open(report=lambda line: print(line, file=out, flush=True))
        server = HealthReceiverServer(config, store)
    except StorageUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    # Installed before the banner: whoever reads it may stop the server at once.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, stop)
    try:
        for line in banner_lines(config, server.server_address[1]):
            print(line, file=out)
        out.flush()
        if ready is not None:
            ready(server)
        server.serve_forever(poll_interval=0.25)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        server.server_close()  # no new connections
        server.wait_idle(SHUTDOWN_WAIT)  # the POST in flight is stored and answered
        store.close()  # and anything still running after that waits for its commit
    if not config.quiet:
        print("Stopped; database closed.", file=out)
    return 0


def read_token(token_file, environ):
    """The key from --token-file or the environment, and where it came from."""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as exc:
            raise UsageError(f"cannot read the token file {token_file}: {exc.strerror}") from None
        if not token:
            raise UsageError(f"the token file {token_file} is empty")
        return token, f"file {token_file}"
    token = (environ.get(TOKEN_ENV) or "").strip()
    return (token, "environment variable " + TOKEN_ENV) if token else (None, None)


def _positive_mb(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _header_name(text):
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", text):
        raise argparse.ArgumentTypeError(f"not a valid header name: {text!r}")
    return text


def serve_parser():
    parser = argparse.ArgumentParser(
        prog="health_receiver.py [serve]",
        description="Receive Health Export Pro syncs into a SQLite database.",
        epilog="Other commands (each with --help): stats, export, import, bench. "
               f"The key comes from ${TOKEN_ENV} or --token-file; without one, no auth.")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (default %(default)s; 0 picks one)")
    parser.add_argument("--path", default=DEFAULT_PATH, help="endpoint path, as set in the app (default %(default)s)")
    parser.add_argument("--db", default=DEFAULT_DB, help="SQLite database file (default %(default)s)")
    parser.add_argument("--token-file", metavar="PATH", help="read the key from this file instead of $" + TOKEN_ENV)
    parser.add_argument("--auth-header", metavar="NAME", type=_header_name,
                        help="take the key from this header (e.g. X-API-Key) instead of 'Authorization: Bearer'")
    parser.add_argument("--max-body-mb", type=_positive_mb, default=DEFAULT_MAX_BODY_MB, metavar="MB",
                        help="largest accepted body in MiB, after decompression (default %(default)s)")
    parser.add_argument("--timeout", type=_positive_mb, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="close connections idle this long (default %(default)s)")
    parser.add_argument("--max-ingests", type=int, default=DEFAULT_MAX_INGESTS, metavar="N",
                        help="request bodies held in memory at once; others wait (default %(default)s)")
    parser.add_argument("--tls-cert", metavar="PATH", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", metavar="PATH", help="private key for --tls-cert (PEM)")
    parser.add_argument("--archive", metavar="DIR", help="also save every accepted body as DIR/<time>-<sync id>.json.gz")
    parser.add_argument("--utc", action="store_true", help="status page days are UTC days, not this machine's")
    parser.add_argument("--quiet", action="store_true", help="log only errors")
    return parser


def config_from_args(args, environ):
    """A ReceiverConfig from serve's arguments; raises UsageError."""
    token, source = read_token(args.token_file, environ)
    if args.tls_key and not args.tls_cert:
        raise UsageError("--tls-key needs --tls-cert")
    if args.max_ingests < 1:
        raise UsageError("--max-ingests must be at least 1")
    config = ReceiverConfig(host=args.host, port=args.port, path=args.path, db=args.db, token=token,
                            auth_header=args.auth_header, max_body=int(args.max_body_mb * MIB),
                            quiet=args.quiet, timeout=args.timeout, max_ingests=args.max_ingests,
                            tls_cert=args.tls_cert, tls_key=args.tls_key, token_source=source,
                            archive=args.archive, utc=args.utc)
    if config.archive:
        try:
            os.makedirs(config.archive, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the archive folder {config.archive}: {exc.strerror}") from None
        if not os.access(config.archive, os.W_OK):
            raise UsageError(f"the archive folder {config.archive} is not writable")
    return config


def run_serve(args, out):
    return serve(config_from_args(args, args.environ), out)


#: Lines of an NDJSON export ingested as one sync by ``import``.
IMPORT_CHUNK_LINES = 100000
#: File names ``import`` picks up when given a folder.
IMPORT_SUFFIXES = (".json", ".json.gz", ".ndjson", ".ndjson.gz", ".jsonl", ".jsonl.gz")


def _existing_store(path):
    if not os.path.exists(path):
        raise ValueError(f"no database at {path}")
    return Store(path)


def stats_parser():
    parser = argparse.ArgumentParser(prog="health_receiver.py stats",
                                     description="Totals per table and per type, the last 10 syncs, the "
                                                 "database size and schema version.")
    parser.add_argument("--db", default=DEFAULT_DB, help="SQLite database file (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--recount", action="store_true",
                        help="first rebuild the per-type totals (after deleting samples by hand)")
    return parser


def run_stats(args, out):
    store = _existing_store(args.db)
    if args.recount:
        store.recount_types()
    facts = summary(store, sync_count=10, charts=False)
    if args.json:
        json.dump(facts, out, indent=2, ensure_ascii=False)
        out.write("\n")
        return 0
    print(f"Database: {facts['database']['path']} ({_size(facts['database']['size_bytes'])}), "
          f"schema version {facts['schema_version']}", file=out)
    print(f"\n{'Table':<26}{'Rows':>12}", file=out)
    for table, rows in facts["totals"].items():
        print(f"{table:<26}{rows:>12,}", file=out)
    if facts["types"]:
        print(f"\n{'Type':<36}{'Rows':>12}  {'First':<17} Last", file=out)
        for info in facts["types"]:
            print(f"{info['name'][:36]:<36}{info['rows']:>12,}  {format_local(info['first'], False):<17} "
                  f"{format_local(info['last'], False)}", file=out)
    print(f"\nLast {len(facts['syncs'])} syncs", file=out)
    print(f"{'When':<17} {'Source':<20}{'Records':>10}{'New':>10}{'Dup':>10}{'Rejected':>9}  Status", file=out)
    for sync in facts["syncs"]:
        status = sync["status"] if sync["status"] == "ok" else f"{sync['status']}: {sync['error']}"
        print(f"{format_local(sync['received_at'], False):<17} {str(sync['sync_source'] or '-')[:20]:<20}"
              f"{sync['received']:>10,}{sync['inserted']:>10,}{sync['duplicates']:>10,}{sync['rejected']:>9,}  "
              f"{status}", file=out)
    return 0


def export_parser():
    parser = argparse.ArgumentParser(prog="health_receiver.py export",
                                     description="Stream stored rows as CSV or NDJSON (NDJSON can be "
                                                 "imported again).")
    parser.add_argument("--db", default=DEFAULT_DB, help="SQLite database file (default %(default)s)")
    parser.add_argument("--section", choices=sorted(EXPORTS), default="samples", help="what to export "
                        "(default samples)")
    parser.add_argument("--type", help="samples of this type only: HKQuantityTypeIdentifierHeartRate, "
                                       "HeartRate or heartrate")
    parser.add_argument("--since", metavar="DATE", help="rows from this UTC date or time on (2026-01-31)")
    parser.add_argument("--until", metavar="DATE", help="rows up to this UTC date (included) or time")
    parser.add_argument("--format", choices=("csv", "ndjson"), default="csv", help="default csv")
    parser.add_argument("--output", metavar="FILE", help="write here instead of standard output")
    return parser


def run_export(args, out):
    for value in (args.since, args.until):
        if value is not None:
            date_bound(value)  # a usage error before anything is written
    store = _existing_store(args.db)
    type_name = None
    if args.type:
        if args.section != SAMPLES.name:
            raise UsageError(f"--type applies to --section {SAMPLES.name}")
        type_name = resolve_type(store, args.type)
    columns, rows = export_rows(store, args.section, type_name, args.since, args.until)
    target = open(args.output, "w", encoding="utf-8", newline="") if args.output else out
    count = 0
    try:
        if args.format == "csv":
            writer = csv.writer(target)
            writer.writerow(columns)
            for row in rows:
                writer.writerow(row)
                count += 1
        else:
            for row in rows:
                target.write(ndjson_line(args.section, columns, row))
                target.write("\n")
                count += 1
    finally:
        rows.close()
        if args.output:
            target.close()
    if args.output:
        print(f"{count} rows of {args.section} written to {args.output}", file=sys.stderr)
    return 0


def import_files(paths):
    """The files named, folders expanded to their payload files, sorted."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if name.endswith(IMPORT_SUFFIXES) and not name.startswith(".") and os.path.isfile(full):
                    found.append(full)
        else:
            found.append(path)
    return found


def _read_file(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        return bytearray(handle.read())


def _is_ndjson(path, body):
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith((".ndjson", ".jsonl")):
        return True
    first = bytes(body[:body.find(b"\n")] if b"\n" in body[:65536] else b"")
    return first.lstrip().startswith(b'{"section":')


class ImportProgress:
    """Files done/total, MB, records, rate, ETA: in place on a terminal."""

    def __init__(self, files, total_bytes, stream):
        self.files, self.total_bytes, self.stream = files, total_bytes, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.done = self.bytes = self.records = self.failed = 0
        self.started = time.monotonic()

    def file_done(self, path, size, message, failed=False):
        self.done += 1
        self.bytes += size
        self.failed += failed
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.bytes / 1e6 / elapsed
        left = (self.total_bytes - self.bytes) / 1e6 / rate if rate else 0
        status = (f"files {self.done}/{self.files}, {self.bytes / 1e6:.1f} MB, {self.records:,} records, "
                  f"{rate:.1f} MB/s, ETA {left:.0f} s")
        if self.tty:
            if failed:
                self.stream.write(f"\r\x1b[K{path}: {message}\n")
            self.stream.write("\r\x1b[K" + status)
            if self.done == self.files:
                self.stream.write("\n")
        else:
            self.stream.write(f"{path}: {message} ({status})\n")
        self.stream.flush()


def import_parser():
    parser = argparse.ArgumentParser(prog="health_receiver.py import",
                                     description="Ingest saved payloads (export-*.json, archive .json.gz, "
                                                 "NDJSON exports) through the same path as a sync; folders "
                                                 "are searched for such files.")
    parser.add_argument("--db", default=DEFAULT_DB, help="SQLite database file (default %(default)s)")
    parser.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
    return parser


def run_import(args, out):
    store = Store(args.db)
    store.open(report=lambda line: print(line, file=sys.stderr, flush=True))
    intake = SyncIntake(store)
    paths = import_files(args.paths)
    sizes = {path: os.path.getsize(path) if os.path.isfile(path) else 0 for path in paths}
    progress = ImportProgress(len(paths), sum(sizes.values()), sys.stderr)
    for path in paths:
        try:
            body = _read_file(path)
            if _is_ndjson(path, body):
                bodies = ndjson_payloads(bytes(body).splitlines(), IMPORT_CHUNK_LINES)
            else:
                bodies = [body]
            records = new = dup = rejected = 0
            for payload_body in bodies:
                accepted = intake.ingest(payload_body, "import " + os.path.basename(path))
                intake.after_answer(accepted)
                result = accepted.result
                points, new_points = result.received[ROUTES.name], result.inserted[ROUTES.name]
                records += result.records + points
                new += result.new_records + new_points
                dup += result.duplicates + points - new_points
                rejected += result.rejected
            progress.records += records
            progress.file_done(path, sizes[path], f"{records:,} records ({new:,} new, {dup:,} dup, "
                                                  f"{rejected:,} rejected)")
        except (OSError, EOFError, ValueError, zlib.error, PayloadError) as exc:
            progress.file_done(path, sizes[path], f"skipped: {exc}", failed=True)
        except StorageUnavailable as exc:
            progress.file_done(path, sizes[path], f"not imported: {exc}", failed=True)
    store.close()
    failed = f", {progress.failed} failed" if progress.failed else ""
    print(f"{progress.done - progress.failed} of {progress.done} files imported{failed}.", file=out)
    return 1 if progress.failed else 0


# ---------------------------------------------------------------------------
# Bench: the receiver against a baseline, at any database size
# ---------------------------------------------------------------------------

#: HealthKit types of the generated payload: (identifier, unit, source, value range).
BENCH_TYPES = (
    ("HKQuantityTypeIdentifierHeartRate", "count/min", "Jane\u2019s Apple Watch", (48, 170)),
    ("HKQuantityTypeIdentifierStepCount", "count", "iPhone", (0, 900)),
    ("HKQuantityTypeIdentifierActiveEnergyBurned", "kcal", "Jane\u2019s Apple Watch", (0, 40)),
    ("HKQuantityTypeIdentifierOxygenSaturation", "%", "Jane\u2019s Apple Watch", (0.9, 1.0)),
    ("HKCategoryTypeIdentifierSleepAnalysis", None, "Jane\u2019s Apple Watch", None),
)
#: First instant of generated payloads.
BENCH_START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
#: Days one generated sync covers when filling a database (a history of
#: consecutive windows).
BENCH_WINDOW_DAYS = 3


def make_bench_payload(target_mb, seed=7, start=BENCH_START, days=30):
    """A realistic sync of about ``target_mb`` MB covering ``days`` days from
    ``start``: five sample types (5% without uuid, each in time order), 15
    workouts with ~10k route points, medications, dose events and
    characteristics.  Returns (body bytes, number of data elements)."""
    import random
    rng = random.Random(seed)
    target = int(target_mb * 1e6)
    window = int(days * 86400)

    def stamp(seconds):
        return (start + datetime.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.000Z")

    def uid():
        return (f"{rng.getrandbits(32):08X}-{rng.getrandbits(16):04X}-4{rng.getrandbits(12):03X}-"
                f"A{rng.getrandbits(12):03X}-{rng.getrandbits(48):012X}")

    workouts, routes = [], {}
    for n in range(15):
        begin = n * window // 15 + 3600 * 7
        duration = rng.randint(1800, 4000)
        wid = uid()
        workouts.append(json.dumps({
            "uuid": wid, "workoutActivityType": rng.choice(["running", "cycling", "walking"]),
            "startDate": stamp(begin), "endDate": stamp(begin + duration), "durationSeconds": float(duration),
            "totalEnergyBurned": round(rng.uniform(100, 700), 1), "totalEnergyBurnedUnit": "kcal",
            "totalDistance": round(rng.uniform(2000, 20000), 1), "totalDistanceUnit": "m",
            "sourceName": "Jane\u2019s Apple Watch", "metadata": {"HKIndoorWorkout": 0}}, ensure_ascii=False))
        lat, lon = 47.69 + rng.random() / 100, -122.27 - rng.random() / 100
        points = []
        for i in range(667):
            lat += rng.uniform(-1e-4, 1e-4)
            lon += rng.uniform(-1e-4, 1e-4)
            points.append(f'{{"latitude":{lat:.7f},"longitude":{lon:.7f},"altitude":{rng.uniform(20, 80):.2f},'
                          f'"timestamp":"{stamp(begin + 5 * i)}","speed":{rng.uniform(2, 4):.2f},'
                          f'"course":{rng.uniform(0, 360):.1f},"horizontalAccuracy":3.5,"verticalAccuracy":2.1}}')
        routes[wid] = "[" + ",".join(points) + "]"
    medications = [json.dumps({"conceptIdentifier": f"rx-{i}", "displayText": name, "nickname": None,
                               "form": "tablet", "isArchived": False, "hasSchedule": True,
                               "codings": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                            "code": str(1000 + i)}]})
                   for i, name in enumerate(["Aspirin", "Lisinopril", "Metformin", "Vitamin D", "Ibuprofen"])]
    doses = [json.dumps({"uuid": uid(), "medicationConceptIdentifier": f"rx-{i % 5}",
                         "startDate": stamp(i * window // 300), "endDate": stamp(i * window // 300),
                         "logStatus": rng.choice(["taken", "skipped"]), "doseQuantity": 1, "unit": "tablet",
                         "scheduledDate": stamp(i * window // 300)}) for i in range(300)]
    head = (f'{{"exportDate":"{stamp(window)}","startDate":"{stamp(0)}","endDate":"{stamp(window)}",'
            '"syncSource":"manual-upload","characteristics":{"biologicalSex":"female","dateOfBirth":"1985-04-12",'
            '"bloodType":"A+","wheelchairUse":"no","activityMoveMode":"activeEnergy"},"data":{')
    fixed = ('"workouts":[' + ",".join(workouts) + '],"medications":[' + ",".join(medications)
             + '],"medicationDoseEvents":[' + ",".join(doses) + "]")
    tail = '},"workoutRoutes":{' + ",".join(f'"{k}":{v}' for k, v in routes.items()) + "}}"
    budget = target - len(head) - len(fixed) - len(tail)
    per_type = [[] for _ in BENCH_TYPES]
    # About 250 bytes an element: spread each type's samples over the window.
    step = max(1, window * len(BENCH_TYPES) * 250 // max(budget, 1))
    size = 0
    i = 0
    while size < budget:
        t = i % len(BENCH_TYPES)
        identifier, unit, source, span = BENCH_TYPES[t]
        begin = (i // len(BENCH_TYPES) * step) % window
        fields = []
        if i % 20:
            fields.append(f'"uuid":"{uid()}"')
        fields.append(f'"startDate":"{stamp(begin)}","endDate":"{stamp(begin + 60)}"')
        if span is None:
            fields.append(f"\"value\":\"{rng.choice(['asleepCore', 'asleepDeep', 'asleepREM', 'awake'])}\"")
        elif isinstance(span[0], float):
            fields.append(f'"value":{rng.uniform(*span):.3f},"unit":"{unit}"')
        else:
            fields.append(f'"value":{rng.randint(*span)},"unit":"{unit}"')
        fields.append(f'"sourceName":"{source}","sourceVersion":"10.2","device":"Watch6,2",'
                      f'"metadata":{{"HKMetadataKeyHeartRateMotionContext":{i % 3}}}')
        element = "{" + ",".join(fields) + "}"
        per_type[t].append(element)
        size += len(element.encode("utf-8")) + 1
        i += 1
    samples = ",".join(f"\"{BENCH_TYPES[t][0]}\":[{','.join(items)}]" for t, items in enumerate(per_type))
    body = (head + fixed + "," + samples + tail).encode("utf-8")
    elements = i + len(workouts) + len(medications) + len(doses)
    return body, elements



def run_baseline(body_file, db_file):
    """The baseline, run in its own process: the usual receiver.  json.loads
    of the whole body, then the samples table's rows (the element kept with
    json.dumps) in one executemany, into schema version 1's table (a random
    uuid key plus a (type, start_date) index) with the receiver's page size,
    cache and durability.  Prints its time and peak memory as JSON."""
    with open(body_file, "rb") as handle:
        body = handle.read()
    db = sqlite3.connect(db_file, isolation_level=None)
    db.execute(f"PRAGMA page_size = {PAGE_SIZE:d}")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute(f"PRAGMA cache_size = -{CACHE_KIB:d}")
    db.executescript(SCHEMA_V1)
    started = time.perf_counter()
    payload = json.loads(body)
    special = {key for section in SECTIONS if section is not SAMPLES for key in section.app_keys}
    rows = [(s.get("uuid"), t, s.get("startDate"), s.get("endDate"), s.get("value"), s.get("unit"),
             s.get("sourceName"), json.dumps(s), 1)
            for t, samples in payload["data"].items() if isinstance(samples, list) and t not in special
            for s in samples]
    db.execute("BEGIN")
    db.executemany("INSERT OR IGNORE INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.execute("COMMIT")
    seconds = time.perf_counter() - started
    db.close()
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rows": len(rows)}))
    return 0


def _start_child_server(db):
    """Start a receiver in a child process; return (process, port)."""
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--host", "127.0.0.1", "--port", "0",
                             "--db", db, "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, universal_newlines=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        match = re.match(r"Listening on http://127\.0\.0\.1:(\d+)\s*$", line)
        if match:
            return proc, int(match.group(1))
    proc.kill()
    raise RuntimeError("the receiver did not start: " + "".join(lines))


def _stop_child_server(proc):
    proc.terminate()
    proc.wait(60)
    proc.stdout.close()


def _post(port, body, path=DEFAULT_PATH):
    """POST ``body``; return (seconds, status, answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    with contextlib.closing(conn):
        started = time.perf_counter()
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
        seconds = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"the receiver answered {response.status}: {answer}")
    return seconds, response.status, answer


def _get_status(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    with contextlib.closing(conn):
        conn.request("GET", DEFAULT_PATH)
        return json.loads(conn.getresponse().read())


def bench_once(body, work_dir):
    """One round: the receiver (two posts) and the baseline, each fresh."""
    db = os.path.join(work_dir, "bench.db")
    proc, port = _start_child_server(db)
    try:
        first = _post(port, body)
        second = _post(port, body)
        peak = _get_status(port).get("peak_rss_mb")
    finally:
        _stop_child_server(proc)
    body_file = os.path.join(work_dir, "body.json")
    with open(body_file, "wb") as handle:
        handle.write(body)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "bench", "--baseline-child", body_file,
                          os.path.join(work_dir, "baseline.db")],
                         stdout=subprocess.PIPE, check=True, text=True).stdout
    baseline = json.loads(out)
    for name in os.listdir(work_dir):
        os.unlink(os.path.join(work_dir, name))
    return {"first": first[0], "second": second[0], "peak": peak, "answer": first[2], "repeat": second[2],
            "baseline": baseline["seconds"], "baseline_peak": baseline["peak_rss_mb"]}


def bench_concurrent(body, posts, work_dir):
    """Post ``posts`` copies of ``body`` at once to a fresh receiver (default
    --max-ingests); return (seconds until all answered, statuses, peak MB)."""
    proc, port = _start_child_server(os.path.join(work_dir, "concurrent.db"))
    statuses = []
    try:
        started = time.perf_counter()
        threads = [threading.Thread(target=lambda: statuses.append(_post(port, body)[1])) for _ in range(posts)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        peak = _get_status(port).get("peak_rss_mb")
    finally:
        _stop_child_server(proc)
    return elapsed, sorted(statuses), peak


def bench_against_baseline(mb, runs, out, concurrent=1):
    print(f"Generating a {mb:g} MB sync...", file=out)
    body, elements = make_bench_payload(mb)
    size_mb = len(body) / 1e6
    print(f"{size_mb:.1f} MB, {elements} records + route points; {runs} run(s), each: receiver (new, then "
          f"repeat) and baseline.", file=out)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="health-bench-") as work_dir:
        for n in range(runs):
            result = bench_once(body, work_dir)
            rounds.append(result)
            print(f"  run {n + 1}: first {result['first']:.2f} s, repeat {result['second']:.2f} s, peak RSS "
                  f"{result['peak']:.0f} MB | baseline {result['baseline']:.2f} s, {result['baseline_peak']:.0f} MB",
                  file=out, flush=True)
    med = {key: statistics.median(r[key] for r in rounds)
           for key in ("first", "second", "peak", "baseline", "baseline_peak")}
    answer = rounds[0]["answer"]
    records = answer["count"] + answer["routePoints"]
    repeat = rounds[0]["repeat"]
    print(f"\nReceiver (median of {runs}), every section stored, WAL + synchronous=FULL:", file=out)
    print(f"  first post  {med['first']:6.2f} s  {size_mb / med['first']:6.1f} MB/s  "
          f"{records / med['first']:9,.0f} records/s  (count {answer['count']}, {answer['routePoints']} route "
          f"points)", file=out)
    print(f"  repeat post {med['second']:6.2f} s  {size_mb / med['second']:6.1f} MB/s  (all "
          f"{repeat['duplicates']} duplicates, nothing inserted: {sum(repeat['inserted'].values()) == 0})",
          file=out)
    print(f"  peak RSS    {med['peak']:6.0f} MB", file=out)
    print("Baseline (json.loads + one executemany of the same sample rows into schema version 1's table; "
          "samples only):", file=out)
    print(f"  time        {med['baseline']:6.2f} s\n  peak RSS    {med['baseline_peak']:6.0f} MB", file=out)
    print(f"Ratios: time {med['first'] / med['baseline']:.2f}x the baseline, peak RSS "
          f"{med['peak'] / med['baseline_peak']:.2f}x the baseline.", file=out)
    if concurrent > 1:
        with tempfile.TemporaryDirectory(prefix="health-bench-") as work_dir:
            elapsed, statuses, peak = bench_concurrent(body, concurrent, work_dir)
        print(f"{concurrent} concurrent posts of the same {size_mb:.0f} MB (--max-ingests {DEFAULT_MAX_INGESTS}): "
              f"all answered in {elapsed:.2f} s, statuses {statuses}, peak RSS {peak:.0f} MB "
              f"({peak / med['peak']:.1f}x one post's).", file=out)
    per_50 = med["first"] * 50 / size_mb
    print(f"\nA 50 MB sync takes about {per_50:.1f} s on this machine; the app waits 30 s, so a machine up to "
          f"{30 / per_50:.0f}x slower still answers in time (a Raspberry Pi 4 is typically 3-5x slower than a "
          f"desktop, a Pi Zero 2 about 10x). Peak memory for this {size_mb:.0f} MB sync: {med['peak']:.0f} MB.",
          file=out)
    return 0


def _window_payload(mb, index):
    """The generated sync of the ``index``-th window of a history."""
    start = BENCH_START + datetime.timedelta(days=BENCH_WINDOW_DAYS * index)
    return make_bench_payload(mb, seed=1000 + index, start=start, days=BENCH_WINDOW_DAYS)[0]


def evict_from_cache(path):
    """Drop a database's pages from the OS cache, as a machine whose memory
    cannot hold the file sees it; False where the OS cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for name in (path, path + "-wal"):
        if os.path.exists(name):
            fd = os.open(name, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def fill_database(db, millions, mb, out):
    """Fill ``db`` through the real ingest with consecutive windows until it
    holds ``millions`` million samples; return the number of windows used."""
    store = Store(db)
    store.open()
    intake = SyncIntake(store)
    target = int(millions * 1e6)
    samples = index = 0
    started = time.monotonic()
    try:
        while samples < target:
            accepted = intake.ingest(_window_payload(mb, index), "bench fill")
            intake.after_answer(accepted)
            samples += accepted.result.inserted[SAMPLES.name]
            index += 1
            print(f"\r  fill: {samples:,} samples in {index} syncs, {time.monotonic() - started:.0f} s",
                  end="", file=out, flush=True)
    finally:
        store.close()
    print(file=out)
    return index


def _timed_pair(db, body, cold):
    """A new-data post and its repeat on ``db``; (seconds new, seconds repeat)."""
    proc, port = _start_child_server(db)
    try:
        if cold:
            evict_from_cache(db)
        new = _post(port, body)[0]
        if cold:
            evict_from_cache(db)
        repeat = _post(port, body)[0]
    finally:
        _stop_child_server(proc)
    return new, repeat


def bench_at_size(millions, mb, runs, out):
    """New-data syncs and their repeats at ``millions`` million samples
    beside the same syncs into an empty database, warm and cold."""
    with tempfile.TemporaryDirectory(prefix="health-bench-", dir=os.getcwd()) as work_dir:
        db = os.path.join(work_dir, "filled.db")
        print(f"Filling a database with {millions:g} million samples through the real ingest "
              f"({mb:g} MB syncs of consecutive {BENCH_WINDOW_DAYS}-day windows)...", file=out, flush=True)
        started = time.monotonic()
        windows = fill_database(db, millions, mb, out)
        fill_seconds = time.monotonic() - started
        with contextlib.closing(sqlite3.connect(db)) as conn:
            samples = conn.execute("SELECT sum(rows) FROM sample_types").fetchone()[0]
        size = database_size(db)
        print(f"Filled in {fill_seconds:.0f} s: {samples:,} samples, {size / 1e9:.2f} GB, "
              f"{size / samples:.0f} bytes per stored sample (whole file, every table).", file=out)
        figures = {}
        for cold in (False, True):
            if cold and not evict_from_cache(db):
                print("This system cannot evict a file from its cache: no cold figures.", file=out)
                break
            for run in range(runs):
                body = _window_payload(mb, windows)
                windows += 1
                empty_db = os.path.join(work_dir, "empty.db")
                filled = _timed_pair(db, body, cold)
                empty = _timed_pair(empty_db, body, cold)
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(OSError):
                        os.unlink(empty_db + suffix)
                for label, value in zip(("new", "repeat"), zip(filled, empty)):
                    figures.setdefault((cold, label), []).append(value)
                print(f"  {'cold' if cold else 'warm'} run {run + 1}: new {filled[0]:.2f} s (empty "
                      f"{empty[0]:.2f} s), repeat {filled[1]:.2f} s (empty {empty[1]:.2f} s)", file=out, flush=True)
        print(f"\nAt {samples / 1e6:.1f} M samples against an empty database (median of {runs}):", file=out)
        for (cold, label), pairs in figures.items():
            at_size = statistics.median(p[0] for p in pairs)
            empty = statistics.median(p[1] for p in pairs)
            print(f"  {'cold' if cold else 'warm'} {label + ' sync':<12} {at_size:6.2f} s against {empty:6.2f} s: "
                  f"{at_size / empty:.2f}x", file=out)
        print(f"\nWhat this means for a Raspberry Pi: 'cold' is a database larger than the machine's memory, "
              f"where every page a sync touches is read from the SD card. A ratio near 1x means a sync costs the "
              f"same after years of data as on the first day; multiply the times by the Pi's slowness (3-5x for a "
              f"Pi 4, about 10x for a Pi Zero 2) and compare with the app's 30 s.", file=out)
    return 0


def bench_parser():
    parser = argparse.ArgumentParser(prog="health_receiver.py bench",
                                     description="Time a large sync against the real receiver and a baseline, "
                                                 "or at a database size (--fill).")
    parser.add_argument("--mb", type=_positive_mb, default=50, help="size of the generated sync (default 50)")
    parser.add_argument("--runs", type=int, default=3, help="rounds to take the median of (default 3)")
    parser.add_argument("--concurrent", type=int, default=1, metavar="N",
                        help="also post N copies at once and report time and peak memory (default 1: no)")
    parser.add_argument("--fill", type=_positive_mb, metavar="MILLIONS",
                        help="first fill a database with this many million samples, then compare syncs into it "
                             "with the same syncs into an empty one, warm and evicted from the OS cache")
    parser.add_argument("--baseline-child", nargs=2, metavar=("BODY", "DB"), help=argparse.SUPPRESS)
    return parser


def run_bench(args, out):
    if args.baseline_child:
        return run_baseline(*args.baseline_child)
    if resource is None:
        raise ValueError("bench needs the resource module (Linux, macOS, BSD)")
    runs = max(1, args.runs)
    if args.fill:
        return bench_at_size(args.fill, args.mb, runs, out)
    return bench_against_baseline(args.mb, runs, out, args.concurrent)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

#: Every command: name -> (parser factory, run(args, out) -> exit status).
#: No command name means serve.
COMMANDS = {
    "serve": (serve_parser, run_serve),
    "stats": (stats_parser, run_stats),
    "export": (export_parser, run_export),
    "import": (import_parser, run_import),
    "bench": (bench_parser, run_bench),
}


def main(argv=None, environ=None, out=None):
    """Entry point; returns the exit status: 0 done, 1 failed, 2 usage."""
    argv = sys.argv[1:] if argv is None else list(argv)
    out = out or sys.stdout
    name = argv[0] if argv[:1] and argv[0] in COMMANDS else "serve"
    if argv[:1] == [name]:
        argv = argv[1:]
    make_parser, run = COMMANDS[name]
    try:
        args = make_parser().parse_args(argv, argparse.Namespace(environ=os.environ if environ is None else environ))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return run(args, out)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError, StorageUnavailable) as exc:
        if isinstance(exc, BrokenPipeError):  # export | head: the reader has all it wants
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
