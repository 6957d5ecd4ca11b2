"""Reading calibration files: every accepted shape yields dict rows, every broken file one DataError
line that names the file and, for JSON, the line at fault."""

import json
import random
import subprocess
import sys

import pytest

from inlaid.errors import DataError
from inlaid.quant.calib_data import load_calibration, read_rows

from ..conftest import make_tokenizer, run_cli


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def read_error(path) -> str:
    with pytest.raises(DataError) as info:
        read_rows(path)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(path) in message, message
    return message


# --- accepted files ---------------------------------------------------------------------------

def test_jsonl_rows_of_every_shape(tmp_path):
    rows = [{"text": "plain"}, {"prompt": "p", "response": "r"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    # A blank line, CRLF endings and an unescaped U+2028 inside a string are all still JSON Lines.
    body = json.dumps(rows[0]) + "\r\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n"
    path = write(tmp_path, "d.jsonl", body)
    assert read_rows(path) == rows
    odd = write(tmp_path, "odd.jsonl", '{"text": "a\u2028b"}\n')
    assert read_rows(odd) == [{"text": "a\u2028b"}]


@pytest.mark.parametrize("body,rows", [
    ('[{"text": "a"}, {"text": "b"}]', [{"text": "a"}, {"text": "b"}]),
    ('[\n  "a",\n  "b"\n]\n', [{"text": "a"}, {"text": "b"}]),
    ('{"text": "a"}\n{"text": "b"}\n', [{"text": "a"}, {"text": "b"}]),
    ('{\n  "prompt": "p",\n  "response": "r"\n}\n{"text": "b"}', [{"prompt": "p", "response": "r"},
                                                                 {"text": "b"}]),
    ('\ufeff{"text": "bom"}\n', [{"text": "bom"}]),
])
def test_json_shapes(tmp_path, body, rows):
    assert read_rows(write(tmp_path, "d.json", body)) == rows


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_files_written_by_datasets(tmp_path, fmt):
    import datasets

    rows = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(6)]
    path = tmp_path / f"d.{fmt}"
    getattr(datasets.Dataset.from_list(rows), f"to_{fmt}")(str(path))
    assert read_rows(path) == rows
    seqs = load_calibration(path, make_tokenizer(), samples=4, seq_len=16, min_tokens=8, seed=0,
                            task="t")
    assert len(seqs) == 4


# --- broken JSON ------------------------------------------------------------------------------

def test_null_row_is_an_error_not_a_crash(tmp_path):
    path = write(tmp_path, "null.jsonl", "null\n")
    message = read_error(path)
    assert "line 1" in message and "expected a JSON object, got null" in message


def test_null_row_through_the_cli(tmp_path, tiny_model, tiny_tasks):
    # A subprocess: the datasets JSON reader this replaced died with SIGSEGV on this file.
    path = write(tmp_path, "null.jsonl", "null\n")
    adapter = tiny_tasks["sql"][0]
    proc = subprocess.run([sys.executable, "-c", "from inlaid.cli.main import main; main()",
                           "quantize", str(tiny_model), str(tmp_path / "o"), "-t", f"x={adapter}:{path}",
                           "--group-size", "32"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(path) in proc.stderr and "line 1" in proc.stderr


@pytest.mark.parametrize("line,kind", [('"just text"', "string"), ("[1, 2]", "array"), ("7", "number"),
                                       ("true", "boolean")])
def test_rows_must_be_objects(tmp_path, line, kind):
    path = write(tmp_path, "d.jsonl", f'{{"text": "fine"}}\n\n{line}\n{{"text": "fine"}}\n')
    message = read_error(path)
    assert "line 3" in message and f"got {kind}" in message


def test_multi_line_objects_report_the_line_a_value_starts_on(tmp_path):
    message = read_error(write(tmp_path, "d.json", '{\n "text": "a"\n}\n\n{\n "text": "b"\n}\nnull\n'))
    assert "line 8" in message and "got null" in message


def test_array_items_must_be_objects_or_strings(tmp_path):
    message = read_error(write(tmp_path, "d.json", '[{"text": "a"}, null]'))
    assert "item 2" in message and "got null" in message


@pytest.mark.parametrize("body,line,reason", [
    ('{"text": "a"}\n{"text": "b"}\n{"text": "trunc\n{"text": "d"}\n', 3, "Unterminated string"),
    ('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n', 3, "Expecting ',' delimiter"),
    ('{"text": "a"}\n{"text": "b" "c"}\n{"text": "d"}\n', 2, "Expecting ',' delimiter"),
    ('{"text": "a"}\n{not json\n', 2, "Expecting property name"),
    ('[{"text": "a"},\n {"text": "b",}\n]\n', 2, "Expecting property name"),
])
def test_malformed_json_names_the_line(tmp_path, body, line, reason):
    message = read_error(write(tmp_path, "trunc.jsonl", body))
    assert message.startswith("cannot read calibration data") and f"line {line}:" in message
    assert reason in message


def test_malformed_json_through_the_cli_is_one_line(tmp_path, tiny_model, tiny_tasks, capfd):
    path = write(tmp_path, "trunc.jsonl", '{"text": "a"}\n{"text": "b"\n')
    adapter = tiny_tasks["sql"][0]
    assert run_cli(["quantize", tiny_model, tmp_path / "o", "-t", f"x={adapter}:{path}",
                    "--group-size", "32"]) == 1
    err = capfd.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert "line 2" in err and "Expecting" in err


# --- empty and non-text files -----------------------------------------------------------------

@pytest.mark.parametrize("name,body", [("e.jsonl", ""), ("e.json", " \n\n"), ("e.json", "[]"),
                                       ("e.jsonl", "\ufeff"), ("e.csv", ""), ("e.csv", "text\n"),
                                       ("e.parquet", "")])
def test_empty_files(tmp_path, name, body):
    assert read_error(write(tmp_path, name, body)).endswith("no rows")


def test_invalid_utf8(tmp_path):
    message = read_error(write(tmp_path, "d.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n'))
    assert "line 2" in message and "not UTF-8" in message


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_binary_garbage(tmp_path, suffix, capfd):
    garbage = random.Random(0).randbytes(4096)
    read_error(write(tmp_path, f"g.{suffix}", garbage))
    assert capfd.readouterr().err == ""  # the datasets logger stays quiet


def test_csv_errors_carry_the_parser_reason(tmp_path, capfd):
    message = read_error(write(tmp_path, "d.csv", 'text\n"unterminated\n'))
    assert "An error occurred while generating" not in message and "EOF inside string" in message
    assert capfd.readouterr().err == ""


def test_rows_without_usable_fields(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"other": 1}\n{"text": ""}\n{"prompt": "no response"}\n')
    with pytest.raises(DataError, match="no usable rows .*'text'.*'prompt' \\+ 'response'.*'messages'"):
        load_calibration(path, make_tokenizer(), samples=4, seq_len=16, min_tokens=8, seed=0, task="t")
