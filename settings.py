"""train.py's settings as typed records, grouped by who reads them. train_args.py fills them from
the flags and a preset; nothing deeper reads the flags. Field names are the flags' names, so
settings() (the flat union, saved as the run folder's config.json and compared on --resume)
reads as the command line does."""
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RunConfig:
    out: str  # the run folder
    resume: bool
    seed: int
    kernels: str | None  # --kernels, as spin_kernels.use_kernels resolved it
    model: str | None  # a HF folder; None: the embedded demo
    chat_template: str | None
    dtype: str | None  # compute dtype of every model; None: bf16 on GPUs, fp32 on CPUs
    report_to: list | None = None  # live curves: tensorboard and/or wandb (live_curves.py)

    @property
    def demo(self):
        return self.model is None


@dataclass(frozen=True)
class DataConfig:
    data: str | None
    eval_data: str | None
    num_prompts: int | None
    eval_prompts: int
    max_length: int  # prompt + answer tokens of a training sequence
    max_prompt_length: int
    on_bad_row: str
    mix_previous: bool  # iteration t also trains on iteration t-1's samples (the official recipe)


@dataclass(frozen=True)
class TrainSettings:
    """What every training stage (stage.py) needs beyond its own steps, learning rate and data."""
    batch_size: int  # global, in pairs (SPIN) or sequences (SFT)
    micro_batch_size: int  # per rank per forward
    warmup_ratio: float
    clip: float
    ckpt_every: int
    seed: int
    activation_checkpointing: bool
    loss_type: str  # spin_loss: "sigmoid" (the paper's) or "hinge"
    live_reference: bool  # score every pair again with the opponent before training, a check of the stored log-probs


@dataclass(frozen=True)
class SpinConfig:
    iterations: int
    beta: list  # one value per iteration; a shorter list repeats its last value
    lr: list
    epochs: float  # passes over an iteration's pairs
    optimizer: str
    baseline: bool  # also continued SFT from the same start, with SPIN's steps (the paper's baseline)


@dataclass(frozen=True)
class GenConfig:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    gen_batch_size: int  # generation, scoring and evaluation batches


@dataclass(frozen=True)
class SftConfig:
    sft: bool  # SFT on --data is the whole job
    sft_steps: int | None
    sft_lr: float | None
    sft_optimizer: str


@dataclass(frozen=True)
class DemoConfig:
    demo_dim: int
    demo_layers: int
    vocab: int
    task: str
    task_digits: int
    val_prompts: int = 0  # validation prompts drawn from the task too (used by the study, experiments/)


@dataclass(frozen=True)
class Config:
    run: RunConfig
    data: DataConfig
    train: TrainSettings
    spin: SpinConfig
    gen: GenConfig
    sft: SftConfig
    demo: DemoConfig | None  # None with --model
    lora: object | None  # lora.LoraSettings; None: every parameter trains


@dataclass(frozen=True)
class Preset:
    """The values flags left unset take: the paper's recipe (train_args.RECIPE) or the embedded
    demo's (demo.DEFAULTS). The demo's fields are None in the recipe."""
    iterations: int
    beta: list
    lr: list
    epochs: float
    batch_size: int
    micro_batch_size: int
    optimizer: str
    max_new_tokens: int
    temperature: float
    max_length: int
    max_prompt_length: int
    mix_previous: bool
    eval_prompts: int
    baseline: bool
    ckpt_every: int
    gen_batch_size: int
    num_prompts: int | None = None
    sft_steps: int | None = None
    sft_lr: float | None = None
    demo_dim: int | None = None
    demo_layers: int | None = None
    vocab: int | None = None
    task: str | None = None
    task_digits: int | None = None
    val_prompts: int | None = None


def settings(cfg):
    """The flat {flag name: value} of a Config: what config.json records."""
    flat = {}
    for part in (cfg.run, cfg.data, cfg.train, cfg.spin, cfg.gen, cfg.sft, cfg.demo):
        if part is not None:
            flat.update(asdict(part))
    flat["demo"] = cfg.run.demo
    lo = cfg.lora
    flat.update(lora_rank=lo.rank if lo else 0, lora_alpha=lo.alpha if lo else None,
                lora_targets=",".join(lo.targets) if lo else None, lora_dropout=lo.dropout if lo else 0.0)
    return flat
