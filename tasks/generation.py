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


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
             batch_size: int = DEFAULT_BATCH_SIZE, do_sample: bool = False, temperature: float = 1.0) -> list[str]:
    """Answers to `prompts` (already rendered with the chat template), in their order, stripped."""
    return generate_with_stops(model, tokenizer, prompts, max_new_tokens, batch_size, do_sample, temperature).texts


def generate_with_stops(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                        batch_size: int = DEFAULT_BATCH_SIZE, do_sample: bool = False,
                        temperature: float = 1.0) -> Generations:
    """`generate()`'s answers plus, per row, whether it stopped at a stop token (the one generation loop).

    A row stopped when its new tokens hold one of the stop tokens: `generate` pads a finished row
    after its stop token, and a row that never stops fills all max_new_tokens. The model is put in
    eval mode for the call and given back in the mode it came in; the tokenizer's padding side is
    restored too (training may share it with right padding).
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pin_cpu_4bit_path(model)  # a flag switched on after loading would change the numbers on some CPUs
    config = generation_config(tokenizer, max_new_tokens, do_sample, temperature)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    outputs: list[str] = [""] * len(prompts)
    stopped: list[bool] = [False] * len(prompts)
    stop_ids = torch.tensor(sorted(set(stop_token_ids(tokenizer))), dtype=torch.long)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, padding=True, return_tensors="pt")
            batch = {key: value.to(model.device) for key, value in batch.items()}
            with torch.inference_mode():
                generated = model.generate(**batch, generation_config=config)
            new_tokens = generated[:, batch["input_ids"].shape[1]:]
            ended = torch.isin(new_tokens.cpu(), stop_ids).any(dim=1).tolist()
            for i, text, done in zip(rows, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), ended,
                                     strict=True):
                outputs[i] = text.strip()
                stopped[i] = bool(done)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return Generations(outputs, stopped)
