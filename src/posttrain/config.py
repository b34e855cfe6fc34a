"""Recipe schema: one typed config per command, loaded from YAML plus ``key=value`` overrides.

Every section forbids unknown keys, so a typo is an error that names the key instead of a
setting silently ignored.
"""

from __future__ import annotations

import importlib.resources
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from posttrain.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def changed(self, names=None) -> set[str]:
        """The settings (of ``names``, default all) that differ from their defaults: what a recipe asked for. Not
        ``model_fields_set``, which holds every field of a run's full recipe.yaml loaded back as a recipe."""
        fields = type(self).model_fields
        return {n for n in (fields if names is None else names)
                if getattr(self, n) != fields[n].get_default(call_default_factory=True)}

    def unused(self, names: tuple[str, ...], why: str) -> None:
        """Refuse settings that differ from their defaults where nothing reads them (a setting silently ignored
        looks like one that had no effect). Defaults pass, so a run's full recipe.yaml stays a valid recipe."""
        changed = [n for n in names if n in self.changed(names)]
        if changed:
            raise ValueError(f"{', '.join(changed)}: {why}")


class DataSource(Section):
    path: str = Field(description="jsonl / json / parquet / csv file, or a saved HF dataset directory")
    weight: float = Field(1.0, gt=0, description="sampling multiplier: 2.0 repeats the source, 0.5 keeps half")
    adapter: Literal["auto", "none", "gsm8k", "hh_rlhf"] = Field(
        "auto", description="map a public layout (GSM8K, HH-RLHF) onto posttrain's record formats"
    )
    limit: int | None = Field(None, gt=0, description="use only the first N records")


class DataConfig(Section):
    train: str | list[DataSource] = Field(description="training data: a path or a list of {path, weight}")
    eval: str | list[DataSource] | None = Field(None, description="held-out data for eval loss")
    max_length: int = Field(1024, gt=1, description="tokens per example; longer examples are truncated")
    truncation: Literal["right", "left", "drop"] = Field(
        "right", description="where to cut over-long examples, or drop them (counts are reported)"
    )
    chat_template: str | None = Field(
        None, description="null: the tokenizer's template; 'chatml'; or a Jinja template string"
    )
    assistant_only_loss: bool = Field(True, description="train only on assistant / completion tokens")
    limit: int | None = Field(None, gt=0, description="use only the first N training records")
    eval_limit: int | None = Field(None, gt=0, description="use only the first N eval records")
    num_proc: int | None = Field(
        None, gt=0, description="worker processes that tokenize a file; null: one per core for files of 32 MB or more"
    )

    def sources(self, which: Literal["train", "eval"]) -> list[DataSource]:
        value = getattr(self, which)
        if value is None:
            return []
        return [DataSource(path=value)] if isinstance(value, str) else value


class PeftConfig(Section):
    method: str = Field(  # validated against peft's registry when the model is built
        "none",
        description="none (full or selective fine-tuning), lora, dora, rslora, pissa, olora, eva, "
        "prompt_tuning, ia3, or any other peft method name (vera, loha, lokr, adalora, boft, ...)",
    )
    r: int = Field(16, gt=0, description="adapter rank (LoRA-like methods)")
    alpha: float = Field(32, description="LoRA scaling numerator (lora_alpha)")
    dropout: float = Field(0.0, ge=0, lt=1, description="adapter dropout")
    target_modules: str | list[str] = Field(
        "all-linear", description="modules that get adapters (LoRA family; other methods default to peft's choice)"
    )
    num_virtual_tokens: int = Field(20, gt=0, description="prompt tuning: learned prompt length")
    options: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the peft config")
    trainable: list[str] = Field(
        default_factory=list,
        description="selective fine-tuning: train only parameters whose name matches a glob (e.g. '*norm*')",
    )
    frozen: list[str] = Field(default_factory=list, description="freeze parameters whose name matches a glob")
    random_freeze: float = Field(
        0.0, ge=0, lt=1, description="HFT: freeze this fraction of each layer's weight matrices, chosen at random"
    )


class TrainConfig(Section):
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    epochs: float = Field(1.0, gt=0, description="passes over the training data when max_steps is unset")
    batch_size: int = Field(8, gt=0, description="examples per micro-batch per process")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    max_tokens_per_micro_batch: int | None = Field(
        None, gt=0, description="halve a micro-batch whose layout holds more tokens than this until each part fits "
        "(an example is never split): less activation memory, the same step loss, a little more time per step")
    lr: float = Field(1.0e-4, ge=0, description="peak learning rate")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"] = Field(
        "cosine", description="learning-rate schedule after warmup"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to norms and biases)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    max_grad_norm: float | None = Field(1.0, description="clip the global gradient norm; null disables")
    seed: int = Field(0, description="seeds data order, initialization and sampling")
    packing: bool = Field(True, description="pack examples into rows of max_length (no cross-attention); a model "
                          "attending per sequence (any SDPA model) gets one row with no padding, prompts shared once")
    padding_free: bool = Field(False, description="one row per micro-batch with no padding at all")
    precision: Literal["fp32", "bf16", "fp16", "fp64"] = Field(
        "fp32", description="mixed precision for the forward pass; fp64: float64 weights and arithmetic, for "
        "numerical checks that must agree on every CPU (slow)")
    gradient_checkpointing: bool = Field(False, description="recompute activations to save memory")
    lean_layers: bool = Field(True, description="gated MLPs and RMSNorms save fewer activations for backward and "
                              "recompute elementwise results instead (same losses and gradients)")
    logprob_chunk: int = Field(1024, gt=0, description="target tokens per chunk of the vocabulary projection")
    log_every: int = Field(1, gt=0, description="log metrics every N steps")
    eval_every: int | None = Field(None, gt=0, description="evaluate every N steps (and at the end)")
    save_every: int | None = Field(None, gt=0, description="checkpoint every N steps")
    save_total_limit: int | None = Field(2, gt=0, description="keep only the newest N checkpoints")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=lambda: ["tensorboard"], description="trackers besides metrics.jsonl"
    )
    max_bad_steps: int = Field(3, ge=0, description="consecutive non-finite losses tolerated (skipped) before stopping")

    @model_validator(mode="after")
    def _padding_free_implies_packing(self) -> "TrainConfig":
        if self.padding_free and not self.packing:
            raise ValueError("train.padding_free: true needs train.packing: true (padding-free is a form of packing)")
        return self


