import json

import pytest

from taskprune.data import DataError, format_text, load_examples, sample
from taskprune.models.synthetic import byte_tokenizer


@pytest.mark.parametrize("name,split,count", [("gsm8k", "train", 7473), ("gsm8k", "test", 1319), ("squad", None, 10570),
                                              ("mbpp", "train", 374), ("mbpp", "test", 500), ("humaneval", None, 164)])
def test_registry_sizes(data_dir, name, split, count):
    assert len(load_examples(name, data_dir, split)) == count


def test_chitchat_and_fields(data_dir):
    chat = load_examples("chitchat")
    assert len(chat) > 1000 and all(ex.prompt and ex.response for ex in chat[:50])
    mbpp = load_examples("mbpp", data_dir, "test")[0]
    assert mbpp.id == "mbpp/11" and mbpp.meta["test_list"] and "def " in mbpp.response
    squad = load_examples("squad", data_dir)[0]
    assert "\n\nQuestion: " in squad.prompt and squad.response


def test_sample_is_seeded():
    items = load_examples("humaneval")
    a, b, c = sample(items, 10, 0), sample(items, 10, 0), sample(items, 10, 1)
    assert a == b and a != c and len(a) == 10
    assert sample(items, None, 0) == items and sample(items, 1000, 0) == items


def test_local_jsonl_with_named_field(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"text {i}", "other": i}) for i in range(3)) + "\n")
    ex = load_examples(f"{path}:body")
    assert [e.prompt for e in ex] == ["text 0", "text 1", "text 2"]
    with pytest.raises(DataError, match="no text field 'text'"):
        load_examples(str(path))


def test_local_json_list(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [e.prompt for e in load_examples(str(path))] == ["a", "b"]


def test_malformed_and_empty_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_examples(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_examples(str(empty))
    with pytest.raises(DataError, match="does not exist"):
        load_examples(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="unknown data set"):
        load_examples("not-a-dataset")


def test_missing_local_copy_explains_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as on a machine without `datasets`
    with pytest.raises(DataError, match="TASKPRUNE_DATA"):
        load_examples("gsm8k", tmp_path)


def test_format_text_chat_raw_and_response():
    tok = byte_tokenizer()
    ex = load_examples("humaneval")[0]
    chat = format_text(tok, ex, "chat", "prompt")
    assert chat.startswith("<|im_start|>user\n") and chat.endswith("<|im_start|>assistant\n")
    both = format_text(tok, ex, "chat", "prompt+response")
    assert ex.response in both and not both.endswith("assistant\n")
    assert format_text(tok, ex, "raw", "prompt") == ex.prompt


def test_mc_set_as_capture_examples(tmp_path):
    rows = [{"query": f"Question: q{i}?\nAnswer:", "choices": ["a", "b", "c"], "gold": i % 3} for i in range(4)]
    (tmp_path / "arc-easy").mkdir()
    (tmp_path / "arc-easy" / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    examples = load_examples("mc:arc-easy", tmp_path)  # default: not the evaluation split (test)
    assert [e.prompt for e in examples] == [r["query"] for r in rows]
    assert [e.response for e in examples] == ["a", "b", "c", "a"]
    assert examples[0].meta["split"] == "validation"
    with pytest.raises(DataError, match="splits"):
        load_examples("mc:arc-easy:nope", tmp_path)
    with pytest.raises(DataError, match="unknown multiple-choice set"):
        load_examples("mc:nosuchset", tmp_path)


def test_named_split_of_a_registry_set(data_dir):
    non_test = load_examples("mbpp:non-test", data_dir)
    ids = {int(ex.id.split("/")[1]) for ex in non_test}
    assert len(non_test) == 474 and ids == set(range(1, 11)) | set(range(511, 975))
    assert not ids & {int(ex.id.split("/")[1]) for ex in load_examples("mbpp:test", data_dir)}
    assert [ex.id for ex in load_examples("mbpp", data_dir)] == [ex.id for ex in load_examples("mbpp:train", data_dir)]
    with pytest.raises(DataError, match="mbpp has splits"):
        load_examples("mbpp:tset", data_dir)


def test_data_layer_does_not_import_evaluation():
    import subprocess
    import sys
    code = ("import sys, taskprune.data, taskprune.data.multiple_choice; "
            "print(sorted(m for m in sys.modules if m.startswith('taskprune.evaluate')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

