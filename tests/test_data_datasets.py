"""Prompt datasets: loading local files and directories, errors, resumable iteration."""

import json

import pytest

from plait.data.datasets import DataError, PromptIterator, load_prompt_rows, split_rows

ROWS = [
    {"question": "1+1=", "solution": "2", "level": 1},
    {"question": "2+2=", "solution": "4", "level": 2},
    {"question": "3+4=", "solution": "7", "level": 3},
]
MAPPING = {"prompt": "question", "answer": "solution"}
# every column under its own name, the mapped ones under plait's names too
EXPECTED = [
    {"prompt": "1+1=", "answer": "2", "question": "1+1=", "solution": "2", "level": 1},
    {"prompt": "2+2=", "answer": "4", "question": "2+2=", "solution": "4", "level": 2},
    {"prompt": "3+4=", "answer": "7", "question": "3+4=", "solution": "7", "level": 3},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_jsonl_with_field_mapping_keeps_extra_columns(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    assert load_prompt_rows(path, fields=MAPPING) == EXPECTED
    assert load_prompt_rows(str(path), fields=MAPPING, limit=2) == EXPECTED[:2]


def test_mapped_name_replaces_its_column_and_reward_arguments_are_not_kept(tmp_path):
    """A mapped column replaces a column that has plait's name; one named like a reward
    function's own arguments (``prompts``, ``completions``) stays under plait's name only,
    as a field of that name could not be passed."""
    path = write_jsonl(tmp_path / "data.jsonl", [
        {"prompts": "1+1=", "answer": "two", "completions": "2", "answers": "2"}])
    rows = load_prompt_rows(path, fields={"prompt": "prompts", "answer": "completions"})
    assert rows == [{"prompt": "1+1=", "answer": "2", "answers": "2"}]
    rows = load_prompt_rows(path, fields={"prompt": "prompts", "answer": "answers"})
    assert rows == [{"prompt": "1+1=", "answer": "2", "answers": "2", "completions": "2"}]


def test_json_list_and_identity_mapping(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"prompt": "a*2=", "answer": "aa"}, {"prompt": "b*1="}]))
    assert load_prompt_rows(path) == [{"prompt": "a*2=", "answer": "aa"}, {"prompt": "b*1="}]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_prompt_rows(path, fields=MAPPING) == EXPECTED


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert load_prompt_rows(tmp_path / "single", fields=MAPPING) == EXPECTED

    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS[:2]), test=datasets.Dataset.from_list(ROWS[2:])
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_prompt_rows(tmp_path / "dict", split="test", fields=MAPPING) == EXPECTED[2:]
    assert load_prompt_rows(tmp_path / "dict", fields=MAPPING, limit=1) == EXPECTED[:1]
    with pytest.raises(
        DataError, match=r"no split 'validation'; available splits: \['test', 'train'\]"
    ):
        load_prompt_rows(tmp_path / "dict", split="validation", fields=MAPPING)


def test_directory_of_data_files(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_jsonl(data_dir / "train.jsonl", ROWS[:2])
    write_jsonl(data_dir / "test.jsonl", ROWS[2:])
    rows = load_prompt_rows(data_dir, split="test", fields=MAPPING, cache_dir=tmp_path / "cache")
    assert rows == EXPECTED[2:]


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n{"prompt": "c"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: malformed JSON"):
        load_prompt_rows(path)


def test_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a"}\n["b"]\n')
    with pytest.raises(DataError, match=r"line 2: expected a JSON object.*got list"):
        load_prompt_rows(path)


def test_missing_prompt_lists_columns_and_suggests_nearest(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"promt": "1+1=", "answer": "2"}])
    with pytest.raises(DataError) as info:
        load_prompt_rows(path)
    message = str(info.value)
    assert "data.jsonl, line 1" in message and "['answer', 'promt']" in message
    assert "did you mean 'promt'" in message and "fields={'prompt': 'promt'}" in message

    path = write_jsonl(tmp_path / "qa.jsonl", ROWS)
    with pytest.raises(DataError, match=r"did you mean 'question'"):
        load_prompt_rows(path)


