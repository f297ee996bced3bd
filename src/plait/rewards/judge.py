"""A language model as the judge of each completion (a generative reward model).

``reward.functions: [{judge: PATH, template: FILE, parse: number}]``: each prompt and
completion are written into the template (``{prompt}`` and ``{completion}`` mark where),
the judge model at PATH answers greedily through plait's engine, a whole batch (a
streamed group, or the step's batch) at once, and a score is read from its answer:
``parse: number`` takes the first number in it, any other value is a regular expression
whose first group is the number (``"Score: (\\d+)"``). An answer with no score is a failure
of that sample, handled as reward.on_error says (stop naming it, or the fallback reward).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from plait.rewards.loading import RewardLoadError

__all__ = ["DEFAULT_TEMPLATE", "JudgeReward", "parse_score"]

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = ("Rate how well the response answers the request, from 0 (useless) to 10 "
                    "(perfect). Reply with the number only.\n\nRequest:\n{prompt}\n\n"
                    "Response:\n{completion}\n\nScore:")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def read_template(template: str | None, key: str = "judge template") -> str:
    """The template text: the file ``template`` names, or :data:`DEFAULT_TEMPLATE`;
    it must mark where the completion goes."""
    if template is None:
        return DEFAULT_TEMPLATE
    path = Path(template)
    if not path.is_file():
        raise RewardLoadError(f"{key}: template file {template!r} not found; give a text file "
                              "with {prompt} and {completion} where they go")
    text = path.read_text()
    if "{completion}" not in text:
        raise RewardLoadError(f"{key}: template {template!r} has no {{completion}}: the "
                              "judge would not see what it judges")
    return text


def compile_parse(parse: str, key: str = "judge parse") -> re.Pattern:
    """The pattern ``parse`` names (``number``, or a regular expression with one group)."""
    if parse == "number":
        return _NUMBER
    try:
        pattern = re.compile(parse)
    except re.error as err:
        raise RewardLoadError(f"{key}: {parse!r} is not a regular expression ({err})") from None
    if pattern.groups < 1:
        raise RewardLoadError(f"{key}: {parse!r} needs a group around the score, e.g. "
                              "'Score: (\\d+)'")
    return pattern


def parse_score(text: str, pattern: re.Pattern) -> float:
    """The score in a judge's answer, NaN when there is none."""
    match = pattern.search(text)
    if match is None:
        return math.nan
    try:
        return float(match.group(1) if pattern.groups else match.group(0))
    except (TypeError, ValueError):
        return math.nan


class JudgeReward:
    """Scores ``(prompt, completion)`` pairs by a judge model's answers.

    Args:
        generate: token ids of each judge prompt -> the judge's greedy answer to each
            (plait's engine on the judge model, built by the caller).
        encode_prompt: judge prompt text -> token ids (its chat template as
            model.chat_template says).
        template: the judge prompt, with ``{prompt}`` and ``{completion}`` placeholders.
        parse: ``number`` or a regular expression whose first group is the score.
        name: the reward's name in metrics.
    """

    def __init__(self, generate: Callable[[list[list[int]]], list[str]],
                 encode_prompt: Callable[[str], list[int]], *, template: str = DEFAULT_TEMPLATE,
                 parse: str = "number", name: str = "judge"):
        self.generate, self.encode_prompt = generate, encode_prompt
        self.template = template
        self.pattern = compile_parse(parse)
        self.__name__ = name
        self.answers: list[str] = []  # the judge's last answers, for inspection
        self._warned = False

    def prompt(self, prompt, completion: str) -> str:
        """The judge's prompt for one completion."""
        return self.template.replace("{prompt}", str(prompt)).replace("{completion}",
                                                                      completion)

    def __call__(self, prompts: Sequence, completions: Sequence[str], **fields) -> list[float]:
        """One score per completion; NaN (a failure of that sample) where the judge's
        answer holds none."""
        texts = [self.prompt(p, c) for p, c in zip(prompts, completions, strict=True)]
        self.answers = self.generate([self.encode_prompt(text) for text in texts])
        scores = [parse_score(answer, self.pattern) for answer in self.answers]
        missing = [i for i, score in enumerate(scores) if math.isnan(score)]
        if missing and not self._warned:
            self._warned = True
            logger.warning("the judge's answer %r holds no score (%d of %d in this batch); "
                           "reward.on_error decides what such samples get",
                           self.answers[missing[0]][:200], len(missing), len(scores))
        return scores
