"""Tests of the demo's arithmetic curriculum: problems, examples, answers and files."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from pangu_fastkd.data import ByteTokenizer, default_template, read_jsonl, tokenize_example
from pangu_fastkd.data.demo_curriculum import (
    FAST_MODE_MARKER,
    MAX_DIFFICULTY,
    MAX_SEQUENCE_TOKENS,
    Curriculum,
    Problem,
    extract_answer,
    fast_example,
    is_correct,
    make_curriculum,
    make_problems,
    reasoning_example,
    write_curriculum,
)

TOKENIZER = ByteTokenizer()
TEMPLATE = default_template(TOKENIZER)
STEP = re.compile(r"([0-9]+)([-+*])([0-9]+)=(-?[0-9]+)")
# (operands, multiplications, steps) of each level, as the module docstring documents them.
LEVEL_SHAPES = {1: (2, 0, 1), 2: (3, 0, 2), 3: (3, 1, 2), 4: (4, 1, 3), 5: (5, 2, 4)}


@pytest.fixture(scope="module")
def all_levels() -> list[Problem]:
    return make_problems(2003, seed=11, max_difficulty=MAX_DIFFICULTY)


def apply(left: int, op: str, right: int) -> int:
    return {"+": left + right, "-": left - right, "*": left * right}[op]


def check_worked_solution(p: Problem) -> None:
    """Re-derive ``p`` independently: Python's value of the question and a replay of the steps.

    Each step must perform the operation the usual precedence does next (the leftmost ``*``,
    else the leftmost ``+``/``-``) on the current operands, with the right result.
    """
    assert re.fullmatch(r"[0-9]+([-+*][0-9]+)*", p.question), p.question
    assert eval(p.question) == p.answer, p  # safe: digits and + - * only, checked above
    tokens = re.findall(r"[0-9]+|[-+*]", p.question)
    for step in p.steps:
        match = STEP.fullmatch(step)
        assert match, f"{p.id}: malformed step {step!r}"
        left, op, right, result = match.groups()
        i = tokens.index("*") if "*" in tokens else 1
        assert tokens[i - 1 : i + 2] == [left, op, right], f"{p.id}: step {step!r} out of order"
        assert int(result) == apply(int(left), op, int(right)), f"{p.id}: wrong step {step!r}"
        assert int(result) >= 0, f"{p.id}: negative intermediate in {step!r}"
        tokens[i - 1 : i + 2] = [result]
    assert tokens == [str(p.answer)], f"{p.id}: steps end at {tokens}, not {p.answer}"


def test_make_problems_is_deterministic_per_seed():
    first = make_problems(57, seed=3)
    assert first == make_problems(57, seed=3)
    other = make_problems(57, seed=4)
    assert {p.question for p in first} != {p.question for p in other}


def test_questions_are_distinct_and_ids_unique(all_levels):
    assert len(all_levels) == 2003
    assert len({p.question for p in all_levels}) == 2003
    assert len({p.id for p in all_levels}) == 2003
    for p in all_levels:
        assert p.id == f"arith-d{p.difficulty}-{p.question}"


@pytest.mark.parametrize(("n", "max_difficulty"), [(2003, 5), (7, 4), (3, 4), (1, 1), (0, 2)])
def test_difficulty_is_balanced(n, max_difficulty):
    problems = make_problems(n, seed=5, max_difficulty=max_difficulty)
    counts = Counter(p.difficulty for p in problems)
    assert sum(counts.values()) == n
    assert set(counts) <= set(range(1, max_difficulty + 1))
    per_level = [counts.get(level, 0) for level in range(1, max_difficulty + 1)]
    assert max(per_level) - min(per_level) <= 1
    assert per_level == sorted(per_level, reverse=True)  # remainders go to the easy levels


def test_levels_are_interleaved(all_levels):
    # A prefix of the list (e.g. a short run's first batches) sees every level.
    assert {p.difficulty for p in all_levels[:50]} == set(range(1, MAX_DIFFICULTY + 1))


def test_every_problem_is_arithmetically_right(all_levels):
    for p in all_levels:
        check_worked_solution(p)


def test_difficulty_grades_operands_multiplications_and_steps(all_levels):
    for p in all_levels:
        operands = len(re.findall(r"[0-9]+", p.question))
        assert (operands, p.question.count("*"), len(p.steps)) == LEVEL_SHAPES[p.difficulty], p
        assert all(1 <= int(x) <= 99 for x in re.findall(r"[0-9]+", p.question)), p
    # Both operators show up at every level, and digits grow with the level.
    for level in range(1, MAX_DIFFICULTY + 1):
        questions = "".join(p.question for p in all_levels if p.difficulty == level)
        assert "+" in questions and "-" in questions, level
    answer_digits = {
        level: [len(str(p.answer)) for p in all_levels if p.difficulty == level] for level in (1, 5)
    }
    assert max(answer_digits[1]) == 3 and max(answer_digits[5]) == 4
    mean = {level: sum(d) / len(d) for level, d in answer_digits.items()}
    assert mean[5] > mean[1] + 0.5


def test_exclude_keeps_questions_out():
    held_out = make_problems(40, seed=1)
    excluded = {p.question for p in held_out}
    # Same seed: without the exclusion these would largely be the same questions.
    train = make_problems(40, seed=1, exclude=excluded)
    assert not excluded & {p.question for p in train}
    assert len(train) == 40


def test_level_1_holds_14751_questions_and_says_when_it_runs_out():
    every = make_problems(14751, seed=2, max_difficulty=1)
    assert len({p.question for p in every}) == 14751
    with pytest.raises(ValueError, match="level 1 has only 14751 distinct questions"):
        make_problems(14752, seed=2, max_difficulty=1)
    with pytest.raises(ValueError, match="level 1 ran out of fresh questions"):
        make_problems(20, seed=2, max_difficulty=1, exclude={p.question for p in every[5:]})


def test_make_problems_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n must be at least 0, got -1"):
        make_problems(-1, seed=0)
    with pytest.raises(TypeError, match="n must be an int, got float"):
        make_problems(3.0, seed=0)
    with pytest.raises(TypeError, match="seed must be an int, got bool"):
        make_problems(3, seed=True)
    with pytest.raises(ValueError, match="max_difficulty must be at least 1, got 0"):
        make_problems(3, seed=0, max_difficulty=0)
    with pytest.raises(ValueError, match=f"max_difficulty must be at most {MAX_DIFFICULTY}"):
        make_problems(3, seed=0, max_difficulty=MAX_DIFFICULTY + 1)
    with pytest.raises(TypeError, match="exclude must be a collection of question strings"):
        make_problems(3, seed=0, exclude="1+2")


def test_problem_validates_its_fields():
    with pytest.raises(ValueError, match="question must be integers joined by"):
        Problem("p", "1 + 2", 3, 1, ("1+2=3",))
    with pytest.raises(ValueError, match=f"difficulty must be an int in 1..{MAX_DIFFICULTY}"):
        Problem("p", "1+2", 3, 0, ("1+2=3",))
    with pytest.raises(TypeError, match="answer must be an int, got str"):
        Problem("p", "1+2", "3", 1, ("1+2=3",))
    with pytest.raises(TypeError, match="steps must be a tuple of str"):
        Problem("p", "1+2", 3, 1, ["1+2=3"])


def test_examples_of_a_problem():
    p = Problem("arith-d4-23+4*7-9", "23+4*7-9", 42, 4, ("4*7=28", "23+28=51", "51-9=42"))
    r, f = reasoning_example(p), fast_example(p)
    assert r.id == "arith-d4-23+4*7-9/r" and f.id == "arith-d4-23+4*7-9/f"
    assert (r.mode, f.mode) == ("reasoning", "fast")
    assert r.difficulty == f.difficulty == 4.0
    assert r.answer == f.answer == "42"
    assert [m.role for m in r.messages] == [m.role for m in f.messages] == ["user", "assistant"]
    assert r.messages[0].content == "Compute 23+4*7-9."
    assert f.messages[0].content == f"Compute 23+4*7-9. {FAST_MODE_MARKER}"
    assert r.response == "4*7=28\n23+28=51\n51-9=42\nAnswer: 42"
    assert f.response == "Answer: 42"
    with pytest.raises(TypeError, match="expected a Problem, got str"):
        reasoning_example("23+4*7-9")


def test_reference_responses_are_correct(all_levels):
    for p in all_levels[:300]:
        for example in (reasoning_example(p), fast_example(p)):
            assert is_correct(example.response, example.answer)
            assert not is_correct(example.response, str(p.answer + 1))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: 14", "14"),
        ("Answer:14", "14"),
        ("  Answer: \t 14  \t", "14"),
        ("Answer:\n 14\n", "14"),
        ("Answer: -45", "-45"),
        ("Answer: +7", "7"),
        ("Answer: 007", "7"),
        ("Answer: -0", "0"),
        ("Answer: 0", "0"),
        ("12-57=-45\nAnswer: -45", "-45"),
        ("Answer: 3\nno, wait\nAnswer: 5", "5"),
        ("Answer: 3\nAnswer: 5\nthat is all", "5"),  # later lines do not matter
        ("Answer: 5\r\n", "5"),
        ("Answer: 1" + "0" * 5000, "1" + "0" * 5000),  # beyond int()'s 4300-digit limit
        ("", None),
        ("14", None),
        ("answer: 14", None),  # case-sensitive
        ("Answer:", None),
        ("Answer: ", None),
        ("Answer: fourteen", None),
        ("Answer: 14.5", None),
        ("Answer: 14abc", None),
        ("Answer: 1 4", None),
        ("Answer: - 14", None),
        ("Answer: --14", None),
        ("Answer: ١٤", None),  # Arabic-Indic digits are not ASCII integers
        ("Answer: 5\nAnswer: oops", None),  # the last Answer: decides
        ("Answer: 5\nAnswer:", None),
        ("AnswerAnswer: 9", "9"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct():
    assert is_correct("4*7=28\nAnswer: 28", "28")
    assert is_correct("Answer: -3", "-3")
    assert is_correct("Answer: 007", "7")
    assert is_correct("Answer: 7", " +07 ")
    assert not is_correct("Answer: 28", "29")
    assert not is_correct("Answer: -28", "28")
    assert not is_correct("28", "28")
    assert not is_correct("Answer: 28\nAnswer: x", "28")
    with pytest.raises(ValueError, match="answer must be an integer such as"):
        is_correct("Answer: 2", "two")
    with pytest.raises(TypeError, match="answer must be a str, got int"):
        is_correct("Answer: 2", 2)
    with pytest.raises(TypeError, match="extract_answer expects a str, got bytes"):
        is_correct(b"Answer: 2", "2")


def test_make_curriculum_is_disjoint_and_pairs_modes():
    curriculum = make_curriculum(seed=7, n_train=203, n_eval=41)
    assert isinstance(curriculum, Curriculum)
    assert curriculum == make_curriculum(seed=7, n_train=203, n_eval=41)
    assert len(curriculum.train_reasoning) == len(curriculum.train_fast) == 203
    assert len(curriculum.eval_problems) == 41
    train_ids = [ex.id.removesuffix("/r") for ex in curriculum.train_reasoning]
    assert train_ids == [ex.id.removesuffix("/f") for ex in curriculum.train_fast]
    assert all(ex.mode == "reasoning" for ex in curriculum.train_reasoning)
    assert all(ex.mode == "fast" for ex in curriculum.train_fast)
    for r, f in zip(curriculum.train_reasoning, curriculum.train_fast, strict=True):
        assert (r.answer, r.difficulty) == (f.answer, f.difficulty)
        assert r.messages[0].content + f" {FAST_MODE_MARKER}" == f.messages[0].content
    # Disjoint by question (the id embeds the question), over the default four levels.
    eval_questions = {p.question for p in curriculum.eval_problems}
    train_questions = {i.split("-", 2)[2] for i in train_ids}
    assert len(train_questions) == 203
    assert not eval_questions & train_questions
    assert {p.difficulty for p in curriculum.eval_problems} == {1, 2, 3, 4}
    # The held-out set does not move when the training set grows.
    bigger = make_curriculum(seed=7, n_train=400, n_eval=41)
    assert bigger.eval_problems == curriculum.eval_problems


def test_curriculum_eval_examples():
    curriculum = make_curriculum(seed=1, n_train=10, n_eval=9, max_difficulty=3)
    reasoning = curriculum.eval_examples("reasoning")
    fast = curriculum.eval_examples("fast")
    assert reasoning == [reasoning_example(p) for p in curriculum.eval_problems]
    assert fast == [fast_example(p) for p in curriculum.eval_problems]
    with pytest.raises(ValueError, match="mode must be 'reasoning' or 'fast', got 'slow'"):
        curriculum.eval_examples("slow")
    with pytest.raises(ValueError, match="n_eval must be at least 1, got 0"):
        make_curriculum(seed=1, n_train=10, n_eval=0)
    with pytest.raises(ValueError, match="n_train must be at least 1, got 0"):
        make_curriculum(seed=1, n_train=0, n_eval=3)


def test_write_curriculum_round_trips(tmp_path: Path):
    curriculum = make_curriculum(seed=2, n_train=23, n_eval=6)
    directory = tmp_path / "new" / "demo"
    paths = write_curriculum(directory, curriculum)
    expected = {
        "train_reasoning": curriculum.train_reasoning,
        "train_fast": curriculum.train_fast,
        "eval_reasoning": curriculum.eval_examples("reasoning"),
        "eval_fast": curriculum.eval_examples("fast"),
    }
    assert set(paths) == set(expected)
    for name, examples in expected.items():
        assert paths[name] == directory / f"{name}.jsonl"
        assert read_jsonl(paths[name]) == examples
    # Atomic writes leave no temporary files behind; rewriting replaces the files.
    assert sorted(p.name for p in directory.iterdir()) == sorted(f"{n}.jsonl" for n in expected)
    smaller = make_curriculum(seed=3, n_train=5, n_eval=2)
    write_curriculum(str(directory), smaller)
    assert read_jsonl(paths["train_fast"]) == smaller.train_fast
    with pytest.raises(TypeError, match="curriculum must be a Curriculum, got list"):
        write_curriculum(tmp_path, curriculum.train_fast)


def rendered_length(example) -> int:
    return len(tokenize_example(example, TOKENIZER, TEMPLATE))


def test_rendered_sequences_stay_under_the_documented_length(all_levels):
    longest = max(
        rendered_length(make(p)) for p in all_levels for make in (reasoning_example, fast_example)
    )
    assert longest <= MAX_SEQUENCE_TOKENS
    # The documented worst case: the largest products and numbers at level 5. Written out by
    # hand (not generated), so the bound is checked against the extreme, not a sample.
    worst = Problem(
        "worst",
        "99*9+99*9+99",
        1881,
        5,
        ("99*9=891", "99*9=891", "891+891=1782", "1782+99=1881"),
    )
    check_worked_solution(worst)
    assert rendered_length(reasoning_example(worst)) == MAX_SEQUENCE_TOKENS
    assert rendered_length(fast_example(worst)) < MAX_SEQUENCE_TOKENS


def test_loss_mask_covers_the_assistant_part_only(all_levels):
    end = TOKENIZER.token_id("<|end|>")
    for p in all_levels[:200]:
        for example in (reasoning_example(p), fast_example(p)):
            tokenized = tokenize_example(example, TOKENIZER, TEMPLATE)
            supervised = [
                t for t, s in zip(tokenized.input_ids, tokenized.supervised, strict=True) if s
            ]
            # Exactly the response and the end token closing it; the mask is one suffix.
            assert supervised == [*TOKENIZER.encode(example.response), end]
            first = tokenized.supervised.index(True)
            assert all(tokenized.supervised[first:])
            prompt = TOKENIZER.decode(tokenized.input_ids[:first])
            assert prompt.endswith("<|assistant|>") and p.question in prompt


def test_max_operand_bounds_every_number_and_level_1_capacity():
    from pangu_fastkd.data.demo_curriculum import make_curriculum, make_problems

    problems = make_problems(120, seed=4, max_difficulty=4, max_operand=12)
    for p in problems:
        numbers = [int(n) for n in re.findall(r"[0-9]+", p.question)]
        assert max(numbers) <= 12, p.question
    with pytest.raises(ValueError, match="level 1 has only 222 distinct questions"):
        make_problems(1000, seed=0, max_difficulty=1, max_operand=12)
    with pytest.raises(ValueError, match="max_operand"):
        make_problems(4, seed=0, max_operand=100)
    curriculum = make_curriculum(seed=1, n_train=40, n_eval=8, max_operand=9)
    assert all(
        max(map(int, re.findall(r"[0-9]+", p.question))) <= 9 for p in curriculum.eval_problems
    )


def test_min_difficulty_leaves_out_the_easy_levels():
    problems = make_problems(51, seed=3, max_difficulty=4, min_difficulty=2)
    counts = Counter(p.difficulty for p in problems)
    assert counts == {2: 17, 3: 17, 4: 17}
    # Level 2 alone at operands up to 20 holds enough questions for a 1,000-problem eval set
    # beside 10,000 training problems, which level 1 (610 questions) could not.
    curriculum = make_curriculum(
        seed=0, n_train=10_000, n_eval=1000, max_difficulty=2, min_difficulty=2, max_operand=20
    )
    assert {p.difficulty for p in curriculum.eval_problems} == {2}
    eval_questions = {p.question for p in curriculum.eval_problems}
    assert len(eval_questions) == 1000
    assert not eval_questions & {ex.id.split("-", 2)[2][:-2] for ex in curriculum.train_fast}
    with pytest.raises(ValueError, match=r"min_difficulty \(3\) must be at most max_difficulty"):
        make_problems(4, seed=0, max_difficulty=2, min_difficulty=3)
    with pytest.raises(ValueError, match="min_difficulty must be at least 1"):
        make_problems(4, seed=0, min_difficulty=0)
