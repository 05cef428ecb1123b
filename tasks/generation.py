"""The one way this project generates text: evaluation, the registered pyfunc model and serving call it.

Scores are only worth something if the registered model answers exactly as the evaluated one did,
so there is a single `generate()`: greedy unless sampling is asked for, batches of prompts of
similar length (less padding) padded on the left (every row ends where generation continues), a
`GenerationConfig` that names its stop tokens (the template's end of turn and eos) and pad itself (the
model's own generation defaults are not consulted), `torch.inference_mode`, and only the tokens after
each prompt decoded.

`generate_with_stops()` is the same call that also says, per row, whether the model stopped by itself
(emitted a stop token) or ran into `max_new_tokens`: evaluation reports the share of such runaway
answers, and the promotion gate refuses an adapter that rambles. `generate()` is its text alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.chat import stop_token_ids
from tasks.modeling import pin_cpu_4bit_path

DEFAULT_BATCH_SIZE = 16


def generation_config(tokenizer: Any, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0) -> Any:
    """Greedy unless sampling is asked for; the model's own generation defaults are not consulted.

    Generation stops at the chat template's end-of-turn token (the one training put loss on) as well
    as at eos: a chat model ends its answer with `<|eot_id|>` or `<|im_end|>`, not with eos.
    """
    from transformers import GenerationConfig

    sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_token_ids(tokenizer) or None,
        use_cache=True,
        **sampling,
    )


@dataclass(frozen=True)
class Generations:
    """Answers in prompt order, and for each whether it ended with a stop token (False: it hit max_new_tokens)."""

    texts: list[str]
    stopped: list[bool]

    @property
    def runaway_share(self) -> float:
        """Share of answers cut by max_new_tokens instead of ending themselves (0.0 for no answers)."""
        return (len(self.stopped) - sum(self.stopped)) / len(self.stopped) if self.stopped else 0.0


def generate_tokens(model: Any, tokenizer: Any, rows: list[list[int]], config: Any,
                    adapter_names: list[str] | None = None, streamer: Any = None) -> list[list[int]]:
    """The new token ids of one padded batch of already-tokenized prompts, one list per row, in order.

    The step under `generate()` and under the server's batcher: rows padded on the left, eval mode and
    `torch.inference_mode` for the call. `adapter_names` (one per row; peft's `"__base__"` for none) runs
    a peft mixed-adapter batch, each row through its own LoRA adapter on the one shared base. A
    `streamer` (transformers' BaseStreamer protocol) receives each step's tokens of the whole batch.
    Rows keep their padding after eos; decoding with skip_special_tokens drops it.
    """
    import torch

    pin_cpu_4bit_path(model)  # a flag switched on after loading would change the numbers on some CPUs
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    extra = {"adapter_names": list(adapter_names)} if adapter_names is not None else {}
    if streamer is not None:
        extra["streamer"] = streamer
    try:
        batch = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        batch = {key: value.to(model.device) for key, value in batch.items()}
        with torch.inference_mode():
            generated = model.generate(**batch, generation_config=config, **extra)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return generated[:, batch["input_ids"].shape[1]:].tolist()


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
             batch_size: int = DEFAULT_BATCH_SIZE, do_sample: bool = False, temperature: float = 1.0,
             adapter_names: list[str] | None = None) -> list[str]:
    """Answers to `prompts` (already rendered with the chat template), in their order, stripped."""
    return generate_with_stops(model, tokenizer, prompts, max_new_tokens, batch_size, do_sample, temperature,
                               adapter_names).texts


def generate_with_stops(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                        batch_size: int = DEFAULT_BATCH_SIZE, do_sample: bool = False,
                        temperature: float = 1.0, adapter_names: list[str] | None = None) -> Generations:
    """`generate()`'s answers plus, per row, whether it stopped at a stop token (the one generation loop).

    A row stopped when its new tokens hold one of the stop tokens: `generate` pads a finished row
    after its stop token, and a row that never stops fills all max_new_tokens. The model is put in
    eval mode for the call and given back in the mode it came in; the tokenizer's padding side is
    restored too (training may share it with right padding). `adapter_names` (one per prompt) answers
    each prompt with its own adapter of a multi-adapter PeftModel, in mixed batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"adapter_names has {len(adapter_names)} entries for {len(prompts)} prompts")
    config = generation_config(tokenizer, max_new_tokens, do_sample, temperature)
    stop_ids = set(stop_token_ids(tokenizer))
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    outputs: list[str] = [""] * len(prompts)
    stopped: list[bool] = [False] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        names = [adapter_names[i] for i in rows] if adapter_names is not None else None
        new_tokens = generate_tokens(model, tokenizer, [encoded[i] for i in rows], config, names)
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for i, text, tokens in zip(rows, texts, new_tokens, strict=True):
            outputs[i] = text.strip()
            stopped[i] = any(token in stop_ids for token in tokens)
    return Generations(outputs, stopped)
