"""Resolving ``task=`` to a Task, and calling a task's reward without letting user bugs escape unexplained.

``task`` is a built-in name (``countdown``, ``conciseness``, ``math``), ``module:attr`` (the module is imported with
the current directory on ``sys.path``) or ``path/to/file.py:attr`` (loaded from that file). ``attr`` is a
Task object, or a callable (e.g. a class) taking the Config and returning one.

The built-in modules are imported inside :func:`load_task`, so a user task pays for none of them.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import importlib.util
import math
import numbers
import os
import signal
import sys
from types import ModuleType
from typing import Any, Sequence

from hpc_es.errors import HpcEsError, TaskError
from hpc_es.tasks.base import Example, SplitTask, Task, split_examples
from hpc_es.stopping import CTRL_C
from hpc_es.watchdog import RewardTimeout, watchdog

__all__ = ["Example", "Task", "SplitTask", "BUILTIN_TASKS", "DEFAULT_REWARD_TIMEOUT_S", "load_task", "safe_score",
           "mean_reward", "split_examples", "check_task"]

# name -> (module, class): imported only when named
_BUILTIN_CLASSES = {"countdown": ("hpc_es.tasks.countdown", "CountdownTask"),
                    "conciseness": ("hpc_es.tasks.conciseness", "ConcisenessTask"),
                    "math": ("hpc_es.tasks.mathqa", "MathTask")}
BUILTIN_TASKS: tuple[str, ...] = tuple(_BUILTIN_CLASSES)

_PROTOCOL_METHODS = ("train_examples", "test_examples", "score")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _user_exit(e: BaseException) -> str:
    """What user code did that would have ended the process: ``sys.exit(3)``, ``exit()`` with a Config, ..."""
    if isinstance(e, SystemExit):
        code = e.code
        shown = (repr(code) if code is None or isinstance(code, int) else repr(code[:80]) if isinstance(code, str)
                 else f"a {type(code).__name__}")
        return f"called sys.exit({shown})"
    return f"raised {type(e).__name__}"


# What user code may raise that is not an Exception but must not end the run as if hpc_es had chosen to:
# sys.exit (an exit code of the user's choosing) and GeneratorExit.
USER_EXITS = (SystemExit, GeneratorExit)


def _missing_members(obj: Any) -> list[str]:
    missing = [m for m in _PROTOCOL_METHODS if not callable(getattr(obj, m, None))]
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        missing.insert(0, "name (a non-empty string)")
    return missing


def check_task(task: Any, spec: str) -> Task:
    """Fail early, naming what is missing, when ``task`` does not implement the Task protocol."""
    missing = _missing_members(task)
    if missing:
        raise TaskError(f"task '{spec}' gives a {type(task).__name__}, which does not implement the Task "
                        f"protocol: missing {', '.join(missing)} (see hpc_es/tasks/base.py)")
    try:
        train = task.train_examples()
        test = task.test_examples()
    except HpcEsError:
        raise
    except USER_EXITS as e:
        raise TaskError(f"task '{spec}' {_user_exit(e)} while listing its examples") from None
    except Exception as e:
        raise TaskError(f"task '{spec}' failed while listing its examples: {_first_line(e)}") from e
    for split, examples in (("train_examples", train), ("test_examples", test)):
        if not isinstance(examples, Sequence) or isinstance(examples, (str, bytes)):
            raise TaskError(f"task '{spec}': {split}() must return a sequence of Example, "
                            f"got {type(examples).__name__}")
        for i, ex in enumerate(examples):
            if not isinstance(ex, Example) or not isinstance(ex.prompt, str):
                raise TaskError(f"task '{spec}': {split}()[{i}] is a {type(ex).__name__}, expected "
                                f"hpc_es.tasks.Example with a string prompt")
    if len(train) == 0:
        raise TaskError(f"task '{spec}': train_examples() returned no examples")
    return task


def _import_module(modname: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # like `python -m`: a module next to the user's config is found
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name and (modname == e.name or modname.startswith(e.name + ".")):
            raise TaskError(f"task module '{modname}' not found (searched sys.path, which includes the "
                            f"current directory {cwd})") from None
        raise TaskError(f"cannot import task module '{modname}': {_first_line(e)}") from e
    except USER_EXITS as e:
        raise TaskError(f"task module '{modname}' {_user_exit(e)} while being imported") from None
    except Exception as e:  # SyntaxError, errors raised at import time
        raise TaskError(f"cannot import task module '{modname}': {_first_line(e)}") from e


def _load_file(path: str) -> ModuleType:
    if os.path.isdir(path):
        raise TaskError(f"task file '{path}' is a folder; give a .py file (path/to/file.py:attr) or a module "
                        "(package.module:attr)")
    if not os.path.isfile(path):
        raise TaskError(f"task file '{path}' does not exist")
    abspath = os.path.abspath(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    # A unique, stable name: dataclasses and pickle look modules up in sys.modules by name.
    modname = f"hpc_es_user_task_{stem}_{hashlib.sha1(abspath.encode()).hexdigest()[:10]}"
    if modname in sys.modules:
        return sys.modules[modname]
    spec = importlib.util.spec_from_file_location(modname, abspath)
    if spec is None or spec.loader is None:
        raise TaskError(f"task file '{path}' cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
    except USER_EXITS as e:
        del sys.modules[modname]
        raise TaskError(f"task file '{path}' {_user_exit(e)} while being imported") from None
    except Exception as e:
        del sys.modules[modname]
        raise TaskError(f"cannot import task file '{path}': {_first_line(e)}") from e
    return module


def _unknown(spec: str) -> TaskError:
    return TaskError(f"unknown task '{spec}'; use a built-in task ({', '.join(BUILTIN_TASKS)}), "
                     f"'module:attr' or 'path/to/file.py:attr' where attr is a Task or a callable "
                     f"taking the Config and returning one")


def load_task(cfg: Any) -> Task:
    """Resolve ``cfg.task`` to a checked Task."""
    spec = str(cfg.task).strip()
    if spec in _BUILTIN_CLASSES:
        modname, attr = _BUILTIN_CLASSES[spec]
        return check_task(getattr(importlib.import_module(modname), attr)(cfg), spec)
    if ":" not in spec:
        raise _unknown(spec)
    where, attr = spec.rsplit(":", 1)
    where, attr = where.strip(), attr.strip()
    if not where or not attr.isidentifier():
        raise _unknown(spec)
    if where.endswith(".py") or "/" in where or os.sep in where:
        module = _load_file(where)
    else:
        module = _import_module(where)
    if not hasattr(module, attr):
        raise TaskError(f"task '{spec}': '{where}' has no attribute '{attr}'")
    obj = getattr(module, attr)
    if not isinstance(obj, type) and not _missing_members(obj):
        return check_task(obj, spec)
    if not callable(obj):
        return check_task(obj, spec)  # reports what is missing
    try:
        task = obj(cfg)
    except HpcEsError:
        raise
    except USER_EXITS as e:
        raise TaskError(f"task '{spec}': calling {attr}(cfg) {_user_exit(e)}") from None
    except Exception as e:
        raise TaskError(f"task '{spec}': calling {attr}(cfg) raised {_first_line(e)}") from e
    return check_task(task, spec)


def _own_copy(example: Example) -> Example:
    """The example with its own copy of ``info``: a reward that changes it cannot change what a later call
    sees (which would make rewards depend on how members are spread over ranks).  An info that cannot be
    copied is passed as it is."""
    try:
        return dataclasses.replace(example, info=copy.deepcopy(example.info))
    except Exception:  # noqa: BLE001 - an uncopyable object in info: the task's own business
        return example


def mean_reward(task: Task, rewards: list[float], examples: Sequence[Example]) -> float:
    """One member's mean reward over its prompts (as ``np.mean`` adds them), or a TaskError naming the task
    and the prompts when finite rewards add up beyond a float (the update would silently be skipped)."""
    import numpy as np

    with np.errstate(over="ignore"):
        mean = float(np.mean(rewards))
    if not math.isfinite(mean):
        name = getattr(task, "name", type(task).__name__)
        raise TaskError(f"task '{name}' rewards (up to {max(abs(r) for r in rewards):.3g}) on prompt "
                        f"{examples[0].prompt[:60]!r} and {len(examples) - 1} more add up beyond a float's range; "
                        "keep rewards well below 1e300")
    return mean


DEFAULT_REWARD_TIMEOUT_S = 60.0  # rollout.reward_timeout_s's default, for callers without a config


def safe_score(task: Task, completion: str, example: Example,
               timeout_s: float = DEFAULT_REWARD_TIMEOUT_S) -> float:
    """``task.score`` as a finite float, or a TaskError that says which task, what went wrong and on which prompt.

    A reward bug would otherwise surface as a NaN update, a traceback from deep inside a rollout, a silent
    exit (``sys.exit`` in the reward) or a run that hangs forever (a reward that never returns: stopped
    after ``timeout_s``, see hpc_es/watchdog.py; 0 = no limit).
    """
    where = f"on prompt {example.prompt[:60]!r}"
    name = getattr(task, "name", type(task).__name__)

    def overran() -> str:
        return (f"task '{name}' reward did not return within {timeout_s:g} s {where} "
                "(rollout.reward_timeout_s)")

    try:
        mine = _own_copy(example)
        with watchdog().guard(timeout_s, overran):
            value = task.score(completion, mine)
    except RewardTimeout:
        raise TaskError(overran()) from None
    except KeyboardInterrupt:
        if CTRL_C.is_set() or signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            raise  # the user's Ctrl-C, or no handler that could tell (a notebook): an interrupt
        raise TaskError(f"task '{name}' reward raised KeyboardInterrupt {where} (not a Ctrl-C)") from None
    except USER_EXITS as e:
        raise TaskError(f"task '{name}' reward {_user_exit(e)} {where}") from None
    except Exception as e:
        raise TaskError(f"task '{name}' reward raised {_first_line(e)} {where}") from e
    if not isinstance(value, numbers.Real):
        raise TaskError(f"task '{name}' reward returned {value!r} ({type(value).__name__}), not a number {where}")
    try:
        out = float(value)
    except OverflowError:
        raise TaskError(f"task '{name}' reward returned an integer too large for a float {where}") from None
    if not math.isfinite(out):
        raise TaskError(f"task '{name}' reward returned a non-finite value {out!r} {where}")
    return out
