"""Prompt pools of ``routertune_lib.speed`` (real tokenizers, no model)."""

import pytest

from routertune_lib.models import tiny_random_model
from routertune_lib.speed import text_prompt_pool


@pytest.mark.model  # tiny_random_model reads the tokenizer converted from the bundled GGUF
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_text_prompt_pool_is_one_text_per_prompt_with_the_tokenizers_prefix(name):
    _, tok = tiny_random_model(name)
    texts = [f"Question {i}: which of these is a fruit, an apple or a chair? " * (i + 1) for i in range(4)]
    pool = text_prompt_pool(tok, texts, num_prompts=3, prompt_len=16)
    assert tuple(pool.shape) == (3, 16)
    prefix = tok("")["input_ids"]  # Gemma: [<bos>]; SmolLM2: []
    for row, text in zip(pool, texts):  # each row: the prefix, then the last tokens of its own text only
        body = tok(text, add_special_tokens=False)["input_ids"]
        assert row.tolist() == prefix + body[len(body) - (16 - len(prefix)):]
    with pytest.raises(ValueError, match="pass at least num_prompts texts"):
        text_prompt_pool(tok, texts[:2], num_prompts=3, prompt_len=16)
    longest = len(tok(texts[0], add_special_tokens=False)["input_ids"]) + len(prefix)
    with pytest.raises(ValueError, match=f"text 0 has {longest} tokens, fewer than prompt_len={longest + 1}"):
        text_prompt_pool(tok, texts, num_prompts=3, prompt_len=longest + 1)
