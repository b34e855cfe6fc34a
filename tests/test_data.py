"""Data layer: loading every format, validation errors, chat-template masks, weights, truncation."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from conftest import write_jsonl
from posttrain.data.config import DataSource
from posttrain.data.adapters import gsm8k, hh_rlhf
from posttrain.data.formats import parse_sft
from posttrain.data.load import load_sources
from posttrain.data.tokenize import ChatFormatter, tokenize_sft
from posttrain.core.errors import DataError

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


def json_values():
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


def records():
    """Random JSON objects, biased towards the field names and shapes the validators look for."""
    from hypothesis import strategies as st

    keys = st.sampled_from(["prompt", "completion", "messages", "text", "chosen", "rejected", "gold", "reference",
                            "label", "responses", "scores", "ratings", "completions", "labels", "weight", "question",
                            "answer", "margin", "steps"])
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "robot"]),
                                     "content": json_values() | st.text(max_size=12)},
                                    optional={"weight": json_values()})
    segment = st.fixed_dictionaries({"text": json_values() | st.text(max_size=8)}, optional={"weight": json_values()})
    hh = st.builds(lambda turns: "".join(f"\n\n{who}: {what}" for who, what in turns),
                   st.lists(st.tuples(st.sampled_from(["Human", "Assistant"]), st.text(max_size=8)), max_size=4))
    value = json_values() | st.lists(message, max_size=4) | st.lists(segment, max_size=3) | hh
    reply = st.text(max_size=8) | st.lists(message, min_size=1, max_size=3) | st.lists(segment, min_size=1, max_size=2)
    number = st.integers() | st.floats(allow_nan=True) | json_values()
    ratings = st.dictionaries(st.sampled_from(["helpful", "safe", "other"]), number, max_size=2) | json_values()
    shaped = st.one_of(  # nearly valid records of each format, so the checks past the first field are reached
        st.fixed_dictionaries({"prompt": reply, "chosen": reply, "rejected": reply},
                              optional={"gold": reply, "margin": number, "chosen_ratings": ratings, "weight": number}),
        st.fixed_dictionaries({"chosen": reply | hh, "rejected": reply | hh}),
        st.fixed_dictionaries({"prompt": reply, "completion": reply},
                              optional={"label": st.booleans() | number, "ratings": ratings, "weight": number}),
        st.fixed_dictionaries({"prompt": reply, "responses": st.lists(reply, max_size=3),
                               "scores": st.lists(number, max_size=3) | number}),
        st.fixed_dictionaries({"prompt": reply, "completions": st.lists(reply, max_size=3),
                               "labels": st.lists(st.booleans() | number, max_size=3)}),
        st.fixed_dictionaries({"messages": st.lists(message, max_size=4)}, optional={"weight": number}),
        st.fixed_dictionaries({"question": value, "answer": value}),
        st.lists(st.tuples(reply, st.integers(-3, 3)), max_size=3).map(
            lambda rs: {"prompt": "q", "responses": [r for r, _ in rs], "scores": [x for _, x in rs]}),
        st.lists(st.tuples(st.text(max_size=6), st.booleans()), max_size=3).map(
            lambda ss: {"prompt": "q", "completions": [t for t, _ in ss], "labels": [x for _, x in ss]}))
    return shaped | st.dictionaries(keys, value, max_size=5) | json_values()


def test_every_validator_raises_only_its_own_error_on_random_json():
    from hypothesis import HealthCheck, given, settings

    from posttrain.data.adapters import adapt
    from posttrain.data.formats import parse_preference, parse_ranked, parse_rated, parse_steps, parse_unpaired
    from posttrain.data.inspect import detect_format, examples_of

    parsers = [parse_sft, parse_preference, parse_unpaired, parse_ranked, parse_rated, parse_steps,
               lambda p, w, r: parse_rated(p, w, r, ["helpful", "safe"]),
               lambda p, w, r: examples_of(detect_format(r), p, w, r)]

    @settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 400)), deadline=None,
              derandomize=not os.environ.get("FUZZ_EXAMPLES"), suppress_health_check=list(HealthCheck))
    @given(records())
    def check(record):
        for parse in parsers:
            try:
                if not isinstance(record, dict):
                    raise DataError("f.jsonl", "line 1", None, "a record must be a JSON object")  # as read_records
                parse("f.jsonl", "line 1", adapt("auto", record, "f.jsonl", "line 1"))
            except DataError:
                pass

    check()


RECORD = {"prompt": "What is 2+2?", "completion": "4"}


def bad_file(tmp_path, case: str):
    line = json.dumps(RECORD)
    path = tmp_path / ("data.parquet" if case == "parquet with a wrong schema" else "data.jsonl")
    content = {
        "byte-order mark": b"\xef\xbb\xbf" + (line + "\n").encode() * 3,
        "CRLF endings": (line + "\r\n").encode() * 3,
        "UTF-16": ((line + "\n") * 3).encode("utf-16"),
        "a JSON array": json.dumps([RECORD] * 3).encode(),
        "a 50 MB line": (line + "\n" + json.dumps({"prompt": "x " * (25 * 2**20), "completion": "y"}) + "\n"
                         + line + "\n").encode(),
        "NUL bytes": (line + "\n").encode() + b'{"prompt": "a\x00b", "completion": "c"}\n',
        "UTF-16 without its mark": ((line + "\n") * 2).encode("utf-16-le"),
    }.get(case)
    if content is None:
        pd.DataFrame([{"question_text": "q", "reply": "a"}]).to_parquet(path)
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("case, records", [("byte-order mark", 3), ("CRLF endings", 3), ("UTF-16", 3),
                                           ("a JSON array", 3), ("a 50 MB line", 3)])
def test_awkward_files_that_read_as_they_should(tmp_path, case, records):
    read = load_sources([DataSource(path=str(bad_file(tmp_path, case)))])
    assert len(read) == records
    assert [r for _, _, r in read][0] == RECORD
    assert parse_sft("f", "line 1", read[0][2]).completion[0].text == "4"


@pytest.mark.parametrize("case, message", [
    ("NUL bytes", r"data.jsonl, line 2: a NUL byte at column 14"),
    ("UTF-16 without its mark", r"data.jsonl, line 1: a NUL byte at column 2: .*UTF-16 without a byte-order mark"),
    ("parquet with a wrong schema", r"data.parquet, row 1: not an SFT record: expected 'messages', 'prompt' \+ "
                                    r"'completion' or 'text' \(found question_text, reply\)"),
])
def test_unreadable_files_name_the_file_and_line(tmp_path, case, message):
    path = bad_file(tmp_path, case)
    with pytest.raises(DataError, match=message):
        for source, where, record in load_sources([DataSource(path=str(path))]):
            parse_sft(source, where, record)


@pytest.mark.parametrize("record, field, message", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "rejected", "is identical to chosen"),
    ({"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
     "chosen[0]", "a user turn inside the reply"),
    ({"chosen": "\n\nHuman: q1\n\nAssistant: a", "rejected": "\n\nHuman: q2\n\nAssistant: b"},
     None, "hh_rlhf adapter: the chosen and rejected transcripts differ before their last Assistant reply"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "scores": [1, 2]}, "scores", "must be a list of 3 numbers"),
])
def test_bad_preference_records_are_refused_with_their_field(record, field, message):
    from posttrain.data.adapters import adapt
    from posttrain.data.formats import parse_preference, parse_ranked

    parse = parse_ranked if "responses" in record else parse_preference
    with pytest.raises(DataError, match=message) as caught:
        parse("pairs.jsonl", "line 7", adapt("auto", record, "pairs.jsonl", "line 7"))
    assert caught.value.field == field and str(caught.value).startswith("pairs.jsonl, line 7:")


def test_pairs_given_as_whole_transcripts_share_their_prompt_and_an_empty_reply_trains_end_of_turn(tiny_tokenizer):
    from posttrain.data.formats import parse_preference
    from posttrain.data.tokenize import tokenize_sft

    user = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "first"},
            {"role": "user", "content": "and?"}]
    pair = parse_preference("f", "line 1", {"chosen": user + [{"role": "assistant", "content": ""}],
                                            "rejected": user + [{"role": "assistant", "content": "no"}]})
    assert [m.weight for m in pair.chosen.messages] == [0.0, 0.0, 0.0, 1.0]  # the earlier reply is prompt, untrained
    tokens = tokenize_sft(pair.chosen, tiny_tokenizer, ChatFormatter(tiny_tokenizer), 1024)
    assert tiny_tokenizer.decode(tokens.input_ids[tokens.weights > 0]).strip() == "<|im_end|>"
