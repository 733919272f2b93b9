"""The embedded byte-level BPE tokenizer, built without the tokenizers trainer.

The trainer breaks ties differently across processes; this fixed loop (ties to the lexically
smallest pair) over a fixed corpus gives the same vocabulary and merges everywhere.
"""

from __future__ import annotations

from collections import Counter

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
VOCAB_SIZE = 512  # 256 bytes + learned merges + 4 specials; a multiple of 64 so no padding
# A few paragraphs of plain English for the BPE merges; changing a byte changes every model.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model that runs on a laptop is enough to
test a serving system, because the system does not care what the model knows, only that it
computes the same numbers every time. The prefill worker reads the whole prompt at once and
writes its keys and values into the cache. The decode worker then reads one token at a time
and appends to the cache, block by block, until the request is finished.

In the morning the market was quiet. People walked along the river, talking about the weather,
the price of bread, and the news from the city. A man sold coffee from a cart near the bridge,
and a woman with a red umbrella stopped to buy a cup. It was going to rain again, she said,
and the children would have to play inside for the rest of the day.

def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(i, fibonacci(i))

Once upon a time there was a little house at the edge of a forest. In the house there lived an
old woman and her cat. Every evening the cat sat by the window and watched the trees, and every
evening the old woman told it a story about the places she had seen when she was young: the
mountains in the north, the sea in the south, and the long road that ran between them.

The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
Numbers count things: one, two, three, four, five, six, seven, eight, nine, ten. 1, 2, 3, 4, 5.
What is the time? It is half past seven. Where are you going? I am going home. Hello, my name
is Sam, and this is my friend. How are you today? I am fine, thank you, and you?
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, as the ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def learn_merges(corpus: str, num_tokens: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE up to num_tokens entries; ties go to the lexically smallest pair."""
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    word_counts = Counter(piece for piece, _ in pre_tokenizer.pre_tokenize_str(corpus))
    words = {tuple(word): count for word, count in sorted(word_counts.items())}
    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[byte]: byte for byte in range(256)}
    merges: list[tuple[str, str]] = []
    while len(vocab) < num_tokens:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pair_counts[pair] += count
        if not pair_counts:
            raise RuntimeError(f"corpus too small for {num_tokens} tokens; got {len(vocab)}")
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        words = {_merge_word(word, best): count for word, count in words.items()}
    return vocab, merges


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    i = 0
    while i < len(word):
        if word[i : i + 2] == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def build_tokenizer() -> Tokenizer:
    """The byte-level BPE every generated model ships, with its four special tokens."""
    vocab, merges = learn_merges(CORPUS, VOCAB_SIZE - len(SPECIAL_TOKENS))
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS])
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


