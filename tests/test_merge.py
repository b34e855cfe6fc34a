"""posttrain.apps.merge: each method on small tensors against values worked out by hand."""

import math

import pytest
import torch

from posttrain.core.errors import UserError
from posttrain.apps.merge import (dare, dare_ties, greedy_soup, lines, linear, model_stock, slerp, task_arithmetic,
                                  ties,
                             transfer, wise_ft)
from posttrain.apps.merge.methods import greedy_selection

T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


def test_linear_is_a_weighted_average_and_keeps_dtype_and_integer_buffers():
    a = {"w": T(1.0, 2.0), "ids": torch.tensor([0, 1])}
    b = {"w": T(3.0, 6.0), "ids": torch.tensor([0, 1])}
    out = linear([a, b], [1.0, 3.0])
    assert out["w"].tolist() == pytest.approx([2.5, 5.0]) and out["w"].dtype == torch.float64
    assert out["ids"].tolist() == [0, 1] and out["ids"].dtype == torch.int64
    assert linear([a, b], [1.0, 3.0], normalize=False)["w"].tolist() == pytest.approx([10.0, 20.0])
    half = linear([{"w": a["w"].half()}, {"w": b["w"].half()}])
    assert half["w"].dtype == torch.float16 and half["w"].tolist() == [2.0, 4.0]


def test_slerp_follows_the_great_circle_and_falls_back_to_lerp_when_parallel():
    a, b = {"w": T(1.0, 0.0)}, {"w": T(0.0, 1.0)}
    mid = slerp(a, b, 0.5)["w"]
    assert mid.tolist() == pytest.approx([math.sqrt(0.5), math.sqrt(0.5)], abs=1e-12)  # on the unit circle, 45 degrees
    assert slerp(a, b, 0.0)["w"].tolist() == pytest.approx([1.0, 0.0], abs=1e-12)
    third = slerp(a, b, 1 / 3)["w"]
    assert third.tolist() == pytest.approx([math.cos(math.pi / 6), math.sin(math.pi / 6)], abs=1e-12)
    parallel = slerp({"w": T(1.0, 1.0)}, {"w": T(2.0, 2.0)}, 0.25)["w"]
    assert parallel.tolist() == pytest.approx([1.25, 1.25], abs=1e-12)


def test_task_arithmetic_adds_scaled_task_vectors_and_negates():
    base, m1, m2 = {"w": T(1.0, 1.0)}, {"w": T(2.0, 1.0)}, {"w": T(1.0, 4.0)}
    assert task_arithmetic(base, [m1, m2], [1.0, 0.5])["w"].tolist() == pytest.approx([2.0, 2.5])
    assert task_arithmetic(base, [m1], -1.0)["w"].tolist() == pytest.approx([0.0, 1.0])  # forgetting a task


def test_ties_trims_elects_signs_and_averages_agreeing_entries():
    base = {"w": T(0.0, 0.0, 0.0, 0.0)}
    m1 = {"w": T(3.0, -1.0, 2.0, 0.1)}   # trimmed to density 0.5: (3, 0, 2, 0)
    m2 = {"w": T(1.5, -4.0, -1.0, 0.2)}  # (1.5, -4, 0, 0)
    m3 = {"w": T(-2.0, 0.5, 5.0, 0.0)}   # (-2, 0, 5, 0)
    out = ties(base, [m1, m2, m3], density=0.5)["w"].tolist()
    # entry 0: 3 + 1.5 - 2 > 0, the agreeing 3 and 1.5 average 2.25; entry 1: only -4; entry 2: 2 and 5 -> 3.5
    assert out == pytest.approx([2.25, -4.0, 3.5, 0.0])
    weighted = ties(base, [m1, m2, m3], density=0.5, weights=[1.0, 3.0, 1.0])["w"].tolist()
    # entry 0: weighted 3, 4.5, -2 elect +: (3 + 4.5) / (1 + 3); entry 1: -12 / 3; entry 2: (2 + 5) / 2
    assert weighted == pytest.approx([1.875, -4.0, 3.5, 0.0])


def test_dare_drops_and_rescales_with_a_seed_and_dare_ties_elects_signs():
    base, m1 = {"w": torch.zeros(1000, dtype=torch.float64)}, {"w": torch.ones(1000, dtype=torch.float64)}
    out = dare(base, [m1], density=0.25, seed=3)["w"]
    kept = out != 0
    assert set(out[kept].tolist()) == {4.0} and 0.2 < kept.double().mean() < 0.3  # survivors rescaled by 1 / 0.25
    assert torch.equal(out, dare(base, [m1], density=0.25, seed=3)["w"])  # the seed decides the masks
    assert not torch.equal(out, dare(base, [m1], density=0.25, seed=4)["w"])
    assert torch.equal(dare(base, [m1], density=1.0)["w"], m1["w"])
    small = {"w": T(0.0, 0.0)}
    plus, minus = {"w": T(1.0, 1.0)}, {"w": T(-3.0, 1.0)}
    assert dare_ties(small, [plus, minus], density=1.0)["w"].tolist() == pytest.approx([-3.0, 1.0])
    assert dare(small, [plus, minus], density=1.0)["w"].tolist() == pytest.approx([-1.0, 1.0])


