"""BABILong-style stories: bAbI-like facts hidden in long distractor text, as token ids and as words.

BABILong (Kuratov et al., 2024) hides the facts of a bAbI question-answering task among
sentences of PG19 books and asks the question at the end, at lengths up to millions of tokens.
This is a BABILong-style generator, not BABILong: the distractor sentences are synthetic
(drawn from a small lexicon that never names a person or a place), the fact templates are
our own, and the text lives in a word-level vocabulary of a few dozen words.

  qa1_single_fact   QA1, single supporting fact: people move between locations
                    ("Mary went to the kitchen."); the question "So where is Mary kitchen."
                    is answered (kitchen) by that person's LATEST location, so a memory must
                    overwrite what it stored: the reason ARMT's delta rule exists.

A story is S segments of n = 6 * K tokens: K sentence slots of 6 words each. The facts sit
in random slots of the first S - 1 segments, in time order, at most one per segment (so
"latest" is decided by the memory's overwrite, not inside one segment's attention); every
other slot holds a distractor; the last segment is K - Q distractors and Q questions `so where is NAME LOC .`, whose
LOC is the answer (the only labelled token). A question segment holds no fact, so a model
that sees it alone (memory zeroed) can only guess: chance = 1 / number of locations.

Why the answer follows the name, not a `?`: the row that predicts the answer is then the
name's own row, whose associative read can use the name as its query in the first layer.
With `where is NAME ? LOC` the `?` row predicts, and a 2-layer model must first move the
name there. In our CPU pilots such models answered with the latest move of anyone (93 % of
answers on 3-segment stories; right 20-24 % of the time when the other person was asked):
nine runs (2-3 layers, 1-4 sentences a segment, 2-3 people, lr 1e-3 or 2e-3) stayed
there, the longest for 2,250 steps. With the name-first form two seeds got past it after
about 1,250 steps. BABILong asks in free text; this is a toy's concession.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ._checks import check_int

SENTENCE = 6   # words per sentence slot: every fact, distractor and the question fill one slot

NAMES = ("Mary", "John", "Sandra", "Daniel", "Emma", "Peter", "Lucy", "Omar")
LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
MOVES = ("went", "moved", "journeyed", "travelled")
FUNCTION = ("<pad>", ".", "?", "where", "is", "to", "the", "a", "it", "was", "and")
# the distractor lexicon: no person, no place, no movement verb, no "to"
ADJECTIVES = ("old", "quiet", "cold", "bright", "small", "heavy", "green", "soft", "late", "warm")
NOUNS = ("clock", "dog", "rain", "lamp", "letter", "river", "song", "wind", "book", "candle", "cat", "bell")
ACTIONS = ("ticked", "slept", "fell", "glowed", "waited", "shone", "rang", "stopped")     # the ADJ NOUN ACTION ADVERB .
OBJECT_VERBS = ("watched", "found", "followed", "heard", "touched", "passed")       # a NOUN VERB the NOUN .
ADVERBS = ("slowly", "softly", "again", "loudly", "quietly", "once")


@dataclass(frozen=True)
class StoryVocab:
    """The word-level vocabulary and its tokenizer: every word one id, ids in a fixed order."""

    words: tuple[str, ...] = (FUNCTION + NAMES + LOCATIONS + MOVES + ADJECTIVES + NOUNS + ACTIONS
                              + OBJECT_VERBS + ADVERBS + ("so",))   # "so" opens a question

    def __post_init__(self):
        if len(set(self.words)) != len(self.words):
            raise ValueError("StoryVocab.words must not repeat a word")

    @property
    def size(self) -> int:
        """Smallest model vocabulary that holds every word."""
        return len(self.words)

    @property
    def chance(self) -> float:
        """Accuracy of a model that knows the answer is a location but not which one."""
        return 1.0 / len(LOCATIONS)

    def ids(self, words) -> list[int]:
        index = self._index
        return [index[w] for w in words]

    @cached_property
    def _index(self) -> dict[str, int]:
        """word -> id, built once per vocabulary (cached_property writes past the frozen dataclass)."""
        return {w: i for i, w in enumerate(self.words)}

    def describe(self, token: int) -> str:
        """The word of one id (what TaskBatch-style renderers call)."""
        return self.words[token]

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Words are split on spaces, '.' and '?' are words of their own, a
        capital at a sentence start is lowered unless the word is a name."""
        index = self._index
        out = []
        for raw in text.replace(".", " . ").replace("?", " ? ").split():
            word = raw if raw in index else raw[0].lower() + raw[1:]
            if word not in index:
                raise ValueError(f"unknown word {raw!r}: the story vocabulary has {self.size} fixed words "
                                 f"(StoryVocab().words lists them); write the text with those words only")
            out.append(index[word])
        return out

    def decode(self, ids) -> str:
        """Ids -> text: sentences capitalised, '.' and '?' attached, padding dropped;
        decode(encode(t)) == t for text written that way, encode(decode(ids)) == ids without padding."""
        words = [self.words[int(i)] for i in ids if int(i) != 0]
        out, start = [], True
        for w in words:
            if w in (".", "?"):
                out[-1:] = [(out[-1] if out else "") + w]
                start = True
                continue
            out.append(w[0].upper() + w[1:] if start else w)
            start = False
        return " ".join(out)


