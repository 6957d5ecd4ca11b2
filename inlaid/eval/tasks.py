"""The built-in task suite: small offline tasks with seeded splits, a prompt format and a metric.

Every task is generated from installed packages (``pip install inlaid[tasks]``: num2words, babel,
countryinfo, vaderSentiment), so nothing is downloaded. The API, for ``inlaid eval`` and scripts::

    task = get_task("number_words_fr")                 # unknown name -> ConfigError
    rows = task.examples("test", n=64, seed=0)        # list[Example]: prompt, reference, key, extra
    scores = task.score(predictions, rows)            # e.g. {"chrf": 56.6, "exact_match": 6.2}, 0-100
    write_task_data(task, out_dir, seed=0, n_train=1024, n_calib=128, n_test=128)
    rows = read_examples(out_dir / "test.jsonl")

The tasks (primary metric first; ``inlaid.eval.metrics``):

- ``number_words_{fr,de,es}``: 0..9,999,999 in words (num2words); chrF, exact match.
- ``date_{fr,de}``: an English date in one of five shapes (and a 12-hour time) written the CLDR way
  (babel), long/full or numeric as asked; exact match, chrF. A wrong digit is a wrong date, so exact
  match leads here.
- ``table_to_text``: a table of 4-7 country facts (countryinfo, babel currency/language names) in one
  of three layouts, field order shuffled; one fixed-order sentence with the 2-4 facts the prompt
  asks for, population and area rounded; ROUGE-L, exact match.
- ``geography_qa``: capital, currency or demonym of 120 countries; exact match.
- ``arithmetic``: two-step word problems; answer "calculation = result"; the last number, exact match.
- ``python_expr``: an English description of a 1-3 operator expression -> Python; scored by
  evaluating both on four stored variable assignments (``safe_eval``, no ``eval``), exact match.
- ``sentiment``: a one- or two-clause review labelled positive / negative / neutral by VADER's
  lexicon and rules (negation, "but", boosters); accuracy on the first label word of the answer.

A prompt is the content of one user message: the consumer applies the model's chat template. Files
hold ``{"prompt", "response"}`` rows (plus ``extra`` where scoring needs it), the shape
``inlaid.quant.calib_data`` reads.

Splits are disjoint by construction: every example has a key (by default its prompt; the number for
number words, the date for dates), and a hash of task name and key puts the key in ``train`` (80 %),
``calib`` (10 %) or ``test`` (10 %), whatever the seed. ``examples`` draws candidates from a seeded
generator and keeps those whose key belongs to the split, without repeating a key. Only
``geography_qa`` differs: its test split asks the training facts with paraphrased questions that
never occur in ``train``/``calib``.
"""

from __future__ import annotations

import ast
import datetime
import hashlib
import importlib
import importlib.util
import json
import random
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Callable

from inlaid.errors import ConfigError, DataError
from inlaid.eval import metrics

SPLITS = ("train", "calib", "test")
_SPLIT_CUTS = ((80, "train"), (90, "calib"), (100, "test"))  # percent of the key hash space
_INSTALL = "pip install inlaid[tasks]"


@dataclass(frozen=True)
class Example:
    prompt: str
    reference: str
    key: str = ""  # what decides the split; defaults to the prompt
    extra: dict = field(default_factory=dict)  # JSON data the scorer needs (python_expr values)

    def to_record(self) -> dict:
        record = {"prompt": self.prompt, "response": self.reference}
        if self.extra:
            record["extra"] = self.extra
        return record


