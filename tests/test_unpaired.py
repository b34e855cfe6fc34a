"""Unpaired losses (KTO, BCO, APO-zero unpaired): hand values, TRL's KTO, and the kto command."""

import math
import types
from collections import defaultdict

import pytest
import torch

from conftest import write_jsonl
from helpers import metrics, tiny_recipe
from posttrain.core.errors import UserError
from posttrain.objectives.unpaired import unpaired_loss

# Two completions: desirable with log-ratio 1.5, undesirable with log-ratio -0.5; beta = 0.4.
LOGPS, REFS, LABELS, BETA = torch.tensor([-8.5, -12.5]), torch.tensor([-10.0, -12.0]), torch.tensor([True, False]), 0.4


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_kto_by_hand_with_reference_point():
    losses, metrics_ = unpaired_loss("kto", LOGPS, REFS, LABELS, BETA, kl=torch.tensor(0.25),
                                     desirable_weight=1.0, undesirable_weight=2.0)
    assert losses[0].item() == pytest.approx(1 - sig(0.4 * (1.5 - 0.25)))
    assert losses[1].item() == pytest.approx(2.0 * (1 - sig(0.4 * (0.25 + 0.5))))
    assert metrics_["rewards/chosen"].item() == pytest.approx(0.6)


def test_kto_reference_point_is_clamped_at_zero():
    negative, _ = unpaired_loss("kto", LOGPS, REFS, LABELS, BETA, kl=torch.tensor(-3.0))
    zero, _ = unpaired_loss("kto", LOGPS, REFS, LABELS, BETA, kl=torch.tensor(0.0))
    torch.testing.assert_close(negative, zero)


def test_bco_by_hand_with_reward_shift():
    losses, _ = unpaired_loss("bco", LOGPS, REFS, LABELS, BETA, shift=0.1)
    assert losses[0].item() == pytest.approx(-math.log(sig(0.6 - 0.1)))
    assert losses[1].item() == pytest.approx(-math.log(sig(-(-0.2 - 0.1))))


def test_apo_zero_unpaired_by_hand():
    losses, _ = unpaired_loss("apo_zero_unpaired", LOGPS, REFS, LABELS, BETA)
    assert losses.tolist() == pytest.approx([1 - sig(0.6), sig(-0.2)])


