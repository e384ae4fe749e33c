"""A sum whose chain of thought may add the terms in any order (the `sumorder` task).

    task = get_task("sumorder", terms=4, digits=2)
    ex = task.example(7)            # 41+12+42+24, cot 42+24=66+12=78+41=119, answer 119
    task.valid_cot(ex.question, "24+41=65+12=77+42=119")     # True: another valid order

Every order of the terms is a valid CoT, and a training example writes one drawn
uniformly from them, so that a model trained on it spreads its mass over
several CoTs: the regime where an unverified head can write a valid CoT that is
not the main model's greedy one. `valid_cot` says whether a CoT is a valid
derivation of a question, to count how often such CoTs are valid yet differ.

Registered in `tasks.TASKS` by `tasks.registry()`, which reads this module on
first use (it imports tasks.py).
"""

from __future__ import annotations

import collections
import random
import re

from mtcot_jax.data.tasks import Example, Task, _no_space, digit_share

_QUESTION = re.compile(r"\d+(?:\+\d+)+")
_COT = re.compile(r"(\d+)((?:\+\d+=\d+)*)")
_STEP = re.compile(r"\+(\d+)=(\d+)")


def _canonical(text: str) -> int | None:
  """The number `text` writes without leading zeros, else None."""
  return int(text) if text == str(int(text)) else None


class SumOrder(Task):
  """The sum of `terms` distinct `digits`-digit numbers, with running sums in any order.

  The question lists the terms; the CoT is a chain `x1+x2=s2+x3=s3...` where
  x1..xn are the question's terms in some order and each s is the running sum
  (the last one the answer); the answer is the sum. All n! orders are valid
  (the terms are distinct, so each order is a different CoT) and a training
  example's is drawn uniformly. Seeds `repeats * q` to `repeats * q + repeats - 1`
  share question q, each with its own order: the training data shows several
  CoTs for the same question.

  Example (terms=4, digits=2, seeds 0 to 3 of repeats=4):
      question  63+94+76+34
      cot       34+63=97+76=173+94=267      (seed 0: one of 24 valid CoTs)
                76+94=170+34=204+63=267     (seed 1: the same question, another)
      answer    267
  The grader compares integers (whitespace ignored), whatever the CoT was.
  """
  name = "sumorder"
  DIFFICULTY = {"terms": (4, 2, 8), "digits": (2, 1, 6), "repeats": (4, 1, 64)}

  def example(self, seed):
    """Question number seed // repeats, its terms added in an order drawn from `seed`."""
    seed, d = int(seed), self.difficulty
    lo = 10 ** (d["digits"] - 1)
    question_rng = random.Random(f"{self.name}/{self.config_name}/q{seed // d['repeats']}")
    terms = question_rng.sample(range(lo, 10 * lo), d["terms"])
    order = random.Random(f"{self.name}/{self.config_name}/{seed}").sample(terms, len(terms))
    return Example(question="+".join(map(str, terms)), cot=self.cot_for(order),
                   answer=str(sum(terms)))

  @staticmethod
  def cot_for(order: list[int]) -> str:
    """The CoT adding `order`'s numbers in that order: `x1+x2=s2+x3=s3...`."""
    total, steps = order[0], [str(order[0])]
    for x in order[1:]:
      total += x
      steps.append(f"+{x}={total}")
    return "".join(steps)

  @staticmethod
  def _terms(question: str) -> list[int]:
    text = _no_space(question)
    if not _QUESTION.fullmatch(text):
      raise ValueError(f"task 'sumorder': question={question!r} is not a sum; accepted: "
                       "numbers joined by '+', e.g. '12+57+30'")
    return [int(t) for t in text.split("+")]

  def valid_cot(self, question: str, cot: str) -> bool:
    """Whether `cot` (whitespace ignored) is a valid derivation of `question`'s sum:
    `x1+x2=s2+...+xn=sn` with x1..xn the question's terms in any order, each
    used once, every number written without leading zeros, and every s the
    running sum. Raises ValueError if `question` is not a sum."""
    terms = self._terms(question)
    m = _COT.fullmatch(_no_space(cot))
    if m is None:
      return False
    steps = [(m.group(1), None)] + _STEP.findall(m.group(2))
    order, total = [], 0
    for x_text, s_text in steps:
      x = _canonical(x_text)
      s = None if s_text is None else _canonical(s_text)
      if x is None or (s_text is not None and s is None):
        return False
      total += x
      if s is not None and s != total:
        return False
      order.append(x)
    return collections.Counter(order) == collections.Counter(terms)

  def reference(self, question):
    try:
      terms = self._terms(question)
    except ValueError:
      return None
    d, notes = self.difficulty, []
    if len(terms) != d["terms"]:
      notes.append(f"training used {d['terms']} terms")
    if any(len(str(t)) != d["digits"] for t in terms):
      notes.append(f"training used {d['digits']}-digit terms")
    if len(set(terms)) != len(terms):
      notes.append("a term repeats, which training never shows")
    return str(sum(terms)), "; ".join(notes)

  def grade(self, answer_text, example):
    text = _no_space(answer_text)
    return float(bool(re.fullmatch(r"\d+", text)) and int(text) == int(example.answer))

  def partial_credit(self, answer_text, example):
    """The share of the sum's digits that are right (`tasks.digit_share`)."""
    return digit_share(answer_text, example.answer)
