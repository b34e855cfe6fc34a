"""SFT variants: Dynamic Fine-Tuning, Masked Thought, PoFT, S3FT, knowledge distillation, Rho-1 token selection."""

import json
import math
import shutil

import pytest
import torch

from conftest import build_model, write_jsonl
from helpers import assert_weights_close, final_weights, metrics, run_sft
from posttrain.core.errors import UserError
from posttrain.objectives.sft import SFT_LOSSES, dynamic_ft, nll, poft, select_tokens, token_divergence


# --- pure functions, by hand ---------------------------------------------------------------------


def test_dynamic_ft_scales_each_token_by_its_detached_probability():
    logps = torch.tensor([math.log(0.5), math.log(0.1)], dtype=torch.float64, requires_grad=True)
    losses = dynamic_ft(logps)
    assert losses.tolist() == pytest.approx([-0.5 * math.log(0.5), -0.1 * math.log(0.1)])
    losses.sum().backward()
    assert logps.grad.tolist() == pytest.approx([-0.5, -0.1])  # d/dlogp of -sg(p) logp: the probability, not 1
    assert nll(torch.tensor([math.log(0.5)])).item() == pytest.approx(math.log(2))


def test_poft_by_hand():
    # mean log-probs: policy -1.0; two aligned references -1.5 and -0.5; beta 2
    losses = poft(torch.tensor([-1.0]), torch.tensor([[-1.5, -0.5]]), beta=2.0)
    expected = 0.5 * (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0))))
    assert losses.item() == pytest.approx(expected)
    assert SFT_LOSSES["poft"].defaults == {"beta": 1.0}


def test_token_selection_keeps_each_examples_top_tokens_by_excess_loss():
    excess = torch.tensor([0.1, 0.9, 0.5, 0.3, -1.0, 2.0, 0.0])
    example = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    mask = select_tokens(excess, example, 2, ratio=0.5)  # ceil(0.5 * 4) = 2 of example 0, ceil(1.5) = 2 of example 1
    assert mask.tolist() == [0, 1, 1, 0, 0, 1, 1]


def trl_gkd(student_logits, teacher_logits, beta):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    return GKDTrainer.generalized_jsd_loss(student_logits[None], teacher_logits[None], beta=beta, reduction="sum")


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.5), ("jsd", 0.2)])
def test_distillation_divergences_match_trl_gkd_with_the_whole_vocabulary(divergence, beta):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 11, generator=g, dtype=torch.float64), torch.randn(5, 11, generator=g,
                                                                                         dtype=torch.float64)
    top = teacher.log_softmax(-1).topk(11)
    ours = token_divergence(student, top.indices, top.values, divergence, jsd_beta=beta if divergence == "jsd" else 0.5)
    assert ours.sum().item() == pytest.approx(trl_gkd(student, teacher, beta).item(), rel=1e-9)


def test_top_k_forward_kl_uses_the_renormalized_teacher():
    student = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    teacher = torch.tensor([[math.log(0.6), math.log(0.3), math.log(0.05), math.log(0.05)]], dtype=torch.float64)
    logps, ids = teacher.topk(2)
    p = torch.tensor([0.6, 0.3]) / 0.9
    log_s = student.log_softmax(-1)[0, :2]
    expected = float((p * (p.log() - log_s)).sum())
    assert token_divergence(student, ids, logps, "forward_kl").item() == pytest.approx(expected)


# --- the sft command ------------------------------------------------------------------------------


def test_unknown_and_misplaced_variant_settings_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="unknown sft loss"):
        run_sft(tiny_model_dir, tmp_path / "a", **{"sft.loss": "dft"})
    with pytest.raises(UserError, match="beta not used by nll"):
        run_sft(tiny_model_dir, tmp_path / "b", **{"sft.beta": 0.5})
    with pytest.raises(UserError, match="teacher"):
        run_sft(tiny_model_dir, tmp_path / "c", **{"sft.loss": "distill"})
    with pytest.raises(UserError, match="references"):
        run_sft(tiny_model_dir, tmp_path / "d", **{"sft.loss": "poft"})


def test_dynamic_ft_trains_and_differs_from_nll(tiny_model_dir, tmp_path):
    run_sft(tiny_model_dir, tmp_path / "nll")
    run_sft(tiny_model_dir, tmp_path / "dft", **{"sft.loss": "dynamic_ft"})
    nll_loss, dft_loss = metrics(tmp_path / "nll")[0]["loss"], metrics(tmp_path / "dft")[0]["loss"]
    assert 0 < dft_loss < nll_loss  # each token's NLL is scaled by a probability below 1


