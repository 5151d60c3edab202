"""Special tokens and the tiny preset's word-level tokenizer (built offline from a corpus).

Every preset's tokenizer carries the same special tokens: `<think>`, `</think>` and the
reference token `<REF_POS>`, plus `<image>`, the placeholder a visual token replaces.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast

THINK_START = "<think>"
THINK_END = "</think>"
REF_TOKEN = "<REF_POS>"
IMAGE_TOKEN = "<image>"
USER_TOKEN = "<user>"
ASSISTANT_TOKEN = "<assistant>"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"

SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, IMAGE_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, THINK_START, THINK_END, REF_TOKEN]
# Tokens the model adds to a pretrained tokenizer.
ADDED_SPECIAL_TOKENS = [IMAGE_TOKEN, THINK_START, THINK_END, REF_TOKEN]

# Words every tiny tokenizer knows even if the corpus lacks them: digits for the box-text
# baseline and the punctuation the reference reasoning uses.
BASE_WORDS = [str(i) for i in range(100)] + [".", ",", ":", "?", "!", "'", "-", "box", "none", "answer"]

_WORD_RE = re.compile(r"\w+|[^\w\s]")


def split_words(text: str) -> list[str]:
    """The tiny tokenizer's word split (lower-cased words and single punctuation marks)."""
    return _WORD_RE.findall(text.lower())


def build_word_tokenizer(corpus: Iterable[str], min_count: int = 1) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer whose vocabulary is the corpus's words (plus specials and BASE_WORDS)."""
    counts = Counter(w for text in corpus for w in split_words(text))
    words = sorted(w for w, c in counts.items() if c >= min_count and w not in BASE_WORDS)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + BASE_WORDS + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
    )
    tok.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (PAD, UNK, BOS, EOS)]})
    return tok

# Enough words for an untrained tiny model to tokenize ShapeWorld-style text (tests, smoke runs);
# trained checkpoints carry the tokenizer built from their training corpus.
SHAPEWORLD_WORDS = (
    "the a an of is it to in on at and or not that which with all every each no there so find point "
    "segment show shape shapes object objects thing something one two three six corners corner "
    "circle triangle square diamond hexagon star circles triangles squares diamonds hexagons stars "
    "red green blue yellow purple orange white small medium large largest smallest biggest "
    "left right top bottom middle centre above below closest nearest leftmost rightmost highest lowest "
    "colour color looking for found anchor answer none objects"
).split()
