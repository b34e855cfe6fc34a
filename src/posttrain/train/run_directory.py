"""A run directory's files: recipe.yaml, the JSON-lines logs (cut back to the step a resumed run starts from),
trackers, messages and the summary at the end."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from posttrain.core.config import dump_recipe
from posttrain.core.errors import UserError
from posttrain.train import checkpoint as ckpt

# Keys that may change between a run and its resumption without making it a different run.
RESUMABLE_CHANGES = {"evals", "max_steps", "epochs", "eval_every", "save_every", "save_total_limit", "log_every",
                     "report_to", "max_bad_steps"}


class RunDirectory:
    def __init__(self, recipe, command: str, accelerator):
        self.recipe, self.command, self.acc = recipe, command, accelerator
        self.out = Path(recipe.output_dir)
        self.ckpt_root = self.out / "checkpoints"

    def check_resumable(self) -> None:
        """A run directory with checkpoints continues only the run its recipe.yaml describes."""
        saved = self.out / "recipe.yaml"
        if not saved.exists():
            return
        before = yaml.safe_load(saved.read_text())
        now = self.recipe.model_dump(mode="json")
        changed = [key for key, a, b in _diff(before, now) if key.split(".")[-1] not in RESUMABLE_CHANGES]
        if changed and ckpt.list_checkpoints(self.ckpt_root):
            raise UserError(
                f"{self.out} holds a run with a different recipe ({', '.join(changed)} changed); "
                "use a new output_dir, or the same settings to resume"
            )

    def open(self, step: int, total_steps: int) -> None:
        """recipe.yaml, logs cut back to the step the run starts from, trackers."""
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale(self.ckpt_root)
            (self.out / "recipe.yaml").write_text(f"# posttrain {self.command}\n" + dump_recipe(self.recipe))
            for log in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):
                # the final evaluation runs after the last checkpoint: a run resumed there logs it again
                redone = log != "metrics.jsonl" and step == total_steps
                _truncate_log(self.out / log, None if step == 0 else step - 1 if redone else step)
        trackers = list(self.recipe.train.report_to)
        if trackers:
            self.acc.init_trackers("tensorboard" if trackers == ["tensorboard"] else self.out.name,
                                   config=_flat(self.recipe.model_dump(mode="json")))

    def log(self, filename: str, record: dict, track: bool = True) -> None:
        if not self.acc.is_main_process:
            return
        with open(self.out / filename, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.recipe.train.report_to and track:
            self.acc.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def say(self, message: str) -> None:
        if self.acc.is_main_process:
            tqdm.write(f"posttrain: {message}")

    def print_summary(self, s: dict) -> None:
        """The concise summary at the end of a run."""
        if not self.acc.is_main_process:
            return
        lines = [
            f"done: {s['steps']} steps" + (f" (resumed at {s['resumed_from']})" if s["resumed_from"] else ""),
            f"  time {s['elapsed_s']:.0f}s, {s['tokens']:,} tokens, {s['tokens_per_s']:.0f} tokens/s",
        ]
        if s["first_loss"] is not None:
            lines.append(f"  train loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}")
        if len(s["eval"]) >= 2:
            key = next(k for k in s["eval"][0] if k != "step")
            lines.append(f"  {key} {s['eval'][0][key]:.4f} -> {s['eval'][-1][key]:.4f}")
        lines.append(f"  model: {self.out / 'final'}   metrics: {self.out / 'metrics.jsonl'}")
        print("\n".join(lines), flush=True)


def _truncate_log(path: Path, keep_through: int | None) -> None:
    """Drop records logged after step ``keep_through`` (they will be logged again by the resumed run); None: a run
    starting from scratch starts a fresh log."""
    if not path.exists():
        return
    lines = path.read_text().splitlines() if keep_through is not None else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= keep_through]
    path.write_text("".join(line + "\n" for line in kept))


def _diff(a, b, prefix: str = ""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from _diff(a.get(key), b.get(key), f"{prefix}{key}.")
    elif a != b:
        yield prefix.rstrip("."), a, b


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
