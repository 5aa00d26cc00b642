"""Samples to token ids and a trained-token mask: exactly the intended tokens labelled.

- Instruction pairs (Alpaca): BOS + prompt + response + EOS, prompt masked (unless train_on_prompt).
- Prompt-completion: the text kept byte-exact (prompt + completion, no strip, no template), tokenized
  once; a token is trained when it starts at or after the prompt's last character (offsets).
- Conversations: the tokenizer's chat template renders the whole conversation; every assistant
  turn marked to train is trained — its content and the template's own end-of-turn token — and
  nothing is appended (no EOS after `<|im_end|>`). Spans come from rendering incrementally: the
  text up to turn i with the generation prompt, and up to and including turn i. Where a template
  rewrites earlier turns (the full text does not extend the prefixes), each assistant turn becomes an
  example of its own with exactly its context: exact, at the price of repeating the context.
  Tokenizers without a chat template get the Llama 2 [INST] form, EOS closing every assistant turn.
- Text: everything trained.
The first token of every example is never trained (nothing of its own precedes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from trainer.config import DataConfig
from trainer.data.formats import Chat, Pair, Sample, Text, Turn


@dataclass
class Encoded:
    ids: np.ndarray  # int32
    mask: np.ndarray  # uint8: 1 where the token is trained
    truncated: bool = False


@dataclass
class Dropped:
    reason: str  # "prompt too long", "nothing to train within max_seq_length"
    prompt_tokens: int = 0


def llama2_chat_prompt(user: str, system: Optional[str]) -> str:
    """The Llama 2 chat form ([INST] with an optional <<SYS>> block); BOS/EOS are added as ids."""
    if system:
        user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
    return f"[INST] {user} [/INST]"


class Encoder:
    def __init__(self, tokenizer, cfg: DataConfig):
        self.tok = tokenizer
        self.cfg = cfg
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.template = bool(getattr(tokenizer, "chat_template", None))
        self.limit = cfg.max_seq_length
        self.split_conversations = 0  # conversations whose template rewrites earlier turns

    # ---- batches -------------------------------------------------------------------------

    def encode(self, samples: list[Sample]) -> list[list]:
        """For every sample, its examples: Encoded or Dropped (a conversation may give several)."""
        out: list[list] = [[] for _ in samples]
        pairs = [(i, s) for i, s in enumerate(samples) if isinstance(s, Pair) and not s.raw]
        raws = [(i, s) for i, s in enumerate(samples) if isinstance(s, Pair) and s.raw]
        texts = [(i, s) for i, s in enumerate(samples) if isinstance(s, Text)]
        chats = [(i, s) for i, s in enumerate(samples) if isinstance(s, Chat)]
        if pairs:
            prompts = self._ids([s.prompt for _, s in pairs])
            responses = self._ids([s.response for _, s in pairs])
            for (i, _), p, r in zip(pairs, prompts, responses):
                prompt = p if p[:1] == self.bos else self.bos + p
                out[i].append(self._finish(prompt, r + self.eos, prompt_trained=self.cfg.train_on_prompt))
        if raws:
            fulls = [s.prompt + s.response for _, s in raws]
            enc = self.tok(fulls, add_special_tokens=False, return_offsets_mapping=True)
            for (i, s), ids, offsets in zip(raws, enc["input_ids"], enc["offset_mapping"]):
                boundary = len(s.prompt)
                n_prompt = sum(1 for start, end in offsets if start < boundary and end <= boundary)
                prompt, completion = self.bos + ids[:n_prompt], ids[n_prompt:] + self.eos
                out[i].append(self._finish(prompt, completion, prompt_trained=self.cfg.train_on_prompt))
        if texts:
            for (i, _), ids in zip(texts, self._ids([s.text for _, s in texts])):
                out[i].append(self._finish(self.bos + ids, self.eos, prompt_trained=True))
        if chats:
            if self.template:
                for i, chat in chats:
                    out[i].extend(self._templated(chat))
            else:
                for i, chat in chats:
                    out[i].append(self._llama2(chat))
        return out

    def _ids(self, texts: list[str]) -> list[list[int]]:
        backend = getattr(self.tok, "_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            # The fast tokenizer's Rust backend directly: the same ids as tokenizer(texts), without the
            # per-encoding conversion of the Python wrapper (a third of the time) or offsets.
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def _finish(self, prompt: list[int], response: list[int], prompt_trained: bool) -> "Encoded | Dropped":
        if len(prompt) >= self.limit and not prompt_trained:
            return Dropped("prompt too long", len(prompt))
        ids = prompt + response
        mask = [1 if prompt_trained else 0] * len(prompt) + [1] * len(response)
        return self._pack(ids, mask)

    def _pack(self, ids: list[int], mask: list[int]) -> "Encoded | Dropped":
        truncated = len(ids) > self.limit
        ids, mask = ids[: self.limit], mask[: self.limit]
        if mask:
            mask[0] = 0  # nothing precedes the first token inside its own example
        if not any(mask[1:]):
            return Dropped("nothing to train within max_seq_length")
        return Encoded(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8), truncated)

    # ---- conversations ---------------------------------------------------------------------

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _spans(self, chat: Chat, only: Optional[int] = None) -> tuple[str, list[tuple[int, int]], bool]:
        """(rendered text, character spans to train, whether the text extends every prefix)."""
        messages = chat.messages()
        last = len(messages) if only is None else only + 1
        full = self._render(messages[:last])
        spans, consistent = [], True
        for i, turn in enumerate(chat.turns[:last]):
            if turn.role != "assistant" or not turn.train or (only is not None and i != only):
                continue
            before = self._render(messages[:i], generation_prompt=True)
            through = self._render(messages[: i + 1])
            if not through.startswith(before) or not full.startswith(through):
                consistent = False
                continue
            trained = through[len(before) :].rstrip()  # content and end-of-turn token; not the newline after
            spans.append((len(before), len(before) + len(trained)))
        return full, spans, consistent

    def _templated(self, chat: Chat) -> list:
        full, spans, consistent = self._spans(chat)
        if consistent:
            return [self._masked(full, spans)]
        # The template renders earlier turns differently from how it rendered them when they were the
        # latest (e.g. reasoning dropped from history): one exact example per trained assistant turn.
        self.split_conversations += 1
        examples = []
        for i, turn in enumerate(chat.turns):
            if turn.role == "assistant" and turn.train:
                text, turn_spans, _ = self._spans(chat, only=i)
                if turn_spans:
                    examples.append(self._masked(text, turn_spans))
        return examples or [Dropped("the chat template does not render the assistant turns as a prefix")]

    def _masked(self, text: str, spans: list[tuple[int, int]]) -> "Encoded | Dropped":
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [1 if any(a <= start < b for a, b in spans) else 0 for start, _ in enc["offset_mapping"]]
        return self._pack(list(enc["input_ids"]), mask)

    def _llama2(self, chat: Chat) -> "Encoded | Dropped":
        """<s>[INST] <<SYS>>..<</SYS>> user [/INST] assistant </s><s>[INST] user [/INST] ... for a
        tokenizer without a chat template."""
        system = next((t.content for t in chat.turns if t.role == "system"), None)
        pieces: list[tuple[str, int]] = []  # (text, trained)
        pending_user: list[str] = []
        first = True
        for turn in chat.turns:
            if turn.role == "system":
                continue
            if turn.role == "user":
                pending_user.append(turn.content)
                continue
            user = "\n\n".join(pending_user)
            pending_user = []
            pieces.append((llama2_chat_prompt(user, system if first else None), 0))
            pieces.append((f" {turn.content.strip()} ", 2 if turn.train else 3))
            first = False
        ids, mask = [], []
        encoded = self._ids([p for p, _ in pieces])
        for (_, kind), piece in zip(pieces, encoded):
            if kind == 0:
                ids += self.bos + piece
                mask += [0] * (len(self.bos) + len(piece))
            else:
                ids += piece + self.eos
                mask += [1 if kind == 2 else 0] * (len(piece) + len(self.eos))
        if self.cfg.train_on_prompt:
            mask = [1] * len(mask)
        return self._pack(ids, mask)


def render_prompt(sample: Sample, tokenizer, cfg: DataConfig) -> tuple[str, str]:
    """(prompt text, reference text) of a sample, for sample generations in reports."""
    if isinstance(sample, Pair):
        return sample.prompt, sample.response
    if isinstance(sample, Text):
        words = sample.text.split()
        return " ".join(words[: max(1, len(words) // 2)]), " ".join(words[len(words) // 2 :])
    last = max(i for i, t in enumerate(sample.turns) if t.role == "assistant")
    context = [Turn(t.role, t.content) for t in sample.turns[:last]]
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": t.role, "content": t.content} for t in context], tokenize=False, add_generation_prompt=True
        )
    else:
        system = next((t.content for t in context if t.role == "system"), None)
        prompt = llama2_chat_prompt("\n\n".join(t.content for t in context if t.role == "user"), system)
    return prompt, sample.turns[last].content