VOCAB = StoryVocab()
SAMPLES_SEED = 99_999_999   # fixed samples (the notebook's stories, tasks' data/ samples); no run's seed reaches it


@dataclass
class StoryBatch:
    """A batch of stories, with the field names of tasks.TaskBatch so train.predict reads both.

    Shapes: B stories, N = S * n tokens, Q = 1 question per story, F facts per story."""

    input_ids: torch.Tensor     # (B, N) long
    labels: torch.Tensor        # (B, N) long, -100 except at the answer
    answers: torch.Tensor       # (B, 1) the location token that answers the question
    answer_pos: torch.Tensor    # (B, 1) its position in input_ids (its logits sit at pos - 1)
    keys: torch.Tensor          # (B, 1) the name token asked about
    distance: torch.Tensor      # (B, 1) segments between the person's latest move and the question
    fact_pos: torch.Tensor      # (B, F) position of each fact's first word, in time order
    segment_size: int
    task: str
    seed: int
    vocab: StoryVocab = VOCAB

    @property
    def num_segments(self) -> int:
        return self.input_ids.shape[1] // self.segment_size

    def text(self, i: int, mark: bool = False) -> str:
        """Story i as text, one segment per line; mark=True puts [brackets] around its facts
        and its questions."""
        ids = self.input_ids[i].tolist()
        marked = set(self.fact_pos[i].tolist()) | {p - 4 for p in self.answer_pos[i].tolist()}
        sentences = [self.vocab.decode(ids[a:a + SENTENCE]) for a in range(0, len(ids), SENTENCE)]
        if mark:
            sentences = [f"[{t}]" if SENTENCE * j in marked else t for j, t in enumerate(sentences)]
        per_line = self.segment_size // SENTENCE
        return "\n".join(" ".join(sentences[a:a + per_line]) for a in range(0, len(sentences), per_line))


def _distractors(count: int, g: torch.Generator, vocab: StoryVocab) -> torch.Tensor:
    """count distractor sentences, (count, SENTENCE) ids, from three templates:
    'the ADJ NOUN ACTION ADVERB .', 'a NOUN OBJECT_VERB the NOUN .', 'it was ADJ and ADJ .'."""
    def pick(words, k=1):
        return torch.tensor(vocab.ids(words))[torch.randint(0, len(words), (count, k), generator=g)]  # (count, k)
    const = {w: torch.full((count, 1), vocab.ids([w])[0]) for w in ("the", "a", "it", "was", "and", ".")}
    t0 = torch.cat([const["the"], pick(ADJECTIVES), pick(NOUNS), pick(ACTIONS), pick(ADVERBS), const["."]], 1)
    t1 = torch.cat([const["a"], pick(NOUNS), pick(OBJECT_VERBS), const["the"], pick(NOUNS), const["."]], 1)
    t2 = torch.cat([const["it"], const["was"], pick(ADJECTIVES), const["and"], pick(ADJECTIVES), const["."]], 1)
    which = torch.randint(0, 3, (count, 1), generator=g)                                     # (count, 1)
    return torch.where(which == 0, t0, torch.where(which == 1, t1, t2))                       # (count, SENTENCE)


