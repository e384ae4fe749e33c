"""Grade-school word problems in English, generated (the `wordprob` task), and
the grader of word-problem answers, `grade_first_number` (also the `jsonl`
task's, gsm8k_jsonl.py).

    task = get_task("wordprob", ops=3)     # 1 to 4 operations

Registered in `tasks.TASKS` by `tasks.registry()`, which reads this module on
first use (it imports tasks.py).
"""

from __future__ import annotations

import dataclasses
import re
from decimal import Decimal
from typing import NamedTuple

from mtcot_jax.data.tasks import Example, Task, _number

_NUMBER = re.compile(r"(-)?\$?(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(\.\d+)?")


def first_number(text: str) -> Decimal | None:
  """The first number in `text` ("-$1,234.50" is -1234.50; a period that no
  digit follows ends it), or None if there is none."""
  m = _NUMBER.search(text)
  if m is None:
    return None
  sign, digits, frac = m.groups()
  return Decimal((sign or "") + digits.replace(",", "") + (frac or ""))


def grade_first_number(answer_text: str, example: Example) -> float:
  """1.0 if the first number of `answer_text` ("Answer: $1,200." or "1200 apples"
  read as 1200) is the example's answer, else 0.0."""
  got, want = first_number(answer_text), _number(example.answer)
  return float(got is not None and want is not None and got == want)


# ---------------------------------------------------------------------------
# wordprob: the templates

_SHE = ("Ana", "Mia", "Lena", "Priya", "Sofia", "Grace", "Nora", "Aisha", "Emma", "Keiko",
        "Rosa", "Chloe", "Fatima", "Hannah", "Lucia", "Zoe")
_HE = ("Ben", "Omar", "Liam", "Raj", "Diego", "Noah", "Sam", "Kofi", "Ethan", "Hugo", "Leo",
       "Max", "Yusuf", "Tom", "Mateo", "Ivan")
_ITEMS = ("pencils", "stickers", "marbles", "apples", "cookies", "stamps", "cards", "beads",
          "crayons", "shells", "balloons", "oranges", "erasers", "candles")
_CONTAINERS = ("boxes", "bags", "jars", "baskets", "crates", "trays")
_THINGS = ("a book", "a lunch", "a toy", "a plant", "a hat", "a puzzle", "a scarf", "a game")
_BUYS = ("tickets", "notebooks", "comic books", "plants", "puzzles", "candles")
_SPENDS = ("a gift", "new shoes", "a concert ticket", "groceries", "a jacket", "a bike helmet")
_RELATIVES = ("children", "nephews", "grandchildren", "cousins", "nieces")
_JOBS = ("babysitting", "at the bakery", "mowing lawns", "walking dogs", "at the library",
         "tutoring", "at a cafe")
# (verb with -s, verb, unit, lowest and highest speed per hour)
_MODES = (("drives", "drive", "miles", 30, 65), ("cycles", "cycle", "kilometers", 10, 25),
          ("walks", "walk", "kilometers", 3, 6), ("rides", "ride", "miles", 8, 20),
          ("sails", "sail", "miles", 5, 15))
_RECIPES = (("pancakes", "eggs"), ("muffins", "cups of flour"), ("lemonade", "lemons"),
            ("soup", "carrots"), ("cookies", "ounces of butter"), ("bread", "cups of milk"))


@dataclasses.dataclass(frozen=True)
class _Person:
  name: str
  she: str    # she / he
  her: str    # her / him
  his: str    # her / his

  def __str__(self) -> str:
    return self.name

  @property
  def She(self) -> str:  # noqa: N802  (capitalised, to start a sentence)
    return self.she.capitalize()


class _Step(NamedTuple):
  """One operation: a fact for the question ("" if none), the worked sentence
  (one `a op b = c`), the question it answers if it is the last, and c."""
  fact: str
  work: str
  ask: str
  value: int


class _Draw:
  """The random choices of one problem: people (no name twice), words, ints."""

  def __init__(self, rng):
    self.rng, self._names = rng, set()

  def person(self) -> _Person:
    while True:
      she = self.rng.random() < 0.5
      name = self.rng.choice(_SHE if she else _HE)
      if name not in self._names:
        self._names.add(name)
        return _Person(name, *(("she", "her", "her") if she else ("he", "him", "his")))

  def pick(self, options):
    return self.rng.choice(options)

  def int(self, lo: int, hi: int) -> int:
    return self.rng.randint(lo, hi)