class EvalOptions(Section):
    """Settings shared by the tasks (each reads the ones it needs); the CLI flags and a recipe's ``evals``."""

    limit: int | None = Field(200, gt=0, description="evaluate the first N records (None: all)")
    max_length: int = Field(1024, gt=1, description="perplexity / preference_accuracy: tokens per example")
    max_new_tokens: int = Field(256, gt=0, description="generation length limit")
    samples: int = Field(1, gt=0, description="generations per prompt for length / diversity / refusal_rate "
                         "(1: greedy; more: sampled at temperature)")
    k: list[int] = Field(default_factory=list, description="answer_accuracy: pass@k and maj@k for these k (sampled)")
    temperature: float = Field(0.8, gt=0, description="temperature of sampled generations")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling of sampled generations")
    seed: int = Field(0, description="seed of sampled generations (a sample is a function of prompt, seed, index)")
    reference: str | None = Field(None, description="preference_accuracy: a reference model for the implicit "
                                  "reward (default: the mean log-prob margin)")
    judge: str | None = Field(None, description="win_rate: a reward model / run or a reward function name")
    llm_judge: str | None = Field(None, description="win_rate: a causal LM asked which reply is better, both orders")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm_eval: lm-evaluation-harness task names")
    batch_size: int = Field(64, gt=0, description="generation batch size (decoding one token for many rows costs little more than for few on a CPU)")


class EvalSpec(EvalOptions):
    """One ``posttrain eval`` task run at every evaluation of a training run (``evals:`` in a recipe)."""

    task: str = Field(description="a registered eval task (posttrain eval --help) or module:function")
    data: str | None = Field(None, description="its data file")
    baseline: str | None = Field(None, description="a model to compare with (win_rate and forgetting need one)")

    @model_validator(mode="after")
    def _known_task(self) -> "EvalSpec":
        from posttrain.evaluate.tasks import EVAL_TASKS

        try:
            task = EVAL_TASKS.resolve(self.task)
        except UserError as exc:
            raise ValueError(str(exc)) from None
        if task.needs_data and not self.data:
            raise ValueError(f"evals: task {self.task} needs data")
        if task.needs_baseline and not self.baseline:
            raise ValueError(f"evals: task {self.task} compares with a baseline: set baseline")
        unread = EVAL_TASKS.unread_options(self, [self.task])
        if unread:
            raise ValueError(f"evals: {', '.join(unread)} not read by task {self.task}")
        return self


class Recipe(Section):
    """Keys every training command understands."""

    model: str = Field("default", description="'default' (embedded SmolLM2-135M-Instruct), a HF dir, a .gguf, a hub id")
    trust_remote_code: bool = Field(False, description="allow model code from the hub (off by default: safety)")
    allow_pickle: bool = Field(False, description="load weights stored as pickle (.bin / .pt), which can run code "
                               "while loading (off by default: safetensors and GGUF only)")
    output_dir: str = Field(description="run directory; a second run with the same directory resumes")
    data: DataConfig
    peft: PeftConfig = Field(default_factory=PeftConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evals: list[EvalSpec] = Field(default_factory=list, description="posttrain eval tasks run at every evaluation "
                                  "(train.eval_every, start and end): [{task, data, limit, ...}], logged to eval.jsonl")


class TokenSelection(Section):
    ratio: float = Field(gt=0, le=1, description="fraction of each example's target tokens to train on")
    reference: str = Field(description="reference model (trained on high-quality data) whose loss defines excess loss")


class DistillConfig(Section):
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field("forward_kl", description="per-token divergence to the teacher")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="jsd: the mixture weight of the teacher (GKD's beta)")
    top_k: int = Field(64, gt=0, description="teacher tokens kept per position (cached to disk)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of teacher and student")
    lmbda: float = Field(0.0, ge=0, le=1, description="GKD's lambda: the fraction of examples whose completion the student "
                         "samples itself each step (on-policy; the teacher is then kept in memory and scores the "
                         "student's tokens); the rest keep the dataset's completion")
    max_new_tokens: int = Field(128, gt=0, description="on-policy: the student's completion length (TRL's GKD default)")
    sampling_temperature: float = Field(0.9, gt=0, description="on-policy: the student's sampling temperature (TRL's GKD default)")

    @model_validator(mode="after")
    def _on_policy_settings(self) -> "DistillConfig":
        if self.lmbda == 0:
            self.unused(("max_new_tokens", "sampling_temperature"), "read only by on-policy distillation (set lmbda > 0)")
        return self


