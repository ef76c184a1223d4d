"""The demo's embedded arithmetic curriculum: graded problems, reasoning and fast answers.

``python -m pangu_fastkd.train`` needs data that is generated, not downloaded, short enough for
byte-level models of 2-6 layers to train on in minutes, and hard enough that a small student
does not saturate. Integer expressions fit: correctness is checkable exactly, and a worked
solution helps in the same way the paper's reasoning traces do, by splitting one hard
prediction into several easy ones.

A problem is an expression over ``+``, ``-`` and ``*`` with the usual precedence. Its worked
steps multiply first (left to right), then add and subtract left to right, each step one binary
operation that carries the previous result::

    question  23+4*7-9
    steps     4*7=28 / 23+28=51 / 51-9=42
    answer    42

Levels (operands are 1..99; a factor of a product is a digit 2..9, on either side)::

    level  shape                              operands  steps  example
    1      a±b                                2         1      58-23
    2      a±b±c                              3         2      12+75-31
    3      one product and one number         3         2      23+4*7, 8*64-97
    4      one product and two numbers        4         3      23+4*7-9
    5      two products and one number        5         4      7*12+45-3*8

Level 1 is one carry-propagating operation, which a small model can answer directly; from
level 2 on a direct ("fast") answer has to do two or more operations, and products of two-digit
numbers, in one go, which the worked steps do one at a time. That gap is what makes "SFT only"
and "SFT + KD" schedules of a fast-answering student differ. Every intermediate result is
non-negative (a subtraction is drawn only where it keeps the running value >= 0; otherwise the
operator is ``+``), so signs never have to be learned. Level 1 has 14,751 distinct questions;
the other levels have hundreds of thousands or more.

Rendered lengths (``ByteTokenizer``, ``default_template``: one token per character plus 5
special tokens) are at most ``MAX_SEQUENCE_TOKENS`` = 82 for every level, reasoning or fast:
the worst case is level 5's ``99*9+99*9+99`` as a reasoning example (the longest at the default
``max_difficulty=4`` is 68, ``99*9+99+99``). The teacher's label-conditioned context
(``pangu_fastkd.scoring``) adds about 32 tokens.

Prompts: ``"Compute 23+4*7-9."`` asks for a reasoning answer (the steps, one per line, then
``"Answer: 42"``); the same prompt followed by ``" /no_think"`` (openPangu-Embedded's fast-mode
switch) asks for the direct answer ``"Answer: 42"``. The marker lets one model be evaluated in
both modes after every stage of the demo.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from .records import Example, Message, write_jsonl

__all__ = [
    "FAST_MODE_MARKER",
    "MAX_DIFFICULTY",
    "MAX_SEQUENCE_TOKENS",
    "Curriculum",
    "Problem",
    "extract_answer",
    "fast_example",
    "is_correct",
    "make_curriculum",
    "make_problems",
    "reasoning_example",
    "write_curriculum",
]

MAX_DIFFICULTY = 5
MAX_SEQUENCE_TOKENS = 82
FAST_MODE_MARKER = "/no_think"

# Level -> (terms of the sum, how many of them are products). A product is two operands.
_LEVEL_SHAPES: dict[int, tuple[int, int]] = {1: (2, 0), 2: (3, 0), 3: (2, 1), 4: (3, 1), 5: (3, 2)}
_MAX_OPERAND = 99  # the default largest operand; make_problems(max_operand=...) lowers it
_MIN_FACTOR, _MAX_FACTOR = 2, 9


def _level_1_questions(max_operand: int) -> int:
    """Distinct level-1 questions: a+b for all pairs, a-b for b <= a."""
    return max_operand * max_operand + max_operand * (max_operand + 1) // 2


_LEVEL_1_QUESTIONS = _level_1_questions(_MAX_OPERAND)
# A level whose fresh questions run out shows as a long run of duplicate draws; stop there
# with an error instead of spinning.
_MAX_CONSECUTIVE_REJECTS = 100_000

_QUESTION = re.compile(r"[0-9]+(?:[-+*][0-9]+)*")
_TOKEN = re.compile(r"[0-9]+|[-+*]")
_ANSWER_TAIL = re.compile(r"Answer:\s*([-+]?)([0-9]+)[ \t\r\f\v]*(?:\n|$)")
_INTEGER = re.compile(r"\s*([-+]?)([0-9]+)\s*")
_ANSWER_KEY = "Answer:"


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem.

    Attributes:
        id: unique across every problem set: ``"arith-d<difficulty>-<question>"``.
        question: the expression, e.g. ``"12+7-5"``.
        answer: its value.
        difficulty: 1 (easiest) .. ``MAX_DIFFICULTY``.
        steps: the worked steps, one binary operation each, e.g. ``("12+7=19", "19-5=14")``.
    """

    id: str
    question: str
    answer: int
    difficulty: int
    steps: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"problem id must be a non-empty str, got {self.id!r}")
        if not isinstance(self.question, str) or not _QUESTION.fullmatch(self.question):
            raise ValueError(
                f"problem {self.id!r}: question must be integers joined by +, - or *, "
                f"got {self.question!r}"
            )
        if isinstance(self.answer, bool) or not isinstance(self.answer, int):
            raise TypeError(
                f"problem {self.id!r}: answer must be an int, got {type(self.answer).__name__}"
            )
        if (
            isinstance(self.difficulty, bool)
            or not isinstance(self.difficulty, int)
            or not 1 <= self.difficulty <= MAX_DIFFICULTY
        ):
            raise ValueError(
                f"problem {self.id!r}: difficulty must be an int in 1..{MAX_DIFFICULTY}, "
                f"got {self.difficulty!r}"
            )
        if not isinstance(self.steps, tuple) or not all(isinstance(s, str) for s in self.steps):
            raise TypeError(f"problem {self.id!r}: steps must be a tuple of str")


