"""Evaluation: the adapter against the base model (and the serving "champion" adapter), with significance.

One base model is loaded (4-bit when the plan says so) and scored first; the adapter is then attached
with peft, and the champion, when given, is loaded as a second adapter on the same base, so only one
copy of the base weights is ever resident. Every system answers the same prompts, built with the
training template, through `tasks.generation.generate` (the same function the registered model
answers with: batched greedy generation, left padding, only the new tokens decoded).

Scores are on one 0-100 points scale: corpus BLEU and chrF (sacrebleu), ROUGE-1/2/L/Lsum F-measures
(rouge-score) and exact match, plus the eval loss (mean token loss on the responses, masked as in
training) and its perplexity, and the runaway share (answers that hit max_new_tokens without a stop
token). A comparison reports `candidate - baseline` with a 95% interval and a p-value from a
paired bootstrap; `significant` means p < evaluation.significance_level (two-sided: check the sign).

Two checks guard against what the task metrics cannot see: the mean token loss of each system on
`evaluation.general_text` (forgetting: the adapter should not get worse at general text), and the
`evaluation.canaries` (tasks/canaries.py) answered by the adapter.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from configs.schema import ConfigError, PipelineConfig
from tasks.adapter import check_adapter_base, check_adapter_modules, read_adapter_config
from tasks.canaries import canary_failures_markdown, check_canaries, load_canaries
from tasks.data import IGNORE_INDEX, DataError, DatasetSplits, Example, render_prompt, tokenize_example
from tasks.formatting import format_p_value
from tasks.generation import generate_with_stops
from tasks.gpu import TrainingPlan
from tasks.json_values import JsonDataclass
from tasks.modeling import (
    load_base_model,
    load_tokenizer,
    pin_cpu_4bit_path,
    quiet_libraries,
    release_memory,
)

REPORT_FILE = "eval_report.json"
SUMMARY_FILE = "eval_summary.md"
SAMPLES_FILE = "eval_samples.json"
METRIC_KEYS = ("bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "chrf", "exact_match")
METRIC_LABELS = {"bleu": "BLEU", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L",
                 "rougeLsum": "ROUGE-Lsum", "chrf": "chrF", "exact_match": "exact match"}
CHAMPION = "champion"


# ----------------------------------------------------------------------------------------------------
# Loss (generation is tasks.generation.generate, shared with the registered model)
# ----------------------------------------------------------------------------------------------------

def eval_loss(model: Any, tokenizer: Any, examples: list[Example], max_seq_length: int,
              batch_size: int, train_on: str = "all_assistant") -> tuple[float | None, float | None]:
    """(mean loss per response token, perplexity) with the prompt masked exactly as in training.

    None when no response token is left after truncation to max_seq_length (perplexity also None if
    it overflows a float).
    """
    features = [tokenize_example(tokenizer, e, max_seq_length, train_on) for e in examples]
    loss = mean_token_loss(model, tokenizer, features, batch_size)
    if loss is None:
        return None, None
    return loss, math.exp(loss) if loss < 700 else None  # None, not inf: the report stays strict JSON


@dataclass(frozen=True)
class GeneralText:
    """`evaluation.general_text` as read: plain passages (loss on every token) or conversations (loss on
    the responses, masked as training masks them)."""

    path: str
    passages: list[str] = field(default_factory=list)
    conversations: list[Example] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "conversations" if self.conversations else "passages"

    def describe(self) -> dict[str, Any]:
        """What the report records: {path, passages (the count, either kind), kind}."""
        return {"path": self.path, "passages": len(self.conversations or self.passages), "kind": self.kind}


def read_general_text(path: str | Path) -> GeneralText:
    """`evaluation.general_text`: a data file (.jsonl/.json/.csv/.parquet, in any format data.format reads)
    gives conversations; any other file one passage per non-blank line. A missing, empty or unreadable
    file is refused before any model is loaded."""
    from tasks.data import LOCAL_SUFFIXES, load_examples

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"evaluation.general_text: file {path} not found; point it at a text file with one "
                          "passage per line (or a chat/alpaca .jsonl file), or unset it")
    if path.suffix in LOCAL_SUFFIXES:
        try:
            conversations, _ = load_examples(str(path), "auto")
        except (DataError, ConfigError, ValueError) as exc:
            raise ConfigError(f"evaluation.general_text: {path} is not a readable data file: {exc}") from exc
        if not conversations:
            raise ConfigError(f"evaluation.general_text: {path} holds no rows; add conversations, or unset it")
        return GeneralText(str(path), conversations=conversations)
    passages = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if not passages:
        raise ConfigError(f"evaluation.general_text: {path} holds no text; add one passage per line, or unset it")
    return GeneralText(str(path), passages=passages)


def general_text_loss(model: Any, tokenizer: Any, general: GeneralText, max_seq_length: int, batch_size: int,
                      train_on: str = "all_assistant") -> float | None:
    """Mean token loss on the general text: on every token after the first of plain passages (no chat
    template), or on the responses of conversations, exactly as the eval loss is taken.

    This is what the base was pretrained to do; an adapter that raises it has forgotten some of it.
    """
    if general.conversations:
        return eval_loss(model, tokenizer, general.conversations, max_seq_length, batch_size, train_on)[0]
    features = []
    for passage in general.passages:
        ids = tokenizer(passage, add_special_tokens=True, truncation=True, max_length=max_seq_length)["input_ids"]
        features.append({"input_ids": ids, "labels": list(ids)})
    return mean_token_loss(model, tokenizer, features, batch_size)


def forgetting_line(general: dict[str, Any], base: float | None, adapter: float | None) -> str:
    """The forgetting result in one markdown sentence (the evaluation summary and the model card)."""
    delta = "n/a" if base is None or adapter is None else f"{adapter - base:+.4f}"
    what = "conversations, loss on the responses" if general.get("kind") == "conversations" else "passages"
    return (f"mean token loss on `{general['path']}` ({general['passages']} {what}): base {_fmt(base, '.4f')}, "
            f"adapter {_fmt(adapter, '.4f')}, delta {delta} (lower is better)")


def mean_token_loss(model: Any, tokenizer: Any, features: list[dict[str, list[int]]],
                    batch_size: int) -> float | None:
    """Mean next-token loss over every labelled token of `features` (not a mean of batch means).

    Rows are padded on the right so positions start at 0 as in training; None when no token is labelled.
    """
    import torch
    import torch.nn.functional as F

    pin_cpu_4bit_path(model)  # bitsandbytes' packed bf16 CPU path would change the loss on some CPUs
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total_loss, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(features), batch_size):
            batch = features[start:start + batch_size]
            width = max(len(f["input_ids"]) for f in batch)
            input_ids = torch.tensor([f["input_ids"] + [pad_id] * (width - len(f["input_ids"])) for f in batch])
            attention = torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in batch])
            labels = torch.tensor([f["labels"] + [IGNORE_INDEX] * (width - len(f["labels"])) for f in batch])
            with torch.inference_mode():
                logits = model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)).logits
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(shift_logits.device)
            total_loss += F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                          ignore_index=IGNORE_INDEX, reduction="sum").item()
            total_tokens += int((shift_labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total_loss / total_tokens if total_tokens else None


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------

@dataclass
class EvalReport(JsonDataclass):
    """What evaluation found; `to_dict()` is its JSON (eval_report.json), `from_json` reads it back."""

    READ_ERROR = ConfigError
    WRITTEN_BY = "qlora evaluate --adapter DIR"

    n_samples: int
    generation: dict[str, Any]
    bleu_signature: str
    systems: dict[str, dict[str, Any]]
    comparisons: dict[str, dict[str, dict[str, Any]]]
    significance_level: float
    samples: list[dict[str, str]]
    wall_time_s: float
    adapter_dir: str = ""
    champion_adapter: str | None = None
    dataset_fingerprint: str = ""  # of the splits evaluated on (tasks.data.fingerprint), for lineage
    general_text: dict[str, Any] | None = None  # {path, passages}; the losses are each system's general_text_loss
    canaries: dict[str, Any] | None = None  # {path, results: [{name, prompt, expect, output, passed}], failed}
    outputs: dict[str, list[str]] = field(default_factory=dict, repr=False)  # every output, not in the JSON

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("outputs")
        return data

    def markdown(self) -> str:
        g = self.generation
        sampling = f"sampling, temperature {g['temperature']}" if g["do_sample"] else "greedy"
        metrics = [k for k in METRIC_KEYS if any(k in s for s in self.systems.values())]
        lines = [
            f"**Evaluation** on {self.n_samples} eval rows; {sampling}, batch {g['batch_size']}, "
            f"max {g['max_new_tokens']} new tokens; wall time {self.wall_time_s:.1f} s.",
            "",
            "| system | " + " | ".join(METRIC_LABELS[k] for k in metrics)
            + " | eval loss | perplexity | runaway | general-text loss | samples/s |",
            "|---|" + "---:|" * (len(metrics) + 5),
        ]
        for name, s in self.systems.items():
            cells = [_fmt(s.get(k), ".2f") for k in metrics]
            runaway = s.get("runaway_share")
            cells += [_fmt(s["eval_loss"], ".4f"), _fmt(s["perplexity"], ".2f"),
                      "n/a" if runaway is None else f"{runaway:.1%}", _fmt(s.get("general_text_loss"), ".4f"),
                      f"{s['samples_per_s']:.2f}"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "| comparison | metric | delta (points) | 95% CI | p-value | significant |",
            "|---|---|---:|---|---:|---|",
        ]
        for name, metrics in self.comparisons.items():
            for metric, c in metrics.items():
                lines.append(
                    f"| {name.replace('_', ' ')} | {METRIC_LABELS.get(metric, metric)} | {c['delta']:+.2f} | "
                    f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] | {format_p_value(c['p_value'])} | "
                    f"{'yes' if c['significant'] else 'no'} |"
                )
        lines += [
            "",
            f"Significant: paired bootstrap p < {self.significance_level} (two-sided; the sign of the delta says "
            "which way). BLEU and chrF: sacrebleu paired bootstrap; ROUGE-L and exact match: paired bootstrap over "
            "per-sample scores.",
            f"BLEU signature: `{self.bleu_signature}`. Runaway: share of answers that hit max_new_tokens without "
            "a stop token.",
        ]
        lines += self.forgetting_markdown()
        canaries = canary_failures_markdown(self.canaries)
        if canaries:
            lines += ["", *canaries]
        return "\n".join(lines)

    def forgetting_markdown(self) -> list[str]:
        """The general-text losses and the adapter's increase over the base (empty without general text)."""
        if not self.general_text:
            return []
        base = self.systems.get("base", {}).get("general_text_loss")
        adapter = self.systems.get("adapter", {}).get("general_text_loss")
        return ["", f"**Forgetting:** {forgetting_line(self.general_text, base, adapter)}; guard "
                "`registry.guard_metrics.forgetting`."]

    def samples_markdown(self) -> str:
        """The sample rows as a markdown table (for a UI artifact)."""
        if not self.samples:
            return ""
        columns = list(self.samples[0])
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in self.samples:
            lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
        return "\n".join(lines)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"report": out / REPORT_FILE, "summary": out / SUMMARY_FILE, "samples": out / SAMPLES_FILE}
        paths["report"].write_text(json.dumps(self.to_dict(), indent=2))
        paths["summary"].write_text(self.markdown() + "\n")
        paths["samples"].write_text(json.dumps(self.samples, indent=2, ensure_ascii=False))
        return paths


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>")


