"""Training text that needs no download: real text from the standard library, a Zipf-distributed
probabilistic grammar with an imbalance knob, or any UTF-8 file; all character-level."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch


def stdlib_text() -> str:
    """The Python documentation's topic pages shipped with every CPython (``pydoc_data.topics``): ~1 MB of
    real English prose and code."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def pcfg_text(n_chars: int = 400_000, imbalance: float = 1.0, seed: int = 0) -> str:
    """Sentences of a small probabilistic context-free grammar whose words are drawn Zipf-distributed:
    word r of a category has weight r^(−imbalance) (0 = uniform, larger = more imbalanced data)."""
    if imbalance < 0:
        raise ValueError(f"imbalance must be >= 0, got {imbalance}")
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze", "bo", "di"]
    words = {c: [rng.choice(syll) + rng.choice(syll) + rng.choice(syll)[0] for _ in range(40)]
             for c in ("det", "adj", "noun", "verb", "adv")}
    weights = [(r + 1) ** -imbalance for r in range(40)]
    rules = {
        "S": [(["NP", "VP"], 0.8), (["NP", "VP", "and", "S"], 0.2)],
        "NP": [(["det", "noun"], 0.6), (["det", "adj", "noun"], 0.4)],
        "VP": [(["verb", "NP"], 0.5), (["verb"], 0.3), (["verb", "adv"], 0.2)],
    }

    def expand(sym: str, depth: int) -> list[str]:
        if sym in words:
            return [rng.choices(words[sym], weights)[0]]
        if sym not in rules:
            return [sym]
        options = rules[sym] if depth < 4 else rules[sym][:1]
        rhs = rng.choices([r for r, _ in options], [w for _, w in options])[0]
        return [w for s in rhs for w in expand(s, depth + 1)]

    out, size = [], 0
    while size < n_chars:
        sentence = " ".join(expand("S", 0)) + ".\n"
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:n_chars]


@dataclass
class CharCorpus:
    """A text as character ids, with random (batch, ctx + 1) windows for next-character prediction."""

    text: str

    def __post_init__(self) -> None:
        if len(self.text) < 2:
            raise ValueError("the corpus needs at least 2 characters")
        self.chars = sorted(set(self.text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.ids = torch.tensor([self.index[c] for c in self.text], dtype=torch.long)

    @property
    def vocab(self) -> int:
        return len(self.chars)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def batch(self, batch: int, ctx: int, generator: torch.Generator) -> torch.Tensor:
        if len(self.ids) < ctx + 2:
            raise ValueError(f"the corpus ({len(self.ids)} characters) is shorter than a window of {ctx + 1}")
        start = torch.randint(0, len(self.ids) - ctx - 1, (batch,), generator=generator)
        return torch.stack([self.ids[s : s + ctx + 1] for s in start.tolist()])


def load_corpus(data: str = "text", imbalance: float = 1.0) -> CharCorpus:
    """``"text"`` (stdlib docs), ``"pcfg"`` (the grammar at ``imbalance``), or a path to a UTF-8 file."""
    if data == "text":
        return CharCorpus(stdlib_text())
    if data == "pcfg":
        return CharCorpus(pcfg_text(imbalance=imbalance))
    path = Path(data)
    if not path.is_file():
        raise ValueError(f"--data must be 'text', 'pcfg' or a UTF-8 text file; {data!r} is none of these")
    try:
        return CharCorpus(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{data} is not UTF-8 text ({exc})") from exc
