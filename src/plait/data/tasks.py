"""Built-in synthetic tasks with verifiable answers.

A task generates prompt rows (``{"prompt": str, "answer": str}``) and scores a
completion against the answer (1 or 0; the ``reverse`` task gives partial credit, its
hidden "true quality", and also makes preference pairs; so does ``mixed``, three such
sub-tasks whose pairs differ in label noise). The prompts are short plain strings (no chat
template; the trainer adds one) written in a ~40-character alphabet,
:data:`CHAR_VOCAB`, so a tiny character-level model can learn them on a CPU.

Train and test problems never overlap: a problem's split is a pure function of
a hash of its prompt (see :meth:`Task.split_of`), and ``make_rows`` only draws
problems of the requested split. Rows are drawn i.i.d. (with replacement), so a
large ``n`` over a small problem space repeats problems.

A completion is read up to the first end marker (:attr:`Task.stop_strings`,
a newline) and compared after stripping whitespace, so ``"122\\n37+1=38"`` and
``"122 "`` both answer ``"37+85="`` correctly.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import random
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from plait.data.datasets import DataError

__all__ = [
    "CHAR_VOCAB",
    "SPLITS",
    "TASKS",
    "AdditionTask",
    "MixedTask",
    "RepeatTask",
    "ReverseTask",
    "Task",
    "make_task",
]

#: Every character a built-in task can put in a prompt or an answer, plus the
#: space and the newline end marker. Its order is fixed so that a character
#: tokenizer built from it gives stable token ids.
CHAR_VOCAB: str = string.digits + "+=*" + string.ascii_lowercase + " \n"

#: The splits ``Task.make_rows`` accepts.
SPLITS: tuple[str, ...] = ("train", "test")

# Rejection sampling gives up after this many draws per requested row (plus a
# constant), which only happens when a split holds (almost) no problems.
_DRAWS_PER_ROW = 1_000
_MIN_DRAWS = 100_000


@dataclass(frozen=True)
class Task(ABC):
    """A generator of verifiable prompt/answer rows.

    Subclasses set ``name`` and implement :meth:`sample_problem` and
    :attr:`max_answer_chars`; splitting, row generation and verification are
    shared.

    Args:
        test_fraction: share of the problem space held out as the "test"
            split (keyword-only, default 0.2).
    """

    name: ClassVar[str] = ""
    #: (lowest, highest) reward ``verify`` can return.
    reward_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    #: Strings that end an answer; generation may stop at any of them.
    stop_strings: ClassVar[tuple[str, ...]] = ("\n",)

    test_fraction: float = field(default=0.2, kw_only=True)

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise DataError(
                f"{type(self).__name__}: test_fraction must be strictly between 0 and 1, "
                f"got {self.test_fraction!r}"
            )

    @abstractmethod
    def sample_problem(self, rng: random.Random) -> tuple[str, str]:
        """Draw one problem from ``rng`` and return ``(prompt, answer)``."""

    @property
    @abstractmethod
    def max_answer_chars(self) -> int:
        """Upper bound on ``len(answer)``, for sizing generation."""

    @property
    @abstractmethod
    def max_prompt_chars(self) -> int:
        """Upper bound on ``len(prompt)``."""

    def split_of(self, prompt: str) -> str:
        """Return ``"test"`` or ``"train"``: a fixed function of the prompt's hash."""
        digest = hashlib.blake2b(f"{self.name}:{prompt}".encode(), digest_size=8).digest()
        position = int.from_bytes(digest, "big") / 2**64
        return "test" if position < self.test_fraction else "train"

    def make_rows(self, n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
        """Return ``n`` rows ``{"prompt", "answer"}`` of ``split``.

        The result is a pure function of the task's settings, ``seed`` and
        ``split``; problems of the other split never appear.
        """
        if split not in SPLITS:
            raise DataError(f"{self.name} task: unknown split {split!r}; use one of {SPLITS}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise DataError(f"{self.name} task: n must be a non-negative int, got {n!r}")
        rng = random.Random(f"plait-task:{self!r}:{seed}:{split}")
        rows: list[dict[str, Any]] = []
        for _ in range(n * _DRAWS_PER_ROW + _MIN_DRAWS):
            if len(rows) == n:
                return rows
            prompt, answer = self.sample_problem(rng)
            if self.split_of(prompt) == split:
                rows.append({"prompt": prompt, "answer": answer})
        if len(rows) == n:
            return rows
        raise RuntimeError(
            f"{self!r}: found only {len(rows)} of {n} {split!r} problems; the problem space "
            f"is too small for this split. Widen the task's settings or change test_fraction."
        )

    def extract_answer(self, completion: str) -> str:
        """Return the completion's text before the first end marker, stripped."""
        for marker in self.stop_strings:
            completion = completion.split(marker, 1)[0]
        return completion.strip()

    def verify(self, completion: str, answer: str) -> float:
        """Return 1.0 if ``completion`` states ``answer``, else 0.0."""
        return 1.0 if self.extract_answer(completion) == str(answer).strip() else 0.0


def _check_bounds(task: Task, low: str, high: str) -> None:
    """Both settings positive ints, the first no larger than the second."""
    name = type(task).__name__
    for label in (low, high):
        value = getattr(task, label)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{name}: {label} must be a positive int, got {value!r}")
    if getattr(task, low) > getattr(task, high):
        raise DataError(f"{name}: {low} ({getattr(task, low)}) is larger than "
                        f"{high} ({getattr(task, high)})")


@dataclass(frozen=True)
class AdditionTask(Task):
    """Add two non-negative integers: prompt ``"37+85="``, answer ``"122"``.

    Each operand first draws its digit count uniformly from ``1..digits``,
    then a value with exactly that many digits (0-9 for one digit), so short
    operands are as common as long ones.

    Args:
        digits: largest number of digits of an operand (1 to 18).
    """

    name: ClassVar[str] = "addition"

    digits: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.digits, bool) or not isinstance(self.digits, int):
            raise DataError(f"AdditionTask: digits must be an int, got {self.digits!r}")
        if not 1 <= self.digits <= 18:
            raise DataError(f"AdditionTask: digits must be between 1 and 18, got {self.digits}")

    def _operand(self, rng: random.Random) -> int:
        num_digits = rng.randint(1, self.digits)
        low = 0 if num_digits == 1 else 10 ** (num_digits - 1)
        return rng.randint(low, 10**num_digits - 1)

    def sample_problem(self, rng: random.Random) -> tuple[str, str]:
        left, right = self._operand(rng), self._operand(rng)
        return f"{left}+{right}=", str(left + right)

    @property
    def max_answer_chars(self) -> int:
        return self.digits + 1

    @property
    def max_prompt_chars(self) -> int:
        return 2 * self.digits + 2


@dataclass(frozen=True)
class RepeatTask(Task):
    """Repeat a letter: prompt ``"a*13="``, answer ``"aaaaaaaaaaaaa"``.

    The count is log-uniform on ``[min_count, max_count]``, so most answers
    are short and a few are long: a long-tailed generation workload.

    Args:
        min_count: smallest repeat count (at least 1).
        max_count: largest repeat count.
    """

    name: ClassVar[str] = "repeat"

    min_count: int = 1
    max_count: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bounds(self, "min_count", "max_count")

    def _count(self, rng: random.Random) -> int:
        log_count = rng.uniform(math.log(self.min_count), math.log(self.max_count + 1))
        return min(int(math.exp(log_count)), self.max_count)

    def sample_problem(self, rng: random.Random) -> tuple[str, str]:
        letter = rng.choice(string.ascii_lowercase)
        count = self._count(rng)
        return f"{letter}*{count}=", letter * count

    @property
    def max_answer_chars(self) -> int:
        return self.max_count

    @property
    def max_prompt_chars(self) -> int:
        return len(str(self.max_count)) + 3


@dataclass(frozen=True)
class ReverseTask(Task):
    """Reverse a word: prompt ``"abcd="``, answer ``"dcba"``, scored with partial credit.

    The preference task: its score is a hidden "true quality" of any response, the
    share of the answer's positions the response gets right over the longer of the two
    (1 only for the exact answer; missing and extra letters both cost). Preference pairs
    (:meth:`make_pairs`) are two edits of the answer ranked by that score, with a set
    share of labels flipped, so a reward model's accuracy against the truth, a policy's
    true score and reward over-optimisation can all be measured.

    Args:
        min_len, max_len: word lengths (uniform).
    """

    name: ClassVar[str] = "reverse"

    min_len: int = 3
    max_len: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bounds(self, "min_len", "max_len")

    def sample_problem(self, rng: random.Random) -> tuple[str, str]:
        word = "".join(rng.choice(string.ascii_lowercase)
                       for _ in range(rng.randint(self.min_len, self.max_len)))
        return f"{word}=", word[::-1]

    @property
    def max_answer_chars(self) -> int:
        return self.max_len

    @property
    def max_prompt_chars(self) -> int:
        return self.max_len + 1

    def verify(self, completion: str, answer: str) -> float:
        """The true quality: answer positions right over the longer length, in [0, 1]."""
        response, answer = self.extract_answer(completion), str(answer).strip()
        longest = max(len(response), len(answer))
        if longest == 0:
            return 1.0
        return sum(a == b for a, b in zip(response, answer, strict=False)) / longest

    def edit(self, answer: str, rng: random.Random, edits: int) -> str:
        """``answer`` after ``edits`` random edits: a letter changed, dropped, inserted
        or appended, or the tail cut."""
        text = list(answer)
        for _ in range(edits):
            kind = rng.choice(("change", "drop", "insert", "append", "cut"))
            where = rng.randrange(len(text)) if text else 0
            letter = rng.choice(string.ascii_lowercase)
            if kind == "change" and text:
                text[where] = letter
            elif kind == "drop" and len(text) > 1:
                del text[where]
            elif kind == "insert":
                text.insert(where, letter)
            elif kind == "append":
                text.append(letter)
            elif kind == "cut" and len(text) > 1:
                del text[max(1, where):]
        return "".join(text)

    def make_pairs(self, n: int, seed: int = 0, split: str = "train", *,
                   noise: float = 0.0, max_edits: int = 3) -> list[dict[str, Any]]:
        """``n`` preference pairs of ``split``: two responses (0 to ``max_edits`` edits of
        the answer) of different true score, the better one as ``chosen`` except on a
        ``noise`` share of pairs, whose labels are flipped. Each row keeps the truth:
        ``chosen_score``, ``rejected_score`` and ``flipped``."""
        if not 0.0 <= noise < 0.5:
            raise DataError(f"reverse task: noise must be in [0, 0.5), got {noise!r}")
        rng = random.Random(f"plait-pairs:{self!r}:{seed}:{split}:{noise}:{max_edits}")
        pairs = []
        for row in self.make_rows(n, seed=seed, split=split):
            answer = row["answer"]
            while True:
                first, second = (self.edit(answer, rng, rng.randint(0, max_edits))
                                 for _ in range(2))
                pair = self.rank_pair(row, first, second, rng, noise)
                if pair is not None:
                    break
            pairs.append(pair)
        return pairs

    def rank_pair(self, row: dict[str, Any], first: str, second: str, rng: random.Random,
                  noise: float = 0.0) -> dict[str, Any] | None:
        """Two responses to ``row``'s prompt as a preference pair ranked by the true
        score (the label flipped with probability ``noise``), with the truth kept; None
        when they score the same."""
        answer = row["answer"]
        scores = self.verify(first, answer), self.verify(second, answer)
        if scores[0] == scores[1]:
            return None
        better = 0 if scores[0] > scores[1] else 1
        flipped = rng.random() < noise
        chosen = better if not flipped else 1 - better
        responses = (first, second)
        return {"prompt": row["prompt"], "answer": answer,
                "chosen": responses[chosen], "rejected": responses[1 - chosen],
                "chosen_score": scores[chosen], "rejected_score": scores[1 - chosen],
                "flipped": flipped}


# the mixed task's sub-tasks: the character that ends a prompt, and the label-flip share
# unless set (an add prompt also ends with "=": its "+" tells it from reverse)
_MIXED = {"reverse": ("=", 0.0), "sort": ("<", 0.1), "add": ("=", 0.25), "copy": ("*", 0.1)}
_MIXED_DEFAULT = ("reverse", "sort", "add")


@dataclass(frozen=True)
class MixedTask(ReverseTask):
    """Preference sub-tasks in one, each row naming its own as ``source``: ``reverse``
    (``"abcd="`` -> ``"dcba"``), ``sort`` (``"dbca<"`` -> ``"abcd"``), ``add``
    (``"37+85="`` -> ``"122"``) and ``copy`` (``"abcd*"`` -> ``"abcd"``), those of
    ``sources`` drawn in equal shares and scored by the same hidden true quality as
    :class:`ReverseTask` (answer positions right over the longer length). Their pairs
    differ in how clear the preference is: each sub-task flips its own share of labels
    (``noise``, added to the one a caller asks for), so a reward model trained on them
    learns scores of a different spread, and offset, per sub-task: the setting in which
    an advantage model's per-prompt centring is measured. Sort and add ask a judge to
    compute the answer; reverse and copy only to compare positions, which a small
    reward model learns far more easily.

    Args:
        min_len, max_len: word lengths of reverse, sort and copy.
        digits: largest operand of add, in digits.
        sources: the sub-tasks drawn (default reverse, sort, add).
        noise: label-flip share per sub-task (sub-task -> share in [0, 0.5); defaults
            reverse 0, sort 0.1, add 0.25, copy 0.1).
    """

    name: ClassVar[str] = "mixed"
    SOURCES: ClassVar[tuple[str, ...]] = tuple(_MIXED)

    digits: int = 3
    sources: tuple = _MIXED_DEFAULT
    noise: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.digits, bool) or not isinstance(self.digits, int) or \
                not 1 <= self.digits <= 9:
            raise DataError(f"MixedTask: digits must be an int from 1 to 9, got {self.digits!r}")
        sources = self.sources
        if isinstance(sources, str) or not isinstance(sources, list | tuple) or not sources \
                or not set(sources) <= set(self.SOURCES) or len(set(sources)) < len(sources):
            raise DataError(f"MixedTask: sources must be a list of distinct sub-tasks from "
                            f"{list(self.SOURCES)}, got {sources!r}")
        object.__setattr__(self, "sources", tuple(sources))
        if not isinstance(self.noise, dict) or not set(self.noise) <= set(self.sources) or any(
                isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 0.5
                for v in self.noise.values()):
            raise DataError(f"MixedTask: noise must map some of {list(self.sources)} to a "
                            f"share in [0, 0.5), got {self.noise!r}")
        # sub-tasks not named keep their default share
        object.__setattr__(self, "noise", {**{s: _MIXED[s][1] for s in self.sources},
                                           **self.noise})

    def __repr__(self) -> str:  # the default sources unnamed: it seeds the rows drawn
        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr and
                 not (f.name == "sources" and self.sources == _MIXED_DEFAULT)]
        return f"{type(self).__name__}({', '.join(shown)})"

    def __hash__(self) -> int:  # the noise mapping is a dict
        return hash((self.min_len, self.max_len, self.digits, self.sources,
                     tuple(sorted(self.noise.items())), self.test_fraction))

    def sample_problem(self, rng: random.Random) -> tuple[str, str]:
        source = rng.choice(self.sources)
        if source == "add":
            left, right = (rng.randint(0, 10 ** rng.randint(1, self.digits) - 1)
                           for _ in range(2))
            return f"{left}+{right}=", str(left + right)
        word = "".join(rng.choice(string.ascii_lowercase)
                       for _ in range(rng.randint(self.min_len, self.max_len)))
        answer = {"sort": "".join(sorted(word)), "copy": word}.get(source, word[::-1])
        return f"{word}{_MIXED[source][0]}", answer

    @staticmethod
    def source_of(prompt: str) -> str:
        """The sub-task of one of this task's prompts."""
        if prompt.endswith("<"):
            return "sort"
        if prompt.endswith("*"):
            return "copy"
        return "add" if "+" in prompt else "reverse"

    @property
    def max_answer_chars(self) -> int:
        return max(self.max_len, self.digits + 1)

    @property
    def max_prompt_chars(self) -> int:
        return max(self.max_len, 2 * self.digits + 1) + 1

    def make_rows(self, n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
        """As :meth:`Task.make_rows`, each row with its sub-task as ``source``."""
        return [{**row, "source": self.source_of(row["prompt"])}
                for row in super().make_rows(n, seed=seed, split=split)]

    def edit(self, answer: str, rng: random.Random, edits: int) -> str:
        """As :meth:`ReverseTask.edit`, with digits for a number's answer."""
        if not answer.isdigit():
            return super().edit(answer, rng, edits)
        letters = {c: rng.choice(string.digits) for c in string.ascii_lowercase}
        return "".join(letters.get(c, c) for c in super().edit(answer, rng, edits))

    def rank_pair(self, row: dict[str, Any], first: str, second: str, rng: random.Random,
                  noise: float = 0.0) -> dict[str, Any] | None:
        """As :meth:`ReverseTask.rank_pair`, the row's sub-task's own label noise added
        to ``noise``; the pair keeps its ``source``."""
        source = row.get("source") or self.source_of(row["prompt"])
        pair = super().rank_pair(row, first, second, rng,
                                 min(0.49, noise + self.noise[source]))
        return pair if pair is None else {**pair, "source": source}


#: Built-in tasks by name.
TASKS: dict[str, type[Task]] = {"addition": AdditionTask, "repeat": RepeatTask,
                               "reverse": ReverseTask, "mixed": MixedTask}


def make_task(name: str, **kwargs: Any) -> Task:
    """Build the built-in task ``name`` with settings ``kwargs``.

    Raises:
        DataError: unknown task name (nearest name suggested), unknown
            setting (accepted settings listed) or invalid setting value.
    """
    task_class = TASKS.get(name)
    if task_class is None:
        nearest = difflib.get_close_matches(str(name), TASKS, n=1)
        hint = f" Did you mean {nearest[0]!r}?" if nearest else ""
        raise DataError(f"unknown task {name!r}; available tasks: {sorted(TASKS)}.{hint}")
    accepted = [f.name for f in fields(task_class) if f.init]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise DataError(f"task {name!r} has no setting(s) {unknown}; accepted settings: {accepted}")
    return task_class(**kwargs)