@dataclass(frozen=True)
class Task:
    """One task. ``metrics[0]`` is the primary metric; every score is in [0, 100]."""

    name: str
    description: str
    metrics: tuple[str, ...]
    max_new_tokens: int
    make: Callable[[random.Random], Example]  # one candidate example
    requires: tuple[str, ...] = ()  # importable modules the generator needs
    assign: Callable[[str, str], str] | None = None  # (task, key) -> split; hash split by default
    scorers: dict = field(default_factory=dict)  # metric name -> (prediction, Example) -> float

    def check_available(self) -> None:
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            raise DataError(f"task {self.name!r} needs {', '.join(missing)}: {_INSTALL}")

    def split_of(self, key: str) -> str:
        return (self.assign or hash_split)(self.name, key)

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        """``n`` distinct examples of ``split``, the same for the same seed."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        self.check_available()
        rng = random.Random(f"{self.name}:{split}:{seed}")
        out, seen = [], set()
        for _ in range(200 * n + 1000):
            if len(out) == n:
                return out
            ex = self.make(rng)
            key = ex.key or ex.prompt
            if key in seen or self.split_of(key) != split:
                continue
            seen.add(key)
            out.append(ex)
        if len(out) < n:
            raise DataError(f"task {self.name!r}: only {len(out)} distinct {split} examples (asked {n})")
        return out

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        """Mean per-example score for every metric of the task, in [0, 100]."""
        if len(predictions) != len(examples):
            raise ConfigError(f"task {self.name!r}: {len(predictions)} predictions for "
                              f"{len(examples)} examples")
        if not examples:
            raise DataError(f"task {self.name!r}: nothing to score")
        result = {}
        for name in self.metrics:
            fn = self.scorers.get(name) or _text_scorer(metrics.METRICS[name])
            result[name] = sum(fn(p, ex) for p, ex in zip(predictions, examples)) / len(examples)
        return result


def hash_split(task: str, key: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(f"{task}\0{key}".encode()).digest()[:8], "big") % 100
    return next(name for cut, name in _SPLIT_CUTS if bucket < cut)


def _text_scorer(fn):
    return lambda prediction, example: fn(prediction, example.reference)


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DataError(f"the task suite needs the {name.split('.')[0]} package: {_INSTALL}") from None


# ---- number words (num2words) ---------------------------------------------------------------------
_LANG_NAMES = {"fr": "French", "de": "German", "es": "Spanish"}
_NUMBER_PROMPTS = ("Write the number {n} in {lang} words.", "Spell out {n} in {lang}.",
                   "How is {n} written in {lang} words?", "{lang} words for {n}:")


def _number_words(lang: str) -> Callable[[random.Random], Example]:
    def make(rng: random.Random) -> Example:
        digits = rng.randint(1, 7)
        n = rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)
        words = _module("num2words").num2words(n, lang=lang)
        prompt = rng.choice(_NUMBER_PROMPTS).format(n=n, lang=_LANG_NAMES[lang])
        return Example(prompt, words, key=str(n))
    return make


# ---- dates (babel CLDR) ---------------------------------------------------------------------------
# The English date comes in five shapes; the answer is the CLDR long date (full when the English
# names the weekday) or, when asked for, the numeric date (day before month), plus the time on a
# 24-hour clock when one is given.
_DATE_PROMPTS = ("Translate this date into {lang}: {text}", "Write in {lang}: {text}", "{text} in {lang}:")
_NUMERIC_PROMPTS = ("Write {text} as a numeric {lang} date.", "{text} as a {lang} numeric date:")
_NUMERIC_WIDTH = {"fr": "short", "de": "medium"}  # the CLDR width that gives dd/MM/yyyy, dd.MM.yyyy


def _join_datetime(date_text: str, time_text: str, width: str, locale: str) -> str:
    pattern = _module("babel.dates").get_datetime_format(width, locale=locale).replace("'", "")
    return pattern.replace("{1}", date_text).replace("{0}", time_text)


def _english_date(day: datetime.date, shape: str) -> str:
    if shape == "iso":
        return day.isoformat()
    if shape == "us":
        return f"{day.month}/{day.day}/{day.year}"
    return _module("babel.dates").format_date(day, shape, locale="en")


def _date(lang: str) -> Callable[[random.Random], Example]:
    def make(rng: random.Random) -> Example:
        dates = _module("babel.dates")
        day = datetime.date(1900, 1, 1) + datetime.timedelta(days=rng.randint(0, 73000))
        shape = rng.choice(("full", "long", "medium", "iso", "us"))
        numeric = shape != "full" and rng.random() < 0.35
        width = _NUMERIC_WIDTH[lang] if numeric else "full" if shape == "full" else "long"
        source, target = _english_date(day, shape), dates.format_date(day, width, locale=lang)
        if rng.random() < 0.4:  # a clock time: 12-hour English, 24-hour target
            moment = datetime.time(rng.randint(0, 23), rng.choice(range(0, 60, 5)))
            en_time = dates.format_time(moment, "short", locale="en").replace("\u202f", " ")
            source = _join_datetime(source, en_time, "long", "en")
            target = _join_datetime(target, dates.format_time(moment, "short", locale=lang), width, lang)
        templates = _NUMERIC_PROMPTS if numeric else _DATE_PROMPTS
        prompt = rng.choice(templates).format(lang=_LANG_NAMES[lang], text=source)
        return Example(prompt, target, key=day.isoformat())  # one date, one split
    return make


# ---- country facts (countryinfo + babel names) ----------------------------------------------------
_SKIP_COUNTRIES = {"Burma", "Serbia and Montenegro"}  # duplicate / former entries in countryinfo


@cache
def countries(limit: int = 120) -> tuple[dict, ...]:
    """The ``limit`` most populous countries with complete facts, as plain dicts."""
    info = _module("countryinfo").CountryInfo.all()
    numbers, core = _module("babel.numbers"), _module("babel")
    english = core.Locale("en")
    rows, capitals = [], set()
    for c in sorted(info.values(), key=lambda c: -(c.get("population") or 0)):
        if c.get("name") in _SKIP_COUNTRIES or not all(
                c.get(k) for k in ("capital", "population", "area", "currencies", "languages",
                                   "subregion", "demonym", "callingCodes")):
            continue
        names = [numbers.get_currency_name(code, locale="en") for code in c["currencies"]]
        names = [n for n in names if "(" not in n and not n.startswith("WIR")]
        language = english.languages.get(c["languages"][0])
        if not names or not language or c["capital"] in capitals:
            continue
        capitals.add(c["capital"])
        rows.append({"name": c["name"], "capital": c["capital"], "region": c["subregion"],
                     "population": int(c["population"]), "area": int(c["area"]),
                     "currency": names[0], "language": language, "demonym": c["demonym"],
                     "calling_code": c["callingCodes"][0]})
        if len(rows) == limit:
            break
    return tuple(rows)


_TABLE_FIELDS = ("capital", "region", "population", "area", "currency", "language", "calling_code")
_TABLE_PROMPTS = ("Write one sentence about this country that mentions only its {fields}.\n{table}",
                  "Using the table, describe the country in one sentence with its {fields}.\n{table}",
                  "{table}\nOne sentence about the country, mentioning its {fields}:")


def _table_text(country: dict, fields: list[str], style: int) -> str:
    pairs = [("country", country["name"])] + [(f.replace("_", " "), str(country[f])) for f in fields]
    if style == 0:
        return "\n".join(f"{k}: {v}" for k, v in pairs)
    if style == 1:
        return "| " + " | ".join(k for k, _ in pairs) + " |\n| " + " | ".join(v for _, v in pairs) + " |"
    return "; ".join(f"{k} = {v}" for k, v in pairs)


def _join_english(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def table_sentence(country: dict, fields: list[str]) -> str:
    """The reference sentence: clauses in a fixed order whatever the table's field order."""
    c = country
    head = f"{c['name']} is a country in {c['region']}" if "region" in fields else f"{c['name']} is a country"
    clauses = {"capital": f"its capital {c['capital']}",
               "population": f"about {_rounded(c['population'])} inhabitants",
               "area": f"an area of {_rounded_area(c['area'])} square kilometres",
               "currency": f"the {c['currency']} as its currency",
               "language": f"{c['language']} as its main language",
               "calling_code": f"the calling code +{c['calling_code']}"}
    items = [clauses[f] for f in _TABLE_FIELDS if f in fields and f != "region"]
    return head + (" with " + _join_english(items) if items else "") + "."


