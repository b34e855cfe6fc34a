"""posttrain data: inspect reads files the way training does, and reports every bad record without stopping."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import GSM8K, write_jsonl


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))


def test_inspect_counts_truncation_as_training_would(tiny_model_dir, tiny_tokenizer, tmp_path):
    from helpers import reset_accelerate

    from posttrain.apps.recipes import load_recipe
    from posttrain.data.inspect import inspect_file
    from posttrain.train.tasks.sft import SFTTask

    report = inspect_file(str(GSM8K), tiny_tokenizer, max_length=200, limit=300)
    reset_accelerate()
    recipe = load_recipe("sft", None, [f"model={tiny_model_dir}", f"output_dir={tmp_path}", f"data.train={GSM8K}",
                                       "data.limit=300", "data.max_length=200"])
    task = SFTTask(recipe, tiny_tokenizer)
    trained = task.build_dataset("train", quiet=True).summary
    assert report["formats"] == {"sft": 300} and report["errors"] == []
    assert report["truncated"] == trained["truncated"] + trained["dropped"]
    assert report["prompt_too_long"] == trained["dropped"] > 0 and trained["truncated"] > 0
    lengths = report["lengths"]
    assert lengths["total"]["n"] == 300 and sum(lengths["total"]["histogram"]["counts"]) == 300
    assert lengths["prompt"]["mean"] + lengths["completion"]["mean"] == lengths["total"]["mean"]


def test_inspect_reports_every_bad_record_and_duplicates(tiny_tokenizer, tmp_path, capsys):
    from posttrain.apps.cli import main

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
    from posttrain.data.config import DataConfig
    from posttrain.data.tokenize import ExampleTokenizer

    record = {"prompt": "What is two plus two?", "chosen": "Four.",
              "rejected": "It is four, of course, as everyone knows."}
    path = write_jsonl(tmp_path / "p.jsonl", [record])
    report = inspect_file(str(path), tiny_tokenizer, max_length=1024)
    pair = parse_preference(str(path), "line 1", record)
    tokenize = ExampleTokenizer(tiny_tokenizer, DataConfig(train="x", max_length=10**9))
    chosen, rejected = tokenize(pair.chosen), tokenize(pair.rejected)
    assert report["lengths"]["total"]["max"] == max(len(chosen.input_ids),
                                                    len(rejected.input_ids)) == len(rejected.input_ids)
    assert report["lengths"]["chosen"]["max"] == int((chosen.weights > 0).sum())
    assert report["lengths"]["prompt"]["max"] == len(chosen.input_ids) - int((chosen.weights > 0).sum())


HH = GSM8K.parent / "hh_harmless_eval_200.jsonl"


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_convert_pairs_to_unpaired_and_back_is_the_identity(tmp_path):
    from posttrain.data.adapters import adapt
    from posttrain.data.convert import convert_file

    first = convert_file(str(HH), "unpaired", str(tmp_path / "u.jsonl"), limit=20)
    assert first == {"read": 20, "formats": {"preference": 20}, "written": 40, "skipped": {}}
    assert [r["label"] for r in read(tmp_path / "u.jsonl")[:4]] == [True, False, True, False]
    convert_file(str(tmp_path / "u.jsonl"), "preference", str(tmp_path / "p.jsonl"))
    originals = [adapt("hh_rlhf", json.loads(line), "", "") for line in HH.read_text().splitlines()[:20]]
    assert read(tmp_path / "p.jsonl") == originals


def test_convert_rankings_unpaired_and_conversations(tmp_path, capsys):
    from posttrain.apps.cli import main
    from posttrain.data.convert import convert_file

    ranked = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "q1", "responses": ["a", "b", "c"], "scores": [0.2, 0.9, 0.1], "id": 1},
    ])
    convert_file(str(ranked), "preference", str(tmp_path / "p.jsonl"))
    assert read(tmp_path / "p.jsonl") == [{"prompt": "q1", "chosen": "b", "rejected": "c", "id": 1}]
    convert_file(str(ranked), "unpaired", str(tmp_path / "ru.jsonl"))
    assert [(r["completion"], r["label"]) for r in read(tmp_path / "ru.jsonl")] == [("b", True), ("c", False)]
    convert_file(str(ranked), "sft", str(tmp_path / "s.jsonl"))
    assert read(tmp_path / "s.jsonl") == [{"prompt": "q1", "completion": "b", "id": 1}]

    unpaired = write_jsonl(tmp_path / "u.jsonl", [
        {"prompt": "p", "completion": "good 1", "label": True}, {"prompt": "p", "completion": "bad 1", "label": False},
        {"prompt": "p", "completion": "good 2", "label": True}, {"prompt": "lonely", "completion": "x", "label": False},
    ])
    summary = convert_file(str(unpaired), "preference", str(tmp_path / "p2.jsonl"))
    assert read(tmp_path / "p2.jsonl") == [{"prompt": "p", "chosen": "good 1", "rejected": "bad 1"}]
    assert summary["skipped"] == {"no completion of the other label for the same prompt": 2}
    convert_file(str(unpaired), "sft", str(tmp_path / "s2.jsonl"))
    assert [r["completion"] for r in read(tmp_path / "s2.jsonl")] == ["good 1", "good 2"]

    chats = write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]}])
    convert_file(str(chats), "unpaired", str(tmp_path / "cu.jsonl"))
    (record,) = read(tmp_path / "cu.jsonl")
    assert record["completion"] == [{"role": "assistant", "content": "see you"}] and len(record["prompt"]) == 3

    assert main(["data", "convert", str(chats), "--to", "preference", "--out", str(tmp_path / "no.jsonl")]) == 2
    assert "a pair needs two" in capsys.readouterr().err
    broken = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                                 {"prompt": "q", "chosen": "a", "rejected": 7}])
    assert main(["data", "convert", str(broken), "--to", "unpaired", "--out", str(tmp_path / "b2.jsonl")]) == 2
    message = capsys.readouterr().err
    assert "line 2" in message and "'rejected'" in message


# -- select -------------------------------------------------------------------------------------------------------
def candidates_of(texts):
    from posttrain.apps.select import Candidate

    return [
        Candidate(f"line {i + 1}", {"prompt": p, "completion": c}, p, c, len(c.split()))
        for i, (p, c) in enumerate(texts)
    ]


def test_duplicate_filters_exact_and_near():
    from posttrain.apps.select import exact_duplicates, near_duplicates

    story = (
        "the quick brown fox jumps over the lazy dog while the farmer counts forty two sheep in the green field today"
    )
    cands = candidates_of([("Tell me", story), ("tell  ME", story.upper()),
                           ("Tell me", story.replace("forty", "fifty")),
                           ("Other", "an entirely different answer about arithmetic and the price of eggs at market")])
    assert exact_duplicates(cands) == {1}
    assert near_duplicates([cands[i] for i in (0, 2, 3)], threshold=0.5) == {1}  # one word of 21 changed


def test_unconditioned_reply_loss_by_a_direct_forward(tiny_model_dir, tiny_tokenizer):
    """IFD's denominator: the reply as plain text, EOS included (as SFT trains it), every token after the first."""
    import torch

    from posttrain.apps.select import completion_nll
    from posttrain.model.load import load_model

    model = load_model(str(tiny_model_dir)).double().eval()
    text = "Natalia sold 48 clips in April and half as many in May: 72 in all."
    ids = torch.tensor([tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None])
    assert completion_nll(model, tiny_tokenizer, [{"text": text}], 1024)[0] == pytest.approx(float(-logps.mean()),
                                                                                             rel=1e-6)