def _shopping(d: _Draw) -> list[_Step]:
  a, item, kids = d.person(), d.pick(_ITEMS), d.pick(_RELATIVES)
  n, p, thing, q = d.int(2, 9), d.int(2, 12), d.pick(_THINGS), d.int(3, 30)
  k, each = d.int(2, 5), d.int(2, 15)
  v1, v2, left = n * p, n * p + q, k * each
  return [
      _Step(f"{a} buys {n} packs of {item}, and each pack costs ${p}.",
            f"The {item} cost {n} * {p} = ${v1}.", f"How many dollars does {a} spend?", v1),
      _Step(f"{a.She} also buys {thing} for ${q}.", f"In all {a.she} spends {v1} + {q} = ${v2}.",
            f"How many dollars does {a} spend in all?", v2),
      _Step(f"{a} went to the store with ${v2 + left}.",
            f"{a.She} has {v2 + left} - {v2} = ${left} left.",
            f"How many dollars does {a} have left?", left),
      _Step(f"{a.She} gives the money left to {k} {kids}, split equally.",
            f"Each gets {left} / {k} = ${each}.",
            f"How many dollars does each of the {kids} get?", each)]


def _sharing(d: _Draw) -> list[_Step]:
  a, b, c, e, item = d.person(), d.person(), d.person(), d.person(), d.pick(_ITEMS)
  n, each, k = d.int(2, 6), d.int(3, 12), d.int(2, 20)
  g = d.int(1, each + k - 1)
  m, left = d.int(2, 5), each + k - g
  return [
      _Step(f"{a} has {n * each} {item} and gives all of them to {n} friends, "
            "sharing them equally.", f"Each friend gets {n * each} / {n} = {each} {item}.",
            f"How many {item} does each friend get?", each),
      _Step(f"One of the friends, {b}, already had {k} {item}.",
            f"{b} now has {each} + {k} = {each + k} {item}.",
            f"How many {item} does {b} have now?", each + k),
      _Step(f"{b} then gives {g} {item} to {c}.", f"{b} has {each + k} - {g} = {left} {item} left.",
            f"How many {item} does {b} have left?", left),
      _Step(f"{e} has {m} times as many {item} as {b} has left.",
            f"{e} has {left} * {m} = {left * m} {item}.",
            f"How many {item} does {e} have?", left * m)]


def _travel(d: _Draw) -> list[_Step]:
  a = d.person()
  goes, go, unit, lo, hi = d.pick(_MODES)
  speed, hours, more = d.int(lo, hi), d.int(2, 6), d.int(2, 20)
  days, daily = d.int(2, 5), d.int(2, 40)
  v1, v2, rest = speed * hours, speed * hours + more, days * daily
  return [
      _Step(f"{a} {goes} at {speed} {unit} per hour for {hours} hours.",
            f"{a.She} {goes} {speed} * {hours} = {v1} {unit}.",
            f"How many {unit} does {a} {go}?", v1),
      _Step(f"Later that day {a.she} {goes} {more} more {unit}.",
            f"That makes {v1} + {more} = {v2} {unit}.",
            f"How many {unit} does {a} {go} in all that day?", v2),
      _Step(f"{a.his.capitalize()} whole trip is {v2 + rest} {unit} long.",
            f"{a.She} still has {v2 + rest} - {v2} = {rest} {unit} to go.",
            f"How many {unit} does {a} still have to go?", rest),
      _Step(f"{a.She} splits the rest equally over the next {days} days.",
            f"That is {rest} / {days} = {daily} {unit} a day.",
            f"How many {unit} does {a} {go} on each of those days?", daily)]