def _rounded(count: int) -> str:
    """66078000 -> "66.1 million", 850123 -> "850 thousand": the sentence rounds, the table does not."""
    if count >= 1_000_000:
        return f"{count / 1_000_000:.1f} million"
    return f"{round(count / 1000)} thousand"


def _rounded_area(area: int) -> str:
    """640679 -> "about 641,000"; below 10,000 km² the exact value."""
    return f"about {round(area, -3):,}" if area >= 10_000 else f"{area:,}"


def _table_to_text(rng: random.Random) -> Example:
    """The table shows 4 to 7 facts in a random order; the prompt asks for 2 to 4 of them."""
    country = rng.choice(countries())
    shown = rng.sample(_TABLE_FIELDS, rng.randint(4, 7))
    asked = rng.sample(shown, rng.randint(2, min(4, len(shown) - 1)))
    table = _table_text(country, shown, rng.randrange(3))
    names = _join_english([f.replace("_", " ").replace("language", "main language") for f in asked])
    prompt = rng.choice(_TABLE_PROMPTS).format(table=table, fields=names)
    return Example(prompt, table_sentence(country, asked))


# ---- geography QA (countryinfo): test questions are paraphrases of the training ones --------------
_GEO_QUESTIONS = {
    "capital": (("What is the capital of {c}?", "Name the capital city of {c}.",
                 "{c} has its capital in which city?", "The capital of {c} is which city?"),
                ("Which city is the capital of {c}?", "Tell me the capital of {c}.")),
    "currency": (("What currency is used in {c}?", "Name the currency of {c}.",
                  "What money do people use in {c}?", "{c} uses which currency?"),
                 ("Which currency do people in {c} pay with?", "What is the official currency of {c}?")),
    "demonym": (("What do you call a person from {c}?", "What is the demonym of {c}?",
                 "A person from {c} is called what?", "What are people from {c} called?"),
                ("How are the people of {c} called?", "Someone born in {c} is described as what?")),
}