def test_scores_are_cached_per_scorer_and_reused_across_methods(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    from posttrain.apps import select
    from posttrain.evaluate import heldout
    from posttrain.evaluate.model import KeyedCache, fingerprint
    from posttrain.model.load import load_model

    model = load_model(str(tiny_model_dir)).eval()
    records = [{"prompt": f"What is {i} + 1?", "completion": f"It is {i + 1}."} for i in range(5)]
    cache = KeyedCache("scores", fingerprint(str(tiny_model_dir)))
    first = select.completion_nll(model, tiny_tokenizer, records[:3], 1024, cache)
    scored = []
    real = heldout.example_losses
    monkeypatch.setattr(heldout, "example_losses", lambda m, task, examples: scored.append(len(examples)) or
                        real(m, task, examples))
    again = select.completion_nll(model, tiny_tokenizer, records, 1024,
                                  KeyedCache("scores", fingerprint(str(tiny_model_dir))))
    assert again[:3].tolist() == first.tolist() and scored == [2]  # only records 3 and 4 were scored
    assert again[3:].tolist() == pytest.approx(select.completion_nll(model, tiny_tokenizer, records[3:],
                                                                     1024).tolist(), rel=1e-6)
    gsm8k = {"question": "What is 0 + 1?", "answer": "It is <<0+1=1>>1.\n#### 1"}  # another layout, other tokens
    plain = {"prompt": [{"role": "user", "content": "What is 0 + 1?"}],  # the same example as the adapted one
             "completion": [{"role": "assistant", "content": "It is 1.\n#### 1"}]}
    select.completion_nll(model, tiny_tokenizer, [gsm8k], 1024, cache)
    select.completion_nll(model, tiny_tokenizer, [plain], 1024, cache)
    assert scored == [2, 2, 1]  # the second is the first, tokenized alike: a cache hit


def test_zip_fit_and_kcenter_by_hand():
    import gzip

    from posttrain.apps.select import kcenter_greedy, zip_fit_scores

    target = "How many apples does Tom have if he buys 3 bags of 4 apples? He has 12 apples. #### 12"
    cands = candidates_of([("How many apples does Tom have if he buys 3 bags of 4 apples?",
                            "He has 12 apples. #### 12"),
                           ("Write a haiku", "Autumn moonlight, a worm digs silently into the chestnut")])
    scores = zip_fit_scores(cands, [target])
    size = lambda s: len(gzip.compress(s.encode(), compresslevel=9))  # noqa: E731
    x = f"{cands[1].prompt}\n{cands[1].completion}"
    ncd = (size(x + target) - min(size(x), size(target))) / max(size(x), size(target))
    assert scores[1] == pytest.approx(1 - ncd) and scores[0] > scores[1]
    angles = np.deg2rad([0, 5, 90, 180, 100])
    vectors = np.stack([np.cos(angles), np.sin(angles)], 1)
    assert kcenter_greedy(vectors, 3, first=0) == [0, 3, 2]  # opposite first, then the one farthest from both


def test_cli_select_keeps_the_budget_as_read_and_reports_every_record(tiny_model_dir, tmp_path, capsys):
    from posttrain.apps.cli import main

    out, report = tmp_path / "kept.jsonl", tmp_path / "scores.jsonl"
    args = ["data", "select", str(GSM8K), "--limit", "40", "--budget", "7", "--model", str(tiny_model_dir),
            "--out", str(out), "--report", str(report)]
    assert main([*args, "--method", "ifd", "--dedup", "minhash"]) == 0
    originals = [json.loads(line) for line in GSM8K.read_text().splitlines()[:40]]
    kept = read(out)
    assert len(kept) == 7 and all(r in originals for r in kept)
    fates = read(report)
    assert len(fates) == 40 and sum(f["fate"].startswith("kept") for f in fates) == 7
    ranked = sorted((f for f in fates if "ifd" in f and f["ifd"] < 1), key=lambda f: -f["ifd"])[:7]
    assert {f["where"] for f in ranked} == {f["where"] for f in fates if f["fate"].startswith("kept")}
    assert main([*args, "--method", "length", "--target", str(GSM8K)]) == 2
    assert "--target is read by --method zip_fit only" in capsys.readouterr().err
    assert main([*args, "--method", "length"]) == 0
    fates = read(report)
    longest = sorted(fates, key=lambda f: -f["reply_tokens"])[:7]
    assert {f["where"] for f in longest} == {f["where"] for f in fates if f["fate"].startswith("kept")}
    assert all(f["reply_tokens"] < f["tokens"] for f in fates)  # the reply, not the whole templated example


def test_deita_scores_are_expectations_over_1_to_6_and_the_filter_skips_near_copies(tiny_model_dir, tiny_tokenizer):
    import torch

    from posttrain.apps.select import DEITA_COMPLEXITY, deita_scores, diverse_in_order
    from posttrain.model.load import load_model

    model = load_model(str(tiny_model_dir)).double().eval()
    cands = candidates_of([("Prove Fermat's last theorem.", "It is long."), ("What is 2 + 2?", "4")])  # longest first
    complexity, quality = deita_scores(model, tiny_tokenizer, cands)
    assert ((complexity > 1) & (complexity < 6)).all() and ((quality > 1) & (quality < 6)).all()
    digits = [tiny_tokenizer(str(d), add_special_tokens=False)["input_ids"][0] for d in range(1, 7)]
    for i, cand in enumerate(cands):  # each score lands on its own record, whatever order the batches took
        ids = tiny_tokenizer(DEITA_COMPLEXITY.format(instruction=cand.prompt))["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        expected = float(torch.softmax(logits[digits].double(), -1) @ torch.arange(1, 7, dtype=torch.float64))
        assert complexity[i] == pytest.approx(expected, rel=1e-9)
    vectors = np.array([[1.0, 0.0], [0.99, 0.141], [0.0, 1.0], [0.6, 0.8]])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assert diverse_in_order(vectors, [0, 1, 2, 3], budget=3, similarity=0.9) == [0, 2, 3]  # 1 is a near copy of 0


def test_grape_keeps_the_response_the_model_finds_most_likely(tiny_model_dir, tmp_path):
    from posttrain.apps.select import completion_nll
    from posttrain.evaluate.model import EvalModel
    from posttrain.apps.select import select_file

    records = [{"prompt": "Add 2 and 3.", "responses": ["5", "The sum of 2 and 3 is 5.", "zzzz qqq"], "id": 1},
               {"prompt": "Name a colour.", "responses": ["Blue.", "A colour: red"], "id": 2}]
    data = write_jsonl(tmp_path / "cands.jsonl", records)
    summary = select_file(str(data), 2, "grape", str(tmp_path / "out.jsonl"), model_spec=str(tiny_model_dir),
                          report=str(tmp_path / "scores.jsonl"))
    scorer = EvalModel(str(tiny_model_dir))
    for record, kept in zip(records, read(tmp_path / "out.jsonl")):
        nll = completion_nll(scorer.model, scorer.tokenizer, [{"prompt": record["prompt"], "completion": r}
                                                               for r in record["responses"]], 1024)
        assert kept == {"prompt": record["prompt"], "id": record["id"],
                        "completion": record["responses"][int(np.argmin(nll))]}
    assert summary["kept"] == 2 and len(read(tmp_path / "scores.jsonl")) == 2


# -- synth --------------------------------------------------------------------------------------------------------
def test_magpie_asks_with_the_template_up_to_the_user_turn(tiny_model_dir, tiny_tokenizer, monkeypatch):
    from posttrain.apps import synth
    from posttrain.rollout import backend
    from posttrain.rollout.backend import Completion, SamplingSettings

    prefix = synth.pre_query_template(tiny_tokenizer)
    assert prefix == "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n"
    asked = []
    scripted = iter([
        [Completion([1], [0.0], False, "What is 2+2?"), Completion([1], [0.0], True, "Half an instr"),
         Completion([1], [0.0], False, "  "), Completion([1], [0.0], False, "what is 2+2?")],
        [Completion([1], [0.0], False, "4")],
    ])
    monkeypatch.setattr(backend.TransformersBackend, "generate",
                        lambda self, prompts, seeds, settings: asked.append((prompts, settings)) or next(scripted))
    records, dropped = synth.magpie(None, tiny_tokenizer, 4, SamplingSettings(16, 1.0), SamplingSettings(16, 0.0))
    assert asked[0][0] == [tiny_tokenizer(prefix, add_special_tokens=False)["input_ids"]] * 4
    assert asked[0][1].temperature == 1.0 and asked[1][1].temperature == 0.0
    assert records == [{"messages": [{"role": "user", "content": "What is 2+2?"},
                                     {"role": "assistant", "content": "4"}]}]
    assert dropped == {"instruction cut at the token limit": 1, "empty instruction": 1, "duplicate instruction": 1}


def test_pairs_and_rejection_sampling_from_scored_samples(tiny_model_dir, tmp_path, capsys):
    from posttrain.apps.cli import main
    from posttrain.apps.synth import accepted, best_vs_worst

    prompts, records = ["p1", "p2"], [{"answer": "4"}, {"answer": "7"}]
    texts = [["a", "b", "c", "b"], ["x", "y"]]
    rewards = [[0.0, 1.0, 0.5, 1.0], [0.3, 0.3]]
    pairs, dropped = best_vs_worst(prompts, records, texts, rewards)
    assert pairs == [{"prompt": "p1", "chosen": "b", "rejected": "a", "chosen_reward": 1.0, "rejected_reward": 0.0,
                      "answer": "4"}]
    assert dropped == {"all samples scored the same": 1}
    kept, dropped = accepted(prompts, records, texts, rewards, threshold=0.5, keep=3)
    assert [(r["prompt"], r["completion"]) for r in kept] == [("p1", "b"), ("p1", "c")]  # distinct, at the threshold
    assert dropped == {"no sample reached the threshold": 1}
    assert main(["data", "synth", "magpie", str(tiny_model_dir), "--data", "x.jsonl", "--out",
                 str(tmp_path / "o")]) == 2
    assert "--data not read here" in capsys.readouterr().err
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "synth", "pairs", str(tiny_model_dir), "--data", str(GSM8K.parent / "gsm8k_test_200.jsonl"),
                 "--limit", "2", "--reward", "length", "--max-new-tokens", "6", "--out", str(out)]) == 0
    for pair in read(out):
        assert pair["chosen_reward"] > pair["rejected_reward"] and len(pair["chosen"]) > len(pair["rejected"])


