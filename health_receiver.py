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

Licensed under the MIT licence; see the LICENSE file.
"""

__version__ = "1.0.0"

import argparse
import base64
import contextlib
import csv
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
import os
import re
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
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
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
#: Schema version stored in PRAGMA user_version.
SCHEMA_VERSION = 1
#: Largest integer SQLite stores as INTEGER.
SQLITE_INT_MAX = 2 ** 63 - 1


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

#: Escapes for control characters in client text that reaches the log.
_CONTROL_CHARS = str.maketrans({c: r"\x{:02x}".format(c) for c in itertools.chain(range(0x20), range(0x7F, 0xA0))})
_CONTROL_CHARS[ord("\\")] = r"\\"


class ClientError(Exception):
    """A request the client got wrong: answered with ``status`` and ``message``."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = HTTPStatus(status)
        self.message = message
        self.headers = tuple(headers)


class PayloadError(ClientError):
    """The body is not a payload this receiver can store (always a 400)."""

    def __init__(self, message):
        super().__init__(HTTPStatus.BAD_REQUEST, message)


class StorageUnavailable(Exception):
    """The database cannot take the sync now; the app should retry later."""


# ---------------------------------------------------------------------------
# Ingest: walk the JSON text and yield rows, without building the payload
# ---------------------------------------------------------------------------

def _reject_constant(name):
    raise ValueError("{} is not valid JSON".format(name))


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
#: The json module's own scanner (C where available): one value at an offset.
_scan_value = json.scanner.make_scanner(_DECODER)
#: Decodes the JSON string whose opening quote precedes the offset.
_scan_string = json.decoder.scanstring
_skip_ws = re.compile(r"[ \t\n\r]*").match
_NONE_TYPE = type(None)


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


def content_key(section, obj):
    """Stable identity of an element without ``uuid``: hash of canonical JSON."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256("{}\x00{}".format(section, canonical).encode("utf-8", "surrogatepass"))
    return "sha256:" + digest.hexdigest()[:40]


class Payload:
    """Walks one sync's JSON text and yields ``(kind, rows)`` batches.

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

    #: Row kinds, in the order storage should know them.
    kinds = ("sample", "workout", "dose", "medication", "route_point", "characteristic", "rejected")

    def __init__(self, text, start=0):
        self.text = text
        self.start = start
        self.envelope = {}
        self.envelope_text = {}
        self.sections = []
        self._tag = None

    # -- reading JSON --------------------------------------------------------

    def _fail(self, message, pos):
        raise PayloadError("Invalid JSON at byte {}: {}.".format(pos, message))

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
            raise PayloadError("The body is not valid UTF-8 (byte {}).".format(pos + exc.start)) from None

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

    def _array(self, pos, section, kind, make_row, where=None):
        """Yield batches of rows from the array at ``pos``; return its end.

        ``make_row(obj, raw, section)`` returns a row tuple, or a string
        saying why the element cannot be one (it then goes to ``rejected``
        under ``where``, by default the section's name).  This is the hot
        loop: most of a large sync's elements pass here.
        """
        where = where or section
        text = self.text
        tag = self._tag
        scan = _scan_value
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
                row = make_row(obj, raw, section) if obj.__class__ is dict else None
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
                    row = latin_row(obj, raw, section)
                else:
                    obj = scan(raw, 0)[0]
                    row = make_row(obj, raw, section) if obj.__class__ is dict else None
            if row is None:
                row = "element is {}, not an object".format(_json_kind(obj))
            if row.__class__ is str:
                yield "rejected", [(where, row, raw, tag)]
            else:
                batch.append(row + (tag,))
                if len(batch) >= BATCH_ROWS:
                    yield kind, batch
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
                    yield kind, batch
                return end + 1
            else:
                self._fail("expected ',' or ']' in an array", end)

    # -- the payload ---------------------------------------------------------

    def batches(self, tag=None):
        """Yield ``(kind, rows)``; every row ends with ``tag`` (the sync id).

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
            raise PayloadError("The body must be a JSON object, not {}.".format(_json_kind(value)))
        end = yield from self._walk_object(pos, self._top_member)
        end = _skip_ws(text, end).end()
        if end != len(text):
            self._fail("unexpected data after the top-level object", end)

    def _top_member(self, key, pos):
        char = self.text[pos:pos + 1]
        if key == "data":
            if char != "{":
                value = self._element(pos)[0]
                raise PayloadError("'data' must be an object of sections, not {}.".format(_json_kind(value)))
            return (yield from self._walk_object(pos, self._data_member))
        if key == "workoutRoutes":
            return (yield from self._routes(pos, "workoutRoutes"))
        value, raw, end = self._element(pos)
        self.envelope[key] = value if len(raw) <= 4096 else None
        self.envelope_text[key] = raw
        if key == "characteristics":
            yield from self._characteristics(value, raw, "characteristics")
        return end

    def _data_member(self, section, pos):
        self.sections.append(section)
        char = self.text[pos:pos + 1]
        if section == "workoutRoutes" and char == "{":
            return (yield from self._routes(pos, "data.workoutRoutes"))
        if section == "characteristics" and char == "{":
            value, raw, end = self._element(pos)
            yield from self._characteristics(value, raw, "data.characteristics")
            return end
        if char != "[":
            value, raw, end = self._element(pos)
            yield "rejected", [(section, "section is {}, not an array".format(_json_kind(value)), raw, self._tag)]
            return end
        kind, make_row = self._SECTION_ROWS.get(section, ("sample", _sample_row))
        return (yield from self._array(pos, section, kind, make_row))

    def _routes(self, pos, section):
        if self.text[pos:pos + 1] != "{":
            value, raw, end = self._element(pos)
            yield "rejected", [(section, "workoutRoutes is {}, not an object".format(_json_kind(value)), raw,
                                self._tag)]
            return end
        return (yield from self._walk_object(pos, self._route))

    def _route(self, workout, pos):
        where = "workoutRoutes/" + workout  # rejected rows name the route they came from
        if self.text[pos:pos + 1] != "[":
            value, raw, end = self._element(pos)
            yield "rejected", [(where, "route is {}, not an array".format(_json_kind(value)), raw, self._tag)]
            return end
        return (yield from self._array(pos, workout, "route_point", _route_point_row, where))

    def _characteristics(self, value, raw, section):
        if value.__class__ is not dict:
            yield "rejected", [(section, "characteristics is {}, not an object".format(_json_kind(value)), raw,
                                self._tag)]
            return
        rows = [(name, _to_sql(item), self._tag) for name, item in value.items()]
        if rows:
            yield "characteristic", rows


#: Why an element without a usable start date is kept aside.
NO_START = "startDate missing or not a string"


def _identity(section, obj):
    """The element's uuid, its content key when it has none, or a reason."""
    uuid = obj.get("uuid")
    if uuid is None:
        return content_key(section, obj)
    if uuid.__class__ is not str or not uuid:
        return None
    return uuid


def _bad_uuid(obj):
    return "uuid is {}, not a non-empty string".format(_json_kind(obj.get("uuid")))


def _sample_row(obj, raw, section):
    uuid = _identity(section, obj)
    if uuid is None:
        return _bad_uuid(obj)
    start = obj.get("startDate")
    if start is None:
        start = obj.get("date")
    if start.__class__ is not str or not start:
        return NO_START
    value = obj.get("value")
    if value.__class__ is not float and value.__class__ is not str:
        value = _to_sql(value)
    end = obj.get("endDate")
    if end.__class__ is not str:
        end = _to_sql(end)
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
    start = _first(obj, ("startDate", "date"))
    if start.__class__ is not str or not start:
        return NO_START
    return (uuid, _to_sql(_first(obj, ("workoutActivityType", "activityType", "type"))), start,
            _to_sql(obj.get("endDate")), _to_sql(_first(obj, ("durationSeconds", "duration"))), raw)


def _dose_row(obj, raw, section):
    uuid = _identity(section, obj)
    if uuid is None:
        return _bad_uuid(obj)
    start = _first(obj, ("startDate", "date", "scheduledDate"))
    if start.__class__ is not str or not start:
        return NO_START
    medication = _first(obj, ("medicationConceptIdentifier", "conceptIdentifier", "medication"))
    return (uuid, _to_sql(medication), start, _to_sql(obj.get("logStatus")), raw)


def _medication_row(obj, raw, section):
    key = _first(obj, ("conceptIdentifier", "uuid", "id", "identifier"))
    if key is None:
        key = content_key(section, obj)
    elif key.__class__ is int:
        key = str(key)
    elif key.__class__ is not str or not key:
        return "identifier is {}, not a string".format(_json_kind(key))
    return (key, _to_sql(_first(obj, ("displayText", "nickname", "name"))), raw)


def _route_point_row(obj, raw, workout):
    stamp = _first(obj, ("timestamp", "date", "startDate"))
    if stamp.__class__ is not str or not stamp:
        return "timestamp missing or not a string"
    return (workout, stamp, _to_sql(obj.get("latitude")), _to_sql(obj.get("longitude")),
            _to_sql(obj.get("altitude")), raw)


Payload._SECTION_ROWS = {
    "workouts": ("workout", _workout_row),
    "medicationDoseEvents": ("dose", _dose_row),
    "medications": ("medication", _medication_row),
}


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


def decode_body(body):
    """Return (text, start) for Payload: a latin-1 view of ``body``.

    One character per byte, so a body with a single non-ASCII character
    costs no more memory than an ASCII one.  UTF-8 is checked where it
    matters, as each string-holding element or key is re-decoded: JSON
    outside strings is ASCII, so nothing escapes that check.  ``start``
    skips a UTF-8 byte order mark.
    """
    text = body.decode("latin-1")
    start = 3 if text.startswith("\xef\xbb\xbf") else 0
    return text, start


# ---------------------------------------------------------------------------
# Storage: schema, SQL and transactions
# ---------------------------------------------------------------------------

