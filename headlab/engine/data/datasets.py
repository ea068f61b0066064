"""The text the project ships (data/, see data/README.md for sources and licenses).

- WikiText-2 raw test: perplexity is measured on its beginning (see evaluate.py); the
  default calibration texts come from its *end*, so calibration never sees evaluated tokens.
- Prompt sets (MT-Bench, Vicuna-bench, GSM8K, HumanEval) for calibration and clustering.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DATA_DIR",
    "WIKITEXT_FILE",
    "Prompt",
    "PROMPT_SETS",
    "CALIBRATION_SETS",
    "read_wikitext",
    "wikitext_sha256",
    "wikitext_calibration",
    "wikitext_paragraphs",
    "wikitext_stream",
    "load_prompts",
    "calibration_texts",
]

_SHIPPED = Path(__file__).resolve().parent / "shipped"  # an installed wheel's copy of data/ (setup.py)
DATA_DIR = _SHIPPED if _SHIPPED.is_dir() else Path(__file__).resolve().parents[3] / "data"
WIKITEXT_FILE = DATA_DIR / "wikitext-2-raw-test.txt"
PROMPT_SETS = {
    "mt_bench": "mt_bench.jsonl",
    "vicuna_bench": "vicuna_bench.jsonl",
    "gsm8k": "gsm8k_test.jsonl",
    "humaneval": "humaneval_prompts.jsonl",
}
CALIBRATION_SETS = ("wikitext", *PROMPT_SETS)


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str
    source: str
    id: str


@functools.lru_cache(maxsize=1)
def read_wikitext() -> str:
    """The whole WikiText-2 raw test file as one string."""
    if not WIKITEXT_FILE.exists():
        raise FileNotFoundError(f"{WIKITEXT_FILE} is missing: the repository's data/ folder is incomplete")
    return WIKITEXT_FILE.read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def wikitext_sha256() -> str:
    return hashlib.sha256(WIKITEXT_FILE.read_bytes()).hexdigest()


def wikitext_paragraphs(min_chars: int = 400) -> list[str]:
    """Every article paragraph of at least `min_chars` (no headings), from the end of the file backwards."""
    paragraphs = [p.strip() for p in read_wikitext().split("\n")]
    return [p for p in reversed(paragraphs) if len(p) >= min_chars and not p.startswith("=")]


def wikitext_calibration(n: int = 32, min_chars: int = 400) -> list[str]:
    """`n` article paragraphs of at least `min_chars`, taken from the end of the file backwards."""
    chosen = wikitext_paragraphs(min_chars)
    if len(chosen) < n:
        raise ValueError(f"only {len(chosen)} calibration paragraphs available, asked for {n}")
    return chosen[:n]


def wikitext_stream(tokenizer, n: int, window: int, min_chars: int = 400) -> list[str]:
    """The file's own running text over the span of `wikitext_calibration(n)`, cut into pieces of `window` tokens.

    Where the paragraphs are separate texts that each start a context, these are contiguous slices
    of the file (headings and short paragraphs included) that cross paragraph boundaries, as the
    perplexity windows do. Each piece is an exact substring of the file, cut at token boundaries
    (a fast tokenizer's offsets); the last, shorter piece is kept.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    text = read_wikitext()
    start = text.rfind(wikitext_calibration(n, min_chars)[-1])
    tail = text[start:]
    try:
        offsets = tokenizer(tail, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, KeyError, TypeError) as e:
        raise ValueError(f"packing WikiText into windows needs a fast tokenizer with offsets ({e})") from None
    cuts = [offsets[i][0] for i in range(0, len(offsets), window)] + [len(tail)]
    return [tail[a:b].strip() for a, b in zip(cuts, cuts[1:]) if tail[a:b].strip()]


def _prompt_from_row(row: dict, source: str, i: int) -> Prompt:
    if source in ("mt_bench", "vicuna_bench"):
        return Prompt(row["turns"][0], row["category"], source, str(row["question_id"]))
    if source == "gsm8k":
        return Prompt(row["question"], "math", source, str(i))
    return Prompt(row["prompt"], "coding", source, row["task_id"])


@functools.lru_cache(maxsize=None)
def load_prompts(name: str) -> tuple[Prompt, ...]:
    """All prompts of one shipped set, with their categories."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; choose one of {', '.join(PROMPT_SETS)}")
    path = DATA_DIR / "prompts" / PROMPT_SETS[name]
    with path.open(encoding="utf-8") as f:
        return tuple(_prompt_from_row(json.loads(line), name, i) for i, line in enumerate(f) if line.strip())


def calibration_texts(name: str = "wikitext", n: int = 32) -> list[str]:
    """`n` calibration texts from a shipped set ("wikitext" or a prompt set name)."""
    if name == "wikitext":
        return wikitext_calibration(n)
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown calibration set {name!r}; choose one of {', '.join(CALIBRATION_SETS)}")
    return [p.text for p in load_prompts(name)[:n]]
