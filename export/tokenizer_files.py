"""The slow tokenizer's files beside tokenizer.json, for tools that read only those.

transformers 5 saves a tokenizer as tokenizer.json (+ tokenizer_config.json) only; transformers 4's slow
CLIPTokenizer and optimum (which pins transformers < 4.58) read vocab.json and merges.txt. Both are the BPE model
inside tokenizer.json (huggingface/tokenizers' serialization: model.vocab {token: id}, model.merges as "a b" strings
or, since tokenizers 0.20, [a, b] pairs); merges.txt starts with the "#version: 0.2" line that CLIP's own file has.
special_tokens_map.json is what transformers 4's save_pretrained writes beside them: the config's special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def complete(folder: Path) -> list[str]:
    """Write whichever of vocab.json, merges.txt and special_tokens_map.json `folder` lacks and its tokenizer.json
    (a BPE model) / tokenizer_config.json can give; returns the names written."""
    folder = Path(folder)
    written = []
    source = folder / "tokenizer.json"
    model = json.loads(source.read_text(encoding="utf-8")).get("model", {}) if source.is_file() else {}
    if model.get("type") == "BPE":
        if not (folder / "vocab.json").exists():
            vocab = dict(model["vocab"])
            for added in json.loads(source.read_text(encoding="utf-8")).get("added_tokens", []):
                vocab.setdefault(added["content"], added["id"])  # CLIP's vocab.json lists its special tokens
            (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
            written.append("vocab.json")
        pairs = [m.split(" ") if isinstance(m, str) else list(m) for m in model.get("merges", [])]
        if not (folder / "merges.txt").exists() and all(len(p) == 2 and " " not in "".join(p) for p in pairs):
            text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in pairs)
            (folder / "merges.txt").write_text(text, encoding="utf-8")
            written.append("merges.txt")
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file() and not (folder / "special_tokens_map.json").exists():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        special = {k: config[k] for k in _SPECIAL if config.get(k) is not None}
        if special:
            (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False),
                                                            encoding="utf-8")
            written.append("special_tokens_map.json")
    return written
