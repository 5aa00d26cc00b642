"""Where records come from: files (JSON lines, JSON, CSV, Parquet, text; gzip or zstd compressed) and
hub datasets, read as a stream with the location of every record (file:line, or record N).

A source is counted once, then read in index ranges [lo, hi): every rank (or builder process)
reads its own range, so no process holds the whole data set. Files that are still being uploaded
are waited for (size and modification time steady), or refused.
"""

from __future__ import annotations

import gzip
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from trainer.config import COMPRESSIONS, DataConfig, data_file_type
from trainer.errors import UserError

MIN_GROWTH_WAIT = 30


class InvalidRecord(Exception):
    """A record that cannot be read (bad bytes, bad JSON): refused, or skipped with skip_invalid."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where, self.message = where, message


@dataclass
class Item:
    index: int
    where: str
    record: Optional[dict]  # None when unreadable: `error` says why
    error: Optional[str] = None


def wait_for(path: Path, wait_seconds: float, settle: float = 3.0) -> None:
    """Wait for a file to exist (an upload after the job started), then until it stops changing."""
    deadline = time.monotonic() + wait_seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(min(10.0, max(0.1, deadline - time.monotonic())))
    if not path.exists():
        waited = f" after waiting {wait_seconds:.0f}s" if wait_seconds else ""
        raise UserError(
            f"data file {path} does not exist{waited}. Fix: copy it there (the stack output "
            "`commands.uploadDataset` has the kubectl cp command) or correct data.file"
        )
    wait_until_complete(path, max(wait_seconds, MIN_GROWTH_WAIT), settle)


def wait_until_complete(path: Path, wait_seconds: float, settle: float = 3.0) -> None:
    """Wait until a data file stops changing (size and modification time steady for a few seconds),
    so a file still being uploaded is not read half-way. A file last changed longer ago than that is
    read at once. Refused if it is still growing after `wait_seconds`."""
    deadline = time.monotonic() + wait_seconds
    st = path.stat()
    if time.time() - st.st_mtime >= settle:
        return
    seen, steady_since = (st.st_size, st.st_mtime_ns), time.monotonic()
    while time.monotonic() - steady_since < settle:
        if time.monotonic() > deadline:
            raise UserError(
                f"data file {path} is still being written (it changed in the last {settle:g}s "
                f"for {wait_seconds:.0f}s). Fix: upload to a temporary name and rename it when complete "
                "(the stack's uploadDataset command does), or raise data.file_wait_seconds"
            )
        time.sleep(0.25)
        st = path.stat()
        now = (st.st_size, st.st_mtime_ns)
        if now != seen:
            seen, steady_since = now, time.monotonic()


def _open_binary(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRecord(
            where, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}). Fix: re-encode the file as UTF-8"
        ) from None


class Source:
    """Records of one table, countable and readable by index range."""

    name: str

    def count(self) -> int:
        raise NotImplementedError

    def read(self, lo: int, hi: int) -> Iterator[Item]:
        raise NotImplementedError


class JsonLines(Source):
    """One JSON object per non-empty line. Counting also records where every 4096th record starts,
    so a range is read from near its start (uncompressed files)."""

    STRIDE = 4096

    def __init__(self, path: Path):
        self.path, self.name = path, str(path)
        self.compressed = path.suffix.lower() in COMPRESSIONS
        self._marks: list[tuple[int, int, int]] = []  # (record index, byte offset, line number)

    def _lines(self, start_offset: int = 0, start_line: int = 1) -> Iterator[tuple[int, int, bytes]]:
        with _open_binary(self.path) as f:
            if start_offset:
                f.seek(start_offset)
            offset, lineno = start_offset, start_line
            for raw in f if not self.compressed else io.BufferedReader(f):
                yield lineno, offset, raw
                offset += len(raw)
                lineno += 1

    def count(self) -> int:
        n = 0
        self._marks = []
        for lineno, offset, raw in self._lines():
            if raw.strip():
                if n % self.STRIDE == 0:
                    self._marks.append((n, offset, lineno))
                n += 1
        return n

    def read(self, lo: int, hi: int) -> Iterator[Item]:
        start = (0, 0, 1)
        if not self.compressed:
            for mark in self._marks:
                if mark[0] <= lo:
                    start = mark
        index = start[0]
        for lineno, _, raw in self._lines(start[1], start[2]):
            if not raw.strip():
                continue
            if index >= hi:
                return
            if index >= lo:
                where = f"{self.path}:{lineno}"
                try:
                    text = _decode(raw, where)
                    try:
                        record = json.loads(text)
                    except json.JSONDecodeError as exc:
                        raise InvalidRecord(
                            where, f"malformed JSON line ({exc.msg}, column {exc.colno}). Fix: one JSON object per line"
                        ) from None
                    if not isinstance(record, dict):
                        raise InvalidRecord(where, f"is a JSON {type(record).__name__}, expected an object with named fields")
                    yield Item(index, where, record)
                except InvalidRecord as bad:
                    yield Item(index, where, None, bad.message)
            index += 1


class JsonDocument(Source):
    """A JSON array of records, or an object holding them under `field` (its one list-valued key by
    default: {"data": [...]}). Parsed whole: large data sets belong in JSON lines."""

    def __init__(self, path: Path, field: Optional[str]):
        self.path, self.name, self.field = path, str(path), field
        self._records: Optional[list] = None

    def _load(self) -> list:
        if self._records is not None:
            return self._records
        with _open_binary(self.path) as f:
            raw = f.read()
        # Bytes that are not UTF-8 become lone surrogates (surrogateescape), so one bad record is that
        # record's problem (refused, or skipped with skip_invalid), as in every other format.
        text = raw.decode("utf-8", errors="surrogateescape")
        self._bad = _bad_bytes(raw)
        stripped = text.lstrip()
        if stripped.startswith("{") and "\n" in stripped.strip() and _looks_like_json_lines(stripped):
            self._records = None
            raise _IsJsonLines()
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{self.path}:{exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno})") from None
        if isinstance(doc, dict):
            lists = [k for k, v in doc.items() if isinstance(v, list)]
            key = self.field
            if key is None:
                if len(lists) != 1:
                    raise UserError(
                        f"{self.path}: a JSON object with {'no' if not lists else len(lists)} list-valued "
                        f"keys ({', '.join(lists) or 'none'}); say which holds the records. Fix: "
                        "data.field: <key>"
                    )
                key = lists[0]
            if key not in doc or not isinstance(doc[key], list):
                raise UserError(
                    f"{self.path}: data.field {key!r} is not a list of records in this file (its keys: "
                    f"{', '.join(doc) or 'none'})"
                )
            doc = doc[key]
        if not isinstance(doc, list):
            raise UserError(f"{self.path}: expected a JSON array of records, got a {type(doc).__name__}")
        self._records = doc
        return doc

    def count(self) -> int:
        return len(self._load())

    def read(self, lo: int, hi: int) -> Iterator[Item]:
        records = self._load()
        # Where each record's first bad byte is: the bad bytes in document order, consumed record by record.
        bad = iter(self._bad)
        for record in records[:lo]:
            for _ in range(_surrogates(record)):
                next(bad, None)
        for i, record in enumerate(records[lo:hi], start=lo):
            where = f"{self.path} record {i + 1}"
            n = _surrogates(record)
            if n:
                first = [next(bad, None) for _ in range(n)][0]
                if first is not None:
                    where = f"{self.path}:{first[0]} (record {i + 1})"
                byte = f"byte 0x{first[2]:02x} at column {first[1]}" if first else "a byte"
                yield Item(i, where, None, f"not UTF-8 text ({byte}). Fix: re-encode the file as UTF-8")
            elif isinstance(record, dict):
                yield Item(i, where, record)
            else:
                yield Item(i, where, None, f"is a JSON {type(record).__name__}, expected an object with named fields")


class _IsJsonLines(Exception):
    pass


def _looks_like_json_lines(text: str) -> bool:
    first = text.split("\n", 1)[0].strip()
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _bad_bytes(raw: bytes) -> list[tuple[int, int, int]]:
    """(line, column, byte) of every byte that is not UTF-8, in order."""
    out: list[tuple[int, int, int]] = []
    start = 0
    while True:
        try:
            raw[start:].decode("utf-8")
            return out
        except UnicodeDecodeError as exc:
            pos = start + exc.start
            for k in range(pos, start + exc.end):
                line = raw.count(b"\n", 0, k) + 1
                out.append((line, k - (raw.rfind(b"\n", 0, k) + 1) + 1, raw[k]))
            start += exc.end


def _surrogates(value) -> int:
    """Lone surrogates (undecodable bytes under surrogateescape) in a parsed JSON value."""
    if isinstance(value, str):
        return sum(1 for ch in value if "\udc80" <= ch <= "\udcff")
    if isinstance(value, dict):
        return sum(_surrogates(k) + _surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_surrogates(v) for v in value)
    return 0


class Table(Source):
    """CSV and Parquet through pyarrow (quoting, types, encodings), read in batches; CSV bytes are
    checked line by line first so a bad byte is named by its line."""

    BATCH = 8192

    def __init__(self, path: Path, kind: str):
        self.path, self.name, self.kind = path, str(path), kind
        self._bad_lines: Optional[list[tuple[int, int, int]]] = None  # (line, column, byte), by _scan

    def _batches(self):
        try:
            if self.kind == ".parquet":
                import pyarrow.parquet as pq

                for batch in pq.ParquetFile(self.path).iter_batches(batch_size=self.BATCH):
                    yield batch
                return
            import pyarrow.csv as pacsv

            # check_utf8 off: a block of a text column that holds bad bytes must not stop the reader;
            # read() decodes such columns value by value (see _text_columns_as_binary).
            reader = pacsv.open_csv(
                _open_binary(self.path),
                read_options=pacsv.ReadOptions(block_size=1 << 22),
                convert_options=pacsv.ConvertOptions(check_utf8=False),
            )
            for batch in reader:
                yield batch
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise UserError(f"{self.path}: cannot read as {self.kind[1:]}: {str(exc).splitlines()[0]}") from None

    def _scan(self) -> list[tuple[int, int, int]]:
        """CSV bytes that are not UTF-8, by line (once per source): the rows holding them are named by it."""
        if self._bad_lines is None:
            self._bad_lines = []
            if self.kind == ".csv":
                with _open_binary(self.path) as f:
                    for lineno, raw in enumerate(io.BufferedReader(f) if self.path.suffix in COMPRESSIONS else f, start=1):
                        try:
                            raw.decode("utf-8")
                        except UnicodeDecodeError as exc:
                            self._bad_lines.append((lineno, exc.start + 1, raw[exc.start]))
        return self._bad_lines

    def count(self) -> int:
        self._scan()
        return sum(batch.num_rows for batch in self._batches())

    def read(self, lo: int, hi: int) -> Iterator[Item]:
        """Rows as records. pyarrow reads a column holding bytes that are not UTF-8 as binary (Parquet
        binary columns too): such a row is invalid, refused or skipped like a bad JSON line."""
        bad_lines = self._scan()
        index, bad_rows = 0, 0
        for batch in self._batches():
            if bad_lines:
                batch = _text_columns_as_binary(batch)
            binary = [f.name for f in batch.schema if str(f.type) in ("binary", "large_binary")]
            if index + batch.num_rows <= lo and not (binary and bad_lines):
                index += batch.num_rows
                continue
            for record in batch.to_pylist():
                if index >= hi:
                    return
                problem = _undecodable(record, binary)
                if problem is not None:
                    bad_rows += 1
                where = f"{self.path} row {index + 1}"
                if problem is not None and bad_rows <= len(bad_lines):
                    line, column, byte = bad_lines[bad_rows - 1]
                    where = f"{self.path}:{line} (row {index + 1})"
                    problem = f"not UTF-8 text (byte 0x{byte:02x} at column {column})"
                if index >= lo:
                    if problem is None:
                        yield Item(index, where, record)
                    else:
                        yield Item(index, where, None, f"{problem}. Fix: re-encode the file as UTF-8")
                index += 1


def _text_columns_as_binary(batch):
    """A CSV batch with its text columns as bytes (unchecked UTF-8 cannot become Python strings)."""
    import pyarrow as pa

    columns = [c.cast(pa.binary()) if str(c.type) == "string" else c for c in batch.columns]
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def _undecodable(record: dict, binary: list[str]) -> Optional[str]:
    """Decode a row's binary values as UTF-8 text in place; the first that is not, described."""
    for name in binary:
        value = record.get(name)
        if isinstance(value, (bytes, bytearray)):
            try:
                record[name] = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"not UTF-8 text (byte 0x{value[exc.start]:02x} in field {name!r})"
    return None


