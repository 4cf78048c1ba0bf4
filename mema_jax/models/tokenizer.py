"""The CLIP BPE tokenizer of Stable Diffusion, in plain Python (no torch, no transformers).

Reads a diffusers ``tokenizer/`` folder -- ``vocab.json`` + ``merges.txt`` (what SD1.5 ships) or
``tokenizer.json`` (what transformers 5 saves), with ``tokenizer_config.json`` /
``special_tokens_map.json`` for the special tokens -- and encodes as transformers'
``CLIPTokenizer`` (the ``tokenizers``-backed one) does:

1. special tokens written in the text (``<|startoftext|>``, ``<|endoftext|>``) are cut out first,
   matched exactly in the raw text;
2. normalization: NFC, every run of whitespace -> one space, lower case (character by character,
   as the Rust normalizer does: no final-sigma rule);
3. pre-tokenization: CLIP's pattern (contractions, letter runs, single digits, runs of other
   characters; whitespace dropped), then GPT-2's byte-level pattern on each piece, then each UTF-8
   byte mapped to its printable stand-in;
4. BPE on each piece with ``</w>`` on its last symbol, merging the lowest-ranked pair first (the
   leftmost of equal rank), as the ``tokenizers`` BPE model does;
5. ``[bos] + ids + [eos]``, truncated to ``max_length`` and padded with the pad token.

Character classes come from Python's ``unicodedata``; they can differ from the Rust library's
(Oniguruma's) tables only on code points assigned in newer Unicode versions.
"""
from __future__ import annotations

import functools
import heapq
import json
import os
import re
import sys
import unicodedata
from collections.abc import Mapping, Sequence

import numpy as np

# The defaults of transformers' CLIPTokenizer; SD1.5 pads with <|endoftext|> too.
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
}
END_OF_WORD = "</w>"
# Oniguruma's \s (Unicode White_Space); Python's \s also takes U+001C..U+001F, which CLIP does not.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


class TokenizerError(ValueError):
    """A tokenizer folder cannot be read; the message names the file."""


@functools.cache
def _patterns() -> tuple[re.Pattern, re.Pattern, re.Pattern]:
    """(whitespace run, CLIP's split pattern, GPT-2's byte-level split pattern) with \\p{L}, \\p{N}
    spelled out as code-point ranges (the stdlib ``re`` has no Unicode properties)."""
    letters, numbers = _category_ranges("L"), _category_ranges("N")
    space = _WHITESPACE
    clip = (rf"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[{letters}]+|[{numbers}]"
            rf"|[^{space}{letters}{numbers}]+")
    gpt2 = (rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+| ?[^{space}{letters}{numbers}]+"
            rf"|[{space}]+(?![^{space}])|[{space}]+")
    return re.compile(f"[{space}]+"), re.compile(clip), re.compile(gpt2)


def _category_ranges(major: str) -> str:
    """A regex character-class body holding every code point whose Unicode category starts with ``major``."""
    ranges, start, previous = [], None, None
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp)).startswith(major):
            if start is None:
                start = cp
            previous = cp
        elif start is not None:
            ranges.append((start, previous))
            start = None
    if start is not None:
        ranges.append((start, previous))
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