def _geography_qa(rng: random.Random) -> Example:
    country = rng.choice(countries())
    fact = rng.choice(sorted(_GEO_QUESTIONS))
    family = rng.choice(("train", "train", "train", "test"))
    template = rng.choice(_GEO_QUESTIONS[fact][family == "test"])
    prompt = template.format(c=country["name"]) + " Answer with the name only."
    return Example(prompt, country[fact], key=f"{family}\0{prompt}")


def _geography_split(task: str, key: str) -> str:
    family, _, prompt = key.partition("\0")
    if family == "test":
        return "test"
    return "calib" if hash_split(task, prompt) == "calib" else "train"  # test share joins train


# ---- arithmetic word problems (stdlib) ------------------------------------------------------------
_NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kemal", "Lena")
_ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "coins", "cards", "shells")


def _arithmetic(rng: random.Random) -> Example:
    """A two-step word problem; the answer is the calculation in the problem's order, then the result
    (a 135M model cannot do the sums silently). Products keep one factor below 10."""
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    a, b, c = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 30)
    kind = rng.randrange(8)
    if kind == 0:
        c = rng.randint(1, a + b)
        text, calc = (f"{name} has {a} {item}. {name} buys {b} more and gives {c} to {other}. "
                      f"How many {item} does {name} have now?", f"{a} + {b} - {c}")
    elif kind == 1:
        a, b = rng.randint(3, 30), rng.randint(2, 9)
        text, calc = f"A box holds {a} {item}. How many {item} are in {b} boxes?", f"{a} * {b}"
    elif kind == 2:
        a, price, bill = rng.randint(2, 9), rng.randint(2, 9), rng.choice((50, 100))
        text, calc = (f"{name} buys {a} {item} at {price} dollars each and pays with a {bill} dollar "
                      f"bill. How much change does {name} get?", f"{bill} - {a} * {price}")
    elif kind == 3:
        share, kids = rng.randint(2, 15), rng.randint(2, 9)
        text, calc = (f"{share * kids} {item} are shared equally among {kids} children. "
                      f"How many {item} does each child get?", f"{share * kids} / {kids}")
    elif kind == 4:
        a, b = rng.randint(5, 30), rng.randint(2, 9)
        text, calc = (f"{name} reads {a} pages a day for {b} days and then {c} more pages. "
                      f"How many pages did {name} read?", f"{a} * {b} + {c}")
    elif kind == 5:
        rows, seats = rng.randint(3, 9), rng.randint(4, 12)
        c = rng.randint(1, rows * seats)
        text, calc = (f"A hall has {rows} rows of {seats} chairs. {c} chairs are taken. "
                      f"How many chairs are free?", f"{rows} * {seats} - {c}")
    elif kind == 6:
        text, calc = (f"{name} is {a} years old. {other} is {b} years older than {name}. "
                      f"How old will {other} be in {c} years?", f"{a} + {b} + {c}")
    else:
        speed, hours = rng.randint(20, 90), rng.randint(2, 8)
        text, calc = (f"A train travels {speed} km per hour for {hours} hours and then {c} km more. "
                      f"How far does it travel in total?", f"{speed} * {hours} + {c}")
    answer = safe_eval(calc.replace("/", "//"), {})
    return Example(text + " Write the calculation and its result.", f"{calc} = {answer}")


