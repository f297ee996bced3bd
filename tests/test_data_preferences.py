"""Preference pairs: the standard and conversational forms, field mapping, bad rows."""

import json

import pytest

from plait.data.datasets import DataError
from plait.data.preferences import load_preference_rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_standard_pairs_keep_their_other_columns(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "2+2=", "chosen": "4", "rejected": "5", "source": "math"},
        {"prompt": "3+3=", "chosen": "6", "rejected": "six?"}])
    data = load_preference_rows(path)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in data.rows] == \
        [("2+2=", "4", "5"), ("3+3=", "6", "six?")]
    assert data.rows[0]["source"] == "math" and not data.rows[0]["conversational"]
    assert not data.dropped


def test_fields_map_columns_which_stay_under_their_own_names(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"question": "2+2=", "good": "4", "bad": "5"}])
    data = load_preference_rows(path, fields={"prompt": "question", "chosen": "good",
                                              "rejected": "bad"})
    row = data.rows[0]
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("2+2=", "4", "5")
    assert row["question"] == "2+2=" and row["good"] == "4"
    with pytest.raises(DataError, match=r"fields maps \['answer'\]"):
        load_preference_rows(path, fields={"answer": "good"})


def test_conversational_pairs_with_and_without_a_prompt_column(tmp_path):
    explicit = write_jsonl(tmp_path / "explicit.jsonl", [
        {"prompt": [user("hi")], "chosen": [assistant("hello!")],
         "rejected": [assistant("go away")]}])
    row = load_preference_rows(explicit).rows[0]
    assert row["conversational"] and row["prompt"] == [user("hi")]
    implicit = write_jsonl(tmp_path / "implicit.jsonl", [
        {"chosen": [user("hi"), assistant("hello!")],
         "rejected": [user("hi"), assistant("go away")]}])
    row = load_preference_rows(implicit).rows[0]
    assert row["prompt"] == [user("hi")]
    assert (row["chosen"], row["rejected"]) == ([assistant("hello!")], [assistant("go away")])


def test_parquet_pairs(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "pairs.parquet"
    pd.DataFrame({"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["z", "w"]}) \
        .to_parquet(path)
    assert len(load_preference_rows(path).rows) == 2


BAD_ROWS = [
    ({"prompt": "p", "chosen": "a"}, r"line 2: no rejected column 'rejected'", "missing_rejected"),
    ({"prompt": "p", "chosen": "a", "rejectd": "b"},
     r"did you mean 'rejectd'\? Map it with fields=\{'rejected': 'rejectd'\}", "missing_rejected"),
    ({"prompt": "p", "chosen": "a", "rejected": "  "}, "line 2: rejected is empty",
     "empty_rejected"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"},
     "line 2: chosen and rejected are the same response", "identical"),
    ({"chosen": "a", "rejected": "b"}, "line 2: no prompt column", "missing_prompt"),
    ({"prompt": "p", "chosen": "a", "rejected": [assistant("b")]},
     "all strings or all message lists", "mixed_forms"),
    ({"chosen": [user("hi"), assistant("a")], "rejected": [user("yo"), assistant("b")]},
     "sharing every message but their last", "no_shared_prompt"),
    ({"prompt": [user("hi")], "chosen": [{"role": "bot", "content": "a"}],
      "rejected": [assistant("b")]}, r"chosen\[0\] has role 'bot'", "bad_chosen"),
    ({"prompt": [user("hi")], "chosen": [user("a")], "rejected": [assistant("b")]},
     "chosen must end with an assistant message", "bad_chosen"),
    ("just text", "expected a JSON object", "not_an_object"),
]


@pytest.mark.parametrize("bad, message, reason", BAD_ROWS)
def test_a_bad_row_is_named_by_file_and_line(tmp_path, bad, message, reason):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, bad, good])
    with pytest.raises(DataError, match=message) as caught:
        load_preference_rows(path)
    assert str(path) in str(caught.value)
    data = load_preference_rows(path, bad_rows="drop")
    assert len(data.rows) == 2 and data.dropped == {reason: 1}
    assert "line 2" in data.first_dropped


def test_dropping_every_row_still_fails(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataError, match=r"no preference pairs .*1 dropped, first: .*line 1"):
        load_preference_rows(path, bad_rows="drop")


def test_a_hub_id_is_refused_with_what_to_do():
    with pytest.raises(DataError, match="save_to_disk"):
        load_preference_rows("someone/preference-pairs")
