"""The sweep's tidy table: one row per grid point and quantity, as a CSV file.

Columns: the grid variables (in the order of the grids), then `quantity`, `value`, `method`,
`seeds`, `status`, `wall_s`, then what resuming needs: `spec_hash` (the spec), `settings_hash`
(every setting that is not a grid coordinate) and `point_seed`. Numbers are written with repr(),
so reading the file back gives the same floats bit for bit; an empty `value` means no value
(the reason is in `status`).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ...errors import SpecError

FIXED_COLUMNS = ("quantity", "value", "method", "seeds", "status", "wall_s")
RESUME_COLUMNS = ("spec_hash", "settings_hash", "point_seed")


def header(names) -> list[str]:
    """The CSV header of a sweep over the grid variables `names`."""
    return list(names) + list(FIXED_COLUMNS) + list(RESUME_COLUMNS)


def coordinate(name: str, value):
    """A coordinate as stored in a row: L and batch ints, everything else a float."""
    return int(value) if name in ("L", "batch") else float(value)


def _text(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def row_key(row: dict, names) -> tuple:
    """What identifies a row for resuming: the hashes, method, quantity and coordinates."""
    return (row["spec_hash"], row["settings_hash"], row["method"], row["quantity"],
            tuple(float(row[n]) for n in names))


def parse_row(rec: dict, names) -> dict | None:
    """A row from its CSV strings (None when it is incomplete or malformed, e.g. the last line
    of a file whose writer was killed mid-line)."""
    try:
        row = {n: coordinate(n, float(rec[n])) for n in names}
        row["quantity"] = rec["quantity"]
        row["value"] = float(rec["value"]) if rec["value"] else None
        row["method"] = rec["method"]
        row["seeds"] = int(rec["seeds"])
        row["status"] = rec["status"]
        row["wall_s"] = float(rec["wall_s"])
        row["spec_hash"] = rec["spec_hash"]
        row["settings_hash"] = rec["settings_hash"]
        row["point_seed"] = int(rec["point_seed"])
    except (KeyError, TypeError, ValueError):
        return None
    if not all(row[k] for k in ("quantity", "method", "status", "spec_hash", "settings_hash")):
        return None
    return row


def read_table(path, names) -> list[dict]:
    """The rows of an existing sweep CSV (malformed lines dropped); SpecError when its columns
    are not those of this sweep. A missing or empty file has no rows."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            if cols != header(names):
                raise SpecError(f"--out {path}: its columns ({', '.join(cols)}) are not this "
                                f"sweep's ({', '.join(header(names))}): write to another file")
            rows = [parse_row(rec, names) for rec in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SpecError(f"--out {path}: cannot read it as a sweep table: {exc}") from None
    return [r for r in rows if r is not None]


def _lines(rows, names) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = header(names)
    for r in rows:
        w.writerow([_text(r[c]) for c in cols])
    return buf.getvalue()


def write_table(path, names, rows) -> None:
    """Write the whole table atomically (a temporary file in the same folder, then rename)."""
    from ...backends.files import write_atomic
    head = io.StringIO()
    csv.writer(head, lineterminator="\n").writerow(header(names))
    write_atomic(path, head.getvalue() + _lines(rows, names))


class Appender:
    """Rows appended to the CSV as points complete, flushed after every point, so an
    interrupted sweep leaves a valid partial table."""

    def __init__(self, path, names):
        self.names = names
        self.fh = open(path, "a", newline="")

    def write(self, rows) -> None:
        self.fh.write(_lines(rows, self.names))
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


__all__ = ["FIXED_COLUMNS", "RESUME_COLUMNS", "header", "coordinate", "row_key", "parse_row",
           "read_table", "write_table", "Appender"]
