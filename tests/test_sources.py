import gzip
import json

import pytest

from stablekd.data_pipeline.sources import (
    Corpus,
    DataError,
    SourceStats,
    check_records,
    iter_documents,
    resolve_paths,
)


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _corpus(tmp_path):
    _write(tmp_path / "a.txt", b"alpha one\nalpha two\n")
    _write(tmp_path / "sub" / "b.jsonl", b'{"text": "beta"}\n')
    _write(tmp_path / "sub" / "deep" / "c.txt.gz", gzip.compress(b"gamma\n"))
    _write(tmp_path / "sub" / "d.jsonl.gz", gzip.compress(b'{"text": "delta"}\n'))
    _write(tmp_path / "sub" / "README.md", b"not a corpus file\n")


def test_resolve_file_dir_glob_sorted_and_deduplicated(tmp_path, monkeypatch):
    _corpus(tmp_path)
    all_four = [
        tmp_path / "a.txt",
        tmp_path / "sub" / "b.jsonl",
        tmp_path / "sub" / "d.jsonl.gz",
        tmp_path / "sub" / "deep" / "c.txt.gz",
    ]
    assert resolve_paths([tmp_path]) == all_four
    # Overlapping entries, written in another order and relative: same files, same order.
    monkeypatch.chdir(tmp_path)
    assert resolve_paths(["sub/**/*", "a.txt", str(tmp_path / "sub"), tmp_path / "a.txt"]) == all_four
    assert resolve_paths([str(tmp_path / "sub" / "*.jsonl*")]) == [all_four[1], all_four[2]]
    assert resolve_paths("a.txt") == [all_four[0]]  # a bare string is one path, not its characters


def test_resolve_errors_name_the_path(tmp_path):
    _corpus(tmp_path)
    with pytest.raises(DataError, match=r"missing\.txt: no such file.*\.jsonl\.gz"):
        resolve_paths([tmp_path / "missing.txt"])
    with pytest.raises(DataError, match=r"README\.md: unsupported file type.*\.txt, \.jsonl"):
        resolve_paths([tmp_path / "sub" / "README.md"])
    with pytest.raises(DataError, match=r"nothing\*\.txt: glob pattern matched no corpus files"):
        resolve_paths([str(tmp_path / "nothing*.txt")])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"empty_dir: directory holds no corpus files"):
        resolve_paths([tmp_path / "empty_dir"])


def test_documents_of_every_format_in_order(tmp_path):
    _corpus(tmp_path)
    stats = SourceStats()
    docs = list(iter_documents(resolve_paths([tmp_path]), stats))
    assert docs == ["alpha one", "alpha two", "beta", "delta", "gamma"]
    assert stats.as_dict() == dict(
        files=4, documents=5, empty_files=0, empty_lines=0, bad_lines=0, other_split=0, task_records=0
    )


