"""posttrain data: inspect reads files the way training does, and reports every bad record without stopping."""

from __future__ import annotations

import json

from conftest import GSM8K, write_jsonl


def test_inspect_counts_truncation_as_training_would(tiny_model_dir, tiny_tokenizer, tmp_path):
    from helpers import reset_accelerate

    from posttrain.config import load_recipe
    from posttrain.data.inspect import inspect_file
    from posttrain.train.tasks.sft import SFTTask

    report = inspect_file(str(GSM8K), tiny_tokenizer, max_length=200, limit=300)
    reset_accelerate()
    recipe = load_recipe("sft", None, [f"model={tiny_model_dir}", f"output_dir={tmp_path}", f"data.train={GSM8K}",
                                       "data.limit=300", "data.max_length=200"])
    task = SFTTask(recipe, tiny_tokenizer)
    task.build_dataset("train", quiet=True)
    assert report["formats"] == {"sft": 300} and report["errors"] == []
    assert report["truncated"] == task.report["truncated"] + task.report["dropped"]
    assert report["prompt_too_long"] == task.report["dropped"] > 0 and task.report["truncated"] > 0
    lengths = report["lengths"]
    assert lengths["total"]["n"] == 300 and sum(lengths["total"]["histogram"]["counts"]) == 300
    assert lengths["prompt"]["mean"] + lengths["completion"]["mean"] == lengths["total"]["mean"]


def test_inspect_reports_every_bad_record_and_duplicates(tiny_tokenizer, tmp_path, capsys):
    from posttrain.cli import main

    good = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"".join([
        json.dumps(good).encode() + b"\n",
        json.dumps(good).encode() + b"\n",  # an exact duplicate
        b'{"prompt": "x", "chosen": \n',  # line 3: invalid JSON
        json.dumps({"prompt": "Say hi.", "chosen": "Hello.", "rejected": 3}).encode() + b"\n",  # line 4: wrong type
        b'{"prompt": "\xff"}\n',  # line 5: not UTF-8
        json.dumps({"prompt": "Another", "chosen": "A long answer here.", "rejected": "B"}).encode() + b"\n",
    ]))
    out = tmp_path / "report.json"
    assert main(["data", "inspect", str(path), "--model", str(tiny_tokenizer.name_or_path), "--max-length", "8",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["records"] == 6 and report["valid"] == 3 and report["formats"] == {"preference": 3}
    assert [e["where"] for e in report["errors"]] == ["line 3", "line 4", "line 5"]
    assert report["errors"][1]["field"] == "rejected" and "UTF-8" in report["errors"][2]["message"]
    assert report["duplicate_records"] == 1 and report["duplicate_prompts"] == 1  # valid records only
    assert report["truncated"] == 3  # the chat template alone is longer than 8 tokens
    assert "format errors: 3" in printed and "line 4" in printed


def test_inspect_lengths_of_a_pair_are_the_longer_side(tiny_tokenizer, tmp_path):
    from posttrain.data.formats import parse_preference
    from posttrain.data.inspect import inspect_file
    from posttrain.config import DataConfig
    from posttrain.data.tokenize import ExampleTokenizer

    record = {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "It is four, of course, as everyone knows."}
    path = write_jsonl(tmp_path / "p.jsonl", [record])
    report = inspect_file(str(path), tiny_tokenizer, max_length=1024)
    pair = parse_preference(str(path), "line 1", record)
    tokenize = ExampleTokenizer(tiny_tokenizer, DataConfig(train="x", max_length=10**9))
    chosen, rejected = tokenize(pair.chosen), tokenize(pair.rejected)
    assert report["lengths"]["total"]["max"] == max(len(chosen.input_ids), len(rejected.input_ids)) == len(rejected.input_ids)
    assert report["lengths"]["chosen"]["max"] == int((chosen.weights > 0).sum())
    assert report["lengths"]["prompt"]["max"] == len(chosen.input_ids) - int((chosen.weights > 0).sum())
