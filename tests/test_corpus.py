"""Reading corpora without a model: every format, the column options, --lang, and bad rows named
by file and line (or skipped and counted)."""

from __future__ import annotations

import json
import shutil

import pytest

from neurostore.corpus import categories, read_corpus
from neurostore.errors import NeurostoreError

ROWS = [("I am happy", "joy", "en"), ("Estoy triste", "sadness", "es"), ("Il pleut, hélas", "neutral", "fr")]


def _write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _table(sep: str) -> str:
    quote = (lambda s: f'"{s}"' if sep in s else s)
    return "text{0}label{0}lang\n".format(sep) + "".join(sep.join(map(quote, r)) + "\n" for r in ROWS)


@pytest.mark.parametrize("name, content", [
    ("c.jsonl", "".join(json.dumps({"text": t, "label": l, "lang": g}) + "\n" for t, l, g in ROWS)),
    ("c.ndjson", "".join(json.dumps({"lang": g, "text": t, "label": l}) + "\n" for t, l, g in ROWS)),
    ("c.csv", _table(",")),
    ("c.tsv", _table("\t")),
    ("c.tab", _table("\t")),
])
def test_every_table_format_gives_the_same_records(tmp_path, name, content):
    c = read_corpus([_write(tmp_path / name, content)])
    assert c.texts == [r[0] for r in ROWS]
    assert c.labels == [r[1] for r in ROWS] and c.langs == [r[2] for r in ROWS]
    assert c.files == [str(tmp_path / name)] and len(c) == 3
    assert c.sources == {"label": "column 'label'", "lang": "column 'lang'"}
    assert c.skipped == [] and c.lacking == []


def test_plain_text_is_one_sentence_a_line(tmp_path):
    c = read_corpus([_write(tmp_path / "c.txt", "first, with a comma\tand a tab\r\nsecond\n")])
    assert c.texts == ["first, with a comma\tand a tab", "second"]
    assert c.labels == [None, None] and c.langs == [None, None]
    assert c.sources == {"label": None, "lang": None} and c.lacking == []


def test_format_given_overrides_the_extension(tmp_path):
    path = _write(tmp_path / "c.data", _table(","))
    with pytest.raises(NeurostoreError, match=r"c\.data.*extension"):
        read_corpus([path])
    assert read_corpus([path], fmt="csv").texts == [r[0] for r in ROWS]
    assert read_corpus([path], fmt="text").texts[0] == "text,label,lang"
    with pytest.raises(NeurostoreError, match="'xml'"):
        read_corpus([path], fmt="xml")


def test_bom_crlf_and_quoted_fields(tmp_path):
    path = _write(tmp_path / "c.csv", b'\xef\xbb\xbftext,label\r\n"a, b",x\r\n"say ""hi""", y \r\n')
    c = read_corpus([path])
    assert c.texts == ["a, b", 'say "hi"'] and c.labels == ["x", "y"]


def test_columns_named_otherwise(tmp_path):
    path = _write(tmp_path / "c.jsonl", "".join(json.dumps({"s": t, "emo": l, "code": g, "n": i}) + "\n" for i, (t, l, g) in enumerate(ROWS)))
    c = read_corpus([path], text_col="s", label_col="emo", lang_col="code")
    assert c.texts == [r[0] for r in ROWS] and c.labels == [r[1] for r in ROWS] and c.langs == [r[2] for r in ROWS]
    assert c.sources == {"label": "column 'emo'", "lang": "column 'code'"}
    # any column can be the label; values become strings
    assert read_corpus([path], text_col="s", label_col="n", lang_col=None).labels == ["0", "1", "2"]
    # no label column asked for: none read, none lacking
    c = read_corpus([path], text_col="s", label_col=None, lang_col=None)
    assert c.labels == [None] * 3 and c.langs == [None] * 3 and c.lacking == []
    with pytest.raises(NeurostoreError, match=r"c\.jsonl: no column 'text' \(columns found: 's', 'emo', 'code', 'n'\)"):
        read_corpus([path])