class SFTConfig(Section):
    """SFT variants from the literature: a registered loss, plus input / target transforms that combine with it."""

    loss: str = Field("nll", description="nll | dynamic_ft (Dynamic Fine-Tuning, TRL's 'dft') | poft (needs "
                      "sft.references) | distill (needs teacher)")
    beta: float | None = Field(None, gt=0, description="poft: scale of the likelihood gap; unset: the loss's default")
    references: list[str] = Field(default_factory=list, description="poft: aligned reference models (dirs, run dirs, hub ids)")
    distill: DistillConfig = Field(default_factory=DistillConfig)
    mask_ratio: float = Field(0.0, ge=0, lt=1, description="Masked Thought: fraction of completion input tokens masked "
                              "(targets kept); 0 is off")
    mask_token: str | None = Field(None, description="Masked Thought: the token that replaces masked inputs "
                                   "(default: the tokenizer's unk, else pad token)")
    token_selection: TokenSelection | None = Field(None, description="Rho-1: train only on each example's top "
                                                   "ratio of tokens by excess loss over a reference model")
    self_sample: bool = Field(False, description="S3FT: where the model already answers a training item correctly, "
                              "train on its own answer instead of the gold one")
    self_sample_max_new_tokens: int = Field(256, gt=0, description="S3FT: generation length for the model's answers")


class SFTRecipe(Recipe):
    teacher: str | None = Field(None, description="knowledge distillation (sft.loss: distill): the teacher model")
    sft: SFTConfig = Field(default_factory=SFTConfig)

    @model_validator(mode="after")
    def _teacher_with_distill(self) -> "SFTRecipe":
        if (self.teacher is None) != (self.sft.loss != "distill"):
            raise ValueError("sft.loss: distill and teacher: PATH go together (one is set without the other)")
        if self.sft.distill != DistillConfig() and self.sft.loss != "distill":  # defaults pass: a dumped recipe.yaml loads
            raise ValueError("sft.distill settings apply to sft.loss: distill only")
        if self.sft.references and self.sft.loss != "poft":
            raise ValueError("sft.references are the aligned models of sft.loss: poft")
        return self


class PreferenceRecipe(Recipe):
    """Preference commands score whole completions: the loss is always on the completion tokens."""

    @model_validator(mode="after")
    def _completion_only(self) -> "PreferenceRecipe":
        if not self.data.assistant_only_loss:
            raise ValueError("data.assistant_only_loss: false applies to sft only; preference losses score completions")
        return self


class PairwiseLossConfig(Section):
    """Every hyperparameter left unset takes the chosen loss's own paper default (listed under --help)."""

    family: ClassVar[str] = "pairwise"
    name: str | list[str] = Field("dpo", description="a pairwise loss, or a list of them summed with loss.weights")
    weights: list[float] | None = Field(None, description="weights of the losses in loss.name (default: all 1)")
    beta: float | None = Field(None, gt=0, description="inverse temperature / KL strength (lambda for ORPO, ASFT); "
                               "unset: the loss's default")
    label_smoothing: float | None = Field(None, ge=0, lt=1, description="label-noise rate: cdpo / robust / exo_pair / "
                                          "aot / aot_pair / simpo / cpo / tpo / tpo_l")
    gamma: float | None = Field(None, description="simpo / tpo_l: target reward margin")
    alpha: float | None = Field(None, description="rpo / cpo / tpo / tpo_l: weight of the NLL term")
    length_alpha: float | None = Field(None, description="rdpo_length: coefficient of the length difference")
    ld_alpha: float | None = Field(None, ge=0, le=1, description="ld_dpo: weight of the tokens beyond the shorter answer")
    discopop_tau: float | None = Field(None, gt=0, description="discopop: temperature of the mixing sigmoid")
    tau: float | None = Field(None, gt=0, description="dft / dft2: temperature of the negatives' scores")
    dft_gamma: float = Field(0.95, gt=0, le=1, description="dft / dft2: moving-average rate of the log partition estimate")
    dft_u_init: float = Field(0.0, description="dft / dft2: initial log partition estimate of every prompt")
    divergence: Literal["reverse_kl", "forward_kl", "js", "alpha"] | None = Field(None, description="f_dpo: the f-divergence")
    divergence_alpha: float | None = Field(None, description="f_dpo with divergence alpha: its coefficient")
    wpo: bool = Field(False, description="WPO: weight each pair by how likely the policy is to produce it")

    def names(self) -> list[str]:
        return [self.name] if isinstance(self.name, str) else list(self.name)

    def hyperparameters(self) -> dict:
        """The loss settings the recipe sets (beta apart); the losses' own defaults fill in the rest."""
        skip = {"name", "weights", "beta", "wpo", "dft_gamma", "dft_u_init"}
        return {k: v for k, v in self.model_dump().items() if k not in skip and v is not None}


