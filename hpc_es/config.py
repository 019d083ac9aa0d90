"""Typed run configuration: YAML files and dotted ``key=value`` overrides mapped onto dataclasses.

Every key is checked against the dataclass fields, so a typo never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import yaml

from hpc_es.errors import ConfigError
from hpc_es.fsio import read_text_file


@dataclass
class ESConfig:
    population_size: int = 16
    sigma: float = 0.05  # defaults are the CPU demo's; configs/countdown_*.yaml hold the paper's
    alpha: float = 0.1
    iterations: int = 80
    antithetic: bool = False  # members 2k, 2k+1 share a seed with opposite signs
    shaping: str = "zscore"  # zscore (the paper's) | rank (centered ranks)
    noise_chunk: int = 1 << 20  # elements per noise piece: bounds the fp32 scratch; changes results only under legacy
    noise_scheme: str = "keyed"  # keyed: eps = f(seed, name, element) on any device | legacy: randn per chunk
    master_on: str = "device"  # where the master (theta_t) lives: device (one extra copy) | host (CPU memory)
    master_dtype: str = "model"  # the master's dtype: model (the weights') | float32 (small updates accumulate)
    noise: str = "full"  # full (the paper's Gaussian ES) | lowrank (EGGROLL: rank-r matrix noise, batched members)
    rank: int = 1  # es.noise=lowrank: rank r of each member's perturbation A Bᵀ/√r
    lowrank_scope: str = "frozen"  # es.noise=lowrank: frozen (Linear weights only) | full (+ embeddings, 1-D)


@dataclass
class RolloutConfig:
    max_new_tokens: int = 16
    prompts_per_iteration: int = 32  # each member sees the same prompts in an iteration
    batch_size: int = 0  # prompts per generate() call; 0 = all of a member's prompts at once
    reward_timeout_s: float = 60.0  # a reward call running longer stops the run (one that never returns); 0 = no limit
    # greedy decoding's repetition penalty: a number > 0 (1.0 = none, plain greedy) or "model" = the model
    # folder's generation_config value (1.0 when it has none); no other folder generation default ever applies
    repetition_penalty: str = "1.0"
    members_per_pass: int = 0  # es.noise=lowrank: members per batched generation; 0 = all of a replica's members
    # auto: the fast engine (hpc_es.fastgen) where the model allows it, else hf with a notice | fast: fast or a
    # config error | hf: HF generate.  Both give the same tokens; part of the trajectory like all of rollout.
    engine: str = "auto"
    # the fast engine's decode step compiled with torch.compile (inside the CUDA graphs on a GPU), checked against
    # the eager step when built and refused with a warning if it differs: auto (on CUDA) | true | false
    compile: str = "auto"


@dataclass
class DataConfig:
    path: str = ""  # the task's data file; empty = the task's built-in synthetic set
    train_size: int = 32  # the first train_size items are the training split
    test_size: int = 0  # items after the training split used by `eval`; 0 = all the rest
    synthetic_size: int = 1200  # size of a synthetic set when no path is given


@dataclass
class TinyModelConfig:
    arch: str = "qwen2"  # qwen2 | llama
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    vocab_size: int = 384
    cache_dir: str = ""  # empty = $HPC_ES_CACHE or ~/.cache/hpc_es


@dataclass
class DistConfig:
    backend: str = "auto"  # auto | mpi | torch | none
    devices_per_rank: int = 0  # 0 = every device this rank is given (1 on CPU)
    replicas_per_device: int = 1  # model copies per device, evaluated concurrently (small models, big GPUs)
    check_every: int = 10  # iterations between cross-rank weight fingerprint checks; 0 = never
    allow_idle_ranks: bool = False  # more ranks than slots: idle the extra ranks instead of failing
    timeout_s: float = 600.0  # torch.distributed collective timeout
    tensor_parallel: int = 1  # shards per replica (hpc_es/tp.py); only 1 runs yet


@dataclass
class CheckpointConfig:
    every: int = 50  # iterations between checkpoints; 0 = only on signal and at the end
    weights: bool = True  # false: ledger-only checkpoints (kilobytes), resume replays the ledger
    stop_grace_s: float = 60.0  # after SIGTERM/SIGUSR2, how long the iteration in flight may take before the run
    # leaves without it (exit 75; resume replays from the ledger), so a stuck iteration cannot eat the grace period


@dataclass
class EvalConfig:
    every: int = 0  # iterations between test-split evaluations during training (and the last); 0 = never
    limit: int = 0  # test items per evaluation; 0 = the whole test split
    kl: str = "auto"  # KL(fine-tuned || base model) on the test completions: auto (on for conciseness) | true | false
    base_model: str = ""  # `eval` only: the base model folder for the KL; empty = the ledger's, for a run's final/


@dataclass
class LogConfig:
    tensorboard: bool = False  # rank 0 also writes TensorBoard scalars to run_dir/tensorboard/ (the 'report' extra)


@dataclass
class Config:
    model: str = "tiny"  # a local HF model directory, or "tiny" for the built-in test model
    task: str = "conciseness"  # countdown | conciseness | module:attr | path/file.py:attr
    seed: int = 0
    run_dir: str = "runs/default"
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads per rank; 0 = torch's default
    progress: bool = True
    es: ESConfig = field(default_factory=ESConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


_CHOICES: dict[str, tuple[str, ...]] = {
    "es.shaping": ("zscore", "rank"),
    "es.master_on": ("device", "host"),
    "es.master_dtype": ("model", "float32"),
    "es.noise_scheme": ("keyed", "legacy"),
    "es.noise": ("full", "lowrank"),
    "es.lowrank_scope": ("frozen", "full"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "device": ("auto", "cpu", "cuda"),
    "tiny.arch": ("qwen2", "llama"),
    "dist.backend": ("auto", "mpi", "torch", "none"),
    "rollout.engine": ("auto", "fast", "hf"),
    "eval.kl": ("auto", "true", "false"),
    "rollout.compile": ("auto", "true", "false"),
}

_BOOL_WORDS = ("eval.kl", "rollout.compile")  # string keys whose choices include true/false (YAML booleans)


def _penalty_ok(v: str) -> bool:
    if v == "model":
        return True
    try:
        return 0 < float(v) < float("inf")
    except ValueError:
        return False

def _int_range(lo: int, hi: int, note: str = "") -> tuple[Any, str]:
    """An integer key bounded on both sides: a typo such as 1e30 is refused instead of eating memory."""
    return (lambda v: lo <= v <= hi), f"an integer >= {lo} and <= {hi:,}{note}"


def _float_range(lo: float, hi: float, lo_open: bool = False, note: str = "") -> tuple[Any, str]:
    above = (lambda v: v > lo) if lo_open else (lambda v: v >= lo)
    return (lambda v: above(v) and v <= hi), f"a number {'>' if lo_open else '>='} {lo:g} and <= {hi:g}{note}"


# key -> (predicate, what is allowed).  Every size key has an upper bound and every float key must be
# finite (checked for all float keys in ``validate``), so no value can run a job out of memory or into NaN.
_RANGES: dict[str, tuple[Any, str]] = {
    "es.population_size": _int_range(2, 100_000, " (z-scores of a single reward are all 0)"),
    "es.sigma": _float_range(0, 1e3, lo_open=True),
    "es.alpha": _float_range(0, 1e6),
    "es.iterations": _int_range(0, 100_000_000),
    "es.noise_chunk": _int_range(1024, 1 << 30),
    "es.rank": _int_range(1, 65_536),
    "rollout.members_per_pass": _int_range(0, 100_000, " (0 = all of a replica's members)"),
    "rollout.max_new_tokens": _int_range(1, 1 << 17),
    "rollout.prompts_per_iteration": _int_range(1, 1_000_000),
    "rollout.batch_size": _int_range(0, 1_000_000, " (0 = all prompts in one batch)"),
    "rollout.repetition_penalty": (_penalty_ok, "a number > 0 (1.0 = none) or 'model' (the model folder's value)"),
    "rollout.reward_timeout_s": _float_range(0, 7 * 86400, note=" (0 = no limit)"),
    "data.train_size": _int_range(1, 100_000_000),
    "data.test_size": _int_range(0, 100_000_000, " (0 = all the rest)"),
    "data.synthetic_size": _int_range(2, 10_000_000),
    "tiny.hidden_size": _int_range(8, 8192),
    "tiny.layers": _int_range(1, 256),
    "tiny.heads": _int_range(1, 256),
    "tiny.vocab_size": _int_range(300, 1 << 20, " (256 bytes plus merges and specials)"),
    "threads": _int_range(0, 4096),
    "dist.devices_per_rank": _int_range(0, 1024),
    "dist.replicas_per_device": _int_range(1, 1024),
    "dist.check_every": _int_range(0, 100_000_000),
    "dist.timeout_s": _float_range(0, 7 * 86400, lo_open=True),
    "dist.tensor_parallel": _int_range(1, 1024),
    "checkpoint.every": _int_range(0, 100_000_000),
    "checkpoint.stop_grace_s": _float_range(0, 86400, lo_open=True),
    "eval.every": _int_range(0, 100_000_000),
    "eval.limit": _int_range(0, 100_000_000),
    "seed": (lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)"),
}


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key the config accepts."""
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        hint = get_type_hints(cls)[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            keys.extend(all_keys(hint, f"{prefix}{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, typ: type) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    raise ConfigError(f"config key '{key}' has an unsupported type")  # pragma: no cover


# Old key -> its new name: still read (a run's ledger config from before the rename, old YAML files).
DEPRECATED_KEYS = {"es.base_on": "es.master_on"}
_deprecation_noted: set[str] = set()


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted key, checking that it exists and that the value has the field's type."""
    if key in DEPRECATED_KEYS:
        new = DEPRECATED_KEYS[key]
        if key not in _deprecation_noted:  # once per process, not once per rank's every config read
            _deprecation_noted.add(key)
            print(f"hpc_es: warning: config key '{key}' is deprecated; it sets '{new}' (use that name)",
                  file=sys.stderr, flush=True)
        key = new
    obj: Any = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise _unknown_key(key)
        obj = getattr(obj, part)
    name = parts[-1]
    if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
        raise _unknown_key(key)
    hint = get_type_hints(type(obj))[name]
    if key in _BOOL_WORDS and isinstance(value, bool):
        value = "true" if value else "false"
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section; give a mapping or set {key}.<field>")
        for sub, v in value.items():
            set_key(cfg, f"{key}.{sub}", v)
        return
    setattr(obj, name, _coerce(key, value, hint))


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.extend(_flatten(v, f"{prefix}{k}."))
        else:
            out.append((prefix + str(k), v))
    return out


def validate(cfg: Config) -> Config:
    """Check ranges and choices; the message names key, value and what is allowed."""
    for key, choices in _CHOICES.items():
        v = get_key(cfg, key)
        if v not in choices:
            raise ConfigError(f"config key '{key}' = {v!r} is not allowed; choose one of {', '.join(choices)}")
    for key in all_keys():
        v = get_key(cfg, key)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"config key '{key}' = {v!r} is not allowed; it must be a finite number")
    for key, (ok, allowed) in _RANGES.items():
        v = get_key(cfg, key)
        if not ok(v):
            raise ConfigError(f"config key '{key}' = {v!r} is out of range; it must be {allowed}")
    if cfg.es.antithetic and cfg.es.population_size % 2:
        raise ConfigError(
            f"config key 'es.population_size' = {cfg.es.population_size} must be even when es.antithetic is true"
        )
    if cfg.es.noise == "lowrank" and cfg.es.master_on == "host":
        raise ConfigError("config key 'es.master_on' = 'host' does not apply with es.noise=lowrank: the model's own "
                          "parameters are the master (es.master_dtype=float32 keeps an fp32 copy beside them); "
                          "use es.master_on=device")
    if cfg.dist.tensor_parallel > 1:
        _check_tensor_parallel(cfg)
    if not cfg.model:
        raise ConfigError("config key 'model' is empty; give a local model directory or 'tiny'")
    if not cfg.run_dir:
        raise ConfigError("config key 'run_dir' is empty")
    return cfg


def _check_tensor_parallel(cfg: Config) -> None:
    """What a sharded replica (dist.tensor_parallel > 1) cannot be combined with; the model's own shapes are
    checked where it is loaded (hpc_es.tp.plan_for)."""
    k = cfg.dist.tensor_parallel
    if cfg.es.noise_scheme != "keyed":
        raise ConfigError(f"config key 'dist.tensor_parallel' = {k} needs es.noise_scheme=keyed: a shard draws the "
                          "noise of its own elements by their index, which the legacy per-chunk noise cannot")
    if cfg.es.noise != "full":
        raise ConfigError(f"config key 'dist.tensor_parallel' = {k} does not combine with es.noise=lowrank yet")
    if cfg.rollout.engine == "hf":
        raise ConfigError(f"config key 'dist.tensor_parallel' = {k} needs the fast engine (rollout.engine=auto or "
                          "fast): HF generate runs a whole model")
    raise ConfigError(f"config key 'dist.tensor_parallel' = {k}: sharded replicas are not wired into the trainer "
                      "yet (hpc_es/tp.py holds the plan, the shard noise and the sharded decoder); use 1")


def get_key(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. es.sigma=0.001)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is None:
        value = ""
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string; users mean a number
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return key, value


def load_config(path: str | None = None, overrides: list[str] | None = None,
                base: Config | None = None) -> Config:
    """Build a Config from defaults, an optional YAML file, then ``key=value`` overrides."""
    cfg = base if base is not None else Config()
    if path:
        try:
            data = yaml.safe_load(read_text_file(path, "config file", MAX_CONFIG_BYTES, ConfigError))
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(data).__name__}")
        for key, value in _flatten(data):
            set_key(cfg, key, value)
    for text in overrides or []:
        key, value = parse_override(text)
        set_key(cfg, key, value)
    return validate(expand_paths(cfg))


MAX_CONFIG_BYTES = 16 << 20  # a config is kilobytes; this refuses /dev/zero or a model file given by mistake


PATH_KEYS = ("model", "run_dir", "data.path", "tiny.cache_dir", "eval.base_model")


def expand_paths(cfg: Config) -> Config:
    """Expand ``$VAR`` and ``~`` in path keys, so shipped configs can point at site-specific folders."""
    for key in PATH_KEYS:
        value = get_key(cfg, key)
        if not value:
            continue
        expanded = os.path.expanduser(os.path.expandvars(value))
        if "$" in expanded:
            raise ConfigError(f"config key '{key}' = {value!r} uses an environment variable that is not set")
        set_key(cfg, key, expanded)
    return cfg


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict()`` output (e.g. the ledger's ``config`` attribute)."""
    cfg = Config()
    for key, value in _flatten(d):
        set_key(cfg, key, value)
    return validate(cfg)


def default_cache_dir(cfg: Config) -> str:
    return cfg.tiny.cache_dir or os.environ.get("HPC_ES_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "hpc_es")