# ----------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------

def eval_examples(config: PipelineConfig, splits: DatasetSplits) -> list[Example]:
    """The eval rows scored: the eval split in file order, capped at evaluation.max_rows."""
    if not splits.eval:
        raise DataError(
            "the eval split is empty: nothing to evaluate on. Set data.eval_path to an eval file or raise "
            f"data.eval_fraction (now {config.data.eval_fraction}) so some rows hash into eval"
        )
    cap = config.evaluation.max_rows
    return list(splits.eval[:cap] if cap else splits.eval)


def _generate(model: Any, tokenizer: Any, config: PipelineConfig, prompts: list[str]) -> Any:
    import torch

    ev = config.evaluation
    torch.manual_seed(ev.seed)  # only matters when sampling
    return generate_with_stops(model, tokenizer, prompts, ev.max_new_tokens, ev.batch_size, ev.do_sample,
                               ev.temperature)


def _score_system(model: Any, tokenizer: Any, config: PipelineConfig, prompts: list[str],
                  examples: list[Example], general_text: GeneralText | None) -> tuple[list[str], dict[str, Any]]:
    from tasks.metrics import ChrfMetric, ExactMatchMetric, RougeMetric, SacreBleuMetric

    ev = config.evaluation
    started = time.perf_counter()
    generations = _generate(model, tokenizer, config, prompts)
    outputs = generations.texts
    generation_s = time.perf_counter() - started
    started = time.perf_counter()
    loss, perplexity = eval_loss(model, tokenizer, examples, config.data.max_seq_length, ev.batch_size,
                                 config.data.train_on)
    loss_s = time.perf_counter() - started
    references = [e.response for e in examples]
    bleu = SacreBleuMetric().compute(predictions=outputs, references=references)
    rouge = RougeMetric().compute(predictions=outputs, references=references)
    scores = {
        "bleu": bleu["score"],
        **{key: rouge[key] for key in ("rouge1", "rouge2", "rougeL", "rougeLsum")},
        "chrf": ChrfMetric().compute(predictions=outputs, references=references)["score"],
        **ExactMatchMetric().compute(predictions=outputs, references=references),
        "eval_loss": loss,
        "perplexity": perplexity,
        "runaway_share": generations.runaway_share,
        "samples_per_s": len(prompts) / generation_s if generation_s > 0 else 0.0,
        "wall_time_s": generation_s,
        "eval_loss_wall_time_s": loss_s,
        "bleu_signature": bleu["signature"],
    }
    if general_text is not None:
        scores["general_text_loss"] = general_text_loss(model, tokenizer, general_text, config.data.max_seq_length,
                                                        ev.batch_size, config.data.train_on)
    return outputs, scores