@pytest.mark.parametrize("name", ["masked_thought", "dynamic_ft", "distill", "poft", "token_selection"])
def test_variants_keep_accumulation_invariance(tiny_model_dir, tmp_path, name):
    other = lambda seed: str(second_model(tiny_model_dir, tmp_path, seed))  # noqa: E731
    variant = {
        "masked_thought": lambda: {"sft.mask_ratio": 0.3},
        "dynamic_ft": lambda: {"sft.loss": "dynamic_ft"},
        "distill": lambda: {"sft.loss": "distill", "teacher": other(7), "sft.distill.divergence": "jsd"},
        "poft": lambda: {"sft.loss": "poft", "sft.references": json.dumps([other(3)])},
        "token_selection": lambda: {"sft.token_selection": json.dumps({"ratio": 0.5, "reference": other(5)})},
    }[name]()
    for batch_size, accum in [(8, 1), (2, 4)]:
        run_sft(tiny_model_dir, tmp_path / f"{batch_size}x{accum}", **{**variant, "train.batch_size": batch_size,
                                                                       "train.grad_accum": accum})
    for a, b in zip(metrics(tmp_path / "8x1"), metrics(tmp_path / "2x4")):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert_weights_close(final_weights(tmp_path / "8x1"), final_weights(tmp_path / "2x4"), atol=1e-6)


def test_masked_thought_masks_completion_inputs_and_keeps_targets(tiny_model_dir, tmp_path):
    from posttrain.apps.recipes import load_recipe
    from posttrain.model.load import load_tokenizer
    from posttrain.train.tasks.sft import SFTTask

    from helpers import tiny_recipe

    recipe = load_recipe("sft", None, tiny_recipe(tiny_model_dir, tmp_path, **{"sft.mask_ratio": 0.5}))
    task = SFTTask(recipe, load_tokenizer(str(tiny_model_dir)))
    examples = task.build_dataset("train", quiet=True)[:4]
    plain, masked = task.collate(examples), task.collate_train(examples, step=3)
    assert torch.equal(plain.target_ids, masked.target_ids)
    changed = (plain.input_ids != masked.input_ids).view(-1)
    completion_inputs = torch.zeros_like(changed)
    completion_inputs[plain.target_index + 1] = True
    assert changed.any() and not (changed & ~completion_inputs).any()  # prompts are never masked
    assert (masked.input_ids.view(-1)[changed] == task.mask_id).all()
    fraction = changed.sum().item() / completion_inputs.sum().item()
    assert 0.35 < fraction < 0.65
    again = task.collate_train(examples[::-1], step=3)  # same step, other batch order: same masks per example
    assert sorted(masked.input_ids.view(-1).tolist()) == sorted(again.input_ids.view(-1).tolist())
    assert not torch.equal(task.collate_train(examples, step=4).input_ids, masked.input_ids)


def second_model(tiny_model_dir, tmp_path, seed):
    """A model with the same tokenizer and other weights (a stand-in teacher or aligned reference)."""
    other = tmp_path / f"model-{seed}"
    shutil.copytree(tiny_model_dir, other)
    vocab = len(json.loads((other / "tokenizer.json").read_text())["model"]["vocab"])
    build_model(vocab, seed=seed).save_pretrained(other)
    return other


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_distillation_from_a_cached_teacher_pulls_the_student_towards_it(tiny_model_dir, tmp_path, peft):
    teacher = second_model(tiny_model_dir, tmp_path, seed=7)
    run_sft(tiny_model_dir, tmp_path / "kd", **{"sft.loss": "distill", "teacher": str(teacher), "sft.distill.top_k": 16,
                                               "peft.method": peft, "train.lr": 1e-2,
                                               "data.limit": 8, "train.max_steps": 4})  # one batch, 4 times
    logged = metrics(tmp_path / "kd")
    assert logged[-1]["distill/divergence"] < logged[0]["distill/divergence"]
    assert (tmp_path / "kd" / "teacher_topk.safetensors").exists()


@pytest.mark.parametrize("lmbda", [0.0, 0.5])  # the cached teacher (off-policy) and the live one (on-policy)
def test_distillation_refuses_a_teacher_with_another_tokenizer(tiny_model_dir, tmp_path, lmbda):
    teacher = second_model(tiny_model_dir, tmp_path, seed=7)
    vocab = json.loads((teacher / "tokenizer.json").read_text())
    vocab["model"]["vocab"]["zzz-new"] = len(vocab["model"]["vocab"])
    (teacher / "tokenizer.json").write_text(json.dumps(vocab))
    with pytest.raises(UserError, match="different tokenizer"):
        run_sft(tiny_model_dir, tmp_path / "kd",
                **{"sft.loss": "distill", "teacher": str(teacher), "sft.distill.lmbda": lmbda})


def test_poft_with_two_aligned_references(tiny_model_dir, tmp_path):
    refs = [str(second_model(tiny_model_dir, tmp_path, seed=s)) for s in (3, 4)]
    run_sft(tiny_model_dir, tmp_path / "poft", **{"sft.loss": "poft", "sft.references": json.dumps(refs),
                                                 "data.limit": 8, "train.max_steps": 4, "train.lr": 1e-2})
    logged = metrics(tmp_path / "poft")
    assert logged[-1]["poft/margin"] > logged[0]["poft/margin"]  # the policy climbs above the references
    assert (tmp_path / "poft" / "poft_reference_1.safetensors").exists()


