"""Prompt pools of ``routertune_lib.speed`` (real tokenizers, no model)."""

import pytest

from routertune_lib.models import tiny_random_model
from routertune_lib.speed import text_prompt_pool


@pytest.mark.model  # tiny_random_model reads the tokenizer converted from the bundled GGUF
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_text_prompt_pool_cuts_real_text_into_prompts_with_the_tokenizers_prefix(name):
    _, tok = tiny_random_model(name)
    texts = [f"Question {i}: which of these is a fruit, an apple or a chair?" for i in range(20)]
    pool = text_prompt_pool(tok, texts, num_prompts=3, prompt_len=16)
    assert tuple(pool.shape) == (3, 16)
    prefix = tok("")["input_ids"]  # Gemma: [<bos>]; SmolLM2: []
    assert all(row[: len(prefix)].tolist() == prefix for row in pool)
    body = tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    assert sum((row[len(prefix):].tolist() for row in pool), []) == body[: 3 * (16 - len(prefix))]
    with pytest.raises(ValueError, match="pass more texts"):
        text_prompt_pool(tok, texts[:1], num_prompts=3, prompt_len=16)