class DPORecipe(PreferenceRecipe):
    loss: PairwiseLossConfig = Field(default_factory=PairwiseLossConfig)
    reference: Literal["auto", "policy_copy", "adapter_disabled", "precomputed", "none"] = Field(
        "auto",
        description="auto: adapter_disabled with PEFT, policy_copy otherwise, none for reference-free losses; "
        "precomputed: one pass before training, cached in the run directory",
    )


class UnpairedLossConfig(Section):
    family: ClassVar[str] = "unpaired"
    name: str = Field("kto", description="kto | bco | apo_zero_unpaired")
    beta: float | None = Field(None, gt=0, description="implicit reward scale; unset: the loss's default")
    desirable_weight: float = Field(1.0, gt=0, description="loss weight of desirable (thumbs-up) examples")
    undesirable_weight: float = Field(1.0, gt=0, description="loss weight of undesirable examples")
    density_ratio: bool = Field(False, description="bco: weight undesirable examples by the prompt density ratio (UDM)")
    min_density_ratio: float = Field(0.5, gt=0, description="bco UDM: lower clip of the density ratio")
    max_density_ratio: float = Field(10.0, gt=0, description="bco UDM: upper clip of the density ratio")
    prompt_sample_size: int = Field(1024, gt=1, description="bco UDM: prompts used to fit the classifier")


class KTORecipe(PreferenceRecipe):
    loss: UnpairedLossConfig = Field(default_factory=UnpairedLossConfig)
    reference: Literal["auto", "policy_copy", "adapter_disabled", "precomputed"] = Field(
        "auto", description="auto: adapter_disabled with PEFT, policy_copy otherwise"
    )


class RankingLossConfig(Section):
    family: ClassVar[str] = "ranking"
    name: str = Field("aft", description="aft | rrhf | pro | listnet")
    beta: float | None = Field(None, gt=0, description="listnet: reward scale; unset: the loss's default")
    constraint: Literal["boundary", "detach"] | None = Field(None, description="aft: how negatives are constrained")
    tau: float | None = Field(None, gt=0, description="aft boundary: how far below a positive a negative may be pushed")
    sft_weight: float | None = Field(None, ge=0, description="aft / rrhf / pro: weight of the best response's NLL term")
    reward_temperature: bool | None = Field(None, description="pro: scale scores by the reward gaps (the authors' "
                                            "temperature); false: plain Plackett-Luce over the order")
    score_temperature: float | None = Field(None, gt=0, description="listnet: temperature of the target distribution")

    def hyperparameters(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if k not in ("name", "beta") and v is not None}


class RankRecipe(PreferenceRecipe):
    loss: RankingLossConfig = Field(default_factory=RankingLossConfig)
    reference: Literal["auto", "policy_copy", "adapter_disabled", "precomputed", "none"] = Field(
        "auto", description="only listnet uses a reference"
    )


class RolloutConfig(Section):
    num_generations: int = Field(8, ge=2, description="completions sampled per prompt (one group)")
    max_new_tokens: int = Field(256, gt=0, description="token budget of a completion (longer ones are cut: truncated)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (the trainer's log-probs use it too)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    top_k: int | None = Field(None, gt=0, description="sample among the k most likely tokens")
    stop: list[str] = Field(default_factory=list, description="stop strings: a completion ends after the first one")
    batch_size: int = Field(64, gt=0, description="sequences per generate call")
    engine: Literal["transformers", "vllm"] = Field("transformers", validation_alias=AliasChoices("engine", "backend"),
                                                    description="transformers: HF generate on the trained model; vllm: a "
                                                    "vLLM server (own environment, see README), weights pushed after updates")
    vllm_url: str = Field("http://127.0.0.1:8011", description="engine vllm: the server's address")
    chat: bool = Field(True, description="render prompts with the chat template (false: raw text prompts)")
    tool: Literal["none", "python"] = Field("none", description="python: the model may run code between turns "
                                            "(<python>...</python>, output shown as <output>...</output>, no loss on it)")
    max_tool_calls: int = Field(2, ge=1, description="tool calls per completion at most")
    tool_timeout: float = Field(5.0, gt=0, description="seconds per tool call (the sandbox kills it after)")
    tool_unsandboxed: bool = Field(False, description="run tool code with resource limits only where the sandbox cannot "
                                   "isolate it (no network / filesystem isolation: opt in knowingly)")
    tool_instructions: str | None = Field(None, description="how the tool is explained to the model, as a system message "
                                          "(default: posttrain.rollout.tools.INSTRUCTIONS)")
    few_shot: list[dict[str, str]] = Field(default_factory=list, description="conversation turns ({role, content}) put "
                                           "before every prompt: worked examples (chat prompts only)")

    @model_validator(mode="after")
    def _few_shot_turns(self) -> "RolloutConfig":
        for turn in self.few_shot:
            if set(turn) != {"role", "content"} or turn["role"] not in ("user", "assistant"):
                raise ValueError(f"rollout.few_shot: each turn is {{role: user | assistant, content: ...}}, got {turn}")
        if self.few_shot and not self.chat:
            raise ValueError("rollout.few_shot needs rollout.chat: true (turns of a conversation)")
        if self.tool == "none":
            self.unused(("max_tool_calls", "tool_timeout", "tool_unsandboxed", "tool_instructions"),
                        "tool settings, read only with rollout.tool: python")
        if self.engine != "vllm":
            self.unused(("vllm_url",), "read only with rollout.engine: vllm")
        return self


class RewardSpec(Section):
    name: str | None = Field(None, description="a registered reward (math_answer, format, length, majority_vote, "
                             "code_tests) or module:function; with model: the name its scores are logged under")
    model: str | None = Field(None, description="a reward model instead: a sequence-classification model directory "
                              "(one score per completion, e.g. trained by posttrain rm)")
    weight: float = Field(1.0, description="weight in the summed reward")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the reward function "
                                    "(reward models: batch_size)")

    @model_validator(mode="after")
    def _function_or_model(self) -> "RewardSpec":
        if self.name is None and self.model is None:
            raise ValueError("a reward needs name (a reward function) or model (a reward model)")
        if self.model is not None and set(self.options) - {"batch_size"}:
            raise ValueError(f"reward model options: only batch_size (got {', '.join(sorted(self.options))})")
        return self

    @property
    def label(self) -> str:
        """The name the reward's scores are logged under."""
        return self.name or Path(self.model.rstrip("/")).name