@functools.cache
def _byte_symbols() -> tuple[str, ...]:
    """GPT-2's byte -> printable character table (printable Latin-1 bytes stand for themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


class CLIPTokenizer:
    """Prompts -> CLIP token ids.  ``vocab``: token -> id; ``merges``: BPE merges in rank order;
    ``special_tokens``: bos/eos/pad/unk token strings (defaults: ``DEFAULT_SPECIAL_TOKENS``), all
    of which must be in ``vocab``."""

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *,
                 special_tokens: Mapping[str, str] | None = None, source: str = "vocab"):
        self.vocab = dict(vocab)
        tokens = {**DEFAULT_SPECIAL_TOKENS, **(special_tokens or {})}
        missing = sorted(f"{k}={v!r}" for k, v in tokens.items() if v not in self.vocab)
        if missing:
            raise TokenizerError(f"{source}: special tokens not in the vocabulary: {missing}")
        self.bos_token_id = self.vocab[tokens["bos_token"]]
        self.eos_token_id = self.vocab[tokens["eos_token"]]
        self.pad_token_id = self.vocab[tokens["pad_token"]]
        self.unk_token_id = self.vocab[tokens["unk_token"]]
        # Longest first: at one position the longer special token wins, as in the tokenizers library.
        self._special = re.compile("|".join(re.escape(t) for t in sorted(set(tokens.values()), key=len, reverse=True)))
        self._merges: dict[tuple[int, int], tuple[int, int]] = {}  # (left id, right id) -> (rank, merged id)
        for rank, (left, right) in enumerate(merges):
            ids = [self.vocab.get(t) for t in (left, right, left + right)]
            if None in ids:
                raise TokenizerError(f"{source}: merge {rank} {left!r} {right!r} uses a token not in the vocabulary")
            self._merges[ids[0], ids[1]] = (rank, ids[2])
        self._words: dict[str, list[int]] = {}

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> CLIPTokenizer:
        """A diffusers/transformers ``tokenizer/`` folder (see the module docstring for the files)."""
        folder = os.fspath(folder)
        tokenizer_json = _read_json(folder, "tokenizer.json")
        if tokenizer_json:  # transformers prefers it to vocab.json + merges.txt
            vocab, merges, source = _vocab_and_merges_of(tokenizer_json, os.path.join(folder, "tokenizer.json"))
        else:
            vocab, merges, source = _read_vocab_and_merges(folder)
        config = _read_json(folder, "tokenizer_config.json")
        special = {key: _token_content(config[key]) for key in DEFAULT_SPECIAL_TOKENS if config.get(key)}
        if "added_tokens_decoder" not in config:  # transformers reads the legacy map only then
            token_map = _read_json(folder, "special_tokens_map.json")
            special.update({key: _token_content(token_map[key]) for key in DEFAULT_SPECIAL_TOKENS if token_map.get(key)})
        added = {_token_content(t) for t in config.get("added_tokens_decoder", {}).values()}
        added |= {t.get("content") for t in tokenizer_json.get("added_tokens", [])}
        extra = sorted(added - set(special.values()) - set(DEFAULT_SPECIAL_TOKENS.values()))
        if extra:  # e.g. textual-inversion words: refused by name rather than split as plain text
            raise TokenizerError(f"{folder}: added tokens {extra} are not supported (only the bos/eos/pad/unk tokens)")
        return cls(vocab, merges, special_tokens=special, source=source)

    def encode(self, text: str) -> list[int]:
        """``[bos] + token ids + [eos]`` of one prompt, not truncated."""
        ids = [self.bos_token_id]
        start = 0
        for special in self._special.finditer(text):
            ids += self._encode_plain(text[start:special.start()])
            ids.append(self.vocab[special.group()])
            start = special.end()
        ids += self._encode_plain(text[start:])
        ids.append(self.eos_token_id)
        return ids

    def __call__(self, prompts: str | Sequence[str], max_length: int = 77) -> np.ndarray:
        """(N, max_length) int32 ids: truncated to ``max_length`` (eos kept last), padded with the pad token."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if max_length < 2:
            raise ValueError(f"max_length {max_length} leaves no room for the bos and eos tokens")
        out = np.full((len(prompts), max_length), self.pad_token_id, np.int32)
        for row, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            if len(ids) > max_length:
                ids = ids[: max_length - 1] + [self.eos_token_id]
            out[row, : len(ids)] = ids
        return out

    def _encode_plain(self, text: str) -> list[int]:
        whitespace, clip_split, byte_split = _patterns()
        text = "".join(c.lower() for c in whitespace.sub(" ", unicodedata.normalize("NFC", text)))
        symbols = _byte_symbols()
        ids = []
        for piece in clip_split.findall(text):
            for word in byte_split.findall(piece):
                ids += self._bpe("".join(symbols[b] for b in word.encode("utf-8")))
        return ids

    def _bpe(self, word: str) -> list[int]:
        if word not in self._words:
            self._words[word] = self._merge(word)
        return self._words[word]

    def _merge(self, word: str) -> list[int]:
        """The tokenizers BPE merge loop: a heap of (rank, position) over adjacent pairs, lowest
        first; a popped pair that no longer exists is skipped.  Unknown symbols become unk."""
        symbols = [c + END_OF_WORD if i == len(word) - 1 else c for i, c in enumerate(word)]
        ids = [self.vocab.get(s, self.unk_token_id) for s in symbols]
        n = len(ids)
        nxt, prev, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n  # a linked list of symbols
        heap = []
        for pos in range(n - 1):
            if (ids[pos], ids[pos + 1]) in self._merges:
                rank, new = self._merges[ids[pos], ids[pos + 1]]
                heap.append((rank, pos, new))
        heapq.heapify(heap)
        while heap:
            _, pos, new = heapq.heappop(heap)
            right = nxt[pos]
            if not alive[pos] or right >= n or self._merges.get((ids[pos], ids[right]), (0, None))[1] != new:
                continue
            ids[pos], alive[right], nxt[pos] = new, False, nxt[right]
            if nxt[pos] < n:
                prev[nxt[pos]] = pos
            for left, right in ((prev[pos], pos), (pos, nxt[pos])):
                if left >= 0 and right < n and (ids[left], ids[right]) in self._merges:
                    rank, merged = self._merges[ids[left], ids[right]]
                    heapq.heappush(heap, (rank, left, merged))
        return [i for i, keep in zip(ids, alive) if keep]