def test_missing_label_and_lang_columns_are_noted_not_errors(tmp_path):
    a = _write(tmp_path / "a.csv", "sentence,emotion\nhello,joy\n")
    b = _write(tmp_path / "b.csv", "sentence,label\nbye,sadness\n")
    c = read_corpus([a, b], text_col="sentence")
    assert c.labels == [None, "sadness"] and c.langs == [None, None]
    assert c.lacking == [(str(a), ["sentence", "emotion"], [("label", "label"), ("lang", "lang")]),
                         (str(b), ["sentence", "label"], [("lang", "lang")])]
    assert c.sources == {"label": "column 'label' (1 of 2 files)", "lang": None}
    warning = c.missing_columns_warning()
    assert str(a) in warning and "1 more file" in warning and "sentence, emotion" in warning and "--label-col" in warning
    assert "\n" not in warning
    assert read_corpus([b], text_col="sentence", lang="en").missing_columns_warning() is None


def test_empty_labels_are_missing(tmp_path):
    path = _write(tmp_path / "c.jsonl", '{"text": "a", "label": ""}\n{"text": "b", "label": "  "}\n{"text": "c", "label": null}\n'
                                        '{"text": "d", "label": " x "}\n{"text": "e"}\n')
    assert read_corpus([path]).labels == [None, None, None, "x", None]


def test_lang_for_whole_files(tmp_path):
    a = _write(tmp_path / "a.txt", "hello\nworld\n")
    b = _write(tmp_path / "b.txt", "hallo\n")
    c = _write(tmp_path / "c.csv", "text,lang\nbonjour,xx\n")
    assert read_corpus([a, b], lang="en,de").langs == ["en", "en", "de"]
    assert read_corpus([a, b], lang=["en", "de"]).langs == ["en", "en", "de"]
    assert read_corpus([a, b], lang="en").langs == ["en", "en", "en"]
    # --lang wins over a language column
    got = read_corpus([a, c], lang="en,fr")
    assert got.langs == ["en", "en", "fr"] and got.sources["lang"] == "--lang en,fr"
    for bad in ("en,de,fr", "en,", ["en", "de", "fr"]):
        with pytest.raises(NeurostoreError, match=r"--lang gives \d language\(s\) for 2 file\(s\)"):
            read_corpus([a, b], lang=bad)


def test_files_are_read_in_the_order_given(tmp_path):
    a = _write(tmp_path / "a.txt", "one\ntwo\n")
    b = _write(tmp_path / "b.jsonl", '{"text": "three", "label": "x"}\n')
    c = read_corpus([b, a])
    assert c.texts == ["three", "one", "two"] and c.labels == ["x", None, None]
    assert c.files == [str(b), str(a)]


@pytest.mark.parametrize("name, content, where, why", [
    # line numbers count every line of the file: blank lines, the header, a BOM
    ("b.jsonl", '{"text": "ok"}\n\n{"text": ""}\n', "b.jsonl:3", "empty text"),
    ("b.jsonl", '{"text": "ok"}\n{"label": "x"}\n', "b.jsonl:2", "column 'text' is missing or not a string"),
    ("b.jsonl", '{"text": "ok"}\n{"text": 5}\n', "b.jsonl:2", "not a string"),
    ("b.jsonl", '{"text": "ok"}\n{"text": "a",}\n', "b.jsonl:2", "not valid JSON"),
    ("b.jsonl", '{"text": "ok"}\n["a"]\n', "b.jsonl:2", "expected a JSON object, got list"),
    ("b.csv", "text,label\nok,a\n   ,b\n", "b.csv:3", "empty text"),
    ("b.csv", "text,label\nok,a\nthree,fields,here\n", "b.csv:3", "3 fields, but the header has 2"),
    ("b.tsv", "\ufefftext\tlabel\nok\ta\n\tb\n", "b.tsv:3", "empty text"),
    ("b.txt", "ok\n\nfine\n", "b.txt:2", "empty text"),
    ("b.txt", b"ok\nfine\nnot caf\xe9\n", "b.txt:3", "not valid UTF-8 (byte 0xe9 at column 8)"),
])
def test_bad_rows_are_named_by_file_and_line(tmp_path, name, content, where, why):
    path = _write(tmp_path / name, content)
    with pytest.raises(NeurostoreError) as err:
        read_corpus([path], skip_bad=False)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / where}: ") and why in message and "\n" not in message, message


