"""
Checks of a local data file before `datasets` reads it: `datasets` answers a non-UTF-8 byte, a trailing comma in a JSON
file or a ragged CSV row with a long traceback that names neither the line nor the fault. Each check here raises a
`ValueError` that names the option, the file, the line and what is wrong. Standard library only.
"""

import codecs
import csv
import json
from pathlib import Path


# The local file types `--dataset_name` reads, and the `datasets` builder of each
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def check_data_file(path: Path, option: str) -> None:
    """
    Refuse a JSON, JSON Lines or CSV file that `datasets` could not read (or would read wrongly): not UTF-8, not valid
    JSON / JSON Lines, a CSV row whose number of fields differs from the header's, or no row at all. Parquet files are
    not checked.

    Args:
        path (`Path`): the file.
        option (`str`): the option as the user wrote it, e.g. `"--dataset_name pairs.json"`, named in the message.

    Raises:
        ValueError: naming `option`, the file, the line and the fault.
    """
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl", ".csv"):
        return
    check_utf8(path, option)
    if suffix == ".csv":
        check_csv(path, option)
    else:
        check_json(path, option)


def check_utf8(path: Path, option: str, chunk_bytes: int = 1 << 24) -> None:
    """Raise a `ValueError` naming `path`, the line and the byte when the text file `path` is not valid UTF-8 (pyarrow
    only says `UnicodeDecodeError`). Reads the file once, in chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with path.open("rb") as file:
        while True:
            chunk = file.read(chunk_bytes)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                # The bad byte is in this chunk, or in the few bytes of an unfinished character carried over
                position = max(error.start - len(error.object) + len(chunk), 0)
                line += chunk.count(b"\n", 0, position)
                byte = error.object[error.start]
                raise ValueError(
                    f"`{option}`: {path} is not UTF-8 text: line {line} has the byte 0x{byte:02x} "
                    f"(file offset {offset + position}). Re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
                ) from None
            if not chunk:
                return
            line += chunk.count(b"\n")
            offset += len(chunk)


def _json_fault(error: json.JSONDecodeError) -> tuple[int, int, str]:
    """(line, column, what is wrong) of a JSON syntax error, with a trailing comma called by its name (Python's
    message for it is "Expecting value" or "Expecting property name")."""
    before = error.doc[: error.pos].rstrip()
    if before.endswith(",") and error.doc[error.pos : error.pos + 1] in ("]", "}"):
        comma = len(before) - 1
        line = error.doc.count("\n", 0, comma) + 1
        column = comma - (error.doc.rfind("\n", 0, comma) + 1) + 1
        return line, column, f"a trailing comma before '{error.doc[error.pos]}' (JSON allows none)"
    return error.lineno, error.colno, error.msg


def check_json(path: Path, option: str) -> None:
    """
    A `.json` / `.jsonl` file must be JSON Lines (one object per line; blank lines are skipped) or one JSON document
    (a list of objects, or an object), as `datasets`' json builder reads them. A file whose first line is an object
    is taken as JSON Lines, and its first bad line is reported; otherwise the whole document is parsed.
    """
    with path.open(encoding="utf-8-sig") as file:
        first = True  # until a line holds an object
        for number, text in enumerate(file, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                if first:
                    break  # not JSON Lines: parse the file as one document below
                _, column, fault = _json_fault(error)
                raise ValueError(
                    f"`{option}`: {path} line {number} is not valid JSON: {fault} (column {column}). In a JSON Lines "
                    "file each line is one complete object: fix or remove that line."
                ) from None
            if first and not isinstance(row, dict):
                break  # e.g. a list of rows written on one line: one document
            if not isinstance(row, dict):
                raise ValueError(
                    f"`{option}`: {path} line {number} is a JSON {type(row).__name__}, not an object: each line of a "
                    'JSON Lines file is one row, an object such as {"prompt": ..., "chosen": ..., "rejected": ...}.'
                )
            first = False
        else:
            if first:
                raise ValueError(f"`{option}`: {path} holds no rows: TI-DPO needs at least one preference pair.")
            return  # JSON Lines, every line an object
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        line, column, fault = _json_fault(error)
        raise ValueError(
            f"`{option}`: {path} is not valid JSON: line {line}, column {column}: {fault}. Fix the file (or write it "
            "as JSON Lines, one object per line)."
        ) from None
    if not document:
        raise ValueError(f"`{option}`: {path} holds no rows: TI-DPO needs at least one preference pair.")
    if isinstance(document, list):
        for index, row in enumerate(document):
            if not isinstance(row, dict):
                raise ValueError(
                    f"`{option}`: {path} is a JSON list whose element {index} is a {type(row).__name__}, not an object: "
                    "each element is one row, an object with the dataset's columns."
                )
    elif not isinstance(document, dict):
        raise ValueError(
            f"`{option}`: {path} holds a JSON {type(document).__name__}: a dataset file holds a list of objects (one "
            "per row), or one object per line (JSON Lines)."
        )


def check_csv(path: Path, option: str) -> None:
    """Every row of a CSV file has as many fields as its header (pandas silently fills a short row with missing
    values, and fails on a long one with a traceback), and every quoted field is closed. Blank lines are skipped, as
    pandas does."""
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.reader(file, strict=True)
        header, start, rows = None, 1, 0
        try:
            for row in reader:
                if row:
                    if header is None:
                        header = row
                    elif len(row) != len(header):
                        raise ValueError(
                            f"`{option}`: {path} line {start} has {len(row)} field(s), the header has {len(header)} "
                            f"({', '.join(header)}). Quote fields that contain commas (\"a, b\"), or fix the row."
                        )
                    else:
                        rows += 1
                start = reader.line_num + 1
        except csv.Error as error:
            raise ValueError(
                f"`{option}`: {path} is not valid CSV from line {start}: {error}. Close the quoted field, or double "
                'the quotes inside it ("").'
            ) from None
    if rows == 0:
        raise ValueError(f"`{option}`: {path} holds no rows: TI-DPO needs at least one preference pair.")