class PolicyConfig(Section):
    """What every policy-gradient command shares: the policy loss, its aggregation, the KL, corrections, scoring."""

    family: ClassVar[str] = "rl"
    policy_loss: str = Field("ppo_clip", description="ppo_clip | gspo | cispo | reinforce")
    epsilon_low: float | None = Field(None, ge=0, description="lower clip range of the importance ratio; unset: the loss's default")
    epsilon_high: float | None = Field(None, ge=0, description="upper clip range (DAPO clip-higher: 0.28); unset: the loss's default")
    dual_clip: float | None = Field(None, gt=1, description="ppo_clip: dual-clip constant c for negative advantages")
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"] = Field(
        "token_mean", description="how per-token losses become the step loss (see README)")
    kl_coef: float = Field(0.0, ge=0, description="weight of the KL to the reference (0: no reference pass at all)")
    kl_estimator: Literal["k1", "k2", "k3", "none"] | None = Field(
        None, description="per-token KL estimator (none: no KL term); unset: k1 in the reward, k3 in the loss")
    kl_in: Literal["loss", "reward"] = Field("loss", description="add the KL to the loss, or subtract it from the reward")
    sampler_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = Field(
        "none", description="importance correction for sampler / trainer log-prob mismatch: truncate (TIS) or mask the "
        "ratio pi_trainer / pi_sampler per token or per completion")
    sampler_correction_cap: float = Field(2.0, gt=1, description="the ratio's cap (truncate) or [1/cap, cap] range (mask)")
    overlong_filter: bool = Field(False, description="DAPO: truncated completions get no loss")
    overlong_buffer: int | None = Field(None, gt=0, description="DAPO soft overlong punishment: length of the penalty "
                                        "zone before max_new_tokens")
    overlong_penalty: float = Field(1.0, ge=0, description="soft overlong punishment at max_new_tokens")
    reward_workers: int = Field(2, ge=0, description="processes that score completions (0: in the training process, no timeouts)")
    reward_timeout: float = Field(120.0, gt=0, description="seconds per scoring call before its workers are killed")

    hyperparameter_names: ClassVar[tuple[str, ...]] = ("epsilon_low", "epsilon_high", "dual_clip")

    @model_validator(mode="after")
    def _kl_estimator_for_its_place(self) -> "PolicyConfig":
        """Unset: k1 in the reward (REINFORCE++, Eqs. 8-9; PPO as in RLHF), whose score-function gradient is the
        KL's; k3 in the loss (GRPO), where k1's gradient is zero in expectation. Resolved here, so recipe.yaml says."""
        if self.kl_estimator is None:
            self.kl_estimator = "k1" if self.kl_in == "reward" else "k3"
        return self

    def hyperparameters(self) -> dict:
        """The settings passed to the registered advantage and policy-loss functions (unset: their defaults)."""
        return {k: v for k in self.hyperparameter_names if (v := getattr(self, k)) is not None}


class RLConfig(PolicyConfig):
    """GRPO and its relatives: advantages from groups of completions of one prompt, no value model."""

    advantage: str = Field("grpo", description="advantage estimator: grpo | dr_grpo | rloo | reinforce_pp | reinforce_pp_baseline | remax")
    scale_rewards: Literal["group", "batch", "none"] | None = Field(None, description="grpo: divide by the group's std "
                                                                    "(paper), the batch's, or not at all")
    num_iterations: int = Field(1, gt=0, description="optimizer steps per rollout batch (>1 reuses it with old log-probs)")
    dynamic_sampling: Literal["none", "drop", "resample"] = Field(
        "none", description="DAPO: drop groups whose rewards before length shaping all agree (resample: and sample more "
        "prompts to refill)")
    max_resample: int = Field(4, ge=0, description="resample: extra sampling rounds per step at most")

    hyperparameter_names: ClassVar[tuple[str, ...]] = ("scale_rewards", "epsilon_low", "epsilon_high", "dual_clip")


