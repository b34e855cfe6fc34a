"""Reward functions, the reward runner (worker processes, timeouts, failure counting) and the code sandbox."""

import math
import shutil
import time
from fractions import Fraction

import pytest

from posttrain.core.errors import UserError
from posttrain.rewards.answers import extract_answer
from posttrain.rewards import REWARDS, resolve_reward
from posttrain.rewards.builtin import format_reward, length, majority_vote, math_answer
from posttrain.rewards.code import code_tests, extract_program
from posttrain.rewards.runner import RewardRunner, _group_chunks


@pytest.mark.parametrize("text, gold, expected", [
    ("Total: 1,234 apples.\n#### 1,234", "1234", 1.0),
    ("so the fraction is \\boxed{\\frac{3}{4}}", "0.75", 1.0),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", 1.0),
    ("The answer is $5.00.", "5", 1.0),
    ("13 + 15 = 28", "28", 1.0),
    ("13 + 15 = 28, then 28 - 3", "28", 1.0),  # the number after the last "=", not the last number
    ("It is 3.0", "3", 1.0),
    ("That is 50% of them", "50", 1.0),
    ("3/4 of a pie", "0.75", 1.0),
    ("0.1 + 0.2 = 0.30000000000000004", "0.3", 0.0),  # exact, not float-close
    ("#### 5\nActually, maybe 7", "5", 1.0),  # the marked answer wins over a later number
    ("the answer is 12 apples, not 13", "12", 1.0),
    ("\\boxed{\\frac{7}{2}} is 3.5", "3.5", 1.0),
    ("no number at all", "4", 0.0),
    ("#### 41", "42", 0.0),
    ("#### -3", "-3", 1.0),
])
def test_math_answer_on_tricky_outputs(text, gold, expected):
    assert math_answer([""], [text], answer=[gold]) == [expected]


def test_math_answer_without_a_reference_cannot_score():
    assert math_answer(["", ""], ["#### 3", "#### 3"], answer=["3", None]) == [1.0, None]


GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def test_a_gsm8k_solution_as_gold_is_read_like_a_completion():
    """Raw GSM8K records carry the whole solution as ``answer``: its final answer is the one after ``####``, for the
    reward and for answer_accuracy's greedy and majority-vote scores alike."""
    from posttrain.rewards.answers import is_correct
    from posttrain.evaluate.tasks import _vote_correct

    worked = "She sold 48 / 2 = 24 in May, so 48 + 24 = 72 in all.\n#### 72"
    completions = ["#### 72", worked, "#### 24"]
    assert math_answer([""] * 3, completions, answer=[GSM8K_SOLUTION] * 3) == [1.0, 1.0, 0.0]
    assert [is_correct(c, GSM8K_SOLUTION) for c in completions] == [True, True, False]
    assert [_vote_correct([c], GSM8K_SOLUTION) for c in completions] == [1.0, 1.0, 0.0]
    assert math_answer([""], ["\\boxed{\\frac{3}{4}}"],
                       answer=["\\frac{3}{4}"]) == [1.0]  # a bare gold number stays one
    # a gold that marks no answer is not guessed from its last number: the reward cannot score it
    assert math_answer([""] * 3, ["1/2", "4", "5"], answer=["1 1/2", "x = 3, y = 4", "5 or 6"]) == [None] * 3


def test_answers_are_exact_fractions():
    assert extract_answer("#### 1,000.50") == Fraction(2001, 2)
    assert extract_answer("\\boxed{2\\frac{1}{2}}") is not None  # a mixed number is read, never a crash


def test_format_length_and_majority_vote():
    assert format_reward(None, ["work\n#### 12", "12", "#### 12 because"]) == [1.0, 0.0, 0.0]
    assert format_reward(None, ["<think>a</think>b"], pattern=r"<think>.*</think>.*") == [1.0]
    assert length(None, ["abcd", ""], per=2) == [2.0, 0.0]
    completions = ["#### 3", "= 3", "#### 4", "nothing", "#### 7", "#### 8"]
    assert majority_vote(None, completions, group=[0, 0, 0, 0, 1, 1]) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_registry_and_module_function_rewards():
    assert set(REWARDS) >= {"math_answer", "format", "length", "majority_vote", "code_tests"}
    assert resolve_reward("test_rewards:half") is half
    with pytest.raises(ValueError, match="registered"):
        resolve_reward("nope")
    with pytest.raises(ValueError, match="cannot import"):
        resolve_reward("no_such_module:f")


