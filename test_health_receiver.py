"""Tests for health_receiver.py: run with ``python3 -m unittest -v``.

Grouped by the module's layers: dates, the JSON reader and ingest (fed
text, no socket), storage, reporting, presentation, the sync workflow, HTTP,
the command line.  Most tests talk to a real server on 127.0.0.1 (ephemeral
port, in a thread) with http.client or a raw socket, and check real SQLite
files; the protocol's own tests drive the real handler through BytesIO, as
CPython's test_httpservers does, with no socket and no database.

The receivers' clock is the tests' (TEST_NOW, a fixed noon): no test waits
for the wall clock.  To run the suite at another hour, set it:
``HEALTH_TEST_NOW=2027-01-15T00:01:00Z python3 -m unittest``.
"""

import argparse
import ast
import base64
import bisect
import collections
import contextlib
import csv
import dataclasses
import datetime
import errno
import gzip
import hashlib
import http.client
import http.server
import io
import ipaddress
import json
import math
import os
import random
import re
import select
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock
import urllib.error
import urllib.request
from urllib.parse import quote
from urllib.parse import unquote
import zlib

try:
    import zoneinfo as _oracle_zoneinfo  # novermin: Python 3.9+, optional
except ImportError:  # Python 3.8: local times from time.mktime under TZ
    _oracle_zoneinfo = None

import health_receiver as hr

TOKEN = "s3cret-Token-for-tests"

#: When the tests' receivers start their clock (see RunningClock): a fixed
#: noon, or the time HEALTH_TEST_NOW gives (e.g. 2027-01-15T00:01:00Z).  No
#: test reads the wall clock for "now", so the suite runs alike at any hour.
TEST_NOW = datetime.datetime.strptime(os.environ.get("HEALTH_TEST_NOW", "2027-01-15T12:00:00Z"),
                                      "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
#: Noon of TEST_NOW's day: where tests start whose samples fall later that
#: day than TEST_NOW may be (the morning's, the evening's).
TEST_NOON = TEST_NOW.replace(hour=12, minute=0, second=0, microsecond=0)


def sample(uuid, start, value, unit="count/min", **extra):
    element = {"startDate": start, "endDate": start, "value": value, "unit": unit, "sourceName": "Watch"}
    if uuid is not None:
        element["uuid"] = uuid
    element.update(extra)
    return element


def make_payload(n=3, source="manual-upload", tag="A"):
    """A payload touching every section, ``n`` samples per sample type."""
    heart = [sample(f"{tag}-HR-{i}", f"2026-02-24T0{i % 10}:00:00.000Z", 60 + i)
             for i in range(n)]
    steps = [sample(f"{tag}-ST-{i}", f"2026-02-24T1{i % 10}:00:00.000Z", 100 * i, "count")
             for i in range(n)]
    steps.append(sample(None, "2026-02-25T00:00:00.000Z", 42, "count"))  # no uuid
    return {
        "exportDate": "2026-02-26T00:00:00.000Z",
        "startDate": "2026-02-24T00:00:00.000Z",
        "endDate": "2026-02-26T00:00:00.000Z",
        "syncSource": source,
        "characteristics": {"biologicalSex": "female", "bloodType": "A+"},
        "data": {
            "HKQuantityTypeIdentifierHeartRate": heart,
            "HKQuantityTypeIdentifierStepCount": steps,
            "workouts": [{"uuid": tag + "-W1", "workoutActivityType": "cycling",
                          "startDate": "2026-02-24T23:34:50.000Z", "endDate": "2026-02-25T00:10:25.000Z",
                          "durationSeconds": 2135.0}],
            "medications": [{"conceptIdentifier": "rx-0", "displayText": "Aspirin"},
                            {"conceptIdentifier": "rx-1", "displayText": "Lisinopril"}],
            "medicationDoseEvents": [{"uuid": tag + "-D1", "medicationConceptIdentifier": "rx-0",
                                      "startDate": "2026-02-24T08:00:00.000Z", "logStatus": "taken"}],
        },
        "workoutRoutes": {
            tag + "-W1": [{"latitude": 47.69, "longitude": -122.27, "altitude": 29.2,
                           "timestamp": f"2026-02-24T23:34:5{i}.000Z"} for i in range(4)],
        },
    }


def encode(payload):
    return json.dumps(payload).encode("utf-8")


def run_main(*argv):
    """main() in-process: (exit status, standard output, standard error)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        code = hr.main(list(argv), out=out)
    return code, out.getvalue(), err.getvalue()


def wait_until(predicate, timeout=10, interval=0.01):
    """Poll ``predicate`` until it is true; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout} s: {predicate}")
        time.sleep(interval)


class RunningClock:
    """A receiver's clock in a test: it reads ``start`` (by default
    TEST_NOW) when made, then runs on as time passes (the monotonic clock),
    and ``advance`` moves it on at once."""

    def __init__(self, start=None):
        self.start = start or TEST_NOW
        self._began = time.monotonic()

    def __call__(self):
        return self.start + datetime.timedelta(seconds=time.monotonic() - self._began)

    def advance(self, **delta):
        self.start += datetime.timedelta(**delta)


class ServerTestCase(unittest.TestCase):
    """Starts a receiver on 127.0.0.1:0 in a thread for each test, its
    clock a RunningClock from ``clock_start``."""

    token = None
    auth_header = None
    max_body = 1 * hr.MIB
    timeout = 5.0
    max_tmp = 256 * hr.MIB
    tls = False
    #: Short: the tests of a locked database wait this long.
    busy_timeout = 0.5
    #: When the receiver's clock starts (None: TEST_NOW).
    clock_start = None

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.db = os.path.join(self.tmp.name, "health.db")
        self.log = io.StringIO()
        self.clock = RunningClock(self.clock_start)
        options = {"clock": self.clock}
        options.update(self.server_options())
        self.config = hr.ReceiverConfig(
            host="127.0.0.1", port=0, db=self.db, keys=hr.Keys.single(self.token, self.auth_header),
            max_body=self.max_body, timeout=self.timeout, max_tmp=self.max_tmp, log_stream=self.log, **options)
        self.store = hr.Store(self.db, busy_timeout=self.busy_timeout, clock=self.config.clock)
        self.store.open()
        self.server = hr.HealthReceiverServer(self.config, self.store)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def server_options(self):
        return {}

    def tearDown(self):
        self.server.shutdown()
        self.thread.join()
        self.server.server_close()
        self.store.close()
        self.tmp.cleanup()

    # -- helpers -------------------------------------------------------------

    def connection(self, timeout=10):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path=hr.DEFAULT_PATH, body=None, headers=None, conn=None):
        """Return (status, headers, decoded JSON body or raw bytes)."""
        headers = dict(headers or {})
        if body is not None and not isinstance(body, (bytes, bytearray)) and not hasattr(body, "__next__"):
            body = encode(body)  # an iterator is sent chunked
        if body is not None:
            headers.setdefault("Content-Type", "application/json")
        owned = conn is None
        conn = conn or self.connection()
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            if owned:
                conn.close()
        try:
            data = json.loads(data) if data else data
        except ValueError:
            pass
        return response.status, response, data

    def post(self, payload, headers=None, **kwargs):
        return self.request("POST", body=payload, headers=headers, **kwargs)

    def raw_exchange(self, data, read_timeout=5):
        """Send raw bytes, return everything the server answers until close."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=read_timeout) as sock:
            sock.sendall(data)
            chunks = []
            with contextlib.suppress(socket.timeout, ConnectionError):
                for chunk in iter(lambda: sock.recv(65536), b""):
                    chunks.append(chunk)
            return b"".join(chunks)

    def query(self, sql, params=()):
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            return conn.execute(sql, params).fetchall()

    def count(self, table):
        return self.query("SELECT count(*) FROM " + table)[0][0]

    def counts(self):
        return {table: self.count(table) for table in hr.TABLES}

    def assert_nothing_stored(self):
        for section in hr.SECTIONS:
            self.assertEqual(self.count(section.table), 0, section.table)
        self.assertEqual(self.count("rejected"), 0)

    def assert_rejected_whole(self, body, fragment=None):
        """A body broken as a whole: 400 with a clear message, nothing
        stored, a syncs row kept with the error, the server unharmed."""
        status, _, answer = self.post(body)
        self.assert_error(status, 400, answer, fragment)
        self.assert_nothing_stored()
        self.assertEqual(self.query("SELECT status, error FROM syncs ORDER BY id DESC LIMIT 1"),
                         [("rejected", answer["error"])])
        self.assertEqual(self.request("GET")[0], 200)
        self.assertEqual(self.query("PRAGMA integrity_check"), [("ok",)])
        return answer

    def assert_error(self, status, expected_status, data, fragment=None):
        self.assertEqual(status, expected_status, data)
        self.assertIsInstance(data, dict, data)
        self.assertIs(data["ok"], False)
        self.assertIsInstance(data["error"], str)
        self.assertNotIn("Traceback", data["error"])
        self.assertNotIn("\n", data["error"])
        if fragment:
            self.assertIn(fragment, data["error"])

    def log_lines(self):
        return self.log.getvalue().splitlines()


# ---------------------------------------------------------------------------
# Ingest, without a socket: dates, the sections registry, the JSON walker
# ---------------------------------------------------------------------------

def walk(body, pieces=None):
    """Feed ``body`` (bytes or a payload) straight to the walker, in one
    piece or cut into ``pieces`` (read one at a time): return ({section
    name or "rejected": rows}, the payload)."""
    body = body if isinstance(body, bytes) else encode(body)
    payload = hr.Payload(pieces if pieces is not None else [body], read_ahead=1)
    rows = {}
    for section, batch in payload.batches():
        rows.setdefault(section.name if section else "rejected", []).extend(batch)
    return rows, payload


class DateTests(unittest.TestCase):

    def test_every_accepted_form_becomes_canonical_utc(self):
        cases = {
            "2026-02-24T08:00:00.000Z": "2026-02-24T08:00:00.000Z",
            "2026-02-24T08:00:00Z": "2026-02-24T08:00:00.000Z",
            "2026-02-24T08:00:00.123456Z": "2026-02-24T08:00:00.123Z",
            "2026-02-24T08:00:00.5Z": "2026-02-24T08:00:00.500Z",
            "2026-02-24T09:00:00+01:00": "2026-02-24T08:00:00.000Z",
            "2026-02-24T09:00:00+0100": "2026-02-24T08:00:00.000Z",
            "2026-02-24T09:00:00.250+01:00": "2026-02-24T08:00:00.250Z",
            "2026-02-24 09:00:00 +0100": "2026-02-24T08:00:00.000Z",
            "2026-02-24T00:30:00-05:00": "2026-02-24T05:30:00.000Z",
            "2026-02-24T00:30:00+05:30": "2026-02-23T19:00:00.000Z",
            "2026-02-24T08:00:00": "2026-02-24T08:00:00.000Z",  # no offset: taken as UTC
            "2026-02-24T08:00": "2026-02-24T08:00:00.000Z",
            "2026-02-24": "2026-02-24T00:00:00.000Z",
        }
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(hr.utc_date(text), expected)

    def test_what_is_not_a_date(self):
        for value in ("yesterday", "", " ", "0000-01-01", "1899-12-31T23:59:59Z", "2026-13-01", "2026-02-30",
                      "2026-02-24T25:00:00Z", "2026", "24/02/2026", "2026-02-24T08:00:00+25:00", None, 12, 1.5,
                      ["2026-02-24"], "2026-02-24T08:00:00.000Zjunk"):
            with self.subTest(value=value):
                self.assertIsNone(hr.utc_date(value))

    def test_a_date_in_the_stored_form_is_one_that_exists(self):
        impossible = ["0000-00-00T00:00:00.000Z", "2026-02-30T08:00:00.000Z", "2026-13-01T08:00:00.000Z",
                      "2026-04-31T08:00:00.000Z", "2026-00-10T08:00:00.000Z", "2026-01-00T08:00:00.000Z",
                      "2026-02-24T24:00:00.000Z", "2026-02-24T08:60:00.000Z", "2026-02-24T08:00:60.000Z",
                      "2025-02-29T08:00:00.000Z", "2100-02-29T08:00:00.000Z", "1899-12-31T23:59:59.000Z",
                      "2200-01-01T00:00:00.000Z",
                      "\uff12\uff10\uff12\uff16-02-24T08:00:00.000Z",  # fullwidth digits
                      "\u0662\u0660\u0662\u0666-02-24T08:00:00.000Z",  # Arabic-Indic digits
                      "2026-02-24T08:00:00.\u0661\u0662\u0663Z", "\u0662\u0660\u0662\u0666-02-24"]
        for text in impossible:
            with self.subTest(text=text):
                self.assertIsNone(hr.utc_date(text))
                self.assertFalse(hr.are_canonical_dates(hr.CANONICAL_FILLER + text + hr.CANONICAL_FILLER))
        for text in ("2024-02-29T08:00:00.000Z", "2000-02-29T23:59:59.999Z", "2026-12-31T00:00:00.000Z",
                     "1900-01-01T00:00:00.000Z", "2199-12-31T23:59:59.999Z"):
            with self.subTest(text=text):
                self.assertEqual(hr.utc_date(text), text)
                self.assertTrue(hr.are_canonical_dates(hr.CANONICAL_FILLER + text) or "-02-29T" in text)

    def test_years_at_the_limits(self):
        first, last = hr.DATE_YEARS
        self.assertEqual(hr.utc_date(f"{first}-01-01"), f"{first}-01-01T00:00:00.000Z")
        self.assertEqual(hr.utc_date(f"{last}-12-31"), f"{last}-12-31T00:00:00.000Z")
        self.assertIsNone(hr.utc_date(f"{first - 1}-12-31"))
        self.assertIsNone(hr.utc_date(f"{last + 1}-01-01"))


class SectionRegistryTests(unittest.TestCase):

    def test_every_section_has_one_name_and_its_sql_runs(self):
        self.assertEqual(len(hr.SECTIONS_BY_NAME), len(hr.SECTIONS))
        self.assertEqual(len({section.table for section in hr.SECTIONS}), len(hr.SECTIONS))
        with contextlib.closing(sqlite3.connect(":memory:")) as conn:
            conn.execute("ATTACH DATABASE ':memory:' AS stage")
            for section in hr.SECTIONS:
                with self.subTest(section=section.name):
                    for statement in section.create_sql:
                        conn.execute(statement)
                    conn.execute(section.stage_create_sql.replace("TABLE ", "TABLE stage.", 1))
                    row = tuple(f"v{i}" for i in range(len(section.columns)))
                    conn.execute(section.stage_insert_sql.replace("INTO ", "INTO stage.", 1), row)
                    for person in (1, 2):  # the same element, two people's: a row each
                        self.assertEqual(conn.execute(section.count_new_sql, {"person": person}).fetchone(), (1,))
                        self.assertEqual(conn.execute(section.merge_sql(), {"sync_id": 7, "person": person}).rowcount,
                                         1)
                        self.assertEqual(conn.execute(section.count_new_sql, {"person": person}).fetchone(), (0,))
                    stored = conn.execute(f"SELECT {', '.join((hr.PERSON_COLUMN,) + section.column_names)}"
                                          f" FROM {section.table}").fetchall()
                    values = dict(zip([name for name, _type in section.columns], row))
                    self.assertEqual(stored, [(person,) + tuple(values.get(name, 7) for name in section.column_names)
                                              for person in (1, 2)])

    def test_derived_lists_follow_the_registry(self):
        self.assertEqual(hr.TABLES[:len(hr.SECTIONS)], tuple(section.table for section in hr.SECTIONS))
        self.assertTrue(set(hr.EXPORTS) >= set(hr.SECTIONS_BY_NAME))
        for section in hr.SECTIONS:
            self.assertEqual(hr.EXPORTS[section.name].columns, section.column_names)
        answer = hr.SyncResult().response()
        self.assertEqual(set(answer["inserted"]), {s.bucket for s in hr.SECTIONS if s.bucket})
        self.assertIs(hr.DEFAULT_SECTION, hr.SECTIONS_BY_NAME["samples"])


class JsonReaderTests(unittest.TestCase):
    """The streaming JSON reader alone, on documents cut in tiny pieces."""

    def reader(self, document, size=3):
        return hr.JsonReader([document[i:i + size] for i in range(0, len(document), size)], read_ahead=1)

    def test_an_array_element_by_element_with_its_text(self):
        document = '[{"a": 1}, "caf\\u00e9", "café", [1, [2]], 12.5e1 ,null]'.encode()
        reader = self.reader(document)
        self.assertEqual(reader.start(), 0)
        found = list(reader.elements(0))
        self.assertEqual(reader.end, len(document.decode()))  # a position in the text
        self.assertEqual([raw for _value, raw in found],
                         ['{"a": 1}', '"caf\\u00e9"', '"café"', "[1, [2]]", "12.5e1", "null"])
        self.assertEqual([value for value, _raw in found], [{"a": 1}, "café", "café", [1, [2]], 125.0, None])

    def test_an_object_member_by_member(self):
        document = b'\xef\xbb\xbf { "k\xc3\xa9" : [1,2] , "n": {"deep": true} }  '
        reader = self.reader(document)
        members = {}

        def member(key, pos):
            value, raw, end = reader.value(pos)
            members[key] = (value, raw)
            return end
            yield  # a generator, as walk_object delegates to it

        self.assertEqual(list(reader.walk_object(reader.start(), member)), [])
        self.assertEqual(members, {"ké": ([1, 2], "[1,2]"), "n": ({"deep": True}, '{"deep": true}')})
        self.assertEqual(reader.size, len(document))

    def test_numbers_cut_anywhere_by_the_pieces(self):
        document = b'[12.5e1 ,-0.25,3E+2, 1e-5,7]'
        for size in range(1, len(document) + 1):
            with self.subTest(size=size):
                reader = self.reader(document, size)
                self.assertEqual([value for value, _raw in reader.elements(reader.start())],
                                 [125.0, -0.25, 300.0, 1e-05, 7])

    def test_errors_name_the_byte_wherever_the_pieces_end(self):
        for document, byte, what in ((b'[1, 2,, 3]', 6, "expected a value"), (b'[1 2]', 3, "expected ','"),
                                     (b'["\xff"]', 2, "not valid UTF-8"), (b'[NaN]', 1, "NaN"),
                                     (b'["\xc3\xa9\xf0\x9f\x8f\x83", 1,, 2]', 13, "expected a value"),
                                     (b'["\xc3\xa9", "\xc3"]', 8, "not valid UTF-8"),
                                     (b'["\xc3\xa9", "\xe2\x80', 8, "not valid UTF-8")):
            for size in (1, 2, 100):
                with self.subTest(document=document, size=size):
                    with self.assertRaisesRegex(hr.PayloadError, what) as caught:
                        list(self.reader(document, size).elements(0))
                    self.assertIn(f"byte {byte}", str(caught.exception))


    def test_a_value_longer_than_value_max_is_handed_out_in_parts_as_it_arrives(self):
        values = ['"' + 'ab\\\\c\\"d\u00e9\U0001F3C3[{x' * 9 + '"', '-' + '7' * 150 + 'e-5',
                  '[' + ','.join(['{"a":"]}\\"[","b":[1,2,{"c":"\u00e9"}]}'] * 5) + ']',
                  '{"k":' * 30 + '1' + '}' * 30, '[' * 40 + ']' * 40, '[' * 150 + '"]]"' + ']' * 150]
        for text in values:
            document = ("[1," + text + ', "after"]').encode()
            for size, part_bytes in ((1, 1), (3, 5), (7, 13), (64, 1000), (1000, 7)):
                with self.subTest(text=text[:20], size=size, part_bytes=part_bytes):
                    reader = hr.JsonReader([document[i:i + size] for i in range(0, len(document), size)],
                                           read_ahead=8, value_max=40)
                    reader.part_bytes = part_bytes
                    found = []
                    for value, raw in reader.elements(reader.start()):
                        if raw is None:
                            parts = list(value.parts())
                            found.append(("parts", parts, value.size, value.head))
                            self.assertTrue(all(len(part.encode()) <= part_bytes + 3 for part in parts))  # a cut character goes with the next
                        else:
                            found.append(value)
                    self.assertEqual(found, [1, ("parts", found[1][1], len(text.encode()), text[:hr.OVERSIZED_HEAD]),
                                             "after"])
                    self.assertEqual("".join(found[1][1]), text)
                    self.assertEqual(reader.end, len(document.decode()))
                    self.assertLess(len(reader.text), 40 + 2 * 64 + 1000)  # never the whole value

    def test_a_value_within_value_max_is_read_wherever_a_piece_ends(self):
        # The string ends a character before the window does: not a number,
        # it cannot go on, so the window after it does not count.
        reader = hr.JsonReader([b'["abcdef",', b' 1]'], read_ahead=1, value_max=8)
        self.assertEqual([(value, raw) for value, raw in reader.elements(reader.start())],
                         [("abcdef", '"abcdef"'), (1, "1")])

    def test_a_run_of_backslashes_in_an_oversized_string_is_read_once(self):
        text = '"a' + "\\" * 4000 + '"'  # 2,000 escaped backslashes; each piece ends after an odd number
        document = ("[" + text + "]").encode()
        reader = hr.JsonReader([document[i:i + 8] for i in range(0, len(document), 8)], read_ahead=8, value_max=40)
        elements = reader.elements(reader.start())
        value, raw = next(elements)
        self.assertIsNone(raw)
        parts, widest = [], 0
        for part in value.parts():
            parts.append(part)
            widest = max(widest, len(reader.text))
        self.assertEqual(list(elements), [])
        self.assertEqual("".join(parts), text)
        self.assertLess(widest, 100)  # the window holds what is not yet scanned, not the run so far

    def test_an_oversized_value_is_still_checked_as_utf8_and_for_its_end(self):
        for document, what in ((b'["' + b"x" * 50 + b'\xff"]', "not valid UTF-8 \\(byte 52\\)"),
                               (b'["' + b"x" * 50, "unexpected end of the body"),
                               (b'[[' + b"1," * 50 + b"1", "unexpected end of the body")):
            with self.subTest(document=document[:5]):
                reader = hr.JsonReader([document[i:i + 4] for i in range(0, len(document), 4)], value_max=40)
                with self.assertRaisesRegex(hr.PayloadError, what):
                    for value, raw in reader.elements(0):
                        if raw is None:
                            list(value.parts())


class WalkerTests(unittest.TestCase):
    """The health grammar over the reader, fed text the way the handler feeds it."""

    def test_oversized_values_and_keys_are_kept_in_parts_in_every_place(self):
        big, key = "v" * 80, "k" * 300
        body = encode({"blob": big, key: 1, "data": {"X": [element("x-1"), big, element("x-2")], "Y": big,
                                                    key + "T": [element("y-1")]},
                       "workouts": big, "characteristics": big, "workoutRoutes": {"w": big, key: []}})
        payload = hr.Payload([body[i:i + 9] for i in range(0, len(body), 9)], read_ahead=1, value_max=60)
        payload.reader.part_bytes = 25
        rows = {}
        for section, batch in payload.batches():
            rows.setdefault(section.name if section else "rejected", []).extend(batch)
        self.assertEqual([row[0] for row in rows["samples"]], ["x-1", "x-2"])
        kept = {}
        for where, reason, text in rows["rejected"]:
            kept.setdefault(where, []).append((reason, text))
        for where, what, text in (("blob", "a string", big), ("X", "a string", big), ("Y", "a string", big),
                                  ("workouts", "a string", big), ("characteristics", "a string", big),
                                  ("workoutRoutes/w", "a string", big), ("top level", "a key", key),
                                  ("data", "a key", key + "T"), ("workoutRoutes", "a key", key)):
            with self.subTest(where=where):
                quoted = json.dumps(text)
                self.assertEqual("".join(part for _, part in kept[where]), quoted)
                prefix = f"{what} of more than 60 bytes, kept as sent (not read) in parts to be joined in order: part"
                count = -(-len(quoted) // 25)
                self.assertEqual([reason for reason, _ in kept[where]],
                                 [f"{prefix} {number}" for number in range(1, count)]
                                 + [f"{prefix} {count}, the last ({len(quoted):,} bytes in all)"])
        # What an oversized key held is read under the key's beginning.
        self.assertEqual(payload.envelope, {"k" * hr.TYPE_NAME_MAX + "\u2026": 1})
        self.assertEqual([json.loads(text)["uuid"] for reason, text in kept["k" * hr.TYPE_NAME_MAX + "\u2026"]], ["y-1"])

    def test_the_arrays_of_one_sync_are_bounded(self):
        body = encode({"data": {f"T{number}": [element(f"t-{number}")] for number in range(hr.ARRAYS_MAX + 2)}})
        rows, payload = walk(body, [body])
        self.assertEqual(len(rows["samples"]), hr.ARRAYS_MAX)
        self.assertEqual(payload.sections, hr.ARRAYS_MAX + 2)
        self.assertEqual([(where, reason, json.loads(text)["uuid"]) for where, reason, text in rows["rejected"]],
                         [(f"T{number}", f"more than {hr.ARRAYS_MAX:,} arrays of samples in one sync", f"t-{number}")
                          for number in (hr.ARRAYS_MAX, hr.ARRAYS_MAX + 1)])

    def test_every_section_yields_its_rows(self):
        rows, payload = walk(make_payload(n=2))
        self.assertEqual({name: len(batch) for name, batch in rows.items()},
                         {"characteristics": 2, "samples": 5, "workouts": 1, "medications": 2, "doses": 1,
                          "routes": 4})
        self.assertEqual(payload.envelope["syncSource"], "manual-upload")
        self.assertNotIn("data", payload.envelope)
        self.assertEqual(payload.sections, len(make_payload()["data"]))

    def test_sample_row_columns(self):
        rows, _ = walk({"data": {"HKQuantityTypeIdentifierHeartRate": [
            sample("U-1", "2026-02-24T09:00:00+01:00", 61.5, endDate="2026-02-24T09:01:00+01:00")]}})
        (uuid, type_name, start, end, value, unit, source, record, _low, _high), = rows["samples"]
        self.assertEqual((uuid, type_name, start, end, value, unit, source),
                         ("U-1", "HKQuantityTypeIdentifierHeartRate", "2026-02-24T08:00:00.000Z",
                          "2026-02-24T08:01:00.000Z", 61.5, "count/min", "Watch"))
        self.assertIn('"2026-02-24T09:00:00+01:00"', record)

    def test_elements_that_cannot_be_rows_are_set_aside(self):
        rows, _ = walk({"data": {"X": [1, {"uuid": "a"}, {"uuid": "b", "startDate": "yesterday"},
                                       {"uuid": "c", "startDate": "2026-02-24T00:00:00Z"}]}})
        self.assertEqual([row[0] for row in rows["samples"]], ["c"])
        self.assertEqual([(where, reason) for where, reason, _record in rows["rejected"]],
                         [("X", "element is a number, not an object"), ("X", "startDate missing or not a string"),
                          ("X", "startDate is not a date")])

    def test_whole_body_errors_name_the_byte(self):
        body = b'{"data": {"X": [{"uuid": "a"}, {"uuid": }]}}'
        with self.assertRaises(hr.PayloadError) as caught:
            walk(body)
        self.assertIn(f"byte {body.index(b': }') + 2}:", str(caught.exception))
        self.assertTrue(walk(b" ")[1].empty)  # nothing: not an error (a connection test)
        for body, fragment in ((b"[]", "not an array"), (b'{"data": 5}', "'data' must be"),
                               (b'{"a": 1} x', "unexpected data"), (b'{"a": "\xff"}', "not valid UTF-8")):
            with self.subTest(body=body):
                with self.assertRaisesRegex(hr.PayloadError, fragment):
                    walk(body)

    def test_non_ascii_is_read_from_the_real_text(self):
        payload = {"data": {"HKQuantityTypeIdentifierHeartRate": [
            sample("\u00fc-1", "2026-02-24T00:00:00Z", 1, sourceName="Jane\u2019s Watch"),
            sample("e-2", "2026-02-24T00:00:01Z", 2, sourceName="\\u00e9", note="\u6f22")]}}
        for ensure_ascii in (True, False):
            with self.subTest(ensure_ascii=ensure_ascii):
                rows, _ = walk(json.dumps(payload, ensure_ascii=ensure_ascii).encode("utf-8"))
                self.assertEqual([(row[0], row[6]) for row in rows["samples"]],
                                 [("\u00fc-1", "Jane\u2019s Watch"), ("e-2", "\\u00e9")])
                self.assertEqual(json.loads(rows["samples"][1][7])["note"], "\u6f22")

    def test_a_body_cut_anywhere_gives_the_same_rows(self):
        payload = make_payload(n=2)
        payload["data"]["HKQuantityTypeIdentifierHeartRate"].append(
            sample("\u00fc-9", "2026-02-24T09:00:00+01:00", 1e-3, sourceName="Jane\u2019s \\u Watch"))
        payload["data"]["X"] = [12345, True, None, "text", {"uuid": "n", "startDate": "2026-02-24", "v": -0.5e10}]
        body = json.dumps(payload, ensure_ascii=False, indent=1).encode("utf-8")
        whole, whole_payload = walk(body)
        for cut in range(1, len(body)):
            with self.subTest(cut=cut):
                rows, cut_payload = walk(body, [body[:cut], body[cut:]])
                self.assertEqual(rows, whole)
                self.assertEqual(cut_payload.envelope_text, whole_payload.envelope_text)
        rows, one_byte = walk(body, [body[i:i + 1] for i in range(len(body))])
        self.assertEqual(rows, whole)
        self.assertEqual(one_byte.size, len(body))

    def test_an_error_names_its_byte_wherever_the_pieces_end(self):
        body = encode(make_payload(n=20))
        at = body.index(b'": ', 900) + 1
        broken = body[:at] + b"]" + body[at + 1:]
        with self.assertRaises(hr.PayloadError) as whole:
            walk(broken)
        self.assertIn(f"byte {at}:", str(whole.exception))
        for size in (1, 7, 100, at - 1, at, at + 1):
            with self.subTest(size=size):
                with self.assertRaises(hr.PayloadError) as caught:
                    walk(broken, [broken[i:i + size] for i in range(0, len(broken), size)])
                self.assertEqual(str(caught.exception), str(whole.exception))

    def test_leading_members_are_the_short_fields_before_the_first_other_member(self):
        self.assertEqual(hr.leading_members(encode(make_payload())), {
            "exportDate": "2026-02-26T00:00:00.000Z", "startDate": "2026-02-24T00:00:00.000Z",
            "endDate": "2026-02-26T00:00:00.000Z", "syncSource": "manual-upload"})
        self.assertEqual(hr.leading_members(b'\xef\xbb\xbf {"a": "x\\"\xc3\xa9", "b": -1.5e3, "c": null, "d": true}'),
                         {"a": 'x"\u00e9', "b": -1500.0, "c": None, "d": True})
        for head in (b"", b"[1]", b'{"data": {}}', b'{"a": "' + b"x" * 300 + b'"}', b'{"a": 01}', b'{"a" 1}'):
            self.assertEqual(hr.leading_members(head), {}, head)
        many = b"{" + b",".join(b'"k%d": %d' % (i, i) for i in range(500)) + b"}"
        self.assertEqual(len(hr.leading_members(many)), hr.LEADING_MEMBERS_MAX)
        self.assertEqual(hr.leading_members(b'{"a": 1, "b": "cut'), {"a": 1})

    def test_a_body_digest_is_the_same_however_its_pieces_are_cut(self):
        data = random.Random(3).getrandbits(8 * (2 * hr.BODY_BLOCK + 999)).to_bytes(2 * hr.BODY_BLOCK + 999, "little")
        blocks = "".join(f"{zlib.crc32(data[at:at + hr.BODY_BLOCK]):08x}" for at in range(0, len(data), hr.BODY_BLOCK))
        for cut in (7, 65536, hr.BODY_BLOCK - 1, hr.BODY_BLOCK, 3 * hr.BODY_BLOCK):
            digest = hr.BodyDigest(data[at:at + cut] for at in range(0, len(data), cut))
            self.assertEqual(digest.head(100)[:100], data[:100])
            self.assertEqual(b"".join(digest), data)
            self.assertEqual((digest.hexdigest(), digest.block_digests(), digest.size),
                             (hashlib.sha256(data).hexdigest(), blocks, len(data)), cut)

    def test_the_window_holds_an_element_not_the_body(self):
        body = encode({"data": {"X": [sample(f"W-{i}", "2026-02-24T00:00:00Z", i) for i in range(3000)]}})
        windows = []

        def pieces():
            for start in range(0, len(body), 1000):
                windows.append(len(payload.reader.text))
                yield body[start:start + 1000]

        payload = hr.Payload(pieces(), read_ahead=1000)
        rows = sum(len(batch) for _section, batch in payload.batches())
        self.assertEqual(rows, 3000)
        self.assertGreater(len(body), 300000)
        self.assertEqual(len(windows), -(-len(body) // 1000))
        self.assertLess(max(windows), 2000)

    def test_a_staged_run_knows_its_order_and_its_stretches(self):
        cases = {  # batches of (first rowid, values): (ascending, descending, in order, ranges, low, high)
            "ascending": ([(1, ["a", "b"]), (3, ["b", "c"])], True, False, True, [[1, 4]], "a", "c"),
            "descending": ([(1, ["c", "b"]), (3, ["b"]), (9, ["a"])], False, True, True, [[1, 3], [9, 9]], "a", "c"),
            "all equal": ([(1, ["a", "a"]), (3, ["a"])], True, True, True, [[1, 3]], "a", "a"),
            "unordered batch": ([(1, ["b", "a", "c"])], False, False, False, [[1, 3]], "a", "c"),
            "unordered across batches": ([(1, ["a", "c"]), (3, ["b", "d"])], False, False, False, [[1, 4]], "a", "d"),
            "one value": ([(5, ["x"])], True, True, True, [[5, 5]], "x", "x"),
        }
        for name, (batches, ascending, descending, in_order, ranges, low, high) in cases.items():
            with self.subTest(name):
                run = hr.StagedRun()
                for first, values in batches:
                    run.add(first, values)
                self.assertEqual((run.ascending, run.descending, run.in_order), (ascending, descending, in_order))
                self.assertEqual((run.ranges, run.low, run.high), (ranges, low, high))

    def test_content_key_is_order_independent(self):
        self.assertEqual(hr.content_key("S", {"a": 1, "b": [2]}), hr.content_key("S", {"b": [2], "a": 1}))
        self.assertNotEqual(hr.content_key("S", {"a": 1}), hr.content_key("T", {"a": 1}))


# ---------------------------------------------------------------------------
# Storage: layout, identity, migrations
# ---------------------------------------------------------------------------

#: Schema version 1 as receivers up to 1.0 created it (written out here, not
#: taken from the module: the test must hold whatever the module becomes).
SCHEMA_V1_FOR_TESTS = """
CREATE TABLE syncs (id INTEGER PRIMARY KEY, received_at TEXT NOT NULL, remote_addr TEXT, sync_source TEXT,
    export_date TEXT, start_date TEXT, end_date TEXT, body_bytes INTEGER, received INTEGER NOT NULL DEFAULT 0,
    inserted INTEGER NOT NULL DEFAULT 0, duplicates INTEGER NOT NULL DEFAULT 0, rejected INTEGER NOT NULL DEFAULT 0,
    route_points INTEGER NOT NULL DEFAULT 0, route_points_inserted INTEGER NOT NULL DEFAULT 0,
    sections INTEGER NOT NULL DEFAULT 0, duration_ms INTEGER, status TEXT NOT NULL, error TEXT, envelope TEXT);
CREATE TABLE samples (uuid TEXT PRIMARY KEY, type TEXT NOT NULL, start_date TEXT NOT NULL, end_date TEXT, value,
    unit TEXT, source_name TEXT, record TEXT NOT NULL, sync_id INTEGER NOT NULL);
CREATE INDEX samples_type_start ON samples (type, start_date);
CREATE TABLE workouts (uuid TEXT PRIMARY KEY, activity_type TEXT, start_date TEXT NOT NULL, end_date TEXT,
    duration_seconds REAL, record TEXT NOT NULL, sync_id INTEGER NOT NULL);
CREATE INDEX workouts_start ON workouts (start_date);
CREATE TABLE workout_route_points (workout_uuid TEXT NOT NULL, timestamp TEXT NOT NULL, latitude REAL,
    longitude REAL, altitude REAL, record TEXT NOT NULL, sync_id INTEGER NOT NULL, UNIQUE (workout_uuid, timestamp));
CREATE TABLE medication_dose_events (uuid TEXT PRIMARY KEY, medication TEXT, start_date TEXT NOT NULL,
    log_status TEXT, record TEXT NOT NULL, sync_id INTEGER NOT NULL);
CREATE TABLE medications (key TEXT PRIMARY KEY, display_text TEXT, record TEXT NOT NULL,
    first_sync_id INTEGER NOT NULL, last_sync_id INTEGER NOT NULL);
CREATE TABLE characteristics (name TEXT PRIMARY KEY, value, sync_id INTEGER NOT NULL);
CREATE TABLE rejected (id INTEGER PRIMARY KEY, sync_id INTEGER NOT NULL, section TEXT, reason TEXT NOT NULL,
    record TEXT NOT NULL);
CREATE INDEX rejected_sync ON rejected (sync_id);
CREATE TABLE sample_types (type TEXT PRIMARY KEY, rows INTEGER NOT NULL, first_date TEXT, last_date TEXT);
PRAGMA user_version = 1;
"""


def make_v1_database(path, payload, extra_samples=0):
    """A version-1 database holding ``payload`` as a 1.0 receiver stored it
    (dates as sent), plus ``extra_samples`` heart-rate samples."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(SCHEMA_V1_FOR_TESTS)
        conn.execute("PRAGMA journal_mode = WAL")
        with conn:
            conn.execute("INSERT INTO syncs (id, received_at, status, received) VALUES (1, '2026-02-26T00:00:00Z',"
                         " 'ok', 1)")
            for type_name, elements in payload["data"].items():
                for obj in elements:
                    raw = json.dumps(obj)
                    if type_name == "workouts":
                        conn.execute("INSERT INTO workouts VALUES (?, ?, ?, ?, ?, ?, 1)", (
                            obj["uuid"], obj["workoutActivityType"], obj["startDate"], obj["endDate"],
                            obj["durationSeconds"], raw))
                    elif type_name == "medicationDoseEvents":
                        conn.execute("INSERT INTO medication_dose_events VALUES (?, ?, ?, ?, ?, 1)", (
                            obj["uuid"], obj["medicationConceptIdentifier"], obj["startDate"], obj["logStatus"], raw))
                    elif type_name == "medications":
                        conn.execute("INSERT INTO medications VALUES (?, ?, ?, 1, 1)",
                                     (obj["conceptIdentifier"], obj["displayText"], raw))
                    else:
                        uuid = obj.get("uuid") or hr.content_key(type_name, obj)
                        conn.execute("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)", (
                            uuid, type_name, obj["startDate"], obj.get("endDate"), obj["value"], obj["unit"],
                            obj["sourceName"], raw))
            for workout, points in payload.get("workoutRoutes", {}).items():
                for point in points:
                    conn.execute("INSERT INTO workout_route_points VALUES (?, ?, ?, ?, ?, ?, 1)", (
                        workout, point["timestamp"], point["latitude"], point["longitude"], point["altitude"],
                        json.dumps(point)))
            for name, value in payload.get("characteristics", {}).items():
                conn.execute("INSERT INTO characteristics VALUES (?, ?, 1)", (name, value))
            conn.executemany("INSERT INTO samples VALUES (?, 'HKQuantityTypeIdentifierHeartRate', ?, NULL, 60,"
                             " 'count/min', 'Watch', '{}', 1)",
                             ((f"X-{i}", f"2025-01-01T00:00:{i % 60:02d}.{i % 1000:03d}Z")
                              for i in range(extra_samples)))
            conn.execute("INSERT INTO sample_types SELECT type, count(*), min(start_date), max(start_date)"
                         " FROM samples GROUP BY type")


def migrate_to(path, version):
    """Bring a database to ``version`` as the receiver of that version
    did: its steps of MIGRATIONS, in order, each in its own transaction."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        for step in range(conn.execute("PRAGMA user_version").fetchone()[0], version):
            conn.execute("BEGIN")
            hr.MIGRATIONS[step].apply(conn, lambda text: None)
            conn.execute(f"PRAGMA user_version = {step + 1:d}")
            conn.execute("COMMIT")


#: The sections only the other app (Health Auto Export) fills.
OTHER_APP_SECTIONS = ("series", "states_of_mind", "symptoms", "cycle_tracking", "heart_rate_notifications", "ecg",
                      "voltages")


def columns_without_person(path, table):
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [row[1] for row in conn.execute(f"PRAGMA table_info({table})") if row[1] != hr.PERSON_COLUMN]


def rows_without_person(path, table, names=None):
    """A table's rows, all columns but the person's (or ``names``, the
    columns it had before a step added some), in their order."""
    names = names or columns_without_person(path, table)
    if not names:  # a table that a later version makes (a new section's)
        return []
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return sorted(conn.execute(f"SELECT {', '.join(names)} FROM {table}").fetchall(), key=repr)


def v1_payload():
    """A payload with dates in other forms, as a 1.0 receiver kept them."""
    payload = make_payload(n=3, tag="V")
    heart = payload["data"]["HKQuantityTypeIdentifierHeartRate"]
    heart[0]["startDate"] = "2026-02-24T01:00:00+01:00"  # 00:00 UTC
    heart[1]["startDate"] = "2026-02-24 02:00:00 +0100"  # 01:00 UTC
    heart.append(sample("V-HR-bad", "yesterday", 70))
    return payload


class StorageLayoutTests(ServerTestCase):

    def test_same_uuid_in_two_types_is_two_rows(self):
        payload = {"data": {"HKQuantityTypeIdentifierHeartRate": [sample("same", "2026-02-24T00:00:00Z", 60)],
                            "HKQuantityTypeIdentifierStepCount": [sample("same", "2026-02-24T00:00:00Z", 9)]}}
        _, _, answer = self.post(payload)
        self.assertEqual((answer["inserted"]["measurements"], answer["duplicates"]), (2, 0))
        self.assertEqual(self.query("SELECT type, value FROM samples ORDER BY type"),
                         [("HKQuantityTypeIdentifierHeartRate", 60), ("HKQuantityTypeIdentifierStepCount", 9)])

    def test_same_uuid_twice_in_one_type_is_one_row_and_a_duplicate(self):
        twice = [sample("same", "2026-02-24T00:00:00Z", 60), sample("same", "2026-02-24T00:00:00Z", 60)]
        _, _, answer = self.post({"data": {"HKQuantityTypeIdentifierHeartRate": twice}})
        self.assertEqual((answer["count"], answer["inserted"]["measurements"], answer["duplicates"]), (2, 1, 1))
        self.assertEqual(self.count("samples"), 1)

    def test_samples_are_stored_in_time_order_without_a_uuid_index(self):
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            indexes = [row[1] for row in conn.execute("PRAGMA index_list(samples)")]
            key = [row[2] for row in conn.execute("PRAGMA index_info(sqlite_autoindex_samples_1)")]
            plain = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'samples'").fetchone()[0]
        self.assertEqual(indexes, ["sqlite_autoindex_samples_1"])
        self.assertEqual(key, ["person", "type", "start_date", "uuid"])
        self.assertIn("WITHOUT ROWID", plain)

    def test_any_arrival_order_stores_the_same_rows_and_keeps_the_first_of_a_key(self):
        n = hr.BATCH_ROWS + 50  # runs that go on in the next batch
        rng = random.Random(5)
        times = [f"2026-02-24T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}.000Z" for i in range(n)]
        orders = {"Ascending": times, "Descending": times[::-1], "Shuffled": rng.sample(times, n)}
        data = {}
        for name, order in orders.items():
            elements = [sample(f"{name}-{at}", at, 1) for at in order]
            # The same key again, right after (a run still in order), with another value.
            elements.insert(4, sample(f"{name}-{order[3]}", order[3], 2))
            data[f"HKQuantityTypeIdentifier{name}"] = elements
        status, _, answer = self.post({"data": data})
        self.assertEqual(status, 200, answer)
        self.assertEqual((answer["inserted"]["measurements"], answer["duplicates"]), (3 * n, 3))
        for name in orders:
            with self.subTest(order=name):
                rows = self.query("SELECT start_date, uuid, value FROM samples WHERE type = ? ORDER BY start_date",
                                  (f"HKQuantityTypeIdentifier{name}",))
                self.assertEqual(rows, [(at, f"{name}-{at}", 1) for at in times])
                self.assertEqual(self.query("SELECT rows, first_date, last_date FROM sample_types WHERE type = ?",
                                            (f"HKQuantityTypeIdentifier{name}",)), [(n, times[0], times[-1])])

    def test_a_key_twice_in_one_sync_keeps_the_latest_definition_and_the_first_point(self):
        points = [{"timestamp": f"2026-02-24T09:00:0{second}Z", "latitude": n} for n, second in enumerate((3, 1, 2, 1))]
        _, _, answer = self.post({"data": {"medications": [
            {"conceptIdentifier": "rx-1", "displayText": "First"}, {"conceptIdentifier": "rx-2", "displayText": "Two"},
            {"conceptIdentifier": "rx-1", "displayText": "Second"}]}, "workoutRoutes": {"W": points}})
        self.assertEqual((answer["inserted"]["medications"], answer["duplicates"]), (2, 1))
        self.assertEqual(self.query("SELECT key, display_text FROM medications ORDER BY key"),
                         [("rx-1", "Second"), ("rx-2", "Two")])
        self.assertEqual(answer["inserted"]["workoutRoutes"], 3)
        self.assertEqual(self.query("SELECT timestamp, latitude FROM workout_route_points ORDER BY timestamp"),
                         [("2026-02-24T09:00:01.000Z", 1), ("2026-02-24T09:00:02.000Z", 2),
                          ("2026-02-24T09:00:03.000Z", 0)])

    def test_dates_are_canonical_utc_and_records_verbatim(self):
        forms = ["2026-02-24T09:00:00+01:00", "2026-02-24T08:00:01Z", "2026-02-24 09:00:02 +0100",
                 "2026-02-24T08:00:03.123456Z", "2026-02-24T03:00:04-0500"]
        payload = {"data": {"HKQuantityTypeIdentifierHeartRate": [
            sample(f"F-{i}", text, i, endDate=text) for i, text in enumerate(forms)]},
            "workoutRoutes": {"W": [{"timestamp": "2026-02-24T09:00:00+01:00", "latitude": 1}]}}
        self.assertEqual(self.post(payload)[0], 200)
        rows = self.query("SELECT start_date, end_date, record FROM samples ORDER BY start_date")
        self.assertEqual([row[0] for row in rows], ["2026-02-24T08:00:00.000Z", "2026-02-24T08:00:01.000Z",
                                                    "2026-02-24T08:00:02.000Z", "2026-02-24T08:00:03.123Z",
                                                    "2026-02-24T08:00:04.000Z"])
        self.assertEqual([row[1] for row in rows], [row[0] for row in rows])
        self.assertEqual([json.loads(row[2])["startDate"] for row in rows], forms)
        self.assertEqual(self.query("SELECT timestamp FROM workout_route_points"), [("2026-02-24T08:00:00.000Z",)])

    def test_a_start_date_that_is_not_a_date_is_rejected_with_the_reason(self):
        bad = ["yesterday", "0000-01-01", 20260224, "", "25/02/2026"]
        payload = {"data": {"HKQuantityTypeIdentifierHeartRate": [sample(f"B-{i}", value, 1)
                                                                  for i, value in enumerate(bad)]}}
        _, _, answer = self.post(payload)
        self.assertEqual((answer["inserted"]["measurements"], answer["rejected"]), (0, 5))
        reasons = sorted(reason for (reason,) in self.query("SELECT reason FROM rejected"))
        self.assertEqual(reasons, ["startDate is not a date"] * 3 + ["startDate missing or not a string"] * 2)
        self.assertEqual(self.query("SELECT count(*) FROM sample_types"), [(0,)])

    def test_dates_in_the_stored_form_that_do_not_exist_are_rejected_in_a_batch_of_good_ones(self):
        impossible = ["0000-00-00T00:00:00.000Z", "2026-02-30T08:00:00.000Z", "2026-13-01T08:00:00.000Z",
                      "2026-02-24T24:00:00.000Z", "2026-02-24T08:00:60.000Z",
                      "\uff12\uff10\uff12\uff16-02-24T08:00:00.000Z", "\u0662\u0660\u0662\u0666-02-24T08:00:00.000Z"]
        good = [sample(f"G-{i}", f"2026-02-24T0{i}:00:00.000Z", 60 + i) for i in range(5)]
        bad = [sample(f"B-{i}", text, 1) for i, text in enumerate(impossible)]
        ended = sample("E-1", "2026-02-24T07:00:00.000Z", 70, endDate="2026-02-24T07:00:60.000Z")
        status, _, answer = self.post({"data": {"HKQuantityTypeIdentifierHeartRate": good + bad + [ended]}})
        self.assertEqual(status, 200, answer)
        self.assertEqual((answer["inserted"]["measurements"], answer["rejected"]), (6, len(impossible)))
        self.assertEqual(self.query("SELECT DISTINCT reason FROM rejected"), [("startDate is not a date",)])
        self.assertEqual(sorted(uuid for (uuid,) in self.query("SELECT json_extract(record, '$.uuid') FROM rejected")),
                         sorted(element["uuid"] for element in bad))
        self.assertEqual(self.query("SELECT end_date FROM samples WHERE uuid = 'E-1'"), [(None,)])  # kept, no end
        self.assertEqual(self.query("SELECT rows, first_date, last_date FROM sample_types"),
                         [(6, "2026-02-24T00:00:00.000Z", "2026-02-24T07:00:00.000Z")])
        self.assertTrue(run_main("verify", "--db", self.db)[1].startswith("OK: "))


class MigrationTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.db = os.path.join(self.tmp.name, "health.db")

    def query(self, sql, params=()):
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            return conn.execute(sql, params).fetchall()

    def open_store(self):
        lines = []
        store = hr.Store(self.db)
        store.open(report=lines.append)
        self.addCleanup(store.close)
        return store, lines

    def hours_match_samples(self):
        """Every sample counted in the hourly totals, and every value of a
        type that is not merged by source priority (cumulative types' totals
        are: HealthAppOracleTests checks those)."""
        def value_unless_merged(rows):
            return [(name, count, None if hr.is_cumulative(name) else value) for name, count, value in rows]

        return (value_unless_merged(self.query(
            "SELECT type, sum(samples), total(total) FROM sample_hours GROUP BY type ORDER BY type"))
                == value_unless_merged(self.query(
                    "SELECT type, count(*), total(value) FROM samples GROUP BY type ORDER BY type")))

    def test_hourly_totals_left_pending_by_a_stopped_process_are_brought_up_to_date_at_start(self):
        store = hr.Store(self.db)
        store.open()
        intake = hr.SyncIntake(store)
        intake.ingest([encode(make_payload(n=5))], "127.0.0.1")
        store.close()  # stopped after the commit, before after_answer() brought the totals up to date
        self.assertGreater(self.query("SELECT count(*) FROM sample_hours_pending")[0][0], 0)
        self.assertFalse(self.hours_match_samples())
        self.open_store()
        self.assertEqual(self.query("SELECT count(*) FROM sample_hours_pending"), [(0,)])
        self.assertTrue(self.hours_match_samples())

    def test_version_1_database_keeps_every_row_and_a_repost_inserts_nothing(self):
        payload = v1_payload()
        make_v1_database(self.db, payload, extra_samples=500)
        before = {table: len(rows_without_person(self.db, table)) for table in hr.TABLES}
        store, lines = self.open_store()
        self.assertTrue(any("schema version 2" in line for line in lines), lines)
        after = {table: self.query(f"SELECT count(*) FROM {table}")[0][0] for table in hr.TABLES}
        self.assertEqual(self.query("PRAGMA user_version"), [(hr.SCHEMA_VERSION,)])
        self.assertEqual(after["samples"], before["samples"] - 1)  # "yesterday" is not a date
        self.assertEqual(after["rejected"], before["rejected"] + 1)
        for table in hr.TABLES:
            if table not in ("samples", "rejected"):
                self.assertEqual(after[table], before[table], table)
        self.assertEqual(self.query("SELECT section, reason, json_extract(record, '$.uuid') FROM rejected"),
                         [("HKQuantityTypeIdentifierHeartRate", "startDate is not a date (migration to version 2)",
                           "V-HR-bad")])
        self.assertEqual(self.query("SELECT start_date FROM samples WHERE uuid IN ('V-HR-0', 'V-HR-1') ORDER BY 1"),
                         [("2026-02-24T00:00:00.000Z",), ("2026-02-24T01:00:00.000Z",)])
        self.assertEqual(self.query("SELECT received_at FROM syncs"), [("2026-02-26T00:00:00.000Z",)])
        self.assertEqual(self.query("SELECT rows FROM sample_types WHERE type = 'HKQuantityTypeIdentifierHeartRate'"),
                         [(503,)])
        self.assertEqual(self.query("PRAGMA integrity_check"), [("ok",)])
        self.assertEqual(self.query("PRAGMA journal_mode"), [("wal",)])
        # The same payload again: nothing new.
        result = hr.SyncIntake(store).ingest([encode(payload)], "test")
        self.assertEqual(result.new_records, 0)
        self.assertEqual(result.inserted["routes"], 0)
        self.assertEqual(result.rejected, 1)

    def test_migrated_schema_is_the_registry_schema(self):
        make_v1_database(self.db, make_payload())
        self.open_store()
        fresh = os.path.join(self.tmp.name, "fresh.db")
        fresh_store = hr.Store(fresh)
        fresh_store.open()
        fresh_store.close()

        def shape(path):
            with contextlib.closing(sqlite3.connect(path)) as conn:
                tables = [name for (name,) in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
                return {table: (conn.execute(f"PRAGMA table_info({table})").fetchall(),
                                sorted(row[1:4] for row in conn.execute(f"PRAGMA index_list({table})")),
                                "WITHOUT ROWID" in conn.execute("SELECT sql FROM sqlite_master WHERE name = ?",
                                                                (table,)).fetchone()[0])
                        for table in tables}

        self.assertEqual(shape(self.db), shape(fresh))
        for section in hr.SECTIONS:
            info = shape(fresh)[section.table][0]
            self.assertEqual(tuple(row[1] for row in info), (hr.PERSON_COLUMN,) + section.column_names)
            self.assertEqual(tuple(row[1] for row in sorted(info, key=lambda r: r[5]) if row[5]),
                             section.stored_key)
        syncs = shape(self.db)[hr.SYNCS.name][0]
        self.assertEqual([(row[1], row[2], bool(row[3]), row[4], bool(row[5])) for row in syncs],
                         [(name, kind.split()[0], "NOT NULL" in kind,
                           kind.split("DEFAULT ")[1] if "DEFAULT" in kind else None,
                           "PRIMARY KEY" in kind) for name, kind in hr.SYNCS.columns])
        self.assertEqual(hr.Sync()._fields, hr.SYNCS.column_names)

    def test_a_newer_database_is_refused_with_a_clear_message(self):
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            conn.execute(f"PRAGMA user_version = {hr.SCHEMA_VERSION + 1}")
        with self.assertRaisesRegex(hr.StorageUnavailable, "newer version of this receiver"):
            hr.Store(self.db).open()
        with contextlib.redirect_stderr(io.StringIO()) as err:
            self.assertEqual(hr.main(["--host", "127.0.0.1", "--port", "0", "--db", self.db]), 1)
        self.assertIn("upgrade health_receiver.py", err.getvalue())

    def test_version_8_totals_are_merged_by_source_priority_and_every_row_kept(self):
        watch, phone = "Jane's Apple Watch", "Jane's iPhone"
        hand = dict(span("h1", "2026-02-24T14:00:00Z", "2026-02-24T15:30:00Z", 3000, "count", "Health"),
                    metadata={"HKWasUserEntered": 1})
        payload = make_payload(n=3)
        payload["data"]["HKQuantityTypeIdentifierStepCount"] = [
            span("w1", "2026-02-24T10:00:00Z", "2026-02-24T10:10:00Z", 1000, "count", watch),
            span("p1", "2026-02-24T10:20:00Z", "2026-02-24T10:30:00Z", 800, "count", phone), hand,
            span("w2", "2026-02-24T14:30:00Z", "2026-02-24T14:31:00Z", 10, "count", watch)]
        make_v1_database(self.db, payload)
        migrate_to(self.db, 8)
        tables = [name for (name,) in self.query("SELECT name FROM sqlite_master WHERE type = 'table'")]
        before = {table: rows_without_person(self.db, table) for table in tables if table != "sample_hours"}
        columns = {table: columns_without_person(self.db, table) for table in before}
        self.assertNotIn("sample_sources", tables)
        _, lines = self.open_store()
        self.assertTrue(any("schema version 9" in line for line in lines), lines)
        self.assertTrue(any("StepCount: hourly totals merged by source priority" in line for line in lines), lines)
        self.assertEqual(self.query("PRAGMA user_version"), [(hr.SCHEMA_VERSION,)])
        self.assertEqual({table: rows_without_person(self.db, table, columns[table]) for table in before}, before)
        # The phone's walk after the Watch's counts; the hand entry hides the Watch's minute under it.
        self.assertEqual(self.query("SELECT round(total(total), 6) FROM sample_hours WHERE type = ?",
                                    ("HKQuantityTypeIdentifierStepCount",)), [(4800.0,)])
        # Sources in the order of their first hour (then by name).
        self.assertEqual([source for (source,) in self.query("SELECT source FROM sample_sources ORDER BY seen")],
                         ["Watch", watch, phone, "Health"])
        self.assertTrue(self.hours_match_samples())

    def test_version_3_hourly_totals_are_rebuilt_spread_over_the_half_hours_and_every_row_kept(self):
        watch, phone = "Jane's Apple Watch", "Jane's iPhone"
        steps = [span("w1", "2026-02-24T07:30:00Z", "2026-02-24T08:00:00Z", 3000, "count", watch),
                 span("w2", "2026-02-24T08:00:00Z", "2026-02-24T08:10:00Z", 1000, "count", watch),
                 span("p1", "2026-02-24T07:30:00Z", "2026-02-24T07:58:00Z", 2700, "count", phone),
                 span("p2", "2026-02-24T07:58:00Z", "2026-02-24T08:10:00Z", 1150, "count", phone)]
        payload = make_payload(n=3)
        payload["data"]["HKQuantityTypeIdentifierStepCount"] = steps
        make_v1_database(self.db, payload)
        migrate_to(self.db, 3)
        # Version 3 kept a sample's whole value in the hour it starts in.
        with contextlib.closing(sqlite3.connect(self.db)) as conn, conn:
            conn.execute("DELETE FROM sample_hours")
            conn.execute("INSERT INTO sample_hours SELECT type, substr(start_date, 1, 13), coalesce(source_name, ''),"
                         " '', count(*), count(value), total(value), min(value), max(value), 0 FROM samples"
                         " GROUP BY 1, 2, 3")
        tables = [name for (name,) in self.query("SELECT name FROM sqlite_master WHERE type = 'table'")]
        before = {table: rows_without_person(self.db, table) for table in tables
                  if table not in ("sample_hours", "syncs")}
        columns = {table: columns_without_person(self.db, table) for table in before}

        def day_of_steps():
            buckets = {}
            for hour, source, total, seconds in self.query(
                    "SELECT hour, source, total, seconds FROM sample_hours WHERE type = ?",
                    ("HKQuantityTypeIdentifierStepCount",)):
                buckets.setdefault(hour, []).append((source, total, seconds))
            return sorted(buckets), sum(total for sources in buckets.values() for _source, total, _seconds in sources)

        self.assertEqual(day_of_steps()[0], ["2026-02-24T07", "2026-02-24T08"])
        self.assertEqual(self.query("SELECT max(seconds) FROM sample_hours"), [(0,)])
        _, lines = self.open_store()
        self.assertTrue(any("schema version 4" in line for line in lines), lines)
        self.assertEqual(self.query("PRAGMA user_version"), [(hr.SCHEMA_VERSION,)])
        self.assertEqual({table: rows_without_person(self.db, table, columns[table]) for table in before}, before)
        hours, total = day_of_steps()
        self.assertEqual((hours, round(total, 9)), (["2026-02-24T07:30", "2026-02-24T08"], 4000))
        self.assertTrue(self.hours_match_samples())

    def test_version_4_rows_are_read_again_from_their_records(self):
        store, _ = self.open_store()
        payload = {"data": {
            "workouts": [{"uuid": "W-1", "workoutActivityType": 37, "startDate": "2026-02-24T07:00:00Z",
                          "duration": {"value": 2, "unit": "min"}}],
            "medicationDoseEvents": [{"uuid": "D-1", "medication": {"identifier": "rx-9"},
                                      "startDate": "2026-02-24T07:00:00Z", "logStatus": 5}],
            "medications": [{"concept": {"identifier": "rx-9", "displayText": "Ibuprofen"}}]},
            "workoutRoutes": {"W-1": [{"time": "2026-02-24T07:00:05Z", "lat": 47.2, "lng": 8.2},
                                      {"timestamp": "2026-02-24T07:00:06Z", "latitude": 47.3, "longitude": 8.3}]}}
        hr.SyncIntake(store).ingest([encode(payload)], "127.0.0.1")
        store.close()
        tables = ("workouts", "medication_dose_events", "workout_route_points")
        expected = {table: rows_without_person(self.db, table) for table in tables}
        self.assertEqual(expected["workouts"][0][1:5:3], ("running", 120.0))
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.db + suffix)
        make_v1_database(self.db, {"data": {}})
        migrate_to(self.db, 4)
        # What version 4 made of them (the route point with "time" it did not read at all).
        with contextlib.closing(sqlite3.connect(self.db)) as conn, conn:
            for table, rows in expected.items():
                conn.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(rows[0]))})", rows)
            conn.execute("UPDATE workouts SET activity_type = 37, duration_seconds = NULL")
            conn.execute("UPDATE medication_dose_events SET medication = NULL, log_status = 5")
            conn.execute("UPDATE workout_route_points SET latitude = NULL, longitude = NULL"
                         " WHERE timestamp < '2026-02-24T07:00:06'")
        _, lines = self.open_store()
        self.assertTrue(any("workouts: 1 of 1 rows read again" in line for line in lines), lines)
        self.assertTrue(any("workout_route_points: 1 of 2 rows read again" in line for line in lines), lines)
        self.assertEqual(self.query("PRAGMA user_version"), [(hr.SCHEMA_VERSION,)])
        self.assertEqual({table: rows_without_person(self.db, table) for table in tables}, expected)

    def test_a_version_3_database_becomes_the_first_persons_every_row_kept_and_its_key_works(self):
        payload = make_payload()
        make_v1_database(self.db, payload)
        migrate_to(self.db, 3)
        before = {table: rows_without_person(self.db, table) for table in hr.TABLES if table != "syncs"}
        names = {table: columns_without_person(self.db, table) for table in before}  # added columns aside
        self.assertGreater(sum(map(len, before.values())), 15)
        store, lines = self.open_store()
        self.assertIn("  samples: 7 rows, the first person's", lines)
        self.assertEqual({table: rows_without_person(self.db, table, names[table]) for table in before}, before)
        for table in hr.OWNED_TABLES + ("syncs",):
            self.assertIn(self.query(f"SELECT DISTINCT person FROM {table}"), ([], [(1,)]), table)
        self.assertEqual(self.query("SELECT id, name, admin, key_sha256 FROM people"), [(1, "me", 1, None)])
        self.assertEqual(self.query("PRAGMA integrity_check"), [("ok",)])
        config = hr.ReceiverConfig(host="127.0.0.1", port=0, db=self.db, keys=hr.Keys.single(TOKEN),
                                   log_stream=io.StringIO())
        server = hr.HealthReceiverServer(config, store)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
            conn.request("GET", hr.SUMMARY_PATH + "?range=all", headers=login(TOKEN))
            facts = json.loads(conn.getresponse().read())
            conn.request("POST", hr.DEFAULT_PATH, body=encode(payload), headers=bearer(TOKEN))
            answer = json.loads(conn.getresponse().read())
            conn.close()
        finally:
            server.shutdown()
            thread.join()
            server.server_close()
        self.assertEqual((facts["person"], facts["totals"]["samples"]), ("me", len(before["samples"])))
        self.assertEqual((answer["ok"], answer["inserted"]["measurements"], answer["rejected"]), (True, 0, 0))

    def test_versions_5_and_6_keep_every_row_and_a_retry_after_the_upgrade_is_answered_from_its_record(self):
        for version in (5, 6):
            with self.subTest(version=version):
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.db + suffix)
                self.upgraded_from(version)

    def upgraded_from(self, version):
        payload = make_payload()
        make_v1_database(self.db, payload)
        migrate_to(self.db, version)
        columns = [row[1] for row in self.query("PRAGMA table_info(syncs)")]
        self.assertNotIn("body_blocks", columns)
        before = {table: rows_without_person(self.db, table) for table in hr.TABLES}
        names = {table: columns_without_person(self.db, table) for table in hr.TABLES if table != "syncs"}
        names["syncs"] = None  # its added columns are checked below; the samples' are left aside
        store, lines = self.open_store()
        self.assertTrue(any(f"schema version {version + 1}" in line for line in lines), lines)
        self.assertEqual(self.query("PRAGMA user_version"), [(hr.SCHEMA_VERSION,)])
        after = {table: rows_without_person(self.db, table, names[table]) for table in hr.TABLES}
        added = (None,) * (len(hr.SYNCS.columns) - len(columns) - 1)  # and person, 1
        self.assertEqual(after.pop("syncs"), sorted((row + added for row in before.pop("syncs")), key=repr))
        self.assertEqual(self.query("SELECT DISTINCT person FROM syncs"), [(1,)])
        self.assertEqual(after, before)
        intake = hr.SyncIntake(store)
        body = encode(payload)
        read = intake.ingest([body], "test", len(body))
        retry = intake.ingest([body[:100], body[100:]], "test", len(body))
        self.assertEqual((read.same_body_as, read.new_records, retry.same_body_as, retry.new_records),
                         (None, 0, read.sync_id, 0))
        self.assertEqual(retry.response(), dict(read.response(), sync_id=retry.sync_id))
        self.assertEqual(self.query("PRAGMA integrity_check"), [("ok",)])

    def test_a_version_9_database_gets_an_id_of_its_own_every_row_kept(self):
        make_v1_database(self.db, make_payload())
        migrate_to(self.db, 9)
        tables = [name for (name,) in self.query("SELECT name FROM sqlite_master WHERE type = 'table'")]
        before = {table: self.query(f"SELECT * FROM {table} ORDER BY 1, 2") for table in tables}
        self.assertEqual(self.query("PRAGMA application_id"), [(0,)])
        _, lines = self.open_store()
        self.assertTrue(any("schema version 10: the database's own id" in line for line in lines), lines)
        self.assertEqual({table: self.query(f"SELECT * FROM {table} ORDER BY 1, 2") for table in tables}, before)
        own = self.query("PRAGMA application_id")[0][0]
        self.assertNotEqual(own, 0)
        self.assertEqual(hr.database_id(self.db), own)
        folder = os.path.join(self.tmp.name, "backups")
        os.mkdir(folder)
        self.assertEqual(run_main("backup", folder, "--db", self.db, "--gzip")[0], 0)
        backup, = os.listdir(folder)
        found = hr.newest_backup(folder, self.db)
        self.assertEqual((found.path, found.database_id), (os.path.join(folder, backup), own))
        other = os.path.join(self.tmp.name, "other.db")
        hr.Store(other).open()
        self.assertNotIn(hr.database_id(other), (0, own))

    def test_version_10_rows_whose_dates_do_not_exist_are_kept_aside_and_the_database_verifies(self):
        make_v1_database(self.db, make_payload())
        migrate_to(self.db, 10)
        heart, steps = "HKQuantityTypeIdentifierHeartRate", "HKQuantityTypeIdentifierStepCount"
        distance = "HKQuantityTypeIdentifierDistanceWalkingRunning"
        bad = [(heart, "2026-02-30T08:00:00.000Z"), (heart, "0000-00-00T00:00:00.000Z"),
               (steps, "2026-02-30T08:00:00.000Z"), (steps, "2026-02-24T24:00:00.000Z"),
               (heart, "\uff12\uff10\uff12\uff16-02-24T08:00:00.000Z"), (heart, "2025-02-29T08:00:00.000Z")]
        with contextlib.closing(sqlite3.connect(self.db)) as conn, conn:  # as version 10 stored them
            conn.executemany("INSERT INTO samples (person, uuid, type, start_date, end_date, value, unit, source_name,"
                             " record, sync_id) VALUES (1, ?, ?, ?, ?, 61, 'count', 'Watch', ?, 1)",
                             [(f"BAD-{n}", type_name, date, date, json.dumps({"uuid": f"BAD-{n}", "startDate": date}))
                              for n, (type_name, date) in enumerate(bad)])
            conn.execute("UPDATE samples SET end_date = '2026-02-24T08:00:60.000Z' WHERE uuid = 'V-HR-1'"
                         " OR uuid = 'A-HR-1'")
            conn.execute("INSERT INTO workouts VALUES (1, 'W-BAD', 'running', '2026-13-01T00:00:00.000Z', NULL, 60,"
                         " '{}', 1)")
            conn.execute("INSERT INTO workout_route_points VALUES (1, 'W-BAD', '2024-02-29T08:00:00.000Z', 1, 2, 3,"
                         " '{}', 1), (1, 'W-BAD', '2026-04-31T08:00:00.000Z', 1, 2, 3, '{}', 1)")
            hr._recount_sample_types(conn)  # they never reached the hourly totals
            # A sample whose end does not exist (hour 24) but which SQLite read
            # as the next day's 00:20: its steps were spread into that hour.
            conn.execute("INSERT INTO samples (person, uuid, type, start_date, end_date, value, unit, source_name,"
                         " record, sync_id) VALUES (1, 'END-24', ?, '2026-02-24T23:30:00.000Z',"
                         " '2026-02-24T24:20:00.000Z', 100, 'm', 'Watch', '{}', 1)", (distance,))
            hr._recount_sample_types(conn)
            hr.merge_all_hours(conn, 1, distance, hr.SOURCE_PRIORITY)
            self.assertEqual(conn.execute("SELECT hour, round(total, 6) FROM sample_hours WHERE type = ?",
                                          (distance,)).fetchall(), [("2026-02-24T23:30", 60.0), ("2026-02-25T00", 40.0)])
        code, out, _ = run_main("verify", "--db", self.db)
        self.assertEqual(code, 1, out)
        self.assertIn("hourly totals disagree", out)
        kept = self.query("SELECT count(*) FROM samples")[0][0] - len(bad)
        _, lines = self.open_store()
        self.assertIn("  samples: 6 rows whose dates do not exist are kept in the rejected table", lines)
        self.assertEqual(self.query("SELECT count(*) FROM samples"), [(kept,)])
        self.assertEqual(self.query("SELECT count(*) FROM samples WHERE uuid LIKE 'BAD-%'"), [(0,)])
        self.assertEqual(self.query("SELECT section, reason FROM rejected WHERE reason LIKE '%version 11%'"
                                    " ORDER BY 1, 2"),
                         [(heart, "startDate is not a date (migration to version 11)")] * 4
                         + [(steps, "startDate is not a date (migration to version 11)")] * 2
                         + [("workoutRoutes/W-BAD", "timestamp is not a date (migration to version 11)"),
                            ("workouts", "startDate is not a date (migration to version 11)")])
        self.assertEqual(self.query("SELECT timestamp FROM workout_route_points WHERE workout_uuid = 'W-BAD'"),
                         [("2024-02-29T08:00:00.000Z",)])  # a leap day that exists stays
        self.assertEqual(self.query("SELECT count(*) FROM samples WHERE end_date LIKE '%:60.000Z'"), [(0,)])
        # The sample without its end counts whole where it starts, nothing in the next day.
        self.assertEqual(self.query("SELECT hour, total FROM sample_hours WHERE type = ?", (distance,)),
                         [("2026-02-24T23:30", 100.0)])
        self.assertTrue(self.hours_match_samples())
        code, out, _ = run_main("verify", "--db", self.db)
        self.assertEqual(code, 0, out)

    def test_each_step_is_its_own_transaction(self):
        make_v1_database(self.db, make_payload())
        failing = hr.Migration("a step that fails", lambda conn, report: conn.execute("SELECT * FROM nowhere"))
        original = hr.MIGRATIONS
        hr.MIGRATIONS = original + (failing,)
        hr.SCHEMA_VERSION = len(hr.MIGRATIONS)
        try:
            with self.assertRaises(hr.StorageUnavailable):
                hr.Store(self.db).open()
        finally:
            hr.MIGRATIONS = original
            hr.SCHEMA_VERSION = len(original)
        # The real steps were committed; the failed one left nothing behind.
        self.assertEqual(self.query("PRAGMA user_version"), [(len(original),)])
        self.open_store()
        self.assertEqual(self.query("PRAGMA user_version"), [(hr.SCHEMA_VERSION,)])

    def test_not_enough_free_disk_space_is_refused_before_starting(self):
        make_v1_database(self.db, make_payload())
        store = hr.Store(self.db)
        store.free_space = lambda: 0  # a full disk, as the check sees it
        with self.assertRaisesRegex(hr.StorageUnavailable, "free disk space"):
            store.open()
        self.assertEqual(self.query("PRAGMA user_version"), [(1,)])


class LockedDatabaseTests(ServerTestCase):

    def test_locked_database_503_then_recovers(self):
        blocker = sqlite3.connect(self.db, isolation_level=None)
        with contextlib.closing(blocker):
            blocker.execute("BEGIN EXCLUSIVE")
            status, response, answer = self.post(make_payload())
            self.assert_error(status, 503, answer, "locked")
            self.assertEqual(response.getheader("Retry-After"), str(hr.RETRY_AFTER))
            blocker.execute("ROLLBACK")
        self.assert_nothing_stored()
        self.assertTrue(any("503" in line and "locked" in line for line in self.log_lines()))
        status, _, answer = self.post(make_payload())
        self.assertEqual(status, 200, answer)
        self.assertEqual(self.count("workouts"), 1)
        self.assertEqual(self.query("PRAGMA integrity_check"), [("ok",)])

    def test_concurrent_syncs_against_a_locked_database_all_get_503_then_go_on(self):
        """Each waits at most the busy timeout in all, for another program's
        lock and this receiver's own queue (the bound itself is a figure of
        the README: with four syncs and a lock held 30 s, 11 s each)."""
        blocker = sqlite3.connect(self.db, isolation_level=None, check_same_thread=False)
        answers = []
        with contextlib.closing(blocker):
            blocker.execute("BEGIN EXCLUSIVE")
            threads = [threading.Thread(target=lambda tag=tag: answers.append(self.post(make_payload(tag=tag))))
                       for tag in "ABCD"]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            # Every answer arrived while the lock was still held.
            self.assertEqual(sorted(status for status, _, _ in answers), [503] * 4)
            self.assertEqual({response.getheader("Retry-After") for _, response, _ in answers}, {str(hr.RETRY_AFTER)})
            blocker.execute("ROLLBACK")
        self.assertEqual(self.post(make_payload(tag="E"))[0], 200)


class BackupTests(ServerTestCase):
    """Backups of a database in use, verify and restore."""

    #: Twenty syncs at once queue for the database one after another.
    busy_timeout = hr.BUSY_TIMEOUT

    def backups_folder(self):
        folder = os.path.join(self.tmp.name, "backups")
        os.makedirs(folder, exist_ok=True)
        return folder

    def rows_of(self, path):
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return {table: conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall() for table in hr.TABLES
                    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchone()}

    def test_a_backup_while_syncs_arrive_holds_whole_syncs_and_verifies(self):
        self.assertEqual(self.post(make_payload(n=3000, tag="Z"))[0], 200)
        answers = []
        posting = [threading.Thread(target=lambda tag=tag: answers.append(self.post(make_payload(n=50, tag=tag))))
                   for tag in (f"T{i}" for i in range(20))]
        dest = os.path.join(self.backups_folder(), "copy.db")
        original = hr.BACKUP_STEP_PAGES
        hr.BACKUP_STEP_PAGES = 1  # many steps, between which the syncs go on
        try:
            for thread in posting:
                thread.start()
            record = hr.backup_database(self.db, dest)
            live = run_main("verify", "--db", self.db)  # the live database, syncs arriving
            self.assertEqual(live[0], 0, live[1])
        finally:
            hr.BACKUP_STEP_PAGES = original
            for thread in posting:
                thread.join(30)
        self.assertEqual(sorted(status for status, _, _ in answers), [200] * 20)
        self.assertEqual(stat.S_IMODE(os.stat(dest).st_mode), 0o600)
        code, out, _ = run_main("verify", dest)
        self.assertEqual(code, 0, out)
        self.assertTrue(out.startswith(f"OK: {dest}: integrity_check ok; "), out)
        copied, live = self.rows_of(dest), self.rows_of(self.db)
        synced = [row[0] for row in copied["syncs"]]
        # A prefix of the syncs, each with all its rows: a consistent point.
        self.assertEqual(synced, [row[0] for row in live["syncs"]][:len(synced)])
        for table in ("samples", "workouts", "workout_route_points"):
            at = 1 + next(s for s in hr.SECTIONS if s.table == table).column_names.index("sync_id")
            self.assertEqual(copied[table], [row for row in live[table] if row[at] in synced], table)
        with contextlib.closing(sqlite3.connect(dest)) as conn:
            self.assertEqual(record.rows, sum(hr.table_rows(conn).values()))
            self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "delete")  # one file

    def test_verify_names_what_disagrees(self):
        payload = make_payload(n=30)
        self.assertEqual(self.post(payload)[0], 200)
        wait_until(lambda: not self.query("SELECT 1 FROM sample_hours_pending"))
        code, out, _ = run_main("verify", "--db", self.db)
        self.assertEqual(code, 0, out)
        self.assertRegex(out, r"^OK: .*61 samples in 2 types agree with sample_types; hourly totals agree "
                              r"\(\d+ hours checked one by one\); 1 syncs agree with their rows\n$")
        breakages = [("UPDATE sample_types SET rows = rows + 1 WHERE type LIKE '%Heart%'", "sample_types disagrees"),
                     ("UPDATE sample_hours SET samples = samples + 1 WHERE hour = (SELECT min(hour) FROM"
                      " sample_hours)", "hourly totals disagree"),
                     ("UPDATE workouts SET sync_id = 99", "rows of syncs that are not stored (99)"),
                     ("UPDATE syncs SET inserted = 3", "more rows than syncs 1 stored")]
        for sql, said in breakages:
            with self.subTest(said=said):
                copy = os.path.join(self.tmp.name, "broken.db")
                with contextlib.closing(sqlite3.connect(self.db)) as source, \
                        contextlib.closing(sqlite3.connect(copy)) as target:
                    source.backup(target)
                    target.execute(sql)
                    target.commit()
                code, out, _ = run_main("verify", copy)
                self.assertEqual(code, 1, out)
                self.assertTrue(out.startswith(f"FAILED: {copy}: "), out)
                self.assertIn(said, out)
                os.unlink(copy)

    def test_restore_gives_the_backups_rows_and_keeps_the_database_before(self):
        other = os.path.join(self.tmp.name, "other.db")
        store = hr.Store(other)
        store.open()
        intake = hr.SyncIntake(store)
        intake.after_answer(intake.ingest([encode(make_payload(n=40, tag="A"))], "test"))
        backup = os.path.join(self.backups_folder(), "other.db.gz")
        self.assertEqual(run_main("backup", backup, "--db", other, "--gzip")[0], 0)
        self.assertEqual(stat.S_IMODE(os.stat(backup).st_mode), 0o600)
        with gzip.open(backup) as packed:
            self.assertEqual(packed.read(16), b"SQLite format 3\0")
        saved = self.rows_of(other)
        intake.after_answer(intake.ingest([encode(make_payload(n=40, tag="B"))], "test"))
        store.close()
        later = self.rows_of(other)
        self.assertNotEqual(later, saved)
        code, out, err = run_main("restore", backup, "--db", other)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.rows_of(other), saved)
        kept, = [name for name in os.listdir(self.tmp.name) if name.startswith("other.db.before-restore-")
                 and not name.endswith("-wal")]
        self.assertEqual(self.rows_of(os.path.join(self.tmp.name, kept)), later)
        self.assertIn(kept, out)
        self.assertFalse(os.path.exists(other + "-wal"))
        self.assertEqual(stat.S_IMODE(os.stat(other).st_mode), 0o600)
        # A backup that does not verify changes nothing.
        broken = os.path.join(self.tmp.name, "broken.db")
        with open(broken, "wb") as handle:
            handle.write(b"not a database" * 1000)
        code, _out, err = run_main("restore", broken, "--db", other)
        self.assertNotEqual(code, 0)
        self.assertIn("nothing was changed", err)
        self.assertEqual(self.rows_of(other), saved)

    def test_restore_takes_a_source_with_its_log_and_never_mixes_in_a_stray_log(self):
        other = os.path.join(self.tmp.name, "other.db")
        store = hr.Store(other)
        store.open()
        hr.SyncIntake(store).ingest([encode(make_payload(n=40, tag="A"))], "test")
        # A copy taken while the receiver ran: its last sync is in its log.
        source = os.path.join(self.tmp.name, "copied.db")
        for suffix in ("", "-wal"):
            shutil.copyfile(other + suffix, source + suffix)
        self.assertGreater(os.path.getsize(source + "-wal"), 0)
        expected = self.rows_of(other)
        store.close()
        target = os.path.join(self.tmp.name, "target.db")
        # A log left beside the target's name (its database moved away):
        # never to be read as the restored file's own.
        shutil.copyfile(source + "-wal", target + "-wal")
        kept = []
        for _ in range(2):  # twice in the same second: two names kept
            code, out, err = run_main("restore", source, "--db", target)
            self.assertEqual(code, 0, err)
            self.assertEqual(self.rows_of(target), expected)
            kept.append(re.search(r"is kept as (\S+)", out).group(1))
        self.assertEqual(len(set(kept)), 2, kept)
        self.assertTrue(os.path.exists(kept[0] + "-wal"))  # the stray log, kept
        self.assertEqual(self.rows_of(kept[1]), expected)  # the first restore's result, kept
        self.assertFalse(os.path.exists(target + "-wal"))
        self.assertEqual(run_main("verify", "--db", target)[0], 0)
        self.assertEqual([name for name in os.listdir(self.tmp.name) if "backup-tmp" in name], [])

    def test_a_backup_never_replaces_the_database_or_another_file(self):
        self.assertEqual(self.post(make_payload())[0], 200)
        rows = self.rows_of(self.db)
        inode = os.stat(self.db).st_ino
        for dest in (self.db, self.db + "-wal", os.path.join(self.tmp.name, ".", "health.db")):
            code, _out, err = run_main("backup", dest, "--db", self.db)
            self.assertEqual(code, 2, err)
            self.assertRegex(err, " exists; name a new file| is the database itself")  # the log may be gone
            with self.assertRaisesRegex(hr.UsageError, "is the database itself"):
                hr.backup_database(self.db, dest)
        notes = os.path.join(self.tmp.name, "notes.txt")
        with open(notes, "w") as handle:
            handle.write("mine")
        code, _out, err = run_main("backup", notes, "--db", self.db)
        with open(notes) as handle:
            self.assertEqual((code, handle.read()), (2, "mine"))
        self.assertEqual((os.stat(self.db).st_ino, self.rows_of(self.db)), (inode, rows))

    def test_progress_on_a_terminal_and_none_elsewhere(self):
        self.assertEqual(self.post(make_payload(n=500))[0], 200)

        class Terminal(io.StringIO):
            def isatty(self):
                return True

        folder = self.backups_folder()
        for out, shown in ((Terminal(), True), (io.StringIO(), False)):
            with contextlib.redirect_stderr(io.StringIO()):
                self.assertEqual(hr.main(["backup", folder, "--db", self.db], out=out), 0)
            text = out.getvalue()
            self.assertEqual(bool(re.search(r"\r  (\d+) of \1 pages \(\d+ of \d+ MB\), 0 s left", text)), shown, text)
            self.assertRegex(text, r"Backup .*verified")

    def test_backups_made_in_the_same_second_each_keep_a_name_of_their_own(self):
        folder = self.backups_folder()
        self.assertEqual(self.post(make_payload())[0], 200)
        # Each chose its name before any had taken it, as two makers at once do.
        dest = hr.new_backup_path(folder, self.db, now=TEST_NOW)
        stem = os.path.basename(dest)[:-len(".db")]
        no_links = unittest.mock.Mock(side_effect=PermissionError(errno.EPERM, "no hard links here"))
        for link, numbers in ((os.link, ("", "-2", "-3")), (no_links, ("-4", "-5", "-6"))):
            with self.subTest(hard_links=link is os.link), unittest.mock.patch.object(hr.os, "link", link):
                records = [hr.backup_database(self.db, dest, clock=lambda: TEST_NOW, numbered=True) for _ in range(3)]
                self.assertEqual([os.path.basename(record.path) for record in records],
                                 [f"{stem}{number}.db" for number in numbers])
                for record in records:
                    self.assertEqual(run_main("verify", record.path)[0], 0)
        self.assertEqual(len(os.listdir(folder)), 6)

    def test_keep_removes_only_the_commands_own_older_backups(self):
        folder = self.backups_folder()
        self.assertEqual(self.post(make_payload())[0], 200)
        strangers = ["notes.txt", "health-20200101T000000Z.db.bak", "other-20200101T000000Z.db",
                     "health-2020.db"]
        for name in strangers:
            with open(os.path.join(folder, name), "w") as handle:
                handle.write("x")
        olds = ["health-20200101T000000Z.db", "health-20200102T000000Z.db.gz", "health-20200103T000000Z.db"]
        for name in olds:
            with open(os.path.join(folder, name), "w") as handle:
                handle.write("x")
        code, out, err = run_main("backup", folder, "--db", self.db, "--keep", "2")
        self.assertEqual(code, 0, err)
        made, = [name for name in os.listdir(folder) if name not in strangers + olds]
        self.assertRegex(made, r"^health-\d{8}T\d{6}Z\.db$")
        self.assertEqual(sorted(os.listdir(folder)), sorted(strangers + [olds[2], made]))
        self.assertEqual(out.count("Removed the older backup"), 2)
        self.assertEqual(run_main("backup", folder, "--db", self.db, "--keep", "0")[0], 2)
        self.assertEqual(run_main("backup", os.path.join(folder, "x.db"), "--db", self.db, "--keep", "1")[0], 2)

    def database_elsewhere(self, folder, tag):
        """A database named health.db in its own ``folder`` (made), with a sync."""
        os.makedirs(os.path.join(self.tmp.name, folder))
        path = os.path.join(self.tmp.name, folder, "health.db")
        store = hr.Store(path)
        store.open()
        hr.SyncIntake(store).ingest([encode(make_payload(tag=tag))], "test")
        store.close()
        return path

    def test_two_databases_of_one_name_backed_up_into_one_folder_keep_their_own_backups(self):
        folder = self.backups_folder()
        first, second = self.database_elsewhere("a", "A"), self.database_elsewhere("b", "B")
        self.assertEqual(run_main("backup", folder, "--db", first, "--gzip")[0], 0)
        theirs, = os.listdir(folder)
        schedule = hr.BackupSchedule(second, folder, 3600, 1, lambda line, error: None)
        self.assertIsNone(schedule.last)  # the other's backup is not its own: one is made at once
        self.assertEqual(schedule._due_in(), 0)
        record = schedule.run_once()
        self.assertIsNotNone(record)
        self.assertEqual(sorted(os.listdir(folder)), sorted([theirs, os.path.basename(record.path)]))
        code, out, err = run_main("backup", folder, "--db", second, "--keep", "1")
        self.assertEqual(code, 0, err)
        self.assertIn(theirs, os.listdir(folder))  # never pruned by the other database
        self.assertEqual(out.count("Removed the older backup"), 1)
        self.assertEqual(hr.newest_backup(folder, first).path, os.path.join(folder, theirs))
        self.assertNotEqual(hr.database_id(first), hr.database_id(second))

    def test_keep_keeps_the_newest_by_the_time_each_backup_records_when_a_clock_was_ahead(self):
        folder = self.backups_folder()
        self.assertEqual(self.post(make_payload())[0], 200)
        for compressed in (False, True):
            with self.subTest(compressed=compressed):
                for name in os.listdir(folder):
                    os.unlink(os.path.join(folder, name))
                flags = ["--gzip"] if compressed else []
                self.assertEqual(run_main("backup", folder, "--db", self.db, *flags)[0], 0)
                made, = os.listdir(folder)
                # Made while the clock was years ahead: its name and its record say 2099.
                ahead = os.path.join(folder, "health-20990101T000000Z.db" + (".gz" if compressed else ""))
                if compressed:
                    with gzip.open(os.path.join(folder, made)) as packed, open(ahead, "wb") as raw, \
                            gzip.GzipFile(fileobj=raw, mode="wb", mtime=4070908800) as repacked:
                        repacked.write(packed.read())
                else:
                    shutil.copyfile(os.path.join(folder, made), ahead)
                    with contextlib.closing(sqlite3.connect(ahead)) as conn, conn:
                        conn.execute("UPDATE settings SET value = '2099-01-01T00:00:00.000Z'"
                                     " WHERE name = 'backup_made_at'")
                os.unlink(os.path.join(folder, made))
                schedule = hr.BackupSchedule(self.db, folder, 3600, 1, lambda line, error: None)
                record = schedule.run_once()
                self.assertEqual(os.listdir(folder), [os.path.basename(record.path)])  # the new one kept
                self.assertTrue(os.path.exists(schedule.status()["last"]["path"]))
                code, out, err = run_main("backup", folder, "--db", self.db, *flags, "--keep", "2")
                self.assertEqual((code, out.count("Removed")), (0, 0), err)
                self.assertEqual(len(os.listdir(folder)), 2)

    def test_a_name_like_a_backups_with_a_date_that_is_none_stops_nothing(self):
        folder = self.backups_folder()
        self.assertEqual(self.post(make_payload())[0], 200)
        for name in ("health-20261399T999999Z.db", "health-00000000T000000Z.db.gz"):
            with open(os.path.join(folder, name), "wb") as handle:
                handle.write(b"\x1f\x8b junk")
        schedule = hr.BackupSchedule(self.db, folder, 3600, 7, lambda line, error: None)
        self.assertIsNone(schedule.last)
        self.assertIsNotNone(schedule.run_once())
        self.assertEqual(hr.newest_backup(folder, self.db).path, schedule.last.path)

    def test_a_fifo_or_a_folder_under_a_backups_name_is_passed_over(self):
        folder = self.backups_folder()
        self.assertEqual(self.post(make_payload())[0], 200)
        os.mkdir(os.path.join(folder, "health-20260101T000000Z.db"))
        if hasattr(os, "mkfifo"):  # opening it would wait for a writer for ever
            os.mkfifo(os.path.join(folder, "health-20260102T000000Z.db"))
        self.assertIsNone(hr.newest_backup(folder, self.db))
        self.assertEqual(run_main("backup", folder, "--db", self.db, "--keep", "1")[0], 0)
        self.assertEqual(len(hr.backups_of(folder, self.db)), 1)

    def test_a_truncated_or_corrupt_gzip_backup_is_a_failed_verdict_not_a_traceback(self):
        self.assertEqual(self.post(make_payload(n=300))[0], 200)
        folder = self.backups_folder()
        self.assertEqual(run_main("backup", folder, "--db", self.db, "--gzip")[0], 0)
        good, = os.listdir(folder)
        with open(os.path.join(folder, good), "rb") as handle:
            packed = handle.read()
        for name, damaged in (("truncated.db.gz", packed[:len(packed) // 2]),
                              ("corrupt.db.gz", packed[:40] + bytes(len(packed) - 40)),
                              ("not-gzip.db.gz", b"plain text, no gzip at all" * 100)):
            with self.subTest(name=name):
                path = os.path.join(self.tmp.name, name)
                with open(path, "wb") as handle:
                    handle.write(damaged)
                code, out, err = run_main("verify", path)
                self.assertEqual(code, 1, err)
                self.assertTrue(out.startswith(f"FAILED: {path}: unpacking: the gzip file cannot be unpacked"), out)
                target = os.path.join(self.tmp.name, "restored.db")
                code, out, err = run_main("restore", path, "--db", target)
                self.assertEqual(code, 2)
                self.assertIn("does not verify, nothing was changed: FAILED", err)
                self.assertNotIn("Traceback", err)
                self.assertFalse(os.path.exists(target))
                self.assertEqual([name for name in os.listdir(self.tmp.name) if "backup-tmp" in name], [])

    def test_what_a_killed_restore_left_beside_the_database_goes_at_the_next_start(self):
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()  # a restore that stopped: its process is gone
        left = [os.path.join(self.tmp.name, f".health.db.restore.{child.pid}.backup-tmp"),
                os.path.join(self.tmp.name, f".health-20260101T000000Z.db.{child.pid}.backup-tmp")]
        for path in left:
            with open(path, "wb") as handle:
                handle.write(b"\0" * 100000)
        running = os.path.join(self.tmp.name, f".health.db.restore.{os.getppid()}.backup-tmp")  # a live process's
        with open(running, "wb") as handle:
            handle.write(b"\0")
        store = hr.Store(self.db)
        store.open()
        store.close()
        self.assertEqual([path for path in left if os.path.exists(path)], [])
        self.assertTrue(os.path.exists(running))

    def test_an_older_version_backup_is_upgraded_at_the_next_start_after_its_restore(self):
        old = os.path.join(self.tmp.name, "old.db")
        make_v1_database(old, make_payload())
        backup = os.path.join(self.backups_folder(), "old-backup.db")
        self.assertEqual(run_main("backup", backup, "--db", old)[0], 0)
        target = os.path.join(self.tmp.name, "restored.db")
        self.assertEqual(run_main("restore", backup, "--db", target)[0], 0)
        before = self.rows_of(target)
        store = hr.Store(target)
        store.open()
        store.close()
        with contextlib.closing(sqlite3.connect(target)) as conn:
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], hr.SCHEMA_VERSION)
            self.assertEqual(conn.execute("SELECT count(*) FROM workouts").fetchone()[0], len(before["workouts"]))
        self.assertEqual(run_main("verify", "--db", target)[0], 0)


class ScheduledBackupTests(ServerTestCase):
    """The first backup is made at start; the next ones a day later each,
    which the tests do not wait for: they make them (run_once) and move the
    receiver's clock on."""

    def server_options(self):
        self.folder = os.path.join(self.tmp.name, "backups")
        os.mkdir(self.folder)
        return {"backup_dir": self.folder, "backup_every": 86400, "backup_keep": 2}

    def first_backup(self):
        wait_until(lambda: self.server.backups.last is not None)
        return self.server.backups.last

    def remove_folder(self):
        """Remove the backup folder while backups run: one may be writing
        into it, so what vanishes under rmtree is no error, and it is
        removed until it is gone."""
        wait_until(lambda: shutil.rmtree(self.folder, ignore_errors=True) or not os.path.exists(self.folder))

    def test_where_the_database_and_its_backups_are_is_shown_to_an_admin_only(self):
        self.store.add_people(["ann"], [ANN_KEY])
        self.assertEqual(self.post(make_payload(), bearer(ANN_KEY))[0], 200)
        self.first_backup()
        folder, database = os.path.abspath(self.folder), os.path.abspath(self.db)
        for headers, admin in (({}, True), (login(ANN_KEY), False)):
            with self.subTest(admin=admin):
                page = self.request("GET", "/", headers=headers)[2].decode()
                summary = self.request("GET", hr.SUMMARY_PATH, headers=headers)[2]
                endpoint = self.request("GET", headers=bearer(ANN_KEY) if headers else {})[2]
                self.assertEqual((folder in page, database in page), (admin, admin))
                self.assertEqual(summary["database"]["path"] == database, admin)
                for backup in (summary["backup"], endpoint["backup"]):
                    self.assertEqual(backup["folder"] == self.folder, admin)
                    self.assertEqual(backup["last"]["path"] is not None, admin)
                    self.assertEqual(backup["last"]["verified"], True)

    def test_a_failed_backups_paths_and_a_damaged_databases_are_shown_to_an_admin_only(self):
        self.store.add_people(["ann"], [ANN_KEY])
        self.first_backup()
        self.remove_folder()
        self.assertIsNone(self.server.backups.run_once())
        self.assertTrue(self.request("GET")[2]["backup"]["failed"])
        mine, hers = self.request("GET")[2]["backup"], self.request("GET", headers=bearer(ANN_KEY))[2]["backup"]
        self.assertIn(self.tmp.name, mine["warning"])
        self.assertIn("the last backup failed at", hers["warning"])
        self.assertNotIn(self.tmp.name, hers["warning"])
        self.assertNotIn(self.tmp.name, self.request("GET", "/", headers=login(ANN_KEY))[2].decode())
        self.assertNotIn(self.tmp.name, json.dumps(self.request("GET", hr.SUMMARY_PATH, headers=login(ANN_KEY))[2]))
        self.server.store.damage = hr.DAMAGED.format(path=os.path.abspath(self.db), detail="test")
        try:
            for headers, admin in (({}, True), (login(ANN_KEY), False)):
                with self.subTest(admin=admin):
                    page = self.request("GET", "/", headers=headers)[2].decode()
                    endpoint = self.request("GET", headers=bearer(ANN_KEY) if headers else {})[2]
                    self.assertIn("damaged", page)
                    self.assertIn("damaged", endpoint["error"])
                    self.assertEqual(os.path.abspath(self.db) in page, admin)
                    self.assertEqual(os.path.abspath(self.db) in endpoint["error"], admin)
        finally:
            self.server.store.damage = None

    def test_scheduled_backups_happen_keep_their_number_and_show_on_the_page(self):
        self.assertEqual(self.post(make_payload())[0], 200)
        first = self.first_backup()
        self.assertTrue(any("backup " in line and "verified" in line for line in self.log_lines()))
        self.assertAlmostEqual(self.server.backups._due_in(), 86400, delta=600)
        made = []
        for _day in range(2):  # more backups than are kept, a day apart
            self.clock.advance(days=1)
            self.assertEqual(self.server.backups._due_in(), 0)
            made.append(self.server.backups.run_once())
        self.assertEqual(sorted(os.listdir(self.folder)), sorted(os.path.basename(record.path) for record in made))
        self.assertNotIn(os.path.basename(first.path), os.listdir(self.folder))
        status, _, answer = self.request("GET")
        backup = answer["backup"]
        self.assertEqual((backup["keep"], backup["warning"], backup["last"]["path"]), (2, None, made[-1].path))
        self.assertEqual(os.path.dirname(backup["last"]["path"]), self.folder)
        self.assertTrue(backup["last"]["verified"])
        self.assertEqual(run_main("verify", backup["last"]["path"])[0], 0)
        page = self.request("GET", "/")[2].decode()
        self.assertIn("Backups: last backup", page)
        self.assertEqual(self.request("GET", hr.SUMMARY_PATH)[2]["backup"]["keep"], 2)
        # Older than twice the interval: said so.
        self.clock.advance(days=2, hours=1)
        self.assertIn("older than twice the interval", self.request("GET")[2]["backup"]["warning"])
        # The folder gone: the failure is logged and shown.
        self.remove_folder()
        self.assertIsNone(self.server.backups.run_once())
        self.assertIn("the last backup failed", self.request("GET")[2]["backup"]["warning"])
        self.assertIn('class="note">Backups: the last backup failed', self.request("GET", "/")[2].decode())
        self.assertTrue(any("ERROR backup into" in line for line in self.log_lines()))


class RetryTests(ServerTestCase):
    """A byte-identical retry is answered from the record of the sync it
    repeats; anything else is read."""

    max_body = 16 * hr.MIB  # bodies of several blocks

    def payload_with_a_rejected_element(self, n=20):
        payload = make_payload(n=n)
        payload["data"]["HKQuantityTypeIdentifierHeartRate"].append(sample("A-bad", "yesterday", 70))
        return encode(payload)

    def repeat_answer(self, first, sync_id):
        """What a repeat of the sync that answered ``first`` answers."""
        return dict(first, inserted=dict.fromkeys(first["inserted"], 0), duplicates=first["count"], sync_id=sync_id)

    def test_a_byte_identical_retry_answers_the_same_counts_as_duplicates_and_writes_no_rows(self):
        body = self.payload_with_a_rejected_element()
        status, _, first = self.post(body)
        self.assertEqual(status, 200, first)
        self.assertEqual((first["rejected"], first["duplicates"]), (1, 0))
        self.assertEqual(self.query("SELECT body_sha256 FROM syncs WHERE id = ?", (first["sync_id"],)),
                         [(hashlib.sha256(body).hexdigest(),)])
        before = self.counts()
        retries = [self.post(body),  # then chunked, then gzip: the decoded body is the same
                   self.post(iter([body[:1000], body[1000:]])),
                   self.post(gzip.compress(body), headers={"Content-Encoding": "gzip"})]
        for status, _, answer in retries:
            self.assertEqual(status, 200, answer)
            self.assertEqual(answer, self.repeat_answer(first, answer["sync_id"]))
        # No rows: a read would have kept the rejected element once more.
        self.assertEqual(self.counts(), dict(before, syncs=before["syncs"] + 3))
        self.assertEqual(self.query("SELECT same_body_as, received, inserted, duplicates, rejected, body_sha256,"
                                    " body_bytes, export_date, envelope = (SELECT envelope FROM syncs WHERE id = ?)"
                                    " FROM syncs WHERE id > ?", (first["sync_id"], first["sync_id"])),
                         [(first["sync_id"], first["count"], 0, first["count"], 1, None, len(body),
                           "2026-02-26T00:00:00.000Z", 1)] * 3)
        self.assertEqual(sum("not read again" in line for line in self.log_lines()), 3)
        self.assertEqual([name for name in os.listdir(self.tmp.name) if not name.startswith("health.db")], [])

    def test_the_same_envelope_with_one_changed_element_is_stored_in_full(self):
        body = self.payload_with_a_rejected_element()
        status, _, first = self.post(body)
        self.assertEqual(status, 200, first)
        changed = body.replace(b'"A-HR-7"', b'"A-HR-X"')
        self.assertEqual(len(changed), len(body))
        samples, rejected = self.count("samples"), self.count("rejected")
        for chunked in (False, True):
            status, _, answer = self.post(iter([changed]) if chunked else changed)
            self.assertEqual(status, 200, answer)
            if not chunked:  # read: the changed element is new, the rest duplicates
                self.assertEqual((answer["inserted"]["measurements"], answer["duplicates"], answer["rejected"]),
                                 (1, first["count"] - 1, 1))
            else:  # and now stored: a byte-identical retry of the sync before
                self.assertEqual(answer, self.repeat_answer(first, answer["sync_id"]))
        self.assertEqual(self.count("samples"), samples + 1)
        self.assertEqual(self.query("SELECT value FROM samples WHERE uuid = 'A-HR-X'"), [(67,)])
        self.assertEqual(self.count("rejected"), rejected + 1)
        self.assertEqual(self.query("SELECT same_body_as FROM syncs ORDER BY id"), [(None,), (None,), (2,)])

    def test_a_changed_body_read_back_needs_no_more_temporary_space_than_any_body(self):
        body = self.payload_with_a_rejected_element(n=2000)
        self.assertEqual(self.post(body)[0], 200)
        # Room for one body's temporary file (about 1.8 times the body),
        # not for that and the copy kept while it arrived.
        self.server.intake.max_tmp = int(2.2 * len(body))
        changed = body.replace(b'"A-HR-7"', b'"A-HR-X"')
        for _ in range(2):
            status, _, answer = self.post(changed)
            self.assertEqual(status, 200, answer)
        self.assertEqual(self.query("SELECT same_body_as FROM syncs ORDER BY id"), [(None,), (None,), (2,)])
        self.assertEqual(self.query("SELECT count(*) FROM samples WHERE uuid = 'A-HR-X'"), [(1,)])

    def test_a_body_that_differs_early_is_read_as_it_arrives(self):
        payload = make_payload(n=12000)
        body = encode(payload)
        self.assertGreater(len(body), 3 * hr.BODY_BLOCK)
        self.assertEqual(self.post(body)[0], 200)
        self.assertEqual(len(self.query("SELECT body_blocks FROM syncs")[0][0]),
                         -(-len(body) // hr.BODY_BLOCK) * hr.BLOCK_DIGEST_CHARS)
        at = body.index(b'"A-HR-7"')
        self.assertLess(at, hr.BODY_BLOCK)  # in the first block
        changed = body[:at] + b'"A-HR-X"' + body[at + 8:]
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(post_head(len(changed)) + changed[:2 * hr.BODY_BLOCK])
            # Its rows are staged before the rest is sent.
            wait_until(lambda: any(name.endswith(".stage") for name in os.listdir(self.tmp.name)))
            sock.sendall(changed[2 * hr.BODY_BLOCK:])
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                reply += sock.recv(65536)
        answer = json.loads(reply.split(b"\r\n\r\n", 1)[1])
        self.assertEqual((answer["inserted"]["measurements"], answer["duplicates"]), (1, answer["count"] - 1))
        self.assertEqual(self.query("SELECT body_sha256 FROM syncs WHERE id = ?", (answer["sync_id"],)),
                         [(hashlib.sha256(changed).hexdigest(),)])
        self.assertEqual(self.query("SELECT value FROM samples WHERE uuid = 'A-HR-X'"), [(67,)])

    def test_a_file_left_under_this_process_id_is_removed_and_its_own_kept(self):
        # A receiver restarted with the id of the one killed (a container).
        left = os.path.join(self.tmp.name, f".health.db.{os.getpid()}.999.spool")
        with open(left, "wb") as handle:
            handle.write(b"{}")
        spool = self.store.spool()
        try:
            other = hr.Store(self.db)
            other.open()
            other.close()
            self.assertFalse(os.path.exists(left))
            self.assertTrue(os.path.exists(spool.path))
        finally:
            spool.close()
        self.assertFalse(os.path.exists(spool.path))

    def test_a_retry_while_the_first_is_still_in_flight_is_stored_once(self):
        body = self.payload_with_a_rejected_element(n=2000)  # its half is more than the head the receiver reads
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(post_head(len(body)) + body[:len(body) // 2])
            wait_until(lambda: any(name.endswith(".stage") for name in os.listdir(self.tmp.name)))
            status, _, second = self.post(body)
            self.assertEqual(status, 200, second)
            self.assertEqual(second["duplicates"], 0)
            sock.sendall(body[len(body) // 2:])
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                reply += sock.recv(65536)
        first = json.loads(reply.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(first, self.repeat_answer(second, first["sync_id"]))
        self.assertEqual(self.count("samples"), 2000 + 2001)  # heart rate (one more has a bad date), steps
        self.assertEqual(self.count("rejected"), 2)  # the bad date, kept by each of the two reads
        status, _, third = self.post(body)
        self.assertEqual(third, self.repeat_answer(second, third["sync_id"]))
        self.assertIsNotNone(self.query("SELECT same_body_as FROM syncs WHERE id = ?", (third["sync_id"],))[0][0])


CHILD_SERVER = """
import encodings.idna, os, sys
sys.path.insert(0, {folder!r})
import health_receiver
if {file_limit!r}:  # files may not grow past this: a full disk, as the process sees it
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, ({file_limit!r}, {file_limit!r}))
if {open_files!r}:  # ulimit -n
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, ({open_files!r}, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
if os.name == "posix" and os.geteuid() == 0 and {drop!r}:
    os.setgid(65534)
    os.setuid(65534)
sys.exit(health_receiver.main(sys.argv[1:]))
"""


class ChildServer:
    """A receiver in its own process, for kill and permission tests."""

    def __init__(self, folder, db, drop_root=False, extra=(), wait=True, file_limit=None, open_files=None):
        self.stderr = open(os.path.join(folder, "stderr.log"), "ab")
        code = CHILD_SERVER.format(folder=os.path.dirname(os.path.abspath(hr.__file__)), drop=drop_root,
                                   file_limit=file_limit, open_files=open_files)
        env = {key: value for key, value in os.environ.items() if key != hr.TOKEN_ENV}
        self.proc = subprocess.Popen([sys.executable, "-c", code, "--host", "127.0.0.1", "--port", "0", "--db", db,
                                      "--quiet", "--no-auth"] + list(extra), stdout=subprocess.PIPE, stderr=self.stderr,
                                     env=env, cwd=folder)
        self.output = []
        while wait:
            line = self.proc.stdout.readline().decode()
            self.output.append(line)
            if line.startswith("Listening on"):
                self.port = int(line.rsplit(":", 1)[1])
                break
            if not line:
                self.stop()
                raise AssertionError("the child server did not start: " + "".join(self.output))

    def post(self, body, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        with contextlib.closing(conn):
            conn.request("POST", hr.DEFAULT_PATH, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.getheader("Retry-After"), json.loads(response.read())

    def in_progress(self):
        """Syncs the child is receiving, storing or finishing after their answer."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        with contextlib.closing(conn):
            conn.request("GET", hr.DEFAULT_PATH)
            return json.loads(conn.getresponse().read())["ingests_in_progress"]

    def stop(self, sig=signal.SIGTERM):
        """Signal the child (unless ``sig`` is None) and return its exit code."""
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(60)
        self.proc.stdout.close()
        self.stderr.close()
        return code


@unittest.skipUnless(os.name == "posix", "needs POSIX permissions and signals")
class ProcessTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        os.chmod(self.tmp.name, 0o777)
        self.db = os.path.join(self.tmp.name, "health.db")
        self.children = []

    def tearDown(self):
        for child in self.children:
            if child.proc.poll() is None:
                child.stop(signal.SIGKILL)

    def start(self, **kwargs):
        child = ChildServer(self.tmp.name, self.db, **kwargs)
        self.children.append(child)
        return child

    def query(self, sql):
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            return conn.execute(sql).fetchall()

    def stage_files(self):
        return sorted(name for name in os.listdir(self.tmp.name) if name.endswith(".stage"))

    def tagged(self, tag):
        return (self.query(f"SELECT count(*) FROM samples WHERE uuid LIKE '{tag}-%'")[0][0],
                self.query(f"SELECT count(*) FROM workouts WHERE uuid LIKE '{tag}-%'")[0][0],
                self.query(f"SELECT count(*) FROM workout_route_points WHERE workout_uuid LIKE '{tag}-%'")[0][0])

    def test_a_full_disk_for_the_temporary_file_is_a_503_the_app_retries(self):
        child = self.start(file_limit=2 * hr.MIB)
        big = encode(make_payload(n=12000, tag="F"))  # its temporary file outgrows the limit
        self.assertGreater(len(big), 3 * hr.MIB)
        status, retry_after, answer = child.post(big)
        self.assertEqual((status, retry_after), (503, str(hr.RETRY_AFTER)), answer)
        self.assertIn("temporary file", answer["error"])
        self.assertEqual(self.query("SELECT status FROM syncs"), [("failed",)])
        self.assertEqual(self.stage_files(), [])
        self.assertEqual(child.post(encode(make_payload(tag="G")))[0], 200)  # and it goes on
        self.assertEqual(self.tagged("F")[0], 0)

    def test_a_backup_onto_a_full_disk_says_so_and_not_that_the_database_is_damaged(self):
        store = hr.Store(self.db)
        store.open()
        hr.SyncIntake(store).ingest([encode(make_payload(n=5000, tag="D"))], "test")
        store.close()
        self.assertGreater(os.path.getsize(self.db), 2 * hr.MIB)
        folder = os.path.join(self.tmp.name, "backups")
        os.mkdir(folder)
        code = ("import resource, signal, sys; sys.path.insert(0, {0!r}); import health_receiver; "
                "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, "
                "({1}, {1})); sys.exit(health_receiver.main(['backup', {2!r}, '--db', {3!r}]))").format(
                    os.path.dirname(os.path.abspath(hr.__file__)), hr.MIB, folder, self.db)  # a full disk, as seen
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn(f"could not be written in {folder}: make room there", done.stderr)
        self.assertNotIn("damaged", done.stderr)
        self.assertNotIn("Traceback", done.stderr)
        self.assertEqual(os.listdir(folder), [])  # nothing half made

    def test_out_of_file_descriptors_pauses_accepting_and_logs_once(self):
        child = self.start(open_files=48)
        idle = []
        try:
            for _ in range(100):  # more than the child may hold open
                idle.append(socket.create_connection(("127.0.0.1", child.port), timeout=10))
            log_path = os.path.join(self.tmp.name, "stderr.log")

            def logged():
                with open(log_path, "rb") as handle:
                    return b"too many open files" in handle.read()
            wait_until(logged)
        finally:
            for sock in idle:
                sock.close()
        self.assertEqual(child.post(encode(make_payload(tag="N")))[0], 200)  # accepting again
        with open(log_path, "rb") as log:
            self.assertEqual(log.read().count(b"too many open files"), 1)
        self.assertEqual(child.stop(), 0)

    def backed_up(self, tags, n):
        """Syncs of ``tags`` stored by a child receiver, stopped, then a
        backup into a new folder; return the folder and the backup's name."""
        child = self.start()
        for tag in tags:
            self.assertEqual(child.post(encode(make_payload(n=n, tag=tag)))[0], 200)
        self.assertEqual(child.stop(), 0)
        backups = os.path.join(self.tmp.name, "backups")
        os.mkdir(backups)
        self.assertEqual(run_main("backup", backups, "--db", self.db)[0], 0)
        name, = os.listdir(backups)
        return backups, name

    def test_a_damaged_database_is_said_at_start_and_takes_no_sync(self):
        backups, name = self.backed_up("ABCD", 1500)
        backup = os.path.join(backups, name)
        before = self.query("SELECT count(*) FROM samples")
        size = os.path.getsize(self.db)
        with open(self.db, "r+b") as handle:  # 4 KiB of noise in the middle of a page of samples
            handle.seek(size // 2 // 16384 * 16384 + 2048)
            handle.write(random.Random(7).getrandbits(4096 * 8).to_bytes(4096, "little"))
        # A backup of it fails and leaves no file.
        elsewhere = os.path.join(self.tmp.name, "elsewhere")
        os.mkdir(elsewhere)
        code, _out, err = run_main("backup", elsewhere, "--db", self.db)
        self.assertEqual(code, 1)
        self.assertRegex(err, "does not verify|cannot be copied")
        self.assertEqual(os.listdir(elsewhere), [])
        child = self.start(extra=("--backup-dir", backups, "--backup-every", "24"))
        warning = next((line for line in child.output if line.startswith("WARNING: The database")), "")
        self.assertIn("is damaged", warning)
        self.assertIn(".recover", warning)
        self.assertIn(f"The newest verified backup is {backup}", warning)
        self.assertIn(f"restore {backup} --db {self.db}", warning)
        # No restore while the receiver runs, and the process is named.
        code, _out, err = run_main("restore", backup, "--db", self.db)
        self.assertEqual(code, 1)  # a refusal, not a usage error
        self.assertIn(f"a receiver is running on {self.db}: process {child.proc.pid}", err)
        status, retry_after, answer = child.post(encode(make_payload(tag="E")))
        self.assertEqual((status, retry_after), (503, str(hr.RETRY_AFTER)))
        self.assertIn("is damaged", answer["error"])
        conn = http.client.HTTPConnection("127.0.0.1", child.port, timeout=10)
        with contextlib.closing(conn):
            conn.request("GET", hr.DEFAULT_PATH)  # the app's Test Connection says so too
            response = conn.getresponse()
            self.assertEqual(response.status, 503)
            self.assertIn("is damaged", json.loads(response.read())["error"])
            conn.request("GET", "/")
            response = conn.getresponse()
            self.assertEqual(response.status, 503)
            self.assertIn(f"restore {backup} --db".encode(), response.read())
        self.assertEqual(child.stop(), 0)
        code, out, err = run_main("restore", backup, "--db", self.db)
        self.assertEqual(code, 0, err)
        kept = [name for name in os.listdir(self.tmp.name) if ".before-restore-" in name and name.endswith("Z")]
        self.assertEqual(len(kept), 1, out)
        self.assertEqual(os.path.getsize(os.path.join(self.tmp.name, kept[0])), size)  # the damaged file, kept
        self.assertEqual(self.query("SELECT count(*) FROM samples"), before)
        child = self.start()
        self.assertFalse(any(line.startswith("WARNING") for line in child.output), child.output)
        self.assertEqual(child.post(encode(make_payload(tag="E")))[0], 200)
        self.assertEqual(child.stop(), 0)

    def test_sigkill_during_a_backup_leaves_no_file_under_a_final_name(self):
        backups, first = self.backed_up("ABC", 3000)
        # A page at a time, pausing in each step: slow enough to be killed.
        code = (f"import sys, time; sys.path.insert(0, {os.path.dirname(os.path.abspath(hr.__file__))!r}); "
                "import health_receiver as hr; hr.BACKUP_STEP_PAGES = 1; "
                "hr._Progress.__call__ = lambda self, copied, total: time.sleep(0.01); "
                f"hr.main(['backup', {backups!r}, '--db', {self.db!r}])")
        proc = subprocess.Popen([sys.executable, "-c", code])
        try:
            wait_until(lambda: any(name.endswith(".backup-tmp") for name in os.listdir(backups)))
        finally:
            proc.kill()
            proc.wait()
        names = os.listdir(backups)
        self.assertEqual(len(names), 2, names)
        self.assertIn(first, names)
        self.assertEqual(run_main("verify", os.path.join(backups, first))[0], 0)
        self.assertEqual(run_main("backup", backups, "--db", self.db, "--keep", "5")[0], 0)
        names = sorted(os.listdir(backups))
        self.assertEqual(len(names), 2, names)  # the killed one's temporary file is gone
        self.assertFalse(any(name.startswith(".") for name in names))

    def test_read_only_database_503_then_recovers(self):
        child = self.start(drop_root=True)
        self.assertEqual(child.post(encode(make_payload(tag="A")))[0], 200)
        # Its work after the answer (totals, checkpoint) done: a log file it
        # made while the database was read-only would stay read-only.
        wait_until(lambda: child.in_progress() == 0)
        mode = os.stat(self.db).st_mode
        os.chmod(self.db, 0o444)
        try:
            status, retry_after, answer = child.post(encode(make_payload(tag="B")))
            self.assertEqual(status, 503, answer)
            self.assertEqual(retry_after, str(hr.RETRY_AFTER))
            self.assertRegex(answer["error"], "read-only|cannot be opened")
        finally:
            os.chmod(self.db, mode)
        self.assertEqual(self.tagged("B"), (0, 0, 0))
        status, _, answer = child.post(encode(make_payload(tag="B")))
        self.assertEqual(status, 200, answer)
        self.assertEqual(child.stop(), 0)
        self.assertEqual(self.tagged("B"), (6, 1, 4))
        self.assertEqual(self.query("PRAGMA integrity_check"), [("ok",)])

    def test_a_retry_cut_by_sigkill_leaves_no_spool_behind_after_the_next_start(self):
        child = self.start()
        body = encode(make_payload(n=2000, tag="S"))
        self.assertEqual(child.post(body)[0], 200)
        spools = lambda: sorted(name for name in os.listdir(self.tmp.name) if name.endswith(".spool"))  # noqa: E731
        with socket.create_connection(("127.0.0.1", child.port), timeout=30) as sock:
            sock.sendall(post_head(len(body)) + body[:len(body) // 2])
            wait_until(lambda: spools() and os.path.getsize(os.path.join(self.tmp.name, spools()[0])) > 0)
            child.stop(signal.SIGKILL)
        self.assertEqual(len(spools()), 1)
        child = self.start()
        self.assertEqual(spools(), [])
        status, _, answer = child.post(body)
        self.assertEqual((status, answer["duplicates"]), (200, answer["count"]))
        self.assertEqual(self.query(f"SELECT same_body_as FROM syncs WHERE id = {answer['sync_id']}"), [(1,)])
        self.assertEqual(child.stop(), 0)

    def test_sigkill_at_any_moment_leaves_a_consistent_database(self):
        child = self.start()
        self.assertEqual(child.post(encode(make_payload(n=100, tag="A")))[0], 200)
        child.stop(signal.SIGKILL)
        n = 12000
        # Kill points: in the middle of the body, right after it, while its
        # rows are staged, during the merge into the database, at two
        # moments of the ingest, and after the answer.
        points = (("half-body", None), ("body", 0.0), ("staging", None), ("merge", None), ("ingest", 0.05),
                  ("ingest", 0.15), ("answered", None))
        wal = self.db + "-wal"
        for number, (point, delay) in enumerate(points):
            tag = f"K{number}"
            body = encode(make_payload(n=n, tag=tag))
            child = self.start()
            self.assertEqual(self.stage_files(), [])  # what killed receivers left is removed at start
            acknowledged = False
            with socket.create_connection(("127.0.0.1", child.port), timeout=30) as sock:
                head = post_head(len(body))
                if point == "half-body":
                    sock.sendall(head + body[:len(body) // 2])
                    time.sleep(0.05)
                elif point == "staging":
                    sock.sendall(head + body[:len(body) // 2])
                    wait_until(lambda: self.stage_files() and os.path.getsize(
                        os.path.join(self.tmp.name, self.stage_files()[0])) > 0)
                elif point == "merge":
                    before = os.path.getsize(wal) if os.path.exists(wal) else 0
                    sock.sendall(head + body)
                    # The database's log grows once the merge writes.
                    wait_until(lambda: os.path.exists(wal) and os.path.getsize(wal) != before, interval=0.0005)
                else:
                    sock.sendall(head + body)
                    if point == "answered":
                        acknowledged = sock.recv(65536).startswith(b"HTTP/1.1 200 ")
                        self.assertTrue(acknowledged)
                    else:
                        time.sleep(delay)
                child.stop(signal.SIGKILL)
            if point in ("half-body", "staging"):
                self.assertNotEqual(self.stage_files(), [])
            with self.subTest(point=point, delay=delay):
                self.assertEqual(self.query("PRAGMA integrity_check"), [("ok",)])
                self.assertEqual(self.tagged("A"), (200, 1, 4))
                stored = self.tagged(tag)
                self.assertIn(stored, ((0, 0, 0), (2 * n, 1, 4)))
                if acknowledged:
                    self.assertEqual(stored, (2 * n, 1, 4))
                self.assertEqual(self.query("SELECT count(*) FROM syncs WHERE status = 'pending'"), [(0,)])
        # The receiver starts again on the same file and takes the next sync.
        child = self.start()
        self.assertEqual(child.post(encode(make_payload(tag="Z")))[0], 200)
        self.assertEqual(child.stop(), 0)

    def test_sigterm_during_an_ingest_finishes_or_rolls_back_cleanly(self):
        child = self.start()
        n = 12000
        body = encode(make_payload(n=n, tag="T"))
        with socket.create_connection(("127.0.0.1", child.port), timeout=30) as sock:
            sock.sendall(post_head(len(body)) + body)
            time.sleep(0.02)
            child.proc.send_signal(signal.SIGTERM)
            answer = sock.recv(65536)
        self.assertEqual(child.stop(sig=None), 0)  # it stops by itself
        # 503 only if the signal won the race against the request's start.
        self.assertRegex(answer[:13], rb"HTTP/1.1 (200|503) ")
        stored = self.tagged("T")
        if answer.startswith(b"HTTP/1.1 200 "):
            self.assertEqual(stored, (2 * n, 1, 4))
        else:
            self.assertEqual(stored, (0, 0, 0))
        self.assertEqual(self.query("PRAGMA integrity_check"), [("ok",)])

    def test_a_stop_says_what_it_waits_for_and_a_second_stops_at_once(self):
        child = self.start()
        body = encode(make_payload(n=2000, tag="S"))

        with socket.create_connection(("127.0.0.1", child.port), timeout=30) as sock:
            sock.sendall(post_head(len(body)) + body[:1000])  # a slow upload: the rest does not come yet
            wait_until(lambda: child.in_progress() == 1)
            child.proc.send_signal(signal.SIGINT)
            lines = iter(lambda: child.proc.stdout.readline().decode(), "")  # the rest of the banner first
            line = next((line for line in lines if line.startswith("Stopping")), "")
            self.assertIn(f"Stopping: 1 sync(s) in progress get up to {hr.SHUTDOWN_WAIT} s", line)
            child.proc.send_signal(signal.SIGINT)
            self.assertEqual(child.stop(sig=None), 128 + signal.SIGINT)  # at once, not after the upload
        self.assertEqual(self.tagged("S"), (0, 0, 0))
        self.assertEqual(self.query("PRAGMA integrity_check"), [("ok",)])
        child = self.start()  # removes what the stopped one left, and goes on
        self.assertEqual(self.stage_files(), [])
        self.assertEqual(child.post(encode(make_payload(tag="S")))[0], 200)
        self.assertEqual(child.stop(), 0)

    def test_sigkill_during_a_migration_leaves_version_1_and_the_next_start_completes_it(self):
        make_v1_database(self.db, make_payload(tag="A"), extra_samples=200000)
        before = self.query("SELECT count(*) FROM samples")
        child = self.start(wait=False)
        # The rollback journal exists only inside the migration's transaction.
        wait_until(lambda: os.path.exists(self.db + "-journal") or child.proc.poll() is not None, timeout=60)
        child.stop(signal.SIGKILL)
        self.assertEqual(self.query("PRAGMA user_version"), [(1,)])
        self.assertEqual(self.query("SELECT count(*) FROM samples"), before)
        self.assertEqual(self.query("PRAGMA integrity_check"), [("ok",)])
        child = self.start()
        self.assertTrue(any("Upgrading" in line for line in child.output), child.output)
        self.assertEqual(child.post(encode(make_payload(tag="A")))[2]["inserted"]["measurements"], 0)
        self.assertEqual(child.stop(), 0)
        self.assertEqual(self.query("PRAGMA user_version"), [(hr.SCHEMA_VERSION,)])
        self.assertEqual(self.query("SELECT count(*) FROM samples"), before)


# ---------------------------------------------------------------------------
# Reporting: summary, chart kinds, export
# ---------------------------------------------------------------------------

class ReportingTests(unittest.TestCase):

    def test_utc_day_windows(self):
        now = datetime.datetime(2026, 3, 10, 15, 0, tzinfo=datetime.timezone.utc)
        window = hr.make_window(hr.View.of("90d", hr.Zone(utc=True), now))
        self.assertEqual((len(window.periods), window.grain.name, window.shifted), (90, "day", False))
        self.assertEqual(window.periods[-1], ("2026-03-10", "2026-03-10T00:00:00.000Z", "2026-03-11T00:00:00.000Z"))
        self.assertEqual(window.periods[0].day, "2025-12-11")
        self.assertTrue(all(a.end == b.start for a, b in zip(window.periods, window.periods[1:])))

    def test_local_periods_are_contiguous(self):
        now = TEST_NOW
        for name in hr.RANGES_BY_NAME:
            window = hr.make_window(hr.View.of(name, hr.Zone(utc=False), now), "2019-01-01T00:00:00.000Z")
            self.assertTrue(all(a.end == b.start for a, b in zip(window.periods, window.periods[1:])), name)

    def test_each_range_has_its_grain(self):
        now = datetime.datetime(2026, 3, 10, 15, 0, tzinfo=datetime.timezone.utc)
        first = "2022-06-15T10:00:00.000Z"
        grains = {name: hr.make_window(hr.View.of(name, hr.Zone(utc=True), now), first).grain.name
                  for name in hr.RANGES_BY_NAME}
        self.assertEqual(grains, {"7d": "day", "30d": "day", "90d": "day", "1y": "week", "all": "month"})
        window = hr.make_window(hr.View.of("1y", hr.Zone(utc=True), now), first)
        weeks = window.periods
        self.assertEqual(datetime.date.fromisoformat(weeks[0].day).weekday(), 0)  # named by their Monday
        self.assertEqual(weeks[0].start, f"{window.first.isoformat()}T00:00:00.000Z")  # but start with the range
        self.assertTrue(all(datetime.date.fromisoformat(week.day).weekday() == 0 for week in weeks))
        months = hr.make_window(hr.View.of("all", hr.Zone(utc=True), now), first).periods
        self.assertEqual((months[0].day, months[0].start, months[-1].day, months[-1].end),
                         ("2022-06-01", "2022-06-15T00:00:00.000Z", "2026-03-01", "2026-04-01T00:00:00.000Z"))
        two_years = hr.make_window(hr.View.of("all", hr.Zone(utc=True), now), "2024-03-11T00:00:00.000Z")
        self.assertEqual(two_years.grain.name, "week")

    def test_a_range_without_data_shows_the_last_stretch_with_data(self):
        now = datetime.datetime(2026, 3, 10, 15, 0, tzinfo=datetime.timezone.utc)
        view = hr.View.of("30d", hr.Zone(utc=True), now)
        window = hr.make_window(view, "2025-01-01T00:00:00.000Z", "2025-06-20T08:00:00.000Z")
        self.assertTrue(window.shifted)
        self.assertEqual((window.first.isoformat(), window.last.isoformat()), ("2025-05-22", "2025-06-20"))
        window = hr.make_window(view, "2025-01-01T00:00:00.000Z", "2026-02-20T08:00:00.000Z")
        self.assertFalse(window.shifted)

    def test_chart_kinds_and_short_names(self):
        kinds = {"HKQuantityTypeIdentifierStepCount": "sum", "HKQuantityTypeIdentifierDietaryWater": "sum",
                 "HKQuantityTypeIdentifierRestingHeartRate": "mean",
                 "HKQuantityTypeIdentifierOxygenSaturation": "percent",
                 "HKCategoryTypeIdentifierSleepAnalysis": "sleep", "HKCategoryTypeIdentifierMindfulSession": "minutes",
                 "HKCategoryTypeIdentifierAppleStandHour": "stand", "moodEntries": "count"}
        self.assertEqual({name: hr.chart_kind(name).name for name in kinds}, kinds)
        self.assertEqual(hr.short_type_name("HKQuantityTypeIdentifierHeartRate"), "HeartRate")
        titles = {"HKQuantityTypeIdentifierRestingHeartRate": "Resting heart rate",
                  "HKQuantityTypeIdentifierVO2Max": "VO2 max", "HKCategoryTypeIdentifierSleepAnalysis": "Sleep"}
        self.assertEqual({name: hr.type_title(name) for name in titles}, titles)

    def test_sleep_stages_from_numbers_and_names(self):
        cases = {0: "in_bed", 1: "unspecified", 2: "awake", 3: "core", 4: "deep", 5: "rem", 3.0: "core",
                 "3": "core", "3.0": "core", "asleepCore": "core", "asleepDeep": "deep", "asleepREM": "rem",
                 "HKCategoryValueSleepAnalysisAsleepREM": "rem", "inBed": "in_bed", "awake": "awake",
                 "asleep": "unspecified", "asleepUnspecified": "unspecified", 6: None, "nap": None, None: None,
                 2.5: None, "nan": None}
        for value, stage in cases.items():
            self.assertEqual(hr.sleep_stage(value), stage, value)

    def test_ticks_are_round_and_cover_the_values(self):
        for low, high, expected in ((0, 8535, [0, 2500, 5000, 7500, 10000]), (0.89, 1.0, None),
                                    (48, 192, [0, 50, 100, 150, 200]), (-1e307, 1e307, None), (5, 5, None)):
            ticks, step = hr.nice_ticks(low, high)
            if expected:
                self.assertEqual(ticks, expected)
            self.assertLessEqual(ticks[0], low)
            self.assertGreaterEqual(ticks[-1], high)
            self.assertTrue(all(math.isclose(b - a, step) for a, b in zip(ticks, ticks[1:])))
            mantissa = step / 10 ** math.floor(math.log10(step))
            self.assertTrue(any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5)), step)
        self.assertEqual(hr.nice_ticks(0, 1, whole=True)[0], [0, 1])
        top = hr.nice_ticks(1e308, 1e308)[0][-1]
        self.assertTrue(math.isfinite(top) and top >= hr.CHART_VALUE_MAX, top)

    def test_large_numbers_read_with_k_and_m(self):
        self.assertEqual(hr._scaled(10_000_000, 2_500_000), "10.0M")
        self.assertEqual(hr._scaled(10_000_000, 5_000_000), "10M")
        self.assertEqual(hr._scaled(8500, 2500), "8.5k")
        self.assertEqual(hr._scaled(0.95, 0.05), "0.95")
        self.assertEqual(hr.format_value(12_345_678), "12.3M")
        self.assertEqual(hr.format_value(8532), "8,532")

    def test_every_type_gets_a_registered_chart_kind(self):
        for name in ("", "x", "HKQuantityTypeIdentifier", "HKQuantityTypeIdentifierNewThing", "\u0000", "moodEntries"):
            self.assertIn(hr.chart_kind(name), hr.CHART_KINDS)
        for kind in hr.CHART_KINDS:
            self.assertIn(kind.draw, hr.DRAWINGS)
        self.assertTrue(hr.CHART_KINDS[-1].applies("anything", "anything"))

    def test_ndjson_lines_become_payloads_of_bounded_size(self):
        lines = [json.dumps({"section": "samples", "type": f"T{i % 3}", "record": sample(f"N-{i}", "2026-02-24", i)})
                 .encode() for i in range(7)]
        lines += [b'{"section": "routes", "workout": "W", "record": {"timestamp": "2026-02-24"}}', b"",
                  b'{"section": "characteristics", "name": "bloodType", "value": "A+"}',
                  b'{"section": "syncs", "row": {"id": 1}}']
        for per_payload in (1, 2, 100):
            with self.subTest(per_payload=per_payload):
                seen = {}
                payloads = 0
                for person, pieces in hr.ndjson_payloads(lines, per_payload):
                    self.assertIsNone(person)
                    payloads += 1
                    rows, _ = walk(b"".join(pieces))
                    for name, batch in rows.items():
                        seen[name] = seen.get(name, 0) + len(batch)
                self.assertEqual(seen, {"samples": 7, "routes": 1, "characteristics": 1})
                self.assertEqual(payloads, -(-9 // per_payload))
        with self.assertRaisesRegex(hr.PayloadError, "line 2: not an export line"):
            for _person, pieces in hr.ndjson_payloads([lines[0], b'{"section": "moods"}'], 100):
                b"".join(pieces)

    def test_export_date_bounds(self):
        self.assertEqual(hr.date_bound("2026-02-24"), ("2026-02-24T00:00:00.000Z", False))
        self.assertEqual(hr.date_bound("2026-02-24", end=True), ("2026-02-25T00:00:00.000Z", False))
        self.assertEqual(hr.date_bound("2026-02-24T09:00:00+01:00", end=True), ("2026-02-24T08:00:00.000Z", True))
        for text in ("yesterday", "25/02/2026", "", "2026-02-30"):
            with self.subTest(text=text):
                with self.assertRaises(hr.UsageError):
                    hr.date_bound(text)


class ExportDateTests(ServerTestCase):

    def test_since_and_until_compare_utc_instants(self):
        payload = {"data": {"HKQuantityTypeIdentifierHeartRate": [
            sample("D-1", "2026-11-25T00:30:00+01:00", 1),  # 2026-11-24 in UTC
            sample("D-2", "2026-11-25T08:00:00+01:00", 2),
            sample("D-3", "2026-11-25T23:30:00-01:00", 3)]}}  # 2026-11-26 in UTC
        self.assertEqual(self.post(payload)[0], 200)
        code, out, _ = run_main("export", "--db", self.db, "--since", "2026-11-25", "--until", "2026-11-25")
        self.assertEqual(code, 0)
        self.assertEqual([row[1] for row in list(csv.reader(io.StringIO(out)))[1:]], ["D-2"])
        code, out, _ = run_main("export", "--db", self.db, "--until", "2026-11-25T07:00:00Z")
        self.assertEqual([row[1] for row in list(csv.reader(io.StringIO(out)))[1:]], ["D-1", "D-2"])

    def test_a_date_that_cannot_be_read_is_a_usage_error(self):
        for value in ("yesterday", "25/02/2026"):
            with self.subTest(value=value):
                code, out, err = run_main("export", "--db", self.db, "--since", value)
                self.assertEqual((code, out), (2, ""))
                self.assertIn("not a date", err)
                self.assertEqual(run_main("export", "--db", self.db, "--until", value)[0], 2)

    def test_stats_shows_the_schema_version(self):
        code, out, _ = run_main("stats", "--db", self.db)
        self.assertIn(f"schema version {hr.SCHEMA_VERSION}", out)


# ---------------------------------------------------------------------------
# Presentation: the status page
# ---------------------------------------------------------------------------

def recent_payload(tag="R", days=5):
    """Samples of three kinds of chart in the last few days (up to
    TEST_NOW's), two workouts."""
    now = TEST_NOW.replace(microsecond=0)

    def stamp(back_days, hour):
        moment = now - datetime.timedelta(days=back_days)
        return moment.replace(hour=hour, minute=0, second=0).strftime("%Y-%m-%dT%H:%M:%S.000Z")

    data = {
        "HKQuantityTypeIdentifierStepCount": [sample(f"{tag}-S{d}-{h}", stamp(d, h), 100 * h, "count")
                                              for d in range(days) for h in (9, 12)],
        "HKQuantityTypeIdentifierHeartRate": [sample(f"{tag}-H{d}-{h}", stamp(d, h), 60 + h)
                                              for d in range(days) for h in (9, 12)],
        "HKCategoryTypeIdentifierSleepAnalysis": [sample(f"{tag}-C{d}", stamp(d, 10), "asleepCore", None)
                                                  for d in range(days)],
        "workouts": [{"uuid": f"{tag}-W{d}", "workoutActivityType": "running", "startDate": stamp(d, 8),
                      "durationSeconds": 1800.0} for d in range(2)],
    }
    return {"syncSource": "background-delivery", "data": data,
            "workoutRoutes": {tag + "-W0": [{"timestamp": stamp(0, 8).replace("00:00.000", f"00:0{i}.000"),
                                             "latitude": 1.0, "longitude": 2.0} for i in range(3)]}}


def utc_at(hour, minute=0, days_back=0):
    """A stored timestamp on TEST_NOW's day (UTC) at hour:minute, ``days_back`` days before."""
    day = TEST_NOW.date() - datetime.timedelta(days=days_back)
    moment = datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.timezone.utc)
    return (moment + datetime.timedelta(hours=hour, minutes=minute)).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def utc_day(days_back=0):
    return (TEST_NOW.date() - datetime.timedelta(days=days_back)).isoformat()


def span(uuid, start, end, value, unit=None, source="Watch"):
    element = {"uuid": uuid, "startDate": start, "endDate": end, "sourceName": source}
    if value is not None:
        element["value"] = value
    if unit:
        element["unit"] = unit
    return element


class PageTestCase(ServerTestCase):
    """Posts whose charts are read next: the hourly totals are brought up
    to date just after the answer, so wait for that."""

    def post(self, payload, headers=None, **kwargs):
        answer = super().post(payload, headers, **kwargs)
        wait_until(lambda: not self.query("SELECT 1 FROM sample_hours_pending LIMIT 1"))
        return answer

    def summary(self, range_name="30d"):
        status, _, facts = self.request("GET", f"{hr.SUMMARY_PATH}?range={range_name}")
        self.assertEqual(status, 200, facts)
        return facts

    def chart(self, facts, name):
        return next(chart for chart in facts["charts"] if chart["name"] == name)

    def page(self, path):
        status, response, body = self.request("GET", path)
        self.assertEqual(status, 200, body)
        self.assertTrue(response.getheader("Content-Type").startswith("text/html"))
        text = body.decode("utf-8")
        self.assertNotRegex(text, r"<(script|link|img)\b|https?://(?!www\.w3)")
        return text


def two_device_day(rng, day):
    """A generated day of steps that a Watch and an iPhone both counted, each
    cut into samples at its own boundaries and counting a little
    differently; the Watch off the wrist (charging) for a while and the
    phone left on a desk for another: (Watch samples, phone samples), each
    (start, end, steps) in seconds from ``day``'s midnight."""
    stretches, moment = [], 6 * 3600 + rng.randint(0, 3600)
    while moment < 22 * 3600:
        length = rng.choice([120, 300, 600, 900, 1800, 2700, 3600]) * rng.uniform(0.5, 1.5)
        stretches.append((moment, moment + length, rng.uniform(1.2, 2.0)))
        moment += length + rng.expovariate(1 / 2400)

    def device(chunk, bias, away_from, away_for):
        samples = []
        for start, end, rate in stretches:
            moment = start + rng.uniform(-20, 20)
            while moment < end:
                stop = min(end, moment + chunk * rng.uniform(0.3, 1.7))
                for low, high in ((moment, min(stop, away_from)), (max(moment, away_from + away_for), stop)):
                    if high - low > 1:
                        samples.append((low, high, round((high - low) * rate * bias * rng.uniform(0.97, 1.03))))
                moment = stop
        return samples

    return (device(rng.choice([60, 120, 300]), rng.uniform(0.97, 1.03), rng.uniform(6, 9) * 3600,
                   rng.uniform(1800, 5400)),
            device(rng.choice([300, 600, 900]), rng.uniform(0.9, 1.05), rng.uniform(10, 16) * 3600,
                   rng.uniform(1800, 7200)))


def watch_first_total(watch, phone):
    """Steps of a day merged second by second: the Watch's where a Watch
    sample covers the second, else the phone's."""
    covered = bytearray(86400)
    total = float(sum(steps for _start, _end, steps in watch))
    for start, end, _steps in watch:
        covered[int(start):int(end)] = b"\x01" * (int(end) - int(start))
    for start, end, steps in phone:
        rate = steps / (end - start)
        for second in range(int(start), int(end)):
            if not covered[second]:
                total += rate * (min(second + 1, end) - max(second, start))
    return total


class StepsTestCase(PageTestCase):
    """Posts days of steps of named devices and reads the days' totals."""

    def server_options(self):
        return {"utc": True}

    def post_steps(self, day, devices):
        midnight = datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.timezone.utc)

        def stamp(seconds):
            return (midnight + datetime.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

        data = [span(f"{name}-{day}-{number}", stamp(start), stamp(end), steps, "count", source=name)
                for name, samples in devices.items() for number, (start, end, steps) in enumerate(samples)]
        self.assertEqual(self.post({"data": {"HKQuantityTypeIdentifierStepCount": data}})[0], 200)

    def day_totals(self):
        steps = self.chart(self.summary("7d"), "StepCount")
        return {point[0][:10]: point[1] for point in steps["points"] if point[1]}

    def post_walk(self):
        """The walk both devices counted across 08:00; return its day."""
        day = TEST_NOW.date() - datetime.timedelta(days=2)
        hours = 3600
        self.post_steps(day, {"Jane's Apple Watch": [(7.5 * hours, 8 * hours, 3000), (8 * hours, 8 * hours + 600, 1000)],
                              "Jane's iPhone": [(7.5 * hours, 7 * hours + 58 * 60, 2700),
                                                (7 * hours + 58 * 60, 8 * hours + 600, 1150)]})
        return day


class CumulativeMergeTests(StepsTestCase):
    """Steps counted by two devices, against what the Health app shows."""

    def test_a_walk_both_devices_counted_across_an_hour_counts_once(self):
        day = self.post_walk()
        self.assertEqual({day: round(total, 6) for day, total in self.day_totals().items()}, {day.isoformat(): 4000})
        # The type's page says which device recorded how much.
        page = self.page("/type/StepCount?range=7d")
        sources = page[page.index("<h2>Sources</h2>"):page.index("<h2>Latest samples</h2>")]
        self.assertEqual(re.findall(r"<td>([^<]*)</td>", sources),
                         ["Jane&#x27;s Apple Watch", "2", "50%", "4,000", "Jane&#x27;s iPhone", "2", "50%", "0"])

    def test_the_last_sample_of_a_sync_spreads_into_the_next_hour(self):
        day = TEST_NOW.date() - datetime.timedelta(days=2)
        self.post_steps(day, {"Jane's Apple Watch": [(9 * 3600 + 50 * 60, 10 * 3600 + 10 * 60, 1200)]})
        self.assertEqual(self.query("SELECT hour, total FROM sample_hours ORDER BY hour"),
                         [(f"{day}T09:30", 600.0), (f"{day}T10", 600.0)])

    def test_a_sync_of_weeks_has_every_hour_totalled(self):
        # More hours than one statement totals (HOURS_PER_STATEMENT): every
        # week's hours are totalled, those where two statements meet too.
        hours = 3 * hr.HOURS_PER_STATEMENT + 5
        day = TEST_NOW.date() - datetime.timedelta(days=hours // 24 + 2)
        self.post_steps(day, {"Watch": [(n * 3600 + 600, n * 3600 + 1200, n + 1) for n in range(hours)]})
        found = self.query("SELECT hour, total FROM sample_hours ORDER BY hour")
        self.assertEqual(len(found), hours)
        self.assertEqual([total for _hour, total in found], [float(n + 1) for n in range(hours)])
        self.assertEqual(self.query("SELECT count(*) FROM sample_hours_pending"), [(0,)])

    def test_one_sources_samples_count_in_each_half_hour_as_a_second_by_second_count_says(self):
        # One source, nothing entered by hand: nothing hides anything, and
        # each sample counts in each half-hour its share of its seconds.
        # Seeded shapes: within a half-hour, across half-hours and days,
        # without a duration (whole at its start), longer than a week
        # (whole at its start), and before 1970.
        rng = random.Random(20261207)
        base = datetime.datetime(2026, 3, 1, tzinfo=datetime.timezone.utc)
        samples = []
        for number in range(300):
            start = base + datetime.timedelta(seconds=rng.randrange(3 * 86400))
            length = rng.choice([0, 30, 60, 600, 1800, 3 * 3600, 8 * 86400, rng.randrange(1, 7200)])
            samples.append((start, start + datetime.timedelta(seconds=length), rng.randrange(1, 500)))
        early = datetime.datetime(1969, 12, 31, 23, 50, tzinfo=datetime.timezone.utc)
        samples += [(early, early + datetime.timedelta(minutes=20), 120), (early, early, 7),
                    (base, base + datetime.timedelta(days=2), 4800)]
        across = base + datetime.timedelta(minutes=20)  # two samples of the same time, across 09:30
        samples += [(across, across + datetime.timedelta(minutes=20), 100)] * 2

        def text(moment):
            return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")

        def half_hour(moment):
            return moment.strftime("%Y-%m-%dT%H") + (":30" if moment.minute >= 30 else "")

        expected, counted, begun = collections.defaultdict(float), collections.defaultdict(int), {}
        for start, end, value in samples:
            figures = begun.setdefault(half_hour(start), [])
            figures.append(value)
            seconds = int((end - start).total_seconds())
            if seconds == 0 or seconds > 7 * 86400:
                expected[half_hour(start)] += value
                continue
            for second in range(seconds):
                expected[half_hour(start + datetime.timedelta(seconds=second))] += value / seconds
                counted[half_hour(start + datetime.timedelta(seconds=second))] += 1
        body = [span(f"S{number}", text(start), text(end), value, "count", source="Jane's Apple Watch")
                for number, (start, end, value) in enumerate(samples)]
        self.assertEqual(self.post({"data": {"HKQuantityTypeIdentifierStepCount": body}})[0], 200)
        found = dict(self.query("SELECT hour, total FROM sample_hours WHERE total != 0"))
        self.assertEqual(sorted(found), sorted(hour for hour, total in expected.items() if total))
        for hour, total in expected.items():
            self.assertAlmostEqual(found.get(hour, 0.0), total, places=6, msg=hour)
        # The seconds each half-hour's samples count, each sample's own.
        self.assertEqual(dict(self.query("SELECT hour, seconds FROM sample_hours WHERE seconds > 0")),
                         {hour: float(seconds) for hour, seconds in counted.items()})
        # Each half-hour's samples that start there: how many, least, greatest.
        self.assertEqual({hour: [samples, least, most] for hour, samples, least, most in self.query(
                          "SELECT hour, samples, low, high FROM sample_hours WHERE samples > 0")},
                         {hour: [len(values), min(values), max(values)] for hour, values in begun.items()})

    def test_numbers_whose_sum_passes_the_largest_integer_are_totalled_and_nothing_is_left_pending(self):
        # SQLite's sum() of integers fails past 2**63; one sync's samples
        # must not stop the hourly totals of every type and person.
        day = TEST_NOW.date() - datetime.timedelta(days=2)
        self.post_steps(day, {"Jane's Apple Watch": [(3600, 3660, 5 * 10 ** 18), (3700, 3760, 5 * 10 ** 18)]})
        status, _, _ = self.post({"data": {"HKQuantityTypeIdentifierHeartRate": [
            span("HR-1", f"{day}T02:00:00Z", f"{day}T02:00:00Z", 70, "count/min")]}})
        self.assertEqual(status, 200)
        self.assertEqual(self.query("SELECT type, hour, total FROM sample_hours ORDER BY hour"),
                         [("HKQuantityTypeIdentifierStepCount", f"{day}T01", 1e19),
                          ("HKQuantityTypeIdentifierHeartRate", f"{day}T02", 70.0)])
        self.assertEqual(self.query("SELECT count(*) FROM sample_hours_pending"), [(0,)])

    def test_a_long_sample_is_split_over_its_hours_and_hides_a_lower_source_under_it(self):
        day = TEST_NOW.date() - datetime.timedelta(days=2)
        hours = 3600
        self.post_steps(day, {"Jane's Apple Watch": [(5 * hours + 600, 7 * hours + 600, 3000)],
                              "Jane's iPhone": [(6 * hours + 300, 6 * hours + 900, 500)]})
        self.assertEqual({day: round(total, 6) for day, total in self.day_totals().items()}, {day.isoformat(): 3000})
        self.assertEqual([(hour[11:], round(total, 6)) for hour, total in self.query(
            "SELECT hour, sum(total) FROM sample_hours GROUP BY hour ORDER BY hour")],
            [("05", 500.0), ("05:30", 750.0), ("06", 750.0), ("06:30", 750.0), ("07", 250.0)])

    def test_sources_that_are_not_text_are_ranked_as_their_text_and_merged(self):
        day = TEST_NOW.date() - datetime.timedelta(days=2)
        midnight = f"{day}T10:"
        steps = [span("N1", midnight + "00:00Z", midnight + "10:00Z", 100, "count", source=5),
                 span("N2", midnight + "05:00Z", midnight + "15:00Z", 200, "count", source={"name": "x"}),
                 span("N3", midnight + "20:00Z", midnight + "30:00Z", 50, "count", source=None),
                 span("N4", midnight + "40:00Z", midnight + "50:00Z", 70, "count", source=True)]
        self.assertEqual(self.post({"data": {"HKQuantityTypeIdentifierStepCount": steps}})[0], 200)
        # Ranked in the order they came (by their first sample): 5 first, then {"name": "x"} for its last half.
        self.assertEqual({day: round(total, 6) for day, total in self.day_totals().items()},
                         {day.isoformat(): 100 + 100 + 50 + 70})
        self.assertEqual(sorted(self.query("SELECT source FROM sample_sources")), [("",), ("1",), ("5",),
                                                                                  ('{"name":"x"}',)])

    def test_sources_first_seen_in_one_sync_are_numbered_by_their_first_sample(self):
        day = TEST_NOW.date() - datetime.timedelta(days=2)
        for count in (3, 10):
            with self.subTest(count=count):
                apps = [f"App{count}-{number}" for number in range(count)]
                # The last app named has the earliest sample; each has a later one too.
                def at(number, late, minutes=0):
                    return f"{day}T{10 - number // 2 + late:02d}:{number % 2 * 30 + minutes:02d}:00Z"

                steps = [span(f"F{count}-{number}-{late}", at(number, late), at(number, late, 5), 10, "count",
                              source=app) for number, app in enumerate(apps) for late in (0, 3)]
                self.assertEqual(self.post({"data": {"HKQuantityTypeIdentifierStepCount": steps[::-1]}})[0], 200)
                seen = [source for (source,) in self.query("SELECT source FROM sample_sources WHERE source LIKE ?"
                                                           " ORDER BY seen", (f"App{count}-%",))]
                self.assertEqual(seen, sorted(apps, key=lambda app: (10 - apps.index(app) // 2,
                                                                     apps.index(app) % 2, app)))

    def test_generated_two_device_days_are_within_one_percent_of_a_watch_first_merge(self):
        rng = random.Random(11)
        today = TEST_NOW.date()
        expected, alone = {}, {}
        for back in range(1, 6):
            day = today - datetime.timedelta(days=back)
            watch, phone = two_device_day(rng, day)
            self.post_steps(day, {"Jane's Apple Watch": watch, "Jane's iPhone": phone})
            expected[day.isoformat()] = watch_first_total(watch, phone)
        found = self.day_totals()
        self.assertEqual(set(found), set(expected))
        for day, total in expected.items():
            with self.subTest(day=day):
                self.assertAlmostEqual(found[day] / total, 1, delta=0.01)
        # One device alone: exact.
        day = today - datetime.timedelta(days=6)
        watch, _phone = two_device_day(rng, day)
        self.post_steps(day, {"Watch only": watch})
        self.assertAlmostEqual(self.day_totals()[day.isoformat()], sum(steps for _s, _e, steps in watch), places=6)


class AveragedHoursTests(PageTestCase):
    """The hours of a type that is averaged (heart rate), per source: what
    a sample-by-sample count of them says."""

    def server_options(self):
        return {"utc": True}

    def test_each_hours_samples_count_per_source_with_their_numbers_total_least_and_greatest(self):
        # Seeded samples of two named sources and an unnamed one, numbers
        # whole and not, some values no number or missing, some at the same
        # moment; named cases: an hour of two sources, of one source but an
        # unnamed sample, of a sample without a number, of text.
        rng = random.Random(20261208)
        base = datetime.datetime(2026, 3, 1, tzinfo=datetime.timezone.utc)
        samples = []
        for number in range(400):
            start = base + datetime.timedelta(seconds=rng.randrange(2 * 86400) // 60 * 60)
            source = rng.choice(["Jane's Apple Watch"] * 8 + ["Jane's iPhone", None])
            value = rng.choice([rng.randrange(40, 180), round(rng.uniform(40, 180), 3)] * 10 + ["n/a", None])
            samples.append((f"HR{number:03d}", start, value, source))
        at = base + datetime.timedelta(days=3)
        samples += [("Two-1", at, 61.5, "Jane's Apple Watch"), ("Two-2", at, 70, "Jane's iPhone"),
                    ("Unnamed-1", at + datetime.timedelta(hours=1), 80.25, "Jane's Apple Watch"),
                    ("Unnamed-2", at + datetime.timedelta(hours=1, minutes=5), 81, None),
                    ("Missing-1", at + datetime.timedelta(hours=2), 90, "Jane's Apple Watch"),
                    ("Missing-2", at + datetime.timedelta(hours=2, minutes=1), None, "Jane's Apple Watch"),
                    ("Text-1", at + datetime.timedelta(hours=3), "high", "Jane's Apple Watch"),
                    ("Text-2", at + datetime.timedelta(hours=3, minutes=1), 99.5, "Jane's Apple Watch")]

        def text(moment):
            return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")

        expected = {}
        for _uuid, start, value, source in sorted(samples, key=lambda sample: (sample[1], sample[0])):
            row = expected.setdefault((start.strftime("%Y-%m-%dT%H"), source or ""), [0, 0, 0.0, None, None])
            row[0] += 1
            if isinstance(value, (int, float)):
                row[1] += 1
                row[2] += value
                row[3] = value if row[3] is None else min(row[3], value)
                row[4] = value if row[4] is None else max(row[4], value)
        body = [span(uuid, text(start), text(start + datetime.timedelta(minutes=1)), value, "count/min", source=source)
                for uuid, start, value, source in samples]
        self.assertEqual(self.post({"data": {"HKQuantityTypeIdentifierHeartRate": body}})[0], 200)
        found = {(hour, source): [samples, numbers, total, low, high] for hour, source, samples, numbers, total, low,
                 high, seconds in self.query("SELECT hour, source, samples, numbers, total, low, high, seconds"
                                             " FROM sample_hours WHERE category = '' AND seconds = 0")}
        self.assertEqual(self.query("SELECT count(*) FROM sample_hours"), [(len(found),)])
        self.assertEqual(sorted(found), sorted(expected))
        for key, (samples, numbers, total, low, high) in expected.items():
            with self.subTest(hour=key[0], source=key[1]):
                self.assertEqual(found[key][:2] + found[key][3:], [samples, numbers, low, high])
                self.assertAlmostEqual(found[key][2], total, places=6)

    def test_summarised_points_count_their_least_and_greatest_where_their_mean_is_a_number(self):
        # The other app's minutes of heart rate: least, mean and greatest;
        # a minute whose mean is missing or text is a sample, not a number.
        at = datetime.datetime(2026, 3, 10, 8, 0, tzinfo=datetime.timezone.utc)
        points = [hae_point(at, Min=58, Avg=71.5, Max=96),
                  hae_point(at + datetime.timedelta(minutes=1), Min=40, Avg=None, Max=150),
                  hae_point(at + datetime.timedelta(hours=1), Min=30, Avg="high", Max=160),
                  hae_point(at + datetime.timedelta(hours=1, minutes=1), Min=62, Avg=64, Max=70)]
        body = {"data": {"metrics": [hae_metric("heart_rate", "count/min", points)]}}
        self.assertEqual(self.post(body)[0], 200)
        self.assertEqual(self.query("SELECT hour, samples, numbers, total, low, high, seconds FROM sample_hours"
                                    " ORDER BY hour"),
                         [("2026-03-10T08", 2, 1, 71.5, 58.0, 96.0, 0.0), ("2026-03-10T09", 2, 1, 64.0, 62.0, 70.0, 0.0)])


class SourcePriorityTests(StepsTestCase):
    """--source-priority iPhone: the same walk as the phone counted it."""

    def server_options(self):
        return {"utc": True, "source_priority": ("iphone",)}

    def test_the_sources_named_first_count_first(self):
        day = self.post_walk()
        self.assertEqual({day: round(total, 6) for day, total in self.day_totals().items()}, {day.isoformat(): 3850})

    def test_the_database_keeps_the_words_and_new_ones_merge_the_totals_again(self):
        day = self.post_walk()
        self.assertEqual(self.query("SELECT value FROM settings WHERE name = 'source_priority'"), [("iphone",)])
        store = hr.Store(self.db)
        store.open()
        self.addCleanup(store.close)
        self.assertEqual(store.priority, ("iphone",))  # kept: a receiver started without the option uses them
        lines = []
        store.use_source_priority(("watch", "iphone"), lines.append)
        self.assertEqual(lines, ["  StepCount: hourly totals merged by source priority"])
        self.assertEqual({day: round(total, 6) for day, total in self.day_totals().items()}, {day.isoformat(): 4000})
        store.use_source_priority(("watch", "iphone"), lines.append)  # the same words: nothing to do
        self.assertEqual(len(lines), 1)

    def test_the_option_takes_comma_separated_words(self):
        self.assertEqual(hr.serve_parser().parse_args(["--source-priority", "iPhone, Garmin"]).source_priority,
                         ("iphone", "garmin"))
        with contextlib.redirect_stderr(io.StringIO()) as err:
            self.assertEqual(hr.main(["--source-priority", " ,", "--db", self.db]), 2)
        self.assertIn("at least one word", err.getvalue())


class SeriesRuleTests(StepsTestCase):
    """/api/series: a date range holds both its dates, a week averages over
    its days with data and says so, averaged types give min and max, and
    fractions are percent wherever they are shown."""

    def series(self, query):
        status, _, rows = self.request("GET", f"{hr.SERIES_PATH}?{query}")
        return status, rows

    def post_days(self):
        def walk(uuid, day, steps):
            return span(uuid, f"{day}T10:00:00Z", f"{day}T10:30:00Z", steps, "count", "Jane's Apple Watch")

        # Tuesday to Thursday of the week of Monday 2026-03-02.
        data = {"HKQuantityTypeIdentifierStepCount": [walk("S1", "2026-03-03", 8000), walk("S2", "2026-03-04", 7000),
                                                      walk("S3", "2026-03-05", 9000)],
                "HKQuantityTypeIdentifierHeartRate": [sample(f"H{n}", f"2026-03-04T0{n}:00:00.000Z", value)
                                                      for n, value in enumerate((60, 100, 80))],
                "HKQuantityTypeIdentifierOxygenSaturation": [sample("O1", "2026-03-04T01:00:00.000Z", 0.97, "%"),
                                                             sample("O2", "2026-03-04T02:00:00.000Z", 0.95, "%")]}
        self.assertEqual(self.post({"data": data})[0], 200)

    def test_a_date_as_to_includes_that_day(self):
        self.post_days()
        self.assertEqual(self.series("type=StepCount&from=2026-03-04&to=2026-03-04"),
                         (200, [{"time": "2026-03-04T00:00:00.000Z", "value": 7000.0}]))
        self.assertEqual(self.series("type=StepCount&from=2026-03-05&to=2026-03-04")[0], 400)

    def test_a_week_is_the_mean_of_its_days_with_data_and_a_cut_week_says_so(self):
        self.post_days()
        self.assertEqual(self.series("type=StepCount&from=2026-03-02&to=2026-03-08&grain=week"), (200, [
            {"time": "2026-03-02T00:00:00.000Z", "value": 8000.0, "days": 3, "partial": False}]))
        self.assertEqual(self.series("type=StepCount&from=2026-03-04&to=2026-03-10&grain=week"), (200, [
            {"time": "2026-03-04T00:00:00.000Z", "value": 8000.0, "days": 2, "partial": True},
            {"time": "2026-03-09T00:00:00.000Z", "value": None, "days": 0, "partial": True}]))
        # The page's week agrees: the mean of the recorded days, not a seventh of their sum.
        window = hr.days_window(hr.RANGES_BY_NAME["all"], datetime.date(2026, 3, 2), datetime.date(2026, 3, 8),
                                hr.Zone(True), grain=hr.GRAINS[1])
        with self.store.reader() as conn:
            info = hr.type_info(*hr.find_type(conn, "StepCount"))
            self.assertEqual(hr.chart_data(conn, info, window).points, ((datetime.date(2026, 3, 2), 8000.0),))

    def test_averaged_types_give_the_mean_min_and_max_of_their_samples(self):
        self.post_days()
        day = "type=HeartRate&from=2026-03-04&to=2026-03-04"
        self.assertEqual([self.series(f"{day}&stat={stat}")[1][0]["value"] for stat in ("mean", "min", "max")],
                         [80.0, 60.0, 100.0])
        self.assertEqual(self.series(day)[1][0]["value"], 80.0)
        status, answer = self.series("type=StepCount&from=2026-03-04&to=2026-03-04&stat=max")
        self.assertEqual((status, answer["error"]), (400, "stat applies to averaged types; StepCount is a sum type."))
        status, answer = self.series(f"{day}&stat=median")
        self.assertEqual((status, answer["error"]), (400, "stat must be one of mean, min, max."))

    def test_a_type_is_found_by_the_title_the_pages_give_it_and_an_unknown_one_lists_the_types(self):
        self.post_days()
        for name in ("Steps", "steps", "Blood%20oxygen", "blood-oxygen", "HKQuantityTypeIdentifierStepCount"):
            with self.subTest(name=name):
                status, rows = self.series(f"type={name}&from=2026-03-04&to=2026-03-04")
                self.assertEqual((status, len(rows)), (200, 1))
        status, answer = self.series("type=Stepz&from=2026-03-04&to=2026-03-04")
        self.assertEqual((status, answer["error"]), (404, "No samples of type Stepz; the types stored: HeartRate, "
                                                          "StepCount, OxygenSaturation."))

    def test_fractions_are_percent_in_the_series_the_latest_values_and_the_metrics(self):
        self.post_days()
        [point] = self.series("type=OxygenSaturation&from=2026-03-04&to=2026-03-04")[1]
        self.assertAlmostEqual(point["value"], 96.0, places=9)
        latest = self.request("GET", hr.LATEST_PATH)[2]["latest"]["OxygenSaturation"]
        self.assertEqual(latest["unit"], "%")
        self.assertAlmostEqual(latest["value"], 95.0, places=9)
        families = parse_exposition(self.request("GET", hr.METRICS_PATH)[2].decode())
        [(labels, value)] = [(labels, value) for _n, labels, value in families["health_latest_value"][2]
                             if labels["type"] == "OxygenSaturation"]
        self.assertEqual(labels["unit"], "%")
        self.assertAlmostEqual(value, 95.0, places=9)


# ---------------------------------------------------------------------------
# The Health app's numbers against an independent oracle
# ---------------------------------------------------------------------------
#
# The oracle below restates the rules of cumulative types, sleep and heart
# rate the dumbest obviously-right way, sharing no code with the receiver:
# its own ISO 8601 reader, its own local days (the OS's tz database), its
# own merge.  A seeded generator writes realistic days (a Watch and an
# iPhone counting the same walks, third-party apps, hand entries, travel
# days, DST days in two zones); the tests post them to the real receiver and
# compare its /api/series answers with the oracle's, per day and per hour.


ORACLE_MINUTE = 60 * 1000
ORACLE_HOUR = 60 * ORACLE_MINUTE
ORACLE_DAY = 24 * ORACLE_HOUR
ORACLE_EPOCH = datetime.date(1970, 1, 1)

ORACLE_STEPS = "HKQuantityTypeIdentifierStepCount"
ORACLE_FLIGHTS = "HKQuantityTypeIdentifierFlightsClimbed"
ORACLE_DISTANCE = "HKQuantityTypeIdentifierDistanceWalkingRunning"
ORACLE_HEART = "HKQuantityTypeIdentifierHeartRate"
ORACLE_SLEEP = "HKCategoryTypeIdentifierSleepAnalysis"
ORACLE_STAND = "HKCategoryTypeIdentifierAppleStandHour"
#: Cumulative types and their short names in /api/series.
ORACLE_CUMULATIVE = {ORACLE_STEPS: "StepCount", ORACLE_FLIGHTS: "FlightsClimbed",
                     ORACLE_DISTANCE: "DistanceWalkingRunning"}
ORACLE_HEART_STATS = ("min", "max", "mean")
#: The receiver's default source words: a source whose lowercased name holds
#: an earlier word ranks first.
ORACLE_WORDS = ("watch", "iphone")
ORACLE_SLEEP_NAMES = {"inBed": 0, "asleepUnspecified": 1, "awake": 2, "asleepCore": 3, "asleepDeep": 4,
                      "asleepREM": 5}
ORACLE_ASLEEP = frozenset((1, 3, 4, 5))


# -- times ------------------------------------------------------------------

_ORACLE_STAMP = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)\Z")


def oracle_ms(text):
    """Milliseconds since the epoch (UTC) of an ISO 8601 time with "Z" or a
    ±HH:MM offset; a longer fraction is cut to the millisecond."""
    match = _ORACLE_STAMP.match(text)
    if match is None:
        raise ValueError(f"not an ISO 8601 time with a zone: {text!r}")
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    millis = int((match.group(7) or "").ljust(3, "0")[:3])
    days = (datetime.date(year, month, day) - ORACLE_EPOCH).days
    ms = (((days * 24 + hour) * 60 + minute) * 60 + second) * 1000 + millis
    offset = match.group(8)
    if offset != "Z":
        sign = 1 if offset[0] == "+" else -1
        ms -= sign * (int(offset[1:3]) * 60 + int(offset[4:6])) * ORACLE_MINUTE
    return ms


def oracle_text(ms, offset=None, fraction=True):
    """``ms`` as ISO 8601 written at ``offset`` minutes east of UTC (None:
    UTC with "Z"); without ``fraction`` a whole second has no ".000"."""
    days, rest = divmod(ms + (offset or 0) * ORACLE_MINUTE, ORACLE_DAY)
    seconds, millis = divmod(rest, 1000)
    text = "%sT%02d:%02d:%02d" % ((ORACLE_EPOCH + datetime.timedelta(days=days)).isoformat(),
                                  seconds // 3600, seconds // 60 % 60, seconds % 60)
    if fraction or millis:
        text += ".%03d" % millis
    if offset is None:
        return text + "Z"
    return text + "%s%02d:%02d" % ("+" if offset >= 0 else "-", abs(offset) // 60, abs(offset) % 60)


class OracleZone:
    """Local days of a time zone as the OS's tz database has them: zoneinfo
    where there is one (Python 3.9+), else time.mktime under TZ (the test
    has set TZ to this zone and called tzset)."""

    def __init__(self, name):
        self.name = name

    def __str__(self):
        return self.name

    def at(self, date, hour=0):
        """Milliseconds (UTC) of ``hour``:00 local time on ``date``; only
        called for midnight and noon, which exist on every day of the zones
        the tests use."""
        if self.name == "UTC":
            return (date - ORACLE_EPOCH).days * ORACLE_DAY + hour * ORACLE_HOUR
        if _oracle_zoneinfo is not None:
            local = datetime.datetime(date.year, date.month, date.day, hour,
                                      tzinfo=_oracle_zoneinfo.ZoneInfo(self.name))
            return round(local.timestamp() * 1000)
        if os.environ.get("TZ") != self.name:
            raise RuntimeError(f"no zoneinfo: TZ must be {self.name} for time.mktime")
        return int(time.mktime((date.year, date.month, date.day, hour, 0, 0, 0, 0, -1))) * 1000


class OracleBuckets:
    """Consecutive periods [bounds[i], bounds[i + 1]) named keys[i]."""

    def __init__(self, bounds, keys):
        assert len(bounds) == len(keys) + 1 and all(a < b for a, b in zip(bounds, bounds[1:]))
        self.bounds, self.keys = list(bounds), list(keys)

    def index(self, ms):
        i = bisect.bisect_right(self.bounds, ms) - 1
        if not 0 <= i < len(self.keys):
            raise ValueError(f"{oracle_text(ms)} is outside the oracle's periods")
        return i

    def key_of(self, ms):
        return self.keys[self.index(ms)]

    def spread(self, start, end, amount, totals):
        """Add ``amount`` to ``totals`` spread evenly over [start, end)."""
        i, low = self.index(start), start
        while low < end:
            high = min(end, self.bounds[i + 1])
            totals[self.keys[i]] += amount * (high - low) / (end - start)
            low, i = high, i + 1


# -- the oracle -------------------------------------------------------------

OracleSample = collections.namedtuple("OracleSample", "start end value source hand")


def oracle_number(value):
    """A sample's value if it is a JSON number (not a boolean), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def oracle_hand(element):
    """Was the sample entered by hand: HKWasUserEntered true, 1, "1" or "true"."""
    metadata = element.get("metadata")
    flag = metadata.get("HKWasUserEntered") if isinstance(metadata, dict) else None
    if flag is True or (type(flag) is int and flag == 1):
        return True
    return isinstance(flag, str) and flag.lower() in ("1", "true")


def oracle_sleep_stage(value):
    """0-5 from a number or a name (None: neither)."""
    if isinstance(value, str):
        return ORACLE_SLEEP_NAMES.get(value)
    number = oracle_number(value)
    return int(number) if number is not None and number == int(number) and 0 <= number <= 5 else None


def oracle_union_ms(intervals):
    """The measure of the union of [start, end) intervals."""
    total, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += max(0, end - start)
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def oracle_expectations(body, zone, words=ORACLE_WORDS):
    """What the receiver must answer for ``body`` (one POST holding all of a
    person's samples) with days in ``zone``: {(short name, stat, grain):
    {key: value}}; a key is a local date (grain "day") or a UTC hour's start
    in ms (grain "hour").  Cumulative types have every period of the span
    (0.0 when nothing counts); heart rate and sleep only periods with data."""
    samples, earliest = collections.defaultdict(list), {}
    for type_name, elements in body["data"].items():
        for element in elements:
            start = oracle_ms(element["startDate"])
            end = oracle_ms(element.get("endDate") or element["startDate"])
            source = element.get("sourceName") or ""
            earliest[source] = min(start, earliest.get(source, start))
            samples[type_name].append(OracleSample(start, end, element.get("value"), source, oracle_hand(element)))
    # first_seen within one body: by the earliest start of any of a source's samples, ties by name.
    first_seen = {name: i for i, name in enumerate(sorted(earliest, key=lambda name: (earliest[name], name)))}

    def rank(source, hand):
        lowered = source.lower()
        word = next((i for i, w in enumerate(words) if w in lowered), len(words))
        return (0 if hand else 1, word, first_seen[source])

    # Periods: every local day (and UTC hour) from two days before the
    # first instant to two days after the last: enough for any zone.
    instants = [t for kept in samples.values() for sample in kept for t in (sample.start, sample.end)]
    first = ORACLE_EPOCH + datetime.timedelta(days=min(instants) // ORACLE_DAY - 2)
    last = ORACLE_EPOCH + datetime.timedelta(days=max(instants) // ORACLE_DAY + 2)
    dates = [first + datetime.timedelta(days=n) for n in range((last - first).days + 1)]
    days = OracleBuckets([zone.at(d) for d in dates] + [zone.at(last + datetime.timedelta(days=1))], dates)
    # The night of day D: samples starting from noon of D - 1 to noon of D.
    nights = OracleBuckets([zone.at(d - datetime.timedelta(days=1), 12) for d in dates] + [zone.at(last, 12)],
                           dates)
    hour_starts = list(range(days.bounds[0] // ORACLE_HOUR * ORACLE_HOUR, days.bounds[-1], ORACLE_HOUR))
    hours = OracleBuckets(hour_starts + [hour_starts[-1] + ORACLE_HOUR], hour_starts)

    expected = {}
    for type_name, name in ORACLE_CUMULATIVE.items():
        by_day, by_hour = oracle_cumulative(samples[type_name], rank, days, hours)
        expected[(name, None, "day")], expected[(name, None, "hour")] = by_day, by_hour
    for grain, buckets in (("day", days), ("hour", hours)):
        for stat, by_key in oracle_heart_rate(samples[ORACLE_HEART], buckets).items():
            expected[("HeartRate", stat, grain)] = by_key
    expected[("SleepAnalysis", None, "day")] = oracle_sleep(samples[ORACLE_SLEEP], rank, nights)
    for grain, buckets in (("day", days), ("hour", hours)):
        expected[("AppleStandHour", None, grain)] = oracle_stand_hours(samples[ORACLE_STAND], buckets)
    return expected


def oracle_stand_hours(samples, buckets):
    """{key: hours stood}: the Watch's "stood" samples (0, or a name ending
    in "stood") by the period of their start; every period, 0.0 without."""
    stood = dict.fromkeys(buckets.keys, 0.0)
    for s in samples:
        if s.value == 0 and s.value is not False or str(s.value).lower().endswith("stood"):
            stood[buckets.key_of(s.start)] += 1
    return stood


def oracle_cumulative(samples, rank, days, hours):
    """({date: total}, {hour: total}) of a cumulative type.

    The instants where any sample runs are cut at every sample's start and
    end into pieces; a piece goes to the samples of the best rank covering
    it, each in proportion to its own length."""
    numeric = [s for s in samples if oracle_number(s.value) is not None]
    spans = [s for s in numeric if s.end > s.start]
    bounds = sorted({t for s in spans for t in (s.start, s.end)})
    winner = [None] * max(len(bounds) - 1, 0)  # per piece: the best rank covering it
    for s in spans:
        r = rank(s.source, s.hand)
        for k in range(bisect.bisect_left(bounds, s.start), bisect.bisect_left(bounds, s.end)):
            if winner[k] is None or r < winner[k]:
                winner[k] = r
    by_day, by_hour = dict.fromkeys(days.keys, 0.0), dict.fromkeys(hours.keys, 0.0)
    for s in spans:
        r = rank(s.source, s.hand)
        for k in range(bisect.bisect_left(bounds, s.start), bisect.bisect_left(bounds, s.end)):
            if winner[k] == r:
                share = s.value * (bounds[k + 1] - bounds[k]) / (s.end - s.start)
                days.spread(bounds[k], bounds[k + 1], share, by_day)
                hours.spread(bounds[k], bounds[k + 1], share, by_hour)
    for s in numeric:
        if s.end > s.start:
            continue
        # A point counts at its start unless a strictly better sample runs then.
        k = bisect.bisect_right(bounds, s.start) - 1
        if 0 <= k < len(winner) and winner[k] is not None and winner[k] < rank(s.source, s.hand):
            continue
        by_day[days.key_of(s.start)] += s.value
        by_hour[hours.key_of(s.start)] += s.value
    return by_day, by_hour


def oracle_heart_rate(samples, buckets):
    """{stat: {key: value}}: every source's numbers by the period of their start."""
    values = collections.defaultdict(list)
    for s in samples:
        if oracle_number(s.value) is not None:
            values[buckets.key_of(s.start)].append(s.value)
    return {"min": {key: min(found) for key, found in values.items()},
            "max": {key: max(found) for key, found in values.items()},
            "mean": {key: math.fsum(found) / len(found) for key, found in values.items()}}


def oracle_sleep(samples, rank, nights):
    """{date: hours asleep}: per night, the best-ranked source with asleep
    samples, the union of its asleep samples (whole, not clipped)."""
    asleep = collections.defaultdict(lambda: collections.defaultdict(list))
    for s in samples:
        if oracle_sleep_stage(s.value) in ORACLE_ASLEEP:
            asleep[nights.key_of(s.start)][(s.source, s.hand)].append((s.start, s.end))
    found = {}
    for night, by_source in asleep.items():
        best = min(by_source, key=lambda merge_source: rank(*merge_source))
        found[night] = oracle_union_ms(by_source[best]) / ORACLE_HOUR
    return found


# -- the generator ----------------------------------------------------------

SCENARIO_WATCH = "Jane\u2019s Apple Watch"
SCENARIO_IPHONE = "Jane\u2019s iPhone"
SCENARIO_PEDOMETER = "Pedometer++"
SCENARIO_STEPS_APP = "StepsApp"
SCENARIO_HAND = "Health"
SCENARIO_SLEEP_APP = "AutoSleep"
#: Runs of consecutive days: New Year, both spring DST changes (US 03-08,
#: EU 03-29), both autumn ones (EU 10-25, US 11-01).
SCENARIO_RUNS = ((datetime.date(2025, 12, 28), datetime.date(2026, 1, 3)),
                 (datetime.date(2026, 2, 1), datetime.date(2026, 4, 30)),
                 (datetime.date(2026, 9, 15), datetime.date(2026, 11, 30)))
SCENARIO_SLEEP_STAGE_NAMES = {number: name for name, number in ORACLE_SLEEP_NAMES.items()}
#: Offsets (minutes east of UTC) a phone abroad writes its times at.
SCENARIO_TRAVEL_OFFSETS = (540, -420, 330, 60, -180, 0)


class ScenarioBody:
    """One POST body being written: samples by type, each with a unique uuid,
    times written at the day's offset (``offset``: None is "Z")."""

    def __init__(self, tag):
        self.tag = tag
        self.data = collections.OrderedDict()
        self.count = 0
        self.offset = None
        self.fraction = True

    def add(self, type_name, source, start, end, value, unit=None, metadata=None):
        self.count += 1
        element = {"uuid": f"{self.tag}-{self.count:06d}", "startDate": oracle_text(start, self.offset, self.fraction),
                   "endDate": oracle_text(end, self.offset, self.fraction), "sourceName": source, "value": value}
        if unit is not None:
            element["unit"] = unit
        if metadata is not None:
            element["metadata"] = metadata
        self.data.setdefault(type_name, []).append(element)

    def payload(self, rng):
        # The app's order is not the sources' order: shuffled, first_seen must
        # still come from the earliest start.
        for elements in self.data.values():
            rng.shuffle(elements)
        return {"data": self.data}


def scenario_body(seed, zone, runs=SCENARIO_RUNS):
    """The seeded body of every day of ``runs`` in ``zone``: (payload, days)."""
    rng = random.Random(seed)
    body = ScenarioBody(f"{seed}-{zone.name.replace('/', '-')}")
    days = 0
    for first, last in runs:
        day = first
        while day <= last:
            scenario_day(rng, body, zone, day)
            day += datetime.timedelta(days=1)
            days += 1
    return body.payload(rng), days


def _minutes(rng, low, high):
    return int(rng.uniform(low, high) * ORACLE_MINUTE)


def _without(low, high, away):
    """[low, high) minus the ``away`` intervals, as a list of pieces."""
    pieces = [(low, high)]
    for a, b in away:
        pieces = [piece for lo, hi in pieces for piece in ((lo, min(hi, a)), (max(lo, b), hi)) if piece[1] > piece[0]]
    return pieces


def _inside(moment, intervals):
    """Is ``moment`` in one of the intervals (tuples starting (start, end))?"""
    return any(interval[0] <= moment < interval[1] for interval in intervals)


def scenario_day(rng, body, zone, day):
    """One day: the night before it (sleep), walks counted by the day's step
    sources, heart rate, and now and then a hand entry, a point sample, a
    walk across midnight or a day abroad."""
    midnight, next_midnight = zone.at(day), zone.at(day + datetime.timedelta(days=1))
    body.offset = rng.choice(SCENARIO_TRAVEL_OFFSETS) if rng.random() < 0.06 else None
    body.fraction = rng.random() < 0.8
    wake = scenario_night(rng, body, zone, day, midnight)

    watch, phone = rng.random() < 0.88, rng.random() < 0.93
    pedometer, steps_app, hand = rng.random() < 0.3, rng.random() < 0.15, rng.random() < 0.15
    if watch + phone + pedometer + steps_app + hand < 2:
        watch = phone = True
    if watch + phone + pedometer + steps_app + hand > 4:
        steps_app = False

    # Walks: (start, end, steps per second) in ms; on some days one is a run.
    walks, moment = [], wake + _minutes(rng, 10, 60)
    while moment < midnight + 22 * ORACLE_HOUR:
        length = int(rng.choice([60, 120, 300, 600, 900, 1800, 2700]) * rng.uniform(0.5, 1.5) * 1000)
        walks.append((moment, moment + length, rng.uniform(1.2, 2.0)))
        moment += length + int(rng.expovariate(1 / 5400) * 1000)
    run = rng.randrange(len(walks)) if walks and rng.random() < 0.12 else None
    if run is not None:  # a run instead of one walk (and of the walks it runs into)
        start = walks[run][0]
        end = start + _minutes(rng, 20, 50)
        walks = walks[:run] + [(start, end, rng.uniform(2.6, 3.0))] + [w for w in walks[run + 1:] if w[0] >= end]
    if rng.random() < 0.08:  # home late: a walk across local midnight
        start = next_midnight - _minutes(rng, 5, 30)
        walks.append((start, start + _minutes(rng, 20, 60), rng.uniform(1.2, 1.8)))

    def walked(low, high, bias):
        """Steps counted from ``low`` to ``high`` by a device counting ``bias`` as many."""
        total = sum(max(0, min(high, b) - max(low, a)) / 1000 * rate for a, b, rate in walks)
        return round(total * bias * rng.uniform(0.97, 1.03))

    def add_steps(source, start, end, steps, stride, metadata=None):
        body.add(ORACLE_STEPS, source, start, end, steps, "count", metadata)
        if rng.random() < 0.5:  # not every step sample has its distance beside it
            body.add(ORACLE_DISTANCE, source, start, end, round(steps * stride, 5), "km", metadata)
        if rng.random() < 0.12:
            body.add(ORACLE_FLIGHTS, source, start, end, rng.randint(1, 3), "count", metadata)

    def device(source, chunk_seconds, away):
        """A device's own samples of the walks: its own boundaries, its own
        count, nothing while it is ``away`` (charging, on a desk)."""
        bias, stride = rng.uniform(0.92, 1.05), rng.uniform(0.0007, 0.00085)
        for start, end, _rate in walks:
            moment = start + int(rng.uniform(-20, 20) * 1000)
            while moment < end:
                stop = min(end, moment + int(chunk_seconds * rng.uniform(0.3, 1.7) * 1000))
                for low, high in _without(moment, stop, away):
                    if high - low >= 1000:
                        metadata = ({"HKWasUserEntered": rng.choice([0, False, "0", "false"])}
                                    if rng.random() < 0.04 else None)
                        add_steps(source, low, high, walked(low, high, bias), stride, metadata)
                moment = stop

    watch_away = []
    if watch:
        charging = rng.choice([wake + _minutes(rng, 0, 60), midnight + _minutes(rng, 19 * 60, 21 * 60)])
        watch_away = [(charging, charging + _minutes(rng, 30, 90))]
        device(SCENARIO_WATCH, rng.choice([120, 180, 300]), watch_away)
    if phone:
        desks = [midnight + _minutes(rng, 9 * 60, 16 * 60) for _ in range(rng.randint(1, 2))]
        device(SCENARIO_IPHONE, rng.choice([300, 600, 900]), [(d, d + _minutes(rng, 60, 180)) for d in desks])
        if rng.random() < 0.3:  # the phone's long, slow sample of a morning at the office
            start = midnight + _minutes(rng, 9 * 60, 15 * 60)
            add_steps(SCENARIO_IPHONE, start, start + _minutes(rng, 60, 180), rng.randint(20, 200), 0.0007)
    if pedometer:  # an hour's steps per sample
        bias, hour = rng.uniform(0.9, 1.1), midnight + 7 * ORACLE_HOUR
        while hour < midnight + 23 * ORACLE_HOUR:
            steps = walked(hour, hour + ORACLE_HOUR, bias)
            if steps:
                add_steps(SCENARIO_PEDOMETER, hour, hour + ORACLE_HOUR, steps, 0.00075)
            hour += ORACLE_HOUR
    if steps_app:  # blocks of two to four hours
        bias, block = rng.uniform(0.9, 1.1), midnight + _minutes(rng, 6 * 60, 9 * 60)
        while block < midnight + 22 * ORACLE_HOUR:
            length = rng.randint(2, 4) * ORACLE_HOUR
            add_steps(SCENARIO_STEPS_APP, block, block + length, walked(block, block + length, bias), 0.0008)
            block += length
    if hand:
        flag = {"HKWasUserEntered": rng.choice([1, True, "1", "true", "TRUE"])}
        start = (next_midnight - _minutes(rng, 30, 60) if rng.random() < 0.2
                 else midnight + _minutes(rng, 7 * 60, 21 * 60))
        length = 0 if rng.random() < 0.15 else 90 * ORACLE_MINUTE  # the Health app's form has one time or two
        body.add(ORACLE_STEPS, SCENARIO_HAND, start, start + length, rng.randint(20, 60) * 100, "count", flag)
        if rng.random() < 0.3:
            body.add(ORACLE_DISTANCE, SCENARIO_HAND, start, start + length, round(rng.uniform(1.5, 4.5), 2), "km",
                     flag)
    sources = [name for name, used in ((SCENARIO_WATCH, watch), (SCENARIO_IPHONE, phone),
                                       (SCENARIO_PEDOMETER, pedometer), (SCENARIO_STEPS_APP, steps_app)) if used]
    if sources and rng.random() < 0.3:  # points: some at an hour's first instant
        for _ in range(rng.randint(1, 3)):
            at = midnight + _minutes(rng, 7 * 60, 22 * 60)
            if rng.random() < 0.3:
                at = at // ORACLE_HOUR * ORACLE_HOUR
            body.add(ORACLE_STEPS, rng.choice(sources), at, at, rng.randint(5, 120), "count")

    # Heart rate: the Watch every 10-25 minutes while worn, every 5 s for the
    # first ten minutes of a run; the iPhone (a camera app) now and then.
    if watch:
        moment = wake + _minutes(rng, 5, 20)
        while moment < midnight + 22 * ORACLE_HOUR + 30 * ORACLE_MINUTE:
            if not _inside(moment, watch_away):
                walking = _inside(moment, walks)
                value = rng.randint(90, 130) if walking else rng.randint(56, 95)
                body.add(ORACLE_HEART, SCENARIO_WATCH, moment, moment,
                         round(value + rng.random(), 1) if rng.random() < 0.1 else value, "count/min")
            moment += _minutes(rng, 10, 25)
        if run is not None:
            start, end, _rate = walks[run]
            for at in range(start, min(end, start + 10 * ORACLE_MINUTE), 5000):
                body.add(ORACLE_HEART, SCENARIO_WATCH, at, at, rng.randint(140, 175), "count/min")
    if watch:  # stand hours: one sample an hour while awake, stood or idle, as a number or a name
        for hour in range((wake - midnight) // ORACLE_HOUR + 1, 23):
            value = rng.choice([0, 0, "stood", "HKCategoryValueAppleStandHourStood", 1, "idle"])
            body.add(ORACLE_STAND, SCENARIO_WATCH, midnight + hour * ORACLE_HOUR,
                     midnight + (hour + 1) * ORACLE_HOUR, value)
    if phone and rng.random() < 0.3:
        for _ in range(rng.randint(1, 2)):
            at = midnight + _minutes(rng, 8 * 60, 21 * 60)
            body.add(ORACLE_HEART, SCENARIO_IPHONE, at, at + int(rng.uniform(30, 60) * 1000), rng.randint(60, 90),
                     "count/min")


def scenario_night(rng, body, zone, day, midnight):
    """The night ending on the morning of ``day``: the Watch's stages and
    sleeping heart rate, a sleep app's "asleep" (beside the Watch, or
    alone), the iPhone's "in bed", rarely a hand entry; and now and then
    the sleep app's nap that afternoon (the next night's).  Returns when
    she got up."""
    bed = midnight + _minutes(rng, -150, 60)
    asleep_from = bed + _minutes(rng, 5, 25)
    asleep_to = asleep_from + _minutes(rng, 5.5 * 60, 8.5 * 60)
    watch = rng.random() < 0.75
    app = rng.random() < (0.35 if watch else 0.6)

    def stage_value(stage, style):
        named = style == "names" or (style == "mixed" and rng.random() < 0.5)
        return SCENARIO_SLEEP_STAGE_NAMES[stage] if named else stage

    if watch:
        style, moment, cycle = rng.choice(["numbers", "names", "mixed"]), asleep_from, 0
        while moment < asleep_to:
            if rng.random() < 0.12:
                stage, length = 2, _minutes(rng, 1, 12)
            else:
                stage = (3, 4, 3, 5)[cycle % 4]
                length = _minutes(rng, 10, 45) if stage == 3 else _minutes(rng, 5, 30)
                cycle += 1
            end = min(asleep_to, moment + length)
            # Now and then a stage starts before the last ended: the union counts it once.
            start = moment - _minutes(rng, 2, 5) if moment > asleep_from and rng.random() < 0.05 else moment
            body.add(ORACLE_SLEEP, SCENARIO_WATCH, start, end, stage_value(stage, style))
            moment = end
        moment = asleep_from + _minutes(rng, 5, 30)
        while moment < asleep_to:
            body.add(ORACLE_HEART, SCENARIO_WATCH, moment, moment, rng.randint(46, 64), "count/min")
            moment += _minutes(rng, 20, 40)
    if app:
        low, high = asleep_from + _minutes(rng, -10, 10), asleep_to + _minutes(rng, -10, 10)
        pieces = [(low, high)]
        if rng.random() < 0.3:  # woke in the night: two pieces, overlapping or apart
            cut = low + (high - low) // 2 + _minutes(rng, -60, 60)
            pieces = [(low, cut + _minutes(rng, 0, 10)), (cut + _minutes(rng, -5, 15), high)]
        for start, end in pieces:
            body.add(ORACLE_SLEEP, SCENARIO_SLEEP_APP, start, end, stage_value(1, "mixed"))
    if rng.random() < 0.5:
        body.add(ORACLE_SLEEP, SCENARIO_IPHONE, bed - _minutes(rng, 0, 15), asleep_to + _minutes(rng, 0, 20),
                 stage_value(0, "mixed"))
    if rng.random() < 0.03:
        body.add(ORACLE_SLEEP, SCENARIO_HAND, bed, bed + _minutes(rng, 6 * 60, 8 * 60), stage_value(1, "mixed"),
                 metadata={"HKWasUserEntered": 1})
    if rng.random() < 0.08:  # an afternoon nap: it belongs to the night ending tomorrow
        noon = zone.at(day, 12)
        start = rng.choice([noon, noon - 1, noon + _minutes(rng, 30, 270)])  # noon itself is the next night's
        body.add(ORACLE_SLEEP, SCENARIO_SLEEP_APP, start, start + _minutes(rng, 20, 90), stage_value(1, "mixed"))
    return asleep_to + _minutes(rng, 0, 20)


# -- the tests --------------------------------------------------------------

def oracle_close(name, stat, expected, found):
    """Is ``found`` (None: the receiver's null) what the oracle expects?"""
    if name == "SleepAnalysis":
        if expected is None:  # a night without asleep samples: null, or 0 hours
            return found is None or found == 0
        return found is not None and abs(found - expected) <= 1 / 60
    if name == "HeartRate":
        if expected is None or found is None:
            return expected is None and found is None
        if stat in ("min", "max"):
            return abs(found - expected) <= 1e-9
        return abs(found - expected) <= 0.005 * abs(expected)
    found = 0.0 if found is None else found  # cumulative and stand hours: null is nothing counted
    if name == "AppleStandHour":
        return abs(found - expected) <= 1e-9
    return abs(found - expected) <= max(0.005 * abs(expected), 1e-6)


class OracleSeriesReader:
    """Reads /api/series as the oracle's keys: a mixin of ServerTestCase.
    ``where`` (the seed and zone) starts every failure message."""

    where = ""

    def series(self, name, start, end, grain, stat=None):
        path = f"/api/series?type={name}&from={start}&to={end}&grain={grain}" + (f"&stat={stat}" if stat else "")
        status, _, points = self.request("GET", path)
        self.assertEqual(status, 200, f"{self.where} GET {path}: {points!r}"[:500])
        self.assertIsInstance(points, list, path)
        return points

    def day_points(self, name, stat, first, last):
        """[(date, period start as the receiver says it, value)] from ``first`` to ``last``."""
        points = self.series(name, first.isoformat(), last.isoformat(), "day", stat)
        dates = [first + datetime.timedelta(days=n) for n in range((last - first).days + 1)]
        self.assertEqual(len(points), len(dates), f"{self.where} {name}: one point per day from {first} to {last}")
        return [(date, point["time"], point["value"]) for date, point in zip(dates, points)]

    def hour_points(self, name, stat, start_ms, end_ms, per_request=2400):
        """[(hour start in ms, value)] of the UTC hours from ``start_ms`` to ``end_ms``."""
        found = []
        for low in range(start_ms, end_ms, per_request * ORACLE_HOUR):
            high = min(end_ms, low + per_request * ORACLE_HOUR)
            points = self.series(name, oracle_text(low, fraction=False), oracle_text(high, fraction=False), "hour",
                                 stat)
            self.assertEqual([oracle_ms(point["time"]) for point in points], list(range(low, high, ORACLE_HOUR)),
                             f"{self.where} {name}: one point per UTC hour from {oracle_text(low)} to "
                             f"{oracle_text(high)}")
            found.extend((oracle_ms(point["time"]), point["value"]) for point in points)
        return found


#: What the oracle reads back: (short name, stat, grain).
ORACLE_SERIES = ([(name, None, grain) for name in ORACLE_CUMULATIVE.values() for grain in ("day", "hour")]
                 + [("HeartRate", stat, grain) for stat in ORACLE_HEART_STATS for grain in ("day", "hour")]
                 + [("SleepAnalysis", None, "day")]
                 + [("AppleStandHour", None, grain) for grain in ("day", "hour")])


class ZoneTestMixin:
    """Runs the receiver in a process zone (TZ) set before it starts and
    restored after it stops."""

    process_zone = None

    def setUp(self):
        if self.process_zone is not None:
            if not hasattr(time, "tzset"):
                self.skipTest("needs time.tzset")
            previous = os.environ.get("TZ")
            os.environ["TZ"] = self.process_zone
            time.tzset()

            def restore():  # a cleanup: runs after tearDown, even when setUp failed
                if previous is None:
                    os.environ.pop("TZ", None)
                else:
                    os.environ["TZ"] = previous
                time.tzset()

            self.addCleanup(restore)
        super().setUp()


class HealthAppOracleTests(ZoneTestMixin, OracleSeriesReader, PageTestCase):
    """Generated days posted as one body, read back per day and per hour
    and compared with the oracle.  ORACLE_SEED=<n> in the environment runs
    every test with that seed instead of its own."""

    #: Test -> (process TZ, receiver in UTC (ReceiverConfig utc), the days' zone, seed).
    RUNS = {
        "test_new_york_days_and_hours_match_the_oracle": ("America/New_York", False, "America/New_York", 20260308),
        "test_berlin_days_and_hours_match_the_oracle": ("Europe/Berlin", False, "Europe/Berlin", 20260329),
        # The receiver's own utc option wins over the process's zone.
        "test_utc_days_and_hours_match_the_oracle": ("America/New_York", True, "UTC", 20261101),
    }
    max_body = 64 * hr.MIB
    timeout = 30.0
    #: Mismatches shown in a failure (all are counted).
    shown = 25

    def setUp(self):
        self.process_zone, self.utc, zone_name, seed = self.RUNS[self._testMethodName]
        self.zone = OracleZone(zone_name)
        self.seed = int(os.environ.get("ORACLE_SEED", seed))
        self.where = f"seed {self.seed}, zone {self.zone}"
        super().setUp()

    def server_options(self):
        return {"utc": True} if self.utc else {}

    def check_against_the_oracle(self):
        payload, days = scenario_body(self.seed, self.zone)
        expected = oracle_expectations(payload, self.zone)
        posted = sum(len(elements) for elements in payload["data"].values())
        status, _, answer = self.post(payload)
        where = self.where
        self.assertEqual(status, 200, f"{where}: {answer!r}"[:500])
        self.assertEqual(self.query("SELECT reason, record FROM rejected LIMIT 3"), [], where)
        self.assertEqual(self.count("samples"), posted, f"{where}: every sample stored")

        mismatches, compared = [], 0
        for first, last in SCENARIO_RUNS:
            # A day on each side: nothing may leak out of the run.
            first, last = first - datetime.timedelta(days=1), last + datetime.timedelta(days=1)
            for name, stat, grain in ORACLE_SERIES:
                wanted = expected[(name, stat, grain)]
                label = name + (f" {stat}" if stat else "")
                default = 0.0 if name in ORACLE_CUMULATIVE.values() or name == "AppleStandHour" else None
                if grain == "day":
                    for date, period, value in self.day_points(name, stat, first, last):
                        compared += 1
                        if period != oracle_text(self.zone.at(date)):
                            mismatches.append(f"{where}, day {date}, {label}: the day starts at "
                                              f"{oracle_text(self.zone.at(date))}, found {period}")
                        if not oracle_close(name, stat, wanted.get(date, default), value):
                            mismatches.append(f"{where}, day {date}, {label}: expected {wanted.get(date, default)!r},"
                                              f" found {value!r}")
                else:
                    start = (first - ORACLE_EPOCH).days * ORACLE_DAY
                    end = (last - ORACLE_EPOCH).days * ORACLE_DAY + ORACLE_DAY
                    for hour, value in self.hour_points(name, stat, start, end):
                        compared += 1
                        if not oracle_close(name, stat, wanted.get(hour, default), value):
                            mismatches.append(f"{where}, hour {oracle_text(hour)}, {label}: expected "
                                              f"{wanted.get(hour, default)!r}, found {value!r}")
        if mismatches:
            self.fail(f"{len(mismatches)} of {compared} points differ from the oracle ({days} days, {posted} samples;"
                      f" {where}):\n" + "\n".join(mismatches[:self.shown])
                      + (f"\n... and {len(mismatches) - self.shown} more" if len(mismatches) > self.shown else ""))

    def test_new_york_days_and_hours_match_the_oracle(self):
        self.check_against_the_oracle()

    def test_berlin_days_and_hours_match_the_oracle(self):
        self.check_against_the_oracle()

    def test_utc_days_and_hours_match_the_oracle(self):
        self.check_against_the_oracle()


class OracleRegressionCase(ZoneTestMixin, OracleSeriesReader, PageTestCase):
    """Small bodies with their numbers worked out by hand: the helpers."""

    day = datetime.date(2026, 3, 5)

    def server_options(self):
        return {} if self.process_zone else {"utc": True}

    def at(self, clock, day=None):
        """"HH:MM" or "HH:MM:SS" on ``day`` (default: self.day) in UTC, as ISO 8601."""
        return f"{day or self.day}T{clock if clock.count(':') == 2 else clock + ':00'}.000Z"

    def post_samples(self, *samples):
        """Post (type, source, start, end, value[, metadata]) tuples in one body."""
        data = collections.OrderedDict()
        for number, (type_name, source, start, end, value, *metadata) in enumerate(samples):
            element = {"uuid": f"R-{number}", "startDate": start, "endDate": end, "sourceName": source, "value": value}
            if type_name != ORACLE_SLEEP:
                element["unit"] = {ORACLE_HEART: "count/min", ORACLE_DISTANCE: "km"}.get(type_name, "count")
            if metadata:
                element["metadata"] = metadata[0]
            data.setdefault(type_name, []).append(element)
        status, _, answer = self.post({"data": data})
        self.assertEqual(status, 200, answer)

    def day_value(self, name, stat=None, day=None):
        [(_date, _start, value)] = self.day_points(name, stat, day or self.day, day or self.day)
        return value

    def steps(self, source, start, end, value, metadata=None):
        return (ORACLE_STEPS, source, self.at(start), self.at(end), value) + ((metadata,) if metadata else ())


class HealthAppRegressionTests(OracleRegressionCase):
    """The rules one case at a time, days in UTC."""

    def test_a_watch_walk_and_a_later_phone_walk_both_count(self):
        self.post_samples(self.steps(SCENARIO_WATCH, "10:00", "10:10", 1000),
                          self.steps(SCENARIO_IPHONE, "10:20", "10:30", 800))
        self.assertAlmostEqual(self.day_value("StepCount"), 1800, places=6)

    def test_a_hand_entry_ranks_first_and_covers_the_watch(self):
        self.post_samples(self.steps(SCENARIO_HAND, "14:00", "15:30", 3000, {"HKWasUserEntered": 1}),
                          self.steps(SCENARIO_WATCH, "14:30", "14:31", 10))
        self.assertAlmostEqual(self.day_value("StepCount"), 3000, places=6)

    def test_without_the_hand_flag_the_watch_minute_comes_first(self):
        self.post_samples(self.steps(SCENARIO_PEDOMETER, "14:00", "15:30", 3000),
                          self.steps(SCENARIO_WATCH, "14:30", "14:31", 10))
        self.assertAlmostEqual(self.day_value("StepCount"), 3000 * 89 / 90 + 10, places=6)

    def test_a_sample_across_an_hour_is_split_by_time(self):
        self.post_samples(self.steps(SCENARIO_WATCH, "18:50", "19:10", 1200))
        hours = self.hour_points("StepCount", None, oracle_ms(self.at("18:00")), oracle_ms(self.at("20:00")))
        self.assertEqual([(oracle_text(hour), round(value, 6)) for hour, value in hours],
                         [(self.at("18:00"), 600), (self.at("19:00"), 600)])
        self.assertAlmostEqual(self.day_value("StepCount"), 1200, places=6)

    def test_a_later_sync_under_a_sample_of_days_merges_the_hours_it_covers(self):
        # Two days of the phone (100 steps an hour), then a sync of a Watch walk in the middle of it.
        self.post_samples((ORACLE_STEPS, SCENARIO_IPHONE, self.at("00:00"),
                           self.at("00:00", self.day + datetime.timedelta(days=2)), 4800))
        self.post_samples(self.steps(SCENARIO_WATCH, "12:00", "12:30", 1000)[:2]
                          + (self.at("12:00", self.day + datetime.timedelta(days=1)),
                             self.at("12:30", self.day + datetime.timedelta(days=1)), 1000))
        found = self.day_points("StepCount", None, self.day, self.day + datetime.timedelta(days=1))
        self.assertEqual([round(value, 6) for _date, _start, value in found], [2400, 2400 - 50 + 1000])
        noon = oracle_ms(self.at("12:00", self.day + datetime.timedelta(days=1)))
        self.assertEqual([round(value, 6) for _hour, value in self.hour_points("StepCount", None, noon - ORACLE_HOUR,
                                                                                noon + 2 * ORACLE_HOUR)],
                         [100, 50 + 1000, 100])

    def test_points_count_unless_a_better_source_runs_then(self):
        self.post_samples(self.steps(SCENARIO_IPHONE, "09:00", "09:10", 500),
                          self.steps(SCENARIO_WATCH, "09:05", "09:05", 7),   # better than the phone: counts
                          self.steps(SCENARIO_WATCH, "11:00", "11:10", 600),
                          self.steps(SCENARIO_IPHONE, "11:05", "11:05", 9),  # under the Watch: does not
                          self.steps(SCENARIO_WATCH, "11:07", "11:07", 3),   # under its own source: counts
                          self.steps(SCENARIO_IPHONE, "11:10", "11:10", 4))  # at the Watch's end: counts
        self.assertAlmostEqual(self.day_value("StepCount"), 500 + 7 + 600 + 3 + 4, places=6)

    def test_overlapping_samples_of_one_source_both_count(self):
        self.post_samples(self.steps(SCENARIO_WATCH, "08:00", "08:10", 300),
                          self.steps(SCENARIO_WATCH, "08:05", "08:15", 200))
        self.assertAlmostEqual(self.day_value("StepCount"), 500, places=6)

    def test_between_two_apps_the_earliest_seen_ranks_first(self):
        # Neither names a word: the one with the earliest sample of any type
        # wins, whatever the order in the body or the names' order.
        self.post_samples(self.steps(SCENARIO_PEDOMETER, "10:00", "11:00", 600),
                          self.steps(SCENARIO_STEPS_APP, "10:30", "11:30", 900),
                          (ORACLE_HEART, SCENARIO_STEPS_APP, self.at("07:00"), self.at("07:00"), 70))
        # StepsApp all its 900; Pedometer++ only 10:00-10:30, half of its 600.
        self.assertAlmostEqual(self.day_value("StepCount"), 900 + 300, places=6)

    def test_the_iphone_ranks_before_an_app_seen_earlier(self):
        # "iphone" is the second default word: it beats a source naming no word.
        self.post_samples(self.steps(SCENARIO_PEDOMETER, "09:00", "11:00", 1200),
                          self.steps(SCENARIO_IPHONE, "10:00", "10:30", 100))
        self.assertAlmostEqual(self.day_value("StepCount"), 100 + 1200 * 90 / 120, places=6)

    def test_sleep_is_the_best_source_of_the_night_not_the_sum(self):
        evening = self.day - datetime.timedelta(days=1)
        watch = [("23:00", "01:00", 3), ("01:00", "02:00", "asleepDeep"), ("02:00", "02:20", 2),
                 ("02:20", "03:41", "asleepREM"), ("03:41", "05:41", "asleepCore")]  # 2 + 1 + 1.35 + 2 h asleep

        def stamp(clock):
            return self.at(clock, evening if clock >= "12:00" else self.day)

        self.post_samples(*[(ORACLE_SLEEP, SCENARIO_WATCH, stamp(a), stamp(b), value) for a, b, value in watch],
                          (ORACLE_SLEEP, SCENARIO_SLEEP_APP, stamp("22:50"), stamp("05:50"), 1),
                          (ORACLE_SLEEP, SCENARIO_IPHONE, stamp("22:40"), stamp("06:00"), "inBed"))
        self.assertAlmostEqual(self.day_value("SleepAnalysis"), 6.35, delta=1 / 3600)

    def test_a_nap_from_noon_on_is_the_next_nights(self):
        self.post_samples((ORACLE_SLEEP, SCENARIO_SLEEP_APP, self.at("11:00"), self.at("11:30"), 1),
                          (ORACLE_SLEEP, SCENARIO_SLEEP_APP, self.at("12:00"), self.at("13:00"), "asleepUnspecified"))
        self.assertAlmostEqual(self.day_value("SleepAnalysis"), 0.5, delta=1 / 3600)
        self.assertAlmostEqual(self.day_value("SleepAnalysis", day=self.day + datetime.timedelta(days=1)), 1.0,
                               delta=1 / 3600)

    def test_a_day_of_heart_rate_is_the_mean_of_its_samples(self):
        def beat(clock, value):
            return (ORACLE_HEART, SCENARIO_WATCH, self.at(clock), self.at(clock), value)

        morning = [beat(f"{7 + n // 3:02d}:{n % 3 * 20:02d}", 60) for n in range(12)]
        run = [beat(f"17:{n // 12:02d}:{n % 12 * 5:02d}", 150) for n in range(720)]  # every 5 s for an hour
        self.post_samples(*morning, *run)
        self.assertAlmostEqual(self.day_value("HeartRate", "mean"), (12 * 60 + 720 * 150) / 732, places=6)
        self.assertEqual((self.day_value("HeartRate", "min"), self.day_value("HeartRate", "max")), (60, 150))
        hours = self.hour_points("HeartRate", "mean", oracle_ms(self.at("16:00")), oracle_ms(self.at("18:00")))
        self.assertEqual(hours, [(oracle_ms(self.at("16:00")), None), (oracle_ms(self.at("17:00")), 150)])


class HealthAppDstRegressionTests(OracleRegressionCase):
    """Days of 23 and 25 hours: the receiver in New York."""

    process_zone = "America/New_York"

    def test_the_spring_forward_day_has_23_hours(self):
        # 2026-03-08 runs from 05:00Z (EST) to 04:00Z (EDT): half of each hour-long walk falls in it.
        self.post_samples((ORACLE_STEPS, SCENARIO_WATCH, "2026-03-08T04:30:00.000Z", "2026-03-08T05:30:00.000Z", 600),
                          (ORACLE_STEPS, SCENARIO_WATCH, "2026-03-09T03:30:00.000Z", "2026-03-09T04:30:00.000Z", 600))
        found = self.day_points("StepCount", None, datetime.date(2026, 3, 7), datetime.date(2026, 3, 9))
        self.assertEqual([(start, round(value, 6)) for _date, start, value in found],
                         [("2026-03-07T05:00:00.000Z", 300), ("2026-03-08T05:00:00.000Z", 600),
                          ("2026-03-09T04:00:00.000Z", 300)])

    def test_the_fall_back_day_has_25_hours(self):
        # 2026-11-01 runs from 04:00Z (EDT) to 05:00Z (EST); written in New York's own offsets.
        self.post_samples((ORACLE_STEPS, SCENARIO_WATCH, "2026-11-01T00:00:00.000-04:00",
                           "2026-11-02T00:00:00.000-05:00", 2500),
                          (ORACLE_SLEEP, SCENARIO_WATCH, "2026-10-31T23:00:00.000-04:00",
                           "2026-11-01T06:00:00.000-05:00", "asleepCore"))
        found = self.day_points("StepCount", None, datetime.date(2026, 11, 1), datetime.date(2026, 11, 2))
        self.assertEqual([(start, round(value or 0, 6)) for _date, start, value in found],
                         [("2026-11-01T04:00:00.000Z", 2500), ("2026-11-02T05:00:00.000Z", 0)])
        self.assertAlmostEqual(self.day_value("SleepAnalysis", day=datetime.date(2026, 11, 1)), 8, delta=1 / 3600)


class CategoryTypeTests(PageTestCase):
    """Category types summed up by what their values mean."""

    def server_options(self):
        return {"utc": True}

    def test_stand_hours_count_the_hours_stood_and_values_are_named(self):
        day = TEST_NOW.date() - datetime.timedelta(days=1)
        stand = []
        for hour in range(7, 22):  # 13 hours stood and 2 idle, sent as numbers and as names
            value = 1 if hour in (12, 18) else 0
            if hour % 3 == 0:
                value = "HKCategoryValueAppleStandHourIdle" if value else "HKCategoryValueAppleStandHourStood"
            stand.append(span(f"S-{hour}", f"{day}T{hour:02d}:00:00Z", f"{day}T{hour:02d}:59:59Z", value))
        headache = [span("H-1", f"{day}T09:00:00Z", f"{day}T10:00:00Z", 3),
                    span("H-2", f"{day}T15:00:00Z", f"{day}T15:00:00Z", "notPresent")]
        self.assertEqual(self.post({"data": {"HKCategoryTypeIdentifierAppleStandHour": stand,
                                             "HKCategoryTypeIdentifierHeadache": headache}})[0], 200)
        facts = self.summary("7d")
        stood = self.chart(facts, "AppleStandHour")
        self.assertEqual((stood["kind"], [point[1] for point in stood["points"] if point[1]]), ("stand", [13]))
        self.assertEqual([point[1] for point in self.chart(facts, "Headache")["points"] if point[1]], [1])
        page = self.page("/type/AppleStandHour?range=7d")
        self.assertIn("hours stood per day", page)
        self.assertIn("Stood 13, Idle 2", page)
        self.assertIn("<td>Idle</td>", page)
        self.assertIn("<td>Stood</td>", page)
        self.assertNotIn("HKCategoryValueAppleStandHour", page)
        page = self.page("/type/Headache?range=7d")
        self.assertIn("<td>1</td><td>1</td><td>Not present 1, Moderate 1</td>", page)

    def test_category_values_by_number_or_name(self):
        stand, flow = "HKCategoryTypeIdentifierAppleStandHour", "HKCategoryTypeIdentifierMenstrualFlow"
        for type_name, value, name in ((stand, 0, "Stood"), (stand, 1.0, "Idle"), (stand, "stood", "Stood"),
                                       (stand, "HKCategoryValueAppleStandHourIdle", "Idle"), (stand, "1", "Idle"),
                                       (stand, 7, None), (stand, "sat", None), (stand, True, None),
                                       (flow, "heavy", "Heavy"), (flow, 5, "None"),
                                       ("HKCategoryTypeIdentifierSleepAnalysis", 3, "Core"),
                                       ("HKCategoryTypeIdentifierSomethingNew", 1, None),
                                       ("HKQuantityTypeIdentifierStepCount", 0, None)):
            with self.subTest(type_name=type_name, value=value):
                self.assertEqual(hr.category_name(type_name, value), name)


class WorkoutHeartRateTests(PageTestCase):

    def test_a_workout_page_charts_heart_rate_and_time_in_zones(self):
        start = datetime.datetime(2026, 2, 24, 7, 0, tzinfo=datetime.timezone.utc)

        def at(seconds):
            return (start + datetime.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.000Z")

        # 40 years old: a maximum of 180; 10 minutes at 100 bpm (55%), 10 at 150 (83%), 10 at 170 (94%).
        rates = [sample(f"HR-{n}", at(n * 30), 100 if n < 20 else 150 if n < 40 else 170) for n in range(60)]
        payload = {"characteristics": {"dateOfBirth": "1985-06-01"}, "data": {
            "HKQuantityTypeIdentifierHeartRate": rates + [sample("HR-after", at(4000), 60)],
            "workouts": [{"uuid": "W-HR", "workoutActivityType": 37, "startDate": at(0), "endDate": at(1800)}]}}
        self.assertEqual(self.post(payload)[0], 200)
        page = self.page("/workout/W-HR")
        self.assertIn("<h2>Heart rate</h2>", page)
        self.assertIn("60 samples: lowest 100, average 140, highest 170 bpm", page)
        self.assertIn("a maximum of 180 bpm (220 minus the age (40))", page)
        self.assertIn('aria-label="heart rate"', page)
        zones = page[page.index("<th>Zone</th>"):]
        self.assertEqual(re.findall(r"<td>(Zone \d)[^<]*</td><td>([^<]*)</td><td>([^<]*)</td>", zones),
                         [("Zone 1", "10 min", "33%"), ("Zone 2", "0 min", "0%"), ("Zone 3", "0 min", "0%"),
                          ("Zone 4", "10 min", "33%"), ("Zone 5", "10 min", "33%")])


class FieldInventoryTests(PageTestCase):

    def test_the_fields_the_app_sends_with_their_types_counts_and_dates(self):
        payload = make_payload(n=3)
        payload["data"]["workouts"].append({"uuid": "W-2", "sport": "tennis", "startDate": "2026-02-25T10:00:00Z"})
        payload["data"]["workouts"].append({"uuid": "W-3", "kind": 5, "startDate": "2026-02-25T11:00:00Z"})
        self.assertEqual(self.post(payload)[0], 200)
        code, out, _ = run_main("stats", "--db", self.db, "--fields", "--json")
        self.assertEqual(code, 0)
        groups = {group["name"]: group for group in json.loads(out)}
        self.assertEqual(list(groups)[:4], ["workouts", "doses", "medications", "routes"])
        heart = groups["HKQuantityTypeIdentifierHeartRate"]
        self.assertEqual((heart["read"], heart["stored"]), (3, 3))
        self.assertEqual({use["field"]: (use["kinds"], use["elements"]) for use in heart["fields"]},
                         {name: (kinds, 3) for name, kinds in (
                             ("uuid", ["string"]), ("startDate", ["string"]), ("endDate", ["string"]),
                             ("value", ["number"]), ("unit", ["string"]), ("sourceName", ["string"]))})
        workouts = groups["workouts"]
        uses = {use["field"]: use for use in workouts["fields"]}
        self.assertEqual((uses["uuid"]["elements"], uses["sport"]["elements"], uses["kind"]["kinds"]), (3, 1, ["number"]))
        self.assertEqual((uses["startDate"]["first"], uses["startDate"]["last"]),
                         ("2026-02-24T23:34:50.000Z", "2026-02-25T11:00:00.000Z"))
        # Columns left empty by most elements are pointed out.
        self.assertEqual({(e["column"], e["elements"]) for e in workouts["empty"]},
                         {("activity_type", 2), ("end_date", 2), ("duration_seconds", 2)})
        page = self.page(hr.FIELDS_PATH)
        self.assertIn("<h1>What the app sends</h1>", page)
        self.assertIn('<p class="note">workouts: no activity_type in 2 of 3', page)
        self.assertIn("fields seen: startDate, uuid, durationSeconds, endDate, kind, sport, workoutActivityType<", page)
        self.assertIn(f'href="{hr.FIELDS_PATH}"', self.page("/"))
        code, out, _ = run_main("stats", "--db", self.db, "--fields")
        self.assertIn("WARNING: no activity_type in 2 of 3", out)


class StatusPageTests(PageTestCase):
    """Pages on real stored syncs; days in UTC so that they do not depend on
    the machine's zone."""

    #: Today's samples are at 08:00 to 12:00.
    clock_start = TEST_NOON

    def server_options(self):
        return {"utc": True}

    def test_page_shows_syncs_totals_and_a_chart_per_type(self):
        self.post(recent_payload())
        self.post(b"{broken")
        page = self.page("/")
        self.assertIn("background-delivery", page)
        self.assertIn('class="fail"', page)
        self.assertIn("Invalid JSON", page)
        self.assertRegex(page, "just now|1 min ago")
        self.assertIn("<td>samples</td><td>25</td>", page)
        # Sleep samples without a duration hold no hours to chart.
        self.assertEqual(page.count("<svg"), 2)
        for name in ("Steps", "Heart rate", "Sleep"):
            self.assertIn(f">{name}", page)
        self.assertIn("total per day; where sources counted the same time, once (by source priority, as the Health "
                      "app)", page)
        self.assertIn("mean of the samples; band from the 10th to the 90th percentile of the hours&#x27; means", page)
        self.assertIn(">Running</a>", page)
        self.assertIn('class="grid"', page)

    def test_a_page_opened_right_after_a_sync_shows_it(self):
        # A sync committed whose hourly totals are not brought up to date
        # yet (that runs just after the answer).
        result = hr.SyncIntake(self.store).ingest([encode(recent_payload())], "127.0.0.1")
        self.assertEqual(result.records, 27)
        self.assertEqual(self.query("SELECT count(*) > 0 FROM sample_hours_pending"), [(1,)])
        steps = self.chart(self.summary("7d"), "StepCount")
        self.assertEqual(sum(point[1] or 0 for point in steps["points"]), 5 * (900 + 1200))
        self.assertEqual(self.query("SELECT count(*) FROM sample_hours_pending"), [(0,)])
        self.assertIn(">Steps", self.page("/"))

    def test_summary_json_holds_the_same_facts(self):
        self.post(recent_payload())
        facts = self.summary("90d")
        self.assertEqual(facts["totals"]["samples"], 25)
        types = {t["name"]: t for t in facts["types"]}
        self.assertEqual(types["StepCount"]["rows"], 10)
        self.assertEqual({name: types[name]["chart"] for name in types},
                         {"StepCount": "sum", "HeartRate": "mean", "SleepAnalysis": "sleep"})
        steps = self.chart(facts, "StepCount")
        self.assertEqual(len(steps["points"]), 90)
        self.assertEqual(sum(p[1] or 0 for p in steps["points"]), 5 * (900 + 1200))
        heart_days = [p for p in self.chart(facts, "HeartRate")["points"] if p[1] is not None]
        self.assertEqual(len(heart_days), 5)
        self.assertTrue(all(p[2] <= p[1] <= p[3] for p in heart_days))
        self.assertEqual(len(facts["workouts"]), 2)
        self.assertEqual(sorted(w["route_points"] for w in facts["workouts"]), [0, 3])
        self.assertEqual(facts["syncs"][0]["inserted"], 27)

    def test_the_page_and_its_json_are_made_from_the_same_records(self):
        self.post(recent_payload())
        self.post({"data": {
            "medications": [{"conceptIdentifier": "rx-9", "displayText": "Metformin"}],
            "medicationDoseEvents": [{"uuid": "MD-1", "medicationConceptIdentifier": "rx-9",
                                      "startDate": utc_at(8), "logStatus": "taken"}]}})
        view = hr.View.of("7d", hr.Zone(utc=True), self.clock())
        report = hr.status_report(self.store, view)
        facts = hr.summary_json(report)
        served = self.summary("7d")
        # Apart from the moment and the file's size (the log is checkpointed meanwhile).
        self.assertEqual(served.pop("database")["path"], facts["database"]["path"])
        self.assertEqual({key: value for key, value in served.items() if key != "generated_at"},
                         {key: value for key, value in facts.items() if key not in ("generated_at", "database")})
        page = hr.render_status_page(report)
        self.assertEqual([chart["name"] for chart in facts["charts"]], [chart.name for chart in report.charts])
        for chart, shown in zip(report.charts, facts["charts"]):
            self.assertEqual((shown["kind"], shown["grain"]), (chart.kind.name, chart.grain.name))
            self.assertEqual(shown["points"], [[point[0].isoformat(), *point[1:]] for point in chart.points])
        steps = self.chart(facts, "StepCount")
        drawn = page[page.index('aria-label="StepCount"'):]
        drawn = drawn[:drawn.index("</svg>")]
        self.assertEqual(drawn.count("<rect"), len([point for point in steps["points"] if point[1]]))
        doses = facts["medications"][0]
        self.assertEqual(doses["points"], [[point[0].isoformat(), point[2]["taken"], point[2]["skipped"]]
                                           for point in report.medications[0].chart.points])
        drawn = page[page.index('aria-label="Metformin"'):]
        self.assertEqual(drawn[:drawn.index("</svg>")].count("<rect"), 1)

    def test_repeated_sync_keeps_type_totals_exact(self):
        self.post(recent_payload())
        self.post(recent_payload())
        self.post(recent_payload(tag="Q", days=2))
        facts = self.summary()
        rows = {t["name"]: t["rows"] for t in facts["types"]}
        self.assertEqual(rows, {"StepCount": 14, "HeartRate": 14, "SleepAnalysis": 7})
        self.assertEqual(rows, {hr.short_type_name(t): n for t, n in self.query(
            "SELECT type, count(*) FROM samples GROUP BY type")})
        self.assertEqual(self.query("SELECT type, sum(samples) FROM sample_hours GROUP BY type ORDER BY type"),
                         self.query("SELECT type, count(*) FROM samples GROUP BY type ORDER BY type"))

    # 1. Ranges

    def test_ranges_are_links_and_choose_the_days(self):
        self.post({"data": {"HKQuantityTypeIdentifierStepCount": [
            sample("R-1", utc_at(10), 100, "count"), sample("R-2", utc_at(10, days_back=20), 200, "count"),
            sample("R-3", utc_at(10, days_back=200), 300, "count")]}})
        page = self.page("/?range=7d")
        for choice in hr.RANGES:
            self.assertIn(f'?range={choice.name}">{choice.label}</a>' if choice.name != "7d"
                          else f"<b>{choice.label}</b>", page)
        totals = {}
        for name in ("7d", "30d", "90d"):
            totals[name] = sum(p[1] or 0 for p in self.chart(self.summary(name), "StepCount")["points"])
        self.assertEqual(totals, {"7d": 100, "30d": 300, "90d": 300})
        # Longer ranges: weeks (or months), each a daily average; totals in the type's table.
        year = self.summary("1y")
        self.assertEqual(year["window"]["grain"], "week")
        self.assertEqual(len([p for p in self.chart(year, "StepCount")["points"] if p[1] is not None]), 3)
        page = self.page("/type/StepCount?range=1y")
        self.assertEqual(re.findall(r"<td>week of [-\d]+</td><td>1</td><td>(\d+)</td>", page), ["100", "200", "300"])
        status, _, answer = self.request("GET", "/?range=forever")
        self.assert_error(status, 400, answer, "range must be one of 7d, 30d, 90d, 1y, all")

    def test_a_range_with_no_data_shows_the_last_stretch_and_says_so(self):
        self.post({"data": {"HKQuantityTypeIdentifierHeartRate": [
            sample(f"O-{i}", utc_at(9, days_back=270 + i), 60 + i) for i in range(3)]}})
        page = self.page("/?range=30d")
        last = datetime.date.fromisoformat(utc_day(270))
        self.assertIn(f"Nothing was recorded in the last 30 days. Shown instead: the 30 days up to "
                      f"{last:%b %d, %Y}", page)
        facts = self.summary("30d")
        self.assertTrue(facts["window"]["shifted"])
        points = {p[0]: p[1] for p in self.chart(facts, "HeartRate")["points"] if p[1] is not None}
        self.assertEqual(points, {utc_day(270): 60, utc_day(271): 61, utc_day(272): 62})
        self.assertIn(">Last</th>", page)  # where the data stops, in the types table's second column

    # 2. Today

    def test_today_shows_the_health_summary_with_averages(self):
        data = {"HKQuantityTypeIdentifierStepCount": [
                    sample("T-0", utc_at(8), 4000, "count"),
                    *(sample(f"T-{d}", utc_at(8, days_back=d), 1000 * d, "count") for d in range(1, 4))],
                "HKQuantityTypeIdentifierRestingHeartRate": [sample("RHR-1", utc_at(6, days_back=1), 58)],
                "HKQuantityTypeIdentifierBodyMass": [sample("BM-1", utc_at(7), 70.5, "kg")]}
        self.post({"data": data})
        tiles = {tile["title"]: tile for tile in self.summary()["today"]}
        self.assertEqual(set(tiles), {"Steps", "Resting heart rate"})
        self.assertEqual((tiles["Steps"]["value"], tiles["Steps"]["average"]), (4000, 2000))
        self.assertEqual((tiles["Resting heart rate"]["value"], tiles["Resting heart rate"]["average"]), (None, 58))
        page = self.page("/")
        self.assertIn("<span>Steps</span><b>4,000</b><span>30-day average 2,000</span>", page)
        self.assertIn("<span>Resting heart rate</span><b>&ndash;</b><span>30-day average 58 bpm</span>", page)

    # 3. No double counting

    def test_an_iphone_and_a_watch_counting_the_same_walk_count_once(self):
        walk_start, walk_end = utc_at(9), utc_at(9, 40)
        self.post({"data": {"HKQuantityTypeIdentifierStepCount": [
            span("P-1", walk_start, walk_end, 4800, "count", "iPhone"),
            span("W-1", walk_start, utc_at(9, 20), 2600, "count", "Apple Watch"),
            span("W-2", utc_at(9, 20), walk_end, 2500, "count", "Apple Watch"),
            # Later the watch is charging: only the phone counts.
            span("P-2", utc_at(15), utc_at(15, 30), 700, "count", "iPhone")]}})
        points = dict(p[:2] for p in self.chart(self.summary(), "StepCount")["points"])
        self.assertEqual(points[utc_day()], 5100 + 700)  # not 10,600: the watch's 5,100 for the walk
        self.assertIn("5,800", self.page("/type/StepCount?range=7d"))

    # 4. A page per type, and its CSV

    def test_a_type_page_has_periods_latest_samples_and_a_download(self):
        self.post({"data": {"HKQuantityTypeIdentifierHeartRate": [
            sample(f"H-{d}-{h}", utc_at(h, days_back=d), 50 + h + d, sourceName=f"Watch {d}")
            for d in range(3) for h in (1, 2, 3)] + [sample("H-old", utc_at(1, days_back=100), 99)]}})
        page = self.page("/type/heartrate?range=7d")
        self.assertIn("<h1", page)
        self.assertIn("Heart rate (bpm)</h1>", page)
        self.assertIn("<th>Period</th><th>Samples</th><th>Min</th><th>Mean</th><th>Max</th>", page)
        today = datetime.date.fromisoformat(utc_day())
        self.assertIn(f"<td>{today:%a %Y-%m-%d}</td><td>3</td><td>51</td><td>52</td><td>53</td>", page)
        self.assertEqual(page.count('<td class="opt">Watch 0</td>'), 3)
        self.assertIn('href="/type/HeartRate.csv?range=7d"', page)
        status, response, body = self.request("GET", "/type/HeartRate.csv?range=7d")
        self.assertEqual(status, 200)
        self.assertEqual(response.getheader("Transfer-Encoding"), "chunked")
        self.assertIn("attachment", response.getheader("Content-Disposition"))
        rows = list(csv.reader(io.StringIO(body.decode("utf-8"))))
        self.assertEqual(rows[0][:3], ["uuid", "type", "start_date"])
        self.assertEqual(sorted(row[0] for row in rows[1:]), sorted(f"H-{d}-{h}" for d in range(3) for h in (1, 2, 3)))
        self.assertEqual(len(list(csv.reader(io.StringIO(self.request("GET", "/type/HeartRate.csv?range=all")[2]
                                                           .decode("utf-8"))))), 11)
        for path in ("/type/NoSuchType", "/type/NoSuchType.csv", "/workout/nothing"):
            status, _, answer = self.request("GET", path)
            self.assert_error(status, 404, answer)

    def test_a_download_to_an_http_1_0_client_ends_with_the_connection(self):
        self.post({"data": {"HKQuantityTypeIdentifierStepCount": [
            sample(f"C-{i}", utc_at(i % 24), i, "count") for i in range(hr.CSV_ROWS_PER_PIECE + 5)]}})
        answer = self.raw_exchange(b"GET /type/StepCount.csv?range=7d HTTP/1.0\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        self.assertNotIn(b"chunked", head.lower())
        self.assertIn(b"Connection: close", head)
        rows = list(csv.reader(io.StringIO(body.decode("utf-8"))))
        self.assertEqual(len(rows), hr.CSV_ROWS_PER_PIECE + 6)
        status, response, _ = self.request("HEAD", "/type/StepCount.csv?range=7d")
        self.assertEqual((status, response.getheader("Content-Type")), (200, "text/csv; charset=utf-8"))

    def test_a_download_that_fails_half_way_never_looks_complete(self):
        self.post({"data": {"HKQuantityTypeIdentifierStepCount": [
            sample(f"C-{i:05d}", utc_at(1), i, "count") for i in range(hr.CSV_ROWS_PER_PIECE + 5)]}})
        # A row whose text is not UTF-8 (written by another program) fails
        # when it is read, after the first rows have gone out.
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            conn.execute("INSERT INTO samples VALUES (1, 'C-99999', 'HKQuantityTypeIdentifierStepCount', ?, NULL, 1,"
                         " 'count', CAST(X'FF' AS TEXT), '{}', 1, NULL, NULL)", (utc_at(2),))
            conn.commit()
        answer = self.raw_exchange(b"GET /type/StepCount.csv?range=7d HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:200])
        self.assertIn(b"C-00000", answer)
        self.assertFalse(answer.endswith(b"0\r\n\r\n"))  # no last chunk: the client sees it incomplete
        wait_until(lambda: any("download stopped half way" in line for line in self.log_lines()))

    def test_latest_samples_stop_at_twenty(self):
        self.post({"data": {"HKQuantityTypeIdentifierBodyMass": [
            sample(f"M-{i}", utc_at(i % 24, days_back=i // 24), 70 + i / 10, "kg") for i in range(30)]}})
        page = self.page("/type/BodyMass?range=30d")
        latest = page[page.index("Latest samples"):]
        self.assertEqual(latest.count("<tr>") - 1, hr.LATEST_SAMPLES)

    # 5. Sleep

    def test_a_known_night_in_hours_per_stage(self):
        night = [span("S-bed", utc_at(23, days_back=1), utc_at(7), 0, source="iPhone"),
                 span("S-1", utc_at(23, 10, days_back=1), utc_at(1, 10), "asleepCore"),
                 span("S-2", utc_at(1, 10), utc_at(2, 10), 4),
                 span("S-3", utc_at(2, 10), utc_at(3, 40), "HKCategoryValueSleepAnalysisAsleepREM"),
                 span("S-4", utc_at(3, 40), utc_at(3, 52), 2),
                 span("S-5", utc_at(3, 52), utc_at(6, 52), 3)]
        self.post({"data": {hr.SLEEP_TYPE: night}})
        facts = self.summary("7d")
        last = self.chart(facts, "SleepAnalysis")["points"][-1]
        self.assertEqual(last[0], utc_day())
        self.assertAlmostEqual(last[1], 7.5, places=6)
        expected = {"core": 5.0, "deep": 1.0, "rem": 1.5, "awake": 0.2, "in_bed": 8 - 7.7}
        self.assertEqual(set(last[2]), set(expected))
        for stage, hours in expected.items():
            self.assertAlmostEqual(last[2][stage], hours, places=6)
        sleep_tile = next(tile for tile in facts["today"] if tile["title"] == "Sleep last night")
        self.assertAlmostEqual(sleep_tile["value"], 7.5)
        self.assertIn("<b>7 h 30 min</b>", self.page("/"))
        page = self.page("/type/SleepAnalysis?range=7d")
        self.assertIn(f"<td>{datetime.date.fromisoformat(utc_day()):%a %Y-%m-%d}</td><td>7:30</td><td>1:00</td>"
                      "<td>5:00</td><td>1:30</td><td></td><td>0:12</td><td>0:18</td>", page)

    # 6. Workouts

    def test_workouts_list_and_a_page_with_route_elevation_and_pace(self):
        start = utc_at(7)
        # North along a meridian: 0.009 degrees of latitude is about 1 km, every 5 minutes.
        route = [{"timestamp": utc_at(7, 5 * i), "latitude": 47.0 + 0.0045 * i, "longitude": 8.0,
                  "altitude": 400 + 10 * i} for i in range(11)]
        self.post({"data": {
            "workouts": [{"uuid": "RUN-1", "workoutActivityType": "HKWorkoutActivityTypeRunning", "startDate": start,
                          "endDate": utc_at(7, 50), "durationSeconds": 3000.0, "totalDistance": 5.0,
                          "totalDistanceUnit": "km", "totalEnergyBurned": 1255.2, "totalEnergyBurnedUnit": "kJ"}],
            "HKQuantityTypeIdentifierHeartRate": [
                sample("IN-1", utc_at(7, 10), 140), sample("IN-2", utc_at(7, 40), 150),
                sample("OUT-1", utc_at(9), 60)]},
            "workoutRoutes": {"RUN-1": route}})
        workout = self.summary()["workouts"][0]
        self.assertEqual((workout["distance_m"], round(workout["energy_kcal"]), workout["heart_rate"]),
                         (5000, 300, 145))
        self.assertIn('<a href="/workout/RUN-1">Running</a>', self.page("/"))
        page = self.page("/workout/RUN-1")
        self.assertIn("<b>5.00 km</b>", page)
        self.assertIn("<b>145 bpm</b>", page)
        self.assertIn("<b>50 min</b>", page)
        svg = page[page.index('aria-label="route"') - 40:]
        svg = svg[:svg.index("</svg>")]
        box = [float(v) for v in re.search(r'viewBox="([^"]+)"', svg).group(1).split()]
        path = re.search(r'<path d="M([^"]+)"', svg).group(1).split(" L")
        self.assertEqual(len(path), 11)
        points = [tuple(float(v) for v in point.split(",")) for point in path]
        self.assertTrue(all(box[0] <= x <= box[2] and box[1] <= y <= box[3] for x, y in points))
        self.assertTrue(all(math.isclose(x, points[0][0]) for x, _y in points))  # a meridian is vertical
        self.assertGreater(points[0][1], points[-1][1])  # north is up
        self.assertEqual(page.count("<circle"), 2)  # start and end
        self.assertIn('aria-label="elevation"', page)
        self.assertIn("500 m", page)
        self.assertRegex(page, r"<td>1</td><td>10:0\d /km</td>")  # 2 points per km, 10 minutes

    # 7. Medications

    def test_medications_taken_and_skipped_per_day(self):
        self.post({"data": {
            "medications": [{"conceptIdentifier": "rx-9", "displayText": "Metformin"}],
            "medicationDoseEvents": [
                {"uuid": f"MD-{i}", "medicationConceptIdentifier": "rx-9", "startDate": utc_at(8 + i, days_back=i % 2),
                 "logStatus": status} for i, status in enumerate(("taken", "taken", "skipped", "taken"))]}})
        medication = self.summary("7d")["medications"][0]
        self.assertEqual((medication["name"], medication["taken"], medication["skipped"]), ("Metformin", 3, 1))
        days = {day: (taken, skipped) for day, taken, skipped in medication["points"] if taken or skipped}
        self.assertEqual(days, {utc_day(): (1, 1), utc_day(1): (2, 0)})
        self.assertIn("doses per day: 3 taken, 1 skipped", self.page("/?range=7d"))

    # 8. Charts

    def test_charts_read_right(self):
        self.post({"data": {
            "HKQuantityTypeIdentifierBodyMass": [sample(f"B-{d}", utc_at(7, days_back=d), 70 + d / 10, "kg")
                                                 for d in (0, 3, 9)],
            "HKQuantityTypeIdentifierOxygenSaturation": [sample("O-1", utc_at(3), 0.97, "%"),
                                                         sample("O-2", utc_at(4), 0.95, "%")],
            "HKQuantityTypeIdentifierStepCount": [sample("BIG-1", utc_at(8), 10_000_000, "count")],
            "HKQuantityTypeIdentifierHeartRate": [sample("HUGE-1", utc_at(8), 1e308)]}})
        facts = self.summary("30d")
        oxygen = self.chart(facts, "OxygenSaturation")
        self.assertEqual(oxygen["unit"], "%")
        self.assertAlmostEqual(oxygen["points"][-1][1], 96.0)
        page = self.page("/?range=30d")
        body_mass = page[page.index('aria-label="BodyMass"'):]
        body_mass = body_mass[:body_mass.index("</svg>")]
        # One line through the three weighings, each marked.
        self.assertEqual(body_mass.count("<polyline"), 1)
        self.assertEqual(len(re.search(r'<polyline points="([^"]+)"', body_mass).group(1).split()), 3)
        self.assertEqual(body_mass.count("<circle"), 3)
        steps = page[page.index('aria-label="StepCount"'):]
        self.assertIn(">10.0M</text>", steps[:steps.index("</svg>")])
        self.assertNotIn("000k", page)
        for chart in re.findall(r'<svg viewBox="0 0 360 150".*?</svg>', page, re.S):
            for x in re.findall(r'<text x="([-\d.]+)"', chart):
                self.assertTrue(0 <= float(x) <= 360, x)  # labels stay inside
            self.assertNotRegex(chart, r">\d{4,}<")  # no unrounded ticks like 8535
        percent = page[page.index('aria-label="OxygenSaturation"'):]
        self.assertRegex(percent[:percent.index("</svg>")], r">9\d(\.\d)?%</text>")
        self.assertNotIn(">0.9", percent[:percent.index("</svg>")])
        # The last date label sits under the last bar and names its day.
        labels = re.findall(r'<text x="([\d.]+)" y="145" text-anchor="\w+">([^<]+)<', steps[:steps.index("</svg>")])
        bars = re.findall(r'<rect x="([\d.]+)" y="[\d.]+" width="([\d.]+)"', steps[:steps.index("</svg>")])
        self.assertEqual(labels[0][1], datetime.date.fromisoformat(utc_day()).strftime("%b %d"))
        last_bar = float(bars[-1][0]) + float(bars[-1][1]) / 2
        self.assertLess(abs(float(labels[0][0]) - last_bar), 20)  # under the last bar

    def test_hourly_totals_survive_the_migration_from_version_one(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        path = os.path.join(tmp.name, "old.db")
        make_v1_database(path, make_payload(n=5))
        store = hr.Store(path)
        store.open()
        with contextlib.closing(sqlite3.connect(path)) as conn:
            self.assertEqual(conn.execute("SELECT type, sum(samples), total(total) FROM sample_hours GROUP BY type"
                                          " ORDER BY type").fetchall(),
                             conn.execute("SELECT type, count(*), total(value) FROM samples GROUP BY type"
                                          " ORDER BY type").fetchall())


class HandMadeRecordsTests(unittest.TestCase):
    """Presentation formats records: pages from records made here, with no
    database at all."""

    def setUp(self):
        now = datetime.datetime(2026, 3, 10, 15, 0, tzinfo=datetime.timezone.utc)
        self.view = hr.View.of("7d", hr.Zone(utc=True), now)
        self.window = hr.days_window(self.view.range, datetime.date(2026, 3, 4), datetime.date(2026, 3, 10),
                                     self.view.zone)
        steps = "HKQuantityTypeIdentifierStepCount"
        self.info = hr.TypeInfo(steps, "StepCount", "Steps <&>", 12, "2026-03-04T08:00:00.000Z",
                                "2026-03-10T08:00:00.000Z", hr.chart_kind(steps))
        self.chart = hr.Chart(steps, "StepCount", "Steps <&>", self.info.kind, self.window.grain, None, tuple(
            (period.date, 1000.0 * i if i % 2 else None) for i, period in enumerate(self.window.periods)))
        self.workout = hr.Workout("W<1>", "running", "2026-03-09T07:00:00.000Z", None, 1800.0, 5000.0, None, 150.4,
                                  11, "<Watch>")
        connect = unittest.mock.patch.object(hr.sqlite3, "connect", side_effect=AssertionError("no database"))
        connect.start()
        self.addCleanup(connect.stop)

    def test_a_status_page(self):
        doses = hr.Chart("rx-1", "<Aspirin>", "<Aspirin>", hr.DOSES, self.window.grain, None, tuple(
            (period.date, 1, {"taken": 1, "skipped": 0}) for period in self.window.periods))
        sync = hr.Sync(id=1, received_at="2026-03-10T14:51:00.000Z", sync_source="<app>", received=12, inserted=12,
                       status=hr.SyncStatus.OK)
        stored = hr.StoreFacts("/data/<health>.db", 2_500_000, hr.SCHEMA_VERSION, {"samples": 12, "syncs": 1},
                               (self.info,), 3, (sync,))
        tile = hr.Tile(self.info.type, "Steps", 4000, None, 2000.0)
        report = hr.StatusReport(self.view, stored, self.window, (tile,), (self.chart,), (self.workout,), 0,
                                 (hr.Medication("rx-1", "<Aspirin>", 7, 0, doses),))
        page = hr.render_status_page(report)
        self.assertNotRegex(page, r"<(Aspirin|app|health|Watch)>|<&>")
        self.assertIn("/data/&lt;health&gt;.db &middot; 2.5 MB &middot; days in UTC", page)
        self.assertIn("<p>Last sync 9 min ago: 12 records, ok.</p>", page)
        self.assertIn("<span>Steps</span><b>4,000</b><span>30-day average 2,000</span>", page)
        self.assertIn('<p class="muted">Mar 04, 2026 to Mar 10, 2026, by day.</p>', page)
        self.assertIn('<a href="/type/StepCount?range=7d">Steps &lt;&amp;&gt;</a>', page)
        steps = page[page.index('aria-label="StepCount"'):]
        self.assertEqual(steps[:steps.index("</svg>")].count("<rect"), 3)
        self.assertIn('<a href="/workout/W%3C1%3E">Running</a>', page)
        self.assertIn("<h3>&lt;Aspirin&gt;</h3><p>doses per day: 7 taken, 0 skipped</p>", page)
        self.assertIn("&lt;app&gt;", page)
        self.assertIn("and 3 more types with fewer samples", page)
        self.assertIn("Generated 2026-03-10 15:00.", page)

    def test_a_type_page_and_a_workout_page(self):
        report = hr.TypeReport(self.view, self.window, self.info, self.chart,
                               (hr.PeriodRow(datetime.date(2026, 3, 9), (2, 1000.0, 1000.0)),),
                               (hr.LatestSample("2026-03-09T08:00:00.000Z", None, 500, "count", "<iPhone>"),), None)
        page = hr.render_type_page(report)
        self.assertIn("<td>Mon 2026-03-09</td><td>2</td><td>1,000</td><td>1,000</td>", page)
        self.assertIn('<td class="opt">&lt;iPhone&gt;</td>', page)
        self.assertIn('href="/type/StepCount.csv?range=7d"', page)
        self.assertEqual(page.count('aria-label="StepCount"'), 2)  # a drawing per screen
        route = hr.Track(((47.0, 8.0), (47.009, 8.0)), 1000.0, ((0.0, 400.0), (1000.0, 420.0)), (hr.Split(1, 300.0),))
        page = hr.render_workout_page(hr.WorkoutReport(self.view, self.workout, route))
        self.assertIn("2026-03-09 07:00 &middot; &lt;Watch&gt;", page)
        self.assertIn("<b>30 min</b>", page)
        self.assertIn("<b>150 bpm</b>", page)
        self.assertIn("<td>1</td><td>5:00 /km</td>", page)
        self.assertIn('aria-label="route"', page)
        self.assertIn('aria-label="elevation"', page)
        self.assertIn("<span>Pace</span><b>6:00 /km</b>", page)

    def test_a_workout_shows_its_speed_as_people_of_its_sport_read_it(self):
        route = hr.Track(((47.0, 8.0), (47.009, 8.0)), 1000.0, (), (hr.Split(1, 120.0),))
        for sport, distance, tile, split in (
                ("cycling", 20000.0, "<span>Speed</span><b>40.0 km/h</b>", "<td>1</td><td>30.0 km/h</td>"),
                ("swimming", 1500.0, "<span>Pace</span><b>2:00 /100 m</b>", "<td>1</td><td>0:12 /100 m</td>"),
                ("rowing", 6000.0, "<span>Pace</span><b>2:30 /500 m</b>", "<td>1</td><td>1:00 /500 m</td>"),
                ("hiking", 6000.0, "<span>Pace</span><b>5:00 /km</b>", "<td>1</td><td>2:00 /km</td>")):
            with self.subTest(sport=sport):
                workout = self.workout._replace(activity_type=sport, distance_m=distance)
                page = hr.render_workout_page(hr.WorkoutReport(self.view, workout, route))
                self.assertIn(tile, page)
                self.assertIn(split, page)


#: Numbers at the edges of what JSON can say, as the app could send them.
EXTREMES = ("1e308", "-1e308", "1e400", "-1e400", "5e-324", "-0", "-0.0", "1" + "0" * 5000, "-" + "9" * 30)


class ExtremeValueTests(PageTestCase):
    """No stored value breaks a page: each extreme in every section, then
    every page and range loads, and the JSON stays JSON."""

    def test_every_page_and_range_survives_every_extreme(self):
        elements, workouts, routes, doses = {}, [], {}, []
        types = ("HKQuantityTypeIdentifierStepCount", "HKQuantityTypeIdentifierHeartRate",
                 "HKQuantityTypeIdentifierOxygenSaturation", "HKCategoryTypeIdentifierMindfulSession",
                 "HKCategoryTypeIdentifierAppleStandHour", "HKCategoryTypeIdentifierSleepAnalysis",
                 "HKQuantityTypeIdentifierRestingHeartRate")
        for n, number in enumerate(EXTREMES):
            start, end = utc_at(1, n, days_back=n % 3), utc_at(2, n, days_back=n % 3)
            for type_name in types:
                elements.setdefault(type_name, []).append(
                    f'{{"uuid": "X-{type_name[-6:]}-{n}", "startDate": "{start}", "endDate": "{end}", '
                    f'"value": {number}, "unit": "count"}}')
            workouts.append(f'{{"uuid": "XW-{n}", "workoutActivityType": "running", "startDate": "{start}", '
                            f'"endDate": "{end}", "durationSeconds": {number}, "totalDistance": {number}, '
                            f'"totalEnergyBurned": {{"quantity": {number}, "unit": "kJ"}}}}')
            routes[f"XW-{n}"] = [f'{{"timestamp": "{utc_at(1, n + m, days_back=n % 3)}", "latitude": {lat}, '
                                 f'"longitude": {lon}, "altitude": {number}}}'
                                 for m, (lat, lon) in enumerate(((47.0, 8.0), (number, 8.0), (47.01, number),
                                                                 (47.02, 8.01)))]
            doses.append(f'{{"uuid": "XD-{n}", "medicationConceptIdentifier": {number}, "startDate": "{start}", '
                         f'"logStatus": {number}}}')
        body = ('{"syncSource": "edge", "characteristics": {"heightCm": %s}, "data": {%s, "workouts": [%s], '
                '"medications": [{"conceptIdentifier": "1e308", "displayText": %s}], "medicationDoseEvents": [%s]},'
                ' "workoutRoutes": {%s}}' % (
                    EXTREMES[2], ", ".join(f'"{t}": [{", ".join(e)}]' for t, e in elements.items()),
                    ", ".join(workouts), EXTREMES[0], ", ".join(doses),
                    ", ".join(f'"{w}": [{", ".join(p)}]' for w, p in routes.items()))).encode()
        status, _, answer = self.post(body)
        self.assertEqual(status, 200, answer)
        self.assertEqual(answer["rejected"], 0)

        def strict(constant):
            raise ValueError(f"{constant} is not JSON")

        paths = []
        for choice in hr.RANGES:
            paths += [f"/?range={choice.name}", f"{hr.SUMMARY_PATH}?range={choice.name}"]
            paths += [f"/type/{t}?range={choice.name}" for t in types]
            paths += [f"/type/{t}.csv?range={choice.name}" for t in types[:2]]
        paths += [f"/workout/XW-{n}" for n in range(len(EXTREMES))]
        for path in paths:
            with self.subTest(path=path):
                status, response, data = self.request("GET", path)
                self.assertEqual(status, 200, data if isinstance(data, dict) else data[:300])
                if path.startswith(hr.SUMMARY_PATH):
                    raw = json.dumps(data)  # parsed already; check the text itself too
                    self.assertNotIn("Infinity", raw)
                    self.assertNotIn("NaN", raw)
        code, out, _ = run_main("stats", "--db", self.db, "--json")
        json.loads(out, parse_constant=strict)
        self.assertEqual(code, 0)

    def test_a_workout_of_almost_no_distance_has_a_page_without_a_pace(self):
        start, end = utc_at(1), utc_at(2)
        for n, distance in enumerate(("5e-324", "1e-300", "0.0001", "5000")):
            body = ('{"data": {"workouts": [{"uuid": "TINY-%d", "workoutActivityType": "running", "startDate": "%s",'
                    ' "endDate": "%s", "durationSeconds": 2135, "totalDistance": %s}]}}' % (n, start, end, distance))
            self.assertEqual(self.post(body.encode())[0], 200)
            with self.subTest(distance=distance):
                page = self.page(f"/workout/TINY-{n}")
                self.assertNotIn("nan", page.lower())
                self.assertEqual("7:07 /km" in page, distance == "5000")


class HostileTextTests(PageTestCase):
    """Text the app (or anyone with the key) sends reaches a spreadsheet, a
    terminal, the log and HTML only in a form that cannot act there."""

    def test_csv_terminal_log_and_html_get_it_defused(self):
        hostile = "=HYPERLINK(\"http://x\")\u2028\u202e\x1b[2J\x00"
        payload = {"syncSource": "\x1b]0;pwned\x07" + hostile, "data": {"HKQuantityTypeIdentifierHeartRate": [
            sample("H-1", utc_at(1), 61, unit="+cmd", sourceName=hostile),
            sample("H-2", utc_at(2), "-2+3", sourceName="@SUM(A1)"), sample("H-3", utc_at(3), -5)]}}
        self.assertEqual(self.post(payload)[0], 200)
        status, response, body = self.request("GET", "/type/HeartRate.csv?range=7d")
        rows = list(csv.reader(io.StringIO(body.decode("utf-8"))))
        cells = {cell for row in rows[1:] for cell in row}
        self.assertIn("'" + hostile.replace("\x00", "\ufffd"), cells)  # NUL: many CSV readers refuse it
        self.assertIn("'+cmd", cells)
        self.assertIn("'-2+3", cells)
        self.assertIn("'@SUM(A1)", cells)
        self.assertIn("-5", cells)  # a number stays a number
        self.assertFalse(any(cell.startswith(("=", "+", "@")) for cell in cells))
        page = self.request("GET", "/type/HeartRate?range=7d")[2].decode("utf-8")
        self.assertNotIn("\x00", page)
        code, out, _ = run_main("stats", "--db", self.db)
        for raw in ("\x1b", "\x07", "\u2028", "\u202e"):
            self.assertNotIn(raw, out)
        self.request("GET", "/type/%E2%80%A8%E2%80%AEx%1B")
        log = self.log.getvalue()
        self.assertIn("u2028", log.splitlines()[-1])
        for raw in ("\u2028", "\u202e", "\x1b"):
            self.assertNotIn(raw, log)


class StatusPageAuthTests(ServerTestCase):
    token = TOKEN

    def test_page_requires_the_key_basic_or_header(self):
        for path in ("/", hr.SUMMARY_PATH):
            with self.subTest(path=path):
                status, response, _ = self.request("GET", path)
                self.assertEqual(status, 401)
                self.assertTrue(response.getheader("WWW-Authenticate").startswith("Basic"))
                wrong = base64.b64encode(b"me:wrong").decode()
                self.assertEqual(self.request("GET", path, headers={"Authorization": "Basic " + wrong})[0], 401)
                good = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
                self.assertEqual(self.request("GET", path, headers={"Authorization": "Basic " + good})[0], 200)
                self.assertEqual(self.request("GET", path, headers={"Authorization": "Bearer " + TOKEN})[0], 200)
                self.assertEqual(self.request("GET", path, headers={"Authorization": "Basic !!"})[0], 401)

    def test_every_page_and_download_requires_the_key(self):
        self.assertEqual(self.post(make_payload(), headers={"Authorization": "Bearer " + TOKEN})[0], 200)
        good = {"Authorization": "Basic " + base64.b64encode(f"anyone:{TOKEN}".encode()).decode()}
        for path in ("/type/HeartRate?range=all", "/type/HeartRate.csv?range=all", "/workout/A-W1",
                     "/?range=7d", f"{hr.SUMMARY_PATH}?range=1y"):
            with self.subTest(path=path):
                status, _, answer = self.request("GET", path)
                self.assert_error(status, 401, answer)
                status, _, body = self.request("GET", path, headers=good)
                self.assertEqual(status, 200, body)
        self.assertIn(b"A-HR-0", self.request("GET", "/type/HeartRate.csv?range=all", headers=good)[2])

    def test_basic_is_not_accepted_for_posting(self):
        good = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
        self.assertEqual(self.post(make_payload(), headers={"Authorization": "Basic " + good})[0], 401)


class LocalDayTests(ZoneTestMixin, PageTestCase):
    """Days on the status page are the machine's local days."""

    process_zone = "Europe/Berlin"

    def test_offsets_land_on_the_right_local_day(self):
        today = TEST_NOW.astimezone().date()
        # 00:30 Berlin time today, sent with its offset: yesterday in UTC.
        # (Each moment with its own offset: a clock change may lie between.)
        early = datetime.datetime(today.year, today.month, today.day, 0, 30).astimezone()
        yesterday = today - datetime.timedelta(days=1)
        noon = datetime.datetime(yesterday.year, yesterday.month, yesterday.day, 12).astimezone()
        payload = {"data": {"HKQuantityTypeIdentifierStepCount": [
            sample("T-1", early.isoformat(), 100, "count"), sample("T-2", noon.isoformat(), 5, "count")]}}
        self.assertEqual(self.post(payload)[0], 200)
        stored = self.query("SELECT start_date FROM samples WHERE uuid = 'T-1'")[0][0]
        self.assertEqual(stored, early.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"))
        facts = self.request("GET", hr.SUMMARY_PATH)[2]
        points = {point[0]: point[1] for point in facts["charts"][0]["points"]}
        self.assertEqual(points[early.date().isoformat()], 100)
        self.assertEqual(points[yesterday.isoformat()], 5)


# ---------------------------------------------------------------------------
# The sync workflow: storing syncs, whole-body rejections, bad input, archive
# ---------------------------------------------------------------------------

class IngestTests(ServerTestCase):

    def test_records_are_stored_compact_and_otherwise_byte_for_byte(self):
        payload = make_payload(n=3)
        payload["data"]["HKQuantityTypeIdentifierStepCount"] = [
            sample("C-1", "2026-02-24T08:00:00Z", 1.50, "count", note="a, b: c\n \u00e9 \\\" x", big=1e5)]
        tables = ("samples", "workouts", "medication_dose_events", "medications", "workout_route_points")
        self.assertEqual(self.post(json.dumps(payload, indent=2).encode())[0], 200)
        records = {table: self.query(f"SELECT record FROM {table}") for table in tables}
        compact = {}
        for table, rows in records.items():
            self.assertTrue(rows, table)
            for (record,) in rows:
                self.assertNotIn("\n", record)
                self.assertEqual(record, json.dumps(json.loads(record), separators=(",", ":")))  # as sent, less white space
                compact[json.loads(record).get("uuid") or record] = record
        note = self.query("SELECT record FROM samples WHERE uuid = 'C-1'")[0][0]
        self.assertIn('"value":1.5,', note)  # as Python printed it: numbers are not rewritten
        self.assertEqual(json.loads(note)["note"], "a, b: c\n \u00e9 \\\" x")
        # A compact element is stored as sent, even with spaces in its strings.
        element_text = '{"uuid":"C-2","startDate":"2026-02-25T08:00:00.000Z","value":1.50,"s":"x, y: z","e":1E5}'
        body = ('{"data":{"HKQuantityTypeIdentifierStepCount":[' + element_text + "]}}").encode()
        self.assertEqual(self.post(body)[0], 200)
        self.assertEqual(self.query("SELECT record FROM samples WHERE uuid = 'C-2'"), [(element_text,)])
        # A spaced-out one loses only the white space between its tokens.
        spaced = '{ "uuid" : "C-3" ,\t"startDate": "2026-02-26T08:00:00.000Z", "v": [1 , 2.50], "s": " a , b " }'
        self.assertEqual(self.post(('{"data": {"X": [' + spaced + "]}}").encode())[0], 200)
        self.assertEqual(self.query("SELECT record FROM samples WHERE uuid = 'C-3'"),
                         [('{"uuid":"C-3","startDate":"2026-02-26T08:00:00.000Z","v":[1,2.50],"s":" a , b "}',)])

    def test_special_sections_are_read_by_every_plausible_name_and_form(self):
        day = "2026-02-24T0"
        payload = {"data": {
            "workouts": [
                {"uuid": "W-1", "workoutActivityType": 37, "startDate": day + "7:00:00Z", "durationSeconds": 600},
                {"uuid": "W-2", "activityType": "HKWorkoutActivityTypeTraditionalStrengthTraining",
                 "startDate": day + "8:00:00Z", "duration": {"value": 30, "unit": "min"}},
                {"uuid": "W-3", "workoutActivityType": "Running", "startDate": day + "9:00:00Z", "duration": 5.5},
                {"uuid": "W-4", "workoutActivityType": {"rawValue": 50}, "startDate": day + "9:30:00Z"},
                {"uuid": "W-5", "workoutActivityType": 999, "startDate": day + "9:40:00Z",
                 "duration": {"quantity": 1, "unit": "h"}},
                {"uuid": "W-6", "activity": {"id": 5}, "type": "walking", "startDate": day + "9:50:00Z",
                 "duration": {"unit": [1], "value": 3}},
                {"uuid": "W-7", "startDate": day + "9:55:00Z", "duration": {"unit": "min", "value": 10 ** 400}}],
            "medications": [
                {"concept": {"identifier": "rx-9", "displayText": "Ibuprofen"}, "generalForm": "tablet"},
                {"conceptIdentifier": "rx-1", "nickname": "Morning pill"}],
            "medicationDoseEvents": [
                {"uuid": "D-1", "medication": {"identifier": "rx-9"}, "startDate": day + "7:00:00Z", "logStatus": 4,
                 "scheduledDate": None},
                {"uuid": "D-2", "medicationConceptIdentifier": "rx-1", "startDate": day + "8:00:00Z",
                 "logStatus": "HKMedicationDoseEventLogStatusSkipped", "scheduledDate": day + "8:00:00Z"},
                {"uuid": "D-3", "concept": {"identifier": "rx-1"}, "date": day + "9:00:00Z", "status": "taken"},
                {"uuid": "D-4", "medicationConceptIdentifier": "rx-1", "startDate": day + "9:30:00Z",
                 "logStatus": 6.0}]},
            "workoutRoutes": {"W-1": [
                {"timestamp": day + "7:00:00Z", "latitude": 47.1, "longitude": 8.1, "altitude": 400},
                {"time": day + "7:00:05Z", "lat": 47.2, "lng": 8.2, "elevation": 401, "speed": -1, "course": -1},
                {"date": day + "7:00:10Z", "lat": 47.3, "lon": 8.3}]}}
        status, _, answer = self.post(payload)
        self.assertEqual((status, answer["rejected"]), (200, 0), answer)
        self.assertEqual(self.query("SELECT uuid, activity_type, duration_seconds FROM workouts ORDER BY uuid"),
                         [("W-1", "running", 600.0), ("W-2", "traditionalStrengthTraining", 1800.0),
                          ("W-3", "running", 5.5), ("W-4", "traditionalStrengthTraining", None), ("W-5", "999", 3600.0),
                          ("W-6", "walking", None), ("W-7", None, None)])
        self.assertEqual(self.query("SELECT key, display_text FROM medications ORDER BY key"),
                         [("rx-1", "Morning pill"), ("rx-9", "Ibuprofen")])
        self.assertEqual(self.query("SELECT uuid, medication, log_status FROM medication_dose_events ORDER BY uuid"),
                         [("D-1", "rx-9", "taken"), ("D-2", "rx-1", "skipped"), ("D-3", "rx-1", "taken"),
                          ("D-4", "rx-1", "notLogged")])
        self.assertEqual(self.query("SELECT latitude, longitude, altitude FROM workout_route_points"),
                         [(47.1, 8.1, 400), (47.2, 8.2, 401), (47.3, 8.3, None)])
        self.assertIn(">Traditional strength training</", self.request("GET", "/workout/W-2")[2].decode())

    def test_every_table_gets_its_rows(self):
        status, _, answer = self.post(make_payload(n=5))
        self.assertEqual(status, 200, answer)
        self.assertEqual(self.count("samples"), 11)
        self.assertEqual(self.count("workouts"), 1)
        self.assertEqual(self.count("workout_route_points"), 4)
        self.assertEqual(self.count("medications"), 2)
        self.assertEqual(self.count("medication_dose_events"), 1)
        self.assertEqual(self.count("characteristics"), 2)
        self.assertEqual(self.count("rejected"), 0)
        self.assertEqual(answer["count"], 15)
        self.assertEqual(answer["inserted"], {"measurements": 11, "medications": 3, "workouts": 1,
                                              "workoutRoutes": 4})
        self.assertEqual(answer["duplicates"], 0)
        self.assertEqual(answer["rejected"], 0)
        self.assertEqual(self.query("SELECT type, start_date, value, unit, source_name FROM samples "
                                    "WHERE uuid = 'A-HR-2'"),
                         [("HKQuantityTypeIdentifierHeartRate", "2026-02-24T02:00:00.000Z", 62, "count/min",
                           "Watch")])
        self.assertEqual(self.query("SELECT duration_seconds, activity_type FROM workouts"), [(2135.0, "cycling")])
        sync = self.query("SELECT id, sync_source, export_date, start_date, end_date, received, inserted, "
                          "duplicates, rejected, status, error FROM syncs")
        self.assertEqual(sync, [(answer["sync_id"], "manual-upload", "2026-02-26T00:00:00.000Z",
                                 "2026-02-24T00:00:00.000Z", "2026-02-26T00:00:00.000Z", 15, 15, 0, 0, "ok",
                                 None)])
        self.assertEqual(self.query("SELECT DISTINCT sync_id FROM samples"), [(answer["sync_id"],)])

    def test_repost_inserts_nothing_and_returns_same_count(self):
        body = encode(make_payload(n=4))
        _, _, first = self.post(body)
        before = self.counts()
        status, _, second = self.post(body)
        self.assertEqual(status, 200)
        self.assertEqual(second["count"], first["count"])
        self.assertEqual(second["duplicates"], first["count"])
        self.assertEqual(second["inserted"], {"measurements": 0, "medications": 0, "workouts": 0,
                                              "workoutRoutes": 0})
        after = self.counts()
        self.assertEqual(after.pop("syncs"), before.pop("syncs") + 1)
        self.assertEqual(after, before)

    def test_uuidless_samples_deduplicate(self):
        bare = sample(None, "2026-02-25T00:00:00.000Z", 7, "count")
        payload = {"data": {"HKQuantityTypeIdentifierStepCount": [bare, dict(bare)]}}
        _, _, answer = self.post(payload)
        self.assertEqual((answer["inserted"]["measurements"], answer["duplicates"]), (1, 1))
        # Same content with keys in another order: still the same sample.
        reordered = {key: bare[key] for key in reversed(list(bare))}
        _, _, answer = self.post({"data": {"HKQuantityTypeIdentifierStepCount": [reordered]}})
        self.assertEqual((answer["inserted"]["measurements"], answer["duplicates"]), (0, 1))
        # The same content in another type is another sample.
        _, _, answer = self.post({"data": {"HKQuantityTypeIdentifierFlightsClimbed": [bare]}})
        self.assertEqual(answer["inserted"]["measurements"], 1)
        self.assertEqual(self.count("samples"), 2)

    def test_resent_medication_replaces_stored_definition(self):
        self.post({"data": {"medications": [{"conceptIdentifier": "rx-9", "displayText": "Old name"}]}})
        _, _, answer = self.post({"data": {"medications": [{"conceptIdentifier": "rx-9", "displayText": "New",
                                                            "form": "capsule"}]}})
        self.assertEqual(answer["inserted"]["medications"], 0)
        self.assertEqual(answer["duplicates"], 1)
        rows = self.query("SELECT key, display_text, record, first_sync_id, last_sync_id FROM medications")
        self.assertEqual(len(rows), 1)
        key, name, record, first, last = rows[0]
        self.assertEqual((key, name, json.loads(record)["form"]), ("rx-9", "New", "capsule"))
        self.assertLess(first, last)

    def test_characteristics_upsert(self):
        self.post({"characteristics": {"bloodType": "A+", "biologicalSex": "female"}, "data": {}})
        _, _, answer = self.post({"characteristics": {"bloodType": "0-"}, "data": {}})
        self.assertEqual(answer["characteristics"], 1)
        self.assertEqual(dict(self.query("SELECT name, value FROM characteristics")),
                         {"bloodType": "0-", "biologicalSex": "female"})
        syncs = self.query("SELECT sync_id FROM characteristics WHERE name = 'bloodType'")
        self.assertEqual(syncs, [(answer["sync_id"],)])

    def test_the_newest_export_wins_not_the_latest_arrival(self):
        def send(exported, blood, medication):
            payload = {"characteristics": {"bloodType": blood}, "data": {"medications": [
                {"conceptIdentifier": "rx-1", "displayText": medication}]}}
            if exported:
                payload["exportDate"] = exported
            status, _, answer = self.post(payload)
            self.assertEqual(status, 200, answer)
            return answer["sync_id"]

        def stored():
            return (self.query("SELECT value, sync_id FROM characteristics")[0],
                    self.query("SELECT display_text, last_sync_id FROM medications")[0])

        newer = send("2026-11-30T08:00:00Z", "A+", "Now")
        send("2026-06-01T08:00:00+02:00", "0-", "Then")  # an older range uploaded by hand afterwards
        self.assertEqual(stored(), (("A+", newer), ("Now", newer)))
        again = send("2026-11-30T08:00:00.000Z", "B+", "Again")  # the same export: the later arrival wins
        self.assertEqual(stored(), (("B+", again), ("Again", again)))
        undated = send(None, "AB+", "Undated")  # no exportDate: taken as made when it arrived
        self.assertEqual(stored(), (("AB+", undated), ("Undated", undated)))
        unreadable = send("yesterday", "O+", "Unreadable")  # not a date: taken as made when it arrived too
        self.assertEqual(stored(), (("O+", unreadable), ("Unreadable", unreadable)))
        later = send("2031-01-01T00:00:00Z", "O-", "Later")
        self.assertEqual(stored(), (("O-", later), ("Later", later)))
        # Every value sent stays in the syncs' envelopes.
        history = self.query("SELECT json_extract(envelope, '$.characteristics.bloodType') FROM syncs ORDER BY id")
        self.assertEqual(history, [("A+",), ("0-",), ("B+",), ("AB+",), ("O+",), ("O-",)])
        # Within one sync the later element wins, even over the row the sync's first one just wrote.
        self.assertEqual(self.post({"exportDate": "2020-01-01T00:00:00Z", "data": {"medications": [
            {"conceptIdentifier": "rx-2", "displayText": "First"},
            {"conceptIdentifier": "rx-2", "displayText": "Second"}]}})[0], 200)
        self.assertEqual(self.query("SELECT display_text FROM medications WHERE key = 'rx-2'"), [("Second",)])

    def test_unknown_sections_and_fields_survive_verbatim(self):
        element = ('{ "uuid" : "U-1", "startDate": "2026-02-24T00:00:00Z",\n  "futureField": {"a": [1, 2.50]},'
                   ' "value": 1e2 }')
        body = ('{"futureTopLevel": {"x": 1}, "data": {"HKQuantityTypeIdentifierNewThing": [' + element
                + '], "moodEntries": [{"uuid": "M-1", "startDate": "2026-02-24", "mood": "\u263a"}]}}')
        status, _, answer = self.post(body.encode("utf-8"))
        self.assertEqual(status, 200, answer)
        self.assertEqual(self.query("SELECT record, type, value FROM samples WHERE uuid = 'U-1'"),
                         [('{"uuid":"U-1","startDate":"2026-02-24T00:00:00Z","futureField":{"a":[1,2.50]},"value":1e2}',
                           "HKQuantityTypeIdentifierNewThing", 100.0)])
        self.assertEqual(self.query("SELECT type, json_extract(record, '$.mood') FROM samples WHERE uuid = 'M-1'"),
                         [("moodEntries", "\u263a")])
        envelope = json.loads(self.query("SELECT envelope FROM syncs")[0][0])
        self.assertEqual(envelope, {"futureTopLevel": {"x": 1}})

    def test_pretty_printed_payload_and_bom(self):
        body = b"\xef\xbb\xbf" + json.dumps(make_payload(n=2), indent=2).encode("utf-8")
        status, _, answer = self.post(body)
        self.assertEqual(status, 200, answer)
        self.assertEqual(answer["count"], 9)
        record = self.query("SELECT record FROM samples WHERE uuid = 'A-HR-1'")[0][0]
        self.assertEqual(record, json.dumps(make_payload(n=2)["data"]["HKQuantityTypeIdentifierHeartRate"][1],
                                            separators=(",", ":")))

    def test_rejected_elements_are_kept_with_reason(self):
        payload = {"data": {
            "HKQuantityTypeIdentifierHeartRate": [sample("ok-1", "2026-02-24T00:00:00Z", 1), 42, "text", None,
                                                  [1, 2], {"uuid": "no-date", "value": 3},
                                                  {"uuid": 12, "startDate": "2026-02-24"}],
            "HKQuantityTypeIdentifierStepCount": {"not": "an array"},
            "workouts": [{"uuid": "W-no-date"}],
        }, "workoutRoutes": {"W-x": [{"latitude": 1}], "W-y": "nope"}}
        status, _, answer = self.post(payload)
        self.assertEqual(status, 200, answer)
        self.assertEqual(answer["count"], 1)
        self.assertEqual(answer["rejected"], 10)
        rows = self.query("SELECT section, reason, record FROM rejected ORDER BY id")
        self.assertEqual(len(rows), 10)
        by_record = {record: (section, reason) for section, reason, record in rows}
        self.assertEqual(by_record["42"], ("HKQuantityTypeIdentifierHeartRate", "element is a number, not an object"))
        self.assertEqual(by_record["null"][1], "element is null, not an object")
        self.assertEqual(by_record["[1,2]"][1], "element is an array, not an object")
        self.assertEqual(by_record['{"not":"an array"}'],
                         ("HKQuantityTypeIdentifierStepCount", "section is an object, not an array"))
        self.assertEqual(by_record['{"uuid":"no-date","value":3}'][1], "startDate missing or not a string")
        self.assertEqual(by_record['{"uuid":12,"startDate":"2026-02-24"}'][1],
                         "uuid is a number, not a non-empty string")
        self.assertEqual(by_record['{"uuid":"W-no-date"}'], ("workouts", "startDate missing or not a string"))
        self.assertEqual(by_record['{"latitude":1}'], ("workoutRoutes/W-x", "timestamp missing or not a string"))
        self.assertEqual(by_record['"nope"'], ("workoutRoutes/W-y", "route is a string, not an array"))
        self.assertEqual(self.query("SELECT rejected FROM syncs"), [(10,)])

    def test_empty_and_missing_data(self):
        status, _, answer = self.post({"syncSource": "widget"})
        self.assertEqual((status, answer["count"]), (200, 0))
        status, _, answer = self.post({"data": {}})
        self.assertEqual((status, answer["count"]), (200, 0))

    def test_two_concurrent_posts_are_both_stored(self):
        results = []

        def send(tag):
            results.append(self.post(make_payload(n=200, tag=tag))[0])

        threads = [threading.Thread(target=send, args=(tag,)) for tag in ("A", "B")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(results, [200, 200])
        # The uuid-less step sample is the same in both: stored once.
        self.assertEqual(self.count("samples"), 801)
        self.assertEqual(self.count("workouts"), 2)
        self.assertEqual(self.query("SELECT count(*) FROM syncs WHERE status = 'ok'"), [(2,)])

    def test_large_batch_crosses_batch_boundary(self):
        n = hr.BATCH_ROWS + 17
        payload = {"data": {"HKQuantityTypeIdentifierHeartRate": [
            sample(f"B-{i}", "2026-02-24T00:00:00Z", i) for i in range(n)]}}
        _, _, answer = self.post(payload)
        self.assertEqual(answer["inserted"]["measurements"], n)
        self.assertEqual(self.count("samples"), n)

    def test_values_sqlite_cannot_bind_are_rejected_not_fatal(self):
        body = (b'{"data": {"HKQuantityTypeIdentifierHeartRate": [{"uuid": "ok", "startDate": "2026-02-24"},'
                b'{"uuid": "bad", "startDate": "2026-02-24", "unit": "\\ud800"}]}}')
        status, _, answer = self.post(body)
        self.assertEqual(status, 200, answer)
        self.assertEqual((answer["count"], answer["rejected"]), (1, 1))
        self.assertEqual(self.query("SELECT uuid FROM samples"), [("ok",)])

    def test_an_unbindable_value_in_a_later_batch_keeps_the_earlier_batches(self):
        n = hr.BATCH_ROWS + 5
        workouts = [{"uuid": f"W-{i}", "startDate": "2026-02-24T07:00:00Z", "workoutActivityType": "running"}
                    for i in range(n)]
        workouts[-2]["workoutActivityType"] = "\ud800"
        heart = [sample(f"H-{i}", f"2026-02-24T07:{i // 60 % 60:02d}:{i % 60:02d}Z", 60) for i in range(n)]
        heart[-2]["unit"] = "\ud800"
        status, _, answer = self.post({"data": {"workouts": workouts, "HKQuantityTypeIdentifierHeartRate": heart}})
        self.assertEqual(status, 200, answer)
        self.assertEqual(answer["rejected"], 2)
        self.assertEqual((self.count("workouts"), self.count("samples")), (n - 1, n - 1))
        self.assertEqual(self.query("SELECT count(*) FROM samples WHERE uuid IN ('H-0', 'H-1002', 'H-1004')"), [(3,)])

    def test_huge_integers_and_big_numbers(self):
        body = (b'{"data": {"HKQuantityTypeIdentifierX": [{"uuid": "a", "startDate": "2026-02-24", '
                b'"value": 123456789012345678901234567890}, {"uuid": "b", "startDate": "2026-02-24", '
                b'"value": 1e400}]}}')
        status, _, answer = self.post(body)
        self.assertEqual(status, 200, answer)
        self.assertEqual(dict(self.query("SELECT uuid, value FROM samples")),
                         {"a": "123456789012345678901234567890", "b": float("inf")})


class WholeBodyRejectionTests(ServerTestCase):
    """A body broken as a whole: 400, nothing stored, a syncs row kept."""

    max_body = 8 * hr.MIB

    def test_truncated_json(self):
        body = encode(make_payload(n=20))
        for cut in sorted({1, 10, len(body) // 3, len(body) // 2, len(body) - 1, *range(1, len(body), len(body) // 9)}):
            with self.subTest(cut=cut):
                self.assert_rejected_whole(body[:cut], "Invalid JSON at byte")

    def test_offset_is_reported(self):
        body = b'{"data": {"X": [{"uuid": "a", "startDate": "2026-02-24"}, {"uuid": }]}}'
        answer = self.assert_rejected_whole(body)
        self.assertIn(f"byte {body.index(b': }') + 2}:", answer["error"])

    def test_top_level_not_an_object(self):
        for body, kind in ((b"[1, 2]", "an array"), (b"null", "null"), (b"12", "a number"), (b'"x"', "a string"),
                           (b"-2.5", "a number"), (b"[]", "an array"), (b'[{"data": {}}]', "an array"),
                           (b"true", "a boolean")):
            with self.subTest(body=body):
                self.assert_rejected_whole(body, f"must be a JSON object, not {kind}")

    def test_data_of_the_wrong_type(self):
        for data in ([1], [], "x", None, 5, True):
            with self.subTest(data=data):
                self.assert_rejected_whole({"data": data}, "'data' must be an object")

    def test_error_after_rows_were_written_rolls_everything_back(self):
        body = encode(make_payload(n=hr.BATCH_ROWS + 10))[:-2] + b"x}"
        self.assert_rejected_whole(body, "Invalid JSON")

    def test_empty_body_is_a_connection_test(self):
        for body in (b"", b"  \r\n ", b"\xef\xbb\xbf{}"):
            with self.subTest(body=body):
                status, _, answer = self.post(body)
                self.assertEqual((status, answer["service"]), (200, "health_receiver"))
        self.assertEqual(self.count("syncs"), 0)
        self.assert_nothing_stored()

    def test_invalid_utf8(self):
        self.assert_rejected_whole(b'{"data": {"X": [{"uuid": "\xff\xfe", "startDate": "x"}]}}', "not valid UTF-8")
        self.assert_rejected_whole(b'{"data": {"X": [{"uuid": "a\xc3\x28", "startDate": "2026"}]}}', "UTF-8")
        self.assert_rejected_whole(b'{"syncSource": "\xed\xa0\x80"}', "UTF-8")  # an encoded surrogate
        self.assert_rejected_whole(b'{"data": {"X\xff": []}}', "UTF-8")

    def test_nan_and_infinity_are_not_json(self):
        for constant in (b"NaN", b"Infinity", b"-Infinity"):
            with self.subTest(constant=constant):
                self.assert_rejected_whole(b'{"data": {"X": [{"uuid": "a", "startDate": "2026-02-24", "value": '
                                           + constant + b"}]}}", "not valid JSON")

    def test_deep_nesting_outside_an_object(self):
        deep = b"[" * 100000 + b"]" * 100000
        self.assert_rejected_whole(deep, "must be a JSON object, not an array")
        self.assert_rejected_whole(b'{"data": {"X": [' + b"[" * 100000 + b"]}}", "Invalid JSON")

    def test_trailing_garbage(self):
        self.assert_rejected_whole(b'{"data": {}} {"data": {}}', "unexpected data")


def element(uuid="E-1", **fields):
    fields.setdefault("startDate", "2026-02-24T00:00:00Z")
    return dict({"uuid": uuid}, **fields)


class BadInputTests(ServerTestCase):
    """Whatever the client sends: never a 5xx, the server keeps serving and
    the database stays consistent."""

    max_body = 64 * hr.MIB

    def send(self, body, expected):
        status, _, answer = self.post(body)
        self.assertEqual(status, expected, answer)
        self.assertLess(status, 500)
        self.assertEqual(self.request("GET")[0], 200)
        self.assertEqual(self.query("PRAGMA integrity_check"), [("ok",)])
        return answer

    def partly_bad(self, data, stored, rejected, **top):
        """Valid but with bad parts: 200, good rows stored, bad ones kept."""
        before = self.count("rejected")
        answer = self.send(dict(top, data=data), 200)
        self.assertEqual((answer["count"], answer["rejected"]), (stored, rejected))
        self.assertEqual(self.count("rejected") - before, rejected)
        return answer

    def test_integers_of_any_length_are_stored(self):
        digits = "7" * 5000  # past CPython's 4,300-digit limit of int()
        body = ('{"exportDate": %s, "data": {"HKQuantityTypeIdentifierStepCount": [{"uuid": "L-1", '
                '"startDate": "2026-02-24T08:00:00Z", "value": %s}, {"uuid": "L-\u00e9", '
                '"startDate": "2026-02-24T09:00:00Z", "value": -%s, "sourceName": "Jane\u2019s"}], '
                '"workouts": [{"uuid": "L-W", "startDate": "2026-02-24T08:00:00Z", "durationSeconds": %s}]}}'
                % (digits, digits, digits, digits)).encode()
        status, _, answer = self.post(body)
        self.assertEqual((status, answer["count"], answer["rejected"]), (200, 3, 0), answer)
        self.assertEqual(self.query("SELECT uuid, value, typeof(value) FROM samples ORDER BY uuid"),
                         [("L-1", digits, "text"), ("L-\u00e9", "-" + digits, "text")])
        self.assertIn(digits, self.query("SELECT record FROM workouts")[0][0])  # REAL column: inf, record exact
        self.assertEqual(self.request("GET", "/")[0], 200)

    def test_bom_is_accepted(self):
        answer = self.send(b"\xef\xbb\xbf" + encode({"data": {"X": [element()]}}), 200)
        self.assertEqual(answer["count"], 1)

    def test_sections_that_are_not_arrays(self):
        self.partly_bad({"HKQuantityTypeIdentifierHeartRate": {"uuid": "x"}, "B": 12, "C": None,
                         "D": [element("D-1")]}, stored=1, rejected=3)
        self.assertEqual(self.query("SELECT section, reason FROM rejected ORDER BY id"),
                         [("HKQuantityTypeIdentifierHeartRate", "section is an object, not an array"),
                          ("B", "section is a number, not an array"), ("C", "section is null, not an array")])

    def test_elements_that_are_not_objects(self):
        self.partly_bad({"X": [1, "s", None, [1, [2, [3]]], True, element("X-1")]}, stored=1, rejected=5)

    def test_elements_missing_dates(self):
        self.partly_bad({"X": [{"uuid": "a"}, {"uuid": "b", "startDate": None}, {"uuid": "c", "startDate": 5},
                               {"uuid": "d", "startDate": ""}, {"uuid": "f", "startDate": "soon"}, element("e")],
                         "workouts": [{"uuid": "w"}, {"uuid": "w2", "startDate": "later"}],
                         "medicationDoseEvents": [{"uuid": "m"}, {"uuid": "m2", "scheduledDate": "never"}]},
                        stored=1, rejected=9)

    def test_uuid_of_the_wrong_type(self):
        self.partly_bad({"X": [element(5), element({"a": 1}), element(""), element(True), element(["u"]),
                               element("ok")]}, stored=1, rejected=5)

    def test_an_element_nested_too_deeply_is_kept_aside_and_the_rest_stored(self):
        deep = "[" * 100000 + "]" * 100000
        nested = '{"uuid": "deep", "startDate": "2026-02-24", "m": ' + deep + "}"
        body = ('{"meta": ' + '{"a":' * 100000 + "1" + "}" * 100000 + ', "data": {"X": [' + deep + ", " + nested
                + ', {"uuid": "ok", "startDate": "2026-02-24"}]}}').encode()
        answer = self.send(body, 200)
        self.assertEqual((answer["count"], answer["rejected"]), (1, 3))
        self.assertEqual(self.query("SELECT uuid FROM samples"), [("ok",)])
        rows = self.query("SELECT section, reason, record FROM rejected ORDER BY id")
        meta = '{"a":' * 100000 + "1" + "}" * 100000
        self.assertEqual([(section, reason) for section, reason, _ in rows],
                         [("meta", f"top-level field of {len(meta):,} bytes, more than the envelope keeps")]
                         + [("X", "element is nested too deeply to be read")] * 2)
        self.assertEqual([record for _, _, record in rows], [meta, deep, nested])
        self.assertEqual(self.query("SELECT envelope FROM syncs"), [("{}",)])  # kept once, not in the envelope

    def test_an_unknown_top_level_array_is_read_like_a_section_and_large_fields_kept_aside(self):
        blob = {"note": "x" * (hr.ENVELOPE_TEXT_MAX + 10)}
        payload = {"exportDate": "2026-02-26T00:00:00.000Z", "blob": blob, "small": {"k": 1},
                   "extraSamples": [sample("U-1", "2026-02-24T08:00:00Z", 5), 7, {"no": "date"}]}
        answer = self.send(encode(payload), 200)
        self.assertEqual((answer["count"], answer["rejected"]), (1, 3), answer)
        self.assertEqual(self.query("SELECT uuid, type FROM samples"), [("U-1", "extraSamples")])
        rows = self.query("SELECT section, reason FROM rejected ORDER BY id")
        self.assertEqual([section for section, _ in rows], ["blob", "extraSamples", "extraSamples"])
        envelope = json.loads(self.query("SELECT envelope FROM syncs")[0][0])
        self.assertEqual(set(envelope), {"exportDate", "small"})

    def test_a_flood_of_scalars_is_counted_not_kept_one_a_row(self):
        body = ('{"data": {"X": [' + "1," * 10000 + '"a", "b", "c", {"uuid": "S-1", "startDate": "2026-02-24"}, 2]}}')
        answer = self.send(body.encode(), 200)
        self.assertEqual((answer["count"], answer["rejected"]), (1, hr.SCALARS_KEPT + 1 + 3), answer)
        rows = self.query("SELECT reason, record FROM rejected ORDER BY id")
        self.assertEqual(rows[:hr.SCALARS_KEPT], [("element is a number, not an object", "1")] * hr.SCALARS_KEPT)
        self.assertEqual(rows[-1], (f"{10001 - hr.SCALARS_KEPT:,} more: element is a number, not an object (the first "
                                    f"{hr.SCALARS_KEPT} are kept one a row; this row's record is the last)", "2"))
        self.assertEqual([record for _, record in rows[hr.SCALARS_KEPT:-1]], ['"a"', '"b"', '"c"'])

    def test_a_type_name_too_long_for_any_page_is_kept_aside(self):
        name = "HKQuantityTypeIdentifier" + "Long" * 100
        payload = {"data": {name: [sample("T-1", "2026-02-24T08:00:00Z", 1), sample("T-2", "2026-02-24T09:00:00Z", 2)],
                            "HKQuantityTypeIdentifierStepCount": [sample("T-3", "2026-02-24T08:00:00Z", 3)]}}
        answer = self.send(encode(payload), 200)
        self.assertEqual((answer["count"], answer["rejected"]), (1, 2), answer)
        self.assertEqual(self.query("SELECT uuid FROM samples"), [("T-3",)])
        rows = self.query("SELECT section, reason, record FROM rejected ORDER BY id")
        self.assertEqual({(section, reason) for section, reason, _ in rows},
                         {(name[:hr.TYPE_NAME_MAX] + "\u2026", f"type name of {len(name):,} characters, more than "
                                                                f"{hr.TYPE_NAME_MAX}")})
        self.assertEqual([json.loads(record)["uuid"] for _, _, record in rows], ["T-1", "T-2"])
        self.assertEqual(self.request("GET", "/")[0], 200)

    def test_huge_numbers(self):
        record = '{"uuid":"a","startDate":"2026-02-24","value":1e400}'
        answer = self.send(b'{"data": {"X": [' + record.encode() + b"]}}", 200)
        self.assertEqual(answer["count"], 1)
        self.assertEqual(self.query("SELECT record, value FROM samples"), [(record, float("inf"))])

    def test_values_larger_than_the_reader_takes_are_kept_in_parts(self):
        # Decoded, such a value would cost many times its size in memory.
        big = "\u00e9t\u00e9 \U0001F3C3 " * (hr.VALUE_TEXT_MAX // 9)
        long_number = "9" * (hr.VALUE_TEXT_MAX + 1)
        body = ('{"data": {"X": [' + json.dumps(element("small")) + ", " + json.dumps(element("big", note=big), ensure_ascii=False)
                + ", " + long_number + ']}, "blob": ' + json.dumps(big, ensure_ascii=False) + "}").encode()
        answer = self.send(body, 200)
        self.assertEqual(answer["count"], 1, answer)
        self.assertEqual(self.query("SELECT uuid FROM samples"), [("small",)])
        kept = {}
        for section, reason, record in self.query("SELECT section, reason, record FROM rejected ORDER BY id"):
            kept.setdefault(section, []).append((reason, record))
        self.assertEqual(set(kept), {"X", "blob"})
        self.assertEqual(answer["rejected"], len(kept["X"]) + len(kept["blob"]))
        joined = "".join(record for _, record in kept["X"])
        self.assertEqual(joined, json.dumps(element("big", note=big), ensure_ascii=False) + long_number)
        blob = json.dumps(big, ensure_ascii=False)
        self.assertEqual("".join(record for _, record in kept["blob"]), blob)
        self.assertEqual(len(kept["blob"]), -(-len(blob.encode()) // hr.PART_BYTES))
        self.assertEqual(kept["blob"][-1][0], f"a string of more than {hr.VALUE_TEXT_MAX:,} bytes, kept as sent (not read) "
                         f"in parts to be joined in order: part {len(kept['blob'])}, the last ({len(blob.encode()):,} bytes in all)")
        self.assertEqual(self.query("SELECT envelope FROM syncs"), [("{}",)])

    def test_a_long_integer_cut_by_the_window_is_stored(self):
        digits = "7" * 300000  # more than int() takes, and than one piece of the body
        record = '{"uuid":"n","startDate":"2026-02-24","value":' + digits + "}"
        self.assertEqual(self.send(('{"data": {"X": [' + record + "]}}").encode(), 200)["count"], 1)
        self.assertEqual(self.query("SELECT value = ?, record = ? FROM samples", (digits, record)), [(1, 1)])

    def test_duplicate_keys(self):
        record = '{"uuid":"k","uuid":"k2","startDate":"2026-02-24"}'
        body = b'{"syncSource": "a", "syncSource": "b", "data": {"X": [' + record.encode() + b"]}}"
        answer = self.send(body, 200)
        self.assertEqual(answer["count"], 1)
        self.assertEqual(self.query("SELECT uuid, record FROM samples"), [("k2", record)])

    def test_non_ascii_and_emoji_keys_and_values(self):
        payload = {"syncSource": "\u00e9t\u00e9 \U0001F3C3", "data": {
            "HKQuantityTypeIdentifierHeartRate": [element("\u00fc-1", sourceName="Jane\u2019s Watch \u231a",
                                                          **{"cl\u00e9": "\u6f22\u5b57", "\U0001F600": 1})],
            "Typ\u00e9\U0001F4A9": [element("emoji-1")]}}
        for ensure_ascii in (True, False):
            with self.subTest(ensure_ascii=ensure_ascii):
                body = json.dumps(payload, ensure_ascii=ensure_ascii).encode("utf-8")
                self.send(body, 200)
        rows = dict(self.query("SELECT uuid, source_name FROM samples"))
        self.assertEqual(rows["\u00fc-1"], "Jane\u2019s Watch \u231a")
        record = json.loads(self.query("SELECT record FROM samples WHERE uuid = '\u00fc-1'")[0][0])
        self.assertEqual(record["cl\u00e9"], "\u6f22\u5b57")
        self.assertEqual(self.query("SELECT type FROM samples WHERE uuid = 'emoji-1'"), [("Typ\u00e9\U0001F4A9",)])
        self.assertEqual(self.query("SELECT DISTINCT sync_source FROM syncs"), [("\u00e9t\u00e9 \U0001F3C3",)])

    def test_section_names_that_look_like_sql_or_paths(self):
        names = ["x'); DROP TABLE samples; --", "../../etc/passwd", "/tmp/x", "samples", "data", "", " ",
                 "C:\\Windows", "%s %d {}", "\u0000"]
        data = {name: [element(f"S-{i}")] for i, name in enumerate(names)}
        answer = self.partly_bad(data, stored=len(names), rejected=0)
        self.assertEqual(answer["inserted"]["measurements"], len(names))
        self.assertEqual(sorted(t for (t,) in self.query("SELECT type FROM samples")), sorted(names))

    def test_workout_routes_with_odd_keys_and_values(self):
        t1, t2, t3 = "2026-02-24T00:00:01Z", "2026-02-24T00:00:02Z", "2026-02-24T00:00:03Z"
        routes = {"not-a-uuid": [{"timestamp": t1, "latitude": 1}], "": [{"timestamp": t1}],
                  "\U0001F6B4": [{"timestamp": t2}], "W-obj": {"timestamp": t1}, "W-num": 3, "W-null": None,
                  "W-mixed": [5, {"timestamp": t3}, {"latitude": 2}], "W-bad-date": [{"timestamp": "noon"}]}
        answer = self.send(encode({"data": {}, "workoutRoutes": routes}), 200)
        self.assertEqual(answer["inserted"]["workoutRoutes"], 4)
        self.assertEqual(answer["rejected"], 6)
        self.assertEqual(self.count("workout_route_points"), 4)
        self.assertEqual(self.send(encode({"workoutRoutes": [1, 2]}), 200)["rejected"], 1)
        self.assertEqual(self.send(encode({"workoutRoutes": "x"}), 200)["rejected"], 1)
        self.assertEqual(self.send(encode({"data": {"workoutRoutes": "x"}}), 200)["rejected"], 1)
        self.assertEqual(self.query("SELECT section, reason FROM rejected ORDER BY id DESC LIMIT 1"),
                         [("data.workoutRoutes", "workoutRoutes is a string, not an object")])

    def test_ten_thousand_tiny_sections(self):
        data = {f"T{i}": [element(f"T-{i}")] for i in range(10000)}
        answer = self.partly_bad(data, stored=10000, rejected=0)
        self.assertEqual(self.count("samples"), 10000)
        self.assertEqual(self.query("SELECT sections FROM syncs WHERE id = ?", (answer["sync_id"],)), [(10000,)])

    def test_random_mutations_never_get_a_5xx(self):
        rng = random.Random(20261125)
        base = encode(make_payload(n=4))
        started = time.monotonic()
        statuses = {}
        for _ in range(300):
            if time.monotonic() - started > 20:
                break
            body = bytearray(base)
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(body))
                operation = rng.choice(("flip", "delete", "duplicate"))
                if operation == "flip":
                    body[at] = rng.randrange(256)
                elif operation == "delete":
                    del body[at:at + rng.randint(1, 40)]
                else:
                    body[at:at] = body[at:at + rng.randint(1, 40)]
            status, _, answer = self.post(bytes(body))
            statuses[status] = statuses.get(status, 0) + 1
            self.assertIn(status, (200, 400), (bytes(body), answer))
        self.assertGreater(sum(statuses.values()), 50)
        self.assertGreater(statuses.get(400, 0), 0)
        self.assertEqual(self.request("GET")[0], 200)
        self.assertEqual(self.query("PRAGMA integrity_check"), [("ok",)])
        self.assertEqual(self.query("SELECT count(*) FROM syncs WHERE status NOT IN ('ok', 'rejected')"), [(0,)])


class ArchiveTests(ServerTestCase):

    def server_options(self):
        self.archive = os.path.join(self.tmp.name, "archive")
        os.mkdir(self.archive)
        return {"archive": self.archive}

    def archived(self):
        return sorted(name for name in os.listdir(self.archive))

    def test_archive_only_for_committed_syncs_and_reimport(self):
        body = b"\xef\xbb\xbf" + json.dumps(make_payload(n=4), indent=1).encode()
        _, _, answer = self.post(body)
        self.post(b'{"data": []}')
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            conn.execute("BEGIN EXCLUSIVE")
            self.assertEqual(self.post(make_payload(tag="L"))[0], 503)
            conn.execute("ROLLBACK")
        wait_until(self.archived)
        names = self.archived()
        self.assertEqual(len(names), 1, names)
        self.assertRegex(names[0], r"^\d{8}T\d{6}Z-%d\.json\.gz$" % answer["sync_id"])
        with gzip.open(os.path.join(self.archive, names[0])) as handle:
            self.assertEqual(handle.read(), body)
        fresh = os.path.join(self.tmp.name, "fresh.db")
        with contextlib.redirect_stderr(io.StringIO()):
            self.assertEqual(hr.main(["import", "--db", fresh, self.archive], out=io.StringIO()), 0)
        sql = "SELECT uuid, type, record FROM samples ORDER BY uuid"
        with contextlib.closing(sqlite3.connect(fresh)) as conn:
            self.assertEqual(conn.execute(sql).fetchall(), self.query(sql))

    def test_a_retry_is_not_archived_again_and_a_changed_body_is_archived_whole(self):
        body = encode(make_payload(n=20))
        first = self.post(body)[2]
        retry = self.post(body)[2]
        changed = body.replace(b'"A-HR-7"', b'"A-HR-X"')
        other = self.post(changed)[2]
        self.assertEqual(self.query("SELECT id, same_body_as FROM syncs ORDER BY id"),
                         [(first["sync_id"], None), (retry["sync_id"], first["sync_id"]), (other["sync_id"], None)])
        wait_until(lambda: len(self.archived()) == 2)
        names = self.archived()
        self.assertEqual([int(name.split("-")[1].split(".")[0]) for name in names],
                         [first["sync_id"], other["sync_id"]])
        for name, sent in zip(names, (body, changed)):
            with gzip.open(os.path.join(self.archive, name)) as handle:
                self.assertEqual(handle.read(), sent)

    def test_a_persons_bodies_are_archived_as_theirs_imported_as_theirs_and_deleted_with_them(self):
        self.store.add_people(["ann"], [ANN_KEY])
        mine = self.post(make_payload(tag="M"))[2]
        hers = self.post(make_payload(tag="H"), headers={"Authorization": "Bearer " + ANN_KEY})[2]
        wait_until(lambda: len(self.archived()) == 2)
        names = self.archived()
        self.assertRegex(names[0], r"^\d{8}T\d{6}Z-%d\.json\.gz$" % mine["sync_id"])
        self.assertRegex(names[1], r"^\d{8}T\d{6}Z-%d-ann\.json\.gz$" % hers["sync_id"])
        fresh = os.path.join(self.tmp.name, "fresh.db")
        with contextlib.redirect_stderr(io.StringIO()):
            self.assertEqual(hr.main(["import", "--db", fresh, self.archive], out=io.StringIO()), 0)
        with contextlib.closing(sqlite3.connect(fresh)) as conn:
            self.assertEqual(conn.execute("SELECT p.name, substr(s.uuid, 1, 1), count(*) FROM samples s JOIN people p"
                                          " ON p.id = s.person GROUP BY 1, 2 ORDER BY 1").fetchall(),
                             [("ann", "H", 6), ("ann", "s", 1), ("me", "M", 6), ("me", "s", 1)])  # s: sha256:
        # A receiver started with --archive records the folder; a person's deletion then reaches it.
        args = hr.serve_parser().parse_args(["--host", "127.0.0.1", "--port", "0", "--db", self.db,
                                             "--archive", self.archive])
        config = hr.config_from_args(args, {hr.TOKEN_ENV: TOKEN})
        config.log_stream = io.StringIO()
        self.server.shutdown()
        self.thread.join()
        self.server.server_close()
        self.assertEqual(hr.serve(config, io.StringIO(), ready=lambda server: threading.Thread(
            target=server.shutdown).start()), 0)
        self.assertEqual(self.store.setting(hr.ARCHIVE_SETTING), os.path.abspath(self.archive))
        self.assertEqual(run_main("people", "--db", self.db, "rename", "ann", "anna")[0], 0)
        self.assertEqual(self.archived(), [names[0], names[1].replace("-ann.", "-anna.")])
        code, out, err = run_main("people", "--db", self.db, "remove", "anna", "--delete-data", "--yes")
        self.assertEqual(code, 0, err)
        self.assertIn("Removed 1 bodies of their syncs from the archive", out)
        self.assertEqual(self.archived(), [names[0]])
        self.server = hr.HealthReceiverServer(self.config, self.store)  # for tearDown
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def test_renaming_and_removing_a_person_leave_anothers_body_of_the_same_sync_id(self):
        # me's sync 2 was archived, then a restore rewound the ids: ann's sync is 2 again.
        self.assertEqual(self.post(make_payload(tag="M"))[0], 200)
        self.store.add_people(["ann"], [ANN_KEY])
        hers = self.post(make_payload(tag="H"), headers={"Authorization": "Bearer " + ANN_KEY})[2]
        wait_until(lambda: len(self.archived()) == 2)
        mine_before = "20200101T000000Z-%d.json.gz" % hers["sync_id"]
        with gzip.open(os.path.join(self.archive, mine_before), "wb") as handle:
            handle.write(encode(make_payload(tag="O")))
        self.store.keep_setting(hr.ARCHIVE_SETTING, os.path.abspath(self.archive))
        self.assertEqual(run_main("people", "--db", self.db, "rename", "ann", "anna")[0], 0)
        names = self.archived()
        self.assertIn(mine_before, names)
        self.assertEqual(len([name for name in names if name.endswith("Z-%d-anna.json.gz" % hers["sync_id"])]), 1)
        self.assertEqual(len(names), 3, names)
        code, out, err = run_main("people", "--db", self.db, "remove", "anna", "--delete-data", "--yes")
        self.assertEqual(code, 0, err)
        self.assertIn("Removed 1 bodies", out)
        self.assertEqual(len(self.archived()), 2)
        self.assertIn(mine_before, self.archived())

    def test_archive_failure_never_fails_a_stored_sync(self):
        os.rmdir(self.archive)
        with open(self.archive, "w"):
            pass  # a file where the folder should be
        status, _, answer = self.post(make_payload())
        self.assertEqual(status, 200, answer)
        self.assertEqual(self.count("workouts"), 1)
        wait_until(lambda: "could not be archived" in self.log.getvalue())
        self.assertIn("could not be archived", self.log.getvalue())


# ---------------------------------------------------------------------------
# HTTP: the protocol without a socket; routing, auth, limits, encodings,
# slow clients, TLS
# ---------------------------------------------------------------------------

def drive(server, data, client="127.0.0.1"):
    """Run the real handler over ``data`` without a socket, as CPython's
    test_httpservers does: the request is read from one BytesIO and the
    answers written to another, which is returned."""
    handler = hr.HealthRequestHandler.__new__(hr.HealthRequestHandler)
    handler.server, handler.client_address = server, (client, 50000)
    handler.request = handler.connection = None
    handler.rfile, handler.wfile = io.BytesIO(data), io.BytesIO()
    handler.handle()
    return handler.wfile.getvalue()


def answers(raw):
    """[(status, headers, body)] of the HTTP/1.1 answers in ``raw``."""
    stream, found = io.BytesIO(raw), []
    while True:
        line = stream.readline()
        if not line:
            return found
        headers = http.client.parse_headers(stream)
        if headers.get("Transfer-Encoding") == "chunked":
            body = b""
            for size in iter(lambda: int(stream.readline().strip() or b"0", 16), 0):
                body += stream.read(size)
                stream.readline()
            stream.readline()
        elif headers.get("Content-Length") is not None:
            body = stream.read(int(headers["Content-Length"]))
        else:
            body = stream.read()
        found.append((int(line.split()[1]), headers, body))


def _half_way(request):
    yield b"first piece,"
    raise RuntimeError("a row that cannot be written")


#: Routes of a made-up application: the protocol alone under test.
TEST_ROUTES = (
    hr.Route("GET", "/who", hr.PAGE_LOGIN, lambda request: hr.json_answer(
        {"who": request.identity.name, "now": request.now.isoformat(), "range": request.query.get("range")}), "who"),
    hr.Route("GET", "/items/<id>", hr.APP_KEY, lambda request: hr.json_answer({"id": request.argument}), "items"),
    hr.Route("GET", "/stream", hr.APP_KEY, lambda request: hr.Answer("text/plain", iter([b"a", b"", b"bc"])),
             "stream"),
    hr.Route("GET", "/broken", hr.APP_KEY, lambda request: hr.Answer("text/plain", _half_way(request)), "broken"),
    hr.Route("GET", "/bug", hr.APP_KEY, lambda request: 1 / 0, "bug"),
    hr.Route("POST", hr.ENDPOINT, hr.APP_KEY, lambda request: hr.json_answer(
        {"bytes": sum(len(piece) for piece in request.body_pieces())}, log="a body was read"), "echo"),
)


class ProtocolTests(unittest.TestCase):
    """The protocol without a socket or a database: the real handler and
    server object, a made-up route table (the application's own routes are
    tested with a real server below)."""

    keys = hr.Keys.single(TOKEN)

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.log = io.StringIO()
        config = hr.ReceiverConfig(host="127.0.0.1", db=os.path.join(tmp.name, "never.db"), keys=self.keys,
                                   log_stream=self.log, max_body=1000)
        self.server = hr.HealthReceiverServer(config, bind_and_activate=False,
                                              routes=hr.RouteTable(TEST_ROUTES, config.path))
        self.addCleanup(self.server.server_close)
        self.addCleanup(lambda: self.assertFalse(os.listdir(tmp.name)))  # no database was made

    def exchange(self, data, client="127.0.0.1"):
        return answers(drive(self.server, data, client))

    def get(self, path, headers="", client="127.0.0.1", version="HTTP/1.1"):
        [(status, head, body)] = self.exchange(f"GET {path} {version}\r\nHost: localhost\r\n{headers}\r\n".encode(),
                                               client)
        return status, head, body

    def test_malformed_request_lines_get_json_and_one_log_line(self):
        cases = [(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505), (b"GARBAGE\r\n\r\n", 400),
                 (b"GET / HTTP/2.0\r\n\r\n", 505), (b"GET / HTTP/1.x\r\n\r\n", 400),
                 (b"GET / HTTP/1.1 extra\r\n\r\n", 400), (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414)]
        for request, status in cases:
            with self.subTest(request=request[:30]):
                before = len(self.log.getvalue().splitlines())
                [(answered, head, body)] = self.exchange(request)
                self.assertEqual(answered, status)
                self.assertEqual(head["Connection"], "close")
                self.assertIs(json.loads(body)["ok"], False)
                self.assertEqual(len(self.log.getvalue().splitlines()), before + 1)
        self.assertNotIn("Traceback", self.log.getvalue())

    def test_the_route_table_finds_paths_patterns_and_methods(self):
        key = f"Authorization: Bearer {TOKEN}\r\n"
        self.assertEqual(json.loads(self.get("/items/a%20b/c", key)[2]), {"id": "a b/c"})
        status, head, body = self.get("/items/", key)
        self.assertEqual((status, json.loads(body)["error"]), (404, "Nothing here; the endpoint is "
                                                                     f"{hr.DEFAULT_PATH}."))
        [(status, head, body)] = self.exchange(b"DELETE /items/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertEqual((status, head["Allow"]), (405, "GET, HEAD"))
        [(status, head, body)] = self.exchange(b"GET /api/health-data/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertEqual((status, head["Allow"]), (405, "POST"))
        [(status, head, body)] = self.exchange(f"HEAD /items/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n{key}\r\n".encode())
        self.assertEqual((status, body), (200, b""))
        self.assertGreater(int(head["Content-Length"]), 0)

    def test_who_may_call_is_the_routes_access(self):
        login = "Authorization: Basic " + base64.b64encode(f"anyone:{TOKEN}".encode()).decode() + "\r\n"
        status, head, body = self.get("/who?range=7d", login)
        self.assertEqual(status, 200)
        answer = json.loads(body)
        self.assertEqual((answer["who"], answer["range"]), (hr.OWNER.name, ["7d"]))
        self.assertTrue(answer["now"].endswith("+00:00"))  # the request's one now, aware
        self.assertEqual(self.get("/who", f"Authorization: Bearer {TOKEN}\r\n")[0], 200)
        for user in ("J\u00f6rg".encode(), "J\u00f6rg".encode("latin-1")):
            login_as = "Authorization: Basic " + base64.b64encode(user + f":{TOKEN}".encode()).decode() + "\r\n"
            self.assertEqual(self.get("/who", login_as)[0], 200)
        status, head, _ = self.get("/who")
        self.assertEqual((status, head["WWW-Authenticate"]), (401, 'Basic realm="health_receiver", charset="UTF-8"'))
        status, head, body = self.get("/items/1", login)  # the app's routes take no login
        self.assertEqual((status, head["WWW-Authenticate"]), (401, 'Bearer realm="health_receiver"'))
        self.assertIn("uses the scheme Basic", json.loads(body)["error"])

    def test_without_keys_pages_answer_this_machine_only(self):
        self.server.config.keys = hr.Keys()
        self.assertEqual(self.get("/who")[0], 200)
        status, _, body = self.get("/who", client="192.0.2.10")
        self.assertEqual(status, 403)
        self.assertIn("without a key", json.loads(body)["error"])
        self.assertEqual(self.get("/items/1", client="192.0.2.10")[0], 200)

    def test_streamed_answers_and_one_that_fails_half_way(self):
        key = f"Authorization: Bearer {TOKEN}\r\n"
        status, head, body = self.get("/stream", key)
        self.assertEqual((status, head["Transfer-Encoding"], body), (200, "chunked", b"abc"))
        status, head, body = self.get("/stream", key, version="HTTP/1.0")
        self.assertEqual((status, head["Connection"], body), (200, "close", b"abc"))
        raw = drive(self.server, f"GET /broken HTTP/1.1\r\nHost: 127.0.0.1\r\n{key}\r\n".encode())
        self.assertIn(b"first piece,", raw)
        self.assertFalse(raw.endswith(b"0\r\n\r\n"))  # never complete-looking
        self.assertIn("download stopped half way", self.log.getvalue())
        self.assertIn("RuntimeError: a row that cannot be written", self.log.getvalue())

    def test_a_bug_is_a_500_with_its_traceback_in_the_log(self):
        status, head, body = self.get("/bug", f"Authorization: Bearer {TOKEN}\r\n")
        self.assertEqual((status, head["Connection"]), (500, "close"))
        self.assertNotIn("Traceback", body.decode())
        self.assertIn("ZeroDivisionError", self.log.getvalue())

    def test_bodies_are_read_within_limits_and_answers_logged_once(self):
        body = b'{"a": 1}'
        head = f"POST {hr.DEFAULT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        sent = (f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
                + f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + b"3\r\n{}\n\r\n0\r\n\r\n")
        self.assertEqual([(status, json.loads(text)) for status, _, text in self.exchange(sent)],
                         [(200, {"bytes": 8}), (200, {"bytes": 3})])
        self.assertEqual(self.log.getvalue().count("a body was read"), 2)
        status = self.exchange(f"{head}Content-Length: 1001\r\n\r\n".encode() + b" " * 1001)[0][0]
        self.assertEqual(status, 413)
        status = self.exchange(f"{head}Content-Type: text/plain\r\nContent-Length: 2\r\n\r\n{{}}".encode())[0][0]
        self.assertEqual(status, 415)

    def test_a_route_that_takes_the_endpoint_path_is_refused(self):
        for path, taken in (("/", "the status page"), (hr.SUMMARY_PATH, "JSON"), ("/type/x", "type pages"),
                            ("/workout/a/b", "workout pages")):
            with self.subTest(path=path):
                with self.assertRaisesRegex(hr.UsageError, taken):
                    hr.RouteTable(hr.ROUTES, path)
        for path in ("/type", "/api/health-data", "/hooks/health"):
            hr.RouteTable(hr.ROUTES, path)
        table = hr.RouteTable(hr.ROUTES, "/api/<x>")  # the endpoint's path is never a pattern
        self.assertEqual(table.find("POST", "/api/<x>")[0].action, hr.receive_sync)
        with self.assertRaises(hr.ClientError):
            table.find("POST", "/api/anything")
        self.assertEqual(table.find("GET", "/type/Heart%20Rate%2Ecsv")[0].action, hr.type_csv)
        self.assertEqual(table.find("GET", "/type/Heart%20Rate%2Ecsv")[1], "Heart Rate")
        code, _, err = run_main("--path", hr.SUMMARY_PATH, "--db", "/nonexistent/folder/health.db")
        self.assertEqual(code, 2)
        self.assertIn("is taken by the status page's JSON", err)


class HttpTests(ServerTestCase):

    def test_status_get_and_head(self):
        self.post(make_payload(n=2))
        status, response, answer = self.request("GET")
        self.assertEqual(status, 200)
        self.assertEqual(answer["ok"], True)
        self.assertEqual(answer["version"], hr.__version__)
        self.assertEqual(answer["totals"]["samples"], 5)
        self.assertEqual(answer["last_sync"]["status"], "ok")
        length = int(response.getheader("Content-Length"))
        status, response, body = self.request("HEAD")
        self.assertEqual((status, body), (200, b""))
        self.assertGreater(int(response.getheader("Content-Length")), 0)
        self.assertLess(abs(int(response.getheader("Content-Length")) - length), 5)

    def test_query_string_and_trailing_slash_are_ignored(self):
        status, _, answer = self.request("POST", hr.DEFAULT_PATH + "/?source=app", body=make_payload())
        self.assertEqual(status, 200, answer)
        self.assertEqual(self.request("GET", hr.DEFAULT_PATH + "?x=1")[0], 200)

    def test_unknown_path_404(self):
        status, _, answer = self.request("GET", "/nope")
        self.assert_error(status, 404, answer, hr.DEFAULT_PATH)
        status, _, answer = self.request("POST", "/api/other", body=make_payload())
        self.assert_error(status, 404, answer)
        self.assertEqual(self.count("samples"), 0)

    def test_other_methods_405_with_allow(self):
        for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
            with self.subTest(method=method):
                status, response, answer = self.request(method, body=b"{}")
                self.assert_error(status, 405, answer)
                self.assertEqual(response.getheader("Allow"), "GET, HEAD, POST")

    def test_unsupported_content_type_415(self):
        status, _, answer = self.post(make_payload(), headers={"Content-Type": "text/plain"})
        self.assert_error(status, 415, answer, "application/json")
        self.assert_nothing_stored()

    def test_content_type_parameters_and_absence_accepted(self):
        status, _, _ = self.post(make_payload(), headers={"Content-Type": "application/json; charset=utf-8"})
        self.assertEqual(status, 200)
        conn = self.connection()
        with contextlib.closing(conn):
            conn.putrequest("POST", hr.DEFAULT_PATH)
            body = encode(make_payload(tag="B"))
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            self.assertEqual(conn.getresponse().status, 200)

    def test_a_post_with_nothing_in_it_is_a_connection_test(self):
        self.post(make_payload(n=1))
        close = "Connection: close\r\n"  # the others keep the connection open, as they may
        requests = {"no length": b"POST /api/health-data HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                    "no length, bytes after": b"POST /api/health-data HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n{}",
                    "empty": post_head(0, close), "{}": post_head(2, close) + b"{}",
                    "spaced": post_head(7, close) + b" {\n }\n ",
                    "chunked {}": post_head(extra="Transfer-Encoding: chunked\r\n" + close) + b"2\r\n{}\r\n0\r\n\r\n"}
        for name, request in requests.items():
            with self.subTest(name):
                [(status, _, body)] = answers(self.raw_exchange(request))
                answer = json.loads(body)
                self.assertEqual((status, answer["service"], answer["last_sync"]["id"]), (200, "health_receiver", 1))
        self.assertEqual(self.count("syncs"), 1)  # counted nowhere
        self.assertEqual(self.request("POST", body=b"{}")[2]["totals"]["samples"], 3)

    def test_the_status_gives_the_processor_time_spent_so_far(self):
        before = self.request("GET")[2]["cpu_seconds"]
        self.assertEqual(self.post(make_payload(n=500))[0], 200)
        after = self.request("GET")[2]["cpu_seconds"]
        self.assertIsInstance(before, float)
        self.assertGreaterEqual(after, before)
        self.assertGreater(before, 0)

    def test_oversize_413_answered_before_the_body_is_sent(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall("POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         "Content-Length: {}\r\n\r\n".format(hr.DEFAULT_PATH, 50 * hr.MIB).encode())
            answer = b""
            with contextlib.suppress(ConnectionError):
                for chunk in iter(lambda: sock.recv(65536), b""):  # until the server closes
                    answer += chunk
            self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
            self.assertIn(b"Connection: close", answer)
            self.assertIn(b"limit of 1 MB", answer)
            self.assertEqual(answer.count(b"HTTP/1.1"), 1)
        self.assertEqual(self.query("SELECT status FROM syncs"), [])  # refused from its headers: only logged
        self.assertIn("-> 413 The body is larger", self.log.getvalue())

    def test_keep_alive_serves_several_requests_on_one_connection(self):
        conn = self.connection()
        with contextlib.closing(conn):
            for tag in ("A", "B", "C"):
                status, response, answer = self.request("POST", body=make_payload(tag=tag), conn=conn)
                self.assertEqual(status, 200)
                self.assertIsNotNone(response.getheader("Content-Length"))
            self.assertEqual(self.request("GET", conn=conn)[0], 200)
        self.assertEqual(self.count("workouts"), 3)

    def test_unknown_method_gets_json_error(self):
        answer = self.raw_exchange(b"BREW /api/health-data HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 501 "), answer)
        self.assertIn(b'{"ok": false', answer)

    def test_log_line_for_a_sync(self):
        self.post(make_payload(n=3))
        line = [l for l in self.log_lines() if "records" in l][-1]
        self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z 127\.0\.0\.1 manual-upload 11 records "
                               r"\(11 new, 0 dup, 0 rejected\) in 5 sections, 4 route points, "
                               r"2026-02-24 -> 2026-02-26, 0\.0 MB in \d+\.\d\d s$")
        self.post({"data": {"HKQuantityTypeIdentifierHeartRate": [sample("ONE", "2026-02-24T00:00:00.000Z", 60)]}})
        self.assertIn(" 1 record (1 new, 0 dup, 0 rejected) in 1 section, 0 route points, ", self.log_lines()[-1])

    def test_error_log_line_escapes_control_characters(self):
        self.request("GET", "/x%0Ay\x1b[31m".replace("\x1b", "%1B"))
        raw = self.raw_exchange(b"GET /evil\x1b[2J HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 404"))
        errors = [l for l in self.log_lines() if " ERROR " in l]
        self.assertTrue(any("\\x1b[2J" in l and "404" in l for l in errors), errors)
        self.assertFalse(any("\x1b" in l for l in self.log_lines()))


class QuietTests(ServerTestCase):

    def setUp(self):
        super().setUp()
        self.config.quiet = True

    def test_quiet_keeps_only_errors(self):
        self.post(make_payload())
        self.request("GET", "/missing")
        lines = self.log_lines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("404", lines[0])


class DeploymentBannerTests(unittest.TestCase):
    """The banner fits a receiver behind a proxy: the app's Server URL, the
    proxies trusted, the backups, where notices go."""

    def test_the_banner_gives_the_public_url_the_proxies_the_backups_and_the_notices(self):
        with tempfile.TemporaryDirectory() as folder:
            db, backups = os.path.join(folder, "health.db"), os.path.join(folder, "backups")
            os.mkdir(backups)
            args = hr.serve_parser().parse_args([
                "--db", db, "--host", "127.0.0.1", "--public-url", "https://health.example.com/",
                "--trusted-proxy", "127.0.0.1,10.0.0.0/8", "--backup-dir", backups, "--backup-every", "24",
                "--notify", "https://ntfy.sh/secret-topic"])
            lines = hr.banner_lines(hr.config_from_args(args, {}), 3000)
        self.assertIn("Server URL for Health Export Pro: https://health.example.com", lines)
        self.assertIn("Behind a proxy or tunnel: the app reaches this receiver at https://health.example.com", lines)
        self.assertIn("Trusted proxies (their forwarding headers name the client): 127.0.0.1/32, 10.0.0.0/8", lines)
        self.assertIn(f"Backups: every 24 h into {backups}, the newest 7 kept; keep the key file {db}.key as well",
                      lines)
        self.assertIn("Notices: to https://ntfy.sh (ntfy)", lines)
        self.assertNotIn("secret-topic", "\n".join(lines))
        with contextlib.redirect_stderr(io.StringIO()) as err:
            self.assertEqual(hr.main(["--public-url", "ftp://example.com", "--db", db]), 2)
        self.assertIn("give the URL the app uses", err.getvalue())


class IdleConnectionTests(ServerTestCase):
    """A keep-alive connection left idle is closed at the timeout without
    an error line (one per Home Assistant poll and Prometheus scrape)."""

    timeout = 0.3

    def test_an_idle_keep_alive_is_closed_quietly(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(f"GET {hr.DEFAULT_PATH} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            received = b""
            while b"\r\n\r\n" not in received:
                received += sock.recv(65536)
            self.assertTrue(received.startswith(b"HTTP/1.1 200"), received[:100])
            while sock.recv(65536):  # the rest of the answer, then the server's close
                pass
        wait_until(lambda: self.log_lines())  # the request's own line
        self.assertEqual([line for line in self.log_lines() if "ERROR" in line], [])

    def test_a_request_cut_half_way_is_still_an_error(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(f"POST {hr.DEFAULT_PATH} HTTP/1.1\r\nHost: localhost\r\n".encode())
            while sock.recv(65536):
                pass
        wait_until(lambda: any("ERROR" in line for line in self.log_lines()))


class MalformedRequestTests(ServerTestCase):
    """Framing a proxy could read otherwise, and the load of many requests."""

    def test_framing_that_proxies_may_read_otherwise_is_refused(self):
        body = encode(make_payload(n=1))
        chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        cases = {
            "two Transfer-Encoding headers": post_head(extra="Transfer-Encoding: chunked\r\n"
                                                             "Transfer-Encoding: identity\r\n") + chunk,
            "chunked then identity": post_head(extra="Transfer-Encoding: chunked, identity\r\n") + chunk,
            "bare LF in a chunk line": post_head(extra="Transfer-Encoding: chunked\r\n")
            + b"%x\n%s\r\n0\r\n\r\n" % (len(body), body),
            "space before a chunk size": post_head(extra="Transfer-Encoding: chunked\r\n")
            + b" %x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
            "a header line without a colon": post_head(len(body), extra="NoColonHere\r\n") + body,
            "a folded header": post_head(len(body), extra="X-Note: a\r\n folded\r\n") + body,
            "Content-Length and Transfer-Encoding": post_head(len(body), extra="Transfer-Encoding: chunked\r\n")
            + chunk,
            "conflicting lengths": post_head(len(body), extra=f"Content-Length: {len(body) + 1}\r\n") + body,
        }
        for name, request in cases.items():
            with self.subTest(name):
                answer = self.raw_exchange(request)
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:300])
        self.assert_nothing_stored()
        answer = self.raw_exchange(post_head(extra="Transfer-Encoding: gzip\r\n") + chunk)
        self.assertTrue(answer.startswith(b"HTTP/1.1 501 "), answer[:300])

    def test_a_hundred_requests_on_one_connection(self):
        conn = self.connection()
        with contextlib.closing(conn):
            for _ in range(100):
                self.assertEqual(self.request("GET", conn=conn)[0], 200)

    def test_fifty_concurrent_posts_are_all_answered(self):
        # Fifty syncs queue for the database one after another: they wait
        # as the receiver's own do (the class's short wait is for tests of
        # a locked database; on a slow machine the last ones got 503).
        self.store.busy_timeout = hr.BUSY_TIMEOUT
        barrier = threading.Barrier(50)
        results = []

        def post(number):
            barrier.wait(10)
            try:
                results.append(self.post(make_payload(n=2, tag=f"C{number}"))[0])
            except OSError as exc:  # a reset would land here
                results.append(repr(exc))

        threads = [threading.Thread(target=post, args=(number,)) for number in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(results, [200] * 50)
        self.assertEqual(self.query("SELECT count(*) FROM syncs WHERE status = 'ok'"), [(50,)])

    def test_pages_and_answers_carry_protective_headers(self):
        for path in ("/", hr.SUMMARY_PATH, hr.DEFAULT_PATH):
            with self.subTest(path=path):
                status, response, _ = self.request("GET", path)
                self.assertEqual(status, 200)
                self.assertEqual(response.getheader("Cache-Control"), "no-store")
                self.assertEqual(response.getheader("X-Content-Type-Options"), "nosniff")
                self.assertEqual(response.getheader("Referrer-Policy"), "no-referrer")
        policy = self.request("GET", "/")[1].getheader("Content-Security-Policy")
        self.assertIn("default-src 'none'", policy)
        self.assertIn("frame-ancestors 'none'", policy)
        self.assertNotIn("script-src", policy)


class ProxyTests(ServerTestCase):
    """Behind a reverse proxy every peer is 127.0.0.1: with --trusted-proxy
    the proxy's forwarding headers name each client; without it they are
    ignored, and such a request is never "this machine"."""

    token = TOKEN

    def server_options(self):
        return {"trusted_proxies": hr.TrustedProxies.parse("127.0.0.1, 10.0.0.0/8")}

    def test_the_rightmost_hop_the_proxies_do_not_trust_is_the_client(self):
        message = http.client.HTTPMessage
        # The proxy's own header alone counts: a client's Forwarded passes a proxy untouched.
        cases = [("X-Forwarded-For", {"X-Forwarded-For": "203.0.113.7"}, "203.0.113.7"),
                 ("X-Forwarded-For", {"X-Forwarded-For": "6.6.6.6, 203.0.113.7, 10.1.2.3"}, "203.0.113.7"),
                 ("X-Forwarded-For", {"Forwarded": "for=198.51.100.4:5000", "X-Forwarded-For": "6.6.6.6"}, "6.6.6.6"),
                 ("X-Forwarded-For", {"Forwarded": "for=127.0.0.1"}, "127.0.0.1"),  # no proxy's header: the peer
                 ("X-Forwarded-For", {"X-Forwarded-For": "10.0.0.1, 127.0.0.1"}, "10.0.0.1"),  # all trusted: the first
                 ("X-Forwarded-For", {"X-Forwarded-For": "unknown"}, hr.UNKNOWN_CLIENT),  # never this machine
                 ("X-Forwarded-For", {"X-Forwarded-For": "127.0.0.1, _hidden"}, hr.UNKNOWN_CLIENT),
                 ("X-Forwarded-For", {}, "127.0.0.1"),
                 ("Forwarded", {"Forwarded": 'for=6.6.6.6, for="[2001:db8::1]:4711";proto=https'}, "2001:db8::1"),
                 ("Forwarded", {"Forwarded": "For=198.51.100.4:5000", "X-Forwarded-For": "6.6.6.6"}, "198.51.100.4"),
                 ("Forwarded", {"Forwarded": "proto=https;FOR=198.51.100.5"}, "198.51.100.5"),
                 ("Forwarded", {"Forwarded": "for=203.0.113.9, for=unknown"}, hr.UNKNOWN_CLIENT),
                 ("Forwarded", {"Forwarded": "for=203.0.113.9, FOR="}, hr.UNKNOWN_CLIENT),
                 ("X-Real-IP", {"X-Real-IP": "203.0.113.8", "X-Forwarded-For": "127.0.0.1"}, "203.0.113.8")]
        for header, fields, client in cases:
            with self.subTest(header=header, fields=fields):
                proxies = hr.TrustedProxies.parse("127.0.0.1,10.0.0.0/8", header)
                headers = message()
                for name, value in fields.items():
                    headers[name] = value
                self.assertEqual(proxies.client("127.0.0.1", headers), client)
                self.assertEqual(proxies.client("192.0.2.1", headers), "192.0.2.1")  # not a trusted peer
        with self.assertRaises(hr.UsageError):
            hr.TrustedProxies.parse("127.0.0.1,not-an-address")

    def test_what_a_client_writes_behind_the_proxy_never_makes_it_this_machine_nor_another_address(self):
        self.server.config.keys = hr.Keys()
        self.server.config.trusted_proxies = hr.TrustedProxies.parse("127.0.0.1")
        # As nginx forwards with the README's configuration: the client's headers, then its address added.
        for forged in ({"Forwarded": "for=127.0.0.1"}, {"Forwarded": "for=unknown"}, {"Forwarded": "for=_hidden"},
                       {"Forwarded": "FOR="}, {"X-Forwarded-For": "127.0.0.1, unknown"},
                       {"X-Forwarded-For": "127.0.0.1, 127.0.0.1, _hidden"}):
            for path in (hr.LATEST_PATH, hr.SUMMARY_PATH, "/"):
                with self.subTest(forged=forged, path=path):
                    headers = dict(forged)
                    headers["X-Forwarded-For"] = ", ".join(
                        filter(None, (forged.get("X-Forwarded-For"), "" if "X-Forwarded-For" in forged
                                      else "203.0.113.50")))
                    self.assertEqual(self.request("GET", path, headers=headers)[0], 403)
        # With a key, a rotating Forwarded does not spread the guesses over made-up addresses.
        self.server.config.keys = hr.Keys.single(TOKEN)
        statuses = [self.request("GET", headers={"Authorization": "Bearer nope", "Forwarded": f"for=198.51.100.{i}",
                                                 "X-Forwarded-For": "203.0.113.51"})[0] for i in range(15)]
        self.assertEqual(statuses[hr.GUESS_LIMIT:], [429] * (15 - hr.GUESS_LIMIT))
        self.assertEqual(self.post(make_payload(), headers={"Authorization": "Bearer " + TOKEN,
                                                            "Forwarded": "for=198.51.100.99",
                                                            "X-Forwarded-For": "203.0.113.52"})[0], 200)
        self.assertEqual(self.query("SELECT remote_addr FROM syncs"), [("203.0.113.52",)])
        self.assertNotIn("198.51.100.", self.log.getvalue())

    def test_a_stranger_behind_the_proxy_cannot_lock_the_owner_out(self):
        for _ in range(hr.GUESS_LIMIT):
            self.request("GET", headers={"Authorization": "Bearer nope", "X-Forwarded-For": "203.0.113.66"})
        self.assertEqual(self.request("GET", headers={"Authorization": "Bearer nope",
                                                      "X-Forwarded-For": "203.0.113.66"})[0], 429)
        self.assertEqual(self.post(make_payload(), headers={"Authorization": "Bearer " + TOKEN,
                                                            "X-Forwarded-For": "198.51.100.20"})[0], 200)
        self.assertIn("203.0.113.66 ERROR", self.log.getvalue())  # the log names the client, not the proxy

    def test_without_keys_a_forwarded_request_is_never_this_machine(self):
        self.server.config.keys = hr.Keys()
        self.server.config.trusted_proxies = hr.TrustedProxies()
        forwarded = {"X-Forwarded-For": "203.0.113.9"}
        self.assertEqual(self.request("GET", "/", headers=forwarded)[0], 403)
        self.assertEqual(self.request("GET", "/", headers=forwarded)[0], 403)
        self.assertEqual(self.request("GET", "/")[0], 200)
        self.assertEqual(sum("--trusted-proxy 127.0.0.1" in line for line in self.log_lines()), 1)
        self.server.config.trusted_proxies = hr.TrustedProxies.parse("127.0.0.1")
        self.assertEqual(self.request("GET", "/", headers=forwarded)[0], 403)
        self.assertEqual(self.request("GET", "/", headers={"X-Forwarded-For": "127.0.0.1"})[0], 200)

    def test_the_flag_and_its_environment_variable(self):
        args = hr.serve_parser().parse_args(["--no-auth", "--db", os.path.join(self.tmp.name, "x.db")])
        config = hr.config_from_args(args, {hr.TRUSTED_PROXY_ENV: "::1, 127.0.0.1"})
        self.assertTrue(config.trusted_proxies.trusts(ipaddress.ip_address("::1")))
        self.assertEqual(config.trusted_proxies.header, "X-Forwarded-For")
        args = hr.serve_parser().parse_args(["--no-auth", "--db", os.path.join(self.tmp.name, "x.db"),
                                             "--trusted-proxy", "127.0.0.1", "--proxy-header", "Forwarded"])
        self.assertEqual(hr.config_from_args(args, {}).trusted_proxies.header, "Forwarded")
        self.assertEqual(run_main("--proxy-header", "X Bad", "--no-auth")[0], 2)
        code, _, err = run_main("--trusted-proxy", "nope", "--no-auth", "--db", os.path.join(self.tmp.name, "y.db"))
        self.assertEqual(code, 2)
        self.assertIn("--trusted-proxy", err)


class StrictRequestTests(ServerTestCase):
    """Requests a proxy in front could read otherwise are refused, once,
    and the connection closed (over a real socket: polite clients cannot
    send them)."""

    def one_answer(self, request):
        [(status, head, body)] = answers(self.raw_exchange(request))
        self.assertEqual(head["Connection"], "close")
        return status, json.loads(body)["error"] if body else None  # HEAD: no body

    def test_a_body_on_a_request_that_takes_none_is_never_a_second_request(self):
        smuggled = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        for head, status in ((f"GET {hr.DEFAULT_PATH}", 400), ("GET /", 400), (f"HEAD {hr.DEFAULT_PATH}", 400),
                             ("GET /nope", 404), (f"DELETE {hr.DEFAULT_PATH}", 405)):
            with self.subTest(head=head):
                request = f"{head} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(smuggled)}\r\n\r\n".encode()
                self.assertEqual(self.one_answer(request + smuggled)[0], status)
        both = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                f"0\r\n\r\n").encode() + smuggled
        self.assertEqual(self.one_answer(both), (400, "A GET request cannot have a body."))
        status, _, _ = self.request("GET", headers={"Content-Length": "0"})  # no body: answered, kept open
        self.assertEqual(status, 200)

    def test_http_0_9_lines_hosts_and_expectations(self):
        cases = {b"GET /\r\n": "HTTP/0.9",
                 b"GET / HTTP/1.1\r\n\r\n": "exactly one Host",
                 b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n": "exactly one Host",
                 b"GET / HTTP/1.1\r\nHost: 127.0.0.1\nX-A: 1\r\n\r\n": "CRLF",
                 b"GET / HTTP/1.1\nHost: 127.0.0.1\r\n\r\n": "CRLF",
                 b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\0b\r\n\r\n": "NUL",
                 # A key pasted with its file's CR: the standard library would
                 # end the headers there, and a POST would lose its length.
                 b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k\r\r\nContent-Length: 2\r\n"
                 b"\r\n{}": "a CR inside a line"}
        for request, fragment in cases.items():
            with self.subTest(request=request):
                status, error = self.one_answer(request)  # at once: the server does not wait for more
                self.assertEqual(status, 400)
                self.assertIn(fragment, error)
        self.assertEqual(self.one_answer(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 999-foo\r\n\r\n")[0], 417)
        self.assertTrue(self.raw_exchange(b"GET / HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 "))
        self.assertEqual(self.count("syncs"), 0)

    def test_only_spaces_and_tabs_are_white_space_around_framing_values(self):
        body = b"5\r\n{\"a\"}\r\n0\r\n\r\n"
        for value in ("\x0bchunked", "\x0cchunked", "chunked\x0b", "\x85chunked"):
            with self.subTest(value=value):
                request = (f"POST {hr.DEFAULT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           f"Transfer-Encoding: {value}\r\n\r\n").encode("latin-1") + body
                status, error = self.one_answer(request)
                self.assertIn(status, (400, 501))
                self.assertIn("Transfer-Encoding", error)
        request = (f"POST {hr.DEFAULT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   f"Content-Length: \x0c2\r\n\r\n{{}}").encode("latin-1")
        self.assertEqual(self.one_answer(request), (400, "The Content-Length header is not a valid length."))
        self.assertEqual(self.count("syncs"), 0)
        request = (f"POST {hr.DEFAULT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   "Transfer-Encoding: \tchunked \r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n").encode()
        self.assertTrue(self.raw_exchange(request).startswith(b"HTTP/1.1 200 "))  # a tab and a space are white space

    def test_a_request_of_any_version_after_1_0_needs_a_host(self):
        for version in ("HTTP/1.1", "HTTP/1.2", "HTTP/1.9"):
            with self.subTest(version=version):
                status, error = self.one_answer(f"GET / {version}\r\n\r\n".encode())
                self.assertEqual(status, 400)
                self.assertIn("exactly one Host", error)
        self.assertTrue(self.raw_exchange(b"GET / HTTP/1.2\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                        .startswith(b"HTTP/1.1 "))

    def test_the_log_never_shows_a_key_in_a_query(self):
        self.request("GET", hr.DEFAULT_PATH + "?key=k1&Access-Token=k2&api_key&x=visible&token=k3")
        self.request("GET", "/nope?password=k4")
        log = self.log.getvalue()
        for secret in ("k1", "k2", "k3", "k4"):
            self.assertNotIn(secret, log)
        self.assertIn("?key=[redacted]&Access-Token=[redacted]&api_key&x=visible&token=[redacted]", log)


class EarlyAnswerTests(ServerTestCase):
    token = TOKEN
    max_body = 16 * hr.MIB

    def test_a_big_body_with_a_wrong_key_reads_401_not_a_reset(self):
        body = b" " * (5 * hr.MIB)
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{hr.DEFAULT_PATH}", data=body,
                                         headers={"Authorization": "Bearer wrong",
                                                  "Content-Type": "application/json"})
        with self.assertRaises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        self.assertEqual(caught.exception.code, 401)
        self.assertIn("wrong", json.loads(caught.exception.read())["error"])
        caught.exception.close()

    def test_the_401_says_what_is_wrong_and_what_is_expected(self):
        cases = {None: "Missing Authorization header; this receiver expects 'Authorization: Bearer <key>'.",
                 "Token " + TOKEN: "The Authorization header uses another scheme than Bearer; this receiver "
                                   "expects 'Authorization: Bearer <key>'.",
                 TOKEN + " x": "The Authorization header uses another scheme than Bearer; this receiver "
                               "expects 'Authorization: Bearer <key>'.",
                 TOKEN: "The Authorization header holds no scheme; this receiver expects "
                        "'Authorization: Bearer <key>'.",
                 "Basic " + TOKEN: "The Authorization header uses the scheme Basic; this receiver expects "
                                   "'Authorization: Bearer <key>'.",
                 "Bearer nope": "The key in the Authorization header is wrong."}
        for value, message in cases.items():
            with self.subTest(value=value):
                headers = {} if value is None else {"Authorization": value}
                status, _, answer = self.post(make_payload(), headers=headers)
                self.assertEqual((status, answer["error"]), (401, message))
        self.assertNotIn(TOKEN, self.log.getvalue())

    def test_ten_wrong_keys_from_one_address_get_429_for_a_minute(self):
        for _ in range(3 * hr.GUESS_LIMIT):  # no key at all (a browser's first request): never a guess
            self.assertEqual(self.request("GET", "/")[0], 401)
            self.assertEqual(self.request("GET")[0], 401)
        self.assertEqual(self.request("GET", headers={"Authorization": "Bearer " + TOKEN})[0], 200)
        for _ in range(hr.GUESS_LIMIT):
            self.assertEqual(self.request("GET", headers={"Authorization": "Bearer nope"})[0], 401)
        status, response, answer = self.request("GET", headers={"Authorization": "Bearer nope"})
        self.assert_error(status, 429, answer, "Too many wrong keys")
        self.assertLessEqual(int(response.getheader("Retry-After")), hr.GUESS_BLOCK)
        self.assertEqual(sum("wrong keys within" in line for line in self.log_lines()), 1)
        # The right key is never refused for others' wrong ones (a proxy's
        # clients share its address); nor is a browser's first request.
        self.assertEqual(self.post(make_payload(), headers={"Authorization": "Bearer " + TOKEN})[0], 200)
        self.assertEqual(self.request("GET", "/")[0], 401)
        # Another address is not affected.
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10, source_address=("127.0.0.2", 0))
        with contextlib.closing(conn):
            self.assertEqual(self.request("GET", headers={"Authorization": "Bearer " + TOKEN}, conn=conn)[0], 200)

    def test_a_flood_of_refused_requests_writes_nothing_and_a_bounded_log(self):
        self.server.refusals = hr.RefusalLog(most=5)
        for number in range(30):
            headers = {"Authorization": f"Bearer wrong-{number}"} if number % 3 else {"Content-Type": "text/plain"}
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10,
                                              source_address=(f"127.0.{number // 250}.{number % 250 + 2}", 0))
            with contextlib.closing(conn):
                self.assertIn(self.request("POST", body=make_payload(), headers=headers, conn=conn)[0], (401, 415))
        self.assertEqual(self.count("syncs"), 0)
        self.assert_nothing_stored()
        self.assertEqual(sum(" -> 4" in line for line in self.log_lines()), 5)

    def test_the_refusal_log_says_what_it_left_out(self):
        now = [0.0]
        log = hr.RefusalLog(clock=lambda: now[0], most=2, window=60)
        self.assertEqual([log.lines(f"r{n}") for n in range(4)], [["r0"], ["r1"], [], []])
        now[0] = 59.9
        self.assertEqual(log.lines("r4"), [])
        now[0] = 60.0
        self.assertEqual(log.lines("r5"), ["3 more refused requests in 60 s, not logged", "r5"])
        self.assertEqual(log.lines("r6"), ["r6"])

    def test_the_throttle_forgets_and_stays_bounded(self):
        now = [1000.0]
        throttle = hr.GuessThrottle(clock=lambda: now[0])
        for _ in range(hr.GUESS_LIMIT - 1):
            self.assertFalse(throttle.failed("a"))
        now[0] += hr.GUESS_WINDOW  # the old failures fall out of the window
        self.assertFalse(throttle.failed("a"))
        self.assertEqual(throttle.retry_after("a"), 0)
        for _ in range(hr.GUESS_LIMIT - 1):
            throttle.failed("b")
        self.assertTrue(throttle.failed("b"))
        self.assertEqual(throttle.retry_after("b"), hr.GUESS_BLOCK)
        now[0] += hr.GUESS_BLOCK
        self.assertEqual(throttle.retry_after("b"), 0)
        for number in range(hr.GUESS_ADDRESSES_MAX + 100):
            throttle.failed(f"10.0.{number // 256}.{number % 256}")
        self.assertLessEqual(throttle.remembered, hr.GUESS_ADDRESSES_MAX)
        for number in range(hr.GUESS_ADDRESSES_MAX + 100):  # as many blocked: bounded too, oldest forgotten
            for _ in range(hr.GUESS_LIMIT):
                throttle.failed(f"10.1.{number // 256}.{number % 256}")
        self.assertLessEqual(throttle.remembered, 2 * hr.GUESS_ADDRESSES_MAX)
        self.assertEqual(throttle.retry_after("10.1.0.0"), 0)
        self.assertEqual(throttle.retry_after(f"10.1.16.{hr.GUESS_ADDRESSES_MAX + 99 - 16 * 256}"), hr.GUESS_BLOCK)


class ReadsWithoutAKeyTests(ServerTestCase):
    """Without a key, health data is shown to this machine only."""

    def exchange_from(self, address, request):
        """The real handler and server, told that ``address`` sent the request."""
        return drive(self.server, request, address)

    def test_pages_answer_loopback_only(self):
        for path in ("/", hr.SUMMARY_PATH):
            with self.subTest(path=path):
                self.assertEqual(self.request("GET", path)[0], 200)
                answer = self.exchange_from("192.0.2.10", f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), answer[:100])
                self.assertIn(b"without a key", answer)
        answer = self.exchange_from("192.0.2.10", f"GET {hr.DEFAULT_PATH} HTTP/1.1\r\nHost: 192.0.2.1:3000\r\n\r\n"
                                    .encode())
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:100])  # the app's Test Connection

    def test_pages_answer_only_under_this_machines_own_names(self):
        self.post(make_payload())
        reads = ("/", hr.SUMMARY_PATH, hr.LATEST_PATH, hr.METRICS_PATH, "/type/HeartRate.csv?range=all",
                 f"{hr.SERIES_PATH}?type=HeartRate")
        for path in reads:
            for host, status in (("attacker.example", 403), ("attacker.example:3000", 403), ("127.0.0.1.nip.io", 403),
                                 (f"localhost:{self.port}", 200), ("127.0.0.1", 200), ("[::1]:3000", 200),
                                 ("app.localhost", 200), ("LOCALHOST.", 200)):
                with self.subTest(path=path, host=host):
                    answered, _, body = self.request("GET", path, headers={"Host": host})
                    self.assertEqual(answered, status, body)
                    if status == 403:
                        self.assertIn("own names", body["error"])
        self.assertNotIn("HKQuantity", self.raw_exchange(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n").decode())
        self.server.config.allowed_hosts = ("health.example",)
        self.assertEqual(self.request("GET", "/", headers={"Host": "Health.Example:3000"})[0], 200)
        self.assertEqual(self.request("GET", "/", headers={"Host": "other.example"})[0], 403)
        args = hr.serve_parser().parse_args(["--no-auth", "--allowed-host", "Health.Example., b.example"])
        self.assertEqual(args.allowed_host, ("health.example", "b.example"))

    def test_the_apps_endpoint_answers_under_an_ip_address_or_this_machines_names_only(self):
        syncs = self.count("syncs")
        for method, body in (("GET", None), ("POST", make_payload())):
            for host in ("attacker.example", f"attacker.example:{self.port}", "127.0.0.1.nip.io", "phone.local"):
                with self.subTest(method=method, host=host):
                    answered, _, answer = self.request(method, headers={"Host": host}, body=body)
                    self.assert_error(answered, 403, answer, "--allowed-host")
                    self.assertNotIn("totals", answer)
            self.assertEqual(self.count("syncs"), syncs)  # nothing forged was stored
            for host in ("192.168.1.20", f"192.168.1.20:{self.port}", "[fe80::1]:3000", "fe80::1", "10.0.0.5.",
                         "localhost", f"127.0.0.1:{self.port}", "[::1]"):
                with self.subTest(method=method, host=host):
                    self.assertEqual(self.request(method, headers={"Host": host}, body=body)[0], 200)
        self.server.config.allowed_hosts = ("phone.local",)
        self.assertEqual(self.request("POST", headers={"Host": "Phone.Local:3000"}, body=make_payload())[0], 200)

    def test_loopback_addresses(self):
        for address in ("127.0.0.1", "127.8.9.10", "::1", "localhost", "::ffff:127.0.0.1"):
            self.assertTrue(hr.is_loopback(address), address)
        for address in ("192.0.2.10", "10.0.0.1", "::", "0.0.0.0", "", "example.org"):
            self.assertFalse(hr.is_loopback(address), address)


class BoundedPageTests(ServerTestCase):
    max_body = 64 * hr.MIB

    def connection(self, timeout=600):
        # Seconds of work per request, many more on a busy machine.
        return super().connection(timeout)

    def test_fifty_thousand_types_keep_the_page_small(self):
        data = {f"T{i:05d}": [element(f"S-{i}")] for i in range(50000)}
        data["T00001"].append(element("S-extra"))
        status, _, answer = self.post({"data": data})
        self.assertEqual(status, 200, answer)
        status, _, page = self.request("GET", "/")
        self.assertEqual(status, 200)
        self.assertLess(len(page), 200000)
        self.assertIn(f"and {50000 - hr.PAGE_TYPES_MAX:,} more types", page.decode())
        self.assertIn(">T00001<", page.decode())  # the largest type is listed
        status, _, facts = self.request("GET", hr.SUMMARY_PATH)
        self.assertEqual((len(facts["types"]), facts["more_types"]), (hr.PAGE_TYPES_MAX, 50000 - hr.PAGE_TYPES_MAX))
        code, out, _ = run_main("stats", "--db", self.db, "--json")
        self.assertEqual(len(json.loads(out)["types"]), 50000)


class BearerAuthTests(ServerTestCase):
    token = TOKEN

    def test_right_key(self):
        headers = {"Authorization": "Bearer " + TOKEN}
        self.assertEqual(self.post(make_payload(), headers=headers)[0], 200)
        self.assertEqual(self.request("GET", headers=headers)[0], 200)

    def test_wrong_and_missing_key(self):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + TOKEN},
                        {"Authorization": "Bearer " + TOKEN + "x"}, {"X-API-Key": TOKEN}):
            for method in ("POST", "GET"):
                with self.subTest(headers=headers, method=method):
                    body = make_payload() if method == "POST" else None
                    status, response, answer = self.request(method, body=body, headers=headers)
                    self.assert_error(status, 401, answer)
                    self.assertTrue(response.getheader("WWW-Authenticate").startswith("Bearer"))
        self.assert_nothing_stored()
        self.assertEqual(self.count("syncs"), 0)  # a request without the key writes nothing

    def test_wrong_key_is_refused_before_the_body_is_read(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall("POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer nope\r\n"
                         "Content-Length: 10000000\r\n\r\n".format(hr.DEFAULT_PATH).encode())
            self.assertTrue(sock.recv(65536).startswith(b"HTTP/1.1 401 "))

    def test_token_never_reaches_logs_or_tables(self):
        self.post(make_payload(), headers={"Authorization": "Bearer " + TOKEN})
        self.post(make_payload(), headers={"Authorization": "Bearer " + TOKEN[:-1]})
        self.post(b"{broken", headers={"Authorization": "Bearer " + TOKEN})
        self.request("GET", headers={"Authorization": "Bearer " + TOKEN})
        self.assertNotIn(TOKEN[:-1], self.log.getvalue())
        self.assertTrue(self.log.getvalue())
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                for row in conn.execute("SELECT * FROM " + table):
                    self.assertNotIn(TOKEN[:-1], repr(row), table)
        self.assertNotIn(TOKEN, repr(self.config))


class CustomHeaderAuthTests(ServerTestCase):
    token = TOKEN
    auth_header = "X-API-Key"

    def test_right_wrong_missing(self):
        self.assertEqual(self.post(make_payload(), headers={"X-API-Key": TOKEN})[0], 200)
        self.assertEqual(self.request("GET", headers={"x-api-key": TOKEN})[0], 200)
        for headers in ({}, {"X-API-Key": "nope"}, {"Authorization": "Bearer " + TOKEN}):
            for method in ("POST", "GET"):
                with self.subTest(headers=headers, method=method):
                    status, response, answer = self.request(
                        method, body=make_payload(tag="Z") if method == "POST" else None, headers=headers)
                    self.assert_error(status, 401, answer, "X-API-Key")
        self.assertEqual(self.count("workouts"), 1)


class NoAuthTests(ServerTestCase):

    def test_anyone_may_post_and_get(self):
        self.assertEqual(self.post(make_payload(), headers={"Authorization": "Bearer whatever"})[0], 200)
        self.assertEqual(self.request("GET")[0], 200)


class HttpValidatorTests(unittest.TestCase):

    def test_content_length_limits(self):
        self.assertEqual(hr.check_content_length(["100"], 100), 100)
        self.assertEqual(hr.check_content_length(["0"], 100), 0)
        self.assertEqual(hr.check_content_length(["7", "7"], 100), 7)
        self.assertEqual(hr.check_content_length(["7, 7"], 100), 7)
        cases = {(): 411, ("101",): 413, ("",): 400, ("-1",): 400, ("1e3",): 400, ("abc",): 400,
                 ("5", "6"): 400, ("5, 6",): 400, ("\u0661",): 400}
        for values, status in cases.items():
            with self.subTest(values=values):
                with self.assertRaises(hr.ClientError) as caught:
                    hr.check_content_length(list(values), 100)
                self.assertEqual(caught.exception.status, status)

    def test_content_type(self):
        for value in (None, "", "application/json", "Application/JSON; charset=utf-8", "application/vnd.x+json"):
            hr.check_content_type(value)
        for value in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            with self.assertRaises(hr.ClientError) as caught:
                hr.check_content_type(value)
            self.assertEqual(caught.exception.status, 415)

    def test_keys_identify_whom_a_key_names(self):
        keys = hr.Keys.single("k")
        self.assertTrue(keys.required)
        self.assertFalse(hr.Keys.single(None).required)
        self.assertFalse(hr.ReceiverConfig().keys.required)
        self.assertEqual(keys.identify({"Authorization": "Bearer k"}), hr.OWNER)
        self.assertEqual(keys.identify({"Authorization": "bearer  k "}), hr.OWNER)
        basic = {"Authorization": "Basic " + base64.b64encode(b"anyone:k").decode()}
        self.assertIsNone(keys.identify(basic))
        self.assertEqual(keys.identify(basic, login=True), hr.OWNER)
        for headers in ({}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": "Bearer kk"},
                        {"Authorization": "Basic " + base64.b64encode(b"k:kk").decode()}, {"X-API-Key": "k"}):
            with self.subTest(headers=headers):
                self.assertIsNone(keys.identify(headers, login=True))
                self.assertEqual(keys.app_refusal(headers).status, 401)
        custom = hr.Keys.single("k", "X-API-Key")
        self.assertEqual(custom.identify({"X-API-Key": " k "}), hr.OWNER)
        self.assertIsNone(custom.identify({"Authorization": "Bearer k"}))
        self.assertIn("Missing X-API-Key", custom.app_refusal({}).message)
        self.assertIn("is wrong", custom.app_refusal({"X-API-Key": "x"}).message)
        two = hr.Keys([("k1", hr.Identity("ann")), ("k2", hr.Identity("bob"))])
        self.assertEqual(two.identify({"Authorization": "Bearer k2"}), hr.Identity("bob"))
        self.assertNotIn("k1", repr(two) + repr(hr.ReceiverConfig(keys=two)))


#: Certificates only read for their names: subjectAltName with two DNS names
#: (one a wildcard) and two addresses; a common name and no subjectAltName.
NAMED_CERT = """-----BEGIN CERTIFICATE-----
MIIB/TCCAaOgAwIBAgIUdW7IvBYaC1Glgh8osA5R0AHS1UUwCgYIKoZIzj0EAwIw
LzEQMA4GA1UECgwHRXhhbXBsZTEbMBkGA1UEAwwSaGVhbHRoLmV4YW1wbGUubmV0
MCAXDTI2MTIwMTE3MDMzMVoYDzIxMjYxMTA3MTcwMzMxWjAvMRAwDgYDVQQKDAdF
eGFtcGxlMRswGQYDVQQDDBJoZWFsdGguZXhhbXBsZS5uZXQwWTATBgcqhkjOPQIB
BggqhkjOPQMBBwNCAAS32eZmkB8bAxJPbvxYHZ8PZekoc8k3ev6TuSf9HL9T4V5U
iepTQmSnIAU8qn452+4dptvdXXT8kaadQwKMVsB4o4GaMIGXMB0GA1UdDgQWBBSc
wmydF26xB88fRKZESKFdGbhhLjAfBgNVHSMEGDAWgBScwmydF26xB88fRKZESKFd
GbhhLjAPBgNVHRMBAf8EBTADAQH/MEQGA1UdEQQ9MDuCEmhlYWx0aC5leGFtcGxl
Lm5ldIINKi5leGFtcGxlLm9yZ4cEwAACB4cQIAENuAAAAAAAAAAAAAAAATAKBggq
hkjOPQQDAgNIADBFAiEA9ClL21q4zWVyC8S3kJP374v6TpiZnHDtfUwvSj1ZuSsC
IHvKkcjDOUKgUdrE5QETLA3wXtdP0ihOLN8FDlgsd8n8
-----END CERTIFICATE-----
"""
COMMON_NAME_CERT = """-----BEGIN CERTIFICATE-----
MIIBgzCCASmgAwIBAgIUR2/dMJn35Em/fQYYykuopon+BRowCgYIKoZIzj0EAwIw
GTEXMBUGA1UEAwwOcGkuZXhhbXBsZS5jb20wIBcNMjYxMjAxMTcwMzMxWhgPMjEy
NjExMDcxNzAzMzFaMBkxFzAVBgNVBAMMDnBpLmV4YW1wbGUuY29tMFkwEwYHKoZI
zj0CAQYIKoZIzj0DAQcDQgAEQAPoGAVC1rfbKOQ8B5S+4tYKTqcqeuLcx+7Bd5OP
rRQ0JbBKVexLhbOsMsYQde2A/S3atl3+LpQ+MjlxJ3mSBKNNMEswHQYDVR0OBBYE
FEIy+ss1RoSTHxVvflW1FHv5Uz2vMB8GA1UdIwQYMBaAFEIy+ss1RoSTHxVvflW1
FHv5Uz2vMAkGA1UdEwQCMAAwCgYIKoZIzj0EAwIDSAAwRQIhAO11lbZaUtIWqg1q
g06YQxh9h7pp2wP/oEImOa6hFooLAiBC4qpmV0VpJsOsLMP5mO2Awubdp4EETFCH
mEtVOVMMgw==
-----END CERTIFICATE-----
"""

TEST_CERT = """-----BEGIN CERTIFICATE-----
MIIDJzCCAg+gAwIBAgIUD8iKCownXm075xRsIP4u22gS1S0wDQYJKoZIhvcNAQEL
BQAwFDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyNTA5MjUxM1oYDzIxMjYx
MTAxMDkyNTEzWjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwggEiMA0GCSqGSIb3DQEB
AQUAA4IBDwAwggEKAoIBAQDUX07WHMymIvz0j+vMs/vPHx0tj8Zs2Y06hUs5C1UD
GoP7m6VmKmPJiNBDiMt9Yc+6R2PBOCGr1119vMnKWsHy/yyvR2wEpjNcRbI737My
X38z1rEVFWbmvu+oF/sEHP4QZSyQ86Hx3+09RI7fmi5FWrKLWCQSBrOFrzJ0CXta
sXauhR/9ukHQxQIdV9qWNBB/8WKcz8nUtBV0QgTP033jtAkoMt4ZY8R2f9lK+Wy+
MpwLJP22oxRk+vCKddHv8FQAKcWFdoR0ILI5fJnXNa85/gYs/lBpbSiHBl6MVFg1
/nBvHR5aOx8eRHVr810udShOqc14Q6k5rG7ysjYhM4N3AgMBAAGjbzBtMB0GA1Ud
DgQWBBRlxtiKiTDGgnbL8EBEjqpjDr4kUDAfBgNVHSMEGDAWgBRlxtiKiTDGgnbL
8EBEjqpjDr4kUDAPBgNVHRMBAf8EBTADAQH/MBoGA1UdEQQTMBGCCWxvY2FsaG9z
dIcEfwAAATANBgkqhkiG9w0BAQsFAAOCAQEAPzHC2w4NAq4cQ7oKjZ5dfyv/t2Gx
rItYf1OfGYotrcJFyBNcGTBcBIyST1Hqj/3FjogEfA//VCT0/B0ZxIwctek6IsY2
+TP7XUJZt0lTOsmZXpBDA7OVYM55ubs2P6fCLpoo6uSVo2vooN2xbo83Tv6BZanp
mLRVhtC1QnD1b0KWh5ePqVozLVUctQTf39Da8yy6xbs0EeBsxBRhDzUC0XPhJhur
EdvFmfpoGF7cQeFWspkVEmFS2/5FZphsTx85SMPPkzdk3kdx2Tzl56YfpGGtzPut
Yysf1WhZwx9t9LHxi+zLUMO8qogjhV9ruSDlzOeKMNuyPUSx227nT6qetA==
-----END CERTIFICATE-----
"""


TEST_KEY = """-----BEGIN PRIVATE KEY-----
MIIEuwIBADANBgkqhkiG9w0BAQEFAASCBKUwggShAgEAAoIBAQDUX07WHMymIvz0
j+vMs/vPHx0tj8Zs2Y06hUs5C1UDGoP7m6VmKmPJiNBDiMt9Yc+6R2PBOCGr1119
vMnKWsHy/yyvR2wEpjNcRbI737MyX38z1rEVFWbmvu+oF/sEHP4QZSyQ86Hx3+09
RI7fmi5FWrKLWCQSBrOFrzJ0CXtasXauhR/9ukHQxQIdV9qWNBB/8WKcz8nUtBV0
QgTP033jtAkoMt4ZY8R2f9lK+Wy+MpwLJP22oxRk+vCKddHv8FQAKcWFdoR0ILI5
fJnXNa85/gYs/lBpbSiHBl6MVFg1/nBvHR5aOx8eRHVr810udShOqc14Q6k5rG7y
sjYhM4N3AgMBAAECgf8M27hqPlQluviV1iDww/T7FWcu2wWokYN7h5aGXalIBtL2
6PWaufZQvXfenumzLbjmDmx7xmpDfUar1kJhfh1AGTMbabegkG+Lpqyj82dmJWIO
QXF3VVRlpCneg5UvKpI3a+jG3flwK56xlvUPlMY4bMViqnOEo+M6tODZJbnSQ9At
wwoH1t0aZWC7QJyeUDLGbhLPyMGCyHRnOwixa7QQT8e2SLjEqTYCpxA88gAdZsKk
JRRQCy65EkFyHCFqRUm1qVL251Z99GeFs47e7KEVzqg0dGSY4SbbfLKaH2Jhtz9c
jzSN7g46YOFMPWXBq+q1VLzfEi+FtKuQoe3tet0CgYEA7mgN+UFXZE3fQqgwYni2
T8QPMfHyKof7xsH2lSIAe/8Zcypf+CtaUHqkKBWtIM0HU5kUvw0vpMJUniP/EBBn
lOxWPDvG5mRkntulnEbnIA9DtqyFmq1g0CAatAe5x4Q+uoqXkPWu/Zs4xZ+zQOTI
s2fDUu0h9nVF1mSRHgBN5zsCgYEA5AtrSzIBg5+j/2q+tA42dPOSHCkWUBqHU+DI
WCpxnw2lbE9YHt91JtTSNySjMiyYsxjKia+tUnUqzf1UdyM7EfvjfvNYCyOtRUuT
mUZGTPH4X9E1B3V72J5u4tonLYbOF7YpnAd5zFKWScpFJJsdNNJKdzNzVmMZGDaM
ir9MKPUCgYEAqm6CxtTaZ99votRfupW3J3Dut/LR/2u1J1LUN6rWE867X+RENUKw
zuXN4sYUPWW1PiMqfKYtkChIm8D5/37qvcDyqR7Gwz+z2wkE7KKXagjfjIDrBje6
BS9eR6NaQXKd8XdQgRXR4oUL4eOYHuUvQWoFbYwOgoU1xt2gDIWFK68CgYBNjPCU
5tGLAGwV/SgTNU4hoX9LolFbNlpVFPksumpfS5W46pauERHW/cLrS8NP2cioB0NB
ZYPMqdm/qWnjBhEdgYqQ7pI/X4eaLCRqmHJp0lPDyfJ9sd9HAEH3VXbDTbeiaqll
zUkHSgKf33B6DWH2R5lZRh7v/s1W5Z4PxRRSTQKBgH2oot4hi4GeCV5bh7dRjmHW
Ci1kT2vhPXw+UokYh2qgeeoP01KnNTn60n87o1HVROgZY2CM3a6oyTAoh/uVjcdN
T2x48PQGEcHwUKw1PlB+zfqSOm1P3ziRQQ+my+83ayPKCBT+ziAbLoZqoG9CeY/r
MENFQiZHilCJ+B0ublyi
-----END PRIVATE KEY-----
"""


class TlsTests(ServerTestCase):

    def server_options(self):
        self.cert_file = os.path.join(self.tmp.name, "cert.pem")
        self.key_file = os.path.join(self.tmp.name, "key.pem")
        with open(self.cert_file, "w") as handle:
            handle.write(TEST_CERT)
        with open(self.key_file, "w") as handle:
            handle.write(TEST_KEY)
        return {"tls_cert": self.cert_file, "tls_key": self.key_file}

    def connection(self, timeout=10):
        context = ssl.create_default_context(cafile=self.cert_file)
        return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=context)

    def test_https_post_and_get_with_verified_certificate(self):
        status, _, answer = self.post(make_payload())
        self.assertEqual(status, 200, answer)
        self.assertEqual(self.request("GET")[0], 200)
        self.assertEqual(self.count("workouts"), 1)

    def test_plain_http_on_the_tls_port_gets_an_answer_a_person_reads(self):
        [(status, head, body)] = answers(self.raw_exchange(b"GET /api/health-data HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
        self.assertEqual((status, head["Connection"]), (400, "close"))
        self.assertIn("use https://", json.loads(body)["error"])
        self.assertEqual(self.request("GET")[0], 200)
        self.assertIn("plain HTTP sent to the HTTPS port", self.log.getvalue())
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"\x16\x03\x01\x00\x05hello")  # a broken handshake is still logged as one
            self.assertNotIn(b"HTTP/1.1", b"".join(iter(lambda: sock.recv(100), b"")))  # a TLS alert, if any
        wait_until(lambda: "TLS handshake failed" in self.log.getvalue())

    def test_banner_gives_the_urls_the_certificate_was_made_for(self):
        lines = hr.banner_lines(self.config, self.port)
        self.assertIn(f"Listening on https://127.0.0.1:{self.port}", lines)
        self.assertIn("Certificate made for: localhost, 127.0.0.1", lines)
        self.assertIn(f"Server URL for Health Export Pro: https://localhost:{self.port}  or  "
                      f"https://127.0.0.1:{self.port}", lines)
        for text, names, urls in ((NAMED_CERT, ["health.example.net", "*.example.org", "192.0.2.7", "2001:db8::1"],
                                   "https://health.example.net:8443  or  https://192.0.2.7:8443  or  "
                                   "https://[2001:db8::1]:8443"),
                                  (TEST_KEY + COMMON_NAME_CERT, ["pi.example.com"], "https://pi.example.com:8443")):
            with self.subTest(names=names):
                with open(self.cert_file, "w") as handle:
                    handle.write(text)
                self.assertEqual(hr.certificate_names(self.cert_file), names)
                lines = hr.banner_lines(dataclasses.replace(self.config, host="0.0.0.0"), 8443)
                self.assertIn(f"Server URL for Health Export Pro: {urls}", lines)
        for text in (TEST_KEY, "", TEST_CERT[:80] + "\n-----END CERTIFICATE-----", "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"):
            with open(self.cert_file, "w") as handle:
                handle.write(text)
            self.assertEqual(hr.certificate_names(self.cert_file), [])
        lines = hr.banner_lines(self.config, self.port)
        self.assertIn(f"Certificate made for: no name found in {self.cert_file} (the app accepts only a URL with one "
                      f"of its names)", lines)

    def test_missing_or_bad_certificate_is_a_clear_startup_error(self):
        for cert, key in ((os.path.join(self.tmp.name, "missing.pem"), self.key_file),
                          (self.key_file, self.key_file), (self.cert_file, self.cert_file)):
            with self.subTest(cert=cert, key=key):
                with contextlib.redirect_stderr(io.StringIO()) as err:
                    code = hr.main(["--host", "127.0.0.1", "--port", "0", "--db", self.db,
                                    "--tls-cert", cert, "--tls-key", key])
                self.assertEqual(code, 2)
                self.assertEqual(len(err.getvalue().strip().splitlines()), 1, err.getvalue())
                self.assertIn("TLS", err.getvalue())
                self.assertNotIn("Traceback", err.getvalue())


def chunked(body, size=1000):
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                    for i in range(0, len(body), size)) + b"0\r\n\r\n"


def post_head(length=None, extra=""):
    head = f"POST {hr.DEFAULT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return (head + extra + "\r\n").encode()


class BodyEncodingTests(ServerTestCase):

    def test_chunked_and_gzip_bodies_arriving_a_byte_at_a_time(self):
        for tag, extra in (("P", ""), ("Q", "Content-Encoding: gzip\r\n")):
            with self.subTest(encoding=extra or "identity"):
                body = encode(make_payload(n=5, tag=tag))
                data = gzip.compress(body) if extra else body
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.sendall(post_head(extra="Transfer-Encoding: chunked\r\n" + extra))
                    for i in range(len(data)):
                        sock.sendall(b"1\r\n" + data[i:i + 1] + b"\r\n")
                    sock.sendall(b"0\r\n\r\n")
                    response = http.client.HTTPResponse(sock)
                    response.begin()
                    answer = json.loads(response.read())
                self.assertEqual((response.status, answer["count"]), (200, 15))
                self.assertEqual(self.query("SELECT count(*) FROM samples WHERE uuid LIKE ?", (tag + "-%",)),
                                 [(10,)])

    def test_chunked_body(self):
        body = encode(make_payload(n=20))
        answer = self.raw_exchange(post_head(extra="Transfer-Encoding: chunked\r\nConnection: close\r\n")
                                   + chunked(body))
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:200])
        self.assertEqual(self.count("samples"), 41)

    def test_chunked_body_with_http_client(self):
        conn = self.connection()
        with contextlib.closing(conn):
            body = encode(make_payload(n=5))
            conn.request("POST", hr.DEFAULT_PATH, body=iter([body[:100], body[100:]]),
                         headers={"Content-Type": "application/json"}, encode_chunked=True)
            self.assertEqual(conn.getresponse().status, 200)

    def test_chunked_over_the_limit_413_without_reading_further(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(post_head(extra="Transfer-Encoding: chunked\r\n"))
            sock.sendall(b"%x\r\n" % (self.max_body + 1))  # one chunk announcing more than the limit
            answer = sock.recv(65536)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assert_nothing_stored()

    def test_chunked_crossing_the_limit_in_many_chunks(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(post_head(extra="Transfer-Encoding: chunked\r\n"))
            piece = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
            answer = b""
            with contextlib.suppress(ConnectionError):
                for _ in range(self.max_body // 65536 + 1):
                    sock.sendall(piece)
                answer = sock.recv(65536)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)

    def test_malformed_chunk_framing_400(self):
        for framing in (b"zz\r\n{}\r\n0\r\n\r\n", b"2\r\n{}XX0\r\n\r\n", b"-2\r\n{}\r\n0\r\n\r\n",
                        b"0x2\r\n{}\r\n0\r\n\r\n", b"0_2\r\n{}\r\n0\r\n\r\n"):
            with self.subTest(framing=framing):
                answer = self.raw_exchange(post_head(extra="Transfer-Encoding: chunked\r\n") + framing)
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
                self.assertIn(b"chunked", answer)

    def test_gzip_and_deflate_bodies(self):
        body = encode(make_payload(n=30))
        for tag, encoding, data in (("G", "gzip", gzip.compress(encode(make_payload(n=30, tag="G")))),
                                    ("Z", "deflate", zlib.compress(encode(make_payload(n=30, tag="Z")))),
                                    ("R", "deflate", raw_deflate(encode(make_payload(n=30, tag="R"))))):
            with self.subTest(encoding=encoding, tag=tag):
                status, _, answer = self.post(data, headers={"Content-Encoding": encoding})
                self.assertEqual(status, 200, answer)
                self.assertEqual(answer["inserted"]["workouts"], 1)
        self.assertLess(len(gzip.compress(body)), self.max_body)

    def test_gzip_bomb_stops_at_the_limit(self):
        bomb = gzip.compress(b" " * (64 * hr.MIB), 9)  # about 64 KB inflating to 64 MB
        status, _, answer = self.post(bomb, headers={"Content-Encoding": "gzip"})
        self.assert_error(status, 413, answer, "decompressed")
        self.assert_nothing_stored()

    def test_corrupt_and_truncated_gzip_400(self):
        good = gzip.compress(encode(make_payload()))
        corrupt = good[:20] + bytes(b ^ 0xFF for b in good[20:40]) + good[40:]
        for data in (corrupt, good[:-12], b"not gzip at all"):
            with self.subTest(size=len(data)):
                status, _, answer = self.post(data, headers={"Content-Encoding": "gzip"})
                self.assert_error(status, 400, answer, "gzip")
        self.assert_nothing_stored()

    def test_a_gzip_body_of_several_members_is_read_whole_and_bytes_after_a_body_are_an_error(self):
        body = encode(make_payload(n=30, tag="M"))
        cut = body.index(b'"HKQuantityTypeIdentifierStepCount"')
        members = gzip.compress(body[:cut]) + gzip.compress(body[cut:])
        status, _, answer = self.post(members, headers={"Content-Encoding": "gzip"})
        self.assertEqual((status, answer.get("count")), (200, 65), answer)
        self.assertEqual(self.count("samples"), 61)
        tagged = encode(make_payload(n=3, tag="N"))
        for encoding, data, said in (("gzip", gzip.compress(tagged) + b"garbage after the member", "corrupt"),
                                     ("deflate", zlib.compress(tagged) + b"X", "after its end"),
                                     ("deflate", raw_deflate(tagged) + zlib.compress(b"more"), "after its end")):
            with self.subTest(encoding=encoding, data=data[-10:]):
                status, _, answer = self.post(data, headers={"Content-Encoding": encoding})
                self.assert_error(status, 400, answer, said)
        self.assertEqual(self.query("SELECT count(*) FROM samples WHERE uuid LIKE 'N-%'"), [(0,)])

    def test_unknown_encoding_415(self):
        status, _, answer = self.post(b"{}", headers={"Content-Encoding": "br"})
        self.assert_error(status, 415, answer, "br")


def raw_deflate(data):
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


class ExpectContinueTests(ServerTestCase):
    token = TOKEN

    def exchange_head(self, head):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(head)
            return sock.recv(65536), sock

    def test_bad_key_gets_401_without_continue(self):
        answer, _ = self.exchange_head(post_head(100, "Expect: 100-continue\r\nAuthorization: Bearer no\r\n"))
        self.assertTrue(answer.startswith(b"HTTP/1.1 401 "), answer)
        self.assertNotIn(b"100 Continue", answer)

    def test_oversize_gets_413_without_continue(self):
        answer, _ = self.exchange_head(post_head(
            self.max_body + 1, f"Expect: 100-continue\r\nAuthorization: Bearer {TOKEN}\r\n"))
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertNotIn(b"100 Continue", answer)

    def test_good_request_gets_continue_then_200(self):
        body = encode(make_payload())
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(post_head(len(body), f"Expect: 100-continue\r\nAuthorization: Bearer {TOKEN}\r\n"))
            interim = sock.recv(65536)
            self.assertEqual(interim, b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(body)
            final = sock.recv(65536)
        self.assertTrue(final.startswith(b"HTTP/1.1 200 "), final)
        self.assertEqual(self.count("workouts"), 1)


class HeaderLimitTests(ServerTestCase):

    def test_oversized_header_line(self):
        answer = self.raw_exchange(post_head(2, f"X-Big: {'a' * 70000}\r\n") + b"{}")
        self.assertRegex(answer[:13], rb"HTTP/1.1 (431|400) ")
        self.assertEqual(self.request("GET")[0], 200)

    def test_too_many_headers(self):
        extra = "".join(f"X-H{i}: v\r\n" for i in range(150))
        answer = self.raw_exchange(post_head(2, extra) + b"{}")
        self.assertRegex(answer[:13], rb"HTTP/1.1 (431|400) ")

    def test_invalid_content_length(self):
        for value in ("-1", "abc", "1.5", "12, 13"):
            with self.subTest(value=value):
                answer = self.raw_exchange(post_head(value) + b"{}")
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        answer = self.raw_exchange(post_head(2, "Content-Length: 3\r\n") + b"{} ")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        self.assert_nothing_stored()


class SlowClientTests(ServerTestCase):
    timeout = 0.5

    def test_idle_connection_is_closed(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            self.assertEqual(sock.recv(100), b"")  # closed by the server, well before our own 5 s

    def test_stalled_body_gets_408_and_others_are_served(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(post_head(1000) + b'{"data": {')
            # Meanwhile another client is served.
            self.assertEqual(self.request("GET")[0], 200)
            answer = sock.recv(65536)
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
        self.assertIn(b"Connection: close", answer)
        self.assert_nothing_stored()

    def test_dripping_body_hits_the_total_deadline(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(post_head(200000))
            answer = b""
            deadline = time.monotonic() + 8
            with contextlib.suppress(ConnectionError):
                while time.monotonic() < deadline and not answer:
                    sock.sendall(b" ")
                    sock.settimeout(0.2)
                    with contextlib.suppress(socket.timeout):
                        answer = sock.recv(65536)
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)


class HeaderDeadlineTests(ServerTestCase):
    """--timeout bounds a request's headers together, not each line."""

    timeout = 1.0

    def test_headers_dripping_in_are_cut_off(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            for number in range(40):  # a line every 0.3 s: each within the timeout, all of them not
                time.sleep(0.3)
                if select.select([sock], [], [], 0)[0] and not sock.recv(100):
                    break  # closed by the server
                with contextlib.suppress(OSError):
                    sock.sendall(b"X-Drip: %d\r\n" % number)
            else:
                self.fail("the connection stayed open for 40 header lines")
        self.assertEqual(self.request("GET")[0], 200)  # and the server goes on


class StalledClientTests(ServerTestCase):
    """A slow client costs a thread and its own temporary file, nothing more."""

    max_tmp = 512 * 1024
    timeout = 30.0  # the stalled bodies must outlive the test, however busy the machine

    def test_a_hundred_stalled_bodies_do_not_hold_up_a_real_sync(self):
        stalled = []
        try:
            for _ in range(100):
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                stalled.append(sock)
                sock.sendall(post_head(1000) + b"{")
            wait_until(lambda: self.request("GET")[2]["ingests_in_progress"] == 100)
            status, _, answer = self.post(make_payload(n=200))
            self.assertEqual(status, 200, answer)
            self.assertEqual(self.count("samples"), 401)
            # The real sync is finished; the stalled ones are still there.
            wait_until(lambda: self.request("GET")[2]["ingests_in_progress"] == 100)
        finally:
            for sock in stalled:
                sock.close()

    def test_temporary_disk_is_bounded(self):
        status, response, answer = self.post(make_payload(n=2000))
        self.assert_error(status, 503, answer, "--max-tmp-mb")
        self.assertEqual(response.getheader("Retry-After"), str(hr.RETRY_AFTER))
        self.assert_nothing_stored()
        self.assertEqual(self.query("SELECT status FROM syncs"), [("failed",)])
        self.assertEqual(self.post(make_payload(n=3))[0], 200)
        self.assertEqual(self.stage_files(), [])

    def stage_files(self):
        return [name for name in os.listdir(self.tmp.name) if name.endswith(".stage")]


class LongIngestTests(ServerTestCase):

    def test_status_is_never_blocked_behind_an_ingest(self):
        results = []
        with self.store.writer():  # an ingest in progress, as far as the others can tell
            poster = threading.Thread(target=lambda: results.append(self.post(make_payload())[0]))
            poster.start()
            status, _, answer = self.request("GET")
            self.assertEqual(status, 200)
            self.assertEqual(results, [])
        poster.join()
        self.assertEqual(results, [200])


# ---------------------------------------------------------------------------
# Command line: serve, stats, export, import
# ---------------------------------------------------------------------------

class CommandLineTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def serve_in_thread(self, argv, environ=None):
        """Run main()'s serve path in a thread; return (server, thread, out)."""
        out = io.StringIO()
        ready = threading.Event()
        holder = {}

        def run():
            args = hr.serve_parser().parse_args(argv)
            config = hr.config_from_args(args, environ or {})
            config.log_stream = io.StringIO()

            def on_ready(server):
                holder["server"] = server
                ready.set()

            holder["code"] = hr.serve(config, out, ready=on_ready)

        thread = threading.Thread(target=run)
        thread.start()
        self.assertTrue(ready.wait(10))
        return holder, thread, out

    def test_banner_and_clean_stop(self):
        db = os.path.join(self.tmp.name, "h.db")
        holder, thread, out = self.serve_in_thread(["--host", "127.0.0.1", "--port", "0", "--db", db],
                                                   {hr.TOKEN_ENV: TOKEN})
        server = holder["server"]
        port = server.server_address[1]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with contextlib.closing(conn):
            conn.request("POST", hr.DEFAULT_PATH, body=encode(make_payload()),
                         headers={"Authorization": "Bearer " + TOKEN})
            self.assertEqual(conn.getresponse().status, 200)
        server.shutdown()
        thread.join(10)
        self.assertEqual(holder["code"], 0)
        text = out.getvalue()
        self.assertIn(f"Listening on http://127.0.0.1:{port}", text)
        self.assertIn(f"Server URL for Health Export Pro: http://127.0.0.1:{port}", text)
        self.assertIn("Endpoint Path: /api/health-data", text)
        self.assertIn("Auth Type: Bearer", text)
        self.assertIn("Database: " + db, text)
        self.assertIn("Stopped", text)
        self.assertNotIn(TOKEN, text)
        with contextlib.closing(sqlite3.connect(db)) as conn:
            self.assertEqual(conn.execute("SELECT count(*) FROM workouts").fetchone()[0], 1)
            self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], hr.SCHEMA_VERSION)

    def test_no_key_on_a_public_address_warns(self):
        lines = hr.banner_lines(hr.ReceiverConfig(host="0.0.0.0"), 3000)
        self.assertEqual(sum("WARNING" in line for line in lines), 1)
        self.assertTrue(any(line.startswith("Server URL for Health Export Pro: http://") for line in lines))
        lines = hr.banner_lines(hr.ReceiverConfig(host="127.0.0.1"), 3000)
        self.assertFalse(any("WARNING" in line for line in lines))
        lines = hr.banner_lines(hr.ReceiverConfig(host="0.0.0.0", keys=hr.Keys.single("k", "X-API-Key"),
                                                  key_source="file t"), 3000)
        self.assertIn("Auth Type: Custom Header, header name X-API-Key (key from file t)", lines)
        self.assertFalse(any("k" == part for line in lines for part in line.split()))

    def test_token_file(self):
        path = os.path.join(self.tmp.name, "token")
        with open(path, "w") as handle:
            handle.write(TOKEN + "\n")
        self.assertEqual(hr.read_token(path, {hr.TOKEN_ENV: "other"}), (TOKEN, "file " + path))
        self.assertEqual(hr.read_token(None, {hr.TOKEN_ENV: " env-key "})[0], "env-key")
        self.assertEqual(hr.read_token(None, {}), (None, None))
        with open(path, "w"):
            pass
        with self.assertRaises(hr.UsageError):
            hr.read_token(path, {})

    def test_main_exit_codes(self):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            self.assertEqual(hr.main(["--help"]), 0)
        for flag in ("--host", "--port", "--path", "--db", "--token-file", "--auth-header", "--max-body-mb",
                     "--quiet", "--timeout", "--tmp-dir", "--max-tmp-mb", "--tls-cert", "--tls-key"):
            self.assertIn(flag, out.getvalue())
        with contextlib.redirect_stderr(io.StringIO()) as err:
            self.assertEqual(hr.main(["--port", "x"]), 2)
            self.assertEqual(hr.main(["--token-file", os.path.join(self.tmp.name, "missing")]), 2)
            self.assertEqual(hr.main(["--max-body-mb", "0"]), 2)
        self.assertIn("token file", err.getvalue())
        with contextlib.redirect_stderr(io.StringIO()) as err:
            self.assertEqual(hr.main(["--host", "127.0.0.1", "--port", "0", "--db",
                                      os.path.join(self.tmp.name, "no", "such", "dir.db")]), 1)
        self.assertIn("cannot be opened", err.getvalue())


class CommandTests(ServerTestCase):
    """stats, export and import against a database filled by real posts."""

    def fill(self):
        for body in (make_payload(n=3), recent_payload(), {"data": {"X": [42]}}):
            self.assertEqual(self.post(body)[0], 200)
        self.post(b"[]")

    def table_rows(self, db, sql):
        with contextlib.closing(sqlite3.connect(db)) as conn:
            return sorted(conn.execute(sql).fetchall(), key=repr)

    def test_stats(self):
        self.fill()
        code, out, _ = run_main("stats", "--db", self.db)
        self.assertEqual(code, 0)
        self.assertIn("Database: " + os.path.abspath(self.db), out)
        self.assertRegex(out, r"\nTimes in this machine's time zone \([^)]+\)\.\n")
        self.assertRegex(out, r"samples\s+32\n")
        self.assertRegex(out, r"HeartRate\s+13\s+2026-02-24")
        self.assertIn("rejected: The body must be a JSON object", out)
        code, out, _ = run_main("stats", "--db", self.db, "--json")
        facts = json.loads(out)
        self.assertEqual(facts["totals"]["samples"], 32)
        self.assertEqual(len(facts["syncs"]), 4)
        self.assertGreater(facts["database"]["size_bytes"], 0)
        self.assertEqual(run_main("stats", "--db", os.path.join(self.tmp.name, "none.db"))[0], 1)
        # Rows deleted by hand: --recount brings the per-type totals back in line.
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            conn.execute("DELETE FROM samples WHERE type = 'HKQuantityTypeIdentifierHeartRate'")
            conn.commit()
        code, out, _ = run_main("stats", "--db", self.db, "--recount")
        self.assertEqual(code, 0)
        self.assertNotIn("HeartRate", out)
        self.assertEqual(self.query("SELECT DISTINCT type FROM sample_hours ORDER BY type"),
                         self.query("SELECT DISTINCT type FROM samples ORDER BY type"))
        self.assertEqual(self.post(make_payload(source="Jane\u2019s iPhone", tag="U"))[0], 200)
        ascii_only = subprocess.run([sys.executable, hr.__file__, "stats", "--db", self.db], text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=dict(os.environ, PYTHONIOENCODING="ascii"))
        self.assertEqual(ascii_only.returncode, 1)  # the sync source's curly apostrophe
        self.assertRegex(ascii_only.stderr, r"^error: the output cannot hold .*--output.*PYTHONIOENCODING=utf-8\n$")

    def test_export_csv_with_type_and_dates(self):
        self.fill()
        out_file = os.path.join(self.tmp.name, "hr.csv")
        code, _, err = run_main("export", "--db", self.db, "--type", "heartrate", "--since", "2026-02-24",
                                     "--until", "2026-02-24", "--output", out_file)
        self.assertEqual(code, 0, err)
        with open(out_file, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        self.assertEqual(rows[0], ["person"] + list(hr.SECTIONS_BY_NAME["samples"].column_names))
        self.assertEqual(len(rows) - 1, 3)
        self.assertTrue(all(row[:3:2] == ["me", "HKQuantityTypeIdentifierHeartRate"] for row in rows[1:]))
        code, out, _ = run_main("export", "--db", self.db, "--type", "HKQuantityTypeIdentifierHeartRate")
        self.assertEqual(len(out.strip().splitlines()), 14)
        code, _, err = run_main("export", "--db", self.db, "--type", "NoSuchType")
        self.assertEqual(code, 2)
        self.assertIn("HeartRate", err)

    def test_export_then_import_reproduces_the_rows(self):
        self.fill()
        self.post({"characteristics": {"bloodType": "A+", "odd": {"x": [1]}, "n": 5}, "data": {}})
        folder = os.path.join(self.tmp.name, "export")
        os.mkdir(folder)
        for section in ("samples", "workouts", "routes", "medications", "doses", "characteristics"):
            code, _, err = run_main("export", "--db", self.db, "--section", section, "--format", "ndjson",
                                         "--output", os.path.join(folder, section + ".ndjson"))
            self.assertEqual(code, 0, err)
        fresh = os.path.join(self.tmp.name, "fresh.db")
        code, out, err = run_main("import", "--db", fresh, folder)
        self.assertEqual(code, 0, err)
        self.assertIn("6 of 6 files imported", out)
        for sql in ("SELECT uuid, type, start_date, end_date, value, unit, source_name, record FROM samples",
                    "SELECT uuid, activity_type, start_date, end_date, duration_seconds, record FROM workouts",
                    "SELECT workout_uuid, timestamp, latitude, longitude, altitude, record FROM workout_route_points",
                    "SELECT key, display_text, record FROM medications",
                    "SELECT uuid, medication, start_date, log_status, record FROM medication_dose_events",
                    "SELECT name, value FROM characteristics",
                    "SELECT type, rows, first_date, last_date FROM sample_types"):
            with self.subTest(sql=sql):
                self.assertEqual(self.table_rows(fresh, sql), self.table_rows(self.db, sql))
        # Importing again changes nothing.
        code, out, _ = run_main("import", "--db", fresh, folder)
        self.assertEqual(self.table_rows(fresh, "SELECT count(*) FROM samples"), [(32,)])

    def test_an_older_ndjson_export_imported_later_never_reverts_newer_values(self):
        def characteristics(exported, blood):
            return {"exportDate": exported, "characteristics": {"bloodType": blood},
                    "data": {"medications": [{"conceptIdentifier": "rx-1", "displayText": blood + " pills"}]}}

        self.assertEqual(self.post(characteristics("2026-01-01T00:00:00Z", "A+"))[0], 200)
        old = {}
        for section in ("characteristics", "medications"):
            old[section] = os.path.join(self.tmp.name, f"old-{section}.ndjson")
            self.assertEqual(run_main("export", "--db", self.db, "--section", section, "--format", "ndjson",
                                      "--output", old[section])[0], 0)
        # An export of an earlier version: its lines say no date.
        undated = os.path.join(self.tmp.name, "undated.ndjson")
        with open(undated, "w", encoding="utf-8") as handle:
            handle.write('{"section":"characteristics","person":"me","name":"bloodType","value":"O-"}\n')
        self.assertEqual(self.post(characteristics("2026-02-01T00:00:00Z", "B+"))[0], 200)
        code, out, err = run_main("import", "--db", self.db, old["characteristics"], old["medications"], undated)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.query("SELECT value FROM characteristics"), [("B+",)])
        self.assertEqual(self.query("SELECT display_text FROM medications"), [("B+ pills",)])
        fresh = os.path.join(self.tmp.name, "fresh.db")  # where nothing is stored, the old values come in
        self.assertEqual(run_main("import", "--db", fresh, old["characteristics"], old["medications"])[0], 0)
        self.assertEqual(self.table_rows(fresh, "SELECT value FROM characteristics"), [("A+",)])
        with open(old["characteristics"], encoding="utf-8") as handle:
            self.assertEqual(json.loads(handle.readline())["exported"], "2026-01-01T00:00:00.000Z")

    def test_import_skips_a_bad_line_names_it_and_goes_on_to_the_end(self):
        good = [json.dumps({"section": "samples", "person": "me", "type": "HKQuantityTypeIdentifierHeartRate",
                            "record": sample(f"G-{i}", "2026-02-24T08:00:00Z", 60 + i)}) for i in range(4)]
        bad = ['{"section": "samples", "type": null, "record": {"uuid": "B-1"}}',
               '{"section": "samples", "type": "", "record": {"uuid": "B-2"}}',
               '{"section": "samples", "person": "bad name!", "type": "T", "record": {"uuid": "B-3"}}',
               '{"section": "routes", "workout": 7, "record": {}}', '{"section": "samples", "type": "T"',
               '{"section": "moods"}', "[1]", '{"section": ["samples"], "type": "T", "record": {}}']
        first = os.path.join(self.tmp.name, "first.ndjson")
        with open(first, "w", encoding="utf-8") as handle:
            handle.write("\n".join([good[0]] + bad + [good[1]]) + "\n")
        second = os.path.join(self.tmp.name, "second.ndjson")
        with open(second, "w", encoding="utf-8") as handle:
            handle.write("\n".join(good[2:]) + "\n")
        code, out, err = run_main("import", "--db", self.db, first, second)
        self.assertEqual(code, 1, err)
        self.assertNotIn("Traceback", err)
        for number in range(2, 2 + len(bad)):
            self.assertRegex(err, rf"first\.ndjson: line {number}: not an export line \(.+\): skipped")
        self.assertIn(f"{len(bad)} bad lines skipped", out)
        self.assertIn("2 of 2 files imported", out)
        self.assertEqual(self.query("SELECT uuid FROM samples ORDER BY uuid"), [(f"G-{i}",) for i in range(4)])
        self.assertEqual([person.name for person in self.store.people()], ["me"])

    @unittest.skipUnless(os.path.exists("/proc/self/status"), "reads the peak memory of a child on Linux")
    def test_import_holds_a_bounded_part_of_a_long_ndjson_line(self):
        path = os.path.join(self.tmp.name, "long.ndjson")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps({"section": "samples", "type": "T", "record": sample("S-1", "2026-02-24", 1)}))
            handle.write('\n{"section": "samples", "type": "T", "record": {"uuid": "L-1", "note": "')
            for _ in range(40):  # 40 MiB in one line
                handle.write("x" * hr.MIB)
            handle.write('"}}\n')
            handle.write(json.dumps({"section": "samples", "type": "T", "record": sample("S-2", "2026-02-25", 2)}))
        code = ("import sys; sys.path.insert(0, {0!r}); import health_receiver as hr; "
                "status = hr.main(['import', '--db', {1!r}, {2!r}]); "
                "print([line for line in open('/proc/self/status') if line.startswith('VmHWM')][0]); "
                "sys.exit(status)").format(os.path.dirname(os.path.abspath(hr.__file__)), self.db, path)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        self.assertEqual(done.returncode, 1, done.stderr)  # the long line is skipped, and said so
        self.assertIn("long.ndjson: line 2: not an export line (", done.stderr)
        peak_mb = int(done.stdout.split()[-2]) / 1024
        self.assertLess(peak_mb, 100, done.stdout)  # the line alone is 40 MiB
        self.assertEqual(self.query("SELECT uuid FROM samples ORDER BY uuid"), [("S-1",), ("S-2",)])

    def test_import_of_files_larger_than_the_walkers_window(self):
        folder = os.path.join(self.tmp.name, "large")
        os.mkdir(folder)
        payload = make_payload(n=6000, tag="L")
        with gzip.open(os.path.join(folder, "export-big.json.gz"), "wt", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=1)
        size = os.path.getsize(os.path.join(folder, "export-big.json.gz"))
        self.assertGreater(len(json.dumps(payload, indent=1)), 2 * hr.READ_CHUNK)
        fresh = os.path.join(self.tmp.name, "fresh.db")
        code, out, err = run_main("import", "--db", fresh, folder)
        self.assertEqual(code, 0, err)
        self.assertIn("1 of 1 files imported", out)
        self.assertIn(f"{size / 1e6:,.1f} of {size / 1e6:,.1f} MB", err)
        self.assertIn("12,011 records (12,011 new", err)  # its characteristics, route points... too
        self.assertEqual(self.table_rows(fresh, "SELECT count(*) FROM samples"), [(12001,)])

    def test_import_guide_style_files_and_a_bad_one(self):
        folder = os.path.join(self.tmp.name, "exports")
        os.mkdir(folder)
        with open(os.path.join(folder, "export-1771000000000.json"), "w", encoding="utf-8") as handle:
            json.dump(make_payload(n=2, tag="P"), handle, indent=2)
        with open(os.path.join(folder, "export-1771000000001.json"), "w", encoding="utf-8") as handle:
            handle.write('{"data": {"X": [')
        with gzip.open(os.path.join(folder, "export-1771000000002.json.gz"), "wt", encoding="utf-8") as handle:
            json.dump(make_payload(n=2, tag="G"), handle)
        with open(os.path.join(folder, "notes.txt"), "w") as handle:
            handle.write("ignored")
        fresh = os.path.join(self.tmp.name, "fresh.db")
        code, out, err = run_main("import", "--db", fresh, folder)
        self.assertEqual(code, 1)
        self.assertIn("2 of 3 files imported, 1 failed", out)
        self.assertRegex(err, r"export-1771000000001\.json: skipped: Invalid JSON at byte \d+")
        self.assertIn("files 3/3", err)
        self.assertEqual(self.table_rows(fresh, "SELECT count(*) FROM workouts"), [(2,)])
        self.assertEqual(self.table_rows(fresh, "SELECT DISTINCT remote_addr FROM syncs WHERE status = 'ok'"),
                         [("import export-1771000000000.json",), ("import export-1771000000002.json.gz",)])
        code, _, err = run_main("import", "--db", fresh, os.path.join(folder, "missing.json"))
        self.assertEqual(code, 1)
        self.assertIn("missing.json: skipped", err)


class PrivateFileTests(unittest.TestCase):
    """Health data and keys go only into files of their own, 0600."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.db = os.path.join(self.tmp.name, "health.db")
        previous = os.umask(0o022)  # the usual umask: files readable by everyone
        self.addCleanup(os.umask, previous)

    def mode(self, path):
        return oct(os.stat(path).st_mode & 0o777)

    def test_database_log_and_temporary_files_are_0600(self):
        store = hr.Store(self.db)
        store.open()
        stage = store.stage()
        self.addCleanup(stage.close)
        with store.writer() as conn:
            conn.execute("CREATE TABLE probe (x)")  # the write-ahead log exists now
            self.assertEqual({self.mode(self.db + suffix) for suffix in ("", "-wal", "-shm")}, {"0o600"})
        self.assertEqual(self.mode(stage.path), "0o600")
        store.close()

    def test_a_link_planted_at_a_temporary_name_is_refused(self):
        store = hr.Store(self.db)
        store.open()
        self.addCleanup(store.close)
        victim = os.path.join(self.tmp.name, "victim")  # where the link would make a sync's rows go
        first = store.stage()
        name = os.path.basename(first.path)
        first.close()
        number = int(name.split(".")[-2])
        os.symlink(victim, first.path.replace(f".{number}.stage", f".{number + 1}.stage"))
        with self.assertRaises(hr.StorageUnavailable):
            store.stage()
        self.assertFalse(os.path.exists(victim))

    def test_a_key_file_that_is_a_link_or_not_ours_is_refused(self):
        key_file = self.db + hr.KEY_FILE_SUFFIX
        other = os.path.join(self.tmp.name, "other")
        with open(other, "w") as handle:
            handle.write("a-key-someone-else-chose\n")
        os.symlink(other, key_file)
        code, _, err = run_main("--db", self.db, "--port", "0", "--host", "127.0.0.1")
        self.assertEqual(code, 2)
        self.assertIn("not a regular file", err)
        os.unlink(key_file)
        os.mkdir(key_file)
        self.assertEqual(run_main("--db", self.db, "--port", "0", "--host", "127.0.0.1")[0], 2)
        os.rmdir(key_file)
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # only root can give a file away
            os.rename(other, key_file)
            os.chown(key_file, 12345, -1)
            code, _, err = run_main("--db", self.db, "--port", "0", "--host", "127.0.0.1")
            self.assertEqual(code, 2)
            self.assertIn("belongs to another user", err)
        self.assertFalse(os.path.exists(self.db))  # refused before anything was written


class KeyTests(unittest.TestCase):
    """A key from the first start; the old way keeps working."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.db = os.path.join(self.tmp.name, "health.db")

    def start(self, *flags, environ=None):
        """serve() in a thread as main() runs it; return (server, banner)."""
        out = io.StringIO()
        ready = threading.Event()
        holder = {}
        args = hr.serve_parser().parse_args(["--host", "127.0.0.1", "--port", "0", "--db", self.db, *flags])
        config = hr.config_from_args(args, environ or {})
        config.log_stream = io.StringIO()

        def on_ready(server):
            holder["server"] = server
            ready.set()

        thread = threading.Thread(target=lambda: holder.setdefault("code", hr.serve(config, out, ready=on_ready)))
        thread.start()
        self.assertTrue(ready.wait(10))

        def stop():
            holder["server"].shutdown()
            thread.join(10)

        self.addCleanup(stop)
        return holder["server"], out.getvalue()

    def post(self, server, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        with contextlib.closing(conn):
            conn.request("POST", hr.DEFAULT_PATH, body=encode(make_payload()), headers=headers or {})
            response = conn.getresponse()
            response.read()
            return response.status

    def test_a_new_database_gets_a_key_shown_once_then_read_from_its_file(self):
        server, banner = self.start()
        key_file = self.db + ".key"
        with open(key_file, encoding="utf-8") as handle:
            key = handle.read().strip()
        self.assertGreaterEqual(len(base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))) * 8, 128)
        self.assertRegex(key, r"^[A-Za-z0-9_-]+$")
        self.assertEqual(os.stat(key_file).st_mode & 0o777, 0o600)
        self.assertNotIn(key, banner)  # not a terminal: a journal would keep it for ever
        self.assertIn(f"`health_receiver.py key --db {self.db}` prints it", banner)
        self.assertEqual(run_main("key", "--db", self.db)[:2], (0, key + "\n"))
        out = io.StringIO()
        self.assertEqual(hr.main(["key", "--db", "elsewhere.db"], environ={hr.TOKEN_ENV: "env-key"}, out=out), 0)
        self.assertEqual(out.getvalue(), "env-key\n")
        with contextlib.redirect_stderr(io.StringIO()) as err:
            self.assertEqual(hr.main(["key", "--db", os.path.join(self.tmp.name, "none.db")], environ={}), 1)
        self.assertIn("no key", err.getvalue())
        on_terminal = "\n".join(hr.banner_lines(server.config, 3000, terminal=True))
        self.assertIn(f"Key: {key}", on_terminal)
        self.assertIn("Auth Type: Bearer (key from file " + key_file, banner)
        self.assertEqual(self.post(server), 401)
        self.assertEqual(self.post(server, {"Authorization": "Bearer " + key}), 200)
        self.assertNotIn(key, server.config.log_stream.getvalue())
        server.shutdown()
        server, banner = self.start()  # the next start reads it, and does not print it
        self.assertNotIn(key, banner)
        self.assertIn("key from file " + key_file, banner)
        self.assertEqual(self.post(server, {"Authorization": "Bearer " + key}), 200)

    def test_a_database_without_syncs_starts_without_a_key_with_a_warning(self):
        store = hr.Store(self.db)
        store.open()
        store.close()
        server, banner = self.start()
        self.assertFalse(os.path.exists(self.db + ".key"))
        self.assertIn("Auth Type: None", banner)
        self.assertIn("takes syncs without one", banner)
        self.assertEqual(self.post(server), 200)

    def test_a_database_holding_syncs_starts_without_a_key_only_with_no_auth(self):
        # As a database of a release before the mark of a key, restored without its key file.
        server, _banner = self.start("--no-auth")
        self.assertEqual(self.post(server), 200)
        server.shutdown()
        self.assertIsNone(hr.Store(self.db).setting(hr.RECEIVER_KEY_SETTING))
        code, err = self.refused()
        self.assertEqual(code, 1)
        self.assertIn("holds syncs", err)
        self.assertIn(self.db + ".key", err)
        self.assertIn(hr.TOKEN_ENV, err)
        self.assertIn("--no-auth", err)
        self.assertEqual(self.refused("--no-auth")[0], 0)
        server, banner = self.start(environ={hr.TOKEN_ENV: TOKEN})
        self.assertEqual(self.post(server), 401)

    def test_with_the_first_persons_own_key_alone_the_banner_does_not_warn_of_syncs_without_a_key(self):
        server, _banner = self.start("--no-auth")
        server.shutdown()
        hr.Store(self.db).set_key("me", TOKEN)  # people key me; no key file
        server, banner = self.start()
        self.assertIn("Auth Type: Bearer (each person's own key", banner)
        self.assertNotIn("without one", banner)
        self.assertNotIn("WARNING", banner)
        self.assertEqual(self.post(server), 401)
        self.assertEqual(self.post(server, bearer(TOKEN)), 200)

    def refused(self, *flags, db=None):
        """serve() as main() runs it on ``db`` (by default this test's),
        with no key anywhere: (exit status, stderr).  Should it start, it
        is stopped at once."""
        args = hr.serve_parser().parse_args(["--host", "127.0.0.1", "--port", "0", "--db", db or self.db, *flags])
        config = hr.config_from_args(args, {})
        config.log_stream = io.StringIO()
        with contextlib.redirect_stderr(io.StringIO()) as err:
            code = hr.serve(config, io.StringIO(), ready=lambda server: threading.Thread(target=server.shutdown).start())
        return code, err.getvalue()

    def restored_on_a_new_card(self):
        """A backup of this test's database restored into another folder,
        without its key file: the new database's path."""
        backups, card = os.path.join(self.tmp.name, "backups"), os.path.join(self.tmp.name, "card")
        os.mkdir(backups)
        os.mkdir(card)
        self.assertEqual(run_main("backup", backups, "--db", self.db)[0], 0)
        restored = os.path.join(card, "health.db")
        self.assertEqual(run_main("restore", os.path.join(backups, os.listdir(backups)[0]), "--db", restored)[0], 0)
        self.assertFalse(os.path.exists(restored + ".key"))
        return restored

    def test_a_database_used_with_keys_never_starts_without_one(self):
        server, _banner = self.start()  # a new database: the receiver's key, in its file
        hr.Store(self.db).add_people(["ann"], [ANN_KEY])
        server.shutdown()
        restored = self.restored_on_a_new_card()
        for flags in ((), ("--no-auth",)):
            with self.subTest(flags=flags):
                code, err = self.refused(*flags, db=restored)
                self.assertEqual(code, 1)
                self.assertIn("people with keys of their own: ann", err)
                self.assertIn(f"people key me --db {restored}", err)
                self.assertIn(restored + ".key", err)
        hr.Store(restored).set_key("me", TOKEN)  # people key me
        self.db = restored
        server, banner = self.start()
        self.assertIn("Auth Type: Bearer (each person's own key", banner)
        self.assertEqual(self.post(server), 401)
        self.assertEqual(self.post(server, bearer("nope")), 401)
        self.assertEqual(self.post(server, bearer(ANN_KEY)), 200)
        self.assertEqual(self.post(server, bearer(TOKEN)), 200)
        with contextlib.closing(sqlite3.connect(restored)) as conn:
            self.assertEqual(conn.execute("SELECT person, count(*) FROM syncs GROUP BY person").fetchall(),
                             [(1, 1), (2, 1)])

    def test_a_backup_of_a_receiver_with_its_own_key_alone_is_refused_without_it(self):
        server, _banner = self.start()
        server.shutdown()
        restored = self.restored_on_a_new_card()
        code, err = self.refused(db=restored)
        self.assertEqual(code, 1)
        self.assertIn("a key of the receiver's", err)
        with open(restored + ".key", "w") as handle:  # the key file kept with the backups
            handle.write(TOKEN)
        os.chmod(restored + ".key", 0o600)
        self.db = restored
        server, banner = self.start()
        self.assertIn("Auth Type: Bearer (key from file", banner)
        self.assertEqual(self.post(server, bearer(TOKEN)), 200)

    def test_without_a_key_a_request_without_one_is_refused_once_the_owner_has_a_key(self):
        server, banner = self.start("--no-auth")
        self.assertEqual(self.post(server), 200)
        hr.Store(self.db).set_key("me", TOKEN)  # people key me, while it runs
        self.assertEqual(self.post(server), 401)
        self.assertEqual(self.post(server, bearer("nope")), 401)
        self.assertEqual(self.post(server, bearer(TOKEN)), 200)

    def test_a_short_key_chosen_by_hand_is_warned_about(self):
        args = hr.serve_parser().parse_args(["--db", self.db])
        warnings = hr.config_from_args(args, {hr.TOKEN_ENV: "hunter2"}).warnings
        self.assertTrue(any("has 7 characters" in warning for warning in warnings), warnings)
        self.assertFalse(hr.config_from_args(args, {hr.TOKEN_ENV: TOKEN}).warnings)

    def test_no_auth_on_purpose(self):
        server, banner = self.start("--no-auth")
        self.assertFalse(os.path.exists(self.db + ".key"))
        self.assertIn("Auth Type: None (--no-auth)", banner)
        self.assertEqual(self.post(server), 200)
        lines = hr.banner_lines(hr.ReceiverConfig(host="0.0.0.0", no_auth=True), 3000)
        self.assertEqual(sum("WARNING" in line for line in lines), 1)

    def test_the_environment_wins_and_a_key_must_be_ascii(self):
        server, banner = self.start(environ={hr.TOKEN_ENV: TOKEN})
        self.assertIn("key from environment variable", banner)
        self.assertFalse(os.path.exists(self.db + ".key"))
        for key in ("cl\u00e9", "with space", "tab\tkey"):
            with self.subTest(key=key):
                with contextlib.redirect_stderr(io.StringIO()) as err:
                    code = hr.main(["--port", "0", "--db", self.db], environ={hr.TOKEN_ENV: key})
                self.assertEqual(code, 2)
                self.assertIn("printable ASCII", err.getvalue())
                self.assertNotIn(key, err.getvalue())

    @unittest.skipUnless(os.name == "posix", "needs POSIX permissions")
    def test_a_key_file_others_can_read_is_warned_about(self):
        key_file = self.db + ".key"
        with open(key_file, "w") as handle:
            handle.write(TOKEN)
        os.chmod(key_file, 0o644)
        _server, banner = self.start()
        self.assertIn(f"WARNING: {key_file} can be read by other users", banner)
        self.assertNotIn(TOKEN, banner)


class QuickStartTests(ServerTestCase):
    """The README's quick start works as written: its sample body is a sync
    whose day reads as the README says."""

    token = TOKEN

    def server_options(self):
        return {"utc": True}

    def test_the_sample_body_of_the_readme(self):
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"), encoding="utf-8") as handle:
            readme = handle.read()
        marker = "<!-- sample body: a test posts it as it is written here -->\n```json\n"
        body = readme[readme.index(marker) + len(marker):]
        body = body[:body.index("```")]
        self.assertLessEqual(len(body.splitlines()), 15)
        status, _, answer = self.post(body.encode("utf-8"), headers=bearer(TOKEN))
        self.assertEqual((status, answer["ok"], answer["count"]), (200, True, 4))
        wait_until(lambda: not self.query("SELECT 1 FROM sample_hours_pending LIMIT 1"))

        def day(name):
            status, _, rows = self.request("GET", f"{hr.SERIES_PATH}?type={name}&from=2026-03-01&to=2026-03-01",
                                           headers=bearer(TOKEN))
            self.assertEqual(status, 200, rows)
            return rows[0]["value"]

        self.assertEqual((day("Steps"), day("HeartRate"), day("Sleep")), (1800.0, 72.0, 7.5))
        self.assertIn("1,800 steps, a heart rate of 72, 7.5 hours of sleep", " ".join(readme.split()))


class DocumentedEverywhereTests(unittest.TestCase):
    """Every command, every flag of serve and every route is in the README
    and in --help, so that neither drifts from the code."""

    def setUp(self):
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"), encoding="utf-8") as handle:
            self.readme = handle.read()
        self.help = hr.serve_parser().format_help()

    def test_commands(self):
        for name in hr.COMMANDS:
            with self.subTest(command=name):
                if name != "serve":
                    self.assertIn(f"health_receiver.py {name}", self.readme)
                    self.assertRegex(" ".join(self.help.split()), rf"Other commands \(each with --help\):[^.]*\b{name}\b")

    def test_serve_flags(self):
        for action in hr.serve_parser()._actions:
            for option in action.option_strings:
                if option.startswith("--") and action.help != argparse.SUPPRESS:
                    with self.subTest(flag=option):
                        self.assertIn(f"`{option}", self.readme)
                        self.assertIn(option, self.help)

    def test_routes(self):
        for route in hr.ROUTES:
            path = route.path.split("<")[0]
            with self.subTest(route=route.path):
                self.assertIn(path, self.readme)
                if route.path != hr.ENDPOINT:
                    self.assertIn(path, " ".join(self.help.split()))


class TestFileShapeTests(unittest.TestCase):

    def test_no_name_is_defined_twice_at_the_top_of_a_file(self):
        # A second function of one name replaces the first without a word.
        for module in (hr, sys.modules[__name__]):
            with self.subTest(module=module.__name__), open(module.__file__, encoding="utf-8") as handle:
                names = [node.name for node in ast.parse(handle.read()).body
                         if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
                self.assertEqual(sorted(name for name in set(names) if names.count(name) > 1), [])

    def test_running_the_file_runs_every_test(self):
        # unittest.main() runs the classes defined before it: it must come last.
        with open(__file__, encoding="utf-8") as handle:
            last = ast.parse(handle.read()).body[-1]
        self.assertIsInstance(last, ast.If)
        self.assertEqual(ast.dump(last.test), ast.dump(ast.parse('__name__ == "__main__"').body[0].value))


class SeedGuideBaselineTests(unittest.TestCase):
    """bench's second baseline, the seed guide's receiver: the samples of
    ``data`` with a uuid and both dates, a row each, the first of a uuid kept."""

    def test_it_keeps_a_row_per_sample_with_a_uuid_and_both_dates(self):
        payload = {"exportDate": "2026-03-02T08:00:00Z", "data": {
            "HKQuantityTypeIdentifierStepCount": [span("S-1", "2026-03-01T09:00:00Z", "2026-03-01T09:10:00Z", 10),
                                                  span("S-1", "2026-03-01T09:00:00Z", "2026-03-01T09:10:00Z", 99),
                                                  {"startDate": "2026-03-01T09:00:00Z", "endDate": "x", "value": 1}],
            "HKQuantityTypeIdentifierHeartRate": [dict(span("H-1", "2026-03-01T09:05:00Z", "2026-03-01T09:05:00Z",
                                                            72), metadata={"a": 1})],
            "workouts": {"not": "a list"}}}
        with tempfile.TemporaryDirectory() as folder:
            body, db = os.path.join(folder, "body.json"), os.path.join(folder, "seed.db")
            with open(body, "wb") as handle:
                handle.write(encode(payload))
            with contextlib.redirect_stdout(io.StringIO()) as printed:
                self.assertEqual(hr.main(["bench", "--seed-child", body, db]), 0)
            figures = json.loads(printed.getvalue())
            self.assertEqual((figures["rows"], sorted(figures)), (3, ["cpu_seconds", "peak_rss_mb", "rows", "seconds"]))
            with contextlib.closing(sqlite3.connect(db)) as conn:
                self.assertEqual(conn.execute("SELECT uuid, type_id, value, metadata FROM samples ORDER BY uuid")
                                 .fetchall(), [("H-1", "HKQuantityTypeIdentifierHeartRate", 72.0, '{"a": 1}'),
                                               ("S-1", "HKQuantityTypeIdentifierStepCount", 10.0, "{}")])


class RunAsScriptTests(unittest.TestCase):
    """``python3 health_receiver.py`` runs the module imported, in the same
    process: its arguments, name, exit status and output are the script's."""

    def run_script(self, *argv, cwd=None):
        return subprocess.run([sys.executable, hr.__file__, *argv], capture_output=True, text=True, timeout=60,
                              cwd=cwd)

    def test_the_scripts_name_arguments_status_and_output_pass_through(self):
        with tempfile.TemporaryDirectory() as folder:
            db = os.path.join(folder, "health.db")
            done = self.run_script("stats", "--db", db)
            self.assertEqual((done.returncode, done.stdout, done.stderr), (1, "", f"error: no database at {db}\n"))
            usage = self.run_script("stats", "--help", cwd=folder)
            self.assertEqual(usage.returncode, 0)
            self.assertTrue(usage.stdout.startswith("usage: health_receiver.py stats "), usage.stdout[:80])
            # A module in the working directory is not imported in place of
            # the standard library's, as it is not for a script.
            with open(os.path.join(folder, "json.py"), "w", encoding="utf-8") as shadow:
                shadow.write("raise SystemExit(7)\n")
            done = self.run_script("stats", "--db", db, cwd=folder)
            self.assertEqual((done.returncode, done.stderr), (1, f"error: no database at {db}\n"))
            # Under a profiler it runs where it was started, for the profile to be written.
            profile = os.path.join(folder, "profile.out")
            subprocess.run([sys.executable, "-m", "cProfile", "-o", profile, hr.__file__, "stats", "--db", db],
                           capture_output=True, timeout=60)
            self.assertTrue(os.path.exists(profile))
            os.mkdir(os.path.join(folder, "élsewhere"))
            copy = os.path.join(folder, "élsewhere", "receiver copy.py")  # any name, any folder
            shutil.copy(hr.__file__, copy)
            wrong = subprocess.run([sys.executable, copy, "--port", "x"], capture_output=True, text=True, timeout=60)
            self.assertEqual(wrong.returncode, 2)
            self.assertIn("error: argument --port: invalid int value: 'x'", wrong.stderr)

    @unittest.skipUnless(os.path.exists(f"/proc/{os.getpid()}/cmdline"), "needs /proc")
    def test_the_served_process_is_the_one_started_and_runs_the_module_imported(self):
        # A service manager's process id stays the receiver's.
        with tempfile.TemporaryDirectory() as folder:
            proc = subprocess.Popen([sys.executable, hr.__file__, "--host", "127.0.0.1", "--port", "0", "--db",
                                     os.path.join(folder, "h.db"), "--no-auth"], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            try:
                for line in proc.stdout:
                    if "Server URL" in line or "listening" in line.lower():
                        break
                with open(f"/proc/{proc.pid}/cmdline", "rb") as cmdline:
                    argv = cmdline.read().split(b"\0")
                self.assertIn(b"-c", argv)
                self.assertIn(b"spec_from_file_location", b" ".join(argv))
                self.assertEqual(argv[-8:], [b"--host", b"127.0.0.1", b"--port", b"0", b"--db",
                                             os.path.join(folder, "h.db").encode(), b"--no-auth", b""])
            finally:
                proc.terminate()
                proc.wait(30)
                proc.stdout.close()


#: The rule of a section's banner: a line of dashes above and below its title.
BANNER_RULE = "# " + "-" * 75
#: A room's banner: # -- Title: what is in it ----
ROOM_BANNER = re.compile(r"# -- (.+?) -+\Z")


def banner_title(text):
    """A banner's or a map line's title: what comes before its first ': '."""
    return text.split(": ", 1)[0].strip()


def file_banners(lines):
    """[(section title, its first line (1-based), [(room title, line)...])]
    of a file's lines, in order."""
    sections = []
    for number, line in enumerate(lines, 1):
        if line == BANNER_RULE and lines[number:number + 1] and lines[number + 1:number + 2] == [BANNER_RULE] \
                and lines[number].startswith("# "):
            sections.append((banner_title(lines[number][2:]), number, []))
        elif ROOM_BANNER.match(line) and sections:
            sections[-1][2].append((banner_title(ROOM_BANNER.match(line)[1]), number))
    return sections


def docstring_map(doc):
    """([(section title, [room titles])...], {registry: (place, [test class
    names])}) of the module docstring's map and its table."""
    lines = doc.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("Map of this file"))
    table = next(n for n, line in enumerate(lines) if line.startswith("Where to change what"))
    sections = []
    for line in lines[start:table]:
        if re.match(r"    \S", line):
            sections.append((re.split(r"\s{2,}", line.strip())[0], []))
        elif re.match(r"      - \S", line):
            sections[-1][1].append(banner_title(line[8:]))
    registries, name = {}, None
    for line in lines[table:]:
        entry = re.match(r"    (\w+)\s{2,}(.+?): ", line)
        if entry:
            name = entry[1]
            registries[name] = (entry[2], [])
        if name and line.startswith("    "):
            registries[name][1].extend(re.findall(r"\b[A-Z]\w*Tests\b", line))
        elif name and line.strip():
            name = None
    return sections, registries


def top_level_names(node):
    """The global names a top-level statement defines (a function, a class,
    names assigned, imported or bound at the top of an if or a try)."""
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [(alias.asname or alias.name).split(".")[0] for alias in node.names]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [name.id for target in targets for name in ast.walk(target)
                if isinstance(name, ast.Name) and not isinstance(target, (ast.Subscript, ast.Attribute))]
    if isinstance(node, (ast.If, ast.Try)):
        return [name for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)
                for name in top_level_names(child)] + [
            name for handler in getattr(node, "handlers", ()) for child in handler.body
            for name in top_level_names(child)]
    return []


def _bound_in(function):
    """The names a function (or lambda) binds in its own scope: its
    parameters, and what its body assigns, imports or defines, minus what
    it declares global (nested scopes keep theirs)."""
    arguments = function.args
    bound = {argument.arg for argument in arguments.args + arguments.kwonlyargs
             + getattr(arguments, "posonlyargs", []) + [arguments.vararg, arguments.kwarg] if argument}
    if isinstance(function, ast.Lambda):
        return bound
    declared = set()
    stack = list(function.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
            continue
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            continue
        if isinstance(node, ast.Global):
            declared.update(node.names)
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        stack.extend(ast.iter_child_nodes(node))
    return bound - declared


def global_loads(node, scopes=()):
    """(name, line) of each name ``node`` reads from the module's globals:
    names its functions, classes and comprehensions bind themselves do not
    count, nor do attributes (self.store) or text in strings."""
    if isinstance(node, ast.Name):
        return [(node.id, node.lineno)] if isinstance(node.ctx, ast.Load) and not any(
            node.id in scope for scope in scopes) else []
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        arguments = node.args
        outside = list(getattr(node, "decorator_list", [])) + arguments.defaults + [
            default for default in arguments.kw_defaults if default is not None] + [
            argument.annotation for argument in arguments.args + arguments.kwonlyargs
            + getattr(arguments, "posonlyargs", []) + [arguments.vararg, arguments.kwarg]
            if argument is not None and argument.annotation is not None] + [getattr(node, "returns", None)]
        inside = scopes + (_bound_in(node),)
        body = [node.body] if isinstance(node, ast.Lambda) else node.body
        return [load for part in outside if part is not None for load in global_loads(part, scopes)] + [
            load for part in body for load in global_loads(part, inside)]
    if isinstance(node, ast.ClassDef):
        # The class body's own names count in its body, not in its methods.
        own = {name for child in node.body for name in top_level_names(child)}
        outside = node.decorator_list + node.bases + [keyword.value for keyword in node.keywords]
        return [load for part in outside for load in global_loads(part, scopes)] + [
            load for child in node.body for load in global_loads(
                child, scopes if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                else scopes + (own,))]
    if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
        targets = {name.id for generator in node.generators for name in ast.walk(generator.target)
                   if isinstance(name, ast.Name)}
        inside = scopes + (targets,)
        parts = [(generator.iter, scopes if number == 0 else inside)
                 for number, generator in enumerate(node.generators)]
        parts += [(condition, inside) for generator in node.generators for condition in generator.ifs]
        parts += [(part, inside) for part in ((node.key, node.value) if isinstance(node, ast.DictComp)
                                               else (node.elt,))]
        return [load for part, scope in parts for load in global_loads(part, scope)]
    return [load for child in ast.iter_child_nodes(node) for load in global_loads(child, scopes)]


class FileMapTests(unittest.TestCase):
    """The module docstring's map is the file's: its sections and rooms
    are the banners', in order; no section uses a name a later one defines;
    each registry of its table is in the room it names, guarded by tests
    that exist."""

    @classmethod
    def setUpClass(cls):
        with open(hr.__file__, encoding="utf-8") as handle:
            cls.source = handle.read()
        cls.tree = ast.parse(cls.source)
        cls.banners = file_banners(cls.source.splitlines())
        cls.map, cls.registries = docstring_map(ast.get_docstring(cls.tree))

    def place_of(self, line):
        """(section title, room title or None) of a line of the file; (None,
        None) above the first section (the imports)."""
        sections = [entry for entry in self.banners if entry[1] <= line]
        if not sections:
            return None, None
        rooms = [title for title, start in sections[-1][2] if start <= line]
        return sections[-1][0], rooms[-1] if rooms else None

    def test_the_maps_sections_and_rooms_are_the_banners_in_order(self):
        self.assertEqual([section for section, _rooms in self.map], [title for title, _line, _rooms in self.banners])
        for (section, rooms), (_title, _line, banners) in zip(self.map, self.banners):
            with self.subTest(section=section):
                self.assertEqual(rooms, [title for title, _line in banners])

    def test_no_section_uses_a_name_defined_in_a_later_one(self):
        titles = [title for title, _line, _rooms in self.banners]
        defined = {}
        for node in self.tree.body:
            for name in top_level_names(node):
                defined.setdefault(name, self.place_of(node.lineno)[0])
        upward = []
        for node in self.tree.body:
            here = self.place_of(node.lineno)[0]
            if here is None:
                continue
            for name, line in global_loads(node):
                there = defined.get(name)
                if there is not None and titles.index(there) > titles.index(here):
                    upward.append(f"line {line}: {here} uses {name} of {there}")
        self.assertEqual(upward, [])

    def test_each_registry_is_where_the_map_says_and_its_tests_exist(self):
        self.assertGreaterEqual(len(self.registries), 10)
        where = {name: self.place_of(node.lineno) for node in self.tree.body for name in top_level_names(node)}
        for name, (place, tests) in self.registries.items():
            with self.subTest(registry=name):
                section, _, room = place.partition(" / ")
                self.assertIn(name, where)
                self.assertEqual(where[name], (section, room or where[name][1]))
                self.assertTrue(tests)
                for test in tests:
                    self.assertTrue(isinstance(globals().get(test), type)
                                    and issubclass(globals()[test], unittest.TestCase), test)


class CommandShapeTests(unittest.TestCase):
    """Every command: 0 done, 1 failed, 2 usage."""

    def test_a_bug_is_not_a_usage_error(self):
        def run_broken(args, out):
            return int("not a number")  # a bug, as a command might have one

        hr.COMMANDS["broken"] = (hr.stats_parser, run_broken)
        self.addCleanup(hr.COMMANDS.pop, "broken")
        with self.assertRaises(ValueError):  # with its traceback, where `python3 -m` shows it and exits 1
            hr.main(["broken"])
        self.assertEqual(subprocess.run([sys.executable, hr.__file__, "stats", "--db", "/nonexistent/x.db"],
                                        stderr=subprocess.PIPE, text=True).stderr,
                         "error: no database at /nonexistent/x.db\n")

    def test_exit_statuses_are_the_same_for_every_command(self):
        with tempfile.TemporaryDirectory() as folder:
            missing = os.path.join(folder, "none.db")
            cases = [(["stats", "--bogus"], 2), (["export", "--bogus"], 2), (["import"], 2),
                     (["bench", "--runs", "x"], 2), (["--port", "x"], 2),
                     (["serve", "--db", missing, "--tmp-dir", os.path.join(folder, "none")], 2),
                     (["stats", "--db", missing], 1), (["export", "--db", missing], 1),
                     (["import", "--db", missing, os.path.join(folder, "x.json")], 1),
                     (["export", "--db", missing, "--since", "soon"], 2)]
            for argv, expected in cases:
                with self.subTest(argv=argv):
                    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                        self.assertEqual(hr.main(argv, out=io.StringIO()), expected)
            for name in hr.COMMANDS:
                with self.subTest(command=name):
                    with contextlib.redirect_stdout(io.StringIO()) as out:
                        self.assertEqual(hr.main([name, "--help"]), 0)
                    self.assertIn("usage:", out.getvalue())



# ---------------------------------------------------------------------------
# A household: people with keys of their own, their data apart
# ---------------------------------------------------------------------------

ANN_KEY = "ann-" + "Kx9" * 10


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def login(key):
    return {"Authorization": "Basic " + base64.b64encode(f"anyone:{key}".encode()).decode()}


def household_payload(tag, steps, resting, blood, extra_type=None):
    """Today's steps and resting heart rate, a blood type, a walk at 07:30
    (the same uuid for the same ``tag``) and a dose without a source."""
    today = TEST_NOW.strftime("%Y-%m-%d")
    data = {"HKQuantityTypeIdentifierStepCount": [sample(f"{tag}-S", f"{today}T00:01:00.000Z", steps, "count")],
            "HKQuantityTypeIdentifierRestingHeartRate": [sample(f"{tag}-R", f"{today}T00:02:00.000Z", resting)],
            "workouts": [{"uuid": f"{tag}-W", "workoutActivityType": "walking", "startDate": f"{today}T07:30:00Z",
                          "endDate": f"{today}T08:00:00Z", "durationSeconds": 1800.0}],
            "medicationDoseEvents": [{"uuid": f"{tag}-D", "medicationConceptIdentifier": "rx-0",
                                      "startDate": f"{today}T00:03:00.000Z", "logStatus": "taken"}]}
    if extra_type:
        data[extra_type] = [sample(f"{tag}-X", f"{today}T00:04:00.000Z", 70.5, "kg")]
    return {"exportDate": f"{today}T00:05:00.000Z", "syncSource": "background", "data": data,
            "characteristics": {"bloodType": blood}}


class HouseholdTests(PageTestCase):
    """Two people, each with a key: the first (me, admin) has the
    receiver's key, ann one of her own."""

    token = TOKEN
    #: Today's samples are at 00:01 to 08:00.
    clock_start = TEST_NOON

    def server_options(self):
        return {"utc": True}

    def setUp(self):
        super().setUp()
        self.store.add_people(["ann"], [ANN_KEY])

    def summary_of(self, key, query=""):
        status, _, facts = self.request("GET", f"{hr.SUMMARY_PATH}?range=7d{query}", headers=login(key))
        self.assertEqual(status, 200, facts)
        return facts

    @staticmethod
    def tiles(facts):
        return {tile["title"]: tile["value"] for tile in facts["today"]}

    def test_the_same_payload_from_two_people_is_two_complete_sets_and_each_sees_only_their_own(self):
        first = household_payload("P", 8700, 54, "A+")
        mine = self.post(first, bearer(TOKEN))[2]
        hers = self.post(first, bearer(ANN_KEY))[2]
        self.assertEqual(hers, dict(mine, sync_id=hers["sync_id"]))  # new to her as to me: nothing a duplicate
        self.assertEqual(mine["duplicates"], 0)
        for section in hr.SECTIONS:
            if section.name in ("medications", "routes") or section.name in OTHER_APP_SECTIONS:  # not in this payload
                continue
            with self.subTest(section=section.name):
                self.assertEqual(self.query(f"SELECT person, count(*) FROM {section.table} GROUP BY person"),
                                 [(1, self.count(section.table) // 2), (2, self.count(section.table) // 2)])
                self.assertGreater(self.count(section.table), 0)
        self.post(household_payload("Q", 2149, 61, "B-"), bearer(ANN_KEY))
        me, ann = self.summary_of(TOKEN), self.summary_of(ANN_KEY)
        self.assertEqual((me["person"], ann["person"]), ("me", "ann"))
        self.assertEqual(self.tiles(me)["Steps"], 8700)
        self.assertEqual(self.tiles(ann)["Steps"], 8700 + 2149)
        self.assertEqual(self.tiles(me)["Resting heart rate"], 54)
        self.assertEqual(self.tiles(ann)["Resting heart rate"], 57.5)
        self.assertEqual([workout["uuid"] for workout in me["workouts"]], ["P-W"])
        self.assertEqual(sorted(workout["uuid"] for workout in ann["workouts"]), ["P-W", "Q-W"])
        self.assertEqual(([m["taken"] for m in me["medications"]], [m["taken"] for m in ann["medications"]]),
                         ([1], [2]))
        self.assertEqual((me["totals"]["syncs"], ann["totals"]["syncs"]), (1, 2))
        self.assertEqual([sync["id"] for sync in me["syncs"]], [mine["sync_id"]])
        self.assertEqual(len(ann["syncs"]), 2)
        self.assertNotIn(mine["sync_id"], [sync["id"] for sync in ann["syncs"]])
        self.assertEqual(self.request("GET", hr.DEFAULT_PATH, headers=bearer(ANN_KEY))[2]["last_sync"]["id"],
                         ann["syncs"][0]["id"])
        for name, blood in (("me", "A+"), ("ann", "B-")):
            code, out, err = run_main("export", "--db", self.db, "--section", "characteristics", "--person", name,
                                      "--format", "ndjson")
            self.assertEqual((code, [json.loads(line)["value"] for line in out.splitlines()]), (0, [blood]), err)
        # Her retry of her own sync is answered from its record; of mine it is not hers to repeat.
        body = encode(first)
        retry = self.request("POST", body=body, headers=bearer(ANN_KEY))[2]
        self.assertEqual(self.query("SELECT same_body_as FROM syncs WHERE id = ?", (retry["sync_id"],)),
                         [(hers["sync_id"],)])

    def test_a_person_reads_only_their_own_pages_and_an_admin_everyones_with_the_switcher(self):
        self.post(household_payload("P", 8700, 54, "A+"), bearer(TOKEN))
        self.post(household_payload("Q", 2149, 61, "B-", "HKQuantityTypeIdentifierBodyMass"), bearer(ANN_KEY))
        nobody = self.request("GET", "/?person=nobody", headers=login(ANN_KEY))
        for path in ("/type/BodyMass", "/type/BodyMass.csv", "/workout/P-W", "/?person=me", "/?person=nobody",
                     f"{hr.SUMMARY_PATH}?person=me", "/fields?person=me"):
            with self.subTest(path=path):
                status, _, answer = self.request("GET", path, headers=login(TOKEN if "BodyMass" in path
                                                                                 else ANN_KEY))
                self.assert_error(status, 404, answer)
                if "person=" in path:  # whether the name is someone's does not show
                    self.assertEqual(answer, nobody[2])
        self.assertIn("Body mass", self.request("GET", "/type/BodyMass", headers=login(ANN_KEY))[2].decode())
        page = self.request("GET", "/", headers=login(ANN_KEY))[2].decode()
        self.assertIn("Data of <b>ann</b>", page)
        self.assertNotIn("person=", page)  # nobody else to choose
        status, _, page = self.request("GET", "/?person=ann&range=7d", headers=login(TOKEN))
        page = page.decode()
        self.assertEqual(status, 200)
        self.assertIn('<nav aria-label="person"><span class="muted">Data of</span><a href="/?range=7d&amp;person=me">'
                      'me</a><b>ann</b></nav>', page)
        self.assertIn('href="/workout/Q-W?person=ann"', page)
        self.assertIn('href="/type/BodyMass?range=7d&amp;person=ann"', page)
        # A type's page switches to the same type's page of another person.
        page = self.request("GET", "/type/BodyMass?person=ann&range=7d", headers=login(TOKEN))[2].decode()
        self.assertIn('<a href="/type/BodyMass?range=7d&amp;person=me">me</a><b>ann</b>', page)
        for path in ("/workout/Q-W?person=ann", "/type/BodyMass?person=ann", "/type/BodyMass.csv?person=ann",
                     "/fields?person=ann"):
            with self.subTest(admin=path):
                self.assertEqual(self.request("GET", path, headers=login(TOKEN))[0], 200)
        self.assertEqual(self.request("GET", "/workout/Q-W", headers=login(TOKEN))[0], 404)  # not the admin's own
        csv_text = self.request("GET", "/type/BodyMass.csv?person=ann", headers=login(TOKEN))[2].decode()
        self.assertIn("Q-X", csv_text)

    def test_a_persons_backup_holds_their_rows_alone_and_verifies(self):
        self.post(household_payload("P", 8700, 54, "A+"), bearer(TOKEN))
        self.post(household_payload("Q", 2149, 61, "B-"), bearer(ANN_KEY))
        folder = os.path.join(self.tmp.name, "backups")
        os.mkdir(folder)
        code, out, err = run_main("backup", folder, "--db", self.db, "--person", "ann", "--keep", "1")
        self.assertEqual(code, 0, err)
        [name] = os.listdir(folder)
        self.assertRegex(name, r"^health-ann-[0-9]{8}T[0-9]{6}Z\.db$")
        path = os.path.join(folder, name)
        with open(path, "rb") as handle:
            content = handle.read()
        self.assertIn(b"Q-S", content)
        self.assertNotIn(b"P-S", content)  # not even in a free page
        self.assertNotIn(hashlib.sha256(TOKEN.encode()).hexdigest().encode(), content)
        with contextlib.closing(sqlite3.connect(path)) as conn:
            self.assertEqual(conn.execute("SELECT id, name FROM people").fetchall(), [(2, "ann")])
            self.assertEqual(conn.execute("SELECT DISTINCT person FROM samples").fetchall(), [(2,)])
        self.assertEqual(run_main("verify", path, "--person", "ann")[0], 0)
        # Her copy on its own: she is its first person, whose the key and an import are.
        self.assertEqual(hr.Store(path).first_person().name, "ann")
        payload = os.path.join(self.tmp.name, "more.json")
        with open(payload, "wb") as handle:
            handle.write(encode(household_payload("R", 1, 50, "B-")))
        self.assertEqual(run_main("import", "--db", path, payload)[0], 0)
        with contextlib.closing(sqlite3.connect(path)) as conn:
            self.assertEqual(conn.execute("SELECT DISTINCT person FROM samples").fetchall(), [(2,)])
        self.assertEqual(run_main("verify", "--db", self.db, "--person", "ann")[0], 0)
        self.assertEqual(run_main("verify", "--db", self.db, "--person", "nobody")[0], 1)
        code, out, _ = run_main("stats", "--db", self.db, "--person", "ann")
        self.assertIn("Data of ann", out)
        self.assertRegex(out, r"(?m)^samples +2$")

    def test_a_revoked_key_is_refused_and_the_new_one_taken(self):
        self.assertEqual(self.post(household_payload("P", 1, 50, "O+"), bearer(ANN_KEY))[0], 200)
        code, out, err = run_main("people", "--db", self.db, "key", "ann")
        self.assertEqual(code, 0, err)
        new = out.splitlines()[1]
        for headers in (bearer(ANN_KEY), login(ANN_KEY)):
            self.assertEqual(self.request("GET", "/" if "Basic" in headers["Authorization"] else hr.DEFAULT_PATH,
                                          headers=headers)[0], 401)
        self.assertEqual(self.post(household_payload("Q", 1, 50, "O+"), bearer(ANN_KEY))[0], 401)
        status, _, answer = self.post(household_payload("Q", 1, 50, "O+"), bearer(new))
        self.assertEqual((status, answer["inserted"]["measurements"]), (200, 2))
        self.assertEqual(self.request("GET", hr.DEFAULT_PATH, headers=bearer(new))[2]["person"], "ann")

    def test_an_export_of_everyone_imports_back_into_the_same_people(self):
        self.post(household_payload("P", 8700, 54, "A+"), bearer(TOKEN))
        self.post(household_payload("P", 8700, 54, "A+"), bearer(ANN_KEY))
        self.post(household_payload("Q", 2149, 61, "B-"), bearer(ANN_KEY))
        copy = os.path.join(self.tmp.name, "copy.db")
        files = []
        for section in hr.SECTIONS:
            files.append(os.path.join(self.tmp.name, f"{section.name}.ndjson"))
            code, _, err = run_main("export", "--db", self.db, "--section", section.name, "--format", "ndjson",
                                    "--output", files[-1])
            self.assertEqual(code, 0, err)
        with open(files[0], encoding="utf-8") as handle:
            self.assertEqual({json.loads(line)["person"] for line in handle}, {"me", "ann"})
        code, _, err = run_main("import", "--db", copy, *files)
        self.assertEqual(code, 0, err)

        def rows(path):
            found = {}
            with contextlib.closing(sqlite3.connect(path)) as conn:
                for section in hr.SECTIONS:
                    kept = [name for name, _kind in section.columns]
                    found[section.name] = sorted(conn.execute(
                        f"SELECT p.name, {', '.join('t.' + name for name in kept)} FROM {section.table} AS t"
                        " JOIN people AS p ON p.id = t.person"), key=repr)
            return found

        self.assertEqual(rows(copy), rows(self.db))
        # me: 2 samples, a workout, a dose, a characteristic; ann: twice that, her later blood type
        self.assertEqual(sum(len(found) for found in rows(copy).values()), 5 + 9)
        # ann came back without a key of her own: only her data moved
        self.assertEqual(hr.Store(copy).person("ann").has_key, False)


class KeylessHouseholdTests(ServerTestCase):
    """A receiver without a key of its own (--no-auth): a person's key
    still says whose a sync is."""

    def test_a_persons_key_files_their_sync_under_them(self):
        self.store.add_people(["ann"], [ANN_KEY])
        self.assertEqual(self.post(make_payload(), bearer(ANN_KEY))[0], 200)
        self.assertEqual(self.post(make_payload())[0], 200)
        self.assertEqual(self.query("SELECT person, count(*) FROM samples GROUP BY person"), [(1, 7), (2, 7)])


class KeyReplacedMidSyncTests(ServerTestCase):
    """A person's key replaced (people key) while a sync of theirs arrives."""

    token = TOKEN

    def test_a_sync_whose_key_was_replaced_before_its_body_was_complete_stores_nothing(self):
        self.store.add_people(["ann"], [ANN_KEY])
        body = encode(make_payload(n=2000, tag="K"))
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(f"POST {hr.DEFAULT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ANN_KEY}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                         "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode())
            self.assertTrue(sock.recv(100).startswith(b"HTTP/1.1 100 "))  # admitted with her key
            self.store.set_key("ann", "ann-new-" + "Qz7" * 10)
            sock.sendall(body)
            answer = b"".join(iter(lambda: sock.recv(65536), b""))
        [(status, _head, text)] = answers(answer)
        self.assertEqual(status, 503)
        self.assertIn("replaced", json.loads(text)["error"])
        self.assertEqual(self.count("samples"), 0)
        self.assertEqual(self.query("SELECT status, person FROM syncs"), [("failed", 2)])
        self.assertEqual(self.post(make_payload(tag="K"), bearer(ANN_KEY))[0], 401)  # and its retry is refused
        self.assertEqual(self.post(make_payload(tag="K"), bearer("ann-new-" + "Qz7" * 10))[0], 200)


class PeopleCommandTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.db = os.path.join(self.tmp.name, "health.db")

    def people(self, *argv):
        return run_main("people", "--db", self.db, *argv)

    def test_people_are_added_listed_given_keys_renamed_and_removed(self):
        code, out, err = self.people("add", "bob")
        self.assertEqual(code, 0, err)
        key = out.splitlines()[1]
        self.assertGreaterEqual(len(key), hr.KEY_CHARACTERS_MIN)
        self.assertEqual(stat.S_IMODE(os.stat(self.db).st_mode), 0o600)
        with open(self.db, "rb") as handle:
            stored = handle.read()
        self.assertNotIn(key.encode(), stored)  # only its hash
        self.assertIn(hashlib.sha256(key.encode()).hexdigest().encode(), stored)
        self.assertEqual(hr.Store(self.db).person_of_key(key).name, "bob")
        self.assertEqual(self.people("add", "bob")[0], 2)
        self.assertEqual(self.people("add", "no spaces")[0], 2)
        code, out, err = self.people("add", "--many", "3", "--prefix", "p")
        self.assertEqual(code, 0, err)
        table = list(csv.reader(io.StringIO(out)))
        self.assertEqual([row[0] for row in table], ["name", "p1", "p2", "p3"])
        self.assertEqual(len({row[1] for row in table[1:]}), 3)
        self.assertTrue(all(hr.Store(self.db).person_of_key(k).name == n for n, k in table[1:]))
        keys_file = os.path.join(self.tmp.name, "keys.csv")
        code, out, err = self.people("add", "--many", "2", "--prefix", "q", "--output", keys_file)
        self.assertEqual((code, out), (0, ""), err)
        self.assertEqual(stat.S_IMODE(os.stat(keys_file).st_mode), 0o600)
        with open(keys_file, encoding="utf-8", newline="") as handle:
            text = handle.read()
        self.assertEqual([row[0] for row in csv.reader(io.StringIO(text))], ["name", "q1", "q2"])
        self.assertNotIn("\r", text)  # a key copied from a line takes no CR with it
        self.assertEqual(self.people("add", "--many", "2", "--prefix", "r", "--output", keys_file)[0], 2)  # exists
        self.assertIsNone(hr.Store(self.db).person("r1"))
        for name in ("q1", "q2"):
            hr.Store(self.db).remove_person(name)
        code, out, _ = self.people("list", "--json")
        listed = json.loads(out)
        self.assertEqual([(p["name"], p["admin"], p["has_key"], p["rows"]) for p in listed],
                         [("me", True, False, 0), ("bob", False, True, 0)] + [(f"p{i}", False, True, 0)
                                                                             for i in (1, 2, 3)])
        code, out, _ = self.people("list")
        self.assertRegex(out, r"^Times in this machine's time zone \([^)]+\)\.\n")
        self.assertRegex(out, r"(?m)^bob .* 0  own$")
        code, out, _ = self.people("key", "bob")
        self.assertEqual(code, 0)
        self.assertIsNone(hr.Store(self.db).person_of_key(key))
        self.assertEqual(hr.Store(self.db).person_of_key(out.splitlines()[1]).name, "bob")
        self.assertEqual(self.people("key", "nobody")[0], 1)
        self.assertEqual(self.people("rename", "bob", "robert")[0], 0)
        self.assertEqual(self.people("rename", "robert", "p1")[0], 2)
        self.assertEqual(self.people("remove", "me")[0], 2)  # the first person owns the receiver's key
        self.assertEqual(self.people("remove", "robert")[:2], (0, "Removed robert.\n"))
        self.assertEqual([p.name for p in hr.Store(self.db).people()], ["me", "p1", "p2", "p3"])

    def test_a_removed_persons_id_is_never_given_again_nor_their_sync_stored(self):
        store = hr.Store(self.db)
        store.open()
        self.addCleanup(store.close)
        store.add_people(["bob"], [ANN_KEY])
        bob = store.person("bob").id
        store.remove_person("bob")
        store.add_people(["carol"], [None])
        self.assertGreater(store.person("carol").id, bob)
        with self.assertRaisesRegex(hr.StorageUnavailable, "removed"):
            hr.SyncIntake(store).ingest([encode(make_payload())], "test", person=bob)
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            self.assertEqual(conn.execute("SELECT count(*) FROM samples").fetchone(), (0,))
            self.assertEqual(conn.execute("SELECT count(*) FROM syncs").fetchone(), (0,))

    def test_a_person_with_data_is_removed_only_with_it_and_a_confirmation(self):
        store = hr.Store(self.db)
        store.open()
        store.add_people(["bob"], [ANN_KEY])
        bob = store.person("bob").id
        intake = hr.SyncIntake(store)
        theirs = make_payload()
        theirs["data"]["HKQuantityTypeIdentifierHeartRate"].append(sample("B-bad", "yesterday", 1))
        self.assertEqual(intake.ingest([encode(theirs)], "test", person=bob).rejected, 1)
        mine = intake.ingest([encode(make_payload())], "test")
        store.close()
        code, _, err = self.people("remove", "bob")
        self.assertEqual(code, 2)
        self.assertIn("--delete-data", err)
        code, _, err = self.people("remove", "bob", "--delete-data")  # no terminal to confirm on
        self.assertEqual(code, 2)
        self.assertIn("--yes", err)
        code, out, err = self.people("remove", "bob", "--delete-data", "--yes")
        self.assertEqual(code, 0, err)
        self.assertIn("rows of their data", out)
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            for table in hr.OWNED_TABLES + ("syncs",):
                self.assertEqual(conn.execute(f"SELECT count(*) FROM {table} WHERE person = ?", (bob,)).fetchone(),
                                 (0,), table)
            self.assertEqual(conn.execute("SELECT count(*) FROM samples").fetchone()[0],
                             mine.inserted["samples"])
            self.assertEqual(conn.execute("SELECT count(*) FROM rejected").fetchone(), (0,))  # theirs went too


# ---------------------------------------------------------------------------
# Other tools: Prometheus, Home Assistant, Grafana, and gaps
# ---------------------------------------------------------------------------

_METRIC_LINE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*)\})?'
                          r" (-?[0-9.e+-]+|[+-]Inf|NaN)\Z")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_exposition(text):
    """The Prometheus text format (0.0.4) read back strictly: {family:
    (type, help, [(name, {label: value}, number)])}; raises AssertionError
    on any line that is not valid, a family without HELP and TYPE before
    its samples, a family met twice or a value that is not finite."""
    families, current = {}, None
    assert text.endswith("\n"), "the text ends with a line feed"
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _hash, word, name, rest = line.split(" ", 3)
            if word == "HELP":
                assert name not in families, f"{name} twice"
                families[name] = [None, rest, []]
                current = name
            else:
                assert current == name and families[name][0] is None, line
                assert rest in ("counter", "gauge", "histogram", "summary", "untyped"), line
                families[name][0] = rest
            continue
        match = _METRIC_LINE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        assert current is not None and families[current][0] is not None, line
        kind = families[current][0]
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        assert any(name == current + suffix for suffix in suffixes), f"{name} outside its family {current}"
        number = float(value)
        assert math.isfinite(number), line
        parsed = {key: raw.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
                  for key, raw in _LABEL.findall(labels or "")}
        families[current][2].append((name, parsed, number))
    return {name: tuple(family) for name, family in families.items()}


class NoticeDestination:
    """A local HTTP server standing in for ntfy, Gotify or a webhook: it
    records each POST (path, headers, body); while ``gate`` is clear it
    holds every request (a destination that hangs)."""

    def __init__(self, status=200):
        self.received = []
        self.gate = threading.Event()
        self.gate.set()
        destination = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                destination.gate.wait(30)
                destination.received.append((self.path, dict(self.headers), body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def url(self, path="/topic-secret"):
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self):
        self.gate.set()
        self.server.shutdown()
        self.thread.join()
        self.server.server_close()


class NoticeFormatTests(unittest.TestCase):
    """Each kind of destination gets a notice in its own form."""

    def setUp(self):
        self.destination = NoticeDestination()
        self.addCleanup(self.destination.close)
        self.notice = hr.Notice("gap_opened", "me: no Heart rate from Jane\u2019s Apple Watch since Dec 02 09:00",
                                "no Heart rate from Jane\u2019s Apple Watch", "2026-12-07T10:00:00.000Z", "me",
                                "type", "HKQuantityTypeIdentifierHeartRate", "Jane\u2019s Apple Watch",
                                "2026-12-02T09:00:00.000Z")

    def post(self, kind, path="/topic-secret?token=abc"):
        self.assertIsNone(hr.post_notice(self.destination.url(path), hr.NOTICE_FORMATS_BY_NAME[kind], self.notice))
        return self.destination.received[-1]

    def test_ntfy_gets_the_message_as_text_and_the_rest_as_headers(self):
        path, headers, body = self.post("ntfy")
        self.assertEqual(path, "/topic-secret?token=abc")
        self.assertEqual(body.decode("utf-8"), self.notice.message)
        self.assertEqual((headers["Priority"], headers["Tags"]), ("high", "warning"))
        title = headers["Title"]  # not ASCII: an RFC 2047 word, as ntfy reads it
        self.assertTrue(title.startswith("=?UTF-8?B?") and title.endswith("?="), title)
        self.assertEqual(base64.b64decode(title[10:-2]).decode("utf-8"), self.notice.title)

    def test_gotify_and_webhooks_get_json(self):
        _path, headers, body = self.post("gotify")
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(json.loads(body), {"title": self.notice.title, "message": self.notice.message,
                                            "priority": 8})
        _path, _headers, body = self.post("webhook")
        self.assertEqual(json.loads(body), self.notice._asdict())

    def test_client_text_cannot_add_a_header_line(self):
        self.notice = self.notice._replace(title="me: no data from Evil\r\nX-Injected: 1")
        _path, headers, _body = self.post("ntfy")
        self.assertNotIn("X-Injected", headers)
        self.assertEqual(headers["Title"], "me: no data from Evil X-Injected: 1")

    def test_a_destination_that_fails_says_where_but_not_its_secret(self):
        error = hr.post_notice(self.destination.url("/topic-secret").replace(
            str(self.destination.server.server_address[1]), "1"), hr.NOTICE_FORMATS[0], self.notice)
        self.assertIn("http://127.0.0.1:1", error)
        self.assertNotIn("topic-secret", error)


class GapNoticeTests(PageTestCase):
    """--notify: a notice when a gap opens, once, and when it closes; a
    destination that hangs never delays a sync."""

    def setUp(self):
        self.destination = NoticeDestination()
        self.addCleanup(self.destination.close)
        self.now = TEST_NOW.replace(minute=0, second=0, microsecond=0)
        super().setUp()

    def server_options(self):
        return {"notify_url": self.destination.url(), "notify_format": "webhook", "clock": lambda: self.now}

    def hourly(self, type_name, tag, first, last):
        return {type_name: [sample(f"{tag}-{hours}", (self.now - datetime.timedelta(hours=hours)).strftime(
            "%Y-%m-%dT%H:%M:%S.000Z"), 60) for hours in range(last, first + 1, 3)]}

    def notices(self):
        wait_until(self.server.notifier.idle)
        return [json.loads(body) for _path, _headers, body in self.destination.received]

    def test_a_gap_is_told_once_when_it_opens_and_once_when_it_closes(self):
        data = dict(self.hourly("HKQuantityTypeIdentifierHeartRate", "H", 20 * 24, 1),
                    **self.hourly("HKQuantityTypeIdentifierRespiratoryRate", "R", 20 * 24, 4 * 24))
        self.assertEqual(self.post({"data": data})[0], 200)
        self.server.gaps.check()
        self.server.gaps.check()  # the same gap again: told once
        [opened] = self.notices()
        self.assertEqual((opened["event"], opened["person"], opened["kind"], opened["type"], opened["source"]),
                         ("gap_opened", "me", "type", "HKQuantityTypeIdentifierRespiratoryRate", "Watch"))
        self.assertRegex(opened["title"], r"^me: no Respiratory rate from Watch since ")
        # A receiver started again does not tell it again: what was told is in the database.
        self.assertIn("RespiratoryRate", self.query("SELECT value FROM settings WHERE name = 'notified_gaps'")[0][0])
        self.assertEqual(self.post({"data": self.hourly("HKQuantityTypeIdentifierRespiratoryRate", "R2", 1, 1)})[0],
                         200)
        self.server.gaps.check()
        opened, closed = self.notices()
        self.assertEqual((closed["event"], closed["type"]), ("gap_closed", "HKQuantityTypeIdentifierRespiratoryRate"))
        self.assertIn("Respiratory rate", closed["message"])
        # The status page (an admin's) names the last notice.
        page = self.request("GET", "/")[2].decode()
        self.assertIn("Notices: to http://127.0.0.1:", page)
        self.assertIn("me: data again, delivered", page)
        self.assertNotIn("topic-secret", page)

    def test_no_sync_for_long_is_told_as_time_passes(self):
        for days in range(10):  # a sync a day for ten days, the last one now
            with contextlib.closing(sqlite3.connect(self.db)) as conn, conn:
                conn.execute("INSERT INTO syncs (received_at, status, person) VALUES (?, 'ok', 1)",
                             ((self.now - datetime.timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%S.000Z"),))
        self.server.gaps.check()
        self.assertEqual(self.notices(), [])
        self.now += datetime.timedelta(days=3)  # the clock the receiver reads, moved on
        self.server.gaps.check()
        [opened] = self.notices()
        self.assertEqual((opened["event"], opened["kind"]), ("gap_opened", "sync"))

    def test_a_destination_that_hangs_never_delays_a_sync(self):
        self.destination.gate.clear()  # every notice waits until the test lets it go
        data = dict(self.hourly("HKQuantityTypeIdentifierHeartRate", "H", 20 * 24, 1),
                    **self.hourly("HKQuantityTypeIdentifierRespiratoryRate", "R", 20 * 24, 4 * 24))
        self.assertEqual(self.post({"data": data})[0], 200)
        self.server.gaps.check()
        wait_until(lambda: not self.server.notifier.queue)  # the notifier sends it, waiting for an answer
        for number in range(3):  # syncs go on, answered, while it waits
            status, _, answer = self.post({"data": self.hourly("HKQuantityTypeIdentifierHeartRate", f"N{number}",
                                                                 0, 0)})
            self.assertEqual((status, answer["inserted"]["measurements"]), (200, 1))
        self.assertEqual(self.destination.received, [])
        self.destination.gate.set()
        self.assertEqual([notice["event"] for notice in self.notices()], ["gap_opened"])


class NoticeDeliveryTests(unittest.TestCase):
    """A notice that cannot be delivered is tried again a bounded number of
    times, logged, and the status says so; backups that fail are told."""

    def test_an_undeliverable_notice_is_tried_three_times_then_logged(self):
        lines = []
        notifier = hr.Notifier("http://127.0.0.1:1/topic-secret", hr.NOTICE_FORMATS[0],
                               lambda line, error: lines.append((line, error)), pause=0.01)
        notifier.start()
        self.addCleanup(notifier.stop)
        notifier.send(hr.Notice("test", "a title", "a message", "2026-12-07T10:00:00.000Z"))
        wait_until(lambda: len(lines) == hr.NOTICE_ATTEMPTS)
        self.assertEqual([error for _line, error in lines], [True] * hr.NOTICE_ATTEMPTS)
        self.assertIn(f"(try {hr.NOTICE_ATTEMPTS} of {hr.NOTICE_ATTEMPTS})", lines[-1][0])
        self.assertFalse(any("topic-secret" in line for line, _error in lines))
        self.assertEqual((notifier.status()["last"]["delivered"], notifier.status()["last"]["attempts"]),
                         (False, hr.NOTICE_ATTEMPTS))

    def test_a_failed_backup_is_told(self):
        destination = NoticeDestination()
        self.addCleanup(destination.close)
        with tempfile.TemporaryDirectory() as folder:
            db = os.path.join(folder, "health.db")
            hr.Store(db).open()
            notifier = hr.Notifier(destination.url(), hr.NOTICE_FORMATS_BY_NAME["webhook"], lambda *args: None)
            notifier.start()
            self.addCleanup(notifier.stop)
            backups = os.path.join(folder, "backups")
            os.mkdir(backups)
            schedule = hr.BackupSchedule(db, backups, 3600, 2, lambda *args: None, lambda reason: notifier.send(
                hr.Notice("backup_failed", "A backup failed", reason, "2026-12-07T10:00:00.000Z")))
            os.rmdir(backups)  # the folder went away (a disk unplugged)
            self.assertIsNone(schedule.run_once())
            wait_until(lambda: destination.received)
            self.assertEqual(json.loads(destination.received[0][2])["event"], "backup_failed")

    def test_notify_test_says_whether_the_notice_arrived(self):
        destination = NoticeDestination()
        self.addCleanup(destination.close)
        code, out, _err = run_main("notify", "test", "--notify", destination.url(), "--notify-format", "gotify")
        self.assertEqual((code, out), (0, f"Sent to http://127.0.0.1:{destination.server.server_address[1]} "
                                          "(gotify).\n"))
        self.assertEqual(json.loads(destination.received[0][2])["title"], "Health receiver: a test notice")
        code, out, _err = run_main("notify", "test", "--notify", "http://127.0.0.1:1/topic-secret")
        self.assertEqual(code, 1)
        self.assertTrue(out.startswith("FAILED: the notice was not delivered: http://127.0.0.1:1"), out)
        self.assertNotIn("topic-secret", out)
        code, _out, err = run_main("notify", "test", "--notify", "ftp://secret@host/x")
        self.assertEqual(code, 2)
        self.assertNotIn("secret", err)


class OtherToolsTests(StepsTestCase):
    """/metrics, /api/latest and /api/series on a walk two devices counted."""

    token = TOKEN
    #: Today's samples are at 00:10 to 00:40.
    clock_start = TEST_NOON

    def setUp(self):
        super().setUp()
        self.store.add_people(["ann"], [ANN_KEY])

    def request(self, method, path=hr.DEFAULT_PATH, body=None, headers=None, conn=None):
        """As the first person unless ``headers`` says otherwise ({}: no key)."""
        return super().request(method, path, body, bearer(TOKEN) if headers is None else headers, conn)

    def get(self, path, key=TOKEN):
        return self.request("GET", path, headers=bearer(key))

    def test_a_metric_not_declared_is_an_error_not_a_missing_series(self):
        self.assertEqual(hr.exposition({"health_today_value": [("", {"type": "Steps"}, 5)]}),
                         "# HELP health_today_value " + hr.METRICS_BY_NAME["health_today_value"].help
                         + '\n# TYPE health_today_value gauge\nhealth_today_value{type="Steps"} 5\n')
        with self.assertRaisesRegex(ValueError, "health_today_valu$"):
            hr.exposition({"health_today_valu": [("", {}, 5)]})

    def test_metrics_are_valid_exposition_with_each_persons_values(self):
        day = self.post_walk()
        today = TEST_NOON.strftime("%Y-%m-%d")
        hostile = 'Jane "quoted" \\ back\nslash'
        self.post({"syncSource": hostile, "data": {"HKQuantityTypeIdentifierStepCount": [
            span("T-1", f"{today}T00:10:00Z", f"{today}T00:20:00Z", 1234, "count", source="Jane's Apple Watch")],
            "HKQuantityTypeIdentifierHeartRate": [sample("H-1", f"{today}T00:30:00Z", 61)]}})
        self.post({"data": {"HKQuantityTypeIdentifierHeartRate": [sample("H-2", f"{today}T00:30:00Z", 70)]}},
                  bearer(ANN_KEY))
        # A sync without a source and one with an empty one; a type whose short name is another's.
        self.post({"syncSource": "", "data": {"StepCount": [sample("X-1", f"{today}T00:40:00Z", 5, "count")]}})
        status, response, body = self.get(hr.METRICS_PATH)
        self.assertEqual(status, 200)
        self.assertEqual(response.getheader("Content-Type"), "text/plain; version=0.0.4; charset=utf-8")
        self.assertEqual(response.getheader("Cache-Control"), "no-store")
        families = parse_exposition(body.decode("utf-8"))
        self.assertEqual(set(families) - set(hr.METRICS_BY_NAME), set())
        for name, (kind, _help, samples) in families.items():
            self.assertEqual(kind, hr.METRICS_BY_NAME[name].kind)
            keys = [(sample_name, tuple(sorted(labels.items()))) for sample_name, labels, _value in samples]
            self.assertEqual(len(keys), len(set(keys)), name)

        def value(name, **labels):
            return [number for _name, found, number in families[name][2] if labels.items() <= found.items()]

        self.assertEqual(value("health_today_value", person="me", type="StepCount"), [1234])
        self.assertEqual(value("health_latest_value", person="me", type="HeartRate"), [61])
        self.assertEqual(value("health_latest_value", person="ann", type="HeartRate"), [70])
        self.assertEqual(value("health_receiver_syncs_total", person="me", status="ok"), [3])
        self.assertEqual(len(value("health_latest_value", person="me", type="StepCount")), 1)
        self.assertEqual(value("health_latest_value", person="me", type="data.StepCount"), [5])
        self.assertEqual(value("health_receiver_last_sync_timestamp_seconds", person="me", sync_source=hostile)[0] > 0,
                         True)
        buckets = [number for name, labels, number in families["health_receiver_sync_duration_seconds"][2]
                   if name.endswith("_bucket") and labels["person"] == "me"]
        self.assertEqual(buckets, sorted(buckets))
        self.assertEqual(buckets[-1], value("health_receiver_sync_duration_seconds", person="me")[-1])  # _count
        # ann reads hers alone; another's is 404, no key 401
        families = parse_exposition(self.get(hr.METRICS_PATH, ANN_KEY)[2].decode())
        self.assertEqual({labels["person"] for _n, labels, _v in families["health_receiver_rows"][2]}, {"ann"})
        self.assertEqual(self.get(hr.METRICS_PATH + "?person=me", ANN_KEY)[0], 404)
        self.assertEqual(self.request("GET", hr.METRICS_PATH, headers={})[0], 401)
        self.assertEqual({labels["person"] for _n, labels, _v in parse_exposition(self.get(
            hr.METRICS_PATH + "?person=ann")[2].decode())["health_receiver_rows"][2]}, {"ann"})
        self.assertEqual(day < TEST_NOON.date() + datetime.timedelta(days=1), True)

    def test_latest_and_series_give_the_numbers_of_the_page(self):
        day = self.post_walk()
        status, _, latest = self.get(hr.LATEST_PATH)
        self.assertEqual(status, 200)
        self.assertEqual(latest["person"], "me")
        self.assertNotIn("SleepAnalysis", latest["latest"])
        steps = latest["latest"]["StepCount"]
        self.assertEqual((steps["value"], steps["unit"], steps["source"]), (1000, "count", "Jane's Apple Watch"))
        self.assertEqual(latest["today"]["StepCount"]["value"], 0)  # the walk was two days ago
        self.assertEqual(latest["last_sync"]["records"], 4)
        for _ in range(21):  # failed syncs after it do not hide it
            self.post(b"{broken")
        self.assertEqual(self.get(hr.LATEST_PATH)[2]["last_sync"]["id"], latest["last_sync"]["id"])
        page_total = self.day_totals()[day.isoformat()]
        status, _, rows = self.get(f"{hr.SERIES_PATH}?type=StepCount&from={day}&to={day}")
        self.assertEqual((status, rows), (200, [{"time": f"{day}T00:00:00.000Z", "value": 4000.0}]))
        self.assertEqual(round(page_total, 6), 4000)
        start = int(datetime.datetime(day.year, day.month, day.day, 7, tzinfo=datetime.timezone.utc).timestamp() * 1000)
        status, response, text = self.get(f"{hr.SERIES_PATH}?type=stepcount&grain=hour&format=csv"
                                          f"&from={start}&to={start + 2 * 3600 * 1000}")
        self.assertEqual(status, 200)
        self.assertTrue(response.getheader("Content-Type").startswith("text/csv"))
        rows = list(csv.reader(io.StringIO(text.decode())))
        self.assertEqual(rows[0], ["time", "value"])
        self.assertEqual([row[0] for row in rows[1:]], [f"{day}T07:00:00.000Z", f"{day}T08:00:00.000Z"])
        self.assertAlmostEqual(sum(float(row[1]) for row in rows[1:]), 4000)
        for query, code in (("type=StepCount&grain=minute", 400), ("type=StepCount&from=yesterday", 400),
                            ("grain=day", 400), ("type=NoSuchType", 404),
                            ("type=StepCount&grain=hour&from=2000-01-01", 400),
                            ("type=StepCount&to=253402300799999", 400),
                            ("type=StepCount&grain=day&from=0000000000000&to=253370764800000", 400),
                            ("type=StepCount&from=2026-02-02&to=2026-02-01", 400)):
            with self.subTest(query=query):
                status, _, answer = self.get(f"{hr.SERIES_PATH}?{query}")
                self.assert_error(status, code, answer)
        self.assertEqual(self.get(f"{hr.SERIES_PATH}?type=StepCount", ANN_KEY)[0], 404)  # not hers
        # A type named with a line break and a header, and one not in Latin-1: the header stays one header.
        today = TEST_NOON.strftime("%Y-%m-%d")
        for name in ("Bad\r\nX-Injected: 1", "\u6b65\u6570"):
            self.post({"data": {name: [sample(None, f"{today}T00:00:00Z", 1, "count")]}})
            status, response, _ = self.get(f"{hr.SERIES_PATH}?type={quote(name, safe='')}")
            self.assertEqual((status, response.getheader("X-Injected")), (200, None))
            self.assertEqual(unquote(response.getheader("X-Health-Type")), name)
        self.assertEqual(self.get(f"{hr.LATEST_PATH}?person=me", ANN_KEY)[0], 404)
        self.assertEqual(self.request("GET", hr.LATEST_PATH, headers={})[0], 401)

    def test_series_bounds_in_unix_seconds_or_milliseconds(self):
        day = self.post_walk()
        start = int(datetime.datetime(day.year, day.month, day.day, 7, tzinfo=datetime.timezone.utc).timestamp())
        in_ms = self.get(f"{hr.SERIES_PATH}?type=StepCount&grain=hour&from={start * 1000}&to={(start + 7200) * 1000}")
        in_s = self.get(f"{hr.SERIES_PATH}?type=StepCount&grain=hour&from={start}&to={start + 7200}")
        self.assertEqual((in_s[0], in_s[2]), (200, in_ms[2]))
        self.assertEqual([row["time"] for row in in_s[2]], [f"{day}T07:00:00.000Z", f"{day}T08:00:00.000Z"])
        for bound in ("\u0661" * 10, "2026"):  # digits that are not ASCII's; a year alone
            with self.subTest(bound=bound):
                status, _, answer = self.get(f"{hr.SERIES_PATH}?type=StepCount&from={quote(bound)}")
                self.assert_error(status, 400, answer, "seconds or milliseconds")

    def test_every_type_has_a_key_of_its_own_in_latest_and_metrics(self):
        today = TEST_NOON.strftime("%Y-%m-%d")
        names = ("HKQuantityTypeIdentifierStepCount", "StepCount", "data.StepCount",
                 "HKCategoryTypeIdentifierStepCount")
        self.post({"data": {name: [sample(f"K-{n}", f"{today}T00:0{n}:00Z", n + 1, "count")]
                            for n, name in enumerate(names)}})
        latest = self.get(hr.LATEST_PATH)[2]["latest"]
        self.assertEqual({key: value["type"] for key, value in latest.items()},
                         {"StepCount": names[0], "HKCategoryTypeIdentifierStepCount": names[3],
                          "data.StepCount": names[2], "data.data.StepCount": names[1]})
        families = parse_exposition(self.get(hr.METRICS_PATH)[2].decode())
        keys = [labels["type"] for _name, labels, _value in families["health_latest_timestamp_seconds"][2]
                if labels["person"] == "me"]
        self.assertEqual(sorted(keys), sorted(latest))
        self.assertEqual(hr.type_keys(["StepCount", names[0]]), {names[0]: "StepCount", "StepCount": "data.StepCount"})

    def test_a_gap_appears_when_a_type_stops_and_goes_when_it_arrives(self):
        now = TEST_NOON.replace(minute=0, second=0, microsecond=0)

        def hourly(type_name, tag, first, last, value):
            return [sample(f"{tag}-{hours}", (now - datetime.timedelta(hours=hours)).strftime(
                "%Y-%m-%dT%H:%M:%S.000Z"), value) for hours in range(last, first + 1, 3)]

        data = {"HKQuantityTypeIdentifierHeartRate": hourly("HeartRate", "H", 20 * 24, 1, 60),
                "HKQuantityTypeIdentifierRespiratoryRate": hourly("RespiratoryRate", "R", 20 * 24, 4 * 24, 15)}
        self.post({"data": data})
        gaps = self.get(hr.LATEST_PATH)[2]["gaps"]
        self.assertEqual([(gap["kind"], gap["type"], gap["source"]) for gap in gaps],
                         [("type", "RespiratoryRate", "Watch")])
        self.assertRegex(gaps[0]["message"], r"^no Respiratory rate from Watch since [A-Z][a-z]{2} [0-9]{2} ")
        self.assertIn("<b>Gaps</b>: no Respiratory rate from Watch since", self.page("/"))
        families = parse_exposition(self.get(hr.METRICS_PATH)[2].decode())
        self.assertEqual([labels["type"] for _n, labels, _v in families["health_receiver_data_gaps"][2]],
                         ["RespiratoryRate"])
        self.post({"data": {"HKQuantityTypeIdentifierRespiratoryRate": hourly("RespiratoryRate", "R2", 1, 1, 15)}})
        self.assertEqual(self.get(hr.LATEST_PATH)[2]["gaps"], [])
        self.assertNotIn("<b>Gaps</b>", self.page("/"))
        # Both of the Watch's types stop: one gap, the device's.
        with contextlib.closing(sqlite3.connect(self.db)) as conn, conn:
            conn.execute("DELETE FROM sample_hours WHERE hour >= ?", ((now - datetime.timedelta(days=2)).strftime(
                "%Y-%m-%dT%H"),))
        self.assertEqual([gap["kind"] for gap in self.get(hr.LATEST_PATH)[2]["gaps"]], ["source"])

    def test_a_sample_dated_ahead_of_its_sync_is_kept_but_neither_latest_nor_hiding_a_gap(self):
        now = TEST_NOON.replace(minute=0, second=0, microsecond=0)

        def hours_from_now(hours):
            return (now + datetime.timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%S.000Z")

        heart = [sample(f"H-{hours}", hours_from_now(-hours), 60) for hours in range(4 * 24, 20 * 24, 3)]
        heart.append(sample("H-ahead", "2199-01-01T00:00:00.000Z", 99))  # a clock set far ahead
        breathing = [sample(f"R-{hours}", hours_from_now(-hours), 15) for hours in range(1, 20 * 24, 3)]
        mass = [sample("M-1", hours_from_now(-30), 70, "kg"), sample("M-2", hours_from_now(2), 71, "kg")]
        self.post({"data": {"HKQuantityTypeIdentifierHeartRate": heart,
                            "HKQuantityTypeIdentifierRespiratoryRate": breathing,
                            "HKQuantityTypeIdentifierBodyMass": mass}})
        self.assertEqual(self.query("SELECT count(*) FROM samples WHERE uuid = 'H-ahead'"), [(1,)])  # kept
        latest = self.get(hr.LATEST_PATH)[2]
        self.assertEqual((latest["latest"]["HeartRate"]["value"], latest["latest"]["HeartRate"]["time"]),
                         (60, hours_from_now(-4 * 24)))
        self.assertEqual(latest["latest"]["BodyMass"]["value"], 71)  # two hours ahead: within a day of arrival
        self.assertEqual([(gap["kind"], gap["type"]) for gap in latest["gaps"]], [("type", "HeartRate")])
        families = parse_exposition(self.get(hr.METRICS_PATH)[2].decode())
        self.assertEqual([number for _name, labels, number in families["health_latest_value"][2]
                          if labels["type"] == "HeartRate" and labels["person"] == "me"], [60])
        self.assertEqual([labels["type"] for _n, labels, _v in families["health_receiver_data_gaps"][2]],
                         ["HeartRate"])

    def test_a_device_that_still_sends_other_types_is_named_with_the_types_that_stopped(self):
        now = TEST_NOON.replace(minute=0, second=0, microsecond=0)

        def hours_ago(hours):
            return (now - datetime.timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%S.000Z")

        heart = [sample(f"H-{hours}", hours_ago(hours), 60) for hours in range(4 * 24, 20 * 24, 3)]
        steps = [span(f"S-{hours}", hours_ago(hours), hours_ago(hours), 100, "count") for hours in (1, 5)]
        self.post({"data": {"HKQuantityTypeIdentifierHeartRate": heart, "HKQuantityTypeIdentifierStepCount": steps}})
        gaps = self.get(hr.LATEST_PATH)[2]["gaps"]
        self.assertEqual([(gap["kind"], gap["type"], gap["source"]) for gap in gaps],
                         [("type", "HeartRate", "Watch")])
        self.assertRegex(gaps[0]["message"], r"^no Heart rate from Watch since .* \(it still sends Steps\)$")

    def test_answers_stay_small_with_50000_types(self):
        today = TEST_NOON.strftime("%Y-%m-%d")
        with contextlib.closing(sqlite3.connect(self.db)) as conn, conn:
            conn.executemany("INSERT INTO samples VALUES (1, ?, ?, ?, ?, 1, 'count', 'Watch', '{}', 1, NULL, NULL)",
                             ((f"U-{i}", f"HKQuantityTypeIdentifierType{i}", f"{today}T00:00:00.000Z",
                               f"{today}T00:00:00.000Z") for i in range(50000)))
            conn.execute("INSERT INTO sample_types (person, type, rows, first_date, last_date) SELECT person, type,"
                         " count(*), min(start_date), max(start_date) FROM samples GROUP BY person, type")
        for path in (hr.METRICS_PATH, hr.LATEST_PATH, "/api/summary"):
            with self.subTest(path=path):
                status, _, body = self.get(path)
                self.assertEqual(status, 200)
                self.assertLess(len(body if isinstance(body, bytes) else json.dumps(body)), 64 * 1024)
        self.assertEqual(self.get(hr.LATEST_PATH)[2]["more_types"], 50000 - hr.LATEST_TYPES_MAX)


# ---------------------------------------------------------------------------
# The other app: Health Auto Export's REST format on the same endpoint
# ---------------------------------------------------------------------------
# Fixtures written from that app's documented format (its envelope, metrics
# of every shape, both workout versions, the other collections).

def hae_stamp(moment, twelve_hour=False):
    """A datetime (aware) in that app's form, ``yyyy-MM-dd HH:mm:ss Z`` in
    its own offset, or its 12-hour form with U+202F before am/pm."""
    if twelve_hour:
        hour = moment.hour % 12 or 12
        return (f"{moment:%Y-%m-%d} {hour}:{moment:%M:%S}\u202f{'am' if moment.hour < 12 else 'pm'} "
                f"{moment:%z}")
    return moment.strftime("%Y-%m-%d %H:%M:%S %z")


def hae_metric(name, units, points):
    return {"name": name, "units": units, "data": points}


def hae_point(moment, source="Jane\u2019s Apple Watch", **fields):
    return {"date": hae_stamp(moment), **fields, "source": source}


BERLIN = datetime.timezone(datetime.timedelta(hours=1))
#: 2026-03-10 08:00 in UTC+1: 07:00 UTC.
HAE_MORNING = datetime.datetime(2026, 3, 10, 8, 0, tzinfo=BERLIN)


def hae_workout_v2(workout_id="W-2", start=HAE_MORNING):
    end = start + datetime.timedelta(minutes=30)
    return {"id": workout_id, "name": "Outdoor Run", "start": hae_stamp(start), "end": hae_stamp(end),
            "duration": 1800, "location": "Outdoor", "isIndoor": False,
            "activeEnergyBurned": {"qty": 1255.2, "units": "kJ"}, "distance": {"qty": 3.1, "units": "mi"},
            "heartRate": {"min": {"qty": 101, "units": "count/min"}, "avg": {"qty": 142, "units": "count/min"},
                          "max": {"qty": 171, "units": "count/min"}},
            "heartRateData": [{"date": hae_stamp(start + datetime.timedelta(minutes=m)), "Min": 120 + m,
                               "Avg": 130 + m, "Max": 140 + m, "units": "count/min", "source": "Apple Watch"}
                              for m in range(3)],
            "stepCount": [{"date": hae_stamp(start + datetime.timedelta(minutes=m)), "qty": 150 + m, "units": "count",
                           "source": "Apple Watch"} for m in range(2)],
            "route": [{"latitude": 52.52 + i / 1e4, "longitude": 13.40 + i / 1e4, "altitude": 34.0 + i, "speed": 3.1,
                       "course": 90.0, "horizontalAccuracy": 3.5, "verticalAccuracy": 2.0,
                       "timestamp": hae_stamp(start + datetime.timedelta(seconds=5 * i))} for i in range(4)]}


def hae_workout_v1(start=HAE_MORNING + datetime.timedelta(hours=3)):
    return {"name": "Walking", "start": hae_stamp(start), "end": hae_stamp(start + datetime.timedelta(minutes=20)),
            "duration": 1200, "activeEnergy": {"qty": 90, "units": "kcal"},
            "elevation": {"ascent": 12, "descent": 11, "units": "m"},
            "route": [{"lat": 52.5, "lon": 13.4, "altitude": 30, "timestamp": hae_stamp(start)},
                      {"lat": 52.6, "lon": 13.5, "altitude": 31, "timestamp": hae_stamp(start +
                                                                                     datetime.timedelta(seconds=5))}]}


class OtherAppWalkerTests(unittest.TestCase):
    """Every shape of that app's metrics, read without a socket."""

    def rows(self, metrics, **data):
        rows, _payload = walk({"data": {"metrics": metrics, **data}})
        return rows

    def test_dates_in_that_apps_forms(self):
        self.assertEqual(hr.utc_date("2026-11-30 08:01:00 +0100"), "2026-11-30T07:01:00.000Z")
        self.assertEqual(hr.hae_date("2026-11-30 08:01:00 +0100"), "2026-11-30T07:01:00.000Z")
        self.assertEqual(hr.utc_date("2024-09-21 7:57:00\u202fam +1000"), "2024-09-20T21:57:00.000Z")
        self.assertEqual(hr.utc_date("2024-09-21 7:57:00 PM +1000"), "2024-09-21T09:57:00.000Z")
        self.assertEqual(hr.utc_date("2024-09-21 12:05:00\u202fam +0000"), "2024-09-21T00:05:00.000Z")
        self.assertEqual(hr.utc_date("2024-09-21 12:05:00\u202fpm +0000"), "2024-09-21T12:05:00.000Z")
        self.assertEqual(hr.hae_date("2024-09-21 05:30:00 +0530"), "2024-09-21T00:00:00.000Z")  # not whole hours
        self.assertEqual(hr.utc_date("2024-09-21"), "2024-09-21T00:00:00.000Z")
        for text in ("2024-09-21 13:05:00 pm +0000", "2024-09-21 0:05:00 am +0000", "2024-09-21 25:00:00 +0100"):
            self.assertIsNone(hr.utc_date(text), text)
            self.assertIsNone(hr.hae_date(text), text)

    def test_every_metric_name_has_a_type_a_unit_and_a_shape(self):
        self.assertGreaterEqual(len({metric.type for metric in hr.HAE_METRICS.values()}), 100)
        for name, metric in hr.HAE_METRICS.items():
            self.assertTrue(metric.type.startswith(hr.TYPE_PREFIXES), name)
            self.assertIn(metric.shape, hr.POINT_SHAPES, name)
            self.assertTrue(metric.unit is None or metric.unit in hr.UNIT_SIZES or metric.unit in (
                "count", "count/min", "%", "W", "IU", "mmHg"), name)

    def test_quantities_in_the_unit_a_chart_needs_the_sent_one_kept(self):
        rows = self.rows([hae_metric("active_energy", "kJ", [hae_point(HAE_MORNING, qty=41.84)]),
                          hae_metric("walking_running_distance", "mi", [hae_point(HAE_MORNING, qty=1)]),
                          hae_metric("weight_body_mass", "lb", [hae_point(HAE_MORNING, qty=150, source="Scale")]),
                          hae_metric("step_count", "count", [hae_point(HAE_MORNING, qty=12,
                                                                       source="iPhone|Apple Watch")]),
                          hae_metric("body_temperature", "degF", [hae_point(HAE_MORNING, qty=98.6)]),
                          hae_metric("blood_oxygen_saturation", "%", [hae_point(HAE_MORNING, qty=97)])])
        by_type = {row[1]: row for row in rows["samples"]}
        energy = by_type["HKQuantityTypeIdentifierActiveEnergyBurned"]
        self.assertEqual((energy[2], energy[3], energy[5]), ("2026-03-10T07:00:00.000Z", "2026-03-10T07:00:00.000Z",
                                                           "kcal"))
        self.assertAlmostEqual(energy[4], 10.0)
        self.assertEqual(json.loads(energy[7]), {"name": "active_energy", "units": "kJ",
                                                 "date": "2026-03-10 08:00:00 +0100", "qty": 41.84,
                                                 "source": "Jane\u2019s Apple Watch"})
        self.assertAlmostEqual(by_type["HKQuantityTypeIdentifierDistanceWalkingRunning"][4], 1.609344)
        self.assertEqual(by_type["HKQuantityTypeIdentifierDistanceWalkingRunning"][5], "km")
        self.assertAlmostEqual(by_type["HKQuantityTypeIdentifierBodyMass"][4], 68.0388555)
        self.assertEqual(by_type["HKQuantityTypeIdentifierStepCount"][4:7], (12, "count", "iPhone|Apple Watch"))
        self.assertAlmostEqual(by_type["HKQuantityTypeIdentifierBodyTemperature"][4], 37.0)
        self.assertEqual(by_type["HKQuantityTypeIdentifierOxygenSaturation"][4:6], (0.97, "%"))
        self.assertTrue(all(row[0].startswith(hr.HAE_PREFIX) for row in rows["samples"]))
        self.assertNotIn("rejected", rows)

    def test_special_shapes_as_columns_a_chart_can_use(self):
        rows = self.rows([
            hae_metric("heart_rate", "count/min", [hae_point(HAE_MORNING, Min=58, Avg=71.5, Max=96),
                                                   hae_point(HAE_MORNING + datetime.timedelta(minutes=1), qty=64)]),
            hae_metric("blood_pressure", "mmHg", [hae_point(HAE_MORNING, systolic=121, diastolic=79, source="Omron")]),
            hae_metric("blood_glucose", "mmol/L", [hae_point(HAE_MORNING, qty=5.5, mealTime="Before Meal")]),
            hae_metric("insulin_delivery", "IU", [hae_point(HAE_MORNING, qty=4, reason="Bolus")]),
            hae_metric("handwashing", "s", [hae_point(HAE_MORNING, qty=22, value="Complete")]),
            hae_metric("mindful_minutes", "min", [hae_point(HAE_MORNING, qty=10)]),
            hae_metric("apple_stand_hour", "count", [hae_point(HAE_MORNING, qty=3)]),
            hae_metric("sexual_activity", "count", [hae_point(HAE_MORNING, **{"Protection Used": 1})]),
            hae_metric("a_metric_of_a_later_version", "zz", [hae_point(HAE_MORNING, qty=3)])])
        samples = rows["samples"]

        def of(short):
            return [row for row in samples if hr.short_type_name(row[1]) == short]

        (summarised, plain) = of("HeartRate")
        self.assertEqual((summarised[4], summarised[8], summarised[9]), (71.5, 58, 96))
        self.assertEqual((plain[4], plain[8], plain[9]), (64, None, None))
        self.assertEqual([row[4] for row in of("BloodPressureSystolic") + of("BloodPressureDiastolic")], [121, 79])
        self.assertEqual(of("BloodPressureSystolic")[0][6], "Omron")
        self.assertAlmostEqual(of("BloodGlucose")[0][4], 99.0858)
        self.assertEqual(of("BloodGlucose")[0][5], "mg/dL")
        self.assertIn('"mealTime":"Before Meal"', of("BloodGlucose")[0][7])
        self.assertIn('"reason":"Bolus"', of("InsulinDelivery")[0][7])
        self.assertEqual(of("HandwashingEvent")[0][4], "Complete")
        mindful = of("MindfulSession")[0]
        self.assertEqual((mindful[2], mindful[3]), ("2026-03-10T07:00:00.000Z", "2026-03-10T07:10:00.000Z"))
        self.assertEqual([row[4] for row in of("AppleStandHour")], [0, 0, 0])
        self.assertEqual(len({row[0] for row in of("AppleStandHour")}), 3)
        self.assertEqual([row[4] for row in of("SexualActivity")], ["Protection Used"])
        self.assertEqual(of("a_metric_of_a_later_version")[0][4:6], (3, "zz"))

    def test_the_three_sleep_shapes(self):
        night = datetime.datetime(2026, 3, 9, 23, 0, tzinfo=BERLIN)
        stages = [{"startDate": hae_stamp(night), "endDate": hae_stamp(night + datetime.timedelta(hours=2)),
                   "qty": 2, "value": "Core", "source": "Apple Watch"},
                  {"startDate": hae_stamp(night + datetime.timedelta(hours=2)),
                   "endDate": hae_stamp(night + datetime.timedelta(hours=3)), "qty": 1, "value": "Deep",
                   "source": "Apple Watch"}]
        later = {"date": "2026-03-10", "totalSleep": 7.0, "core": 4.0, "deep": 1.0, "rem": 2.0, "awake": 0.5,
                 "asleep": 0, "inBed": 7.5, "sleepStart": hae_stamp(night), "sleepEnd": hae_stamp(
                     night + datetime.timedelta(hours=7.5)), "source": "Apple Watch"}
        older = {"date": "2026-03-10", "asleep": 6.5, "inBed": 7.0, "sleepStart": hae_stamp(night),
                 "sleepEnd": hae_stamp(night + datetime.timedelta(hours=7)), "inBedStart": hae_stamp(night),
                 "inBedEnd": hae_stamp(night + datetime.timedelta(hours=7)), "sleepSource": "Sleep App",
                 "inBedSource": "Sleep App"}
        bare = {"date": "2026-03-10", "totalSleep": 6, "asleep": 6, "source": "Ring"}
        rows = self.rows([hae_metric("sleep_analysis", "hr", stages + [later, older, bare])])["samples"]
        intervals = [row for row in rows if row[0].startswith(hr.HAE_PREFIX)]
        self.assertEqual([(row[2], row[3], row[4]) for row in intervals],
                         [("2026-03-09T22:00:00.000Z", "2026-03-10T00:00:00.000Z", "Core"),
                          ("2026-03-10T00:00:00.000Z", "2026-03-10T01:00:00.000Z", "Deep")])
        totals = {(row[6], row[4]): (row[2], row[3]) for row in rows if row[0].startswith(hr.HAE_NIGHT_PREFIX)}
        self.assertEqual(totals, {
            ("Apple Watch", "Core"): ("2026-03-09T22:00:00.000Z", "2026-03-10T02:00:00.000Z"),
            ("Apple Watch", "Deep"): ("2026-03-09T22:00:00.000Z", "2026-03-09T23:00:00.000Z"),
            ("Apple Watch", "REM"): ("2026-03-09T22:00:00.000Z", "2026-03-10T00:00:00.000Z"),
            ("Apple Watch", "Awake"): ("2026-03-09T22:00:00.000Z", "2026-03-09T22:30:00.000Z"),
            ("Apple Watch", "In Bed"): ("2026-03-09T22:00:00.000Z", "2026-03-10T05:30:00.000Z"),
            ("Sleep App", "Asleep"): ("2026-03-09T22:00:00.000Z", "2026-03-10T04:30:00.000Z"),
            ("Sleep App", "In Bed"): ("2026-03-09T22:00:00.000Z", "2026-03-10T05:00:00.000Z"),
            ("Ring", "Asleep"): ("2026-03-10T00:00:00.000Z", "2026-03-10T06:00:00.000Z")})  # the date's midnight UTC

    def test_keys_in_any_order_the_points_wait_in_a_file_and_give_the_same_rows(self):
        # More than a MiB of points: they wait in a file, not in memory.
        points = [hae_point(HAE_MORNING + datetime.timedelta(minutes=m), qty=m) for m in range(15000)]
        first = self.rows([hae_metric("step_count", "count", points)])["samples"]
        later = self.rows([{"data": points, "units": "count", "name": "step_count"}])["samples"]
        self.assertEqual(len(first), 15000)
        self.assertGreater(sum(len(json.dumps(point)) for point in points), hr.MIB)
        self.assertEqual(later, [(row[:7] + ('{"units":"count","name":"step_count",' + row[7][37:],) + row[8:])
                                 for row in first])
        workout = hae_workout_v2()
        reordered = dict(reversed(list(workout.items())))  # route, series before the id
        self.assertEqual(walk({"data": {"workouts": [workout]}})[0]["routes"],
                         walk({"data": {"workouts": [reordered]}})[0]["routes"])

    def test_what_cannot_be_read_is_kept_with_the_reason(self):
        rows = self.rows([{"units": "count", "data": [hae_point(HAE_MORNING, qty=1)]},
                          hae_metric("step_count", "count", [{"date": "yesterday", "qty": 1}, 7]),
                          "not a metric"],
                         workouts=[{"name": "Run", "start": "soon", "route": [{"lat": 1, "lon": 2}]}])
        self.assertNotIn("samples", rows)
        reasons = sorted((where, reason) for where, reason, _record in rows["rejected"])
        self.assertEqual(reasons, [
            ("metrics", "element is a string, not an object"),
            ("metrics.data", "not read: metric's name is null, not a non-empty string"),
            ("step_count", "date is 'yesterday', not a date"),
            ("step_count", "element is a number, not an object"),
            ("workouts", "start missing or not a date"),
            ("workouts.route", "not read: start missing or not a date")])


class OtherAppTests(StepsTestCase):
    """That app's syncs through the real endpoint: stored as the first
    app's, counted once, shown on the same pages."""

    max_body = 8 * hr.MIB

    def today_at(self, hour, minute=0):
        now = TEST_NOW
        return datetime.datetime(now.year, now.month, now.day, hour, minute, tzinfo=datetime.timezone.utc) \
            - datetime.timedelta(days=1)

    def mixed_body(self):
        """A body of both apps: that app's metrics and collections beside
        the first app's samples, workouts and medications."""
        at = self.today_at(9).astimezone(BERLIN)
        return {"exportDate": hr.utc_now(), "data": {
            "HKQuantityTypeIdentifierStepCount": [span("U-1", f"{at.date()}T06:00:00Z", f"{at.date()}T06:10:00Z",
                                                       500, "count", source="Jane's iPhone")],
            "metrics": [
                hae_metric("step_count", "count", [hae_point(at + datetime.timedelta(minutes=m), qty=100)
                                                   for m in range(3)]),
                hae_metric("heart_rate", "count/min", [hae_point(at, Min=60, Avg=70, Max=90)]),
                hae_metric("active_energy", "kJ", [hae_point(at, qty=418.4)]),
                hae_metric("blood_pressure", "mmHg", [hae_point(at, systolic=120, diastolic=80, source="Omron")])],
            "workouts": [hae_workout_v2(start=at), hae_workout_v1(start=at + datetime.timedelta(hours=2)),
                         {"uuid": "P-W", "workoutActivityType": "cycling", "startDate": f"{at.date()}T05:00:00Z",
                          "endDate": f"{at.date()}T05:30:00Z", "durationSeconds": 1800}],
            "medications": [{"conceptIdentifier": "rx-1", "displayText": "Lisinopril", "hasSchedule": True},
                            {"displayText": "Aspirin", "form": "tablet", "start": hae_stamp(at),
                             "scheduledDate": hae_stamp(at), "status": "Taken", "dosage": "100 mg",
                             "codings": [{"system": "rxnorm", "code": "1191"}]}],
            "stateOfMind": [{"id": "S-1", "start": hae_stamp(at), "end": hae_stamp(at), "kind": "momentaryEmotion",
                             "valence": 0.6, "valenceClassification": "pleasant", "labels": ["calm"],
                             "associations": ["family"]}],
            "symptoms": [{"name": "Headache", "severity": "mild", "start": hae_stamp(at),
                          "end": hae_stamp(at + datetime.timedelta(hours=1)), "userEntered": True, "source": "Health"}],
            "cycleTracking": [{"name": "Menstrual Flow", "value": "light", "start": hae_stamp(at),
                               "end": hae_stamp(at), "source": "Health"}],
            "ecg": [{"start": hae_stamp(at), "end": hae_stamp(at + datetime.timedelta(seconds=30)),
                     "classification": "Sinus Rhythm", "severity": "none", "averageHeartRate": 64,
                     "numberOfVoltageMeasurements": 3, "samplingFrequency": 512,
                     "voltageMeasurements": [{"date": hae_stamp(at), "voltage": v, "units": "\u00b5V"}
                                             for v in (-12.5, 200.25, 31.0)], "source": "Apple Watch"}],
            "heartRateNotifications": [{"start": hae_stamp(at), "end": hae_stamp(at + datetime.timedelta(minutes=10)),
                                        "threshold": 120, "heartRate": [{"hr": 125, "units": "count/min",
                                                                         "timestamp": {"start": hae_stamp(at)}}]}]}}

    def test_a_small_sample_of_three_metrics_and_a_workout_is_stored_not_rejected(self):
        at = self.today_at(7).astimezone(BERLIN)
        status, _, answer = self.post({"data": {"metrics": [
            hae_metric("step_count", "count", [hae_point(at, qty=1200)]),
            hae_metric("heart_rate", "count/min", [hae_point(at, Min=61, Avg=70, Max=88)]),
            hae_metric("weight_body_mass", "kg", [hae_point(at, qty=70.2, source="Scale")])],
            "workouts": [hae_workout_v2(start=at)]}})
        self.assertEqual(status, 200, answer)
        self.assertEqual((answer["ok"], answer["count"], answer["rejected"], answer["duplicates"]), (True, 4, 0, 0))
        self.assertEqual(self.count("rejected"), 0)
        self.assertEqual(self.count("samples"), 3)
        self.assertEqual(self.count("workouts"), 1)

    def test_a_body_mixing_both_apps_is_stored_in_every_table_and_a_resend_is_all_duplicates(self):
        body = self.mixed_body()
        status, _, answer = self.post(body)
        self.assertEqual(status, 200, answer)
        self.assertEqual(answer["rejected"], 0)
        self.assertEqual(self.query("SELECT reason, record FROM rejected"), [])
        counts = self.counts()
        self.assertEqual({table: counts[table] for table in (
            "samples", "workouts", "workout_route_points", "workout_series", "medications", "medication_dose_events",
            "states_of_mind", "symptoms", "cycle_tracking", "ecg_recordings", "ecg_voltages",
            "heart_rate_notifications")}, {
            "samples": 1 + 3 + 1 + 1 + 2, "workouts": 3, "workout_route_points": 4 + 2, "workout_series": 3 + 2,
            "medications": 2, "medication_dose_events": 1, "states_of_mind": 1, "symptoms": 1, "cycle_tracking": 1,
            "ecg_recordings": 1, "ecg_voltages": 3, "heart_rate_notifications": 1})
        self.assertEqual(self.query("SELECT activity_type, duration_seconds FROM workouts ORDER BY start_date"),
                         [("cycling", 1800), ("running", 1800), ("walking", 1200)])
        self.assertEqual(self.query("SELECT series, value, low, high FROM workout_series WHERE series = "
                                    "'heartRateData' ORDER BY date"), [("heartRateData", 130 + m, 120 + m, 140 + m)
                                                                       for m in range(3)])
        self.assertEqual(self.query("SELECT number, voltage, unit FROM ecg_voltages ORDER BY number"),
                         [(1, -12.5, "\u00b5V"), (2, 200.25, "\u00b5V"), (3, 31.0, "\u00b5V")])
        self.assertEqual(self.query("SELECT classification, average_heart_rate FROM ecg_recordings"),
                         [("Sinus Rhythm", 64.0)])
        self.assertEqual(self.query("SELECT medication, log_status FROM medication_dose_events"),
                         [("Aspirin", "taken")])
        self.assertEqual(sorted(self.query("SELECT key, display_text FROM medications")),
                         [("Aspirin", "Aspirin"), ("rx-1", "Lisinopril")])
        self.assertEqual(self.query("SELECT type, value, low, high, unit FROM samples WHERE type LIKE '%HeartRate'"),
                         [("HKQuantityTypeIdentifierHeartRate", 70, 60.0, 90.0, "count/min")])
        status, _, again = self.post(body)
        self.assertEqual(status, 200, again)
        self.assertEqual((again["count"], again["duplicates"], sum(again["inserted"].values())),
                         (answer["count"], answer["count"], 0))
        self.assertEqual(self.counts(), dict(counts, syncs=2))

    def test_a_byte_identical_resend_without_an_export_date_is_answered_from_its_record(self):
        # That app sends no exportDate: a retry is found by its length, and
        # its digest decides.  A body as long that differs is read.
        at = self.today_at(8).astimezone(BERLIN)
        body = encode({"data": {"metrics": [hae_metric("step_count", "count", [
            hae_point(at + datetime.timedelta(minutes=m), qty=100 + m) for m in range(50)])]}})
        status, _, first = self.post(body)
        self.assertEqual((status, first["count"], first["duplicates"]), (200, 50, 0))
        changed = body.replace(b'"qty": 149', b'"qty": 148')
        self.assertEqual((len(changed), changed == body), (len(body), False))
        for sent in (body, changed, changed):
            self.assertEqual(self.post(sent)[0], 200)
        self.assertEqual(self.query("SELECT same_body_as, received, inserted, duplicates FROM syncs ORDER BY id"),
                         [(None, 50, 50, 0), (first["sync_id"], 50, 0, 50), (None, 50, 1, 49), (3, 50, 0, 50)])
        self.assertEqual(self.query("SELECT value FROM samples WHERE type LIKE '%StepCount' ORDER BY start_date"
                                    " DESC LIMIT 1"), [(148,)])

    def test_a_point_sent_again_with_a_new_value_replaces_the_old_one_counted_once(self):
        at = self.today_at(10).astimezone(BERLIN)
        minute = [hae_point(at, qty=40, source="iPhone|Apple Watch")]
        self.assertEqual(self.post({"data": {"metrics": [hae_metric("step_count", "count", minute)]}})[0], 200)
        self.assertEqual(self.day_totals()[str(at.date())], 40)
        minute[0]["qty"] = 65  # the minute grew: the app summarised it again
        status, _, answer = self.post({"data": {"metrics": [hae_metric("step_count", "count", minute)]}})
        self.assertEqual((status, answer["inserted"]["measurements"], answer["duplicates"]), (200, 1, 0))
        self.assertEqual(self.query("SELECT value, source_name FROM samples"), [(65, "iPhone|Apple Watch")])
        self.assertEqual(self.day_totals()[str(at.date())], 65)
        self.assertEqual(self.query("SELECT source FROM sample_sources"), [("iPhone|Apple Watch",)])

    def test_the_pages_series_and_metrics_show_that_apps_data_like_the_first_apps(self):
        at = self.today_at(8)
        day = str(at.date())
        # The same walk as both apps would send it: steps a Watch counted.
        first = {"data": {"HKQuantityTypeIdentifierStepCount": [span(
            f"P-{m}", (at + datetime.timedelta(minutes=m)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            (at + datetime.timedelta(minutes=m, seconds=59)).strftime("%Y-%m-%dT%H:%M:%SZ"), 100 + m, "count",
            source="Apple Watch") for m in range(5)]}}
        self.assertEqual(self.post(first)[0], 200)
        totals = self.day_totals()
        self.tearDown()
        self.setUp()
        other = {"data": {"metrics": [hae_metric("step_count", "count", [
            hae_point((at + datetime.timedelta(minutes=m)).astimezone(BERLIN), qty=100 + m, source="Apple Watch")
            for m in range(5)])]}}
        self.assertEqual(self.post(other)[0], 200)
        self.assertEqual(self.day_totals(), totals)
        self.assertEqual(totals[day], 510)
        status, _, points = self.request("GET", f"{hr.SERIES_PATH}?type=StepCount&from={day}&to={day}&grain=day")
        self.assertEqual((status, [point["value"] for point in points]), (200, [510]))
        self.assertEqual(self.post({"data": {"metrics": [hae_metric("heart_rate", "count/min", [
            hae_point(at.astimezone(BERLIN), Min=55, Avg=66, Max=99)])]}})[0], 200)
        for stat, expected in (("min", 55), ("max", 99), (None, 66)):
            path = f"{hr.SERIES_PATH}?type=HeartRate&from={day}&to={day}&grain=day" + (f"&stat={stat}" if stat else "")
            status, _, points = self.request("GET", path)
            self.assertEqual((status, [point["value"] for point in points]), (200, [expected]), stat)
        page = self.page("/type/StepCount?range=7d")
        self.assertIn("510", page.replace(",", ""))
        status, _, body = self.request("GET", hr.METRICS_PATH)
        self.assertEqual(status, 200)
        self.assertIn('type="HeartRate"', body.decode())

    def test_a_nights_totals_count_once_and_a_grown_night_replaces_the_first(self):
        night = self.today_at(0) - datetime.timedelta(hours=1)
        wake = str((night + datetime.timedelta(hours=12)).date())

        def body(core):
            return {"data": {"metrics": [hae_metric("sleep_analysis", "hr", [{
                "date": wake, "totalSleep": core + 3, "core": core, "deep": 1, "rem": 2, "awake": 0.5, "asleep": 0,
                "inBed": core + 4, "sleepStart": hae_stamp(night), "sleepEnd": hae_stamp(night), "source": "Watch"}])]}}

        self.assertEqual(self.post(body(2))[0], 200)
        self.assertEqual(self.post(body(4))[0], 200)  # the night went on: sent again, grown
        self.assertEqual(self.count("samples"), 5)
        facts = self.summary("7d")
        sleep = self.chart(facts, "SleepAnalysis")
        asleep = [point for point in sleep["points"] if point[0][:10] == wake]
        self.assertEqual(len(asleep), 1)
        self.assertAlmostEqual(asleep[0][1], 7.0)  # 4 core + 1 deep + 2 REM, once

    def test_the_other_collections_are_shown_where_a_person_looks_for_them(self):
        self.assertEqual(self.post(self.mixed_body())[0], 200)
        facts = self.summary("7d")
        self.assertEqual(sorted(entry["title"] for entry in facts["journal"]),
                         ["Cycle tracking", "ECG", "Heart rate notification", "State of mind", "Symptom"])
        page = self.page("/?range=7d")
        for words in ("Journal", "Sinus Rhythm", "average heart rate 64", "Headache", "mild", "pleasant"):
            self.assertIn(words, page)
        run = next(workout for workout in facts["workouts"] if workout["activity_type"] == "running")
        walk_ = next(workout for workout in facts["workouts"] if workout["activity_type"] == "walking")
        self.assertIn("Heart rate", self.page(f"/workout/{run['uuid']}"))
        page = self.page(f"/workout/{quote(walk_['uuid'], safe='')}")
        self.assertIn("2 points", page)
        self.assertAlmostEqual(run["distance_m"], 3.1 * 1609.344)
        self.assertAlmostEqual(run["energy_kcal"], 1255.2 / 4.184)
        self.assertEqual(run["route_points"], 4)
        fields = self.page(hr.FIELDS_PATH)
        for field in ("valenceClassification", "classification", "severity", "qty", "units", "Avg", "systolic"):
            self.assertIn(field, fields)

    def test_an_ndjson_export_of_that_apps_rows_is_imported_again_as_they_are(self):
        self.assertEqual(self.post(self.mixed_body())[0], 200)
        folder = os.path.join(self.tmp.name, "export")
        os.mkdir(folder)
        for section in hr.SECTIONS:
            code, _, err = run_main("export", "--db", self.db, "--section", section.name, "--format", "ndjson",
                                    "--output", os.path.join(folder, section.name + ".ndjson"))
            self.assertEqual(code, 0, err)
        fresh = os.path.join(self.tmp.name, "fresh.db")
        code, out, err = run_main("import", "--db", fresh, folder)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.query("SELECT count(*) FROM workout_series"), [(5,)])
        self.assertEqual(self.query("SELECT count(*) FROM ecg_voltages"), [(3,)])
        for section in hr.SECTIONS:
            columns = ", ".join(name for name in section.column_names if name not in section.sync_columns)
            with self.subTest(section=section.name), contextlib.closing(sqlite3.connect(self.db)) as old, \
                    contextlib.closing(sqlite3.connect(fresh)) as new:
                sql = f"SELECT {columns} FROM {section.table} ORDER BY {columns}"
                self.assertEqual(new.execute(sql).fetchall(), old.execute(sql).fetchall())
        with contextlib.closing(sqlite3.connect(fresh)) as new:
            self.assertEqual(new.execute("SELECT count(*) FROM rejected").fetchall(), [(0,)])

    def test_an_ecgs_measurements_imported_apart_keep_their_numbers(self):
        # Lines of an export read in two imports, the second first: each
        # measurement keeps the number the export gave it, so the second
        # import adds what the first lacked (no renumbering, no collision).
        self.assertEqual(self.post(self.mixed_body())[0], 200)
        code, out, err = run_main("export", "--db", self.db, "--section", "voltages", "--format", "ndjson")
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        self.assertEqual([json.loads(line)["number"] for line in lines], [1, 2, 3])
        fresh = os.path.join(self.tmp.name, "fresh.db")
        for part, wanted in ((lines[1:], [(2, 200.25), (3, 31.0)]), (lines, [(1, -12.5), (2, 200.25), (3, 31.0)])):
            path = os.path.join(self.tmp.name, "voltages.ndjson")
            with open(path, "w", encoding="utf-8") as handle:
                handle.write("\n".join(part) + "\n")
            code, _, err = run_main("import", "--db", fresh, path)
            self.assertEqual(code, 0, err)
            new_ones = 2 if len(part) == 2 else 1
            self.assertIn(f"{len(part)} records ({new_ones} new, {len(part) - new_ones} dup, 0 rejected)", err)
            with contextlib.closing(sqlite3.connect(fresh)) as new:
                self.assertEqual(new.execute("SELECT number, voltage FROM ecg_voltages ORDER BY number").fetchall(),
                                 wanted)

    def test_an_export_line_of_a_series_no_workout_has_is_refused_not_lost(self):
        line = json.dumps({"section": "series", "workout": "W-1", "series": "notASeries",
                           "record": {"date": "2026-03-10 08:00:00 +0100", "qty": 1}})
        path = os.path.join(self.tmp.name, "series.ndjson")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(line + "\n")
        code, out, err = run_main("import", "--db", self.db, path)
        self.assertIn("line 1: not an export line (series 'notASeries' is not one of a workout's)", out + err)
        self.assertEqual(self.query("SELECT count(*) FROM workout_series"), [(0,)])

    def test_the_same_point_twice_in_one_body_is_one_sample_the_later_value(self):
        at = self.today_at(11).astimezone(BERLIN)
        points = [hae_point(at, qty=10), hae_point(at + datetime.timedelta(minutes=1), qty=5), hae_point(at, qty=20)]
        status, _, answer = self.post({"data": {"metrics": [hae_metric("step_count", "count", points)]}})
        self.assertEqual((status, answer["count"]), (200, 3))
        self.assertEqual(self.query("SELECT value FROM samples ORDER BY start_date"), [(20,), (5,)])
        self.assertEqual(self.day_totals()[str(at.date())], 25)
        self.assertEqual(self.query("SELECT rows FROM sample_types"), [(2,)])
    def test_a_workout_without_heart_rate_samples_shows_its_own_series(self):
        at = self.today_at(6).astimezone(BERLIN)
        self.assertEqual(self.post({"data": {"workouts": [hae_workout_v2("W-alone", start=at)]}})[0], 200)
        page = self.page("/workout/W-alone")
        self.assertIn("3 samples", page)
        self.assertIn("4 points", page)



class OtherAppStreamingTests(unittest.TestCase):
    """The big arrays inside that app's elements are read an element at a
    time: with a reader that decodes no value over 64 KiB, arrays of
    several hundred KiB inside a metric, a workout and an ECG are stored
    whole, nothing kept aside as too large."""

    def test_arrays_at_any_depth_are_read_an_element_at_a_time(self):
        start = HAE_MORNING
        points = [hae_point(start + datetime.timedelta(minutes=m), qty=m % 90) for m in range(6000)]
        workout = hae_workout_v2()
        workout["route"] = [{"latitude": 52.5, "longitude": 13.4, "altitude": 30.0, "speed": 3.0,
                             "timestamp": hae_stamp(start + datetime.timedelta(seconds=i))} for i in range(5000)]
        ecg = {"start": hae_stamp(start), "classification": "Sinus Rhythm",
               "voltageMeasurements": [{"date": hae_stamp(start), "voltage": i / 7, "units": "\u00b5V"}
                                       for i in range(15000)], "source": "Apple Watch"}
        body = encode({"data": {"metrics": [hae_metric("heart_rate", "count/min", points)], "workouts": [workout],
                                "ecg": [ecg]}})
        for name, array in (("data", points), ("route", workout["route"]),
                            ("voltageMeasurements", ecg["voltageMeasurements"])):
            self.assertGreater(len(json.dumps(array)), 4 * 64 * 1024, name)
        payload = hr.Payload([body[i:i + 4096] for i in range(0, len(body), 4096)], value_max=64 * 1024)
        rows = {}
        for section, batch in payload.batches():
            rows.setdefault(section.name if section else "rejected", []).extend(batch)
        self.assertNotIn("rejected", rows)
        self.assertEqual({name: len(batch) for name, batch in rows.items()},
                         {"samples": 6000, "workouts": 1, "routes": 5000, "series": 5, "ecg": 1, "voltages": 15000})
        self.assertEqual([row[1] for row in rows["voltages"][:3]], [1, 2, 3])


if __name__ == "__main__":
    unittest.main()