def _pay(d: _Draw) -> list[_Step]:
  a, job, thing, buys = d.person(), d.pick(_JOBS), d.pick(_SPENDS), d.pick(_BUYS)
  rate, hours, saved, price = d.int(8, 25), d.int(3, 20), d.int(5, 60), d.int(3, 20)
  v1, v2 = rate * hours, rate * hours + saved
  count = d.int(1, min(10, (v2 - 1) // price))
  left = price * count
  return [
      _Step(f"{a} earns ${rate} an hour {job}. This week {a.she} works {hours} hours.",
            f"{a.She} earns {rate} * {hours} = ${v1}.",
            f"How many dollars does {a} earn this week?", v1),
      _Step(f"{a.She} already had ${saved} saved.", f"Now {a.she} has {v1} + {saved} = ${v2}.",
            f"How many dollars does {a} have now?", v2),
      _Step(f"{a.She} spends ${v2 - left} on {thing}.",
            f"{a.She} has {v2} - {v2 - left} = ${left} left.",
            f"How many dollars does {a} have left?", left),
      _Step(f"{a.She} spends all of the rest on {buys} that cost ${price} each.",
            f"{a.She} buys {left} / {price} = {count} {buys}.",
            f"How many {buys} does {a} buy?", count)]


def _boxes(d: _Draw) -> list[_Step]:
  a, b, item = d.person(), d.person(), d.pick(_ITEMS)
  first, second = d.rng.sample(_CONTAINERS, 2)
  boxes, per, size = d.int(2, 9), d.int(4, 15), d.int(2, 6)
  v1 = boxes * per
  filled = d.int(1, (v1 - 1) // size)
  kept, price = size * filled, d.int(2, 12)
  return [
      _Step(f"{a} has {boxes} {first} of {item} with {per} {item} in each.",
            f"{a.She} has {boxes} * {per} = {v1} {item}.",
            f"How many {item} does {a} have?", v1),
      _Step(f"{a.She} gives {v1 - kept} {item} to {b}.",
            f"{a.She} has {v1} - {v1 - kept} = {kept} {item} left.",
            f"How many {item} does {a} have left?", kept),
      _Step(f"{a.She} packs the rest into {second} of {size}.",
            f"That fills {kept} / {size} = {filled} {second}.",
            f"How many {second} does {a} fill?", filled),
      _Step(f"{a.She} sells the {second} for ${price} each.",
            f"{a.She} makes {filled} * {price} = ${filled * price}.",
            f"How many dollars does {a} make?", filled * price)]


def _giving(d: _Draw) -> list[_Step]:
  a, b, c, item = d.person(), d.person(), d.person(), d.pick(_ITEMS)
  x, y, n = d.int(5, 40), d.int(2, 30), d.int(2, 6)
  z = d.int(1, x + y - 1)
  v2 = x + y - z
  w = d.int(2, 20)
  w += -(v2 + w) % n
  v3 = v2 + w
  return [
      _Step(f"{a} has {x} {item}. {b} gives {a.her} {y} more.",
            f"{a} now has {x} + {y} = {x + y} {item}.",
            f"How many {item} does {a} have now?", x + y),
      _Step(f"{a.She} gives {z} of them to {c}.", f"{a.She} has {x + y} - {z} = {v2} {item} left.",
            f"How many {item} does {a} have left?", v2),
      _Step(f"For {a.his} birthday {a.she} gets {w} more {item}.",
            f"Then {a.she} has {v2} + {w} = {v3} {item}.",
            f"How many {item} does {a} have after {a.his} birthday?", v3),
      _Step(f"{a.She} shares all of them equally among {n} classmates.",
            f"Each classmate gets {v3} / {n} = {v3 // n} {item}.",
            f"How many {item} does each classmate get?", v3 // n)]


def _comparison(d: _Draw) -> list[_Step]:
  a, b, c, item, box = d.person(), d.person(), d.person(), d.pick(_ITEMS), d.pick(_CONTAINERS)
  x, m = d.int(3, 30), d.int(2, 6)
  v1 = x * m
  # k fewer for c, so that b's and c's together (2 * v1 - k) fill boxes of n
  n = d.pick([n for n in range(2, 7) if ((2 * v1) % n or n) < v1])
  k = d.pick(range((2 * v1) % n or n, v1, n))
  v2, v3 = v1 - k, 2 * v1 - k
  return [
      _Step(f"{a} has {x} {item}. {b} has {m} times as many {item} as {a}.",
            f"{b} has {x} * {m} = {v1} {item}.", f"How many {item} does {b} have?", v1),
      _Step(f"{c} has {k} fewer {item} than {b}.", f"{c} has {v1} - {k} = {v2} {item}.",
            f"How many {item} does {c} have?", v2),
      _Step("", f"Together {b} and {c} have {v1} + {v2} = {v3} {item}.",
            f"How many {item} do {b} and {c} have together?", v3),
      _Step(f"{b} and {c} put all of their {item} into {box} of {n}.",
            f"They fill {v3} / {n} = {v3 // n} {box}.", f"How many {box} do they fill?", v3 // n)]


def _recipe(d: _Draw) -> list[_Step]:
  a, b = d.person(), d.person()
  dish, food = d.pick(_RECIPES)
  per, batches, n, each, k = d.int(2, 8), d.int(2, 9), d.int(2, 5), d.int(1, 10), d.int(2, 15)
  used, left = per * batches, n * each
  return [
      _Step(f"A recipe for {dish} uses {per} {food} per batch, and {a} makes {batches} batches.",
            f"{a.She} uses {per} * {batches} = {used} {food}.",
            f"How many {food} does {a} use?", used),
      _Step(f"{a.She} had {used + left} {food} before starting.",
            f"{a.She} has {used + left} - {used} = {left} {food} left.",
            f"How many {food} does {a} have left?", left),
      _Step(f"{a.She} gives the {food} left to {n} neighbors, the same number to each.",
            f"Each neighbor gets {left} / {n} = {each} {food}.",
            f"How many {food} does each neighbor get?", each),
      _Step(f"One neighbor, {b}, already had {k} {food}.",
            f"{b} now has {each} + {k} = {each + k} {food}.",
            f"How many {food} does {b} have now?", each + k)]


_TEMPLATES = {"shopping": _shopping, "sharing": _sharing, "travel": _travel, "pay": _pay,
              "boxes": _boxes, "giving": _giving, "comparison": _comparison, "recipe": _recipe}
_TRIES = 1000   # draws of a template's numbers before max_value is deemed too small


class WordProblems(Task):
  """Grade-school word problems in English with integer answers, generated.

  A template (shopping, sharing, travel at a speed, hourly pay, boxes, giving
  and receiving, comparisons, recipes; `TEMPLATES`) tells a story of `ops`
  operations (+, -, *, / ; every division exact, every value a positive
  integer, none above `max_value`). The CoT has one sentence per operation, each
  with its arithmetic written out ("She buys 3 * 4 = 12 pens."); the answer is
  the last result. Names, objects, units and numbers vary with the seed.

  Example (ops=2, seed 7):
      question  Leo has 16 erasers. Ivan has 3 times as many erasers as Leo. Kofi
                has 24 fewer erasers than Ivan. How many erasers does Kofi have?
      cot       Ivan has 16 * 3 = 48 erasers. Kofi has 48 - 24 = 24 erasers.
      answer    24
  The grader reads the first number of the answer text.
  """
  name = "wordprob"
  DIFFICULTY = {"ops": (2, 1, 4), "max_value": (1000, 100, 10 ** 6)}
  TEMPLATES = tuple(_TEMPLATES)

  def _generate(self, rng):
    return self._compose(rng)[1]

  def template(self, seed: int) -> str:
    """The name of the template (one of TEMPLATES) of `example(seed)`."""
    return self._compose(self._rng(seed))[0]

  def _compose(self, rng) -> tuple[str, Example]:
    name = rng.choice(self.TEMPLATES)
    ops, top = self.difficulty["ops"], self.difficulty["max_value"]
    for _ in range(_TRIES):
      steps = _TEMPLATES[name](_Draw(rng))[:ops]
      question = " ".join([s.fact for s in steps if s.fact] + [steps[-1].ask])
      cot = " ".join(s.work for s in steps)
      if max(int(n) for n in re.findall(r"\d+", f"{question} {cot}")) <= top:
        return name, Example(question=question, cot=cot, answer=str(steps[-1].value))
    raise ValueError(f"task 'wordprob': no {name!r} problem with {ops} operations keeps every "
                     f"number <= max_value={top} in {_TRIES} draws; accepted: a larger max_value")

  def grade(self, answer_text, example):
    return grade_first_number(answer_text, example)
