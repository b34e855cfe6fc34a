"""Every adapter method and selective fine-tuning trains, saves and loads through the same engine."""

import pytest
import torch

from helpers import metrics, run_sft

SAME_BATCH = {"data.limit": 8, "train.batch_size": 8, "train.max_steps": 4, "train.lr": 1e-2,
              "train.scheduler": "constant"}

METHODS = {
    "lora": {},
    "dora": {},
    "rslora": {},
    "pissa": {},
    "olora": {},
    "eva": {"peft.r": 4},
    "ia3": {},
    "vera": {"peft.r": 4},
    "loha": {"peft.r": 4},
    "prompt_tuning": {"train.packing": False, "peft.num_virtual_tokens": 4, "train.lr": 0.3},
}


@pytest.mark.parametrize("method", METHODS)
def test_peft_method_trains_and_reloads(tiny_model_dir, tmp_path, method):
    from posttrain.model.load import load_model

    run_sft(tiny_model_dir, tmp_path, **{**SAME_BATCH, "peft.method": method, **METHODS[method]})
    losses = [m["loss"] for m in metrics(tmp_path)]
    assert losses[-1] < losses[0], losses
    assert (tmp_path / "final" / "adapter_config.json").exists()
    model = load_model(str(tmp_path / "final"))
    assert hasattr(model, "peft_config")


def test_prompt_tuning_with_packing_is_refused(tiny_model_dir, tmp_path):
    from posttrain.core.errors import UserError

    with pytest.raises(UserError, match="train.packing: false"):
        run_sft(tiny_model_dir, tmp_path, **{"peft.method": "prompt_tuning"})


def trained_parameters(tiny_model_dir, out):
    from posttrain.model.load import load_model

    base = dict(load_model(str(tiny_model_dir)).named_parameters())
    final = dict(load_model(str(out / "final")).named_parameters())
    return {name for name in base if not torch.equal(base[name], final[name])}


def test_layernorm_only_training_changes_only_norms(tiny_model_dir, tmp_path):
    run_sft(tiny_model_dir, tmp_path, **{**SAME_BATCH, "peft.trainable": "['*norm*']"})
    changed = trained_parameters(tiny_model_dir, tmp_path)
    assert changed and all("norm" in name for name in changed)


def test_frozen_patterns_keep_embeddings(tiny_model_dir, tmp_path):
    run_sft(tiny_model_dir, tmp_path, **{**SAME_BATCH, "peft.frozen": "['model.embed_tokens.*']"})
    changed = trained_parameters(tiny_model_dir, tmp_path)
    assert "model.embed_tokens.weight" not in changed and any("layers.0" in n for n in changed)


def test_hft_random_freeze_freezes_half_of_each_layer(tiny_model_dir, tmp_path):
    run_sft(tiny_model_dir, tmp_path, **{**SAME_BATCH, "peft.random_freeze": 0.5})
    changed = trained_parameters(tiny_model_dir, tmp_path)
    for layer in ("layers.0.", "layers.1."):
        matrices = [n for n in changed if layer in n and "norm" not in n]
        assert len(matrices) == 7 // 2 + 1 or len(matrices) == 7 // 2, matrices  # 7 matrices per Llama layer, half kept


def test_bitfit_on_a_model_without_biases_says_so(tiny_model_dir, tmp_path):
    from posttrain.core.errors import UserError

    with pytest.raises(UserError, match="no parameter to train"):
        run_sft(tiny_model_dir, tmp_path, **{"peft.trainable": "['*bias*']"})


