"""Tokenized data on disk: the cache holds exactly what tokenizing now would give, is reused only while nothing
that decides it changes, and worker processes give the same examples (and the same errors) as one process."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import GSM8K, write_jsonl


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "examples"


def sft_task(tokenizer, model_dir, out, *overrides):
    from posttrain.apps.recipes import load_recipe
    from posttrain.train.tasks.sft import SFTTask

    recipe = load_recipe("sft", None, [f"model={model_dir}", f"output_dir={out}", f"data.train={GSM8K}",
                                       "data.max_length=200", *overrides])
    return SFTTask(recipe, tokenizer)


def same_examples(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.index == y.index and x.truncated == y.truncated
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.weights, y.weights)


def test_stored_examples_equal_tokenizing_each_record(tiny_tokenizer, tiny_model_dir, tmp_path, cache):
    from posttrain.data.adapters import adapt
    from posttrain.data.formats import parse_sft
    from posttrain.data.load import read_records

    task = sft_task(tiny_tokenizer, tiny_model_dir, tmp_path, "data.limit=120")
    stored = task.build_dataset("train", quiet=True)
    direct = []
    for where, record in read_records(str(GSM8K), 120):
        example = task.tokenize(parse_sft(str(GSM8K), where, adapt("auto", record, str(GSM8K), where)))
        if example is not None:
            example.index = len(direct)
            direct.append(example)
    same_examples(stored, direct)
    assert stored.summary["records"] == 120 and stored.summary["examples"] == len(direct)
    assert stored.summary["dropped"] == 120 - len(direct) > 0  # max_length 200 drops some prompts
    assert stored.summary["tokens"] == sum(len(e.input_ids) for e in direct)
    assert stored[-1].index == len(direct) - 1 and [e.index for e in stored[3:6]] == [3, 4, 5]


def test_the_cache_is_reused_until_the_file_or_a_setting_changes(tiny_tokenizer, tiny_model_dir, tmp_path, cache,
                                                                 monkeypatch):
    import posttrain.data.store as store

    data = write_jsonl(tmp_path / "d.jsonl", [json.loads(line) for line in GSM8K.read_text().splitlines()[:50]])
    first = sft_task(tiny_tokenizer, tiny_model_dir, tmp_path, f"data.train={data}").build_dataset("train", quiet=True)
    assert len(list(cache.iterdir())) == 1

    def fail(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(store, "encode_chunk", fail)
    again = sft_task(tiny_tokenizer, tiny_model_dir, tmp_path, f"data.train={data}",
                     "train.lr=0.1").build_dataset("train", quiet=True)
    same_examples(first, again)  # a training setting does not touch the tokenized data
    for changed in ("data.max_length=100", "data.truncation=left", "data.assistant_only_loss=false",
                    "data.chat_template=chatml"):
        with pytest.raises(AssertionError, match="encoded again"):
            sft_task(tiny_tokenizer, tiny_model_dir, tmp_path, f"data.train={data}", changed).build_dataset("train",
                                                                                                            quiet=True)
    with open(data, "a") as handle:  # same size class, new content: the file's digest changes
        handle.write(json.dumps({"prompt": "What is 2 + 2?", "completion": "4"}) + "\n")
    with pytest.raises(AssertionError, match="encoded again"):
        sft_task(tiny_tokenizer, tiny_model_dir, tmp_path, f"data.train={data}").build_dataset("train", quiet=True)
    other = type(tiny_tokenizer).from_pretrained(tiny_model_dir)
    other.add_tokens(["<new>"])
    with pytest.raises(AssertionError, match="encoded again"):
        sft_task(other, tiny_model_dir, tmp_path, f"data.train={data}").build_dataset("train", quiet=True)


def test_workers_give_the_same_examples_and_name_a_bad_line(tiny_tokenizer, tiny_model_dir, tmp_path, cache):
    from posttrain.data.store import CHUNK
    from posttrain.core.errors import DataError

    records = [json.loads(line) for line in GSM8K.read_text().splitlines()] * 3  # three chunks and a bit
    assert len(records) > 2 * CHUNK
    data = write_jsonl(tmp_path / "big.jsonl", records)
    alone = sft_task(tiny_tokenizer, tiny_model_dir, tmp_path, f"data.train={data}",
                     "data.num_proc=1").build_dataset("train", quiet=True)
    for directory in cache.iterdir():
        __import__("shutil").rmtree(directory)
    workers = sft_task(tiny_tokenizer, tiny_model_dir, tmp_path, f"data.train={data}",
                       "data.num_proc=2").build_dataset("train", quiet=True)
    same_examples(alone, workers)

    records[2 * CHUNK + 6] = {"question": "no answer field"}
    bad = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError, match=rf"bad.jsonl, line {2 * CHUNK + 7}: not an SFT record"):
        sft_task(tiny_tokenizer, tiny_model_dir, tmp_path, f"data.train={bad}",
                 "data.num_proc=2").build_dataset("train", quiet=True)
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []  # nothing half-written is left


def test_a_mixture_indexes_rows_of_each_file(tiny_tokenizer, tiny_model_dir, tmp_path, cache):
    lines = GSM8K.read_text().splitlines()
    a = write_jsonl(tmp_path / "a.jsonl", [json.loads(line) for line in lines[:40]])
    b = write_jsonl(tmp_path / "b.jsonl", [json.loads(line) for line in lines[40:60]])
    sources = f'data.train=[{{"path": "{a}", "weight": 0.5}}, {{"path": "{b}", "weight": 2}}]'
    mixed = sft_task(tiny_tokenizer, tiny_model_dir, tmp_path, sources, "data.max_length=4096").build_dataset("train",
                                                                                                              quiet=True)
    only_a = sft_task(tiny_tokenizer, tiny_model_dir, tmp_path, f"data.train={a}",
                      "data.max_length=4096").build_dataset("train", quiet=True)
    only_b = sft_task(tiny_tokenizer, tiny_model_dir, tmp_path, f"data.train={b}",
                      "data.max_length=4096").build_dataset("train", quiet=True)
    assert len(mixed) == 20 + 40 and [mixed.source(i) for i in (0, 19, 20, 59)] == [str(a), str(a), str(b), str(b)]
    picked = __import__("random").Random(0).sample(range(40), 20)  # the seeded half of a, then b twice
    expected = [only_a[i] for i in picked] + list(only_b) + list(only_b)
    for i, (x, y) in enumerate(zip(mixed, expected)):
        assert x.index == i
        np.testing.assert_array_equal(x.input_ids, y.input_ids)


def test_staging_left_by_a_killed_encoder_is_removed(tiny_tokenizer, tiny_model_dir, tmp_path, cache):
    import shutil
    import subprocess

    sft_task(tiny_tokenizer, tiny_model_dir, tmp_path, "data.limit=20").build_dataset("train", quiet=True)
    (done,) = cache.iterdir()
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    abandoned = cache / f".{done.name}.{dead.pid}.tmp"
    shutil.copytree(done, abandoned)
    shutil.rmtree(done)
    again = sft_task(tiny_tokenizer, tiny_model_dir, tmp_path, "data.limit=20").build_dataset("train", quiet=True)
    assert again.summary["records"] == 20 and sorted(p.name for p in cache.iterdir()) == [done.name]


def test_other_local_processes_wait_for_the_first_to_encode(tiny_tokenizer, tiny_model_dir, tmp_path, cache,
                                                            monkeypatch):
    import shutil
    import threading

    first = sft_task(tiny_tokenizer, tiny_model_dir, tmp_path, "data.limit=20").build_dataset("train", quiet=True)
    (done,) = cache.iterdir()
    shutil.move(done, tmp_path / "held")
    monkeypatch.setenv("LOCAL_RANK", "1")  # never encodes: waits until local process 0's directory appears
    threading.Timer(0.5, shutil.move, (tmp_path / "held", done)).start()
    waited = sft_task(tiny_tokenizer, tiny_model_dir, tmp_path, "data.limit=20").build_dataset("train", quiet=True)
    same_examples(first, waited)
