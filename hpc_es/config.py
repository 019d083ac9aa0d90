"""Typed run configuration: YAML files and dotted ``key=value`` overrides mapped onto dataclasses.

Every key is checked against the dataclass fields, so a typo never silently does nothing.  A key limited to
some values declares them with ``one_of`` in its section; ``validate`` builds its check and message from that.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import reprlib
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, get_type_hints

import yaml

from hpc_es.errors import ConfigError
from hpc_es.fsio import read_text_file


def one_of(default: str, choices: tuple[str, ...]) -> Any:
    """A string key limited to ``choices``: ``validate`` refuses any other value and names these."""
    return field(default=default, metadata={"choices": choices})


@dataclass
class ESConfig:
    # Each section's allowed values are defined once, in the section, with the code that uses them named
    # beside them; that code reads them from here (the choice check below is built from ``one_of``), so
    # this module needs no torch import (``hpc_es.submit`` runs on login nodes).
    SHAPINGS: ClassVar[tuple[str, ...]] = ("zscore", "rank")  # es.shape_rewards
    MASTER_ON: ClassVar[tuple[str, ...]] = ("device", "host")  # es.Replica.wrap
    MASTER_DTYPES: ClassVar[tuple[str, ...]] = ("model", "float32")  # es.master_torch_dtype
    NOISE_SCHEMES: ClassVar[tuple[str, ...]] = ("keyed", "legacy")  # noise.noise_source
    FULL, LOWRANK = "full", "lowrank"  # the search distributions (hpc_es.search.MODES)
    NOISES: ClassVar[tuple[str, ...]] = (FULL, LOWRANK)
    FROZEN = "frozen"
    SCOPES: ClassVar[tuple[str, ...]] = (FROZEN, FULL)  # lowrank.plan: Linear weights only, or every parameter

    population_size: int = 16
    sigma: float = 0.05  # defaults are the CPU demo's; configs/countdown_*.yaml hold the paper's
    alpha: float = 0.1
    iterations: int = 80
    antithetic: bool = False  # members 2k, 2k+1 share a seed with opposite signs
    shaping: str = one_of("zscore", SHAPINGS)  # zscore (the paper's) | rank (centered ranks)
    noise_chunk: int = 0  # elements per noise piece, 0: 1M (64M on CUDA); bounds the scratch; a result under legacy
    # keyed: eps = f(seed, name, element) on any device | legacy: randn per chunk
    noise_scheme: str = one_of("keyed", NOISE_SCHEMES)
    # where the master (theta_t) lives: device (one extra copy) | host (CPU memory)
    master_on: str = one_of("device", MASTER_ON)
    # the master's dtype: model (the weights') | float32 (small updates accumulate)
    master_dtype: str = one_of("model", MASTER_DTYPES)
    # full (the paper's Gaussian ES) | lowrank (EGGROLL: rank-r matrix noise, batched members)
    noise: str = one_of(FULL, NOISES)
    rank: int = 1  # es.noise=lowrank: rank r of each member's perturbation A Bᵀ/√r
    # es.noise=lowrank: frozen (Linear weights only) | full (+ embeddings, 1-D)
    lowrank_scope: str = one_of(FROZEN, SCOPES)


@dataclass
class RolloutConfig:
    ENGINES: ClassVar[tuple[str, ...]] = ("auto", "fast", "hf")  # rollout.resolve_engine
    COMPILES: ClassVar[tuple[str, ...]] = ("auto", "true", "false")  # fastgen.set_compile
    FROM_MODEL: ClassVar[str] = "model"  # repetition_penalty: the model folder's value

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
    engine: str = one_of("auto", ENGINES)
    # the fast engine's decode step compiled with torch.compile (inside the CUDA graphs on a GPU), checked against
    # the eager step when built and refused with a warning if it differs: auto (on CUDA) | true | false
    compile: str = one_of("auto", COMPILES)

    @staticmethod
    def penalty(value: str) -> float | None:
        """``repetition_penalty`` as a number, or None for ``model`` (rollout.resolve_repetition_penalty reads
        the folder's value); anything else is a ConfigError."""
        text = str(value).strip()
        if text == RolloutConfig.FROM_MODEL:
            return None
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not 0 < number < math.inf:
            raise ConfigError(f"config key 'rollout.repetition_penalty' = {value!r} is not allowed; it must be a "
                              f"number > 0 (1.0 = none) or '{RolloutConfig.FROM_MODEL}' (the model folder's value)")
        return number


@dataclass
class DataConfig:
    path: str = ""  # the task's data file; empty = the task's built-in synthetic set
    train_size: int = 32  # the first train_size items are the training split
    test_size: int = 0  # items after the training split used by `eval`; 0 = all the rest
    synthetic_size: int = 1200  # size of a synthetic set when no path is given


@dataclass
class TinyModelConfig:
    ARCHS: ClassVar[tuple[str, ...]] = ("qwen2", "llama")  # models.ensure_tiny_model

    arch: str = one_of("qwen2", ARCHS)
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    vocab_size: int = 384
    cache_dir: str = ""  # empty = $HPC_ES_CACHE or ~/.cache/hpc_es


@dataclass
class DistConfig:
    BACKENDS: ClassVar[tuple[str, ...]] = ("auto", "mpi", "torch", "none")  # comm.make_comm

    backend: str = one_of("auto", BACKENDS)
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
    KL: ClassVar[tuple[str, ...]] = ("auto", "true", "false")  # evaluate.kl_enabled

    every: int = 0  # iterations between test-split evaluations during training (and the last); 0 = never
    limit: int = 0  # test items per evaluation; 0 = the whole test split
    # KL(fine-tuned || base model) on the test completions: auto (on for conciseness) | true | false
    kl: str = one_of("auto", KL)
    base_model: str = ""  # `eval` only: the base model folder for the KL; empty = the ledger's, for a run's final/
    samples: int = 1  # responses per test prompt: 1 = the greedy one; > 1 = sampled (seeded from `seed`)
    temperature: float = 1.0  # eval.samples > 1: the sampling temperature (1 = the model's own distribution)
    top_p: float = 1.0  # eval.samples > 1: nucleus sampling's mass (1 = off)


@dataclass
class PromptConfig:
    chat: bool = False  # true: the model folder's chat template, generation prompt added | false: the raw text (paper)
    system: str = ""  # chat=true: the system message; empty = the task's default_system (none: no system turn)


@dataclass
class LogConfig:
    tensorboard: bool = False  # rank 0 also writes TensorBoard scalars to run_dir/tensorboard/ (the 'report' extra)


@dataclass
class Config:
    DTYPES: ClassVar[tuple[str, ...]] = ("auto", "float32", "bfloat16", "float16")  # models.resolve_dtype
    DEVICES: ClassVar[tuple[str, ...]] = ("auto", "cpu", "cuda")  # placement.local_devices

    model: str = "tiny"  # a local HF model directory, or "tiny" for the built-in test model
    task: str = "conciseness"  # countdown | conciseness | math | module:attr | path/file.py:attr
    seed: int = 0
    run_dir: str = "runs/default"
    dtype: str = one_of("auto", DTYPES)  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    device: str = one_of("auto", DEVICES)  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads per rank; 0 = torch's default
    progress: bool = True
    es: ESConfig = field(default_factory=ESConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


_BOOL_WORDS = ("eval.kl", "rollout.compile")  # string keys whose choices include true/false (YAML booleans)


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
    "es.noise_chunk": (lambda v: v == 0 or 1024 <= v <= 1 << 30,
                       "0 (the device's default) or an integer >= 1024 and <= 1,073,741,824"),
    "es.rank": _int_range(1, 65_536),
    "rollout.members_per_pass": _int_range(0, 100_000, " (0 = all of a replica's members)"),
    "rollout.max_new_tokens": _int_range(1, 1 << 17),
    "rollout.prompts_per_iteration": _int_range(1, 1_000_000),
    "rollout.batch_size": _int_range(0, 1_000_000, " (0 = all prompts in one batch)"),
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
    "eval.samples": _int_range(1, 100_000, " (1 = greedy)"),
    "eval.temperature": _float_range(0, 100, lo_open=True),
    "eval.top_p": _float_range(0, 1, lo_open=True),
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


def choice_keys(cls: type = Config, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Every key limited to a set of values (``one_of``), with its values."""
    out: dict[str, tuple[str, ...]] = {}
    for f in dataclasses.fields(cls):
        hint = get_type_hints(cls)[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out.update(choice_keys(hint, f"{prefix}{f.name}."))
        elif "choices" in f.metadata:
            out[prefix + f.name] = f.metadata["choices"]
    return out


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key[:200], all_keys(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{_show_text(key)}'{hint}")


_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxstring, _SHOW.maxother = 3, 6, 6, 80, 80


def _show(value: Any) -> str:
    """``repr(value)``, cut short: a message never formats an unbounded value (a YAML alias bomb
    would otherwise expand in the error message itself)."""
    return _show_text(_SHOW.repr(value))


def _show_text(text: str) -> str:
    return text if len(text) <= 160 else text[:150] + "..."


def _coerce(key: str, value: Any, typ: type) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {_show(value)}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' must be an integer, got {_show(value)}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {_show(value)}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {_show(value)}")
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
    for key, choices in choice_keys().items():
        v = get_key(cfg, key)
        if v not in choices:
            raise ConfigError(f"config key '{key}' = {_show(v)} is not allowed; choose one of {', '.join(choices)}")
    RolloutConfig.penalty(cfg.rollout.repetition_penalty)
    for key in all_keys():
        v = get_key(cfg, key)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"config key '{key}' = {v!r} is not allowed; it must be a finite number")
    for key, (ok, allowed) in _RANGES.items():
        v = get_key(cfg, key)
        if not ok(v):
            raise ConfigError(f"config key '{key}' = {_show(v)} is out of range; it must be {allowed}")
    if cfg.es.antithetic and cfg.es.population_size % 2:
        raise ConfigError(
            f"config key 'es.population_size' = {cfg.es.population_size} must be even when es.antithetic is true"
        )
    if cfg.es.noise == ESConfig.LOWRANK and cfg.es.master_on == "host":
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
        value = load_yaml(raw, f"override '{_show_text(key)}'") if raw.strip() else ""
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
            text = read_text_file(path, "config file", MAX_CONFIG_BYTES, ConfigError)
            data = load_yaml(text, f"config file '{path}'")
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
MAX_YAML_DEPTH = 64  # a config nests three levels; deeper is a mistake or an attack (a RecursionError otherwise)
MAX_YAML_VALUES = 100_000  # values after aliases are expanded: an alias bomb is refused before it is built


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` of a config, after a pass over the parser's events (iterative: no recursion)
    that refuses nesting deeper than ``MAX_YAML_DEPTH``, more than ``MAX_YAML_VALUES`` values once
    aliases are expanded, and a key given twice in one mapping (YAML would keep the last silently)."""
    sizes: dict[str, int] = {}  # anchor -> values it expands to
    stack: list[list[Any]] = [[0, None, None, set()]]  # [values, anchor, expecting a key (mappings), keys seen]

    def add(n: int) -> None:
        frame = stack[-1]
        frame[0] += n
        if frame[2] is not None:
            frame[2] = not frame[2]

    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if len(stack) > MAX_YAML_DEPTH:
                raise ConfigError(f"{where} nests more than {MAX_YAML_DEPTH} levels deep")
            stack.append([1, event.anchor, True if isinstance(event, yaml.MappingStartEvent) else None, set()])
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            n, anchor, _, _ = stack.pop()
            if anchor:
                sizes[anchor] = n
            add(n)
        elif isinstance(event, yaml.ScalarEvent):
            frame = stack[-1]
            if frame[2] and len(stack) > 1:
                if event.value in frame[3]:
                    raise ConfigError(f"{where} gives key '{_show_text(event.value)}' twice in one mapping "
                                      "(the first would be ignored); give it once")
                frame[3].add(event.value)
            if event.anchor:
                sizes[event.anchor] = 1
            add(1)
        elif isinstance(event, yaml.AliasEvent):
            add(sizes.get(event.anchor or "", 1))
        else:
            continue
        if stack[0][0] + sum(f[0] for f in stack[1:]) > MAX_YAML_VALUES:
            raise ConfigError(f"{where} expands to more than {MAX_YAML_VALUES:,} values (YAML aliases?)")
    return yaml.safe_load(text)


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