# -- user rewards that misbehave, imported by name in the workers ------------------------------------
def half(prompts, completions, **_):
    return [0.5] * len(completions)


def raises(prompts, completions, **_):
    raise RuntimeError("boom")


def holes(prompts, completions, **_):
    return [{"a": None, "b": math.nan}.get(c, 1.0) for c in completions]


def wrong_length(prompts, completions, **_):
    return [1.0]


def slow(prompts, completions, **_):
    time.sleep(60)
    return [1.0] * len(completions)


def sees_groups(prompts, completions, group, answer, **_):
    assert len(set(group)) * 2 == len(group), "a chunk cut a group"
    return [float(a) for a in answer]


@pytest.fixture(scope="module")
def runner_factory():
    runners = []

    def make(specs, workers=2, timeout=30.0):
        runners.append(RewardRunner(specs, workers, timeout))
        return runners[-1]

    yield make
    for runner in runners:
        runner.close()


def test_failures_are_counted_never_silently_zero(runner_factory):
    runner = runner_factory([("test_rewards:half", 2.0, {}), ("test_rewards:raises", 1.0, {}),
                             ("test_rewards:holes", 1.0, {}), ("test_rewards:wrong_length", 1.0, {})])
    scores = runner.score(["p"] * 4, ["a", "b", "c", "d"], {}, [0, 0, 1, 1])
    assert scores.failed == {"test_rewards:half": 0, "test_rewards:raises": 4, "test_rewards:holes": 2,
                             "test_rewards:wrong_length": 4}
    assert scores.total == [1.0, 1.0, 2.0, 2.0]  # 2 x 0.5, plus holes' 1.0 where it could score
    assert any("RuntimeError: boom" in e for e in scores.errors)
    assert any("returned 1 values for 2" in e for e in scores.errors)


def test_groups_are_scored_together_and_columns_arrive_by_name(runner_factory):
    runner = runner_factory([("test_rewards:sees_groups", 1.0, {})], workers=3)
    group = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    scores = runner.score(["p"] * 10, ["c"] * 10, {"answer": list(range(10))}, group)
    assert scores.failed["test_rewards:sees_groups"] == 0 and scores.total == [float(i) for i in range(10)]
    assert _group_chunks([0, 0, 0, 1, 1, 2], 4) == [(0, 3), (3, 5), (5, 6)]


def test_a_hanging_reward_times_out_and_the_pool_recovers(runner_factory):
    runner = runner_factory([("test_rewards:slow", 1.0, {})], timeout=3.0)
    start = time.perf_counter()
    scores = runner.score(["p"] * 4, ["a"] * 4, {}, [0, 0, 1, 1])
    assert time.perf_counter() - start < 20
    assert scores.failed == {"test_rewards:slow": 4} and "no answer within 3s" in scores.errors[0]
    runner.specs = [("test_rewards:half", 1.0, {})]
    assert runner.score(["p"] * 2, ["a"] * 2, {}, [0, 0]).total == [0.5, 0.5]


def test_in_process_scoring():
    runner = RewardRunner([("math_answer", 1.0, {})], workers=0)
    assert runner.score(["p"] * 2, ["#### 2", "#### 3"], {"answer": ["2", "2"]}, [0, 0]).total == [1.0, 0.0]
    assert runner.pool is None


def test_unknown_reward_is_a_recipe_error():
    with pytest.raises(UserError, match="unknown reward"):
        RewardRunner([("nope", 1.0, {})])


# -- code ------------------------------------------------------------------------------------------
# skipped only where bubblewrap is missing: where it is installed but cannot isolate, the tests fail
needs_isolation = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


def test_program_is_the_last_fenced_block():
    assert extract_program("first\n```python\nx = 1\n```\nthen\n```py\nx = 2\n```\n") == "x = 2\n"
    assert extract_program("def f(): return 1") == "def f(): return 1"


@needs_isolation
def test_code_tests_pass_and_fail():
    program = "```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
    assert code_tests(None, [program, wrong, program], [tests, tests, []]) == [1.0, 0.0, None]


