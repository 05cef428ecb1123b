"""The one configuration schema of the pipeline.

Every knob a user can turn lives here, and nowhere else: stages receive a validated `PipelineConfig`
and never read YAML or environment variables themselves. Unknown keys are rejected so that a typo in a
nightly config fails loudly instead of silently training with a default.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from configs.paths import PROJECT_DIR_ENV, default_config_path, project_dir


class ConfigError(ValueError):
    """A configuration problem a person must fix; the message names the key and the allowed values."""


# A registered adapter version: models:/<name>/<version> or models:/<name>@<alias> (groups: name, version, alias).
MODEL_URI = re.compile(r"models:/([^/@]+)(?:/(\d+)|@([\w-]+))/?")


def check_adapter_source(value: str) -> str:
    """An adapter given as a folder or a registry URI; a URI must name a version or an alias (no trailing /)."""
    if not value.startswith("models:/"):
        return value
    if not MODEL_URI.fullmatch(value):
        raise ValueError(f"'{value}' must look like models:/<name>@<alias> or models:/<name>/<version>")
    return value.rstrip("/")


def strings_as_entries(value: Any, key: str) -> Any:
    """A list whose plain-string items stand for `{key: item}` (the short form of a list of sections)."""
    if isinstance(value, list):
        return [{key: item} if isinstance(item, str) else item for item in value]
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DataFormat = Literal["auto", "alpaca", "chat", "prompt_completion"]
# Which assistant turns of a conversation carry loss: every one, or only the last (the response).
TrainOn = Literal["all_assistant", "last_assistant"]


class ValidationThresholds(_Section):
    """Thresholds of the data contract (the Great Expectations suite run before any GPU time)."""

    min_train_rows: int = Field(10, ge=1)
    min_eval_rows: int = Field(1, ge=1)
    max_overlong_share: float = Field(
        0.01, ge=0.0, le=1.0, description="share of rows longer than data.max_seq_length tokens that is tolerated"
    )
    min_loss_token_share: float = Field(
        0.05, ge=0.0, le=1.0, description="floor for the share of tokens that carry loss (response tokens)"
    )
    max_unterminated_share: float = Field(
        0.0, ge=0.0, le=1.0,
        description="share of rows tolerated whose trained assistant turns do not all end with a stop token "
                    "(a template without an end-of-turn marker, or a turn cut by max_seq_length)",
    )
    max_duplicate_share: float = Field(0.0, ge=0.0, le=1.0, description="share of duplicated train rows tolerated")
    max_leaked_share: float = Field(0.0, ge=0.0, le=1.0, description="share of eval prompts also in train tolerated")
    max_examples: int = Field(5, ge=0, description="offending rows shown per failed expectation")
    data_docs_dir: Path | None = Field(None, description="write Great Expectations Data Docs HTML here")


# How `data.sources` are interleaved (datasets.interleave_datasets' stopping strategies).
MixStopping = Literal["first_exhausted", "all_exhausted", "all_exhausted_without_replacement"]


class DataSource(_Section):
    """One entry of `data.sources`: a file (or hub dataset) and its share of the mixed training set."""

    path: str = Field(description="local .jsonl/.json/.csv/.parquet file, or a hub dataset id")
    weight: float = Field(1.0, gt=0, description="share of the mix, relative to the other sources' weights")
    format: DataFormat | None = Field(None, description="this source's format; None: data.format")
    eval_fraction: float | None = Field(
        None, ge=0.0, lt=1.0,
        description="this source's share of rows hashed into eval; None: data.eval_fraction; 0: the source only "
                    "trains (a replay of older or general data that the eval set should not measure)")


class DataConfig(_Section):
    path: str | None = Field(
        None, description="local .jsonl/.json/.csv/.parquet file, or a hub dataset id: the one-source shorthand of "
                          "`sources` (set one of the two)")
    sources: list[DataSource] | None = Field(
        None, description="training data mixed from several files by weight, e.g. tonight's rows plus a replay of "
                          "older data: [{path, weight, format}] (a plain string is a source of weight 1); each is "
                          "split, validated and fingerprinted on its own, then the train rows are interleaved "
                          "(datasets.interleave_datasets)")
    mix_seed: int = Field(42, description="seed of the interleaving of `sources` (same seed, same order)")
    mix_stopping: MixStopping = Field(
        "first_exhausted",
        description="when the interleaving of `sources` ends: first_exhausted (when one source runs out: the "
                    "weights are the shares, no row repeats), all_exhausted (when every row was used: smaller "
                    "shares are repeated), all_exhausted_without_replacement (every row once; weights set the order)")
    eval_path: str | None = Field(None, description="separate eval file; when absent, eval is split off by hash")
    format: DataFormat = "auto"
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of rows hashed into eval when no eval_path")
    max_seq_length: int = Field(512, ge=8)
    train_on: TrainOn = Field(
        "all_assistant", description="assistant turns that carry loss: every one, or only the last (the response)"
    )
    chat_template: Path | None = Field(
        None, description="Jinja file overriding the tokenizer's chat template (for base models without one); "
                          "saved with the adapter's tokenizer, so evaluation and serving render alike"
    )
    hub_split: str = Field("train", description="split to read when `path` is a hub dataset id")
    validation: ValidationThresholds = ValidationThresholds()

    @field_validator("sources", mode="before")
    @classmethod
    def _plain_sources(cls, value: Any) -> Any:
        """A plain string entry is a source of weight 1."""
        return strings_as_entries(value, "path")

    @model_validator(mode="after")
    def _one_way_to_name_the_data(self) -> DataConfig:
        if self.path is not None and self.sources is not None:
            raise ValueError("data.path and data.sources are both set; data.path is the one-source shorthand of "
                             "data.sources: keep one (on the command line, --set data.path=FILE alone replaces "
                             "the file's data.sources, and --set data.sources=[...] alone its data.path)")
        if self.path is None and self.sources is None:
            raise ValueError("no training data: set data.path (one file) or data.sources (a weighted list of "
                             "files, e.g. [{path: new.jsonl, weight: 3}, {path: replay.jsonl, weight: 1}])")
        if self.sources is not None and not self.sources:
            raise ValueError("data.sources is empty; list at least one {path, weight}, or use data.path")
        paths = [source.path for source in self.sources or []]
        repeated = sorted({path for path in paths if paths.count(path) > 1})
        if repeated:
            raise ValueError(f"data.sources lists {repeated} more than once; give each file one entry (its weight "
                             "sets its share)")
        return self

    def source_list(self) -> list[DataSource]:
        """The sources as configured, each with its format and eval fraction resolved; `path` is one source
        of weight 1."""
        if self.sources is None:
            return [DataSource(path=str(self.path), format=self.format, eval_fraction=self.eval_fraction)]
        return [source.model_copy(update={
            "format": source.format or self.format,
            "eval_fraction": self.eval_fraction if source.eval_fraction is None else source.eval_fraction,
        }) for source in self.sources]

    def describe(self) -> str:
        """The data in one line, for run notes and model cards: the path, or each source with its weight."""
        if self.sources is None:
            return str(self.path)
        return " + ".join(f"{s.path} (weight {s.weight:g})" for s in self.sources)


class ModelConfig(_Section):
    name_or_path: str = Field(description="hub model id or local folder saved with save_pretrained")
    revision: str | None = Field(None, description="hub revision (commit, tag or branch) to pin")
    trust_remote_code: bool = False


class QuantizationConfig(_Section):
    load_in_4bit: bool = Field(True, description="QLoRA: base weights in 4 bits; false trains plain LoRA")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bf16 on compute capability >= 8.0, fp16 below, fp32 on CPU"
    )


# Metrics an evaluation during training reports, and whether larger is better (the Trainer computes the
# loss only; generation metrics are the evaluate stage's).
BEST_METRICS_GREATER_IS_BETTER: dict[str, bool] = {"eval_loss": False}
BestMetric = Literal["eval_loss"]

LoraPresetName = Literal["classification", "summarization", "code", "instruction"]
AlphaPolicy = Literal["standard", "conservative", "aggressive"]
ALPHA_FACTORS: dict[str, int] = {"conservative": 1, "standard": 2, "aggressive": 4}
LORA_PRESETS: dict[str, dict[str, Any]] = {
    # From the setup guide: rank grows with how far the task is from pretraining.
    "classification": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
    "summarization": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]},
    "code": {"r": 32, "alpha": 64, "target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj"]},
    "instruction": {
        "r": 64,
        "alpha": 128,
        "target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
}


class LoraSettings(_Section):
    """LoRA adapter shape. A preset fills what is not set explicitly; explicit values always win."""

    preset: LoraPresetName | None = None
    r: int | None = Field(None, description="rank; > 0")
    alpha: int | None = Field(None, description="scaling numerator; default from alpha_policy")
    alpha_policy: AlphaPolicy = "standard"
    dropout: float = 0.05
    target_modules: list[str] | Literal["all-linear"] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"

    @field_validator("r")
    @classmethod
    def _positive_rank(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(f"lora.r must be a positive integer (e.g. 8, 16, 64), got {value}")
        return value

    @field_validator("dropout")
    @classmethod
    def _dropout_range(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {value}")
        return value

    @model_validator(mode="after")
    def _apply_preset(self) -> LoraSettings:
        preset = LORA_PRESETS.get(self.preset or "", {})
        explicit = self.model_fields_set
        updates: dict[str, Any] = {}
        if "r" not in explicit or self.r is None:
            updates["r"] = preset.get("r", 16)
        if "target_modules" not in explicit or self.target_modules is None:
            updates["target_modules"] = preset.get("target_modules", "all-linear")
        rank = updates.get("r", self.r)
        if "alpha" not in explicit or self.alpha is None:
            # A preset's alpha is its standard 2r; a non-standard policy overrides it.
            if "alpha" in preset and self.alpha_policy == "standard" and rank == preset["r"]:
                updates["alpha"] = preset["alpha"]
            else:
                updates["alpha"] = ALPHA_FACTORS[self.alpha_policy] * rank
        for key, value in updates.items():
            object.__setattr__(self, key, value)
        return self


class TrainingConfig(_Section):
    output_dir: Path = Field(Path("outputs/demo"), description="checkpoints, adapter and summary go here")
    max_steps: int = Field(-1, description="> 0 overrides num_epochs")
    num_epochs: float = Field(1.0, gt=0)
    per_device_batch_size: int | Literal["auto"] = Field("auto", description="auto: chosen by the GPU plan")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    optim: str = Field("paged_adamw_8bit", description="any transformers optimizer name")
    gradient_checkpointing: bool | Literal["auto"] = Field("auto", description="auto: on when the plan needs it")
    packing: bool = Field(True, description="padding-free batches (DataCollatorWithFlattening)")
    save_steps: int = Field(100, ge=1)
    save_total_limit: int = Field(2, ge=1)
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="eval loss every N steps; None: at the end only")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop when best_metric has not improved for this many evaluations (needs eval_steps); "
                                "None: train all steps"
    )
    best_metric: BestMetric = Field("eval_loss", description="the evaluation metric that picks the best step")
    keep_best: bool = Field(
        True, description="with eval_steps: the adapter is the best evaluated step's, not the last step's "
                          "(save_steps then follows eval_steps)"
    )
    seed: int = 42
    resume: bool = Field(True, description="resume from the last checkpoint in output_dir when there is one")
    output_dir_lock: Literal["fail", "wait"] = Field(
        "fail", description="another live run holds output_dir: fail at once naming it, or wait for it"
    )
    lock_timeout_s: float = Field(21600.0, gt=0, description="with output_dir_lock=wait: longest wait, in seconds")
    distributed: Literal["none", "ddp", "fsdp"] = Field(
        "none", description="none: one process; ddp: data parallel, one 4-bit base per rank; fsdp: FSDP-QLoRA, "
                            "the 4-bit base sharded across ranks (models larger than one GPU)"
    )
    num_processes: int | Literal["auto"] = Field(
        "auto", description="ranks with distributed=ddp|fsdp; auto: one per visible GPU (1 on a CPU machine, "
                            "where a number must be given); the effective batch is kept (tasks.gpu.plan_training)"
    )
    offload: Literal["none", "zero2_cpu"] = Field(
        "none", description="zero2_cpu: DeepSpeed ZeRO-2 with the optimizer states on the CPU (needs deepspeed)"
    )
    compile: bool = Field(
        False, description="torch.compile the model (TrainingArguments.torch_compile). Off by default: on the "
                           "CPU it measured slower with 4-bit layers (bench/RESULTS.md); no GPU gain measured yet"
    )
    init_adapter: str | None = Field(
        None, description="start from this adapter's weights instead of a fresh LoRA: a peft adapter folder, "
                          "models:/<name>@<alias> or models:/<name>/<version> (registry.tracking_uri); its rank, "
                          "target modules and base must be lora.r, lora.target_modules and model.name_or_path"
    )

    @field_validator("init_adapter")
    @classmethod
    def _known_init_source(cls, value: str | None) -> str | None:
        return None if value is None else check_adapter_source(value)

    @model_validator(mode="after")
    def _offload_needs_one_strategy(self) -> TrainingConfig:
        if self.offload != "none" and self.distributed == "fsdp":
            raise ValueError("training.offload=zero2_cpu runs DeepSpeed ZeRO-2, which replaces FSDP: set "
                             "training.distributed to ddp (or none) with it, or offload to none with fsdp")
        return self

    @field_validator("per_device_batch_size", "num_processes")
    @classmethod
    def _auto_or_positive(cls, value: int | str, info: ValidationInfo) -> int | str:
        if isinstance(value, int) and value <= 0:
            raise ValueError(f"training.{info.field_name} must be 'auto' or > 0, got {value}")
        return value

    @property
    def selects_best(self) -> bool:
        """Whether evaluations pick a best step: to keep it (keep_best) or to stop when it stops improving."""
        return self.eval_steps is not None and (self.keep_best or self.early_stopping_patience is not None)

    @model_validator(mode="after")
    def _best_step_needs_aligned_evaluations(self) -> TrainingConfig:
        """Early stopping needs evaluations; keeping the best step needs a checkpoint at every evaluation.

        transformers' `load_best_model_at_end` can only return to a step that was saved, and it tracks the
        best metric over every evaluation, saved or not; so save_steps must equal eval_steps for the kept
        adapter to be the best evaluation's. Unset, save_steps follows eval_steps.
        """
        if self.early_stopping_patience is not None and self.eval_steps is None:
            raise ValueError(
                f"training.early_stopping_patience={self.early_stopping_patience} needs evaluations during training: "
                "set training.eval_steps (e.g. training.eval_steps=50), or remove early_stopping_patience"
            )
        if self.eval_steps is not None and self.keep_best and self.save_steps != self.eval_steps:
            if "save_steps" in self.model_fields_set:
                raise ValueError(
                    f"training.keep_best needs a checkpoint at every evaluation, but save_steps={self.save_steps} "
                    f"differs from eval_steps={self.eval_steps}: set training.save_steps={self.eval_steps} (or leave "
                    "it unset; it then follows eval_steps), or set training.keep_best=false"
                )
            object.__setattr__(self, "save_steps", self.eval_steps)
        return self


class EvaluationConfig(_Section):
    max_rows: int | None = Field(None, ge=1, description="cap on eval rows; None: the whole eval split")
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    num_sample_rows: int = Field(10, ge=0, description="rows of the prompt/reference/outputs table")
    bootstrap_resamples: int = Field(1000, ge=100)
    significance_level: float = Field(0.05, gt=0, lt=1)
    champion_adapter: str | None = Field(None, description="adapter dir or models:/ URI to compare against")
    seed: int = 12345
    general_text: Path | None = Field(
        None, description="what the adapter must not get worse at: a .txt file, one passage per line (loss on every "
                          "token), or a data file in a format data.format reads, e.g. chat or alpaca .jsonl (loss "
                          "on the responses, masked as training masks them); base and adapter mean token loss on "
                          "it are reported (guard: registry.guard_metrics.forgetting)"
    )
    canaries: Path | None = Field(
        None, description="YAML list of {prompt, expect: {exact|contains|regex}} checks run on every candidate; "
                          "any failure blocks promotion"
    )


# Scores of generated text, in points 0-100, higher is better: each can be the primary metric or a guard.
TextMetric = Literal["bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "chrf", "exact_match"]
# Guards on losses, lower is better: guard name -> the per-system score it watches. `forgetting` watches the
# mean token loss on evaluation.general_text; its tolerance is the largest tolerated loss increase.
LOSS_GUARDS: dict[str, str] = {"forgetting": "general_text_loss"}
GuardMetric = Literal["bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "chrf", "exact_match", "forgetting"]


class RegistryConfig(_Section):
    tracking_uri: str | None = Field(
        None, description="None: sqlite store in the repo's mlflow/ folder; else any MLflow tracking URI"
    )
    experiment_name: str = "qlora-pipeline"
    model_name: str = "demo-qlora-adapter"
    primary_metric: TextMetric = "bleu"
    guard_metrics: dict[GuardMetric, float] = Field(
        default_factory=lambda: {"rougeL": 1.0},
        description="metric -> tolerance against base and champion: for a text metric (higher is better) the "
                    "largest tolerated drop in points; for `forgetting` (a loss, lower is better) the largest "
                    "tolerated increase of the general-text loss",
    )
    max_runaway_share: float = Field(
        0.05, ge=0.0, le=1.0,
        description="largest share of the adapter's answers that may hit max_new_tokens without a stop token "
                    "(it must also be no worse than the champion's)",
    )
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"
    request_max_retries: int | None = Field(
        None, ge=0, description="MLflow HTTP retries per request (MLFLOW_HTTP_REQUEST_MAX_RETRIES); None: MLflow's"
    )
    request_timeout_s: int | None = Field(
        None, ge=1, description="MLflow HTTP timeout per request (MLFLOW_HTTP_REQUEST_TIMEOUT); None: MLflow's"
    )
    log_input_example: bool = Field(
        True, description="store an input example with the model; MLflow then loads it and predicts once at logging"
    )

    @field_validator("guard_metrics")
    @classmethod
    def _tolerances_not_negative(cls, value: dict[str, float]) -> dict[str, float]:
        negative = {metric: tolerance for metric, tolerance in value.items() if tolerance < 0}
        if negative:
            raise ValueError(f"guard tolerances must be >= 0 (a drop, or for forgetting a loss increase), got "
                             f"{negative}")
        return value


class ServedModel(_Section):
    """One adapter the model server answers with: a registry URI or an adapter folder, and its name in the API."""

    source: str = Field(description="models:/<name>@<alias>, models:/<name>/<version>, or a peft adapter folder")
    name: str | None = Field(None, description="the `model` field that picks it; default: <name>@<alias>, "
                                               "<name>/<version>, or the folder's name")

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        return check_adapter_source(value)

    def served_name(self) -> str:
        if self.name:
            return self.name
        if self.source.startswith("models:/"):
            return self.source.removeprefix("models:/")
        return Path(self.source).name


class ServingConfig(_Section):
    """What `qlora serve-model` serves and its limits; see README "Serving"."""

    models: list[ServedModel] = Field(default_factory=list, description="adapters served on the one base")
    host: str = Field("127.0.0.1", description="beyond 127.0.0.1 a bearer token (QLORA_SERVING_TOKEN) is required")
    port: int = Field(8000, ge=0, le=65535)
    ab: dict[str, float] = Field(
        default_factory=dict, description="arm -> weight for requests naming no model; an arm is a served model's "
                                          "name or the alias of one served models:/<name>@<alias>")
    max_batch_size: int = Field(8, ge=1, description="most requests answered in one generate")
    max_wait_ms: float = Field(10.0, ge=0, description="longest a request waits for others to join its batch")
    watch_interval_s: float = Field(30.0, ge=0, description="how often served aliases are checked; 0: never")
    max_prompt_tokens: int = Field(1024, ge=1, description="longer prompts are refused with 400")
    max_tokens: int = Field(256, ge=1, description="cap on a request's max_tokens")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens of a request that names none")
    summary_interval_s: float = Field(60.0, ge=0, description="per-arm summaries to MLflow this often; 0: never")
    experiment_name: str | None = Field(None, description="MLflow experiment of the summaries; "
                                                          "default <registry.experiment_name>-serving")
    feedback_window: int = Field(100_000, ge=1, description="most recent request ids kept for feedback")

    @field_validator("models", mode="before")
    @classmethod
    def _plain_sources(cls, value: Any) -> Any:
        """A plain string entry is a source with the default name."""
        return strings_as_entries(value, "source")

    @model_validator(mode="after")
    def _check_models(self) -> ServingConfig:
        names = [m.served_name() for m in self.models]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"serving.models: served names {duplicated} repeat; give each entry its own `name`")
        if "__base__" in names:
            raise ValueError("serving.models: '__base__' is reserved for the base model without an adapter")
        if any(weight < 0 for weight in self.ab.values()) or (self.ab and sum(self.ab.values()) <= 0):
            raise ValueError(f"serving.ab: weights must be >= 0 with a positive sum, got {self.ab}")
        return self


SearchValue = bool | int | float | str | None
SWEEP_OBJECTIVES: dict[str, str] = {"eval_loss": "minimize", "bleu": "maximize", "rougeL": "maximize"}


class SearchRange(_Section):
    """A numeric range searched by the sampler: ints when `low` and `high` are both ints, else floats."""

    low: int | float
    high: int | float
    log: bool = Field(False, description="sample on a log scale (learning rates); needs low > 0")


class SweepConfig(_Section):
    """Hyper-parameter search (`qlora sweep`): Optuna samples `space`, each trial trains and evaluates.

    `space` maps dotted config keys (`lora.r`, `training.learning_rate`) to a list of choices or to a
    range; every value is checked against this schema before any training, so a typo or an impossible
    value is refused naming its key.
    """

    space: dict[str, list[SearchValue] | SearchRange] = Field(
        default_factory=dict, description="config key -> [choices] or {low, high, log}")
    sampler: Literal["grid", "random", "tpe"] = Field("tpe", description="grid needs every key to be a choice list")
    n_trials: int = Field(20, ge=1, description="trials in the study in total (a rerun only adds the missing ones); "
                                                "grid: at most the grid's size")
    seed: int = 0
    pruner: Literal["none", "median", "hyperband"] = Field(
        "median", description="stops trials whose intermediate eval loss (every training.eval_steps) lags")
    pruner_startup_trials: int = Field(2, ge=0, description="median: trials that finish before any is pruned")
    pruner_warmup_steps: int = Field(0, ge=0, description="median: steps before a trial can be pruned")
    objective: Literal["eval_loss", "bleu", "rougeL"] = "eval_loss"
    direction: Literal["auto", "minimize", "maximize"] = Field(
        "auto", description="auto: minimize eval_loss, maximize bleu/rougeL")
    parallel: int = Field(1, ge=1, description="trials run at a time; above 1 each in a process of its own on the "
                                               "sweep's machine (all sharing its first GPU), or each a flow run of "
                                               "trial_deployment")
    trial_deployment: str | None = Field(
        None, description="'flow-name/deployment-name' of the trial flow (qlora-sweep-trial/sweep-trial): each trial "
                          "runs as a flow run of it, on whichever node of its work pool picks it up (one trial per "
                          "GPU node); storage, MLflow, data and training.output_dir must be reachable from every "
                          "node. None: trials run on the sweep's own machine")
    cv_folds: int = Field(1, ge=1, description=">= 2: each trial trains on k hash-stable folds; objective = mean")
    study_name: str | None = Field(None, description="None: '<registry.model_name>-sweep'; same name = same study")
    storage: str | None = Field(
        None, description="Optuna RDB URL; None: optuna.db beside a local sqlite MLflow store (else in the "
                          "project dir's mlflow/ folder); PostgreSQL in the stack")
    register_best: bool = Field(True, description="evaluate the best trial's adapter and register it (nightly gate)")

    @field_validator("space")
    @classmethod
    def _well_formed_space(cls, space: dict[str, Any]) -> dict[str, Any]:
        for key, spec in space.items():
            if key.split(".", 1)[0] == "sweep":
                raise ValueError(f"sweep.space.{key}: the sweep's own settings cannot be searched")
            if isinstance(spec, list) and not spec:
                raise ValueError(f"sweep.space.{key}: empty choice list; give at least one value")
            if isinstance(spec, SearchRange):
                if spec.low > spec.high:
                    raise ValueError(f"sweep.space.{key}: low {spec.low} > high {spec.high}; swap them")
                if spec.log and spec.low <= 0:
                    raise ValueError(f"sweep.space.{key}: log scale needs low > 0, got {spec.low}")
        return space

    @field_validator("trial_deployment")
    @classmethod
    def _flow_slash_deployment(cls, name: str | None) -> str | None:
        """`run_deployment` looks a deployment up by 'flow/deployment' (or by id); a bare deployment name
        would only fail at the first trial, after the data check and the GPU check."""
        if name is not None and (name.count("/") != 1 or not all(part.strip() for part in name.split("/"))):
            raise ValueError("not 'flow-name/deployment-name'; e.g. qlora-sweep-trial/sweep-trial "
                             "(see `prefect deployment ls`)")
        return name

    def resolved_direction(self) -> str:
        return SWEEP_OBJECTIVES[self.objective] if self.direction == "auto" else self.direction


class PipelineConfig(_Section):
    data: DataConfig
    model: ModelConfig
    quantization: QuantizationConfig = QuantizationConfig()
    lora: LoraSettings = LoraSettings()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    registry: RegistryConfig = RegistryConfig()
    serving: ServingConfig = ServingConfig()
    sweep: SweepConfig | None = None

    @model_validator(mode="after")
    def _searchable_space(self) -> PipelineConfig:
        """Every value of the sweep's space must give a valid config: checked by applying it as an override."""
        if self.sweep is None:
            return self
        if self.sweep.sampler == "grid":
            ranges = [key for key, spec in self.sweep.space.items() if isinstance(spec, SearchRange)]
            if ranges:
                raise ValueError(f"sweep.space.{ranges[0]}: the grid sampler needs a list of choices, not a range")
        if self.sweep.pruner != "none" and self.sweep.space and not self.training.eval_steps:
            raise ValueError("sweep.pruner needs intermediate eval losses: set training.eval_steps (e.g. 10) or "
                             "sweep.pruner: none")
        base = self.model_dump(mode="json", exclude={"sweep"}, exclude_unset=True)  # as written: presets still apply
        for key, spec in self.sweep.space.items():
            values = spec if isinstance(spec, list) else [spec.low, spec.high]
            for value in values:
                try:
                    PipelineConfig.model_validate(with_override(base, key, value))
                except (ValidationError, ConfigError) as exc:
                    detail = "; ".join(_format_validation_error(exc, "").splitlines()[1:]).strip() \
                        if isinstance(exc, ValidationError) else str(exc)
                    raise ValueError(f"sweep.space.{key}: value {value!r} does not give a valid config: {detail}") \
                        from None
        return self

    def with_overrides(self, values: dict[str, Any]) -> PipelineConfig:
        """This config with `dotted.key -> value` applied and validated again (a sweep trial's config).

        Applied to the values as written, not as resolved, so derived defaults follow: `lora.r: 8`
        with no explicit alpha gets alpha from `alpha_policy`, as it would in a config file."""
        raw = self.model_dump(mode="json", exclude_unset=True)
        for key, value in values.items():
            raw = with_override(raw, key, value)
        try:
            return PipelineConfig.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(_format_validation_error(exc, "with overrides")) from exc

    def config_hash(self) -> str:
        """Content hash of the resolved config; recorded with every registered version."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def flat(self) -> dict[str, str]:
        """`section.key -> value`, the shape MLflow params want."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, sub)
            else:
                out[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

        walk("", self.model_dump(mode="json"))
        return out


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}': remove it or check its spelling (see configs/schema.py)")
        elif error["type"] == "missing":
            lines.append(f"  missing key '{key}': it is required")
        elif not key or isinstance(error.get("input"), dict):  # a whole-config or whole-section check: its
            lines.append("  " + error["msg"].removeprefix("Value error, "))  # message names the keys
        else:
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"  {key}: {message} (got {error.get('input')!r})")
    return "\n".join(lines)