def qa1_single_fact(batch_size: int, num_segments: int, sentences_per_segment: int = 2, facts: int = 4,
                    people: int = 2, questions: int = 1, seed: int = 0, vocab: StoryVocab = VOCAB) -> StoryBatch:
    """QA1 stories: `facts` moves of `people` people among distractors; `questions` questions
    "so where is NAME LOC ." close the last segment.

    Every move sends a person to a location other than the one they are in, and the person
    asked about made at least one move, so the answer is always a real overwrite target.
    Deterministic in seed; each story of the batch is drawn independently.
    """
    S, K, F, P, Q, B = num_segments, sentences_per_segment, facts, people, questions, batch_size
    check_int("batch_size", B, 1)
    check_int("num_segments", S, 2)
    check_int("sentences_per_segment", K, 1)
    check_int("people", P, 1, len(NAMES))
    check_int("facts", F, 1)
    if F > S - 1:
        raise ValueError(f"facts ({F}) must be at most num_segments - 1 = {S - 1}: one fact per segment, none "
                         f"in the question's (raise num_segments or lower facts)")
    check_int("questions", Q, 1, K)
    g = torch.Generator().manual_seed(seed)
    n = SENTENCE * K
    segs = torch.rand(B, S - 1, generator=g).argsort(-1)[:, :F].sort(-1).values              # (B, F) fact segments
    slots = segs * K + torch.randint(0, K, (B, F), generator=g)                              # (B, F) fact slots
    cast = torch.rand(B, len(NAMES), generator=g).argsort(-1)[:, :P]                         # (B, P) name indices
    who = torch.randint(0, P, (B, F), generator=g)                                           # (B, F) index into cast
    # each move goes somewhere new: an offset 1..len-1 from the person's current place
    hops = torch.randint(1, len(LOCATIONS), (B, F), generator=g)                             # (B, F)
    start = torch.randint(0, len(LOCATIONS), (B, P), generator=g)                            # (B, P) unseen start places
    where = torch.empty(B, F, dtype=torch.long)
    here = start.clone()
    for f in range(F):
        rows = torch.arange(B)
        here[rows, who[:, f]] = (here[rows, who[:, f]] + hops[:, f]) % len(LOCATIONS)
        where[:, f] = here[rows, who[:, f]]
    asked_fact = torch.randint(0, F, (B, Q), generator=g)                                   # ask about movers
    asked = who.gather(1, asked_fact)                                                        # (B, Q) index into cast
    moves_of = who[:, None, :] == asked[..., None]                                           # (B, Q, F)
    latest = torch.where(moves_of, torch.arange(F), -1).max(-1).values                      # (B, Q) their last move

    text = _distractors(B * S * K, g, vocab).view(B, S * K, SENTENCE)                        # (B, S*K, 6)
    name_ids = torch.tensor(vocab.ids(NAMES))
    loc_ids = torch.tensor(vocab.ids(LOCATIONS))
    move_ids = torch.tensor(vocab.ids(MOVES))
    to, the, dot, so, where_, is_ = vocab.ids(["to", "the", ".", "so", "where", "is"])
    names = name_ids[cast.gather(1, who)]                                                    # (B, F)
    verbs = move_ids[torch.randint(0, len(MOVES), (B, F), generator=g)]                      # (B, F)
    fact = torch.stack([names, verbs, torch.full_like(names, to), torch.full_like(names, the),
                        loc_ids[where], torch.full_like(names, dot)], -1)                    # (B, F, 6)
    text.scatter_(1, slots[..., None].expand(-1, -1, SENTENCE), fact)
    asked_name = name_ids[cast.gather(1, asked)]                                             # (B, Q)
    answer = loc_ids[where.gather(1, latest)]                                                # (B, Q)
    const = lambda w: torch.full_like(asked_name, w)                                        # noqa: E731
    text[:, S * K - Q:] = torch.stack([const(so), const(where_), const(is_), asked_name, answer, const(dot)],
                                      -1)                                                    # (B, Q, 6)
    ids = text.reshape(B, S * n)                                                             # (B, N)
    answer_pos = S * n - SENTENCE * (Q - 1 - torch.arange(Q)).expand(B, Q) - 2              # (B, Q)
    labels = torch.full_like(ids, -100)
    labels.scatter_(1, answer_pos, answer)
    latest_slot = slots.gather(1, latest)                                                    # (B, Q)
    return StoryBatch(ids, labels, answer, answer_pos, asked_name, (S - 1) - latest_slot // K,
                      slots * SENTENCE, n, "qa1", seed, vocab)