def test_unknown_unpaired_loss():
    with pytest.raises(UserError, match="unknown unpaired loss"):
        unpaired_loss("kto2", LOGPS, REFS, LABELS)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_matches_trl_kto_trainer(loss_type):
    from trl.trainer.kto_trainer import KTOTrainer

    g = torch.Generator().manual_seed(0)
    b, width = 6, 5
    labels = torch.tensor([True, False, True, True, False, False])
    logps, refs = -torch.rand(b, generator=g) * 30, -torch.rand(b, generator=g) * 30
    kl_logps, ref_kl_logps = -torch.rand(b, generator=g) * 30, -torch.rand(b, generator=g) * 30
    main_ids, kl_ids = torch.zeros(b, width + 1, dtype=torch.long), torch.ones(b, width + 1, dtype=torch.long)

    def outputs(sums):
        per_token = (sums / width)[:, None].expand(b, width).clone()
        return types.SimpleNamespace(log_probs=per_token, entropy=torch.zeros(b, width),
                                     mean_logits=torch.zeros(b, width))

    model = lambda input_ids, **kw: outputs(kl_logps if input_ids is kl_ids else logps)  # noqa: E731
    accelerator = types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = types.SimpleNamespace(model=types.SimpleNamespace(training=True), accelerator=accelerator, beta=BETA,
                                    loss_type=loss_type, calculate_KL=loss_type == "kto", precompute_ref_logps=True,
                                    desirable_weight=1.3, undesirable_weight=0.7, aux_loss_enabled=False,
                                    _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    trainer._compute_kl_logps = lambda m, batch: KTOTrainer._compute_kl_logps(trainer, m, batch)
    mask = torch.ones(b, width + 1, dtype=torch.long)
    batch = {"label": labels, "input_ids": main_ids, "attention_mask": mask, "completion_mask": mask,
             "KL_input_ids": kl_ids, "KL_attention_mask": mask, "KL_completion_mask": mask,
             "ref_logps": refs, "ref_KL_logps": ref_kl_logps}
    theirs = KTOTrainer._compute_loss(trainer, model, batch, False)
    kl = (kl_logps - ref_kl_logps).mean() if loss_type == "kto" else None
    ours, _ = unpaired_loss(loss_type, logps, refs, labels, BETA, kl=kl, desirable_weight=1.3, undesirable_weight=0.7)
    # TRL orders desirable examples first; the mean does not depend on the order
    assert ours.mean().item() == pytest.approx(theirs.item(), rel=1e-5)


def unpaired_file(tmp_path, n=24, every_bad=2):
    """Records alternate desirable / undesirable; ``every_bad=4`` makes three of four desirable."""
    records = []
    for i in range(n):
        a, b = i % 7 + 2, i % 5 + 3
        good = i % every_bad != 1
        answer = f"{a} + {b} = {a + b}" if good else f"I think it is {a * b + 1}."
        records.append({"prompt": f"What is {a} + {b}?", "completion": answer, "label": good})
    return write_jsonl(tmp_path / "unpaired.jsonl", records)


def run_kto(model_dir, out, data, **overrides):
    from accelerate.state import AcceleratorState, PartialState

    from posttrain.apps.recipes import load_recipe
    from posttrain.train.run import run

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    base = {"data.train": str(data), "train.batch_size": 4, "train.max_steps": 4, "peft.method": "lora",
            "train.lr": 2e-2}
    return run("kto", load_recipe("kto", None, tiny_recipe(model_dir, out, **{**base, **overrides})))


@pytest.mark.parametrize("loss", ["kto", "bco", "apo_zero_unpaired"])
def test_kto_command_trains_and_reference_modes_agree(tiny_model_dir, tmp_path, loss):
    data = unpaired_file(tmp_path)
    run_kto(tiny_model_dir, tmp_path / "live", data, **{"loss.name": loss, "data.eval": str(data)})
    run_kto(tiny_model_dir, tmp_path / "cached", data, **{"loss.name": loss, "reference": "precomputed"})
    live, cached = metrics(tmp_path / "live"), metrics(tmp_path / "cached")
    assert [m["loss"] for m in live] == pytest.approx([m["loss"] for m in cached], abs=1e-6)
    evals = metrics(tmp_path / "live", "eval.jsonl")
    assert evals[0]["eval/accuracy"] == 0.5 and evals[-1]["eval/accuracy"] > 0.5


def test_kto_accumulation_does_not_change_the_reference_point(tiny_model_dir, tmp_path):
    """z0 is estimated over the whole optimizer step, so 4x1 = 2x2 = 1x4 (this failed while z0 was a
    per-micro-batch mean, as in TRL). Three of four examples are desirable, so KTO raises most completions and
    the mismatched-pair KL, clamped at 0, becomes positive."""
    data = unpaired_file(tmp_path, every_bad=4)
    for batch_size, accum in [(4, 1), (2, 2), (1, 4)]:
        run_kto(tiny_model_dir, tmp_path / f"{batch_size}x{accum}", data,
                **{"train.batch_size": batch_size, "train.grad_accum": accum, "train.max_steps": 3})
    reference = metrics(tmp_path / "4x1")
    assert max(m["kl"] for m in reference) > 0.1  # the policy has moved: z0 is not trivially zero
    for name in ("2x2", "1x4"):
        for a, b in zip(reference, metrics(tmp_path / name)):
            for key in ("loss", "kl", "grad_norm"):
                assert a[key] == pytest.approx(b[key], abs=1e-6), (name, key)


def test_per_microbatch_reference_point_would_fail_the_test_above(tiny_model_dir, tmp_path, monkeypatch):
    from posttrain.train.tasks.unpaired import UnpairedTask

    original = UnpairedTask.kl_estimate
    monkeypatch.setattr(UnpairedTask, "kl_estimate", lambda self, module, batch, training:
                        original(self, module, batch, False))  # each micro-batch its own z0
    data = unpaired_file(tmp_path, every_bad=4)
    for batch_size, accum in [(4, 1), (1, 4)]:
        run_kto(tiny_model_dir, tmp_path / f"{batch_size}x{accum}", data,
                **{"train.batch_size": batch_size, "train.grad_accum": accum, "train.max_steps": 3})
    whole, split = metrics(tmp_path / "4x1"), metrics(tmp_path / "1x4")
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(whole, split)) > 100 * 1e-6