class PPOConfig(PolicyConfig):
    """PPO with a learned value model (Schulman et al., 2017; Ouyang et al., 2022): per-token advantages by GAE.
    Defaults follow TRL's PPOTrainer: k1 KL penalty in the reward at 0.05, gamma 1, lam 0.95, value clip 0.2."""

    kl_coef: float = Field(0.05, ge=0, description="weight of the per-token KL penalty to the reference (0: no reference pass)")
    kl_in: Literal["loss", "reward"] = Field("reward", description="subtract the KL from the per-token reward (PPO), or add it to the loss")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount per token")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda: 1 is the Monte-Carlo return, 0 one-step TD")
    value_clip: float | None = Field(0.2, gt=0, description="clip each value's move per rollout batch (null: plain squared error)")
    vf_coef: float = Field(0.1, gt=0, description="weight of the value loss in the summed loss")
    whiten_advantages: bool = Field(True, description="normalize the advantages to mean 0, std 1 over the rollout batch")
    ppo_epochs: int = Field(4, gt=0, description="passes over each rollout batch")
    num_mini_batches: int = Field(1, gt=0, description="optimizer steps per pass: the rollout batch is "
                                  "num_mini_batches x train.batch_size x train.grad_accum completions per process")
    critic: Literal["shared", "separate"] = Field("shared", description="shared: a value head on the policy's trunk "
                                                 "(and its adapter); separate: a critic model of its own with its own adapter")
    critic_model: str | None = Field(None, description="separate critic: start from this model (e.g. a reward model "
                                     "directory, whose score head starts the value head) instead of the policy's weights")


class GRPORecipe(Recipe):
    """Online RL: sample, score, compute advantages over the step, update. train.batch_size counts completions."""

    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="math_answer")],
                                      description="reward functions and reward models, summed with their weights")
    rl: RLConfig = Field(default_factory=RLConfig)
    reference: Literal["auto", "policy_copy", "adapter_disabled"] = Field(
        "auto", description="the KL reference (used when rl.kl_coef > 0): auto = adapter disabled with PEFT, else a frozen copy")

    @model_validator(mode="after")
    def _whole_groups(self) -> "GRPORecipe":
        per_step = self.train.batch_size * self.train.grad_accum
        if per_step % self.rollout.num_generations:
            raise ValueError(f"train.batch_size x train.grad_accum ({self.train.batch_size} x {self.train.grad_accum} = "
                             f"{per_step} completions per process and step) must be a multiple of rollout.num_generations "
                             f"({self.rollout.num_generations}): a prompt's group is never split")
        if not self.rewards:
            raise ValueError("rewards: at least one reward function")
        if self.rl.kl_estimator == "none" and self.rl.kl_coef:
            raise ValueError(f"rl.kl_estimator: none means no KL term, but rl.kl_coef is {self.rl.kl_coef}: set one of them")
        if self.rl.kl_estimator == "k1" and self.rl.kl_in == "loss" and self.rl.kl_coef:
            raise ValueError("rl.kl_estimator: k1 in the loss has zero expected gradient (the mean of log pi - log pi_ref "
                             "over samples of pi): it would not pull towards the reference. Use k3 or k2 in the loss, or "
                             "k1 with rl.kl_in: reward")
        if self.rl.overlong_buffer is not None and self.rl.overlong_buffer >= self.rollout.max_new_tokens:
            raise ValueError("rl.overlong_buffer must be shorter than rollout.max_new_tokens")
        return self


class PPORolloutConfig(RolloutConfig):
    num_generations: int = Field(1, ge=1, description="completions sampled per prompt (the critic is the baseline: 1 is enough)")


class PPORecipe(GRPORecipe):
    """PPO with a value model: train.batch_size counts completions; a rollout batch feeds rl.ppo_epochs x
    rl.num_mini_batches optimizer steps."""

    rollout: PPORolloutConfig = Field(default_factory=PPORolloutConfig)
    rl: PPOConfig = Field(default_factory=PPOConfig)

    @model_validator(mode="after")
    def _critic_source(self) -> "PPORecipe":
        if self.rl.critic_model is not None and self.rl.critic != "separate":
            raise ValueError("rl.critic_model starts a separate critic: set rl.critic: separate")
        return self


class RFTConfig(Section):
    rounds: int = Field(3, gt=0, description="sample-filter-train rounds")
    steps_per_round: int = Field(20, gt=0, description="optimizer steps on each round's accepted completions")
    prompts_per_round: int | None = Field(None, gt=0, description="prompts sampled per round (default: every training prompt)")
    accept: Literal["threshold", "top_k"] = Field("threshold", description="threshold: keep completions whose summed "
                                                  "reward reaches rft.threshold (a verifier); top_k: each prompt's k best")
    threshold: float = Field(1.0, description="threshold: the summed reward a completion needs")
    top_k: int = Field(1, gt=0, description="top_k: completions kept per prompt, best reward first")
    max_per_prompt: int | None = Field(None, gt=0, description="at most this many distinct accepted completions per prompt "
                                       "(duplicates are always dropped)")
    hint: str | None = Field(None, description="STaR rationalization: a template filled with the record's fields (e.g. "
                             "'(The answer is {answer}.)') appended to prompts none of whose samples were accepted; they "
                             "are sampled again with it and accepted ones are trained on without it")
    reward_workers: int = Field(2, ge=0, description="processes that score completions (0: in the training process)")
    reward_timeout: float = Field(120.0, gt=0, description="seconds per scoring call before its workers are killed")

    @model_validator(mode="after")
    def _acceptance_settings(self) -> "RFTConfig":
        self.unused(("top_k",) if self.accept == "threshold" else ("threshold",), f"not read with rft.accept: {self.accept}")
        return self


