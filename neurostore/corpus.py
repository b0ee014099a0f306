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
    skipped: list[str] = field(default_factory=list)  # "file:line: why" of rows left out by skip_bad
    # where labels and languages came from ("column 'label'", "--lang en"), None where nowhere
    sources: dict[str, str | None] = field(default_factory=dict)
    # (file, columns found, label/lang columns it lacks) for files that have columns but not those
    lacking: list[tuple[str, list[str], list[tuple[str, str]]]] = field(default_factory=list)
    # audio corpora (an audio column): the file of each row (absolute path or URL), its frames and
    # sample rate as stored (decoding waits for the batch), and the text prompt (None: none)
    audio: list[str] | None = None
    audio_frames: list[int] = field(default_factory=list)
    audio_rates: list[int] = field(default_factory=list)
    prompts: list[str | None] = field(default_factory=list)

    @property
    def durations(self) -> list[float]:
        """Seconds of each utterance (audio corpora)."""
        return [n / r for n, r in zip(self.audio_frames, self.audio_rates)]

    def __len__(self) -> int:
        return len(self.texts)

    def slice(self, start: int, stop: int) -> "Corpus":
        return Corpus(
            self.texts[start:stop],
            self.labels[start:stop],
            self.langs[start:stop],
            self.files,
            self.fingerprint,
            self.skipped,
            self.sources,
            self.lacking,
            self.audio[start:stop] if self.audio is not None else None,
            self.audio_frames[start:stop],
            self.audio_rates[start:stop],
            self.prompts[start:stop],
        )

    def missing_columns_warning(self) -> str | None:
        """One line for files with columns but not the label/language ones (None if every file has them)."""
        if not self.lacking:
            return None
        path, columns, missing = self.lacking[0]
        more = f" (and {len(self.lacking) - 1} more file(s))" if len(self.lacking) > 1 else ""
        nouns = {"label": "labels", "lang": "languages"}
        what = " and ".join(f"{nouns[key]} (no column {col!r})" for key, col in missing)
        return (
            f"{path}{more}: stored without {what}; columns found: {', '.join(columns)}; "
            f"name them with {' / '.join(f'--{key}-col' for key, _ in missing)}"
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
    table = []  # (the line a record starts on, its fields): a quoted field may span lines
    try:
        start = 1
        for values in reader:
            table.append((start, values))
            start = reader.line_num + 1
    except csv.Error as err:
        raise NeurostoreError(f"{path}:{reader.line_num}: {err}") from None
    if not table:
        return [], []
    header = [h.strip() for h in table[0][1]]
    rows = []
    for n, values in table[1:]:
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
    skip_bad: bool | None = None,
    audio_col: str | None = "audio",
    prompt_col: str | None = "prompt",
    prompt: str | None = None,
    storage_options: dict | None = None,
) -> Corpus:
    """Read one or more corpus files, in the order given, into a :class:`Corpus`.

    ``lang`` sets the language of whole files: one code for all of them, or one per file. A label or
    language column that a file lacks is missing (None) and noted in ``lacking``, so the caller can
    warn; a text column that is missing from the file is an error. A row whose text is empty,
    missing or not a string is an error naming the row, or with ``skip_bad`` left out and listed in
    ``skipped`` (the same rows on every read of the same bytes, so a resume sees the same corpus).
    ``skip_bad=None`` is for callers that offer no such option: the error then does not suggest it.

    A file with an ``audio_col`` column is an audio corpus: each row names an audio file (relative
    to the corpus file, absolute, or an fsspec URL), read from its header here (a missing or
    undecodable file is a bad row) and decoded at extraction; the text column is then optional
    (the audio reference stands in for it), and ``prompt_col`` or ``prompt`` gives an
    audio-language model its text. Every file of one corpus is audio, or none is.
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
    found_in: dict[str, list[bool]] = {"label": [], "lang": []}
    fingerprint_parts = [json.dumps([fmt, text_col, label_col, lang_col, langs_per_file] + ([audio_col, prompt_col, prompt] if prompt else [])).encode()]
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
        is_audio = file_fmt != "text" and bool(audio_col) and audio_col in columns
        if corpus.audio is None and is_audio and corpus.texts:
            raise NeurostoreError(f"{path}: has an audio column {audio_col!r} but the files before it do not; give audio and text corpora separately")
        if is_audio and corpus.audio is None:
            corpus.audio = []
        elif corpus.audio is not None and not is_audio:
            raise NeurostoreError(f"{path}: no audio column {audio_col!r}, but the files before it have one; give audio and text corpora separately")
        if file_fmt != "text" and text_col not in columns and not is_audio:
            found = ", ".join(repr(c) for c in columns) or "none"
            raise NeurostoreError(
                f"{path}: no column {text_col!r} (columns found: {found}); set it with --text-col"
            )
        if file_fmt != "text":
            wanted = [("label", label_col)] + ([("lang", lang_col)] if file_lang is None else [])
            missing = [(key, col) for key, col in wanted if col and col not in columns]
            if missing:
                corpus.lacking.append((str(path), [str(c) for c in columns], missing))
        for col, key in ((label_col, "label"), (lang_col, "lang")):
            if key == "lang" and file_lang is not None:
                found_in[key].append(True)
            else:
                found_in[key].append(bool(col) and file_fmt != "text" and col in columns)
        for n, row in rows:
            text = row.get(text_col)
            problem = None
            if is_audio:
                from . import audio

                problem, ref, frames, rate = audio.check_row(path, row.get(audio_col), storage_options)
                text = text if isinstance(text, str) and text.strip() else row.get(audio_col)
            if problem is not None:
                pass
            elif not isinstance(text, str):
                problem = f"column {text_col!r} is missing or not a string"
            elif not text.strip():
                problem = "empty text"
            if problem is not None:
                if not skip_bad:
                    hint = " (--skip-bad skips and counts such rows)" if skip_bad is False else ""
                    raise NeurostoreError(f"{path}:{n}: {problem}{hint}")
                corpus.skipped.append(f"{path}:{n}: {problem}")
                continue
            corpus.texts.append(text)
            if is_audio:
                corpus.audio.append(ref)
                corpus.audio_frames.append(frames)
                corpus.audio_rates.append(rate)
                given = row.get(prompt_col) if prompt_col else None
                corpus.prompts.append(given if isinstance(given, str) and given.strip() else prompt)
            corpus.labels.append(_category(row, label_col))
            corpus.langs.append(file_lang if file_lang is not None else _category(row, lang_col))
        corpus.files.append(str(path))
    if not corpus.texts:
        raise NeurostoreError(f"no usable sentences: all {len(corpus.skipped)} rows were skipped ({corpus.skipped[0]})")
    corpus.fingerprint = _fingerprint(fingerprint_parts)
    corpus.sources = {
        "label": _source(f"column {label_col!r}", found_in["label"]),
        "lang": f"--lang {','.join(dict.fromkeys(langs_per_file))}" if lang is not None else _source(f"column {lang_col!r}", found_in["lang"]),
    }
    return corpus


def _source(what: str, found: list[bool]) -> str | None:
    """Where a categorical column came from: ``what``, in how many files if not all, or None."""
    if not any(found):
        return None
    return what if all(found) else f"{what} ({sum(found)} of {len(found)} files)"


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