def test_model_stock_interpolates_by_the_angle_between_task_vectors():
    base = {"w": T(0.0, 0.0)}
    m1, m2 = {"w": T(1.0, 0.0)}, {"w": T(1.0, 1.0)}  # cos = 1 / sqrt(2)
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    assert model_stock(base, [m1, m2])["w"].tolist() == pytest.approx([t * 1.0, t * 0.5], abs=1e-12)
    with pytest.raises(UserError, match="at least two"):
        model_stock(base, [m1])


def test_lines_scales_updates_linearly_with_depth():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.weight", "model.layers.1.mlp.weight",
             "model.layers.2.mlp.weight", "model.norm.weight"]
    base = {n: T(0.0) for n in names}
    tuned = {n: T(1.0) for n in names}
    out = lines(base, tuned, alpha=0.1, beta=0.8)
    assert [float(out[n]) for n in names] == pytest.approx([0.1, 0.1, 0.5, 0.9, 0.9])


def test_wise_ft_and_fine_tuning_transfer():
    base, tuned, other = {"w": T(1.0, 2.0)}, {"w": T(3.0, 2.0)}, {"w": T(0.0, 5.0)}
    assert wise_ft(base, tuned, 0.25)["w"].tolist() == pytest.approx([1.5, 2.0])
    assert transfer(base, tuned, other)["w"].tolist() == pytest.approx([2.0, 5.0])
    assert transfer(base, tuned, other, scale=0.5)["w"].tolist() == pytest.approx([1.0, 5.0])


def test_greedy_selection_adds_ingredients_only_while_the_soup_does_not_get_worse():
    losses = {(0,): 1.2, (1,): 1.0, (2,): 1.1, (3,): 2.0, (1, 2): 0.9, (1, 2, 0): 0.95, (1, 2, 3): 0.9}
    kept, history = greedy_selection(4, lambda idx: losses[tuple(idx)])
    assert kept == [1, 2,
                    3]  # ranked 1, 2, 0, 3 alone; 0 makes the soup worse, 3 leaves it equal (kept, as in the paper)
    assert [(h["ingredient"], h["soup"], h["kept"]) for h in history] == [
        (1, 1.0, True), (2, 0.9, True), (0, 0.95, False), (3, 0.9, True)]
    kept, _ = greedy_selection(3,
                               lambda idx: {(0,): 0.2, (1,): 0.5, (2,): 0.1, (1, 0): 0.6, (1, 0, 2): 0.4}[tuple(idx)],
                               higher_is_better=True)
    assert kept == [1, 0]


def test_greedy_soup_leaves_out_the_ingredient_that_hurts():
    target = {"w": torch.tensor([1.0, 1.0])}
    models = [{"w": torch.tensor([0.8, 1.2])}, {"w": torch.tensor([1.3, 0.9])}, {"w": torch.tensor([-4.0, 6.0])}]
    distance = lambda state: float((state["w"] - target["w"]).norm())  # noqa: E731
    soup, kept = greedy_soup(models, distance)
    assert kept == [0, 1]
    torch.testing.assert_close(soup["w"], torch.tensor([1.05, 1.05]))
    assert distance(soup) < min(distance(m) for m in models)


def test_mismatched_models_are_reported_with_the_tensor_name():
    with pytest.raises(UserError, match="lacks b"):
        linear([{"a": T(1.0), "b": T(1.0)}, {"a": T(1.0)}])
    with pytest.raises(UserError, match=r"a: shape \(2,\)"):
        linear([{"a": T(1.0)}, {"a": T(1.0, 2.0)}])


def test_merge_command_streams_tensors_and_equals_the_functions(tiny_model_dir, tmp_path):
    import yaml
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from conftest import build_model
    from posttrain.apps.cli import main
    from posttrain.model.load import load_tokenizer

    vocab = len(load_tokenizer(str(tiny_model_dir)))
    directories = []
    for seed in (1, 2):
        directory = tmp_path / f"tuned{seed}"
        build_model(vocab, seed=seed).save_pretrained(directory)
        directories.append(directory)
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(yaml.safe_dump({"method": "ties", "base": str(tiny_model_dir), "density": 0.3,
                                      "models": [{"model": str(d), "weight": w} for d, w in zip(directories,
                                                                                                (1.0, 0.5))],
                                      "output": str(tmp_path / "merged")}))
    assert main(["merge", str(recipe)]) == 0
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    states = [load_file(d / "model.safetensors") for d in (tiny_model_dir, *directories)]
    expected = ties(states[0], states[1:], density=0.3, weights=[1.0, 0.5])
    assert merged.keys() == expected.keys()
    for key in merged:
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=0, msg=key)
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # config and tokenizer came along
    assert (tmp_path / "merged" / "tokenizer.json").exists() and (tmp_path / "merged" / "merge.json").exists()
    assert main(["merge", str(recipe), "method=slerp", "density=0.5"]) == 0  # two models, no base needed
    assert main(["merge", str(recipe), "method=slerp"]) == 2  # density 0.3 would be silently unread: refused
    assert main(["merge", str(recipe), "method=lines", "density=0.5"]) == 2  # lines takes one tuned model
    assert main(["merge", str(recipe), "method=greedy_soup", "density=0.5"]) == 2  # no eval_data to rank soups by
    assert main(["merge", str(recipe), "eval_data=x.jsonl"]) == 2  # ties would not read it


