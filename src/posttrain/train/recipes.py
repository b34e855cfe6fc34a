"""Recipe schemas of the commands that learn from a fixed dataset, and the keys every command shares."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, model_validator

from posttrain.core.config import Section
from posttrain.core.errors import UserError
from posttrain.data.config import DataConfig
from posttrain.evaluate.config import EvalOptions
from posttrain.evaluate.tasks import EVAL_TASKS
from posttrain.model.config import PeftConfig
from posttrain.objectives.sft import SFT_LOSSES
from posttrain.objectives.config import PairwiseLossConfig, RankingLossConfig, UnpairedLossConfig


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


class EvalSpec(EvalOptions):
    """One ``posttrain eval`` task run at every evaluation of a training run (``evals:`` in a recipe)."""

    task: str = Field(description="a registered eval task (posttrain eval --help) or module:function")
    data: str | None = Field(None, description="its data file")
    baseline: str | None = Field(None, description="a model to compare with (win_rate and forgetting need one)")

    @model_validator(mode="after")
    def _known_task(self) -> "EvalSpec":
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
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field("forward_kl",
                                                                   description="per-token divergence to the teacher")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="jsd: the mixture weight of the teacher (GKD's beta)")
    top_k: int = Field(64, gt=0, description="teacher tokens kept per position (cached to disk)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of teacher and student")
    lmbda: float = Field(0.0, ge=0, le=1,
                         description="GKD's lambda: the fraction of examples whose completion the student "
                         "samples itself each step (on-policy; the teacher is then kept in memory and scores the "
                         "student's tokens); the rest keep the dataset's completion")
    max_new_tokens: int = Field(128, gt=0, description="on-policy: the student's completion length (TRL's GKD default)")
    sampling_temperature: float = Field(0.9, gt=0,
                                        description="on-policy: the student's sampling temperature (TRL's GKD default)")

    @model_validator(mode="after")
    def _on_policy_settings(self) -> "DistillConfig":
        if self.lmbda == 0:
            self.unused(("max_new_tokens", "sampling_temperature"),
                        "read only by on-policy distillation (set lmbda > 0)")
        return self


class SFTConfig(Section):
    """SFT variants from the literature: a registered loss, plus input / target transforms that combine with it."""

    loss: str = Field("nll", description="nll | dynamic_ft (Dynamic Fine-Tuning, TRL's 'dft') | poft (needs "
                      "sft.references) | distill (needs teacher)")
    beta: float | None = Field(None, gt=0, description="poft: scale of the likelihood gap; unset: the loss's default")
    references: list[str] = Field(default_factory=list,
                                  description="poft: aligned reference models (dirs, run dirs, hub ids)")
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
        # what the loss needs (an unknown loss needs nothing here: the task names the known ones)
        needs = SFT_LOSSES[self.sft.loss].needs if self.sft.loss in SFT_LOSSES else frozenset()
        if (self.teacher is None) == ("teacher" in needs):
            raise ValueError("sft.loss: distill and teacher: PATH go together (one is set without the other)")
        # defaults pass: a dumped recipe.yaml loads
        if self.sft.distill != DistillConfig() and "teacher" not in needs:
            raise ValueError("sft.distill settings apply to sft.loss: distill only")
        if self.sft.references and "references" not in needs:
            raise ValueError("sft.references are the aligned models of sft.loss: poft")
        return self


class PreferenceRecipe(Recipe):
    """Preference commands score whole completions: the loss is always on the completion tokens."""

    @model_validator(mode="after")
    def _completion_only(self) -> "PreferenceRecipe":
        if not self.data.assistant_only_loss:
            raise ValueError("data.assistant_only_loss: false applies to sft only; preference losses score completions")
        return self


class DPORecipe(PreferenceRecipe):
    loss: PairwiseLossConfig = Field(default_factory=PairwiseLossConfig)
    reference: Literal["auto", "policy_copy", "adapter_disabled", "precomputed", "none"] = Field(
        "auto",
        description="auto: adapter_disabled with PEFT, policy_copy otherwise, none for reference-free losses; "
        "precomputed: one pass before training, cached in the run directory",
    )


class KTORecipe(PreferenceRecipe):
    loss: UnpairedLossConfig = Field(default_factory=UnpairedLossConfig)
    reference: Literal["auto", "policy_copy", "adapter_disabled", "precomputed"] = Field(
        "auto", description="auto: adapter_disabled with PEFT, policy_copy otherwise"
    )


class RankRecipe(PreferenceRecipe):
    loss: RankingLossConfig = Field(default_factory=RankingLossConfig)
    reference: Literal["auto", "policy_copy", "adapter_disabled", "precomputed", "none"] = Field(
        "auto", description="only listnet uses a reference"
    )


class RewardModelConfig(Section):
    center_rewards_coefficient: float = Field(0.0, ge=0, validation_alias=AliasChoices("center_rewards_coefficient",
                                              "center_rewards"),
                                              description="coefficient of mean((r_c + r_r)^2), which "
                                              "keeps rewards centred on zero (Eisenstein et al., 2023; TRL's name; 0 "
                                              "= off)")
    objectives: list[str] = Field(default_factory=list, description="multi-objective: one head per rated attribute "
                                  "(records carry ratings: {attribute: value}); empty = one scalar reward")
    weighting: Literal["fixed", "learned"] = Field("fixed", description="multi-objective: how the attribute scores "
                                                   "combine into one reward: fixed rm.weights, or learned from the "
                                                   "pairs "
                                                   "by Bradley-Terry (softmax weights, attribute scores held fixed)")
    weights: dict[str, float] | None = Field(None,
                                             description="fixed weighting: {attribute: weight} (default: uniform)")
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
