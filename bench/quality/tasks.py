"""Long-context tasks, generated deterministically from a seed, with no download (RULER-style).

Every prompt is built at the token level to exactly ``length`` tokens, so prompts of one task and
length batch without padding. A prompt is ``context_ids + query_ids``: the context holds the
haystack (standard-library prose, see ``corpus.py``) with the needles; the query is the closing
question, in completion style ("... The pass key is"), which is what SmolLM2-135M answers (as a
chat question it fails, see shared/model.md). The split matters only to the kvpress peer, whose
protocol compresses the context and appends the query uncompressed.

Tasks (registered with :func:`task`; the runner and the tests iterate ``TASKS``):
- ``passkey``: one 5-digit pass key in the haystack.
- ``multikey``: four keys with 6-digit values (three distractors); ask for one.
- ``multivalue``: one key with three values; ask for all (score: recall).
- ``vartrack``: a chain of assignments VAR A = n, VAR B = VAR A, VAR C = VAR B plus a distractor
  chain; ask for every variable holding n (score: recall of the three names).
- ``docqa``: a question over the document itself: which words follow six given words of one of its
  sentences (score: fraction of the next four words reproduced in order).
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
from collections.abc import Callable

from . import corpus

_KEYS = (
    "amber-harbor silent-orchard copper-falcon hidden-meadow crimson-lantern frozen-river golden-anchor "
    "quiet-valley rusty-compass velvet-thunder misty-canyon bright-pebble hollow-oak electric-sparrow "
    "painted-desert lucky-ember scarlet-island woolen-comet brave-tundra gentle-volcano"
).split()


@dataclasses.dataclass(frozen=True)
class Prompt:
    task: str
    length: int
    index: int
    context_ids: tuple[int, ...]
    query_ids: tuple[int, ...]
    answers: tuple[str, ...]
    max_new_tokens: int

    @property
    def input_ids(self) -> list[int]:
        return [*self.context_ids, *self.query_ids]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    build: Callable  # (rng, filler, tokenizer, length) -> (context_ids, query_ids, answers)
    score: Callable[[tuple[str, ...], str], float]
    max_new_tokens: int


TASKS: dict[str, Task] = {}


def task(name: str, *, max_new_tokens: int, score: Callable[[tuple[str, ...], str], float]):
    def register(build):
        TASKS[name] = Task(name, build, score, max_new_tokens)
        return build

    return register


def make_prompts(task_name: str, tokenizer, length: int, n: int, seed: int = 0) -> list[Prompt]:
    """``n`` prompts of exactly ``length`` tokens; the same (task, length, index, seed) gives the same prompt."""
    spec = TASKS[task_name]
    filler = _Filler(tokenizer)
    out = []
    for index in range(n):
        rng = random.Random(f"{seed}:{task_name}:{length}:{index}")
        context, query, answers = spec.build(rng, filler, tokenizer, length)
        assert len(context) + len(query) == length, (task_name, len(context), len(query), length)
        out.append(Prompt(task_name, length, index, tuple(context), tuple(query), answers, spec.max_new_tokens))
    return out


def score(task_name: str, answers: tuple[str, ...], output: str) -> float:
    """Score in [0, 1] of a generated continuation ``output`` against the prompt's answers."""
    return TASKS[task_name].score(answers, output)


# -- scorers --------------------------------------------------------------------------------------


def _all_or_nothing(answers: tuple[str, ...], output: str) -> float:
    return float(all(re.search(rf"(?<![\w]){re.escape(a)}(?![\w])", output) for a in answers))


def _recall(answers: tuple[str, ...], output: str) -> float:
    found = sum(bool(re.search(rf"(?<![\w]){re.escape(a)}(?![\w])", output)) for a in answers)
    return found / len(answers)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _prefix_words(answers: tuple[str, ...], output: str) -> float:
    expected, got = _words(" ".join(answers)), _words(output)
    matched = 0
    for want, have in zip(expected, got):
        if want != have:
            break
        matched += 1
    return matched / len(expected)


# -- prompt assembly ------------------------------------------------------------------------------


