"""A model and data set that are not the bench's own, to run `bench/run.py` on from outside.

    python bench/outside.py /tmp/outside
    python bench/run.py --model-dir /tmp/outside/model --data /tmp/outside/chat.jsonl \\
        --eval-data /tmp/outside/chat-eval.jsonl --name outside-qwen2

Writes what a user would bring: a random-weight Qwen2 model (tied embeddings, q/k/v biases, 6 heads
over 2 KV heads) with a ChatML chat template, and conversations in the TRL `messages` format (30%
with a system turn, 25% with a second user/assistant exchange, long-tailed answers), 800 for
training and 80 held out. Nothing in it is read by the bench except through those three paths.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def conversations(n: int, seed: int) -> list[dict]:
    from trainer.dev.tiny import flashcards

    rng = random.Random(seed)
    out = []
    for card in flashcards(n, seed=seed, long_tail=True):
        turns = [{"role": "system", "content": "You answer medical questions briefly."}] if rng.random() < 0.3 else []
        turns += [{"role": "user", "content": card["input"]}, {"role": "assistant", "content": card["output"]}]
        if rng.random() < 0.25:
            turns += [{"role": "user", "content": "Say it again, shorter."},
                      {"role": "assistant", "content": card["output"].split(".")[0] + "."}]
        out.append({"messages": turns})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir")
    p.add_argument("--examples", type=int, default=800)
    args = p.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from trainer.dev.tiny import build_tokenizer, corpus, flashcards, write_json

    root = Path(args.dir)
    tok = build_tokenizer(corpus(flashcards(4000, seed=1, long_tail=True)), vocab_size=2048, chat_template=CHATML)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=192, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    write_json(root / "chat.jsonl", conversations(args.examples, 5), lines=True)
    write_json(root / "chat-eval.jsonl", conversations(max(10, args.examples // 10), 99), lines=True)
    print(f"wrote {root / 'model'}, {root / 'chat.jsonl'}, {root / 'chat-eval.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
