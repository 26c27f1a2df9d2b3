"""BIGRec Alpaca-style prompts: ONE template shared by fine-tuning and inference.

Template (SPEC section 2; BIGRec's wording with configurable domain words)::

    Below is an instruction that describes a task, paired with an input that provides further
    context. Write a response that appropriately completes the request.

    ### Instruction:
    Given a list of {items} the user has {verb} before, please recommend a new {item} that the
    user likes to the user.

    ### Input:
    The user has {verb} the following {items} before: "t1", "t2", "t3"

    ### Response:
    "target title"<eos>

Public API (also used by ``teacher/finetune.py``):
- ``Domain(item, items, verb)``; ``Domain.from_manifest(manifest)`` reads the dataset
  manifest's ``domain`` mapping (``{"item": "movie", "items": "movies", "verb": "watched"}``).
- ``build_prompt(history_titles, domain) -> str``: everything up to and including
  ``"### Response:\\n"`` (the text the model is conditioned on at inference).
- ``answer_text(target_title) -> str``: ``'"<title>"'``.
- ``build_training_text(history_titles, target_title, domain, eos=...) -> str``:
  ``build_prompt(...) + answer_text(target) + eos`` (pass ``tokenizer.eos_token``).
  ``build_prompt(...)`` is always a prefix of it, so prompt-token masking is a length cut.
- ``extract_answer(generated_text) -> str``: drops the prompt (if echoed), takes the first
  non-empty line of the response, strips whitespace and surrounding double quotes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from dllm2rec.errors import DataError

PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
RESPONSE_MARK = "### Response:\n"


@dataclass(frozen=True)
class Domain:
    """Domain words used in the prompt: item (singular), items (plural), verb (past participle)."""

    item: str = "video game"
    items: str = "video games"
    verb: str = "played"

    @classmethod
    def from_manifest(cls, manifest: Mapping, source: str = "manifest.json") -> "Domain":
        raw = manifest.get("domain")
        if not isinstance(raw, Mapping):
            raise DataError(source, "no 'domain' mapping with item/items/verb (needed for teacher prompts)")
        missing = [k for k in ("item", "items", "verb") if not isinstance(raw.get(k), str) or not raw.get(k)]
        if missing:
            raise DataError(source, f"'domain' lacks non-empty string(s) {missing}")
        return cls(item=raw["item"], items=raw["items"], verb=raw["verb"])


GAMES = Domain("video game", "video games", "played")
MOVIES = Domain("movie", "movies", "watched")
TOYS = Domain("toy", "toys", "bought")


def _as_domain(domain: Domain | Mapping) -> Domain:
    if isinstance(domain, Domain):
        return domain
    return Domain.from_manifest({"domain": domain}, source="domain")


def instruction(domain: Domain | Mapping) -> str:
    d = _as_domain(domain)
    return (
        f"Given a list of {d.items} the user has {d.verb} before, please recommend a new "
        f"{d.item} that the user likes to the user."
    )


def quote(title: str) -> str:
    return f'"{title}"'


def build_prompt(history_titles: Sequence[str], domain: Domain | Mapping) -> str:
    """Inference prompt for one row; history titles oldest first (padding already removed)."""
    d = _as_domain(domain)
    if isinstance(history_titles, str):
        raise TypeError("history_titles must be a sequence of titles, not one string")
    history = ", ".join(quote(t) for t in history_titles)
    return (
        f"{PREAMBLE}\n\n### Instruction:\n{instruction(d)}\n\n"
        f"### Input:\nThe user has {d.verb} the following {d.items} before: {history}\n\n"
        f"{RESPONSE_MARK}"
    )


def answer_text(target_title: str) -> str:
    return quote(target_title)


def build_training_text(
    history_titles: Sequence[str], target_title: str, domain: Domain | Mapping, eos: str = ""
) -> str:
    """Fine-tuning text: prompt + quoted target + ``eos`` (pass ``tokenizer.eos_token``)."""
    return build_prompt(history_titles, domain) + answer_text(target_title) + eos


def extract_answer(generated_text: str, eos: str | None = None) -> str:
    """The recommended title from a generation (with or without the echoed prompt).

    Keeps only the first non-empty line after ``### Response:`` (a base model may ramble on)
    and strips whitespace and surrounding double quotes, as BIGRec's ``.strip('"')`` does.
    """
    text = generated_text.rsplit(RESPONSE_MARK, 1)[-1]
    if eos:
        text = text.split(eos, 1)[0]
    for line in text.splitlines():
        if line.strip():
            text = line
            break
    else:
        text = ""
    return text.strip().strip('"').strip()


def history_titles(history_ids: Sequence[int], length: int, titles: Sequence[str]) -> list[str]:
    """Titles of the first ``length`` ids of a right-padded history row."""
    return [titles[int(i)] for i in list(history_ids)[: int(length)]]