def make_problems(
    n: int,
    *,
    seed: int,
    max_difficulty: int = 4,
    exclude: Collection[str] = (),
    max_operand: int = _MAX_OPERAND,
    min_difficulty: int = 1,
) -> list[Problem]:
    """``n`` distinct problems of levels ``min_difficulty``..``max_difficulty``, in a seeded
    random order.

    Args:
        n: how many problems (>= 0). With L levels, each gets ``n // L``, and the first
            ``n % L`` levels one more.
        seed: the same arguments give the same problems.
        max_difficulty: the hardest level, 1..``MAX_DIFFICULTY``.
        min_difficulty: the easiest level, 1..``max_difficulty`` (level 1 has few distinct
            questions at small operands; leaving it out frees the eval set from it).
        exclude: questions never to produce (e.g. the held-out eval questions).
        max_operand: the largest number in a question (2..99; products' digit factor stays
            2..9). Small operands make every step a fact a small model can learn, so the gap
            between writing the steps and answering at once is what remains hard.

    Returns:
        The problems, levels interleaved (any prefix is roughly balanced too).

    Raises:
        ValueError: bad arguments, or a level that has run out of fresh questions.
    """
    _check_int("n", n, minimum=0)
    _check_int("seed", seed)
    _check_int("max_difficulty", max_difficulty, minimum=1)
    if max_difficulty > MAX_DIFFICULTY:
        raise ValueError(
            f"max_difficulty must be at most {MAX_DIFFICULTY} (the levels this curriculum "
            f"defines), got {max_difficulty}"
        )
    _check_int("min_difficulty", min_difficulty, minimum=1)
    if min_difficulty > max_difficulty:
        raise ValueError(
            f"min_difficulty ({min_difficulty}) must be at most max_difficulty ({max_difficulty})"
        )
    _check_int("max_operand", max_operand, minimum=2)
    if max_operand > _MAX_OPERAND:
        raise ValueError(f"max_operand must be at most {_MAX_OPERAND}, got {max_operand}")
    if isinstance(exclude, str):
        raise TypeError("exclude must be a collection of question strings, not one str")
    excluded = frozenset(exclude)

    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[Problem] = []
    n_levels = max_difficulty - min_difficulty + 1
    for index, level in enumerate(range(min_difficulty, max_difficulty + 1)):
        quota = n // n_levels + (1 if index < n % n_levels else 0)
        capacity = _level_1_questions(max_operand)
        if level == 1 and quota > capacity:
            raise ValueError(
                f"level 1 has only {capacity} distinct questions but n={n} asks for "
                f"{quota}; ask for fewer problems or raise max_difficulty"
            )
        made = rejected = 0
        while made < quota:
            question = _draw_question(rng, level, max_operand)
            if question in seen or question in excluded:
                rejected += 1
                if rejected > _MAX_CONSECUTIVE_REJECTS:
                    raise ValueError(
                        f"level {level} ran out of fresh questions after {made} of {quota} "
                        f"({rejected} duplicate or excluded draws in a row); ask for fewer "
                        "problems or exclude fewer questions"
                    )
                continue
            rejected = 0
            seen.add(question)
            steps, answer = _solve(question)
            problems.append(Problem(f"arith-d{level}-{question}", question, answer, level, steps))
            made += 1
    rng.shuffle(problems)
    return problems