def test_bco_shift_survives_resume(tiny_model_dir, tmp_path):
    data = unpaired_file(tmp_path)
    common = {"loss.name": "bco", "train.scheduler": "constant",
              "train.save_every": 2}  # max_steps may change on resume
    run_kto(tiny_model_dir, tmp_path / "straight", data, **{**common, "train.max_steps": 4})
    run_kto(tiny_model_dir, tmp_path / "resumed", data, **{**common, "train.max_steps": 2})
    run_kto(tiny_model_dir, tmp_path / "resumed", data, **{**common, "train.max_steps": 4})
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [m["reward_shift"] for m in resumed] == pytest.approx([m["reward_shift"] for m in straight], abs=1e-7)
    assert straight[-1]["reward_shift"] != 0


def test_preference_records_split_into_desirable_and_undesirable(tmp_path):
    from posttrain.data.formats import parse_unpaired

    examples = parse_unpaired("x", "line 1", {"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert [label for _, label in examples] == [True, False]
    with pytest.raises(UserError, match="true"):
        parse_unpaired("x", "line 1", {"prompt": "q", "completion": "a", "label": "yes"})


def test_prompt_classifier_separates_and_density_ratio_clips():
    from posttrain.objectives.unpaired import density_ratio, fit_prompt_classifier

    g = torch.Generator().manual_seed(0)
    desirable = torch.randn(60, 5, generator=g) + torch.tensor([2.0, 0, 0, 0, 0])
    undesirable = torch.randn(20, 5, generator=g) - torch.tensor([2.0, 0, 0, 0, 0])
    classify = fit_prompt_classifier(torch.cat([desirable, undesirable]), torch.tensor([True] * 60 + [False] * 20))
    p = classify(torch.tensor([[3.0, 0, 0, 0, 0], [-3.0, 0, 0, 0, 0]]))
    assert p[0] > 0.9 and p[1] < 0.1
    assert density_ratio(torch.tensor([0.5, 0.99, 0.01])).tolist() == pytest.approx([1.0, 10.0, 0.5])


def test_density_ratio_weights_only_undesirable_examples_by_hand():
    losses, _ = unpaired_loss("bco", LOGPS, REFS, LABELS, BETA, density_ratio=torch.tensor([5.0, 3.0]))
    assert losses.tolist() == pytest.approx([-math.log(sig(0.6)), 3.0 * -math.log(sig(0.2))])


def test_bco_density_ratio_weights_undesirable_examples(tiny_model_dir, tmp_path, monkeypatch):
    from posttrain.train.tasks import unpaired

    data = unpaired_file(tmp_path)
    run_kto(tiny_model_dir, tmp_path / "plain", data, **{"loss.name": "bco"})
    monkeypatch.setattr(unpaired, "density_ratio", lambda p, low, high: torch.full_like(p, 2.0))
    run_kto(tiny_model_dir, tmp_path / "udm", data, **{"loss.name": "bco", "loss.density_ratio": True})
    # step 1: policy == reference, so every example's loss is log 2 and the reward shift is 0; with u of the
    # 4 examples undesirable and each weighted 2, the step loss is log 2 * (4 + u) / 4
    assert metrics(tmp_path / "plain")[0]["loss"] == pytest.approx(math.log(2), abs=1e-9)
    undesirable = 4 * metrics(tmp_path / "udm")[0]["loss"] / math.log(2) - 4
    assert undesirable == pytest.approx(round(undesirable), abs=1e-9) and 1 <= round(undesirable) <= 3
    with pytest.raises(UserError, match="density_ratio"):
        run_kto(tiny_model_dir, tmp_path / "bad", data, **{"loss.name": "kto", "loss.density_ratio": True})