def test_export_merges_lora_into_a_standalone_model(tiny_model_dir, tmp_path):
    from posttrain.apps.export import export_checkpoint, export_merged
    from posttrain.model.load import load_model

    run_sft(tiny_model_dir, tmp_path / "run", **{**SAME_BATCH, "peft.method": "lora", "train.save_every": 4})
    export_merged(str(tmp_path / "run" / "final"), tmp_path / "merged")
    export_checkpoint(tmp_path / "run", "step-4", tmp_path / "from-checkpoint")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert (tmp_path / "merged" / "model.safetensors").exists()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        adapter = load_model(str(tmp_path / "run" / "final"))(ids).logits
        merged = load_model(str(tmp_path / "merged"))(ids).logits
        checkpoint = load_model(str(tmp_path / "from-checkpoint"))(ids).logits
        base = load_model(str(tiny_model_dir))(ids).logits
    torch.testing.assert_close(adapter, merged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(checkpoint, merged, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base, merged, atol=1e-4)


def test_prefix_tuning_is_refused_with_a_reason(tiny_model_dir, tmp_path):
    from posttrain.core.errors import UserError

    with pytest.raises(UserError, match="prompt_tuning and p_tuning are the supported"):
        run_sft(tiny_model_dir, tmp_path, **{"peft.method": "prefix_tuning", "train.packing": False})


def test_p_tuning_trains(tiny_model_dir, tmp_path):
    run_sft(tiny_model_dir, tmp_path, **{**SAME_BATCH, "peft.method": "p_tuning", "train.packing": False,
                                         "peft.num_virtual_tokens": 4, "train.lr": 0.1,
                                         "peft.options": "{encoder_hidden_size: 16}"})
    losses = [m["loss"] for m in metrics(tmp_path)]
    assert losses[-1] < losses[0]


def test_adapter_keys_without_an_adapter_are_reported(tiny_model_dir, tmp_path, capsys):
    run_sft(tiny_model_dir, tmp_path, **{"peft.r": 4})
    assert "peft.r ignored" in capsys.readouterr().err


def q_proj(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


def pissa_reconstructs_the_weight(model, original):
    layer = q_proj(model)
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    torch.testing.assert_close(layer.base_layer.weight + delta, original["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.allclose(layer.base_layer.weight, original["model.layers.0.self_attn.q_proj.weight"])


def olora_b_is_orthonormal(model, original):
    b = q_proj(model).lora_B["default"].weight
    torch.testing.assert_close(b.T @ b, torch.eye(b.shape[1]), atol=1e-5, rtol=0)


PROPERTIES = {  # method: (peft config class, a property only that method has)
    "lora": ("LoraConfig", lambda m,
             w: q_proj(m).scaling["default"] == 32 / 16 and not q_proj(m).lora_B["default"].weight.any()),
    "dora": ("LoraConfig", lambda m, w: torch.allclose(q_proj(m).lora_magnitude_vector["default"].weight,
                                                        w["model.layers.0.self_attn.q_proj.weight"].norm(dim=1))),
    "rslora": ("LoraConfig", lambda m, w: q_proj(m).scaling["default"] == 32 / 16 ** 0.5),
    "pissa": ("LoraConfig", pissa_reconstructs_the_weight),
    "olora": ("LoraConfig", olora_b_is_orthonormal),
    "ia3": ("IA3Config", lambda m, w: torch.equal(m.base_model.model.model.layers[0].self_attn.k_proj.ia3_l["default"],
                                                   torch.ones_like(m.base_model.model.model.layers[0].self_attn.k_proj.ia3_l["default"]))),
    "vera": ("VeraConfig", lambda m, w: not q_proj(m).vera_lambda_b["default"].any() and "default" in q_proj(m).vera_A),
    "loha": ("LoHaConfig", lambda m, w: q_proj(m).hada_w1_a["default"].shape[1] == 4),
    "prompt_tuning": ("PromptTuningConfig", lambda m, w: m.get_prompt(batch_size=1).shape[1] == 4),
}


@pytest.mark.parametrize("method", sorted(PROPERTIES))
def test_each_method_builds_its_own_adapter(method):
    """The recipe name maps onto the right peft config, and the adapter shows a property of that method
    (a wrong alias, e.g. dora building plain LoRA, fails here rather than just training less well)."""
    from conftest import build_model
    from posttrain.model.config import PeftConfig
    from posttrain.model.peft import apply_peft

    extra = {k.split(".")[1]: v for k, v in METHODS[method].items() if k.startswith("peft.")}
    base = build_model(384)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_peft(base, PeftConfig(method=method, **extra), {"method", *extra})
    config_class, has_property = PROPERTIES[method]
    assert type(model.active_peft_config).__name__ == config_class
    assert getattr(model.active_peft_config, "use_dora", False) == (method == "dora")
    assert getattr(model.active_peft_config, "use_rslora", False) == (method == "rslora")
    assert has_property(model, original) in (True, None)


def test_eva_initializes_lora_a_from_the_data(tiny_model_dir, tmp_path):
    """EVA: A's rows are the top right-singular vectors of the layer inputs, so they are orthonormal."""
    from posttrain.model.load import load_model

    run_sft(tiny_model_dir, tmp_path, **{**SAME_BATCH, "peft.method": "eva", "peft.r": 4, "train.lr": 0.0})
    a = load_model(str(tmp_path / "final")).base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    torch.testing.assert_close(a @ a.T, torch.eye(4, dtype=a.dtype), atol=1e-5, rtol=0)


def lora_a(out):
    from posttrain.model.load import load_model

    return load_model(str(out / "final")).base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight


@pytest.mark.parametrize("command", ["grpo", "ppo", "rft", "online-dpo"])
def test_eva_initializes_from_the_prompts_in_commands_that_sample(tiny_model_dir, tmp_path, command):
    """The sampling commands have prompts only: EVA's SVD runs on the rendered prompts' activations, so A's rows
    are orthonormal, unlike the plain LoRA init of the same seed."""
    from conftest import build_model
    from helpers import run_command
    from posttrain.model.config import PeftConfig
    from posttrain.model.peft import apply_peft

    section = {"grpo": "rl", "ppo": "rl", "rft": "rft", "online-dpo": "online"}[command]
    rl = {"data.limit": 8, "rollout.num_generations": 4, "rollout.max_new_tokens": 8, "rollout.stop": '["e"]',
          "train.max_steps": 1, "train.batch_size": 4, "peft.method": "eva", "peft.r": 4, "train.lr": 0.0,
          "rewards": "[{name: length, options: {per: 10}}]", f"{section}.reward_workers": 0}
    if command == "rft":
        rl.update({"rft.rounds": 1, "rft.steps_per_round": 1, "rft.prompts_per_round": 4, "train.max_steps": "null"})
    run_command(command, tiny_model_dir, tmp_path, **rl)
    eva = lora_a(tmp_path)
    lora = q_proj(apply_peft(build_model(384), PeftConfig(method="lora", r=4),
                             {"method", "r"})).lora_A["default"].weight
    torch.testing.assert_close(eva @ eva.T, torch.eye(4, dtype=eva.dtype), atol=1e-5, rtol=0)
    assert not torch.allclose(lora @ lora.T, torch.eye(4, dtype=lora.dtype), atol=1e-2)
    assert not torch.allclose(eva.to(lora.dtype), lora, atol=1e-2)
