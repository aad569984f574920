"""Long-context quality tasks, generated here with seeded randomness (nothing is downloaded).

Every prompt is built directly in token ids, so its length is exactly the requested context (the
chat template, the question and the answer prefix included) and the same seed gives the same ids.
Tasks (RULER-style, Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?"; passkey after Mohtashami & Jaggi 2023):

    passkey           a 5-digit pass key in repeated filler sentences
    niah              one "special magic number" for a key, in natural English (pydoc topics)
    niah_multikey     the same, with 3 distractor needles under other keys
    niah_multivalue   4 numbers under the same key; all must be answered
    vt                variable tracking: a chain X1 = value, X2 = X1, ...; name every variable
    agreement         greedy output vs the full cache's, over the first N tokens (no fixed answer)
    ppl               teacher-forced continuation of natural text (perplexity, top-1 accuracy)

The haystack of a prompt is a list of whole sentences (filler or natural), truncated at the end to
hit the length; needles are whole sentences inserted at a sentence boundary, so a needle's depth
(fraction of haystack tokens before it) is within one sentence of the requested depth.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

Encode = Callable[[str], list[int]]

TASKS = ("passkey", "niah", "niah_multikey", "niah_multivalue", "vt", "agreement", "ppl")
NEEDLE_TASKS = ("passkey", "niah", "niah_multikey", "niah_multivalue", "vt")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
KEY_WORDS = (
    "amber", "brisk", "cobalt", "dusty", "eager", "fabled", "gentle", "hollow", "ivory", "jolly", "keen",
    "lunar", "mellow", "nimble", "opal", "proud", "quiet", "rustic", "silver", "tidy", "urban", "vivid",
    "wary", "young", "zesty",
)
KEY_NOUNS = (
    "anchor", "badger", "canyon", "dolphin", "ember", "falcon", "garden", "harbor", "island", "jungle",
    "kettle", "lantern", "meadow", "nectar", "orchard", "pepper", "quartz", "river", "saddle", "tunnel",
    "umbrella", "violin", "walnut", "yarrow", "zephyr",
)
MAX_SENTENCE_TOKENS = 60  # longer natural sentences (code, tables) are left out of the haystack
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.")
SUMMARY_QUESTION = "Summarize the text above in a few sentences."


@dataclass(frozen=True)
class Sample:
    """One prompt: token ids, what a correct answer must contain, and where the needles are."""

    task: str
    context: int  # requested prompt length in tokens (len(prompt_ids) == context)
    depth: float | None  # requested depth of the (first) needle, 0 = start of the haystack
    index: int  # sample number within (task, context, depth)
    prompt_ids: tuple[int, ...]
    answers: tuple[str, ...] = ()  # every one must appear in the output
    needles: tuple[str, ...] = ()  # needle sentences inside the prompt (each exactly once)
    needle_depths: tuple[float, ...] = ()  # actual depth of each needle (fraction of haystack tokens)
    continuation_ids: tuple[int, ...] = ()  # ppl: the text that follows, to be teacher-forced
    max_tokens: int = 0
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def key(self) -> tuple:
        return (self.task, self.context, self.depth, self.index)


@functools.lru_cache(maxsize=1)
def natural_sentences() -> tuple[str, ...]:
    """English sentences from Python's own reference docs (`pydoc_data/topics.py`), whitespace folded."""
    import pydoc_data.topics as topics

    text = re.sub(r"\s+", " ", " ".join(topics.topics.values()))
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)
    return tuple(p for p in (s.strip() for s in parts) if 4 <= len(p.split()) and re.search(r"[a-z]", p))


