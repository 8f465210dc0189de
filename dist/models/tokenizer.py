"""Tokenizers with one interface: a HF tokenizer.json (through the `tokenizers` package) or plain bytes.

    tok = load_tokenizer(path)          # path/tokenizer.json if present, else ByteTokenizer()
    ids = tok.encode("hello")           # [bos_id, ...]; add_bos=False / add_eos=True to change
    text = tok.decode(ids)              # special tokens are dropped
    tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id
    tok.save(dir)                       # what load_tokenizer(dir) reads back
"""

from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

# Well-known special token names, tried when no config file names them.
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|endoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")


class ByteTokenizer:
    """UTF-8 bytes: ids 0..255 are the bytes, then bos 256, eos 257, pad 258 (vocab_size 259)."""

    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids) -> str:
        """Special ids are dropped; an id that is no byte (a model with a larger vocab may emit one) and
        invalid UTF-8 both decode to U+FFFD."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif i not in (self.bos_id, self.eos_id, self.pad_id):
                out += "\ufffd".encode("utf-8")
        return out.decode("utf-8", errors="replace")

    def save(self, path) -> None:
        """Nothing to write: load_tokenizer on a directory without tokenizer.json gives a ByteTokenizer."""

    def __repr__(self):
        return "ByteTokenizer(vocab_size=259)"


class HFTokenizer:
    """A `tokenizers.Tokenizer` (tokenizer.json) with explicit bos/eos/pad ids."""

    def __init__(self, tokenizer, bos_id: int, eos_id: int, pad_id: int | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id

    @classmethod
    def from_file(cls, file) -> "HFTokenizer":
        """tokenizer.json; bos/eos/pad from tokenizer_config.json, special_tokens_map.json or config.json
        beside it, else from well-known token names."""
        from tokenizers import Tokenizer

        file = Path(file)
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as e:
            raise ValueError(f"cannot read tokenizer {file}: {e}") from e
        ids = _special_ids(tokenizer, file.parent)
        for kind, names in (("bos", _BOS_NAMES), ("eos", _EOS_NAMES)):
            if ids.get(kind) is None:
                ids[kind] = next((tokenizer.token_to_id(n) for n in names if tokenizer.token_to_id(n) is not None),
                                 None)
            if ids[kind] is None:
                raise ValueError(f"cannot tell the {kind} token of {file}: name it as {kind}_token in "
                                 f"{TOKENIZER_CONFIG} beside it")
        return cls(tokenizer, ids["bos"], ids["eos"], ids.get("pad"))

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path) -> None:
        """Write tokenizer.json and a tokenizer_config.json naming the special tokens into directory `path`."""
        path = Path(path)
        self.tokenizer.save(str(path / TOKENIZER_JSON))
        config = {f"{k}_token": self.tokenizer.id_to_token(i)
                  for k, i in (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id))}
        (path / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    def __repr__(self):
        return f"HFTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


def _special_ids(tokenizer, directory: Path) -> dict:
    """{"bos"|"eos"|"pad": id} from the HF config files in `directory` (first file that names each wins)."""
    ids = {}
    for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        file = directory / name
        if not file.is_file():
            continue
        try:
            conf = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from None
        for kind in ("bos", "eos", "pad"):
            token = conf.get(f"{kind}_token")
            if isinstance(token, dict):  # {"content": "<s>", ...}
                token = token.get("content")
            if isinstance(token, str) and kind not in ids:
                tid = tokenizer.token_to_id(token)
                if tid is None:
                    raise ValueError(f"{file}: {kind}_token {token!r} is not in the tokenizer's vocabulary")
                ids[kind] = tid
    config = directory / "config.json"
    if config.is_file():
        try:
            conf = json.loads(config.read_text())
        except json.JSONDecodeError:
            conf = {}  # load_hf reports a bad config.json; here it only offers hints
        for kind in ("bos", "eos", "pad"):
            tid = conf.get(f"{kind}_token_id")
            if isinstance(tid, list):  # Llama-3 instruct lists several eos ids
                tid = tid[0] if tid else None
            if isinstance(tid, int) and kind not in ids:
                ids[kind] = tid
    return ids


def load_tokenizer(path=None):
    """Tokenizer for `path`: a tokenizer.json file, a directory holding one (HFTokenizer), or a directory
    without one / None (ByteTokenizer)."""
    if path is None:
        return ByteTokenizer()
    path = Path(path)
    if path.is_file():
        return HFTokenizer.from_file(path)
    if not path.is_dir():
        raise ValueError(f"tokenizer path {str(path)!r} does not exist")
    if (path / TOKENIZER_JSON).is_file():
        return HFTokenizer.from_file(path / TOKENIZER_JSON)
    return ByteTokenizer()
