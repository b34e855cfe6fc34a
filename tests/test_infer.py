"""posttrain score and the inference-time methods: best-of-N, voting, URIAL, nudging, reward-guided decoding."""

import json
import re
import math
from fractions import Fraction

import pytest
import torch

from conftest import build_model, write_jsonl
from test_process_reward import steps_file
from test_reward_model import pairs_file


@pytest.fixture(scope="module")
def classifiers(tiny_model_dir, tmp_path_factory):
    """A random reward model and a random process reward model on the tiny Llama (heads saved, so they load)."""
    from transformers import LlamaForSequenceClassification, LlamaForTokenClassification

    from posttrain.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    config = build_model(len(tokenizer)).config
    out = {}
    for name, cls, labels in (("rm", LlamaForSequenceClassification, 1), ("prm", LlamaForTokenClassification, 2)):
        torch.manual_seed(1)
        config.num_labels = labels
        model = cls(config)
        torch.nn.init.normal_(model.score.weight, std=1.0)
        directory = tmp_path_factory.mktemp(name)
        if name == "prm":
            model.config.step_separator = "\n"
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        out[name] = directory
    return out


def cli(*argv) -> int:
    from posttrain.apps.cli import main

    return main([str(a) for a in argv])


def test_score_pairs_lists_and_singles_with_a_reward_model(classifiers, tmp_path, capsys):
    from posttrain.rewards.model import RewardModel

    pairs = pairs_file(tmp_path, n=6)
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [
        records[0], {"prompt": "Say hi", "responses": ["hi", "hello there", "no"]},
        {"prompt": "Say hi", "completion": "hi"}])
    assert cli("score", classifiers["rm"], pairs, "--out", tmp_path / "pairs_scores.jsonl") == 0
    summary = capsys.readouterr().out
    scored = [json.loads(line) for line in (tmp_path / "pairs_scores.jsonl").read_text().splitlines()]
    right = sum(r["chosen_score"] > r["rejected_score"] for r in scored)
    assert f"accuracy {right / 6:.1%}" in summary and "95% CI" in summary and "n=6" in summary

    assert cli("score", classifiers["rm"], mixed, "--out", tmp_path / "mixed_scores.jsonl", "--batch-size", 2) == 0
    out = [json.loads(line) for line in (tmp_path / "mixed_scores.jsonl").read_text().splitlines()]
    model = RewardModel(str(classifiers["rm"]))
    assert out[0]["chosen_score"] == pytest.approx(scored[0]["chosen_score"], abs=1e-6)
    assert out[1]["scores"] == pytest.approx(model(["Say hi"] * 3, ["hi", "hello there", "no"]), abs=1e-6)
    assert out[2]["score"] == pytest.approx(out[1]["scores"][0], abs=1e-6)  # the same conversation, batched differently


def test_score_steps_with_a_process_reward_model(classifiers, tmp_path, capsys):
    from posttrain.rewards.model import ProcessRewardModel

    data = steps_file(tmp_path, n=5)
    assert cli("score", classifiers["prm"], data, "--out", tmp_path / "s.jsonl", "--aggregate", "min") == 0
    assert "steps: accuracy" in capsys.readouterr().out
    scored = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    prm = ProcessRewardModel(str(classifiers["prm"]))
    for record in scored:
        assert len(record["step_scores"]) == 2 and record["score"] == min(record["step_scores"])
        assert all(0 < s < 1 for s in record["step_scores"])
    joined = "\n".join(scored[0]["completions"])  # a completion is split into steps at the separator
    assert prm([scored[0]["prompt"]], [joined])[0] == pytest.approx(scored[0]["score"], abs=1e-9)


def test_best_of_n_takes_the_first_n_candidates_and_breaks_ties_by_order():
    from posttrain.infer import best_of_n

    candidates = [["a", "b", "c", "d"], ["x", "y", "z", "w"]]
    scores = [[0.1, 0.5, 0.9, 0.2], [1.0, 1.0, 0.0, 3.0]]
    assert best_of_n(candidates, scores) == [(2, "c", 0.9), (3, "w", 3.0)]
    assert best_of_n(candidates, scores, n=2) == [(1, "b", 0.5), (0, "x", 1.0)]
    assert best_of_n(candidates, scores, n=1) == [(0, "a", 0.1), (0, "x", 1.0)]


def test_majority_and_weighted_votes():
    from posttrain.infer import majority_vote
    from posttrain.infer.decoding import vote_weights

    completions = ["so #### 4", "no answer", "it is 5", "#### 5", "#### 4.0"]
    assert majority_vote(completions) == (Fraction(4), 0)  # 4 and 5 tie 2-2: the answer reached first wins
    assert majority_vote(completions, [0.1, 1.0, 0.9, 0.9, 0.1]) == (Fraction(5), 2)
    assert majority_vote(["nothing", "here"]) == (None, None)
    assert vote_weights([0.2, 1.0]) == [0.2, 1.0]
    assert vote_weights([0.0, -2.0]) == pytest.approx([0.5, 1 / (1 + math.exp(2))])