def test_bad_input_is_skipped_and_counted_exactly(tmp_path):
    good_txt = ["first", "  indented keeps its spaces", "caf\u00e9 \u2028 one doc", "last no newline"]
    txt = _write(
        tmp_path / "t.txt",
        b"\xef\xbb\xbf" + good_txt[0].encode() + b"\r\n"  # BOM and CRLF are not part of the document
        b"\n   \n"  # 2 empty lines
        + good_txt[1].encode()
        + b"\nbad \xff\xfe bytes\n"  # 1 bad line
        + good_txt[2].encode()
        + b"\n"
        + good_txt[3].encode(),
    )
    jsonl_lines = [
        json.dumps({"text": "j1", "meta": 1}),
        "{not json",  # bad
        json.dumps({"title": "no text"}),  # bad
        json.dumps({"text": 5}),  # bad
        json.dumps(["text"]),  # bad
        "",  # empty
        json.dumps({"text": "  "}),  # empty
        json.dumps({"text": "j2\nwith newline"}),
    ]
    jsonl = _write(tmp_path / "j.jsonl", "\n".join(jsonl_lines).encode() + b"\n")
    empty = _write(tmp_path / "e.txt", b"")
    empty_gz = _write(tmp_path / "e.jsonl.gz", gzip.compress(b""))
    # Truncated gzip: the lines that decompress before the cut are kept, the rest of the file is lost.
    payload = b"".join(b"gz line %d\n" % i for i in range(2000))
    full = gzip.compress(payload)
    trunc = _write(tmp_path / "trunc.txt.gz", full[: len(full) // 2])
    after = _write(tmp_path / "z.txt", b"after the truncated file\n")

    stats = SourceStats()
    docs = list(iter_documents([txt, jsonl, empty, empty_gz, trunc, after], stats))

    gz_docs = [d for d in docs if d.startswith("gz line")]
    assert 0 < len(gz_docs) < 2000
    assert gz_docs == [f"gz line {i}" for i in range(len(gz_docs))]
    assert [d for d in docs if not d.startswith("gz line")] == good_txt + [
        "j1",
        "j2\nwith newline",
        "after the truncated file",
    ]
    assert stats.as_dict() == dict(
        files=6,
        documents=len(docs),
        empty_files=2,
        empty_lines=2 + 2,
        bad_lines=1 + 4 + 1,
        other_split=0,
        task_records=0,
    )


def test_stats_are_optional(tmp_path):
    f = _write(tmp_path / "x.txt", b"one\n\xff\ntwo\n")
    assert list(iter_documents([f])) == ["one", "two"]


# --- splits --------------------------------------------------------------------------------------


def _numbered(path, start: int, n: int):
    """A .txt of n distinct one-line documents, doc<start> ... doc<start + n - 1>."""
    return _write(path, "".join(f"doc {i} of the corpus\n" for i in range(start, start + n)).encode())


def _split(files, fraction, split, stats=None):
    return list(iter_documents(Corpus(tuple(files), "line", split, fraction), stats))


def test_split_is_deterministic_disjoint_complete_and_near_the_fraction(tmp_path):
    files = [_numbered(tmp_path / f"{k}.txt", 10_000 * k, 8_000) for k in range(3)]  # 24,000 documents
    everything = list(iter_documents(files))
    train_stats, eval_stats = SourceStats(), SourceStats()
    train = _split(files, 0.1, "train", train_stats)
    held = _split(files, 0.1, "eval", eval_stats)
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(everything)
    # Binomial(24,000, 0.1): mean 2,400, sd 46.5; 5 sd either side.
    assert abs(len(held) - 2_400) < 5 * 46.5
    assert (train_stats.documents, train_stats.other_split) == (len(train), len(held))
    assert (eval_stats.documents, eval_stats.other_split) == (len(held), len(train))
    # The same text gives the same split in another read, and a larger fraction only adds to the share.
    assert _split(files, 0.1, "eval") == held
    assert set(held) < set(_split(files, 0.2, "eval"))
    assert _split(files, 0.0, "eval") == [] and _split(files, 0.0, "train") == everything
    assert _split(files, 0.1, "all") == everything


def test_split_does_not_move_when_files_are_added_reordered_or_a_document_moves(tmp_path):
    a, b = _numbered(tmp_path / "a.txt", 0, 3_000), _numbered(tmp_path / "b.txt", 3_000, 3_000)
    held = set(_split([a, b], 0.05, "eval"))
    assert held  # ~150 expected
    c = _numbered(tmp_path / "0_first.txt", 6_000, 3_000)  # sorts before a.txt: every document index shifts
    grown = resolve_paths([tmp_path])
    assert grown[0] == c
    grown_held = set(_split(grown, 0.05, "eval"))
    assert grown_held - set(iter_documents([c])) == held
    assert set(_split([b, a], 0.05, "eval")) == held
    # A held-out document moved to another file stays held out; a training one stays in training.
    lines = a.read_text().splitlines(keepends=True)
    moved_held = next(x for x in lines if x.rstrip("\n") in held)
    moved_train = next(x for x in lines if x.rstrip("\n") not in held)
    a.write_text("".join(x for x in lines if x not in (moved_held, moved_train)))
    b.write_text(b.read_text() + moved_held + moved_train)
    assert set(_split([a, b], 0.05, "eval")) == held


def test_corpus_is_a_file_sequence_and_rejects_unknown_settings(tmp_path):
    f = _numbered(tmp_path / "x.txt", 0, 2)
    corpus = Corpus((f,), "paragraph", "train", 0.5)
    assert (
        list(corpus) == [f] and len(corpus) == 1 and corpus[0] == f and [str(p) for p in corpus] == [str(f)]
    )
    assert not Corpus(())
    with pytest.raises(DataError, match=r"text_unit: expected one of paragraph, line, file, got 'sentence'"):
        Corpus((f,), "sentence")
    with pytest.raises(DataError, match=r"split: expected one of all, train, eval"):
        Corpus((f,), "line", "test")
    with pytest.raises(DataError, match=r"eval_fraction: expected a value in \[0, 1\]"):
        Corpus((f,), "line", "train", 1.5)


# --- text units ----------------------------------------------------------------------------------


def test_text_units_on_a_txt_with_multi_line_paragraphs(tmp_path):
    txt = _write(
        tmp_path / "a.txt",
        b"\xef\xbb\xbfTitle line\r\n"  # BOM and CRLF are not part of the document
        b"second line of the first paragraph\n"
        b"\n\n   \n"  # one paragraph break written as 3 blank lines
        b"Second paragraph, one line\n"
        b"\n"
        b"  indented third paragraph\n"
        b"bad \xff line inside it\n"  # undecodable: left out of its paragraph, counted
        b"its last line, no newline",
    )
    blank = _write(tmp_path / "b_blank.txt", b"\n  \n\n")
    jsonl = _write(
        tmp_path / "c.jsonl", json.dumps({"text": "one record\n\nwith a blank line"}).encode() + b"\n"
    )
    empty = _write(tmp_path / "d_empty.txt", b"")
    files = [txt, blank, jsonl, empty]
    record = "one record\n\nwith a blank line"  # .jsonl: one document per record whatever the unit

    def read(unit):
        stats = SourceStats()
        return list(iter_documents(Corpus(tuple(files), unit), stats)), stats.as_dict()

    docs, stats = read("paragraph")
    assert docs == [
        "Title line second line of the first paragraph",
        "Second paragraph, one line",
        "indented third paragraph its last line, no newline",
        record,
    ]
    # Blank lines separate paragraphs (not counted); a file of blank lines gives nothing: an empty file.
    assert stats == dict(
        files=4, documents=4, empty_files=2, empty_lines=0, bad_lines=1, other_split=0, task_records=0
    )

    docs, stats = read("line")
    assert docs == [
        "Title line",
        "second line of the first paragraph",
        "Second paragraph, one line",
        "  indented third paragraph",
        "its last line, no newline",
        record,
    ]
    assert stats == dict(
        files=4, documents=6, empty_files=1, empty_lines=4 + 3, bad_lines=1, other_split=0, task_records=0
    )

    docs, stats = read("file")
    assert docs == [
        "Title line\nsecond line of the first paragraph\n\n\n   \nSecond paragraph, one line\n\n"
        "  indented third paragraph\nits last line, no newline",
        record,
    ]
    assert stats == dict(
        files=4, documents=2, empty_files=2, empty_lines=0, bad_lines=1, other_split=0, task_records=0
    )

    # A plain file list reads line by line, as before text units existed.
    assert list(iter_documents([txt])) == read("line")[0][:5]


def test_file_unit_drops_leading_and_trailing_blank_lines_and_splits_by_whole_text(tmp_path):
    f = _write(tmp_path / "f.txt", b"\n\n  first\n\nsecond\n\n\n")
    assert list(iter_documents(Corpus((f,), "file"))) == ["  first\n\nsecond"]
    # The split hashes the document as read: a whole file goes to one side.
    held = list(iter_documents(Corpus((f,), "file", "eval", 0.5)))
    train = list(iter_documents(Corpus((f,), "file", "train", 0.5)))
    assert sorted([*held, *train]) == ["  first\n\nsecond"] and len(held) + len(train) == 1


def test_check_records_refuses_a_jsonl_in_another_schema_or_mostly_bad(tmp_path):
    forms = '"text", "prompt" + "response"'
    qa = [json.dumps({"question": f"q{i}", "answer": f"a{i}"}) for i in range(30)]
    with pytest.raises(DataError) as e:
        check_records(_write(tmp_path / "answers.jsonl", ("\n".join(qa) + "\n").encode()))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'answers.jsonl'}: no usable record in 30 ")
    assert 'first: line 1: keys "question", "answer"' in msg and forms in msg

    good = [json.dumps({"text": f"doc {i}"}) for i in range(15)]
    tasks = [
        json.dumps({"prompt": "Q?", "response": " A."}),
        json.dumps({"messages": [{"role": "assistant", "content": "x"}]}),
    ]
    # 2 bad of 20 records (10 %) pass, 3 of 21 do not; blank lines are no records, blank texts not bad.
    ok = ["", *good, "  ", qa[0], *tasks, "{not json", json.dumps({"text": ""})]
    check_records(_write(tmp_path / "ok.jsonl", "\n".join(ok).encode()))
    bad = [*ok, json.dumps(["text"])]
    with pytest.raises(DataError) as e:
        check_records(_write(tmp_path / "bad.jsonl.gz", gzip.compress("\n".join(bad).encode())))
    assert (
        '3 of 21 records in no known form, more than the 10% allowed (first: line 18: keys "question", '
        in str(e.value)
    )
    # The readers still skip and count what the check lets through.
    stats = SourceStats()
    assert len(list(iter_documents([tmp_path / "ok.jsonl"], stats))) == 17 and stats.bad_lines == 2
    # Nothing usable at all: undecodable bytes or blank texts only, whatever the share.
    with pytest.raises(DataError, match=r"no usable record in 2 \(first: line 1: not UTF-8\)"):
        check_records(_write(tmp_path / "bytes.jsonl", b'\xff{"text": 1}\n{"text": " "}\n'))
    with pytest.raises(DataError, match=r"no usable record in 1 \(first: line 2: blank text\)"):
        check_records(_write(tmp_path / "blank.jsonl", b'\n{"text": " "}\n'))
    check_records(
        _write(tmp_path / "empty.jsonl", b"")
    )  # an empty file is counted by the readers, not refused


def test_check_records_judges_only_the_first_scan_records(tmp_path, monkeypatch):
    """The launching process parses a bounded prefix of each .jsonl, not a multi-GB corpus per launch."""
    from stablekd.data_pipeline import sources

    f = tmp_path / "late.jsonl"
    f.write_text('{"text": "fine"}\n' * 5 + '{"answer": "x"}\n' * 50)
    monkeypatch.setattr(sources, "SCAN_RECORDS", 5)
    sources.check_records(f)  # the 50 bad records lie past the scanned prefix
    monkeypatch.setattr(sources, "SCAN_RECORDS", 10)
    with pytest.raises(DataError, match="5 of 10 records"):
        sources.check_records(f)