class TextLines(JsonLines):
    """A .txt file: every non-empty line is one record {"text": line}."""

    def read(self, lo: int, hi: int) -> Iterator[Item]:
        index = 0
        for lineno, _, raw in self._lines():
            if not raw.strip():
                continue
            if index >= hi:
                return
            if index >= lo:
                where = f"{self.path}:{lineno}"
                try:
                    yield Item(index, where, {"text": _decode(raw, where).rstrip("\r\n")})
                except InvalidRecord as bad:
                    yield Item(index, where, None, bad.message)
            index += 1


class HubDataset(Source):
    """A hub dataset split through the datasets library (downloaded once into HF_HOME; Arrow,
    memory-mapped, so a range is read without loading the rest)."""

    def __init__(self, dataset: str, config: Optional[str], split: str, token: Optional[str]):
        self.name = f"{dataset} [{split}]"
        self.dataset, self.config, self.split, self.token = dataset, config, split, token
        self._ds = None

    def _load(self):
        if self._ds is None:
            import datasets

            try:
                self._ds = datasets.load_dataset(self.dataset, self.config, split=self.split, token=self.token)
            except Exception as exc:  # the library raises many types; name the data either way
                raise UserError(
                    f"data.dataset {self.dataset!r} (split {self.split!r}) cannot be loaded: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Fix: check the "
                    "dataset id and split on the hub, or use data.file"
                ) from None
        return self._ds

    def count(self) -> int:
        return len(self._load())

    def fingerprint(self) -> str:
        return getattr(self._load(), "_fingerprint", self.name)

    def read(self, lo: int, hi: int) -> Iterator[Item]:
        ds = self._load()
        for start in range(lo, hi, 4096):
            rows = ds[start : min(hi, start + 4096)]
            keys = list(rows)
            for j in range(len(rows[keys[0]]) if keys else 0):
                i = start + j
                yield Item(i, f"{self.name} record {i + 1}", {k: rows[k][j] for k in keys})


