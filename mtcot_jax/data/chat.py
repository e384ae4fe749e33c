"""Prompts for an instruct model: its chat template rendered, the answer marker asked for.

An instruct model's CoT is the assistant's own reasoning; the prompt asks it to
end with a line `Answer: <number>`, and the decode loops switch to the answer
phase when that marker's tokens have been written (`answer_markers`). The
template is the model's own (a GGUF file's `tokenizer.chat_template`, a
tokenizer_config.json's `chat_template`), rendered with Jinja2 as transformers'
`apply_chat_template` renders it (trim_blocks, lstrip_blocks, a sandbox).
"""

from __future__ import annotations

import functools

MARKER = "Answer:"
INSTRUCTION = ("Solve the problem step by step. Then write the final answer, a number, "
               f"on its own last line as '{MARKER} <number>'.")


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise ValueError(f"the chat template refused the messages: {message}")
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  return env.from_string(template)


def render(template: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
  """The chat template applied to `messages` ([{"role", "content"}, ...])."""
  if not template:
    raise ValueError("the model has no chat template; accepted: a model whose tokenizer "
                     "carries one (GGUF tokenizer.chat_template or tokenizer_config.json)")
  return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token="", eos_token="")


def user_message(question: str, instruction: str = INSTRUCTION) -> str:
  return f"{question}\n{instruction}" if instruction else question


def chat_prompt(tok, template: str, question: str, instruction: str = INSTRUCTION,
                system: str | None = None) -> list[int]:
  """Token ids of the prompt that asks the assistant `question` (with `instruction`
  appended) and opens its turn."""
  messages = ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": user_message(question, instruction)}]
  return tok.encode(render(template, messages))


def marker_ids(tok, marker: str = MARKER) -> list[list[int]]:
  """The marker's token ids as the model may write it: at a line's start and after
  a space (byte-level BPE gives the two different ids), without duplicates."""
  out = []
  for text in (marker, " " + marker):
    ids = tok.encode(text)
    if ids not in out:
      out.append(ids)
  return out