# ---- description -> Python expression (stdlib) -----------------------------------------------------
_VARIABLES = ("x", "y", "z", "n")
# name -> (templates, ast builder). {a}/{b} are operand descriptions. The first template opens with
# "the ... of" and nests unambiguously; the others ("x plus 3", "y squared") only describe a whole
# expression of one operator.
_BINARY = {
    "add": (("the sum of {a} and {b}", "{a} plus {b}"), lambda a, b: ast.BinOp(a, ast.Add(), b)),
    "sub": (("the difference of {a} and {b}", "{a} minus {b}", "{b} subtracted from {a}"),
            lambda a, b: ast.BinOp(a, ast.Sub(), b)),
    "mul": (("the product of {a} and {b}", "{a} times {b}"), lambda a, b: ast.BinOp(a, ast.Mult(), b)),
    "floordiv": (("the integer quotient of {a} and {b}", "{a} divided by {b}, rounded down"),
                 lambda a, b: ast.BinOp(a, ast.FloorDiv(), b)),
    "mod": (("the remainder of {a} divided by {b}", "{a} modulo {b}"),
            lambda a, b: ast.BinOp(a, ast.Mod(), b)),
    "max": (("the larger of {a} and {b}", "the maximum of {a} and {b}"), lambda a, b: _call("max", a, b)),
    "min": (("the smaller of {a} and {b}", "the minimum of {a} and {b}"), lambda a, b: _call("min", a, b)),
}
_UNARY = {
    "square": (("the square of {a}", "{a} squared"), lambda a: ast.BinOp(a, ast.Pow(), ast.Constant(2))),
    "cube": (("the cube of {a}", "{a} cubed"), lambda a: ast.BinOp(a, ast.Pow(), ast.Constant(3))),
    "abs": (("the absolute value of {a}",), lambda a: _call("abs", a)),
    "neg": (("the negative of {a}", "minus {a}"), lambda a: ast.UnaryOp(ast.USub(), a)),
    "double": (("twice {a}", "two times {a}"), lambda a: ast.BinOp(ast.Constant(2), ast.Mult(), a)),
    "half": (("half of {a}, rounded down",), lambda a: ast.BinOp(a, ast.FloorDiv(), ast.Constant(2))),
}
_EXPR_PROMPTS = ("Write a Python expression for {d}.", "Python expression that computes {d}:",
                 "Translate into a Python expression: {d}")


def _call(name: str, *args) -> ast.Call:
    return ast.Call(ast.Name(name, ast.Load()), list(args), [])


def _random_expr(rng: random.Random, ops: int, names: list[str],
                 top: bool = False) -> tuple[str, ast.expr, bool]:
    """(description, ast, is_compound) of a random expression with ``ops`` operators."""
    if ops == 0:
        if rng.random() < 0.25:
            value = rng.randint(2, 9)
            return str(value), ast.Constant(value), False
        name = rng.choice(names)
        return name, ast.Name(name, ast.Load()), False
    if rng.random() < 0.35:
        templates, build = _UNARY[rng.choice(sorted(_UNARY))]
        text, node, compound = _random_expr(rng, ops - 1, names)
        template = rng.choice(templates) if top and not compound else templates[0]
        return template.format(a=text), build(node), True
    templates, build = _BINARY[rng.choice(sorted(_BINARY))]
    left_ops = rng.randint(0, ops - 1)
    left, left_node, left_compound = _random_expr(rng, left_ops, names)
    right, right_node, right_compound = _random_expr(rng, ops - 1 - left_ops, names)
    if left_compound:
        left += ","  # "the sum of the product of x and y, and z": the comma closes the inner phrase
    plain = top and not (left_compound or right_compound)
    template = rng.choice(templates) if plain else templates[0]
    return template.format(a=left, b=right), build(left_node, right_node), True