@pytest.fixture(scope="module")
def three_models(tiny_model_dir, tmp_path_factory):
    from conftest import build_model
    from posttrain.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    directories = []
    for seed in (1, 2):
        directory = tmp_path_factory.mktemp(f"tuned{seed}")
        build_model(len(tokenizer), seed=seed).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        directories.append(directory)
    return [tiny_model_dir, *directories]


def mergekit_merge(config: dict, out) -> dict:
    """mergekit's own merge of the same inputs (mergekit is a test-only dependency)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.torch import load_file

    run_merge(MergeConfiguration.model_validate({**config, "dtype": "float32"}), str(out),
              MergeOptions(copy_tokenizer=False))
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("method", ["linear", "slerp", "task_arithmetic", "ties", "model_stock"])
def test_each_method_equals_mergekit(three_models, tmp_path, method):
    from safetensors.torch import load_file

    base, a, b = (str(d) for d in three_models)
    states = [load_file(f"{d}/model.safetensors") for d in (base, a, b)]
    configs = {
        "linear": ({"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1.0}},
                                                          {"model": b, "parameters": {"weight": 3.0}}]},
                   lambda: linear(states[1:], [1.0, 3.0])),
        "slerp": ({"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
                   "parameters": {"t": 0.3}}, lambda: slerp(states[1], states[2], 0.3)),
        "task_arithmetic": ({"merge_method": "task_arithmetic", "base_model": base,
                             "models": [{"model": a, "parameters": {"weight": 0.7}},
                                        {"model": b, "parameters": {"weight": -0.4}}]},
                            lambda: task_arithmetic(states[0], states[1:], [0.7, -0.4])),
        "ties": ({"merge_method": "ties", "base_model": base,
                  "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.3}},
                             {"model": b, "parameters": {"weight": 0.5, "density": 0.3}}]},
                 lambda: ties(states[0], states[1:], density=0.3, weights=[1.0, 0.5])),
        "model_stock": ({"merge_method": "model_stock", "base_model": base, "models": [{"model": a}, {"model": b}]},
                        lambda: model_stock(states[0], states[1:])),
    }
    config, ours = configs[method]
    theirs = mergekit_merge(config, tmp_path / "mergekit")
    ours = ours()
    assert theirs.keys() == ours.keys()
    for key in ours:  # float32 on both sides: summation order differs, so a float32 tolerance
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def lora_model(seed: int, rslora: bool = False):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from conftest import build_model

    base = build_model(64, seed=0).double()
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        use_rslora=rslora)
    model = get_peft_model(base, config)
    return model, {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}, config.to_dict()


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_lora_equals_peft_merge_and_unload(rslora):
    from posttrain.apps.merge.lora import adapter_scaling, merge_lora

    from conftest import build_model

    base = {k: v.clone() for k, v in build_model(64, seed=0).double().state_dict().items()}
    model, adapter, config = lora_model(1, rslora)
    assert adapter_scaling(config) == (8 / 2 if rslora else 8 / 4)
    ours = merge_lora(base, adapter, adapter_scaling(config))
    theirs = model.merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-12, msg=key)


def test_concatenated_adapters_add_the_updates_exactly():
    from posttrain.apps.merge.lora import adapter_scaling, concat_adapters, merge_lora

    from conftest import build_model

    base = {k: v.clone() for k, v in build_model(64, seed=0).double().state_dict().items()}
    (_, first, config), (_, second, _) = lora_model(1), lora_model(2)
    s = adapter_scaling(config)
    combined = concat_adapters([first, second], [s, s], weights=[0.25, 0.75])
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert combined[key].shape == (8, first[key].shape[1])  # ranks add up
    merged = merge_lora(base, combined, 1.0)
    expected = linear([merge_lora(base, first, s), merge_lora(base, second, s)], [0.25, 0.75])
    for name in merged:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=1e-12, msg=name)


def test_adapters_that_cannot_be_merged_here_say_why():
    from posttrain.apps.merge.lora import adapter_scaling, merge_lora

    with pytest.raises(UserError, match="DoRA"):
        adapter_scaling({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True})
    with pytest.raises(UserError, match="not a LoRA adapter"):
        adapter_scaling({"peft_type": "IA3"})
    with pytest.raises(UserError, match="does not have"):
        merge_lora({"w": T(1.0)}, {"x.q.lora_A.weight": T(1.0), "x.q.lora_B.weight": T(1.0)}, 1.0)