class RFTRolloutConfig(RolloutConfig):
    num_generations: int = Field(4, ge=1, description="completions sampled per prompt per round")


class RFTRecipe(Recipe):
    """Rejection-sampling fine-tuning / expert iteration / STaR: sample, keep what the rewards accept, SFT on it,
    repeat. train.batch_size counts accepted completions; train.max_steps is rft.rounds x rft.steps_per_round."""

    rollout: RFTRolloutConfig = Field(default_factory=RFTRolloutConfig)
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="math_answer")],
                                      description="reward functions and reward models, summed with their weights")
    rft: RFTConfig = Field(default_factory=RFTConfig)

    @model_validator(mode="after")
    def _steps_from_rounds(self) -> "RFTRecipe":
        steps = self.rft.rounds * self.rft.steps_per_round
        if self.train.max_steps is None:
            self.train.max_steps = steps
        elif self.train.max_steps != steps:
            raise ValueError(f"train.max_steps ({self.train.max_steps}) must be rft.rounds x rft.steps_per_round ({steps}) "
                             "or unset")
        if not self.rewards:
            raise ValueError("rewards: at least one reward function or model")
        return self


class JudgeConfig(Section):
    model: str = Field("policy", description="policy (self-rewarding: the model being trained judges) or a causal LM "
                       "directory / hub id (its own tokenizer and chat template; it need not share the policy's)")
    template: str | None = Field(None, description="the question put to the judge, with {conversation}, {first} and "
                                 "{second}; default: posttrain.rewards.judge.TEMPLATE")
    batch_size: int = Field(8, gt=0, description="judge prompts per forward pass")


class OnlineDPOConfig(Section):
    iterations: int | None = Field(None, gt=0, description="unset: online DPO (fresh pairs from the current policy every "
                                   "step); K: iterative DPO, K rounds of train.max_steps / K steps, each on a preference "
                                   "set the policy generated at the round's start")
    prompts_per_iteration: int | None = Field(None, gt=0, description="iterative: prompts per round (default: all)")
    judge: JudgeConfig | None = Field(None, description="label pairs with an LLM judge (both answer orders) instead of rewards")
    reward_workers: int = Field(2, ge=0, description="processes that score completions (0: in the training process)")
    reward_timeout: float = Field(120.0, gt=0, description="seconds per scoring call before its workers are killed")

    @model_validator(mode="after")
    def _iterative_settings(self) -> "OnlineDPOConfig":
        if self.iterations is None:
            self.unused(("prompts_per_iteration",), "read only by iterative DPO (set online.iterations)")
        return self


class OnlineDPORecipe(Recipe):
    """Online / iterative DPO: sample completions of each prompt, label the best and the worst by the rewards or a
    judge, train a pairwise loss on them. train.batch_size counts pairs (prompts)."""

    rollout: RolloutConfig = Field(default_factory=lambda: RolloutConfig(num_generations=2))
    rewards: list[RewardSpec] = Field(default_factory=list, description="reward functions and reward models that label "
                                      "the pairs (or online.judge)")
    online: OnlineDPOConfig = Field(default_factory=OnlineDPOConfig)
    loss: PairwiseLossConfig = Field(default_factory=PairwiseLossConfig)
    reference: Literal["auto", "policy_copy", "adapter_disabled", "none"] = Field(
        "auto", description="auto = adapter disabled with PEFT, a frozen copy of the starting policy otherwise")

    @model_validator(mode="after")
    def _labels_and_steps(self) -> "OnlineDPORecipe":
        if bool(self.rewards) == (self.online.judge is not None):
            raise ValueError("online DPO labels pairs with rewards or with online.judge: set exactly one of them")
        if self.train.max_steps is None:
            raise ValueError("train.max_steps: online DPO samples as it trains; give the number of optimizer steps")
        if self.online.iterations and self.train.max_steps % self.online.iterations:
            raise ValueError(f"train.max_steps ({self.train.max_steps}) must be a multiple of online.iterations "
                             f"({self.online.iterations})")
        return self


class RewardModelConfig(Section):
    center_rewards_coefficient: float = Field(0.0, ge=0, validation_alias=AliasChoices("center_rewards_coefficient",
                                              "center_rewards"), description="coefficient of mean((r_c + r_r)^2), which "
                                              "keeps rewards centred on zero (Eisenstein et al., 2023; TRL's name; 0 = off)")
    objectives: list[str] = Field(default_factory=list, description="multi-objective: one head per rated attribute "
                                  "(records carry ratings: {attribute: value}); empty = one scalar reward")
    weighting: Literal["fixed", "learned"] = Field("fixed", description="multi-objective: how the attribute scores "
                                                   "combine into one reward: fixed rm.weights, or learned from the pairs "
                                                   "by Bradley-Terry (softmax weights, attribute scores held fixed)")
    weights: dict[str, float] | None = Field(None, description="fixed weighting: {attribute: weight} (default: uniform)")
    regression_weight: float = Field(1.0, ge=0, description="multi-objective: weight of the ratings' squared error "
                                     "against the pairs' Bradley-Terry loss")

    @model_validator(mode="after")
    def _objectives(self) -> "RewardModelConfig":
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError("objectives: each attribute once")
        if not self.objectives:
            self.unused(("weighting", "weights", "regression_weight"), "multi-objective settings: set rm.objectives")
        if self.weights is not None:
            if self.weighting == "learned":
                raise ValueError("weights: fixed weights and weighting: learned exclude each other")
            if set(self.weights) != set(self.objectives):
                raise ValueError(f"weights: give one weight per objective ({', '.join(self.objectives)})")
        return self