SCHEMA = """
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

#: Insert statement per row kind; the sync id is the last parameter.
INSERT_SQL = {
    "sample": "INSERT OR IGNORE INTO samples (uuid, type, start_date, end_date, value, unit, source_name,"
              " record, sync_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    "workout": "INSERT OR IGNORE INTO workouts (uuid, activity_type, start_date, end_date, duration_seconds,"
               " record, sync_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
    "dose": "INSERT OR IGNORE INTO medication_dose_events (uuid, medication, start_date, log_status, record,"
            " sync_id) VALUES (?, ?, ?, ?, ?, ?)",
    "route_point": "INSERT OR IGNORE INTO workout_route_points (workout_uuid, timestamp, latitude, longitude,"
                   " altitude, record, sync_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
    "medication": "INSERT INTO medications (key, display_text, record, first_sync_id, last_sync_id)"
                  " VALUES (?1, ?2, ?3, ?4, ?4) ON CONFLICT (key) DO UPDATE SET"
                  " display_text = excluded.display_text, record = excluded.record,"
                  " last_sync_id = excluded.last_sync_id",
    "characteristic": "INSERT INTO characteristics (name, value, sync_id) VALUES (?, ?, ?)"
                      " ON CONFLICT (name) DO UPDATE SET value = excluded.value, sync_id = excluded.sync_id",
    "rejected": "INSERT INTO rejected (section, reason, record, sync_id) VALUES (?, ?, ?, ?)",
}

#: Keeps sample_types (rows, first and last date per type) current as rows
#: arrive: counting 5 million samples per type would take a second per page.
SAMPLE_TYPES_SQL = (
    "INSERT INTO sample_types (type, rows, first_date, last_date) VALUES (?1, ?2, ?3, ?4)"
    " ON CONFLICT (type) DO UPDATE SET rows = rows + excluded.rows,"
    " first_date = min(coalesce(first_date, excluded.first_date), excluded.first_date),"
    " last_date = max(coalesce(last_date, excluded.last_date), excluded.last_date)")

#: Kinds whose rows replace a stored row with the same key (latest wins).
UPSERT_KEY_SQL = {
    "medication": "SELECT 1 FROM medications WHERE key = ?",
    "characteristic": "SELECT 1 FROM characteristics WHERE name = ?",
}

#: Tables whose row counts the status answer reports.
TABLES = ("samples", "workouts", "workout_route_points", "medication_dose_events", "medications",
          "characteristics", "rejected", "syncs")


#: Errors sqlite3 raises for a value it cannot bind: the row's fault, not the database's.
_UNBINDABLE = (ValueError, OverflowError, sqlite3.InterfaceError, sqlite3.ProgrammingError)


#: Row kinds from the ``data`` sections: the elements the app counts.
RECORD_KINDS = ("sample", "workout", "dose", "medication")


class SyncResult:
    """What one stored sync held; the HTTP layer turns it into the answer."""

    def __init__(self):
        self.sync_id = None
        self.remote_addr = None
        self.body_bytes = 0
        self.received = dict.fromkeys(Payload.kinds, 0)
        self.inserted = dict.fromkeys(Payload.kinds, 0)
        self.sections = 0
        self.envelope = {}
        self.duration = 0.0

    @property
    def records(self):
        """Elements of the ``data`` sections (what the app counts)."""
        return sum(self.received[k] for k in RECORD_KINDS)

    @property
    def new_records(self):
        return sum(self.inserted[k] for k in RECORD_KINDS)

    @property
    def rejected(self):
        return self.received["rejected"]

    @property
    def duplicates(self):
        return self.records - self.new_records

    def response(self):
        """The JSON answer the app reads: ``count`` feeds its Sync Log."""
        inserted = self.inserted
        return {
            "ok": True,
            "count": self.records,
            "inserted": {
                "measurements": inserted["sample"],
                "medications": inserted["medication"] + inserted["dose"],
                "workouts": inserted["workout"],
                "workoutRoutes": inserted["route_point"],
            },
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "routePoints": self.received["route_point"],
            "characteristics": self.received["characteristic"],
            "sync_id": self.sync_id,
        }


def _utc_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _envelope_text(fields):
    return "{" + ",".join("{}:{}".format(json.dumps(k), v) for k, v in fields.items()) + "}"


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

    # -- connections -------------------------------------------------------

    def open(self):
        """Create or upgrade the schema; raise StorageUnavailable on failure."""
        with self._writing():
            pass

    def _open_writer(self):
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA cache_size = -{:d}".format(CACHE_KIB))
            # Rows hold whole JSON records: bigger pages mean fewer page
            # splits.  Only takes effect when the file is created.
            conn.execute("PRAGMA page_size = {:d}".format(PAGE_SIZE))
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StorageUnavailable("The database was written by a newer version of this receiver.")
            if version < SCHEMA_VERSION:
                conn.executescript("BEGIN IMMEDIATE;{}PRAGMA user_version = {:d};COMMIT;".format(
                    SCHEMA, SCHEMA_VERSION))
            # Checkpoints run after the answer is sent (see checkpoint()), not
            # inside the COMMIT the app is waiting for.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute("PRAGMA journal_size_limit = {:d}".format(64 * MIB))
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def _writing(self, keep=False):
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

    @contextlib.contextmanager
    def reader(self):
        """A read-only connection for one short query."""
        conn = self._open_reader()
        try:
            yield conn
        except sqlite3.Error as exc:
            raise StorageUnavailable(_describe_db_error(exc, self.path)) from exc
        finally:
            conn.close()

    def checkpoint(self, mode="PASSIVE"):
        """Fold the write-ahead log into the database (after the answer)."""
        with contextlib.suppress(StorageUnavailable, sqlite3.Error):
            with self._writing() as conn:
                conn.execute("PRAGMA wal_checkpoint({})".format(mode))

    def close(self):
        """Wait for the ingest in progress, then refuse further writes."""
        self.checkpoint("TRUNCATE")
        with self._write_lock:
            self._closed = True
            self._close_kept()

    # -- writing a sync ----------------------------------------------------

    def store_sync(self, payload, meta):
        """Store every row of ``payload`` in one transaction.

        ``meta`` gives remote_addr and body_bytes.  Returns a SyncResult
        once committed.  A PayloadError rolls everything back, records a
        failed sync in its own transaction and is raised again; a database
        error does the same as StorageUnavailable.
        """
        started = time.monotonic()
        result = SyncResult()
        result.remote_addr = meta.get("remote_addr")
        result.body_bytes = meta.get("body_bytes") or 0
        with self._writing(keep=True) as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
                cur = conn.execute(
                    "INSERT INTO syncs (received_at, remote_addr, body_bytes, status) VALUES (?, ?, ?, 'pending')",
                    (_utc_now(), meta.get("remote_addr"), meta.get("body_bytes")))
                sync_id = result.sync_id = cur.lastrowid
                self._write_rows(conn, payload.batches(sync_id), sync_id, result)
                result.sections = len(payload.sections)
                result.envelope = payload.envelope
                result.duration = time.monotonic() - started
                self._finish_sync(conn, sync_id, result, payload.envelope_text)
                conn.execute("COMMIT")
                return result
            except ClientError as exc:
                _rollback(conn)
                self._record_failure(conn, meta, started, "rejected", exc.message, payload)
                raise
            except sqlite3.Error as exc:
                message = _describe_db_error(exc, self.path)
                _rollback(conn)
                self._record_failure(conn, meta, started, "failed", message, payload)
                raise StorageUnavailable(message) from exc

    def record_failed_request(self, meta, status, message):
        """Keep a syncs row for a POST refused before its body was read."""
        with contextlib.suppress(StorageUnavailable):
            with self._writing() as conn:
                self._record_failure(conn, meta, time.monotonic(), status, message, None)

    def _record_failure(self, conn, meta, started, status, message, payload):
        """Best effort: the caller reports the original error whatever happens here."""
        envelope = source = None
        if payload is not None:
            envelope = _envelope_text(payload.envelope_text) if payload.envelope_text else None
            source = payload.envelope.get("syncSource")
        with contextlib.suppress(sqlite3.Error):
            with _transaction(conn):
                conn.execute(
                    "INSERT INTO syncs (received_at, remote_addr, body_bytes, duration_ms, status, error, envelope,"
                    " sync_source) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (_utc_now(), meta.get("remote_addr"), meta.get("body_bytes"),
                     int((time.monotonic() - started) * 1000), status, _storable(message), _storable(envelope),
                     _storable(source)))

    def _write_rows(self, conn, batches, sync_id, result):
        pending = {kind: [] for kind in INSERT_SQL}
        for kind, rows in batches:
            waiting = pending[kind]
            waiting += rows
            if len(waiting) >= BATCH_ROWS:
                self._insert(conn, kind, waiting, sync_id, result)
                waiting.clear()
        for kind, waiting in pending.items():
            if waiting:
                self._insert(conn, kind, waiting, sync_id, result)

    def _insert(self, conn, kind, batch, sync_id, result):
        """Insert one batch, counting received and new rows in ``result``."""
        if kind == "sample":
            # One executemany per type, so that sample_types learns each
            # type's new rows.  Rows of a type arrive together.
            for type_name, rows in itertools.groupby(batch, key=_row_type):
                rows = list(rows)
                new = self._execute_batch(conn, kind, rows, sync_id, result)
                if new:  # otherwise every date is stored already
                    starts = [row[2] for row in rows]
                    conn.execute(SAMPLE_TYPES_SQL, (type_name, new, min(starts), max(starts)))
            return
        if kind in UPSERT_KEY_SQL:
            exists = UPSERT_KEY_SQL[kind]
            new = len({row[0] for row in batch if conn.execute(exists, (row[0],)).fetchone() is None})
            self._execute_batch(conn, kind, batch, sync_id, result)
            result.inserted[kind] += new
            return
        self._execute_batch(conn, kind, batch, sync_id, result)

    def _execute_batch(self, conn, kind, batch, sync_id, result):
        """executemany one batch; count it in ``result``; return new rows.

        A row sqlite3 cannot bind (a lone surrogate from a JSON escape, say)
        would fail the whole executemany: the batch is then redone row by
        row inside a savepoint and the unbindable rows go to ``rejected``.
        """
        conn.execute("SAVEPOINT batch")
        try:
            changed = conn.executemany(INSERT_SQL[kind], batch).rowcount
        except _UNBINDABLE:
            conn.execute("ROLLBACK TO batch")
            changed = 0
            for row in batch:
                try:
                    changed += conn.execute(INSERT_SQL[kind], row).rowcount
                except _UNBINDABLE as exc:
                    record = json.dumps(row[:-1], ensure_ascii=True, default=str)
                    conn.execute(INSERT_SQL["rejected"], (kind, "cannot be stored: {}".format(exc), record, sync_id))
                    result.received["rejected"] += 1
                    result.received[kind] -= 1
        conn.execute("RELEASE batch")
        result.received[kind] += len(batch)
        if kind not in UPSERT_KEY_SQL:
            result.inserted[kind] += changed
        return changed

    def _finish_sync(self, conn, sync_id, result, envelope_text):
        env = result.envelope
        conn.execute(
            "UPDATE syncs SET sync_source = ?, export_date = ?, start_date = ?, end_date = ?, received = ?,"
            " inserted = ?, duplicates = ?, rejected = ?, route_points = ?, route_points_inserted = ?,"
            " sections = ?, duration_ms = ?, status = 'ok', envelope = ? WHERE id = ?",
            (_storable(env.get("syncSource")), _storable(env.get("exportDate")), _storable(env.get("startDate")),
             _storable(env.get("endDate")), result.records, result.new_records, result.duplicates,
             result.rejected, result.received["route_point"], result.inserted["route_point"],
             result.sections, int(result.duration * 1000), _storable(_envelope_text(envelope_text)), sync_id))

    # -- reading -----------------------------------------------------------

    def totals(self):
        """Row counts per table."""
        with self.reader() as conn:
            return {table: conn.execute("SELECT count(*) FROM " + table).fetchone()[0] for table in TABLES}

    def sample_types(self, conn):
        """[(type, rows, first_date, last_date)] from the kept totals."""
        return conn.execute("SELECT type, rows, first_date, last_date FROM sample_types ORDER BY type").fetchall()

    def recount_types(self):
        """Rebuild sample_types from the samples (after editing rows by hand)."""
        with self._writing() as conn:
            with _transaction(conn):
                conn.execute("DELETE FROM sample_types")
                conn.execute("INSERT INTO sample_types SELECT type, count(*), min(start_date), max(start_date)"
                             " FROM samples GROUP BY type")

    def summary(self, days=90, utc=False, now=None, sync_count=20, charts=True):
        """The facts the status page, /api/summary and ``stats`` show."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        bounds = day_bounds(days, utc, now)
        since = bounds[0][1]
        with self.reader() as conn:
            facts = {
                "ok": True,
                "version": __version__,
                "generated_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "database": {"path": os.path.abspath(self.path), "size_bytes": database_size(self.path)},
                "totals": {table: conn.execute("SELECT count(*) FROM " + table).fetchone()[0] for table in TABLES},
                "types": [{"type": t, "name": short_type_name(t), "rows": rows, "first": first, "last": last,
                           "chart": chart_kind(t)} for t, rows, first, last in self.sample_types(conn)],
                "syncs": [dict(zip(SYNC_FIELDS, row)) for row in conn.execute(
                    "SELECT " + ", ".join(SYNC_FIELDS) + " FROM syncs ORDER BY id DESC LIMIT ?", (sync_count,))],
            }
            if not charts:
                return facts
            facts["days"] = {"count": days, "first": bounds[0][0], "last": bounds[-1][0],
                             "timezone": "UTC" if utc else local_zone_name(now)}
            facts["charts"] = [chart for chart in (self._chart(conn, t, bounds) for t in facts["types"]
                                                   if (t["last"] or "") >= since) if chart]
            facts["workouts"] = [dict(zip(("uuid", "activity_type", "start_date", "duration_seconds",
                                           "route_points"), row)) for row in conn.execute(
                "SELECT uuid, activity_type, start_date, duration_seconds, (SELECT count(*) FROM"
                " workout_route_points WHERE workout_uuid = workouts.uuid) FROM workouts"
                " WHERE start_date >= ? ORDER BY start_date DESC", (since,))]
        return facts

    def _chart(self, conn, type_info, bounds):
        """Daily points of one type over ``bounds``: one indexed range per day."""
        name, kind = type_info["type"], type_info["chart"]
        points = []
        for day, low, high in bounds:
            count, numbers, total, smallest, largest = conn.execute(
                "SELECT count(*), count(CASE WHEN typeof(value) IN ('integer', 'real') THEN 1 END),"
                " total(CASE WHEN typeof(value) IN ('integer', 'real') THEN value END),"
                " min(CASE WHEN typeof(value) IN ('integer', 'real') THEN value END),"
                " max(CASE WHEN typeof(value) IN ('integer', 'real') THEN value END)"
                " FROM samples WHERE type = ? AND start_date >= ? AND start_date < ?", (name, low, high)).fetchone()
            if kind == "count":
                points.append([day, count] if count else [day, None])
            elif not numbers:
                points.append([day, None] if kind == "mean" else [day, None])
            elif kind == "sum":
                points.append([day, total])
            else:
                points.append([day, total / numbers, smallest, largest])
        if not any(point[1] is not None for point in points):
            return None
        unit = conn.execute("SELECT unit FROM samples WHERE type = ? ORDER BY start_date DESC LIMIT 1",
                            (name,)).fetchone()
        return {"type": name, "name": type_info["name"], "kind": kind, "unit": unit[0] if unit else None,
                "points": points}

    def export_rows(self, section, type_name=None, since=None, until=None):
        """(columns, cursor) of one section's rows, streamed in key order."""
        table, date_column = EXPORT_SECTIONS[section]
        columns = EXPORT_COLUMNS[table]
        where, params = [], []
        if type_name is not None:
            where.append("type = ?")
            params.append(type_name)
        if date_column and since:
            where.append("{} >= ?".format(date_column))
            params.append(since)
        if date_column and until:
            where.append("{} < ?".format(date_column))
            params.append(_day_after(until))
        sql = "SELECT {} FROM {}{} ORDER BY {}".format(
            ", ".join(columns), table, " WHERE " + " AND ".join(where) if where else "",
            "type, start_date" if table == "samples" else (date_column or "rowid"))
        conn = self._open_reader()
        return columns, _closing_rows(conn, conn.execute(sql, params))

    def _open_reader(self):
        try:
            return sqlite3.connect("file:{}?mode=ro".format(_uri_path(self.path)), uri=True,
                                   timeout=self.busy_timeout)
        except sqlite3.Error as exc:
            raise StorageUnavailable(_describe_db_error(exc, self.path)) from exc

    def last_sync(self):
        with self.reader() as conn:
            row = conn.execute("SELECT id, received_at, sync_source, status, received, inserted, error"
                               " FROM syncs ORDER BY id DESC LIMIT 1").fetchone()
        if row is None:
            return None
        keys = ("id", "received_at", "sync_source", "status", "received", "inserted", "error")
        return dict(zip(keys, row))