class _Filler:
    """Haystack sentences, tokenized once, drawn from a seed-chosen offset of the corpus."""

    def __init__(self, tokenizer):
        self.sentences = corpus.sentences()
        self._tok = tokenizer
        self._ids: dict[int, list[int]] = {}

    def ids(self, i: int) -> list[int]:
        if i not in self._ids:
            self._ids[i] = _encode(self._tok, " " + self.sentences[i])
        return self._ids[i]

    def draw(self, rng: random.Random, budget: int, exclude: frozenset[int] = frozenset()) -> list[list[int]]:
        """Consecutive sentences (wrapping around) totalling exactly ``budget`` tokens; the last is cut."""
        chunks, total, i = [], 0, rng.randrange(len(self.sentences))
        while total < budget:
            if i not in exclude:
                ids = self.ids(i)[: budget - total]
                chunks.append(ids)
                total += len(ids)
            i = (i + 1) % len(self.sentences)
        return chunks


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _assemble(rng, filler, tokenizer, length, head, needles, query, *, exclude=frozenset(), keep_order=False):
    """Head, haystack with the needles at random sentence boundaries, then the query: ``length`` tokens."""
    head_ids, query_ids = _encode(tokenizer, head), _encode(tokenizer, query)
    needle_ids = [_encode(tokenizer, " " + n) for n in needles]
    budget = length - len(head_ids) - len(query_ids) - sum(map(len, needle_ids))
    if budget < 16:
        raise ValueError(f"length {length} too short for this task's needles and query ({budget} filler tokens)")
    chunks = filler.draw(rng, budget, exclude)
    # Needles go at sentence boundaries inside the first 90% of the haystack: never first, and at
    # least ~50 tokens (at 512) before the query, so the kvpress peer, which reads the last few
    # tokens of a batch's longest question uncompressed, never gets a needle for free.
    offsets = [0]
    for chunk in chunks:
        offsets.append(offsets[-1] + len(chunk))
    allowed = [i for i in range(1, len(chunks)) if offsets[i] <= 0.9 * budget] or [1]
    slots = sorted(rng.choice(allowed) for _ in needle_ids)
    order = needle_ids if keep_order else rng.sample(needle_ids, len(needle_ids))
    # Insert from the back (ties: the later needle first) so earlier inserts don't shift later slots
    # and needles sharing a slot keep their order (vartrack's chains depend on it).
    for slot, _, ids in sorted(zip(slots, range(len(order)), order), key=lambda t: (-t[0], -t[1])):
        chunks.insert(slot, ids)
    context = head_ids + [t for chunk in chunks for t in chunk]
    return context, query_ids


_HEAD = "Some important information is hidden inside the following text. Find it and memorize it.\n"


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


@task("passkey", max_new_tokens=8, score=_all_or_nothing)
def _passkey(rng, filler, tokenizer, length):
    key = _number(rng, 5)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    query = "\nWhat is the pass key? The pass key is"
    return (*_assemble(rng, filler, tokenizer, length, _HEAD, [needle], query), (key,))


@task("multikey", max_new_tokens=9, score=_all_or_nothing)
def _multikey(rng, filler, tokenizer, length):
    keys = rng.sample(_KEYS, 4)
    values = [_number(rng, 6) for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    query = f"\nWhat is the special magic number for {keys[0]}? The special magic number for {keys[0]} is:"
    return (*_assemble(rng, filler, tokenizer, length, _HEAD, needles, query), (values[0],))


@task("multivalue", max_new_tokens=26, score=_recall)
def _multivalue(rng, filler, tokenizer, length):
    key = rng.choice(_KEYS)
    values = tuple(_number(rng, 6) for _ in range(3))
    needles = [f"One of the special magic numbers for {key} is: {v}." for v in values]
    query = f"\nWhat are all the special magic numbers for {key}? The special magic numbers for {key} are:"
    return (*_assemble(rng, filler, tokenizer, length, _HEAD, needles, query), values)


@task("vartrack", max_new_tokens=20, score=_recall)
def _vartrack(rng, filler, tokenizer, length):
    names = set()
    while len(names) < 6:
        names.add("".join(rng.choices(string.ascii_uppercase, k=5)))
    names = sorted(names)
    rng.shuffle(names)
    value, other = _number(rng, 5), _number(rng, 5)
    chains = []
    for chain, start in ((names[:3], value), (names[3:], other)):
        chains.append([f"VAR {chain[0]} = {start}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])])
    # Interleave the two chains, each kept in order, so every assignment follows the one it reads.
    needles = []
    a, b = list(chains[0]), list(chains[1])
    while a or b:
        source = a if (a and (not b or rng.random() < 0.5)) else b
        needles.append(source.pop(0))
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
    query = (
        f"\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
        f"According to the chain(s) of variable assignment in the text above, 3 variables are assigned "
        f"the value {value}, they are: VAR"
    )
    context, query_ids = _assemble(rng, filler, tokenizer, length, head, needles, query, keep_order=True)
    return context, query_ids, tuple(names[:3])


@task("docqa", max_new_tokens=8, score=_prefix_words)
def _docqa(rng, filler, tokenizer, length):
    # A sentence of the document whose first six words occur nowhere else in the corpus. At most 40
    # words: the sentence is both the needle and (its opening) in the query, and the corpus has
    # sentences of several hundred characters that leave no room for a haystack (seed 7681 at 768
    # byte-level tokens did).
    sentences = filler.sentences
    while True:
        i = rng.randrange(len(sentences))
        words = sentences[i].split()
        opening = " ".join(words[:6])
        if 12 <= len(words) <= 40 and sum(opening in s for s in sentences) == 1:
            break
    head = "Read the following documentation carefully.\n"
    query = f'\nQuestion: In the text above, which words follow "{opening}"? Answer: The text says "{opening}'
    answer = " ".join(words[6:10])
    context, query_ids = _assemble(
        rng, filler, tokenizer, length, head, [sentences[i]], query, exclude=frozenset({i})
    )
    return context, query_ids, (answer,)
