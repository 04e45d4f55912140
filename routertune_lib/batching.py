"""Token batches for routed forwards: chat-template tokenization with assistant-only labels, right padding, and the
batches that calibration, routing statistics and the trainer feed to a model.

Shared by ``training`` (the Router-Tuning loop, threshold calibration), ``moe`` (expert statistics), ``experiments``
and ``training_cost``; it depends on nothing else in the library.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans ``[start, end)`` of its assistant turns.

    A turn's span runs from the end of the prefix rendered with ``add_generation_prompt=True`` (what the model sees
    before it answers) to the end of the rendering that includes the turn (so the end-of-turn marker is learned).
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise ValueError(
                "The tokenizer's chat template is not prefix-consistent (rendering the first turns, with the "
                "generation prompt, is not a prefix of rendering the whole conversation), so assistant tokens "
                f"cannot be located. Conversation: {messages!r:.300}"
            )
        spans.append((len(prompt), len(upto)))
    return text, spans


def tokenize_conversations(tokenizer, conversations, max_length: int) -> list[dict]:
    """Chat-template tokenization with assistant-only labels.

    conversations: iterable of ``{"messages": [{"role", "content"}, ...]}``.
    Returns ``[{"input_ids": list[int], "labels": list[int]}]``, truncated on the right to ``max_length``; a label is
    the token id for tokens whose first character lies in an assistant span, else -100 (HF convention: labels are
    not shifted). Rows left with no assistant token (e.g. after truncation) are dropped, counted and logged.
    Needs a fast tokenizer (character offsets) with a chat template.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenize_conversations needs a fast tokenizer (PreTrainedTokenizerFast) for offsets")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template")
    rows, dropped = [], 0
    for n, conv in enumerate(conversations):
        if not (isinstance(conv, dict) and isinstance(conv.get("messages"), list)):
            raise ValueError(f"row {n} is not a conversation {{'messages': [{{'role', 'content'}}, ...]}}: "
                             f"{conv!r:.120}; load Alpaca rows, JSON files and hub datasets with "
                             "routertune_lib.data.load_instruction_data, which converts them")
        text, spans = _assistant_spans(tokenizer, conv["messages"])
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"][:max_length]
        labels = [
            tok if any(a <= start < b for a, b in spans) else IGNORE_INDEX
            for tok, (start, _end) in zip(ids, enc["offset_mapping"])
        ]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        rows.append({"input_ids": ids, "labels": labels})
    if dropped:
        logger.warning(
            "dropped %d of %d conversations with no assistant token within max_length=%d",
            dropped, len(rows) + dropped, max_length,
        )
    return rows


def pad_id(tokenizer) -> int:
    """The token id to pad with: the tokenizer's pad token, else its eos token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
    return pad


def collate(rows: list[dict], pad: int) -> dict[str, torch.Tensor]:
    """Right-pad rows ``{input_ids, labels}`` (token lists) to ``{input_ids, attention_mask, labels}``, each
    ``[B, T]`` long, with ``pad`` as the padding id (labels padded with -100)."""
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def num_labels(row: dict) -> int:
    """Label tokens of a tokenized row that a causal LM predicts (every label but the first, which has no context)."""
    return sum(label != IGNORE_INDEX for label in row["labels"][1:])


def forward_batches(data, tokenizer, batch_size: int, max_length: int, device) -> list[dict]:
    """Right-padded ``{input_ids, attention_mask}`` batches (``[B, T]`` on ``device``) for forwards without labels.

    data: conversations ``{"messages": [...]}`` (chat template, truncated to ``max_length``), plain texts (the
        tokenizer's default specials, e.g. BOS, as an evaluation encodes a context), both needing ``tokenizer`` and
        batched by ``batch_size``; or ready batches ``{"input_ids": [B, T], "attention_mask"?: [B, T]}`` (a missing
        mask means every token is real).
    """
    items = list(data)
    is_text = bool(items) and all(isinstance(x, str) for x in items)
    if is_text or (items and isinstance(items[0], dict) and "messages" in items[0]):
        if tokenizer is None:
            raise ValueError("batching conversations or texts needs a tokenizer")
        if is_text:
            encoded = tokenizer(items)["input_ids"]
            empty = [i for i, ids in enumerate(encoded) if not ids]
            if empty:
                raise ValueError(f"calibration texts {empty[:5]} have no tokens (e.g. {items[empty[0]]!r}); "
                                 "leave out empty texts")
            rows = [{"input_ids": ids[:max_length], "labels": ids[:max_length]} for ids in encoded]
        else:
            rows = tokenize_conversations(tokenizer, items, max_length)
        pad = pad_id(tokenizer)
        items = [collate(rows[i : i + batch_size], pad) for i in range(0, len(rows), batch_size)]
    batches = []
    for b in items:
        if not (isinstance(b, dict) and "input_ids" in b):
            raise ValueError("data must be conversations, texts or batches {'input_ids': [B, T], 'attention_mask'?}; "
                             f"got an item of type {type(b).__name__}")
        ids = torch.as_tensor(b["input_ids"]).to(device)
        mask = b.get("attention_mask")
        batches.append({"input_ids": ids,
                        "attention_mask": torch.ones_like(ids) if mask is None else torch.as_tensor(mask).to(device)})
    if not batches:
        raise ValueError("no data to batch")
    return batches