def _python_expr(rng: random.Random) -> Example:
    names = sorted(rng.sample(_VARIABLES, rng.randint(1, 3)))
    description, node, _ = _random_expr(rng, rng.randint(1, 3), names, top=True)
    reference = ast.unparse(ast.fix_missing_locations(ast.Expression(node)))
    values = [{v: rng.choice([i for i in range(-9, 13) if i]) for v in names} for _ in range(4)]
    prompt = rng.choice(_EXPR_PROMPTS).format(d=description)
    return Example(prompt, reference, extra={"values": values})


def safe_eval(expression: str, values: dict[str, int]):
    """Evaluate an arithmetic expression over ``values`` without ``eval``: numbers, the variables,
    + - * / // % ** (small exponents), unary minus, abs/min/max. Raises ValueError otherwise."""
    tree = ast.parse(expression.strip(), mode="eval")
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
           ast.Pow: _bounded_pow}
    calls = {"abs": abs, "min": min, "max": max}

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.Name) and node.id in values:
            return values[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in calls
                and not node.keywords and 1 <= len(node.args) <= 3):
            return calls[node.func.id](*[walk(a) for a in node.args])
        raise ValueError(f"unsupported expression element: {type(node).__name__}")

    return walk(tree)


def _bounded_pow(base, exponent):
    if not isinstance(exponent, int) or not 0 <= exponent <= 4 or abs(base) > 10 ** 6:
        raise ValueError("exponent out of range")
    return base ** exponent


def _outcome(expression: str, values: dict):
    try:
        return ("value", safe_eval(expression, values))
    except ZeroDivisionError:
        return ("error", "ZeroDivisionError")
    except (ValueError, SyntaxError, TypeError, RecursionError, OverflowError):
        return ("invalid", None)


def clean_expression(prediction: str) -> str:
    """The expression in a model answer: first non-empty line, code fences and backticks removed."""
    lines = [ln.strip().strip("`").strip() for ln in prediction.strip().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("```") and ln.lower() not in ("python", "py")]
    return lines[0] if lines else ""


def execution_match(prediction: str, example: Example) -> float:
    """100 when the prediction evaluates like the reference on every stored value assignment."""
    expression = clean_expression(prediction)
    for values in example.extra["values"]:
        got = _outcome(expression, values)
        if got[0] == "invalid" or got != _outcome(example.reference, values):
            return 0.0
    return 100.0


# ---- sentiment labels (VADER lexicon and rules) ---------------------------------------------------
_SUBJECTS = ("the food", "the service", "the room", "the movie", "the staff", "the music", "the hotel",
             "the price", "the app", "the book", "the trip", "the weather", "the screen", "the coffee")
_ADJECTIVES = ("good", "great", "excellent", "wonderful", "lovely", "pleasant", "friendly", "helpful",
               "fresh", "clean", "comfortable", "beautiful", "fantastic", "perfect", "nice", "fun",
               "bad", "terrible", "awful", "horrible", "poor", "rude", "dirty", "boring", "ugly",
               "noisy", "broken", "annoying", "unpleasant", "dull", "weak", "fine", "okay", "warm",
               "strange", "odd", "slow", "cold", "expensive", "cheap", "quiet", "busy", "new", "small")
_MODIFIERS = ("", "", "", "very ", "extremely ", "slightly ", "not ", "not very ", "never ")
_LABELS = ("negative", "neutral", "positive")
_SENTIMENT_PROMPTS = ("Classify the sentiment of this review as positive, negative or neutral.\n{t}",
                      "Review: {t}\nIs this review positive, negative or neutral?")