def test_mapped_column_missing(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    with pytest.raises(
        DataError, match=r"maps 'answer' to column 'solutions'.*did you mean 'solution'"
    ):
        load_prompt_rows(path, fields={"prompt": "question", "answer": "solutions"})


@pytest.mark.parametrize(
    ("prompt", "error"),
    [(3, "prompt must be a str, got int"), ([{"role": "user"}], "chat-style"), ("  ", "empty")],
)
def test_prompt_must_be_a_non_empty_string(tmp_path, prompt, error):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "ok"}, {"prompt": prompt}])
    with pytest.raises(DataError, match=rf"line 2: .*{error}"):
        load_prompt_rows(path)


def test_hub_id_is_refused_with_advice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"only from local paths.*save_to_disk"):
        load_prompt_rows("openai/gsm8k")


def test_missing_path_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match=r"not found"):
        load_prompt_rows(tmp_path / "nope.jsonl")
    (tmp_path / "data.csv").write_text("prompt\n1+1=\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        load_prompt_rows(tmp_path / "data.csv")


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_prompt_rows(tmp_path / "empty.jsonl")


def test_split_rows_is_deterministic_and_disjoint():
    rows = [{"prompt": str(i)} for i in range(20)]
    train, held_out = split_rows(rows, 0.25, seed=1)
    assert (train, held_out) == split_rows(rows, 0.25, seed=1)
    assert len(held_out) == 5 and len(train) == 15
    assert sorted(r["prompt"] for r in train + held_out) == sorted(r["prompt"] for r in rows)
    with pytest.raises(DataError, match="leaves no training rows"):
        split_rows(rows[:1], 0.5)


def prompts_of(batch):
    return [row["prompt"] for row in batch]


def test_prompt_iterator_epochs_are_shuffled_permutations_of_seed_and_epoch():
    rows = [{"prompt": str(i)} for i in range(10)]
    iterator = PromptIterator(rows, seed=5)
    first_epoch = prompts_of(iterator.next_batch(10))
    second_epoch = prompts_of(iterator.next_batch(10))
    assert sorted(first_epoch) == sorted(second_epoch) == sorted(r["prompt"] for r in rows)
    assert first_epoch != second_epoch
    assert iterator.epoch == 1
    again = PromptIterator(rows, seed=5)
    assert prompts_of(again.next_batch(7)) + prompts_of(again.next_batch(13)) == (
        first_epoch + second_epoch
    )
    assert prompts_of(PromptIterator(rows, seed=6).next_batch(10)) != first_epoch
    assert prompts_of(PromptIterator(rows, shuffle=False).next_batch(3)) == ["0", "1", "2"]


def test_prompt_iterator_resumes_with_the_same_prompts():
    rows = [{"prompt": str(i)} for i in range(7)]
    iterator = PromptIterator(rows, seed=11)
    for _ in range(4):
        iterator.next_batch(3)
    state = json.loads(json.dumps(iterator.state_dict()))
    assert state == {"seed": 11, "epoch": 1, "position": 5, "num_rows": 7}
    resumed = PromptIterator(rows, seed=0)
    resumed.load_state_dict(state)
    for _ in range(5):
        assert resumed.next_batch(3) == iterator.next_batch(3)


def test_prompt_iterator_refuses_state_from_other_rows():
    state = PromptIterator([{"prompt": "a"}] * 4).state_dict()
    with pytest.raises(DataError, match="saved over 4 rows but this iterator has 3"):
        PromptIterator([{"prompt": "a"}] * 3).load_state_dict(state)


def test_prompt_iterator_returns_copies():
    rows = [{"prompt": "a"}]
    PromptIterator(rows).next_batch(1)[0]["prompt"] = "changed"
    assert rows == [{"prompt": "a"}]
