import gzip
import json

import pytest

from stablekd.data_pipeline.sources import DataError, SourceStats, iter_documents, resolve_paths


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
    assert stats.as_dict() == dict(files=4, documents=5, empty_files=0, empty_lines=0, bad_lines=0)


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
    )


def test_stats_are_optional(tmp_path):
    f = _write(tmp_path / "x.txt", b"one\n\xff\ntwo\n")
    assert list(iter_documents([f])) == ["one", "two"]