def test_skip_bad_leaves_out_and_counts_unusable_rows(tmp_path):
    a = _write(tmp_path / "a.jsonl", '{"text": "one", "label": "x"}\n{"text": " "}\n{"text": null}\n{"text": "two", "label": "y"}\n')
    b = _write(tmp_path / "b.csv", "text,label\n,z\nthree,z\n")
    with pytest.raises(NeurostoreError, match=r"a\.jsonl:2: empty text \(--skip-bad skips and counts such rows\)"):
        read_corpus([a, b], skip_bad=False)
    # a caller without a --skip-bad option gets no hint about it
    with pytest.raises(NeurostoreError) as err:
        read_corpus([a, b])
    assert str(err.value) == f"{a}:2: empty text"
    c = read_corpus([a, b], skip_bad=True)
    assert c.texts == ["one", "two", "three"] and c.labels == ["x", "y", "z"]
    assert c.skipped == [f"{a}:2: empty text", f"{a}:3: column 'text' is missing or not a string", f"{b}:2: empty text"]
    # the same bytes skip the same rows (what a resume relies on)
    assert read_corpus([a, b], skip_bad=True).skipped == c.skipped


def test_only_unusable_rows_is_an_error_even_when_skipping(tmp_path):
    path = _write(tmp_path / "a.txt", " \n\t\n")
    with pytest.raises(NeurostoreError, match=r"no usable sentences: all 2 rows were skipped \(.*a\.txt:1: empty text\)"):
        read_corpus([path], skip_bad=True)


@pytest.mark.parametrize("make, fragment", [
    (lambda d: d / "nope.txt", "nope.txt: no such file"),
    (lambda d: d, "is a directory"),
    (lambda d: _write(d / "e.jsonl", ""), "e.jsonl: no sentences"),
    (lambda d: _write(d / "h.csv", "text,label\n"), "h.csv: no sentences"),
])
def test_unusable_files(tmp_path, make, fragment):
    with pytest.raises(NeurostoreError, match=fragment):
        read_corpus([make(tmp_path)])
    with pytest.raises(NeurostoreError, match="no corpus file"):
        read_corpus([])


def test_fingerprint_follows_the_bytes_and_options_not_the_path(tmp_path):
    a = _write(tmp_path / "a.csv", _table(","))
    (tmp_path / "moved").mkdir()
    moved = shutil.copy(a, tmp_path / "moved" / "a.csv")
    base = read_corpus([a]).fingerprint
    assert len(base) == 64 and read_corpus([moved]).fingerprint == base
    assert read_corpus([a], lang="en").fingerprint != base
    assert read_corpus([a], label_col=None).fingerprint != base
    changed = _write(tmp_path / "b.csv", _table(",").replace("happy", "glad"))
    assert read_corpus([changed]).fingerprint != base


def test_slice_keeps_the_corpus_wide_fields(tmp_path):
    c = read_corpus([_write(tmp_path / "a.csv", _table(","))])
    part = c.slice(1, 3)
    assert part.texts == [r[0] for r in ROWS[1:]] and part.langs == ["es", "fr"]
    assert part.fingerprint == c.fingerprint and part.files == c.files and part.sources == c.sources


def test_categories_are_sorted_with_missing_as_minus_one():
    assert categories(["b", None, "a", "b"]) == (["a", "b"], [1, -1, 0, 1])
    assert categories([None, None]) == ([], [-1, -1])
    # every part of a corpus gets the same codes for the same names, whatever their order
    assert categories(["es", "en"])[0] == categories(["en", "es"])[0]


def test_a_bad_csv_row_after_a_quoted_multiline_field_is_named_by_its_line(tmp_path):
    path = _write(tmp_path / "q.csv", 'text,label\n"two\nlines",joy\nok,joy,extra\n')
    with pytest.raises(NeurostoreError, match=r"q\.csv:4: 3 fields, but the header has 2"):
        read_corpus([str(path)])
    path = _write(tmp_path / "r.csv", 'text,label\n"two\nlines",joy\n"",joy\n')
    with pytest.raises(NeurostoreError, match=r"r\.csv:4:"):
        read_corpus([str(path)])
