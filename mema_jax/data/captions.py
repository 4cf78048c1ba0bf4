"""Prompts of the MeMa pipeline (paper, Step 1-2).

Training captions carry the disease only ("A face, eye with {disease}": the real patients'
captions have no severity); sampling adds a severity ("..., {severity} level") to enrich the
modes.  ``DISEASE_WORDS`` is how a disease code is spelt in a prompt (the layout's codes, as the
paper's prompts write them); a config may map codes to other words.
"""
from __future__ import annotations

from collections.abc import Mapping

from mema_jax.data.layout import DISEASES, SEVERITIES

TRAIN_TEMPLATE = "A face, eye with {disease}"
SAMPLE_TEMPLATE = "A face, eye with {disease}, {severity} level"
DISEASE_WORDS: dict[str, str] = {d: d for d in DISEASES}


def caption(disease: str, severity: str | None = None, *, template: str | None = None,
            words: Mapping[str, str] | None = None) -> str:
    words = DISEASE_WORDS if words is None else words
    if disease not in words:
        raise ValueError(f"unknown disease {disease!r}; known: {sorted(words)}")
    if severity is not None and severity not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}; known: {SEVERITIES}")
    if template is None:
        template = TRAIN_TEMPLATE if severity is None else SAMPLE_TEMPLATE
    return template.format(disease=words[disease], severity=severity or "")


def all_prompts(words: Mapping[str, str] | None = None) -> list[str]:
    """Every training and sampling prompt (for a tokenizer vocabulary that must cover them)."""
    out = [caption(d, words=words) for d in DISEASES]
    out += [caption(d, s, words=words) for d in DISEASES for s in SEVERITIES]
    return out
