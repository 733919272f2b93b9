"""Output token ids to text, released as soon as it is final, and cut at the first stop string."""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.tokenizer import Tokenizer

# What a byte-level decode renders for bytes that do not (yet) form a whole UTF-8 character.
_REPLACEMENT = "\ufffd"


class TextStream:
    """The text of one request's output, fed token chunks as the workers produce them.

    `push` returns only text that is final: a trailing incomplete character is held until its
    last bytes arrive, and a trailing piece that could still grow into a stop string is held
    until it cannot. Whatever the chunking, the pushes' results followed by `finish()` join to
    `tokenizer.decode(all_ids)` cut before the earliest-starting stop string. So a stop string
    that completes is acted on only once no stop string starting earlier can still complete
    (stops "abcd" and "c" on "abc": wait for the next character).
    """

    __slots__ = (
        "_tokenizer", "_stop_strings", "_max_stop_len", "_skip_special_tokens", "_token_ids",
        "_prefix_offset", "_read_offset", "_num_new_chars_taken", "_pending", "_pieces",
        "_stop_reason", "_is_finished",
    )

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop_strings: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        for index, stop in enumerate(stop_strings):
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop_strings[{index}] must be a non-empty str, got {stop!r}")
        self._tokenizer = tokenizer
        self._stop_strings = tuple(stop_strings)
        self._max_stop_len = max(map(len, self._stop_strings), default=0)
        self._skip_special_tokens = skip_special_tokens
        self._token_ids: list[int] = []
        # Each push decodes only ids[prefix_offset:]. ids[prefix_offset:read_offset] were
        # already turned into text; they are decoded again as context because some decoders
        # render a token differently at the start of a decode (a stripped leading space).
        self._prefix_offset = 0
        self._read_offset = 0
        # Characters past ids[:read_offset]'s text already taken while a later one is incomplete.
        self._num_new_chars_taken = 0
        self._pending = ""  # decoded but held back: it may be the start of a stop string
        self._pieces: list[str] = []
        self._stop_reason: str | None = None
        self._is_finished = False

    @property
    def text(self) -> str:
        """Everything returned so far by `push` and `finish`."""
        if len(self._pieces) > 1:
            self._pieces[:] = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def stopped(self) -> bool:
        return self._stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        """The stop string the text was cut before, or None."""
        return self._stop_reason

    def push(self, token_ids: Sequence[int]) -> str:
        """Add newly generated ids; return the text that became final (possibly "")."""
        if self._is_finished:
            raise RuntimeError("TextStream.push called after finish()")
        if self._stop_reason is not None:
            return ""  # ids generated past a stop string are not part of the output
        self._token_ids.extend(token_ids)
        new_text = self._decode_new()
        if new_text.endswith(_REPLACEMENT):
            # The next ids may complete the character, so the offsets stay; the characters
            # before it are final, though, and go out now.
            complete_text = new_text.rstrip(_REPLACEMENT)
            fresh_text = complete_text[self._num_new_chars_taken :]
            self._num_new_chars_taken = len(complete_text)
        else:
            fresh_text = new_text[self._num_new_chars_taken :]
            self._num_new_chars_taken = 0
            self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
        return self._release(self._pending + fresh_text, is_final=False)

    def finish(self) -> str:
        """No more ids will come: return everything still held back."""
        if self._is_finished or self._stop_reason is not None:
            self._is_finished = True
            return ""
        self._is_finished = True
        # A trailing incomplete character stays as decode renders it, U+FFFD.
        fresh_text = self._decode_new()[self._num_new_chars_taken :]
        return self._release(self._pending + fresh_text, is_final=True)

    def _decode_new(self) -> str:
        ids = self._token_ids
        skip = self._skip_special_tokens
        prefix_text = self._tokenizer.decode(ids[self._prefix_offset : self._read_offset], skip)
        window_text = self._tokenizer.decode(ids[self._prefix_offset :], skip)
        if not window_text.startswith(prefix_text):
            raise RuntimeError(
                f"decoding more ids changed earlier text: {prefix_text!r} -> {window_text!r}"
            )
        return window_text[len(prefix_text) :]

    def _release(self, candidate: str, is_final: bool) -> str:
        # candidate is the pending text plus new text. No stop string can start in text
        # already released (it would have been held), so searching candidate alone suffices.
        stop_start, stop = self._earliest_stop(candidate)
        hold_start = len(candidate) if is_final else self._earliest_partial_stop(candidate)
        if stop is not None and stop_start <= hold_start:
            self._stop_reason = stop
            released, self._pending = candidate[:stop_start], ""
        else:
            released, self._pending = candidate[:hold_start], candidate[hold_start:]
        if released:
            self._pieces.append(released)
        return released

    def _earliest_stop(self, text: str) -> tuple[int, str | None]:
        best_start, best_stop = len(text), None
        for stop in self._stop_strings:
            start = text.find(stop)
            if start != -1 and (best_stop is None or start < best_start):
                best_start, best_stop = start, stop
        return best_start, best_stop

    def _earliest_partial_stop(self, text: str) -> int:
        """Where the longest suffix of text that begins some stop string starts."""
        for start in range(max(0, len(text) - self._max_stop_len + 1), len(text)):
            suffix = text[start:]
            if any(stop.startswith(suffix) for stop in self._stop_strings):
                return start
        return len(text)