def _draw_question(rng: random.Random, level: int, max_operand: int = _MAX_OPERAND) -> str:
    """A random expression of ``level`` whose running value never goes below zero."""
    n_terms, n_products = _LEVEL_SHAPES[level]
    product_at = set(rng.sample(range(n_terms), n_products))
    text = ""
    running = 0
    for i in range(n_terms):
        is_product = i in product_at
        subtract = i > 0 and rng.random() < 0.5
        if subtract and not _fits_under(running, is_product):
            subtract = False
        limit = running if subtract else None
        term_text, value = (
            _draw_product(rng, limit, max_operand)
            if is_product
            else _draw_number(rng, limit, max_operand)
        )
        if i > 0:
            text += "-" if subtract else "+"
        text += term_text
        running += -value if subtract else value
    return text


def _fits_under(limit: int, is_product: bool) -> bool:
    """Whether some term of this kind has a value of at most ``limit``."""
    return limit >= (_MIN_FACTOR * 2 if is_product else 1)


def _draw_number(
    rng: random.Random, limit: int | None, max_operand: int = _MAX_OPERAND
) -> tuple[str, int]:
    value = rng.randint(1, max_operand if limit is None else min(max_operand, limit))
    return str(value), value


def _draw_product(
    rng: random.Random, limit: int | None, max_operand: int = _MAX_OPERAND
) -> tuple[str, int]:
    """``"b*d"`` or ``"d*b"``: a digit factor d in 2..9 and b in 2..99, product <= limit."""
    if limit is None:
        digit = rng.randint(_MIN_FACTOR, _MAX_FACTOR)
        other = rng.randint(2, max_operand)
    else:
        # The digit first, among those leaving room for b >= 2; then b under the limit.
        digit = rng.randint(_MIN_FACTOR, min(_MAX_FACTOR, limit // 2))
        other = rng.randint(2, min(max_operand, limit // digit))
    left, right = (digit, other) if rng.random() < 0.5 else (other, digit)
    return f"{left}*{right}", left * right


def _solve(question: str) -> tuple[tuple[str, ...], int]:
    """The worked steps and value of ``question``: products first, then sums left to right."""
    tokens = _TOKEN.findall(question)
    steps: list[str] = []
    while "*" in tokens:
        i = tokens.index("*")
        value = int(tokens[i - 1]) * int(tokens[i + 1])
        steps.append(f"{tokens[i - 1]}*{tokens[i + 1]}={value}")
        tokens[i - 1 : i + 2] = [str(value)]
    while len(tokens) > 1:
        left, op, right = int(tokens[0]), tokens[1], int(tokens[2])
        value = left + right if op == "+" else left - right
        steps.append(f"{left}{op}{right}={value}")
        tokens[:3] = [str(value)]
    return tuple(steps), int(tokens[0])


def _user_prompt(problem: Problem, mode: str) -> str:
    prompt = f"Compute {problem.question}."
    return prompt if mode == "reasoning" else f"{prompt} {FAST_MODE_MARKER}"


def _check_problem(problem: Problem) -> None:
    if not isinstance(problem, Problem):
        raise TypeError(f"expected a Problem, got {type(problem).__name__}")


def reasoning_example(p: Problem) -> Example:
    """The worked-solution example of ``p``.

    The user asks ``"Compute <question>."``; the assistant writes the steps, one per line,
    then ``"Answer: <answer>"``. Id ``"<p.id>/r"``, mode ``"reasoning"``.
    """
    _check_problem(p)
    response = "\n".join([*p.steps, f"{_ANSWER_KEY} {p.answer}"])
    return Example(
        id=f"{p.id}/r",
        messages=(
            Message("user", _user_prompt(p, "reasoning")),
            Message("assistant", response),
        ),
        mode="reasoning",
        difficulty=float(p.difficulty),
        answer=str(p.answer),
    )


def fast_example(p: Problem) -> Example:
    """The direct-answer example of ``p``.

    The user asks ``"Compute <question>. /no_think"``; the assistant answers
    ``"Answer: <answer>"`` only. Id ``"<p.id>/f"``, mode ``"fast"``.
    """
    _check_problem(p)
    return Example(
        id=f"{p.id}/f",
        messages=(
            Message("user", _user_prompt(p, "fast")),
            Message("assistant", f"{_ANSWER_KEY} {p.answer}"),
        ),
        mode="fast",
        difficulty=float(p.difficulty),
        answer=str(p.answer),
    )


def extract_answer(text: str) -> str | None:
    """The integer after the last ``"Answer:"`` in ``text``, in canonical form.

    Whitespace (newlines included) may separate ``"Answer:"`` from the integer; after it, only
    spaces or tabs may follow up to the end of that line. The match is case-sensitive. The
    last ``"Answer:"`` decides even when it is malformed and an earlier one is not: a response
    that ends on garbage is wrong.

    Returns:
        The integer as ``str(int(...))`` (``"+007"`` -> ``"7"``, ``"-0"`` -> ``"0"``), or None
        when there is no ``"Answer:"`` or the last one is not followed by an integer alone.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects a str, got {type(text).__name__}")
    start = text.rfind(_ANSWER_KEY)
    if start < 0:
        return None
    match = _ANSWER_TAIL.match(text, start)
    return None if match is None else _canonical_integer(match.group(1), match.group(2))


def _canonical_integer(sign: str, digits: str) -> str:
    # Not int(): Python refuses to parse integers of more than 4300 digits.
    digits = digits.lstrip("0") or "0"
    return f"-{digits}" if sign == "-" and digits != "0" else digits


def is_correct(generated: str, answer: str) -> bool:
    """Whether ``extract_answer(generated)`` is the integer ``answer`` (e.g. ``"14"``, ``"-3"``).

    Raises:
        TypeError: ``generated`` or ``answer`` is not a str.
        ValueError: ``answer`` is not an integer.
    """
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    reference = _INTEGER.fullmatch(answer)
    if reference is None:
        raise ValueError(f"answer must be an integer such as '14' or '-3', got {answer!r}")
    extracted = extract_answer(generated)
    return extracted == _canonical_integer(reference.group(1), reference.group(2))


@dataclass(frozen=True)
class Curriculum:
    """The demo's data.

    Attributes:
        train_reasoning: one reasoning example per training problem.
        train_fast: one fast example per training problem, in the same order.
        eval_problems: held-out problems; no question is also a training question.
    """

    train_reasoning: list[Example]
    train_fast: list[Example]
    eval_problems: list[Problem]

    def eval_examples(self, mode: str) -> list[Example]:
        """The eval problems as ``"reasoning"`` or ``"fast"`` examples (with reference answers)."""
        if mode == "reasoning":
            return [reasoning_example(p) for p in self.eval_problems]
        if mode == "fast":
            return [fast_example(p) for p in self.eval_problems]
        raise ValueError(f"mode must be 'reasoning' or 'fast', got {mode!r}")


def make_curriculum(
    *,
    seed: int,
    n_train: int,
    n_eval: int,
    max_difficulty: int = 4,
    max_operand: int = 99,
    min_difficulty: int = 1,
) -> Curriculum:
    """Training and held-out problems of levels ``min_difficulty``..``max_difficulty``,
    balanced across levels.

    The eval problems come from seed ``2 * seed + 1`` and do not depend on ``n_train``; the
    training problems come from seed ``2 * seed`` with the eval questions excluded. The
    reasoning and fast training sets hold the same problems in the same order.

    Args:
        seed: any int; the same arguments give the same curriculum.
        n_train, n_eval: numbers of problems (>= 1 each).
        max_difficulty: the hardest level, 1..``MAX_DIFFICULTY``.
        max_operand: the largest number in a question (see ``make_problems``).
        min_difficulty: the easiest level (see ``make_problems``).
    """
    _check_int("seed", seed)
    _check_int("n_train", n_train, minimum=1)
    _check_int("n_eval", n_eval, minimum=1)
    levels = dict(
        max_difficulty=max_difficulty, max_operand=max_operand, min_difficulty=min_difficulty
    )
    eval_problems = make_problems(n_eval, seed=2 * seed + 1, **levels)
    train_problems = make_problems(
        n_train, seed=2 * seed, exclude={p.question for p in eval_problems}, **levels
    )
    return Curriculum(
        train_reasoning=[reasoning_example(p) for p in train_problems],
        train_fast=[fast_example(p) for p in train_problems],
        eval_problems=eval_problems,
    )


def write_curriculum(directory: str | Path, curriculum: Curriculum) -> dict[str, Path]:
    """Write the curriculum as four JSONL files (atomically, with ``write_jsonl``).

    Args:
        directory: created when missing.
        curriculum: from ``make_curriculum``.

    Returns:
        ``{"train_reasoning", "train_fast", "eval_reasoning", "eval_fast"}`` -> the path of
        ``<directory>/<name>.jsonl``. The eval files hold the reference responses too, so
        ``read_jsonl`` reads all four with its defaults.
    """
    if not isinstance(curriculum, Curriculum):
        raise TypeError(f"curriculum must be a Curriculum, got {type(curriculum).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    contents = {
        "train_reasoning": curriculum.train_reasoning,
        "train_fast": curriculum.train_fast,
        "eval_reasoning": curriculum.eval_examples("reasoning"),
        "eval_fast": curriculum.eval_examples("fast"),
    }
    paths = {}
    for name, examples in contents.items():
        paths[name] = directory / f"{name}.jsonl"
        write_jsonl(paths[name], examples)
    return paths


def _check_int(name: str, value: object, *, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