def _closing_rows(conn, cursor):
    """Yield the cursor's rows, then close its connection."""
    try:
        for row in cursor:
            yield row
    finally:
        conn.close()


def _day_after(until):
    """The exclusive upper bound for --until: a bare date includes its day."""
    if len(until) == 10:
        try:
            day = datetime.date.fromisoformat(until) + datetime.timedelta(days=1)
            return day.isoformat()
        except ValueError:
            pass
    return until + "\uffff"


def database_size(path):
    """Bytes of the database file and its write-ahead log."""
    return sum(os.path.getsize(path + suffix) for suffix in ("", "-wal") if os.path.exists(path + suffix))


#: Export sections: (table, column the date filters apply to).
EXPORT_SECTIONS = {
    "samples": ("samples", "start_date"),
    "workouts": ("workouts", "start_date"),
    "routes": ("workout_route_points", "timestamp"),
    "medications": ("medications", None),
    "doses": ("medication_dose_events", "start_date"),
    "characteristics": ("characteristics", None),
    "syncs": ("syncs", "received_at"),
}

#: Columns of each exported table, in CSV order.
EXPORT_COLUMNS = {
    "samples": ("uuid", "type", "start_date", "end_date", "value", "unit", "source_name", "record", "sync_id"),
    "workouts": ("uuid", "activity_type", "start_date", "end_date", "duration_seconds", "record", "sync_id"),
    "workout_route_points": ("workout_uuid", "timestamp", "latitude", "longitude", "altitude", "record",
                             "sync_id"),
    "medications": ("key", "display_text", "record", "first_sync_id", "last_sync_id"),
    "medication_dose_events": ("uuid", "medication", "start_date", "log_status", "record", "sync_id"),
    "characteristics": ("name", "value", "sync_id"),
    "syncs": ("id", "received_at", "remote_addr", "sync_source", "export_date", "start_date", "end_date",
              "body_bytes", "received", "inserted", "duplicates", "rejected", "route_points",
              "route_points_inserted", "sections", "duration_ms", "status", "error", "envelope"),
}

#: Columns of the syncs shown by the status page, /api/summary and stats.
SYNC_FIELDS = ("id", "received_at", "remote_addr", "sync_source", "received", "inserted", "duplicates",
               "rejected", "route_points", "body_bytes", "duration_ms", "status", "error")

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


def short_type_name(type_name):
    """HKQuantityTypeIdentifierHeartRate -> HeartRate."""
    for prefix in TYPE_PREFIXES:
        if type_name.startswith(prefix) and len(type_name) > len(prefix):
            return type_name[len(prefix):]
    return type_name


def chart_kind(type_name):
    """'sum' (daily total), 'mean' (daily mean, min-max band) or 'count'."""
    if not type_name.startswith("HKQuantityTypeIdentifier"):
        return "count"
    short = short_type_name(type_name)
    return "sum" if short in CUMULATIVE_TYPES or short.startswith("Dietary") else "mean"


