"""Read corpora (JSONL, CSV, TSV, plain text) into one table of records.

Every input error is raised here, as a :class:`NeurostoreError` naming the file and line, so that
nothing downstream has to second-guess its input.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import NeurostoreError

FORMATS = ("jsonl", "csv", "tsv", "text")
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".txt": "text",
    ".text": "text",
}


@dataclass
class Corpus:
    """Sentences in corpus order, with optional label and language per sentence (None = missing)."""

    texts: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    langs: list[str | None] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def slice(self, start: int, stop: int) -> "Corpus":
        return Corpus(
            self.texts[start:stop],
            self.labels[start:stop],
            self.langs[start:stop],
            self.files,
            self.fingerprint,
        )


def detect_format(path: Path, fmt: str | None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise NeurostoreError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
        return fmt
    found = _EXTENSIONS.get(path.suffix.lower())
    if found is None:
        raise NeurostoreError(
            f"{path}: cannot tell the format from the extension {path.suffix!r}; "
            f"pass --format ({', '.join(FORMATS)})"
        )
    return found


def _decoded_lines(path: Path, raw: bytes) -> list[str]:
    """Decode line by line so that a bad byte is reported with its line number."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for number, line in enumerate(lines, start=1):
        try:
            out.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as err:
            raise NeurostoreError(
                f"{path}:{number}: not valid UTF-8 (byte {line[err.start]:#04x} at column {err.start + 1})"
            ) from None
    return out


def _rows(path: Path, fmt: str, lines: list[str]) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, row) pairs and the column names seen."""
    if fmt == "text":
        return [(n, {"text": line}) for n, line in enumerate(lines, start=1)], ["text"]
    if fmt == "jsonl":
        rows, columns = [], {}
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise NeurostoreError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise NeurostoreError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            columns.update(dict.fromkeys(row))
            rows.append((n, row))
        return rows, list(columns)
    reader = csv.reader(io.StringIO("\n".join(lines)), delimiter="," if fmt == "csv" else "\t")
    try:
        table = list(reader)
    except csv.Error as err:
        raise NeurostoreError(f"{path}:{reader.line_num}: {err}") from None
    if not table:
        return [], []
    header = [h.strip() for h in table[0]]
    rows = []
    for n, values in enumerate(table[1:], start=2):
        if not values:
            continue
        if len(values) != len(header):
            raise NeurostoreError(
                f"{path}:{n}: {len(values)} fields, but the header has {len(header)}"
            )
        rows.append((n, dict(zip(header, values))))
    return rows, header


def _fingerprint(parts: list[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def read_corpus(
    paths: list[str | Path],
    *,
    fmt: str | None = None,
    text_col: str = "text",
    label_col: str | None = "label",
    lang_col: str | None = "lang",
    lang: list[str] | str | None = None,
) -> Corpus:
    """Read one or more corpus files, in the order given, into a :class:`Corpus`.

    ``lang`` sets the language of whole files: one code for all of them, or one per file. A label or
    language column that a file lacks is simply missing (None); a text column that is missing, or an
    empty text, is an error.
    """
    if not paths:
        raise NeurostoreError("no corpus file given")
    langs_per_file: list[str | None]
    if lang is None:
        langs_per_file = [None] * len(paths)
    else:
        codes = [c.strip() for c in lang.split(",")] if isinstance(lang, str) else list(lang)
        if len(codes) == 1:
            codes = codes * len(paths)
        if len(codes) != len(paths) or not all(codes):
            raise NeurostoreError(
                f"--lang gives {len(codes)} language(s) for {len(paths)} file(s): give one for all, or one per file"
            )
        langs_per_file = codes

    corpus = Corpus()
    fingerprint_parts = [json.dumps([fmt, text_col, label_col, lang_col, langs_per_file]).encode()]
    for path, file_lang in zip(map(Path, paths), langs_per_file):
        if not path.exists():
            raise NeurostoreError(f"{path}: no such file")
        if path.is_dir():
            raise NeurostoreError(f"{path}: is a directory, not a corpus file")
        file_fmt = detect_format(path, fmt)
        raw = path.read_bytes()
        fingerprint_parts.append(raw)
        rows, columns = _rows(path, file_fmt, _decoded_lines(path, raw))
        if not rows:
            raise NeurostoreError(f"{path}: no sentences in the file")
        if file_fmt != "text" and text_col not in columns:
            found = ", ".join(repr(c) for c in columns) or "none"
            raise NeurostoreError(
                f"{path}: no column {text_col!r} (columns found: {found}); set it with --text-col"
            )
        for n, row in rows:
            text = row.get(text_col)
            if not isinstance(text, str):
                raise NeurostoreError(
                    f"{path}:{n}: column {text_col!r} is missing or not a string"
                )
            if not text.strip():
                raise NeurostoreError(f"{path}:{n}: empty text")
            corpus.texts.append(text)
            corpus.labels.append(_category(row, label_col))
            corpus.langs.append(file_lang if file_lang is not None else _category(row, lang_col))
        corpus.files.append(str(path))
    corpus.fingerprint = _fingerprint(fingerprint_parts)
    return corpus


def _category(row: dict, column: str | None) -> str | None:
    if not column:
        return None
    value = row.get(column)
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def categories(values: list[str | None]) -> tuple[list[str], list[int]]:
    """Sorted category names and integer codes (-1 = missing).

    Sorted, not first-seen, so that every ``--part`` of a corpus gets the same codes.
    """
    names = sorted({v for v in values if v is not None})
    index = {name: i for i, name in enumerate(names)}
    return names, [index[v] if v is not None else -1 for v in values]
