"""Tiny chat tokenizer and conversations for the training tests; run as a script to train under torchrun.

    torchrun --nproc_per_node 2 tests/_two_process_train.py OUTPUT_DIR

trains the tiny Llama's routers with ``TRAIN`` (global batch 8) and leaves ``OUTPUT_DIR/routers.safetensors``.
"""

import random
import string
import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = string.ascii_lowercase + string.digits + " .,?!\n"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TRAIN = dict(learning_rate=1e-2, warmup_ratio=0.0, global_batch_size=8, micro_batch_size=2, max_length=96)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level fast tokenizer (< 96 ids, fits the tiny models) with a chat template and pad/eos tokens."""
    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def conversations(n: int = 16, seed: int = 0) -> list[dict]:
    """``n`` random one-turn conversations of 8..30 characters per message."""
    rng = random.Random(seed)
    words = lambda: " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 6))) for _ in range(rng.randint(2, 6)))
    return [{"messages": [{"role": "user", "content": words() + "?"}, {"role": "assistant", "content": words() + "."}]}
            for _ in range(n)]


def main(output_dir: str) -> None:
    import logging

    logging.basicConfig(level=logging.INFO)
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_model

    from routertune_lib.routing import RouterConfig
    from routertune_lib.training import TrainConfig, train_routers

    train_routers(tiny_model("llama"), tiny_tokenizer(), conversations(16), RouterConfig(num_layers=3),
                  TrainConfig(**TRAIN, output_dir=output_dir))


if __name__ == "__main__":
    main(sys.argv[1])