def _compare(references: list[str], baseline: list[str], candidate: list[str], config: PipelineConfig) -> dict:
    from tasks.metrics import (
        bootstrap_exact_match_delta,
        bootstrap_rouge_l_delta,
        paired_bootstrap_bleu,
        paired_bootstrap_chrf,
    )

    ev = config.evaluation
    args = (references, baseline, candidate, ev.bootstrap_resamples, ev.seed, ev.significance_level)
    return {"bleu": paired_bootstrap_bleu(*args).to_dict(), "rougeL": bootstrap_rouge_l_delta(*args).to_dict(),
            "chrf": paired_bootstrap_chrf(*args).to_dict(), "exact_match": bootstrap_exact_match_delta(*args).to_dict()}


def evaluate_adapter(config: PipelineConfig, plan: TrainingPlan, splits: DatasetSplits, adapter_dir: str | Path,
                     champion_adapter: str | Path | None = None) -> EvalReport:
    """Stage 4: score base, adapter (and champion) on the eval split and compare them.

    Raises DataError for an empty eval split and ConfigError for an adapter that does not fit the
    configured base, or for a general-text or canary file that cannot be used, before any generation.
    The canaries are answered by the adapter (the candidate), with the same generation settings.
    """
    from peft import PeftModel

    quiet_libraries()
    started = time.perf_counter()
    ev = config.evaluation
    examples = eval_examples(config, splits)
    adapters = {"adapter": (Path(adapter_dir), "--adapter")}
    if champion_adapter:
        adapters[CHAMPION] = (Path(champion_adapter), "--champion")
    adapter_configs = {}
    for name, (path, option) in adapters.items():
        adapter_configs[name] = read_adapter_config(path, option)
        check_adapter_base(adapter_configs[name], config, path, option)

    general_text = read_general_text(ev.general_text) if ev.general_text else None
    canaries = load_canaries(ev.canaries) if ev.canaries else []

    tokenizer = load_tokenizer(config)
    prompts = [render_prompt(tokenizer, e.prompt_messages) for e in examples]
    references = [e.response for e in examples]
    outputs: dict[str, list[str]] = {}
    systems: dict[str, dict[str, Any]] = {}
    model = load_base_model(config, plan)
    try:
        for name, (path, option) in adapters.items():
            check_adapter_modules(model, adapter_configs[name], path, option)
        outputs["base"], systems["base"] = _score_system(model, tokenizer, config, prompts, examples, general_text)
        # Attaching LoRA layers changes the base in place: the base was scored first.
        model = PeftModel.from_pretrained(model, str(adapters["adapter"][0]), adapter_name="default",
                                          is_trainable=False)
        outputs["adapter"], systems["adapter"] = _score_system(model, tokenizer, config, prompts, examples,
                                                               general_text)
        canary_answers = _generate(model, tokenizer, config, [
            render_prompt(tokenizer, [{"role": "user", "content": c.prompt}]) for c in canaries]).texts
        if CHAMPION in adapters:
            model.load_adapter(str(adapters[CHAMPION][0]), adapter_name=CHAMPION, is_trainable=False)
            model.set_adapter(CHAMPION)
            outputs[CHAMPION], systems[CHAMPION] = _score_system(model, tokenizer, config, prompts, examples,
                                                                 general_text)
    finally:
        model = None
        release_memory()

    signature = systems["base"].pop("bleu_signature")
    for scores in systems.values():
        scores.pop("bleu_signature", None)
    comparisons = {"adapter_vs_base": _compare(references, outputs["base"], outputs["adapter"], config)}
    if CHAMPION in outputs:
        comparisons["adapter_vs_champion"] = _compare(references, outputs[CHAMPION], outputs["adapter"], config)

    samples = []
    for i, example in enumerate(examples[:ev.num_sample_rows]):
        row = {"prompt": "\n\n".join(m["content"] for m in example.prompt_messages), "reference": example.response}
        row.update({name: texts[i] for name, texts in outputs.items()})
        samples.append(row)
    return EvalReport(
        n_samples=len(examples),
        generation={"batch_size": ev.batch_size, "max_new_tokens": ev.max_new_tokens, "do_sample": ev.do_sample,
                    "temperature": ev.temperature},
        bleu_signature=signature,
        systems=systems,
        comparisons=comparisons,
        significance_level=ev.significance_level,
        samples=samples,
        wall_time_s=time.perf_counter() - started,
        adapter_dir=str(adapter_dir),
        champion_adapter=str(champion_adapter) if champion_adapter else None,
        dataset_fingerprint=splits.fingerprint,
        general_text=general_text.describe() if general_text else None,
        canaries=check_canaries(canaries, canary_answers, ev.canaries) if canaries else None,
        outputs=outputs,
    )