def _read_json(folder: str, name: str) -> dict:
    """The file's JSON object, or {} when the folder does not have it."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise TokenizerError(f"{path}: cannot read: {err}") from err


def _vocab_and_merges_of(tokenizer_json: Mapping, path: str) -> tuple[dict[str, int], list[tuple[str, str]], str]:
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{path}: not a BPE tokenizer (model type {model.get('type')!r})")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    return model["vocab"], _checked_merges(merges, path), path


def _read_vocab_and_merges(folder: str) -> tuple[dict[str, int], list[tuple[str, str]], str]:
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    if not (os.path.isfile(vocab_file) and os.path.isfile(merges_file)):
        listing = sorted(os.listdir(folder)) if os.path.isdir(folder) else "no such folder"
        raise FileNotFoundError(f"{folder}: no CLIP tokenizer files (vocab.json + merges.txt or tokenizer.json); "
                                f"found {listing}")
    try:
        with open(merges_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise TokenizerError(f"{merges_file}: cannot read: {err}") from err
    # The "#version" header is skipped, as the tokenizers library does; a trailing blank line is tolerated.
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return _read_json(folder, "vocab.json"), _checked_merges(merges, merges_file), f"{vocab_file} + merges.txt"


def _checked_merges(merges: list[tuple], source: str) -> list[tuple[str, str]]:
    bad = [i for i, m in enumerate(merges) if len(m) != 2]
    if bad:
        raise TokenizerError(f"{source}: merges {bad[:5]} are not two space-separated tokens")
    return merges


def _token_content(value) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value["content"] if isinstance(value, Mapping) else str(value)


def word_pieces(texts: Sequence[str]) -> list[str]:
    """The byte-symbol words the tokenizer splits ``texts`` into (what BPE then merges), in order."""
    whitespace, clip_split, byte_split = _patterns()
    symbols = _byte_symbols()
    out: dict[str, None] = {}
    for text in texts:
        text = "".join(c.lower() for c in whitespace.sub(" ", unicodedata.normalize("NFC", text)))
        for piece in clip_split.findall(text):
            for word in byte_split.findall(piece):
                out["".join(symbols[b] for b in word.encode("utf-8"))] = None
    return list(out)


def write_word_vocabulary(folder: str | os.PathLike, texts: Sequence[str]) -> str:
    """Writes a small CLIP BPE tokenizer folder (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) whose vocabulary has every byte symbol (alone and word-final) and
    every word of ``texts`` as one token, built by left-to-right merges.  For text encoders trained
    or drawn here (the offline MeMa-Synth model), where SD1.5's 49408-token vocabulary is not at
    hand; transformers' CLIPTokenizer reads the folder and encodes as ours does.  Other words fall
    back to their bytes.  Files are written atomically."""
    from mema_jax.fileio import atomic_write_bytes

    folder = os.fspath(folder)
    vocab: dict[str, int] = {}
    for s in _byte_symbols():
        vocab.setdefault(s, len(vocab))
    for s in _byte_symbols():
        vocab.setdefault(s + END_OF_WORD, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in word_pieces(texts):
        parts = [c + END_OF_WORD if i == len(word) - 1 else c for i, c in enumerate(word)]
        left = parts[0]
        for right in parts[1:]:
            if left + right not in vocab:
                merges.append((left, right))
                vocab[left + right] = len(vocab)
            left = left + right
    for token in DEFAULT_SPECIAL_TOKENS.values():
        vocab.setdefault(token, len(vocab))
    os.makedirs(folder, exist_ok=True)
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": json.dumps(DEFAULT_SPECIAL_TOKENS),
        "tokenizer_config.json": json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                             "do_lower_case": True, **DEFAULT_SPECIAL_TOKENS}),
    }
    for name, text in files.items():
        atomic_write_bytes(os.path.join(folder, name), text.encode("utf-8"))
    return folder