def test_generate_best_of_with_a_reward_function_and_vote(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "best.jsonl"
    assert cli("generate", tiny_model_dir, "--prompt", "What is 2 + 3?", "--prompt", "Say hi", "--best-of", 4,
               "--reward", "length", "--max-new-tokens", 12, "--out", out) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        assert len(row["candidates"]) == 4 and row["completion"] == max(row["candidates"], key=len)
        assert row["score"] == pytest.approx(len(row["completion"]) / 1000)
    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "What is 2 + 3?", "answer": "5"}] * 2)
    out = tmp_path / "vote.jsonl"
    assert cli("generate", tiny_model_dir, "--data", data, "--vote", 3, "--reward", "math_answer",
               "--max-new-tokens", 8, "--out", out) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(len(r["candidates"]) == 3 and len(r["scores"]) == 3 for r in rows)


@pytest.mark.parametrize("argv,message", [
    (["--best-of", "4"], "give --reward"),
    (["--best-of", "4", "--vote", "3", "--reward", "length"], "choose one"),
    (["--reward", "length"], "read by --best-of"),
    (["--best-of", "2", "--reward", "no_such_reward"], "unknown reward"),
])
def test_generate_refuses_inconsistent_options(tiny_model_dir, argv, message, capsys):
    assert cli("generate", tiny_model_dir, "--prompt", "hi", *argv) == 2
    assert message in capsys.readouterr().err


def test_urial_prompt_layout_and_answer_cut():
    from posttrain.infer import urial_answer, urial_prompt

    prompt = urial_prompt("How do I boil an egg?")
    assert prompt.startswith("# Instruction") and prompt.count("\n# Query:\n") == 4
    assert prompt.endswith("# Query:\n```\nHow do I boil an egg?\n```\n\n# Answer:\n```\n")
    assert urial_answer(" Put it in boiling water.\n```\n\n# Query:\n```\nnext") == "Put it in boiling water."
    assert urial_prompt("q", "custom").startswith("custom\n\n# Query:")


def test_nudging_thresholds_hand_the_words_to_one_model_or_the_other(tiny_model_dir):
    from posttrain.infer import nudge
    from posttrain.model.load import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    base = load_model(str(tiny_model_dir)).eval()
    nudger = build_model(len(tokenizer), seed=7).eval()
    never = nudge(base, tokenizer, nudger, tokenizer, "Say hi", threshold=0.0, max_new_tokens=10)
    assert never["nudged_fraction"] == 0.0 and never["tokens"] == 10
    always = nudge(base, tokenizer, nudger, tokenizer, "Say hi", threshold=1.01, max_new_tokens=10)
    assert always["nudged_fraction"] == 1.0 and always["nudges"] >= 1
    assert always["completion"] != never["completion"]


def test_reward_guided_decoding_keeps_the_best_chunk(tiny_model_dir):
    from posttrain.infer import reward_guided
    from posttrain.model.load import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    seen = []

    def scorer(prompts, completions, columns=None):
        seen.append(list(completions))
        return [float(len(c)) for c in completions]

    torch.manual_seed(0)
    result = reward_guided(model, tokenizer, "Say hi", scorer, candidates=3, chunk_tokens=4, max_new_tokens=12)
    assert 1 <= result["chunks"] <= 3 and len(seen) == result["chunks"]
    for options, kept in zip(seen, seen[1:]):  # each round extends the longest option of the one before
        assert all(o.startswith(max(options, key=len)) for o in kept)
    assert result["completion"] == max(seen[-1], key=len) and result["score"] == len(result["completion"])


def test_generate_urial_nudge_and_guided_chunks_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    preamble = tmp_path / "urial.txt"
    preamble.write_text("# Instruction\n\nBe kind.")
    assert cli("generate", tiny_model_dir, "--prompt", "Say hi", "--urial", preamble, "--max-new-tokens", 6,
               "--out", tmp_path / "u.jsonl") == 0
    row = json.loads((tmp_path / "u.jsonl").read_text())
    assert "```" not in row["completion"] and "# Query:" not in row["completion"]

    nudger = tmp_path / "nudger"
    from posttrain.model.load import load_tokenizer

    build_model(len(load_tokenizer(str(tiny_model_dir))), seed=5).save_pretrained(nudger)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(nudger)
    assert cli("generate", tiny_model_dir, "--prompt", "Say hi", "--prompt", "Say yo", "--nudge", nudger,
               "--nudge-threshold", 1.01, "--max-new-tokens", 5) == 0
    assert "nudged tokens: 100.0%" in capsys.readouterr().out

    assert cli("generate", tiny_model_dir, "--prompt", "Say hi", "--guided-chunks", 3, "--candidates", 2,
               "--reward", "length", "--max-new-tokens", 6, "--out", tmp_path / "g.jsonl") == 0
    row = json.loads((tmp_path / "g.jsonl").read_text())
    assert 1 <= row["chunks"] <= 2 and row["score"] == pytest.approx(len(row["completion"]) / 1000)


@pytest.mark.parametrize("record,message", [
    ({"prompt": "p", "chosen": "a", "rejected": 3}, "'rejected': must be a text or a list"),
    ({"prompt": "p", "responses": ["a", {"x": 1}]}, "'responses\\[1\\]': must be"),
    ({"prompt": "p", "completions": []}, "'completions': must be a non-empty list"),
    ({"prompt": "p"}, "nothing to score"),
])
def test_score_names_the_line_and_field_of_a_bad_record(classifiers, tmp_path, record, message, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "fine"}, record])
    assert cli("score", classifiers["rm"], data, "--out", tmp_path / "o.jsonl") == 2
    err = capsys.readouterr().err
    assert "bad.jsonl, line 2" in err and re.search(message, err)
