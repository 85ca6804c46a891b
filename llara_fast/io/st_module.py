"""sentence-transformers modules of an llara_fast export (DESIGN §1 "Encoder use").

This file is copied verbatim into every export as ``llara_st.py`` and runs there without
llara_fast: it imports only torch, transformers and sentence_transformers. ``modules.json``
of the export lists

    0  llara_st.LlaraTransformer   (the HF model at the directory's root)
    1  llara_st.LlaraPooling       (mean at the K special positions, fp32)
    2  sentence_transformers Normalize  (L2)

so that ``SentenceTransformer(DIR, trust_remote_code=True)`` encodes as llara_fast does:

    document: PREFIX + text + SUM suffix    (``encode_document``, and plain ``encode``)
    query:    PREFIX + text + PRED suffix   (``encode_query``)

The prompt pieces are the token ids llara_fast recorded at export (PREFIX tokenised with the
tokenizer's own special tokens, each suffix without; the text without special tokens, cut
to ``max_length`` tokens before the suffix is added), so no re-tokenisation of the prompts
can drift. Rows are padded on the left by this module; positions count real tokens only.
A ``prompt=`` given to encode is prepended to the text inside the template.
"""
from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from sentence_transformers.base.modules import InputModule, Module
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerFast

MISTRAL_COMMON_TYPES = {"mistral", "ministral", "mixtral", "pixtral", "mistral3", "voxtral"}

KINDS = ("query", "document")


class LlaraTransformer(InputModule):
    """The backbone: builds LLaRA sequences, returns final-normed hidden states."""
    config_file_name = "llara_sentence_transformers.json"
    config_keys: ClassVar[list[str]] = ["max_length", "prefix_ids", "suffix_ids", "special_positions", "prompts"]
    save_in_root = True

    def __init__(self, model, tokenizer, max_length: int, prefix_ids: list[int], suffix_ids: dict[str, list[int]],
                 special_positions: dict[str, list[int]], prompts: dict[str, str] | None = None):
        super().__init__()
        for kind in KINDS:
            if kind not in suffix_ids or kind not in special_positions:
                raise ValueError(f"{self.config_file_name}: no suffix for {kind!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_length = int(max_length)
        self.prefix_ids = [int(i) for i in prefix_ids]
        self.suffix_ids = {k: [int(i) for i in v] for k, v in suffix_ids.items()}
        # Indices into suffix_ids[kind] of the K special tokens whose states are pooled.
        self.special_positions = {k: [int(i) for i in v] for k, v in special_positions.items()}
        self.prompts = dict(prompts or {})  # the strings, for people reading the config
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)

    @property
    def max_seq_length(self) -> int:
        """Text tokens kept (the prompt pieces come on top)."""
        return self.max_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.max_length = int(value)

    def preprocess(self, inputs, prompt: str | None = None, task: str | None = None, **kwargs) -> dict[str, Any]:
        kind = "query" if task == "query" else "document"
        texts = [(prompt or "") + t for t in inputs]
        ids = self.tokenizer(texts, add_special_tokens=False, truncation=True,
                             max_length=self.max_length)["input_ids"]
        suffix, special = self.suffix_ids[kind], self.special_positions[kind]
        rows = [self.prefix_ids + list(t) + suffix for t in ids]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, L), left padded
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
        for b, r in enumerate(rows):
            input_ids[b, width - len(r):] = torch.tensor(r)
            mask[b, width - len(r):] = 1
        # The K special tokens sit at fixed offsets from each row's end (left padding).
        pool = torch.tensor([width - len(suffix) + p for p in special]).expand(len(rows), -1)  # (B, K)
        return {"input_ids": input_ids, "attention_mask": mask, "pool_index": pool.contiguous()}

    def forward(self, features: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        mask = features["attention_mask"]  # (B, L)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L): 0.. over the real tokens
        out = self.model(input_ids=features["input_ids"], attention_mask=mask, position_ids=positions)
        features["token_embeddings"] = out.last_hidden_state  # (B, L, d), after the final norm
        return features

    def get_embedding_dimension(self) -> int:
        return int(self.model.config.hidden_size)

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.model.save_pretrained(output_path, safe_serialization=safe_serialization)
        self.save_tokenizer(output_path)
        self.save_config(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder: str | None = None,
             revision: str | None = None, local_files_only: bool = False, **kwargs) -> "LlaraTransformer":
        hub = dict(token=token, cache_dir=cache_folder, revision=revision, local_files_only=local_files_only)
        if subfolder:
            hub["subfolder"] = subfolder
        config = cls.load_config(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                 revision=revision, local_files_only=local_files_only)
        if not config:
            where = os.path.join(model_name_or_path, subfolder, cls.config_file_name)
            raise ValueError(f"{where}: missing; this directory was not written by llara_fast.export")
        model = AutoModel.from_pretrained(model_name_or_path, **hub, **(kwargs.get("model_kwargs") or {}))
        # AutoTokenizer would pick mistral-common's backend for Mistral-type models where that
        # package is importable; the export's tokenizer is the tokenizer.json it ships
        loader = PreTrainedTokenizerFast if model.config.model_type in MISTRAL_COMMON_TYPES else AutoTokenizer
        tokenizer = loader.from_pretrained(model_name_or_path, **hub, **(kwargs.get("processor_kwargs") or {}))
        return cls(model.eval(), tokenizer, **config)


class LlaraPooling(Module):
    """Mean of the hidden states at the K special positions, in fp32 at least."""
    config_keys: ClassVar[list[str]] = ["n_special"]

    def __init__(self, n_special: int = 8):
        super().__init__()
        self.n_special = int(n_special)

    def forward(self, features: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        hidden, pool = features["token_embeddings"], features["pool_index"]  # (B, L, d), (B, K)
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]  # (B, 1)
        states = hidden[rows, pool.to(hidden.device)]  # (B, K, d)
        features["sentence_embedding"] = states.to(torch.promote_types(states.dtype, torch.float32)).mean(1)  # (B, d)
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)