def test_token_selection_trains_on_the_chosen_fraction(tiny_model_dir, tmp_path, monkeypatch):
    from posttrain.train.tasks.sft import SFTTask

    reference = second_model(tiny_model_dir, tmp_path, seed=5)
    seen = []
    original = SFTTask.normalizer
    monkeypatch.setattr(SFTTask, "normalizer", lambda self,
                        batch: seen.append((original(self, batch), batch.num_targets)) or seen[-1][0])
    run_sft(tiny_model_dir, tmp_path / "rho",
            **{"sft.token_selection": json.dumps({"ratio": 0.6, "reference": str(reference)})})
    selected, total = map(sum, zip(*seen))
    assert 0.6 <= selected / total < 0.62  # ceil per example
    assert "selection/excess_loss" in metrics(tmp_path / "rho")[0]


def test_s3ft_trains_on_the_models_own_correct_answers(tiny_model_dir, tmp_path, monkeypatch):
    """The tiny random model answers nothing correctly; a stand-in generator answers every other item right."""
    from posttrain.train import self_sample

    data = write_jsonl(tmp_path / "qa.jsonl", [
        {"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
         "completion": [{"role": "assistant", "content": f"{i} + {i} = {2 * i}. #### {2 * i}"}], "answer": str(2 * i)}
        for i in range(8)])
    monkeypatch.setattr(self_sample, "generate", lambda model, tok, prompts, *a, **k: [
        f"The sum is {2 * int(p[0]['content'].split()[2]) + (i % 2)}" for i, p in enumerate(prompts)])
    run_sft(tiny_model_dir, tmp_path / "s3ft",
            **{"data.train": str(data), "sft.self_sample": True, "train.max_steps": 1})
    cached = json.loads((tmp_path / "s3ft" / "self_sampled_answers.json").read_text())["answers"]
    assert [a is not None for a in cached] == [True, False] * 4
    assert cached[0] == "The sum is 0"


def test_wilson_interval_by_hand():
    from posttrain.evaluate.stats import wilson_interval

    low, high = wilson_interval(3, 48)  # p = 0.0625, z = 1.96
    z, n, p = 1.959963984540054, 48, 3 / 48
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (low, high) == pytest.approx((centre - half, centre + half))
    assert low == pytest.approx(0.0215, abs=1e-4) and high == pytest.approx(0.1684, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_on_policy_distillation_scores_the_students_own_samples(tiny_model_dir, tmp_path):
    """GKD with lambda = 1: every completion is the student's sample; with the student as its own teacher (and
    the teacher's whole vocabulary kept) the forward KL is 0 at the first step, with another teacher it is not."""
    common = {"sft.loss": "distill", "sft.distill.lmbda": 1.0, "sft.distill.max_new_tokens": 10,
              "sft.distill.top_k": 1000,
              "train.max_steps": 2}
    run_sft(tiny_model_dir, tmp_path / "self", **{**common, "teacher": str(tiny_model_dir)})
    first = metrics(tmp_path / "self")[0]
    assert first["distill/on_policy_fraction"] == 1.0 and first["loss"] == pytest.approx(0.0, abs=1e-12)
    assert not (tmp_path / "self" / "teacher_topk.safetensors").exists()  # the teacher runs live, nothing cached
    run_sft(tiny_model_dir, tmp_path / "other", **{**common, "teacher": str(second_model(tiny_model_dir, tmp_path, 7))})
    assert metrics(tmp_path / "other")[0]["loss"] > 0.01


def test_on_policy_mixing_leaves_off_policy_examples_as_the_cached_teacher_would(tiny_model_dir, tmp_path):
    """lambda so small that no example is drawn on-policy: the live teacher gives the cached teacher's loss."""
    teacher = str(second_model(tiny_model_dir, tmp_path, 7))
    common = {"sft.loss": "distill", "teacher": teacher, "sft.distill.divergence": "jsd", "sft.distill.top_k": 16}
    run_sft(tiny_model_dir, tmp_path / "cached", **common)
    run_sft(tiny_model_dir, tmp_path / "live", **{**common, "sft.distill.lmbda": 1e-9})
    live = metrics(tmp_path / "live")
    assert all(m["distill/on_policy_fraction"] == 0.0 for m in live)
    assert [m["loss"] for m in live] == pytest.approx([m["loss"] for m in metrics(tmp_path / "cached")], abs=1e-9)


def test_on_policy_distillation_keeps_accumulation_invariance(tiny_model_dir, tmp_path):
    teacher = str(second_model(tiny_model_dir, tmp_path, 7))
    for batch_size, accum in [(8, 1), (2, 4)]:
        run_sft(tiny_model_dir, tmp_path / f"{batch_size}x{accum}", **{
            "sft.loss": "distill", "teacher": teacher, "sft.distill.lmbda": 0.5, "sft.distill.max_new_tokens": 8,
            "sft.distill.divergence": "reverse_kl", "train.batch_size": batch_size, "train.grad_accum": accum})
    a, b = metrics(tmp_path / "8x1"), metrics(tmp_path / "2x4")
    assert 0 < a[0]["distill/on_policy_fraction"] < 1
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-9)
        assert x["distill/on_policy_fraction"] == y["distill/on_policy_fraction"]
    assert_weights_close(final_weights(tmp_path / "8x1"), final_weights(tmp_path / "2x4"), atol=1e-9)