def test_training_logs_the_realised_mixture_of_each_step(tiny_model_dir, tmp_path):
    import torch
    from helpers import metrics, run_sft

    write_jsonl(tmp_path / "math.jsonl", [{"prompt": f"{i}+1?", "completion": f"{i + 1}"} for i in range(10)])
    write_jsonl(tmp_path / "chat.jsonl", [{"prompt": f"hi {i}", "completion": "hello"} for i in range(10)])
    train = f"[{{path: {tmp_path / 'math.jsonl'}, weight: 3}}, {{path: {tmp_path / 'chat.jsonl'}}}]"
    run_sft(tiny_model_dir, tmp_path / "run", **{"data.train": train, "data.limit": "null", "train.max_steps": 6})
    logged = metrics(tmp_path / "run")
    # examples 0-29 are math (weight 3 repeats it), 30-39 chat; a step draws 8 of a seeded permutation per epoch
    order = torch.cat([torch.randperm(40, generator=torch.Generator().manual_seed(epoch)) for epoch in range(2)])
    for step, line in enumerate(logged):
        drawn = order[step * 8:(step + 1) * 8]
        assert line["data/share/math"] == pytest.approx(float((drawn < 30).float().mean()))
        assert line["data/share/math"] + line["data/share/chat"] == pytest.approx(1.0)
    assert np.mean([line["data/share/math"] for line in logged[:5]]) == pytest.approx(0.75)  # one epoch: 30 / 40
    single = tmp_path / "single"
    run_sft(tiny_model_dir, single, **{"data.train": str(tmp_path / "math.jsonl"), "train.max_steps": 1})
    assert not any(key.startswith("data/share") for key in metrics(single)[0])