def open_file(path: str, field: Optional[str], wait_seconds: float = 0, settle: float = 3.0) -> Source:
    p = Path(path)
    wait_for(p, wait_seconds, settle)
    kind = data_file_type(path)
    if kind == ".jsonl":
        return JsonLines(p)
    if kind == ".json":
        doc = JsonDocument(p, field)
        try:
            doc.count()
        except _IsJsonLines:  # a .json file of JSON lines
            return JsonLines(p)
        return doc
    if kind == ".txt":
        return TextLines(p)
    if kind in (".csv", ".parquet"):
        return Table(p, kind)
    raise UserError(f"data file {path}: unsupported type")


def open_sources(cfg: DataConfig, token: Optional[str]) -> tuple[Source, Optional[Source]]:
    """(training source, validation source or None when the validation records are held out)."""
    if cfg.file:
        train: Source = open_file(cfg.file, cfg.field, cfg.file_wait_seconds, cfg.file_settle_seconds)
    else:
        assert cfg.dataset, "data.file or data.dataset: trainer/config.py refuses a config with neither"
        train = HubDataset(cfg.dataset, cfg.dataset_config, cfg.split, token)
    val: Optional[Source] = None
    if cfg.validation_file:
        val = open_file(cfg.validation_file, cfg.field, cfg.file_wait_seconds, cfg.file_settle_seconds)
    elif cfg.validation_split:
        assert cfg.dataset, "data.validation_split names a split of data.dataset (trainer/config.py)"
        val = HubDataset(cfg.dataset, cfg.dataset_config, cfg.validation_split, token)
    return train, val


def first_record(source: Source, n: int) -> Optional[dict[str, Any]]:
    """The first readable record of the first n (for detecting the format)."""
    for item in source.read(0, n):
        if item.record is not None:
            return item.record
    return None
