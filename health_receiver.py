#!/usr/bin/env python3
"""Receive Health Export Pro syncs and keep every record in SQLite.

The iOS app Health Export Pro POSTs a JSON document (up to tens of MB) to a
server of your choice whenever it syncs.  This single file is that server:
standard library only, any CPython 3.8 or newer.  The same endpoint reads
the REST automations of Health Auto Export, told apart by shape.

Usage::

    python3 health_receiver.py                 # serve on port 3000 into ./health.db
    python3 health_receiver.py --help          # every flag
    python3 health_receiver.py stats           # what is stored
    python3 health_receiver.py export --type HeartRate --format csv
    python3 health_receiver.py import export-*.json
    python3 health_receiver.py backup /backups --keep 7   # a verified copy
    python3 health_receiver.py people add ann  # a second person, with a key of her own
    python3 health_receiver.py bench --mb 50   # can this machine keep up?

Open http://<this machine>:3000/ in a browser for the status page: today's
summary, charts over 7 days to all of it, a page per type and per workout.

The key the app sends comes from the environment variable
HEALTH_RECEIVER_TOKEN (or a file named by --token-file); without one, a new
database gets a random key, saved beside it in <database>.key and printed
once at start.

Map of this file: its sections in order, each depending only on those
above it (none uses a name that a later one defines), and the rooms of
the larger ones, each under a banner of its own (# -- Title: ...).  The
banners say the same titles in the same order: FileMapTests holds the
file to this map and to that rule.

    Errors          exceptions; client text made safe for the log
    Dates           the stored form (canonical UTC text), parsing, Zone: the
                    days, nights and hours a person lives in
    JSON reader     one document read as it arrives, a value at a time,
                    within a bounded window
      - Scanners: the limits; a value's text found and checked, not decoded
      - JsonReader: the reader; values too deep or too large kept as text
    Ingest          the health grammar: what the apps send, as rows
      - Row functions: an element of Health Export Pro made a row
      - The other app: Health Auto Export's shapes (HAE_METRICS,
        POINT_SHAPES, UNIT_SIZES) made rows of the same tables
      - Sections: the SECTIONS registry; NESTED, the elements whose arrays
        are read an element at a time
      - Payload: a sync's body as batches of rows
    Storage         SQLite: the schema, a sync written in one transaction,
                    hourly totals, people, backups
      - Tables: connections' limits; the schema (SYNCS, PEOPLE, the tables
        derived from samples) and its first two versions
      - Hourly totals: what an hour of a type holds, made in SQL
      - The merge by source priority: the types that add up, merged over
        time as the Health app does (SourceRanks, merge_by_priority)
      - Sleep: the stages; each night's time counted once per source
      - Totals kept up to date: hours_merger; the hours a sync touched,
        made again
      - Migrations: the later steps; MIGRATIONS, SCHEMA_VERSION
      - Writing a sync: SyncResult, its syncs row, what it notes as pending
      - The store: people; Store (one writer, short readers, a sync merged
        in one transaction); PersonStore (the store as one person sees it)
      - Staging: a sync's rows in a temporary file until its merge
      - Backups: made while the database is in use, verified, restored
    Sync workflow   one sync from arriving bytes to stored rows, shared by
                    HTTP and import
      - Archive: bodies kept as they came (--archive)
      - Intake: SyncIntake (a byte-identical retry answered from its
        record)
      - Scheduled backups: BackupSchedule
      - NDJSON import: the lines of an export made payloads again
    Reporting       records of what is stored, read only
      - Views: titles; RANGES; a View and its Window; totals per period
      - Charts: category types, sleep per night, CHART_KINDS, today's tiles
      - Records: what the app sends, the store's facts, workouts,
        medications
      - The status report: gaps, the journal (JOURNAL_KINDS: the other
        app's events), StatusReport and the JSON made from it
      - What other tools read: /api/latest, today's totals, /api/series
      - Type and workout reports: a type's page, a workout's
      - Export: rows, CSV and NDJSON lines
    Presentation    the pages made from those records (HTML, inline SVG)
      - Formats and charts: paths; numbers, times and units as shown; SVG
      - Pages: the status page, a type's, a workout's, the fields'
      - Prometheus: the text exposition format (METRICS)
    Notices         when data stops or comes back, or a backup fails
                    (NOTICE_FORMATS, Notifier, GapWatch)
    HTTP            the protocol and the server
      - Keys and the configuration: Keys, identities, trusted proxies,
        ReceiverConfig
      - Request checks: framing, the body as it arrives, hosts, throttles
      - The protocol: Answer, Route, the one answer writer
      - The routes: what the receiver answers, and who may ask (ROUTES)
      - The server: HealthReceiverServer, TLS
    Command line    the commands
      - serve: the start, its banner, the key, the flags
      - Other commands: key, people, stats, export, import, backup,
        verify, restore, notify; COMMANDS
    Bench           `bench`: the receiver against a baseline, at any
                    database size
      - Payloads: generated syncs of both apps' shapes
      - Runs: the baseline, the runs, a filled database, a backup
    main            the entry point

Where to change what: each registry, the room it is in, what one more
entry needs, and the tests that guard it (FileMapTests checks the rooms
and that the tests exist).

    SECTIONS        Ingest / Sections: a Section (the app's keys, its
                    table, columns, key, dates) and its row function; a new
                    table is created at the next start, on existing
                    databases too.  SectionRegistryTests, MigrationTests
    NESTED          Ingest / Sections: a Nested: the parent row and a
                    Stream per array (its section, its row function).
                    OtherAppStreamingTests
    HAE_METRICS     Ingest / The other app: a HaeMetric (the HealthKit type,
                    the unit stored, a shape of POINT_SHAPES).
                    OtherAppWalkerTests
    POINT_SHAPES    Ingest / The other app: a function of a point's fields.
                    OtherAppWalkerTests
    UNIT_SIZES      Ingest / The other app: a unit and its size in the unit
                    stored.  OtherAppWalkerTests
    SYNCS           Storage / Tables: a column (Sync and the SQL follow)
                    and a MIGRATIONS step.  MigrationTests
    PEOPLE          Storage / Tables: a column and a MIGRATIONS step.
                    PeopleCommandTests, HouseholdTests
    hours_merger    Storage / Totals kept up to date: how a type's hours are
                    made; the oracle in the tests states the rules again,
                    apart: change both.  HealthAppOracleTests,
                    CumulativeMergeTests
    MIGRATIONS      Storage / Migrations: a step at the end (a released
                    step is never edited), in its own transaction.
                    MigrationTests
    RANGES          Reporting / Views: a Range (name, title, days; GRAINS
                    the length of a point).  ReportingTests,
                    StatusPageTests
    CATEGORY_TYPES  Reporting / Charts: a CategoryType (its values' names).
                    CategoryTypeTests
    CHART_KINDS     Reporting / Charts: a ChartKind (a period's value, its
                    drawing in DRAWINGS, the types it applies to; the first
                    that applies wins).  ReportingTests
    JOURNAL_KINDS   Reporting / The status report: a JournalKind (its
                    section, title, columns).  OtherAppTests
    METRICS         Presentation / Prometheus: a Metric, and its samples in
                    receiver_samples or person_samples.  OtherToolsTests
    NOTICE_FORMATS  Notices: a NoticeFormat (its name, the
                    request it makes, the URL's help).  NoticeFormatTests
    ROUTES          HTTP / The routes: a Route (method, path, who may ask,
                    the action: a function of the request returning an
                    Answer), in the README too.  ProtocolTests,
                    DocumentedEverywhereTests
    COMMANDS        Command line / Other commands: a parser factory and a
                    run(args, out), in the README too.  CommandShapeTests,
                    DocumentedEverywhereTests
    PEOPLE_ACTIONS  Command line / Other commands: an action of `people`.
                    PeopleCommandTests

Licensed under the MIT licence; see the LICENSE file.
"""

__version__ = "1.2.0"

import argparse
import base64
import bisect
import codecs
import collections
import contextlib
import csv
import dataclasses
import datetime
import errno
import functools
import gzip
import hashlib
import hmac
import html
import http.client
import io
import ipaddress
import itertools
import json
import json.decoder
import json.scanner
import math
import operator
import os
import re
import secrets
import shutil
import signal
import socket
import socketserver
import sqlite3
import ssl
import stat
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
from urllib.parse import parse_qs
from urllib.parse import quote
from urllib.parse import unquote
from urllib.parse import urlsplit

try:
    import resource
except ImportError:  # Windows has no resource module; peak RSS is then unknown.
    resource = None
try:
    import ctypes
except ImportError:  # a Python built without libffi: memory is then not handed back early
    ctypes = None
try:
    import fcntl
except ImportError:  # Windows: restore cannot tell whether a receiver runs
    fcntl = None


# ---------------------------------------------------------------------------
# Errors: exceptions; client text made safe for the log
# ---------------------------------------------------------------------------

#: Client text quoted in a log line is cut to this many characters.
LOG_TEXT_MAX = 200


#: Escapes for what client text must not bring to a log or a terminal:
#: control characters (NUL, CR, LF, ESC...), the Unicode line and paragraph
#: separators, and the marks that reorder text (bidi controls).
_CONTROL_CHARS = str.maketrans({c: f"\\x{c:02x}" for c in itertools.chain(range(0x20), range(0x7F, 0xA0))})
_CONTROL_CHARS.update({c: f"\\u{c:04x}" for c in itertools.chain(
    (0x200E, 0x200F, 0x2028, 0x2029), range(0x202A, 0x202F), range(0x2066, 0x206A))})
_CONTROL_CHARS[ord("\\")] = r"\\"


def counted(number, noun):
    """ "1 record", "2 records", "1,000 records"."""
    return f"{number:,} {noun}" + ("" if number == 1 else "s")


def log_safe(text, limit=None):
    """Client text for a log line or a terminal: what could forge a line,
    move the cursor or reorder the text escaped, cut to ``limit`` characters."""
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
    """A command was given a value it cannot use: said in one line, without
    a traceback, and the command exits with ``exit_status``."""

    exit_status = 2


class Missing(UsageError):
    """What a command needs is not there (a database, a module this
    platform lacks): it failed."""

    exit_status = 1


class Busy(UsageError):
    """A command cannot run now (a receiver runs on the database): it
    failed, and was not misused."""

    exit_status = 1


class ClientError(Exception):
    """A request the client got wrong: answered with ``status`` and ``message``."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = HTTPStatus(status)
        self.message = message
        self.headers = tuple(headers)


# ---------------------------------------------------------------------------
# Dates: the stored form, parsing it, days as a person lives them
# ---------------------------------------------------------------------------

#: Years a date may fall in; anything else is taken as not a date.
DATE_YEARS = (1900, 2199)
#: The app's own date form, the one stored, when its fields are in range:
#: years 1900-2199, a month's days (February's 29th needs a leap year,
#: checked apart: see LEAP_DAY), hours 00-23, minutes and seconds 00-59,
#: ASCII digits only.  Matched without parsing.
_canonical_in_range = re.compile(
    r"(?:19|2[01])[0-9][0-9]-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    r"|02-(?:0[1-9]|1[0-9]|2[0-9]))T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]\.[0-9][0-9][0-9]Z").fullmatch
#: What a date on February 29th holds: it exists in leap years only.
LEAP_DAY = "-02-29T"
#: The canonical form with every digit a 0, and the table that makes it so:
#: the shape of a whole batch of dates is recognised with one join and one
#: translate (which also leaves any digit but ASCII's as it is).
_CANONICAL_SHAPE = "0000-00-00T00:00:00.000Z"
_DIGITS_TO_ZERO = str.maketrans("123456789", "000000000")
#: Stands for a missing date (an element without an end) when a batch's
#: dates are checked at once: one that exists.
CANONICAL_FILLER = "2000-01-01T00:00:00.000Z"
#: The other ISO 8601 forms accepted: offsets with or without a colon, no
#: fraction or any number of digits, a space instead of T, a bare date;
#: ASCII digits only (int() would read others).
_other_date = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)(?:[T ](\d\d):(\d\d)(?::(\d\d)(?:[.,](\d{1,9}))?)?)? ?(Z|z|[+-]\d\d(?::?\d\d)?)?",
    re.ASCII).fullmatch


def _leap(year):
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def is_canonical_date(text):
    """Whether ``text`` (24 characters) is canonical UTC of a moment that
    exists: a calendar date and a time of day, in DATE_YEARS."""
    return _canonical_in_range(text) is not None and (LEAP_DAY not in text or _leap(int(text[:4])))


@functools.lru_cache(maxsize=None)
def _digit_table(digits):
    """bytes.translate's table that makes each of ``digits`` a 1, any other byte a 0."""
    return bytes(1 if byte in digits else 0 for byte in range(256))


def _digit_at(column, digits):
    """An int whose bytes say, for each byte of ``column``, whether it is
    one of ``digits``: ``&`` of two such ints finds where two columns
    hold given digits at once."""
    return int.from_bytes(column.translate(_digit_table(digits)), "big")


#: Pairs of a field's digits that no date has: (first digit's column,
#: the digits, second digit's column, the digits after them that make no
#: year 1900-2199, month, day or hour).  Columns are offsets in a date.
_IMPOSSIBLE_PAIRS = ((0, b"1", 1, b"012345678"), (0, b"2", 1, b"23456789"), (5, b"0", 6, b"0"),
                     (5, b"1", 6, b"3456789"), (8, b"0", 9, b"0"), (8, b"3", 9, b"23456789"), (11, b"2", 12, b"456789"))
#: The digits each leading digit of a field may be: century, month, day,
#: hour, tens of minutes and seconds.
_LEADING_DIGITS = ((0, b"12"), (5, b"01"), (8, b"0123"), (11, b"012"), (14, b"012345"), (17, b"012345"))


def dates_exist(joined):
    """Whether ``joined`` (bytes), dates of the canonical shape one after
    another, holds only dates that exist, as is_canonical_date says of
    each; False may also mean that one needs a closer look (a 29th of
    February).  Checked a column of digits at a time (the bytes at one
    offset of every date: a slice, a translate), never a date at a time:
    1,000 dates cost 0.05 ms this way, 0.15 ms by a regular expression
    (a 50 MB sync holds 350,000)."""
    column = {offset: joined[offset::24] for offset in (0, 1, 5, 6, 8, 9, 11, 12, 14, 17)}
    if any(column[offset].strip(digits) for offset, digits in _LEADING_DIGITS):
        return False
    for first, first_digits, second, second_digits in _IMPOSSIBLE_PAIRS:
        if _digit_at(column[first], first_digits) & _digit_at(column[second], second_digits):
            return False
    february = _digit_at(column[5], b"0") & _digit_at(column[6], b"2")
    thirty_days = ((_digit_at(column[5], b"0") & _digit_at(column[6], b"469"))
                   | (_digit_at(column[5], b"1") & _digit_at(column[6], b"1")))
    thirtieth = _digit_at(column[8], b"3") & _digit_at(column[9], b"0")
    thirty_first = _digit_at(column[8], b"3") & _digit_at(column[9], b"1")
    twenty_ninth = _digit_at(column[8], b"2") & _digit_at(column[9], b"9")
    return not (thirty_first & (thirty_days | february) or (thirtieth | twenty_ninth) & february)


def are_canonical_dates(joined):
    """Whether ``joined``, canonical dates one after another (str), holds
    only dates that exist (see dates_exist)."""
    return (joined.translate(_DIGITS_TO_ZERO) == _CANONICAL_SHAPE * (len(joined) // 24)
            and dates_exist(joined.encode("ascii")))


#: The 12-hour form of phones set to a 12-hour clock (Health Auto Export):
#: ``2024-09-21 7:57:00 am +1000``, a space, a narrow no-break space
#: (U+202F) or none before am/pm, in any case, with or without dots.
_twelve_hour_date = re.compile(
    "(\\d{4})-(\\d\\d)-(\\d\\d)[T ](\\d\\d?):(\\d\\d)(?::(\\d\\d)(?:[.,](\\d{1,9}))?)?[ \u202f\u00a0]?"
    "([AaPp])\\.?[Mm]\\.? ?(Z|z|[+-]\\d\\d(?::?\\d\\d)?)?").fullmatch


def utc_date(text):
    """``text`` as canonical UTC (``2026-02-24T08:00:00.000Z``), or None
    when it is not a date: one that does not exist (February 30th, hour
    24, second 60), of a year outside DATE_YEARS, or written with other
    digits than ASCII's.  A date without an offset is taken as UTC."""
    if text.__class__ is not str:
        return None
    if len(text) == 24 and is_canonical_date(text):
        return text
    match = _other_date(text.strip())
    if match is None:
        match = _twelve_hour_date(text.strip())
        if match is None:
            return None
        year, month, day, hour, minute, second, fraction, half, zone = match.groups()
        if not 1 <= int(hour) <= 12:
            return None
        hour = int(hour) % 12 + (12 if half in "Pp" else 0)
    else:
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
    return _canonical(stamp)


#: Health Auto Export's own form, ``2026-11-30 08:01:00 +0100``, with an
#: offset of whole hours: recognised without parsing (see hae_date).
_is_hae_date = re.compile(r"\d{4}-\d\d-\d\d [0-2]\d:[0-5]\d:[0-5]\d [+-][01]\d00").fullmatch
#: {date's hour and offset: its hour in UTC (YYYY-MM-DDTHH)}; emptied when full.
_HAE_HOURS = {}
_HAE_HOURS_MAX = 4096


def hae_date(text):
    """utc_date() of a date sent by Health Auto Export; its usual form (an
    offset of whole hours) is converted with one look-up per hour of dates
    (a minute of heart rate is a date)."""
    if text.__class__ is str and len(text) == 25 and _is_hae_date(text):
        key = text[:13] + text[19:]
        hour = _HAE_HOURS.get(key)
        if hour is None:
            hour = utc_date(text[:13] + ":00:00" + text[19:])
            if hour is None:
                return None
            if len(_HAE_HOURS) >= _HAE_HOURS_MAX:
                _HAE_HOURS.clear()
            hour = _HAE_HOURS[key] = hour[:13]
        return hour + text[13:19] + ".000Z"
    return utc_date(text)


def _canonical(stamp):
    """A datetime as canonical UTC text, to the millisecond; a naive one
    is taken as UTC."""
    if stamp.tzinfo is not None:
        stamp = stamp.astimezone(datetime.timezone.utc)
    return f"{stamp:%Y-%m-%dT%H:%M:%S}.{stamp.microsecond // 1000:03d}Z"


def utc_clock():
    """Now, as an aware datetime: the receiver's clock unless its
    configuration is given another (a test's)."""
    return datetime.datetime.now(datetime.timezone.utc)


def utc_now():
    """Now, as canonical UTC text."""
    return _canonical(datetime.datetime.now(datetime.timezone.utc))


def parse_stamp(text):
    """A stored timestamp as an aware datetime, or None."""
    if not isinstance(text, str) or len(text) < 19:
        return None
    try:
        stamp = datetime.datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return None
    return stamp.replace(tzinfo=datetime.timezone.utc)


class Zone(typing.NamedTuple):
    """The days a person lives in: this machine's local time, daylight
    saving included, or UTC (``--utc``).  Stored timestamps are UTC; pages
    cut them into days, nights and hours of this zone."""

    utc: bool = False

    def name(self, now):
        """What the pages call the zone: "UTC", or the local zone's name now."""
        return "UTC" if self.utc else now.astimezone().tzname() or "local"

    def local(self, stamp):
        """An aware datetime in this zone."""
        return stamp.astimezone(datetime.timezone.utc if self.utc else None)

    def today(self, now):
        return self.local(now).date()

    def day_of(self, text):
        """The date, in this zone, of a stored timestamp, or None."""
        stamp = parse_stamp(text)
        return None if stamp is None else self.local(stamp).date()

    def midnight(self, day, hour=0):
        """The stored timestamp of a day's first instant in this zone (or
        of ``hour`` o'clock)."""
        stamp = datetime.datetime(day.year, day.month, day.day, hour)
        return _canonical(stamp.replace(tzinfo=datetime.timezone.utc) if self.utc else stamp.astimezone())


# ---------------------------------------------------------------------------
# JSON reader: one document read as it arrives, a value at a time
# ---------------------------------------------------------------------------

# -- Scanners: the limits; a value's text found and checked, not decoded ----

#: Bytes in one MiB: limits are in MiB, as the app's "50 MB" is.
MIB = 1024 * 1024
#: Bytes read from the socket (or a file) at a time.
READ_CHUNK = 256 * 1024
#: Bytes the JSON reader reads ahead at least when its window runs out.
WINDOW_MIN = 64 * 1024
#: Bytes of JSON text (UTF-8) of the largest value a sync's reader decodes.
#: A larger one is handed out as text, in parts, as it arrives: decoded, a
#: value costs up to 13 times its text in memory (a 100 MiB object of small
#: members took 1.3 GB), and no health record comes near (a sample is
#: under 2 KiB).
VALUE_TEXT_MAX = 4 * MIB
#: Bytes of text in each part of a value larger than VALUE_TEXT_MAX.
PART_BYTES = MIB
#: Characters of such a value's beginning kept to name it (a key's).
OVERSIZED_HEAD = 256


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
#: The json module's own scanner (C where available): one value at an offset.
_scan_value = json.scanner.make_scanner(_DECODER)


def _whole_number(digits):
    """An integer, or its digits as text when int() refuses that many
    (CPython's limit of 4,300 digits guards against slow conversions)."""
    try:
        return int(digits)
    except ValueError:
        return digits


#: The scanner for a value the first refused: integers of any length.
_scan_long = json.scanner.make_scanner(json.JSONDecoder(parse_constant=_reject_constant, parse_int=_whole_number))
#: Decodes the JSON string whose opening quote precedes the offset.
_scan_string = json.decoder.scanstring
_skip_ws = re.compile(r"[ \t\n\r]*").match
#: Characters a number cut at the window's end may lack after what scans
#: as a whole number: "e-" of "1e-5".
_NUMBER_TAIL = 2
#: The characters a JSON number starts with.
_NUMBER_START = frozenset("-0123456789")
#: Characters that open, close or quote in JSON, to skip a nested value.
_STRUCTURE = re.compile(r'["\[\]{}]')
#: Characters that open or close in JSON.
_BRACKET = re.compile(r"[\[\]{}]")
#: The characters of a number, true, false or null.
_SCALAR_TEXT = re.compile(r"[-+.0-9A-Za-z]*").match


def _closing_quote(text, at):
    """The position of the quote that closes the string whose characters
    start at ``at``; or, when ``text`` ends first, -1 - the position to
    read on from (a backslash at the end waits for the character it
    escapes; the pairs before it are whole, so a run of them is not read
    again).  Found with str.find, not a regular expression: one that
    repeats over escapes keeps state for each (60 bytes a byte of a string
    of escapes)."""
    start = at
    while True:
        quote = text.find('"', at)
        if quote < 0:
            end = len(text)
            while end > start and text[end - 1] == "\\":
                end -= 1
            return -1 - (len(text) - 1 if (len(text) - end) % 2 else len(text))
        back = quote
        while back > start and text[back - 1] == "\\":
            back -= 1
        if (quote - back) % 2 == 0:
            return quote
        at = quote + 1


def compact_json(text):
    """``text`` (one JSON value) without the white space between its
    tokens; strings, numbers and key order byte for byte."""
    if "\\" not in text:
        # Without escapes, every other piece between quotes is outside strings.
        pieces = text.split('"')
        pieces[::2] = ["".join(piece.split()) for piece in pieces[::2]]
        return '"'.join(pieces)
    pieces, at = [], 0
    while True:
        quote = text.find('"', at)
        if quote < 0:
            pieces.append("".join(text[at:].split()))
            return "".join(pieces)
        pieces.append("".join(text[at:quote].split()))
        end = _closing_quote(text, quote + 1)
        if end < 0:  # not a whole JSON value: the rest as it is
            pieces.append(text[quote:])
            return "".join(pieces)
        pieces.append(text[quote:end + 1])
        at = end + 1


def _follow_nesting(text, at, depth, in_string):
    """Follow JSON text from ``at``, counting brackets outside strings:
    (position, depth, in_string) just after the bracket or quote that
    brings the depth to 0, or where the text runs out (its end, or a
    backslash waiting for the character it escapes)."""
    size = len(text)
    while at < size:
        if in_string:
            at = _closing_quote(text, at)
            if at < 0:
                return -1 - at, depth, True
            at, in_string = at + 1, False
            if not depth:
                return at, 0, False
            continue
        quote = text.find('"', at)
        stretch = size if quote < 0 else quote
        if stretch - at > 64:
            # A long stretch without strings is counted at once when its
            # closing brackets cannot bring the depth to 0 (100 MiB of
            # brackets: a second instead of 25), else bracket by bracket.
            closing = text.count("]", at, stretch) + text.count("}", at, stretch)
            if closing < depth:
                depth += text.count("[", at, stretch) + text.count("{", at, stretch) - closing
            else:
                for match in _BRACKET.finditer(text, at, stretch):
                    depth += 1 if match.group() in "[{" else -1
                    if not depth:
                        return match.end(), 0, False
            at = stretch
            continue
        match = _STRUCTURE.search(text, at)
        if match is None:
            return size, depth, False
        char, at = match.group(), match.end()
        if char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        else:
            depth -= 1
            if not depth:
                return at, 0, False
    return at, depth, in_string


# -- JsonReader: the reader; values too deep or too large kept as text ------

class _TooDeep:
    """The value of an element nested too deeply for the json module."""

    def __repr__(self):
        return "TOO_DEEP"


#: Stands for a value too deeply nested to be read (its text is kept).
TOO_DEEP = _TooDeep()


class Oversized:
    """A value whose text is larger than its reader's ``value_max``: never
    decoded nor held whole.  parts() hands its text out as it arrives, in
    parts of the reader's ``part_bytes`` bytes of UTF-8 (a character cut by
    a part's end goes with the next part), and must be read to its end
    before anything after the value; then ``size`` is the text's length in
    bytes and ``end`` the position after it."""

    def __init__(self, reader, pos):
        self.pos = pos
        #: The text's first OVERSIZED_HEAD characters (a key's, to name what it holds).
        self.head = ""
        self.size = 0
        self.end = None
        #: What the text is, as an error names it.
        self.kind = {"[": "an array", "{": "an object", '"': "a string"}.get(reader.char(pos), "a number")
        self._parts = reader._spill(self)

    def parts(self):
        """The text's parts, each once: a second call goes on where the first stopped."""
        return self._parts

    def drain(self):
        """Read past what parts() has not handed out."""
        for _part in self._parts:
            pass


def _utf8_length(text):
    """The bytes of ``text`` in UTF-8."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


class JsonReader:
    """Reads one JSON document from ``pieces`` (any iterable of bytes:
    socket reads, decompressed data, a file) as they arrive, one value at a
    time, so that the document is never whole in memory.

    The reader holds a window of the document's text: ``text`` is the text
    from the character ``base`` on, from the value being read to the end of
    the last piece (decoded as UTF-8, which also checks it, as it arrives;
    a character cut by a piece's end waits for the next).  It reads the
    next piece when a value, key or gap runs past the window, and drops
    what lies before the value being read, so the window grows only as
    large as the largest value (and the last piece).  Positions are
    offsets in the whole document's text; an error names the byte
    (byte_offset) wherever it is.

    With ``value_max``, a value or key whose text is longer (in bytes) is
    handed out as an Oversized instead, its text in parts, so that the
    window stays within about ``value_max`` plus a piece whatever the
    document holds (a str: 1, 2 or 4 bytes of memory a character, after
    the widest it holds).

    Errors raise PayloadError naming the byte.
    """

    def __init__(self, pieces, read_ahead=WINDOW_MIN, value_max=None):
        self._pieces = iter(pieces)
        #: Bytes read ahead at least when the window runs out.
        self.read_ahead = read_ahead
        #: Bytes of text of the largest value decoded (None: no limit).
        self.value_max = value_max
        #: Bytes of text in each part of an Oversized value.
        self.part_bytes = PART_BYTES
        #: The window: the document's text[base:base + len(text)].
        self.text = ""
        self.base = 0
        #: The last piece has been read.
        self.eof = False
        #: Bytes read so far (the document's length once ``eof``).
        self.size = 0
        #: The position after the array that elements() last finished.
        self.end = 0
        #: The bytes of a character that the last piece cut, not yet decoded.
        self._pending = b""

    @classmethod
    def from_bytes(cls, document):
        """A reader of a document that is already in memory."""
        return cls((document,))

    # -- the window ----------------------------------------------------------

    def extend(self, keep):
        """Read the next piece into the window, dropping the text before
        ``keep``; False at the end of the document."""
        if self.eof:
            return False
        # Pieces are gathered until they at least double what is kept, so
        # that a value arriving in tiny pieces is not copied once per piece.
        keep = min(keep, self.base + len(self.text))
        kept = len(self.text) - (keep - self.base)
        if self.value_max is not None:
            kept = _utf8_length(self.text[keep - self.base:])  # in bytes, as value_max is
        wanted = max(kept, self.read_ahead)
        if self.value_max is not None:  # not far past value_max: a value is scanned at that length at most
            wanted = max(min(wanted, self.value_max + 1 - kept), self.read_ahead)
        gathered, size = [], 0
        for piece in self._pieces:
            gathered.append(piece)
            size += len(piece)
            if size >= wanted:
                break
        else:
            self.eof = True
        if not size:
            if self._pending:  # the body ends inside a character
                self._not_utf8(len(self._pending))
            return False
        self.size += size
        data = self._pending + b"".join(gathered) if self._pending else b"".join(gathered)
        try:
            decoded, used = codecs.utf_8_decode(data, "strict", self.eof)
        except UnicodeDecodeError as exc:
            self._not_utf8(len(data) - exc.start)
        self._pending = data[used:]
        self.text = self.text[keep - self.base:] + decoded
        self.base = keep
        return True

    def _not_utf8(self, back):
        """Raise for the byte ``back`` bytes before the end of what was read."""
        raise PayloadError(f"The body is not valid UTF-8 (byte {self.size - back}).")

    def byte_offset(self, pos):
        """The byte of the document where the character at ``pos`` (in the
        window, or just past it) starts."""
        text, at = self.text, max(0, pos - self.base)
        window_start = self.size - len(self._pending) - _utf8_length(text)
        return window_start + _utf8_length(text[:at]) + max(0, at - len(text))

    def char(self, pos):
        """The character at ``pos``, or "" at the end of the document."""
        while pos - self.base >= len(self.text):
            if not self.extend(pos):
                return ""
        return self.text[pos - self.base]

    def skip(self, pos):
        """The first position at or after ``pos`` that is not white space."""
        while True:
            at = pos - self.base
            end = pos if at > len(self.text) else _skip_ws(self.text, at).end() + self.base  # not read yet
            if end - self.base < len(self.text) or not self.extend(end):
                return end
            pos = end

    def start(self):
        """The position of the document's first value (after a byte order
        mark and white space)."""
        while not self.text and self.extend(0):
            pass
        return self.skip(1 if self.text.startswith("\ufeff") else 0)

    def _over_max(self, pos, end):
        """Whether the text from ``pos`` to ``end`` (in the window) is
        longer than ``value_max`` bytes."""
        if self.value_max is None or end - pos <= self.value_max // 4:  # 4 bytes a character at most
            return False
        return end - pos > self.value_max or _utf8_length(self.text[pos - self.base:end - self.base]) > self.value_max

    def _too_large(self, pos):
        """Whether the value at ``pos``, which runs past the window, is
        longer than ``value_max`` already."""
        return self._over_max(pos, self.base + len(self.text))

    def _read_more(self, exc, pos):
        """After the scanner's ``exc`` on the value at ``pos``: True when
        more of the document was read for it, False when it is longer than
        ``value_max``; raise the PayloadError of ``exc`` otherwise."""
        if self._may_continue(exc):
            if self._too_large(pos):
                return False
            if self.extend(pos):
                return True
        self._scan_error(exc, pos)

    # -- errors --------------------------------------------------------------

    def fail(self, message, pos):
        raise PayloadError(f"Invalid JSON at byte {self.byte_offset(pos)}: {message}.")

    def _scan_error(self, exc, pos):
        """Turn an exception of the scanner at ``pos`` into a PayloadError
        (the scanner's own positions are in the window)."""
        if isinstance(exc, StopIteration):
            self.fail("expected a value", exc.value + self.base)
        if isinstance(exc, json.JSONDecodeError):
            self.fail(exc.msg[0].lower() + exc.msg[1:], exc.pos + self.base)
        self.fail(str(exc).rstrip("."), pos)  # NaN/Infinity, oversized integers

    def _may_continue(self, exc):
        """Whether a scanner error may only mean that the window ended."""
        if isinstance(exc, StopIteration):
            at = exc.value
        elif isinstance(exc, json.JSONDecodeError):
            if exc.msg.startswith("Unterminated string"):
                return True
            at = exc.pos
        else:
            return False
        return at >= len(self.text) - 8  # "false" cut short is 8 characters from the end at most

    # -- values --------------------------------------------------------------

    def _scan(self, pos):
        """(value, end) of the value at ``pos`` read from the window, more
        of the document read as needed.  The value is TOO_DEEP when it is
        nested too deeply for the scanner (``end`` is then found by
        brackets), or an Oversized and ``end`` None when it is longer than
        ``value_max``."""
        while True:
            text, base = self.text, self.base
            try:
                try:
                    value, end = _scan_value(text, pos - base)
                except ValueError as exc:
                    if exc.__class__ is not ValueError:
                        raise
                    # Not a syntax error: perhaps an integer longer than
                    # int() takes; its digits are then kept as text.
                    value, end = _scan_long(text, pos - base)
            except RecursionError:
                end = self._skip_nested(pos)
                if end is None or self._over_max(pos, end):
                    return Oversized(self, pos), None
                return TOO_DEEP, end
            except (StopIteration, ValueError) as exc:
                if self._read_more(exc, pos):
                    continue
                return Oversized(self, pos), None
            if self._over_max(pos, end + base):
                return Oversized(self, pos), None
            # A number that ends near the window's end may go on: cut after
            # its "." or "e" (or "e-") it scans as a shorter one.
            if end + _NUMBER_TAIL < len(text) or text[pos - base] not in _NUMBER_START:
                return value, end + base
            if self._too_large(pos):
                return Oversized(self, pos), None
            if not self.extend(pos):
                return value, end + base

    def _skip_nested(self, pos):
        """The end of the array or object at ``pos``, found by counting
        brackets outside strings (for values too deep for the scanner);
        None when it is longer than ``value_max``."""
        at, depth, in_string = pos, 0, False
        while True:
            at, depth, in_string = _follow_nesting(self.text, at - self.base, depth, in_string)
            at += self.base
            if not depth and not in_string and at > pos:
                return at
            if self._too_large(pos):
                return None
            if not self.extend(pos):
                self.fail("unexpected end of the body", at)

    def value(self, pos):
        """The value at ``pos``: (value, its JSON text, its end); or
        (an Oversized, None, None) for a value longer than ``value_max``."""
        value, end = self._scan(pos)
        if end is None:
            return value, None, None
        return value, self.text[pos - self.base:end - self.base], end

    @staticmethod
    def decode(raw):
        """The value of a JSON text (a stored record, say)."""
        try:
            return _scan_value(raw, 0)[0]
        except ValueError:
            return _scan_long(raw, 0)[0]

    def _spill(self, value):
        """Yield the text of the value that ``value`` (an Oversized) stands
        for, in parts of ``part_bytes`` bytes of UTF-8, as the document
        arrives; set its ``size``, ``head`` and ``end``.

        Its end is found by counting brackets outside strings (a string or
        a number at its own closing quote or last character); the text is
        not otherwise checked as JSON.  The window keeps only what is not
        yet scanned; what is scanned is held as UTF-8 until it is handed
        out (less than a part, once the whole parts are).
        """
        start = at = value.pos
        part_bytes = self.part_bytes
        depth, in_string, end = 0, False, None
        scalar = self.char(start) not in '"[{'
        held, decoder = b"", codecs.getincrementaldecoder("utf-8")()
        while True:
            text, base = self.text, self.base
            if scalar:
                i = _SCALAR_TEXT(text, at - base).end()
                if i < len(text):
                    end = base + i
            else:
                i, depth, in_string = _follow_nesting(text, at - base, depth, in_string)
                if not depth and not in_string and base + i > start:
                    end = base + i
            held += text[at - base:i].encode("utf-8")
            at = base + i
            # Whole parts are handed out as soon as they are scanned, and
            # the rest when the end is found.
            while len(held) >= part_bytes or (end is not None and held):
                piece, held = held[:part_bytes], held[part_bytes:]
                part = decoder.decode(piece, end is not None and not held)
                value.size += len(piece)
                if len(value.head) < OVERSIZED_HEAD:
                    value.head += part[:OVERSIZED_HEAD - len(value.head)]
                if part:
                    yield part
            if end is not None:
                value.end = end
                return
            if not self.extend(at):
                if not scalar:
                    self.fail("unexpected end of the body", at)
                end = at  # a number that ends the document (not an object: refused after)

    def key(self, pos):
        """The key at ``pos``: (key, position of its value); or (an
        Oversized, None) for a key longer than ``value_max``: its value's
        position is then after_key(its end)."""
        if self.char(pos) != '"':
            self.fail("expected a quoted key", pos)
        while True:
            text, base = self.text, self.base
            try:
                key, end = _scan_string(text, pos - base + 1, True)
                break
            except json.JSONDecodeError as exc:
                if self._read_more(exc, pos):
                    continue
                return Oversized(self, pos), None
        if self._over_max(pos, end + base):
            return Oversized(self, pos), None
        return key, self.after_key(end + base)

    def after_key(self, end):
        """The position of the value of the key that ends at ``end``."""
        end = self.skip(end)
        if self.char(end) != ":":
            self.fail("expected ':' after a key", end)
        return self.skip(end + 1)

    # -- walking containers ---------------------------------------------------

    def walk_object(self, pos, on_member):
        """For each member of the object at ``pos``, delegate to the
        generator ``on_member(key, value position)``, which returns the
        value's end.  Return the end of the object."""
        pos = self.skip(pos + 1)
        if self.char(pos) == "}":
            return pos + 1
        while True:
            key, pos = self.key(pos)
            pos = yield from on_member(key, pos)
            pos = self.skip(pos)
            char = self.char(pos)
            if char == ",":
                pos = self.skip(pos + 1)
            elif char == "}":
                return pos + 1
            else:
                self.fail("expected ',' or '}' after an object member", pos)

    def walk_array(self, pos, on_element):
        """For each element of the array at ``pos``, delegate to the
        generator ``on_element(position)``, which returns the element's
        end.  Return the end of the array.  (elements() is the fast way
        for elements read whole; this one lets an element be walked.)"""
        pos = self.skip(pos + 1)
        if self.char(pos) == "]":
            return pos + 1
        while True:
            pos = yield from on_element(pos)
            pos = self.skip(pos)
            char = self.char(pos)
            if char == ",":
                pos = self.skip(pos + 1)
            elif char == "]":
                return pos + 1
            else:
                self.fail("expected ',' or ']' in an array", pos)

    def elements(self, pos):
        """Yield ``(value, JSON text)`` for each element of the array at
        ``pos``; then ``end`` is the position after the array.  An element
        longer than ``value_max`` is ``(an Oversized, None)``.

        This is the hot loop of a large document: the window is touched
        only when an element runs past it, and the next piece is read
        before an element that starts near the window's end rather than
        after the scanner fails there (the scanner's JSONDecodeError counts
        the window's lines, which costs as much as scanning it).
        """
        scan, margin = _scan_value, self.read_ahead
        # An element of up to a quarter of value_max characters is within
        # it whatever they are; a longer one is measured the careful way.
        long = sys.maxsize if self.value_max is None else self.value_max // 4
        pos = self.skip(pos + 1)
        if self.char(pos) == "]":
            self.end = pos + 1
            return
        text = None
        while True:
            if text is not self.text:  # the window moved: where to read on, and where a value may go on
                text, base = self.text, self.base
                refill, ragged = self._edges(margin)
            start = pos - base
            if start > refill:
                self.extend(pos)
                text = None
                continue
            try:
                value, end = scan(text, start)
                edge = end >= ragged or end - start > long
            except (StopIteration, ValueError, RecursionError):
                edge = True
            if edge:  # near the window's end, long, an error, or too deep: the careful way
                value, end = self._scan(pos)
                if end is None:
                    yield value, None
                    value.drain()
                    end = value.end
                else:
                    yield value, self.text[pos - self.base:end - self.base]
                text, base = self.text, self.base
                refill, ragged = self._edges(margin)
                end -= base
            else:
                yield value, text[start:end]
            if text.startswith(",{", end):  # the next element at once: the common case
                pos = base + end + 1
            elif text.startswith(",", end):
                pos = self.skip(base + end + 1)
            else:
                end = self.skip(base + end)
                char = self.char(end)
                if char == ",":
                    pos = self.skip(end + 1)
                elif char == "]":
                    self.end = end + 1
                    return
                else:
                    self.fail("expected ',' or ']' in an array", end)

    def _edges(self, margin):
        """For elements(): (the position in the window past which the next
        piece is read before an element, the one from which a value that
        ends there may go on past the window)."""
        if self.eof:
            return sys.maxsize, sys.maxsize
        return len(self.text) - margin, len(self.text) - _NUMBER_TAIL


# ---------------------------------------------------------------------------
# Ingest: the health grammar: rows, the sections registry, the payload
# ---------------------------------------------------------------------------

# -- Row functions: an element of Health Export Pro made a row --------------

#: Characters of the longest type name stored (HealthKit's are under 60).
TYPE_NAME_MAX = 200
#: Elements of one kind of scalar (numbers, strings...) in an array kept one
#: a rejected row; the rest are counted in one more.
SCALARS_KEPT = 10
#: Arrays of a clustered section (sample types, workouts' routes) one sync
#: may bring; the elements of any more are kept in rejected.  HealthKit has
#: under 300 types, and ten years of daily workouts are 3,650 routes; each
#: array costs the sync's temporary file about 400 bytes of memory and its
#: merge three statements (a million one-sample types took 785 MB).
ARRAYS_MAX = 50000
#: Rows collected before one executemany: bounds memory (bench: 1,000 rows
#: cost 1 MB where 5,000 cost 4 MB, at the same speed).
BATCH_ROWS = 1000
#: Rows staged by one INSERT: a statement's run costs about as much as
#: binding its values (bench: the 524,000 points of a 50 MB sync staged in
#: 0.95 s, from 1.25 s a row a statement; 10 a statement took 0.99 s).
STAGED_PER_INSERT = 50
#: Parameters one statement may bind (SQLite before 3.32 allows 999).
SQL_PARAMETERS_MAX = 999
#: Largest integer SQLite stores as INTEGER.
SQLITE_INT_MAX = 2 ** 63 - 1
_SQLITE_INT_MIN = -SQLITE_INT_MAX - 1
#: Envelope fields longer than this (in bytes of JSON) are kept in the
#: rejected table instead of the syncs row's envelope.
ENVELOPE_TEXT_MAX = 64 * 1024
#: Envelope fields longer than this (in bytes of JSON) are kept as text only.
ENVELOPE_VALUE_MAX = 4096


_NONE_TYPE = type(None)

#: Prefixes HealthKit puts before a type's short name.
TYPE_PREFIXES = ("HKQuantityTypeIdentifier", "HKCategoryTypeIdentifier", "HKCorrelationTypeIdentifier",
                 "HKDataTypeIdentifier", "HKWorkoutTypeIdentifier")


def short_type_name(type_name):
    """HKQuantityTypeIdentifierHeartRate -> HeartRate."""
    for prefix in TYPE_PREFIXES:
        if type_name.startswith(prefix) and len(type_name) > len(prefix):
            return type_name[len(prefix):]
    return type_name


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
    if value is TOO_DEEP:
        return "nested too deeply to be read"
    if value.__class__ is Oversized:
        return value.kind
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
# Date columns hold the text as sent, or None; Payload makes them
# canonical UTC (or rejects the row) a whole batch at a time.

def _sample_row(obj, raw, section):
    # The hot path of a sync: one call per sample, so nothing is called that
    # the common element (uuid, ASCII dates, a number) does not need.
    get = obj.get
    uuid = get("uuid")
    if uuid.__class__ is not str or not uuid:
        if uuid is not None:
            return _bad_uuid(obj)
        if "name" in obj and "units" in obj and "uuid" not in obj:
            # The other app's point as this receiver stores it (its
            # metric's name and units first): what an NDJSON export holds.
            points = MetricPoints.of(obj)
            if points.__class__ is not str:
                points.head = "{"
                return points.shape(obj, raw, points)
        uuid = content_key(section, obj)
    start = get("startDate")
    if start is None:
        start = get("date")
    if start.__class__ is not str or not start:
        return "startDate missing or not a string"
    end = get("endDate")
    if end.__class__ is not str or not end:
        end = None  # the record keeps whatever was sent
    value = get("value")
    kind = value.__class__
    if kind is not float and kind is not str and (kind is not int or not _SQLITE_INT_MIN <= value <= SQLITE_INT_MAX):
        value = _to_sql(value)
    unit = get("unit")
    if unit.__class__ is not str:
        unit = _to_sql(unit)
    source = get("sourceName")
    if source.__class__ is not str:
        source = _to_sql(source)
    return (uuid, section, start, end, value, unit, source, raw, None, None)


#: HealthKit's workout activity types (HKWorkoutActivityType) by number:
#: a workout's type is stored by this name whether it arrives as the
#: number (37), the name ("running") or the identifier
#: ("HKWorkoutActivityTypeRunning").
WORKOUT_ACTIVITY_TYPES = dict(enumerate((
    "americanFootball", "archery", "australianFootball", "badminton", "baseball", "basketball", "bowling",
    "boxing", "climbing", "cricket", "crossTraining", "curling", "cycling", "dance", "danceInspiredTraining",
    "elliptical", "equestrianSports", "fencing", "fishing", "functionalStrengthTraining", "golf", "gymnastics",
    "handball", "hiking", "hockey", "hunting", "lacrosse", "martialArts", "mindAndBody",
    "mixedMetabolicCardioTraining", "paddleSports", "play", "preparationAndRecovery", "racquetball", "rowing",
    "rugby", "running", "sailing", "skatingSports", "snowSports", "soccer", "softball", "squash", "stairClimbing",
    "surfingSports", "swimming", "tableTennis", "tennis", "trackAndField", "traditionalStrengthTraining",
    "volleyball", "walking", "waterFitness", "waterPolo", "waterSports", "wrestling", "yoga", "barre",
    "coreTraining", "crossCountrySkiing", "downhillSkiing", "flexibility", "highIntensityIntervalTraining",
    "jumpRope", "kickboxing", "pilates", "snowboarding", "stairs", "stepTraining", "wheelchairWalkPace",
    "wheelchairRunPace", "taiChi", "mixedCardio", "handCycling", "discSports", "fitnessGaming", "cardioDance",
    "socialDance", "pickleball", "cooldown"), start=1))
WORKOUT_ACTIVITY_TYPES.update({82: "swimBikeRun", 83: "transition", 84: "underwaterDiving", 3000: "other"})
#: A dose's log status (HKMedicationDoseEvent.LogStatus) by number; stored
#: by name, whether it arrives as the number, the name or the identifier.
DOSE_LOG_STATUSES = {1: "notInteracted", 2: "notificationNotSent", 3: "snoozed", 4: "taken", 5: "skipped",
                     6: "notLogged"}
#: Seconds in the units a duration may come in.
_DURATION_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0, "min": 60.0, "minute": 60.0,
                   "minutes": 60.0, "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0}


def _enum_name(value, names, prefix):
    """A HealthKit enum's case name from its number, its name in any case,
    or its identifier (``prefix`` + name); anything else as it is."""
    if value.__class__ is float and float.is_integer(value):
        value = int(value)
    if value.__class__ is int:
        return names.get(value) or _to_sql(value)
    if value.__class__ is str:
        text = value[len(prefix):] if value.startswith(prefix) and len(value) > len(prefix) else value
        folded = text.replace(" ", "").replace("_", "").lower()
        return next((name for name in names.values() if name.lower() == folded), text)
    return _to_sql(value)


def _nested(obj, names, inner):
    """The first of ``names`` present in ``obj``, or of ``inner`` in it
    when it is an object (a concept {"identifier": ...}); an object
    without them gives way to the next name."""
    for name in names:
        value = obj.get(name)
        if value.__class__ is dict:
            value = _first(value, inner)
        if value is not None:
            return value
    return None


def _seconds(obj):
    """A duration in seconds: ``durationSeconds``, or ``duration`` as a
    number of seconds or {value|quantity, unit}."""
    value = _first(obj, ("durationSeconds", "duration"))
    if value.__class__ is dict:
        unit = value.get("unit", "s")
        factor = _DURATION_UNITS.get(unit) if unit.__class__ is str else None
        value = value.get("value", value.get("quantity"))
        if factor is None or value.__class__ not in (int, float):
            return None
        try:
            value = value * factor
        except OverflowError:  # an integer too large for a float
            return None
    return _to_sql(value)


def _workout_row(obj, raw, section):
    uuid = _identity(section, obj)
    if uuid is None:
        return _bad_uuid(obj)
    start, why = _required_text(obj, ("startDate", "date"))
    if why:
        return why
    activity = _nested(obj, ("workoutActivityType", "activityType", "activity", "type"), ("name", "rawValue"))
    return (uuid, _enum_name(activity, WORKOUT_ACTIVITY_TYPES, "HKWorkoutActivityType"), start,
            _text_or_none(obj.get("endDate")), _seconds(obj), raw)


def _dose_row(obj, raw, section):
    if _is_hae(obj, ("start", "scheduledDate", "status"), ("startDate", "uuid", "logStatus")):
        # The other app's medication as a dose (an exported dose read again).
        return next((row for target, row in _hae_medication_rows(obj, raw, section) if target.name == "doses"),
                    "start missing or not a date")
    uuid = _identity(section, obj)
    if uuid is None:
        return _bad_uuid(obj)
    start, why = _required_text(obj, ("startDate", "date", "scheduledDate"))
    if why:
        return why
    medication = _nested(obj, ("medicationConceptIdentifier", "conceptIdentifier", "medication", "concept"),
                         ("identifier", "conceptIdentifier", "id"))
    status = _enum_name(obj.get("logStatus", obj.get("status")), DOSE_LOG_STATUSES, "HKMedicationDoseEventLogStatus")
    return (uuid, _to_sql(medication), start, status, raw)


def _medication_row(obj, raw, section):
    key = _nested(obj, ("conceptIdentifier", "concept", "medication"), ("identifier", "conceptIdentifier", "id"))
    if key is None:
        key = _first(obj, ("uuid", "id", "identifier"))
    if key is None:
        key = content_key(section, obj)
    elif key.__class__ is int:
        key = str(key)
    elif key.__class__ is not str or not key:
        return f"identifier is {_json_kind(key)}, not a string"
    name = _first(obj, ("displayText", "nickname", "name"))
    if name is None:
        name = _nested(obj, ("concept", "medication"), ("displayText", "name"))
    return (key, _to_sql(name), raw)


def _route_point_row(obj, raw, workout):
    stamp, why = _required_text(obj, ("timestamp", "date", "time", "startDate"))
    if why:
        return why
    return (workout, stamp, _to_sql(_first(obj, ("latitude", "lat"))),
            _to_sql(_first(obj, ("longitude", "lon", "lng", "long"))), _to_sql(_first(obj, ("altitude", "elevation"))),
            raw)


def _characteristic_row(name, value):
    return (name, _to_sql(value))


# -- The other app: Health Auto Export's REST format --------------------------
#
# The same endpoint reads both apps; what is whose is told by shape, per
# section and, where both use a name (workouts, medications), per element.
# That app's metrics are {name, units, data: [points]}: each point becomes
# an ordinary sample of the metric's HealthKit type (HAE_METRICS), so pages,
# totals and exports treat both apps alike.  Its points carry no uuid: the
# identity of a point is (type, date, source, shape), the uuid a digest of
# source and shape (hae_uuid); a point sent again with another value (a
# summarised minute that grew) replaces the stored one (see Store._merge_rows).

#: Prefix of the uuids made for that app's elements: its points are the
#: samples whose re-sent value replaces the stored one.
HAE_PREFIX = "hae:"
#: Prefix of the uuids of a night's totals of aggregated sleep: stage rows
#: that all start at the night's start, each counted whole (see
#: merge_sleep_hours), so that a night sent again with grown totals keeps
#: its keys and replaces its rows.
HAE_NIGHT_PREFIX = "hae-night:"
_HAE_UUIDS = {}


def hae_uuid(*parts, prefix=HAE_PREFIX):
    """A uuid made from ``parts`` (text or numbers): the same parts, the same uuid."""
    found = _HAE_UUIDS.get((prefix,) + parts)
    if found is None:
        text = "\x00".join("" if part is None else str(part) for part in parts)
        found = prefix + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        if len(_HAE_UUIDS) >= _HAE_HOURS_MAX:
            _HAE_UUIDS.clear()
        _HAE_UUIDS[(prefix,) + parts] = found
    return found


#: Units a metric may come in, by what they measure: (dimension, size in
#: the dimension's base unit).  A value is converted to its metric's unit
#: (HAE_METRICS) when both are known and of one dimension; the record keeps
#: the value and unit as sent.
UNIT_SIZES = {
    "kcal": ("energy", 1.0), "Cal": ("energy", 1.0), "cal": ("energy", 0.001), "kJ": ("energy", 1 / 4.184),
    "J": ("energy", 1 / 4184.0),
    "m": ("length", 1.0), "km": ("length", 1000.0), "mi": ("length", 1609.344), "ft": ("length", 0.3048),
    "yd": ("length", 0.9144), "in": ("length", 0.0254), "cm": ("length", 0.01), "mm": ("length", 0.001),
    "kg": ("mass", 1.0), "g": ("mass", 0.001), "mg": ("mass", 1e-6), "mcg": ("mass", 1e-9), "\u00b5g": ("mass", 1e-9),
    "ug": ("mass", 1e-9), "lb": ("mass", 0.45359237), "lbs": ("mass", 0.45359237), "oz": ("mass", 0.028349523125),
    "st": ("mass", 6.35029318),
    "L": ("volume", 1.0), "mL": ("volume", 0.001), "dL": ("volume", 0.1), "fl_oz_us": ("volume", 0.0295735295625),
    "fl_oz_imp": ("volume", 0.0284130625), "cup_us": ("volume", 0.2365882365),
    "m/s": ("speed", 1.0), "km/hr": ("speed", 1 / 3.6), "km/h": ("speed", 1 / 3.6), "mi/hr": ("speed", 0.44704),
    "mph": ("speed", 0.44704),
    "s": ("time", 1.0), "min": ("time", 60.0), "hr": ("time", 3600.0), "h": ("time", 3600.0), "ms": ("time", 0.001),
    "mg/dL": ("glucose", 1.0), "mmol/L": ("glucose", 18.0156),  # glucose: 180.156 g/mol
    "degC": ("temperature", None), "degF": ("temperature", None),
}


def convert_unit(value, unit, wanted):
    """``value`` in ``unit`` as (value, unit) in ``wanted``; as it is when
    either unit is unknown, they measure different things, or the value is
    not a number."""
    if wanted is None or unit == wanted or value.__class__ not in (int, float) or value.__class__ is bool:
        return value, unit
    have, want = UNIT_SIZES.get(unit), UNIT_SIZES.get(wanted)
    if have is None or want is None or have[0] != want[0]:
        return value, unit
    if have[0] == "temperature":
        return ((value - 32) / 1.8 if unit == "degF" else value * 1.8 + 32), wanted
    return value * have[1] / want[1], wanted


class HaeMetric(typing.NamedTuple):
    """What one of Health Auto Export's metric names is here."""

    #: The HealthKit type its points are samples of.
    type: str
    #: The unit stored (values converted to it, see UNIT_SIZES); None: as sent.
    unit: typing.Optional[str] = None
    #: How a point is read: a key of POINT_SHAPES.
    shape: str = "qty"


def _metrics(prefix, entries):
    return {name: HaeMetric(prefix + kind, unit, shape) for names, kind, unit, shape in entries
            for name in names.split()}


_Q, _C = "HKQuantityTypeIdentifier", "HKCategoryTypeIdentifier"
#: Health Auto Export's metric names (snake_case; several where app versions
#: differ) -> HaeMetric.  A name not listed keeps its points as samples of a
#: type of that name, in the unit sent.
HAE_METRICS = {
    **_metrics(_Q, (
        ("active_energy", "ActiveEnergyBurned", "kcal", "qty"),
        ("basal_energy_burned resting_energy", "BasalEnergyBurned", "kcal", "qty"),
        ("apple_exercise_time", "AppleExerciseTime", "min", "qty"),
        ("apple_move_time", "AppleMoveTime", "min", "qty"),
        ("apple_stand_time", "AppleStandTime", "min", "qty"),
        ("step_count", "StepCount", "count", "qty"),
        ("walking_running_distance", "DistanceWalkingRunning", "km", "qty"),
        ("cycling_distance", "DistanceCycling", "km", "qty"),
        ("swimming_distance", "DistanceSwimming", "m", "qty"),
        ("wheelchair_distance", "DistanceWheelchair", "km", "qty"),
        ("downhill_snow_sports downhill_snow_sports_distance", "DistanceDownhillSnowSports", "km", "qty"),
        ("cross_country_skiing_distance", "DistanceCrossCountrySkiing", "km", "qty"),
        ("paddle_sports_distance", "DistancePaddleSports", "km", "qty"),
        ("rowing_distance", "DistanceRowing", "km", "qty"),
        ("skating_sports_distance", "DistanceSkatingSports", "km", "qty"),
        ("flights_climbed", "FlightsClimbed", "count", "qty"),
        ("wheelchair_push_count push_count", "PushCount", "count", "qty"),
        ("swim_stroke_count swimming_stroke_count", "SwimmingStrokeCount", "count", "qty"),
        ("vo2_max", "VO2Max", None, "qty"),
        ("physical_effort", "PhysicalEffort", None, "qty"),
        ("cycling_cadence", "CyclingCadence", None, "qty"),
        ("cycling_functional_threshold_power", "CyclingFunctionalThresholdPower", "W", "qty"),
        ("cycling_power", "CyclingPower", "W", "qty"),
        ("cycling_speed", "CyclingSpeed", "km/hr", "qty"),
        ("running_power", "RunningPower", "W", "qty"),
        ("running_speed", "RunningSpeed", "km/hr", "qty"),
        ("running_ground_contact_time", "RunningGroundContactTime", "ms", "qty"),
        ("running_stride_length", "RunningStrideLength", "m", "qty"),
        ("running_vertical_oscillation", "RunningVerticalOscillation", "cm", "qty"),
        ("height", "Height", "cm", "qty"),
        ("weight_body_mass body_mass weight", "BodyMass", "kg", "qty"),
        ("waist_circumference", "WaistCircumference", "cm", "qty"),
        ("body_fat_percentage", "BodyFatPercentage", "%", "percent"),
        ("body_mass_index", "BodyMassIndex", "count", "qty"),
        ("lean_body_mass", "LeanBodyMass", "kg", "qty"),
        ("heart_rate", "HeartRate", "count/min", "range"),
        ("resting_heart_rate", "RestingHeartRate", "count/min", "qty"),
        ("heart_rate_variability", "HeartRateVariabilitySDNN", "ms", "qty"),
        ("cardio_recovery heart_rate_recovery", "HeartRateRecoveryOneMinute", "count/min", "qty"),
        ("walking_heart_rate_average walking_heart_rate", "WalkingHeartRateAverage", "count/min", "qty"),
        ("atrial_fibrillation_burden", "AtrialFibrillationBurden", "%", "percent"),
        ("walking_speed", "WalkingSpeed", "km/hr", "qty"),
        ("walking_step_length", "WalkingStepLength", "cm", "qty"),
        ("walking_asymmetry_percentage", "WalkingAsymmetryPercentage", "%", "percent"),
        ("walking_double_support_percentage", "WalkingDoubleSupportPercentage", "%", "percent"),
        ("apple_walking_steadiness walking_steadiness", "AppleWalkingSteadiness", "%", "percent"),
        ("six_minute_walking_test_distance", "SixMinuteWalkTestDistance", "m", "qty"),
        ("stair_speed_up", "StairAscentSpeed", "m/s", "qty"),
        ("stair_speed_down", "StairDescentSpeed", "m/s", "qty"),
        ("respiratory_rate", "RespiratoryRate", "count/min", "qty"),
        ("forced_expiratory_volume", "ForcedExpiratoryVolume1", "L", "qty"),
        ("forced_vital_capacity", "ForcedVitalCapacity", "L", "qty"),
        ("peak_expiratory_flow_rate", "PeakExpiratoryFlowRate", None, "qty"),
        ("blood_oxygen_saturation oxygen_saturation", "OxygenSaturation", "%", "percent"),
        ("peripheral_perfusion_index", "PeripheralPerfusionIndex", "%", "percent"),
        ("inhaler_usage", "InhalerUsage", "count", "qty"),
        ("body_temperature", "BodyTemperature", "degC", "qty"),
        ("basal_body_temperature", "BasalBodyTemperature", "degC", "qty"),
        ("apple_sleeping_wrist_temperature", "AppleSleepingWristTemperature", "degC", "qty"),
        ("under_water_depth underwater_depth", "UnderwaterDepth", "m", "qty"),
        ("under_water_temperature water_temperature", "WaterTemperature", "degC", "qty"),
        ("uv_exposure", "UVExposure", "count", "qty"),
        ("time_in_daylight", "TimeInDaylight", "min", "qty"),
        ("environmental_audio environmental_audio_exposure", "EnvironmentalAudioExposure", None, "qty"),
        ("headphone_audio headphone_audio_exposure", "HeadphoneAudioExposure", None, "qty"),
        ("environmental_sound_reduction", "EnvironmentalSoundReduction", None, "qty"),
        ("electrodermal_activity", "ElectrodermalActivity", None, "qty"),
        ("breathing_disturbances", "AppleSleepingBreathingDisturbances", "count", "qty"),
        ("insulin_delivery", "InsulinDelivery", "IU", "qty"),
        ("blood_glucose", "BloodGlucose", "mg/dL", "qty"),
        ("blood_alcohol_content", "BloodAlcoholContent", "%", "percent"),
        ("number_of_times_fallen number_of_time_fallen", "NumberOfTimesFallen", "count", "qty"),
        ("number_of_alcoholic_beverages", "NumberOfAlcoholicBeverages", "count", "qty"),
        ("blood_pressure", "BloodPressure", "mmHg", "pressure"),
        ("dietary_energy", "DietaryEnergyConsumed", "kcal", "qty"),
        ("dietary_water water", "DietaryWater", "mL", "qty"),
        ("dietary_sugar sugar", "DietarySugar", "g", "qty"),
        ("cholesterol dietary_cholesterol", "DietaryCholesterol", "mg", "qty"),
        ("carbohydrates", "DietaryCarbohydrates", "g", "qty"),
        ("fiber", "DietaryFiber", "g", "qty"),
        ("protein", "DietaryProtein", "g", "qty"),
        ("total_fat", "DietaryFatTotal", "g", "qty"),
        ("saturated_fat", "DietaryFatSaturated", "g", "qty"),
        ("monounsaturated_fat monosaturated_fat", "DietaryFatMonounsaturated", "g", "qty"),
        ("polyunsaturated_fat", "DietaryFatPolyunsaturated", "g", "qty"),
        ("caffeine", "DietaryCaffeine", "mg", "qty"),
        ("calcium", "DietaryCalcium", "mg", "qty"),
        ("chloride", "DietaryChloride", "mg", "qty"),
        ("copper", "DietaryCopper", "mg", "qty"),
        ("iron", "DietaryIron", "mg", "qty"),
        ("magnesium", "DietaryMagnesium", "mg", "qty"),
        ("manganese", "DietaryManganese", "mg", "qty"),
        ("niacin", "DietaryNiacin", "mg", "qty"),
        ("pantothenic_acid", "DietaryPantothenicAcid", "mg", "qty"),
        ("phosphorus", "DietaryPhosphorus", "mg", "qty"),
        ("potassium", "DietaryPotassium", "mg", "qty"),
        ("riboflavin", "DietaryRiboflavin", "mg", "qty"),
        ("sodium", "DietarySodium", "mg", "qty"),
        ("thiamin", "DietaryThiamin", "mg", "qty"),
        ("vitamin_b6", "DietaryVitaminB6", "mg", "qty"),
        ("vitamin_c", "DietaryVitaminC", "mg", "qty"),
        ("vitamin_e", "DietaryVitaminE", "mg", "qty"),
        ("zinc", "DietaryZinc", "mg", "qty"),
        ("biotin", "DietaryBiotin", "\u00b5g", "qty"),
        ("chromium", "DietaryChromium", "\u00b5g", "qty"),
        ("folate", "DietaryFolate", "\u00b5g", "qty"),
        ("iodine", "DietaryIodine", "\u00b5g", "qty"),
        ("molybdenum", "DietaryMolybdenum", "\u00b5g", "qty"),
        ("selenium", "DietarySelenium", "\u00b5g", "qty"),
        ("vitamin_a", "DietaryVitaminA", "\u00b5g", "qty"),
        ("vitamin_b12", "DietaryVitaminB12", "\u00b5g", "qty"),
        ("vitamin_d", "DietaryVitaminD", "\u00b5g", "qty"),
        ("vitamin_k", "DietaryVitaminK", "\u00b5g", "qty"),
    )),
    **_metrics(_C, (
        ("sleep_analysis", "SleepAnalysis", None, "sleep"),
        ("mindful_minutes", "MindfulSession", None, "session"),
        ("apple_stand_hour", "AppleStandHour", None, "stand"),
        ("handwashing", "HandwashingEvent", None, "event"),
        ("toothbrushing", "ToothbrushingEvent", None, "event"),
        ("sexual_activity", "SexualActivity", None, "labels"),
    )),
}


class MetricPoints:
    """What the points of one metric need: its type, units, shape and the
    record's head (the metric's own members, before each point's)."""

    __slots__ = ("name", "units", "metric", "type", "unit", "shape", "head", "factor")

    def __init__(self, name, units, members=None):
        self.name, self.units = name, units
        self.metric = HAE_METRICS.get(name) if name.__class__ is str else None
        self.type = self.metric.type if self.metric else name
        self.unit = self.metric.unit if self.metric else None
        #: What a value is multiplied by to be in ``unit`` (1.0: as sent, and
        #: stored in ``unit`` or, without one, in ``units``; None: another
        #: conversion, or none, see value()).
        self.factor = None
        if self.unit is None or units == self.unit:
            self.factor = 1.0
        elif UNIT_SIZES.get(units, (None, None))[1] and convert_unit(1.0, units, self.unit)[1] == self.unit:
            self.factor = convert_unit(1.0, units, self.unit)[0]
        self.shape = POINT_SHAPES[self.metric.shape if self.metric else "any"]
        members = members or [("name", json.dumps(name, ensure_ascii=False)),
                              ("units", json.dumps(units, ensure_ascii=False))]
        self.head = "{" + "".join(json.dumps(key, ensure_ascii=False) + ":" + raw + "," for key, raw in members)

    @classmethod
    def of(cls, members, texts=()):
        """For a metric's members read so far; a reason when it cannot be read."""
        name = members.get("name")
        if name.__class__ is not str or not name:
            return f"metric's name is {_json_kind(name)}, not a non-empty string"
        if len(name) > TYPE_NAME_MAX:
            return f"metric name of {len(name):,} characters, more than {TYPE_NAME_MAX}"
        units = members.get("units")
        return cls(name, units if units.__class__ is str else None, texts)

    def record(self, raw):
        """A point's record: the metric's members, then the point's."""
        return self.head + raw[1:] if len(raw) > 2 else self.head[:-1] + "}"

    def value(self, value):
        """A value sent in the metric's units, in the unit stored: (value, unit)."""
        if self.factor == 1.0:
            return value, self.unit or self.units
        return convert_unit(value, self.units, self.unit)


def _numeric(value):
    return value if value.__class__ in (int, float) else None


#: The minutes and seconds of a date (":MM:SS", ASCII digits), what one of
#: Health Auto Export's usual form holds between its hour and its offset:
#: the end of the canonical date they make.
_CLOCK_TAILS = {f":{minute:02d}:{second:02d}": f":{minute:02d}:{second:02d}.000Z"
                for minute in range(60) for second in range(60)}


def _usual_start(sent):
    """The canonical start of a point's date ``sent`` when it is a string of
    the app's usual form of an hour already seen, else None (then
    _point_start reads it).  The keys of _HAE_HOURS are the hour and
    offset of dates that matched _is_hae_date: the minutes and seconds
    are the rest of it."""
    if sent.__class__ is str and len(sent) == 25:
        tail = _CLOCK_TAILS.get(sent[13:19])
        if tail is not None:
            hour = _HAE_HOURS.get(sent[:13] + sent[19:])
            if hour is not None:
                return hour + tail
    return None


def _point_start(obj):
    """(canonical start, canonical end or None) of a point, or a reason."""
    sent = obj.get("date")
    if sent is None:
        sent = obj.get("startDate")
    start = _usual_start(sent)  # hae_date's common case, without a call more
    if start is None:
        start = hae_date(sent)
        if start is None:
            return f"date is {_json_kind(sent) if sent.__class__ is not str else repr(log_safe(sent, 40))}, not a date"
    end = obj.get("endDate")
    return start, (hae_date(end) if end is not None else None)


def _point_row(points, obj, raw, start, end, value, unit, tag, low=None, high=None, type_name=None):
    source = obj.get("source")
    if source.__class__ is not str:
        source = _to_sql(source)
    uuid = _HAE_UUIDS.get((HAE_PREFIX, source, tag))
    if uuid is None:
        uuid = hae_uuid(source, tag)
    if value.__class__ is not int and value.__class__ is not float:
        value = _to_sql(value)
    return (uuid, type_name or points.type, start, end or start, value, unit, source,
            points.head + raw[1:] if len(raw) > 2 else points.head[:-1] + "}", low, high)


def _qty_point(obj, raw, points):
    """A point {date, qty, source}: the sample's value is qty, in the stored unit."""
    # The hot path of that app's syncs (a point a minute of each metric),
    # in one call: a usual date (_usual_start), no end, a number, a source
    # whose uuid is made.  Any other point takes _point_start and
    # _point_row, to the same row.
    get = obj.get
    value, source, factor = get("qty"), get("source"), points.factor
    if (source.__class__ is str and factor is not None and (value.__class__ is float or value.__class__ is int)
            and get("endDate") is None):
        start = _usual_start(get("date"))
        uuid = _HAE_UUIDS.get((HAE_PREFIX, source, "qty"))
        if start is not None and uuid is not None:
            record = points.head + raw[1:]  # never "{}": it holds a date
            if factor == 1.0:
                return uuid, points.type, start, start, value, points.unit or points.units, source, record, None, None
            return uuid, points.type, start, start, value * factor, points.unit, source, record, None, None
    start = _point_start(obj)
    if start.__class__ is str:
        return start
    value = obj.get("qty")
    factor = points.factor
    if factor == 1.0:
        return _point_row(points, obj, raw, start[0], start[1], value, points.unit or points.units, "qty")
    if factor is not None and (value.__class__ is float or value.__class__ is int):
        return _point_row(points, obj, raw, start[0], start[1], value * factor, points.unit, "qty")
    value, unit = points.value(value)
    return _point_row(points, obj, raw, start[0], start[1], value, unit, "qty")


def _percent_point(obj, raw, points):
    """A ratio sent in percent (97): stored as HealthKit's fraction (0.97)."""
    start = _point_start(obj)
    if start.__class__ is str:
        return start
    value = obj.get("qty")
    if points.units == "%" and value.__class__ in (int, float) and value.__class__ is not bool:
        value = value / 100
    return _point_row(points, obj, raw, start[0], start[1], value, "%", "qty")


def _range_point(obj, raw, points):
    """Heart rate: qty, or a summarised Min, Avg, Max (the mean is the
    value, the least and greatest go to low and high)."""
    # The summarised minute in the stored unit, as _qty_point's hot path.
    get = obj.get
    if "qty" not in obj and points.factor == 1.0:
        value, source = get("Avg"), get("source")
        if (value.__class__ is float or value.__class__ is int) and source.__class__ is str and get("endDate") is None:
            start = _usual_start(get("date"))
            uuid = _HAE_UUIDS.get((HAE_PREFIX, source, "range"))
            if start is not None and uuid is not None:
                low, high = get("Min"), get("Max")
                return (uuid, points.type, start, start, value, points.unit or points.units, source,
                        points.head + raw[1:], low if low.__class__ in (int, float) else None,
                        high if high.__class__ in (int, float) else None)
    start = _point_start(obj)
    if start.__class__ is str:
        return start
    if "qty" in obj or "Avg" not in obj:
        value, unit = points.value(obj.get("qty"))
        return _point_row(points, obj, raw, start[0], start[1], value, unit, "qty")
    value, unit = points.value(obj.get("Avg"))
    low, high = (_numeric(points.value(obj.get(name))[0]) for name in ("Min", "Max"))
    return _point_row(points, obj, raw, start[0], start[1], value, unit, "range", low, high)


#: Blood pressure's members and the HealthKit types of each.
PRESSURE_TYPES = (("systolic", _Q + "BloodPressureSystolic"), ("diastolic", _Q + "BloodPressureDiastolic"))


def _pressure_point(obj, raw, points):
    """Blood pressure: a sample of each of systolic and diastolic."""
    start = _point_start(obj)
    if start.__class__ is str:
        return start
    rows = [(SAMPLES, _point_row(points, obj, raw, start[0], start[1], points.value(obj[field])[0], "mmHg", "qty",
                                 type_name=type_name)) for field, type_name in PRESSURE_TYPES if field in obj]
    return rows or "neither systolic nor diastolic"


def _session_point(obj, raw, points):
    """Mindful minutes: a session lasting qty (minutes)."""
    start = _point_start(obj)
    if start.__class__ is str:
        return start
    minutes = _numeric(convert_unit(obj.get("qty"), points.units or "min", "min")[0])
    end = start[1] or (_shifted(start[0], minutes * 60) if minutes and minutes > 0 else start[0])
    return _point_row(points, obj, raw, start[0], end, 0, None, "qty")


def _stand_point(obj, raw, points):
    """Stand hours: qty hours stood (a summarised day: several), a sample
    of HealthKit's value 0 (stood) each; 0 is one idle hour (value 1)."""
    start = _point_start(obj)
    if start.__class__ is str:
        return start
    qty = _numeric(obj.get("qty"))
    if qty is None:
        return _point_row(points, obj, raw, start[0], start[1], _to_sql(obj.get("qty")), None, "qty")
    stood = min(int(qty), 24)
    if stood < 1:
        return _point_row(points, obj, raw, start[0], start[1], 1, None, "stand")
    return [(SAMPLES, _point_row(points, obj, raw, start[0], start[1], 0, None, f"stand:{number}"))
            for number in range(stood)]


def _event_point(obj, raw, points):
    """Handwashing, toothbrushing: an event, its value the text sent."""
    start = _point_start(obj)
    if start.__class__ is str:
        return start
    value = obj.get("value")
    return _point_row(points, obj, raw, start[0], start[1], obj.get("qty") if value is None else value, None, "qty")


#: Members of a point that are not one of its labels' counts.
_POINT_FIELDS = frozenset(("date", "startDate", "endDate", "source", "qty", "units", "metadata"))


def _labels_point(obj, raw, points):
    """Sexual activity: counts by label; a sample per count, valued by its label."""
    start = _point_start(obj)
    if start.__class__ is str:
        return start
    rows = []
    for label, count in obj.items():
        count = _numeric(count)
        if label not in _POINT_FIELDS and count and count > 0:
            rows += [(SAMPLES, _point_row(points, obj, raw, start[0], start[1], label, None, f"{label}:{number}"))
                     for number in range(min(int(count), 100))]
    if rows:
        return rows
    return _point_row(points, obj, raw, start[0], start[1], _to_sql(obj.get("qty")), None, "qty")


#: Aggregated sleep's members (hours) -> the stage stored; "asleep" is the
#: time asleep without a stage.
SLEEP_TOTALS = (("core", "Core"), ("deep", "Deep"), ("rem", "REM"), ("asleep", "Asleep"), ("awake", "Awake"),
                ("inBed", "In Bed"))


def _shifted(stamp, seconds):
    """A canonical date ``seconds`` later."""
    moved = datetime.datetime.strptime(stamp[:23], "%Y-%m-%dT%H:%M:%S.%f") + datetime.timedelta(seconds=seconds)
    return _canonical(moved)


def _sleep_point(obj, raw, points):
    """Sleep in its three shapes.  Stages sent as intervals (startDate,
    endDate, value) are stage samples.  A night sent as totals (hours per
    stage, and sleepStart) is a sample per stage that all start at the
    night's start and last their total: counted whole, never against
    each other (merge_sleep_hours), and once: asleep without a stage only
    beyond what the stages hold, totalSleep never.  A night without a
    start starts at its date's midnight UTC (the night of that date in the
    zones from UTC-12 to UTC+11)."""
    if "value" in obj and "startDate" in obj:
        start = _point_start(obj)
        if start.__class__ is str:
            return start
        return _point_row(points, obj, raw, start[0], start[1], obj.get("value"), None, "stage")
    source = obj.get("source", obj.get("sleepSource"))
    anchor = hae_date(obj.get("sleepStart")) or hae_date(obj.get("date"))
    if anchor is None:
        return "neither sleepStart nor date is a date"
    hours = {field: _numeric(obj.get(field)) or 0 for field, _stage in SLEEP_TOTALS}
    staged = hours["core"] + hours["deep"] + hours["rem"]
    if staged > 0:
        total = _numeric(obj.get("totalSleep"))
        hours["asleep"] = max(0.0, total - staged) if total is not None else 0
    rows = []
    for field, stage in SLEEP_TOTALS:
        if hours[field] <= 0 or hours[field] > 24:
            continue
        start = anchor
        if field == "inBed":
            start = hae_date(obj.get("inBedStart")) or anchor
            source = obj.get("source", obj.get("inBedSource", source))
        row = (hae_uuid(_to_sql(source), stage, prefix=HAE_NIGHT_PREFIX), points.type, start,
               _shifted(start, hours[field] * 3600), stage, "hr", _to_sql(source), points.record(raw), None, None)
        rows.append((SAMPLES, row))
    return rows or "a night without hours"


def _any_point(obj, raw, points):
    """A metric this receiver does not know: Min/Avg/Max or qty."""
    return _range_point(obj, raw, points)


#: How a metric's point is read (HaeMetric.shape): a row function, (element,
#: its JSON text, MetricPoints) -> a row of SAMPLES, [(SAMPLES, row)...], or
#: a reason.
POINT_SHAPES = {"qty": _qty_point, "percent": _percent_point, "range": _range_point, "pressure": _pressure_point,
                "session": _session_point, "stand": _stand_point, "event": _event_point, "labels": _labels_point,
                "sleep": _sleep_point, "any": _any_point}


#: Health Auto Export's workout names that are not HealthKit's names.
WORKOUT_NAMES = {"run": "running", "walk": "walking", "swim": "swimming", "cycle": "cycling", "bike": "cycling",
                 "hiit": "highIntensityIntervalTraining", "strength": "traditionalStrengthTraining",
                 "elliptical": "elliptical", "rower": "rowing", "stairstepper": "stairClimbing"}
#: Words before a workout's name that say where it was.
_WORKOUT_PLACES = re.compile(r"(?i)^(outdoor|indoor|pool|open water)\s+")


def workout_activity(name):
    """A workout's type from Health Auto Export's name ("Outdoor Run") as
    HealthKit names it ("running"), or the name."""
    if name.__class__ is not str:
        return _to_sql(name)
    bare = _WORKOUT_PLACES.sub("", name.strip())
    folded = bare.replace(" ", "").replace("_", "").replace("-", "").lower()
    return WORKOUT_NAMES.get(folded) or _enum_name(bare, WORKOUT_ACTIVITY_TYPES, "HKWorkoutActivityType")


def _is_hae(obj, theirs, ours):
    """Whether an element of a name both apps use is Health Auto Export's:
    it has one of ``theirs`` and none of ``ours``."""
    return any(name in obj for name in theirs) and not any(name in obj for name in ours)


def _hae_identity(obj, *parts):
    """An element's own id, or a uuid made from ``parts``."""
    own = obj.get("id")
    return own if own.__class__ is str and own else hae_uuid(*parts)


def _seconds_of(value):
    """A duration in seconds: a number, or {qty, units}."""
    if value.__class__ is dict:
        seconds = convert_unit(value.get("qty"), value.get("units"), "s")
        return _numeric(seconds[0]) if seconds[1] == "s" else None
    return _numeric(value)


def _hae_workout_row(obj, raw, section):
    start = hae_date(obj.get("start"))
    if start is None:
        return "start missing or not a date"
    end = obj.get("end")
    return (_hae_identity(obj, section, obj.get("name"), start), workout_activity(obj.get("name")), start,
            hae_date(end) if end is not None else None, _seconds_of(obj.get("duration")), raw)


def _any_workout_row(obj, raw, section):
    """A workout of either app: Health Auto Export's has start, not startDate."""
    if _is_hae(obj, ("start",), ("startDate", "uuid", "workoutActivityType")):
        return _hae_workout_row(obj, raw, section)
    return _workout_row(obj, raw, section)


def _workout_parent(members):
    """The key a workout's streamed arrays are stored under, once known:
    its uuid or id (else the arrays wait for the workout's end)."""
    for name in ("uuid", "id"):
        value = members.get(name)
        if value.__class__ is str and value:
            return value
    return None


def _series_row(obj, raw, label):
    """A point of a workout's series (heart rate, steps...): label is
    (the workout's key, the series' name)."""
    workout, series = label
    start = _point_start(obj)
    if start.__class__ is str:
        return start
    value = obj.get("qty")
    low = high = None
    if value is None and "Avg" in obj:
        value, low, high = obj.get("Avg"), _numeric(obj.get("Min")), _numeric(obj.get("Max"))
    units = obj.get("units")
    return (workout, start[0], series, _to_sql(value), low, high, _to_sql(units), _to_sql(obj.get("source")), raw)


def _hae_route_point_row(obj, raw, workout):
    """A route point of Health Auto Export (its dates in its own form)."""
    row = _route_point_row(obj, raw, workout)
    if row.__class__ is tuple:
        stamp = hae_date(row[1])
        if stamp is None:
            return "timestamp is not a date"
        row = (row[0], stamp) + row[2:]
    return row


def _hae_medication_rows(obj, raw, section):
    """Health Auto Export's medication: a medication and a dose in one."""
    name = _first(obj, ("displayText", "nickname", "name"))
    codings = obj.get("codings")
    coding = codings[0] if codings.__class__ is list and codings and codings[0].__class__ is dict else {}
    key = name if name.__class__ is str and name else _to_sql(coding.get("code")) or content_key(section, obj)
    rows = [(SECTIONS_BY_NAME["medications"], (str(key), _to_sql(name), raw))]
    when = obj.get("start", obj.get("scheduledDate"))
    start = hae_date(when)
    if start is None:
        return rows
    dose = (hae_uuid("dose", key, hae_date(obj.get("scheduledDate")) or start), str(key), start,
            _enum_name(obj.get("status"), DOSE_LOG_STATUSES, "HKMedicationDoseEventLogStatus"), raw)
    return rows + [(SECTIONS_BY_NAME["doses"], dose)]


def _any_medication_row(obj, raw, section):
    """A medication of either app: Health Auto Export's carries the dose
    (start, status...) and no conceptIdentifier."""
    if _is_hae(obj, ("start", "scheduledDate", "status", "dosage"), ("conceptIdentifier", "hasSchedule")):
        return _hae_medication_rows(obj, raw, section)
    return _medication_row(obj, raw, section)


def _quantity_value(value):
    """A number sent plain or as {qty, units}."""
    if value.__class__ is dict:
        value = value.get("qty")
    return _to_sql(value)


def _timed_row(obj, raw, section, *identity):
    """(uuid, start, end) of an element of that app's other collections,
    or a reason: its id, else a uuid from ``identity`` and its start."""
    start = hae_date(obj.get("start", obj.get("date")))
    if start is None:
        return "start missing or not a date"
    end = obj.get("end")
    return _hae_identity(obj, section, start, *identity), start, hae_date(end) if end is not None else None


def _state_of_mind_row(obj, raw, section):
    timed = _timed_row(obj, raw, section, _to_sql(obj.get("kind")))
    if timed.__class__ is str:
        return timed
    return timed + (_to_sql(obj.get("kind")), _to_sql(obj.get("valence")),
                    _to_sql(obj.get("valenceClassification")), raw)


def _symptom_row(obj, raw, section):
    timed = _timed_row(obj, raw, section, _to_sql(obj.get("name")), _to_sql(obj.get("source")))
    if timed.__class__ is str:
        return timed
    return timed + (_to_sql(obj.get("name")), _to_sql(obj.get("severity")), _to_sql(obj.get("source")), raw)


def _cycle_row(obj, raw, section):
    kind = _first(obj, ("name", "type", "kind"))
    timed = _timed_row(obj, raw, section, _to_sql(kind), _to_sql(obj.get("source")))
    if timed.__class__ is str:
        return timed
    return timed + (_to_sql(kind), _to_sql(_first(obj, ("value", "qty", "flow"))), _to_sql(obj.get("source")), raw)


def _notification_row(obj, raw, section):
    timed = _timed_row(obj, raw, section, "notification")
    if timed.__class__ is str:
        return timed
    return timed + (_quantity_value(obj.get("threshold")), _to_sql(obj.get("source")), raw)


def _ecg_row(obj, raw, section):
    timed = _timed_row(obj, raw, section)
    if timed.__class__ is str:
        return timed
    return (_ecg_parent(obj),) + timed[1:] + (
        _to_sql(obj.get("classification")), _quantity_value(obj.get("averageHeartRate")),
        _to_sql(obj.get("samplingFrequency")), _to_sql(obj.get("source")), raw)


def _ecg_parent(members):
    """An ECG's key once its start is read (its measurements then stream)."""
    start = hae_date(members.get("start", members.get("date")))
    own = members.get("id")
    if own.__class__ is str and own:
        return own
    return None if start is None else hae_uuid("ecg", start)


class _Numbered:
    """The label of an ECG's measurements: its key, and the number of the
    last one read (the next is numbered one more)."""

    __slots__ = ("key", "number")

    def __init__(self, key, number=0):
        self.key, self.number = key, number


def _voltage_row(obj, raw, label):
    label.number += 1
    sent = obj.get("date")
    stamp = _usual_start(sent)  # hae_date's common case, as a point's
    if stamp is None and sent is not None:
        stamp = hae_date(sent)
    return (label.key, label.number, stamp, _to_sql(obj.get("voltage", obj.get("qty"))),
            _to_sql(obj.get("units")), raw)


# -- Sections: the SECTIONS registry; NESTED, elements read member by member --

#: The column of every table of health data that says whose a row is (an
#: id of ``people``): the first of each stored key, so that a person's rows
#: are stored together and two people's same element are two rows.  A sync
#: is one person's: the stage and the row functions know nothing of it, the
#: merge fills it in.
PERSON_COLUMN = "person"


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
    #: Identity within one person's rows; the stored key (``stored_key``)
    #: is the person, then this.  Rows are stored in that order.
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
    #: A re-sent element replaces the stored row when its sync's export is
    #: as recent or more (an older manual upload sent later does not);
    #: otherwise it is ignored.
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
    #: The last this many of ``columns`` were added to the table by a later
    #: step of MIGRATIONS: stored after the sync columns.
    appended: int = 0

    @property
    def column_names(self):
        """The columns of one person's rows (all but PERSON_COLUMN), in
        the table's order."""
        names = tuple(name for name, _type in self.columns)
        split = len(names) - self.appended
        return names[:split] + self.sync_columns + names[split:]

    @property
    def stored_key(self):
        return (PERSON_COLUMN,) + self.key

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

    def table_sql(self, name=None):
        """CREATE TABLE of the section's table (or of a copy named ``name``)."""
        kinds = dict(self.columns)
        columns = [f"{PERSON_COLUMN} INTEGER NOT NULL"] + [
            f"{name} INTEGER NOT NULL" if name in self.sync_columns else f"{name} {kinds[name]}".rstrip()
            for name in self.column_names]
        columns.append(f"PRIMARY KEY ({', '.join(self.stored_key)})")
        return (f"CREATE TABLE IF NOT EXISTS {name or self.table} ({', '.join(columns)})"
                + (" WITHOUT ROWID" if self.clustered else ""))

    @property
    def index_sql(self):
        """Its indexes, each a person's rows together."""
        return [f"CREATE INDEX IF NOT EXISTS {name} ON {self.table} ({', '.join((PERSON_COLUMN,) + cols)})"
                for name, cols in self.indexes]

    @property
    def create_sql(self):
        return [self.table_sql()] + self.index_sql

    @property
    def run_positions(self):
        """For a clustered section, where a row holds its key's first two
        columns: the stage keeps the rows of each value of the first (a
        sample type, a workout's route) as a run, and notes whether they
        arrived in the order of the second (see StagedRun)."""
        names = [name for name, _type in self.columns]
        return (names.index(self.key[0]), names.index(self.key[1])) if self.clustered else None

    @property
    def stage_create_sql(self):
        """The table a sync's rows wait in (see Stage): the section's
        columns, in the order they arrived.  Appending is the cheapest
        insert there is (bench: the samples of a 50 MB sync in 0.28 s, where
        a table clustered by the key took 0.42 s); in-sync duplicates are
        left to the merge."""
        columns = ", ".join(f"{name} {kind}".rstrip() for name, kind in self.columns)
        return f"CREATE TABLE {self.table} ({columns})"

    @property
    def stage_insert_sql(self):
        return f"INSERT INTO {self.table} VALUES ({', '.join('?' * len(self.columns))})"

    @functools.cached_property
    def stage_rows_per_insert(self):
        """Rows one statement of stage_insert_many_sql takes."""
        return min(STAGED_PER_INSERT, SQL_PARAMETERS_MAX // len(self.columns))

    @functools.cached_property
    def stage_insert_many_sql(self):
        """stage_insert_sql of stage_rows_per_insert rows at once: their
        values one after another, in the order the rows take their rowids."""
        one = f"({', '.join('?' * len(self.columns))})"
        return f"INSERT INTO {self.table} VALUES {', '.join([one] * self.stage_rows_per_insert)}"

    @property
    def written_by(self):
        """The sync column that says which sync last wrote a row."""
        return [name for name in self.sync_columns if name not in self.kept_on_update][-1]

    def merge_sql(self, where="", in_order=False, replaces_if=None):
        """Copy the staged rows (``where`` chooses some) into the database;
        parameter :sync_id fills the sync columns.  They go in key order,
        then arrival order: the database's pages are touched in turn, and of
        the elements of one key the first is kept (the last when the latest
        wins, or ``replaces_if`` is given, and the stored row meets it).  Rows that arrived
        in key order (``in_order``) are read as they are, without sorting.
        Parameter :person says whose they are."""
        names = [":sync_id" if name in self.sync_columns else name for name in self.column_names]
        source = (f"SELECT {', '.join([':person'] + names)}"
                  f" FROM stage.{self.table}{where or ' WHERE true'}")  # WHERE: SQLite's "parsing ambiguity" of upsert
        if not in_order:
            source += f" ORDER BY {', '.join(self.key)}, rowid"
        target = f"main.{self.table} ({', '.join((PERSON_COLUMN,) + self.column_names)})"
        if replaces_if is None:
            if not self.latest_wins:
                return f"INSERT OR IGNORE INTO {target} {source}"
            replaces_if = "true"
        updated = [name for name in self.column_names if name not in self.key and name not in self.kept_on_update]
        return (f"INSERT INTO {target} {source} ON CONFLICT ({', '.join(self.stored_key)}) "
                f"DO UPDATE SET {', '.join(f'{name} = excluded.{name}' for name in updated)} WHERE {replaces_if}")

    @property
    def count_new_sql(self):
        """Keys among the staged rows that the database does not hold yet
        of the person :person."""
        keys = ", ".join(self.key)
        match = " AND ".join([f"stored.{PERSON_COLUMN} = :person"] + [f"stored.{name} = staged.{name}"
                                                                        for name in self.key])
        return (f"SELECT count(*) FROM (SELECT DISTINCT {keys} FROM stage.{self.table}) AS staged WHERE NOT EXISTS "
                f"(SELECT 1 FROM main.{self.table} AS stored WHERE {match})")


def _event_section(name, table, app_key, make_row, columns):
    """The Section of one of Health Auto Export's collections of events:
    a uuid (its id, or made from its start), its dates, ``columns``, its
    record; counted among the app's measurements."""
    return Section(name, table, (("uuid", "TEXT"), ("start_date", "TEXT NOT NULL"), ("end_date", "TEXT"))
                   + columns + (("record", "TEXT NOT NULL"),), key=("uuid",), make_row=make_row, app_keys=(app_key,),
                   dates=(("start_date", "start"), ("end_date", "end")), bucket="measurements",
                   indexes=((f"{table}_start", ("start_date",)),))


#: Every section, in the order the answer, totals and export list them.
SECTIONS = (
    Section("samples", "samples",
            (("uuid", "TEXT"), ("type", "TEXT NOT NULL"), ("start_date", "TEXT NOT NULL"), ("end_date", "TEXT"),
             ("value", ""), ("unit", "TEXT"), ("source_name", "TEXT"), ("record", "TEXT NOT NULL"),
             ("low", "REAL"), ("high", "REAL")),
            key=("type", "start_date", "uuid"), make_row=_sample_row,
            dates=(("start_date", "startDate"), ("end_date", "endDate")),
            bucket="measurements", clustered=True, appended=2),
    Section("workouts", "workouts",
            (("uuid", "TEXT"), ("activity_type", "TEXT"), ("start_date", "TEXT NOT NULL"), ("end_date", "TEXT"),
             ("duration_seconds", "REAL"), ("record", "TEXT NOT NULL")),
            key=("uuid",), make_row=_any_workout_row, app_keys=("workouts",),
            dates=(("start_date", "startDate"), ("end_date", "endDate")),
            bucket="workouts", indexes=(("workouts_start", ("start_date",)),)),
    Section("doses", "medication_dose_events",
            (("uuid", "TEXT"), ("medication", "TEXT"), ("start_date", "TEXT NOT NULL"), ("log_status", "TEXT"),
             ("record", "TEXT NOT NULL")),
            key=("uuid",), make_row=_dose_row, app_keys=("medicationDoseEvents",),
            dates=(("start_date", "startDate"),),
            bucket="medications", indexes=(("doses_start", ("start_date",)),)),
    Section("medications", "medications",
            (("key", "TEXT"), ("display_text", "TEXT"), ("record", "TEXT NOT NULL")),
            key=("key",), make_row=_any_medication_row, app_keys=("medications",), latest_wins=True,
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
    # Health Auto Export's own collections, and the arrays inside its
    # workouts and ECGs (read as they arrive, see NESTED).
    Section("series", "workout_series",
            (("workout_uuid", "TEXT NOT NULL"), ("date", "TEXT NOT NULL"), ("series", "TEXT NOT NULL"),
             ("value", ""), ("low", "REAL"), ("high", "REAL"), ("unit", "TEXT"), ("source_name", "TEXT"),
             ("record", "TEXT NOT NULL")),
            key=("workout_uuid", "date", "series"), make_row=_series_row, app_keys=(),
            shape="nested", dates=(("date", "date"),), counted=False, clustered=True),
    _event_section("states_of_mind", "states_of_mind", "stateOfMind", _state_of_mind_row,
                   (("kind", ""), ("valence", "REAL"), ("classification", ""))),
    _event_section("symptoms", "symptoms", "symptoms", _symptom_row,
                   (("name", "TEXT"), ("severity", ""), ("source_name", "TEXT"))),
    _event_section("cycle_tracking", "cycle_tracking", "cycleTracking", _cycle_row,
                   (("kind", "TEXT"), ("value", ""), ("source_name", "TEXT"))),
    _event_section("heart_rate_notifications", "heart_rate_notifications", "heartRateNotifications",
                   _notification_row, (("threshold", ""), ("source_name", "TEXT"))),
    _event_section("ecg", "ecg_recordings", "ecg", _ecg_row,
                   (("classification", ""), ("average_heart_rate", "REAL"), ("sampling_frequency", "REAL"),
                    ("source_name", "TEXT"))),
    Section("voltages", "ecg_voltages",
            (("ecg_uuid", "TEXT NOT NULL"), ("number", "INTEGER NOT NULL"), ("date", "TEXT"), ("voltage", ""),
             ("unit", "TEXT"), ("record", "TEXT NOT NULL")),
            key=("ecg_uuid", "number"), make_row=_voltage_row, shape="nested",
            dates=(("date", "date"),), counted=False, clustered=True),
)

#: Sections by name.
SECTIONS_BY_NAME = {section.name: section for section in SECTIONS}
#: The section of every key of ``data`` not listed here.
DEFAULT_SECTION = next(section for section in SECTIONS if not section.app_keys)
#: Sections by the app's key, in ``data`` and at the top level.
_SECTIONS_BY_APP_KEY = {key: section for section in SECTIONS for key in section.app_keys}
#: The section whose per-type totals sample_types keeps.
SAMPLES = SECTIONS_BY_NAME["samples"]
#: The section whose counts the ``syncs`` table keeps apart (route_points).
ROUTE_POINTS = SECTIONS_BY_NAME["routes"]
#: NDJSON fields that carry what a section's record does not say (the data
#: key, the workout, the series, an ECG's measurement's number), each with
#: the column it is stored in: export writes them, import reads them.
NDJSON_LABELS = {"samples": (("type", "type"),), "routes": (("workout", "workout_uuid"),),
                 "series": (("workout", "workout_uuid"), ("series", "series")),
                 "voltages": (("ecg", "ecg_uuid"), ("number", "number"))}


class Stream(typing.NamedTuple):
    """An array inside an element, read an element at a time into rows of
    its own section."""

    #: The section (by name) its elements are rows of.
    section: str
    #: (element, JSON text, label) -> row, [(section, row)...] or a reason;
    #: None when the parent's key gives it (``row_of``).
    make_row: typing.Optional[typing.Callable]
    #: (the parent's key, the member's name) -> the label of make_row.
    label: typing.Callable = lambda parent, member: parent
    #: (the parent's key) -> make_row, for elements read by a function of
    #: their parent's (a metric's shape: called directly, a call less for
    #: each of the point a minute that a metric may hold).
    row_of: typing.Optional[typing.Callable] = None

    def row_function(self, parent):
        """make_row of the elements under ``parent`` (its key, readable)."""
        return self.make_row if self.row_of is None else self.row_of(parent)


class Nested(typing.NamedTuple):
    """How the elements of one data key are read member by member, so that
    their big arrays (``streams``) are read an element at a time, however
    deep: the other members are read whole and make the element's record.

    A stream's rows need the parent's key (a workout's id, a metric's name
    and units): ``parent(members read so far)`` gives it, or None while it
    is not known.  JSON objects have no order, so an array may come before
    what names it: its elements then wait, as compact text, in a temporary
    file (Parked: bounded memory), and are read when the element ends."""

    #: The element's own section (by name), or None when it has no row of
    #: its own (a metric: only its points are rows).
    section: typing.Optional[str]
    #: Member name -> Stream.
    streams: typing.Dict[str, Stream]
    #: members -> the parent's key, or None (not known yet).
    parent: typing.Callable
    #: (members, record, its row or None) -> the parent's key for the
    #: arrays that waited, or the reason they cannot be read.
    finish: typing.Callable


class Unreadable(str):
    """Why the elements of an array inside another cannot be read."""


def _metric_finish(members, texts, row):
    points = MetricPoints.of(members, texts)
    return Unreadable(points) if points.__class__ is str else points


def _metric_parent(members, texts):
    # The points need the metric's name and units (a stored unit, a shape).
    return _metric_finish(members, texts, None) if "name" in members and "units" in members else None


def _row_key(members, texts, row):
    if row is None or row.__class__ is str:
        return Unreadable(row or "the element that holds it cannot be read")
    return row[0]


#: A workout's arrays of samples (by Health Auto Export's names) kept as series.
WORKOUT_SERIES = ("heartRateData", "heartRateRecovery", "stepCount", "activeEnergy", "basalEnergy",
                  "walkingAndRunningDistance", "cyclingDistance", "swimmingDistance", "swimmingStrokeCount",
                  "cyclingCadence", "cyclingPower", "cyclingSpeed", "runningPower", "runningSpeed", "flightsClimbed")
#: A workout's series as streams, each labelled (the workout, its name).
_SERIES_STREAMS = {name: Stream("series", _series_row, lambda parent, member: (parent, member))
                   for name in WORKOUT_SERIES}


def _imported_workout(members, texts):
    """The workout an element of import's "workoutSeries" names (its id)."""
    return _workout_parent(members)


def _imported_ecg(members, texts):
    """(the ECG, the number of the measurement before the element's) that
    an element of import's "ecgVoltages" names, or None."""
    own, number = members.get("id"), members.get("number")
    if own.__class__ is str and own and number.__class__ is int and number > 0:
        return own, number - 1
    return None


def _named_by(parent_of):
    """Nested.finish of an element that must name its parent itself."""
    def finish(members, texts, row):
        parent = parent_of(members, texts)
        return Unreadable("the element does not name what holds it") if parent is None else parent
    return finish


#: The data keys whose elements are read member by member.
NESTED = {
    "metrics": Nested(None, {"data": Stream("samples", None, row_of=lambda points: points.shape)}, _metric_parent,
                      _metric_finish),
    "workouts": Nested("workouts", {"route": Stream("routes", _hae_route_point_row), **_SERIES_STREAMS},
                       lambda members, texts: _workout_parent(members), _row_key),
    "ecg": Nested("ecg", {"voltageMeasurements": Stream("voltages", _voltage_row, lambda parent, member:
                                                        _Numbered(parent))},
                  lambda members, texts: _ecg_parent(members), _row_key),
    # What import makes of an export's lines of the arrays above (no sync
    # holds them without the element around them): an element per line,
    # naming its workout or ECG (NESTED_IMPORTS).
    "workoutSeries": Nested(None, _SERIES_STREAMS, _imported_workout, _named_by(_imported_workout)),
    "ecgVoltages": Nested(None, {"voltageMeasurements": Stream("voltages", _voltage_row, lambda parent, member:
                                                               _Numbered(*parent))},
                          _imported_ecg, _named_by(_imported_ecg)),
}


def _series_element(label, record):
    series = label["series"]
    if series not in WORKOUT_SERIES:
        raise PayloadError(f"series {log_safe(series, 60)!r} is not one of a workout's")
    return f'{{"id":{json.dumps(label["workout"])},{json.dumps(series)}:[{record}]}}'


def _voltage_element(label, record):
    number = label["number"]
    if number.__class__ is not int or number < 1:
        raise PayloadError(f"number is {_json_kind(number)}, not a measurement's")
    return f'{{"id":{json.dumps(label["ecg"])},"number":{number:d},"voltageMeasurements":[{record}]}}'


#: Sections whose rows are elements of arrays inside another element, as
#: an export line of each is read again: the data key of NESTED it goes
#: in, and (the line's NDJSON_LABELS fields by name, decoded; the record's
#: text) -> the element's JSON text; raises PayloadError.
NESTED_IMPORTS = {"series": ("workoutSeries", _series_element), "voltages": ("ecgVoltages", _voltage_element)}


# -- Payload: a sync's body as batches of rows ------------------------------

def _where(parent, key, member):
    """What a rejected row of a nested array names: a metric's name, or
    the data key and the member."""
    name = getattr(parent, "name", None)
    return name if name.__class__ is str else f"{key}.{member}"


class Parked:
    """Elements of an array that must wait for the end of the object that
    holds it: their compact JSON text, a line each, in memory up to a MiB
    and then in an unnamed temporary file (``folder``)."""

    def __init__(self, folder=None):
        self._file = tempfile.SpooledTemporaryFile(max_size=MIB, dir=folder)
        self.count = 0

    def add(self, raw):
        self._file.write(raw.encode("utf-8", "surrogatepass") + b"\n")
        self.count += 1

    def elements(self):
        """(value, JSON text) of each element, in the order they came."""
        self._file.seek(0)
        for line in self._file:
            text = line[:-1].decode("utf-8", "surrogatepass")
            try:
                yield JsonReader.decode(text), text
            except RecursionError:
                yield TOO_DEEP, text

    def close(self):
        self._file.close()


class Payload:
    """The health grammar over a JsonReader: walks one sync's JSON as it
    arrives and yields ``(section, rows)``.

    ``section`` is a Section and ``rows`` tuples in its column order, or
    ``section`` is None and ``rows`` are ``(where, reason, text)`` for the
    ``rejected`` table.

    Only one array element exists as Python objects at a time: the top-level
    object, ``data`` and ``workoutRoutes`` are walked member by member, and
    each array element by the reader.  A value or key longer than
    ``value_max`` is never decoded: its text is kept in ``rejected``, a row
    per part.  After iteration, ``envelope`` holds the other top-level fields
    (small ones decoded, all as original JSON text in ``envelope_text``),
    ``sections`` counts the ``data`` sections and ``size`` is the body's
    length.
    """

    def __init__(self, pieces, read_ahead=WINDOW_MIN, value_max=VALUE_TEXT_MAX):
        self.reader = JsonReader(pieces, read_ahead, value_max)
        #: The body held nothing: it was empty, or an object without
        #: members (what a client sends to test the connection).
        self.empty = True
        self.envelope = {}
        self.envelope_text = {}
        self.sections = 0
        #: Arrays read so far per clustered section's name (ARRAYS_MAX).
        self._arrays = collections.Counter()
        #: Where arrays that wait for the end of their object are kept (Parked).
        self.spill_dir = None

    @classmethod
    def from_bytes(cls, body):
        """A payload over a body that is already in memory."""
        return cls((body,))

    @property
    def size(self):
        """Bytes of the body read so far."""
        return self.reader.size

    def batches(self):
        """Yield ``(section, rows)`` as the body arrives.

        Raises PayloadError, possibly after some batches were yielded: the
        caller must then discard them (storage never merges them).  An
        empty body, or an object without members, yields nothing and leaves
        ``empty`` true.
        """
        reader = self.reader
        pos = reader.start()
        char = reader.char(pos)
        if not char:
            return
        if char != "{":
            value = reader.value(pos)[0]
            kind = "an array" if value is TOO_DEEP else _json_kind(value)
            raise PayloadError(f"The body must be a JSON object, not {kind}.")
        end = yield from self._walk(pos, self._top_member, "top level")
        end = reader.skip(end)
        if reader.char(end):
            reader.fail("unexpected data after the top-level object", end)

    def _top_member(self, key, pos):
        self.empty = False
        reader = self.reader
        if key == "data":
            if reader.char(pos) != "{":
                value = reader.value(pos)[0]
                raise PayloadError(f"'data' must be an object of sections, not {_json_kind(value)}.")
            return (yield from self._walk(pos, self._data_member, "data"))
        section = _SECTIONS_BY_APP_KEY.get(key)
        if section is not None and section.shape == "routes":
            return (yield from self._section(section, key, pos))
        if section is None and reader.char(pos) == "[":
            # An array the app does not document: read element by element,
            # as a data section's (never whole, never in the envelope).
            return (yield from self._section(DEFAULT_SECTION, key, pos))
        value, raw, end = yield from self._whole(pos, key)
        if raw is None:
            return end
        small = len(raw) <= ENVELOPE_VALUE_MAX and value is not TOO_DEEP
        self.envelope[key] = value if small else None
        if section is not None and section.shape == "object":
            yield from self._object_section(section, value, raw, key)
        if len(raw) <= ENVELOPE_TEXT_MAX:
            self.envelope_text[key] = raw
        elif section is None:  # kept, but not in every syncs row's envelope
            yield None, [(key, f"top-level field of {len(raw):,} bytes, more than the envelope keeps", raw)]
        return end

    def _walk(self, pos, on_member, where):
        """reader.walk_object for members read by ``on_member``; a key
        longer than the reader takes is kept in rejected under ``where``,
        and its value read under the key's beginning."""
        def member(key, at):
            if at is None:
                at = self.reader.after_key((yield from self._keep_oversized(key, where, "a key")))
                key = key.head[1:TYPE_NAME_MAX + 1] + "\u2026"
            return (yield from on_member(key, at))
        return (yield from self.reader.walk_object(pos, member))

    def _whole(self, pos, where):
        """(value, compact JSON text, end) of the value at ``pos``; for one
        longer than the reader takes, its text is kept in rejected under
        ``where`` and (None, None, end) returned."""
        value, raw, end = self.reader.value(pos)
        if raw is None:
            end = yield from self._keep_oversized(value, where)
            return value, raw, end
        return value, compact_json(raw), end

    def _keep_oversized(self, value, where, what=None):
        """Keep the text of an Oversized value in rejected, a row per part
        as it arrives; return the value's end."""
        reason = (f"{what or value.kind} of more than {self.reader.value_max:,} bytes, kept as sent "
                  f"(not read) in parts to be joined in order: part")
        number, held = 0, None
        for part in value.parts():
            if held is not None:
                number += 1
                yield None, [(where, f"{reason} {number}", held)]
            held = part  # one part held back: the last says so
        yield None, [(where, f"{reason} {number + 1}, the last ({value.size:,} bytes in all)", held)]
        return value.end

    def _data_member(self, key, pos):
        self.sections += 1
        nested = NESTED.get(key)
        if nested is not None and self.reader.char(pos) == "[":
            return (yield from self.reader.walk_array(pos, lambda at: self._element(at, nested, key)))
        section = _SECTIONS_BY_APP_KEY.get(key, DEFAULT_SECTION)
        return (yield from self._section(section, key, pos, "data." + key if section.shape != "array" else key))

    def _section(self, section, key, pos, where=None):
        """Rows of one section's value at ``pos``, of whatever shape."""
        reader = self.reader
        where = where or key
        if section.shape == "array":
            if reader.char(pos) == "[":
                return (yield from self._array(pos, section, key))
            value, raw, end = yield from self._whole(pos, where)
            if raw is not None:
                yield None, [(where, f"section is {_json_kind(value)}, not an array", raw)]
            return end
        if reader.char(pos) != "{":
            value, raw, end = yield from self._whole(pos, where)
            if raw is not None:
                yield None, [(where, f"{key} is {_json_kind(value)}, not an object", raw)]
            return end
        if section.shape == "object":
            value, raw, end = yield from self._whole(pos, where)
            if raw is not None:
                yield from self._object_section(section, value, raw, where)
            return end
        return (yield from self._walk(pos, lambda workout, at: self._route(section, workout, at), key))

    def _route(self, section, workout, pos):
        where = "workoutRoutes/" + workout  # rejected rows name the route they came from
        if self.reader.char(pos) != "[":
            value, raw, end = yield from self._whole(pos, where)
            if raw is not None:
                yield None, [(where, f"route is {_json_kind(value)}, not an array", raw)]
            return end
        return (yield from self._array(pos, section, workout, where))

    def _object_section(self, section, value, raw, where):
        if value.__class__ is not dict:
            yield None, [(where, f"{section.app_keys[0]} is {_json_kind(value)}, not an object", raw)]
            return
        rows = [section.make_row(name, item) for name, item in value.items()]
        if rows:
            yield section, rows

    def _array(self, pos, section, label, where=None, make_row=None):
        """Yield batches of rows of ``section`` from the array at ``pos``;
        return its end.

        ``label`` is passed to the row function (the data key, or the
        workout of a route); elements that cannot be rows go to ``rejected``
        under ``where`` (by default ``label``).  Most of a large sync's
        elements pass here, so the section is looked up once per array,
        never per element.
        """
        where = where or label
        refusal = None
        if section.clustered:
            self._arrays[section.name] += 1
            if self._arrays[section.name] > ARRAYS_MAX:
                refusal = f"more than {ARRAYS_MAX:,} arrays of {section.name} in one sync"
        if section is DEFAULT_SECTION and label.__class__ is str and len(label) > TYPE_NAME_MAX:
            # No page could show such a type, and each row would repeat it:
            # its elements are kept aside, under the name's beginning.
            refusal = f"type name of {len(label):,} characters, more than {TYPE_NAME_MAX}"
            where = label[:TYPE_NAME_MAX] + "\u2026"
        if refusal is not None:
            make_row = lambda obj, raw, label: refusal  # noqa: E731
        yield from self._rows(self.reader.elements(pos), section, label, where, make_row or section.make_row)
        return self.reader.end

    def _rows(self, elements, section, label, where, make_row):
        """Yield batches of rows of ``section`` (and of the sections a row
        function names: [(section, row)...]) from ``elements``, (value,
        JSON text) pairs."""
        batch = []
        others = {}  # section -> rows of another section than the array's
        scalars = {}  # reason -> [elements, text of the last one not kept]
        # Records are stored compact.  Whether an array's elements are
        # spaced out (", " and ": ") is judged from its first; lines are
        # looked for in each.  (Judging each element costs a compact sync
        # 12% when most of its strings hold a space.)
        spaced = None
        for obj, raw in elements:
            if raw is None:  # too long to read: kept in parts
                yield from self._keep_oversized(obj, where)
                continue
            if spaced or "\n" in raw:
                raw = compact_json(raw)
            elif spaced is None:
                compact = compact_json(raw)
                spaced, raw = compact != raw, compact
            if obj.__class__ is not dict:
                if obj is TOO_DEEP:
                    row = "element is nested too deeply to be read"
                else:
                    row = f"element is {_json_kind(obj)}, not an object"
                    if obj.__class__ is not list:
                        # A number, string, true, false or null carries no
                        # more than its text: past the first few of a kind,
                        # one row counts them (five million 1s are not five
                        # million rows).
                        seen = scalars.setdefault(row, [0, None])
                        seen[0] += 1
                        if seen[0] > SCALARS_KEPT:
                            seen[1] = raw
                            continue
            else:
                row = make_row(obj, raw, label)
            if row.__class__ is tuple:
                batch.append(row)
                if len(batch) >= BATCH_ROWS:
                    yield from self._settled(section, batch, where)
                    batch = []
            elif row.__class__ is str:
                yield None, [(where, row, raw)]
            else:  # rows of several: [(section, row)...]
                for target, item in row:
                    if target is section:
                        batch.append(item)
                    else:
                        others.setdefault(target, []).append(item)
                if len(batch) >= BATCH_ROWS or any(len(rows) >= BATCH_ROWS for rows in others.values()):
                    yield from self._settled(section, batch, where)
                    for target, rows in others.items():
                        yield from self._settled(target, rows, where)
                    batch, others = [], {}
        if batch:
            yield from self._settled(section, batch, where)
        for target, rows in others.items():
            yield from self._settled(target, rows, where)
        for reason, (count, last) in scalars.items():
            if count > SCALARS_KEPT:
                yield None, [(where, f"{count - SCALARS_KEPT:,} more: {reason} (the first {SCALARS_KEPT} are kept "
                                     f"one a row; this row's record is the last)", last)]

    def _element(self, pos, nested, key):
        """Rows of one element of a NESTED data key, walked member by
        member: its streams' elements as they arrive (or parked until its
        end, when what names them comes after them), the other members read
        whole into its record."""
        reader = self.reader
        if reader.char(pos) != "{":
            value, raw, end = yield from self._whole(pos, key)
            if raw is not None:
                yield None, [(key, "element is nested too deeply to be read" if value is TOO_DEEP
                              else f"element is {_json_kind(value)}, not an object", raw)]
            return end
        members, texts, parked = {}, [], []
        parent = None

        def member(name, at):
            nonlocal parent
            stream = nested.streams.get(name)
            if stream is None or reader.char(at) != "[":
                value, raw, end = yield from self._whole(at, f"{key}.{name}")
                if raw is not None:
                    members[name] = value
                    texts.append((name, raw))
                return end
            section = SECTIONS_BY_NAME[stream.section]
            if parent is None:
                parent = nested.parent(members, texts)
            if parent is not None and parent.__class__ is not Unreadable:
                return (yield from self._array(at, section, stream.label(parent, name), _where(parent, key, name),
                                               stream.row_function(parent)))
            spill = Parked(self.spill_dir)
            parked.append((name, stream, spill))
            for obj, raw in reader.elements(at):
                if raw is None:
                    yield from self._keep_oversized(obj, f"{key}.{name}")
                else:
                    spill.add(compact_json(raw))
            return reader.end

        try:
            end = yield from self._walk(pos, member, key)
            record = "{" + ",".join(json.dumps(name, ensure_ascii=False) + ":" + raw for name, raw in texts) + "}"
            section = SECTIONS_BY_NAME[nested.section] if nested.section else None
            row = None
            if section is not None:
                row = section.make_row(members, record, key)
                yield from self._rows(((members, record),), section, key, key, lambda obj, raw, label: row)
            parent = nested.finish(members, texts, row)
            for name, stream, spill in parked:
                where = _where(parent, key, name)
                if parent.__class__ is Unreadable:
                    make_row = lambda obj, raw, label, why=f"not read: {parent}": why  # noqa: E731
                else:
                    make_row = stream.row_function(parent)
                label = None if parent.__class__ is Unreadable else stream.label(parent, name)
                yield from self._rows(spill.elements(), SECTIONS_BY_NAME[stream.section], label, where, make_row)
        finally:
            for _name, _stream, spill in parked:
                spill.close()
        return end

    def _settled(self, section, batch, where):
        """Yield the batch with its dates in canonical UTC.

        The common case, every date already in the app's own form and one
        that exists, is recognised for the whole batch at once (one join,
        one translate, then a column of digits at a time: see
        dates_exist); otherwise each date is converted, and a row whose
        first date is not a date goes to ``rejected`` with the reason.
        """
        positions = section.date_positions
        for position, _field in positions:
            if not are_canonical_dates("".join([row[position] or CANONICAL_FILLER for row in batch])):
                break
        else:
            yield section, batch
            return
        rows, rejected, record = [], [], section.record_position
        for row in batch:
            for number, (position, field) in enumerate(positions):
                value = row[position]
                if value is None or (len(value) == 24 and is_canonical_date(value)):
                    continue
                value = utc_date(value)
                if value is None and number == 0:
                    rejected.append((where, f"{field} is not a date", row[record]))
                    break
                row = row[:position] + (value,) + row[position + 1:]
            else:
                rows.append(row)
        if rows:
            yield section, rows
        if rejected:
            yield None, rejected


#: How much of a body is looked at for its envelope (leading_members): the
#: app writes it first, in about 200 bytes.
ENVELOPE_HEAD = 64 * 1024
#: A member with a short scalar value: "key": value, then "," or "}".
_LEADING_MEMBER = re.compile(
    r'\s*("(?:[^"\\\x00-\x1f]|\\.){1,200}")\s*:\s*("(?:[^"\\\x00-\x1f]|\\.){0,200}"'
    r'|-?[0-9]{1,40}(?:\.[0-9]{1,40})?(?:[eE][-+]?[0-9]{1,4})?|true|false|null)\s*([,}])')
#: At most this many members are read from a body's head.
LEADING_MEMBERS_MAX = 64


def leading_members(head):
    """The members with a short scalar value that open the JSON object at
    the start of ``head`` (a body's first bytes), up to the first member of
    another kind: the fields the app puts first (exportDate, startDate,
    endDate, syncSource).  Only a hint of what the body holds (the body is
    not checked): {} when it starts otherwise."""
    head = head[:ENVELOPE_HEAD]
    text = head[3:] if head.startswith(b"\xef\xbb\xbf") else head
    text = text.decode("utf-8", "replace")
    opening = re.match(r"\s*\{", text)
    members = {}
    pos = opening.end() if opening else len(text)
    while opening and len(members) < LEADING_MEMBERS_MAX:
        match = _LEADING_MEMBER.match(text, pos)
        if match is None:
            break
        try:
            members[json.loads(match[1])] = json.loads(match[2])
        except ValueError:
            break
        if match[3] == "}":
            break
        pos = match.end()
    return members


# ---------------------------------------------------------------------------
# Storage: connections, schema, migrations, writing a sync; backups, verify, restore
# ---------------------------------------------------------------------------

# -- Tables: the schema and its first two versions --------------------------

#: Seconds SQLite waits for another program's lock before giving up (503).
BUSY_TIMEOUT = 10.0
#: SQLite page size for new databases (bench: 16 KiB inserts ~20% faster than 4 KiB).
PAGE_SIZE = 16384
#: SQLite page cache of the writer in KiB.  Rows go in in key order, so few
#: pages are hot at a time (bench: 2 MB merges as fast as 8 MB).
CACHE_KIB = 2000
#: SQLite page cache of a sync's temporary file in KiB, as it is written
#: and as the merge reads it: its rows are appended, then read in runs, so
#: one page is hot at a time (bench: 500 KiB stages as fast as 2 MB).
STAGE_CACHE_KIB = 500
#: Seconds a failed sync's row may wait for the database (its answer waits too).
FAILURE_WAIT = 1.0
#: Seconds the check of the database at start may take; a larger file is
#: checked in part (PRAGMA quick_check reads all of it).
QUICK_CHECK_SECONDS = 10
#: What the receiver says of a damaged database, and what to do.
DAMAGED = ("The database {path} is damaged ({detail}); nothing more is written to it, and syncs are refused "
           "(the app keeps them and retries). Stop the receiver, keep a copy of the file, then run: "
           "sqlite3 {path} .recover | sqlite3 recovered.db, and start with --db recovered.db (or restore a backup).")
#: DAMAGED as a person who is not an admin reads it: without paths.
DAMAGED_SEEN = ("The database is damaged; nothing more is written to it, and syncs are refused (the app keeps them "
                "and retries). The receiver's log says how to recover it.")
#: SQLite page cache of a migration in KiB: it rewrites whole tables.
MIGRATION_CACHE_KIB = 64000
#: Rows a migration copies between two progress lines.
MIGRATION_PROGRESS_ROWS = 1000000


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
_STAGE_REJECTED_SQL = "INSERT INTO rejected (section, reason, record) VALUES (?, ?, ?)"
#: Names of the temporary files of syncs: prefix, database name, pid, number, suffix.
_STAGE_PREFIX = "."
_STAGE_SUFFIX = ".stage"
_SPOOL_SUFFIX = ".spool"


class Table(typing.NamedTuple):
    """A table the receiver keeps for itself, and the SQL derived from it."""

    name: str
    #: (column, SQL type); the first is the key, unless ``key`` says.
    columns: typing.Tuple[typing.Tuple[str, str], ...]
    #: A primary key of several columns, stored in its order (WITHOUT ROWID).
    key: typing.Tuple[str, ...] = ()

    @property
    def column_names(self):
        return tuple(name for name, _type in self.columns)

    def create_sql(self, name=None):
        """CREATE TABLE of the table (or of a copy named ``name``)."""
        columns = [f"{column} {kind}" for column, kind in self.columns]
        if self.key:
            columns.append(f"PRIMARY KEY ({', '.join(self.key)})")
        return (f"CREATE TABLE IF NOT EXISTS {name or self.name} ({', '.join(columns)})"
                + (" WITHOUT ROWID" if self.key else ""))

    def select_sql(self, names=None, schema="main."):
        """SELECT of ``names``; ``schema`` "" reads what the connection
        sees under the table's name (one person's rows: PersonStore)."""
        return f"SELECT {', '.join(names or self.column_names)} FROM {schema}{self.name}"

    def insert_sql(self, names):
        return (f"INSERT INTO main.{self.name} ({', '.join(names)}) "
                f"VALUES ({', '.join(':' + name for name in names)})")

    def update_sql(self, names):
        key = self.columns[0][0]
        return (f"UPDATE main.{self.name} SET {', '.join(f'{name} = :{name}' for name in names)} "
                f"WHERE {key} = :{key}")


#: Every sync received, stored or not: one row each.  Its columns as
#: SCHEMA_V1 created them (a new column is a step in MIGRATIONS).
SYNCS = Table("syncs", (
    ("id", "INTEGER PRIMARY KEY"),
    ("received_at", "TEXT NOT NULL"),  # canonical UTC, when the body was complete
    ("remote_addr", "TEXT"),
    ("sync_source", "TEXT"),  # the envelope's, as sent
    ("export_date", "TEXT"),  # envelope dates: canonical UTC where readable, else as sent
    ("start_date", "TEXT"),
    ("end_date", "TEXT"),
    ("body_bytes", "INTEGER"),
    ("received", "INTEGER NOT NULL DEFAULT 0"),  # the app's records (counted sections)
    ("inserted", "INTEGER NOT NULL DEFAULT 0"),
    ("duplicates", "INTEGER NOT NULL DEFAULT 0"),
    ("rejected", "INTEGER NOT NULL DEFAULT 0"),
    ("route_points", "INTEGER NOT NULL DEFAULT 0"),
    ("route_points_inserted", "INTEGER NOT NULL DEFAULT 0"),
    ("sections", "INTEGER NOT NULL DEFAULT 0"),
    ("duration_ms", "INTEGER"),
    ("status", "TEXT NOT NULL"),  # a SyncStatus
    ("error", "TEXT"),  # why nothing was stored
    ("envelope", "TEXT"),  # the top-level fields besides the sections, as JSON text
    # Version 6: a stored sync's body, so that a byte-identical retry is
    # answered from its record (SyncIntake) instead of being read again.
    ("body_sha256", "TEXT"),  # the body's SHA-256 as received (decoded), hex; of stored syncs
    ("same_body_as", "INTEGER"),  # a byte-identical retry: the sync whose record answered it
    ("received_counts", "TEXT"),  # JSON {section name: elements received}: the answer to a retry
    # Version 7: a body that starts as a stored one but differs is read from
    # its first differing block on, as it arrives, not after its last byte.
    ("body_blocks", "TEXT"),  # of each BODY_BLOCK bytes of the body, its CRC-32 in hex (BLOCK_DIGEST_CHARS)
    # Version 8: whose sync it was (an id of PEOPLE).  Never left out: the
    # Sync row's default, None, fails NOT NULL.
    ("person", "INTEGER NOT NULL DEFAULT 1"),
))
#: The columns version 6 added to SYNCS.
SYNCS_V6_COLUMNS = ("body_sha256", "same_body_as", "received_counts")
#: The columns version 7 added to SYNCS.
SYNCS_V7_COLUMNS = ("body_blocks",)
#: The column version 8 added to SYNCS: the syncs before it are the first person's.
SYNCS_V8_COLUMNS = (PERSON_COLUMN,)
#: A body's blocks, each with its own digest in ``body_blocks``.
BODY_BLOCK = 1024 * 1024
#: Hex characters of a block's CRC-32.  A CRC suffices: the whole body's
#: SHA-256 decides; a block's only says early that a body differs (and is
#: cheap where SHA-256 is not, on a small board's processor).
BLOCK_DIGEST_CHARS = 8
#: Finds the stored syncs a body may repeat, by its envelope (see
#: Store.same_envelope): syncs without a digest stay out of it.
SYNCS_BY_EXPORT_INDEX = (f"CREATE INDEX IF NOT EXISTS syncs_by_export ON {SYNCS.name} (export_date)"
                         " WHERE body_sha256 IS NOT NULL")
#: A person's latest syncs.
SYNCS_BY_PERSON_INDEX = f"CREATE INDEX IF NOT EXISTS syncs_by_person ON {SYNCS.name} ({PERSON_COLUMN}, id)"


class SyncStatus:
    """The ``status`` of a syncs row."""

    #: Being merged; never seen committed (the row commits with its rows).
    PENDING = "pending"
    #: Stored.
    OK = "ok"
    #: Nothing stored, by the client's fault (a bad body, a wrong type or
    #: size): a retry of the same request fails the same way.
    REJECTED = "rejected"
    #: Nothing stored, by the receiver's (the database, the disk): the app
    #: is told to retry.
    FAILED = "failed"


class Sync(collections.namedtuple("Sync", SYNCS.column_names, defaults=tuple(
        SyncStatus.PENDING if name == "status" else 0 if "DEFAULT 0" in kind else None
        for name, kind in SYNCS.columns))):
    """One row of the syncs table."""

    __slots__ = ()


#: The people whose data the receiver keeps (version 8): each with a key of
#: their own, stored only as its SHA-256 (see hash_key).  The first, made
#: with the table, owns every row stored before it and the receiver's key
#: (--token-file, $HEALTH_RECEIVER_TOKEN or <db>.key).
PEOPLE = Table("people", (
    ("id", "INTEGER PRIMARY KEY AUTOINCREMENT"),  # a removed person's id is never given again
    ("name", "TEXT NOT NULL UNIQUE"),
    ("key_sha256", "TEXT UNIQUE"),  # hex; NULL: no key of its own (the first person, or one imported)
    ("admin", "INTEGER NOT NULL DEFAULT 0"),  # may read everyone's pages
    ("created_at", "TEXT NOT NULL"),
))
#: The first person's id and name, when nothing names them otherwise.
FIRST_PERSON = 1
FIRST_PERSON_NAME = "me"
#: What the receiver derives from the samples, per person (version 8).
#: sample_types: rows and first and last date of each type.
SAMPLE_TYPES = Table("sample_types", (
    (PERSON_COLUMN, "INTEGER NOT NULL"), ("type", "TEXT NOT NULL"), ("rows", "INTEGER NOT NULL"),
    ("first_date", "TEXT"), ("last_date", "TEXT")), key=(PERSON_COLUMN, "type"))
#: sample_hours: totals per type, hour, source and category (see _SAMPLE_HOURS_SQL).
SAMPLE_HOURS = Table("sample_hours", (
    (PERSON_COLUMN, "INTEGER NOT NULL"), ("type", "TEXT NOT NULL"), ("hour", "TEXT NOT NULL"),
    ("source", "TEXT NOT NULL"), ("category", "TEXT NOT NULL"), ("samples", "INTEGER NOT NULL"),
    ("numbers", "INTEGER NOT NULL"), ("total", "REAL NOT NULL"), ("low", "REAL"), ("high", "REAL"),
    ("seconds", "REAL NOT NULL")), key=(PERSON_COLUMN, "type", "hour", "source", "category"))
#: sample_hours_pending: hours syncs brought samples to, not yet totalled.
SAMPLE_HOURS_PENDING = Table("sample_hours_pending", (
    (PERSON_COLUMN, "INTEGER NOT NULL"), ("type", "TEXT NOT NULL"), ("hour", "TEXT NOT NULL")),
    key=(PERSON_COLUMN, "type", "hour"))
#: sample_sources: the order in which the person's sources were first
#: stored (``seen``), the Health app's default order among sources that no
#: priority word names (version 9).
SAMPLE_SOURCES = Table("sample_sources", (
    (PERSON_COLUMN, "INTEGER NOT NULL"), ("source", "TEXT NOT NULL"), ("seen", "INTEGER NOT NULL")),
    key=(PERSON_COLUMN, "source"))
DERIVED_TABLES = (SAMPLE_TYPES, SAMPLE_HOURS, SAMPLE_HOURS_PENDING, SAMPLE_SOURCES)
#: The derived tables as version 8 made them (before sample_sources).
DERIVED_TABLES_V8 = (SAMPLE_TYPES, SAMPLE_HOURS, SAMPLE_HOURS_PENDING)
#: settings: the receiver's own choices that stored totals depend on
#: (version 9): ``source_priority``, the words the totals were merged by.
SETTINGS = Table("settings", (("name", "TEXT NOT NULL"), ("value", "TEXT")), key=("name",))

#: The rejected table's name (its columns: SCHEMA_V1).
REJECTED_TABLE = "rejected"
#: Tables kept by the receiver itself, besides the sections' tables.
BOOKKEEPING_TABLES = (REJECTED_TABLE, SYNCS.name)


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
    _recount_sample_types(conn, per_person=False)


def _recount_sample_types(conn, per_person=True):
    """Count sample_types again: per person, or (``per_person`` False) as
    the schema before version 8 kept them, which earlier steps write."""
    owner = f"{PERSON_COLUMN}, " if per_person else ""
    conn.execute("DELETE FROM sample_types")
    conn.execute(f"INSERT INTO sample_types ({owner}type, rows, first_date, last_date) SELECT {owner}type, count(*),"
                 f" min(start_date), max(start_date) FROM samples GROUP BY {owner}type")


# -- Hourly totals: what an hour of a type holds, made in SQL ---------------

_NUMERIC = "typeof(value) IN ('integer', 'real')"
#: Types whose samples' durations are what they measure (sleep, mindful
#: minutes): HealthKit's category types.
TIMED_TYPE_PREFIX = "HKCategoryTypeIdentifier"
#: Quantity types whose daily value is a total (the others are averaged).
CUMULATIVE_TYPES = frozenset((
    "StepCount", "DistanceWalkingRunning", "DistanceCycling", "DistanceSwimming", "DistanceWheelchair",
    "DistanceDownhillSnowSports", "DistanceCrossCountrySkiing", "DistancePaddleSports", "DistanceRowing",
    "DistanceSkatingSports", "ActiveEnergyBurned", "BasalEnergyBurned", "FlightsClimbed", "AppleExerciseTime",
    "AppleStandTime", "AppleMoveTime", "NikeFuel", "PushCount", "SwimmingStrokeCount", "NumberOfTimesFallen",
    "InhalerUsage", "InsulinDelivery", "NumberOfAlcoholicBeverages", "TimeInDaylight", "UVExposure"))


def is_cumulative(type_name):
    """Whether a day's value of the type is a total (steps, energy, food)
    rather than a mean (heart rate)."""
    short = type_name[len(TYPE_PREFIXES[0]):]
    return type_name.startswith(TYPE_PREFIXES[0]) and (short in CUMULATIVE_TYPES or short.startswith("Dietary"))


#: A sample at most this long (ms: an hour) spans the hour it starts in
#: and the next at most: a sync notes those two as pending with one query
#: (_SAMPLE_HOURS_OF), and the longer ones hour by hour
#: (_note_long_samples).  Before version 9, cumulative samples longer than
#: this counted in the half-hour they start in.
SPREAD_MS_MAX = 3600 * 1000
#: The totals of a person's type, source and category in each hour chosen by
#: ``{touched}`` (a query of hours, parameters of hours_parameters()),
#: recomputed from the samples, of the types hours_merger leaves to SQL (and
#: of every type in MIGRATIONS' steps before version 9).  A sample counts
#: in the bucket it starts in for ``samples``, ``numbers``, ``low``,
#: ``high`` and ``total``.  When :timed (category types: mindful minutes,
#: stand hours) ``seconds`` adds durations and the value is the category.
#: :spread (cumulative types before version 9) keeps half-hours (keys
#: YYYY-MM-DDTHH and YYYY-MM-DDTHH:30) where ``total`` adds each sample's
#: share of it and ``seconds`` the time the source's samples cover in it.
_SAMPLE_HOURS_SQL = (
    "WITH touched(hour) AS ({touched}),"
    " buckets AS (SELECT hour AS bucket, julianday(hour || ':00') AS lo, hour || ':00:00.000Z' AS lo_text,"
    " julianday(hour || ':00', CASE WHEN :spread THEN '+30 minutes' ELSE '+1 hour' END) AS hi,"
    " CASE WHEN :spread THEN hour || ':30' ELSE hour || ';' END AS hi_text FROM touched"
    " UNION ALL SELECT hour || ':30', julianday(hour || ':30'), hour || ':30:00.000Z', julianday(hour || ':00', '+1 hour'),"
    " hour || ';' FROM touched WHERE :spread),"
    " spans AS (SELECT bucket, coalesce(s.source_name, '') AS source,"
    " CASE WHEN :timed THEN coalesce(CAST(s.value AS TEXT), '') ELSE '' END AS category, s.value AS value,"
    " {least} AS least, {greatest} AS greatest,"
    " s.start_date >= lo_text AS begins, julianday(s.start_date) AS t0, julianday(s.end_date) AS t1, lo, hi"
    " FROM buckets JOIN main.samples AS s ON {owner_match}s.type = :type"
    " AND s.start_date >= CASE WHEN :spread THEN strftime('%Y-%m-%dT%H:%M', lo, '-1 hour') ELSE lo_text END"
    " AND s.start_date < hi_text AND (s.start_date >= lo_text OR s.end_date > lo_text)),"
    # A sample's share of a bucket: the time it spans there over its
    # duration, worked out from the bucket's bounds so that its shares add
    # up to 1 exactly.
    " parts AS (SELECT * FROM (SELECT bucket, source, category, value, least, greatest, begins, t0, t1, lo, hi,"
    " CASE WHEN :spread"
    " AND t1 > t0 AND round((t1 - t0) * 86400000) <= :longest THEN max(0.0, min(t1, hi) - max(t0, lo)) END"
    " AS covered FROM spans) WHERE begins OR covered > 0)"
    " INSERT OR REPLACE INTO main.sample_hours ({owner_column}type, hour, source, category, samples, numbers, total,"
    " low, high, seconds)"
    f" SELECT {{owner_value}}:type, bucket, source, category, sum(begins), count(CASE WHEN begins AND {_NUMERIC} THEN 1 END),"
    f" total(CASE WHEN {_NUMERIC} THEN value * CASE WHEN covered IS NULL THEN begins WHEN t1 <= hi AND begins"
    " THEN 1.0 WHEN begins THEN (hi - t0) / (t1 - t0) WHEN t1 > hi THEN (hi - lo) / (t1 - t0)"
    " ELSE 1.0 - (lo - t0) / (t1 - t0) END END),"
    f" min(CASE WHEN begins AND {_NUMERIC} THEN least END), max(CASE WHEN begins AND {_NUMERIC} THEN greatest END),"
    " total(CASE WHEN :timed THEN begins * max(0, round((t1 - t0) * 86400, 3)) ELSE round(covered * 86400, 3) END)"
    " FROM parts GROUP BY bucket, source, category")
#: The hours syncs have brought samples to since sample_hours was last
#: brought up to date.
_PENDING_HOURS = f"SELECT hour FROM main.sample_hours_pending WHERE {PERSON_COLUMN} = :person AND type = :type"
#: Pending hours of a type totalled by one statement.  Its GROUP BY sorts
#: the samples of its hours in memory (4 MB and more at this page size):
#: a week at a time holds a week's.  Bench, the hours of a 50 MB sync:
#: the statements' peak memory 7 MB -> 4 MB, and 5% less processor time.
HOURS_PER_STATEMENT = 168
#: The first pending hour of each HOURS_PER_STATEMENT, in order.
_PENDING_HOURS_FROM = (f"SELECT hour FROM (SELECT hour, row_number() OVER (ORDER BY hour) AS number"
                       f" FROM ({_PENDING_HOURS})) WHERE number % {HOURS_PER_STATEMENT:d} = 1 ORDER BY hour")
#: The hours a type's samples chosen by ``{where}`` start in, and (:spread)
#: the next hours those spread over reach.
_SAMPLE_HOURS_OF = (
    "SELECT substr(start_date, 1, 13) FROM {samples} WHERE {where}"
    " UNION SELECT substr(end_date, 1, 13) FROM {samples} WHERE {where} AND :spread"
    " AND substr(end_date, 1, 13) > substr(start_date, 1, 13)"
    " AND round((julianday(end_date) - julianday(start_date)) * 86400000) BETWEEN 0 AND :longest")


def _hours_sql(touched, per_person=True):
    """_SAMPLE_HOURS_SQL for the hours of query ``touched``: of one person's
    type, or (``per_person`` False) of a type as the schema before version 8
    kept them, which earlier steps of MIGRATIONS write."""
    owner = PERSON_COLUMN if per_person else ""
    # Samples have low and high (a summarised point's least and greatest)
    # since version 8's copy of them.
    return _SAMPLE_HOURS_SQL.format(
        touched=touched, owner_match=f"s.{owner} = :person AND " if owner else "",
        owner_column=f"{owner}, " if owner else "", owner_value=":person, " if owner else "",
        least="coalesce(s.low, s.value)" if owner else "s.value", greatest="coalesce(s.high, s.value)" if owner
        else "s.value")


def hours_parameters(type_name, person=FIRST_PERSON):
    """Parameters of _SAMPLE_HOURS_SQL for one person's type."""
    return {"person": person, "type": type_name, "timed": type_name.startswith(TIMED_TYPE_PREFIX),
            "spread": is_cumulative(type_name), "longest": SPREAD_MS_MAX}


# -- The merge by source priority: cumulative types' half-hours, exactly ----

#: A cumulative type's hours are kept per half-hour: a sample's value is
#: split over the half-hours it spans in proportion to time, so a day cut at
#: any whole or half hour (every zone's midnight but a few) gets its share.
BUCKET_MS = 1800 * 1000
#: A cumulative sample longer than this (a week) counts whole at its start,
#: as a sample without a duration does: the merge looks this far back for
#: samples that last into the hours it counts, and one sample dated over
#: years must not make every sync read years.
LONGEST_SPREAD_MS = 7 * 86400 * 1000
#: Sources counted first where several counted the same time: those whose
#: name holds one of these words (in any case), in this order (HealthKit
#: names a source after its device: "Jane's Apple Watch", "Jane's
#: iPhone").  Data entered by hand comes before them, the other sources
#: after them in the order they were first stored: the Health app's default
#: order.  --source-priority changes the words.
SOURCE_PRIORITY = ("watch", "iphone")
#: The metadata key that marks a sample entered by hand in the Health app.
USER_ENTERED_KEY = "HKWasUserEntered"


def user_entered(record):
    """Whether a sample's record (its JSON text) says it was entered by
    hand: metadata HKWasUserEntered true or 1."""
    if record.__class__ is not str or USER_ENTERED_KEY not in record:
        return False
    try:
        metadata = json.loads(record).get("metadata")
        flag = metadata.get(USER_ENTERED_KEY) if metadata.__class__ is dict else None
    except (ValueError, AttributeError, RecursionError):
        return False
    if flag.__class__ is str:
        return flag.strip().lower() in ("1", "true")
    return flag is True or flag.__class__ is int and flag == 1


class SourceRanks:
    """The order in which one person's sources count where they overlap:
    ``key(source, by_hand)`` sorts first the source that counts first."""

    def __init__(self, words, seen):
        #: The priority words, in order.
        self.words = tuple(words)
        #: {source: the order it was first stored in}
        self.seen = seen
        self._keys = {}

    @classmethod
    def of(cls, conn, person, words):
        """The ranks of ``person``'s sources (None: the sources of whoever
        ``conn`` reads, as person_views shows them)."""
        where, params = ("", ()) if person is None else (f" WHERE {PERSON_COLUMN} = ?", (person,))
        table = SAMPLE_SOURCES.name if person is None else f"main.{SAMPLE_SOURCES.name}"
        return cls(words, dict(conn.execute(f"SELECT source, seen FROM {table}{where}", params)))

    def key(self, source, by_hand=False):
        found = self._keys.get((source, by_hand))
        if found is None:
            lowered = source.lower()
            word = next((number for number, word in enumerate(self.words) if word in lowered), len(self.words))
            found = self._keys[(source, by_hand)] = (not by_hand, word, self.seen.get(source, math.inf), source)
        return found


def _uncovered(starts, ends, low, high):
    """The parts of [low, high) outside the disjoint, sorted intervals
    [starts[i], ends[i])."""
    index = bisect.bisect_right(ends, low)
    at = low
    while index < len(starts) and starts[index] < high:
        if starts[index] > at:
            yield at, starts[index]
        at = max(at, ends[index])
        index += 1
    if at < high:
        yield at, high


def _union(intervals):
    """Disjoint sorted (starts, ends) of the union of (start, end) pairs."""
    starts, ends = [], []
    for low, high in sorted(intervals):
        if ends and low <= ends[-1]:
            ends[-1] = max(ends[-1], high)
        else:
            starts.append(low)
            ends.append(high)
    return starts, ends


def merge_by_priority(samples, bucket_ms=BUCKET_MS):
    """The Health app's merge of a cumulative type: {(bucket, source):
    (value counted, milliseconds counted)} from samples (start ms, end ms or
    None, value, rank key, source), rank keys sorting first what counts
    first.  Each stretch of time counts the samples of the first source
    that has one covering it, each its value's share for the time it
    counts, split over buckets (``start // bucket_ms``) in proportion to
    time.  A sample without a duration (or longer than LONGEST_SPREAD_MS)
    counts whole at its start unless a source before its own covers that
    instant.  Samples of one source never hide each other."""
    by_rank = {}
    for sample in samples:
        found = by_rank.get(sample[3])
        if found is None:
            by_rank[sample[3]] = [sample]
        else:
            found.append(sample)
    counted, spans = collections.defaultdict(float), collections.defaultdict(int)
    starts, ends = [], []  # what the sources before have covered
    ranks = sorted(by_rank)
    for number, rank in enumerate(ranks):
        mine = [] if number < len(ranks) - 1 else None  # what the last covers hides nothing
        for start, end, value, _rank, source in by_rank[rank]:
            length = 0 if end is None else end - start
            if length <= 0 or length > LONGEST_SPREAD_MS:
                index = bisect.bisect_right(starts, start) - 1
                if index < 0 or ends[index] <= start:
                    pieces, length = ((start, start),), 0
                else:
                    continue
            elif starts:
                pieces = _uncovered(starts, ends, start, end)
            else:  # the first source: all of it counts, most often in one bucket
                bucket = start // bucket_ms
                if bucket == (end - 1) // bucket_ms:
                    counted[(bucket, source)] += value
                    spans[(bucket, source)] += length
                    if mine is not None:
                        mine.append((start, end))
                    continue
                pieces = ((start, end),)
            if mine is not None and length:
                mine.append((start, end))
            for low, high in pieces:
                for bucket in range(low // bucket_ms, max(low, high - 1) // bucket_ms + 1):
                    part = min(high, (bucket + 1) * bucket_ms) - max(low, bucket * bucket_ms)
                    counted[(bucket, source)] += value if part == length else value * part / length if length else value
                    spans[(bucket, source)] += part
        if mine:
            starts, ends = _union(list(zip(starts, ends)) + mine)
    return {key: (value, spans[key]) for key, value in counted.items()}


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def bucket_key(bucket, bucket_ms=BUCKET_MS):
    """The sample_hours key of a bucket: YYYY-MM-DDTHH, or YYYY-MM-DDTHH:30
    for the second half-hour."""
    stamp = _EPOCH + datetime.timedelta(milliseconds=bucket * bucket_ms)
    return f"{stamp:%Y-%m-%dT%H}" + (f":{stamp.minute:02d}" if stamp.minute else "")


def hour_milliseconds(hour):
    """Milliseconds since 1970 of an hour key's start (YYYY-MM-DDTHH), or
    None for one that is no hour (2026-02-30T08, kept by a version that
    checked only the shape of dates, until version 11 put them aside)."""
    try:
        stamp = datetime.datetime(int(hour[:4]), int(hour[5:7]), int(hour[8:10]), int(hour[11:13]),
                                  tzinfo=datetime.timezone.utc)
    except (ValueError, TypeError):
        return None
    return round((stamp - _EPOCH).total_seconds() * 1000)


def _milliseconds_sql(column):
    """SQL of a canonical UTC column as milliseconds since 1970 (julianday
    keeps whole milliseconds, so rounding gives them back exactly; faster
    than strftime)."""
    return f"CAST(round((julianday({column}) - 2440587.5) * 86400000) AS INTEGER)"


#: Whether a sample's record may say "entered by hand" (user_entered
#: says): it holds USER_ENTERED_KEY.  GLOB rather than instr(), which
#: compares at every character: a 50 MB sync's merges 0.03 s faster.
_MAYBE_BY_HAND = f"record GLOB '*{USER_ENTERED_KEY}*'"
#: A person's samples of a type that count in [:low, :high) (their
#: canonical texts :low_text and :high_text): those starting there, and
#: those starting from :back_text on that last into it, as (start ms, end
#: ms or None, value, source, the record where it may say "entered by
#: hand"{more}).  One range of the samples' key.
_MERGED_SAMPLES_SQL = (
    f"SELECT {_milliseconds_sql('start_date')}, CASE WHEN end_date IS NOT NULL THEN"
    f" {_milliseconds_sql('end_date')} END, value, CAST(coalesce(source_name, '') AS TEXT),"
    f" CASE WHEN {_MAYBE_BY_HAND} THEN record END{{more}}"
    f" FROM main.samples WHERE {PERSON_COLUMN} = :person AND type = :type"
    " AND start_date >= :back_text AND start_date < :high_text AND (start_date >= :low_text OR end_date > :low_text)"
    "{where}")
#: Of a cumulative type: those with a finite number.
_MERGE_SAMPLES_SQL = _MERGED_SAMPLES_SQL.format(
    more="", where=f" AND {_NUMERIC} AND abs(value) <= 1.7976931348623157e308")
#: Per half-hour from :low to :high and source: the samples that start
#: there, and their numbers' count, least and greatest.
_MERGE_BEGUN_SQL = (
    "SELECT substr(start_date, 1, 13) || CASE WHEN substr(start_date, 15, 2) >= '30' THEN ':30' ELSE '' END"
    f" AS bucket, CAST(coalesce(source_name, '') AS TEXT) AS source, count(*), count(CASE WHEN {_NUMERIC} THEN 1 END),"
    f" min(CASE WHEN {_NUMERIC} THEN value END), max(CASE WHEN {_NUMERIC} THEN value END)"
    f" FROM main.samples WHERE {PERSON_COLUMN} = :person AND type = :type AND start_date >= :low_text"
    " AND start_date < :high_text GROUP BY bucket, source")
#: A type's hours from one key to another, rewritten.
_HOURS_DELETE_SQL = (f"DELETE FROM main.sample_hours WHERE {PERSON_COLUMN} = ? AND type = ? AND hour >= ?"
                     " AND hour < ?")
_HOURS_INSERT_SQL = (f"INSERT INTO main.sample_hours ({PERSON_COLUMN}, type, hour, source, category, samples,"
                     " numbers, total, low, high, seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def _stamp_text(milliseconds):
    return _canonical(_EPOCH + datetime.timedelta(milliseconds=milliseconds))


#: The first start of a person's samples of a type that begin up to
#: LONGEST_SPREAD_MS before :low_text and last into it: how far back the
#: merge reads (one range of the samples' key, a week at most).
_MERGE_BACK_SQL = (f"SELECT min(start_date) FROM main.samples WHERE {PERSON_COLUMN} = :person AND type = :type"
                   " AND start_date >= :week_text AND start_date < :low_text AND end_date > :low_text")


def _merge_parameters(conn, person, type_name, low, high):
    """Parameters of the merges' queries of [low, high) (milliseconds):
    its bounds as text, and :back_text, how far back samples last into it."""
    parameters = {"person": person, "type": type_name, "low": low, "high": high, "low_text": _stamp_text(low),
                  "high_text": _stamp_text(high), "week_text": _stamp_text(low - LONGEST_SPREAD_MS)}
    parameters["back_text"] = conn.execute(_MERGE_BACK_SQL, parameters).fetchone()[0] or parameters["low_text"]
    return parameters


#: A cumulative type's samples that count in [:low, :high), summed in SQL
#: for the common case of one source and nothing entered by hand, where
#: nothing hides anything: per source, whether any record may say "entered
#: by hand", and bucket, (value, milliseconds counted) of the samples that
#: count in one bucket (those within it, and those without a duration or
#: longer than LONGEST_SPREAD_MS, whole at their start); a sample that
#: spans buckets is a row of its own (start, end), to be split by time.
#: total() adds as merge_by_priority does, in floating point (sum() of
#: integers fails past 2**63).  (merge_by_priority itself for every sample
#: costs a Python call each: 0.5 s of a month of per-minute data.)
_MERGE_ONE_RANK_SQL = (
    # LIMIT keeps SQLite from flattening the samples' query into the sums,
    # which would convert each date wherever s or e is named.
    "WITH merged(s, e, v, source, record, uuid) AS ("
    + _MERGED_SAMPLES_SQL.format(more=", uuid", where=f" AND {_NUMERIC} AND abs(value) <= 1.7976931348623157e308"
                                                      " LIMIT -1")
    + f"), sized AS (SELECT *, record IS NOT NULL AS hand, s >= 0 AND (e IS NULL OR e <= s"
    f" OR e - s > {LONGEST_SPREAD_MS:d} OR s / {BUCKET_MS:d} = (e - 1) / {BUCKET_MS:d}) AS whole FROM merged)"
    f" SELECT source, max(hand), CASE WHEN whole THEN s / {BUCKET_MS:d} END AS bucket,"
    " CASE WHEN whole THEN NULL ELSE s END AS low, CASE WHEN whole THEN NULL ELSE e END AS high, total(v),"
    f" total(CASE WHEN whole AND e > s AND e - s <= {LONGEST_SPREAD_MS:d} THEN e - s ELSE 0 END)"
    " FROM sized GROUP BY source, bucket, low, high, CASE WHEN whole THEN NULL ELSE uuid END")
#: Whether the samples of _MERGE_ONE_RANK_SQL come from more than one
#: source: 2 then, found as soon as a second one is (a phone's and a
#: Watch's steps alternate), so that such a week is not summed for nothing.
_MERGE_SOURCES_SQL = (f"SELECT count(*) FROM (SELECT DISTINCT source_name FROM main.samples"
                      f" WHERE {PERSON_COLUMN} = :person AND type = :type AND start_date >= :back_text"
                      " AND start_date < :high_text AND (start_date >= :low_text OR end_date > :low_text)"
                      f" AND {_NUMERIC} LIMIT 2)")


def _one_rank_shares(conn, parameters):
    """merge_by_priority's result for the samples of _MERGE_ONE_RANK_SQL
    when they are one source's, none maybe entered by hand; else None."""
    if conn.execute(_MERGE_SOURCES_SQL, parameters).fetchone()[0] > 1:
        return None
    groups = conn.execute(_MERGE_ONE_RANK_SQL, parameters).fetchall()
    if len({group[0] for group in groups}) > 1 or any(group[1] for group in groups):
        return None
    shares, spanning = {}, []
    for source, _hand, bucket, start, end, value, milliseconds in groups:
        if bucket is None:
            spanning.append((start, end, value, 0, source))
        else:
            shares[(bucket, source)] = (value, round(milliseconds))
    for key, (value, milliseconds) in merge_by_priority(spanning).items():
        counted, spans = shares.get(key, (0.0, 0))
        shares[key] = (counted + value, spans + milliseconds)
    return shares


#: Half-hours (_MERGE_HALF_HOURS_SQL) or hours (_PENDING_HOUR_SUMS_SQL)
#: one statement sums: run one at a time, the statements cost more than
#: their sums (16: a month of per-minute data's merge 0.35 s -> 0.27 s).
SUMS_PER_STATEMENT = 16
#: Of half-hour {number}, from ?{low} to ?{high} (canonical texts), of a
#: person's (?1) type (?2): the samples that start there, their values'
#: count, least and greatest, their sources' count, least and greatest,
#: and, of those ending by its end (or without one), the total value and
#: milliseconds; the count of those ending after it (the ones that
#: spread over the next); whether any record may say "entered by hand".
#: Dates compared as text: canonical ones sort in time.
_HALF_HOUR_SUMS = (
    "SELECT {number:d}, count(*), count(value), min(value), max(value), count(source_name), min(source_name),"
    " max(source_name), total(CASE WHEN end_date <= ?{high:d} OR end_date IS NULL THEN value END),"
    f" total(CASE WHEN end_date > start_date AND end_date <= ?{{high:d}} THEN {_milliseconds_sql('end_date')}"
    f" - {_milliseconds_sql('start_date')} END), count(CASE WHEN end_date > ?{{high:d}} THEN 1 END),"
    f" max({_MAYBE_BY_HAND}) FROM main.samples WHERE {PERSON_COLUMN} = ?1 AND type = ?2"
    " AND start_date >= ?{low:d} AND start_date < ?{high:d}")
#: _HALF_HOUR_SUMS of SUMS_PER_STATEMENT half-hours one after
#: another, bounded by ?3 to ?(3 + SUMS_PER_STATEMENT).
_MERGE_HALF_HOURS_SQL = " UNION ALL ".join(_HALF_HOUR_SUMS.format(number=number, low=number + 3, high=number + 4)
                                          for number in range(SUMS_PER_STATEMENT))
#: Of a person's (?1) type (?2): the samples that start from ?3 to ?4 and
#: end after ?4, as (start ms, end ms, value), in the order
#: _MERGE_ONE_RANK_SQL gives those that span buckets.
_MERGE_SPANNING_SQL = (
    f"SELECT {_milliseconds_sql('start_date')} AS low, {_milliseconds_sql('end_date')} AS high, value"
    f" FROM main.samples WHERE {PERSON_COLUMN} = ?1 AND type = ?2 AND start_date >= ?3 AND start_date < ?4"
    " AND end_date > ?4 ORDER BY low, high, uuid")
#: The sources (as stored) of _MERGE_SOURCES_SQL's samples, two at most.
_MERGE_SOURCE_NAMES_SQL = (f"SELECT DISTINCT source_name FROM main.samples WHERE {PERSON_COLUMN} = :person"
                           " AND type = :type AND start_date >= :back_text AND start_date < :high_text"
                           f" AND (start_date >= :low_text OR end_date > :low_text) AND {_NUMERIC} LIMIT 2")


def _half_hour_bounds(low, high):
    """(sample_hours key, canonical text of its start) of each half-hour
    from ``low`` to ``high`` (milliseconds, whole hours), and of ``high``."""
    stamp, hour = _EPOCH + datetime.timedelta(milliseconds=low), datetime.timedelta(hours=1)
    bounds = []
    for _ in range((high - low) // 3600000):
        key = f"{stamp:%Y-%m-%dT%H}"
        bounds += ((key, key + ":00:00.000Z"), (key + ":30", key + ":30:00.000Z"))
        stamp += hour
    key = f"{stamp:%Y-%m-%dT%H}"
    return bounds + [(key, key + ":00:00.000Z")]


def _one_source_rows(conn, parameters):
    """The sample_hours rows _write_merged_hours makes of _one_rank_shares
    for merge_hours's ``parameters``, in the commonest case, summed a
    half-hour at a time so that no statement sorts the samples (sorting
    them cost more than summing): every sample that counts numeric, finite
    and of one named source, none maybe entered by hand, none longer than
    LONGEST_SPREAD_MS that ends after its half-hour, none before 1970.
    Else None, for _one_rank_shares to say."""
    person, type_name, low = parameters["person"], parameters["type"], parameters["low"]
    if low < 0:
        return None
    spanning, source = [], None
    if parameters["back_text"] < parameters["low_text"]:
        # The samples that begin before and last into these hours.
        earlier = dict(parameters, high_text=parameters["low_text"])
        names = [name for (name,) in conn.execute(_MERGE_SOURCE_NAMES_SQL, earlier)]
        if len(names) > 1 or names and names[0].__class__ is not str:
            return None
        source = names[0] if names else None
        for group_source, hand, bucket, start, end, value, _milliseconds in conn.execute(
                _MERGE_ONE_RANK_SQL, earlier).fetchall():
            if hand:
                return None
            if bucket is None:
                spanning.append((start, end, value, 0, group_source))
    bounds = _half_hour_bounds(low, parameters["high"])
    texts = [text for _key, text in bounds]
    rows, sums = {}, {}
    for first in range(0, len(bounds) - 1, SUMS_PER_STATEMENT):
        chunk = texts[first:first + SUMS_PER_STATEMENT + 1]
        chunk += chunk[-1:] * (SUMS_PER_STATEMENT + 1 - len(chunk))  # empty half-hours past the end
        for (number, samples, values, least, most, sources, name, last_name, value, milliseconds, spreading,
             hand) in conn.execute(_MERGE_HALF_HOURS_SQL, [person, type_name] + chunk):
            if not samples:
                continue
            # A value that is no finite number, a source unnamed or a second
            # one, a record maybe entered by hand: _one_rank_shares's case.
            if (values != samples or least.__class__ not in (int, float) or most.__class__ not in (int, float)
                    or least == -math.inf or most == math.inf or sources != samples or name != last_name
                    or name.__class__ is not str or source not in (None, name) or hand):
                return None
            source, at = name, first + number
            key, start_text = bounds[at]
            rows[at] = [person, type_name, key, source, "", samples, samples, 0.0, least, most, 0.0]
            sums[at] = (value, round(milliseconds))
            if spreading:
                for start, end, spread in conn.execute(_MERGE_SPANNING_SQL,
                                                       (person, type_name, start_text, texts[at + 1])):
                    if end - start > LONGEST_SPREAD_MS:
                        return None  # counts whole at its start, among its half-hour's sums
                    spanning.append((start, end, float(spread), 0, source))
    first_bucket = low // BUCKET_MS
    for (bucket, spanning_source), (value, milliseconds) in merge_by_priority(spanning).items():
        at = bucket - first_bucket
        if 0 <= at < len(bounds) - 1:
            row = rows.get(at)
            if row is None:
                row = rows[at] = [person, type_name, bounds[at][0], spanning_source, "", 0, 0, 0.0, None, None, 0.0]
            counted, spans = sums.get(at, (0.0, 0))
            sums[at] = (counted + value, spans + milliseconds)
    for at, (value, milliseconds) in sums.items():
        rows[at][7], rows[at][10] = float(value), round(milliseconds / 1000, 3)
    return bounds[0][0], bounds[-1][0], rows.values()


def merge_hours(conn, person, type_name, low, high, ranks, dates_exist=False):
    """Rewrite the half-hours of a person's cumulative type from ``low`` to
    ``high`` (milliseconds, whole hours) from its samples: per source, the
    value it counts there (merge_by_priority) and the milliseconds it
    counts (as seconds), the samples that start there, their numbers'
    count, least and greatest.  ``dates_exist``: every date of the samples
    is a moment that exists (see is_canonical_date), so that their texts
    sort as time (_one_source_rows compares them)."""
    parameters = _merge_parameters(conn, person, type_name, low, high)
    found = _one_source_rows(conn, parameters) if dates_exist else None
    if found is not None:
        first, last, rows = found
        conn.execute(_HOURS_DELETE_SQL, (person, type_name, first, last))
        conn.executemany(_HOURS_INSERT_SQL, rows)
        return
    shares = _one_rank_shares(conn, parameters)
    if shares is not None:
        _write_merged_hours(conn, parameters, shares)
        return
    # Sources that may hide one another: merge_by_priority holds the
    # samples, a day's at a time.
    key, step = ranks.key, MERGE_HOURS_MAX * 3600 * 1000
    for day in range(low, high, step):
        parameters = _merge_parameters(conn, person, type_name, day, min(day + step, high))
        _write_merged_hours(conn, parameters, merge_by_priority(
            [(start, end, value, key(source, record is not None and user_entered(record)), source)
             for start, end, value, source, record in conn.execute(_MERGE_SAMPLES_SQL, parameters)]))


def _write_merged_hours(conn, parameters, shares):
    """Rewrite the half-hours of merge_hours's ``parameters`` (of
    _merge_parameters) from ``shares`` (of merge_by_priority) and the
    samples that start in each."""
    person, type_name = parameters["person"], parameters["type"]
    first, last = parameters["low"] // BUCKET_MS, parameters["high"] // BUCKET_MS
    rows = {}
    for bucket, source, samples, numbers, least, most in conn.execute(_MERGE_BEGUN_SQL, parameters):
        rows[(bucket, source)] = [person, type_name, bucket, source, "", samples, numbers, 0.0, least, most, 0.0]
    for (bucket, source), (value, milliseconds) in shares.items():
        if first <= bucket < last:
            name = bucket_key(bucket)
            row = rows.get((name, source))
            if row is None:
                row = rows[(name, source)] = [person, type_name, name, source, "", 0, 0, 0.0, None, None, 0.0]
            row[7], row[10] = float(value), round(milliseconds / 1000, 3)
    conn.execute(_HOURS_DELETE_SQL, (person, type_name, bucket_key(first), bucket_key(last)))
    conn.executemany(_HOURS_INSERT_SQL, rows.values())


# -- Sleep: the stages, and each night's time counted once per source --------

#: The sleep type (charted per night and stage).
SLEEP_TYPE = "HKCategoryTypeIdentifierSleepAnalysis"
#: Sleep stages as stored (HKCategoryValueSleepAnalysis numbers and names)
#: -> the stage shown.
SLEEP_STAGE_VALUES = {
    0: "in_bed", 1: "unspecified", 2: "awake", 3: "core", 4: "deep", 5: "rem",
    "inbed": "in_bed", "asleep": "unspecified", "asleepunspecified": "unspecified", "awake": "awake",
    "asleepcore": "core", "core": "core", "asleepdeep": "deep", "deep": "deep", "asleeprem": "rem", "rem": "rem"}
#: Stages that count as asleep.
ASLEEP_STAGES = ("deep", "core", "rem", "unspecified")


def sleep_stage(value):
    """The stage of a sleep sample's value, or None."""
    if isinstance(value, float) and float.is_integer(value):
        value = int(value)
    if isinstance(value, str):
        text = value.strip().lower()
        for prefix in ("hkcategoryvaluesleepanalysis", "sleepanalysis"):
            if text.startswith(prefix):
                text = text[len(prefix):]
        text = text.replace("_", "").replace(" ", "")
        try:
            number = float(text)
        except ValueError:
            return SLEEP_STAGE_VALUES.get(text)
        return SLEEP_STAGE_VALUES.get(int(number)) if number.is_integer() else None
    return SLEEP_STAGE_VALUES.get(value) if isinstance(value, int) else None


#: What a sleep source's hours are kept under when its samples were entered
#: by hand: its name and this (the night's ranking puts them first).
BY_HAND_SUFFIX = " (entered by hand)"


def sleep_source(source, by_hand):
    """The ``source`` of a sleep sample's hours: its name, marked when the
    sample was entered by hand."""
    return source + BY_HAND_SUFFIX if by_hand else source


def sleep_source_parts(kept):
    """(source name, entered by hand) of a sleep hours' ``source``."""
    return (kept[:-len(BY_HAND_SUFFIX)], True) if kept.endswith(BY_HAND_SUFFIX) else (kept, False)


#: Sleep stages whose time a source's samples count once together (one
#: moment asleep is asleep once, whatever stages overlap there).
_SLEEP_GROUPS = {stage: "asleep" for stage in ASLEEP_STAGES}
#: Of sleep: every one (those before cover what later ones repeat), in
#: order of start, and whether it is a night's total (HAE_NIGHT_PREFIX).
_SLEEP_MERGE_SQL = _MERGED_SAMPLES_SQL.format(
    more=f", substr(uuid, 1, {len(HAE_NIGHT_PREFIX)}) = '{HAE_NIGHT_PREFIX}'", where=" ORDER BY start_date")


def _category_text(value):
    """A category sample's value as sample_hours keeps it (SQLite's text of it)."""
    if value is None:
        return ""
    if value.__class__ is float:
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


def merge_sleep_hours(conn, person, type_name, low, high, ranks):
    """Rewrite the hours of a person's sleep from ``low`` to ``high``
    (milliseconds, whole hours): per source (entered by hand apart) and
    value, the samples that start in each hour and the time they count,
    each moment once per source among its asleep stages (and among its
    awake, its in-bed samples): overlapping stages of one source are not
    counted twice.  A night's figures are then sums of hours."""
    parameters = _merge_parameters(conn, person, type_name, low, high)
    reach, rows, stages, hours = {}, {}, {}, {}
    for start, end, value, source, record, whole in conn.execute(_SLEEP_MERGE_SQL, parameters):
        kept = source if record is None else sleep_source(source, user_entered(record))
        stage = stages[value] if value in stages else stages.setdefault(value, sleep_stage(value))
        counted = 0
        if whole and end is not None and end > start:
            counted = end - start  # a night's total of a stage (HAE_NIGHT_PREFIX): whole
        elif end is not None and end > start:
            group = (kept, _SLEEP_GROUPS.get(stage, stage)) if stage is not None else None
            begin = start if group is None else max(start, reach.get(group, start))
            counted = max(0, end - begin)
            if group is not None:
                reach[group] = max(end, reach.get(group, end))
        if start < low:
            continue
        hour = hours.get(start // 3600000)
        if hour is None:
            hour = hours[start // 3600000] = bucket_key(start // 3600000, 3600000)
        key = (hour, kept, value, value.__class__)  # 1 and 1.0 are kept apart, as SQLite does
        row = rows.get(key)
        if row is None:
            row = rows[key] = [person, type_name, hour, kept, _category_text(value), 0, 0, 0.0, None, None, 0.0]
        row[5] += 1
        row[10] += counted / 1000
        if value.__class__ in (int, float) and math.isfinite(value):
            row[6] += 1
            row[7] += value
            row[8] = value if row[8] is None or value < row[8] else row[8]
            row[9] = value if row[9] is None or value > row[9] else row[9]
    conn.execute(_HOURS_DELETE_SQL, (person, type_name, bucket_key(low // 3600000, 3600000),
                                     bucket_key(high // 3600000, 3600000)))
    conn.executemany(_HOURS_INSERT_SQL, rows.values())


# -- Totals kept up to date: the hours a sync touched, made again -----------

def hours_merger(type_name):
    """How a type's hours are made in Python, or None (in SQL,
    _SAMPLE_HOURS_SQL): a type that adds up is merged by source priority
    over time, sleep counted once per source."""
    if is_cumulative(type_name):
        return merge_hours
    return merge_sleep_hours if type_name == SLEEP_TYPE else None


def _put_setting(conn, name, value):
    conn.execute(f"INSERT OR REPLACE INTO main.{SETTINGS.name} (name, value) VALUES (?, ?)", (name, value))


def source_priority_words(conn):
    """The priority words the stored totals were merged by."""
    row = conn.execute(f"SELECT value FROM main.{SETTINGS.name} WHERE name = 'source_priority'").fetchone()
    return tuple(word for word in row[0].split(",") if word) if row and row[0] else SOURCE_PRIORITY


#: Hours a merge in Python reads the samples of at a time: it holds them
#: all (a day of a type sampled each minute is 1,440 of them; a week's
#: held a 50 MB sync's receiver 5 MB higher).
MERGE_HOURS_MAX = 24
#: Hours a merge is given at a time: each reads back as far as samples
#: last into its hours (up to LONGEST_SPREAD_MS), so a week costs that
#: once rather than seven times; what holds samples splits it by days.
MERGE_RUN_HOURS = 7 * 24


def merge_pending_hours(conn, person, type_name, hours, words):
    """Rewrite ``hours`` (sorted hour keys) of a person's type that
    hours_merger makes: runs of hours a week long at most (MERGE_RUN_HOURS),
    each one range of samples read back as far as samples last into it."""
    merge = hours_merger(type_name)
    if merge is merge_hours:
        # Pending hours are merged once the database is migrated: version
        # 11 put aside the dates that do not exist, which syncs refuse.
        merge = functools.partial(merge_hours, dates_exist=True)
    ranks = SourceRanks.of(conn, person, words)
    run_start = previous = None
    for at in [at for at in map(hour_milliseconds, hours) if at is not None] + [None]:
        if run_start is not None and (at is None or at - previous > 3600 * 1000
                                      or at - run_start >= MERGE_RUN_HOURS * 3600 * 1000):
            merge(conn, person, type_name, run_start, previous + 3600 * 1000, ranks)
            run_start = None
        if at is not None:
            run_start = at if run_start is None else run_start
            previous = at


def merge_all_hours(conn, person, type_name, words, report=None):
    """Rewrite every hour of a person's type that hours_merger makes,
    MERGE_RUN_HOURS at a time."""
    # The first and last samples' hours; a date that is no date (kept by a
    # version before 11, which puts them aside after this step) is read
    # as SQLite reads it, or not at all.
    first, last = conn.execute(f"SELECT min(ms), max(ms) FROM (SELECT {_milliseconds_sql('start_date')} AS ms"
                               f" FROM main.samples WHERE {PERSON_COLUMN} = ? AND type = ? AND start_date IN"
                               f" ((SELECT min(start_date) FROM main.samples WHERE {PERSON_COLUMN} = ?1 AND type = ?2),"
                               f" (SELECT max(start_date) FROM main.samples WHERE {PERSON_COLUMN} = ?1 AND type = ?2)))",
                               (person, type_name)).fetchone()
    if first is None:
        return
    low = first // 3600000 * 3600000
    high = last // 3600000 * 3600000 + 3600 * 1000 + LONGEST_SPREAD_MS  # what its last samples span
    conn.execute(f"DELETE FROM main.sample_hours WHERE {PERSON_COLUMN} = ? AND type = ?", (person, type_name))
    ranks = SourceRanks.of(conn, person, words)
    step = MERGE_RUN_HOURS * 3600 * 1000
    for start in range(low, high, step):
        hours_merger(type_name)(conn, person, type_name, start, min(start + step, high), ranks)
    if report:
        how = "merged by source priority" if is_cumulative(type_name) else "counted once per source"
        report(f"  {short_type_name(type_name)}: hourly totals {how}")


#: Of hour {number} (its key ?{hour}) of a person's (?1) type (?2): the
#: samples that start there, their sources' count, least and greatest,
#: their values' count, least, greatest and total, the least of their
#: lows (else values) and the greatest of their highs (else values).  The
#: hour's bounds are _SAMPLE_HOURS_SQL's texts (of a type neither spread
#: nor timed).
_HOUR_SUMS = (
    "SELECT {number:d}, count(*), count(source_name), min(source_name), max(source_name), count(value),"
    " min(value), max(value), total(value), min(coalesce(low, value)), max(coalesce(high, value))"
    " FROM main.samples"
    f" WHERE {PERSON_COLUMN} = ?1 AND type = ?2 AND start_date >= ?{{hour:d}} || ':00:00.000Z'"
    " AND start_date < ?{hour:d} || ';'")
#: _HOUR_SUMS of SUMS_PER_STATEMENT hours, their keys ?3 to
#: ?(2 + SUMS_PER_STATEMENT).
_PENDING_HOUR_SUMS_SQL = " UNION ALL ".join(_HOUR_SUMS.format(number=number, hour=number + 3)
                                            for number in range(SUMS_PER_STATEMENT))
#: _SAMPLE_HOURS_SQL of one hour of a person's type (its key :hour).
_ONE_HOUR_SQL = _hours_sql("SELECT :hour")
#: _HOURS_INSERT_SQL over the rows an hour had, as _SAMPLE_HOURS_SQL writes.
_HOURS_REPLACE_SQL = "INSERT OR REPLACE" + _HOURS_INSERT_SQL[len("INSERT"):]


def _one_source_hours(conn, parameters, hours):
    """Rewrite ``hours`` (keys) of a person's type neither spread nor timed
    (``parameters``: hours_parameters()) as _SAMPLE_HOURS_SQL does, each
    hour's samples summed with one aggregate over its range of the
    samples' key, SUMS_PER_STATEMENT hours per statement, so that no
    statement sorts the samples (_SAMPLE_HOURS_SQL's GROUP BY sorts them
    all, which cost more than summing).  The sums are the same: the same
    values added in the same order, the key's.  An hour whose samples are
    not all numbers of one named source (or all unnamed) is left to
    _SAMPLE_HOURS_SQL."""
    person, type_name = parameters["person"], parameters["type"]
    rows = []
    for first in range(0, len(hours), SUMS_PER_STATEMENT):
        chunk = hours[first:first + SUMS_PER_STATEMENT]
        count = len(chunk)
        chunk += chunk[-1:] * (SUMS_PER_STATEMENT - count)  # past the end: the last again, not counted
        for (number, samples, sources, name, last_name, values, least, most, total, low,
             high) in conn.execute(_PENDING_HOUR_SUMS_SQL, [person, type_name] + chunk):
            if not samples or number >= count:
                continue
            # No value null, the least and the greatest numbers: every value
            # is one (SQLite sorts numbers before text and blobs), so that
            # _SAMPLE_HOURS_SQL's numbers, total, low and high are these.
            if (values == samples and least.__class__ in (int, float) and most.__class__ in (int, float)
                    and (sources == 0 or sources == samples and name == last_name and name.__class__ is str)):
                rows.append((person, type_name, chunk[number], name or "", "", samples, values, total, low, high,
                             0.0))
            else:
                conn.execute(_ONE_HOUR_SQL, dict(parameters, hour=chunk[number]))
    conn.executemany(_HOURS_REPLACE_SQL, rows)


def _update_pending_hours(conn):
    """Recompute the hours that syncs noted as pending, then forget them: a
    cumulative type's merged by source priority (merge_pending_hours), the
    others' by SQL, a timed type's a week at a time (HOURS_PER_STATEMENT),
    the others' an hour at a time (_one_source_hours)."""
    sql = _hours_sql(_PENDING_HOURS + " AND hour >= :since AND (:until IS NULL OR hour < :until)")
    words = None
    for person, type_name in conn.execute(
            f"SELECT DISTINCT {PERSON_COLUMN}, type FROM sample_hours_pending").fetchall():
        parameters = hours_parameters(type_name, person)
        if hours_merger(type_name) or not parameters["timed"]:
            hours = [hour for (hour,) in conn.execute(_PENDING_HOURS + " ORDER BY hour", parameters)]
            if hours_merger(type_name):
                words = words or source_priority_words(conn)
                merge_pending_hours(conn, person, type_name, hours, words)
            else:
                _one_source_hours(conn, parameters, hours)
            continue
        starts = [hour for (hour,) in conn.execute(_PENDING_HOURS_FROM, parameters)]
        for since, until in zip(starts, starts[1:] + [None]):
            conn.execute(sql, dict(parameters, since=since, until=until))
    conn.execute("DELETE FROM sample_hours_pending")


# -- Migrations: the later steps; MIGRATIONS --------------------------------

def _recount_sample_hours(conn, report=None, per_person=True):
    """Rebuild sample_hours from the samples: as the current schema keeps
    them, or (``per_person`` False) as earlier steps of MIGRATIONS did."""
    conn.execute("DELETE FROM sample_hours")
    conn.execute("DELETE FROM sample_hours_pending")
    owner = PERSON_COLUMN if per_person else FIRST_PERSON
    words = source_priority_words(conn) if per_person else None
    for person, type_name in conn.execute(f"SELECT {owner}, type FROM sample_types ORDER BY 1, 2").fetchall():
        _count_hours_of(conn, person, type_name, words, report, per_person)


def _count_hours_of(conn, person, type_name, words, report=None, per_person=True):
    """Count the hourly totals of a person's type from its samples (none
    are kept for it: see _recount_sample_hours), as _recount_sample_hours
    does; ``words``: source_priority_words()."""
    if per_person and hours_merger(type_name):
        merge_all_hours(conn, person, type_name, words, report)
        return
    where = f"{PERSON_COLUMN} = :person AND type = :type" if per_person else "type = :type"
    sql = _hours_sql(_SAMPLE_HOURS_OF.format(samples="main.samples", where=where), per_person)
    conn.execute(sql, dict(hours_parameters(type_name, person), spread=per_person is False and is_cumulative(
        type_name)))
    if report:
        report(f"  {short_type_name(type_name)}: hourly totals")


def _recount_sample_hours_v4(conn, report):
    _recount_sample_hours(conn, report, per_person=False)


def _migrate_v3(conn, report):
    """Hourly totals per type and source: charts over years read these,
    not millions of samples."""
    conn.execute("CREATE TABLE sample_hours (type TEXT NOT NULL, hour TEXT NOT NULL, source TEXT NOT NULL,"
                 " category TEXT NOT NULL, samples INTEGER NOT NULL, numbers INTEGER NOT NULL, total REAL NOT NULL,"
                 " low REAL, high REAL, seconds REAL NOT NULL, PRIMARY KEY (type, hour, source, category))"
                 " WITHOUT ROWID")
    conn.execute("CREATE TABLE sample_hours_pending (type TEXT NOT NULL, hour TEXT NOT NULL,"
                 " PRIMARY KEY (type, hour)) WITHOUT ROWID")
    _recount_sample_hours(conn, report, per_person=False)


#: Errors sqlite3 raises for a value it cannot bind: the row's fault, not the database's.
_UNBINDABLE = (ValueError, OverflowError, sqlite3.InterfaceError, sqlite3.ProgrammingError)


#: Rows read again per query: few, as a record may be megabytes.
REDERIVE_BATCH = 64


def _rederive_columns(conn, report):
    """Derive again, from each row's record, the columns a version reads
    better (names and numbers of HealthKit's enums, nested forms, other
    field names): the rows of workouts, doses and medications, and the
    route points that lack a coordinate (a table of millions, read only
    where the older version found nothing), in key order a few at a time.
    Keys and dates stay; a record no longer readable keeps its columns."""
    for section in SECTIONS:
        names = [name for name, _type in section.columns]
        if "record" not in names or section is SAMPLES or not _table_exists(conn, section.table):
            continue  # a section's table made later is made as it is now
        dates = {column for column, _field in section.dates}
        derived = [name for name in names if name not in section.key and name != "record" and name not in dates]
        where = " OR ".join(f"{name} IS NULL" for name in derived) if section.clustered else "true"
        keys = ", ".join(section.key)
        update = (f"UPDATE {section.table} SET {', '.join(f'{name} = ?' for name in derived)}"
                  f" WHERE {' AND '.join(f'{name} = ?' for name in section.key)}")
        # In key order, a batch at a time (the rows after the last one read).
        select = (f"SELECT {keys}, {', '.join(derived)}, record FROM {section.table} WHERE ({where})"
                  f" AND ({keys}) > ({', '.join('?' * len(section.key))}) ORDER BY {keys} LIMIT {REDERIVE_BATCH:d}")
        after, read, changed = ("",) * len(section.key), 0, 0
        while True:
            rows = conn.execute(select, after).fetchall()
            if not rows:
                break
            updates = []
            for row in rows:
                key, stored, record = row[:len(section.key)], row[len(section.key):-1], row[-1]
                try:
                    element = JsonReader.decode(record)
                except (ValueError, StopIteration):
                    continue
                fresh = None
                if element.__class__ is dict:
                    with contextlib.suppress(TypeError, ValueError, OverflowError):  # as stored, then
                        fresh = section.make_row(element, record, key[0] if section.clustered
                                                 else (section.app_keys or (section.name,))[0])
                if fresh is not None and fresh.__class__ is not str:
                    values = tuple(fresh[names.index(name)] for name in derived)
                    if values != tuple(stored):
                        updates.append(values + tuple(key))
            try:
                conn.executemany(update, updates)
            except _UNBINDABLE:  # a value sqlite3 cannot bind (a lone surrogate): that row stays as it was
                for values in updates:
                    with contextlib.suppress(*_UNBINDABLE):
                        conn.execute(update, values)
            after = rows[-1][:len(section.key)]
            before, read, changed = read, read + len(rows), changed + len(updates)
            if read // MIGRATION_PROGRESS_ROWS != before // MIGRATION_PROGRESS_ROWS:
                report(f"  {section.table}: {read:,} rows")
        report(f"  {section.table}: {changed:,} of {read:,} rows read again")


def _add_sync_columns(conn, names):
    # Adding a column rewrites nothing: the syncs before have none.
    present = {row[1] for row in conn.execute(f"PRAGMA table_info({SYNCS.name})")}
    for name, kind in SYNCS.columns:
        if name in names and name not in present:
            conn.execute(f"ALTER TABLE {SYNCS.name} ADD COLUMN {name} {kind}")


def _add_body_digests(conn, report):
    # The syncs before stay without a digest: a retry of one of them is
    # read again, as before.
    _add_sync_columns(conn, SYNCS_V6_COLUMNS)
    conn.execute(SYNCS_BY_EXPORT_INDEX)


def _add_body_blocks(conn, report):
    # The syncs before have no blocks: a body starting as one of them is
    # kept until its end, as in version 6.
    _add_sync_columns(conn, SYNCS_V7_COLUMNS)


#: Tables rebuilt in key order a batch of this many rows at a time (with
#: a progress line each MIGRATION_PROGRESS_ROWS).
OWNER_BATCH_ROWS = 250000


def _table_exists(conn, table):
    found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    return found is not None


def _own_by_first_person(conn, table, create_sql, key, report):
    """Rebuild ``table`` with PERSON_COLUMN first (``create_sql(name)``
    makes the new table), every row the first person's; counts compared.
    A table stored by ``key`` (WITHOUT ROWID) is copied in key order, a
    batch at a time, so that the new one is written from front to back."""
    if not _table_exists(conn, table):
        return
    names = ", ".join(row[1] for row in conn.execute(f"PRAGMA table_info({table})"))
    copy = f"{table}_v8"
    conn.execute(create_sql(copy))
    insert = f"INSERT INTO {copy} ({PERSON_COLUMN}, {names}) SELECT {FIRST_PERSON:d}, {names} FROM {table}"
    copied = 0
    if key:
        keys = ", ".join(key)
        newest = ", ".join(f"{name} DESC" for name in (PERSON_COLUMN,) + key)
        last = ()
        while True:
            where = f" WHERE ({keys}) > ({', '.join('?' * len(key))})" if last else ""
            step = conn.execute(f"{insert}{where} ORDER BY {keys} LIMIT ?", (*last, OWNER_BATCH_ROWS)).rowcount
            copied += step
            if copied // MIGRATION_PROGRESS_ROWS != (copied - step) // MIGRATION_PROGRESS_ROWS:
                report(f"  {table}: {copied:,} rows")
            if step < OWNER_BATCH_ROWS:
                break
            last = conn.execute(f"SELECT {keys} FROM {copy} ORDER BY {newest} LIMIT 1").fetchone()
    else:
        copied = conn.execute(insert).rowcount
    stored = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    kept = conn.execute(f"SELECT count(*) FROM {copy}").fetchone()[0]
    if not copied == kept == stored:
        raise sqlite3.DatabaseError(f"migration of {table} lost rows ({kept} of {stored})")
    conn.execute(f"DROP TABLE {table}")
    conn.execute(f"ALTER TABLE {copy} RENAME TO {table}")
    report(f"  {table}: {kept:,} rows, the first person's")


def _migrate_people(conn, report):
    """People: every row of health data belongs to one, the first person
    (named FIRST_PERSON_NAME) owning all rows stored before."""
    conn.execute(PEOPLE.create_sql())
    conn.execute(PEOPLE.insert_sql(("id", "name", "admin", "created_at")),
                 {"id": FIRST_PERSON, "name": FIRST_PERSON_NAME, "admin": 1, "created_at": utc_now()})
    for section in SECTIONS:
        if not _table_exists(conn, section.table):
            continue  # a section's table made later is made as it is now
        _own_by_first_person(conn, section.table, section.table_sql, section.key if section.clustered else (),
                             report)
        for statement in section.index_sql:
            conn.execute(statement)
    for table in DERIVED_TABLES_V8:
        old_key = table.key[1:] if table is not SAMPLE_TYPES else ()  # sample_types had a rowid
        _own_by_first_person(conn, table.name, table.create_sql, old_key, report)
    _add_sync_columns(conn, SYNCS_V8_COLUMNS)
    conn.execute(SYNCS_BY_PERSON_INDEX)
    free = conn.execute("PRAGMA freelist_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
    if free > 100 * MIB:
        report(f"  The file keeps {free / 1e6:,.0f} MB of the tables as they were as free space, which later "
               "syncs fill; to give it back to the disk now, stop the receiver and run: sqlite3 <database> VACUUM")


def _merge_by_source_priority(conn, report):
    """Version 9: cumulative types' half-hours merged by source priority over
    time (merge_by_priority), from the samples; sleep counted once per source;
    the order sources were first stored (taken from the hourly totals: the
    first hour each source has), and the settings the totals depend on."""
    for table in (SAMPLE_SOURCES, SETTINGS):
        conn.execute(table.create_sql())
    conn.execute(f"INSERT INTO {SAMPLE_SOURCES.name} ({PERSON_COLUMN}, source, seen) SELECT {PERSON_COLUMN}, source,"
                 f" row_number() OVER (PARTITION BY {PERSON_COLUMN} ORDER BY min(hour), source)"
                 f" FROM sample_hours GROUP BY {PERSON_COLUMN}, source")
    words = source_priority_words(conn)
    for person, type_name in conn.execute(f"SELECT {PERSON_COLUMN}, type FROM {SAMPLE_TYPES.name}"
                                          f" ORDER BY 1, 2").fetchall():
        if hours_merger(type_name):
            conn.execute(f"DELETE FROM sample_hours_pending WHERE {PERSON_COLUMN} = ? AND type = ?",
                         (person, type_name))
            merge_all_hours(conn, person, type_name, words, report)


def _give_an_id(conn, report):
    """Version 10: the database's own id, random, in its header's
    application_id (PRAGMA): every copy of it keeps it, so a backup says
    whose it is (see backups_of), and it is read from a .gz backup's first
    bytes without unpacking the rest."""
    conn.execute(f"PRAGMA application_id = {secrets.randbelow(2 ** 31 - 1) + 1:d}")


#: Where a stored date may not exist (SQL of a column): the rows that
#: is_canonical_date then looks at one by one (a day from the 29th on, or
#: anything but the canonical form in ASCII digits in range).
_DATE_TO_LOOK_AT = ("NOT ({column} GLOB '[12][0-9][0-9][0-9]-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-5][0-9]"
                    ".[0-9][0-9][0-9]Z' AND substr({column}, 1, 4) BETWEEN '1900' AND '2199'"
                    " AND substr({column}, 6, 2) BETWEEN '01' AND '12' AND substr({column}, 9, 2) BETWEEN '01' AND '28'"
                    " AND substr({column}, 12, 2) <= '23') AND NOT is_date({column})")


def _rejected_where(section):
    """SQL of the ``rejected`` row's section of a row of ``section``, as a sync names it."""
    if section is SAMPLES:
        return "type"
    if section.shape == "routes":
        return "'workoutRoutes/' || workout_uuid"
    return "'" + section.app_keys[0] + "'"


def _keep_aside_dates_that_do_not_exist(conn, report):
    """Version 11: rows stored before a date was checked to exist
    (2026-02-30, hour 24, second 60, digits other than ASCII's: version 10
    checked only the shape) go to ``rejected`` with the reason, as a sync
    now sends them there, and such an end date becomes NULL; the totals of
    the types they were in are counted again (they never reached the hourly
    totals, and verify, then restore, refused the database)."""
    conn.create_function("is_date", 1, lambda text: text.__class__ is str and is_canonical_date(text))
    touched = set()
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    for section in SECTIONS:
        if not section.dates or section.table not in tables:  # a section newer than version 10: made at start
            continue
        (first, field), *others = section.dates
        where = _DATE_TO_LOOK_AT.format(column=first)
        if section is SAMPLES:  # their types' totals, of rows moved away or whose end goes
            touched.update(conn.execute(f"SELECT DISTINCT {PERSON_COLUMN}, type FROM samples WHERE {where}"))
            for column, _field in others:
                touched.update(conn.execute(f"SELECT DISTINCT {PERSON_COLUMN}, type FROM samples WHERE {column}"
                                            f" IS NOT NULL AND " + _DATE_TO_LOOK_AT.format(column=column)))
        moved = conn.execute(f"INSERT INTO {REJECTED_TABLE} (sync_id, section, reason, record) SELECT"
                             f" {section.sync_columns[0]}, {_rejected_where(section)}, ?, record FROM {section.table}"
                             f" WHERE {where}", (f"{field} is not a date (migration to version 11)",)).rowcount
        conn.execute(f"DELETE FROM {section.table} WHERE {where}")
        for column, _field in others:
            conn.execute(f"UPDATE {section.table} SET {column} = NULL WHERE {column} IS NOT NULL AND "
                         + _DATE_TO_LOOK_AT.format(column=column))
        if moved:
            report(f"  {section.table}: {moved:,} rows whose dates do not exist are kept in the rejected table")
    words = source_priority_words(conn)
    for person, type_name in sorted(touched):
        for table in (SAMPLE_TYPES, SAMPLE_HOURS, SAMPLE_HOURS_PENDING):
            conn.execute(f"DELETE FROM {table.name} WHERE {PERSON_COLUMN} = ? AND type = ?", (person, type_name))
        conn.execute(f"INSERT INTO {SAMPLE_TYPES.name} ({PERSON_COLUMN}, type, rows, first_date, last_date)"
                     f" SELECT {PERSON_COLUMN}, type, count(*), min(start_date), max(start_date) FROM samples"
                     f" WHERE {PERSON_COLUMN} = ? AND type = ? GROUP BY {PERSON_COLUMN}, type", (person, type_name))
        _count_hours_of(conn, person, type_name, words, report)


#: Every schema change, in order: step N brings a database from version N
#: to N + 1, and PRAGMA user_version counts the steps applied.  A new column
#: or key is a new step at the end; a step once released is never edited.
#: (A new section's table, or a new index in SECTIONS, needs no step: what a
#: database lacks of them is created at every start.)
def _add_sample_ranges(conn, report):
    """Version 12: samples' least and greatest of a summarised point (the
    other app's minute of heart rate as Min, Avg, Max).  Instant: columns
    added at the end (version 8's copy, made as SECTIONS are now, has them)."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(samples)")}
    for name in ("low", "high"):
        if name not in have:
            conn.execute(f"ALTER TABLE samples ADD COLUMN {name} REAL")


MIGRATIONS = (
    Migration("the first schema", _create_v1),
    Migration("samples and route points clustered by time, dates in UTC", _migrate_v2, rewrites=True),
    Migration("hourly totals per type and source", _migrate_v3),
    Migration("cumulative types' totals spread over the half-hours their samples span", _recount_sample_hours_v4),
    Migration("workouts, doses, medications and route points read again from their records", _rederive_columns),
    Migration("each stored sync's body digest, to answer a byte-identical retry from its record", _add_body_digests),
    Migration("each stored sync's CRC-32 per MiB of its body, to read a differing one as it arrives", _add_body_blocks),
    Migration("people: every row belongs to a person, the rows so far to the first", _migrate_people, rewrites=True),
    Migration("cumulative types merged by source priority over time, exactly", _merge_by_source_priority),
    Migration("the database's own id, which its backups keep", _give_an_id),
    Migration("stored dates that do not exist kept aside, as syncs now keep them", _keep_aside_dates_that_do_not_exist),
    Migration("samples' least and greatest of a summarised point", _add_sample_ranges),
)
#: The schema version this receiver writes.
SCHEMA_VERSION = len(MIGRATIONS)
#: The version that made PEOPLE.
PEOPLE_VERSION = next(number + 1 for number, step in enumerate(MIGRATIONS) if step.apply is _migrate_people)
#: The version that made SETTINGS.
SETTINGS_VERSION = next(number + 1 for number, step in enumerate(MIGRATIONS)
                        if step.apply is _merge_by_source_priority)
#: The setting that says the receiver has run with a key of its own
#: (never the key): a start without it then refuses to run without one.
RECEIVER_KEY_SETTING = "receiver_key"
#: The setting that names the folder the receiver last archived bodies in
#: (--archive): a person's deletion removes theirs there too.
ARCHIVE_SETTING = "archive"


# -- Writing a sync: its result, its syncs row, what it notes as pending ----

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
    #: The body's SHA-256 (hex), once it was read to its end.
    body_sha256: typing.Optional[str] = None
    #: A byte-identical retry: the sync whose record answered it.
    same_body_as: typing.Optional[int] = None
    #: Digests of the body's blocks (see BODY_BLOCK), as stored.
    body_blocks: typing.Optional[str] = None
    #: Whose sync it was (an id of PEOPLE).
    person: int = FIRST_PERSON

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

    def sync(self, received_at, envelope_text):
        """The syncs row of this stored sync."""
        routes = ROUTE_POINTS.name
        counts = json.dumps({name: count for name, count in self.received.items() if count}, separators=(",", ":"))
        return Sync(self.sync_id, received_at, self.remote_addr, *envelope_columns(self.envelope),
                    self.body_bytes, self.records, self.new_records, self.duplicates, self.rejected,
                    self.received[routes], self.inserted[routes], self.sections, int(self.duration * 1000),
                    SyncStatus.OK, None, _envelope_text(envelope_text), self.body_sha256, self.same_body_as, counts,
                    self.body_blocks, self.person)

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
    #: SyncStatus.REJECTED (the client's fault) or FAILED (the server's).
    status: str
    error: str
    body_bytes: typing.Optional[int] = None
    duration: float = 0.0
    envelope_text: typing.Optional[dict] = None
    sync_source: typing.Any = None
    #: Whose sync it was (an id of PEOPLE).
    person: int = FIRST_PERSON

    def sync(self, received_at):
        """The syncs row that keeps it."""
        envelope = _envelope_text(self.envelope_text) if self.envelope_text else None
        return Sync(received_at=received_at, remote_addr=self.remote_addr, sync_source=self.sync_source,
                    body_bytes=self.body_bytes, duration_ms=int(self.duration * 1000), status=self.status,
                    error=self.error, envelope=envelope, person=self.person)


def envelope_columns(envelope):
    """(sync_source, export_date, start_date, end_date) of a syncs row, from
    the envelope's decoded fields: dates canonical UTC where readable."""
    return (envelope.get("syncSource"),
            *(utc_date(envelope.get(name)) or envelope.get(name) for name in ("exportDate", "startDate", "endDate")))


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
    if isinstance(exc, OSError):  # creating its file
        return (f"The database {path} cannot be opened ({exc.strerror}); check that its folder exists and is "
                "writable.")
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


#: Flags of a new private file: never an existing file, never through a link.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


def create_private(path):
    """Create ``path`` empty, readable only by its owner (0600): health data
    never lands in a file other users can read, nor in one someone planted
    (an existing file or link is an error, FileExistsError).  SQLite gives a
    database's -wal and -shm files the database's permissions."""
    os.close(os.open(path, _NEW_FILE, 0o600))


def database_size(path):
    """Bytes of the database file and its write-ahead log."""
    return sum(os.path.getsize(path + suffix) for suffix in ("", "-wal") if os.path.exists(path + suffix))


#: Keeps sample_types (rows, first and last date per type) current as rows
#: arrive: counting 5 million samples per type would take a second per page.
_SAMPLE_TYPES_SQL = (
    f"INSERT INTO sample_types ({PERSON_COLUMN}, type, rows, first_date, last_date) VALUES (?5, ?1, ?2, ?3, ?4)"
    f" ON CONFLICT ({PERSON_COLUMN}, type) DO UPDATE SET rows = rows + excluded.rows,"

    " first_date = min(coalesce(first_date, excluded.first_date), excluded.first_date),"
    " last_date = max(coalesce(last_date, excluded.last_date), excluded.last_date)")


#: Notes the hours a sync brought new samples to, in its own transaction;
#: sample_hours is brought up to date after the answer (update_hours).
_NOTE_PENDING_HOURS_SQL = (f"INSERT OR IGNORE INTO main.sample_hours_pending ({PERSON_COLUMN}, type, hour)"
                           " SELECT :person, :type, * FROM ("
                           + _SAMPLE_HOURS_OF.format(samples="stage.samples", where="rowid BETWEEN :first AND :last")
                           + ")")
_NOTE_PENDING_HOUR_SQL = (f"INSERT OR IGNORE INTO main.sample_hours_pending ({PERSON_COLUMN}, type, hour)"
                          " VALUES (?, ?, ?)")
#: The staged samples (rowids :first to :last) longer than an hour and at
#: most LONGEST_SPREAD_MS, whose every hour is noted (the shorter ones' are
#: their start's and their end's: _SAMPLE_HOURS_OF); the text comparison
#: leaves out cheaply those that end in the hour they start in.
_LONG_SAMPLES_SQL = (
    "SELECT substr(start_date, 1, 13), substr(end_date, 1, 13) FROM stage.samples WHERE rowid BETWEEN :first AND :last"
    " AND substr(end_date, 1, 13) > substr(start_date, 1, 13)"
    " AND julianday(end_date) - julianday(start_date) BETWEEN 1 / 24.0 AND :longest_days")
#: A staged sample's source and start (their positions in a row of SAMPLES).
_SOURCE_OF_SAMPLE = operator.itemgetter(SAMPLES.column_names.index("source_name"))
_START_OF_SAMPLE = operator.itemgetter(SAMPLES.column_names.index("start_date"))
#: A run of samples whose hours, first to last, are at most this many per
#: row (a type measured every few minutes or hours) has every hour between
#: noted, without reading its rows: an hour noted without samples is only
#: totalled again for nothing (bench: 0.05 s less of a 50 MB sync's 1.5 s).
DENSE_RUN_HOURS_PER_ROW = 2


def _note_long_samples(conn, run, type_name, person):
    """Note every hour that the staged samples of ``run`` (of a type that
    hours_merger makes) span past the next: a sample changes what the
    samples under it count there."""
    hours = set()
    for first, last in run.ranges:
        bounds = {"first": first, "last": last, "longest_days": LONGEST_SPREAD_MS / 86400000}
        for start_hour, end_hour in conn.execute(_LONG_SAMPLES_SQL, bounds):
            at, stop = hour_milliseconds(start_hour), hour_milliseconds(end_hour)
            if at is not None and stop is not None:
                hours.update(bucket_key(hour, 3600 * 1000) for hour in range(at // 3600000, stop // 3600000 + 1))
    conn.executemany(_NOTE_PENDING_HOUR_SQL, ((person, type_name, hour) for hour in sorted(hours)))


def _note_sources(conn, person, staged):
    """Number the sources a sync brought (``staged``: {their names as sent:
    their first sample's start}) that the person had not sent before, in
    the order their first samples start (then by name)."""
    known = {source for (source,) in conn.execute(
        f"SELECT source FROM main.{SAMPLE_SOURCES.name} WHERE {PERSON_COLUMN} = ?", (person,))}
    # Each as SQLite's text of it, as the hourly totals name it ("1" for true).
    first = {}
    for source, start in staged.items():
        text = "" if source is None else str(int(source) if source.__class__ is bool else source)
        if text not in known and (text not in first or start < first[text]):
            first[text] = start
    new = sorted(first)
    if not new:
        return
    seen = conn.execute(f"SELECT coalesce(max(seen), 0) FROM main.{SAMPLE_SOURCES.name} WHERE {PERSON_COLUMN} = ?",
                        (person,)).fetchone()[0]
    conn.executemany(SAMPLE_SOURCES.insert_sql(SAMPLE_SOURCES.column_names),
                     [{PERSON_COLUMN: person, "source": source, "seen": seen + number}
                      for number, source in enumerate(sorted(new, key=lambda name: (first.get(name) or "", name)), 1)])


def _dense_run_hours(run, spread):
    """The hour keys from a StagedRun's first to its last (and the hour
    after, where samples spread into it), or None when they are more than
    DENSE_RUN_HOURS_PER_ROW per row (or its dates are not canonical)."""
    try:  # canonical UTC text: its hour, read without strptime (the hot path of every sync)
        first, last = (datetime.datetime(int(text[:4]), int(text[5:7]), int(text[8:10]), int(text[11:13]),
                                         tzinfo=datetime.timezone.utc) for text in (run.low, run.high))
    except (TypeError, ValueError):
        return None
    count = int((last - first).total_seconds() // 3600) + 1 + bool(spread)
    if count > DENSE_RUN_HOURS_PER_ROW * sum(high - low + 1 for low, high in run.ranges):
        return None
    return [f"{first + datetime.timedelta(hours=hour):%Y-%m-%dT%H}" for hour in range(count)]


#: When a stored sync's export was made: its exportDate, or (without a
#: readable one) when it arrived.  A value sent again replaces one that a
#: sync of an export as recent or older wrote (SECTIONS' latest_wins).
SYNC_EXPORTED_SQL = ("CASE WHEN export_date GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*' THEN export_date"
                     " ELSE received_at END")
#: The staged samples (rowids :first to :last) of the other app's points
#: whose stored sample (same key) has another record: found by reading
#: only (an upsert of every row, most often changing none, took 4.5 MB more
#: at the peak of a resent 50 MB sync, for its statement journal).
_CHANGED_POINTS_SQL = (
    f"SELECT s.rowid FROM stage.samples AS s JOIN main.samples AS m ON m.{PERSON_COLUMN} = :person"
    " AND m.type = s.type AND m.start_date = s.start_date AND m.uuid = s.uuid"
    f" WHERE s.rowid BETWEEN :first AND :last AND substr(s.uuid, 1, 3) = '{HAE_PREFIX[:3]}'"
    " AND m.record IS NOT s.record")
#: Staged rows replaced per statement.
REPLACED_PER_STATEMENT = 500


def _replace_points(conn, section, run, params):
    """Replace the stored samples of a run's points sent again with another
    record; return how many."""
    changed = [rowid for first, last in run.ranges
               for (rowid,) in conn.execute(_CHANGED_POINTS_SQL, dict(params, first=first, last=last))]
    replaced = 0
    for index in range(0, len(changed), REPLACED_PER_STATEMENT):
        chunk = changed[index:index + REPLACED_PER_STATEMENT]
        names = {f"r{number}": rowid for number, rowid in enumerate(chunk)}
        sql = section.merge_sql(f" WHERE rowid IN ({', '.join(':' + name for name in names)})",
                                replaces_if="samples.record IS NOT excluded.record")
        replaced += conn.execute(sql, dict(params, **names)).rowcount
    return replaced
#: Brings a stored sync's pending row up to what it stored.
_UPDATE_SYNC_SQL = SYNCS.update_sql(SYNCS.column_names[1:])
#: A retry's body is matched against the stored syncs of the same envelope
#: (whose first fields it finds in its first bytes).
_SAME_ENVELOPE_WHERE = (" WHERE export_date IS :export_date AND body_sha256 IS NOT NULL AND sync_source IS :sync_source"
                        f" AND start_date IS :start_date AND end_date IS :end_date AND status = '{SyncStatus.OK}'"
                        " AND (:body_bytes IS NULL OR body_bytes = :body_bytes)")
#: The stored syncs of :person that a body may repeat, by its envelope:
#: found through the export date's index (the unary + keeps SQLite from
#: walking all of the person's syncs newest first instead).
_SAME_ENVELOPE_SQL = (f"SELECT id, body_sha256, body_bytes, body_blocks FROM main.{SYNCS.name}"
                      f"{_SAME_ENVELOPE_WHERE} AND +{PERSON_COLUMN} = :person ORDER BY id DESC LIMIT 16")
#: How many of a person's latest syncs a body without an export date is
#: compared with (Health Auto Export sends none, and its retries come
#: soon): comparing it with all of them would read them all at every sync.
RETRY_LOOKBACK = 1000
#: Of a body without an export date: by its length, among the person's
#: latest RETRY_LOOKBACK syncs.
_SAME_LENGTH_SQL = (f"SELECT id, body_sha256, body_bytes, body_blocks FROM (SELECT * FROM main.{SYNCS.name}"
                    f" WHERE {PERSON_COLUMN} = :person ORDER BY id DESC LIMIT {RETRY_LOOKBACK:d})"
                    f"{_SAME_ENVELOPE_WHERE} ORDER BY id DESC LIMIT 16")


def _sync_parameters(sync):
    """A Sync as parameters of SYNCS' SQL, client text made bindable."""
    return {name: _storable(value) for name, value in zip(sync._fields, sync)}


def _insert_sync(conn, sync, key_sha256=None):
    """Insert a syncs row (its id chosen by SQLite); return the id.  Raises
    StorageUnavailable when its person was removed meanwhile, or when the
    person's own key that sent it (``key_sha256``, its hash) was replaced
    meanwhile (people key): that key then no longer works, and the app's
    next try is refused."""
    if conn.execute("PRAGMA user_version").fetchone()[0] >= PEOPLE_VERSION:
        row = conn.execute("SELECT key_sha256 FROM main.people WHERE id = ?", (sync.person,)).fetchone()
        if row is None:
            raise StorageUnavailable("The person this sync is from was removed; nothing was stored.")
        if key_sha256 is not None and row[0] != key_sha256:
            raise StorageUnavailable("The key this sync was sent with was replaced while it arrived (people key); "
                                     "nothing was stored.")
    return conn.execute(SYNCS.insert_sql(SYNCS.column_names[1:]), _sync_parameters(sync)).lastrowid


# -- The store: people; Store; PersonStore ----------------------------------

#: A person's name: in URLs (?person=), file names and CSV cells as it is.
PERSON_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}\Z")


def check_person_name(name):
    if not PERSON_NAME.match(name or ""):
        raise UsageError(f"a person's name is 1 to 40 letters, digits, '.', '_' or '-', starting with a letter or "
                         f"digit, not {log_safe(name, 60)!r}")


def hash_key(key):
    """What is stored of a person's key: its SHA-256, in hex.  Keys are
    random (192 bits), so a fast hash is as safe as a slow one: nobody can
    try 2^191 keys; slow hashes are for passwords people choose."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


class Person(typing.NamedTuple):
    """One row of PEOPLE."""

    id: int
    name: str
    admin: bool
    created_at: str
    #: Whether they have a key of their own (only its hash is stored).
    has_key: bool


_PEOPLE_SQL = "SELECT id, name, admin != 0, created_at, key_sha256 IS NOT NULL FROM main.people"

#: The tables of health data and what is derived from it: each row a person's.
OWNED_TABLES = tuple(section.table for section in SECTIONS) + tuple(table.name for table in DERIVED_TABLES)


def delete_people(conn, person_id, others=False):
    """Delete the person ``person_id`` and all that is theirs (their rows,
    syncs and what these rejected), or (``others``) everyone else and all
    that is not theirs, rejected rows of no stored sync included."""
    match = "!=" if others else "="
    conn.execute(f"DELETE FROM main.{REJECTED_TABLE} WHERE sync_id {'NOT IN' if others else 'IN'}"
                 f" (SELECT id FROM main.{SYNCS.name} WHERE {PERSON_COLUMN} = ?)", (person_id,))
    for table in OWNED_TABLES + (SYNCS.name,):
        conn.execute(f"DELETE FROM main.{table} WHERE {PERSON_COLUMN} {match} ?", (person_id,))
    conn.execute(f"DELETE FROM main.{PEOPLE.name} WHERE id {match} ?", (person_id,))


def person_views(person_id):
    """The statements that make a connection see the tables of health data
    (and syncs, rejected) as ``person_id``'s rows alone (None: everyone's,
    the per-type totals summed over people)."""
    visible = [(section.table, section.column_names) for section in SECTIONS]
    visible += [(table.name, table.column_names[1:]) for table in DERIVED_TABLES]
    visible.append((SYNCS.name, SYNCS.column_names))
    statements = []
    for table, columns in visible:
        names = ", ".join(columns)
        if person_id is not None:
            select = f"SELECT {names} FROM main.{table} WHERE {PERSON_COLUMN} = {int(person_id):d}"
        elif table == SAMPLE_TYPES.name:
            select = (f"SELECT type, sum(rows) AS rows, min(first_date) AS first_date, max(last_date) AS last_date"
                      f" FROM main.{table} GROUP BY type")
        else:  # each person's rows in turn: a query by type or date still seeks within each person's
            select = f"SELECT {names} FROM main.{table} WHERE {PERSON_COLUMN} IN (SELECT id FROM main.people)"
        statements.append(f"CREATE TEMP VIEW IF NOT EXISTS {table} AS {select}")
    if person_id is not None:
        statements.append(f"CREATE TEMP VIEW IF NOT EXISTS {REJECTED_TABLE} AS SELECT * FROM main.{REJECTED_TABLE}"
                          f" WHERE sync_id IN (SELECT id FROM main.{SYNCS.name}"
                          f" WHERE {PERSON_COLUMN} = {int(person_id):d})")
    return statements


def _process_alive(pid):
    """Whether a process of that id runs (POSIX); elsewhere assume it does."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


#: SQLite's logs beside a database (they may hold its last commits).
DATABASE_LOGS = ("-wal", "-journal")
#: What SQLite keeps beside a database, which belongs to that file alone.
DATABASE_SIDE_FILES = DATABASE_LOGS + ("-shm",)
#: The temporary files this process is using (stages, spools, backups being
#: made): of the files named with this process's id, only these are its own.
_LIVE_SCRATCH = set()


def _left_behind(path, pid):
    """Whether the temporary file ``path``, named with process id ``pid``,
    was left by a process that stopped (a crash, a power cut, a kill).  A
    process restarted with the same id (as in a container) does not own
    what its predecessor left."""
    if pid == os.getpid():
        return path not in _LIVE_SCRATCH
    return not _process_alive(pid)


class Store:
    """The SQLite database: schema, one writer at a time, short readers.

    Syncs are written one after another under a lock, each on a fresh
    connection: it notices a database file that was replaced, made
    read-only or repaired since the last sync, and hands its page cache's
    memory back between syncs.  Reads use their own short-lived connections
    and are never blocked by a running ingest (WAL).
    """

    def __init__(self, path, busy_timeout=BUSY_TIMEOUT, tmp_dir=None, backup_dir=None, clock=utc_clock):
        self.path = path
        self.busy_timeout = busy_timeout
        #: Now, as an aware datetime: what syncs and people are stamped with
        #: (the receiver's clock, ReceiverConfig.clock).
        self.clock = clock
        #: Where backups are kept (--backup-dir): a damaged database's
        #: message names the newest.
        self.backup_dir = backup_dir
        #: Where syncs wait while their body arrives (see Stage).
        self.tmp_dir = tmp_dir or os.path.dirname(os.path.abspath(path))
        self._write_lock = threading.Lock()
        self._closed = False
        self._kept = None
        self._stage_lock = threading.Lock()
        self._stages = 0
        #: The words cumulative totals are merged by (source_priority_words),
        #: as the database keeps them once opened.
        self.priority = SOURCE_PRIORITY
        #: Once the database is found damaged: what to say, and to do.
        #: Nothing more is written to it (a damaged file only gets worse).
        self.damage = None

    # -- connections and schema ---------------------------------------------

    def open(self, report=None, first_person=None):
        """Create the database or bring it to SCHEMA_VERSION, each migration
        step in its own transaction (``report(text)`` gets progress lines);
        raise StorageUnavailable on failure.  When this makes the first
        person, ``first_person`` (if given) is their name."""
        if first_person:
            check_person_name(first_person)
        with self.writer() as conn:
            try:
                if self._migrate(conn, report or (lambda text: None)) < PEOPLE_VERSION and first_person:
                    with _transaction(conn):
                        conn.execute("UPDATE people SET name = ? WHERE id = ?", (first_person, FIRST_PERSON))
                with _transaction(conn):
                    _update_pending_hours(conn)  # of a sync whose process stopped after its commit
                self.priority = source_priority_words(conn)
            except sqlite3.Error as exc:
                raise self.unavailable(exc) from exc
        self.remove_stale_stages()
        self.check()

    def check(self, seconds=QUICK_CHECK_SECONDS):
        """PRAGMA quick_check for at most ``seconds`` (a file that takes
        longer to read is checked in part); a damaged database sets
        ``damage``.  Returns whether all of it was checked."""
        deadline = time.monotonic() + seconds
        conn = self.open_reader()
        try:
            conn.set_progress_handler(lambda: time.monotonic() > deadline, 10000)
            found = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
        except sqlite3.OperationalError as exc:
            if "interrupt" in str(exc).lower():
                return False
            raise self.unavailable(exc) from exc
        except sqlite3.DatabaseError as exc:  # damaged where even the check cannot go
            found = [str(exc)]
        finally:
            conn.close()
        if found != ["ok"]:
            self._damaged("; ".join(found))
        return True

    def _damaged(self, detail):
        if self.damage is None:
            self.damage = DAMAGED.format(path=self.path, detail=log_safe(detail, LOG_TEXT_MAX))
            newest = newest_backup(self.backup_dir, self.path, self.clock()) if self.backup_dir else None
            if newest is not None:
                self.damage += (f" The newest verified backup is {newest.path}: to put it in place, stop the "
                                f"receiver and run: python3 {os.path.basename(sys.argv[0] or 'health_receiver.py')} "
                                f"restore {newest.path} --db {self.path}")

    def unavailable(self, exc):
        """The StorageUnavailable of a database error; a sign of damage
        ("malformed") marks the database damaged."""
        if isinstance(exc, sqlite3.DatabaseError) and "malformed" in str(exc).lower():
            self._damaged(str(exc))
        return StorageUnavailable(self.damage or _describe_db_error(exc, self.path))

    def _migrate(self, conn, report):
        """Bring the database to SCHEMA_VERSION; return its version before."""
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
            if not fresh:
                report(f"Upgrading {self.path} to schema version {step + 1}: {migration.title}...")
            started = time.monotonic()
            if migration.rewrites and not fresh:
                # A rollback journal holds only the pages a rewrite changes;
                # the write-ahead log would hold a copy of every new page.
                conn.execute("PRAGMA journal_mode = DELETE")
                conn.execute(f"PRAGMA cache_size = -{MIGRATION_CACHE_KIB:d}")
            try:
                with _transaction(conn):
                    migration.apply(conn, (lambda text: None) if fresh else report)  # a new file: nothing to say
                    conn.execute(f"PRAGMA user_version = {step + 1:d}")
            finally:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA cache_size = -{CACHE_KIB:d}")
            if not fresh:
                report(f"Schema version {step + 1} in {time.monotonic() - started:.1f} s.")
        with _transaction(conn):
            for section in SECTIONS:
                for statement in section.create_sql:
                    conn.execute(statement)
        return version

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

    def _open_writer(self, busy_timeout):
        if not os.path.lexists(self.path):
            with contextlib.suppress(FileExistsError):  # another process made it just now
                create_private(self.path)
        conn = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
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
    def writer(self, keep=False, wait=None):
        """Hold the write lock and yield a fresh writer connection.

        With ``keep``, the connection stays open until checkpoint() (or the
        next write): closing the last connection makes SQLite fold the
        write-ahead log into the database, which belongs after the answer.

        The wait for the lock, this receiver's (other syncs) and SQLite's
        (another program) together, is at most ``wait`` (by default
        ``busy_timeout``): a sync queued behind others is answered in time
        all the same, with 503 and Retry-After if it must wait longer.
        """
        wait = self.busy_timeout if wait is None else wait
        deadline = time.monotonic() + wait
        if not self._write_lock.acquire(timeout=wait):
            raise StorageUnavailable("The database is busy with other syncs; try again shortly.")
        try:
            self._close_kept()
            if self._closed:
                raise StorageUnavailable("The receiver is shutting down.")
            if self.damage:
                raise StorageUnavailable(self.damage)
            try:
                conn = self._open_writer(max(deadline - time.monotonic(), 0.0))
            except (sqlite3.Error, OSError) as exc:
                raise self.unavailable(exc) from exc
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
        finally:
            self._write_lock.release()

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
            raise self.unavailable(exc) from exc

    @contextlib.contextmanager
    def reader(self):
        """A read-only connection for one short query."""
        conn = self.open_reader()
        try:
            yield conn
        except sqlite3.Error as exc:
            raise self.unavailable(exc) from exc
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

    def _scratch(self, kind, suffix):
        """``kind`` (Stage or Spool) made at a new name in ``tmp_dir``."""
        folder = self.tmp_dir
        with self._stage_lock:
            self._stages += 1
            name = f"{_STAGE_PREFIX}{os.path.basename(self.path)}.{os.getpid()}.{self._stages}{suffix}"
        try:
            return kind(os.path.join(folder, name))
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(f"Cannot create a temporary file in {folder}: {exc}.") from exc

    def stage(self):
        """A new Stage for one sync's rows, in ``tmp_dir``; the caller
        closes it (which removes its file)."""
        return self._scratch(Stage, _STAGE_SUFFIX)

    def spool(self):
        """A new Spool for one sync's body, in ``tmp_dir``; the caller
        closes it (which removes its file)."""
        return self._scratch(Spool, _SPOOL_SUFFIX)

    def remove_stale_stages(self):
        """Remove the temporary files of syncs that a stopped process left
        (a crash, a power cut), and of a restore killed beside the database;
        those of running processes stay."""
        _remove_stale_backup_temps(os.path.dirname(os.path.abspath(self.path)))
        folder = self.tmp_dir
        prefix = f"{_STAGE_PREFIX}{os.path.basename(self.path)}."
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                if name.startswith(prefix) and name.endswith((_STAGE_SUFFIX, _SPOOL_SUFFIX)):
                    pid = name[len(prefix):].split(".")[0]
                    path = os.path.join(folder, name)
                    if not pid.isdigit() or _left_behind(path, int(pid)):
                        with contextlib.suppress(OSError):
                            os.unlink(path)

    def merge(self, stage, payload, remote_addr=None, started=None, body_sha256=None, body_blocks=None,
              person=FIRST_PERSON, key_sha256=None):
        """Move a complete sync's staged rows into the database in one
        transaction, as rows of ``person`` (sent with their own key of hash
        ``key_sha256``, if not None: see _insert_sync), holding the write
        lock only for that; return the SyncResult once committed.  A
        database error rolls back and raises StorageUnavailable."""
        started = time.monotonic() if started is None else started
        result = SyncResult(remote_addr=remote_addr, body_bytes=payload.size, received=dict(stage.received),
                            rejected=stage.rejected, sections=payload.sections, envelope=payload.envelope,
                            body_sha256=body_sha256, body_blocks=body_blocks, person=person)
        stage.finish()
        with self.writer(keep=True) as conn:
            try:
                conn.execute("ATTACH DATABASE ? AS stage", (stage.path,))
                conn.execute(f"PRAGMA stage.cache_size = -{STAGE_CACHE_KIB:d}")
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    received_at = _canonical(self.clock())
                    sync_id = result.sync_id = _insert_sync(conn, Sync(
                        received_at=received_at, remote_addr=remote_addr, body_bytes=payload.size, person=person),
                        key_sha256)
                    exported = payload.envelope.get("exportDate")
                    exported = (utc_date(exported) if exported.__class__ is str else None) or received_at
                    self._merge_rows(conn, stage, {"sync_id": sync_id, "exported": exported, "person": person},
                                     result)
                    result.duration = time.monotonic() - started
                    conn.execute(_UPDATE_SYNC_SQL, _sync_parameters(result.sync(received_at, payload.envelope_text)))
                    conn.execute("COMMIT")
                finally:
                    _rollback(conn)
                    conn.execute("DETACH DATABASE stage")
            except sqlite3.Error as exc:
                raise self.unavailable(exc) from exc
        return result

    def same_envelope(self, envelope, body_bytes=None, person=FIRST_PERSON):
        """{SHA-256: (sync id, body bytes, block digests)} of the stored
        syncs of ``person`` whose envelope is ``envelope``'s (its
        exportDate, range and source) and whose body was ``body_bytes``
        long (when known): those a body that starts so may repeat.  A
        body without an exportDate (Health Auto Export sends none) is
        matched by its length alone.  Empty without either, or when the
        database cannot be read (the body is then read as any other)."""
        source, export_date, start_date, end_date = envelope_columns(envelope)
        if (export_date is None and body_bytes is None
                or any(value.__class__ in (dict, list) for value in (export_date, source, start_date, end_date))):
            return {}
        params = {"export_date": _storable(export_date), "sync_source": _storable(source),
                  "start_date": _storable(start_date), "end_date": _storable(end_date), "body_bytes": body_bytes,
                  "person": person}
        with contextlib.suppress(StorageUnavailable, sqlite3.Error):
            with self.reader() as conn:
                return {digest: (sync_id, size, blocks)
                        for sync_id, digest, size, blocks in conn.execute(
                            _SAME_ENVELOPE_SQL if export_date is not None else _SAME_LENGTH_SQL, params)}
        return {}

    def record_retry(self, same_as, body_sha256, body_bytes, remote_addr=None, envelope=None, started=None,
                     person=FIRST_PERSON, key_sha256=None):
        """Record a body byte for byte that of stored sync ``same_as`` (its
        SHA-256 ``body_sha256``, sent by ``person``) as a sync of its
        elements, all duplicates, and return its SyncResult once committed:
        the answer that a re-read would give, without reading it.  None
        when that sync is no longer stored with this digest.  Raises
        StorageUnavailable."""
        started = time.monotonic() if started is None else started
        columns = ("envelope", "received_counts", "rejected", "sections", "body_sha256", "body_bytes")
        with self.writer(keep=True) as conn:
            try:
                with _transaction(conn):
                    first = conn.execute(SYNCS.select_sql(columns) + f" WHERE id = ? AND {PERSON_COLUMN} = ?",
                                         (same_as, person)).fetchone()
                    if first is None or first[4:] != (body_sha256, body_bytes):
                        return None
                    envelope_json, counts, rejected, sections = first[:4]
                    received = dict.fromkeys(SECTIONS_BY_NAME, 0)
                    with contextlib.suppress(ValueError, TypeError, AttributeError):
                        received.update((name, int(count)) for name, count in json.loads(counts or "{}").items()
                                        if name in received)
                    result = SyncResult(remote_addr=remote_addr, body_bytes=body_bytes, received=received,
                                        rejected=rejected, sections=sections, envelope=envelope or {},
                                        same_body_as=same_as, person=person)
                    result.duration = time.monotonic() - started
                    sync = result.sync(_canonical(self.clock()), {})._replace(envelope=envelope_json)
                    result.sync_id = _insert_sync(conn, sync, key_sha256)
            except sqlite3.Error as exc:
                raise self.unavailable(exc) from exc
        return result

    def record_failure(self, failure):
        """Keep a ``syncs`` row for a sync that stored nothing (best effort:
        the caller reports the original error whatever happens here, and
        does not wait long for a database that another program holds)."""
        with contextlib.suppress(StorageUnavailable, sqlite3.Error):
            with self.writer(wait=min(self.busy_timeout, FAILURE_WAIT)) as conn, _transaction(conn):
                _insert_sync(conn, failure.sync(_canonical(self.clock())))

    def _merge_rows(self, conn, stage, params, result):
        """Copy each section's staged rows (``params``: :sync_id, and
        :exported, when the sync's export was made)."""
        for section in SECTIONS:
            if not stage.received[section.name]:
                continue
            if section.clustered:
                # Run by run: one that arrived in key order needs no sort,
                # and sample_types learns each type's new rows and dates.
                for label, run in sorted(stage.runs[section.name].items()):
                    sql = section.merge_sql(" WHERE rowid BETWEEN :first AND :last", run.in_order)
                    new = sum(conn.execute(sql, dict(params, first=first, last=last)).rowcount
                              for first, last in run.ranges)
                    replaced = 0
                    if run.replaces and new < sum(last - first + 1 for first, last in run.ranges):
                        # The other app's points sent again with another
                        # value (a summarised minute that grew) replace
                        # the stored ones; their hours are noted below.
                        replaced = _replace_points(conn, section, run, params)
                    result.inserted[section.name] += new + replaced
                    if section is SAMPLES and (new or replaced):
                        spans = hours_merger(label) is not None  # its samples change every hour they span
                        if spans:
                            _note_long_samples(conn, run, label, params["person"])
                        conn.execute(_SAMPLE_TYPES_SQL, (label, new, run.low, run.high, params["person"]))
                        hours = _dense_run_hours(run, spans)
                        if hours is not None:
                            conn.executemany(_NOTE_PENDING_HOUR_SQL, ((params["person"], label, hour) for hour in hours))
                            continue
                        for first, last in run.ranges:
                            conn.execute(_NOTE_PENDING_HOURS_SQL, dict(hours_parameters(label, params["person"]),
                                                                       first=first, last=last, spread=spans))
                if section is SAMPLES:
                    _note_sources(conn, params["person"], stage.sources)
            elif section.latest_wins:
                result.inserted[section.name] += conn.execute(section.count_new_sql, params).fetchone()[0]
                # Only by this sync's later element, or when its export is
                # as recent or more as that of the sync that wrote the row.
                written_by = f"{section.table}.{section.written_by}"
                newer = (f"{written_by} = :sync_id OR :exported >= coalesce((SELECT {SYNC_EXPORTED_SQL}"
                         f" FROM main.{SYNCS.name} WHERE id = {written_by}), '')")
                conn.execute(section.merge_sql(replaces_if=newer), params)
            else:
                result.inserted[section.name] += conn.execute(section.merge_sql(), params).rowcount
        if stage.rejected:
            conn.execute("INSERT INTO main.rejected (sync_id, section, reason, record) SELECT :sync_id, section,"
                         " reason, record FROM stage.rejected ORDER BY rowid", params)

    def update_hours(self, wait=None):
        """Bring sample_hours up to date with the hours syncs noted as
        pending.  Runs after the answer (the app need not wait for totals
        derived from rows already committed: 0.3 s after a 50 MB sync),
        and before a page reads them, waiting for the writer at most
        ``wait`` seconds.  On failure they stay pending for the next time."""
        with self.reader() as conn:
            if conn.execute("SELECT 1 FROM sample_hours_pending LIMIT 1").fetchone() is None:
                return
        with self.writer(keep=True, wait=wait) as conn, _transaction(conn):
            _update_pending_hours(conn)

    def use_source_priority(self, words, report=None):
        """Merge cumulative types by the priority ``words`` from now on
        (--source-priority): totals merged by other words are merged again
        (``report(text)`` gets a line per type)."""
        words = tuple(words)
        with self.writer() as conn:
            if source_priority_words(conn) != words:
                with _transaction(conn):
                    _put_setting(conn, "source_priority", ",".join(words))
                    for person, type_name in conn.execute(
                            f"SELECT {PERSON_COLUMN}, type FROM main.{SAMPLE_TYPES.name} ORDER BY 1, 2").fetchall():
                        if is_cumulative(type_name):
                            merge_all_hours(conn, person, type_name, words, report)
        self.priority = words

    def recount_types(self):
        """Rebuild sample_types and sample_hours from the samples (after
        editing rows by hand)."""
        with self.writer() as conn, _transaction(conn):
            _recount_sample_types(conn)
            _recount_sample_hours(conn)

    # -- settings ------------------------------------------------------------

    def setting(self, name):
        """The value the database keeps for the setting ``name`` (SETTINGS),
        or None."""
        with self.reader() as conn:
            if conn.execute("PRAGMA user_version").fetchone()[0] < SETTINGS_VERSION:
                return None
            row = conn.execute(f"SELECT value FROM main.{SETTINGS.name} WHERE name = ?", (name,)).fetchone()
        return row and row[0]

    def keep_setting(self, name, value):
        """Keep ``value`` as the setting ``name`` (None: forget it)."""
        with self.writer() as conn, _transaction(conn):
            conn.execute(f"DELETE FROM main.{SETTINGS.name} WHERE name = ?", (name,))
            if value is not None:
                conn.execute(f"INSERT INTO main.{SETTINGS.name} (name, value) VALUES (?, ?)", (name, value))

    # -- people ------------------------------------------------------------

    def people(self):
        """Every Person, the first first.  (A database from before people,
        read without upgrading it, and one not made yet, have the first
        only, without a key.)"""
        first_only = [Person(FIRST_PERSON, FIRST_PERSON_NAME, True, None, False)]
        if not os.path.exists(self.path):
            return first_only
        with self.reader() as conn:
            if conn.execute("PRAGMA user_version").fetchone()[0] < PEOPLE_VERSION:
                return first_only
            return [Person(*row) for row in conn.execute(_PEOPLE_SQL + " ORDER BY id")]

    def person(self, name=None, person_id=None):
        """The Person named ``name`` (or of id ``person_id``), or None."""
        column, value = ("name", name) if person_id is None else ("id", person_id)
        if not os.path.exists(self.path):
            return next((person for person in self.people() if getattr(person, column) == value), None)
        with self.reader() as conn:
            if conn.execute("PRAGMA user_version").fetchone()[0] < PEOPLE_VERSION:
                return next((person for person in self.people() if getattr(person, column) == value), None)
            row = conn.execute(f"{_PEOPLE_SQL} WHERE {column} = ?", (value,)).fetchone()
        return None if row is None else Person(*row)

    def first_person(self):
        """The person added first: the receiver's key and rows stored
        before there were people are theirs (in a backup of one person's
        data, that person)."""
        people = self.people()
        if not people:
            raise Missing(f"{self.path} has no people")
        return people[0]

    def person_of_key(self, key):
        """The Person whose own key ``key`` is, or None.  Looked up by the
        key's SHA-256: the comparison's time tells nothing of the key."""
        with self.reader() as conn:
            row = conn.execute(f"{_PEOPLE_SQL} WHERE key_sha256 = ?", (hash_key(key),)).fetchone()
        return None if row is None else Person(*row)

    def _named(self, conn, name):
        row = conn.execute(f"{_PEOPLE_SQL} WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise Missing(f"no person named {log_safe(name, 60)} (health_receiver.py people list)")
        return Person(*row)

    def add_people(self, names, keys, admin=False):
        """Add people named ``names``, with their own ``keys`` (None: none),
        in one transaction; raises UsageError for a name taken or not
        allowed."""
        for name in names:
            check_person_name(name)
        with self.writer() as conn, _transaction(conn):
            taken = [name for name in names if conn.execute(f"{_PEOPLE_SQL} WHERE name = ?", (name,)).fetchone()]
            if taken or len(set(names)) != len(names):
                raise UsageError(f"a person named {log_safe((taken or names)[0], 60)} exists already")
            for name, key in zip(names, keys):
                conn.execute(PEOPLE.insert_sql(("name", "key_sha256", "admin", "created_at")),
                             {"name": name, "key_sha256": key and hash_key(key), "admin": int(admin),
                              "created_at": _canonical(self.clock())})

    def set_key(self, name, key):
        """Give the person named ``name`` the key ``key`` in place of their
        own one (which stops working at once)."""
        with self.writer() as conn, _transaction(conn):
            person = self._named(conn, name)
            conn.execute("UPDATE people SET key_sha256 = ? WHERE id = ?", (hash_key(key), person.id))

    def rename_person(self, name, new_name):
        check_person_name(new_name)
        with self.writer() as conn, _transaction(conn):
            person = self._named(conn, name)
            if conn.execute(f"{_PEOPLE_SQL} WHERE name = ?", (new_name,)).fetchone():
                raise UsageError(f"a person named {log_safe(new_name, 60)} exists already")
            conn.execute("UPDATE people SET name = ? WHERE id = ?", (new_name, person.id))

    def holds_syncs(self):
        """Whether any sync was ever recorded (stored or refused)."""
        with self.reader() as conn:
            return conn.execute(f"SELECT 1 FROM main.{SYNCS.name} LIMIT 1").fetchone() is not None

    def syncs_of(self, name):
        """The ids of the syncs of the person named ``name``."""
        with self.reader() as conn:
            return [sync_id for (sync_id,) in conn.execute(
                f"SELECT id FROM main.{SYNCS.name} WHERE {PERSON_COLUMN} = (SELECT id FROM main.people"
                f" WHERE name = ?)", (name,))]

    def person_rows(self, conn, person_id):
        """Rows of health data of a person (samples counted by sample_types)."""
        rows = conn.execute(f"SELECT coalesce(sum(rows), 0) FROM main.{SAMPLE_TYPES.name}"
                            f" WHERE {PERSON_COLUMN} = ?", (person_id,)).fetchone()[0]
        for section in SECTIONS:
            if section is not SAMPLES:
                rows += conn.execute(f"SELECT count(*) FROM main.{section.table} WHERE {PERSON_COLUMN} = ?",
                                     (person_id,)).fetchone()[0]
        return rows

    def remove_person(self, name, delete_data=False):
        """Remove the person named ``name``; with ``delete_data``, every row
        of theirs with them, in one transaction (return how many).  Refuses
        the first person (the receiver's key is theirs), and a person with
        data without ``delete_data``."""
        with self.writer() as conn, _transaction(conn):
            person = self._named(conn, name)
            if person.id == conn.execute("SELECT min(id) FROM main.people").fetchone()[0]:
                raise UsageError(f"{log_safe(name, 60)} is the first person: the receiver's key and the rows "
                                 "stored before there were people are theirs")
            rows = self.person_rows(conn, person.id)
            syncs = conn.execute(f"SELECT count(*) FROM main.{SYNCS.name} WHERE {PERSON_COLUMN} = ?",
                                 (person.id,)).fetchone()[0]
            if (rows or syncs) and not delete_data:
                raise UsageError(f"{log_safe(name, 60)} has {rows:,} rows of data from {syncs:,} syncs; "
                                 "--delete-data deletes them with the person")
            delete_people(conn, person.id)
            return rows


class PersonStore:
    """The store as one person sees it (``person`` None: everyone): the
    reporting layer reads through it as through a Store.  Its connections
    see, under the names of the tables of health data, views of that
    person's rows only (SQLite finds an unqualified name in ``temp``
    before ``main``), so no query of a page can read another person's rows;
    each view's columns are the table's without PERSON_COLUMN, and its
    rows are read through the key's first column, the person."""

    def __init__(self, store, person=None):
        self.store = store
        #: A Person, or None for everyone.
        self.person = person
        self.path = store.path

    def __getattr__(self, name):  # damage, unavailable(), ...: the store's own
        return getattr(self.store, name)

    def open_reader(self):
        conn = self.store.open_reader()
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] < PEOPLE_VERSION:
                return conn  # read without upgrading it: all of it is the first person's
            for statement in person_views(self.person.id if self.person else None):
                conn.execute(statement)
        except sqlite3.Error as exc:
            conn.close()
            raise self.store.unavailable(exc) from exc
        return conn

    @contextlib.contextmanager
    def reader(self):
        conn = self.open_reader()
        try:
            yield conn
        except sqlite3.Error as exc:
            raise self.store.unavailable(exc) from exc
        finally:
            conn.close()


# -- Staging: a sync's rows in a temporary file until its merge -------------

class Stage:
    """One sync's rows, kept in a private SQLite file while its body
    arrives, so that the database's write lock is taken only once the body
    is complete and valid (Store.merge), and memory does not grow with the
    body.  The file is scratch: no journal, no syncs to disk; a crash leaves
    it to Store.remove_stale_stages."""

    def __init__(self, path):
        self.path = path
        self.received = dict.fromkeys(SECTIONS_BY_NAME, 0)
        self.rejected = 0
        #: {section name: {first key column's value: StagedRun}}, of the
        #: clustered sections.
        self.runs = {section.name: {} for section in SECTIONS if section.clustered}
        #: The sources of the staged samples (their names as sent), each
        #: with its first sample's start: gathered as they are staged.
        self.sources = {}
        self._last_rowid = dict.fromkeys(SECTIONS_BY_NAME, 0)
        create_private(path)  # raises on a file or link planted at the name
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        _LIVE_SCRATCH.add(path)
        try:
            for pragma in ("journal_mode = OFF", "synchronous = OFF", f"page_size = {PAGE_SIZE:d}",
                           f"cache_size = -{STAGE_CACHE_KIB:d}", "locking_mode = EXCLUSIVE"):
                self._conn.execute(f"PRAGMA {pragma}")
            self._conn.execute("BEGIN")
            for section in SECTIONS:
                self._conn.execute(section.stage_create_sql)
            self._conn.execute("CREATE TABLE rejected (section TEXT, reason TEXT NOT NULL, record TEXT NOT NULL)")
        except BaseException:
            self.close()
            raise

    def add(self, section, rows):
        """Stage one batch of Payload: rows of ``section``, or rejected
        rows when ``section`` is None."""
        if section is None:
            self._conn.executemany(_STAGE_REJECTED_SQL, rows)
            self.rejected += len(rows)
            return
        sql = section.stage_insert_sql
        stored = rows
        try:
            # Many rows a statement (STAGED_PER_INSERT), their values one
            # list; the rest one a statement, as is a batch that holds a
            # row of another length (refused below, as it is).
            width, many = len(section.columns), section.stage_rows_per_insert
            whole = len(rows) - len(rows) % many if set(map(len, rows)) == {width} else 0
            values, step = list(itertools.chain.from_iterable(rows[:whole])), many * width
            self._conn.executemany(section.stage_insert_many_sql,
                                   [values[at:at + step] for at in range(0, len(values), step)])
            self._conn.executemany(sql, rows[whole:])
        except _UNBINDABLE:
            # A value sqlite3 cannot bind (a lone surrogate from a JSON
            # escape, say) would fail the whole batch: redo it row by row
            # and keep such rows aside.  The file has no journal to roll
            # back with: the rows stored before the failure are deleted.
            self._conn.execute(f"DELETE FROM {section.table} WHERE rowid > ?", (self._last_rowid[section.name],))
            stored = []
            for row in rows:
                try:
                    self._conn.execute(sql, row)
                    stored.append(row)
                except _UNBINDABLE as exc:
                    record = json.dumps(row, ensure_ascii=True, default=str)
                    self.add(None, [(section.name, f"cannot be stored: {exc}", record)])
                    self.received[section.name] -= 1
        self.received[section.name] += len(rows)
        # The rows stored took the rowids after the table's last one, in
        # turn: SQLite gives a new row the largest rowid plus one (checked,
        # as the merge and the row-by-row redo above rely on it).
        first = self._last_rowid[section.name] + 1
        last = self._last_rowid[section.name] = self._conn.execute(
            f"SELECT coalesce(max(rowid), 0) FROM {section.table}").fetchone()[0]
        if last - first + 1 != len(stored):
            raise StorageUnavailable("The temporary file of a sync lost track of its rows.")
        if section.clustered and stored:
            self._note_runs(section, stored, first)
        if section is SAMPLES:
            sources, first = set(map(_SOURCE_OF_SAMPLE, stored)), self.sources
            if len(sources) == 1:  # an array of one source, the common case: its earliest at C speed
                (source,), start = sources, min(map(_START_OF_SAMPLE, stored))
                if source not in first or start < first[source]:
                    first[source] = start
            else:
                for row in stored:
                    source, start = _SOURCE_OF_SAMPLE(row), _START_OF_SAMPLE(row)
                    if source not in first or start < first[source]:
                        first[source] = start

    def _note_runs(self, section, stored, rowid):
        """Add the rows just stored, from ``rowid`` on, to their runs."""
        label_at, order_at = section.run_positions
        runs = self.runs[section.name]
        # A batch of Payload is one array, so mostly one run.
        # A batch is one array's: the other app's points (their uuids made
        # here, HAE_PREFIX) or the first app's samples.
        first = stored[0][0]
        replacing = section is SAMPLES and first.__class__ is str and first[:3] == HAE_PREFIX[:3]
        for label, group in itertools.groupby(stored, key=operator.itemgetter(label_at)):
            values = [row[order_at] for row in group]
            run = runs.get(label)
            if run is None:
                run = runs[label] = StagedRun()
            if replacing:
                run.replaces = True
            run.add(rowid, values)
            rowid += len(values)

    def size(self):
        """Bytes the file holds, pages still in SQLite's cache included."""
        return self._conn.execute("PRAGMA page_count").fetchone()[0] * PAGE_SIZE

    def finish(self):
        """Commit the staged rows, so that another connection can read them."""
        if self._conn.in_transaction:
            self._conn.execute("COMMIT")
        self._conn.execute("PRAGMA locking_mode = NORMAL")
        self._conn.execute("SELECT 1 FROM rejected LIMIT 1")  # releases the exclusive lock

    def close(self):
        """Close and remove the file."""
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
        for suffix in ("",) + DATABASE_SIDE_FILES:
            with contextlib.suppress(OSError):
                os.unlink(self.path + suffix)
        _LIVE_SCRATCH.discard(self.path)


class Spool:
    """One sync's body, kept in a private file while it arrives (a retry
    that may repeat a stored sync): written as it comes, read back should
    it differ.  A crash leaves it to Store.remove_stale_stages.  A disk
    error raises StorageUnavailable (the app retries)."""

    def __init__(self, path):
        self.path = path
        self.size = 0
        self._file = os.fdopen(os.open(path, _NEW_FILE & ~os.O_WRONLY | os.O_RDWR, 0o600), "w+b")
        _LIVE_SCRATCH.add(path)

    def _failed(self, exc):
        return StorageUnavailable(f"The sync's temporary file {self.path} failed ({exc}); free some space "
                                  "there (--tmp-dir), then the app retries.")

    def write(self, piece):
        try:
            self._file.write(piece)
        except OSError as exc:
            raise self._failed(exc) from exc
        self.size += len(piece)

    def finish(self):
        """Write out what is buffered."""
        try:
            self._file.flush()
        except OSError as exc:
            raise self._failed(exc) from exc

    def pieces(self):
        """Yield what was written, from its beginning, in pieces."""
        try:
            self._file.seek(0)
            for piece in iter(functools.partial(self._file.read, READ_CHUNK), b""):
                yield piece
        except OSError as exc:
            raise self._failed(exc) from exc

    def close(self):
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        _LIVE_SCRATCH.discard(self.path)


class StagedRun:
    """The staged rows that share the first key column (a sample type, a
    workout's route): their rowid ranges, the bounds of the key's second
    column (a date), and whether they arrived in its order, either way.
    Syncs send a type's samples by date, so the merge mostly copies runs
    as they are; any other order is sorted on the way."""

    __slots__ = ("ranges", "low", "high", "last", "ascending", "descending", "replaces")

    def __init__(self):
        #: [first rowid, last rowid] of each stretch of the stage's table.
        self.ranges = []
        #: Some of its rows replace a stored row of the same key whose
        #: record differs (the other app's points: HAE_PREFIX).
        self.replaces = False
        self.low = self.high = self.last = None
        self.ascending = self.descending = True

    @property
    def in_order(self):
        return self.ascending or self.descending

    def add(self, first_rowid, values):
        """Note rows stored from ``first_rowid`` on, whose second key
        columns are ``values`` (never None: the key's columns are NOT NULL)."""
        ordered = sorted(values)
        if self.last is None:
            self.low, self.high = ordered[0], ordered[-1]
        else:
            self.low, self.high = min(self.low, ordered[0]), max(self.high, ordered[-1])
            self.ascending = self.ascending and self.last <= values[0]
            self.descending = self.descending and self.last >= values[0]
        self.ascending = self.ascending and values == ordered
        self.descending = self.descending and values == ordered[::-1]
        self.last = values[-1]
        last_rowid = first_rowid + len(values) - 1
        if self.ranges and self.ranges[-1][1] == first_rowid - 1:
            self.ranges[-1][1] = last_rowid
        else:
            self.ranges.append([first_rowid, last_rowid])


# -- Backups: made while the database is in use, verified, restored ---------

#: Pages a backup copies per step (16 MiB): between steps a sync's merge
#: goes on.  The backup reads one snapshot throughout (it holds a read
#: transaction, which in WAL mode holds up no writer), so a sync committed
#: meanwhile is not in it and never makes it start again.
BACKUP_STEP_PAGES = 1024
#: Names of the backups this receiver makes: <database name>-<UTC time>.db,
#: and .db.gz when compressed (-2, -3... after the time for a second backup
#: in the same second).  Only such files are ever removed (--keep).
_BACKUP_NAME = re.compile(r"(?P<stem>.+)-(?P<time>[0-9]{8}T[0-9]{6}Z)(?:-[0-9]+)?\.db(?:\.gz)?\Z")
#: A backup's name cut where its number goes (none: the first of its second).
_BACKUP_NUMBERED = re.compile(r"(?P<name>.+-[0-9]{8}T[0-9]{6}Z)(?:-(?P<number>[0-9]+))?(?P<suffix>\.db(?:\.gz)?)\Z",
                              re.DOTALL)
#: A backup being made: .<final name>.<pid>.backup-tmp (removed once the
#: process is gone).
_BACKUP_TEMP = re.compile(r"\..+\.(?P<pid>[0-9]+)\.backup-tmp(?:\.gz|-journal)?\Z")
#: gzip's level for --gzip: the fastest, as a small board needs (health
#: data compresses well at any level).
BACKUP_GZIP_LEVEL = 1
#: Beside a database: the file whose lock says a process writes to it
#: (the database's own file cannot carry it: closing any handle of it
#: would drop SQLite's locks on it).
LOCK_SUFFIX = ".lock"
#: Hours of the hourly totals that ``verify`` compares with the samples.
VERIFY_HOURS = 50
#: The setting a backup keeps of itself, in its copy of SETTINGS: when its
#: snapshot was taken (canonical UTC).  A .gz backup's gzip header holds
#: the same time (whole seconds), read without unpacking it.
BACKUP_MADE_AT_SETTING = "backup_made_at"
#: A SQLite file's header: its length, and how it starts.
SQLITE_HEADER_BYTES = 100
SQLITE_MAGIC = b"SQLite format 3\0"


class BackupRecord(typing.NamedTuple):
    """A backup made and verified."""

    path: str
    #: When its snapshot was taken (canonical UTC).
    made_at: str
    size: int
    seconds: float
    rows: int
    schema_version: int


def _connect_read_only(path):
    """A connection that cannot write to ``path`` (a live database or a
    backup)."""
    if not os.path.isfile(path):
        raise Missing(f"no database at {path}")
    return sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True, isolation_level=None,
                           check_same_thread=False)


def table_rows(conn):
    """{table: rows} of every table of ``conn``'s database."""
    names = [name for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    return {name: conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] for name in names}


def _backup_stem(db_path, person=None):
    """What the names of a database's backups start with: its file name
    without ``.db`` (then ``-NAME`` for the backups of ``person``'s rows
    alone, kept apart)."""
    stem = os.path.basename(db_path)
    stem = stem[:-3] if stem.endswith(".db") and len(stem) > 3 else stem
    return f"{stem}-{person}" if person else stem


def backup_name(db_path, now=None, compressed=False, person=None):
    """The file name of a backup of ``db_path`` (of ``person``'s rows
    alone, if given) made ``now`` (UTC)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return f"{_backup_stem(db_path, person)}-{now:%Y%m%dT%H%M%SZ}.db" + (".gz" if compressed else "")


def new_backup_path(folder, db_path, compressed=False, person=None, now=None):
    """Where a backup of ``db_path`` made ``now`` goes in ``folder``: its
    backup_name, numbered when a backup (of another database of that name,
    say) took it in the same second."""
    return next(path for path in _backup_names(os.path.join(folder, backup_name(db_path, now, compressed, person)))
                if not os.path.lexists(path))


def _backup_names(path):
    """The backup's ``path``, then the same name numbered on from its
    number (any other name is only itself)."""
    yield path
    parts = _BACKUP_NUMBERED.match(os.path.basename(path))
    if parts is not None:
        for number in itertools.count(int(parts["number"] or 1) + 1):
            yield os.path.join(os.path.dirname(path), f"{parts['name']}-{number}{parts['suffix']}")


def _claim_name(temp, dest):
    """Give the finished file ``temp`` the backup name ``dest``, or the next
    numbered one free (see new_backup_path), and return it.  The name is
    taken by a hard link, which fails rather than replace a backup made in
    the same second by another thread or process; a disk without hard links
    (FAT) takes it by creating the file exclusively first."""
    for path in _backup_names(dest):
        try:
            os.link(temp, path)
        except FileExistsError:
            continue
        except OSError:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                continue
            try:
                os.replace(temp, path)
            except OSError:
                os.unlink(path)  # an empty file under a backup's name would count as one
                raise
            return path
        os.unlink(temp)
        return path
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dest)


class Backup(typing.NamedTuple):
    """A file under a backup's name in a folder, as it records itself."""

    path: str
    #: The id of the database it is a copy of (database_id); 0 for one
    #: made before databases had ids, or a file that is not a database.
    database_id: int
    #: When its snapshot was taken, canonical UTC (of one without an id,
    #: the time its name says); None when unknown.
    made_at: typing.Optional[str]


def database_id(path):
    """The id of the database at ``path`` (its application_id, which
    MIGRATIONS' step 10 gives it and every copy keeps), as SQLite reads it
    (a write-ahead log's last commits included); 0 without one, or when
    it cannot be read."""
    with contextlib.suppress(sqlite3.Error, Missing):
        conn = _connect_read_only(path)
        try:
            return conn.execute("PRAGMA application_id").fetchone()[0]
        finally:
            conn.close()
    return 0


def _backup_header(path):
    """(the header of the database in the backup at ``path``, the Unix time
    its gzip header holds or None): of a .gz, only its first block is
    unpacked.  A backup is one file (no log), so its header is its own.
    Raises OSError, EOFError or zlib.error."""
    with open(path, "rb") as raw:
        if not path.endswith(".gz"):
            return raw.read(SQLITE_HEADER_BYTES), None
        stamp = int.from_bytes(raw.read(8)[4:], "little")  # RFC 1952: magic, method, flags, then MTIME
        raw.seek(0)
        with gzip.GzipFile(fileobj=raw, mode="rb") as packed:
            return packed.read(SQLITE_HEADER_BYTES), stamp


def _recorded_time(path):
    """The time a .db backup records of itself (BACKUP_MADE_AT_SETTING), or None."""
    with contextlib.suppress(sqlite3.Error, Missing):
        conn = _connect_read_only(path)
        try:
            row = conn.execute(f"SELECT value FROM {SETTINGS.name} WHERE name = ?",
                               (BACKUP_MADE_AT_SETTING,)).fetchone()
        finally:
            conn.close()
        return utc_date(row[0]) if row else None
    return None


def read_backup(path, named_time):
    """The Backup at ``path``, whose name says ``named_time``
    (YYYYMMDDTHHMMSSZ, which may not be a time at all)."""
    try:
        header, stamp = _backup_header(path)
    except (OSError, EOFError, zlib.error):
        header, stamp = b"", None
    own_id = int.from_bytes(header[68:72], "big", signed=True) if header.startswith(SQLITE_MAGIC) else 0
    if not own_id:  # made before ids: only its name says when
        t = named_time
        return Backup(path, 0, utc_date(f"{t[:4]}-{t[4:6]}-{t[6:8]}T{t[9:11]}:{t[11:13]}:{t[13:15]}Z"))
    if stamp is not None:
        made_at = _canonical(datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc))
    else:
        made_at = _recorded_time(path)
    return Backup(path, own_id, made_at)


def backups_of(folder, db_path, person=None, now=None):
    """The Backups of the database at ``db_path`` in ``folder`` (those of
    ``person``'s rows alone, with ``person``), the newest first by the time
    each records, as of ``now`` (by default now).  Whose a backup is, its
    id says: a database of the same file name elsewhere, backed up into the
    same folder, has its own; a backup made before ids (0) goes by its
    name, as it did.  A time after ``now`` is a clock that was wrong: such
    a backup counts as older than any other."""
    own = database_id(db_path)
    stem = _backup_stem(db_path, person)
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = _BACKUP_NAME.match(entry.name)
            # Regular files only: opening a FIFO of a backup's name would
            # wait for ever, and a folder of one is nobody's backup.
            if match and match["stem"] == stem and entry.is_file(follow_symlinks=False):
                backup = read_backup(entry.path, match["time"])
                if backup.database_id in (own, 0):
                    found.append(backup)
    now = _canonical(now or datetime.datetime.now(datetime.timezone.utc))
    return sorted(found, key=lambda backup: (backup.made_at is not None and backup.made_at <= now,
                                             backup.made_at or ""), reverse=True)


def newest_backup(folder, db_path, now=None):
    """The newest Backup of ``db_path`` in ``folder`` as of ``now`` (see
    backups_of), or None.  A file under a backup's name was verified before
    it was given that name."""
    found = backups_of(folder, db_path, now=now)
    return found[0] if found else None


def remove_old_backups(folder, db_path, keep, made=None, person=None, now=None):
    """Remove the backups of ``db_path`` (of ``person``'s rows, if given)
    in ``folder`` beyond the newest ``keep`` as of ``now`` (see backups_of);
    the one just ``made`` (its path) is the newest whatever the others say.
    Return the paths removed."""
    found = sorted(backups_of(folder, db_path, person, now), key=lambda backup: backup.path != made)
    removed = [backup.path for backup in found[keep:]]
    for path in removed:
        os.unlink(path)
    return removed


def _remove_stale_backup_temps(folder):
    """Remove what backups of stopped processes left (a process restarted
    with the same id, as in a container, counts as stopped)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            match = _BACKUP_TEMP.match(name)
            path = os.path.join(folder, name)
            # Its -journal and .gz go with the backup's own temporary file.
            if match and _left_behind(re.sub(r"(?:-journal|\.gz)\Z", "", path), int(match["pid"])):
                with contextlib.suppress(OSError):
                    os.unlink(path)


class BackupStopped(Exception):
    """A backup stopped because it was asked to (the receiver stops)."""


def _sync_to_disk(path, folder=False):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:  # Windows cannot open a folder: its renames are durable as they are
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not folder:  # some systems cannot sync a folder
            raise
    finally:
        os.close(fd)


def _gzip_into(source, target, made_at):
    """Compress the file ``source`` into a new private file ``target``,
    whose gzip header says it was made at ``made_at`` (canonical UTC)."""
    create_private(target)
    seconds = int(parse_stamp(made_at).timestamp())
    with open(source, "rb") as plain, open(target, "r+b") as handle, \
            gzip.GzipFile(fileobj=handle, mode="wb", compresslevel=BACKUP_GZIP_LEVEL, mtime=seconds) as packed:
        shutil.copyfileobj(plain, packed, READ_CHUNK)


def _keep_only(conn, person_id):
    """Delete from a copy every row that is not ``person_id``'s (the other
    people, their syncs and what these rejected), then VACUUM: the file
    holds nothing of theirs, not even in free pages."""
    delete_people(conn, person_id, others=True)
    conn.execute("VACUUM")


def _rows_of_person(conn, person_id):
    """table_rows() of a copy that keeps ``person_id``'s rows alone."""
    rows = table_rows(conn)
    for table in OWNED_TABLES + (SYNCS.name,):
        rows[table] = conn.execute(f"SELECT count(*) FROM {table} WHERE {PERSON_COLUMN} = ?",
                                   (person_id,)).fetchone()[0]
    rows[REJECTED_TABLE] = conn.execute(f"SELECT count(*) FROM {REJECTED_TABLE} WHERE sync_id IN"
                                        f" (SELECT id FROM {SYNCS.name} WHERE {PERSON_COLUMN} = ?)",
                                        (person_id,)).fetchone()[0]
    rows[PEOPLE.name] = 1
    return rows


def _checked_copy(source, copy, db_path, version, person_id):
    """Check a backup's ``copy`` against the snapshot ``source`` it was
    taken from (integrity_check, every table's rows, the schema version);
    with ``person_id``, then keep that person's rows alone in it (see
    _keep_only) and check them.  Return its table_rows()."""
    found = [row[0] for row in copy.execute("PRAGMA integrity_check(5)")]
    if found != ["ok"]:
        raise StorageUnavailable(f"The copy of {db_path} does not verify ({'; '.join(found)[:300]}).")
    rows = table_rows(copy)
    if rows != table_rows(source) or copy.execute("PRAGMA user_version").fetchone()[0] != version:
        raise StorageUnavailable(f"The copy of {db_path} does not hold the rows of the database.")
    if person_id is None:
        return rows
    if version < PEOPLE_VERSION:
        raise UsageError(f"{db_path} has no people yet (schema version {version}): start the receiver once to "
                         "upgrade it")
    expected = _rows_of_person(source, person_id)
    _keep_only(copy, person_id)
    rows = table_rows(copy)
    found = [row[0] for row in copy.execute("PRAGMA quick_check(5)")]
    if found != ["ok"] or rows != expected:
        raise StorageUnavailable(f"The copy of {db_path} with one person's rows does not verify.")
    return rows


def _copy_failure(exc, db_path, folder):
    """The StorageUnavailable of a backup that failed with the SQLite error
    ``exc``: a damaged database (restore a backup), or a disk that could not
    take the copy (make room), in words that do not confuse the two."""
    text = str(exc).rstrip(".")
    lowered = text.lower()
    if any(sign in lowered for sign in ("malformed", "not a database", "corrupt")):
        advice = "If it is damaged, restore the newest backup (restore --help)."
    elif "full" in lowered or "i/o" in lowered:
        advice = (f"The copy could not be written in {folder}: make room there (the copy takes about "
                  f"{database_size(db_path) / 1e6:,.0f} MB before any --gzip), then try again; should it fail "
                  "again, check the disks (verify --db).")
    else:
        advice = "Try again; should it fail again, check it with verify --db."
    return StorageUnavailable(f"The database {db_path} cannot be copied: {text}. {advice}")


def backup_database(db_path, dest, compress=False, progress=None, cancelled=None, person_id=None,
                    clock=utc_clock, numbered=False):
    """Copy the database at ``db_path`` into the new file ``dest`` while it
    is in use, verify the copy against the snapshot it was taken from
    (integrity_check, every table's rows, the schema version), and only
    then give it its name; return its BackupRecord.  ``progress(copied,
    total)`` is called with pages after each step.  The copy is a single
    file (no write-ahead log), readable only by its owner.  Raises
    StorageUnavailable (a damaged database, a copy that does not verify),
    OSError (the folder, the disk), or BackupStopped once ``cancelled()``
    is true, leaving no file behind.  With ``person_id``, the copy then
    keeps only that person's rows (see _keep_only).  ``clock()`` says when
    the snapshot is taken.  With ``numbered``, a file that took the name
    ``dest`` meanwhile is left alone: the backup takes the next number
    (the record says which)."""
    started = time.monotonic()
    folder = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(folder):
        raise Missing(f"no folder {folder} for the backup")
    database = os.path.realpath(db_path)
    if os.path.realpath(dest) in [database + suffix for suffix in ("", LOCK_SUFFIX) + DATABASE_SIDE_FILES]:
        raise UsageError(f"{dest} is the database itself (or a file of it); name another file or a folder")
    _remove_stale_backup_temps(folder)
    temp = os.path.join(folder, f".{os.path.basename(dest)}.{os.getpid()}.backup-tmp")
    made = [temp, temp + "-journal"]
    _LIVE_SCRATCH.add(temp)
    cancelled = cancelled or (lambda: False)

    def step(_status, left, total):
        if cancelled():
            raise BackupStopped("the backup was stopped")
        if progress:
            progress(total - left, total)

    try:
        source = _connect_read_only(db_path)
        try:
            source.execute("BEGIN")
            source.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the snapshot starts here
            version = source.execute("PRAGMA user_version").fetchone()[0]
            made_at = _canonical(clock())
            create_private(temp)
            copy = sqlite3.connect(temp, isolation_level=None)
            try:
                copy.execute("PRAGMA journal_mode = OFF")  # a new file: nothing to roll back to
                for conn in (source, copy):  # the checks below may take minutes on a small board
                    conn.set_progress_handler(cancelled, 100000)
                source.backup(copy, pages=BACKUP_STEP_PAGES, progress=step)
                copy.execute("PRAGMA journal_mode = DELETE")
                rows = _checked_copy(source, copy, db_path, version, person_id)
                if version >= SETTINGS_VERSION:  # when it was made, kept in it
                    copy.execute(f"INSERT OR REPLACE INTO {SETTINGS.name} (name, value) VALUES (?, ?)",
                                 (BACKUP_MADE_AT_SETTING, made_at))
                    rows[SETTINGS.name] = copy.execute(f"SELECT count(*) FROM {SETTINGS.name}").fetchone()[0]
            finally:
                copy.close()
        except sqlite3.DatabaseError as exc:
            if cancelled():
                raise BackupStopped("the backup was stopped") from exc
            raise _copy_failure(exc, db_path, folder) from exc
        finally:
            source.close()
        if compress:
            made.append(temp + ".gz")
            _gzip_into(temp, temp + ".gz", made_at)
            os.unlink(temp)
            temp = temp + ".gz"
        _sync_to_disk(temp)
        if numbered:
            dest = _claim_name(temp, dest)
        else:
            os.replace(temp, dest)
        _sync_to_disk(folder, folder=True)
    except BaseException:
        for path in made:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    finally:
        _LIVE_SCRATCH.discard(made[0])
    return BackupRecord(dest, made_at, os.path.getsize(dest), time.monotonic() - started, sum(rows.values()),
                        version)


class UnreadableBackup(Exception):
    """A .gz backup that cannot be unpacked (truncated, corrupt): its
    ``verdict`` says so, as verify's other checks say theirs."""

    def __init__(self, path, exc):
        super().__init__(str(exc))
        self.verdict = Verdict(path, (("unpacking", False, f"the gzip file cannot be unpacked ({exc or 'corrupt'}): "
                                                           "truncated or damaged"),))


def _unpack(path, target):
    """Write the content of the .gz backup ``path`` into the file ``target``;
    raises UnreadableBackup when it cannot be read (a full disk under ``target``
    is OSError, as any)."""
    with gzip.open(path, "rb") as packed, open(target, "r+b") as plain:
        while True:
            try:
                piece = packed.read(READ_CHUNK)
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                raise UnreadableBackup(path, exc) from None
            if not piece:
                return
            plain.write(piece)


@contextlib.contextmanager
def readable_copy(path, folder=None):
    """``path`` as a database file to read: a .gz backup is unpacked into a
    private temporary file in ``folder`` (by default beside it) for the
    time of the block.  Raises UnreadableBackup."""
    if not path.endswith(".gz"):
        yield path
        return
    folder = folder or os.path.dirname(os.path.abspath(path))
    temp = os.path.join(folder, f".{os.path.basename(path)[:-3]}.{os.getpid()}.backup-tmp")
    _LIVE_SCRATCH.add(temp)
    try:
        create_private(temp)
        _unpack(path, temp)
        yield temp
    finally:
        _LIVE_SCRATCH.discard(temp)
        with contextlib.suppress(OSError):
            os.unlink(temp)


class Verdict(typing.NamedTuple):
    """What ``verify`` found: each check as (what, whether it holds, detail)."""

    path: str
    checks: typing.Tuple[typing.Tuple[str, bool, str], ...]

    @property
    def ok(self):
        return all(holds for _what, holds, _detail in self.checks)

    def line(self):
        """The one-line verdict."""
        failed = [f"{what}: {detail}" for what, holds, detail in self.checks if not holds]
        if failed:
            return f"FAILED: {self.path}: " + "; ".join(failed)
        return f"OK: {self.path}: " + "; ".join(detail for _what, _holds, detail in self.checks)


def verify_database(path, name=None, person_id=None):
    """Check the database (or backup) at ``path`` without writing to it:
    SQLite's integrity_check, then facts stored twice that must agree: each
    type's rows and dates in sample_types against the samples, the hourly
    totals' sample counts against the samples (every type, and
    VERIFY_HOURS hours one by one), and that no row names a sync that is
    not stored or that stored fewer rows: of the person ``person_id``
    alone, if given.  Returns a Verdict, which names the file ``name`` (by
    default ``path``)."""
    name = name or path
    conn = _connect_read_only(path)
    checks = []
    try:
        conn.execute("BEGIN")
        try:
            found = [row[0] for row in conn.execute("PRAGMA integrity_check(5)")]
        except sqlite3.OperationalError as exc:  # not a fact about the file: it cannot be read now
            conn.close()
            raise StorageUnavailable(f"{name} cannot be read now: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            found = [str(exc)]
        checks.append(("integrity", found == ["ok"], "integrity_check ok" if found == ["ok"] else
                       "; ".join(found)[:300]))
        if found != ["ok"]:
            return Verdict(name, tuple(checks))
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version < 3 or version > SCHEMA_VERSION:  # the facts below are those of versions 3 on
            checks.append(("schema", 0 < version <= SCHEMA_VERSION, f"schema version {version}"))
            return Verdict(name, tuple(checks))
        if version >= PEOPLE_VERSION:
            for statement in person_views(person_id):  # the queries below read what one person (or all) sees
                conn.execute(statement)
        checks.extend(_stored_facts_agree(conn, version))
    except sqlite3.DatabaseError as exc:
        checks.append(("reading", False, str(exc)[:300]))
    finally:
        conn.close()
    return Verdict(name, tuple(checks))


def _stored_facts_agree(conn, version):
    counted = {t: (n, first, last) for t, n, first, last in conn.execute(
        "SELECT type, count(*), min(start_date), max(start_date) FROM samples GROUP BY type")}
    kept = {t: (n, first, last) for t, n, first, last in conn.execute(
        "SELECT type, rows, first_date, last_date FROM sample_types WHERE rows > 0")}
    wrong = sorted(t for t in set(counted) | set(kept) if counted.get(t) != kept.get(t))
    samples = sum(n for n, _first, _last in counted.values())
    yield ("types", not wrong, f"{samples:,} samples in {len(counted):,} types agree with sample_types" if not wrong
           else f"sample_types disagrees with the samples for {', '.join(log_safe(t, 60) for t in wrong[:3])} "
                "(after editing samples by hand: stats --recount)")
    pending = {t for (t,) in conn.execute("SELECT DISTINCT type FROM sample_hours_pending")}
    hourly = dict(conn.execute("SELECT type, sum(samples) FROM sample_hours GROUP BY type"))
    wrong = sorted(t for t in counted if t not in pending and hourly.get(t, 0) != counted[t][0])
    hours = conn.execute(
        "SELECT type, substr(hour, 1, 13) AS h, sum(samples) FROM sample_hours WHERE type NOT IN"
        " (SELECT type FROM sample_hours_pending) AND (type, h) IN (SELECT type, substr(hour, 1, 13)"
        f" FROM sample_hours ORDER BY random() LIMIT {VERIFY_HOURS:d}) GROUP BY type, h").fetchall()
    for type_name, hour, in_totals in hours:
        stored = conn.execute("SELECT count(*) FROM samples WHERE type = ? AND start_date >= ? AND start_date < ?",
                              (type_name, hour, hour + ";")).fetchone()[0]
        if stored != in_totals:
            wrong.append(f"{type_name} at {hour}")
    yield ("hours", not wrong, f"hourly totals agree ({len(hours)} hours checked one by one)" if not wrong
           else f"the hourly totals disagree with the samples for {', '.join(log_safe(t, 80) for t in wrong[:3])} "
                "(stats --recount rebuilds them)")
    syncs = {sync_id: (inserted, points, digest) for sync_id, inserted, points, digest in conn.execute(
        "SELECT id, inserted, route_points_inserted, " + ("body_sha256" if version >= 6 else "NULL") +
        f" FROM syncs WHERE status = '{SyncStatus.OK}'")}
    written, points = collections.Counter(), collections.Counter()
    for section in SECTIONS:
        column = section.sync_columns[0]
        for sync_id, rows in conn.execute(f"SELECT {column}, count(*) FROM {section.table} GROUP BY {column}"):
            if section is ROUTE_POINTS:
                points[sync_id] += rows
            elif section.counted:
                written[sync_id] += rows
            elif sync_id not in syncs:
                written[sync_id] += 0  # not counted, but must name a stored sync
    orphans = sorted(set(written) - set(syncs) | set(points) - set(syncs))
    # Rows may be removed by hand, never added: a sync stored since version
    # 6 (with its digest) wrote at most the rows it counted.
    over = sorted(sync_id for sync_id, (inserted, route_points, digest) in syncs.items()
                  if digest is not None and (written[sync_id] > inserted or points[sync_id] > route_points))
    problems = ([f"rows of syncs that are not stored ({', '.join(map(str, orphans[:5]))})"] if orphans else []) + (
        [f"more rows than syncs {', '.join(map(str, over[:5]))} stored"] if over else [])
    yield ("syncs", not problems, f"{len(syncs):,} syncs agree with their rows" if not problems
           else "; ".join(problems))


@contextlib.contextmanager
def database_lock(db_path, exclusive=False):
    """Hold ``<db>.lock`` while the block runs: shared by every process that
    writes to the database (serve, import), exclusive for ``restore``.
    Raises UsageError when a holder stands in the way (naming it where the
    system tells); nothing is held where the system has no such locks."""
    if fcntl is None:
        yield
        return
    path = db_path + LOCK_SUFFIX
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError:  # a read-only folder: no one writes there either
        yield
        return
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError:
            who = process_holding(path)
            if exclusive:
                raise Busy(f"a receiver is running on {db_path}" + (f": {who}" if who else "")
                           + "; stop it first, nothing was changed") from None
            raise Busy(f"{db_path} is being restored" + (f" by {who}" if who else "")
                       + "; start again once it is done") from None
        yield
    finally:
        os.close(fd)


def process_holding(path):
    """A description of another process that has ``path`` open (Linux), or
    None when none is found."""
    target = os.path.realpath(path)
    with contextlib.suppress(OSError):
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    if os.path.realpath(f"/proc/{pid}/fd/{fd}") == target:
                        with open(f"/proc/{pid}/cmdline", "rb") as handle:
                            command = handle.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
                        return f"process {pid} ({log_safe(command, 120)})"
    return None


def _free_name(base):
    """``base``, or ``base-2``, ``base-3``...: the first name that neither
    it nor a side file of it uses."""
    number = 1
    name = base
    while any(os.path.lexists(name + suffix) for suffix in ("",) + DATABASE_SIDE_FILES):
        number += 1
        name = f"{base}-{number}"
    return name


def _keep_aside(db_path, kept):
    """Give the database and its side files the name ``kept`` as well
    (hard links where the disk allows: ``db_path`` stays whole until it is
    replaced), then remove the side files at ``db_path``."""
    for suffix in ("",) + DATABASE_LOGS:
        if os.path.exists(db_path + suffix):
            try:
                os.link(db_path + suffix, kept + suffix)
            except OSError:  # a disk without hard links: copied
                shutil.copy2(db_path + suffix, kept + suffix)
    _sync_to_disk(os.path.dirname(os.path.abspath(db_path)), folder=True)
    # From here ``kept`` holds everything: the side files at db_path would
    # be read as the restored file's own, and go.
    for suffix in DATABASE_SIDE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(db_path + suffix)


def restore_database(backup, db_path, report):
    """Put ``backup`` (verified first) in place of the database at
    ``db_path``; what was there (the database, its log) is kept as
    <db>.before-restore-<UTC time>, never deleted.  Returns that name, or
    None when there was nothing.  Raises UsageError when the backup does
    not verify or a receiver runs on ``db_path``."""
    folder = os.path.dirname(os.path.abspath(db_path))
    _remove_stale_backup_temps(folder)  # what a restore killed here left
    try:
        with readable_copy(backup, folder) as readable:
            verdict = verify_database(readable, backup)
            if not verdict.ok:
                raise UsageError(f"{backup} does not verify, nothing was changed: {verdict.line()}")
            report(verdict.line())
            with database_lock(db_path, exclusive=True):
                return _put_in_place(readable, db_path, folder, report)
    except UnreadableBackup as exc:
        raise UsageError(f"{backup} does not verify, nothing was changed: {exc.verdict.line()}") from None


def _put_in_place(readable, db_path, folder, report):
    """restore_database's copy of the verified backup ``readable`` put at
    ``db_path``: the name kept of what was there, or None."""
    # SQLite's backup copies the backup with its own log, if it has one,
    # into one file of the receiver's folder.
    staged = os.path.join(folder, f".{os.path.basename(db_path)}.restore.{os.getpid()}.backup-tmp")
    try:
        backup_database(readable, staged)
        kept = None
        if any(os.path.exists(db_path + suffix) for suffix in ("",) + DATABASE_LOGS):
            stamp = f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}"
            kept = _free_name(f"{db_path}.before-restore-{stamp}")
            _keep_aside(db_path, kept)
            report(f"What was at {db_path} is kept as {kept}")
        os.replace(staged, db_path)
        _sync_to_disk(folder, folder=True)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(staged)
    return kept


# ---------------------------------------------------------------------------
# Sync workflow: one sync from bytes to stored rows (HTTP and import); NDJSON import; scheduled backups
# ---------------------------------------------------------------------------

# -- Archive: bodies kept as they came (--archive) --------------------------

#: An archived body: <UTC time>-<sync id>.json.gz, the first person's, or
#: <UTC time>-<sync id>-<name>.json.gz, another person's (so that import
#: stores it as theirs, in any database).
_ARCHIVE_NAME = re.compile(r"[0-9]{8}T[0-9]{6}Z-(?P<sync>[0-9]+)(?:-(?P<person>[A-Za-z0-9][A-Za-z0-9._-]{0,39}))?"
                           r"\.json\.gz\Z")


def _archive_path(directory, sync_id, person=None, now=None):
    """Where the body of sync ``sync_id`` of ``person`` (a name; None: the
    first person) is archived."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return os.path.join(directory, f"{now:%Y%m%dT%H%M%SZ}-{sync_id}{'-' + person if person else ''}.json.gz")


def archived_person(path):
    """Whose body the archive file ``path`` holds, by its name: another
    person's name, or None (the first person's, or not an archive file)."""
    match = _ARCHIVE_NAME.match(os.path.basename(path))
    return match["person"] if match else None


def archived_bodies(directory, sync_ids, person=None):
    """The paths of the archive files in ``directory`` of the syncs
    ``sync_ids`` of ``person`` (a name; None: the first person).  A file is
    theirs only when both its sync id and its name part are: ids repeat (a
    restore rewinds them, a folder may be shared), so an id alone would
    reach another person's bodies."""
    wanted = {str(sync_id) for sync_id in sync_ids}
    found = []
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(directory)):
            match = _ARCHIVE_NAME.match(name)
            if match and match["sync"] in wanted and match["person"] == (person or None):
                found.append(os.path.join(directory, name))
    return found


def remove_archived(directory, sync_ids, person=None):
    """Remove the archived bodies of the syncs ``sync_ids`` of ``person``
    (see archived_bodies) from ``directory`` (a person's data deleted);
    return how many."""
    paths = archived_bodies(directory, sync_ids, person)
    for path in paths:
        os.unlink(path)
    return len(paths)


def rename_archived(directory, sync_ids, person, new_person):
    """Give the archived bodies of the syncs ``sync_ids`` of ``person`` the
    name of ``new_person`` (renamed; None: the first person's form)."""
    for path in archived_bodies(directory, sync_ids, person):
        match = _ARCHIVE_NAME.match(os.path.basename(path))
        stamp = os.path.basename(path)[:16]
        os.replace(path, os.path.join(directory, f"{stamp}-{match['sync']}{'-' + new_person if new_person else ''}"
                                                 ".json.gz"))


class ArchiveWriter:
    """Writes a body to ``--archive`` as it streams past, to a temporary
    name; ``keep(sync_id)`` renames it once the sync is committed, so a file
    with a final name is always a complete, stored sync.  A failure to
    archive never fails the sync: the first error is kept in ``error``,
    writing stops, and ``keep`` raises it."""

    def __init__(self, directory):
        self.directory = directory
        self.error = None
        self.path = None
        try:
            self._handle = tempfile.NamedTemporaryFile(prefix=".", suffix=".json.gz.tmp", dir=directory,
                                                       delete=False)
            self.path = self._handle.name
            self._gzip = gzip.GzipFile(fileobj=self._handle, mode="wb", compresslevel=1)
        except OSError as exc:
            self.error = exc

    def pieces(self, pieces):
        """Pass ``pieces`` on, writing each to the archive."""
        for piece in pieces:
            if self.error is None:
                try:
                    self._gzip.write(piece)
                except OSError as exc:
                    self.error = exc
            yield piece

    def keep(self, sync_id, person=None, now=None):
        """Complete the file and give it its final name (see _archive_path),
        of a sync kept ``now``; return that."""
        if self.error is None:
            try:
                self._gzip.close()
                self._handle.close()
                final = _archive_path(self.directory, sync_id, person, now)
                os.replace(self.path, final)
                return final
            except OSError as exc:
                self.error = exc
        self.discard()
        raise self.error

    def discard(self):
        # Each closed on its own: the compressor's last write failing on a
        # full disk must not leave the file open, holding its space unlinked.
        for part in ("_gzip", "_handle"):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                getattr(self, part).close()
        if self.path:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


# -- Intake: one sync from arriving bytes to stored rows --------------------

def describe_sync(result):
    """The one log line of a stored sync (client text escaped)."""
    env = result.envelope
    source = env.get("syncSource")
    source = source[:60] if isinstance(source, str) and source else "-"
    span = ""
    start, end = env.get("startDate"), env.get("endDate")
    if isinstance(start, str) and isinstance(end, str):
        span = f", {start[:10]} -> {end[:10]}"
    retry = f", byte for byte sync {result.same_body_as}: not read again" if result.same_body_as else ""
    return log_safe(
        f"{result.remote_addr} {source} {counted(result.records, 'record')} ({result.new_records} new, "
        f"{result.duplicates} dup, {result.rejected} rejected) in {counted(result.sections, 'section')}, "
        f"{counted(result.received[ROUTE_POINTS.name], 'route point')}{span}, {result.body_bytes / 1e6:.1f} MB in "
        f"{result.duration:.2f} s{retry}")


class BodyDigest:
    """A body's pieces passed on as they arrive, with its SHA-256 and size
    kept; ``head`` reads its first bytes ahead (they are passed on first)."""

    def __init__(self, pieces):
        self._pieces = iter(pieces)
        self._held = []
        self._sha256 = hashlib.sha256()
        self.size = 0
        #: The CRC-32 of each complete block (BODY_BLOCK bytes) so far.
        self.blocks = []
        self._block = 0

    def head(self, size):
        """At least ``size`` first bytes of the body (fewer if it is shorter)."""
        held = self._held
        total = sum(map(len, held))
        while total < size:
            piece = next(self._pieces, None)
            if piece is None:
                break
            held.append(piece)
            total += len(piece)
        return b"".join(held)

    def __iter__(self):
        for piece in itertools.chain(self._held, self._pieces):
            self._held = []
            self._sha256.update(piece)
            room = BODY_BLOCK - self.size % BODY_BLOCK
            if len(piece) < room:  # the common case: within one block
                self._block = zlib.crc32(piece, self._block)
                self.size += len(piece)
            else:
                view, at = memoryview(piece), 0
                while at < len(piece):  # the piece's part in each block it reaches
                    take = min(len(piece) - at, BODY_BLOCK - self.size % BODY_BLOCK)
                    self._block = zlib.crc32(view[at:at + take], self._block)
                    at += take
                    self.size += take
                    if self.size % BODY_BLOCK == 0:
                        self.blocks.append(f"{self._block:08x}")
                        self._block = 0
            yield piece

    def hexdigest(self):
        """The SHA-256 of what was passed on."""
        return self._sha256.hexdigest()

    def block_digests(self):
        """The blocks' digests as stored, the last (partial) block's included."""
        tail = [f"{self._block:08x}"] if self.size % BODY_BLOCK else []
        return "".join(self.blocks + tail)


def _find_malloc_trim():
    """glibc's malloc_trim, or None (musl, macOS, Windows: nothing to call)."""
    try:
        return ctypes.CDLL(None).malloc_trim if ctypes is not None else None
    except (OSError, AttributeError, TypeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def give_back_memory():
    """Hand the memory the C allocator keeps free back to the system: after
    each sync, what reading it took, and at start what compiling this file
    took (18 MB here when it is compiled on import; run as a script,
    CPython would hold the file's syntax tree too: see run_imported).  On a
    small board it is then free for the page cache instead of held."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class SyncIntake:
    """The one way a sync is stored, for the HTTP handler and ``import``:
    walk the body as it arrives into a Stage, merge it into the database in
    one transaction, record a failure once, and after the answer checkpoint.

    A body that starts with the envelope of a stored sync (a retry: the app
    sends the same payload again when an answer came too late) is not read
    but kept in a Spool while its digest is taken; byte for byte the stored
    sync's, it is answered from that sync's record, otherwise read from the
    Spool as any other.

    ``max_tmp`` bounds the temporary disk that the syncs being received
    take together; past it a sync fails with StorageUnavailable (503 and
    Retry-After: the app retries).
    """

    def __init__(self, store, archive=None, log_error=None, max_tmp=None):
        self.store = store
        self.archive = archive
        self.log_error = log_error or (lambda remote, line: None)
        self.max_tmp = max_tmp
        self._tmp_lock = threading.Lock()
        self._tmp_in_use = {}

    def refuse(self, remote_addr, status, message, person=FIRST_PERSON):
        """Record a request refused before its body was ingested."""
        self.store.record_failure(FailedSync(remote_addr, status, message, person=person))

    def ingest(self, pieces, remote_addr, length=None, person=FIRST_PERSON, key_sha256=None):
        """Store the body arriving as ``pieces`` (bytes; ``length`` of them
        in all, when known) as a sync of ``person`` (an id of PEOPLE: the
        rows are theirs, and a retry repeats one of their own syncs), sent
        with their own key of hash ``key_sha256`` (None: the receiver's key,
        or none), which must still be theirs when it is stored;
        return the SyncResult once committed, or None for a body that held
        nothing (empty, or ``{}``: a connection test), which leaves no
        trace.  Raises PayloadError or StorageUnavailable
        with nothing stored and the failure recorded; an exception of
        ``pieces`` itself (the HTTP layer's ClientError) passes through,
        nothing stored, for the caller to record."""
        started = time.monotonic()
        body = BodyDigest(pieces)
        envelope = leading_members(body.head(ENVELOPE_HEAD))
        stored = self.store.same_envelope(envelope, length, person)
        if not stored:
            return self._read(body, remote_addr, started, body, person, key_sha256)
        spool = None
        try:
            try:
                spool = self.store.spool()
                pieces, rest = iter(body), None
                for piece in pieces:
                    spool.write(piece)
                    self._account(spool, spool.size)
                    stored = self._still_same(stored, body)
                    if not stored:  # it differs: read it from here on, as it arrives
                        rest = pieces
                        break
                spool.finish()
                same_as, size, _blocks = stored.get(body.hexdigest(), (None, None, None))
                result = None
                if rest is None and size == body.size:
                    result = self.store.record_retry(same_as, body.hexdigest(), size, remote_addr, envelope, started,
                                                     person, key_sha256)
            except StorageUnavailable as exc:
                self.store.record_failure(FailedSync(remote_addr, SyncStatus.FAILED, str(exc), body.size,
                                                     time.monotonic() - started, None, envelope.get("syncSource"),
                                                     person))
                raise
            if result is not None:
                return result
            # Read back as any other body (then the rest as it arrives); its
            # copy is not counted against max_tmp, or a body nearly that size
            # would never be stored.
            self._release(spool)
            return self._read(itertools.chain(spool.pieces(), rest or ()), remote_addr, started, body, person,
                              key_sha256)
        finally:
            if spool is not None:
                self._release(spool)
                spool.close()

    @staticmethod
    def _still_same(stored, body):
        """The stored syncs (same_envelope) that the body read so far may
        still repeat: as long, and block for block the same."""
        blocks = "".join(body.blocks)
        return {digest: sync for digest, sync in stored.items()
                if body.size <= sync[1] and (sync[2] is None or sync[2].startswith(blocks))}

    def _read(self, pieces, remote_addr, started, body, person, key_sha256):
        """Walk the body arriving as ``pieces`` into a Stage and merge it;
        ``body`` (a BodyDigest) gives its digest once read."""
        archive = ArchiveWriter(self.archive) if self.archive else None
        payload = Payload(archive.pieces(pieces) if archive else pieces)
        payload.spill_dir = self.store.tmp_dir
        stage = None
        try:
            stage = self.store.stage()
            try:
                for section, rows in payload.batches():
                    stage.add(section, rows)
                    self._account(stage, stage.size())
            except sqlite3.Error as exc:  # the temporary file's disk is full, say: the app retries
                raise StorageUnavailable(f"The sync's temporary file in {self.store.tmp_dir} cannot take its rows "
                                         f"({exc}); free some space there (--tmp-dir), then the app retries.") from exc
            if payload.empty:
                if archive:
                    archive.discard()
                return None
            result = self.store.merge(stage, payload, remote_addr, started, body.hexdigest(), body.block_digests(),
                                      person, key_sha256)
        except BaseException as exc:
            if isinstance(exc, (PayloadError, StorageUnavailable)):
                self.store.record_failure(FailedSync(
                    remote_addr, SyncStatus.REJECTED if isinstance(exc, PayloadError) else SyncStatus.FAILED,
                    str(exc), payload.size,
                    time.monotonic() - started, payload.envelope_text, payload.envelope.get("syncSource"), person))
            if archive:
                archive.discard()
            raise
        finally:
            if stage is not None:
                self._release(stage)
                stage.close()
        if archive:
            try:
                archive.keep(result.sync_id, self._archive_name(result.person), self.store.clock())
            except (OSError, StorageUnavailable) as exc:
                self.log_error(remote_addr, f"sync {result.sync_id} is stored but could not be archived in "
                                            f"{self.archive}: {exc}")
        return result

    def _archive_name(self, person_id):
        """The name an archived body of ``person_id`` carries: None for the
        first person's (named as before there were people)."""
        if person_id == self.store.first_person().id:
            return None
        person = self.store.person(person_id=person_id)
        return person.name if person else None

    def _account(self, scratch, size):
        """Check the temporary disk in use, with ``scratch`` (a Stage or a
        Spool) at ``size`` bytes, against ``max_tmp``."""
        if self.max_tmp is None:
            return
        with self._tmp_lock:
            self._tmp_in_use[scratch] = size
            if sum(self._tmp_in_use.values()) > self.max_tmp:
                raise StorageUnavailable(f"The receiver's temporary space ({self.max_tmp // MIB} MB, "
                                         "--max-tmp-mb) is in use by other syncs; try again shortly.")

    def _release(self, scratch):
        with self._tmp_lock:
            self._tmp_in_use.pop(scratch, None)

    def after_answer(self, result):
        """What the app need not wait for: the hourly totals of the rows it
        brought, and folding the log into the database.  What reading the
        body took is handed back first, so that the totals' own memory
        comes on top of less."""
        give_back_memory()
        try:
            self.store.update_hours()
        except (StorageUnavailable, sqlite3.Error) as exc:
            self.log_error(result.remote_addr, f"sync {result.sync_id}: hourly totals left for the next sync: {exc}")
        self.store.checkpoint()
        give_back_memory()


# -- Scheduled backups: BackupSchedule --------------------------------------

#: Seconds before a failed scheduled backup is tried again (at most the
#: interval).
BACKUP_RETRY = 3600


def _exact_stamp(text):
    """A canonical UTC timestamp, milliseconds included, as an aware datetime."""
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)


class BackupSchedule:
    """Backups made by a background thread of the running receiver every
    ``every`` seconds into ``folder``, keeping the newest ``keep``.  A
    backup reads a snapshot beside the syncs and never delays one (see
    backup_database).  ``log(line, error)`` writes the log; ``clock()`` is
    the receiver's time, which the backups' names and ages are of."""

    def __init__(self, db_path, folder, every, keep, log, on_failure=None, clock=utc_clock):
        self.db_path, self.folder, self.every, self.keep = db_path, folder, every, keep
        self.log, self.clock = log, clock
        #: ``on_failure(reason)``: told of each failed backup (a notice).
        self.on_failure = on_failure
        #: The last backup made (a BackupRecord), or found in the folder at
        #: start (its time from its name).
        self.last = None
        #: (UTC time, reason) of the last attempt, when it failed.
        self.failure = None
        newest = newest_backup(folder, db_path, clock())
        if newest is not None and newest.made_at is not None:
            with contextlib.suppress(OSError):
                self.last = BackupRecord(newest.path, newest.made_at, os.path.getsize(newest.path), 0.0, 0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backups", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        """Stop the thread, a backup in progress too (its file is removed)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


    def _due_in(self):
        if self.last is None:
            return 0.0
        age = (self.clock() - _exact_stamp(self.last.made_at)).total_seconds()
        if age < 0:  # a backup of the future: the clock was wrong then, or is now
            return 0.0
        return max(0.0, self.every - age)

    def _run(self):
        while not self._stop.wait(self._due_in() if self.failure is None else min(self.every, BACKUP_RETRY)):
            self.run_once()

    def run_once(self):
        """Make a backup now; failures are logged and kept, never raised."""
        dest = new_backup_path(self.folder, self.db_path, now=self.clock())
        try:
            record = backup_database(self.db_path, dest, cancelled=self._stop.is_set, clock=self.clock, numbered=True)
            removed = remove_old_backups(self.folder, self.db_path, self.keep, made=record.path, now=self.clock())
        except BackupStopped:
            return None
        except (OSError, sqlite3.Error, StorageUnavailable, UsageError) as exc:
            self.failure = (_canonical(self.clock()), str(exc))
            self.log(f"backup into {self.folder} failed: {exc}", True)
            if self.on_failure is not None:
                self.on_failure(str(exc))
            return None
        self.last, self.failure = record, None
        self.log(f"backup {record.path}: {record.rows:,} rows, {record.size / 1e6:.1f} MB, verified, in "
                 f"{record.seconds:.1f} s" + (f"; {len(removed)} older removed" if removed else ""), False)
        return record

    def status(self, now=None):
        """What the status page and the endpoint's GET say: the last backup,
        and a warning when it failed or is older than twice the interval."""
        now = now or self.clock()
        last = self.last
        answer = {"folder": self.folder, "every_hours": round(self.every / 3600, 3), "keep": self.keep,
                  "last": None, "warning": None, "failed": self.failure is not None}
        if last is not None:
            answer["last"] = {"path": last.path, "made_at": last.made_at, "bytes": last.size, "verified": True}
        if self.failure is not None:
            answer["warning"] = f"the last backup failed at {self.failure[0]}: {self.failure[1]}"
            answer["warning_without_paths"] = f"the last backup failed at {self.failure[0]}"
        elif last is None:
            answer["warning"] = "no backup made yet"
        elif (now - _exact_stamp(last.made_at)).total_seconds() > 2 * self.every:
            answer["warning"] = f"the last backup, of {last.made_at}, is older than twice the interval"
        return answer


# -- NDJSON import: the lines of an export made payloads again --------------

#: Lines of an NDJSON export ingested as one sync by ``import``.
IMPORT_CHUNK_LINES = 100000
#: Bytes of the longest NDJSON line ``import`` reads: an exported line is
#: a record (never over VALUE_TEXT_MAX: a sync keeps a longer value aside,
#: and export writes none) and a few short fields.  A longer line is read
#: through without being held, and skipped.
NDJSON_LINE_MAX = VALUE_TEXT_MAX + 64 * 1024
#: The export date an NDJSON line of a section whose newest export wins
#: counts as when it carries none (an export of an earlier version): older
#: than any stored, so that it never replaces a value, only adds one.
UNDATED_EXPORT = f"{DATE_YEARS[0]}-01-01T00:00:00.000Z"


class LongLine(typing.NamedTuple):
    """A line longer than ndjson_lines() holds: only its length is kept."""

    size: int


def ndjson_lines(pieces, longest=NDJSON_LINE_MAX):
    """The lines (bytes, without their end) of a stream of pieces; a line
    longer than ``longest`` bytes is read through and given as a LongLine
    instead, so that memory holds ``longest`` bytes and a piece at most."""
    held, dropped = [], None  # the line so far (pieces), or the length of one too long
    size = 0
    for piece in pieces:
        start = 0
        while True:
            end = piece.find(b"\n", start)
            part = piece[start:] if end < 0 else piece[start:end]
            if dropped is not None:
                dropped += len(part)
            elif size + len(part) > longest:
                dropped, held, size = size + len(part), [], 0
            else:
                held.append(part)
                size += len(part)
            if end < 0:
                break
            yield LongLine(dropped) if dropped is not None else b"".join(held)
            held, dropped, size, start = [], None, 0, end + 1
    if dropped is not None:
        yield LongLine(dropped)
    elif size:
        yield b"".join(held)


def object_members(line):
    """{key: original JSON text of its value} for the object that is
    ``line`` (bytes: one NDJSON line); raises PayloadError."""
    reader = JsonReader.from_bytes(line)
    members = {}

    def member(key, pos):
        _value, raw, end = reader.value(pos)
        members[key] = raw
        return end
        yield  # a generator, as walk_object delegates to it

    pos = reader.start()
    if reader.char(pos) != "{":
        raise PayloadError("not a JSON object")
    for _batch in reader.walk_object(pos, member):
        pass
    return members


class NdjsonEntry(typing.NamedTuple):
    """What one NDJSON export line brings: whose it is, and where its
    record goes in a payload the app would send."""

    line: int
    #: The person's name, or None (whoever import stores it for).
    person: typing.Optional[str]
    #: The payload's member it goes in ("data", "workoutRoutes", ...) ...
    container: str
    #: ... and the key there (a type, a workout, a characteristic's name).
    key: str
    #: The record's JSON text.
    text: str
    #: Of a section whose newest export wins, the export it was last
    #: written by (canonical UTC; UNDATED_EXPORT when the line says none);
    #: of the others, None.
    exported: typing.Optional[str] = None


def _text_member(members, name, what):
    """The member ``name`` of a line, which must be a non-empty string."""
    value = json.loads(members[name])
    if value.__class__ is not str or not value:
        raise PayloadError(f"{name} is {_json_kind(value) if value != '' else 'empty'}, not {what}")
    return value


def ndjson_entry(number, line):
    """The NdjsonEntry of line ``number`` (bytes), or None for a line that
    brings nothing (empty, a syncs row); raises PayloadError, KeyError or
    ValueError for a line that is not an export line."""
    if not line.strip():
        return None
    members = object_members(line)
    name = json.loads(members["section"])
    person = json.loads(members["person"]) if "person" in members else None
    if person is not None and (person.__class__ is not str or not PERSON_NAME.match(person)):
        raise PayloadError(f"person {log_safe(person, 60)!r} is not a name people may have")
    section = SECTIONS_BY_NAME.get(name if name.__class__ is str else None)
    if section is None:
        if name != "syncs":
            raise PayloadError(f"unknown section {log_safe(name, 60)!r}")
        return None
    if section.shape == "nested":
        data_key, element = NESTED_IMPORTS[name]
        (key, _column), *others = NDJSON_LABELS[name]
        label = {key: _text_member(members, key, "a key"),
                 **{field: json.loads(members[field]) for field, _column in others}}
        return NdjsonEntry(number, person, "data", data_key, element(label, members["record"]))
    exported = None
    if section.latest_wins:
        exported = utc_date(json.loads(members["exported"])) if "exported" in members else None
        exported = exported or UNDATED_EXPORT
    if section.shape == "object":
        return NdjsonEntry(number, person, section.app_keys[0], _text_member(members, "name", "a name"),
                           members["value"], exported)
    label = (_text_member(members, NDJSON_LABELS[name][0][0], "a name") if name in NDJSON_LABELS
             else section.app_keys[0])
    container = section.app_keys[0] if section.shape == "routes" else "data"
    return NdjsonEntry(number, person, container, label, members["record"], exported)


def _ndjson_entries(lines, on_bad_line):
    """The NdjsonEntry of each line of ``lines`` ((number, line) pairs); a
    line that is not an export line raises PayloadError naming it, or
    with ``on_bad_line(number, reason)`` is skipped."""
    for number, line in lines:
        try:
            if line.__class__ is LongLine:
                raise PayloadError(f"{line.size:,} bytes, longer than an export line ({NDJSON_LINE_MAX:,})")
            entry = ndjson_entry(number, line)
        except (ValueError, KeyError, TypeError, PayloadError) as exc:
            reason = f"line {number}: not an export line ({exc})"
            if on_bad_line is None:
                raise PayloadError(reason) from None
            on_bad_line(number, reason)
            continue
        if entry is not None:
            yield entry


def ndjson_payloads(lines, per_payload, on_bad_line=None):
    """Turn NDJSON export lines (bytes, or LongLine) into (person's name or
    None, payload) pairs, each payload of at most ``per_payload`` lines of
    one person, and of lines of one export date where that matters (see
    NdjsonEntry.exported), the same shape the app sends.  Each payload is
    a generator of pieces, made as it is read: consume one before asking
    for the next.  Lines of one section and label in a row share an array;
    a section met again later opens another member of the same name, which
    Payload reads like the first.  A bad line raises PayloadError, or
    with ``on_bad_line(number, reason)`` is skipped."""
    every_entry = _ndjson_entries(enumerate(lines, 1), on_bad_line)
    for person, entries in itertools.groupby(every_entry, key=operator.attrgetter("person")):
        held = []  # an entry a payload left for the next (another export date)
        while True:
            first = held.pop() if held else next(entries, None)
            if first is None:
                break
            yield person, _ndjson_payload(itertools.chain([first], entries), per_payload, held)


def _ndjson_payload(entries, per_payload, held):
    """The pieces of one payload of ``entries``: at most ``per_payload``,
    and of one export date (the first that says one); the entry of another
    date is left in ``held``.  The date goes at the end (``exportDate``,
    which a sync's merge reads once the body is whole)."""
    out, size, exported = ['{"syncSource":"import"'], 0, None
    container = key = None
    for count, entry in enumerate(entries, 1):
        if entry.exported is not None and exported not in (None, entry.exported):
            held.append(entry)
            break
        exported = exported or entry.exported
        where, name, text = entry.container, entry.key, entry.text
        if where != container:
            out.append("]}" if key is not None and container != "characteristics" else "}" if container else "")
            out.append(f",{json.dumps(where)}:{{")
            container, key = where, None
        if container == "characteristics":
            out.append(f"{',' if key is not None else ''}{json.dumps(name)}:{text}")
            key = name
        elif name != key:
            out.append(f"{']' if key is not None else ''}{',' if key is not None else ''}{json.dumps(name)}:[{text}")
            key = name
        else:
            out.append("," + text)
        size += len(text)
        if size >= READ_CHUNK:
            yield "".join(out).encode("utf-8", "surrogatepass")
            out, size = [], 0
        if count >= per_payload:
            break
    if container is not None:
        out.append("}" if container == "characteristics" or key is None else "]}")
    out.append(f',"exportDate":{json.dumps(exported)}}}' if exported else "}")
    yield "".join(out).encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------------------
# Reporting: what is stored, as records (read only); export
# ---------------------------------------------------------------------------

# -- Views: titles; RANGES; a View and its Window; totals per period --------

#: Sample types listed and charted on the status page and /api/summary (the
#: largest first); ``stats --json`` lists all.
PAGE_TYPES_MAX = 40


#: Tables whose row counts the totals report, sections first.
TABLES = tuple(section.table for section in SECTIONS) + BOOKKEEPING_TABLES
#: Columns of the syncs shown by the status page, /api/summary and stats.
SYNC_FIELDS = ("id", "received_at", "remote_addr", "sync_source", "received", "inserted", "duplicates",
               "rejected", "route_points", "body_bytes", "duration_ms", "status", "error")


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
EXPORTS[SYNCS.name] = Export(SYNCS.name, tuple(name for name in SYNCS.column_names if name != PERSON_COLUMN),
                             "received_at", "id")


_QUANTITY = TYPE_PREFIXES[0]


#: What the pages call a type (short name -> title); other types are named
#: by splitting their short name into words.
TYPE_TITLES = {
    "StepCount": "Steps", "SleepAnalysis": "Sleep", "HeartRateVariabilitySDNN": "Heart rate variability",
    "DistanceWalkingRunning": "Walking + running distance", "AppleExerciseTime": "Exercise minutes",
    "ActiveEnergyBurned": "Active energy", "BasalEnergyBurned": "Resting energy",
    "MindfulSession": "Mindful minutes", "AppleStandTime": "Stand minutes", "AppleStandHour": "Stand hours",
    "OxygenSaturation": "Blood oxygen", "FlightsClimbed": "Flights climbed"}
#: Units as the pages show them (None: no unit).
UNIT_TITLES = {"count": None, "count/min": "bpm"}
_WORD_START = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def type_title(type_name):
    """HKQuantityTypeIdentifierRestingHeartRate -> Resting heart rate."""
    short = short_type_name(type_name)
    if short in TYPE_TITLES:
        return TYPE_TITLES[short]
    words = _WORD_START.split(short)
    words = [word if word.isupper() or i == 0 else word.lower() for i, word in enumerate(words)]
    return " ".join(words)[:1].upper() + " ".join(words)[1:]


#: Quantity types stored as a fraction and shown as a percentage.
RATIO_TYPES = frozenset((
    "OxygenSaturation", "BodyFatPercentage", "WalkingAsymmetryPercentage", "WalkingDoubleSupportPercentage",
    "AppleWalkingSteadiness", "BloodAlcoholContent", "PeripheralPerfusionIndex", "AtrialFibrillationBurden"))


class Range(typing.NamedTuple):
    """A choice of the pages' ``?range=``."""

    name: str
    label: str
    #: Days up to today, or None for everything stored.
    days: typing.Optional[int]


#: The ranges the pages offer, in the order of their links.
RANGES = (Range("7d", "7 days", 7), Range("30d", "30 days", 30), Range("90d", "90 days", 90),
          Range("1y", "1 year", 365), Range("all", "All", None))
RANGES_BY_NAME = {choice.name: choice for choice in RANGES}
#: The range a page shows without ``?range=``.
DEFAULT_RANGE = "30d"


class Grain(typing.NamedTuple):
    """How long one chart point is: a day, a week or a month."""

    name: str
    #: The longest window (days) charted at this grain.
    most_days: typing.Optional[int]
    #: strftime format of a point's label on an axis.
    axis_format: str
    #: strftime format of a period in a table.
    table_format: str
    #: What a value "per day" is at this grain (a week's point is the
    #: mean of its days).
    per_day: str = "day"


#: Grains from the finest; a window is charted at the first that holds it.
GRAINS = (Grain("day", 92, "%b %d", "%a %Y-%m-%d"),
          Grain("week", 731, "%b %d", "week of %Y-%m-%d", "day, averaged by week"),
          Grain("month", None, "%b %Y", "%Y-%m", "day, averaged by month"))


def grain_for(days):
    return next(grain for grain in GRAINS if grain.most_days is None or days <= grain.most_days)


class Period(typing.NamedTuple):
    """One chart point's span: its first local day, and its bounds as
    stored timestamps (canonical UTC text, end excluded)."""

    day: str
    start: str
    end: str

    @property
    def date(self):
        """The first local day as a date (what a chart point is labelled with)."""
        return datetime.date.fromisoformat(self.day)



class View(typing.NamedTuple):
    """What one request asks to see: a range of days, in a zone, as of
    ``now``, taken once where the request arrives; where devices overlap,
    the sources counted first (``priority``)."""

    range: Range
    zone: Zone
    #: An aware datetime.
    now: datetime.datetime
    priority: typing.Tuple[str, ...] = SOURCE_PRIORITY
    #: The name of the person whose data it is.
    person: str = FIRST_PERSON_NAME
    #: For a reader who may read everyone's (an admin): every person's name.
    people: typing.Tuple[str, ...] = ()

    @classmethod
    def of(cls, range_name, zone, now, priority=SOURCE_PRIORITY, person=FIRST_PERSON_NAME, people=()):
        """The view of a ``?range=`` name (an unknown one: the default range)."""
        return cls(RANGES_BY_NAME.get(range_name) or RANGES_BY_NAME[DEFAULT_RANGE], zone, now, priority, person,
                   people)


class Window(typing.NamedTuple):
    """The days a page shows and the periods it charts them in."""

    range: Range
    grain: Grain
    first: datetime.date
    last: datetime.date
    periods: typing.Tuple[Period, ...]
    #: Nothing fell in the chosen days: this is the last stretch with data.
    shifted: bool = False
    zone: Zone = Zone()
    priority: typing.Tuple[str, ...] = SOURCE_PRIORITY
    #: At the grain of a week or a month: the stored timestamp of each day's
    #: local midnight, first to last (a period's days with data are counted
    #: between them); at a day's, the periods' starts are these.
    midnights: typing.Tuple[str, ...] = ()

    @property
    def start(self):
        return self.periods[0].start

    @property
    def end(self):
        return self.periods[-1].end

    @property
    def days(self):
        return (self.last - self.first).days + 1


def _period_starts(first, last, grain):
    """First days of the periods that cover first..last, and the day after."""
    if grain.name == "day":
        start = first
    elif grain.name == "week":
        start = first - datetime.timedelta(days=first.weekday())
    else:
        start = first.replace(day=1)
    starts = [start]
    while starts[-1] <= last:
        day = starts[-1]
        if grain.name == "month":
            starts.append((day.replace(day=28) + datetime.timedelta(days=4)).replace(day=1))
        else:
            starts.append(day + datetime.timedelta(days=1 if grain.name == "day" else 7))
    return starts


def make_window(view, first_stamp=None, last_stamp=None):
    """The window of a view's range, ending today; when the data
    (first_stamp to last_stamp) ends before it, the same number of days up
    to the data's last day instead, marked ``shifted``."""
    choice, zone = view.range, view.zone
    today = zone.today(view.now)
    last, shifted = today, False
    data_last = zone.day_of(last_stamp)
    if choice.days is None:
        first = min(zone.day_of(first_stamp) or today, today)
    else:
        first = today - datetime.timedelta(days=choice.days - 1)
        if data_last is not None and data_last < first:
            last, shifted = data_last, True
            first = last - datetime.timedelta(days=choice.days - 1)
    return days_window(choice, first, last, zone, shifted)._replace(priority=view.priority)


def days_window(choice, first, last, zone, shifted=False, grain=None):
    """The Window of the days first..last, at ``grain`` or the one their
    number calls for.  The first week or month starts at ``first`` (it is
    named by its own first day)."""
    grain = grain or grain_for((last - first).days + 1)
    starts = _period_starts(first, last, grain)
    stamps = [zone.midnight(max(day, first)) for day in starts]
    periods = tuple(Period(day.isoformat(), low, high) for day, low, high in zip(starts, stamps, stamps[1:]))
    midnights = () if grain.name == "day" else tuple(
        zone.midnight(first + datetime.timedelta(days=day)) for day in range((last - first).days + 1))
    return Window(choice, grain, first, last, periods, shifted, zone, midnights=midnights)


#: The most periods one query binds (old SQLite allows 999 parameters).
SQL_PERIODS_MAX = 300


def _hour_periods_cte(periods):
    """``periods(i, lo, hi)`` as a WITH clause and its parameters, the
    bounds cut to the hour keys of sample_hours."""
    values = ", ".join("(?, ?, ?)" for _period in periods)
    params = [value for i, period in enumerate(periods) for value in (i, period.start[:13], period.end[:13])]
    return f"WITH periods(i, lo, hi) AS (VALUES {values})", params


class Aggregate(typing.NamedTuple):
    """One period of one type, from its hourly totals."""

    samples: int
    numbers: int
    #: A cumulative type: the sum of what its sources count, merged by
    #: source priority over time when they are kept (merge_by_priority); a
    #: walk that an iPhone and a Watch both counted counts once.  Another
    #: type: the sum over the hours of the largest single-source total.
    best: float
    #: Sum over the hours of the longest single-source duration (seconds).
    seconds: float
    low: typing.Optional[float]
    high: typing.Optional[float]
    #: The mean of the samples (every source's), as the Health app averages.
    mean: typing.Optional[float]
    #: 10th and 90th percentile of the hours' means (nearest rank): the
    #: band a chart draws around the mean.
    p10: typing.Optional[float]
    p90: typing.Optional[float]
    #: Of a category type: samples whose value its CategoryType counts (a
    #: stood hour, not an idle one), and (value's name, samples) of each
    #: value, in the order of its names.
    counted: int = 0
    values: typing.Tuple[typing.Tuple[str, int], ...] = ()
    #: The days of the period that have data (a daily average's divisor),
    #: when type_aggregates was given the days.
    days: int = 0


#: A type's hours in a window, a row per hour, source and category, in key
#: order (so grouped without sorting).
_HOURS_OF_TYPE_SQL = (
    "SELECT hour, source, category, samples, numbers, total, seconds, low, high"
    " FROM sample_hours WHERE type = ? AND hour >= ? AND hour < ?")


def _accumulate(sums, samples, numbers, total, seconds, low, high):
    """Add counts to ``sums`` ([samples, numbers, total, seconds, low,
    high, ...]): a source's rows of a bucket, or a bucket to its period."""
    sums[0] += samples
    sums[1] += numbers
    sums[2] += total
    sums[3] += seconds
    if low is not None and (sums[4] is None or low < sums[4]):
        sums[4] = low
    if high is not None and (sums[5] is None or high > sums[5]):
        sums[5] = high


def type_aggregates(conn, type_name, periods, day_starts=()):
    """[Aggregate or None] per period (None: no samples), from the hourly
    totals: grouped here in one pass, which reads them in key order (SQL
    grouping by period would sort every hour of the window).  With
    ``day_starts`` (the stored timestamps of the periods' local midnights,
    in order) each Aggregate counts its days with data."""
    starts = [period.start[:13] for period in periods]
    day_hours = [stamp[:13] for stamp in day_starts]
    sums = [None] * len(periods)
    index = 0
    cumulative = is_cumulative(type_name)
    category = category_of(type_name)
    names = {}  # category text as kept -> HealthKit's number of the value

    def close(hour, sources, values):
        """Add one bucket's sources ({source: [samples, numbers, total,
        seconds, low, high]}) and values ({number: samples}) to its period."""
        nonlocal index
        while index + 1 < len(starts) and hour >= starts[index + 1]:
            index += 1
        found = sums[index]
        if found is None:
            found = sums[index] = [0, 0, 0.0, 0.0, None, None, [], collections.Counter(), 0.0, set()]
        if len(sources) == 1:  # the usual bucket: one device
            [(samples, numbers, total, seconds, low, high)] = sources.values()
            best = total
        else:
            cells = list(sources.values())
            samples = sum(cell[0] for cell in cells)
            numbers = sum(cell[1] for cell in cells)
            total = sum(cell[2] for cell in cells)
            seconds = max(cell[3] for cell in cells)
            lows = [cell[4] for cell in cells if cell[4] is not None]
            highs = [cell[5] for cell in cells if cell[5] is not None]
            low, high = min(lows, default=None), max(highs, default=None)
            best = total if cumulative else max(cell[2] for cell in cells)
        _accumulate(found, samples, numbers, best, seconds, low, high)
        found[8] += total
        if numbers:
            found[6].append(total / numbers)
        if values:
            found[7].update(values)
        if day_hours and (samples or total):
            found[9].add(bisect.bisect_right(day_hours, hour))

    hour, sources, values = None, {}, None
    for bucket, source, kept, samples, numbers, total, seconds, low, high in conn.execute(
            _HOURS_OF_TYPE_SQL, (type_name, starts[0], periods[-1].end[:13])):
        if bucket != hour:
            if hour is not None:
                close(hour, sources, values)
            hour, sources, values = bucket, {}, None
        cell = sources.get(source)
        if cell is None:
            sources[source] = [samples, numbers, total, seconds, low, high]
        else:
            _accumulate(cell, samples, numbers, total, seconds, low, high)
        if category is not None and samples:
            number = names[kept] if kept in names else names.setdefault(kept, category_value(category, kept))
            values = values if values is not None else collections.Counter()
            values[number] += samples
    if hour is not None:
        close(hour, sources, values)
    return [None if found is None else _aggregate(found, category) for found in sums]


def _aggregate(sums, category=None):
    samples, numbers, best, seconds, low, high, means, values, total, days = sums
    counted, named = samples, ()
    if category is not None:
        if category.counted:
            counted = sum(values[number] for number in category.counted)
        named = tuple((name, values[number]) for number, name in category.names.items() if values[number])
        others = samples - sum(count for _name, count in named)
        named += (("Other", others),) if others else ()
    if not means:
        return Aggregate(samples, numbers, best, seconds, low, high, None, None, None, counted, named, len(days))
    means.sort()
    count = len(means)
    # Nearest rank: the smallest value with at least p of the hours at or below it.
    return Aggregate(samples, numbers, best, seconds, low, high, total / numbers, means[math.ceil(count * 0.1) - 1],
                     means[math.ceil(count * 0.9) - 1], counted, named, len(days))


def window_aggregates(conn, type_name, window):
    """[(Aggregate or None, days)] per period of a window: ``days`` is a
    daily average's divisor, the days of the period inside the window that
    have data (a week of three recorded days is their mean, not a seventh
    of their sum)."""
    if not window.midnights:
        return [(agg, 1) for agg in type_aggregates(conn, type_name, window.periods)]
    return [(agg, max(agg.days, 1) if agg else 1) for agg in type_aggregates(conn, type_name, window.periods,
                                                                             window.midnights)]


# -- Charts: category types, sleep per night, CHART_KINDS, today's tiles ----

#: Sleep stages in stacking order (bottom first), with their labels and colours.
SLEEP_STAGES = (("deep", "Deep", "#1c3f94"), ("core", "Core", "#3a7bd5"), ("rem", "REM", "#7fb3f5"),
                ("unspecified", "Asleep, unspecified", "#6a8caf"), ("awake", "Awake", "#f2a65a"),
                ("in_bed", "In bed", "#c9d6e3"))


class CategoryType(typing.NamedTuple):
    """What a HealthKit category type's values mean, and how a day of it is
    summed up.  Its samples' values arrive as HealthKit's numbers or as
    names ("stood", "HKCategoryValueAppleStandHourStood"): both are shown
    by name."""

    short: str
    #: HealthKit's value numbers -> the names shown.
    names: typing.Dict[int, str]
    #: The values a day counts (empty: every sample).
    counted: typing.Tuple[int, ...] = ()
    #: How a day is summed up: "count" (samples, of ``counted``),
    #: "minutes" (the time they last) or "sleep" (SLEEP_STAGES).
    summary: str = "count"


_SEVERITY = {0: "Unspecified", 1: "Not present", 2: "Mild", 3: "Moderate", 4: "Severe"}
_TEST_RESULT = {1: "Negative", 2: "Positive", 3: "Indeterminate"}
_EVENT = {0: "Event"}
#: Category types by what their values mean; any other counts its samples
#: and shows its values as sent.
CATEGORY_TYPES = (
    CategoryType("SleepAnalysis", {number: next(label for key, label, _colour in SLEEP_STAGES if key == stage)
                                    for number, stage in SLEEP_STAGE_VALUES.items() if isinstance(number, int)},
                 summary="sleep"),
    CategoryType("AppleStandHour", {0: "Stood", 1: "Idle"}, counted=(0,)),
    CategoryType("MindfulSession", {0: "Session"}, summary="minutes"),
    CategoryType("MenstrualFlow", {1: "Unspecified", 2: "Light", 3: "Medium", 4: "Heavy", 5: "None"},
                 counted=(1, 2, 3, 4)),
    CategoryType("CervicalMucusQuality", {1: "Dry", 2: "Sticky", 3: "Creamy", 4: "Watery", 5: "Egg white"}),
    CategoryType("OvulationTestResult", {1: "Negative", 2: "LH surge", 3: "Indeterminate", 4: "Estrogen surge"}),
    CategoryType("PregnancyTestResult", _TEST_RESULT),
    CategoryType("ProgesteroneTestResult", _TEST_RESULT),
    CategoryType("LowCardioFitnessEvent", {1: "Low fitness"}),
    CategoryType("EnvironmentalAudioExposureEvent", {1: "Momentary limit"}),
    CategoryType("HeadphoneAudioExposureEvent", {1: "7-day limit", 2: "Momentary limit"}),
    CategoryType("AppleWalkingSteadinessEvent", {1: "Initial low", 2: "Initial very low", 3: "Repeat low",
                                                 4: "Repeat very low"}),
) + tuple(CategoryType(short, _EVENT) for short in (
    "HighHeartRateEvent", "LowHeartRateEvent", "IrregularHeartRhythmEvent", "ToothbrushingEvent",
    "HandwashingEvent", "SexualActivity", "IntermenstrualBleeding", "SleepApneaEvent")) + tuple(
    CategoryType(short, _SEVERITY, counted=(0, 2, 3, 4)) for short in (
        "Headache", "Nausea", "Fatigue", "AbdominalCramps", "Bloating", "BreastPain", "ChestTightnessOrPain",
        "Chills", "Constipation", "Coughing", "Diarrhea", "Dizziness", "Fainting", "Fever", "GeneralizedBodyAche",
        "Heartburn", "HotFlashes", "LowerBackPain", "PelvicPain", "RapidPoundingOrFlutteringHeartbeat",
        "RunnyNose", "ShortnessOfBreath", "SinusCongestion", "SkippedHeartbeat", "SoreThroat", "Vomiting",
        "Wheezing", "Acne", "LossOfSmell", "LossOfTaste", "MemoryLapse", "NightSweats", "BladderIncontinence",
        "DrySkin", "HairLoss", "VaginalDryness"))
CATEGORY_TYPES_BY_SHORT = {category.short: category for category in CATEGORY_TYPES}
_NOT_NAME = re.compile(r"[^a-z0-9]")


def category_of(type_name):
    """The CategoryType of a HealthKit category type, or None."""
    if not type_name.startswith(TIMED_TYPE_PREFIX):
        return None
    return CATEGORY_TYPES_BY_SHORT.get(type_name[len(TIMED_TYPE_PREFIX):])


def category_value(category, value):
    """HealthKit's number of a category sample's value (as stored, or as
    the text sample_hours keeps), or None."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            text = _NOT_NAME.sub("", text.lower())
            for prefix in ("hkcategoryvalue", category.short.lower()):
                text = text[len(prefix):] if text.startswith(prefix) else text
            return next((number for number, name in category.names.items()
                         if _NOT_NAME.sub("", name.lower()) == text), None)
    if isinstance(value, float) and float.is_integer(value):
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def category_name(type_name, value):
    """The name a category sample's value is shown by, or None."""
    category = category_of(type_name)
    return None if category is None else category.names.get(category_value(category, value))


#: A window's sleep hours: per hour, source and value, the time counted.
_SLEEP_HOURS_SQL = "SELECT hour, source, category, seconds FROM sample_hours WHERE type = ? AND hour >= ? AND hour < ?"


def _night_periods(window):
    """Nights of a window's days: from noon the day before to noon."""
    nights = []
    for offset in range(window.days):
        day = window.first + datetime.timedelta(days=offset)
        nights.append(Period(day.isoformat(), window.zone.midnight(day - datetime.timedelta(days=1), 12),
                             window.zone.midnight(day, 12)))
    return nights


def _night_hours(seconds, key):
    """{stage: hours} of one night from {source kept: {stage: seconds}}, as
    the Health app shows a night: asleep and awake from the first source (by
    ``key``) that recorded sleep; in bed from the first that recorded it,
    less what the stages account for (the chart stacks them)."""
    def first_with(stages):
        found = [source for source, counted in seconds.items() if any(counted.get(stage) for stage in stages)]
        return min(found, key=key) if found else None

    hours, asleep = {}, first_with(ASLEEP_STAGES)
    if asleep is not None:
        hours = {stage: counted / 3600 for stage, counted in seconds[asleep].items()
                 if counted > 0 and (stage in ASLEEP_STAGES or stage == "awake")}
    in_bed = first_with(("in_bed",))
    if in_bed is not None and seconds[in_bed]["in_bed"] / 3600 > sum(hours.values()):
        hours["in_bed"] = seconds[in_bed]["in_bed"] / 3600 - sum(hours.values())
    return hours


def sleep_nights(conn, window):
    """{night's day: {stage: hours}} of the window's nights: a night runs
    from noon the day before to noon of its day (local time), so it is the
    day you wake up, and a sample counts in the night it starts in.  Where
    sources overlap, the night is the first source's (SourceRanks by the
    window's priority, entered by hand first), never a sum; a source's
    overlapping stages count once (merge_sleep_hours)."""
    nights = _night_periods(window)
    if not nights:
        return {}
    ranks = SourceRanks.of(conn, None, window.priority)
    bounds = [night.start[:13] for night in nights]
    found, stages = {}, {}
    for hour, kept, category, seconds in conn.execute(_SLEEP_HOURS_SQL, (SLEEP_TYPE, bounds[0],
                                                                         nights[-1].end[:13])):
        stage = stages[category] if category in stages else stages.setdefault(category, sleep_stage(category))
        if stage is not None and seconds > 0:
            night = found.setdefault(nights[bisect.bisect_right(bounds, hour) - 1].day, {})
            counted = night.setdefault(kept, {})
            counted[stage] = counted.get(stage, 0.0) + seconds
    nights_hours = {}
    for day, seconds in found.items():
        hours = _night_hours(seconds, lambda kept: ranks.key(*sleep_source_parts(kept)))
        if hours:
            nights_hours[day] = hours
    return nights_hours


def asleep_hours(stages):
    return sum(stages.get(stage, 0) for stage in ASLEEP_STAGES)


def sleep_points(conn, window):
    """Chart points of sleep: (period's day, asleep hours, {stage: hours}),
    the hours a night's average over the nights of the period with data."""
    nights = sleep_nights(conn, window)
    points = []
    for index, period in enumerate(window.periods):
        following = window.periods[index + 1].day if index + 1 < len(window.periods) else "9999"
        inside = [stages for day, stages in nights.items() if period.day <= day < following]
        if not inside:
            points.append((period.date, None, {}))
            continue
        mean = {stage: sum(night.get(stage, 0) for night in inside) / len(inside) for stage, _l, _c in SLEEP_STAGES}
        mean = {stage: hours for stage, hours in mean.items() if hours}
        points.append((period.date, asleep_hours(mean), mean))
    return tuple(points)


class ChartKind(typing.NamedTuple):
    """How one kind of type is charted: a period's value and its drawing."""

    name: str
    #: What a point is, in words, under the chart's title; {per} is "day",
    #: "week" or "month".
    label: str
    #: ``point(aggregate, days)`` -> (value, band low, band high) or
    #: (value,), or None; ``days`` is the period's number of days.
    point: typing.Callable
    #: How it is drawn: a key of DRAWINGS.
    draw: str
    #: ``applies(type identifier, short name)``: the first kind that
    #: applies to a type charts it.
    applies: typing.Callable
    #: The value axis starts at zero.
    from_zero: bool = True
    #: The unit shown, when not the samples' own (None: theirs; "": none).
    unit: typing.Optional[str] = None
    #: Values are multiplied by this for display (fractions as percent).
    scale: float = 1.0
    #: Column headings of the per-type page's period table, after "Period",
    #: and ``cells(aggregate, days)`` -> their values.
    columns: typing.Tuple[str, ...] = ("Samples",)
    cells: typing.Callable = lambda agg, days: (agg.samples,)
    #: What a stacked point's parts are: (key, label, colour), bottom first.
    stages: typing.Tuple[typing.Tuple[str, str, str], ...] = ()
    #: The value axis has whole-number ticks (counts).
    whole: bool = False


def _mean_point(agg, days):
    return (agg.mean, agg.p10, agg.p90) if agg.numbers else None


def _mean_cells(agg, days):
    return (agg.samples, agg.low, agg.mean, agg.high) if agg.numbers else (agg.samples, None, None, None)


_DAILY = "total per day; where sources counted the same time, once (by source priority, as the Health app)"
#: What an averaged type's chart says it draws.
_AVERAGED = "mean of the samples; band from the 10th to the 90th percentile of the hours' means"


def _values_text(agg):
    """A category type's samples per value name: "Stood 13, Idle 2"."""
    return ", ".join(f"{name} {count:,}" for name, count in agg.values) or None


def _summed_up(summary):
    """``applies`` of the chart kind of the category types summed up so."""
    def applies(type_name, short):
        category = category_of(type_name)
        return category is not None and category.summary == summary
    return applies


#: Every chart kind, in the order they are tried on a type.
CHART_KINDS = (
    ChartKind("sleep", "hours asleep per night, by stage", None, "stack",
              lambda type_name, short: type_name == SLEEP_TYPE, unit="h",
              columns=("Asleep",) + tuple(label for _key, label, _colour in SLEEP_STAGES), cells=None,
              stages=SLEEP_STAGES),
    ChartKind("sum", _DAILY, lambda agg, days: (agg.best / days,) if agg.numbers or agg.best else None, "bars",
              lambda type_name, short: is_cumulative(type_name),
              columns=("Samples", "Total", "Per day"),
              cells=lambda agg, days: (agg.samples, agg.best, agg.best / days)),
    ChartKind("percent", _AVERAGED, _mean_point, "line",
              lambda type_name, short: type_name.startswith(_QUANTITY) and short in RATIO_TYPES,
              from_zero=False, unit="%", scale=100.0, columns=("Samples", "Min", "Mean", "Max"), cells=_mean_cells),
    ChartKind("mean", _AVERAGED, _mean_point, "line",
              lambda type_name, short: type_name.startswith(_QUANTITY), from_zero=False,
              columns=("Samples", "Min", "Mean", "Max"), cells=_mean_cells),
    ChartKind("minutes", "minutes per day; per hour, the source that recorded most",
              lambda agg, days: (agg.seconds / 60 / days,) if agg.seconds else None, "bars", _summed_up("minutes"),
              unit="min", columns=("Samples", "Minutes", "Per day"),
              cells=lambda agg, days: (agg.samples, agg.seconds / 60, agg.seconds / 60 / days)),
    ChartKind("stand", "hours stood per day (the Watch's stand hours)",
              lambda agg, days: (agg.counted / days,) if agg.samples else None, "bars",
              lambda type_name, short: type_name == TIMED_TYPE_PREFIX + "AppleStandHour", unit="h", whole=True,
              columns=("Stood", "Per day", "Values"),
              cells=lambda agg, days: (agg.counted, agg.counted / days, _values_text(agg))),
    ChartKind("count", "samples per day, not counting \"not present\" nor \"none\"",
              lambda agg, days: (agg.counted / days,) if agg.counted else None, "bars",
              lambda type_name, short: True, unit="", columns=("Counted", "Per day", "Values"),
              cells=lambda agg, days: (agg.counted, agg.counted / days, _values_text(agg))),
)
#: How a medication's doses stack.
DOSE_STAGES = (("taken", "Taken", "#2a9d8f"), ("skipped", "Skipped", "#c7c7c7"))
#: The chart of a medication's doses per period, taken and skipped (no type
#: has it).
DOSES = ChartKind("doses", "doses taken and skipped per period", None, "stack", lambda type_name, short: False,
                  unit="", stages=DOSE_STAGES, whole=True)


def chart_kind(type_name):
    """The chart kind of a type: the first that applies."""
    short = short_type_name(type_name)
    return next(kind for kind in CHART_KINDS if kind.applies(type_name, short))


def sample_types(conn, limit=None):
    """[(type, rows, first_date, last_date)] from the kept totals, the
    largest first (at most ``limit``)."""
    return conn.execute("SELECT type, rows, first_date, last_date FROM sample_types ORDER BY rows DESC, type"
                        " LIMIT ?", (-1 if limit is None else limit,)).fetchall()


def table_totals(conn):
    """Row counts per table.  Samples are counted from the kept per-type
    totals: counting the clustered table reads all of it."""
    totals = {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in TABLES
              if table != SAMPLES.table}
    totals[SAMPLES.table] = conn.execute("SELECT coalesce(sum(rows), 0) FROM sample_types").fetchone()[0]
    return {table: totals[table] for table in TABLES}


def connection_facts(store):
    """What the endpoint's GET (the app's "Test Connection") answers: row
    counts per table and the last sync."""
    keys = ("id", "received_at", "sync_source", "status", "received", "inserted", "error")
    with store.reader() as conn:
        last = latest_syncs(conn, 1)
        return {"totals": table_totals(conn),
                "last_sync": {key: getattr(last[0], key) for key in keys} if last else None}


def latest_syncs(conn, count, status=None):
    """The last ``count`` syncs (of ``status``, if given), the latest first,
    with the fields pages show (SYNC_FIELDS; not the envelope, which may be
    large)."""
    where, params = (" WHERE status = ?", (status, count)) if status else ("", (count,))
    return [Sync(**dict(zip(SYNC_FIELDS, row)))
            for row in conn.execute(f"{SYNCS.select_sql(SYNC_FIELDS, schema='')}{where} ORDER BY id DESC LIMIT ?",
                                    params)]


def data_span(conn):
    """(first, last) stored date of any sample, workout or dose."""
    row = conn.execute(
        "SELECT min(first), max(last) FROM (SELECT min(first_date) AS first, max(last_date) AS last FROM sample_types"
        " UNION ALL SELECT min(start_date), max(start_date) FROM workouts"
        " UNION ALL SELECT min(start_date), max(start_date) FROM medication_dose_events)").fetchone()
    return row[0], row[1]


#: The largest magnitude a record hands to pages and JSON: room left for
#: their own arithmetic (hours shown as seconds, fractions as percent).
SHOWN_MAX = 1e300


def finite(value):
    """A stored or computed number as records hold it: itself when finite
    and within SHOWN_MAX, else None (shown as "–", null in JSON).  Anything
    that is not a number (text) is left as it is."""
    kind = value.__class__
    if kind is float or kind is int:
        return value if -SHOWN_MAX <= value <= SHOWN_MAX else None  # NaN compares false
    return value


class TypeInfo(typing.NamedTuple):
    """A stored type as the pages list it."""

    #: The full identifier: HKQuantityTypeIdentifierHeartRate.
    type: str
    #: The short name: HeartRate.
    name: str
    title: str
    rows: int
    #: Stored timestamps of its first and last sample.
    first: typing.Optional[str]
    last: typing.Optional[str]
    kind: ChartKind


def type_info(type_name, rows, first, last):
    """The TypeInfo of a row of sample_types."""
    return TypeInfo(type_name, short_type_name(type_name), type_title(type_name), rows, first, last,
                    chart_kind(type_name))


class Chart(typing.NamedTuple):
    """One chart over a window: a point per period."""

    #: What is charted: a type's identifier, or a medication's key.
    type: str
    #: Its short name (a medication's name), and its title.
    name: str
    title: str
    kind: ChartKind
    grain: Grain
    #: The unit shown (None: none).
    unit: typing.Optional[str]
    #: Per period: (its first day, value or None, ...); after the value, a
    #: line's band (low, high), a stack's {stage key: value}.
    points: typing.Tuple[tuple, ...]


def chart_data(conn, info, window):
    """A type's chart over a window, or None when no period has a value."""
    kind = info.kind
    if kind.name == "sleep":
        points = sleep_points(conn, window)
    else:
        points = []
        for period, (agg, days) in zip(window.periods, window_aggregates(conn, info.type, window)):
            values = kind.point(agg, days) if agg else None
            points.append((period.date, *(None if v is None else finite(v * kind.scale) for v in values))
                          if values else (period.date, None))
        points = tuple(points)
    if not any(point[1] is not None for point in points):
        return None
    return Chart(info.type, info.name, info.title, kind, window.grain, display_unit(conn, info.type, kind), points)


def stored_unit(conn, type_name):
    """The unit of a type's latest sample as the app sent it ("count",
    "count/min"), or None."""
    row = conn.execute("SELECT unit FROM samples WHERE type = ? ORDER BY start_date DESC LIMIT 1",
                       (type_name,)).fetchone()
    return row[0] if row and isinstance(row[0], str) else None


def display_unit(conn, type_name, kind):
    """The unit a type's values are shown in (None: none)."""
    if kind.unit is not None:
        return kind.unit or None
    unit = stored_unit(conn, type_name)
    return UNIT_TITLES.get(unit, unit) if unit is not None else None


#: The tiles of "Today", like the Health app's summary: (type, title).
TODAY_TYPES = (("HKQuantityTypeIdentifierStepCount", "Steps"),
               ("HKQuantityTypeIdentifierActiveEnergyBurned", "Active energy"),
               ("HKQuantityTypeIdentifierDistanceWalkingRunning", "Distance"),
               ("HKQuantityTypeIdentifierAppleExerciseTime", "Exercise"),
               ("HKQuantityTypeIdentifierRestingHeartRate", "Resting heart rate"),
               ("HKQuantityTypeIdentifierHeartRateVariabilitySDNN", "Heart rate variability"),
               (SLEEP_TYPE, "Sleep last night"))
#: Days the tiles' averages cover (before today).
TODAY_AVERAGE_DAYS = 30


class Tile(typing.NamedTuple):
    """A tile of "Today": today's value, and the average of the days before
    that have one."""

    type: str
    title: str
    value: typing.Optional[float]
    unit: typing.Optional[str]
    average: typing.Optional[float]


def today_tiles(conn, known, view):
    """The tiles of the TODAY_TYPES among ``known`` ({type: TypeInfo}) that
    were recorded in the last TODAY_AVERAGE_DAYS days."""
    today = view.zone.today(view.now)
    window = days_window(RANGES_BY_NAME["30d"], today - datetime.timedelta(days=TODAY_AVERAGE_DAYS), today,
                         view.zone)._replace(priority=view.priority)
    tiles = []
    for type_name, title in TODAY_TYPES:
        if type_name not in known:
            continue
        chart = chart_data(conn, known[type_name], window)
        if chart is None:
            continue
        values = [point[1] for point in chart.points]
        before = [value for value in values[:-1] if value is not None]
        today_value = values[-1]
        if today_value is None and chart.kind.draw == "bars":
            today_value = 0  # nothing counted yet today
        tiles.append(Tile(type_name, title, today_value, chart.unit,
                          finite(sum(before) / len(before)) if before else None))
    return tuple(tiles)


# -- Records: what the app sends, the store's facts, workouts, medications --

#: Latest elements of each section (and sample type) the field inventory reads.
FIELDS_ELEMENTS_READ = 500
#: Fields listed per section or type (the most used first).
FIELDS_LISTED = 30
#: Sample types the inventory covers (the largest first).
FIELDS_TYPES_MAX = 60
#: Distinct fields counted per section or type: an element may hold any
#: number of them (the rest are not counted).
FIELDS_COUNTED_MAX = 1000


class FieldUse(typing.NamedTuple):
    """One field of the elements of a section or type, as the app sends it."""

    field: str
    #: JSON types it held ("string", "number", "object"...), most often first.
    kinds: typing.Tuple[str, ...]
    #: Elements (of those read) that carry it.
    elements: int
    #: The section's dates of the first and last of them.
    first: typing.Optional[str]
    last: typing.Optional[str]


class FieldGroup(typing.NamedTuple):
    """What the latest elements of a section or sample type carry."""

    #: The section's name, or the sample type.
    name: str
    #: Elements read (the latest FIELDS_ELEMENTS_READ), and stored in all.
    read: int
    stored: int
    fields: typing.Tuple[FieldUse, ...]
    #: Derived columns empty in most elements read: (column, elements without it).
    empty: typing.Tuple[typing.Tuple[str, int], ...]


_JSON_KINDS = ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"), (list, "array"),
               (dict, "object"), (type(None), "null"))


def _field_group(name, rows, stored, derived):
    """The FieldGroup of ``rows`` ((date, record, derived values...)), read
    one at a time (a record may be megabytes)."""
    fields = {}
    empty = collections.Counter()
    read = 0
    for date, record, *values in rows:
        read += 1
        for column, value in zip(derived, values):
            if value is None:
                empty[column] += 1
        try:
            element = JsonReader.decode(record)
        except (ValueError, StopIteration):
            continue
        if element.__class__ is not dict:
            continue
        for field, value in element.items():
            use = fields.get(field)
            if use is None:
                if len(fields) >= FIELDS_COUNTED_MAX:
                    continue
                use = fields[field] = [collections.Counter(), 0, date, date]
            use[0][next((kind for cls, kind in _JSON_KINDS if value.__class__ is cls), "other")] += 1
            use[1] += 1
            if date is not None:
                use[2] = date if use[2] is None or date < use[2] else use[2]
                use[3] = date if use[3] is None or date > use[3] else use[3]
    listed = sorted(fields.items(), key=lambda item: (-item[1][1], item[0]))[:FIELDS_LISTED]
    return FieldGroup(name, read, stored, tuple(
        FieldUse(field, tuple(kind for kind, _count in use[0].most_common()), use[1], use[2], use[3])
        for field, use in listed), tuple((column, count) for column, count in empty.items() if count * 2 > read))


def field_inventory(store):
    """[FieldGroup] of every section with elements, then of the largest
    sample types: what the app really sends, and the columns left empty."""
    groups = []
    with store.reader() as conn:
        for section in SECTIONS:
            names = [name for name, _type in section.columns]
            if "record" not in names or section is SAMPLES:
                continue
            derived = [name for name in names if name not in section.key and name != "record"]
            date = section.date_column or "NULL"
            order = f" ORDER BY {section.date_column} DESC" if section.date_column else ""
            stored = conn.execute(f"SELECT count(*) FROM {section.table}").fetchone()[0]
            if stored:
                rows = conn.execute(f"SELECT {date}, record{''.join(', ' + name for name in derived)} FROM "
                                    f"{section.table}{order} LIMIT ?", (FIELDS_ELEMENTS_READ,))
                groups.append(_field_group(section.name, rows, stored, derived))
        for type_name, stored, _first, _last in sample_types(conn, FIELDS_TYPES_MAX):
            rows = conn.execute("SELECT start_date, record, value FROM samples WHERE type = ?"
                                " ORDER BY start_date DESC LIMIT ?", (type_name, FIELDS_ELEMENTS_READ))
            groups.append(_field_group(type_name, rows, stored, ("value",)))
    return groups


def field_inventory_json(groups):
    """The inventory as JSON (``stats --fields --json``)."""
    return [{"name": group.name, "read": group.read, "stored": group.stored,
             "fields": [use._asdict() for use in group.fields],
             "empty": [{"column": column, "elements": count} for column, count in group.empty]} for group in groups]


class StoreFacts(typing.NamedTuple):
    """What is stored: what ``stats`` shows, and the status page besides
    its window."""

    #: The database file (absolute; None where the reader is not an
    #: admin), and its size with the write-ahead log.
    path: typing.Optional[str]
    size_bytes: int
    schema_version: int
    #: Rows per table, in the order of TABLES.
    totals: typing.Dict[str, int]
    #: The largest types first, as many as asked for; ``more_types``
    #: counts the others.
    types: typing.Tuple[TypeInfo, ...]
    more_types: int
    #: The latest syncs first.
    syncs: typing.Tuple[Sync, ...]


def store_facts(store, sync_count=20, type_limit=PAGE_TYPES_MAX):
    """What is stored: at most ``type_limit`` types (None: all)."""
    with store.reader() as conn:
        return _store_facts(conn, store.path, sync_count, type_limit)


def _store_facts(conn, path, sync_count, type_limit):
    schema_version = conn.execute("PRAGMA user_version").fetchone()[0]
    totals = table_totals(conn)
    types = tuple(type_info(*row) for row in sample_types(conn, type_limit))
    syncs = tuple(latest_syncs(conn, sync_count))
    more_types = 0
    if type_limit is not None and len(types) == type_limit:
        more_types = conn.execute("SELECT count(*) FROM sample_types").fetchone()[0] - type_limit
    return StoreFacts(os.path.abspath(path), database_size(path), schema_version, totals, types, more_types, syncs)


#: Workouts a page lists (the latest of its window).
WORKOUTS_LISTED = 50
#: The heart-rate type averaged over a workout.
HEART_RATE_TYPE = "HKQuantityTypeIdentifierHeartRate"
#: Metres per unit of a workout's distance, by its unit.
DISTANCE_UNITS = {"m": 1.0, "km": 1000.0, "mi": 1609.344, "yd": 0.9144, "ft": 0.3048}
#: Kilocalories per unit of a workout's energy, by its unit.
ENERGY_UNITS = {"kcal": 1.0, "cal": 1.0, "Cal": 1.0, "kJ": 1 / 4.184, "J": 1 / 4184.0}


def _quantity(record, fields, units, default_unit):
    """A workout's total (a number, or {"quantity"|"value"|"qty",
    "unit"|"units"}) of the first of ``fields`` present, in the unit that
    ``units`` converts to, or None."""
    field = next((name for name in fields if record.get(name) is not None), fields[0])
    value = record.get(field)
    unit = record.get(field + "Unit", default_unit)
    if isinstance(value, dict):
        unit = value.get("unit", value.get("units", unit))
        value = value.get("quantity", value.get("value", value.get("qty")))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    factor = units.get(unit) if isinstance(unit, str) else None
    return None if factor is None else finite(value * factor)


class Workout(typing.NamedTuple):
    """A workout as shown: its stored dates, distance in metres, energy in
    kcal, the mean heart rate over it, and how many route points it has."""

    uuid: str
    activity_type: typing.Optional[str]
    start_date: str
    end_date: typing.Optional[str]
    duration_seconds: typing.Optional[float]
    distance_m: typing.Optional[float]
    energy_kcal: typing.Optional[float]
    heart_rate: typing.Optional[float]
    route_points: int
    #: The app's sourceName.
    source: typing.Any


def workout_of(conn, row):
    """The Workout of a row (uuid, activity, start, end, duration, record)."""
    uuid, activity, start, end, duration, record = row
    try:
        fields = JsonReader.decode(record)
    except (ValueError, StopIteration):
        fields = {}
    fields = fields if isinstance(fields, dict) else {}
    if not isinstance(duration, (int, float)):
        begin, finish = parse_stamp(start), parse_stamp(end)
        duration = (finish - begin).total_seconds() if begin and finish else None
    duration = finite(duration)
    heart = None
    if end:
        heart = conn.execute(f"SELECT avg(value) FROM samples WHERE type = ? AND start_date >= ? AND start_date <= ?"
                             f" AND {_NUMERIC}", (HEART_RATE_TYPE, start, end)).fetchone()[0]
    if heart is None:  # the other app's own series of the workout
        heart = conn.execute(f"SELECT avg(value) FROM workout_series WHERE workout_uuid = ? AND series ="
                             f" 'heartRateData' AND {_NUMERIC}", (uuid,)).fetchone()[0]
    points = conn.execute("SELECT count(*) FROM workout_route_points WHERE workout_uuid = ?", (uuid,)).fetchone()[0]
    return Workout(uuid, activity, start, end, duration,
                   _quantity(fields, ("totalDistance", "distance"), DISTANCE_UNITS, "m"),
                   _quantity(fields, ("totalEnergyBurned", "activeEnergyBurned", "activeEnergy", "totalEnergy"),
                             ENERGY_UNITS, "kcal"), finite(heart), points,
                   fields.get("sourceName", fields.get("source")))


_WORKOUT_COLUMNS = "uuid, activity_type, start_date, end_date, duration_seconds, record"


def workout_list(conn, window):
    """((Workout, ...), how many more) of a window, the latest first."""
    rows = conn.execute(f"SELECT {_WORKOUT_COLUMNS} FROM workouts WHERE start_date >= ? AND start_date < ?"
                        " ORDER BY start_date DESC LIMIT ?", (window.start, window.end, WORKOUTS_LISTED)).fetchall()
    more = 0
    if len(rows) == WORKOUTS_LISTED:
        more = conn.execute("SELECT count(*) FROM workouts WHERE start_date >= ? AND start_date < ?",
                            (window.start, window.end)).fetchone()[0] - WORKOUTS_LISTED
    return tuple(workout_of(conn, row) for row in rows), more


class Medication(typing.NamedTuple):
    """A medication's doses in a window."""

    #: Its key as stored, and what the app calls it.
    medication: typing.Any
    name: typing.Any
    taken: int
    skipped: int
    #: Doses per period (DOSES): (day, doses or None, {"taken": n, "skipped": n}).
    chart: Chart


def medications(conn, window):
    """The medications with doses in a window, by name."""
    starts = [period.start for period in window.periods]
    found = {}
    for start, medication, status in conn.execute(
            "SELECT start_date, medication, lower(coalesce(log_status, '')) FROM medication_dose_events"
            " WHERE start_date >= ? AND start_date < ?", (window.start, window.end)):
        counts = found.get(medication)
        if counts is None:
            counts = found[medication] = [[0, 0] for _period in window.periods]
        counts[bisect.bisect_right(starts, start) - 1][0 if status == "taken" else 1] += 1
    names = dict(conn.execute("SELECT key, display_text FROM medications"))
    listed = []
    for medication, counts in sorted(found.items(), key=lambda item: str(names.get(item[0]) or item[0])):
        name = names.get(medication) or medication
        points = tuple((period.date, taken + skipped or None, {"taken": taken, "skipped": skipped})
                       for period, (taken, skipped) in zip(window.periods, counts))
        listed.append(Medication(medication, name, sum(taken for taken, _skipped in counts),
                                 sum(skipped for _taken, skipped in counts),
                                 Chart(medication, name, name, DOSES, window.grain, None, points)))
    return tuple(listed)


# -- The status report: gaps, the journal, StatusReport and its JSON --------

#: Types /api/latest and /metrics list per person: the largest, as the
#: status page charts them (a bound however many types a person has).
LATEST_TYPES_MAX = PAGE_TYPES_MAX
#: Gaps: the days looked back on to learn what a person usually sends ...
GAP_DAYS = 28
#: ... the days of them with data that make a type (or syncs) usual ...
GAP_USUAL_DAYS = 7
#: ... and how long data may stop before it is a gap: GAP_FACTOR times
#: the usual longest pause of a day (the 90th percentile of each day's
#: longest interval between hours with data, a night's included), never
#: less than GAP_MIN_SECONDS.
GAP_FACTOR = 2
GAP_MIN_SECONDS = 12 * 3600
#: Nights of the 7 before last night with sleep that make a missing night a gap.
GAP_SLEEP_NIGHTS = 5
#: The most gaps listed.
GAPS_MAX = 20
#: How far after its sync arrived a sample may be dated and still be a
#: type's latest at once (a date sent without its offset, taken as UTC, is
#: up to 14 hours ahead).  One dated later (a clock set a year ahead) is
#: kept, but is neither the latest nor counted for gaps until its time.
ARRIVAL_LEAD = "+1 day"


class Gap(typing.NamedTuple):
    """Data that stopped arriving: ``kind`` "sync" (no sync), "source" (no
    data from a device), "type" (one type of a device) or "sleep" (no sleep
    last night)."""

    kind: str
    message: str
    #: The last data (or sync) before the gap, canonical UTC; None for sleep.
    since: typing.Optional[str] = None
    type: typing.Optional[str] = None
    source: typing.Optional[str] = None
    #: Seconds data may stop before it is a gap (learned; see data_gaps).
    threshold: float = 0.0


def _usual_pause(seconds):
    """How long data may stop, from the sorted Unix times it arrived at."""
    longest = {}
    for earlier, later in zip(seconds, seconds[1:]):
        day = later // 86400
        longest[day] = max(longest.get(day, 0), later - earlier)
    pauses = sorted(longest.values())
    usual = pauses[math.ceil(len(pauses) * 0.9) - 1] if pauses else 0
    return max(GAP_MIN_SECONDS, GAP_FACTOR * usual)


def data_gaps(conn, view, limit=LATEST_TYPES_MAX):
    """What stopped arriving, by thresholds learned from the last GAP_DAYS
    days (see _usual_pause).  Syncs that came on at least GAP_USUAL_DAYS
    of them are a gap once the last is older than their threshold.  A
    device's data of one of the largest ``limit`` types, as usual, is a
    gap once syncs went on arriving for longer than its threshold without
    it (a phone that does not sync is the sync's gap, not each device's);
    a device all of whose usual types stopped is one gap.  Sleep is a gap
    when a sync came after last night ended (noon) without any, and
    GAP_SLEEP_NIGHTS of the 7 nights before had some."""
    now, zone = view.now.timestamp(), view.zone
    since = _canonical(view.now - datetime.timedelta(days=GAP_DAYS))
    gaps = []

    def when(seconds, hours=False):
        local = zone.local(datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc))
        return f"{local:%b %d %H:%M}" if hours else f"{local:%b %d}"

    # Hours after this one (samples dated ahead) do not count: not yet.
    until = _canonical(view.now + datetime.timedelta(hours=1))[:13]
    synced = [seconds for (seconds,) in conn.execute(
        f"SELECT CAST(strftime('%s', received_at) AS INTEGER) AS t FROM syncs WHERE status = '{SyncStatus.OK}'"
        " AND received_at >= ? AND t IS NOT NULL ORDER BY t", (since,))]
    if not synced:
        return gaps
    last_sync = synced[-1]
    if len({seconds // 86400 for seconds in synced}) >= GAP_USUAL_DAYS:
        threshold = _usual_pause(synced)
        if now - last_sync > threshold:
            gaps.append(Gap("sync", f"no sync for {(now - last_sync) / 3600:.0f} hours",
                            _canonical(datetime.datetime.fromtimestamp(last_sync, datetime.timezone.utc)),
                            threshold=threshold))
    stopped, usual = collections.defaultdict(list), collections.Counter()
    latest = collections.defaultdict(dict)  # {source: {type: its last hour's seconds}}
    for type_name, _rows, _first, _last in sample_types(conn, limit):
        if type_name == SLEEP_TYPE:
            continue
        hours = collections.defaultdict(list)
        for source, seconds in conn.execute(
                "SELECT DISTINCT source, CAST(strftime('%s', substr(hour, 1, 13) || ':00') AS INTEGER) AS t"
                " FROM sample_hours WHERE type = ? AND hour >= ? AND hour < ? AND t IS NOT NULL ORDER BY source, t",
                (type_name, since[:13], until)):
            hours[source].append(seconds)
        for source, seconds in hours.items():
            latest[source][type_name] = seconds[-1]
            if len({hour // 86400 for hour in seconds}) < GAP_USUAL_DAYS:
                continue
            usual[source] += 1
            threshold = _usual_pause(seconds)
            if last_sync - (seconds[-1] + 3600) > threshold:
                stopped[source].append(Gap("type", "", _canonical(datetime.datetime.fromtimestamp(
                    seconds[-1], datetime.timezone.utc)), type_name, source, threshold))
    for source, found in sorted(stopped.items()):
        name = source or "a source without a name"
        last = max(gap.since for gap in found)
        # A device that still sends other types has not stopped: its gap
        # is the types that did.
        still = sorted(type_title(type_name) for type_name, seconds in latest[source].items()
                       if seconds > parse_stamp(last).timestamp() and type_name not in {gap.type for gap in found})
        if len(found) == usual[source] and not still:
            gaps.append(Gap("source", f"no data from {name} since {when(parse_stamp(last).timestamp())}", last,
                            None, source, max(gap.threshold for gap in found)))
        else:
            sends = f" (it still sends {', '.join(still[:3])}{', ...' if len(still) > 3 else ''})" if still else ""
            gaps.extend(gap._replace(message=f"no {type_title(gap.type)} from {name} since "
                                             f"{when(parse_stamp(gap.since).timestamp(), True)}{sends}")
                        for gap in found)
    today = zone.today(view.now)
    noon = parse_stamp(zone.midnight(today, 12)).timestamp()
    has_sleep = conn.execute("SELECT 1 FROM sample_types WHERE type = ?", (SLEEP_TYPE,)).fetchone()
    if has_sleep and last_sync > noon:  # a sync came after last night ended
        nights = sleep_nights(conn, days_window(RANGES_BY_NAME["7d"], today - datetime.timedelta(days=7), today,
                                                zone)._replace(priority=view.priority))
        before = sum(1 for day, stages in nights.items() if day < today.isoformat() and asleep_hours(stages) > 0)
        if before >= GAP_SLEEP_NIGHTS and not asleep_hours(nights.get(today.isoformat(), {})):
            gaps.append(Gap("sleep", "no sleep recorded last night", type=SLEEP_TYPE))
    return gaps[:GAPS_MAX]


class JournalKind(typing.NamedTuple):
    """A collection of single events shown in the status page's journal
    (Health Auto Export's states of mind, symptoms, ECGs...)."""

    #: Its section's name.
    section: str
    #: What an entry is called on the page.
    title: str
    #: (column, what the page calls it or "") of what an entry says.
    columns: typing.Tuple[typing.Tuple[str, str], ...]


#: The journal's kinds, in the order an instant's entries are listed.
JOURNAL_KINDS = (
    JournalKind("ecg", "ECG", (("classification", ""), ("average_heart_rate", "average heart rate"),
                               ("source_name", "from"))),
    JournalKind("heart_rate_notifications", "Heart rate notification", (("threshold", "threshold"),
                                                                        ("source_name", "from"))),
    JournalKind("states_of_mind", "State of mind", (("classification", ""), ("valence", "valence"), ("kind", ""))),
    JournalKind("symptoms", "Symptom", (("name", ""), ("severity", ""), ("source_name", "from"))),
    JournalKind("cycle_tracking", "Cycle tracking", (("kind", ""), ("value", ""), ("source_name", "from"))),
)
#: Entries the journal lists (the window's latest).
JOURNAL_LISTED = 30


class JournalEntry(typing.NamedTuple):
    start_date: str
    title: str
    text: str


def journal(conn, window, limit=JOURNAL_LISTED):
    """The window's latest ``limit`` entries of the JOURNAL_KINDS, newest first."""
    entries = []
    for kind in JOURNAL_KINDS:
        table = SECTIONS_BY_NAME[kind.section].table
        columns = ", ".join(column for column, _label in kind.columns)
        for start, *values in conn.execute(
                f"SELECT start_date, {columns} FROM {table} WHERE start_date >= ? AND start_date < ?"
                f" ORDER BY start_date DESC LIMIT ?", (window.start, window.end, limit)):
            words = [f"{label} {value}".strip() for (_column, label), value in zip(kind.columns, values)
                     if value is not None and value != ""]
            entries.append(JournalEntry(start, kind.title, ", ".join(words)))
    return sorted(entries, reverse=True)[:limit]


class StatusReport(typing.NamedTuple):
    """Everything the status page and /api/summary show."""

    view: View
    stored: StoreFacts
    window: Window
    today: typing.Tuple[Tile, ...]
    #: A chart per listed type with a value in the window.
    charts: typing.Tuple[Chart, ...]
    #: The window's latest WORKOUTS_LISTED workouts; ``more_workouts``
    #: counts the others.
    workouts: typing.Tuple[Workout, ...]
    more_workouts: int
    medications: typing.Tuple[Medication, ...]
    #: Scheduled backups (BackupSchedule.status), when the receiver makes them.
    backup: typing.Optional[dict] = None
    #: What stopped arriving (data_gaps).
    gaps: typing.Tuple[Gap, ...] = ()
    #: Notices (Notifier.status), to an admin, when the receiver sends them.
    notice: typing.Optional[dict] = None
    #: The window's latest entries of the JOURNAL_KINDS.
    journal: typing.Tuple[JournalEntry, ...] = ()


def status_report(store, view, sync_count=20, type_limit=PAGE_TYPES_MAX):
    """What the status page shows: at most ``type_limit`` types (the
    largest), so that a page stays small whatever was stored."""
    with store.reader() as conn:
        stored = _store_facts(conn, store.path, sync_count, type_limit)
        window = make_window(view, *data_span(conn))
        today = today_tiles(conn, {info.type: info for info in stored.types}, view)
        charts = tuple(chart for chart in (chart_data(conn, info, window) for info in stored.types
                                           if (info.last or "") >= window.start and (info.first or "") < window.end)
                       if chart)
        workouts, more_workouts = workout_list(conn, window)
        doses = medications(conn, window)
        gaps = tuple(data_gaps(conn, view))
        entries = tuple(journal(conn, window))
    return StatusReport(view, stored, window, today, charts, workouts, more_workouts, doses, gaps=gaps,
                        journal=entries)


def stats_json(stored, now):
    """The JSON of ``stats --json``: what is stored."""
    return {"ok": True, "version": __version__, "schema_version": stored.schema_version,
            "generated_at": f"{now:%Y-%m-%dT%H:%M:%SZ}",
            "database": {"path": stored.path, "size_bytes": stored.size_bytes}, "totals": dict(stored.totals),
            "types": [{"type": info.type, "name": info.name, "title": info.title, "rows": info.rows,
                       "first": info.first, "last": info.last, "chart": info.kind.name} for info in stored.types],
            "more_types": stored.more_types,
            "syncs": [{name: getattr(sync, name) for name in SYNC_FIELDS} for sync in stored.syncs]}


def summary_json(report):
    """The JSON of /api/summary: what is stored, then the window as the
    status page shows it."""
    window, now = report.window, report.view.now
    facts = {"person": report.view.person, **stats_json(report.stored, now)}
    facts["window"] = {"range": window.range.name, "first": window.first.isoformat(),
                       "last": window.last.isoformat(), "days": window.days, "grain": window.grain.name,
                       "shifted": window.shifted, "timezone": window.zone.name(now)}
    facts["today"] = [dict(zip(Tile._fields, tile)) for tile in report.today]
    facts["charts"] = [_chart_json(chart) for chart in report.charts]
    facts["workouts"] = [dict(zip(Workout._fields, workout)) for workout in report.workouts]
    facts["more_workouts"] = report.more_workouts
    facts["medications"] = [
        {"medication": medication.medication, "name": medication.name,
         "points": [[day.isoformat(), doses["taken"], doses["skipped"]]
                    for day, _count, doses in medication.chart.points],
         "taken": medication.taken, "skipped": medication.skipped} for medication in report.medications]
    facts["journal"] = [dict(zip(JournalEntry._fields, entry)) for entry in report.journal]
    facts["backup"] = report.backup
    facts["gaps"] = [{"kind": gap.kind, "message": gap.message, "since": gap.since, "type": gap.type,
                      "source": gap.source} for gap in report.gaps]
    return facts


def _chart_json(chart):
    kind = chart.kind
    facts = {"type": chart.type, "name": chart.name, "title": chart.title, "kind": kind.name, "unit": chart.unit,
             "grain": chart.grain.name, "draw": kind.draw, "from_zero": kind.from_zero,
             "points": [[point[0].isoformat(), *point[1:]] for point in chart.points]}
    if kind.draw == "stack":
        facts["stages"] = [list(stage) for stage in kind.stages]
    return facts


# -- What other tools read: the latest values, today, a series, the gaps ----

#: The most points one /api/series answer holds.
SERIES_POINTS_MAX = 5000


class LatestValue(typing.NamedTuple):
    """A type's latest sample."""

    type: str
    #: The short name: the type's key in /api/latest.
    name: str
    title: str
    #: A number, or a category type's value name ("asleepCore"); None when
    #: it is neither.
    value: typing.Any
    unit: typing.Optional[str]
    #: Its start, canonical UTC.
    time: str
    source: typing.Optional[str]


#: A type's latest sample as of :now: dated then or before, or at most
#: ARRIVAL_LEAD after its sync arrived (no sync arrived after now, so none
#: beyond now + ARRIVAL_LEAD is: the key's range ends there, and samples
#: dated years ahead are not walked one by one).  Read from the end of the type's
#: rows, so only samples dated ahead of now are looked at twice.
_LATEST_SAMPLE_SQL = (
    "SELECT value, unit, start_date, source_name FROM samples WHERE type = :type"
    f" AND start_date <= strftime('%Y-%m-%dT%H:%M:%fZ', :now, '{ARRIVAL_LEAD}') AND (start_date <= :now"
    f" OR start_date <= (SELECT strftime('%Y-%m-%dT%H:%M:%fZ', received_at, '{ARRIVAL_LEAD}') FROM syncs"
    " WHERE syncs.id = samples.sync_id)) ORDER BY start_date DESC LIMIT 1")


def type_keys(type_names):
    """{type: its key in /api/latest and /metrics}, each key another,
    whatever the order of ``type_names``: a HealthKit type's is its short
    name (StepCount), unless a HealthKit type of a prefix before its own
    has it (HKCategoryTypeIdentifierStepCount beside the quantity): its
    full name then; any other type's is its own name, unless that is taken
    (the app's own key StepCount beside HealthKit's): then where it came
    from, data.StepCount, and data. again while that is taken too (beside
    a type named data.StepCount)."""
    def prefix_rank(type_name):
        return next(rank for rank, prefix in enumerate(TYPE_PREFIXES) if type_name.startswith(prefix))

    healthkit = sorted((name for name in type_names if short_type_name(name) != name), key=prefix_rank)
    others = [name for name in type_names if short_type_name(name) == name]
    keys, taken = {}, set()
    for type_name in healthkit:
        short = short_type_name(type_name)
        keys[type_name] = short if short not in taken else type_name
        taken.add(keys[type_name])
    for type_name in others:
        if type_name not in taken:
            keys[type_name] = type_name
            taken.add(type_name)
    for type_name in others:
        if type_name not in keys:
            key = "data." + type_name
            while key in taken:
                key = "data." + key
            keys[type_name] = key
            taken.add(key)
    return keys


def latest_values(conn, now, limit=LATEST_TYPES_MAX):
    """The LatestValue of each of the largest ``limit`` types as of
    ``now`` (an aware datetime): one seek each, at the end of the type's
    rows."""
    found = []
    types = [row[0] for row in sample_types(conn, limit)]
    keys = type_keys(types)
    for type_name in types:
        row = conn.execute(_LATEST_SAMPLE_SQL, {"type": type_name, "now": _canonical(now)}).fetchone()
        if row is None:
            continue
        value, unit, start, source = row
        if type_name == SLEEP_TYPE:
            value = sleep_stage(value)  # the stage keys of the sleep chart: "core", "in_bed"
        elif category_of(type_name) is not None:
            value = category_name(type_name, value) or (value if value.__class__ is str else None)
        elif value.__class__ not in (int, float) or not math.isfinite(value):
            value = None
        else:  # a fraction in percent, as everywhere else
            kind = chart_kind(type_name)
            value, unit = (value * kind.scale, kind.unit) if kind.scale != 1 else (value, unit)
        found.append(LatestValue(type_name, keys[type_name], type_title(type_name), value,
                                 unit if unit.__class__ is str else None, start,
                                 source if source.__class__ is str else None))
    return found


def _one_day(view, day=None):
    """The window of one day (today by default), in the view's zone."""
    day = day or view.zone.today(view.now)
    return days_window(RANGES_BY_NAME["7d"], day, day, view.zone)._replace(priority=view.priority)


class DayTotal(typing.NamedTuple):
    """Today's total of a type that adds up, counted as the page counts it."""

    type: str
    name: str
    title: str
    value: float
    unit: typing.Optional[str]


def today_totals(conn, view, limit=LATEST_TYPES_MAX):
    """The DayTotal of each type that adds up among the largest ``limit``
    (0 when nothing was counted yet today)."""
    window, totals = _one_day(view), []
    for row in sample_types(conn, limit):
        info = type_info(*row)
        if info.kind.name != "sum":
            continue
        chart = chart_data(conn, info, window)
        unit = stored_unit(conn, info.type)  # as the samples say it: "count", "kcal"
        totals.append(DayTotal(info.type, info.name, info.title, (chart.points[0][1] if chart else None) or 0.0,
                               unit))
    return totals


def last_night(conn, view):
    """{stage: hours} of the night that ended today (noon to noon, as the
    sleep chart counts it); empty without sleep."""
    return sleep_nights(conn, _one_day(view)).get(view.zone.today(view.now).isoformat(), {})


class Latest(typing.NamedTuple):
    """What /api/latest and /metrics read of one person."""

    person: str
    values: typing.Tuple[LatestValue, ...]
    today: typing.Tuple[DayTotal, ...]
    #: {sleep stage: hours} of last night.
    sleep: typing.Dict[str, float]
    last_sync: typing.Optional[Sync]
    gaps: typing.Tuple[Gap, ...]
    #: Types beyond LATEST_TYPES_MAX, not listed.
    more_types: int = 0
    #: {type: its key} (type_keys) of the types listed.
    keys: typing.Dict[str, str] = {}

    def key(self, type_name):
        """The key of a type (of a gap, say) in /api/latest and /metrics."""
        return self.keys.get(type_name) or short_type_name(type_name)


def latest_report(store, view):
    """The Latest of the person ``store`` reads for."""
    with store.reader() as conn:
        syncs = latest_syncs(conn, 1, SyncStatus.OK)
        more = conn.execute("SELECT count(*) FROM sample_types").fetchone()[0] - LATEST_TYPES_MAX
        values = tuple(latest_values(conn, view.now))
        return Latest(view.person, values, tuple(today_totals(conn, view)), last_night(conn, view),
                      syncs[0] if syncs else None, tuple(data_gaps(conn, view)), max(0, more),
                      {value.type: value.name for value in values})


def latest_json(latest, now):
    """The JSON of /api/latest: stable keys, types by short name."""
    sleep = {stage: round(latest.sleep.get(stage, 0.0), 3) for stage, _label, _colour in SLEEP_STAGES}
    last = latest.last_sync
    return {
        "person": latest.person, "generated_at": f"{now:%Y-%m-%dT%H:%M:%SZ}",
        "latest": {value.name: {"value": value.value, "unit": value.unit, "time": value.time,
                                "source": value.source, "title": value.title, "type": value.type}
                   for value in latest.values},
        "more_types": latest.more_types,
        "today": {total.name: {"value": finite(total.value), "unit": total.unit, "title": total.title}
                  for total in latest.today},
        "sleep_last_night": dict(sleep, asleep=round(asleep_hours(latest.sleep), 3), unit="h"),
        "last_sync": None if last is None else {
            "id": last.id, "time": last.received_at, "source": last.sync_source,
            "records": last.received, "new": last.inserted,
            "age_seconds": round((now - parse_stamp(last.received_at)).total_seconds())},
        "gaps": [{"kind": gap.kind, "message": gap.message, "since": gap.since,
                  "type": gap.type and latest.key(gap.type), "source": gap.source} for gap in latest.gaps],
    }


#: Upper bounds (seconds) of the sync duration histogram's buckets.
SYNC_DURATION_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
#: Sync sources /metrics lists per person, the latest first.
METRIC_SOURCES_MAX = 20


class SyncFacts(typing.NamedTuple):
    """What /metrics says of a person's syncs and rows."""

    #: {status: syncs}
    by_status: typing.Dict[str, int]
    #: [(sync source or "", its last stored sync, canonical UTC)], the latest first.
    last_by_source: typing.List[typing.Tuple[str, str]]
    totals: typing.Dict[str, int]
    rejected: int
    #: Stored syncs per SYNC_DURATION_BUCKETS bound (cumulative), their count and seconds.
    duration_buckets: typing.Tuple[int, ...]
    duration_count: int
    duration_sum: float


def sync_facts(conn):
    """The SyncFacts of what ``conn`` sees (one person)."""
    by_status = dict(conn.execute("SELECT status, count(*) FROM syncs GROUP BY status"))
    last = [(source if source.__class__ is str else str(source), when) for source, when in conn.execute(
        f"SELECT coalesce(sync_source, '') AS source, max(received_at) AS last FROM syncs WHERE status ="
        f" '{SyncStatus.OK}' GROUP BY source ORDER BY last DESC LIMIT ?", (METRIC_SOURCES_MAX,))]
    buckets = ", ".join(f"count(CASE WHEN duration_ms <= {bound * 1000:.0f} THEN 1 END)"
                        for bound in SYNC_DURATION_BUCKETS)
    *counts, count, total = conn.execute(f"SELECT {buckets}, count(*), total(duration_ms) / 1000.0 FROM syncs"
                                         f" WHERE status = '{SyncStatus.OK}'").fetchone()
    return SyncFacts(by_status, last, table_totals(conn), conn.execute("SELECT count(*) FROM rejected").fetchone()[0],
                     tuple(counts), count, total)


#: Grains of /api/series: the page's, and hours (UTC hours, as they are kept).
SERIES_GRAINS = ("hour",) + tuple(grain.name for grain in GRAINS)
#: /api/series?stat= of an averaged type: its Aggregate field per period.
SERIES_STATS = {"mean": "mean", "min": "low", "max": "high"}


class SeriesPoint(typing.NamedTuple):
    """One period of /api/series."""

    #: Its start, canonical UTC.
    time: str
    value: typing.Optional[float]
    #: A week's or a month's days inside the range that have data (the
    #: divisor of a daily mean), and whether the period reaches outside the
    #: range; None at the grains of an hour and a day.
    days: typing.Optional[int] = None
    partial: typing.Optional[bool] = None


def _stat_value(kind, agg, days, stat):
    """A period's value as /api/series gives it: the chart's, or (``stat``
    min or max of an averaged type) the least or greatest sample."""
    if agg is None:
        return None
    if stat in (None, "mean"):
        values = kind.point(agg, days)
        return finite(values[0] * kind.scale) if values and values[0] is not None else None
    found = getattr(agg, SERIES_STATS[stat])
    return None if found is None else finite(found * kind.scale)


def series_points(store, name, view, start, end, grain_name=None, stat=None):
    """(TypeInfo, unit, [SeriesPoint]) of a type from ``start`` to ``end``
    (canonical UTC, end excluded) at a grain (by default the page's for
    that many days): the numbers its chart shows, or of an averaged type
    the ``stat`` (SERIES_STATS) of its samples.  None when the person has
    no such type; raises ValueError when it would be more than
    SERIES_POINTS_MAX points, or ``stat`` does not apply."""
    with store.reader() as conn:
        row = find_type(conn, name)
        if row is None:
            return None
        info = type_info(*row)
        kind = info.kind
        if stat not in (None, "mean") and kind.point is not _mean_point:
            raise ValueError(f"stat applies to averaged types; {info.name} is a {kind.name} type")
        unit = display_unit(conn, info.type, kind)
        if grain_name == "hour":
            if kind.name == "sleep":
                raise ValueError("sleep is counted per night: choose grain day, week or month")
            first = parse_stamp(start).replace(minute=0, second=0, microsecond=0)
            count = math.ceil((parse_stamp(end) - first).total_seconds() / 3600)
            if count > SERIES_POINTS_MAX:
                raise ValueError(f"{count:,} hours: at most {SERIES_POINTS_MAX:,} points; choose a shorter range "
                                 "or a coarser grain")
            stamps = [_canonical(first + datetime.timedelta(hours=i)) for i in range(count + 1)]
            periods = [Period(low[:10], low, high) for low, high in zip(stamps, stamps[1:])]
            points = []
            for index in range(0, len(periods), SQL_PERIODS_MAX):
                chunk = periods[index:index + SQL_PERIODS_MAX]
                for period, agg in zip(chunk, type_aggregates(conn, info.type, chunk)):
                    points.append(SeriesPoint(period.start, _stat_value(kind, agg, 1, stat)))
            return info, unit, points
        zone = view.zone
        first, last = zone.day_of(start), zone.day_of(_canonical(parse_stamp(end) - datetime.timedelta(
            milliseconds=1)))
        days = (last - first).days + 1
        grain = next((grain for grain in GRAINS if grain.name == grain_name), None) or grain_for(days)
        shortest = {"day": 1, "week": 7}.get(grain.name, 31)  # a period's days, at most
        if days > SERIES_POINTS_MAX * shortest or len(_period_starts(first, last, grain)) - 1 > SERIES_POINTS_MAX:
            raise ValueError(f"at most {SERIES_POINTS_MAX:,} points; choose a shorter range or a coarser grain")
        window = days_window(RANGES_BY_NAME["all"], first, last, zone, grain=grain)._replace(priority=view.priority)
        starts = _period_starts(first, last, grain)
        partial = [grain.name != "day" and (day < first or following - datetime.timedelta(days=1) > last)
                   for day, following in zip(starts, starts[1:])]
        if kind.name == "sleep":
            chart = chart_data(conn, info, window)
            values = [point[1] for point in chart.points] if chart else [None] * len(window.periods)
            counts = [None] * len(values)
        else:
            found = window_aggregates(conn, info.type, window)
            values = [_stat_value(kind, agg, divisor, stat) for agg, divisor in found]
            counts = [agg.days if agg else 0 for agg, _divisor in found]
        if grain.name == "day":
            return info, unit, [SeriesPoint(period.start, value) for period, value in zip(window.periods, values)]
        return info, unit, [SeriesPoint(period.start, value, count, cut) for period, value, count, cut in zip(
            window.periods, values, counts, partial)]


# -- Type and workout reports: a type's page, a workout's -------------------

class PeriodRow(typing.NamedTuple):
    """A period with samples on a type's page, and its cells (the values
    under its chart kind's ``columns``)."""

    day: datetime.date
    cells: tuple


class LatestSample(typing.NamedTuple):
    start_date: str
    end_date: typing.Optional[str]
    #: As stored; the name of a category type's value ("Stood", "Core").
    value: typing.Any
    unit: typing.Optional[str]
    source_name: typing.Optional[str]


#: Samples listed on a type's page.
LATEST_SAMPLES = 20


class TypeReport(typing.NamedTuple):
    """Everything the page of one type shows."""

    view: View
    window: Window
    info: TypeInfo
    #: None when no period of the window has a value.
    chart: typing.Optional[Chart]
    #: The periods with samples, the latest first.
    periods: typing.Tuple[PeriodRow, ...]
    #: The LATEST_SAMPLES latest samples, the latest first.
    latest: typing.Tuple[LatestSample, ...]
    unit: typing.Optional[str]
    #: The devices and apps that recorded the window's samples, the most first.
    sources: typing.Tuple["SourceShare", ...] = ()


class SourceShare(typing.NamedTuple):
    """What one source recorded of a type in a window."""

    source: str
    samples: int
    #: Its share of the window's samples (0 to 1).
    share: float
    #: What it adds to the totals (of a type that adds up): its values' shares
    #: for the time it counts, merged by source priority.
    total: typing.Optional[float]


def source_shares(conn, type_name, window):
    """The SourceShare of each source of a type's samples in a window."""
    rows = conn.execute("SELECT source, sum(samples), total(total) FROM sample_hours WHERE type = ? AND hour >= ?"
                        " AND hour < ? GROUP BY source HAVING sum(samples) > 0 ORDER BY 2 DESC, 1",
                        (type_name, window.start[:13], window.end[:13])).fetchall()
    count = sum(samples for _source, samples, _total in rows) or 1
    cumulative = is_cumulative(type_name)
    return tuple(SourceShare(source or "(no source)", samples, samples / count, finite(total) if cumulative else None)
                 for source, samples, total in rows)


def type_report(store, name, view):
    """The page of one type; None for an unknown type."""
    with store.reader() as conn:
        found, window = _type_and_window(conn, name, view)
        if found is None:
            return None
        info = type_info(*found)
        kind = info.kind
        chart = chart_data(conn, info, window)
        periods = []
        if kind.name == "sleep":
            for point in reversed(chart.points if chart else ()):
                if point[1] is not None:
                    periods.append(PeriodRow(point[0], (point[1], *(
                        point[2].get(key) for key, _label, _colour in SLEEP_STAGES))))
        else:
            for period, (agg, days) in reversed(list(zip(window.periods, window_aggregates(conn, info.type,
                                                                                           window)))):
                if agg is not None:
                    cells = tuple(v if v is None or heading == "Samples" or v.__class__ is str
                                  else finite(v * kind.scale)
                                  for heading, v in zip(kind.columns, kind.cells(agg, days)))
                    periods.append(PeriodRow(period.date, cells))
        latest = [LatestSample(start, end, finite(value), unit, source) for start, end, value, unit, source in conn.execute(
            "SELECT start_date, end_date, value, unit, source_name FROM samples WHERE type = ?"
            " ORDER BY start_date DESC LIMIT ?", (info.type, LATEST_SAMPLES))]
        if kind.name == "sleep":
            labels = {key: label for key, label, _colour in SLEEP_STAGES}
            latest = [sample._replace(value=labels.get(sleep_stage(sample.value), sample.value)) for sample in latest]
        elif category_of(info.type) is not None:
            latest = [sample._replace(value=category_name(info.type, sample.value) or sample.value)
                      for sample in latest]
        elif kind.scale != 1:  # fractions in percent, as the chart and the table show them
            latest = [sample._replace(value=finite(sample.value * kind.scale), unit=kind.unit)
                      if sample.value.__class__ in (int, float) else sample for sample in latest]
        unit = display_unit(conn, info.type, kind)
        sources = source_shares(conn, info.type, window)
    return TypeReport(view, window, info, chart, tuple(periods), tuple(latest), unit, sources)


#: Types whose titles a name is compared with (the largest): a database of
#: 50,000 types is not read whole for a name that is none of them.
TITLED_TYPES_MAX = 1000


def _title_key(text):
    """A type's title as looked up: letters and digits, in lower case
    ("Resting heart rate", "resting-heart-rate" and "RestingHeartRate" meet)."""
    return "".join(char for char in text.lower() if char.isalnum())


def find_type(conn, name):
    """(type, rows, first, last) of a type named in full, by its short name
    in any case, or by the title the pages give it ("Steps", "Resting heart
    rate"), or None.  The name as written is looked up in the index (the
    pages link types so); only other cases read every type."""
    names = [name] + [prefix + name for prefix in TYPE_PREFIXES]
    marks = ", ".join("?" * len(names))
    for column in ("type", "lower(type)"):
        found = conn.execute(f"SELECT type, rows, first_date, last_date FROM sample_types WHERE {column} IN ({marks})",
                             names if column == "type" else [candidate.lower() for candidate in names]).fetchall()
        if found:
            return min(found, key=lambda row: (names.index(row[0]) if row[0] in names else len(names), row[0]))
    wanted = _title_key(name)
    return next((row for row in sample_types(conn, TITLED_TYPES_MAX)
                 if wanted and _title_key(type_title(row[0])) == wanted), None)


#: Type names a "no such type" answer lists (the largest types first).
TYPE_NAMES_LISTED = 20


def known_type_names(conn):
    """What a "no such type" answer says is there: the short names of the
    largest TYPE_NAMES_LISTED types, and how many more there are."""
    rows = sample_types(conn, TYPE_NAMES_LISTED + 1)
    names = ", ".join(short_type_name(row[0]) for row in rows[:TYPE_NAMES_LISTED]) or "none"
    return names + (", and more" if len(rows) > TYPE_NAMES_LISTED else "")


def _type_and_window(conn, name, view):
    """((type, rows, first, last), window) of a type's page, or (None, None)."""
    found = find_type(conn, name)
    if found is None:
        return None, None
    return found, make_window(view, found[2], found[3])


def type_window(store, name, view):
    """(type, window) of a type's page, or None for an unknown type."""
    with store.reader() as conn:
        found, window = _type_and_window(conn, name, view)
    return None if found is None else (found[0], window)


class Split(typing.NamedTuple):
    """One whole kilometre of a route, and the seconds it took."""

    km: int
    seconds: float


class Track(typing.NamedTuple):
    """A workout's route, as recorded."""

    #: (latitude, longitude) in time order.
    points: typing.Tuple[typing.Tuple[float, float], ...]
    #: Metres along the points.
    distance_m: float
    #: (metres along, altitude) of the points with an altitude.
    elevation: typing.Tuple[typing.Tuple[float, float], ...]
    splits: typing.Tuple[Split, ...]


class HeartTrace(typing.NamedTuple):
    """Heart rate over a workout: its samples and time in zones."""

    #: (seconds from the workout's start, bpm) of each sample.
    points: typing.Tuple[typing.Tuple[float, float], ...]
    low: float
    mean: float
    high: float
    #: The maximum heart rate the zones are shares of, and where it comes
    #: from ("220 minus the age", or "the highest rate recorded").
    maximum: float
    basis: str
    #: Seconds in each of HEART_ZONES (a sample lasts until the next, at
    #: most HEART_SAMPLE_SECONDS).
    zone_seconds: typing.Tuple[float, ...]


#: Heart-rate zones as shares of the maximum: (lowest share, name).
HEART_ZONES = ((0.5, "Zone 1 (50-60%)"), (0.6, "Zone 2 (60-70%)"), (0.7, "Zone 3 (70-80%)"),
               (0.8, "Zone 4 (80-90%)"), (0.9, "Zone 5 (90%+)"))
#: Seconds a heart-rate sample counts for at most (the Watch records one
#: every few seconds in a workout; a gap is not time in a zone).
HEART_SAMPLE_SECONDS = 60.0
#: Heart-rate samples a workout page reads at most (a day at one a second;
#: a workout whose dates span years would otherwise read them all).
HEART_SAMPLES_MAX = 100000


def _age_on(conn, stamp):
    """Whole years from the characteristics' date of birth to ``stamp``, or None."""
    row = conn.execute("SELECT value FROM characteristics WHERE name = 'dateOfBirth'").fetchone()
    born, when = parse_stamp(utc_date(row[0]) if row and isinstance(row[0], str) else None), parse_stamp(stamp)
    if born is None or when is None:
        return None
    age = when.year - born.year - ((when.month, when.day) < (born.month, born.day))
    return age if 5 <= age <= 120 else None


def heart_trace(conn, workout):
    """The HeartTrace of a workout, or None without heart-rate samples in it."""
    begin, finish = parse_stamp(workout.start_date), parse_stamp(workout.end_date)
    if begin is None or finish is None:
        return None
    rows = conn.execute(f"SELECT start_date, value FROM samples WHERE type = ? AND start_date >= ? AND start_date <= ?"
                        f" AND {_NUMERIC} ORDER BY start_date LIMIT ?", (HEART_RATE_TYPE, workout.start_date,
                                                                          workout.end_date, HEART_SAMPLES_MAX)).fetchall()
    if not rows:  # the other app's own series of the workout
        rows = conn.execute(f"SELECT date, value FROM workout_series WHERE workout_uuid = ? AND series ="
                            f" 'heartRateData' AND {_NUMERIC} ORDER BY date LIMIT ?",
                            (workout.uuid, HEART_SAMPLES_MAX)).fetchall()
    points = []
    for stamp, value in rows:
        moment, rate = parse_stamp(stamp), finite(value)
        if moment is not None and rate is not None and 20 <= rate <= 260:
            points.append(((moment - begin).total_seconds(), float(rate)))
    if not points:
        return None
    rates = [rate for _at, rate in points]
    age = _age_on(conn, workout.start_date)
    maximum, basis = (220.0 - age, f"220 minus the age ({age})") if age else (max(rates), "the highest rate recorded")
    seconds = [0.0] * len(HEART_ZONES)
    ends = [at for at, _rate in points[1:]] + [(finish - begin).total_seconds()]
    for (at, rate), end in zip(points, ends):
        zone = bisect.bisect_right([share for share, _name in HEART_ZONES], rate / maximum) - 1
        if zone >= 0:
            seconds[zone] += max(0.0, min(end - at, HEART_SAMPLE_SECONDS))
    return HeartTrace(tuple(points), min(rates), sum(rates) / len(rates), max(rates), maximum, basis, tuple(seconds))


class WorkoutReport(typing.NamedTuple):
    """Everything the page of one workout shows."""

    view: View
    workout: Workout
    route: Track
    heart: typing.Optional[HeartTrace] = None


def workout_report(store, uuid, view):
    """A workout, its route and its heart rate; None for an unknown workout."""
    with store.reader() as conn:
        row = conn.execute(f"SELECT {_WORKOUT_COLUMNS} FROM workouts WHERE uuid = ?", (uuid,)).fetchone()
        if row is None:
            return None
        workout = workout_of(conn, row)
        points = conn.execute(
            "SELECT timestamp, latitude, longitude, altitude FROM workout_route_points WHERE workout_uuid = ?"
            " AND typeof(latitude) IN ('integer', 'real') AND typeof(longitude) IN ('integer', 'real')"
            " ORDER BY timestamp", (uuid,)).fetchall()
        heart = heart_trace(conn, workout)
    return WorkoutReport(view, workout, track_of(points), heart)


#: Mean Earth radius in metres (distances between route points).
EARTH_RADIUS = 6371008.8


def track_of(points):
    """The Track of points [(timestamp, latitude, longitude, altitude)] in
    time order: distances, elevation and kilometre splits."""
    points = [p for p in points if -90 <= p[1] <= 90 and -180 <= p[2] <= 180]
    distance, along, splits = 0.0, [], []
    split_start = parse_stamp(points[0][0]) if points else None
    for index, (stamp, lat, lon, _alt) in enumerate(points):
        if index:
            _stamp, lat0, lon0, _alt0 = points[index - 1]
            step = _haversine(lat0, lon0, lat, lon)
            km_before = int(distance // 1000)
            distance += step
            if int(distance // 1000) > km_before and split_start is not None:
                moment = parse_stamp(stamp)
                if moment is not None:
                    splits.append(Split(int(distance // 1000), (moment - split_start).total_seconds()))
                    split_start = moment
        along.append(distance)
    return Track(tuple((lat, lon) for _stamp, lat, lon, _alt in points), distance,
                 tuple((d, alt) for d, (_s, _la, _lo, alt) in zip(along, points)
                       if isinstance(alt, (int, float)) and finite(alt) is not None),
                 tuple(splits))


def _haversine(lat1, lon1, lat2, lon2):
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    a = (math.sin((phi2 - phi1) / 2) ** 2
         + math.cos(phi1) * math.cos(phi2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2)
    return 2 * EARTH_RADIUS * math.asin(min(1.0, math.sqrt(a)))


# -- Export: rows, CSV and NDJSON lines -------------------------------------

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


def export_rows(store, name, type_name=None, since=None, until=None, start=None, end=None):
    """(columns, Rows) of one export section, streamed in key order; the
    caller closes the Rows.  ``since`` and ``until`` are as a person writes
    them; ``start`` and ``end`` (excluded) are stored timestamps."""
    export = EXPORTS[name]
    where, params = [], []
    if type_name is not None:
        where.append("type = ?")
        params.append(type_name)
    for bound, operation in ((start, ">="), (end, "<")):
        if export.date_column and bound:
            where.append(f"{export.date_column} {operation} ?")
            params.append(bound)
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
        return export.columns, Rows(conn, conn.execute(sql, params))
    except sqlite3.Error as exc:
        conn.close()
        raise store.unavailable(exc) from exc


#: Rows of CSV per piece of a streamed download.
CSV_ROWS_PER_PIECE = 2000


#: What a spreadsheet takes a cell starting with to be a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cells(row):
    """A row for CSV: text that a spreadsheet would run as a formula gets a
    ' in front (its usual mark for "text"), and a NUL, which many CSV
    readers refuse, becomes U+FFFD; numbers are left as they are."""
    return [_csv_text(cell) if cell.__class__ is str else cell for cell in row]


def _csv_text(text):
    text = text.replace("\0", "\ufffd")
    return f"'{text}" if text.startswith(_FORMULA_START) else text


def csv_pieces(columns, rows):
    """CSV text in UTF-8 pieces: the header, then rows a few thousand at a time."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for count, row in enumerate(rows, 1):
        writer.writerow(csv_cells(row))
        if count % CSV_ROWS_PER_PIECE == 0:
            yield buffer.getvalue().encode("utf-8")
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode("utf-8")


class Rows:
    """A query's rows, read as they are iterated; close() closes their
    connection, whether they were read to the end, in part or not at all."""

    def __init__(self, conn, cursor):
        self._conn, self._cursor = conn, cursor

    def __iter__(self):
        return self._cursor

    def close(self):
        self._conn.close()


def resolve_type(store, name):
    """Full identifier for --type: as given, or by short name in any case."""
    with store.reader() as conn:
        found = find_type(conn, name)
        known = [row[0] for row in sample_types(conn)] if found is None else None
    if found is None:
        raise UsageError(f"no samples of type {name}; stored types: "
                         f"{', '.join(short_type_name(t) for t in known) or 'none'}")
    return found[0]


def _compact(record):
    """A record on one line (pretty-printed ones hold newlines)."""
    if "\n" in record or "\r" in record:
        return json.dumps(json.loads(record), ensure_ascii=False, separators=(",", ":"))
    return record


def export_dates(store):
    """{sync id: when its export was made (SYNC_EXPORTED_SQL)} of the
    stored syncs ``store`` reads: what an NDJSON line of a section whose
    newest export wins carries, so that an import of an older export does
    not replace newer values."""
    with store.reader() as conn:
        return dict(conn.execute(f"SELECT id, {SYNC_EXPORTED_SQL} FROM {SYNCS.name} WHERE status = ?",
                                 (SyncStatus.OK,)))


def ndjson_line(name, columns, row, person, exported=None):
    """One exported row of the person named ``person``; records stay as
    stored so ``import`` reproduces them, for the same person.  Of a
    section whose newest export wins, the line says when the export that
    wrote it was made (``exported``: export_dates())."""
    fields = dict(zip(columns, row))
    section = SECTIONS_BY_NAME.get(name)
    if section is None:
        return json.dumps({"section": name, "person": person, "row": fields}, ensure_ascii=False)
    written_by = fields[section.written_by] if section.latest_wins else None
    dated = {"exported": exported[written_by]} if exported and written_by in exported else {}
    if section.shape == "object":
        return json.dumps({"section": name, "person": person, "name": fields["name"], "value": fields["value"],
                           **dated}, ensure_ascii=False)
    head = '{"section":' + json.dumps(name) + ',"person":' + json.dumps(person, ensure_ascii=False)
    for field, column in NDJSON_LABELS.get(name, ()):
        head += f',"{field}":' + json.dumps(fields[column], ensure_ascii=False)
    if dated:
        head += ',"exported":' + json.dumps(dated["exported"])
    return head + ',"record":' + _compact(fields["record"]) + "}"


# ---------------------------------------------------------------------------
# Presentation: the pages (HTML with inline SVG charts, no script)
# ---------------------------------------------------------------------------

# -- Formats and charts: paths; numbers, times and units; SVG charts --------

#: Path of the JSON summary the status page shows.
SUMMARY_PATH = "/api/summary"
#: For Prometheus, Home Assistant and Grafana (or pandas): see their routes.
METRICS_PATH = "/metrics"
LATEST_PATH = "/api/latest"
SERIES_PATH = "/api/series"
#: Pages of one type (/type/HeartRate) and one workout (/workout/UUID).
TYPE_PAGES = "/type/"
WORKOUT_PAGES = "/workout/"
#: The page of the fields the app sends.
FIELDS_PATH = "/fields"


PAGE_CSS = """
*{box-sizing:border-box}
body{font:14px/1.4 -apple-system,system-ui,sans-serif;margin:0 auto;max-width:1280px;padding:12px 16px;color:#222}
a{color:#0b5cad;text-decoration:none}a:hover{text-decoration:underline}
h1{font-size:20px;margin:4px 0}h2{font-size:16px;margin:24px 0 8px;border-bottom:1px solid #ddd}
nav{margin:8px 0;display:flex;flex-wrap:wrap;gap:4px;align-items:center}
nav a,nav b{padding:3px 10px;border:1px solid #ccd;border-radius:12px}
nav b{background:#0b5cad;color:#fff;border-color:#0b5cad;font-weight:normal}
.note{background:#fff6dd;border:1px solid #f0d48a;padding:6px 10px;border-radius:6px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:10px 22px}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:8px}
.tile{border:1px solid #e3e3e3;border-radius:8px;padding:8px 10px}.tile b{font-size:20px;display:block}
.tile span{color:#666;font-size:12px}
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:3px 6px;text-align:right;white-space:nowrap;border-bottom:1px solid #eee}
th:first-child,td:first-child{text-align:left;position:sticky;left:0;background:#fff}
tr.fail td{background:#fdecea;color:#8a1c12}td.err{white-space:normal;text-align:left}
.muted{color:#777}.chart{min-width:0}.chart h3{font-size:14px;margin:0}.chart p{margin:0;color:#777;font-size:12px}
.legend span{display:inline-block;margin-right:10px;font-size:12px}.legend i{display:inline-block;width:10px;
height:10px;margin-right:3px;vertical-align:-1px}
svg{width:100%;height:auto;display:block}svg text{font:10px sans-serif;fill:#555}
.route svg{max-width:640px;max-height:600px}.profile svg{max-width:900px}.narrow{max-width:480px}
.on-phone{display:none}


@media (max-width:600px){.opt,.on-desk{display:none}.on-phone{display:block}body{padding:8px}}
"""

#: The largest magnitude a chart's axis reaches.
CHART_VALUE_MAX = 1e307
#: Chart size in SVG units (it scales with the page).
CHART_WIDTH, CHART_HEIGHT = 360, 150
#: Axis labels fit in this many characters at most (wider numbers go to k, M, B).
CHART_FONT_WIDTH = 5.6


def _esc(value):
    return html.escape("" if value is None else str(value), quote=True).replace("\0", "\ufffd")


def _number(value, digits=0):
    if value is None:
        return ""
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    return f"{value:,.0f}" if isinstance(value, (int, float)) else _esc(value)


def format_value(value):
    """A measured value for a person: 8,532 · 62.4 · 0.97 · 12.3M."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return _esc(value)
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1e7:
        return _scaled(value)
    if magnitude >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.1f}" if magnitude >= 10 else f"{value:.2f}"


def _scaled(value, step=None):
    """A large value with k, M or B (scientific beyond), with the decimals
    that ``step`` (a tick spacing) needs."""
    magnitude = abs(value)
    for divisor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if magnitude >= divisor:
            if magnitude >= 1e12:
                return f"{value:.1e}"
            return _decimals(value / divisor, None if step is None else step / divisor) + suffix
    return _decimals(value, step)


def _decimals(value, step):
    """``value`` with as few decimals as ``step`` needs (at most three)."""
    if step is None:
        return f"{value:.3g}"
    for digits in range(4):
        if abs(round(step, digits) - step) < step * 1e-6:
            return f"{value:,.{digits}f}"
    return f"{value:,.3f}"


def nice_ticks(low, high, count=4, whole=False):
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten, at
    least 1 when ``whole``) that cover low..high."""
    # Beyond 1e307 the arithmetic below would overflow: such values are
    # drawn at the edge.
    low, high = sorted(min(max(value, -CHART_VALUE_MAX), CHART_VALUE_MAX) for value in (low, high))
    if high == low:
        pad = abs(high) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * 0.999)
    if whole:
        step = max(round(step), 1)
    first = math.floor(low / step) * step
    ticks = [first]
    while ticks[-1] < high - step * 1e-9 and len(ticks) < 12:
        ticks.append(first + len(ticks) * step)
    return ticks, step


def format_local(text, zone):
    """A stored timestamp as a time of day in ``zone``."""
    stamp = parse_stamp(text)
    if stamp is None:
        return _esc(text)
    return _local_time(stamp, zone)


def _local_time(stamp, zone):
    return zone.local(stamp).strftime("%Y-%m-%d %H:%M")


def format_ago(text, now):
    stamp = parse_stamp(text)
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


def _svg_bars(chart, x, y, span_x):
    bar = max(span_x * 0.75, 1)
    return [f'<rect x="{x(i) - bar / 2:.1f}" y="{y(point[1]):.1f}" width="{bar:.1f}" '
            f'height="{max(y(0) - y(point[1]), 0):.1f}" fill="#3182bd"/>'
            for i, point in enumerate(chart.points) if point[1]]


def _svg_line(chart, x, y, span_x):
    """The line goes on across periods without data; the band (points[2]
    to points[3]) likewise; every period with data is marked."""
    points = chart.points
    marked = [i for i, point in enumerate(points) if point[1] is not None]
    parts = []
    banded = [i for i in marked if len(points[i]) > 3 and points[i][2] is not None and points[i][3] is not None]
    if banded:
        band = [f"{x(i):.1f},{y(points[i][3]):.1f}" for i in banded]
        band += [f"{x(i):.1f},{y(points[i][2]):.1f}" for i in reversed(banded)]
        parts.append(f'<polygon points="{" ".join(band)}" fill="#9ecae1" fill-opacity="0.45"/>')
    line = " ".join(f"{x(i):.1f},{y(points[i][1]):.1f}" for i in marked)
    parts.append(f'<polyline points="{line}" fill="none" stroke="#08519c" stroke-width="1.5"/>')
    radius = 2 if len(points) <= 92 else 1.2
    parts += [f'<circle cx="{x(i):.1f}" cy="{y(points[i][1]):.1f}" r="{radius}" fill="#08519c"/>' for i in marked]
    return parts


def _svg_stack(chart, x, y, span_x):
    """Bars stacked by stage: points[2] maps a stage to its value."""
    bar = max(span_x * 0.75, 1)
    parts = []
    for i, point in enumerate(chart.points):
        if point[1] is None:
            continue
        base = 0.0
        for key, label, colour in chart.kind.stages:
            value = point[2].get(key, 0)
            if value > 0:
                parts.append(f'<rect x="{x(i) - bar / 2:.1f}" y="{y(base + value):.1f}" width="{bar:.1f}" '
                             f'height="{max(y(base) - y(base + value), 0):.1f}" fill="{colour}">'
                             f'<title>{_esc(label)} {value:.2f}</title></rect>')
                base += value
    return parts


#: How chart kinds are drawn: ``draw(chart, x, y, span_x)`` -> SVG elements.
DRAWINGS = {"bars": _svg_bars, "line": _svg_line, "stack": _svg_stack}


def _chart_values(chart):
    values = []
    for point in chart.points:
        if point[1] is None:
            continue
        if chart.kind.draw == "stack":
            values.append(sum(v for v in point[2].values() if v > 0))
        else:
            values += [v for v in point[1:4] if isinstance(v, (int, float))]
    return [v for v in values if math.isfinite(v)] or [0.0]


#: Margins of a chart's plot area (the left one fits the value labels).
CHART_RIGHT, CHART_TOP, CHART_BOTTOM = 8, 8, 20


def _value_axis(low, high, width, height, suffix="", count=4, whole=False):
    """The value axis of a chart: (left margin, ``y(value)``, SVG of its
    grid lines and labels).  The margin fits the longest label, so labels
    never leave the drawing; values beyond the ticks are drawn at the edge."""
    ticks, step = nice_ticks(low, high, count, whole)
    labels = [_scaled(tick, step) + suffix for tick in ticks]
    left = int(max(len(label) for label in labels) * CHART_FONT_WIDTH) + 8
    low, high = ticks[0], ticks[-1]

    def y(value):
        value = min(max(value, low), high)
        return CHART_TOP + (height - CHART_TOP - CHART_BOTTOM) * (1 - (value - low) / (high - low))

    parts = [f'<line x1="{left}" x2="{width - CHART_RIGHT}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
             f'stroke="#e4e4e4"/><text x="{left - 4}" y="{y(tick) + 3:.1f}" text-anchor="end">{_esc(label)}</text>'
             for tick, label in zip(ticks, labels)]
    return left, y, parts


def svg_chart(chart, width=CHART_WIDTH, height=CHART_HEIGHT):
    """A Chart as inline SVG: round ticks, labels inside the drawing, one
    date label under its own bar."""
    points, kind = chart.points, chart.kind
    values = _chart_values(chart)
    low, high = min(values), max(values)
    if kind.from_zero:
        low, high = min(low, 0.0), max(high, 0.0) or 1.0
    elif low >= 0 and low - (high - low) * 0.1 < 0:
        low = 0.0
    left, y, parts = _value_axis(low, high, width, height, "%" if chart.unit == "%" else "", whole=kind.whole)
    slot = (width - left - CHART_RIGHT) / max(len(points), 1)

    def x(i):
        return left + slot * (i + 0.5)

    parts.insert(0, f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(chart.name)}">')
    every = max(1, math.ceil(len(points) / 6))
    for i in range(len(points) - 1, -1, -every):
        label = points[i][0].strftime(chart.grain.axis_format)
        half = len(label) * CHART_FONT_WIDTH / 2
        anchor, at = "middle", x(i)
        if at + half > width:
            anchor, at = "end", width - 1
        elif at - half < left:
            anchor, at = "start", max(x(i) - slot / 2, left)
        parts.append(f'<text x="{at:.1f}" y="{height - 5}" text-anchor="{anchor}">{_esc(label)}</text>')
    parts += DRAWINGS[kind.draw](chart, x, y, slot)
    parts.append("</svg>")
    return "".join(parts)


def _legend(stages):
    return '<div class="legend">' + "".join(
        f'<span><i style="background:{colour}"></i>{_esc(label)}</span>' for _key, label, colour in stages) + "</div>"


def _duration(seconds):
    """1:05 (hours and minutes)."""
    if not isinstance(seconds, (int, float)):
        return ""
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}:{minutes % 60:02d}"


def _long_duration(seconds):
    """7 h 33 min, or 48 min."""
    if not isinstance(seconds, (int, float)):
        return ""
    minutes = int(round(seconds / 60))
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def format_measure(value, unit):
    """A tile's value with its unit: 8,532 steps · 7 h 33 min · 58 bpm."""
    if value is None:
        return "&ndash;"
    if unit == "h":
        return _long_duration(value * 3600)
    if unit == "min":
        return _long_duration(value * 60)
    return format_value(value) + (f" {_esc(unit)}" if unit else "")


#: The slowest pace shown, in seconds per km: slower is a distance of
#: almost nothing (a workout of 5e-324 m), not a pace.
PACE_SECONDS_MAX = 24 * 3600


def _pace(seconds, per="/km"):
    """5:07 /km; nothing for a pace that is not one (infinite, NaN, absurd)."""
    if not isinstance(seconds, (int, float)) or not 0 < seconds <= PACE_SECONDS_MAX:
        return ""
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}:{seconds:02d} {per}"


class SpeedStyle(typing.NamedTuple):
    """How people read a sport's speed: a pace (time per ``metres``) or,
    when ``metres`` is None, a speed in km/h."""

    title: str
    metres: typing.Optional[float] = None
    per: str = "km/h"

    def shown(self, seconds, metres):
        """``metres`` in ``seconds`` as this style writes it ("" when none)."""
        if not seconds or not metres or not math.isfinite(seconds / metres):
            return ""
        if self.metres is None:
            speed = metres / seconds * 3.6
            return f"{speed:.1f} {self.per}" if 0 < speed < 1e6 else ""
        return _pace(seconds / metres * self.metres, self.per)


#: A pace per kilometre: running, walking, hiking and any sport not below.
PACE_PER_KM = SpeedStyle("Pace", 1000.0, "/km")
_SPEED = SpeedStyle("Speed")
#: Sports whose speed people read otherwise (HealthKit's activity names).
SPEED_STYLES = {
    "cycling": _SPEED, "handCycling": _SPEED, "downhillSkiing": _SPEED, "snowboarding": _SPEED,
    "snowSports": _SPEED, "skatingSports": _SPEED, "sailing": _SPEED, "paddleSports": _SPEED,
    "wheelchairRunPace": _SPEED, "wheelchairWalkPace": _SPEED, "swimBikeRun": _SPEED,
    "swimming": SpeedStyle("Pace", 100.0, "/100 m"), "rowing": SpeedStyle("Pace", 500.0, "/500 m"),
}


# -- Pages: the status page, a type's, a workout's, the fields' -------------

def _cells(*cells):
    """Table cells from HTML that is already escaped; a cell given as
    ("opt", html) is hidden on a phone."""
    return "".join(f'<td class="opt">{cell[1]}</td>' if isinstance(cell, tuple) else f"<td>{cell}</td>"
                   for cell in cells)


def _table(headers, rows):
    """A table in a box that scrolls sideways on a phone, its first column
    fixed; rows are (attributes of the tr, cells HTML); a header given as
    ("opt", text) is hidden on a phone, with its cells."""
    head = "".join(f'<th class="opt">{h[1]}</th>' if isinstance(h, tuple) else f"<th>{h}</th>" for h in headers)
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


def _document(title, parts):
    return "".join(['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
                    '<meta name="viewport" content="width=device-width, initial-scale=1">',
                    f"<title>{_esc(title)}</title><style>{PAGE_CSS}</style></head><body>", *parts,
                    "</body></html>"])


def _href(view, path, range_name=None):
    """A link of the pages, escaped: ``path``, the range, and (for a reader
    who may choose, an admin) the person whose data it shows."""
    query = [f"range={quote(range_name)}"] if range_name else []
    if len(view.people) > 1:
        query.append(f"person={quote(view.person, safe='')}")
    return _esc(path + ("?" + "&".join(query) if query else ""))


def _range_nav(view, path, current):
    links = []
    for choice in RANGES:
        if choice.name == current:
            links.append(f"<b>{_esc(choice.label)}</b>")
        else:
            links.append(f'<a href="{_href(view, path, choice.name)}">{_esc(choice.label)}</a>')
    return f'<nav aria-label="range">{"".join(links)}</nav>'


#: People the switcher lists as links; more (a study) get a field to name one.
PEOPLE_LINKED_MAX = 30


def _person_nav(view, path="/"):
    """Whose data a page shows; for an admin of several people, links to
    each one's page at ``path`` (the person switcher: a type's page leads to
    the same type's page of another person)."""
    if len(view.people) > PEOPLE_LINKED_MAX:
        return (f'<form method="get" action="{_esc(path)}"><span class="muted">Data of </span>'
                f'<input name="person" value="{_esc(view.person)}" size="16" aria-label="person">'
                f'<input type="hidden" name="range" value="{_esc(view.range.name)}"> <button>Show</button>'
                f'<span class="muted"> (one of {len(view.people):,} people)</span></form>')
    if len(view.people) > 1:
        links = [f"<b>{_esc(name)}</b>" if name == view.person else
                 f'<a href="{_href(view._replace(person=name), path, view.range.name)}">{_esc(name)}</a>'
                 for name in view.people]
        return f'<nav aria-label="person"><span class="muted">Data of</span>{"".join(links)}</nav>'
    if not view.people:
        return f'<p class="muted">Data of <b>{_esc(view.person)}</b></p>'
    return ""


def _window_note(window):
    if window.shifted:
        return (f'<p class="note">Nothing was recorded in the last {window.days} days. Shown instead: the '
                f'{window.days} days up to {window.last:%b %d, %Y}, the last day with data.</p>')
    return f'<p class="muted">{window.first:%b %d, %Y} to {window.last:%b %d, %Y}, by {window.grain.name}.</p>'


def type_path(type_name):
    return TYPE_PAGES + quote(short_type_name(type_name), safe="")


def workout_path(uuid):
    return WORKOUT_PAGES + quote(str(uuid), safe="")


#: Size of a type page's chart on a wider screen.
WIDE_CHART_SIZE = (900, 240)


def _chart_card(chart, view, range_name, wide=False):
    """A type's chart with its title (a link to the type's page) and what a point is."""
    unit = f" ({_esc(chart.unit)})" if chart.unit else ""
    title = f'<a href="{_href(view, type_path(chart.type), range_name)}">{_esc(chart.title or chart.name)}{unit}</a>'
    label = chart.kind.label.replace("per day", f"per {chart.grain.per_day}")
    legend = _legend(chart.kind.stages) if chart.kind.draw == "stack" else ""
    drawing = svg_chart(chart)
    if wide:  # its own drawing per screen: an SVG scales its text with it
        drawing = (f'<div class="on-phone">{drawing}</div>'
                   f'<div class="on-desk">{svg_chart(chart, *WIDE_CHART_SIZE)}</div>')
    return (f'<div class="chart"><h3 title="{_esc(chart.type)}">{title}</h3>'
            f'<p>{_esc(label)}</p>{drawing}{legend}</div>')


def render_status_page(report):
    """The status page as one self-contained HTML document."""
    view, stored, window = report.view, report.stored, report.window
    zone = "UTC" if view.zone.utc else f"local time ({_esc(view.zone.name(view.now))})"
    range_name = window.range.name
    where = f"{_esc(stored.path)} &middot; " if stored.path else ""  # shown to an admin
    out = ["<h1>Health receiver</h1>", _person_nav(view),
           f'<p class="muted">{where}{_esc(_size(stored.size_bytes))} &middot; days in '
           f'{zone} &middot; version {_esc(__version__)}</p>', _range_nav(view, "/", range_name)]
    last_sync = stored.syncs[0] if stored.syncs else None
    if last_sync:
        out.append(f'<p>Last sync {format_ago(last_sync.received_at, view.now)}: '
                   f'{_number(last_sync.received)} records, {_esc(last_sync.status)}.</p>')
    out.append(_backup_line(report.backup, view.now))
    out.append(_notice_line(report.notice, view.now))
    if report.gaps:
        out.append('<div class="note"><b>Gaps</b>: ' + "; ".join(_esc(gap.message) for gap in report.gaps) + ".</div>")
    if report.today:
        out.append("<h2>Today</h2><div class=\"tiles\">")
        for tile in report.today:
            value = format_measure(tile.value, tile.unit)
            average = ("" if tile.average is None else f"<span>{TODAY_AVERAGE_DAYS}-day average "
                       f"{format_measure(tile.average, tile.unit)}</span>")
            out.append(f'<div class="tile"><span>{_esc(tile.title)}</span><b>{value}</b>{average}</div>')
        out.append("</div>")
    label = window.range.label
    out.append(f"<h2>{_esc(label if window.range.days is None else 'Last ' + label)}</h2>")
    out.append(_window_note(window))
    if report.charts:
        out.append('<div class="grid">' + "".join(_chart_card(chart, view, range_name) for chart in report.charts)
                   + "</div>")
    else:
        out.append('<p class="muted">No samples yet.</p>')
    out.append("<h2>Workouts</h2>")
    out.append(_workout_table(report.workouts, view) if report.workouts else
               '<p class="muted">No workouts in these days.</p>')
    if report.more_workouts:
        out.append(f'<p class="muted">and {report.more_workouts:,} earlier workouts in these days.</p>')
    if report.medications:
        out.append('<h2>Medications</h2><div class="grid">')
        for medication in report.medications:
            chart = medication.chart
            out.append(f'<div class="chart"><h3>{_esc(medication.name)}</h3><p>doses per {chart.grain.name}: '
                       f'{medication.taken:,} taken, {medication.skipped:,} skipped</p>'
                       f'{svg_chart(chart)}{_legend(chart.kind.stages)}</div>')
        out.append("</div>")
    if report.journal:
        out.append("<h2>Journal</h2>")
        out.append(_table(("When", "What", ("opt", "Details")), [("", _cells(
            format_local(entry.start_date, view.zone), _esc(entry.title), ("opt", _esc(entry.text))))
            for entry in report.journal]))
    out.append("<h2>Last syncs</h2>")
    out.append(_sync_table(stored.syncs, view) if stored.syncs else
               '<p class="muted">No sync has arrived yet.</p>')
    out.append("<h2>Types</h2>")
    out.append(_table(("Type", "Last", "Rows", ("opt", "First")), [("", _cells(
        f'<a href="{_href(view, type_path(info.type), range_name)}" title="{_esc(info.type)}">'
        f'{_esc(info.title)}</a>', format_local(info.last, view.zone), _number(info.rows),
        ("opt", format_local(info.first, view.zone)))) for info in stored.types]))
    if stored.more_types:
        out.append(f'<p class="muted">and {stored.more_types:,} more types with fewer samples '
                   f'(<code>health_receiver.py stats</code> lists them all).</p>')
    out.append("<h2>Totals</h2>")
    out.append(_table(("Table", "Rows"), [("", _cells(_esc(table), _number(rows)))
                                           for table, rows in stored.totals.items()]))
    out.append(f'<p class="muted">Generated {_local_time(view.now, view.zone)}. The same facts as JSON: '
               f'<a href="{_href(view, SUMMARY_PATH, range_name)}">{SUMMARY_PATH}</a>. '
               f'<a href="{_href(view, FIELDS_PATH)}">What the app sends</a>: the fields of its elements.</p>')
    return _document("Health receiver", out)


def _backup_line(backup, now):
    if backup is None:
        return ""
    last = backup["last"]
    made = (f"last backup {format_ago(last['made_at'], now)} ({_esc(_size(last['bytes']))}, verified)" if last
            else "no backup yet")
    into = f" into {_esc(backup['folder'])}" if backup["folder"] else ""  # shown to an admin
    every = f"every {backup['every_hours']:g} h{into}, {backup['keep']} kept"
    if backup["warning"]:
        return f'<p class="note">Backups: {_esc(backup["warning"])}; {made}; {every}.</p>'
    return f'<p class="muted">Backups: {made}; {every}.</p>'


def _notice_line(notice, now):
    if notice is None:
        return ""
    where = f"to {_esc(notice['destination'])} ({_esc(notice['format'])})"
    last = notice["last"]
    if last is None:
        return f'<p class="muted">Notices: {where}; none sent yet.</p>'
    told = f"the last, {format_ago(last['time'], now)}: {_esc(last['title'])}"
    if last["delivered"]:
        return f'<p class="muted">Notices: {where}; {told}, delivered.</p>'
    return f'<p class="note">Notices: {where}; {told}, not delivered ({_esc(last["error"])}).</p>'


def render_fields_page(groups, view):
    """What the app sends: per section and type, its fields and the
    columns the receiver could not fill."""
    zone = view.zone
    out = [f'<p><a href="{_href(view, "/")}">&larr; Health receiver</a></p>', "<h1>What the app sends</h1>",
           _person_nav(view, FIELDS_PATH),
           f'<p class="muted">The fields of the latest {FIELDS_ELEMENTS_READ:,} elements of each section and of the '
           f'{FIELDS_TYPES_MAX} largest sample types, with their JSON types, how many of those elements carry '
           "them and the first and last of them. Every element is stored whole in its row's "
           "<code>record</code>; the columns are read from these fields.</p>"]
    warnings = [group for group in groups if group.empty]
    for group in warnings:
        out.append(f'<p class="note">{_esc(group.name)}: ' + "; ".join(
            f"no {_esc(column)} in {count:,} of {group.read:,}" for column, count in group.empty)
            + f"; fields seen: {_esc(', '.join(use.field for use in group.fields))}</p>")
    if not groups:
        out.append('<p class="muted">No sync has arrived yet.</p>')
    for group in groups:
        title = group.name if group.name in SECTIONS_BY_NAME else type_title(group.name)
        out.append(f'<h2 title="{_esc(group.name)}">{_esc(title)}</h2><p class="muted" style="overflow-wrap:anywhere">'
                   f'{"" if title == group.name else _esc(group.name) + " &middot; "}{group.read:,} of '
                   f"{group.stored:,} elements read</p>")
        out.append(_table(("Field", "Types", "Elements", ("opt", "First"), ("opt", "Last")), [("", _cells(
            _esc(use.field), _esc(", ".join(use.kinds)), _number(use.elements),
            ("opt", format_local(use.first, zone)), ("opt", format_local(use.last, zone)))) for use in group.fields]))
    return _document("What the app sends - Health receiver", out)


def _sync_table(syncs, view):
    rows = []
    for sync in syncs:
        failed = sync.status != SyncStatus.OK
        duration = sync.duration_ms
        rows.append((' class="fail"' if failed else "", _cells(
            f'{format_local(sync.received_at, view.zone)}<br>'
            f'<span class="muted">{format_ago(sync.received_at, view.now)}</span>',
            _esc(sync.status), _number(sync.received), _number(sync.inserted),
            ("opt", _number(sync.duplicates)), ("opt", _number(sync.rejected)),
            ("opt", _esc(sync.sync_source or "-")), ("opt", _esc(_size(sync.body_bytes))),
            ("opt", f"{duration / 1000:.2f} s" if duration is not None else ""))))
        if failed and sync.error:
            rows.append((' class="fail"', f"<td class=\"err\" colspan=\"9\">{_esc(sync.error)}</td>"))
    return _table(("When", "Status", "Records", "New", ("opt", "Dup"), ("opt", "Rejected"), ("opt", "Source"),
                   ("opt", "Size"), ("opt", "Time")), rows)


def activity_title(activity):
    """traditionalStrengthTraining (or HKWorkoutActivityType...) ->
    Traditional strength training."""
    text = str(activity or "Workout")
    text = text[len("HKWorkoutActivityType"):] if text.startswith("HKWorkoutActivityType") else text
    words = _WORD_START.sub(" ", text).split(" ")
    return " ".join([words[0][:1].upper() + words[0][1:]] + [w if w.isupper() else w.lower() for w in words[1:]])


def _km(metres):
    return "" if metres is None else f"{metres / 1000:.2f} km"


def _workout_table(workouts, view):
    return _table(("Workout", "Date", "Duration", "Distance", ("opt", "Energy"), ("opt", "Avg heart rate"),
                   ("opt", "Route points")), [("", _cells(
                       f'<a href="{_href(view, workout_path(w.uuid))}">{_esc(activity_title(w.activity_type))}</a>',
                       format_local(w.start_date, view.zone), _long_duration(w.duration_seconds),
                       _km(w.distance_m),
                       ("opt", "" if w.energy_kcal is None else f"{w.energy_kcal:,.0f} kcal"),
                       ("opt", "" if w.heart_rate is None else f"{w.heart_rate:.0f} bpm"),
                       ("opt", _number(w.route_points)))) for w in workouts])


def render_damaged_page(damage):
    """What the status page says instead, while the database is damaged."""
    return _document("Health receiver: database damaged", [
        "<h1>Health receiver</h1>", f'<p class="note">{_esc(damage)}</p>'])


def render_type_page(report):
    """The page of one type: its chart, its periods, its latest samples."""
    view, window, info = report.view, report.window, report.info
    zone, range_name = view.zone, window.range.name
    path = type_path(info.type)
    unit = f" ({_esc(report.unit)})" if report.unit else ""
    out = [f'<p><a href="{_href(view, "/", range_name)}">&larr; Health receiver</a></p>',
           f'<h1 title="{_esc(info.type)}">{_esc(info.title)}{unit}</h1>', _person_nav(view, path),
           f'<p class="muted">{_number(info.rows)} samples from {format_local(info.first, zone)} to '
           f'{format_local(info.last, zone)}</p>', _range_nav(view, path, range_name), _window_note(window)]
    if report.chart:
        out.append(_chart_card(report.chart, view, range_name, wide=True))
    else:
        out.append('<p class="muted">No samples in these days.</p>')
    out.append(f'<p><a href="{_href(view, path + ".csv", range_name)}" download>Download these samples as CSV</a></p>')
    out.append(f"<h2>By {window.grain.name}</h2>")
    if report.periods:
        heads = ["Period", *info.kind.columns]
        rows = []
        sleep = info.kind.name == "sleep"
        if sleep:
            heads = ["Night", *(f"{column} (h:mm)" for column in info.kind.columns)]
        for period in report.periods:
            label = period.day.strftime(window.grain.table_format)
            cells = [("" if v is None else _duration(v * 3600) if sleep else format_value(v)) for v in period.cells]
            rows.append(("", _cells(_esc(label), *cells)))
        out.append(_table(heads, rows))
    else:
        out.append('<p class="muted">No samples in these days.</p>')
    if report.sources:
        out.append("<h2>Sources</h2>")
        adds_up = any(source.total is not None for source in report.sources)
        if adds_up:
            named = ", then ".join(f"names with &ldquo;{_esc(word)}&rdquo;" for word in report.view.priority)
            out.append(f'<p class="muted">Counted: what each source adds to the totals. Where sources counted the '
                       f'same time, only the first by priority counts: data entered by hand, then {named}, then the '
                       f'others in the order they were first stored.</p>')
        out.append('<div class="narrow">' + _table(("Source", "Samples", "Share") + (("Counted",) if adds_up else ()), [
            ("", _cells(_esc(source.source), _number(source.samples), f"{source.share:.0%}",
                        *((format_value(source.total),) if adds_up else ()))) for source in report.sources]) + "</div>")
    out.append("<h2>Latest samples</h2>")
    out.append(_table(("Start", "Value", "Unit", ("opt", "Source"), ("opt", "End")), [("", _cells(
        format_local(s.start_date, zone), format_value(s.value), _esc(s.unit), ("opt", _esc(s.source_name)),
        ("opt", format_local(s.end_date, zone)))) for s in report.latest]))
    return _document(f"{info.title} - Health receiver", out)


#: Route and profile size in SVG units.
ROUTE_SIZE, PROFILE_SIZE, PHONE_PROFILE_SIZE = 600, (600, 160), (360, 140)
#: The most points a drawn route or profile keeps (longer ones are thinned).
ROUTE_POINTS_DRAWN = 2000


def _thin(points, most=ROUTE_POINTS_DRAWN):
    if len(points) <= most:
        return points
    step = len(points) / (most - 1)
    return [points[int(i * step)] for i in range(most - 1)] + [points[-1]]


def svg_route(points, size=ROUTE_SIZE, margin=12):
    """A route [[lat, lon]] as an SVG path: a local equirectangular
    projection (longitude scaled by the cosine of the mean latitude), the
    aspect kept, start (green) and end (red) marked."""
    if len(points) < 2:
        return ""
    lats = [p[0] for p in points]
    lons = [p[1] for p in points]
    scale_x = math.cos(math.radians((min(lats) + max(lats)) / 2))
    span_x = (max(lons) - min(lons)) * scale_x
    span_y = max(lats) - min(lats)
    span = max(span_x, span_y) or 1e-9
    inner = size - 2 * margin
    width = span_x / span * inner + 2 * margin
    height = span_y / span * inner + 2 * margin

    def project(lat, lon):
        return (margin + (lon - min(lons)) * scale_x / span * inner,
                margin + (max(lats) - lat) / span * inner)

    drawn = [project(lat, lon) for lat, lon in _thin(points)]
    path = "M" + " L".join(f"{px:.1f},{py:.1f}" for px, py in drawn)
    (sx, sy), (ex, ey) = drawn[0], drawn[-1]
    return (f'<svg viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="route">'
            f'<path d="{path}" fill="none" stroke="#d7301f" stroke-width="2.5" stroke-linejoin="round"/>'
            f'<circle cx="{sx:.1f}" cy="{sy:.1f}" r="5" fill="#1a9850"><title>start</title></circle>'
            f'<circle cx="{ex:.1f}" cy="{ey:.1f}" r="5" fill="#222" stroke="#fff"><title>end</title></circle>'
            f"</svg>")


def render_workout_page(report):
    """The page of one workout: its facts, route, elevation and splits."""
    workout, route = report.workout, report.route
    name = activity_title(workout.activity_type)
    style = SPEED_STYLES.get(workout.activity_type, PACE_PER_KM)
    out = [f'<p><a href="{_href(report.view, "/")}">&larr; Health receiver</a></p>', f"<h1>{_esc(name)}</h1>",
           _person_nav(report.view), f'<p class="muted">{format_local(workout.start_date, report.view.zone)}'
           f'{" &middot; " + _esc(workout.source) if workout.source else ""}</p>', '<div class="tiles">']
    distance = workout.distance_m if workout.distance_m is not None else (route.distance_m or None)
    for title, value in (("Duration", _long_duration(workout.duration_seconds)), ("Distance", _km(distance)),
                         ("Energy", "" if workout.energy_kcal is None else f"{workout.energy_kcal:,.0f} kcal"),
                         ("Average heart rate", "" if workout.heart_rate is None else
                          f"{workout.heart_rate:.0f} bpm"),
                         (style.title, style.shown(workout.duration_seconds, distance))):
        if value:
            out.append(f'<div class="tile"><span>{title}</span><b>{value}</b></div>')
    out.append("</div>")
    if len(route.points) >= 2:
        out.append(f'<h2>Route</h2><p class="muted">{len(route.points):,} points, '
                   f'{_km(route.distance_m)} along them</p><div class="route">{svg_route(route.points)}</div>')
    else:
        out.append('<p class="muted">No route was recorded with this workout.</p>')
    if len(route.elevation) >= 2:
        out.append("<h2>Elevation</h2>")
        profile = _thin(route.elevation)
        out.append(f'<div class="on-phone">{svg_profile(profile, route.distance_m, PHONE_PROFILE_SIZE)}</div>'
                   f'<div class="on-desk profile">{svg_profile(profile, route.distance_m)}</div>')
    heart = report.heart
    if heart is not None:
        out.append(f'<h2>Heart rate</h2><p class="muted">{len(heart.points):,} samples: lowest {heart.low:.0f}, '
                   f'average {heart.mean:.0f}, highest {heart.high:.0f} bpm</p>')
        if len(heart.points) >= 2:
            duration = heart.points[-1][0] or 1
            out.append(f'<div class="on-phone">{svg_heart(heart.points, duration, PHONE_PROFILE_SIZE)}</div>'
                       f'<div class="on-desk profile">{svg_heart(heart.points, duration)}</div>')
        out.append(f'<p class="muted">Zones are shares of a maximum of {heart.maximum:.0f} bpm '
                   f'({_esc(heart.basis)}).</p>')
        out.append('<div class="narrow">' + _table(("Zone", "Time", "Share"), [
            ("", _cells(_esc(name), _long_duration(seconds) or "0 min",
                        f"{seconds / (sum(heart.zone_seconds) or 1):.0%}"))
            for (_share, name), seconds in zip(HEART_ZONES, heart.zone_seconds)]) + "</div>")
    if route.splits:
        out.append(f"<h2>{style.title} per kilometre</h2>")
        out.append('<div class="narrow">' + _table(("Km", style.title), [
            ("", _cells(str(split.km), style.shown(split.seconds, 1000.0))) for split in route.splits]) + "</div>")
    return _document(f"{name} - Health receiver", out)


def _trace_frame(values, extent, per_tick, unit, size, suffix, label):
    """The frame of a trace against distance or time: (SVG parts, x(along),
    y(value)); ``extent`` is the length along, shown in ticks of
    ``per_tick`` of it named ``unit`` (1000 metres "km", 60 seconds "min")."""
    width, height = size
    left, y, parts = _value_axis(min(values), max(values), width, height, suffix, count=3)

    def x(along):
        return left + (width - left - CHART_RIGHT) * along / (extent or 1)

    parts.insert(0, f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{label}">')
    ticks, step = nice_ticks(0, extent / per_tick, 4)
    for tick in ticks:
        if tick * per_tick <= extent:
            anchor = "start" if tick == 0 else "end" if x(tick * per_tick) > width - 30 else "middle"
            parts.append(f'<text x="{x(tick * per_tick):.1f}" y="{height - 5}" text-anchor="{anchor}">'
                         f'{_decimals(tick, step)} {unit}</text>')
    return parts, x, y


def svg_heart(points, duration, size=PROFILE_SIZE):
    """Heart rate [(seconds from the start, bpm)] against time."""
    points = _thin(points)
    parts, x, y = _trace_frame([rate for _at, rate in points], duration, 60, "min", size, "", "heart rate")
    line = " ".join(f"{x(at):.1f},{y(rate):.1f}" for at, rate in points)
    parts.append(f'<polyline points="{line}" fill="none" stroke="#d7301f" stroke-width="1.5"/>')
    parts.append("</svg>")
    return "".join(parts)


def svg_profile(profile, distance, size=PROFILE_SIZE):
    """Elevation [[metres along, altitude]] against distance."""
    parts, x, y = _trace_frame([alt for _d, alt in profile], distance, 1000, "km", size, " m", "elevation")
    area = [f"{x(d):.1f},{y(alt):.1f}" for d, alt in profile]
    base = size[1] - CHART_BOTTOM
    area += [f"{x(profile[-1][0]):.1f},{base}", f"{x(profile[0][0]):.1f},{base}"]
    parts.append(f'<polygon points="{" ".join(area)}" fill="#c7e9c0" stroke="#31a354" stroke-width="1"/>')
    parts.append("</svg>")
    return "".join(parts)


# -- Prometheus: the text exposition format, version 0.0.4 --------------------

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metric(typing.NamedTuple):
    """One metric of /metrics: its name, TYPE and HELP."""

    name: str
    kind: str
    help: str


#: Every metric /metrics writes, in this order (a name missing from an
#: answer has no sample).  Receiver facts first, then health values.
METRICS = (
    Metric("health_receiver_build_info", "gauge", "The receiver's version and Python's (the value is 1)."),
    Metric("health_receiver_syncs_total", "counter", "Syncs received, by status: ok, rejected (the client's fault), "
                                                     "failed (the receiver's)."),
    Metric("health_receiver_last_sync_timestamp_seconds", "gauge", "When the last stored sync of a sync source "
                                                                   "arrived (Unix time)."),
    Metric("health_receiver_last_sync_age_seconds", "gauge", "Seconds since the last stored sync of a sync source."),
    Metric("health_receiver_rows", "gauge", "Rows stored, per table."),
    Metric("health_receiver_rejected_elements_total", "counter", "Elements kept aside in the rejected table."),
    Metric("health_receiver_sync_duration_seconds", "histogram", "Time from a stored sync's first byte to its "
                                                                 "commit."),
    Metric("health_receiver_data_gaps", "gauge", "Data that stopped arriving, 1 per gap (the status page's Gaps): "
                                                 "kind sync, source, type or sleep."),
    Metric("health_receiver_database_size_bytes", "gauge", "Size of the database file."),
    Metric("health_receiver_wal_size_bytes", "gauge", "Size of the database's write-ahead log."),
    Metric("health_receiver_last_backup_timestamp_seconds", "gauge", "When the last scheduled backup was made "
                                                                     "(Unix time)."),
    Metric("health_receiver_last_backup_success", "gauge", "1 if the last scheduled backup attempt made a verified "
                                                           "copy, 0 if it failed."),
    Metric("health_latest_value", "gauge", "The latest sample of a type, in its unit (the unit label)."),
    Metric("health_latest_timestamp_seconds", "gauge", "When the latest sample of a type started (Unix time)."),
    Metric("health_today_value", "gauge", "Today's total of a type that adds up, counted once where sources "
                                          "overlap, as the status page counts it."),
    Metric("health_sleep_last_night_seconds", "gauge", "Last night's sleep by stage (noon to noon)."),
)
METRICS_BY_NAME = {metric.name: metric for metric in METRICS}
#: Longest label value written (client text: source names).
LABEL_VALUE_MAX = 200


def _label_value(value):
    text = str(value)[:LABEL_VALUE_MAX]
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample_value(value):
    return repr(float(value)) if value.__class__ is not int else str(value)


def exposition(samples):
    """The text of /metrics from ``samples``: {metric name: [(name suffix,
    {label: value}, number)]}; non-finite numbers are left out.  A name
    METRICS does not declare is an error here, not a metric silently
    missing."""
    undeclared = samples.keys() - METRICS_BY_NAME.keys()
    if undeclared:
        raise ValueError(f"metrics not declared in METRICS: {', '.join(sorted(undeclared))}")
    lines = []
    for metric in METRICS:
        found = [(suffix, labels, value) for suffix, labels, value in samples.get(metric.name, ())
                 if value is not None and value.__class__ is not bool and math.isfinite(value)]
        if not found:
            continue
        lines.append(f"# HELP {metric.name} {metric.help}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        written = set()
        for suffix, labels, value in found:
            text = ",".join(f'{name}="{_label_value(label)}"' for name, label in labels.items())
            if (suffix, text) in written:  # labels cut to LABEL_VALUE_MAX may meet: a series is written once
                continue
            written.add((suffix, text))
            lines.append(f"{metric.name}{suffix}{{{text}}} {_sample_value(value)}" if text
                         else f"{metric.name}{suffix} {_sample_value(value)}")
    return "\n".join(lines) + "\n"


def person_samples(samples, person, facts, latest, now):
    """Add one person's samples (SyncFacts ``facts``, Latest ``latest``)."""
    def add(name, labels, value, suffix=""):
        samples.setdefault(name, []).append((suffix, dict(person=person, **labels), value))

    for status in (SyncStatus.OK, SyncStatus.REJECTED, SyncStatus.FAILED):
        add("health_receiver_syncs_total", {"status": status}, facts.by_status.get(status, 0))
    for source, when in facts.last_by_source:
        stamp = parse_stamp(when)
        if stamp is not None:
            add("health_receiver_last_sync_timestamp_seconds", {"sync_source": source}, stamp.timestamp())
            add("health_receiver_last_sync_age_seconds", {"sync_source": source}, (now - stamp).total_seconds())
    for table, rows in facts.totals.items():
        add("health_receiver_rows", {"table": table}, rows)
    add("health_receiver_rejected_elements_total", {}, facts.rejected)
    for bound, count in zip(SYNC_DURATION_BUCKETS, facts.duration_buckets):
        add("health_receiver_sync_duration_seconds", {"le": repr(bound)}, count, "_bucket")
    add("health_receiver_sync_duration_seconds", {"le": "+Inf"}, facts.duration_count, "_bucket")
    add("health_receiver_sync_duration_seconds", {}, facts.duration_sum, "_sum")
    add("health_receiver_sync_duration_seconds", {}, facts.duration_count, "_count")
    for gap in latest.gaps:
        add("health_receiver_data_gaps", {"kind": gap.kind, "type": latest.key(gap.type or ""),
                                          "source": gap.source or ""}, 1)
    for value in latest.values:
        labels = {"type": value.name, "unit": value.unit or ""}
        if value.value.__class__ in (int, float):
            add("health_latest_value", labels, value.value)
        stamp = parse_stamp(value.time)
        if stamp is not None:
            add("health_latest_timestamp_seconds", {"type": value.name}, stamp.timestamp())
    for total in latest.today:
        add("health_today_value", {"type": total.name, "unit": total.unit or ""}, total.value)
    for stage, _label, _colour in SLEEP_STAGES:
        if stage in latest.sleep:
            add("health_sleep_last_night_seconds", {"stage": stage}, round(latest.sleep[stage] * 3600, 3))


def receiver_samples(samples, db_path, backup):
    """Add the samples of the receiver itself: its build, its files, its backups."""
    samples["health_receiver_build_info"] = [("", {"version": __version__,
                                                  "python": ".".join(map(str, sys.version_info[:3]))}, 1)]
    sizes = {suffix: os.path.getsize(db_path + suffix) for suffix in ("", "-wal") if os.path.exists(db_path + suffix)}
    samples["health_receiver_database_size_bytes"] = [("", {}, sizes.get("", 0))]
    samples["health_receiver_wal_size_bytes"] = [("", {}, sizes.get("-wal", 0))]
    if backup:
        last = backup.get("last")
        stamp = parse_stamp(last["made_at"]) if last else None
        if stamp is not None:
            samples["health_receiver_last_backup_timestamp_seconds"] = [("", {}, stamp.timestamp())]
        samples["health_receiver_last_backup_success"] = [("", {}, 0 if backup.get("failed") else 1)]


# ---------------------------------------------------------------------------
# Notices: a message when data stops or comes back, or a backup fails
# ---------------------------------------------------------------------------

#: A notice is tried this many times, this many seconds apart, then given up
#: (logged); each try waits at most NOTICE_TIMEOUT for the destination.
NOTICE_ATTEMPTS = 3
NOTICE_RETRY_SECONDS = 30.0
NOTICE_TIMEOUT = 10.0
#: Notices waiting to be sent at most (the oldest are dropped, and logged).
NOTICES_QUEUED = 100
#: Seconds between two looks for gaps while nothing else prompts one (a
#: sync that never comes is a gap that no sync reveals).
GAP_CHECK_SECONDS = 600.0
#: Notice titles and messages are cut to this many characters.
NOTICE_TEXT_MAX = 300


class Notice(typing.NamedTuple):
    """One message for the person who runs the receiver."""

    #: "gap_opened", "gap_closed", "backup_failed" or "test".
    event: str
    title: str
    message: str
    #: Canonical UTC.
    time: str
    person: str = ""
    #: Of a gap: its kind, type and source (Gap), and since when.
    kind: typing.Optional[str] = None
    type: typing.Optional[str] = None
    source: typing.Optional[str] = None
    since: typing.Optional[str] = None


#: How loud each event is (ntfy's priority names; Gotify's numbers).
_NOTICE_LOUDNESS = {"gap_opened": ("high", 8), "backup_failed": ("high", 8), "gap_closed": ("default", 4),
                    "test": ("default", 4)}
#: ntfy's tags (shown as emoji) per event.
_NOTICE_TAGS = {"gap_opened": "warning", "gap_closed": "white_check_mark", "backup_failed": "floppy_disk",
                "test": "bell"}


def _header_text(text):
    """Client text (a source's name) as an HTTP header value: one line, and
    outside ASCII as an RFC 2047 word (which ntfy reads)."""
    text = " ".join(str(text).split())[:NOTICE_TEXT_MAX]
    if text.isascii() and text.isprintable():
        return text
    return "=?UTF-8?B?" + base64.b64encode(text.encode("utf-8", "replace")).decode("ascii") + "?="


def _ntfy_request(notice):
    return ({"Title": _header_text(notice.title), "Priority": _NOTICE_LOUDNESS[notice.event][0],
             "Tags": _NOTICE_TAGS[notice.event], "Content-Type": "text/plain; charset=utf-8"},
            notice.message[:NOTICE_TEXT_MAX].encode("utf-8"))


def _gotify_request(notice):
    return ({"Content-Type": "application/json"},
            json.dumps({"title": notice.title[:NOTICE_TEXT_MAX], "message": notice.message[:NOTICE_TEXT_MAX],
                        "priority": _NOTICE_LOUDNESS[notice.event][1]}).encode("utf-8"))


def _webhook_request(notice):
    return ({"Content-Type": "application/json"},
            json.dumps({name: value[:NOTICE_TEXT_MAX] if value.__class__ is str else value
                        for name, value in notice._asdict().items()}).encode("utf-8"))


class NoticeFormat(typing.NamedTuple):
    """How one kind of destination takes a notice: ``request(notice)`` ->
    (headers, body) of the POST to its URL."""

    name: str
    request: typing.Callable
    #: What its URL is, for --help.
    url: str


#: Every destination --notify can post to, the default first.
NOTICE_FORMATS = (
    NoticeFormat("ntfy", _ntfy_request, "a topic: https://ntfy.sh/<topic> (title, priority and tags as headers)"),
    NoticeFormat("gotify", _gotify_request, "https://<server>/message?token=<app token>"),
    NoticeFormat("webhook", _webhook_request, "any URL taking a JSON object (Home Assistant: "
                                              "http://<ha>:8123/api/webhook/<id>)"),
)
NOTICE_FORMATS_BY_NAME = {kind.name: kind for kind in NOTICE_FORMATS}


def notice_destination(url):
    """What a log line may say of a notice URL: its scheme and host (its
    path and query may be a secret: an ntfy topic, a Gotify token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}" + (f":{parts.port}" if parts.port else "")


def post_notice(url, kind, notice, timeout=NOTICE_TIMEOUT):
    """Post ``notice`` to ``url`` as ``kind`` (a NoticeFormat) once;
    return None, or why it was not delivered."""
    parts = urlsplit(url)
    headers, body = kind.request(notice)
    connection = (http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection)(
        parts.hostname, parts.port, timeout=timeout)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("POST", target, body=body, headers=dict(headers, **{"User-Agent": f"health_receiver/"
                                                                                             f"{__version__}"}))
        response = connection.getresponse()
        response.read(64 * 1024)
        return None if 200 <= response.status < 300 else f"{notice_destination(url)} answered {response.status}"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return f"{notice_destination(url)}: {log_safe(exc, 200)}"
    finally:
        connection.close()


class Worker:
    """A background thread of the receiver's (its ``_run``), woken through
    ``_wake`` and stopped with ``stop()``."""

    def __init__(self, name):
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self):
        raise NotImplementedError

    def start(self):
        self._thread.start()

    def stop(self):
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join()


class Notifier(Worker):
    """Sends notices from a background thread, so that none ever delays a
    sync: each is tried NOTICE_ATTEMPTS times, and what failed is logged.
    ``log(line, error)`` writes the log; ``last`` is the last notice tried
    and how it went (the status page shows it)."""

    def __init__(self, url, kind, log, pause=NOTICE_RETRY_SECONDS):
        super().__init__("notices")
        self.url, self.kind, self.log, self.pause = url, kind, log, pause
        self.queue = collections.deque()
        self.last = None
        self._sending = False

    def send(self, notice):
        """Queue ``notice``; never waits."""
        with self._wake:
            if len(self.queue) >= NOTICES_QUEUED:
                dropped = self.queue.popleft()
                self.log(f"notice dropped, {NOTICES_QUEUED} waiting: {log_safe(dropped.title, 100)}", True)
            self.queue.append(notice)
            self._wake.notify_all()

    def _run(self):
        while True:
            with self._wake:
                while not self.queue and not self._stop:
                    self._wake.wait()
                if self._stop:
                    return
                notice = self.queue.popleft()
                self._sending = True
            try:
                self._deliver(notice)
            finally:
                with self._wake:
                    self._sending = False

    def idle(self):
        """Whether no notice waits or is being sent."""
        with self._wake:
            return not self.queue and not self._sending

    def _deliver(self, notice):
        for attempt in range(1, NOTICE_ATTEMPTS + 1):
            error = post_notice(self.url, self.kind, notice)
            self.last = {"time": notice.time, "title": notice.title, "delivered": error is None, "error": error,
                         "attempts": attempt}
            if error is None:
                self.log(f"notice sent to {notice_destination(self.url)}: {log_safe(notice.title, 100)}", False)
                return
            self.log(f"notice not delivered (try {attempt} of {NOTICE_ATTEMPTS}): {error}", True)
            with self._wake:
                if self._wake.wait_for(lambda: self._stop, self.pause if attempt < NOTICE_ATTEMPTS else 0):
                    return

    def status(self):
        """The status page's line: where notices go and the last one."""
        return {"destination": notice_destination(self.url), "format": self.kind.name, "last": self.last}


def _gap_key(gap):
    return "|".join((gap.kind, gap.type or "", gap.source or ""))


class GapWatch(Worker):
    """Notices of gaps (data_gaps) as they open and close, once each: the
    gaps already told are kept in the database's settings, so a restart
    does not tell them again.  ``check()`` looks now; the thread looks every
    GAP_CHECK_SECONDS, and at once after ``poke()`` (a sync came)."""

    SETTING = "notified_gaps"

    def __init__(self, store, notifier, zone, clock, log, every=GAP_CHECK_SECONDS):
        super().__init__("gaps")
        self.store, self.notifier, self.zone, self.clock, self.log = store, notifier, zone, clock, log
        self.every = every
        self._poked = False
        self._checking = threading.Lock()  # one look at a time: each gap is told once

    def poke(self):
        with self._wake:
            self._poked = True
            self._wake.notify_all()

    def _run(self):
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._poked or self._stop, self.every)
                if self._stop:
                    return
                self._poked = False
            try:
                self.check()
            except (StorageUnavailable, sqlite3.Error) as exc:
                self.log(f"gaps not checked: {exc}", True)
            except Exception:  # a bug: said with its traceback, and the next look tried all the same
                self.log("gaps not checked: " + traceback.format_exc().replace("\n", " | "), True)

    def current(self, now):
        """{person: {gap key: Gap}} of everyone, as of ``now``."""
        found = {}
        for person in self.store.people():
            view = View.of("7d", self.zone, now, self.store.priority, person.name)
            with PersonStore(self.store, person).reader() as conn:
                found[person.name] = {_gap_key(gap): gap for gap in data_gaps(conn, view)}
        return found

    def check(self):
        """Send a notice for each gap opened or closed since the last look."""
        with self._checking:
            self._check()

    def _check(self):
        now = self.clock()
        try:
            told = json.loads(self.store.setting(self.SETTING) or "{}")
        except ValueError:  # not what this receiver wrote: told again, rather than never
            told = {}
        told = told if told.__class__ is dict else {}
        current = self.current(now)
        stamp = _canonical(now)
        for person, gaps in current.items():
            before = told.get(person)
            before = before if before.__class__ is dict else {}
            for key, gap in gaps.items():
                if key not in before:
                    self.notifier.send(Notice("gap_opened", f"{person}: {gap.message}", _gap_text(gap), stamp,
                                              person, gap.kind, gap.type, gap.source, gap.since))
            for key, message in before.items():
                if key not in gaps:
                    kind, type_name, source = key.split("|", 2)
                    self.notifier.send(Notice("gap_closed", f"{person}: data again", f"Closed: {message}.", stamp,
                                              person, kind, type_name or None, source or None))
        self.store.keep_setting(self.SETTING, json.dumps(
            {person: {key: gap.message for key, gap in gaps.items()} for person, gaps in current.items() if gaps},
            sort_keys=True))


def _gap_text(gap):
    since = f" (since {gap.since})" if gap.since else ""
    return f"{gap.message}{since}. The receiver tells you again when it ends."


# ---------------------------------------------------------------------------
# HTTP: keys, request checks, the protocol, routes and their actions, the server
# ---------------------------------------------------------------------------

# -- Keys and the configuration: Keys, trusted proxies, ReceiverConfig ------

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
#: Default bound of the temporary disk that syncs being received take, in MiB.
DEFAULT_MAX_TMP_MB = 1024
#: Backups kept by scheduled backups (--backup-keep).
DEFAULT_BACKUP_KEEP = 7
#: Longest chunk-size line of a chunked body (a 16-digit size, extensions, CRLF).
CHUNK_LINE_MAX = 1026
#: Longest trailer line of a chunked body, and how many are read.
TRAILER_LINE_MAX = 8192
TRAILER_FIELDS_MAX = 100
#: Slowest body upload accepted, in bytes per second, for the body deadline.
MIN_UPLOAD_RATE = 64 * 1024
#: Seconds the app is told to wait before retrying after a 503.
RETRY_AFTER = 30
#: Failed key checks from one address within GUESS_WINDOW seconds before
#: that address gets 429 for GUESS_BLOCK seconds.
GUESS_LIMIT = 10
GUESS_WINDOW = 60.0
GUESS_BLOCK = 60
#: Seconds accepting pauses when the process has no file descriptor left.
ACCEPT_PAUSE = 0.1
#: Lines about refused requests logged per window of seconds; the rest are counted.
REFUSALS_LOGGED = 20
REFUSALS_WINDOW = 60.0
#: Addresses whose failed key checks are remembered (the oldest are forgotten).
GUESS_ADDRESSES_MAX = 4096
#: After an early answer to a POST (401, 413, ...), how long and how much of
#: the body still arriving is read and dropped, so that the client reads the
#: answer instead of a reset (what nginx calls a lingering close).
LINGER_SECONDS = 10.0
LINGER_IDLE = 2.0
#: Content-Security-Policy of the pages: nothing from elsewhere, no scripts,
#: inline styles only, never in a frame.
PAGE_POLICY = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
               "form-action 'self'; frame-ancestors 'none'")


class Identity(typing.NamedTuple):
    """Who a request speaks for: the person its key names."""

    name: str
    #: Their id in PEOPLE.
    person: int = FIRST_PERSON
    #: The SHA-256 of the person's own key it was sent with (None: the
    #: receiver's key, or none): a sync is stored only while it is theirs.
    key_sha256: typing.Optional[str] = None


#: Whom the one key (--token-file, $HEALTH_RECEIVER_TOKEN or <db>.key)
#: names, unless --person names another, and whom a receiver without keys
#: takes every request to be.
OWNER = Identity(FIRST_PERSON_NAME)


class Keys:
    """The keys that let a request in, each naming an Identity.

    Auth is on when there is a key (``required``).  The app sends its key
    as ``Authorization: Bearer <key>`` or in the header named ``header``
    (--auth-header); a browser logs in to the pages with HTTP Basic, any
    user name and the key as password.
    """

    def __init__(self, named=(), header=None):
        #: [(key as bytes, the identity it names)]
        self._named = [(key.encode("utf-8"), identity) for key, identity in named]
        #: The header the app sends its key in; None: Authorization: Bearer.
        self.header = header

    @classmethod
    def single(cls, key, header=None, owner=OWNER):
        """The one key of this receiver, naming ``owner``; no key: auth is off."""
        return cls([(key, owner)] if key else [], header)

    def owned_by(self, owner):
        """These keys, each naming ``owner``."""
        keys = Keys(header=self.header)
        keys._named = [(key, owner) for key, _identity in self._named]
        return keys

    def __repr__(self):
        return f"Keys({len(self._named)} key(s), header={self.header!r})"  # never a key

    @property
    def required(self):
        return bool(self._named)

    def _named_by(self, sent):
        """The identity a sent key names, or None.  The one comparison of
        keys: constant time, and every key is compared whichever matches."""
        sent = sent.encode("utf-8", "surrogateescape")
        found = None
        for key, identity in self._named:
            if hmac.compare_digest(sent, key):
                found = identity
        return found

    def _sent_by_app(self, headers):
        """The key sent the app's way, or None."""
        if self.header:
            sent = headers.get(self.header)
            return None if sent is None else sent.strip()
        scheme, _, sent = (headers.get("Authorization") or "").strip().partition(" ")
        return sent.strip() if scheme.lower() == "bearer" and sent.strip() else None

    @staticmethod
    def _sent_by_login(headers):
        """The password of an HTTP Basic login, or None."""
        scheme, _, credentials = (headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            password = base64.b64decode(credentials.strip(), validate=True).partition(b":")[2]
        except ValueError:
            return None
        # The user name is anything (browsers send it in UTF-8 or Latin-1);
        # a key is ASCII, so a password of other bytes is never one.
        return password.decode("latin-1")

    def sent(self, headers, login=False):
        """Whether the request carries a key the way identify() reads one."""
        return self._sent_by_app(headers) is not None or (login and self._sent_by_login(headers) is not None)

    def identify(self, headers, login=False, stored=None):
        """Whom the request's key names, sent the app's way (or, with
        ``login``, as a browser's login), or None.  A key none of these
        names is looked up with ``stored(key)`` (people's own keys)."""
        for sent in (self._sent_by_app(headers), self._sent_by_login(headers) if login else None):
            identity = None if sent is None else self._named_by(sent)
            if identity is None and sent and stored is not None:
                identity = stored(sent)
            if identity is not None:
                return identity
        return None

    def app_refusal(self, headers):
        """The 401 for a request whose key identify() did not take the
        app's way: what is wrong, and what is expected."""
        if self.header:
            if headers.get(self.header) is None:
                return ClientError(HTTPStatus.UNAUTHORIZED, f"Missing {self.header} header; this receiver expects "
                                   f"'{self.header}: <key>'.")
            return ClientError(HTTPStatus.UNAUTHORIZED, f"The key in the {self.header} header is wrong.")
        expected = "'Authorization: Bearer <key>'"
        challenge = (("WWW-Authenticate", 'Bearer realm="health_receiver"'),)
        value = headers.get("Authorization")
        if value is None:
            return ClientError(HTTPStatus.UNAUTHORIZED, f"Missing Authorization header; this receiver expects "
                               f"{expected}.", challenge)
        scheme, _, sent = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not sent.strip():
            # Never echoed: a key sent without a scheme would be the "scheme".
            shown = ("holds no scheme" if not sent.strip() else "uses the scheme Basic" if scheme.lower() == "basic"
                     else "uses another scheme than Bearer")
            return ClientError(HTTPStatus.UNAUTHORIZED, f"The Authorization header {shown}; this receiver "
                               f"expects {expected}.", challenge)
        return ClientError(HTTPStatus.UNAUTHORIZED, "The key in the Authorization header is wrong.", challenge)

    @staticmethod
    def login_refusal():
        """The 401 that makes a browser ask for a login."""
        return ClientError(HTTPStatus.UNAUTHORIZED, "This page needs the receiver's key: log in with any user name "
                           "and the key as password.", (("WWW-Authenticate", 'Basic realm="health_receiver", '
                                                                             'charset="UTF-8"'),))


def _address(text):
    """An IP address written as a forwarding header writes it (quoted, in
    brackets, with a port), or None."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    return getattr(address, "ipv4_mapped", None) or address  # a dual-stack socket's IPv4 client


#: The header a trusted proxy names the client in, unless --proxy-header
#: says another: what nginx's $proxy_add_x_forwarded_for and Caddy set.
DEFAULT_PROXY_HEADER = "X-Forwarded-For"
#: The client of a request whose proxy named it unreadably ("unknown",
#: "_hidden", garbage): someone, never this machine.
UNKNOWN_CLIENT = "unknown"


def _forwarded_for(element):
    """The ``for`` parameter of one element of a Forwarded header (RFC
    7239: parameter names in any case), or ""."""
    for pair in element.split(";"):
        name, _, value = pair.partition("=")
        if name.strip().lower() == "for":
            return value
    return ""


def forwarded_hops(headers, name=DEFAULT_PROXY_HEADER):
    """The addresses a request passed through, the client first, from the
    header ``name`` alone (``Forwarded``: its ``for`` parameters; any other:
    a list of addresses, as X-Forwarded-For); unreadable ones are None."""
    values = headers.get_all(name) or ()
    if name.lower() == "forwarded":
        return [_address(_forwarded_for(element)) for value in values for element in value.split(",")]
    return [_address(hop) for value in values for hop in value.split(",")]


class TrustedProxies:
    """The proxies whose word on the client is taken (--trusted-proxy), in
    the one header they set (--proxy-header): a proxy passes the client's
    own forwarding headers on untouched (nginx and Caddy pass Forwarded),
    so any other is the client's word.  From any other peer those headers
    are ignored, and a request that carries them is never "this machine"."""

    def __init__(self, networks=(), header=DEFAULT_PROXY_HEADER):
        self.networks = tuple(ipaddress.ip_network(network, strict=False) for network in networks)
        self.header = header

    @classmethod
    def parse(cls, text, header=DEFAULT_PROXY_HEADER):
        """From "127.0.0.1,10.0.0.0/8"; raises UsageError."""
        try:
            return cls((part.strip() for part in (text or "").split(",") if part.strip()), header)
        except ValueError as exc:
            raise UsageError(f"--trusted-proxy: {exc}") from None

    def __bool__(self):
        return bool(self.networks)

    def trusts(self, address):
        return address is not None and any(address in network for network in self.networks)

    def client(self, peer, headers):
        """The client a request comes from: the peer, or behind a trusted
        proxy the last hop of its header that no trusted proxy is (a client
        can write any hops of its own in front of the real ones, never
        after them); UNKNOWN_CLIENT when that hop is unreadable."""
        peer_address = _address(peer)
        if headers is None or not self.trusts(peer_address):
            return peer
        hops = forwarded_hops(headers, self.header)
        for hop in reversed(hops):
            if hop is None:
                return UNKNOWN_CLIENT
            if not self.trusts(hop):
                return str(hop)
        return str(hops[0]) if hops else peer


def endpoint_path(text):
    """The endpoint's path as routes are found: one leading slash, none at the end."""
    return "/" + text.strip("/") if text.strip("/") else "/"


@dataclasses.dataclass
class ReceiverConfig:
    """Runtime settings of one server, handed to the handler through it."""

    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    path: str = DEFAULT_PATH
    db: str = DEFAULT_DB
    #: Who may call; no key means auth is off.
    keys: Keys = dataclasses.field(default_factory=Keys)
    max_body: int = DEFAULT_MAX_BODY_MB * MIB
    quiet: bool = False
    timeout: float = DEFAULT_TIMEOUT
    tls_cert: typing.Optional[str] = None
    tls_key: typing.Optional[str] = None
    log_stream: typing.Any = dataclasses.field(default=None, repr=False)
    tmp_dir: typing.Optional[str] = None
    max_tmp: int = DEFAULT_MAX_TMP_MB * MIB
    #: Where the key came from, for the banner.
    key_source: typing.Optional[str] = None
    #: A key made at this start: the banner shows it this once.
    new_key: typing.Optional[str] = dataclasses.field(default=None, repr=False)
    #: Running without a key was asked for (--no-auth).
    no_auth: bool = False
    #: No key of the receiver's own, but the owner has one: each person's
    #: own key lets them in (see keyless_refusal).
    own_keys_only: bool = False
    #: Warnings for the banner, decided with the configuration.
    warnings: typing.Tuple[str, ...] = ()
    archive: typing.Optional[str] = None
    utc: bool = False
    #: Words of the source names counted first where devices overlap (None:
    #: those the database was last given, by default SOURCE_PRIORITY).
    source_priority: typing.Optional[typing.Tuple[str, ...]] = None
    #: Proxies whose forwarding headers name the client (--trusted-proxy).
    trusted_proxies: TrustedProxies = dataclasses.field(default_factory=TrustedProxies)
    #: Without keys, the Host names (besides this machine's own) whose
    #: requests may read the pages (--allowed-host), as host_name() gives them.
    allowed_hosts: typing.Tuple[str, ...] = ()
    #: Scheduled backups (--backup-dir, --backup-every in seconds, --backup-keep).
    backup_dir: typing.Optional[str] = None
    backup_every: typing.Optional[float] = None
    backup_keep: int = DEFAULT_BACKUP_KEEP
    #: The person the key belongs to (--person; None: the first person).
    person: typing.Optional[str] = None
    #: Where notices go (--notify: a URL that may hold a secret) and as what
    #: (a name of NOTICE_FORMATS).
    notify_url: typing.Optional[str] = dataclasses.field(default=None, repr=False)
    notify_format: str = NOTICE_FORMATS[0].name
    #: The receiver's time (now, as an aware datetime): the wall clock, or a
    #: test's.
    clock: typing.Callable = utc_clock
    #: The URL the phone reaches the receiver at, behind a proxy or a
    #: tunnel (--public-url): the banner gives it as the app's Server URL.
    public_url: typing.Optional[str] = None

    def __post_init__(self):
        self.path = endpoint_path(self.path)


# -- Request checks: framing, the body as it arrives, hosts, throttles ------

#: White space a header value may hold around its parts (RFC 9110's OWS):
#: space and tab, nothing else (str.strip() would take a vertical tab or
#: a form feed too, so that "\x0bchunked" passed for chunked).
OWS = " \t"


def check_content_length(values, limit):
    """Return the body length from the Content-Length header values.

    Raises ClientError 411 (absent), 400 (invalid) or 413 (over ``limit``).
    """
    if not values:
        raise ClientError(HTTPStatus.LENGTH_REQUIRED, "A Content-Length header or a chunked body is required.")
    lengths = set()
    for value in values:
        for part in value.split(","):
            part = part.strip(OWS)
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


def is_loopback(host):
    """Whether an address (or "localhost") is this machine's loopback."""
    if host == "localhost":
        return True
    address = _address(host)  # a dual-stack socket's IPv4 client included
    return address is not None and address.is_loopback


def host_name(value):
    """The name or address a Host header names, without its port, in lower
    case and without a trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def is_loopback_name(name):
    """Whether a host_name() is this machine's own: localhost (and the names
    under it, which resolve to it), or a loopback address."""
    return name == "localhost" or name.endswith(".localhost") or is_loopback(name)


class GuessThrottle:
    """Counts failed key checks per address: after GUESS_LIMIT within
    GUESS_WINDOW seconds, the address is refused for GUESS_BLOCK seconds.
    Remembers at most GUESS_ADDRESSES_MAX addresses."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = collections.OrderedDict()  # address -> failure times
        #: address -> unblocked at, in the order blocked (so in the order
        #: they end: the blocks all last GUESS_BLOCK).
        self._blocked = collections.OrderedDict()

    def retry_after(self, address):
        """Seconds this address must wait, or 0."""
        with self._lock:
            until = self._blocked.get(address)
            if until is None:
                return 0
            left = until - self._clock()
            if left <= 0:
                del self._blocked[address]
                return 0
            return max(1, int(left + 0.999))

    @property
    def remembered(self):
        """Addresses whose failures are remembered now."""
        with self._lock:
            return len(self._failures) + len(self._blocked)

    def failed(self, address):
        """Count a failed key check; True when it blocks the address."""
        now = self._clock()
        with self._lock:
            times = self._failures.pop(address, [])
            times = [t for t in times if now - t < GUESS_WINDOW] + [now]
            if len(times) >= GUESS_LIMIT:
                self._blocked.pop(address, None)
                self._blocked[address] = now + GUESS_BLOCK
                # Ended blocks go from the front; past the bound, the oldest
                # are forgotten early: each check costs the same, always.
                while self._blocked and (len(self._blocked) > GUESS_ADDRESSES_MAX
                                         or next(iter(self._blocked.values())) <= now):
                    self._blocked.popitem(last=False)
                return True
            self._failures[address] = times
            while len(self._failures) > GUESS_ADDRESSES_MAX:
                self._failures.popitem(last=False)
            return False


class RefusalLog:
    """Lets through at most REFUSALS_LOGGED lines about refused requests per
    REFUSALS_WINDOW seconds, and then says how many it left out: a flood of
    bad requests cannot fill the log (nor hide the lines around it)."""

    def __init__(self, clock=time.monotonic, most=None, window=None):
        self._clock = clock
        self.most = REFUSALS_LOGGED if most is None else most
        self.window = REFUSALS_WINDOW if window is None else window
        self._lock = threading.Lock()
        self._started = None
        self._shown = self._left_out = 0

    def lines(self, line):
        """The lines to write for a refusal: none, ``line``, or a summary of
        the ones left out in the last window and then ``line``."""
        now = self._clock()
        with self._lock:
            out = []
            if self._started is None or now - self._started >= self.window:
                if self._left_out:
                    out.append(f"{self._left_out:,} more refused requests in {self.window:.0f} s, not logged")
                self._started, self._shown, self._left_out = now, 0, 0
            if self._shown < self.most:
                self._shown += 1
                out.append(line)
            else:
                self._left_out += 1
            return out


def check_framing(headers):
    """Raise ClientError 400 for header lines a proxy could read otherwise
    than this receiver: a line without a colon, a folded (continued) line."""
    if headers.defects or any("\n" in value or "\r" in value for value in headers.values()):
        raise ClientError(HTTPStatus.BAD_REQUEST, "Malformed header: a line without a colon, or a folded line.")


def check_content_type(value):
    """Accept application/json with any parameters, or no type at all."""
    if value is None or not value.strip():
        return
    media = value.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ClientError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                          f"Content-Type must be application/json, not {media[:60]}.")


#: A chunk-size line (RFC 9112): hex digits, optional extensions, CRLF;
#: no white space before the size, no bare LF.
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[^\r\n]*)?\r\n\Z")


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
            line = self.rfile.readline(CHUNK_LINE_MAX)
            match = _CHUNK_LINE.match(line)
            if not match:
                raise ClientError(HTTPStatus.BAD_REQUEST, "Malformed chunked body: bad chunk size line.")
            size_text = match.group(1)
            size = int(size_text, 16)
            if size == 0:
                break
            total += size
            if total > self.limit:
                raise ClientError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, too_large_message(self.limit))
            yield from self.pieces(size, "Malformed chunked body: a chunk ended early.")
            if self.rfile.readline(3) != b"\r\n":
                raise ClientError(HTTPStatus.BAD_REQUEST, "Malformed chunked body: missing CRLF after a chunk.")
        for _ in range(TRAILER_FIELDS_MAX):  # trailer fields, ignored
            line = self.rfile.readline(TRAILER_LINE_MAX)
            if line == b"\r\n":
                return
            if not line.endswith(b"\r\n"):
                raise ClientError(HTTPStatus.BAD_REQUEST, "Malformed chunked body: no final CRLF.")
        raise ClientError(HTTPStatus.BAD_REQUEST, "Malformed chunked body: too many trailer fields.")


def decompress(chunks, encoding, limit):
    """Inflate gzip/deflate pieces as they arrive, at most ``limit`` bytes.

    Stops at limit + 1 decoded bytes, so a small bomb costs little.  A gzip
    body may hold several members one after another (RFC 1952; gunzip reads
    them as one file); anything after a deflate body, or bytes after a gzip
    member that are not another, is an error, never dropped unread.
    """
    several = encoding in ("gzip", "x-gzip")
    wbits = 16 + zlib.MAX_WBITS if several else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    total = 0
    first = True
    try:
        for piece in chunks:
            if first and encoding == "deflate" and piece[:1] and (piece[0] & 0x0F) != 8:
                wbits = -zlib.MAX_WBITS  # raw deflate, as some clients send
                inflater = zlib.decompressobj(wbits)
            first = False
            data = piece
            while data:
                if inflater.eof:
                    if not several:
                        raise ClientError(HTTPStatus.BAD_REQUEST, f"The {encoding} body has bytes after its end.")
                    inflater = zlib.decompressobj(wbits)  # the next member
                out = inflater.decompress(data, min(READ_CHUNK, limit + 1 - total))
                total += len(out)
                if total > limit:
                    raise ClientError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                      f"The decompressed body is larger than this receiver's limit of "
                                      f"{_mib(limit)} MB (--max-body-mb).")
                if out:
                    yield out
                data = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
        out = inflater.flush()
    except zlib.error:
        raise ClientError(HTTPStatus.BAD_REQUEST, f"The {encoding} body is corrupt.") from None
    if not inflater.eof:
        raise ClientError(HTTPStatus.BAD_REQUEST, f"The {encoding} body is truncated.")
    if total + len(out) > limit:
        raise ClientError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, too_large_message(limit))
    if out:
        yield out


# -- The protocol: Answer, Route, the request handler -----------------------

class Answer(typing.NamedTuple):
    """What a route's action answers: the protocol sends it, and logs it
    before it does (so the line exists once the client has the answer)."""

    content_type: str
    #: bytes, or an iterable of bytes sent as they come (chunked).
    body: typing.Any
    status: HTTPStatus = HTTPStatus.OK
    headers: typing.Tuple[typing.Tuple[str, str], ...] = ()
    #: The log line of the request (None: "GET /path -> 200", after the client's address).
    log: typing.Optional[str] = None
    #: Runs once the answer is sent: what the client need not wait for.
    then: typing.Optional[typing.Callable[[], None]] = None
    #: Runs once the answer is sent, or could not be: frees what the body
    #: reads from (a download's database connection).
    close: typing.Optional[typing.Callable[[], None]] = None
    #: A failure's line in the log (logged as an error, instead of ``log``).
    error: typing.Optional[str] = None


JSON_TYPE = "application/json; charset=utf-8"


def json_answer(obj, status=HTTPStatus.OK, headers=(), log=None, then=None):
    # Records hold finite numbers: a NaN or infinity here is a bug (500),
    # never "Infinity", which is not JSON.
    body = json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n"
    return Answer(JSON_TYPE, body.encode("utf-8"), status, headers, log, then)


def failure_answer(request, status, message, headers=()):
    """A 4xx or 5xx: one line of JSON, and a line in the error log."""
    return json_answer({"ok": False, "error": message}, status, headers)._replace(
        error=f"{request.command or '-'} {request.logged_path} -> {int(status)} {message}")


def html_answer(document):
    return Answer("text/html; charset=utf-8", document.encode("utf-8"))


class Access(typing.NamedTuple):
    """Who may call a route."""

    name: str
    #: A browser's login (HTTP Basic, the key as password) counts as well
    #: as the app's header.
    login: bool
    #: Without keys (--no-auth), only this machine may call it.
    loopback_without_keys: bool


#: The app: its key in its header; without keys, anyone who can reach the port.
APP_KEY = Access("the app's key", login=False, loopback_without_keys=False)
#: A person's browser: the app's header or a login; without keys, only
#: this machine (the pages show health data).
PAGE_LOGIN = Access("a page login", login=True, loopback_without_keys=True)
#: Query fields whose values the log never shows (someone may put a key there).
SECRET_FIELDS = frozenset(("key", "token", "api_key", "apikey", "access_token", "auth", "authorization", "password",
                           "secret", "bearer"))
#: Stands for the endpoint's path (--path) in a route.
ENDPOINT = "<endpoint>"


class Route(typing.NamedTuple):
    """One thing the receiver answers."""

    method: str
    #: An exact path, ENDPOINT, or a pattern with one ``<name>`` part that
    #: matches the rest of the path: the action's ``request.argument``.
    path: str
    access: Access
    #: ``action(request)`` -> Answer; raises ClientError for the client's mistakes.
    action: typing.Callable
    #: What it is, for messages.
    title: str


class RouteTable:
    """The routes of one server, ENDPOINT made its path: finds a request's
    route.  A route whose path is the endpoint's is refused (UsageError)."""

    def __init__(self, routes, endpoint):
        self.endpoint = endpoint
        self._exact = {}  # path -> {method: route}
        self._patterns = {}  # pattern -> (regex, {method: route})
        for route in routes:
            if route.path == ENDPOINT:
                self._exact.setdefault(endpoint, {})[route.method] = route
                continue
            if "<" in route.path:
                before, _, rest = route.path.partition("<")
                regex = re.compile(f"{re.escape(before)}(.+){re.escape(rest.partition('>')[2])}\\Z", re.DOTALL)
                self._patterns.setdefault(route.path, (regex, {}))[1][route.method] = route
                taken = regex.match(endpoint)
            else:
                self._exact.setdefault(route.path, {})[route.method] = route
                taken = route.path == endpoint
            if taken:
                raise UsageError(f"the endpoint path {endpoint} (--path) is taken by {route.title} ({route.path}); "
                                 "choose another")

    def find(self, method, path):
        """(route, argument) of a request; raises ClientError 404 or 405."""
        methods, argument = self._exact.get(path.rstrip("/") or "/"), None
        if methods is None:
            for regex, candidates in self._patterns.values():
                match = regex.match(unquote(path))
                if match:
                    methods, argument = candidates, match.group(1)
                    break
        if methods is None:
            raise ClientError(HTTPStatus.NOT_FOUND, f"Nothing here; the endpoint is {self.endpoint}.")
        route = methods.get("GET" if method == "HEAD" else method)
        if route is None:
            allowed = sorted(set(methods) | ({"HEAD"} if "GET" in methods else set()))
            raise ClientError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not supported here; use "
                              f"{' or '.join(sorted(methods))} instead.", (("Allow", ", ".join(allowed)),))
        return route, argument


class _HeaderLines:
    """A request's input while its headers are parsed: keeps each line, so
    that their endings can be checked (the standard library takes a bare
    LF), and gives all of them one deadline (the socket's timeout alone
    is per line: a header a few seconds would hold a thread for ever)."""

    def __init__(self, rfile, connection, seconds):
        self.rfile, self.lines = rfile, []
        self._connection = connection if isinstance(connection, socket.socket) else None
        self._deadline = time.monotonic() + seconds

    def readline(self, limit=-1):
        if self._connection is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("the headers did not arrive in time")
            self._connection.settimeout(left)
        line = self.rfile.readline(limit)
        self.lines.append(line)
        return line


class HealthRequestHandler(BaseHTTPRequestHandler):
    """The protocol: HTTP/1.1 framing, checks before a body is read, the
    body within its limits, early answers, and the one writer of answers,
    which also logs.  What a request does is its route's action (see
    ROUTES): it gets this handler as ``request``, with ``argument``,
    ``identity`` and ``now`` (one per request) set."""

    protocol_version = "HTTP/1.1"
    server_version = "health_receiver/" + __version__
    error_content_type = "application/json"
    #: Answers go out at once: Nagle's algorithm with delayed ACKs made each
    #: request on a kept-alive connection wait about 40 ms.
    disable_nagle_algorithm = True
    #: Until the request line is parsed (send_error may come first).
    command = path = None
    #: What a pattern route's ``<name>`` matched (/type/HeartRate).
    argument = None
    #: Who the request speaks for, once admitted.
    identity = None
    #: The store as the person whose data a page shows sees it, and the
    #: caller's Person (see _store).
    person_store = caller = None
    #: The moment the request is answered at, for everything it shows.
    now = None
    #: Until the headers are parsed (send_error may come first).
    headers = None

    def setup(self):
        self.timeout = self.server.config.timeout
        super().setup()

    # -- the connection ------------------------------------------------------

    def handle_expect_100(self):
        # Decided in body_pieces, after auth and size: no 100 Continue before that.
        self._expects_continue = True
        return True

    def parse_request(self):
        """The standard library's parsing, stricter where a proxy in front
        could read the request otherwise: no HTTP/0.9 (no headers, no
        status line), lines that end in CRLF and hold no other CR and no
        NUL, exactly one Host in HTTP/1.1, and no Expect but 100-continue."""
        if len(self.raw_requestline.split()) == 2:
            self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 is not supported; send HTTP/1.1.")
            return False
        real, self.rfile = self.rfile, _HeaderLines(self.rfile, self.connection, self.server.config.timeout)
        try:
            if not super().parse_request():
                return False
        finally:
            lines, self.rfile = [self.raw_requestline] + self.rfile.lines, real
            if isinstance(self.connection, socket.socket):
                self.connection.settimeout(self.timeout)
        # A CR inside a line (a key pasted from a file of CRLF lines ends
        # in one) would end the headers there for the standard library's
        # parser, and a POST would lose its Content-Length: RFC 9112 2.2.
        if any(not line.endswith(b"\r\n") or b"\0" in line or b"\r" in line[:-2] for line in lines):
            self.send_error(HTTPStatus.BAD_REQUEST, "Malformed request: a line that does not end in CRLF, a CR "
                                                    "inside a line, or a NUL.")
            return False
        major, minor = map(int, self.request_version[len("HTTP/"):].split("."))  # checked by the standard library
        if (major, minor) >= (1, 1) and len(self.headers.get_all("Host") or ()) != 1:
            self.send_error(HTTPStatus.BAD_REQUEST, "An HTTP/1.1 request needs exactly one Host header.")
            return False
        expect = self.headers.get("Expect")
        if expect is not None and expect.strip(OWS).lower() != "100-continue":
            self.send_error(HTTPStatus.EXPECTATION_FAILED, "Only 'Expect: 100-continue' is understood.")
            return False
        return True

    def handle_one_request(self):
        self._expects_continue = False
        self._body_read = False
        #: The decoded body's length, once body_pieces knows it.
        self.body_length = None
        self._linger = 0
        try:
            if not self._next_request_arrives():
                self.close_connection = True
                return
            super().handle_one_request()
            if self._linger:
                self._lingering_close(self._linger)
        except (ConnectionError, ssl.SSLError) as exc:
            self.close_connection = True
            self.log_error(f"connection lost: {exc}")
        except socket.timeout:
            self.close_connection = True

    def _next_request_arrives(self):
        """Wait, at most the idle timeout, for a request's first byte.  A
        keep-alive connection left idle (Home Assistant and Prometheus leave
        one after each poll) is then closed without a word: the standard
        library would log each as an error, drowning the real ones."""
        peek = getattr(self.rfile, "peek", None)  # a BytesIO (tests without a socket) has it all already
        try:
            return peek is None or bool(peek(1))
        except socket.timeout:
            return False

    def _lingering_close(self, most):
        """After an early answer to a POST, stop sending and read (and
        drop) what the client still sends, at most ``most`` bytes within
        LINGER_SECONDS, so that it reads the answer rather than a reset."""
        self.close_connection = True
        with contextlib.suppress(OSError, ValueError):
            self.wfile.flush()
            sock = self.connection
            if isinstance(sock, socket.socket):
                if not isinstance(sock, ssl.SSLSocket):  # shutting down TLS would drop its state
                    sock.shutdown(socket.SHUT_WR)
                sock.settimeout(LINGER_IDLE)
            deadline = time.monotonic() + LINGER_SECONDS
            while most > 0 and time.monotonic() < deadline:
                data = self.rfile.read1(min(READ_CHUNK, most))
                if not data:
                    break
                most -= len(data)

    def log_request(self, code="-", size="-"):
        pass  # each answer logs its own line (see send_answer)

    def log_message(self, format, *args):
        self.server.log_request_line(self.address_string(), log_safe((format % args) if args else format))

    def log_error(self, format, *args):
        self.server.log_error_line(self.address_string(), log_safe((format % args) if args else format))

    # -- answers ---------------------------------------------------------------

    def send_error(self, code, message=None, explain=None):
        """The standard library's errors (bad request line, 431, ...) as JSON."""
        code = HTTPStatus(code)
        self.close_connection = True
        # The request line may not have said which version: answer in 1.1,
        # which every client reads (0.9 would mean no status line at all).
        self.request_version = self.protocol_version
        self.send_answer(failure_answer(self, code, message or code.phrase))

    def send_answer(self, answer):
        """The one writer of answers: logs the request, then sends the
        answer's head and body."""
        try:
            self._log_answer(answer)
            if isinstance(answer.body, bytes):
                self._send_head(answer.status, answer.content_type, answer.headers, len(answer.body))
                if self.command != "HEAD":
                    self.wfile.write(answer.body)
            else:
                self._send_streamed(answer)
            self.wfile.flush()
        finally:
            if answer.close is not None:
                answer.close()

    def _log_answer(self, answer):
        if answer.error is not None and answer.status < 500:
            self.server.log_refusal(self.address_string(), log_safe(answer.error))
        elif answer.error is not None:
            self.log_error(answer.error)
        elif answer.log is not None:
            self.server.log_request_line(None, answer.log)
        else:
            self.server.log_request_line(self.address_string(), f"{self.command} {self.logged_path} "
                                                                f"-> {int(answer.status)}")

    def _send_streamed(self, answer):
        """A body of unknown length, sent as its pieces come (chunked; to an
        HTTP/1.0 client, until the connection closes).  A failure half way
        drops the connection without the last chunk, so the client sees an
        incomplete answer, never a complete-looking one."""
        chunked = self.request_version == "HTTP/1.1"
        if not chunked:
            self.close_connection = True
        self._send_head(answer.status, answer.content_type, answer.headers, None if chunked else -1)
        if self.command == "HEAD":
            return
        try:
            for piece in answer.body:
                if piece:
                    self.wfile.write(b"%X\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        except (ConnectionError, socket.timeout, ssl.SSLError):
            raise
        except Exception:
            self.close_connection = True
            self.server.log_error_line(self.address_string(), f"download stopped half way on "
                                       f"{self.logged_path}:\n{traceback.format_exc().rstrip()}")
            return
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _send_head(self, status, content_type, headers, length):
        """Status line and headers of every answer; ``length`` None means
        chunked, -1 means until the connection closes.  A request whose
        body was not read (a POST refused early, any other with a body)
        closes the connection: what the client still sends is not a
        request.  That body is read and dropped for a while unless the
        client waits for 100 Continue (see _lingering_close)."""
        if (self.command == "POST" or self._has_body()) and not self._body_read:
            self.close_connection = True
            if not self._expects_continue:
                self._linger = self.server.config.max_body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
        elif length >= 0:
            self.send_header("Content-Length", str(length))
        # Every answer may carry health data: never cached, never sniffed.
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if content_type.startswith("text/html"):
            self.send_header("Content-Security-Policy", PAGE_POLICY)
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    # -- a request -------------------------------------------------------------

    def _dispatch(self):
        """Every method: the answer of the request's route, or of what went
        wrong, sent once; then what comes after it."""
        self.now = self.server.config.clock()
        self.person_store = self.caller = None
        with self.server.in_flight() if self.command == "POST" else contextlib.nullcontext():
            answer = self._answer()
            try:
                self.send_answer(answer)
                if answer.then is not None:
                    answer.then()
            except (ConnectionError, socket.timeout, ssl.SSLError):
                raise
            except Exception:
                self.close_connection = True
                self._log_traceback("after answering")

    def _answer(self):
        """Find the route, admit the caller, run the action; errors become
        JSON answers."""
        server = self.server
        client = self.client
        if self._forwarded_by_a_stranger():
            server.note_untrusted_proxy(self.client_address[0])
        try:
            check_framing(self.headers)
            route, self.argument = server.routes.find(self.command, urlsplit(self.path).path)
            if route.method != "POST" and self._has_body():
                raise ClientError(HTTPStatus.BAD_REQUEST, f"A {self.command} request cannot have a body.")
            self.identity = self._admit(route.access)
            return route.action(self)
        except ClientError as exc:
            return failure_answer(self, exc.status, exc.message, exc.headers)
        except PayloadError as exc:
            return failure_answer(self, HTTPStatus.BAD_REQUEST, exc.message)
        except StorageUnavailable as exc:
            return failure_answer(self, HTTPStatus.SERVICE_UNAVAILABLE, str(exc), (("Retry-After", str(RETRY_AFTER)),))
        except (ConnectionError, socket.timeout, ssl.SSLError):
            raise
        except Exception:
            self._log_traceback("internal error")
            self.close_connection = True
            return failure_answer(self, HTTPStatus.INTERNAL_SERVER_ERROR,
                                  "Internal error; the receiver's log has the details.")

    def _log_traceback(self, what):
        self.server.log_error_line(self.address_string(), f"{what} on {self.command} "
                                   f"{self.logged_path}:\n{traceback.format_exc().rstrip()}")

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _dispatch

    def _admit(self, access):
        """Who the request speaks for; raises ClientError 401 or 403."""
        keys = self.server.config.keys
        if self.server.keyless():
            if access.loopback_without_keys and (not is_loopback(self.client) or self._forwarded_by_a_stranger()):
                raise ClientError(HTTPStatus.FORBIDDEN, "This receiver runs without a key (--no-auth), so its pages "
                                  "answer only this machine; start it with a key (the default) to read them from "
                                  "elsewhere.")
            self._check_host(page=access.loopback_without_keys)
            # A person's own key still says whose a sync is.
            return keys.identify(self.headers, access.login, self.server.identity_of_key) or self.server.owner
        identity = keys.identify(self.headers, access.login, self.server.identity_of_key)
        if identity is not None:
            # Never refused for what others sent from the same address (all
            # of a proxy's clients share one): the limiter slows wrong keys
            # only, which cannot help anyone guess a key of 128 bits or more.
            return identity
        # Only a key that was sent and is wrong is a guess: a browser's
        # first request (no login yet) or a client without a key is not.
        if keys.sent(self.headers, access.login):
            guesses = self.server.guesses
            wait = guesses.retry_after(self.client)
            if wait:
                raise ClientError(HTTPStatus.TOO_MANY_REQUESTS, "Too many wrong keys from this address; try again "
                                  "in a minute.", (("Retry-After", str(wait)),))
            if guesses.failed(self.client):
                self.log_error(f"{GUESS_LIMIT} wrong keys within {GUESS_WINDOW:.0f} s: refused for {GUESS_BLOCK} s")
        raise keys.login_refusal() if access.login else keys.app_refusal(self.headers)

    def _check_host(self, page=True):
        """Without keys, a page answers only under this machine's own names
        (or --allowed-host), and the app's endpoint (``page`` False) also
        under an IP address, as the app on the local network calls it: a
        web page opened on this machine may reach the receiver under a name
        of its own that resolves here (DNS rebinding), and its browser would
        then read the answer or send it forged syncs.  A .local or DNS name
        of the app's needs --allowed-host.  No browser sends a request
        without a Host (HTTP/1.0 allows it)."""
        host = self.headers.get("Host")
        if host is None:
            return
        name = host_name(host)
        if is_loopback_name(name) or name in self.server.config.allowed_hosts:
            return
        if not page and _address(name) is not None:
            return
        if page:
            raise ClientError(HTTPStatus.FORBIDDEN, f"This receiver runs without a key (--no-auth), so its pages "
                              f"answer only to this machine's own names (localhost, 127.0.0.1, ::1), not to "
                              f"{log_safe(name, 60)!r}: a web page could use such a name to read them. If the "
                              f"name is yours, start with --allowed-host {log_safe(name, 60)}.")
        raise ClientError(HTTPStatus.FORBIDDEN, f"This receiver runs without a key (--no-auth), so it takes syncs "
                          f"only under an IP address or this machine's own names, not under "
                          f"{log_safe(name, 60)!r}: a web page could use such a name to send or read them. If the "
                          f"name is yours (a .local or DNS name), start with --allowed-host {log_safe(name, 60)}.")

    def _has_body(self):
        """Whether the headers announce a body (a Content-Length of 0 does not)."""
        headers = self.headers
        return headers is not None and (headers.get("Transfer-Encoding") is not None or any(
            value.strip(OWS) != "0" for value in headers.get_all("Content-Length") or ()))

    @property
    def client(self):
        """The client's address: the peer's, or behind a trusted proxy the
        one its forwarding headers name."""
        return self.server.config.trusted_proxies.client(self.client_address[0], self.headers)

    def address_string(self):
        return self.client

    def _forwarded_by_a_stranger(self):
        """Whether forwarding headers came from a peer not trusted to send
        them (then the peer is a proxy, and the client anyone)."""
        headers, proxies = self.headers, self.server.config.trusted_proxies
        if headers is None or not any(headers.get(name) for name in ("Forwarded", "X-Forwarded-For", proxies.header)):
            return False
        return not proxies.trusts(_address(self.client_address[0]))

    @property
    def logged_path(self):
        """The path as the log shows it: cut, escaped, and with the values of
        query fields that may hold a key redacted."""
        path, mark, query = (self.path or "-").partition("?")
        if mark:
            fields = [field.partition("=") for field in query.split("&")]
            query = "&".join(name + equals + ("[redacted]" if equals and unquote(name).lower().replace("-", "_")
                                                              in SECRET_FIELDS else value)
                             for name, equals, value in fields)
        return log_safe(path + mark + query, LOG_TEXT_MAX)

    @property
    def query(self):
        """The query's fields: {name: [values]}."""
        return parse_qs(urlsplit(self.path).query)

    # -- a body ------------------------------------------------------------------

    def body_pieces(self):
        """The body as it arrives: pieces of bytes, chunked and gzip or
        deflate decoded, within the size limit and the body's deadline.
        Type, encodings and size are checked before anything is read (and
        before 100 Continue)."""
        config = self.server.config
        check_content_type(self.headers.get("Content-Type"))
        encoding = (self.headers.get("Content-Encoding") or "identity").strip(OWS).lower()
        if encoding not in ("identity", "gzip", "x-gzip", "deflate"):
            raise ClientError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                              f"Content-Encoding {encoding[:40]} is not supported; use gzip or deflate.")
        transfers = self.headers.get_all("Transfer-Encoding") or []
        codings = [coding.strip(OWS).lower() for value in transfers for coding in value.split(",")]
        if codings and codings != ["chunked"]:
            if "chunked" in codings or len(transfers) > 1:
                raise ClientError(HTTPStatus.BAD_REQUEST, "Transfer-Encoding must be chunked alone, in one header.")
            raise ClientError(HTTPStatus.NOT_IMPLEMENTED,
                              f"Transfer-Encoding {log_safe(codings[0], 40)} is not supported.")
        length = None
        if not codings:
            lengths = self.headers.get_all("Content-Length")
            if lengths:
                length = check_content_length(lengths, config.max_body)
            else:  # no body (RFC 9112, 6.3); should one follow anyway, it is no request
                length, self.close_connection = 0, True
        elif self.headers.get("Content-Length") is not None:
            raise ClientError(HTTPStatus.BAD_REQUEST, "A request cannot have both Content-Length and "
                              "Transfer-Encoding.")
        if encoding == "identity":
            self.body_length = length
        return self._pieces(length, encoding)

    def _pieces(self, length, encoding):
        config = self.server.config
        if self._expects_continue:
            self.send_response_only(HTTPStatus.CONTINUE)
            self.end_headers()
            self.wfile.flush()
        expected = length if length is not None else config.max_body
        deadline = time.monotonic() + config.timeout + expected / MIN_UPLOAD_RATE
        reader = BodyReader(self.rfile, config.max_body, deadline)
        if length is not None:
            pieces = reader.pieces(length, f"The body ended before its {length} bytes (Content-Length) arrived.")
        else:
            pieces = reader.chunks_chunked()
        if encoding != "identity":
            pieces = decompress(pieces, encoding, config.max_body)
        try:
            yield from pieces
        except socket.timeout:
            raise ClientError(HTTPStatus.REQUEST_TIMEOUT, "The body stopped arriving; connection closed.") from None
        self._body_read = True  # all of it: the connection can take the next request


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


def cpu_seconds():
    """The processor time this process has used (user + system), in
    seconds: what a slow board would spend ten times over."""
    times = os.times()
    return times.user + times.system


# -- The routes: what the receiver answers, and who may ask -----------------

def _store(request):
    """The store as the request's person sees it: the caller's own data,
    or, for an admin, that of the person ``?person=`` names.  Any other
    person's: 404, the answer for a name nobody has, so names do not leak."""
    if request.person_store is None:
        store = request.server.store
        caller = store.person(person_id=request.identity.person)
        if caller is None:  # removed while the request was on its way
            raise ClientError(HTTPStatus.NOT_FOUND, "No such person.")
        asked = request.query.get("person", [None])[-1]
        person = caller if asked in (None, caller.name) else store.person(asked) if caller.admin else None
        if person is None:
            raise ClientError(HTTPStatus.NOT_FOUND, "No such person.")
        request.caller = caller
        request.person_store = PersonStore(store, person)
    return request.person_store


def _view(request):
    """What a page request looks at: its range, the zone, its one ``now``,
    whose data (and, for an admin, whose else there is)."""
    asked = request.query.get("range", [DEFAULT_RANGE])[-1]
    if asked not in RANGES_BY_NAME:
        raise ClientError(HTTPStatus.BAD_REQUEST, f"range must be one of {', '.join(RANGES_BY_NAME)}.")
    config = request.server.config
    person = _store(request).person
    people = tuple(other.name for other in request.server.store.people()) if request.caller.admin else ()
    return View.of(asked, Zone(config.utc), request.now, request.server.store.priority, person.name, people)


#: Seconds a page waits for the writer to bring the hourly totals up to
#: date (another sync may hold it); past that it shows them as they are.
PAGE_HOURS_WAIT = 3.0


def _totals(request):
    """The store, its hourly totals brought up to date first: a page opened
    right after a sync's answer shows that sync (the totals are otherwise
    brought up to date just after the answer)."""
    with contextlib.suppress(StorageUnavailable, sqlite3.Error):
        request.server.store.update_hours(wait=PAGE_HOURS_WAIT)
    return _store(request)


def _backups_seen(request):
    """The scheduled backups' status (BackupSchedule.status) as the caller
    may see it: where the files are is an admin's to know."""
    backups = request.server.backups
    if backups is None:
        return None
    status = backups.status(request.now)
    _store(request)  # sets request.caller
    seen = status.pop("warning_without_paths", None) or status["warning"]  # a failure's text may name paths
    if request.caller.admin:
        return status
    return dict(status, folder=None, last=status["last"] and dict(status["last"], path=None), warning=seen)


def _damage_seen(request):
    """The damaged database's text as the caller may see it: its paths and
    the command to recover it are an admin's (or, while the people cannot
    be read, the log's) to know."""
    damage = request.server.store.damage
    try:
        admin = _store(request) is not None and request.caller.admin
    except (StorageUnavailable, sqlite3.Error, ClientError):
        admin = False
    return damage if admin else DAMAGED_SEEN


def _status_report(request):
    notifier = request.server.notifier
    report = status_report(_totals(request), _view(request))._replace(
        backup=_backups_seen(request), notice=notifier.status() if notifier is not None and request.caller.admin
        else None)
    if not request.caller.admin:  # the database's path too
        report = report._replace(stored=report.stored._replace(path=None))
    return report


def status_page(request):
    damage = request.server.store.damage
    if damage:
        return html_answer(render_damaged_page(_damage_seen(request)))._replace(status=HTTPStatus.SERVICE_UNAVAILABLE)
    return html_answer(render_status_page(_status_report(request)))


def status_json(request):
    return json_answer(summary_json(_status_report(request)))


def type_page(request):
    report = type_report(_totals(request), request.argument, _view(request))
    if report is None:
        raise ClientError(HTTPStatus.NOT_FOUND, f"No samples of type {log_safe(request.argument, 80)}.")
    return html_answer(render_type_page(report))


def type_csv(request):
    store = _store(request)
    found = type_window(store, request.argument, _view(request))
    if found is None:
        raise ClientError(HTTPStatus.NOT_FOUND, f"No samples of type {log_safe(request.argument, 80)}.")
    type_name, window = found
    columns, rows = export_rows(store, SAMPLES.name, type_name, start=window.start, end=window.end)
    filename = f"{short_type_name(type_name)}-{window.first}-{window.last}.csv"
    return Answer("text/csv; charset=utf-8", csv_pieces(columns, rows), close=rows.close,
                  headers=(("Content-Disposition", f'attachment; filename="{quote(filename)}"'),))


def fields_page(request):
    return html_answer(render_fields_page(field_inventory(_store(request)), _view(request)))


def workout_page(request):
    report = workout_report(_store(request), request.argument, _view(request))
    if report is None:
        raise ClientError(HTTPStatus.NOT_FOUND, "No such workout.")
    return html_answer(render_workout_page(report))


def connection_check(request):
    """GET on the endpoint: the app's "Test Connection"."""
    server = request.server
    if server.store.damage:
        return failure_answer(request, HTTPStatus.SERVICE_UNAVAILABLE, _damage_seen(request))
    answer = {"ok": True, "service": "health_receiver", "version": __version__, "person": _store(request).person.name,
              **connection_facts(_store(request)), "ingests_in_progress": server.ingests_in_progress}
    peak = peak_rss_mb()
    if peak is not None:
        answer["peak_rss_mb"] = round(peak, 1)
    answer["cpu_seconds"] = round(cpu_seconds(), 3)
    if server.backups is not None:
        answer["backup"] = _backups_seen(request)
    return json_answer(answer)


def receive_sync(request):
    """POST on the endpoint: a sync, answered once it is committed."""
    intake = request.server.intake
    remote = request.address_string()
    # Refused from its headers alone (type, size, framing): only logged, as
    # a request without the key is; nothing a stranger sends is written.
    pieces = request.body_pieces()
    try:
        try:
            identity = request.identity
            result = intake.ingest(pieces, remote, request.body_length, identity.person,  # records failures
                                   identity.key_sha256)
        except (PayloadError, StorageUnavailable):
            # Read what the client still sends (within the body's limit
            # and deadline), so that it reads the answer, not a reset.
            for _piece in pieces:
                pass
            raise
    except ClientError as exc:  # the body went wrong as it arrived
        intake.refuse(remote, SyncStatus.FAILED if exc.status >= 500 else SyncStatus.REJECTED, exc.message,
                      request.identity.person)
        raise
    if result is None:  # nothing sent: the app testing the connection
        return connection_check(request)
    return json_answer(result.response(), log=describe_sync(result), then=lambda: after_sync(request, result))


def after_sync(request, result):
    """What follows a stored sync's answer: its hourly totals, then a look
    for gaps that opened or closed (by the gaps' own thread)."""
    request.server.intake.after_answer(result)
    if request.server.gaps is not None:
        request.server.gaps.poke()


#: People /metrics lists for an admin (a study has more: ?person= reads one).
METRICS_PEOPLE_MAX = 50


def _everyone(request):
    """The PersonStores /metrics reads: the caller's; for an admin without
    ``?person=``, everyone's (the first METRICS_PEOPLE_MAX)."""
    store = request.server.store
    _store(request)
    if request.caller.admin and "person" not in request.query:
        return [PersonStore(store, person) for person in store.people()[:METRICS_PEOPLE_MAX]]
    return [_store(request)]


def metrics_answer(request):
    """GET /metrics: the Prometheus text format (receiver facts, then each
    person's latest values, today's totals, last night and gaps)."""
    _totals(request)  # the hourly totals brought up to date first, as for a page
    samples, view = {}, _view(request)
    backups = request.server.backups
    receiver_samples(samples, request.server.store.path, backups.status(request.now) if backups is not None else None)
    for reading in _everyone(request):
        person_view = view._replace(person=reading.person.name)
        with reading.reader() as conn:
            facts = sync_facts(conn)
        person_samples(samples, reading.person.name, facts, latest_report(reading, person_view), request.now)
    return Answer(METRICS_TYPE, exposition(samples).encode("utf-8", "replace"))


def latest_answer(request):
    """GET /api/latest: one JSON object for Home Assistant's RESTful sensor."""
    return json_answer(latest_json(latest_report(_totals(request), _view(request)), request.now))


#: Digits of the shortest Unix time in milliseconds /api/series reads as
#: one (1973 on); fewer, from SERIES_SECONDS_DIGITS on, are seconds.
SERIES_MILLISECONDS_DIGITS = 12
SERIES_SECONDS_DIGITS = 9


def _instant(text, name, zone, end=False):
    """A bound of /api/series as a stored timestamp: Unix time in
    milliseconds (Grafana's ${__from}) or seconds, told apart by their
    digits (a time in seconds has 12 digits from the year 33658 on,
    in milliseconds fewer only before 1973), a date (in the receiver's days, as
    the pages count them: as ``from`` its first instant, as ``to`` (``end``)
    the end of that day, so that a date range holds both its dates, as
    ``export --since D --until D`` does) or a time (ISO 8601; UTC without
    an offset)."""
    stamp = None
    if text.isascii() and text.isdigit() and len(text) >= SERIES_SECONDS_DIGITS:
        seconds = int(text) / 1000 if len(text) >= SERIES_MILLISECONDS_DIGITS else int(text)
        with contextlib.suppress(OverflowError, OSError, ValueError):
            stamp = utc_date(_canonical(datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)))
    elif re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text) and utc_date(text):
        day = datetime.date.fromisoformat(text)
        with contextlib.suppress(OverflowError):
            stamp = zone.midnight(day + datetime.timedelta(days=1) if end else day)
    else:
        stamp = utc_date(text)
    if stamp is None:
        raise ClientError(HTTPStatus.BAD_REQUEST, f"{name} must be a date, a time (ISO 8601) or Unix time in "
                                                  "seconds or milliseconds.")
    return stamp


def series_answer(request):
    """GET /api/series?type=...: a type's numbers as its chart counts them,
    a row per period, as JSON rows or CSV (format=csv)."""
    query = {name: values[-1] for name, values in request.query.items()}
    if not query.get("type"):
        raise ClientError(HTTPStatus.BAD_REQUEST, "type is missing: /api/series?type=StepCount")
    grain = query.get("grain") or None
    if grain is not None and grain not in SERIES_GRAINS:
        raise ClientError(HTTPStatus.BAD_REQUEST, f"grain must be one of {', '.join(SERIES_GRAINS)}.")
    if query.get("format", "json") not in ("json", "csv"):
        raise ClientError(HTTPStatus.BAD_REQUEST, "format must be json or csv.")
    stat = query.get("stat") or None
    if stat is not None and stat not in SERIES_STATS:
        raise ClientError(HTTPStatus.BAD_REQUEST, f"stat must be one of {', '.join(SERIES_STATS)}.")
    view = _view(request)
    end = _instant(query["to"], "to", view.zone, end=True) if query.get("to") else _canonical(request.now)
    # By default the status page's 30 days: today and the 29 before.
    start = (_instant(query["from"], "from", view.zone) if query.get("from") else view.zone.midnight(
        view.zone.today(request.now) - datetime.timedelta(days=29)))
    if start >= end:
        raise ClientError(HTTPStatus.BAD_REQUEST, "from must be before to.")
    try:
        found = series_points(_totals(request), query["type"], view, start, end, grain, stat)
    except ValueError as exc:
        raise ClientError(HTTPStatus.BAD_REQUEST, f"{exc}.") from None
    if found is None:
        with _store(request).reader() as conn:
            known = known_type_names(conn)
        raise ClientError(HTTPStatus.NOT_FOUND, f"No samples of type {log_safe(query['type'], 80)}; the types "
                                                f"stored: {log_safe(known, 1000)}.")
    info, unit, points = found
    if query.get("format") == "csv":
        return Answer("text/csv; charset=utf-8", csv_pieces(("time", "value"), [point[:2] for point in points]),
                      headers=(("Content-Disposition", f'attachment; filename="{quote(info.name)}.csv"'),))
    return json_answer([dict(time=point.time, value=point.value, **({} if point.days is None else {
        "days": point.days, "partial": point.partial})) for point in points],
                       headers=(("X-Health-Type", quote(info.type)), ("X-Health-Unit", quote(unit or ""))))


#: Everything the receiver answers.  A pattern's ``<name>`` is the rest of
#: the path; patterns are tried in this order, after exact paths.
ROUTES = (
    Route("GET", "/", PAGE_LOGIN, status_page, "the status page"),
    Route("GET", SUMMARY_PATH, PAGE_LOGIN, status_json, "the status page's JSON"),
    Route("GET", TYPE_PAGES + "<name>.csv", PAGE_LOGIN, type_csv, "a type's CSV download"),
    Route("GET", TYPE_PAGES + "<name>", PAGE_LOGIN, type_page, "the type pages"),
    Route("GET", WORKOUT_PAGES + "<uuid>", PAGE_LOGIN, workout_page, "the workout pages"),
    Route("GET", FIELDS_PATH, PAGE_LOGIN, fields_page, "what the app sends"),
    Route("GET", METRICS_PATH, PAGE_LOGIN, metrics_answer, "metrics for Prometheus"),
    Route("GET", LATEST_PATH, PAGE_LOGIN, latest_answer, "the latest values, for Home Assistant"),
    Route("GET", SERIES_PATH, PAGE_LOGIN, series_answer, "a type's numbers per period, for Grafana"),
    Route("GET", ENDPOINT, APP_KEY, connection_check, "the app's Test Connection"),
    Route("POST", ENDPOINT, APP_KEY, receive_sync, "the app's syncs"),
)


# -- The server: HealthReceiverServer, TLS ----------------------------------

class HealthReceiverServer(ThreadingHTTPServer):
    """The HTTP server: owns the config, the store, the sync workflow and
    the route table."""

    daemon_threads = True
    allow_reuse_address = True
    #: Connections the kernel queues before they are accepted (the standard
    #: library's 5 resets clients in a burst); the kernel caps it at its own
    #: maximum (net.core.somaxconn on Linux).
    request_queue_size = 1024

    def __init__(self, config, store=None, bind_and_activate=True, routes=None):
        self.config = config
        self.store = store or Store(config.db, tmp_dir=config.tmp_dir, clock=config.clock)
        if config.source_priority:
            self.store.use_source_priority(config.source_priority)
        self.intake = SyncIntake(self.store, config.archive, self.log_error_line, config.max_tmp)
        self.notifier = self.gaps = None
        if config.notify_url:
            self.notifier = Notifier(config.notify_url, NOTICE_FORMATS_BY_NAME[config.notify_format], self.log_line)
            self.gaps = GapWatch(self.store, self.notifier, Zone(config.utc), config.clock, self.log_line)
        self.backups = None
        if config.backup_dir and config.backup_every:
            self.store.backup_dir = config.backup_dir
            self.backups = BackupSchedule(config.db, config.backup_dir, config.backup_every, config.backup_keep,
                                          self.log_line, self.notice_backup_failed, config.clock)
        #: Whom a request is when the receiver runs without a key.
        self.owner = OWNER
        self.guesses = GuessThrottle()
        self.refusals = RefusalLog()
        #: Accepting failed for want of file descriptors (logged once per episode).
        self._out_of_files = False
        #: Peers that sent forwarding headers without being trusted (said once each).
        self._untrusted_proxies = set()
        #: ROUTES with the endpoint's path (refused when a route has it).
        self.routes = routes or RouteTable(ROUTES, config.path)
        self._log_lock = threading.Lock()
        self._in_flight = 0
        self._idle = threading.Condition()
        self.ssl_context = None
        if config.tls_cert:
            self.ssl_context = make_ssl_context(config.tls_cert, config.tls_key)
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), HealthRequestHandler, bind_and_activate)

    def keyless(self):
        """Whether requests need no key: the receiver has none of its own
        and its owner (whom a request without a key is taken to be) has
        none either.  Read at each request: once people key gives the owner
        a key, even while the receiver runs, their key is needed."""
        if self.config.keys.required:
            return False
        owner = self.store.person(person_id=self.owner.person)
        return owner is not None and not owner.has_key

    def identity_of_key(self, key):
        """The Identity of the person whose own key ``key`` is, or None."""
        person = self.store.person_of_key(key)
        return None if person is None else Identity(person.name, person.id, hash_key(key))

    def server_bind(self):
        # HTTPServer.server_bind would look the address up in DNS (getfqdn):
        # slow or hanging on a machine without a resolver, and never needed.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def serve_forever(self, poll_interval=0.5):
        services = [service for service in (self.backups, self.notifier, self.gaps) if service is not None]
        for service in services:
            service.start()
        try:
            super().serve_forever(poll_interval)
        finally:
            for service in reversed(services):
                service.stop()

    def log_line(self, line, error):
        """A line of the receiver's own (no request): an error, or news."""
        if error:
            self.log_error_line(None, line)
        else:
            self.log_request_line(None, line)

    def notice_backup_failed(self, reason):
        if self.notifier is not None:
            self.notifier.send(Notice("backup_failed", "A backup failed", f"The backup into "
                                      f"{self.config.backup_dir} failed: {reason}", _canonical(self.config.clock())))

    def get_request(self):
        try:
            request = super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # The listening socket stays readable: without a pause the
                # loop would spin at full speed until a connection closes.
                if not self._out_of_files:
                    self.log_error_line("-", f"too many open files ({exc.strerror}): accepting paused until "
                                             "connections close; raise the limit (ulimit -n, LimitNOFILE=)")
                self._out_of_files = True
                time.sleep(ACCEPT_PAUSE)
            raise
        self._out_of_files = False
        return request

    def finish_request(self, request, client_address):
        if self.ssl_context is not None:
            # In the request's own thread: a slow client holds up no one.
            request.settimeout(self.config.timeout)
            try:
                if request.recv(1, socket.MSG_PEEK) not in (b"\x16", b""):  # not a TLS handshake: plain HTTP?
                    self._refuse_plain_http(request, client_address)
                    return
                tls = self.ssl_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.log_error_line(client_address[0], f"TLS handshake failed: {exc}")
                return
            with tls:  # it took over the connection from ``request``
                super().finish_request(tls, client_address)
            return
        super().finish_request(request, client_address)

    def _refuse_plain_http(self, sock, client_address):
        """Answer plain HTTP sent to the HTTPS port in words a person reads
        (as nginx does), then close."""
        message = json.dumps({"ok": False, "error": "This port speaks HTTPS: use https:// in the URL."})
        with contextlib.suppress(OSError):
            sock.sendall((f"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: "
                          f"{len(message) + 1}\r\nConnection: close\r\n\r\n{message}\n").encode())
        self.log_refusal(client_address[0], "plain HTTP sent to the HTTPS port -> 400")

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

    @property
    def ingests_in_progress(self):
        """Syncs being received or stored now."""
        return self._in_flight

    def _write_log(self, line):
        stream = self.config.log_stream or sys.stderr
        line = f"{_canonical(self.config.clock())} {line}\n".encode("utf-8", "backslashreplace").decode("utf-8")
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

    def note_untrusted_proxy(self, peer):
        """Say once per peer how to let the receiver tell clients apart
        behind a proxy (the set is bounded: peers that forward are few)."""
        if peer not in self._untrusted_proxies and len(self._untrusted_proxies) < 64:
            self._untrusted_proxies.add(peer)
            self.log_error_line(peer, f"requests from {peer} carry forwarding headers (a proxy?); they are ignored. "
                                      f"If it is your proxy, start with --trusted-proxy {peer} so that its clients "
                                      "are told apart (limits, --no-auth pages)")

    def log_refusal(self, remote, line):
        """A line about a request refused for the client's fault, within
        the refusal log's rate."""
        for shown in self.refusals.lines(line):
            self.log_error_line(remote, shown)

    def handle_error(self, request, client_address):
        self.log_error_line(client_address[0] if client_address else "-",
                            "unexpected error:\n" + traceback.format_exc().rstrip())


_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]+)-----END CERTIFICATE-----")
#: DER object identifiers (content bytes) of the names a certificate holds.
_SUBJECT_ALT_NAME_OID = b"\x55\x1d\x11"
_COMMON_NAME_OID = b"\x55\x04\x03"
#: DER tags: SEQUENCE, OCTET STRING, [3] extensions; a name's dNSName, iPAddress.
_DER_SEQUENCE, _DER_OCTETS, _DER_EXTENSIONS, _DER_DNS, _DER_IP = 0x30, 0x04, 0xA3, 0x82, 0x87


def _der_items(data, start=0, end=None):
    """(tag, content) of each DER element in ``data[start:end]``."""
    end = len(data) if end is None else end
    while start + 2 <= end:
        tag, length = data[start], data[start + 1]
        start += 2
        if length & 0x80:
            count = length & 0x7F
            length = int.from_bytes(data[start:start + count], "big")
            start += count
        yield tag, data[start:start + length]
        start += length


def certificate_names(path):
    """The host names and addresses the first certificate of the PEM file
    ``path`` is valid for: its subjectAltName entries, or else its subject's
    common name; [] when the file cannot be read as such.  (The ssl module
    reads a certificate's names only from a peer.)"""
    try:
        with open(path, "rb") as handle:
            found = _PEM_CERTIFICATE.search(handle.read(1024 * 1024))
        certificate = next(_der_items(base64.b64decode(found.group(1))))[1]
        fields = list(_der_items(next(_der_items(certificate))[1]))
        if fields[0][0] == 0xA0:  # [0] version, absent in version 1
            del fields[0]
        names, common = [], []
        for tag, content in fields:
            if tag != _DER_EXTENSIONS:
                continue
            for _tag, extension in _der_items(next(_der_items(content))[1]):
                parts = list(_der_items(extension))
                if parts[0][1] == _SUBJECT_ALT_NAME_OID and parts[-1][0] == _DER_OCTETS:
                    for kind, name in _der_items(next(_der_items(parts[-1][1]))[1]):
                        if kind == _DER_DNS:
                            names.append(name.decode("ascii"))
                        elif kind == _DER_IP and len(name) in (4, 16):
                            names.append(str(ipaddress.ip_address(name)))
        for _set_tag, attributes in _der_items(fields[4][1]):  # the subject
            for _tag, attribute in _der_items(attributes):
                oid, value = list(_der_items(attribute))[:2]
                if oid[1] == _COMMON_NAME_OID:
                    common.append(value[1].decode("utf-8"))
        return names or common
    except (OSError, AttributeError, StopIteration, IndexError, ValueError, TypeError):
        return []


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
# Command line: serve, stats, export, import, backup, verify, restore: COMMANDS
# ---------------------------------------------------------------------------

# -- serve: the start, its banner, the key, the flags -----------------------

#: Environment variable holding the key the app sends.
TOKEN_ENV = "HEALTH_RECEIVER_TOKEN"
#: Environment variable naming the trusted proxies (as --trusted-proxy).
TRUSTED_PROXY_ENV = "HEALTH_RECEIVER_TRUSTED_PROXY"
#: Where notices go, when --notify is not given (a URL may hold a secret:
#: in the environment it stays out of `ps`).
NOTIFY_ENV = "HEALTH_RECEIVER_NOTIFY"
#: Suffix of the key file created beside a new database.
KEY_FILE_SUFFIX = ".key"
#: Bits of a generated key.
KEY_BITS = 192
#: Characters below which a key chosen by hand is warned about (128 bits
#: of base64).
KEY_CHARACTERS_MIN = 22
#: Seconds a stop waits for the syncs in flight to be stored and answered
#: (a service manager kills after 90 s by default; Docker after 10).
SHUTDOWN_WAIT = 30


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


def banner_lines(config, port, terminal=False):
    """What startup prints: where to listen, what to type into the app.  A
    new key is shown only on a ``terminal``: printed elsewhere (a service's
    journal, a file) it would stay there."""
    scheme = "https" if config.tls_cert else "http"
    host = config.host
    shown_host = f"[{host}]" if ":" in host else host
    lines = [f"Listening on {scheme}://{shown_host}:{port}"]
    if host in ("0.0.0.0", "::", ""):
        urls = [f"{scheme}://{addr}:{port}" for addr in local_addresses()]
        urls = urls or [f"{scheme}://127.0.0.1:{port}"]
    else:
        urls = [f"{scheme}://{shown_host}:{port}"]
    if config.tls_cert:
        # The app checks the certificate against the URL's host: only the
        # names it was made for work.
        names = certificate_names(config.tls_cert)
        usable = [f"https://{f'[{name}]' if ':' in name else name}:{port}" for name in names if "*" not in name]
        if usable:
            urls = usable
        lines.append(f"Certificate made for: {', '.join(names) if names else 'no name found in ' + config.tls_cert}"
                     + ("" if usable else " (the app accepts only a URL with one of its names)"))
    if config.public_url:
        lines.append(f"Behind a proxy or tunnel: the app reaches this receiver at {config.public_url}")
        urls = [config.public_url]
    lines.append("Server URL for Health Export Pro: " + "  or  ".join(urls))
    lines.append(f"Endpoint Path: {config.path}")
    if config.keys.required:
        if config.keys.header:
            lines.append(f"Auth Type: Custom Header, header name {config.keys.header} (key from {config.key_source})")
        else:
            lines.append(f"Auth Type: Bearer (key from {config.key_source})")
        if config.new_key and terminal:
            lines.append(f"Key: {config.new_key}")
            lines.append(f"  A new key, shown this once: in the app choose Auth Type Bearer and enter it. It is "
                         f"saved in {config.key_source[len('file '):]} (readable only by you); later starts "
                         f"read it from there. A browser asks for it on the status page (any user name).")
        elif config.new_key:
            lines.append(f"  A new key was made and saved in {config.key_source[len('file '):]} (readable only by "
                         f"you); `health_receiver.py key --db {config.db}` prints it. In the app choose Auth Type "
                         "Bearer and enter it.")
    elif config.own_keys_only:
        lines.append("Auth Type: Bearer (each person's own key; this receiver has no key of its own)")
    else:
        lines.append("Auth Type: None" + (" (--no-auth)" if config.no_auth else ""))
        if not is_loopback(host):
            lines.append("WARNING: no key is set, so anyone who can reach this port can post data (the status "
                         "page answers only this machine).")
    lines.extend(config.warnings)
    if config.path != "/":
        lines.append(f"Status page: {urls[0]}/ (in a browser)")
    lines.append(f"Database: {os.path.abspath(config.db)}")
    if config.trusted_proxies:
        lines.append("Trusted proxies (their forwarding headers name the client): "
                     + ", ".join(str(network) for network in config.trusted_proxies.networks))
    if config.backup_dir:
        key_file = (f"; keep the key file {config.key_source[len('file '):]} as well"
                    if (config.key_source or "").startswith("file ") else "")
        lines.append(f"Backups: every {config.backup_every / 3600:g} h into {os.path.abspath(config.backup_dir)}, "
                     f"the newest {config.backup_keep} kept{key_file}")
    if config.notify_url:
        lines.append(f"Notices: to {notice_destination(config.notify_url)} ({config.notify_format})")
    if config.archive:
        lines.append(f"Archive: {os.path.abspath(config.archive)}")
    return lines


def serve(config, out=None, ready=None):
    """Run the receiver until SIGINT/SIGTERM (or ``ready``'s server is shut down).

    ``ready``, if given, is called with the server once it listens.  Returns
    the exit code.
    """
    out = out or sys.stdout
    try:
        with database_lock(config.db):  # from before the upgrade to after the last commit
            return _serve(config, out, ready)
    except UsageError as exc:
        print(f"error: {log_safe(exc)}", file=sys.stderr)
        return exc.exit_status


def _serve(config, out, ready):
    store = Store(config.db, tmp_dir=config.tmp_dir, backup_dir=config.backup_dir, clock=config.clock)
    try:
        store.open(report=lambda line: print(line, file=out, flush=True), first_person=config.person)
        if config.source_priority:
            store.use_source_priority(config.source_priority, lambda line: print(line, file=out, flush=True))
        owner = _person_named(store, config.person) if config.person else store.first_person()
        if not config.keys.required:
            refusal = keyless_refusal(store, config, owner)
            if refusal:
                raise Missing(refusal)
            config.own_keys_only = owner.has_key
            warning = keyless_warning(config, owner)
            if warning:
                config.warnings = (*config.warnings, warning)
        _keep_what_this_start_uses(store, config)
        config.keys = config.keys.owned_by(Identity(owner.name, owner.id))
        server = HealthReceiverServer(config, store)
        server.owner = Identity(owner.name, owner.id)
    except StorageUnavailable as exc:
        print(f"error: {log_safe(exc)}", file=sys.stderr)
        return 1
    except UsageError as exc:
        print(f"error: {log_safe(exc)}", file=sys.stderr)
        return exc.exit_status
    except OSError as exc:
        print(f"error: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1

    def stop(signum, frame):
        if stopping:  # the second: at once (WAL and synchronous=FULL keep the database whole)
            print("Stopped at once; a sync in progress was not stored (the app sends it again).", file=out,
                  flush=True)
            os._exit(128 + signum)
        stopping.append(signum)
        print(f"Stopping: {server.ingests_in_progress} sync(s) in progress get up to {SHUTDOWN_WAIT} s to be "
              f"stored and answered; stop again to stop at once.", file=out, flush=True)
        threading.Thread(target=server.shutdown, daemon=True).start()

    stopping = []

    # Installed before the banner: whoever reads it may stop the server at once.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, stop)
    try:
        if store.damage:
            print(f"WARNING: {store.damage}", file=out)
        for line in banner_lines(config, server.server_address[1], terminal=hasattr(out, "isatty") and out.isatty()):
            print(line, file=out)
        out.flush()
        if ready is not None:
            ready(server)
        give_back_memory()  # what compiling this file and opening the database took
        server.serve_forever(poll_interval=0.25)
    finally:
        try:
            server.server_close()  # no new connections
            server.wait_idle(SHUTDOWN_WAIT)  # the POST in flight is stored and answered
            store.close()  # and anything still running after that waits for its commit
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    if not config.quiet:
        print("Stopped; database closed.", file=out)
    return 0


def read_token(token_file, environ):
    """The key from --token-file or the environment, and where it came from."""
    if token_file:
        return _read_key_file(token_file), f"file {token_file}"
    token = (environ.get(TOKEN_ENV) or "").strip()
    return (token, "environment variable " + TOKEN_ENV) if token else (None, None)


def _read_key_file(path, own=False):
    """The key in a file; with ``own`` (the key file beside the database,
    found rather than named), only from a regular file of the user running
    the receiver: a link or someone else's file could choose the key."""
    if own:
        with contextlib.suppress(OSError):
            found = os.lstat(path)
            if stat.S_ISLNK(found.st_mode) or not stat.S_ISREG(found.st_mode):
                raise UsageError(f"{path} is not a regular file (a link?); the key file must be a file of its own")
            if hasattr(os, "getuid") and found.st_uid != os.getuid():
                raise UsageError(f"{path} belongs to another user; the key file must be yours (chown it, or "
                                 "remove it to get a new key)")
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the token file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not token:
        raise UsageError(f"the token file {path} is empty")
    return token


def check_key(token):
    """Refuse a key some clients cannot send: it must be printable ASCII."""
    if not (token.isascii() and token.isprintable()) or " " in token:
        raise UsageError("the key must be printable ASCII without spaces (some HTTP clients cannot send "
                         "other characters in a header)")


def key_file_warning(path):
    """A warning when users other than the owner can read a key file."""
    with contextlib.suppress(OSError):
        if os.name == "posix" and os.stat(path).st_mode & 0o077:
            return f"WARNING: {path} can be read by other users of this machine; run: chmod 600 {path}"
    return None


def find_key(token_file, environ, db):
    """(key, where it came from) from --token-file, then the environment,
    then <db>.key; (None, None) when none holds one."""
    token, source = read_token(token_file, environ)
    key_path = db + KEY_FILE_SUFFIX
    if token is None and os.path.lexists(key_path):
        token, source = _read_key_file(key_path, own=True), f"file {key_path}"
    return token, source


def resolve_key(args, environ):
    """(key, where it came from, whether it was made now, warnings).

    The key comes from --token-file, then $HEALTH_RECEIVER_TOKEN, then
    <db>.key.  A new database gets a random key, saved there (mode 0600).
    Without one, an existing database starts only if it holds no syncs yet
    (see keyless_refusal); --no-auth runs without a key on purpose.
    """
    if args.no_auth:
        return None, None, False, ()
    token, source = find_key(args.token_file, environ, args.db)
    key_path = args.db + KEY_FILE_SUFFIX
    generated = False
    if token is None and not os.path.exists(args.db) and os.path.isdir(os.path.dirname(os.path.abspath(args.db))):
        token = secrets.token_urlsafe(KEY_BITS // 8)
        try:
            fd = os.open(key_path, _NEW_FILE, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(token + "\n")
        except OSError as exc:
            raise UsageError(f"cannot save a new key in {key_path}: {exc.strerror}") from None
        source, generated = f"file {key_path}", True
    if token is None:  # keyless_refusal and keyless_warning decide, knowing the database
        return None, None, False, ()
    check_key(token)
    warnings = [key_file_warning(args.token_file or key_path) if source.startswith("file") else None]
    if len(token) < KEY_CHARACTERS_MIN:
        warnings.append(f"WARNING: the key has {len(token)} characters; one you choose should be random and at least "
                        f"{KEY_CHARACTERS_MIN} characters long (as a new one is: python3 -c 'import secrets; "
                        "print(secrets.token_urlsafe(24))'), or guessing it is only slow, not hopeless.")
    return token, source, generated, tuple(warning for warning in warnings if warning)


def keyless_refusal(store, config, owner):
    """Why the receiver, which found no key of its own, must not run
    without one, or None.  When ``owner``, whom a request without a key
    would be, has a key of their own, each person's own key lets them in:
    None.  Otherwise refused: a database whose people have keys, --no-auth
    or not (anyone could post as ``owner``); and without --no-auth, one
    that ran with a key of the receiver's or already holds syncs (a backup
    restored without its key file: a version before the mark of a key kept
    none, so syncs are the sign that it was in use)."""
    if owner.has_key:
        return None
    keyed = [person.name for person in store.people() if person.has_key]
    key_path = config.db + KEY_FILE_SUFFIX
    if keyed:
        used = f"people with keys of their own: {', '.join(keyed[:5])}{', ...' if len(keyed) > 5 else ''}"
        return (f"{config.db} has been used with keys ({used}), but no key of the receiver's was found for "
                f"{owner.name} (in --token-file, ${TOKEN_ENV} or {key_path}), and such a database never runs "
                f"without one, --no-auth or not (anyone could post as {owner.name}). Put the key the app sends "
                f"into {key_path} (chmod 600; the app's REST API settings show it), or give {owner.name} a new key "
                f"to enter in the app: python3 health_receiver.py people key {owner.name} --db {config.db}")
    if config.no_auth:
        return None
    if store.setting(RECEIVER_KEY_SETTING):
        used = "it has run with a key of the receiver's"
    elif store.holds_syncs():
        used = "it holds syncs already"
    else:
        return None
    return (f"{config.db} was in use ({used}), but no key was found (in --token-file, ${TOKEN_ENV} or "
            f"{key_path}), so the receiver does not start: it would take syncs from anyone. Put the key file back "
            f"as {key_path} (chmod 600; the app's REST API settings show the key) or set ${TOKEN_ENV}; or start "
            f"with --no-auth to run without a key on purpose.")


def keyless_warning(config, owner):
    """The banner's warning for a start without a key of the receiver's
    that takes syncs without any key (not --no-auth, which says so, nor
    one whose owner has a key of their own, where requests need one), or
    None."""
    if config.keys.required or config.no_auth or owner.has_key:
        return None
    return (f"WARNING: no key was found, so this receiver takes syncs without one. To require a key: put one in "
            f"{config.db + KEY_FILE_SUFFIX} (chmod 600) or in ${TOKEN_ENV}, then set Auth Type Bearer in the app.")


def _keep_what_this_start_uses(store, config):
    """Keep in the database that the receiver runs with a key of its own
    (see keyless_refusal) and where it archives (people remove finds the
    bodies there); not in a damaged one, which takes no more writes."""
    with contextlib.suppress(StorageUnavailable):
        if config.archive:
            store.keep_setting(ARCHIVE_SETTING, os.path.abspath(config.archive))
        if config.keys.required:
            store.keep_setting(RECEIVER_KEY_SETTING, "used")


def _positive_number(text):
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


def _host_names(text):
    """--allowed-host: comma-separated names, as the Host header names them."""
    return tuple(host_name(name) for name in text.split(",") if name.strip())


def _source_words(text):
    """--source-priority: comma-separated words, matched in any case."""
    words = tuple(word.strip().lower() for word in text.split(",") if word.strip())
    if not words:
        raise argparse.ArgumentTypeError("give at least one word, such as Watch")
    return words


def serve_parser():
    parser = argparse.ArgumentParser(
        prog="health_receiver.py [serve]",
        description="Receive Health Export Pro syncs into a SQLite database.",
        epilog="Other commands (each with --help): " + ", ".join(name for name in COMMANDS if name != "serve")
               + f". The key comes from ${TOKEN_ENV}, --token-file or <db>.key (made for a new database); "
               "people add NAME gives another person a key of their own. With the key: "
               + "; ".join(f"{route.path} ({route.title})" for route in ROUTES if route.path != ENDPOINT) + ".")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (default %(default)s; 0 picks one)")
    parser.add_argument("--path", default=DEFAULT_PATH, help="endpoint path, as set in the app (default %(default)s)")
    parser.add_argument("--db", default=DEFAULT_DB, help="SQLite database file (default %(default)s)")
    parser.add_argument("--token-file", metavar="PATH", help="read the key from this file instead of $" + TOKEN_ENV
                        + " or <db>.key")
    parser.add_argument("--no-auth", action="store_true",
                        help="run without a key (by default a new database gets one, in <db>.key)")
    parser.add_argument("--auth-header", metavar="NAME", type=_header_name,
                        help="take the key from this header (e.g. X-API-Key) instead of 'Authorization: Bearer'")
    parser.add_argument("--max-body-mb", type=_positive_number, default=DEFAULT_MAX_BODY_MB, metavar="MB",
                        help="largest accepted body in MiB, after decompression (default %(default)s)")
    parser.add_argument("--timeout", type=_positive_number, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="close connections idle this long (default %(default)s)")
    parser.add_argument("--tmp-dir", metavar="DIR", help="where syncs wait while their body arrives (default: "
                                                         "the database's folder)")
    parser.add_argument("--max-tmp-mb", type=_positive_number, default=DEFAULT_MAX_TMP_MB, metavar="MB",
                        help="temporary disk that syncs being received may take together; past it, 503 "
                             "(default %(default)s)")
    # Version 1.0 held bodies in memory and limited how many; the flag is
    # still accepted so that existing service files keep working.
    parser.add_argument("--max-ingests", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tls-cert", metavar="PATH", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", metavar="PATH", help="private key for --tls-cert (PEM)")
    parser.add_argument("--archive", metavar="DIR",
                        help="also save every accepted body as DIR/<time>-<sync id>.json.gz")
    parser.add_argument("--utc", action="store_true", help="status page days are UTC days, not this machine's")
    parser.add_argument("--source-priority", metavar="WORDS", type=_source_words, default=None,
                        help="where sources counted the same time (steps, energy, sleep...), those whose names hold "
                             "these comma-separated words count first, in this order, after data entered by hand "
                             "(default: Watch,iPhone; the database keeps the last words given, and the totals are "
                             "merged again when they change)")
    parser.add_argument("--trusted-proxy", metavar="ADDR[,ADDR...]",
                        help="proxies (addresses or networks) whose --proxy-header names the client "
                             f"(default ${TRUSTED_PROXY_ENV}, else none)")
    parser.add_argument("--proxy-header", metavar="NAME", type=_header_name, default=DEFAULT_PROXY_HEADER,
                        help="the one header the trusted proxy sets to the client's address, whose last hop that "
                             "is no trusted proxy is the client (default %(default)s; Forwarded: RFC 7239's for=); "
                             "any other forwarding header is the client's own word, ignored")
    parser.add_argument("--allowed-host", metavar="NAME[,NAME...]", type=_host_names, default=(),
                        help="with --no-auth, names (Host) besides localhost and the loopback addresses that the "
                             "pages and the app's endpoint answer to (the endpoint also to any IP address: a .local "
                             "or DNS name of the app's needs this; default: none)")
    parser.add_argument("--backup-dir", metavar="DIR", help="make backups here while serving (with --backup-every)")
    parser.add_argument("--backup-every", type=_positive_number, metavar="HOURS",
                        help="hours between backups into --backup-dir (24 is a good choice)")
    parser.add_argument("--backup-keep", type=int, default=DEFAULT_BACKUP_KEEP, metavar="N",
                        help="backups kept in --backup-dir, the oldest removed (default %(default)s)")
    parser.add_argument("--person", metavar="NAME", help="the person the receiver's key belongs to (default: the "
                                                          "first person; a new database's first person gets this "
                                                          "name, else me)")
    _add_notify_arguments(parser)
    parser.add_argument("--public-url", metavar="URL", type=_public_url,
                        help="the URL the phone reaches this receiver at, behind a proxy or tunnel "
                             "(https://health.example.com): the banner gives it as the app's Server URL")
    parser.add_argument("--quiet", action="store_true", help="log only errors")
    return parser


def _public_url(text):
    """--public-url: an http(s) URL with a host, without query; no trailing /."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError("give the URL the app uses, such as https://health.example.com")
    return text.strip().rstrip("/")


def _add_notify_arguments(parser):
    parser.add_argument("--notify", metavar="URL", help="send a notice here when data stops arriving (no sync, a "
                                                        "device or a type stopped, last night's sleep missing), when "
                                                        "it comes back, and when a backup fails (default "
                                                        f"${NOTIFY_ENV}, which keeps a secret URL out of ps)")
    parser.add_argument("--notify-format", choices=[kind.name for kind in NOTICE_FORMATS],
                        default=NOTICE_FORMATS[0].name,
                        help="what --notify's URL is: " + "; ".join(f"{kind.name}, {kind.url}"
                                                                     for kind in NOTICE_FORMATS)
                             + " (default %(default)s)")


def notify_url(args, environ):
    """--notify's URL (or the environment's), checked; None when neither."""
    url = args.notify or environ.get(NOTIFY_ENV) or None
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError("--notify takes an http:// or https:// URL with a host")  # not echoed: it may be secret
    return url


def config_from_args(args, environ):
    """A ReceiverConfig from serve's arguments; raises UsageError."""
    if args.no_auth and args.token_file:
        raise UsageError("--no-auth and --token-file contradict each other")
    if args.tls_key and not args.tls_cert:
        raise UsageError("--tls-key needs --tls-cert")
    if args.tmp_dir and not os.path.isdir(args.tmp_dir):
        raise UsageError(f"--tmp-dir {args.tmp_dir} is not a folder")
    if bool(args.backup_dir) != bool(args.backup_every):
        raise UsageError("--backup-dir and --backup-every go together")
    if args.backup_keep < 1:
        raise UsageError("--backup-keep must be 1 or more")
    if args.backup_dir and not os.path.isdir(args.backup_dir):
        raise UsageError(f"--backup-dir {args.backup_dir} is not a folder")
    RouteTable(ROUTES, endpoint_path(args.path))  # refuses a path another route has
    proxies = TrustedProxies.parse(args.trusted_proxy or environ.get(TRUSTED_PROXY_ENV), args.proxy_header)
    token, source, generated, warnings = resolve_key(args, environ)  # last: it may create the key file
    config = ReceiverConfig(host=args.host, port=args.port, path=args.path, db=args.db,
                            keys=Keys.single(token, args.auth_header), max_body=int(args.max_body_mb * MIB),
                            quiet=args.quiet, timeout=args.timeout, tmp_dir=args.tmp_dir,
                            max_tmp=int(args.max_tmp_mb * MIB),
                            tls_cert=args.tls_cert, tls_key=args.tls_key, key_source=source,
                            new_key=token if generated else None, no_auth=args.no_auth, warnings=warnings,
                            archive=args.archive, utc=args.utc, trusted_proxies=proxies,
                            allowed_hosts=args.allowed_host,
                            source_priority=args.source_priority, backup_dir=args.backup_dir,
                            backup_every=args.backup_every * 3600 if args.backup_every else None,
                            backup_keep=args.backup_keep, person=args.person,
                            notify_url=notify_url(args, environ), notify_format=args.notify_format,
                            public_url=args.public_url)
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


# -- Other commands: key, people, stats, export, import, backup, verify, restore, notify --

#: File names ``import`` picks up when given a folder.
IMPORT_SUFFIXES = (".json", ".json.gz", ".ndjson", ".ndjson.gz", ".jsonl", ".jsonl.gz")


def _existing_store(path):
    if not os.path.exists(path):
        raise Missing(f"no database at {path}")
    return Store(path)


def key_parser():
    parser = argparse.ArgumentParser(prog="health_receiver.py key",
                                     description="Print the key the receiver takes (from --token-file, "
                                                 f"${TOKEN_ENV} or <db>.key), to enter it in the app.")
    parser.add_argument("--db", default=DEFAULT_DB, help="SQLite database file (default %(default)s)")
    parser.add_argument("--token-file", metavar="PATH", help="the key file the receiver is started with, if any")
    return parser


def run_key(args, out):
    token, _source = find_key(args.token_file, args.environ, args.db)
    if token is None:
        raise Missing(f"no key: neither ${TOKEN_ENV} nor {args.db + KEY_FILE_SUFFIX} holds one (the receiver "
                      "runs without a key)")
    print(token, file=out)
    return 0


def notify_parser():
    parser = argparse.ArgumentParser(prog="health_receiver.py notify",
                                     description="Send a test notice where the receiver sends them (--notify, or "
                                                 f"${NOTIFY_ENV}), and say whether it arrived.")
    parser.add_argument("action", choices=["test"], help="test: send one notice now")
    _add_notify_arguments(parser)
    return parser


def run_notify(args, out):
    url = notify_url(args, args.environ)
    if url is None:
        raise UsageError(f"where to? give --notify URL or set ${NOTIFY_ENV}")
    notice = Notice("test", "Health receiver: a test notice",
                    "Notices from the health receiver arrive here: when data stops, when it comes back, and when "
                    "a backup fails.", utc_now())
    error = post_notice(url, NOTICE_FORMATS_BY_NAME[args.notify_format], notice)
    if error is not None:
        print(f"FAILED: the notice was not delivered: {error}", file=out)
        return 1
    print(f"Sent to {notice_destination(url)} ({args.notify_format}).", file=out)
    return 0


def new_key():
    """A new random key (KEY_BITS of them, URL-safe)."""
    return secrets.token_urlsafe(KEY_BITS // 8)


def people_parser():
    parser = argparse.ArgumentParser(prog="health_receiver.py people",
                                     description="The people whose data the receiver keeps apart, each with a key "
                                                 "of their own (stored only as its SHA-256).")
    parser.add_argument("--db", default=DEFAULT_DB, help="SQLite database file (default %(default)s)")
    commands = parser.add_subparsers(dest="action", metavar="ACTION")
    commands.required = True
    add = commands.add_parser("add", help="add a person and print their new key (once)")
    add.add_argument("name", metavar="NAME", nargs="?")
    add.add_argument("--admin", action="store_true", help="may read everyone's pages")
    add.add_argument("--many", type=int, metavar="N", help="add N people named PREFIX1.. and print a CSV of "
                                                           "names and keys to hand out")
    add.add_argument("--prefix", default="p", help="the names' prefix with --many (default %(default)s)")
    add.add_argument("--output", metavar="FILE", help="with --many: write the CSV into this new file, readable "
                                                       "only by you, instead of standard output")
    add.add_argument("--db", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    listing = commands.add_parser("list", help="name, created, last sync, rows")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.add_argument("--db", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    key = commands.add_parser("key", help="issue a new key for a person; the old one stops working")
    key.add_argument("name", metavar="NAME")
    key.add_argument("--db", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    rename = commands.add_parser("rename", help="give a person another name")
    rename.add_argument("name", metavar="NAME")
    rename.add_argument("new_name", metavar="NEW_NAME")
    rename.add_argument("--db", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    remove = commands.add_parser("remove", help="remove a person (refused while they have data)")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--delete-data", action="store_true", help="delete their data with them, in one "
                                                                   "transaction, after a confirmation")
    remove.add_argument("--yes", action="store_true", help="confirm --delete-data without asking")
    remove.add_argument("--db", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _people_store(db):
    store = Store(db)
    store.open(report=lambda line: print(line, file=sys.stderr, flush=True))
    return store


def _people_add(store, args, out):
    if args.many is not None:
        if args.name or not 1 <= args.many <= 10000:
            raise UsageError("--many takes a count from 1 to 10000 and no NAME")
        taken = {person.name for person in store.people()}
        names, number = [], 0
        while len(names) < args.many:
            number += 1
            if f"{args.prefix}{number}" not in taken:
                names.append(f"{args.prefix}{number}")
    elif args.name:
        names = [args.name]
    else:
        raise UsageError("people add needs a NAME (or --many N)")
    if args.output and args.many is None:
        raise UsageError("--output goes with --many")
    target = None
    if args.output:  # created before anyone is added: a file that exists is refused, nothing done
        try:
            target = open(os.open(args.output, _NEW_FILE, 0o600), "w", encoding="utf-8", newline="")
        except OSError as exc:
            raise UsageError(f"cannot create {args.output}: {exc.strerror}") from None
    keys = [new_key() for _name in names]
    try:
        store.add_people(names, keys, admin=args.admin)
    except BaseException:
        if target is not None:
            target.close()
            os.unlink(args.output)
        raise
    if args.many is not None:
        with target or contextlib.nullcontext(out) as written:
            # Lines end in LF: a key copied from a CRLF line would take its
            # CR along into the app's header.
            writer = csv.writer(written, lineterminator="\n")
            writer.writerow(("name", "key"))
            writer.writerows(zip(names, keys))
        where = f"in {args.output} (readable only by you; delete it once they are handed out)" if args.output \
            else "above, shown only this once"
        print(f"{len(names)} people added; their keys are {where}: each goes into one phone's Health Export Pro "
              "(Auth Type Bearer).", file=sys.stderr)
        return 0
    print(f"Added {names[0]}{' (admin)' if args.admin else ''}. Their key, shown only this once: enter it in "
          "their phone's Health Export Pro (Auth Type Bearer) and as the password of the pages:", file=out)
    print(keys[0], file=out)
    return 0


def _times_note(zone):
    """What the commands' times are: this machine's local time, named."""
    return f"Times in this machine's time zone ({zone.name(datetime.datetime.now(datetime.timezone.utc))})."


def _people_list(store, args, out):
    rows = []
    with store.reader() as conn:
        for person in store.people():
            last = conn.execute(f"SELECT max(received_at) FROM main.{SYNCS.name} WHERE {PERSON_COLUMN} = ?"
                                f" AND status = '{SyncStatus.OK}'", (person.id,)).fetchone()[0]
            rows.append((person, last, store.person_rows(conn, person.id)))
    if args.json:
        json.dump([{"name": person.name, "admin": bool(person.admin), "has_key": bool(person.has_key),
                    "created_at": person.created_at, "last_sync": last, "rows": count}
                   for person, last, count in rows], out, indent=2)
        out.write("\n")
        return 0
    zone = Zone()
    print(_times_note(zone), file=out)
    print(f"{'Name':<24}{'Created':<18}{'Last sync':<18}{'Rows':>12}  Key", file=out)
    for person, last, count in rows:
        key = "own" if person.has_key else "the receiver's" if person is rows[0][0] else "none"
        print(f"{person.name:<24}{format_local(person.created_at, zone):<18}{format_local(last, zone) or '-':<18}"
              f"{count:>12,}  {key}{', admin' if person.admin else ''}", file=out)
    return 0


def _people_key(store, args, out):
    key = new_key()
    store.set_key(args.name, key)
    person = store.person(args.name)
    print(f"New key of {args.name}, shown only this once (their old key no longer works):", file=out)
    print(key, file=out)
    if person == store.first_person():
        print(f"The receiver's own key (<db>.key, ${TOKEN_ENV} or --token-file) still works for {args.name} too: "
              "to stop it, remove it there and restart the receiver.", file=sys.stderr)
    return 0


def _people_rename(store, args, out):
    archive = store.setting(ARCHIVE_SETTING)
    syncs = store.syncs_of(args.name) if archive else ()
    store.rename_person(args.name, args.new_name)
    if syncs and store.first_person().name != args.new_name:  # the first person's bodies carry no name
        rename_archived(archive, syncs, args.name, args.new_name)
    print(f"{args.name} is now {args.new_name}.", file=out)
    return 0


def _people_remove(store, args, out):
    if args.delete_data and not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("--delete-data deletes every row of theirs: confirm with --yes")
        answer = input(f"Delete {args.name} and all of their data? Type the name to confirm: ")
        if answer.strip() != args.name:
            print("Nothing deleted.", file=out)
            return 1
    archive = store.setting(ARCHIVE_SETTING) if args.delete_data else None
    syncs = store.syncs_of(args.name) if archive else ()
    rows = store.remove_person(args.name, delete_data=args.delete_data)
    print(f"Removed {args.name}" + (f" and {rows:,} rows of their data." if rows else "."), file=out)
    if syncs:
        removed = remove_archived(archive, syncs, args.name)
        print(f"Removed {removed:,} bodies of their syncs from the archive {archive}.", file=out)
    return 0


#: What ``people ACTION`` does.
PEOPLE_ACTIONS = {"add": _people_add, "list": _people_list, "key": _people_key, "rename": _people_rename,
                  "remove": _people_remove}


def run_people(args, out):
    if args.action != "add" and not os.path.exists(args.db):
        raise Missing(f"no database at {args.db}")
    with database_lock(args.db):  # not while a restore replaces the file
        store = _people_store(args.db)
        try:
            return PEOPLE_ACTIONS[args.action](store, args, out)
        finally:
            store.close()


def _person_named(store, name):
    """The Person named ``name`` in ``store`` (UsageError when none is)."""
    person = store.person(name)
    if person is None:
        raise Missing(f"no person named {log_safe(name, 60)} (health_receiver.py people list)")
    return person


def stats_parser():
    parser = argparse.ArgumentParser(prog="health_receiver.py stats",
                                     description="Totals per table and per type, the last 10 syncs, the "
                                                 "database size and schema version.")
    parser.add_argument("--db", default=DEFAULT_DB, help="SQLite database file (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--fields", action="store_true",
                        help="what the app sends instead: the fields of the latest elements of each section and type")
    parser.add_argument("--recount", action="store_true",
                        help="first rebuild the per-type and hourly totals (after editing samples by hand)")
    parser.add_argument("--person", metavar="NAME", help="this person's data only (default: everyone's)")
    return parser


def _print_fields(groups, as_json, out):
    """``stats --fields``: the field inventory as text or JSON."""
    if as_json:
        json.dump(field_inventory_json(groups), out, indent=2, ensure_ascii=False)
        out.write("\n")
        return 0
    zone = Zone()
    for group in groups:
        print(f"\n{log_safe(group.name)}: {group.read:,} of {group.stored:,} elements read", file=out)
        for column, count in group.empty:
            print(f"  WARNING: no {column} in {count:,} of {group.read:,}", file=out)
        for use in group.fields:
            print(f"  {log_safe(use.field, 40):<40} {', '.join(use.kinds):<16} {use.elements:>8,}  "
                  f"{format_local(use.first, zone)} to {format_local(use.last, zone)}", file=out)
    if not groups:
        print("No sync has arrived yet.", file=out)
    return 0


def run_stats(args, out):
    store = _existing_store(args.db)
    if args.recount:
        with database_lock(args.db):
            store.recount_types()
    store = PersonStore(store, _person_named(store, args.person) if args.person else None)
    if args.fields:
        return _print_fields(field_inventory(store), args.json, out)
    stored = store_facts(store, sync_count=10, type_limit=None)
    if args.json:
        json.dump(stats_json(stored, datetime.datetime.now(datetime.timezone.utc)), out, indent=2,
                  ensure_ascii=False)
        out.write("\n")
        return 0
    zone = Zone()
    print(f"Database: {stored.path} ({_size(stored.size_bytes)}), schema version {stored.schema_version}", file=out)
    print(_times_note(zone), file=out)
    print(f"Data of {args.person}" if args.person else
          f"Data of everyone: {', '.join(person.name for person in store.people())} (--person NAME: one of them)",
          file=out)
    print(f"\n{'Table':<26}{'Rows':>12}", file=out)
    for table, rows in stored.totals.items():
        print(f"{table:<26}{rows:>12,}", file=out)
    if stored.types:
        print(f"\n{'Type':<36}{'Rows':>12}  {'First':<17} Last", file=out)
        for info in stored.types:
            print(f"{log_safe(info.name, 36):<36}{info.rows:>12,}  {format_local(info.first, zone):<17} "
                  f"{format_local(info.last, zone)}", file=out)
    print(f"\nLast {len(stored.syncs)} syncs", file=out)
    print(f"{'When':<17} {'Source':<20}{'Records':>10}{'New':>10}{'Dup':>10}{'Rejected':>9}  Status", file=out)
    for sync in stored.syncs:
        status = sync.status if sync.status == SyncStatus.OK else f"{sync.status}: {log_safe(sync.error)}"
        print(f"{format_local(sync.received_at, zone):<17} {log_safe(sync.sync_source or '-', 20):<20}"
              f"{sync.received:>10,}{sync.inserted:>10,}{sync.duplicates:>10,}{sync.rejected:>9,}  "
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
    parser.add_argument("--person", metavar="NAME", help="this person's rows only (default: everyone's; each "
                                                          "row names its person)")
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
    people = [_person_named(store, args.person)] if args.person else store.people()
    # Health data: a file only its owner reads, as the database.
    target = (open(os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8",
                   newline="") if args.output else out)
    count = 0
    try:
        writer = csv.writer(target)
        for number, person in enumerate(people):
            reading = PersonStore(store, person)
            section = SECTIONS_BY_NAME.get(args.section)
            dates = export_dates(reading) if args.format == "ndjson" and section and section.latest_wins else None
            columns, rows = export_rows(reading, args.section, type_name, args.since, args.until)
            try:
                if args.format == "csv":
                    if not number:
                        writer.writerow((PERSON_COLUMN,) + tuple(columns))
                    for row in rows:
                        writer.writerow(csv_cells((person.name,) + tuple(row)))
                        count += 1
                else:
                    for row in rows:
                        target.write(ndjson_line(args.section, columns, row, person.name, dates))
                        target.write("\n")
                        count += 1
            finally:
                rows.close()
    finally:
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


def file_pieces(path, progress=None):
    """The content of a payload file (gunzipped when it ends in .gz) in
    pieces; ``progress(bytes of the file read)`` follows along."""
    with open(path, "rb") as raw:
        handle = gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
        while True:
            piece = handle.read(READ_CHUNK)
            if not piece:
                return
            if progress is not None:
                progress(raw.tell())
            yield piece


def _is_ndjson(path, first_piece):
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith((".ndjson", ".jsonl")):
        return True
    return first_piece.lstrip().startswith(b'{"section":')


class ImportProgress:
    """Bytes read of the total, records, rate and ETA, also inside a file:
    updated in place on a terminal, a line per file otherwise."""

    #: Seconds between two updates of the line on a terminal.
    interval = 0.5

    def __init__(self, files, total_bytes, stream):
        self.files, self.total_bytes, self.stream = files, total_bytes, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.done = self.bytes = self.records = self.failed = 0
        #: Lines of NDJSON files skipped as not export lines.
        self.bad_lines = 0
        self.file_bytes = 0
        self.started = time.monotonic()
        self._shown = 0.0

    def status(self):
        read = self.bytes + self.file_bytes
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = read / 1e6 / elapsed
        left = (self.total_bytes - read) / 1e6 / rate if rate else 0
        return (f"files {self.done}/{self.files}, {read / 1e6:,.1f} of {self.total_bytes / 1e6:,.1f} MB, "
                f"{self.records:,} records, {rate:.1f} MB/s, ETA {left:.0f} s")

    def advance(self, file_bytes):
        """Bytes of the current file read so far."""
        self.file_bytes = file_bytes
        if self.tty and time.monotonic() - self._shown >= self.interval:
            self._shown = time.monotonic()
            self.stream.write("\r\x1b[K" + self.status())
            self.stream.flush()

    def bad_line(self, path, reason):
        """Say that a line of ``path`` was skipped, and why, at once."""
        self.bad_lines += 1
        clear = "\r\x1b[K" if self.tty else ""
        self.stream.write(f"{clear}{path}: {log_safe(reason)}: skipped\n")
        self.stream.flush()

    def file_done(self, path, size, message, failed=False):
        self.done += 1
        self.bytes += size
        self.file_bytes = 0
        self.failed += failed
        status = self.status()
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
    parser.add_argument("--person", metavar="NAME", help="whose data it is (default: the first person; the lines "
                                                          "of an NDJSON export: the person each names, added if "
                                                          "missing)")
    return parser


def run_import(args, out):
    with database_lock(args.db):
        return _import(args, out)


def _import(args, out):
    store = Store(args.db)
    store.open(report=lambda line: print(line, file=sys.stderr, flush=True))
    intake = SyncIntake(store)
    chosen = _person_named(store, args.person) if args.person else None
    first_person = store.first_person()
    people = {}

    def person_id(name):
        """The id of the person named ``name`` (None: the first), added if missing."""
        if chosen is not None or name is None:
            return (chosen or first_person).id
        if name not in people:
            if store.person(name) is None:
                store.add_people([name], [None])
                print(f"Added the person {name} (no key of their own yet: people key {name})", file=sys.stderr)
            people[name] = store.person(name).id
        return people[name]

    paths = import_files(args.paths)
    sizes = {path: os.path.getsize(path) if os.path.isfile(path) else 0 for path in paths}
    progress = ImportProgress(len(paths), sum(sizes.values()), sys.stderr)
    for path in paths:
        try:
            bad_before = progress.bad_lines
            counts = _import_file(path, intake, person_id, progress)
            bad = progress.bad_lines - bad_before
            progress.file_done(path, sizes[path], f"{counts['records']:,} records ({counts['new']:,} new, "
                                                  f"{counts['dup']:,} dup, {counts['rejected']:,} rejected)"
                                                  + (f", {bad:,} bad lines skipped" if bad else ""))
        except (OSError, EOFError, zlib.error, PayloadError) as exc:
            progress.file_done(path, sizes[path], f"skipped: {exc}", failed=True)
        except StorageUnavailable as exc:
            progress.file_done(path, sizes[path], f"not imported: {exc}", failed=True)
    store.close()
    failed = f", {progress.failed} failed" if progress.failed else ""
    skipped = f"; {progress.bad_lines:,} bad lines skipped" if progress.bad_lines else ""
    print(f"{progress.done - progress.failed} of {progress.done} files imported{failed}{skipped}.", file=out)
    return 1 if progress.failed or progress.bad_lines else 0


def _import_file(path, intake, person_id, progress):
    """Import one file (see run_import), a sync per payload it holds;
    ``person_id(name)`` says whose (None: the default person's).  Return
    its counts; a bad NDJSON line is told to ``progress`` and skipped."""
    counts = dict.fromkeys(("records", "new", "dup", "rejected"), 0)
    pieces = file_pieces(path, progress.advance)
    first = next(pieces, b"")
    pieces = itertools.chain([first], pieces)
    if _is_ndjson(path, first):
        payloads = ndjson_payloads(ndjson_lines(pieces), IMPORT_CHUNK_LINES,
                                   lambda _number, reason: progress.bad_line(path, reason))
    else:
        payloads = [(archived_person(path), pieces)]
    for person, payload in payloads:
        result = intake.ingest(payload, "import " + os.path.basename(path), person=person_id(person))
        if result is None:  # an empty file, or {}
            continue
        intake.after_answer(result)
        # Every row counts here, those the app does not count (route
        # points, a workout's series...) too: a file may hold only those.
        received, inserted = sum(result.received.values()), sum(result.inserted.values())
        counts["records"] += received
        counts["new"] += inserted
        counts["dup"] += received - inserted
        counts["rejected"] += result.rejected
        progress.records += received
    return counts


def backup_parser():
    parser = argparse.ArgumentParser(prog="health_receiver.py backup",
                                     description="Copy the database into DEST while the receiver runs, verify the "
                                                 "copy, then give it its name.")
    parser.add_argument("dest", metavar="DEST", help="the backup file, or a folder: the file is then named "
                                                     "<database>-<UTC time>.db")
    parser.add_argument("--db", default=DEFAULT_DB, help="SQLite database file (default %(default)s)")
    parser.add_argument("--gzip", action="store_true", help="compress the backup (.gz)")
    parser.add_argument("--keep", type=int, metavar="N", help="with a folder: then remove the oldest backups of this "
                                                              "database there beyond N (only files backup made)")
    parser.add_argument("--person", metavar="NAME", help="a copy of this person's data only, named "
                                                          "<database>-<NAME>-<UTC time>.db in a folder (default: "
                                                          "everyone's)")
    return parser


class _Progress:
    """A progress line on a terminal: pages, MB and the time left."""

    def __init__(self, out):
        self.out = out
        self.started = time.monotonic()
        self.terminal = hasattr(out, "isatty") and out.isatty()

    def __call__(self, copied, total):
        if not self.terminal or not total:
            return
        spent = time.monotonic() - self.started
        left = spent * (total - copied) / copied if copied else 0
        print(f"\r  {copied:,} of {total:,} pages ({copied * PAGE_SIZE / 1e6:,.0f} of {total * PAGE_SIZE / 1e6:,.0f} "
              f"MB), {left:.0f} s left  ", end="", file=self.out, flush=True)

    def done(self):
        if self.terminal:
            print(file=self.out)


def run_backup(args, out):
    if args.keep is not None and args.keep < 1:
        raise UsageError("--keep must be 1 or more")
    folder = os.path.isdir(args.dest)
    if args.keep is not None and not folder:
        raise UsageError("--keep needs DEST to be a folder")
    person = _person_named(_existing_store(args.db), args.person) if args.person else None
    # A person's backups are named, and kept, apart from the database's.
    series = person.name if person else None
    dest = new_backup_path(args.dest, args.db, args.gzip, series) if folder else args.dest
    if not folder and os.path.lexists(dest) and not _BACKUP_NAME.match(os.path.basename(dest)):
        raise UsageError(f"{dest} exists; name a new file, a backup's (<name>-<UTC time>.db) or a folder")
    progress = _Progress(out)
    try:
        record = backup_database(args.db, dest, compress=args.gzip, progress=progress,
                                 person_id=person.id if person else None, numbered=folder)
    finally:
        progress.done()
    print(f"Backup {record.path}: {record.rows:,} rows, schema version {record.schema_version}, "
          f"{_size(record.size)}, verified, in {record.seconds:.1f} s", file=out)
    if args.keep is not None:
        for path in remove_old_backups(args.dest, args.db, args.keep, made=record.path, person=series):
            print(f"Removed the older backup {path}", file=out)
    return 0


def verify_parser():
    parser = argparse.ArgumentParser(prog="health_receiver.py verify",
                                     description="Check a database or a backup without writing to it: SQLite's "
                                                 "integrity check, then the totals kept beside the rows against "
                                                 "the rows. Exit 0 when all holds, 1 otherwise.")
    parser.add_argument("file", metavar="FILE", nargs="?", help="a backup (.db or .db.gz) or database to check")
    parser.add_argument("--db", default=DEFAULT_DB, help="the database to check when no FILE is given "
                                                         "(default %(default)s)")
    parser.add_argument("--person", metavar="NAME", help="check this person's totals only (default: everyone's)")
    return parser


def run_verify(args, out):
    path = args.file or args.db
    try:
        with readable_copy(path) as readable:
            person = _person_named(Store(readable), args.person) if args.person else None
            verdict = verify_database(readable, path, person.id if person else None)
    except UnreadableBackup as exc:
        verdict = exc.verdict
    print(verdict.line(), file=out)
    return 0 if verdict.ok else 1


def restore_parser():
    parser = argparse.ArgumentParser(prog="health_receiver.py restore",
                                     description="Put a backup in place of the database (the receiver stopped): "
                                                 "the backup is verified first, and the database before it is "
                                                 "kept as <db>.before-restore-<UTC time>.")
    parser.add_argument("backup", metavar="BACKUP", help="a backup file (.db or .db.gz)")
    parser.add_argument("--db", default=DEFAULT_DB, help="the database to replace (default %(default)s)")
    return parser


def run_restore(args, out):
    if not os.path.isfile(args.backup):
        raise Missing(f"no backup at {args.backup}")
    restore_database(args.backup, args.db, lambda line: print(line, file=out, flush=True))
    print(f"Restored {args.backup} as {args.db}. Start the receiver as before (an older schema version is "
          "upgraded at start); the app's syncs since the backup are stored again when it sends them.", file=out)
    return 0


#: Every command: name -> (parser factory, run(args, out) -> exit status).
#: No command name means serve; bench adds itself (Bench comes after).
COMMANDS = {
    "serve": (serve_parser, run_serve),
    "key": (key_parser, run_key),
    "people": (people_parser, run_people),
    "stats": (stats_parser, run_stats),
    "export": (export_parser, run_export),
    "import": (import_parser, run_import),
    "backup": (backup_parser, run_backup),
    "verify": (verify_parser, run_verify),
    "restore": (restore_parser, run_restore),
    "notify": (notify_parser, run_notify),
}


# ---------------------------------------------------------------------------
# Bench: the receiver against a baseline, at any database size
# ---------------------------------------------------------------------------

# -- Payloads: generated syncs of both apps' shapes -------------------------

#: HealthKit types of the generated payload: (identifier, unit, source, value range).
BENCH_TYPES = (
    ("HKQuantityTypeIdentifierHeartRate", "count/min", "Jane\u2019s Apple Watch", (48, 170)),
    ("HKQuantityTypeIdentifierStepCount", "count", "iPhone", (0, 900)),
    ("HKQuantityTypeIdentifierActiveEnergyBurned", "kcal", "Jane\u2019s Apple Watch", (0, 40)),
    ("HKQuantityTypeIdentifierOxygenSaturation", "%", "Jane\u2019s Apple Watch", (0.9, 1.0)),
    ("HKCategoryTypeIdentifierSleepAnalysis", None, "Jane\u2019s Apple Watch", None),
)
#: Upload speed of bench's slow client, in bytes per second (a phone on Wi-Fi).
BENCH_SLOW_RATE = 10e6
#: First instant of generated payloads.
BENCH_START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
#: Days one generated sync covers when filling a database (a history of
#: consecutive windows).
BENCH_WINDOW_DAYS = 3


def make_bench_payload(target_mb, seed=7, start=BENCH_START, days=30, reordered=False):
    """A realistic sync of about ``target_mb`` MB covering ``days`` days from
    ``start``: five sample types (5% without uuid, each in time order), 15
    workouts with ~10k route points, medications, dose events and
    characteristics.  ``reordered``: the same records and envelope, of the
    same length, in another order of the sections (a re-post that is not
    byte for byte the same).  Returns (body bytes, number of data elements)."""
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
    arrays = [f"\"{BENCH_TYPES[t][0]}\":[{','.join(items)}]" for t, items in enumerate(per_type)]
    if reordered:
        body = head + ",".join(arrays[::-1]) + "," + fixed + tail
    else:
        body = head + fixed + "," + ",".join(arrays) + tail
    body = body.encode("utf-8")
    elements = i + len(workouts) + len(medications) + len(doses)
    return body, elements


#: The per-minute metrics of make_hae_payload: (name, units, fields of a
#: point: (name, least, greatest, digits)).
HAE_BENCH_METRICS = (
    ("heart_rate", "count/min", (("Min", 50, 70, 0), ("Avg", 70, 90, 1), ("Max", 90, 130, 0))),
    ("step_count", "count", (("qty", 0, 120, 0),)),
    ("active_energy", "kJ", (("qty", 0.5, 30, 3),)),
    ("basal_energy_burned", "kJ", (("qty", 4, 5, 3),)),
    ("walking_running_distance", "mi", (("qty", 0, 0.1, 4),)),
    ("apple_exercise_time", "min", (("qty", 0, 1, 0),)),
    ("flights_climbed", "count", (("qty", 0, 3, 0),)),
    ("respiratory_rate", "count/min", (("qty", 12, 20, 1),)),
)


def make_hae_payload(target_mb, seed=7, start=BENCH_START, days=30, reordered=False):
    """A sync of about ``target_mb`` MB of Health Auto Export's shape over
    ``days`` days from ``start``: per-minute metrics (heart rate as Min,
    Avg, Max; energy in kJ, distance in miles), a night of sleep stages
    and its totals each day, daily weight in lb and blood pressure, 15
    workouts (version 2) with route, heart rate and steps, 5 ECGs of
    15,000 measurements.  ``reordered``: the same metrics in the other
    order.  Returns (body bytes, number of data elements)."""
    import random
    rng = random.Random(seed)
    target = int(target_mb * 1e6)
    window = int(days * 86400)
    source = "Jane\u2019s Apple Watch"

    def stamp(seconds):
        return (start + datetime.timedelta(seconds=seconds, hours=1)).strftime("%Y-%m-%d %H:%M:%S +0100")

    def point(at, fields, who=source):
        values = ",".join(f'"{name}":{round(rng.uniform(low, high), digits) if digits else rng.randint(low, high)}'
                          for name, low, high, digits in fields)
        return f'{{"date":"{stamp(at)}",{values},"source":"{who}"}}'

    workouts = []
    for n in range(15):
        begin = n * window // 15 + 3600 * 7
        duration = 2700
        route = [f'{{"latitude":{47.69 + i * 1e-5:.7f},"longitude":{-122.27 - i * 1e-5:.7f},'
                 f'"altitude":{rng.uniform(20, 80):.2f},"speed":{rng.uniform(2, 4):.2f},"course":'
                 f'{rng.uniform(0, 360):.1f},"horizontalAccuracy":3.5,"verticalAccuracy":2.1,'
                 f'"timestamp":"{stamp(begin + 4 * i)}"}}' for i in range(667)]
        heart = [point(begin + 60 * i, HAE_BENCH_METRICS[0][2])[:-1] + ',"units":"count/min"}' for i in range(45)]
        steps = [point(begin + 60 * i, (("qty", 100, 180, 0),))[:-1] + ',"units":"count"}' for i in range(45)]
        workouts.append(
            f'{{"id":"{rng.getrandbits(64):016X}","name":"Outdoor Run","start":"{stamp(begin)}",'
            f'"end":"{stamp(begin + duration)}","duration":{duration},"location":"Outdoor","isIndoor":false,'
            f'"activeEnergyBurned":{{"qty":{rng.uniform(1000, 3000):.1f},"units":"kJ"}},'
            f'"distance":{{"qty":{rng.uniform(3, 8):.2f},"units":"mi"}},'
            f'"heartRate":{{"min":{{"qty":110,"units":"count/min"}},"avg":{{"qty":150,"units":"count/min"}},'
            f'"max":{{"qty":175,"units":"count/min"}}}},"heartRateData":[{",".join(heart)}],'
            f'"stepCount":[{",".join(steps)}],"route":[{",".join(route)}]}}')
    ecgs = []
    for n in range(5):
        begin = n * window // 5 + 3600 * 12
        voltages = ",".join(f'{{"date":"{stamp(begin + i // 512)}","voltage":{rng.uniform(-300, 900):.3f},'
                            f'"units":"\u00b5V"}}' for i in range(15000))
        ecgs.append(f'{{"start":"{stamp(begin)}","end":"{stamp(begin + 30)}","classification":"Sinus Rhythm",'
                    f'"severity":"none","averageHeartRate":{rng.randint(60, 80)},'
                    f'"numberOfVoltageMeasurements":15000,"samplingFrequency":512,'
                    f'"voltageMeasurements":[{voltages}],"source":"{source}"}}')
    daily = {"weight_body_mass": ("lb", []), "blood_pressure": ("mmHg", []), "sleep_analysis": ("hr", [])}
    for day in range(days):
        at = day * 86400
        daily["weight_body_mass"][1].append(point(at + 7 * 3600, (("qty", 150, 160, 1),), "Scale"))
        daily["blood_pressure"][1].append(point(at + 8 * 3600, (("systolic", 110, 130, 0),
                                                                 ("diastolic", 70, 85, 0)), "Omron"))
        night = at - 3600
        daily["sleep_analysis"][1].append(
            f'{{"date":"{stamp(at)[:10]}","totalSleep":7.1,"core":4.1,"deep":1.2,"rem":1.8,"awake":0.4,'
            f'"asleep":0,"inBed":7.6,"sleepStart":"{stamp(night)}","sleepEnd":"{stamp(night + 26000)}",'
            f'"source":"{source}"}}')
    fixed = [f'{{"name":"{name}","units":"{units}","data":[{",".join(points)}]}}'
             for name, (units, points) in daily.items()]
    head = '{"data":{"workouts":[' + ",".join(workouts) + '],"ecg":[' + ",".join(ecgs) + '],"metrics":['
    tail = "]}}"
    budget = target - len(head) - len(tail) - sum(len(item) + 1 for item in fixed)
    per_metric = [[] for _ in HAE_BENCH_METRICS]
    size = minute = 0
    while size < budget:
        for number, (_name, _units, fields) in enumerate(HAE_BENCH_METRICS):
            element = point(minute * 60, fields)
            per_metric[number].append(element)
            size += len(element.encode("utf-8")) + 1
            if size >= budget:
                break
        minute += 1
    metrics = [f'{{"name":"{name}","units":"{units}","data":[{",".join(points)}]}}'
               for (name, units, _fields), points in zip(HAE_BENCH_METRICS, per_metric) if points] + fixed
    if reordered:
        metrics = metrics[::-1]
    body = (head + ",".join(metrics) + tail).encode("utf-8")
    elements = (sum(map(len, per_metric)) + sum(len(points) for _units, points in daily.values()) + len(workouts)
                + len(ecgs))
    return body, elements


#: The generators of bench's bodies, by the app whose shape they have.
BENCH_APPS = {"export-pro": make_bench_payload, "auto-export": make_hae_payload}


# -- Runs: the baseline, the runs, a filled database, a backup --------------

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
    special = {key for section in SECTIONS if section is not SAMPLES for key in section.app_keys} | set(NESTED)
    rows = [(s.get("uuid"), t, s.get("startDate"), s.get("endDate"), s.get("value"), s.get("unit"),
             s.get("sourceName"), json.dumps(s), 1)
            for t, samples in payload["data"].items() if isinstance(samples, list) and t not in special
            for s in samples]
    # The other app's metrics: a row per point, its date the start.
    rows += [(None, metric.get("name"), s.get("date"), s.get("date"), s.get("qty", s.get("Avg")),
              metric.get("units"), s.get("source"), json.dumps(s), 1)
             for metric in payload["data"].get("metrics", ()) for s in metric.get("data", ())]
    db.execute("BEGIN")
    db.executemany("INSERT OR IGNORE INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.execute("COMMIT")
    seconds = time.perf_counter() - started
    db.close()
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rows": len(rows)}))
    return 0


#: The seed guide's "SQLite (via Python)" receiver's table, as the guide
#: creates it.
SEED_GUIDE_TABLE = ("CREATE TABLE IF NOT EXISTS samples (uuid TEXT PRIMARY KEY, type_id TEXT, value REAL, unit TEXT,"
                    " start_date TEXT, end_date TEXT, metadata TEXT)")


def run_seed_guide(body_file, db_file):
    """The seed guide's own receiver without its web framework, run in its
    own process: json.loads of the body, then per sample of ``data`` with a
    uuid and both dates one INSERT OR IGNORE of its columns and
    json.dumps(metadata), then one commit, SQLite's defaults otherwise.
    Prints its time, processor time and peak memory as JSON.  It keeps one
    column of each sample and nothing of the other sections or the other
    app: the least a receiver can do per record."""
    with open(body_file, "rb") as handle:
        body = handle.read()
    cpu, started = time.process_time(), time.perf_counter()
    db = sqlite3.connect(db_file)
    db.execute(SEED_GUIDE_TABLE)
    payload = json.loads(body)
    count = 0
    for type_id, samples in payload.get("data", {}).items():
        if not isinstance(samples, list):
            continue
        for sample in samples:
            if "uuid" not in sample or "startDate" not in sample or "endDate" not in sample:
                continue
            db.execute("INSERT OR IGNORE INTO samples VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (sample["uuid"], type_id, sample.get("value"), sample.get("unit"), sample["startDate"],
                        sample["endDate"], json.dumps(sample.get("metadata", {}))))
            count += 1
    db.commit()
    db.close()
    print(json.dumps({"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
                      "peak_rss_mb": peak_rss_mb(), "rows": count}))
    return 0


def _start_child_server(db):
    """Start a receiver in a child process; return (process, port)."""
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--host", "127.0.0.1", "--port", "0",
                             "--db", db, "--quiet", "--no-auth"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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


def _post_throttled(port, body, rate):
    """POST ``body`` at ``rate`` bytes per second, as a phone on a slow
    network would; return the seconds from the last byte sent to the answer."""
    head = (f"POST {DEFAULT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    piece = 64 * 1024
    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        sock.sendall(head)
        started = time.perf_counter()
        for offset in range(0, len(body), piece):
            sock.sendall(body[offset:offset + piece])
            ahead = started + (offset + piece) / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        last_byte = time.perf_counter()
        response = http.client.HTTPResponse(sock)
        response.begin()
        response.read()
        answered = time.perf_counter()
    if response.status != 200:
        raise RuntimeError(f"the receiver answered {response.status}")
    return answered - last_byte


def _get_status(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    with contextlib.closing(conn):
        conn.request("GET", DEFAULT_PATH)
        return json.loads(conn.getresponse().read())


def _idle_status(port):
    """The receiver's status once no POST is in progress, what it does
    after its answer included (hourly totals, checkpoint)."""
    while True:
        status = _get_status(port)
        if not status["ingests_in_progress"]:
            return status
        time.sleep(0.02)


#: What bench_once posts, in order: (name, which body, what it is).
BENCH_POSTS = (
    ("first", "body", "new data"),
    ("retry", "body", "the same body again, byte for byte: answered from the first one's record"),
    ("repost", "reordered", "the same records in another order of the sections, same envelope and length: "
                            "kept while it arrives, then read, all duplicates"),
)


def bench_once(bodies, slow_body, work_dir):
    """One round: the receiver (BENCH_POSTS, then new data sent at
    BENCH_SLOW_RATE) and the baseline, each fresh."""
    db = os.path.join(work_dir, "bench.db")
    body = bodies["body"]
    proc, port = _start_child_server(db)
    figures = {}
    try:
        # The receiver's processor time of each post, with what it does
        # after the answer (the GETs between cost next to nothing).
        cpu = _idle_status(port)["cpu_seconds"]
        for name, which, _what in BENCH_POSTS:
            figures[name], _status, figures[name + "_answer"] = _post(port, bodies[which])
            status = _idle_status(port)
            figures[name + "_cpu"], cpu = status["cpu_seconds"] - cpu, status["cpu_seconds"]
        peak = status.get("peak_rss_mb")
        last_byte = _post_throttled(port, slow_body, BENCH_SLOW_RATE)
    finally:
        _stop_child_server(proc)
    body_file = os.path.join(work_dir, "body.json")
    with open(body_file, "wb") as handle:
        handle.write(body)
    baseline, seed = (json.loads(subprocess.run(
        [sys.executable, os.path.abspath(__file__), "bench", flag, body_file, os.path.join(work_dir, name + ".db")],
        stdout=subprocess.PIPE, check=True, text=True).stdout)
        for flag, name in (("--baseline-child", "baseline"), ("--seed-child", "seed")))
    for name in os.listdir(work_dir):
        os.unlink(os.path.join(work_dir, name))
    return dict(figures, peak=peak, baseline=baseline["seconds"], baseline_peak=baseline["peak_rss_mb"],
                last_byte=last_byte, seed=seed["seconds"], seed_cpu=seed["cpu_seconds"], seed_peak=seed["peak_rss_mb"],
                seed_rows=seed["rows"])


def bench_concurrent(body, posts, work_dir):
    """Post ``posts`` copies of ``body`` at once to a fresh receiver; return
    (seconds until all answered, statuses, peak MB)."""
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


def bench_against_baseline(mb, runs, out, concurrent=1, make_payload=make_bench_payload):
    print(f"Generating a {mb:g} MB sync...", file=out)
    body, elements = make_payload(mb)
    bodies = {"body": body, "reordered": make_payload(mb, reordered=True)[0]}
    slow_body = make_payload(mb, seed=8, start=BENCH_START + datetime.timedelta(days=30))[0]
    size_mb = len(body) / 1e6
    print(f"{size_mb:.1f} MB, {elements} records + route points; {runs} run(s), each: receiver (new, retry, "
          f"re-post, then new data sent at {BENCH_SLOW_RATE / 1e6:g} MB/s) and baseline.", file=out)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="health-bench-") as work_dir:
        for n in range(runs):
            result = bench_once(bodies, slow_body, work_dir)
            rounds.append(result)
            posts = ", ".join(f"{name} {result[name]:.2f} s (CPU {result[name + '_cpu']:.2f} s)"
                              for name, _which, _what in BENCH_POSTS)
            print(f"  run {n + 1}: {posts}, peak RSS {result['peak']:.0f} MB, last byte to answer "
                  f"{result['last_byte']:.2f} s | baseline {result['baseline']:.2f} s, "
                  f"{result['baseline_peak']:.0f} MB | seed guide's {result['seed']:.2f} s (CPU "
                  f"{result['seed_cpu']:.2f} s)", file=out, flush=True)
    med = {key: statistics.median(r[key] for r in rounds)
           for key in ("peak", "baseline", "baseline_peak", "last_byte", "seed", "seed_cpu", "seed_peak") + tuple(
               name + suffix for name, _which, _what in BENCH_POSTS for suffix in ("", "_cpu"))}
    answer = rounds[0]["first_answer"]
    records = answer["count"] + answer["routePoints"]
    print(f"\nReceiver (median of {runs}), every section stored, WAL + synchronous=FULL:", file=out)
    for name, _which, what in BENCH_POSTS:
        seconds, sent = med[name], rounds[0][name + "_answer"]
        counts = (f"{records / seconds:9,.0f} records/s  (count {sent['count']}, {sent['routePoints']} route points)"
                  if name == "first" else f"(all {sent['duplicates']:,} duplicates, nothing inserted: "
                  f"{sum(sent['inserted'].values()) == 0})")
        print(f"  {name:<7} {seconds:6.2f} s  {size_mb / seconds:7.1f} MB/s  {counts}: {what}", file=out)
    print(f"  peak RSS  {med['peak']:6.0f} MB", file=out)
    cpu = ", ".join(f"{med[name + '_cpu']:.2f} s {name}" for name, _which, _what in BENCH_POSTS)
    print(f"  CPU time  {cpu} (the receiver's user + system time, which a small board spends at its own speed: "
          f"about 10 times over on a Pi Zero 2 W, against the app's 30 s)", file=out)
    print(f"  new data sent at {BENCH_SLOW_RATE / 1e6:g} MB/s: answered {med['last_byte']:.2f} s after its last "
          f"byte (the rows are stored as they arrive)", file=out)
    print("Baseline (json.loads + one executemany of the same sample rows into schema version 1's table; "
          "samples only):", file=out)
    print(f"  time      {med['baseline']:6.2f} s\n  peak RSS  {med['baseline_peak']:6.0f} MB", file=out)
    ratios = ", ".join(f"{name} {med[name] / med['baseline']:.2f}x" for name, _which, _what in BENCH_POSTS)
    print(f"Ratios: time {ratios} the baseline; peak RSS {med['peak'] / med['baseline_peak']:.2f}x the baseline.",
          file=out)
    print("The seed guide's receiver (json.loads, then an INSERT OR IGNORE per sample of one column each; samples "
          f"only):\n  time      {med['seed']:6.2f} s\n  CPU time  {med['seed_cpu']:6.2f} s\n"
          f"  peak RSS  {med['seed_peak']:6.0f} MB", file=out)
    if rounds[0]["seed_rows"]:
        print(f"Processor seconds per 50 MB (what a small board feels): receiver "
              f"{med['first_cpu'] * 50 / size_mb:.2f} s (after-answer work included), the seed guide's "
              f"{med['seed_cpu'] * 50 / size_mb:.2f} s: {med['first_cpu'] / med['seed_cpu']:.2f}x; time "
              f"{med['first'] / med['seed']:.2f}x.", file=out)
    else:  # Health Auto Export's shape: nothing there is a sample of ``data`` with a uuid
        print(f"The seed guide's receiver keeps none of these records, so no ratio: the receiver's processor seconds "
              f"per 50 MB are {med['first_cpu'] * 50 / size_mb:.2f} s, {med['first_cpu'] / records * 1e6:.1f} "
              "microseconds a record.", file=out)
    if concurrent > 1:
        with tempfile.TemporaryDirectory(prefix="health-bench-") as work_dir:
            elapsed, statuses, peak = bench_concurrent(body, concurrent, work_dir)
        print(f"{concurrent} concurrent posts of the same {size_mb:.0f} MB: "
              f"all answered in {elapsed:.2f} s, statuses {statuses}, peak RSS {peak:.0f} MB "
              f"({peak / med['peak']:.1f}x one post's).", file=out)
    per_50 = med["first"] * 50 / size_mb
    print(f"\nA 50 MB sync takes about {per_50:.1f} s on this machine; the app waits 30 s, so a machine up to "
          f"{30 / per_50:.0f}x slower still answers in time (a Raspberry Pi 4 is typically 3-5x slower than a "
          f"desktop, a Pi Zero 2 about 10x). Peak memory for this {size_mb:.0f} MB sync: {med['peak']:.0f} MB.",
          file=out)
    return 0


def _window_payload(mb, index, reordered=False):
    """The generated sync of the ``index``-th window of a history."""
    start = BENCH_START + datetime.timedelta(days=BENCH_WINDOW_DAYS * index)
    return make_bench_payload(mb, seed=1000 + index, start=start, days=BENCH_WINDOW_DAYS, reordered=reordered)[0]


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
            result = intake.ingest((_window_payload(mb, index),), "bench fill")
            intake.after_answer(result)
            samples += result.inserted[SAMPLES.name]
            index += 1
            print(f"\r  fill: {samples:,} samples in {index} syncs, {time.monotonic() - started:.0f} s",
                  end="", file=out, flush=True)
    finally:
        store.close()
    print(file=out)
    return index


def _timed_pair(db, body, repost, cold):
    """A new-data post and a re-post of its records in another body on
    ``db``; (seconds new, seconds re-post)."""
    proc, port = _start_child_server(db)
    try:
        if cold:
            evict_from_cache(db)
        new = _post(port, body)[0]
        if cold:
            evict_from_cache(db)
        repeat = _post(port, repost)[0]
    finally:
        _stop_child_server(proc)
    return new, repeat


def bench_at_size(millions, mb, runs, out):
    """New-data syncs and their re-posts at ``millions`` million samples
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
                body, repost = _window_payload(mb, windows), _window_payload(mb, windows, reordered=True)
                windows += 1
                empty_db = os.path.join(work_dir, "empty.db")
                filled = _timed_pair(db, body, repost, cold)
                empty = _timed_pair(empty_db, body, repost, cold)
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(OSError):
                        os.unlink(empty_db + suffix)
                for label, value in zip(("new", "re-post"), zip(filled, empty)):
                    figures.setdefault((cold, label), []).append(value)
                print(f"  {'cold' if cold else 'warm'} run {run + 1}: new {filled[0]:.2f} s (empty "
                      f"{empty[0]:.2f} s), re-post {filled[1]:.2f} s (empty {empty[1]:.2f} s)", file=out, flush=True)
        print(f"\nAt {samples / 1e6:.1f} M samples against an empty database (median of {runs}):", file=out)
        for (cold, label), pairs in figures.items():
            at_size = statistics.median(p[0] for p in pairs)
            empty = statistics.median(p[1] for p in pairs)
            print(f"  {'cold' if cold else 'warm'} {label + ' sync':<12} {at_size:6.2f} s against {empty:6.2f} s: "
                  f"{at_size / empty:.2f}x", file=out)
        time_pages(db, runs, out)
        bench_backup(db, work_dir, out)
        print("\nWhat this means for a Raspberry Pi: 'cold' is a database larger than the machine's memory, "
              "where every page a sync touches is read from the SD card. A ratio near 1x means a sync costs the "
              "same after years of data as on the first day; multiply the times by the Pi's slowness (3-5x for a "
              "Pi 4, about 10x for a Pi Zero 2) and compare with the app's 30 s.", file=out)
    return 0


def time_pages(db, runs, out):
    """Print how long the status page takes to build for each range, warm
    (median of ``runs``) and with the database evicted from the cache."""
    store = Store(db)
    store = PersonStore(store, store.first_person())  # what a page reads
    print("\nThe status page at this size, built in-process (warm: median of "
          f"{runs}; cold: after evicting the database from the cache):", file=out)
    for choice in RANGES:
        times = []
        for _run in range(runs):
            started = time.monotonic()
            view = View.of(choice.name, Zone(), datetime.datetime.now(datetime.timezone.utc))
            render_status_page(status_report(store, view))
            times.append(time.monotonic() - started)
        cold = None
        if evict_from_cache(db):
            started = time.monotonic()
            view = View.of(choice.name, Zone(), datetime.datetime.now(datetime.timezone.utc))
            render_status_page(status_report(store, view))
            cold = time.monotonic() - started
        cold_text = "" if cold is None else f", {cold:.3f} s cold"
        print(f"  ?range={choice.name:<4} {statistics.median(times):.3f} s warm{cold_text}", file=out, flush=True)


#: How often bench's small syncs come while a backup runs.
BENCH_SMALL_EVERY = 0.1


def _small_sync(index):
    """A small sync of new heart-rate samples, as the app sends every 15 minutes."""
    start = BENCH_START + datetime.timedelta(days=3650, minutes=index)
    samples = [{"uuid": f"bench-small-{index}-{i}", "startDate": f"{start:%Y-%m-%dT%H:%M}:{i:02d}.000Z",
                "endDate": f"{start:%Y-%m-%dT%H:%M}:{i:02d}.000Z", "value": 60 + i, "unit": "count/min",
                "sourceName": "Apple Watch"} for i in range(20)]
    return json.dumps({"exportDate": f"{start:%Y-%m-%dT%H:%M}:00.000Z", "syncSource": "background",
                       "data": {"HKQuantityTypeIdentifierHeartRate": samples}}).encode()


def _latencies_while(port, work, first_index):
    """Post a small sync every BENCH_SMALL_EVERY seconds while ``work()``
    runs (at least 3 s); return (its result, the answers' seconds)."""
    seconds, done = [], threading.Event()

    def post():
        index = first_index
        while not done.is_set() or len(seconds) < 30:
            seconds.append(_post(port, _small_sync(index))[0])
            index += 1
            time.sleep(BENCH_SMALL_EVERY)

    poster = threading.Thread(target=post)
    poster.start()
    try:
        result = work()
    finally:
        done.set()
        poster.join()
    return result, seconds


def _percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def bench_backup(db, work_dir, out):
    """Back up ``db`` while a receiver on it takes small syncs; report the
    backup's time and size, plain and compressed, the syncs' answer times
    with and without it, verify and restore."""
    proc, port = _start_child_server(db)
    try:
        _result, alone = _latencies_while(port, lambda: time.sleep(3), 0)
        dest = os.path.join(work_dir, "backup.db")
        record, during = _latencies_while(port, lambda: backup_database(db, dest), 1000)
    finally:
        _stop_child_server(proc)
    started = time.monotonic()
    packed = backup_database(db, dest + ".gz", compress=True)
    packed_seconds = time.monotonic() - started
    started = time.monotonic()
    verdict = verify_database(dest)
    verify_seconds = time.monotonic() - started
    target = os.path.join(work_dir, "restored.db")
    started = time.monotonic()
    restore_database(dest, target, lambda line: None)
    restore_seconds = time.monotonic() - started
    print(f"\nBackups at this size (database {database_size(db) / 1e9:.2f} GB):", file=out)
    print(f"  backup      {record.seconds:6.1f} s, {record.size / 1e6:,.0f} MB, verified ({record.rows:,} rows)",
          file=out)
    print(f"  --gzip      {packed_seconds:6.1f} s, {packed.size / 1e6:,.0f} MB ({packed.size / record.size:.2f} of "
          f"the plain copy)", file=out)
    print(f"  verify      {verify_seconds:6.1f} s: {'OK' if verdict.ok else verdict.line()}", file=out)
    print(f"  restore     {restore_seconds:6.1f} s", file=out)
    print(f"  small syncs every {BENCH_SMALL_EVERY:g} s: answered in {_percentile(alone, 0.5):.3f} s (p50), "
          f"{_percentile(alone, 0.99):.3f} s (p99) alone; {_percentile(during, 0.5):.3f} s (p50), "
          f"{_percentile(during, 0.99):.3f} s (p99), worst {max(during):.3f} s, during the backup "
          f"({len(during)} syncs)", file=out)


def bench_parser():
    parser = argparse.ArgumentParser(prog="health_receiver.py bench",
                                     description="Time a large sync against the real receiver and a baseline, "
                                                 "or at a database size (--fill).")
    parser.add_argument("--mb", type=_positive_number, default=50, help="size of the generated sync (default 50)")
    parser.add_argument("--runs", type=int, default=3, help="rounds to take the median of (default 3)")
    parser.add_argument("--concurrent", type=int, default=1, metavar="N",
                        help="also post N copies at once and report time and peak memory (default 1: no)")
    parser.add_argument("--fill", type=_positive_number, metavar="MILLIONS",
                        help="first fill a database with this many million samples, then compare syncs into it "
                             "with the same syncs into an empty one, warm and evicted from the OS cache")
    parser.add_argument("--app", choices=sorted(BENCH_APPS), default="export-pro",
                        help="the shape of the generated sync: Health Export Pro's (default) or Health Auto "
                             "Export's (per-minute metrics, workouts with routes, ECGs)")
    parser.add_argument("--baseline-child", nargs=2, metavar=("BODY", "DB"), help=argparse.SUPPRESS)
    parser.add_argument("--seed-child", nargs=2, metavar=("BODY", "DB"), help=argparse.SUPPRESS)
    return parser


def run_bench(args, out):
    if args.baseline_child:
        return run_baseline(*args.baseline_child)
    if args.seed_child:
        return run_seed_guide(*args.seed_child)
    if resource is None:
        raise Missing("bench needs the resource module (Linux, macOS, BSD)")
    runs = max(1, args.runs)
    if args.fill:
        return bench_at_size(args.fill, args.mb, runs, out)
    return bench_against_baseline(args.mb, runs, out, args.concurrent, BENCH_APPS[args.app])


COMMANDS["bench"] = (bench_parser, run_bench)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

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
        print(f"error: {log_safe(exc)}", file=sys.stderr)
        return exc.exit_status
    except UnicodeEncodeError as exc:  # LANG=C, or a console that is not UTF-8
        print(f"error: the output cannot hold {exc.object[exc.start:exc.end]!a} ({exc.encoding}); write to a file "
              "with --output, or set PYTHONIOENCODING=utf-8", file=sys.stderr)
        return 1
    # The environment's failures (a file, a disk, the database); anything
    # else is a bug and ends with its traceback (exit 1).
    except (OSError, StorageUnavailable) as exc:
        if isinstance(exc, BrokenPipeError):  # export | head: the reader has all it wants
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"error: {log_safe(exc)}", file=sys.stderr)
        return 1


def run_imported(script):
    """Replace this process (same id, arguments, environment and open
    files) with one that imports ``script`` and runs its main(); return
    only if that cannot be done.

    Run as a script, CPython compiles this file at every start and keeps
    its syntax tree for as long as the script runs: 30 MB here (a 50 MB
    sync's peak was 68 MB, and is 36 MB imported), and seconds of a small
    board's start.  Imported, its bytecode is cached in __pycache__ (when
    that can be written) and no tree is kept.  POSIX only: elsewhere exec
    starts a new process.  Not when run with -m (already imported), nor
    under a debugger, tracer or profiler, which the exec would end."""
    main_module = sys.modules.get("__main__")
    if (os.name != "posix" or not sys.executable or not script.endswith(".py")
            or getattr(main_module, "__spec__", None) is not None
            or sys.gettrace() is not None or sys.getprofile() is not None):
        return
    path = os.path.abspath(script)
    flags = getattr(subprocess, "_args_from_interpreter_flags", lambda: [])()
    # -c puts the working directory first on sys.path, where a script has
    # its own folder: a json.py lying there must not be imported.
    code = ("import importlib.util, sys\n"
            f"if sys.path[:1] == ['']: sys.path[0] = {os.path.dirname(path)!r}\n"
            f"spec = importlib.util.spec_from_file_location('health_receiver', {path!r})\n"
            "module = importlib.util.module_from_spec(spec)\n"
            "sys.modules['health_receiver'] = module\n"
            f"sys.argv[0] = {script!r}\n"
            "spec.loader.exec_module(module)\n"
            "sys.exit(module.main())\n")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    with contextlib.suppress(OSError):
        os.execv(sys.executable, [sys.executable, *flags, "-c", code, *sys.argv[1:]])


if __name__ == "__main__":
    run_imported(sys.argv[0])
    sys.exit(main())
