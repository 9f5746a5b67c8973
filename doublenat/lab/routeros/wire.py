"""RouterOS API framing: length-prefixed words; an empty word ends a sentence.

Pure byte handling, no I/O. Text is carried as `str` decoded with `surrogateescape`, so a
value the router stores as raw non-UTF-8 bytes survives a round trip unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

MAX_WORD_LENGTH = 0xFFFFFFFF
# A reader refuses words longer than this so a hostile length cannot make it buffer gigabytes.
DEFAULT_READ_LIMIT = 16 * 1024 * 1024

Sentence = tuple[str, ...]


class ProtocolError(ValueError):
    """The peer broke the framing; the connection cannot continue."""


def encode_length(length: int) -> bytes:
    """The 1 to 5 byte big-endian prefix for a word of `length` bytes."""
    if length < 0 or length > MAX_WORD_LENGTH:
        raise ValueError(f"word length out of range: {length}")
    if length < 0x80:
        return bytes((length,))
    if length < 0x4000:
        return (length | 0x8000).to_bytes(2, "big")
    if length < 0x200000:
        return (length | 0xC00000).to_bytes(3, "big")
    if length < 0x10000000:
        return (length | 0xE0000000).to_bytes(4, "big")
    return b"\xf0" + length.to_bytes(4, "big")


def prefix_size(first: int) -> int:
    """How many bytes the length prefix starting with `first` occupies."""
    if first < 0x80:
        return 1
    if first < 0xC0:
        return 2
    if first < 0xE0:
        return 3
    if first < 0xF0:
        return 4
    if first == 0xF0:
        return 5
    # 0xF8.. are control bytes; 0xF1..0xF7 would mean lengths past 32 bits, which no
    # RouterOS release supports either.
    raise ProtocolError(f"bad length byte 0x{first:02X}")


def decode_length(data: bytes | bytearray, offset: int = 0) -> tuple[int, int] | None:
    """(word length, prefix size) at `offset`, or None when the prefix is still incomplete."""
    if offset >= len(data):
        return None
    first = data[offset]
    size = prefix_size(first)
    if len(data) - offset < size:
        return None
    if size == 1:
        return first, 1
    if size == 5:
        return int.from_bytes(data[offset + 1 : offset + 5], "big"), 5
    mask = (1 << (8 * size - size)) - 1
    return int.from_bytes(data[offset : offset + size], "big") & mask, size


def encode_word(word: bytes) -> bytes:
    return encode_length(len(word)) + word


def encode_sentence(words: Iterable[bytes]) -> bytes:
    return b"".join(encode_word(w) for w in words) + b"\x00"


def to_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def to_text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def encode_text_sentences(sentences: Iterable[Sequence[str]]) -> bytes:
    """Several sentences as one buffer, so a reply batch goes out in a single write."""
    return b"".join(encode_sentence(to_bytes(w) for w in s) for s in sentences)


class SentenceReader:
    """Turns an arbitrarily segmented byte stream into sentences (lists of raw words).

    Empty sentences are dropped, as the router ignores them.
    """

    def __init__(self, limit: int = DEFAULT_READ_LIMIT) -> None:
        self._buffer = bytearray()
        self._words: list[bytes] = []
        self._limit = limit

    @property
    def pending(self) -> bool:
        """True while a sentence has started but not ended."""
        return bool(self._buffer or self._words)

    def feed(self, data: bytes) -> list[list[bytes]]:
        buf = self._buffer
        buf += data
        done: list[list[bytes]] = []
        pos = 0
        end_of_data = len(buf)
        while pos < end_of_data:
            header = decode_length(buf, pos)
            if header is None:
                break
            length, size = header
            if length > self._limit:
                raise ProtocolError(f"word of {length} bytes exceeds the {self._limit} limit")
            end = pos + size + length
            if end > end_of_data:
                break
            if length == 0:
                if self._words:
                    done.append(self._words)
                    self._words = []
            else:
                self._words.append(bytes(buf[pos + size : end]))
            pos = end
        del buf[:pos]
        return done
