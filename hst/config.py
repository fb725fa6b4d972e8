"""Typed, frozen configs: one dataclass per ``params.yaml`` section, a comment per field.

``__post_init__`` validates ranges and raises :class:`ConfigError` with a one-line message naming the key;
reading a params file and building a config from a section (unknown keys, wrong types refused) is :mod:`hst.params`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class HSTError(Exception):
    """A problem with the user's input (params, data, checkpoint): reported as one line."""


class ConfigError(HSTError):
    """A params section has an unknown key, a wrong type or a value out of range."""


FFN_KINDS = ("dense", "learned", "key")
ROUTING_MODES = ("top_k", "top_any")
REGROW_CRITERIA = ("gradient", "common_neighbors")
FARS_NORMS = ("l2", "mean")


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256  # byte-level tokens: bits per byte is then exact
    seq_len: int = 256  # context length in tokens
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads; d_model must divide by it
    d_model: int = 256  # residual stream width
    ffn: str = "key"  # "dense" (one FFN), "learned" (Linear router MoE) or "key" (HST KeyRouter MoE)
    n_experts: int = 8  # experts per layer at initialisation (MoE variants)
    top_k: int = 2  # experts each token runs through; the dense FFN gets top_k * expert_hidden
    routing: str = "top_k"  # learned router: "top_k", or "top_any" (seed 000: every expert, weighted by the softmax)
    router_floor: float = 0.0  # learned router: a slot below this softmax probability runs no expert (a token keeps its best)
    expert_hidden: int = 256  # hidden width of one ReLU² expert
    router_temperature: float = 0.1  # softmax(top-k similarity / temperature) gives expert weights
    key_momentum: float = 0.99  # EMA momentum of keys toward their tokens' mean hidden state
    center_routing: bool = False  # route on hidden states minus their running mean (see docs/decisions.md)
    init_std: float = 0.02  # std of the normal init of linear weights
    expert_density: float = 1.0  # share of live connections in each MoE expert's up/down weights (seed §4: ~0.05);
    #                              1.0 = dense experts. Fixed count per matrix; init std scaled by 1/sqrt(density)

    def __post_init__(self):
        _require(self.ffn in FFN_KINDS, f"ffn: expected one of {FFN_KINDS}, got {self.ffn!r}")
        _require(self.vocab_size >= 2, "vocab_size: expected >= 2")
        _require(self.seq_len >= 2, "seq_len: expected >= 2")
        _require(self.n_layer >= 1, "n_layer: expected >= 1")
        _require(self.n_head >= 1 and self.d_model % self.n_head == 0,
                 f"n_head: expected a divisor of d_model={self.d_model}, got {self.n_head}")
        _require((self.d_model // self.n_head) % 2 == 0, "d_model / n_head: expected even (RoPE)")
        _require(self.n_experts >= 1, "n_experts: expected >= 1")
        _require(1 <= self.top_k <= self.n_experts, f"top_k: expected 1..n_experts={self.n_experts}, got {self.top_k}")
        _require(self.routing in ROUTING_MODES, f"routing: expected one of {ROUTING_MODES}, got {self.routing!r}")
        _require(self.routing == "top_k" or self.ffn == "learned",
                 f"routing: top_any needs the learned router (ffn: learned), got ffn {self.ffn!r}")
        _require(0 <= self.router_floor < 1, "router_floor: expected in [0, 1)")
        _require(self.router_floor == 0 or self.ffn == "learned",
                 f"router_floor: needs the learned router (ffn: learned), got ffn {self.ffn!r}")
        _require(self.expert_hidden >= 1, "expert_hidden: expected >= 1")
        _require(self.router_temperature > 0, "router_temperature: expected > 0")
        _require(0.0 <= self.key_momentum <= 1.0, "key_momentum: expected in [0, 1]")
        _require(self.init_std > 0, "init_std: expected > 0")
        _require(0 < self.expert_density <= 1, "expert_density: expected in (0, 1]")

    @property
    def dense_hidden(self) -> int:
        """Hidden width of the dense FFN: the same active FLOPs as top_k experts."""
        return self.top_k * self.expert_hidden


@dataclass(frozen=True)
class PrepareConfig:
    domains: dict[str, str] = field(default_factory=dict)  # domain name -> .txt/.txt.gz/.jsonl/.parquet
    val_fraction: float = 0.05  # share of records (by content hash) held out for validation
    test_fraction: float = 0.05  # share of records held out for the final test
    min_record_bytes: int = 256  # consecutive paragraphs are merged until a record has this many bytes
    max_record_bytes: int = 2048  # longer paragraphs are cut at line boundaries
    seed: int = 0  # salts the content hash that assigns records to splits

    def __post_init__(self):
        _require(len(self.domains) > 0, "domains: expected at least one domain")
        for name in self.domains:
            _require(name.replace("_", "").replace("-", "").isalnum(),
                     f"domains: name {name!r} must be letters, digits, '-' or '_'")
        _require(0 < self.val_fraction < 1, "val_fraction: expected in (0, 1)")
        _require(0 < self.test_fraction < 1, "test_fraction: expected in (0, 1)")
        _require(self.val_fraction + self.test_fraction < 1, "val_fraction + test_fraction: expected < 1")
        _require(1 <= self.min_record_bytes <= self.max_record_bytes,
                 "min_record_bytes: expected 1 <= min_record_bytes <= max_record_bytes")


@dataclass(frozen=True)
class TrainConfig:
    domains: tuple[str, ...] = ()  # domains to train on, sampled with equal probability (pretraining)
    steps: int = 600  # optimizer steps
    batch_size: int = 16  # sequences per step
    lr: float = 2e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50  # linear warmup from 0
    weight_decay: float = 0.1  # AdamW decay on matrices (not on norms/embeddings)
    betas: tuple[float, ...] = (0.9, 0.95)  # AdamW betas
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    eval_every: int = 100  # steps between validation passes
    eval_windows: int = 32  # validation windows per domain (evenly spaced, deterministic)
    precision: str = "auto"  # "auto" (bf16 autocast where the CPU/GPU supports it), "bf16" or "fp32"
    seed: int = 0  # seeds init and batch sampling: same params -> same metrics
    device: str = "auto"  # where training runs: "auto" (CUDA when present), "cpu" or "cuda"
    update_keys: bool = True  # EMA the KeyRouter keys during training
    # Topology evolution of sparse experts (model.expert_density < 1; nothing happens at 1.0):
    topology_every: int = 0  # ΔT: steps between prune-and-regrow of every trained expert; 0 = fixed masks
    topology_prune: float = 0.1  # share of an expert matrix's live connections moved per update
    topology_regrow: str = "gradient"  # where they regrow: "gradient" (RigL: largest |dL/dw| among dead
    #                                    positions) or "common_neighbors" (most length-3 paths, seed §4.3)
    fars_lambda: float = 0.0  # λ of the FARS routing tax (hst/fars.py); 0 = off
    fars_norm: str = "l2"  # how an expert's sqrt(exp_avg_sq) is reduced to its cost: "l2" or "mean"
    consistency_lambda: float = 0.0  # λ of the task-ID consistency loss (KL of each token's routing to its
    #                                 domain's mean in the batch; training only, hst/fars.py); 0 = off
    min_itjd: float = 0.0  # warn at a validation pass when a layer's ITJD across domains is below this; 0 = never

    def __post_init__(self):
        object.__setattr__(self, "domains", tuple(self.domains))
        object.__setattr__(self, "betas", tuple(self.betas))
        _require(self.steps >= 1, "steps: expected >= 1")
        _require(self.batch_size >= 1, "batch_size: expected >= 1")
        _require(self.lr > 0, "lr: expected > 0")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio: expected in [0, 1]")
        _require(0 <= self.warmup_steps <= self.steps, "warmup_steps: expected in [0, steps]")
        _require(self.weight_decay >= 0, "weight_decay: expected >= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas: expected two values in [0, 1)")
        _require(self.grad_clip >= 0, "grad_clip: expected >= 0")
        _require(self.eval_every >= 1, "eval_every: expected >= 1")
        _require(self.eval_windows >= 1, "eval_windows: expected >= 1")
        _require(self.precision in ("auto", "bf16", "fp32"), f"precision: expected auto, bf16 or fp32, got {self.precision!r}")
        _require(self.device in ("auto", "cpu", "cuda"), f"device: expected auto, cpu or cuda, got {self.device!r}")
        _require(self.topology_every >= 0, "topology_every: expected >= 0")
        _require(0 <= self.topology_prune < 1, "topology_prune: expected in [0, 1)")
        _require(self.topology_regrow in REGROW_CRITERIA,
                 f"topology_regrow: expected one of {REGROW_CRITERIA}, got {self.topology_regrow!r}")
        _require(self.fars_lambda >= 0, "fars_lambda: expected >= 0")
        _require(self.consistency_lambda >= 0, "consistency_lambda: expected >= 0")
        _require(0 <= self.min_itjd <= 1, "min_itjd: expected in [0, 1]")
        _require(self.fars_norm in FARS_NORMS, f"fars_norm: expected one of {FARS_NORMS}, got {self.fars_norm!r}")


CYCLE_MODES = ("grow", "experts", "full", "full_replay")
REPLAY_SOURCES = ("stored", "generated")


@dataclass(frozen=True)
class CycleConfig:
    mode: str = "grow"  # grow (HST: a path of new experts per cycle, trained alone), experts (HST: per-expert
    #                     coreset finetuning, growth on novelty), full (dense: all on new data), full_replay (+ old)
    replay: str = "stored"  # old text: "stored" (learned domains' records) or "generated" (sampled; none read)
    replay_records: int = 64  # records sampled from the start model per cycle when replay is "generated"
    incoming_records: int = 200  # records of the cycle's domain (train split) collected as new data
    index_records: int = 50  # old train records per learned domain in the expert index (select: gate needs 150)
    min_new_data: int = 10  # an expert is consolidated when it is primary for at least this many new records
    new_old_ratio: float = 0.2  # share of new records in a coreset / replay mix (0.2 -> 1 new : 4 old)
    eval_windows: int = 32  # validation windows per domain for BPB and routing stability
    seed: int = 0  # seeds record sampling and coreset draws

    def __post_init__(self):
        _require(self.mode in CYCLE_MODES, f"mode: expected one of {CYCLE_MODES}, got {self.mode!r}")
        _require(self.replay in REPLAY_SOURCES, f"replay: expected one of {REPLAY_SOURCES}, got {self.replay!r}")
        _require(self.replay_records >= 2, "replay_records: expected >= 2")
        _require(self.incoming_records >= 1, "incoming_records: expected >= 1")
        _require(self.index_records >= 1, "index_records: expected >= 1")
        _require(self.min_new_data >= 1, "min_new_data: expected >= 1")
        _require(0 < self.new_old_ratio <= 1, "new_old_ratio: expected in (0, 1]")
        _require(self.eval_windows >= 1, "eval_windows: expected >= 1")


@dataclass(frozen=True)
class GrowConfig:
    enabled: bool = True  # run the growth check at all
    quantile: float = 0.99  # a record is novel when its BPB exceeds this quantile of the held-in index's BPB
    batch_records: int = 16  # records per novelty batch, in collection order
    min_batches: int = 3  # M: growth triggers after M consecutive batches above novel_share
    novel_share: float = 0.5  # p: share of novel records in a batch
    select: str = "posterior"  # how a token reaches the new experts: "posterior" (they form a path of their own,
    #                            hst/grow.py; no gate_* key is read) or "gate" (a learned gate per layer, hst/gates.py)
    inference: str = "select_base"  # how a model of paths runs them (stored in its checkpoint): "select_base" (one per
    #                                 segment chosen by the paths' byte sketches, hst/paths.py, mixed with path 0 by their
    #                                 posterior), "select" (that one alone) or "mixture" (all: P models per token)
    decide: str = "novelty"  # with select posterior in mode grow: "novelty" (a path whose sketch explains records
    #                          better than the cycle's own sketch consolidates on them, the rest grow a path:
    #                          hst.sketches.assign) or "always" (every cycle grows a path from all its records)
    head: str = "path"  # with select posterior: "path" (a grown path trains a head of its own, hst/heads.py) or "shared"
    min_records: int = 32  # a known path consolidates on at least this many of the cycle's records (fewer join the
    #                        novel ones), and a path grows from at least this many (fewer are left unlearned)
    gate_fpr: float = 0.1  # share of each learned domain's tokens a new expert's gate may let through (its bias), at most
    gate_windows: int = 256  # windows of novel and of held-in records the gate is fitted on
    gate_hidden: int = 128  # hidden width of the gate's MLP token scorer; 0 = a linear (Fisher) gate
    experts: int = 4  # new experts per grown layer, behind one gate; keys split the passing novel tokens (k-means)
    init: str = "copy_nearest"  # weights of a new expert: "copy_nearest" or "random"
    steps: int = 160  # optimizer steps training only the new experts on the novel records
    lr: float = 3e-3  # their peak learning rate: isolated behind gates, they take a higher one than shared experts
    old_share: float = 0.0  # select gate: share of training records from the index's old ones (earlier experts train on them)
    forgetting_budget: float = 0.015  # after training, the new gates' false-positive rate halves (at most 4 times) until
    #                                  no learned domain's index records lost more than this (relative BPB); 0 = never

    def __post_init__(self):
        _require(0 < self.quantile < 1, "quantile: expected in (0, 1)")
        _require(self.batch_records >= 1, "batch_records: expected >= 1")
        _require(self.min_batches >= 1, "min_batches: expected >= 1")
        _require(0 <= self.novel_share <= 1, "novel_share: expected in [0, 1]")
        _require(0 < self.gate_fpr < 1, "gate_fpr: expected in (0, 1)")
        _require(self.gate_windows >= 2, "gate_windows: expected >= 2")
        _require(self.gate_hidden >= 0, "gate_hidden: expected >= 0")
        _require(self.experts >= 1, "experts: expected >= 1")
        _require(self.init in ("copy_nearest", "random"), f"init: expected copy_nearest or random, got {self.init!r}")
        _require(self.steps >= 0, "steps: expected >= 0")
        _require(self.lr > 0, "lr: expected > 0")
        _require(0 <= self.old_share < 1, "old_share: expected in [0, 1)")
        _require(self.select in ("gate", "posterior"), f"select: expected gate or posterior, got {self.select!r}")
        _require(self.inference in ("mixture", "select", "select_base"),
                 f"inference: expected mixture, select or select_base, got {self.inference!r}")
        _require(self.decide in ("novelty", "always"), f"decide: expected novelty or always, got {self.decide!r}")
        _require(self.head in ("path", "shared"), f"head: expected path or shared, got {self.head!r}")
        _require(self.min_records >= 1, "min_records: expected >= 1")
        _require(self.select == "gate" or self.old_share == 0,
                 "old_share: expected 0 with select: posterior (a path trains on its own cycle's records only)")
        _require(0 <= self.forgetting_budget < 1, "forgetting_budget: expected in [0, 1)")


@dataclass(frozen=True)
class GateConfig:
    max_forgetting: float = 0.05  # promote only if forgetting on every old domain (vs the cycle's start) is <= this
    min_routing_stability: float = 0.90  # ... and mean routing stability on the old domains is >= this

    def __post_init__(self):
        _require(self.max_forgetting >= 0, "max_forgetting: expected >= 0")
        _require(0 <= self.min_routing_stability <= 1, "min_routing_stability: expected in [0, 1]")


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str = ""  # MLflow experiment of the scenario, every variant of it; "" -> "hst"
    registered_model: str = ""  # registered model holding a variant's checkpoints; "" -> "<experiment>-<variant>"

    def resolve(self, variant: str) -> "TrackingConfig":
        """The names with the defaults filled in: all variants share one experiment (so one view compares
        them), each variant has its own registered model (so its alias ``champion`` follows its own gate)."""
        experiment = self.experiment or "hst"
        return TrackingConfig(experiment, self.registered_model or f"{experiment}-{variant}")


@dataclass(frozen=True)
class FlowConfig:
    retries: int = 1  # a failed stage task is retried this many times (transient failures) before the flow fails
    retry_delay_seconds: float = 10.0  # wait between retries
    cron: str = ""  # schedule of the served continual_learning deployment (cron syntax); "" -> interval_seconds
    interval_seconds: int = 86400  # schedule when cron is empty
    inbox: str = "data/inbox"  # text files dropped here become the next cycle (the inbox deployment)
    min_inbox_bytes: int = 200_000  # ... once at least this many bytes have arrived
    inbox_interval_seconds: int = 300  # how often the inbox deployment looks

    def __post_init__(self):
        _require(self.retries >= 0, "retries: expected >= 0")
        _require(self.retry_delay_seconds >= 0, "retry_delay_seconds: expected >= 0")
        _require(self.interval_seconds >= 1, "interval_seconds: expected >= 1")
        _require(self.min_inbox_bytes >= 1, "min_inbox_bytes: expected >= 1")
        _require(self.inbox_interval_seconds >= 1, "inbox_interval_seconds: expected >= 1")


@dataclass(frozen=True)
class ServeConfig:
    log_dir: str = "data/served"  # served requests' Smart Sampler log (relative: to the server's working directory); "" -> none
    flush_every: int = 64  # records per Parquet file of the log: at most this many are lost if the server is killed
    flush_seconds: float = 5.0  # ... and a record waits at most this long before it is written
    max_log_bytes: int = 1 << 30  # the log stops growing at this size: later records are dropped and counted
    max_rows: int = 64  # rows per request
    max_text_bytes: int = 16384  # UTF-8 bytes of a scored text or a prompt
    max_new_bytes: int = 1024  # bytes a generate row may ask for
    reload_seconds: float = 30.0  # how often the server asks the registry whether the champion moved; 0 -> never

    def __post_init__(self):
        _require(self.flush_every >= 1, "flush_every: expected >= 1")
        _require(self.flush_seconds > 0, "flush_seconds: expected > 0")
        _require(self.max_log_bytes >= 0, "max_log_bytes: expected >= 0")
        for name in ("max_rows", "max_text_bytes", "max_new_bytes"):
            _require(getattr(self, name) >= 1, f"{name}: expected >= 1")
        _require(self.reload_seconds >= 0, "reload_seconds: expected >= 0")