def with_override(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of the raw config mapping with `dotted` (section.key) set to `value`."""
    import copy

    out = copy.deepcopy(raw)
    keys = dotted.split(".")
    node = out
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{dotted}': '{key}' is not a section")
    node[keys[-1]] = value
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. training.max_steps=100)")
    dotted, raw = item.split("=", 1)
    # YAML parsing gives ints, floats, bools, lists and null the same way the file would.
    return dotted.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def _command_line_data_wins(raw: dict[str, Any], overridden: set[str]) -> dict[str, Any]:
    """`--set data.path=FILE` on a config whose file names `data.sources` (or the reverse) trains on what
    the command line names: the file's other way of naming the data is dropped. Both set on the command
    line stays an error (the validator names it)."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return raw
    for given, dropped in (("path", "sources"), ("sources", "path")):
        if f"data.{given}" in overridden and f"data.{dropped}" not in overridden and data.get(given) is not None:
            raw = with_override(raw, f"data.{dropped}", None)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config, apply `section.key=value` overrides, validate. Raises ConfigError.

    Relative paths inside the config are relative to the working directory, like any CLI argument;
    `make` targets and the Prefect deployment run from the repo root. Without a path, the default is
    `configs/demo.yaml` of the project dir, else the demo config shipped in the package
    (configs.paths.default_config_path).
    """
    config_path = Path(path) if path else default_config_path()
    if config_path is None:
        raise ConfigError(
            f"no config given, and neither {project_dir() / 'configs' / 'demo.yaml'} nor the demo config of the "
            f"installed package exists; pass --config with a YAML file (or set {PROJECT_DIR_ENV} to a folder "
            "holding configs/demo.yaml)"
        )
    if not config_path.exists():
        raise ConfigError(f"config file {config_path} not found; pass --config with an existing YAML file")
    try:
        raw = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {config_path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {config_path} must hold a mapping of sections, got {type(raw).__name__}")
    overridden: set[str] = set()
    for item in overrides or []:
        keys, value = _parse_override(item)
        try:
            raw = with_override(raw, ".".join(keys), value)
        except ConfigError as exc:
            raise ConfigError(f"override '{item}': {exc}") from None
        overridden.add(".".join(keys))
    raw = _command_line_data_wins(raw, overridden)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, str(config_path))) from exc
