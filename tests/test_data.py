"""Data layer: loading every format, validation errors, chat-template masks, weights, truncation."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import write_jsonl
from posttrain.config import DataSource
from posttrain.data.adapters import gsm8k, hh_rlhf
from posttrain.data.formats import parse_sft
from posttrain.data.load import load_sources
from posttrain.data.tokenize import ChatFormatter, tokenize_sft
from posttrain.errors import DataError

CONVERSATION = {"messages": [
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "2+3 = 5"},
    {"role": "user", "content": "And 4+4?"},
    {"role": "assistant", "content": "4+4 = 8"},
]}


def targets_text(tokenizer, tokenized):
    """Decode the tokens that carry loss, as contiguous runs."""
    runs, current = [], []
    for token, weight in zip(tokenized.input_ids, tokenized.weights):
        if weight > 0:
            current.append(int(token))
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def tokenize(tokenizer, record, **kw):
    options = {"max_length": 512, "truncation": "right", "assistant_only": True} | kw
    return tokenize_sft(parse_sft("x.jsonl", "line 1", record), tokenizer, ChatFormatter(tokenizer), **options)


def test_assistant_only_mask_is_exactly_the_assistant_turns(tiny_tokenizer):
    tokenized = tokenize(tiny_tokenizer, CONVERSATION)
    assert targets_text(tiny_tokenizer, tokenized) == ["2+3 = 5<|im_end|>", "4+4 = 8<|im_end|>"]


def test_full_sequence_loss_when_assistant_only_is_off(tiny_tokenizer):
    tokenized = tokenize(tiny_tokenizer, CONVERSATION, assistant_only=False)
    assert tokenized.weights[0] == 0 and (tokenized.weights[1:] > 0).all()


def test_turn_weight_zero_skips_a_turn_and_segments_weight_tokens(tiny_tokenizer):
    record = {"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "skip me", "weight": 0},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": [{"text": "plain "}, {"text": "IMPORTANT", "weight": 3.0}]},
    ], "weight": 0.5}
    tokenized = tokenize(tiny_tokenizer, record)
    assert targets_text(tiny_tokenizer, tokenized) == ["plain IMPORTANT<|im_end|>"]
    ids, w = tokenized.input_ids, tokenized.weights
    weights_by_text = {}
    for token, weight in zip(ids, w):
        if weight > 0:
            weights_by_text.setdefault(float(weight), []).append(int(token))
    assert tiny_tokenizer.decode(weights_by_text[1.5]) == "IMPORTANT"  # 3.0 segment x 0.5 sample weight
    assert "plain" in tiny_tokenizer.decode(weights_by_text[0.5])


def test_plain_prompt_completion_trains_on_completion_and_eos(tiny_tokenizer):
    tokenized = tokenize(tiny_tokenizer, {"prompt": "Question: 1+1?", "completion": " 2"})
    assert targets_text(tiny_tokenizer, tokenized) == [" 2<|im_end|>"]


def test_conversational_prompt_completion_uses_the_template(tiny_tokenizer):
    record = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello"}]}
    assert targets_text(tiny_tokenizer, tokenize(tiny_tokenizer, record)) == ["hello<|im_end|>"]


def test_truncation_right_left_and_drop(tiny_tokenizer):
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]}
    full = tokenize(tiny_tokenizer, long, max_length=10_000)
    cut = int(np.argmax(full.weights > 0)) + 20  # keeps 20 tokens of the answer
    right = tokenize(tiny_tokenizer, long, max_length=cut)
    left = tokenize(tiny_tokenizer, long, max_length=cut, truncation="left")
    assert len(right.input_ids) == len(left.input_ids) == cut and right.truncated and left.truncated
    assert (right.input_ids == full.input_ids[:cut]).all() and (left.input_ids == full.input_ids[-cut:]).all()
    assert tiny_tokenizer.decode(left.input_ids).endswith("<|im_end|>\n")
    assert left.weights[0] == 0 and right.weights[1:].sum() == 20
    assert tokenize(tiny_tokenizer, long, max_length=cut, truncation="drop") is None
    prompt_only = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    assert tokenize(tiny_tokenizer, prompt_only, max_length=cut) is None  # no target left after cutting


def test_every_file_format_loads_the_same_records(tmp_path):
    records = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    write_jsonl(tmp_path / "d.jsonl", records)
    (tmp_path / "d.json").write_text(json.dumps(records))
    pd.DataFrame(records).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame(records).to_csv(tmp_path / "d.csv", index=False)
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    for name in ["d.jsonl", "d.json", "d.parquet", "d.csv", "saved"]:
        loaded = [r for _, _, r in load_sources([DataSource(path=str(tmp_path / name))])]
        assert loaded == records, name


def test_messages_column_in_csv_is_decoded(tmp_path):
    pd.DataFrame([{"messages": json.dumps(CONVERSATION["messages"])}]).to_csv(tmp_path / "m.csv", index=False)
    (_, _, record), = load_sources([DataSource(path=str(tmp_path / "m.csv"))])
    assert parse_sft("m.csv", "line 2", record).messages[1].content == "2+3 = 5"


def test_mixture_weights_repeat_and_subsample(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    mixed = load_sources([DataSource(path=str(tmp_path / "a.jsonl"), weight=2.0),
                          DataSource(path=str(tmp_path / "b.jsonl"), weight=0.5)])
    texts = [r["text"] for _, _, r in mixed]
    assert sum(t.startswith("a") for t in texts) == 20 and sum(t.startswith("b") for t in texts) == 5


def test_a_limit_over_a_mixture_keeps_its_proportions(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    sources = [DataSource(path=str(tmp_path / "a.jsonl"), weight=2.0), DataSource(path=str(tmp_path / "b.jsonl"))]
    texts = [r["text"] for _, _, r in load_sources(sources, limit=9, label="data.train")]
    assert texts == [f"a{i}" for i in range(6)] + ["b0", "b1", "b2"]  # 20 : 10 -> 6 : 3, each source's first records
    printed = capsys.readouterr().out
    assert "data.train mixture:" in printed and "-> 6 (66.7%)" in printed and "-> 3 (33.3%)" in printed
    single = [r["text"] for _, _, r in load_sources(sources[1:], limit=4)]
    assert single == ["b0", "b1", "b2", "b3"]


def test_gsm8k_adapter_strips_calculator_marks_and_keeps_final_answer():
    record = gsm8k({"question": "Q?", "answer": "48/2 = <<48/2=24>>24 clips.\n#### 1,024"})
    assert record["completion"][0]["content"] == "48/2 = 24 clips.\n#### 1,024"
    assert record["answer"] == "1024" and record["prompt"][0]["role"] == "user"


def test_hh_rlhf_adapter_splits_shared_prompt():
    record = hh_rlhf({"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: sure",
                      "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: no"})
    assert [m["role"] for m in record["prompt"]] == ["user", "assistant", "user"]
    assert record["chosen"] == [{"role": "assistant", "content": "sure"}]
    assert record["rejected"] == [{"role": "assistant", "content": "no"}]


MALFORMED = [
    ('{"messages": [{"role": "user", "content": "hi"}, \n', "line 2", None, "invalid JSON"),
    ('{"prompt": "only a prompt"}\n', "line 2", "completion", "missing"),
    ('{"messages": "hello"}\n', "line 2", "messages", "must be a list"),
    ('{"messages": []}\n', "line 2", "messages", "empty"),
    ('{"messages": [{"role": "wizard", "content": "hi"}]}\n', "line 2", "messages[0].role", "unknown role"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}\n', "line 2",
     "messages[0].content", "must be a string"),
    (b'{"prompt": "caf\xe9", "completion": "x"}\n', "line 2", None, "not valid UTF-8"),
]


@pytest.mark.parametrize("line,where,field,message", MALFORMED)
def test_malformed_records_name_file_line_and_field(tmp_path, line, where, field, message):
    good = json.dumps(CONVERSATION) + "\n"
    path = tmp_path / "bad.jsonl"
    path.write_bytes(good.encode() + (line if isinstance(line, bytes) else line.encode()))
    with pytest.raises(DataError) as info:
        for file, loc, record in load_sources([DataSource(path=str(path))]):
            parse_sft(file, loc, record)
    error = info.value
    assert (error.path, error.location, error.field) == (str(path), where, field)
    assert message in str(error) and str(path) in str(error) and where in str(error)
