"""Write a tiny random Llama and a byte-level BPE tokenizer that vLLM can serve.

Run with the real-vLLM venv's python (it needs torch, transformers and tokenizers):

    .cache/real-vllm/venv/bin/python scripts/real_vllm/make_tiny_model.py DIR

Everything is made here, offline, from a fixed seed and a fixed corpus: the same DIR
contents on every machine, nothing from a model hub. The weights are random, so the text
is gibberish, but greedy decoding is deterministic, which is all the tests compare.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SEED = 1234
VOCAB_SIZE = 512
MAX_POSITIONS = 1024

# A ChatML-like template: enough for /v1/chat/completions (vLLM 400s a chat request when
# the tokenizer has no chat_template).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_TEXT = (
    "the quick brown fox jumps over the lazy dog while a prefill instance computes the "
    "prompt and a decode instance generates every token of the answer one at a time "
    "the proxy routes each request through both and streams the answer back to the client "
    "kv cache blocks move between the instances over rdma or xgmi in read or write mode "
    "hello world tell me a story about a small model that lives on a cpu and never sleeps "
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and punctuation , . ; : ! ? ' \" ( ) [ ] { } "
    "user assistant system message content role json http sse data done usage tokens"
)
WORDS = _TEXT.split()


def corpus() -> list[str]:
    """A fixed pseudo-random corpus (a linear congruential generator, no global RNG)."""
    state = SEED
    lines = []
    for _ in range(4000):
        words = []
        for _ in range(12):
            state = (state * 1103515245 + 12345) % (1 << 31)
            words.append(WORDS[state % len(WORDS)])
        lines.append(" ".join(words))
    return lines


def make_tokenizer(out: pathlib.Path) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def _printable(text: str) -> bool:
    return bool(text) and all(" " <= ch <= "~" for ch in text)


def make_model(out: pathlib.Path, tokenizer: object) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # Wide random weights: decisive logits, so greedy argmax is not a near-tie that
        # batch-dependent float noise could flip.
        initializer_range=0.5,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    # A zero output row gives a logit of exactly 0 while the others spread wide around it,
    # so greedy decoding never picks that token. Zero the special tokens (no early EOS:
    # every greedy answer runs to max_tokens) and every token that is not printable ASCII
    # on its own (lone UTF-8 bytes), so answers are plain readable text.
    with torch.no_grad():
        for token_id in range(config.vocab_size):
            text = tokenizer.decode([token_id])
            if token_id in tokenizer.all_special_ids or not _printable(text):
                model.lm_head.weight[token_id].zero_()
    model.save_pretrained(out, safe_serialization=True)
    # No sampling settings: vLLM's own defaults apply (greedy when temperature is 0).
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            indent=2,
        )
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path, help="directory to (re)write")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(args.out)
    make_model(args.out, tokenizer)
    print(args.out)


if __name__ == "__main__":
    main()