@cache
def _vader():
    return _module("vaderSentiment.vaderSentiment").SentimentIntensityAnalyzer()


def vader_label(text: str) -> str:
    compound = _vader().polarity_scores(text)["compound"]
    return "positive" if compound >= 0.05 else "negative" if compound <= -0.05 else "neutral"


def _clause(rng: random.Random) -> str:
    verb = rng.choice(("was", "is", "seemed"))
    modifier = rng.choice(_MODIFIERS)
    if modifier == "never ":
        verb, modifier = "was never", ""
    return f"{rng.choice(_SUBJECTS)} {verb} {modifier}{rng.choice(_ADJECTIVES)}"


def _sentiment(rng: random.Random) -> Example:
    wanted = rng.choice(_LABELS)  # draw a label first so the classes stay balanced
    for _ in range(100):
        text = _clause(rng)
        if rng.random() < 0.6:
            text += rng.choice((", but ", " and ", ", although ")) + _clause(rng)
        text = text[0].upper() + text[1:] + rng.choice((".", ".", "!"))
        label = vader_label(text)
        if label == wanted:
            break
    return Example(rng.choice(_SENTIMENT_PROMPTS).format(t=text), label, key=text)


def label_accuracy(prediction: str, example: Example) -> float:
    """100 when the first label word in the prediction is the reference label."""
    found = [w for w in metrics.words(prediction) if w in _LABELS]
    return 100.0 if found and found[0] == example.reference else 0.0


# ---- the registry -----------------------------------------------------------------------------------
def _build() -> dict[str, Task]:
    tasks = [
        Task(f"number_words_{lang}", f"write a number (0 to 9,999,999) in {_LANG_NAMES[lang]} words",
             ("chrf", "exact_match"), 48, _number_words(lang), ("num2words",))
        for lang in ("fr", "de", "es")
    ]
    tasks += [
        Task(f"date_{lang}", f"rewrite an English date (and time) the {_LANG_NAMES[lang]} way (CLDR)",
             ("exact_match", "chrf"), 24, _date(lang), ("babel",))
        for lang in ("fr", "de")
    ]
    tasks += [
        Task("table_to_text", "one fixed-order sentence with the asked facts from a table of country facts",
             ("rouge_l", "exact_match"), 64, _table_to_text, ("countryinfo", "babel")),
        Task("geography_qa", "capital, currency or demonym of a country; test questions paraphrased",
             ("exact_match",), 16, _geography_qa, ("countryinfo", "babel"), assign=_geography_split),
        Task("arithmetic", "two-step word problems: the calculation, then its result",
             ("final_number_match", "exact_match"), 24, _arithmetic),
        Task("python_expr", "English description -> Python expression, scored by execution",
             ("execution_match", "exact_match"), 32, _python_expr,
             scorers={"execution_match": execution_match}),
        Task("sentiment", "label a short review positive / negative / neutral as VADER does",
             ("accuracy",), 4, _sentiment, ("vaderSentiment",), scorers={"accuracy": label_accuracy}),
    ]
    return {t.name: t for t in tasks}


TASKS: dict[str, Task] = _build()


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; choose from {', '.join(TASKS)}") from None


def write_task_data(task: Task, out_dir: Path, seed: int, n_train: int, n_calib: int,
                    n_test: int) -> dict[str, Path]:
    """Write ``out_dir/{train,calib,test}.jsonl``; returns split -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in zip(SPLITS, (n_train, n_calib, n_test)):
        path = out_dir / f"{split}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for ex in task.examples(split, n, seed):
                fh.write(json.dumps(ex.to_record(), ensure_ascii=False) + "\n")
        paths[split] = path
    return paths


def read_examples(path: Path) -> list[Example]:
    """Read a file written by ``write_task_data`` back into examples (for scoring)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read task data {path}: {exc}") from exc
    if not rows or any("prompt" not in r or "response" not in r for r in rows):
        raise DataError(f"{path}: expected non-empty jsonl rows with 'prompt' and 'response'")
    return [Example(r["prompt"], r["response"], extra=r.get("extra") or {}) for r in rows]
