"""Tokenizers on the `tokenizers` library: GPT-2's byte-level BPE, and vocabularies whose tokens are plain text
(a character vocabulary, as the seed LSTM generator's: the Fuse decoder, tokens concatenated).

Encoding goes through `tokenizers`. Decoding maps each id to its exact bytes (for byte-level BPE, GPT-2's
byte<->unicode alphabet reversed; otherwise the token's UTF-8), so a stream of ids can be turned into text
incrementally without ever splitting a UTF-8 character: `StreamDecoder` holds back the bytes of an unfinished
character. A plain-text vocabulary cannot spell every string: encoding text with a character it lacks raises
ValueError naming the character (`tokenizers` would silently drop it).
"""
from __future__ import annotations

import codecs
import functools
import json

from tokenizers import Tokenizer as _HFTokenizer

from .errors import FormatError, is_foreign_error


@functools.cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's `bytes_to_unicode` reversed: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    def __init__(self, tokenizer_json: str):
        try:
            self._tok = _HFTokenizer.from_str(tokenizer_json)
        except BaseException as e:
            if not is_foreign_error(e):
                raise
            raise FormatError(f"tokenizer: not a valid `tokenizers` JSON ({e})") from None
        decoder = (json.loads(tokenizer_json).get("decoder") or {}).get("type")
        if decoder not in (None, "ByteLevel", "Fuse"):
            raise FormatError(f"tokenizer: its {decoder} decoder is not supported (aigc_rt decodes byte-level BPE, "
                              f"and tokens whose texts concatenate: the Fuse decoder)")
        self.byte_level = decoder != "Fuse"  # no decoder: byte-level BPE, as before decoders were saved
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1  # ids need not be dense
        specials = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        bd = byte_decoder()
        self._bytes: list[bytes] = [b""] * self.vocab_size
        for token, i in vocab.items():
            if token in specials:
                continue  # decoded without special tokens, as skip_special_tokens=True
            if not self.byte_level:
                self._bytes[i] = token.encode()
                continue
            try:
                self._bytes[i] = bytes(bd[ch] for ch in token)
            except KeyError:
                added = self._tok.get_added_tokens_decoder().get(i)
                if added is None:
                    raise FormatError(f"tokenizer: token {token!r} is not byte-level BPE") from None
                self._bytes[i] = added.content.encode()
        self.special_ids = frozenset(self._tok.token_to_id(s) for s in specials)
        self._special_bytes = {self._tok.token_to_id(s): s.encode() for s in specials}

    def encode(self, text: str) -> list[int]:
        enc = self._tok.encode(text, add_special_tokens=False)
        if not self.byte_level:  # every character must be covered by a token (byte-level BPE covers any text)
            covered = bytearray(len(text))
            for start, end in enc.offsets:
                covered[start:end] = b"\x01" * (end - start)
            missing = covered.find(0)
            if missing >= 0:
                raise ValueError(f"the text has a character the model's vocabulary lacks: {text[missing]!r} at "
                                 f"index {missing}")
        return enc.ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of a token; b"" for special tokens and for ids past the tokenizer's vocabulary (a model
        may have more embedding rows than the tokenizer has tokens)."""
        return self._bytes[token_id] if token_id < len(self._bytes) else b""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """ids: a list or 1-D tensor of token ids. Special tokens are left out, as Hugging Face's
        decode(..., skip_special_tokens=True) (the text generate returns); False keeps their text."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        if skip_special_tokens:
            parts = map(self.token_bytes, ids)
        else:
            parts = (self._special_bytes.get(i) or self.token_bytes(i) for i in ids)
        return b"".join(parts).decode("utf-8", errors="replace")

    def to_str(self) -> str:
        return self._tok.to_str()

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Feed token ids one at a time; get back text that never ends inside a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def char_tokenizer_json(vocab, where: str) -> str:
    """A `tokenizers` JSON for a character vocabulary: a list of one-character strings (id = index) or a dict
    {character: id}. Each character is one token (a BPE model without merges, no pre-tokenizer; the Fuse decoder
    concatenates the tokens' texts)."""
    from tokenizers import decoders, models
    if isinstance(vocab, list):
        twice = next((ch for i, ch in enumerate(vocab) if ch in vocab[:i]), None)
        if twice is not None:
            raise FormatError(f"{where}: character {twice!r} appears twice in the vocabulary")
        vocab = {ch: i for i, ch in enumerate(vocab)}
    if not isinstance(vocab, dict) or not vocab:
        raise FormatError(f"{where}: expected a tokenizers tokenizer.json, or a character vocabulary (a JSON list "
                          f"of characters, or an object {{character: id}}), got {type(vocab).__name__}")
    for ch, i in vocab.items():
        if not isinstance(ch, str) or len(ch) != 1:
            raise FormatError(f"{where}: vocabulary entry {ch!r} is not one character (for multi-character tokens, "
                              f"give a tokenizers tokenizer.json)")
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise FormatError(f"{where}: the id of {ch!r} must be an int >= 0, got {i!r}")
    if len(set(vocab.values())) != len(vocab):
        raise FormatError(f"{where}: two characters share an id")
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    return tok.to_str()


def checked_tokenizer(tokenizer_json: str, vocab_size: int, where: str) -> Tokenizer:
    """The Tokenizer of a text model whose embedding has `vocab_size` rows, or FormatError naming `where` (a
    file) and the problem: not a `tokenizers` JSON we can decode, or more tokens than the model has rows.
    load() checks an embedded tokenizer with it, and the converter the one it is about to embed."""
    try:
        tokenizer = Tokenizer(tokenizer_json)
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None
    if tokenizer.vocab_size > vocab_size:
        raise FormatError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}")
    return tokenizer