class PromptBuilder:
    """Builds exact-length token prompts for one tokenizer.

    `encode(text)` must return token ids without special tokens; `chat(content)` the chat-templated
    prompt text for one user turn with the generation prompt (None: plain text, no template)."""

    def __init__(self, encode: Encode, chat: Callable[[str], str] | None = None) -> None:
        self.encode = encode
        marker = "\x00CONTENT\x00"
        if chat is None:
            self.head, self.tail = [], []
        else:
            templated = chat(marker)
            if templated.count(marker) != 1:
                raise ValueError("chat template must place the user content exactly once")
            head, tail = templated.split(marker)
            self.head, self.tail = encode(head), encode(tail)
        self._sentence_ids: dict[str, list[int]] = {}

    def sentence(self, text: str) -> list[int]:
        ids = self._sentence_ids.get(text)
        if ids is None:
            ids = self._sentence_ids[text] = self.encode(" " + text)
        return ids

    def haystack(self, source: Sequence[str], start: int, n_tokens: int) -> list[list[int]]:
        """Whole sentences from `source` (cyclic, from `start`) totalling exactly n_tokens (last one cut)."""
        out: list[list[int]] = []
        total, i = 0, start
        while total < n_tokens:
            ids = self.sentence(source[i % len(source)])
            i += 1
            if len(ids) > MAX_SENTENCE_TOKENS:
                continue
            out.append(ids[: n_tokens - total])
            total += len(out[-1])
        return out

    def build(self, n_tokens: int, source: Sequence[str], start: int, needles: Sequence[tuple[float, str]],
              question: str, answer_prefix: str, intro: str = "") -> tuple[list[int], list[float]]:
        """Prompt ids of exactly n_tokens: template head, haystack with needles, question, tail, prefix.

        needles: (depth, sentence) pairs. Returns the ids and each needle's actual depth."""
        q_ids = self.encode("\n\n" + question) if question else []
        i_ids = self.encode(intro + "\n\n") if intro else []
        a_ids = self.encode(answer_prefix) if answer_prefix else []
        needle_ids = [self.sentence(text) for _, text in needles]
        fixed = len(self.head) + len(i_ids) + len(q_ids) + len(self.tail) + len(a_ids) + sum(map(len, needle_ids))
        room = n_tokens - fixed
        if room < 16:
            raise ValueError(f"context={n_tokens} is too short for this task (needs more than {fixed + 16} tokens)")
        sentences = self.haystack(source, start, room)
        starts = [0]
        for s in sentences:
            starts.append(starts[-1] + len(s))
        # needle i goes before the sentence boundary nearest its depth (stable for equal boundaries)
        slots = sorted(
            ((min(range(len(starts) - 1), key=lambda b: abs(starts[b] - d * room)), k) for k, (d, _) in enumerate(needles))
        )
        ctx: list[int] = []
        actual = [0.0] * len(needles)
        nxt = 0
        for b, sent in enumerate(sentences):
            while nxt < len(slots) and slots[nxt][0] == b:
                k = slots[nxt][1]
                actual[k] = len(ctx) / (room + sum(map(len, needle_ids)))
                ctx.extend(needle_ids[k])
                nxt += 1
            ctx.extend(sent)
        ids = self.head + i_ids + ctx + q_ids + self.tail + a_ids
        assert len(ids) == n_tokens, (len(ids), n_tokens)
        return ids, actual


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(KEY_WORDS)}-{rng.choice(KEY_NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def _number(rng: random.Random, digits: int, taken: set[str]) -> str:
    while True:
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if value not in taken:
            taken.add(value)
            return value


def _var_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in taken:
            taken.add(name)
            return name


def make_sample(builder: PromptBuilder, task: str, context: int, depth: float | None, index: int, seed: int,
                max_tokens: int = 0, continuation: int = 64) -> Sample:
    """One sample of `task`; the same arguments give the same ids."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {', '.join(TASKS)}")
    rng = random.Random(f"{seed}/{task}/{context}/{depth}/{index}")
    natural = natural_sentences()
    start = rng.randrange(len(natural))
    d = 0.5 if depth is None else depth
    taken: set[str] = set()
    if task == "passkey":
        key = _number(rng, 5, taken)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        ids, depths = builder.build(context, FILLER, rng.randrange(len(FILLER)), [(d, needle)],
                                    "What is the pass key?", "The pass key is", intro=INTRO)
        return Sample(task, context, depth, index, tuple(ids), (key,), (needle,), tuple(depths), max_tokens=max_tokens or 12)
    if task in ("niah", "niah_multikey", "niah_multivalue"):
        key = _key(rng, taken)
        values = [_number(rng, 7, taken) for _ in range(4 if task == "niah_multivalue" else 1)]
        needles = [(d, f"One of the special magic numbers for {key} is: {values[0]}.")]
        needles += [(rng.random(), f"One of the special magic numbers for {key} is: {v}.") for v in values[1:]]
        if task == "niah_multikey":
            needles += [(rng.random(), f"One of the special magic numbers for {_key(rng, taken)} is: {_number(rng, 7, taken)}.")
                        for _ in range(3)]
        if task == "niah_multivalue":
            question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
            prefix = f"The special magic numbers for {key} mentioned in the provided text are"
        else:
            question = f"What is the special magic number for {key} mentioned in the provided text?"
            prefix = f"The special magic number for {key} mentioned in the provided text is"
        ids, depths = builder.build(context, natural, start, needles, question, prefix)
        return Sample(task, context, depth, index, tuple(ids), tuple(values), tuple(t for _, t in needles),
                      tuple(depths), max_tokens=max_tokens or (16 * len(values) + 8), meta={"key": key})
    if task == "vt":
        value = _number(rng, 5, taken)
        names = [_var_name(rng, taken) for _ in range(4)]
        lines = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        # the chain keeps its order; the first statement at `depth`, the rest spread after it
        step = (1.0 - d) / len(lines)
        needles = [(d + k * step, line) for k, line in enumerate(lines)]
        question = f"Find all variables that are assigned the value {value} in the text above."
        prefix = (f"Answer: According to the chain of variable assignment in the text above, {len(names)} "
                  f"variables are assigned the value {value}, they are:")
        ids, depths = builder.build(context, FILLER, rng.randrange(len(FILLER)), needles, question, prefix)
        return Sample(task, context, depth, index, tuple(ids), tuple(names), tuple(lines), tuple(depths),
                      max_tokens=max_tokens or 30)
    if task == "agreement":
        ids, _ = builder.build(context, natural, start, [], SUMMARY_QUESTION, "")
        return Sample(task, context, None, index, tuple(ids), max_tokens=max_tokens or 32)
    # ppl: plain natural text (no template) and the sentences that follow it
    plain = PromptBuilder(builder.encode, None)
    plain._sentence_ids = builder._sentence_ids
    sentences = plain.haystack(natural, start, context + continuation)
    flat = [t for s in sentences for t in s]
    return Sample(task, context, None, index, tuple(flat[:context]),
                  continuation_ids=tuple(flat[context : context + continuation]), max_tokens=continuation)


def make_samples(builder: PromptBuilder, tasks: Sequence[str], contexts: Sequence[int], depths: Sequence[float],
                 samples: int, seed: int, progress: Callable[[int], None] | None = None) -> list[Sample]:
    """The grid tasks x contexts x depths x samples, in a fixed order. Tasks without a needle get
    len(depths) x samples samples, so every task has the same n per context."""
    out: list[Sample] = []
    for task in tasks:
        for context in contexts:
            needle = task in NEEDLE_TASKS
            for depth in (depths if needle else (None,)):
                for i in range(samples if needle else samples * len(depths)):
                    out.append(make_sample(builder, task, context, depth, i, seed))
                    if progress:
                        progress(1)
    return out


def hf_builder(tokenizer) -> PromptBuilder:
    """A PromptBuilder for a Hugging Face tokenizer with a chat template."""

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat(content: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)

    return PromptBuilder(encode, chat)