class RMRecipe(PreferenceRecipe):
    """Reward models: a score head on a causal LM (its last hidden state at the sequence's last token) or any
    sequence-classification model, trained on preference pairs (Bradley-Terry) and, with rm.objectives, ratings."""

    rm: RewardModelConfig = Field(default_factory=RewardModelConfig)

    @model_validator(mode="after")
    def _keep_the_last_token(self) -> "RMRecipe":
        """The reward is read at the last token: cutting long sequences on the right would read it mid-answer."""
        if self.data.truncation == "right":
            if "truncation" in self.data.model_fields_set:
                raise ValueError("data.truncation: right would cut off the end of long answers, where the reward is "
                                 "read; use left (the default for rm) or drop")
            self.data.truncation = "left"
        return self


class PRMConfig(Section):
    step_separator: str = Field("\n", description="appended to every step; its last token carries the step's label "
                                "(TRL's default)")
    train_on_last_step_only: bool = Field(False, description="label only the last step of each record (outcome "
                                          "supervision on the PRM data layout)")
    max_prompt_length: int | None = Field(None, gt=0, description="prompt tokens kept (from the end); unset: no limit")


class PRMRecipe(Recipe):
    """Process reward models: records {prompt, completions: [step, ...], labels: [bool, ...]}, a 2-class token head
    read at each step's separator (TRL's PRMTrainer layout: raw text, no chat template)."""

    prm: PRMConfig = Field(default_factory=PRMConfig)

    @model_validator(mode="after")
    def _raw_text_layout(self) -> "PRMRecipe":
        if self.data.truncation != "right":
            raise ValueError("data.truncation: a PRM row keeps its first data.max_length tokens (TRL's layout); "
                             "shorten prompts with prm.max_prompt_length")
        self.data.unused(("chat_template", "assistant_only_loss"), "a PRM reads raw text (prompt, steps, separators) "
                         "and is trained only on the steps' labels")
        return self


def recipes_dir() -> Path:
    return Path(str(importlib.resources.files("posttrain") / "recipes"))


def resolve_recipe_path(name_or_path: str) -> Path:
    """A file path, or the name of a shipped recipe (``posttrain sft quickstart``)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = recipes_dir() / (name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if shipped.exists():
        return shipped
    available = ", ".join(sorted(p.stem for p in recipes_dir().glob("*.yaml")))
    raise UserError(f"recipe {name_or_path!r} is neither a file nor a shipped recipe ({available})")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override {text!r} must look like key=value, e.g. train.lr=5e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_override(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {'.'.join(keys)}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def load_recipe(command: str, path: str | None, overrides: list[str] = ()) -> Recipe:
    tree: dict = {}
    if path is not None:
        recipe_path = resolve_recipe_path(path)
        try:
            tree = yaml.safe_load(recipe_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{recipe_path}: not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise UserError(f"{recipe_path}: a recipe must be a mapping of keys to values")
        importable_beside(recipe_path)
    for override in overrides:
        apply_override(tree, *parse_override(override))
    return validate_recipe(command, tree, source=path or "overrides")


def importable_beside(recipe_path: Path) -> None:
    """``module:function`` rewards and eval tasks may live next to the recipe: its directory joins the import path
    last, so installed packages (and the standard library) are never shadowed by a file there. Nothing is ever
    imported from a name inside a data record."""
    directory = str(recipe_path.resolve().parent)
    if directory not in sys.path:
        sys.path.append(directory)


def validate_recipe(command: str, tree: dict, source: str = "recipe") -> Recipe:
    from posttrain.commands import COMMANDS

    schema = COMMANDS[command].schema
    try:
        return schema.model_validate(tree)
    except ValidationError as exc:
        raise UserError(f"{source}: invalid recipe\n" + format_validation_error(exc, schema)) from None


def format_validation_error(exc: ValidationError, schema: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            parent = schema
            for part in err["loc"][:-1]:
                field = parent.model_fields.get(str(part)) if isinstance(part, str) else None
                parent = section_type(field) if field else None
                if parent is None:
                    break
            allowed = ", ".join(parent.model_fields) if parent else "see --help"
            lines.append(f"  {key}: unknown key (allowed here: {allowed})")
        elif err["type"] == "missing":
            lines.append(f"  {key}: required")
        else:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def section_type(field) -> type[BaseModel] | None:
    annotation = field.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def describe_schema(schema: type[BaseModel], prefix: str = "") -> list[str]:
    """Lines of ``key  default  description`` for ``--help``."""
    lines = []
    for name, field in schema.model_fields.items():
        key = prefix + name
        section = section_type(field)
        if section is not None and section is not DataSource:
            lines.append(f"{key}:")
            lines.extend(describe_schema(section, key + "."))
            continue
        default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
        lines.append(f"  {key:32s} {default:14s} {field.description or ''}")
    return lines


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