def day_bounds(days, utc, now):
    """[(day, start, end)] of the last ``days`` days (today included) as
    stored timestamps: local days unless ``utc``, daylight saving included."""
    today = now.astimezone(datetime.timezone.utc if utc else None).date()
    bounds = []
    for back in range(days - 1, -2, -1):
        day = today - datetime.timedelta(days=back)
        midnight = datetime.datetime(day.year, day.month, day.day)
        midnight = midnight.replace(tzinfo=datetime.timezone.utc) if utc else midnight.astimezone()
        bounds.append((day.isoformat(), midnight.astimezone(datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%S.000Z")))
    return [(day, start, end) for (day, start), (_next, end) in zip(bounds, bounds[1:])]


def local_zone_name(now):
    return now.astimezone().tzname() or "local"


def _row_type(row):
    return row[1]


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
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _uri_path(path):
    from urllib.parse import quote
    return quote(os.path.abspath(path))


def _describe_db_error(exc, path):
    """A sentence for the app and the log: what is wrong with the database."""
    text = str(exc)
    lowered = text.lower()
    if "locked" in lowered or "busy" in lowered:
        return "The database is locked by another program; try again later."
    if "readonly" in lowered or "read-only" in lowered:
        return "The database is read-only; check the permissions of {}.".format(path)
    if "full" in lowered:
        return "The disk holding the database is full."
    if "unable to open" in lowered:
        return "The database {} cannot be opened; check that its folder exists and is writable.".format(path)
    return "Database error: {}.".format(text.rstrip("."))


# ---------------------------------------------------------------------------
# Presentation: the status page (HTML with inline SVG charts)
# ---------------------------------------------------------------------------

#: What a chart's daily value is, in words.
CHART_LABELS = {"sum": "daily total", "mean": "daily mean, band from min to max", "count": "samples per day"}

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
        return "{:,.{}f}".format(value, digits)
    return "{:,.0f}".format(value) if isinstance(value, (int, float)) else _esc(value)


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
        return "{:.0f} min ago".format(seconds // 60)
    if seconds < 48 * 3600:
        return "{:.0f} h ago".format(seconds // 3600)
    return "{:.0f} days ago".format(seconds // 86400)


def _tick(value):
    magnitude = abs(value)
    if magnitude >= 10000:
        return "{:.0f}k".format(value / 1000)
    if magnitude >= 100 or value == int(value):
        return "{:.0f}".format(value)
    return "{:.2g}".format(value) if magnitude < 1 else "{:.1f}".format(value)


def svg_chart(chart):
    """One type's last days as an inline SVG sized for a phone."""
    width, height, left, right, top, bottom = 360, 140, 38, 6, 8, 20
    points = chart["points"]
    values = [p[1] for p in points if p[1] is not None]
    if chart["kind"] == "mean":
        values += [p[2] for p in points if p[1] is not None] + [p[3] for p in points if p[1] is not None]
        low, high = min(values), max(values)
        pad = (high - low) * 0.1 or abs(high) * 0.1 or 1
        # Never below zero for values that are never negative.
        low, high = (max(low - pad, 0) if low >= 0 else low - pad), high + pad
    else:
        low, high = 0, max(values) or 1
    span_x = (width - left - right) / max(len(points) - 1, 1)

    def x(i):
        return left + i * span_x

    def y(v):
        return top + (height - top - bottom) * (1 - (v - low) / (high - low))

    parts = ['<svg viewBox="0 0 {} {}" role="img" aria-label="{}">'.format(width, height, _esc(chart["name"]))]
    for fraction in (0, 0.5, 1):
        value = low + (high - low) * fraction
        parts.append('<line x1="{0}" x2="{1}" y1="{2:.1f}" y2="{2:.1f}" stroke="#e4e4e4"/>'
                     '<text x="{3}" y="{4:.1f}" text-anchor="end">{5}</text>'.format(
                         left, width - right, y(value), left - 3, y(value) + 3, _esc(_tick(value))))
    for i in range(0, len(points), max(1, len(points) // 4)):
        label = datetime.date.fromisoformat(points[i][0]).strftime("%b %d")
        anchor = "end" if x(i) > width - right - 20 else "start" if x(i) < left + 20 else "middle"
        parts.append('<text x="{:.1f}" y="{}" text-anchor="{}">{}</text>'.format(x(i), height - 5, anchor, label))
    if chart["kind"] == "mean":
        for run in _runs(points):
            band = ["{:.1f},{:.1f}".format(x(i), y(points[i][3])) for i in run]
            band += ["{:.1f},{:.1f}".format(x(i), y(points[i][2])) for i in reversed(run)]
            parts.append('<polygon points="{}" fill="#9ecae1" fill-opacity="0.5"/>'.format(" ".join(band)))
            line = " ".join("{:.1f},{:.1f}".format(x(i), y(points[i][1])) for i in run)
            parts.append('<polyline points="{}" fill="none" stroke="#08519c" stroke-width="1.5"/>'.format(line))
            if len(run) == 1:
                parts.append('<circle cx="{:.1f}" cy="{:.1f}" r="2" fill="#08519c"/>'.format(
                    x(run[0]), y(points[run[0]][1])))
    else:
        bar = max(span_x * 0.8, 1)
        for i, point in enumerate(points):
            if point[1]:
                parts.append('<rect x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" fill="#3182bd"/>'.format(
                    x(i) - bar / 2, y(point[1]), bar, y(0) - y(point[1])))
    parts.append("</svg>")
    return "".join(parts)


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


def _duration(seconds):
    if not isinstance(seconds, (int, float)):
        return ""
    minutes = int(round(seconds / 60))
    return "{}:{:02d}".format(minutes // 60, minutes % 60)


def render_status_page(facts, utc, now=None):
    """The whole status page as one self-contained HTML document."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<title>Health receiver</title><style>{}</style></head><body>".format(PAGE_CSS),
           "<h1>Health receiver</h1>",
           '<p class="muted">{} &middot; {} &middot; days in {} &middot; version {}</p>'.format(
               _esc(facts["database"]["path"]), _esc(_size(facts["database"]["size_bytes"])),
               "UTC" if utc else "local time ({})".format(_esc(facts["days"]["timezone"])),
               _esc(facts["version"]))]
    out.append("<h2>Last syncs</h2>")
    if not facts["syncs"]:
        out.append('<p class="muted">No sync has arrived yet.</p>')
    else:
        rows = []
        for sync in facts["syncs"]:
            failed = sync["status"] != "ok"
            duration = sync["duration_ms"]
            rows.append((' class="fail"' if failed else "", _cells(
                '{}<br><span class="muted">{}</span>'.format(format_local(sync["received_at"], utc),
                                                             format_ago(sync["received_at"], now)),
                _esc(sync["sync_source"] or "-"), _number(sync["received"]), _number(sync["inserted"]),
                _number(sync["duplicates"]), _number(sync["rejected"]), _esc(_size(sync["body_bytes"])),
                "{:.2f} s".format(duration / 1000) if duration is not None else "", _esc(sync["status"]))))
            if failed and sync["error"]:
                rows.append((' class="fail"', '<td class="err" colspan="9">{}</td>'.format(_esc(sync["error"]))))
        out.append(_table(("When", "Source", "Records", "New", "Dup", "Rejected", "Size", "Time", "Status"), rows))
    out.append("<h2>Totals</h2>")
    out.append(_table(("Table", "Rows"), [("", _cells(_esc(table), _number(rows)))
                                           for table, rows in facts["totals"].items()]))
    out.append("<h2>Types</h2>")
    out.append(_table(("Type", "Rows", "First", "Last"), [("", _cells(
        '<span title="{}">{}</span>'.format(_esc(info["type"]), _esc(info["name"])), _number(info["rows"]),
        format_local(info["first"], utc), format_local(info["last"], utc))) for info in facts["types"]]))
    out.append("<h2>Last {} days</h2>".format(facts["days"]["count"]))
    if not facts["charts"]:
        out.append('<p class="muted">No samples in these days.</p>')
    for chart in facts["charts"]:
        unit = " ({})".format(_esc(chart["unit"])) if chart["unit"] and chart["kind"] != "count" else ""
        out.append('<div class="chart"><h3 title="{}">{}{}</h3><p>{}</p>{}</div>'.format(
            _esc(chart["type"]), _esc(chart["name"]), unit, CHART_LABELS[chart["kind"]], svg_chart(chart)))
    out.append("<h2>Workouts, last {} days</h2>".format(facts["days"]["count"]))
    if not facts["workouts"]:
        out.append('<p class="muted">No workouts in these days.</p>')
    else:
        out.append(_table(("Type", "Date", "Duration", "Route points"), [("", _cells(
            _esc(workout["activity_type"] or "-"), format_local(workout["start_date"], utc),
            _duration(workout["duration_seconds"]), _number(workout["route_points"])))
            for workout in facts["workouts"]]))
    out.append('<p class="muted">Generated {}. The same facts as JSON: <a href="/api/summary">/api/summary</a>.'
               "</p></body></html>".format(format_local(facts["generated_at"], utc)))
    return "".join(out)


def _cells(*cells):
    """Table cells from HTML that is already escaped."""
    return "".join("<td>{}</td>".format(cell) for cell in cells)


def _table(headers, rows):
    """A table in a box that scrolls sideways on a phone; rows are
    (attributes of the tr, cells HTML)."""
    return '<div class="scroll"><table><tr>{}</tr>{}</table></div>'.format(
        "".join("<th>{}</th>".format(header) for header in headers),
        "".join("<tr{}>{}</tr>".format(attributes, cells) for attributes, cells in rows))


def _size(size):
    if not isinstance(size, (int, float)):
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return "{:.0f} {}".format(size, unit) if unit == "B" else "{:.1f} {}".format(size, unit)
        size /= 1000.0
    return ""


# ---------------------------------------------------------------------------
# Archive of accepted bodies
# ---------------------------------------------------------------------------

def write_archive(directory, text, sync_id, now=None):
    """Save an accepted body as DIR/<UTC time>-<sync id>.json.gz; return its path.

    Written to a temporary name and renamed, so a file with the final name
    is always complete.  ``text`` is the latin-1 view of the body, so
    encoding it back gives the original bytes.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    name = "{}-{}.json.gz".format(now.strftime("%Y%m%dT%H%M%SZ"), sync_id)
    final = os.path.join(directory, name)
    temporary = os.path.join(directory, ".{}.tmp".format(name))
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


# ---------------------------------------------------------------------------
# Receiving: the bridge between HTTP and storage
# ---------------------------------------------------------------------------

def ingest_body(store, body, remote_addr=None):
    """Decode ``body`` (a bytearray), store it; return (SyncResult, text).

    The bytearray is emptied once decoded, so that its memory is returned
    before the database work starts; ``text`` is the body's latin-1 view
    (``text.encode("latin-1")`` gives the bytes back, for the archive).
    Raises PayloadError (nothing stored, a failed sync recorded) or
    StorageUnavailable.
    """
    meta = {"remote_addr": remote_addr, "body_bytes": len(body)}
    try:
        text, start = decode_body(body)
    except PayloadError as exc:
        store.record_failed_request(meta, "rejected", exc.message)
        raise
    finally:
        if isinstance(body, bytearray):
            body.clear()
    return store.store_sync(Payload(text, start), meta), text


def describe_sync(result):
    """The one log line of a stored sync."""
    env = result.envelope
    source = env.get("syncSource")
    source = source[:60] if isinstance(source, str) and source else "-"
    span = ""
    start, end = env.get("startDate"), env.get("endDate")
    if isinstance(start, str) and isinstance(end, str):
        span = ", {} -> {}".format(start[:10], end[:10])
    # Client text: control characters escaped so it cannot forge log lines.
    return ("{} {} {} records ({} new, {} dup, {} rejected) in {} sections, {} route points{}, "
            "{:.1f} MB in {:.2f} s".format(
                result.remote_addr, source, result.records, result.new_records, result.duplicates, result.rejected,
                result.sections, result.received["route_point"], span, result.body_bytes / 1e6,
                result.duration)).translate(_CONTROL_CHARS)


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------

class ReceiverConfig:
    """Runtime settings of one server, handed to the handler through it."""

    def __init__(self, host="0.0.0.0", port=DEFAULT_PORT, path=DEFAULT_PATH, db=DEFAULT_DB, token=None,
                 auth_header=None, max_body=DEFAULT_MAX_BODY_MB * MIB, quiet=False, timeout=DEFAULT_TIMEOUT,
                 max_ingests=DEFAULT_MAX_INGESTS, tls_cert=None, tls_key=None, log_stream=None,
                 slot_wait=INGEST_SLOT_WAIT, token_source=None, archive=None, utc=False):
        self.host = host
        self.port = port
        self.path = "/" + path.strip("/") if path.strip("/") else "/"
        self.db = db
        self.token = token
        self.auth_header = auth_header
        self.max_body = max_body
        self.quiet = quiet
        self.timeout = timeout
        self.max_ingests = max_ingests
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.log_stream = log_stream
        self.slot_wait = slot_wait
        self.token_source = token_source or ("configuration" if token else None)
        self.archive = archive
        self.utc = utc

    def __repr__(self):  # never shows the token
        return "ReceiverConfig(host={!r}, port={!r}, path={!r}, db={!r}, auth={!r})".format(
            self.host, self.port, self.path, self.db, self.auth_mode())

    def auth_mode(self):
        if not self.token:
            return "none (anyone who can reach this port may post)"
        if self.auth_header:
            return "custom header {}: <key>".format(self.auth_header)
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
    return "The body is larger than this receiver's limit of {} MB (--max-body-mb).".format(_mib(limit))


def _mib(size):
    value = size / MIB
    return "{:g}".format(round(value, 2))


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
        raise ClientError(HTTPStatus.UNAUTHORIZED, "Missing {} header with the key.".format(name), challenge)
    if not hmac.compare_digest(sent.strip().encode("utf-8", "surrogateescape"), expected):
        raise ClientError(HTTPStatus.UNAUTHORIZED, "The key in the {} header is wrong.".format(name), challenge)


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
                          "Content-Type must be application/json, not {}.".format(media[:60]))


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
                                      "The body ended after {} of {} bytes.".format(got, length))
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
                                      "The decompressed body is larger than this receiver's limit of {} MB "
                                      "(--max-body-mb).".format(_mib(limit)))
                data = inflater.unconsumed_tail
        body += inflater.flush()
    except zlib.error:
        raise ClientError(HTTPStatus.BAD_REQUEST, "The {} body is corrupt.".format(encoding)) from None
    if not inflater.eof:
        raise ClientError(HTTPStatus.BAD_REQUEST, "The {} body is truncated.".format(encoding))
    if len(body) > limit:
        raise ClientError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, too_large_message(limit))
    return body




class HealthRequestHandler(BaseHTTPRequestHandler):
    """Routes, checks and answers requests; storage does the rest."""

    protocol_version = "HTTP/1.1"
    server_version = "health_receiver/" + __version__
    error_content_type = "application/json"

    def setup(self):
        self.timeout = self.server.config.timeout
        super().setup()

    # -- plumbing ------------------------------------------------------------

    def handle_expect_100(self):
        # Decided in do_POST, after auth and size: no 100 Continue before that.
        self._expects_continue = True
        return True

    def handle_one_request(self):
        self._expects_continue = False
        self._body_read = False
        try:
            super().handle_one_request()
        except (ConnectionError, ssl.SSLError) as exc:
            self.close_connection = True
            self.log_error("connection lost: {}".format(exc))
        except socket.timeout:
            self.close_connection = True

    def log_request(self, code="-", size="-"):
        pass  # each request logs its own line, with what it did

    def log_message(self, format, *args):
        message = (format % args) if args else format
        self.server.log_request_line(self.address_string(), message.translate(_CONTROL_CHARS))

    def log_error(self, format, *args):
        self.server.log_error_line(self.address_string(), ((format % args) if args else format).translate(
            _CONTROL_CHARS))

    def send_error(self, code, message=None, explain=None):
        """The stdlib's errors (bad request line, 431, 501, ...) as JSON."""
        code = HTTPStatus(code)
        text = message or code.phrase
        self.close_connection = True
        self._send_json(code, {"ok": False, "error": text}, log_error=text)

    def _send_json(self, status, obj, headers=(), log_error=None):
        # Logged first, so the line exists once the client has its answer.
        if log_error is not None:
            self.log_error("{} {} -> {} {}".format(
                self.command or "-", (self.path or "-")[:200], int(status), log_error))
        body = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _fail(self, exc):
        """Answer a ClientError; close if the body was left unread."""
        if not self._body_read and self.command == "POST":
            self.close_connection = True
        self._send_json(exc.status, {"ok": False, "error": exc.message}, exc.headers, log_error=exc.message)

    def _require_endpoint(self):
        """Raise 404 unless the path (query ignored) is the endpoint."""
        path = urlsplit(self.path).path
        config = self.server.config
        if path.rstrip("/") != config.path.rstrip("/"):
            raise ClientError(HTTPStatus.NOT_FOUND, "Nothing here; the endpoint is {}.".format(config.path))

    def _guarded(self, action):
        try:
            action()
        except ClientError as exc:
            self._fail(exc)
        except StorageUnavailable as exc:
            self.close_connection = not self._body_read
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"ok": False, "error": str(exc)},
                            (("Retry-After", str(RETRY_AFTER)),), log_error=str(exc))
        except (ConnectionError, socket.timeout, ssl.SSLError):
            raise
        except Exception:
            self.server.log_error_line(self.address_string(), "internal error on {} {}:\n{}".format(
                self.command, self.path.translate(_CONTROL_CHARS)[:200], traceback.format_exc().rstrip()))
            self.close_connection = True
            with contextlib.suppress(Exception):
                self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR,
                                {"ok": False, "error": "Internal error; the receiver's log has the details."})

    # -- methods -------------------------------------------------------------

    def do_GET(self):
        self._guarded(self._get)

    def do_HEAD(self):
        self._guarded(self._get)

    def _get(self):
        path = urlsplit(self.path).path
        if path == "/" and self.server.config.path != "/":
            self._page()
        elif path == SUMMARY_PATH:
            self._summary()
        else:
            self._status()

    def _page(self):
        config = self.server.config
        check_page_auth(config, self.headers)
        facts = self.server.store.summary(utc=config.utc)
        body = render_status_page(facts, config.utc).encode("utf-8")
        self._log_get()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _summary(self):
        config = self.server.config
        check_page_auth(config, self.headers)
        facts = self.server.store.summary(utc=config.utc)
        self._log_get()
        self._send_json(HTTPStatus.OK, facts)

    def _log_get(self):
        self.server.log_request_line(self.address_string(), "{} {} -> 200".format(
            self.command, self.path.translate(_CONTROL_CHARS)[:200]))

    def do_POST(self):
        with self.server.in_flight():
            self._guarded(self._receive)

    def _not_allowed(self):
        self._require_endpoint()
        raise ClientError(HTTPStatus.METHOD_NOT_ALLOWED, "{} is not supported here; use POST to send data or "
                          "GET to check the connection.".format(self.command),
                          (("Allow", "GET, HEAD, POST"),))

    def do_PUT(self):
        self._guarded(self._not_allowed)

    do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = do_PUT

    def _status(self):
        self._require_endpoint()
        check_auth(self.server.config, self.headers)
        store = self.server.store
        answer = {"ok": True, "service": "health_receiver", "version": __version__,
                  "totals": store.totals(), "last_sync": store.last_sync()}
        peak = peak_rss_mb()
        if peak is not None:
            answer["peak_rss_mb"] = round(peak, 1)
        self._log_get()
        self._send_json(HTTPStatus.OK, answer)

    def _receive(self):
        server = self.server
        self._require_endpoint()
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
                result, text = ingest_body(server.store, body, remote)  # records its own failures
        except ClientError as exc:
            if not self._body_read:
                status = "failed" if exc.status >= 500 else "rejected"
                server.store.record_failed_request({"remote_addr": remote, "body_bytes": None}, status,
                                                   exc.message)
            raise
        if not server.config.archive:
            text = None  # its memory goes back before the app can send the next sync
        server.log_request_line(None, describe_sync(result))
        self._send_json(HTTPStatus.OK, result.response())
        self.wfile.flush()
        # What the app need not wait for.
        if text is not None:
            server.archive(text, result)
            text = None
        server.store.checkpoint()

    def _check_post_headers(self):
        """Decide auth, type, encodings and size from the headers alone."""
        config = self.server.config
        check_auth(config, self.headers)
        check_content_type(self.headers.get("Content-Type"))
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("identity", "gzip", "x-gzip", "deflate"):
            raise ClientError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                              "Content-Encoding {} is not supported; use gzip or deflate.".format(encoding[:40]))
        transfer = (self.headers.get("Transfer-Encoding") or "").strip().lower()
        if transfer and transfer != "chunked":
            raise ClientError(HTTPStatus.NOT_IMPLEMENTED, "Transfer-Encoding {} is not supported.".format(
                transfer[:40]))
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
        except ClientError:
            self.close_connection = True
            raise
        except socket.timeout:
            self.close_connection = True
            raise ClientError(HTTPStatus.REQUEST_TIMEOUT, "The body stopped arriving; connection closed.")


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
        self._slots = threading.BoundedSemaphore(config.max_ingests)
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
                self.log_error_line(client_address[0], "TLS handshake failed: {}".format(exc))
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
        got = self._slots.acquire(timeout=self.config.slot_wait)
        try:
            yield got
        finally:
            if got:
                self._slots.release()

    def archive(self, text, result):
        """Save an answered sync's body with --archive; failures only logged."""
        if self.config.archive:
            try:
                write_archive(self.config.archive, text, result.sync_id)
            except OSError as exc:
                self.log_error_line(result.remote_addr, "sync {} is stored but could not be archived in {}: "
                                    "{}".format(result.sync_id, self.config.archive, exc))

    def _write_log(self, line):
        stream = self.config.log_stream or sys.stderr
        line = "{} {}\n".format(_utc_now(), line).encode("utf-8", "backslashreplace").decode("utf-8")
        with self._log_lock:
            with contextlib.suppress(OSError, ValueError):  # a closed or full log must not fail a sync
                stream.write(line)
                stream.flush()

    def log_request_line(self, remote, line):
        """A line about a request that went well; --quiet drops it."""
        if not self.config.quiet:
            self._write_log(line if remote is None else "{} {}".format(remote, line))

    def log_error_line(self, remote, line):
        self._write_log("{} ERROR {}".format(remote or "-", line))

    def handle_error(self, request, client_address):
        self.log_error_line(client_address[0] if client_address else "-",
                            "unexpected error:\n" + traceback.format_exc().rstrip())



def make_ssl_context(cert, key):
    """A TLS 1.2+ server context; raise ValueError with a clear sentence."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for label, path in (("certificate", cert), ("key", key or cert)):
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise ValueError("TLS {} file {} does not exist or cannot be read.".format(label, path))
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError("TLS certificate {} and key {} cannot be loaded: {}.".format(cert, key or cert, exc))
    return context


# ---------------------------------------------------------------------------
# Command line: serve
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
    shown_host = "[{}]".format(host) if ":" in host else host
    lines = ["Listening on {}://{}:{}".format(scheme, shown_host, port)]
    if host in ("0.0.0.0", "::", ""):
        urls = ["{}://{}:{}".format(scheme, addr, port) for addr in local_addresses()]
        urls = urls or ["{}://127.0.0.1:{}".format(scheme, port)]
    else:
        urls = ["{}://{}:{}".format(scheme, shown_host, port)]
    lines.append("Server URL for Health Export Pro: " + "  or  ".join(urls))
    lines.append("Endpoint Path: {}".format(config.path))
    if config.token:
        if config.auth_header:
            lines.append("Auth Type: Custom Header, header name {} (key from {})".format(
                config.auth_header, config.token_source))
        else:
            lines.append("Auth Type: Bearer (key from {})".format(config.token_source))
    else:
        lines.append("Auth Type: None")
        if not _is_loopback(host):
            lines.append("WARNING: no key is set, so anyone who can reach this port can post data; "
                         "set {} to require one.".format(TOKEN_ENV))
    if config.path != "/":
        lines.append("Status page: {}/ (in a browser)".format(urls[0]))
    lines.append("Database: {}".format(os.path.abspath(config.db)))
    if config.archive:
        lines.append("Archive: {}".format(os.path.abspath(config.archive)))
    return lines


def serve(config, out=None, ready=None):
    """Run the receiver until SIGINT/SIGTERM (or ``ready``'s server is shut down).

    ``ready``, if given, is called with the server once it listens.  Returns
    the exit code.
    """
    out = out or sys.stdout
    store = Store(config.db)
    try:
        store.open()
        server = HealthReceiverServer(config, store)
    except StorageUnavailable as exc:
        print("error: {}".format(exc), file=sys.stderr)
        return 1
    except ValueError as exc:
        print("error: {}".format(exc), file=sys.stderr)
        return 2
    except OSError as exc:
        print("error: cannot listen on {}:{}: {}".format(config.host, config.port, exc.strerror or exc),
              file=sys.stderr)
        return 1
    for line in banner_lines(config, server.server_address[1]):
        print(line, file=out)
    out.flush()

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, stop)
    try:
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
            raise ValueError("cannot read the token file {}: {}".format(token_file, exc.strerror))
        if not token:
            raise ValueError("the token file {} is empty".format(token_file))
        return token, "file {}".format(token_file)
    token = (environ.get(TOKEN_ENV) or "").strip()
    return (token, "environment variable " + TOKEN_ENV) if token else (None, None)


def _positive_mb(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number: {!r}".format(text))
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _header_name(text):
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", text):
        raise argparse.ArgumentTypeError("not a valid header name: {!r}".format(text))
    return text


def serve_parser():
    parser = argparse.ArgumentParser(
        prog="health_receiver.py",
        description="Receive Health Export Pro syncs into a SQLite database.",
        epilog="Other commands (each with --help): stats, export, import, bench. "
               "The key comes from ${} or --token-file; without one, no auth.".format(TOKEN_ENV))
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
    token, source = read_token(args.token_file, environ)
    if args.tls_key and not args.tls_cert:
        raise ValueError("--tls-key needs --tls-cert")
    if args.max_ingests < 1:
        raise ValueError("--max-ingests must be at least 1")
    config = ReceiverConfig(host=args.host, port=args.port, path=args.path, db=args.db, token=token,
                            auth_header=args.auth_header, max_body=int(args.max_body_mb * MIB),
                            quiet=args.quiet, timeout=args.timeout, max_ingests=args.max_ingests,
                            tls_cert=args.tls_cert, tls_key=args.tls_key, token_source=source,
                            archive=args.archive, utc=args.utc)
    if config.archive:
        try:
            os.makedirs(config.archive, exist_ok=True)
        except OSError as exc:
            raise ValueError("cannot create the archive folder {}: {}".format(config.archive, exc.strerror))
        if not os.access(config.archive, os.W_OK):
            raise ValueError("the archive folder {} is not writable".format(config.archive))
    return config


# ---------------------------------------------------------------------------
# Command line: stats, export, import
# ---------------------------------------------------------------------------

#: Lines of an NDJSON export ingested as one sync by ``import``.
IMPORT_CHUNK_LINES = 100000
#: File names ``import`` picks up when given a folder.
IMPORT_SUFFIXES = (".json", ".json.gz", ".ndjson", ".ndjson.gz", ".jsonl", ".jsonl.gz")
#: NDJSON ``section`` of each exported table, and back.
NDJSON_SECTIONS = {"samples": "samples", "workouts": "workouts", "workout_route_points": "routes",
                   "medications": "medications", "medication_dose_events": "doses",
                   "characteristics": "characteristics", "syncs": "syncs"}


def _open_existing_store(path):
    if not os.path.exists(path):
        raise ValueError("no database at {}".format(path))
    return Store(path)


def run_stats(args, out):
    store = _open_existing_store(args.db)
    if args.recount:
        store.recount_types()
    facts = store.summary(sync_count=10, charts=False)
    if args.json:
        json.dump(facts, out, indent=2, ensure_ascii=False)
        out.write("\n")
        return 0
    print("Database: {} ({})".format(facts["database"]["path"], _size(facts["database"]["size_bytes"])), file=out)
    print("\n{:<26}{:>12}".format("Table", "Rows"), file=out)
    for table, rows in facts["totals"].items():
        print("{:<26}{:>12,}".format(table, rows), file=out)
    if facts["types"]:
        print("\n{:<36}{:>12}  {:<17} {}".format("Type", "Rows", "First", "Last"), file=out)
        for info in facts["types"]:
            print("{:<36}{:>12,}  {:<17} {}".format(info["name"][:36], info["rows"],
                                                    format_local(info["first"], False),
                                                    format_local(info["last"], False)), file=out)
    print("\nLast {} syncs".format(len(facts["syncs"])), file=out)
    print("{:<17} {:<20}{:>10}{:>10}{:>10}{:>9}  {}".format("When", "Source", "Records", "New", "Dup",
                                                            "Rejected", "Status"), file=out)
    for sync in facts["syncs"]:
        status = sync["status"] if sync["status"] == "ok" else "{}: {}".format(sync["status"], sync["error"])
        print("{:<17} {:<20}{:>10,}{:>10,}{:>10,}{:>9,}  {}".format(
            format_local(sync["received_at"], False), str(sync["sync_source"] or "-")[:20], sync["received"],
            sync["inserted"], sync["duplicates"], sync["rejected"], status), file=out)
    return 0


def resolve_type(store, name):
    """Full identifier for --type: as given, or by short name in any case."""
    with store.reader() as conn:
        known = [row[0] for row in store.sample_types(conn)]
    for candidate in known:
        if candidate == name:
            return candidate
    wanted = name.lower()
    for candidate in known:
        if candidate.lower() == wanted or short_type_name(candidate).lower() == wanted:
            return candidate
    raise ValueError("no samples of type {}; stored types: {}".format(
        name, ", ".join(short_type_name(t) for t in known) or "none"))


def _compact(record):
    """A record on one line (pretty-printed ones hold newlines)."""
    if "\n" in record or "\r" in record:
        return json.dumps(json.loads(record), ensure_ascii=False, separators=(",", ":"))
    return record


def ndjson_line(table, columns, row):
    """One exported row; records stay as stored so ``import`` reproduces them."""
    fields = dict(zip(columns, row))
    section = NDJSON_SECTIONS[table]
    if table == "characteristics":
        return json.dumps({"section": section, "name": fields["name"], "value": fields["value"]},
                          ensure_ascii=False)
    if table == "syncs":
        return json.dumps({"section": section, "row": fields}, ensure_ascii=False)
    head = '{"section":' + json.dumps(section)
    if table == "samples":
        head += ',"type":' + json.dumps(fields["type"], ensure_ascii=False)
    elif table == "workout_route_points":
        head += ',"workout":' + json.dumps(fields["workout_uuid"], ensure_ascii=False)
    return head + ',"record":' + _compact(fields["record"]) + "}"


def run_export(args, out):
    store = _open_existing_store(args.db)
    type_name = None
    if args.type:
        if args.section != "samples":
            raise ValueError("--type applies to --section samples")
        type_name = resolve_type(store, args.type)
    columns, rows = store.export_rows(args.section, type_name, args.since, args.until)
    table = EXPORT_SECTIONS[args.section][0]
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
                target.write(ndjson_line(table, columns, row))
                target.write("\n")
                count += 1
    finally:
        rows.close()
        if args.output:
            target.close()
    if args.output:
        print("{} rows of {} written to {}".format(count, args.section, args.output), file=sys.stderr)
    return 0


def json_members(text):
    """{key: original JSON text of its value} for the object in ``text``."""
    members = {}
    pos = _skip_ws(text, 0).end()
    if text[pos:pos + 1] != "{":
        raise ValueError("not a JSON object")
    pos = _skip_ws(text, pos + 1).end()
    if text[pos:pos + 1] == "}":
        return members
    while True:
        if text[pos:pos + 1] != '"':
            raise ValueError("expected a key at {}".format(pos))
        key, pos = _scan_string(text, pos + 1, True)
        pos = _skip_ws(text, pos).end()
        if text[pos:pos + 1] != ":":
            raise ValueError("expected ':' at {}".format(pos))
        pos = _skip_ws(text, pos + 1).end()
        try:
            _value, end = _scan_value(text, pos)
        except StopIteration:
            raise ValueError("expected a value at {}".format(pos)) from None
        members[key] = text[pos:end]
        pos = _skip_ws(text, end).end()
        char = text[pos:pos + 1]
        if char == "}":
            return members
        if char != ",":
            raise ValueError("expected ',' or '}}' at {}".format(pos))
        pos = _skip_ws(text, pos + 1).end()


def ndjson_payloads(lines):
    """Turn NDJSON export lines into payload bodies of IMPORT_CHUNK_LINES each."""
    data, routes, characteristics, count = {}, {}, [], 0

    def payload():
        parts = ['"data":{' + ",".join('{}:[{}]'.format(json.dumps(k), ",".join(v)) for k, v in data.items()) + "}"]
        if routes:
            parts.append('"workoutRoutes":{' + ",".join('{}:[{}]'.format(json.dumps(k), ",".join(v))
                                                        for k, v in routes.items()) + "}")
        if characteristics:
            parts.append('"characteristics":{' + ",".join(characteristics) + "}")
        return bytearray(('{"syncSource":"import",' + ",".join(parts) + "}").encode("utf-8", "surrogatepass"))

    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            members = json_members(line)
            section = json.loads(members["section"])
            if section == "samples":
                data.setdefault(json.loads(members["type"]), []).append(members["record"])
            elif section in ("workouts", "medications"):
                data.setdefault(section, []).append(members["record"])
            elif section == "doses":
                data.setdefault("medicationDoseEvents", []).append(members["record"])
            elif section == "routes":
                routes.setdefault(json.loads(members["workout"]), []).append(members["record"])
            elif section == "characteristics":
                characteristics.append("{}:{}".format(members["name"], members["value"]))
            elif section != "syncs":
                raise ValueError("unknown section {!r}".format(section))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError("line {}: not an export line ({})".format(number, exc)) from None
        count += 1
        if count >= IMPORT_CHUNK_LINES:
            yield payload()
            data, routes, characteristics, count = {}, {}, [], 0
    if count:
        yield payload()


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
        status = "files {}/{}, {:.1f} MB, {:,} records, {:.1f} MB/s, ETA {:.0f} s".format(
            self.done, self.files, self.bytes / 1e6, self.records, rate, left)
        if self.tty:
            if failed:
                self.stream.write("\r\x1b[K{}: {}\n".format(path, message))
            self.stream.write("\r\x1b[K" + status)
            if self.done == self.files:
                self.stream.write("\n")
        else:
            self.stream.write("{}: {} ({})\n".format(path, message, status))
        self.stream.flush()


def run_import(args, out):
    store = Store(args.db)
    store.open()
    paths = import_files(args.paths)
    sizes = {path: os.path.getsize(path) if os.path.isfile(path) else 0 for path in paths}
    progress = ImportProgress(len(paths), sum(sizes.values()), sys.stderr)
    for path in paths:
        try:
            body = _read_file(path)
            bodies = ndjson_payloads(body.decode("utf-8").splitlines()) if _is_ndjson(path, body) else [body]
            records = new = dup = rejected = 0
            for payload_body in bodies:
                result, _text = ingest_body(store, payload_body, "import " + os.path.basename(path))
                records += result.records + result.received["route_point"]
                new += result.new_records + result.inserted["route_point"]
                dup += result.duplicates + result.received["route_point"] - result.inserted["route_point"]
                rejected += result.rejected
            progress.records += records
            progress.file_done(path, sizes[path], "{:,} records ({:,} new, {:,} dup, {:,} rejected)".format(
                records, new, dup, rejected))
        except (OSError, EOFError, ValueError, zlib.error, ClientError) as exc:
            reason = exc.message if isinstance(exc, ClientError) else str(exc)
            progress.file_done(path, sizes[path], "skipped: " + reason, failed=True)
        except StorageUnavailable as exc:
            progress.file_done(path, sizes[path], "not imported: {}".format(exc), failed=True)
    store.close()
    print("{} of {} files imported{}.".format(progress.done - progress.failed, progress.done,
                                              ", {} failed".format(progress.failed) if progress.failed else ""),
          file=out)
    return 1 if progress.failed else 0


def command_parser(name):
    """Parsers of the stats, export and import commands."""
    parser = argparse.ArgumentParser(prog="health_receiver.py " + name)
    parser.add_argument("--db", default=DEFAULT_DB, help="SQLite database file (default %(default)s)")
    if name == "stats":
        parser.description = "Totals per table and per type, the last 10 syncs, the database size."
        parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
        parser.add_argument("--recount", action="store_true",
                            help="first rebuild the per-type totals (after deleting samples by hand)")
    elif name == "export":
        parser.description = "Stream stored rows as CSV or NDJSON (NDJSON can be imported again)."
        parser.add_argument("--section", choices=sorted(EXPORT_SECTIONS), default="samples",
                            help="what to export (default samples)")
        parser.add_argument("--type", help="samples of this type only: HKQuantityTypeIdentifierHeartRate, "
                                           "HeartRate or heartrate")
        parser.add_argument("--since", metavar="DATE", help="rows from this UTC date or time on (2026-01-31)")
        parser.add_argument("--until", metavar="DATE", help="rows up to this UTC date (included) or time")
        parser.add_argument("--format", choices=("csv", "ndjson"), default="csv", help="default csv")
        parser.add_argument("--output", metavar="FILE", help="write here instead of standard output")
    else:
        parser.description = ("Ingest saved payloads (export-*.json, archive .json.gz, NDJSON exports) "
                              "through the same path as a sync; folders are searched for such files.")
        parser.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
    return parser


#: The commands main() knows besides serving.
COMMANDS = {"stats": run_stats, "export": run_export, "import": run_import}


# ---------------------------------------------------------------------------
# Command line: bench
# ---------------------------------------------------------------------------

#: HealthKit types of the generated payload: (identifier, unit, source, value range).
BENCH_TYPES = (
    ("HKQuantityTypeIdentifierHeartRate", "count/min", "Jane\u2019s Apple Watch", (48, 170)),
    ("HKQuantityTypeIdentifierStepCount", "count", "iPhone", (0, 900)),
    ("HKQuantityTypeIdentifierActiveEnergyBurned", "kcal", "Jane\u2019s Apple Watch", (0, 40)),
    ("HKQuantityTypeIdentifierOxygenSaturation", "%", "Jane\u2019s Apple Watch", (0.9, 1.0)),
    ("HKCategoryTypeIdentifierSleepAnalysis", None, "Jane\u2019s Apple Watch", None),
)

#: The baseline: the usual receiver, json.loads of the whole body, then the
#: samples table's rows (the element kept with json.dumps) in one
#: executemany into the same table, indexes and settings.  It stores only
#: samples; the receiver stores every section.
BASELINE_CODE = r'''
import json, resource, sqlite3, sys, time
body_file, db_file, schema, page_size, cache_kib = sys.argv[1:6]
with open(body_file, "rb") as f:
    body = f.read()
db = sqlite3.connect(db_file, isolation_level=None)
db.execute("PRAGMA page_size = %d" % int(page_size))
db.execute("PRAGMA journal_mode = WAL")
db.execute("PRAGMA synchronous = FULL")
db.execute("PRAGMA cache_size = -%d" % int(cache_kib))
db.executescript(schema)
t0 = time.perf_counter()
payload = json.loads(body)
rows = [(s.get("uuid"), t, s.get("startDate"), s.get("endDate"), s.get("value"), s.get("unit"),
         s.get("sourceName"), json.dumps(s), 1)
        for t, samples in payload["data"].items()
        if isinstance(samples, list) and t not in ("workouts", "medications", "medicationDoseEvents")
        for s in samples]
db.execute("BEGIN")
db.executemany("INSERT OR IGNORE INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
db.execute("COMMIT")
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1e6 if sys.platform == "darwin" else 1024)
try:
    with open("/proc/self/status") as f:
        peak = int(next(l for l in f if l.startswith("VmHWM:")).split()[1]) / 1024
except OSError:
    pass
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "rows": len(rows)}))
'''


def make_bench_payload(target_mb, seed=7):
    """A realistic sync of about ``target_mb`` MB: five sample types (5% without
    uuid), 15 workouts with ~10k route points, medications, dose events and
    characteristics.  Returns (body bytes, number of data elements)."""
    import random
    rng = random.Random(seed)
    target = int(target_mb * 1e6)
    start = datetime.datetime(2026, 1, 27, tzinfo=datetime.timezone.utc)

    def stamp(seconds):
        return (start + datetime.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.000Z")

    def uid():
        return "{:08X}-{:04X}-4{:03X}-A{:03X}-{:012X}".format(
            rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(12), rng.getrandbits(12), rng.getrandbits(48))

    workouts, routes = [], {}
    for n in range(15):
        begin = n * 172800 + 3600 * 7
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
            points.append('{{"latitude":{:.7f},"longitude":{:.7f},"altitude":{:.2f},"timestamp":"{}",'
                          '"speed":{:.2f},"course":{:.1f},"horizontalAccuracy":3.5,"verticalAccuracy":2.1}}'.format(
                              lat, lon, rng.uniform(20, 80), stamp(begin + 5 * i), rng.uniform(2, 4),
                              rng.uniform(0, 360)))
        routes[wid] = "[" + ",".join(points) + "]"
    medications = [json.dumps({"conceptIdentifier": "rx-{}".format(i), "displayText": name, "nickname": None,
                               "form": "tablet", "isArchived": False, "hasSchedule": True,
                               "codings": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                            "code": str(1000 + i)}]})
                   for i, name in enumerate(["Aspirin", "Lisinopril", "Metformin", "Vitamin D", "Ibuprofen"])]
    doses = [json.dumps({"uuid": uid(), "medicationConceptIdentifier": "rx-{}".format(i % 5),
                         "startDate": stamp(i * 8640), "endDate": stamp(i * 8640),
                         "logStatus": rng.choice(["taken", "skipped"]), "doseQuantity": 1, "unit": "tablet",
                         "scheduledDate": stamp(i * 8640)}) for i in range(300)]
    head = ('{{"exportDate":"{}","startDate":"{}","endDate":"{}","syncSource":"manual-upload",'
            '"characteristics":{{"biologicalSex":"female","dateOfBirth":"1985-04-12","bloodType":"A+",'
            '"wheelchairUse":"no","activityMoveMode":"activeEnergy"}},"data":{{'.format(
                stamp(30 * 86400), stamp(0), stamp(30 * 86400)))
    fixed = ('"workouts":[' + ",".join(workouts) + '],"medications":[' + ",".join(medications)
             + '],"medicationDoseEvents":[' + ",".join(doses) + "]")
    tail = '},"workoutRoutes":{' + ",".join('"{}":{}'.format(k, v) for k, v in routes.items()) + "}}"
    budget = target - len(head) - len(fixed) - len(tail)
    per_type = [[] for _ in BENCH_TYPES]
    size = 0
    i = 0
    while size < budget:
        t = i % len(BENCH_TYPES)
        identifier, unit, source, span = BENCH_TYPES[t]
        begin = (i * 13) % (30 * 86400)
        fields = []
        if i % 20:
            fields.append('"uuid":"{}"'.format(uid()))
        fields.append('"startDate":"{}","endDate":"{}"'.format(stamp(begin), stamp(begin + 60)))
        if span is None:
            fields.append('"value":"{}"'.format(rng.choice(["asleepCore", "asleepDeep", "asleepREM", "awake"])))
        elif isinstance(span[0], float):
            fields.append('"value":{:.3f},"unit":"{}"'.format(rng.uniform(*span), unit))
        else:
            fields.append('"value":{},"unit":"{}"'.format(rng.randint(*span), unit))
        fields.append('"sourceName":"{}","sourceVersion":"10.2","device":"Watch6,2",'
                      '"metadata":{{"HKMetadataKeyHeartRateMotionContext":{}}}'.format(source, i % 3))
        element = "{" + ",".join(fields) + "}"
        per_type[t].append(element)
        size += len(element.encode("utf-8")) + 1
        i += 1
    samples = ",".join('"{}":[{}]'.format(BENCH_TYPES[t][0], ",".join(items)) for t, items in enumerate(per_type))
    body = (head + fixed + "," + samples + tail).encode("utf-8")
    elements = i + len(workouts) + len(medications) + len(doses)
    return body, elements


def _start_child_server(db):
    """Start a receiver in a child process; return (process, port)."""
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--host", "127.0.0.1", "--port", "0",
                             "--db", db, "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, universal_newlines=True)
    line = proc.stdout.readline()
    match = re.search(r":(\d+)\s*$", line)
    if not match:
        proc.kill()
        raise RuntimeError("the receiver did not start: " + line + proc.stdout.read())
    return proc, int(match.group(1))


def _post(port, body, path=DEFAULT_PATH):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    with contextlib.closing(conn):
        started = time.perf_counter()
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
        return time.perf_counter() - started, response.status, answer


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
        proc.terminate()
        proc.wait(60)
        proc.stdout.close()
    for status in (first[1], second[1]):
        if status != 200:
            raise RuntimeError("the receiver answered {}".format(status))
    body_file = os.path.join(work_dir, "body.json")
    with open(body_file, "wb") as handle:
        handle.write(body)
    baseline_db = os.path.join(work_dir, "baseline.db")
    out = subprocess.run([sys.executable, "-c", BASELINE_CODE, body_file, baseline_db, SCHEMA, str(PAGE_SIZE),
                          str(CACHE_KIB)],
                         stdout=subprocess.PIPE, check=True, universal_newlines=True).stdout
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
        proc.terminate()
        proc.wait(60)
        proc.stdout.close()
    return elapsed, sorted(statuses), peak


def run_bench(mb, runs, out, concurrent=1):
    if resource is None:
        print("bench needs the resource module (Linux, macOS, BSD).", file=sys.stderr)
        return 1
    print("Generating a {:g} MB sync...".format(mb), file=out)
    body, elements = make_bench_payload(mb)
    size_mb = len(body) / 1e6
    print("{:.1f} MB, {} records + route points; {} run(s), each: receiver (new, then repeat) "
          "and baseline.".format(size_mb, elements, runs), file=out)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="health-bench-") as work_dir:
        for n in range(runs):
            result = bench_once(body, work_dir)
            rounds.append(result)
            print("  run {}: first {:.2f} s, repeat {:.2f} s, peak RSS {:.0f} MB | baseline {:.2f} s, "
                  "{:.0f} MB".format(n + 1, result["first"], result["second"], result["peak"],
                                     result["baseline"], result["baseline_peak"]), file=out)
        out.flush()
    med = {key: statistics.median(r[key] for r in rounds)
           for key in ("first", "second", "peak", "baseline", "baseline_peak")}
    answer = rounds[0]["answer"]
    records = answer["count"] + answer["routePoints"]
    print("", file=out)
    print("Receiver (median of {}), every section stored, WAL + synchronous=FULL:".format(runs), file=out)
    print("  first post  {:6.2f} s  {:6.1f} MB/s  {:9,.0f} records/s  (count {}, {} route points)".format(
        med["first"], size_mb / med["first"], records / med["first"], answer["count"], answer["routePoints"]),
        file=out)
    print("  repeat post {:6.2f} s  {:6.1f} MB/s  (all {} duplicates, nothing inserted: {})".format(
        med["second"], size_mb / med["second"], rounds[0]["repeat"]["duplicates"],
        sum(rounds[0]["repeat"]["inserted"].values()) == 0), file=out)
    print("  peak RSS    {:6.0f} MB".format(med["peak"]), file=out)
    print("Baseline (json.loads + one executemany of the same sample rows into the same table; "
          "samples only):", file=out)
    print("  time        {:6.2f} s\n  peak RSS    {:6.0f} MB".format(med["baseline"], med["baseline_peak"]),
          file=out)
    print("Ratios: time {:.2f}x the baseline, peak RSS {:.2f}x the baseline.".format(
        med["first"] / med["baseline"], med["peak"] / med["baseline_peak"]), file=out)
    if concurrent > 1:
        with tempfile.TemporaryDirectory(prefix="health-bench-") as work_dir:
            elapsed, statuses, peak = bench_concurrent(body, concurrent, work_dir)
        print("{} concurrent posts of the same {:.0f} MB (--max-ingests {}): all answered in {:.2f} s, "
              "statuses {}, peak RSS {:.0f} MB ({:.1f}x one post's).".format(
                  concurrent, size_mb, DEFAULT_MAX_INGESTS, elapsed, statuses, peak, peak / med["peak"]), file=out)
    per_50 = med["first"] * 50 / size_mb
    print("", file=out)
    print("A 50 MB sync takes about {:.1f} s on this machine; the app waits 30 s, so a machine up to {:.0f}x "
          "slower still answers in time (a Raspberry Pi 4 is typically 3-5x slower than a desktop, a Pi Zero 2 "
          "about 10x). Peak memory for this {:.0f} MB sync: {:.0f} MB.".format(
              per_50, 30 / per_50, size_mb, med["peak"]), file=out)
    return 0


def bench_parser():
    parser = argparse.ArgumentParser(prog="health_receiver.py bench",
                                     description="Time a large sync against the real receiver and a baseline.")
    parser.add_argument("--mb", type=_positive_mb, default=50, help="size of the generated sync (default 50)")
    parser.add_argument("--runs", type=int, default=3, help="rounds to take the median of (default 3)")
    parser.add_argument("--concurrent", type=int, default=1, metavar="N",
                        help="also post N copies at once and report time and peak memory (default 1: no)")
    return parser


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def main(argv=None, environ=None, out=None):
    """Entry point; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    environ = os.environ if environ is None else environ
    out = out or sys.stdout
    try:
        if argv[:1] == ["bench"]:
            args = bench_parser().parse_args(argv[1:])
            return run_bench(args.mb, max(1, args.runs), out, args.concurrent)
        if argv[:1] and argv[0] in COMMANDS:
            command = argv[0]
            args = command_parser(command).parse_args(argv[1:])
            try:
                return COMMANDS[command](args, out)
            except (ValueError, StorageUnavailable) as exc:
                print("error: {}".format(exc), file=sys.stderr)
                return 1
            except BrokenPipeError:  # export | head: the reader has all it wants
                with contextlib.suppress(OSError, ValueError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 0
        if argv[:1] == ["serve"]:
            argv = argv[1:]
        args = serve_parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        config = config_from_args(args, environ)
    except ValueError as exc:
        print("error: {}".format(exc), file=sys.stderr)
        return 2
    return serve(config, out)


if __name__ == "__main__":
    sys.exit(main())
