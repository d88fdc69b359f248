"""JSON mode for the transformers engine: a logits processor that keeps the output a JSON object.

At every step only the tokens whose text keeps the output a valid prefix of a JSON object are
allowed; once the object is complete the generation stops (the engine's stopping criterion
reads :attr:`JsonMode.complete`). The output therefore always parses with ``json.loads``,
unless ``max_tokens`` cuts it short (``finish_reason: "length"``).

The checker is a small pushdown automaton over characters (:func:`step`): a state is a
hashable tuple ``(mode, stack, aux, ws)`` — what is expected next, the open containers
(``{``/``[``), the mode's detail (inside a key or a value string, the rest of a literal, the
digits of a ``\\u`` escape) and the length of the current run of whitespace, which is capped at
:data:`MAX_WS` so that a model cannot fill its budget with blanks. The top-level value must be
an object (OpenAI's ``json_object``); leading whitespace is allowed.

A token's text is what it adds after another token (:class:`TokenTexts`), so tokenizers that
mark word starts (SentencePiece's ``▁``) get their spaces; special tokens add nothing and are
never allowed, except the end-of-sequence token when the object is complete. A piece of a
multi-byte character (it decodes to U+FFFD) is allowed inside strings only.

The allowed-token mask of each state is computed once and cached (states repeat: the same
position inside a string, the same depth). Inside a string, the tokens without ``"``, ``\\`` or
control characters keep the state as it is and are allowed without a check; elsewhere tokens
are grouped by their first character, so a whole group is ruled out by one step.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

__all__ = ["MAX_WS", "START", "JsonMode", "JsonVocabulary", "feed", "step"]

#: The longest run of whitespace allowed outside strings (enough for indented JSON).
MAX_WS = 16
#: The state before any output: whitespace, then ``{``.
START: tuple[Any, ...] = ("top", "", None, 0)
_WS = " \t\n\r"
_DIGITS = "0123456789"
_HEX = "0123456789abcdefABCDEF"
_ESCAPES = '"\\/bfnrt'
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
_NUMBER_ENDS = ("n0", "ni", "nf", "nx")  # number modes where the number may end

State = tuple[Any, ...]


def _after_value(stack: str) -> State:
    return ("done", "", None, 0) if not stack else ("after", stack, None, 0)


def _value(ch: str, stack: str) -> State | None:
    """The state after ``ch`` starts a value (inside a container, ``stack`` non-empty)."""
    if ch == "{":
        return ("key_or_close", stack + "{", None, 0)
    if ch == "[":
        return ("value_or_close", stack + "[", None, 0)
    if ch == '"':
        return ("str", stack, "v", 0)
    if ch == "-":
        return ("n-", stack, None, 0)
    if ch == "0":
        return ("n0", stack, None, 0)
    if ch in _DIGITS:
        return ("ni", stack, None, 0)
    if ch in _LITERALS:
        return ("lit", stack, _LITERALS[ch], 0)
    return None


def _close(ch: str, stack: str) -> State | None:
    if stack and ch == ("}" if stack[-1] == "{" else "]"):
        return _after_value(stack[:-1])
    return None


def step(state: State, ch: str) -> State | None:
    """The state after one more character, or None when the text is no longer a JSON prefix."""
    mode, stack, aux, ws = state
    if mode == "str":
        if ch == '"':
            return ("colon", stack, None, 0) if aux == "k" else _after_value(stack)
        if ch == "\\":
            return ("esc", stack, aux, 0)
        return None if ord(ch) < 0x20 else state
    if mode == "esc":
        if ch == "u":
            return ("hex", stack, (aux, 0), 0)
        return ("str", stack, aux, 0) if ch in _ESCAPES else None
    if mode == "hex":
        if ch not in _HEX:
            return None
        kind, count = aux
        return ("str", stack, kind, 0) if count == 3 else ("hex", stack, (kind, count + 1), 0)
    if mode == "lit":
        if not aux or ch != aux[0]:
            return None
        return ("lit", stack, aux[1:], 0) if len(aux) > 1 else _after_value(stack)
    if mode[0] == "n" and mode in ("n-", "n0", "ni", "n.", "nf", "ne", "nes", "nx"):
        nxt = _number(mode, ch)
        if nxt is not None:
            return (nxt, stack, None, 0)
        if mode not in _NUMBER_ENDS:
            return None
        return step(_after_value(stack), ch)  # the number ended: ch belongs to what follows
    if ch in _WS:
        return None if mode == "done" or ws >= MAX_WS else (mode, stack, aux, ws + 1)
    if mode == "top":
        return ("key_or_close", "{", None, 0) if ch == "{" else None
    if mode in ("key", "key_or_close"):
        if ch == '"':
            return ("str", stack, "k", 0)
        return _close(ch, stack) if mode == "key_or_close" and ch == "}" else None
    if mode == "colon":
        return ("value", stack, None, 0) if ch == ":" else None
    if mode in ("value", "value_or_close"):
        if mode == "value_or_close" and ch == "]":
            return _close(ch, stack)
        return _value(ch, stack)
    if mode == "after":
        if ch == ",":
            return ("key", stack, None, 0) if stack[-1] == "{" else ("value", stack, None, 0)
        return _close(ch, stack)
    return None  # "done": nothing may follow


def _number(mode: str, ch: str) -> str | None:
    """The number mode after ``ch``, or None when ``ch`` does not continue the number."""
    if ch in _DIGITS:
        return {"n-": "n0" if ch == "0" else "ni", "ni": "ni", "n.": "nf", "nf": "nf", "ne": "nx", "nes": "nx",
                "nx": "nx"}.get(mode)
    if ch == "." and mode in ("n0", "ni"):
        return "n."
    if ch in "eE" and mode in ("n0", "ni", "nf"):
        return "ne"
    if ch in "+-" and mode == "ne":
        return "nes"
    return None


def feed(state: State | None, text: str) -> State | None:
    """The state after ``text`` (None once it is not a JSON prefix)."""
    for ch in text:
        if state is None:
            return None
        state = step(state, ch)
    return state


class JsonVocabulary:
    """A tokenizer's token texts, grouped for the mask computation, with the masks cached."""

    def __init__(self, texts: list[str], eos_ids: set[int], vocab_size: int, *, cache_size: int = 4096) -> None:
        self.texts = texts
        self.eos_ids = sorted(i for i in eos_ids if 0 <= i < vocab_size)
        self.vocab_size = vocab_size
        self._by_first: dict[str, list[int]] = {}
        self._plain: list[int] = []  # allowed anywhere inside a string, leaving the state as it is
        for i, text in enumerate(texts[:vocab_size]):
            if not text:
                continue  # special tokens (and tokens that decode to nothing) are never allowed
            self._by_first.setdefault(text[0], []).append(i)
            if '"' not in text and "\\" not in text and all(ord(c) >= 0x20 for c in text):
                self._plain.append(i)
        self._plain_set = frozenset(self._plain)
        self._cache: OrderedDict[State, list[int]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # generation threads share the cache

    def allowed(self, state: State) -> list[int]:
        """The token ids allowed in ``state`` (the end-of-sequence ids once the object is complete)."""
        with self._lock:
            hit = self._cache.get(state)
            if hit is not None:
                self._cache.move_to_end(state)
                return hit
        if state[0] == "done":
            ids = list(self.eos_ids)
        else:
            plain = state[0] == "str"
            ids = list(self._plain) if plain else []
            for first, group in self._by_first.items():
                after = step(state, first)
                if after is None:
                    continue
                for i in group:
                    if not (plain and i in self._plain_set) and feed(after, self.texts[i][1:]) is not None:
                        ids.append(i)
        with self._lock:
            self._cache[state] = ids
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return ids


class JsonMode:
    """One request's JSON state, advanced by its generated tokens."""

    def __init__(self, vocabulary: JsonVocabulary) -> None:
        self.vocabulary = vocabulary
        self.state: State | None = START
        self.fed = 0

    @property
    def complete(self) -> bool:
        return self.state is not None and self.state[0] == "done"

    def advance(self, generated: list[int]) -> None:
        """Feed the tokens of ``generated`` (the whole completion so far) not fed yet."""
        texts = self.vocabulary.texts
        for token in generated[self.fed:]:
            if self.state is not None and self.state[0] != "done":
                self.state = feed(self.state, texts[token] if 0 <= token < len(texts) else "")
        self.fed = max(self.fed, len(generated))

    def allowed(self) -> list[int]:
        """The tokens allowed next; the end-of-sequence ids at a dead end (a vocabulary without the
        characters JSON needs), so that generation ends instead of producing anything."""
        if self.state is None:
            return list(self.vocabulary.eos_ids)
        ids = self.vocabulary.allowed(self.state)
        return ids if ids else list(self.vocabulary.eos_ids)
