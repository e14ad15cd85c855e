"""``ponder sweep``: a grid of strategies x settings x tasks x models, into the store.

A sweep is a TOML file (or the same as a dict)::

    seed = 0
    chunk = 25                      # problems per batch (run concurrently) and per transaction
    reward_model = "arith-reward"   # for the strategies that score

    [[model]]
    name = "arith"                  # a shipped model, a checkpoint folder or hf:folder

    [[model]]                       # or a model behind vLLM (replicas: URL,URL)
    name = "http://127.0.0.1:8000/v1#my-model"
    concurrency = 64                # requests in flight at once
    tokenizer = "/models/my-model"  # optional: exact scoring and token counts
    chat_template = "auto"          # optional: task prompts as user messages

    [[task]]
    name = "arith"                  # a registered task or a .jsonl file
    level = "hard"
    limit = 200

    [[strategy]]
    name = "majority"
    temperature = 0.7               # SamplingParams fields go to the sampler...
    samples = [4, 16, 64]           # ...the rest to the strategy; a list is a grid axis

Every (model, task, strategy setting, problem) is one row of the store, keyed by a
hash of the configuration, the model's identity and the problem: what is stored is
never computed again, so a killed sweep resumes where it stopped. Each problem's
output depends only on the seed and its own prompt (never on which problems share
its batch), so a resumed sweep stores exactly what an uninterrupted one would.
"""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import SettingError
from ..params import SamplingParams
from .store import ResultsStore, canonical, digest, row, weights_id

TOP_KEYS = {"seed", "chunk", "reward_model", "reward_format", "model", "task", "strategy", "db", "dtype"}
# name: a shipped model, a folder, hf:folder or URL[,URL][#MODEL]; concurrency and
# tokenizer: a remote model's request limit and local tokenizer; chat_template: auto or a path
MODEL_KEYS = {"name", "concurrency", "tokenizer", "chat_template"}


@dataclass
class Run:
    """One point of the grid: a strategy with its settings."""

    strategy: str
    params: dict[str, Any]
    settings: dict[str, Any]
    label: str = ""
    models: tuple[str, ...] = ()  # the [[model]] names it runs on (empty: every one)

    def setting(self) -> dict[str, Any]:
        return {**self.params, **self.settings}


@dataclass
class SweepConfig:
    models: list[dict[str, Any]]  # [[model]] tables: name and options (MODEL_KEYS)
    tasks: list[dict[str, Any]]
    runs: list[Run]
    seed: int = 0
    chunk: int = 25
    reward_model: str | None = None
    dtype: str = "float32"
    reward_format: str | None = None  # the verifier's format (a URL's must be named)
    db: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    where: str = "the sweep"  # the sweep file, for errors


def load_config(path: str | Path) -> SweepConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingError(f"sweep file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SettingError(f"sweep file {path} cannot be read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingError(f"sweep file {path} is not TOML: {e}") from None
    return parse_config(raw, str(path))


def parse_config(raw: dict[str, Any], where: str = "the sweep") -> SweepConfig:
    """Validate a sweep description; every mistake names its place and what is legal."""
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise SettingError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; legal: {', '.join(sorted(TOP_KEYS))}")

    def table_list(key: str) -> list[dict[str, Any]]:
        v = raw.get(key, [])
        if isinstance(v, dict):
            v = [v]
        if not isinstance(v, list) or not v or not all(isinstance(x, dict) for x in v):
            raise SettingError(f"{where}: give at least one [[{key}]] table")
        return v

    models = []
    for m in table_list("model"):
        if not isinstance(m.get("name"), str) or not m["name"]:
            raise SettingError(f"{where}: each [[model]] needs name = \"<shipped model, folder, hf:folder or URL>\"")
        extra = set(m) - MODEL_KEYS
        if extra:
            raise SettingError(f"{where}: [[model]] {m['name']} has unknown key(s) {', '.join(sorted(extra))}; "
                               f"legal: {', '.join(sorted(MODEL_KEYS))}")
        remote = m["name"].startswith(("http://", "https://"))
        for k in ("concurrency", "tokenizer"):
            if k in m and not remote:
                raise SettingError(f"{where}: [[model]] {m['name']}: {k} applies to a remote model (a URL) only")
        c = m.get("concurrency")
        if c is not None and (not isinstance(c, int) or isinstance(c, bool) or c < 1):
            raise SettingError(f"{where}: [[model]] {m['name']}: concurrency must be an integer >= 1; got {c!r}")
        for k in ("tokenizer", "chat_template"):
            if k in m and (not isinstance(m[k], str) or not m[k]):
                raise SettingError(f"{where}: [[model]] {m['name']}: {k} must be a path (or auto); got {m[k]!r}")
        models.append(dict(m))
    tasks = []
    for t in table_list("task"):
        if not isinstance(t.get("name"), str):
            raise SettingError(f"{where}: each [[task]] needs name = \"arith\" (or a .jsonl file)")
        from ..tasks.registry import JSONL_OPTIONS

        extra = set(t) - {"name", "level", "limit", "split", *JSONL_OPTIONS}
        if extra:
            raise SettingError(f"{where}: [[task]] {t['name']} has unknown key(s) {', '.join(sorted(extra))}; "
                               f"legal: name, level, limit, split, and for a .jsonl file {', '.join(JSONL_OPTIONS)}")
        limit = t.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise SettingError(f"{where}: [[task]] {t['name']}: limit must be an integer >= 1; got {limit!r}")
        tasks.append(t)
    runs = []
    fields_ = set(SamplingParams.__dataclass_fields__)
    for s in table_list("strategy"):
        if not isinstance(s.get("name"), str):
            raise SettingError(f"{where}: each [[strategy]] needs name = \"<strategy>\" (see ponder strategies)")
        on = s.get("models", [])
        on = [on] if isinstance(on, str) else on
        names = [m["name"] for m in models]
        if not isinstance(on, list) or any(m not in names for m in on):
            raise SettingError(f"{where}: [[strategy]] {s['name']}: models must name [[model]] tables ({', '.join(names)}); "
                               f"got {s.get('models')!r}")
        axes = {k: (v if isinstance(v, list) else [v]) for k, v in s.items() if k not in ("name", "label", "models")}
        for k, v in axes.items():
            if not v:
                raise SettingError(f"{where}: [[strategy]] {s['name']}: {k} = [] gives no setting")
        keys = list(axes)
        for combo in itertools.product(*(axes[k] for k in keys)):
            point = dict(zip(keys, combo))
            runs.append(Run(s["name"], {k: v for k, v in point.items() if k in fields_},
                            {k: v for k, v in point.items() if k not in fields_}, s.get("label", ""), tuple(on)))
    seed, chunk = raw.get("seed", 0), raw.get("chunk", 25)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SettingError(f"{where}: seed must be an integer >= 0; got {seed!r}")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise SettingError(f"{where}: chunk (problems per batch) must be an integer >= 1; got {chunk!r}")
    return SweepConfig(models, tasks, runs, seed, chunk, raw.get("reward_model"), raw.get("dtype", "float32"),
                       raw.get("reward_format"), raw.get("db"), raw, where)


def verifier_identity(rm: Any, name: str) -> str:
    """What a result's key says of its verifier: for a local one its weights' hash (and
    its format, when not ponder's own); for a remote one its server, model, format and
    what the probe found. Results from different verifiers never mix."""
    if hasattr(rm, "identity"):
        return rm.identity()
    if hasattr(rm, "lm"):  # a generative verifier: its model and every field of its recipe
        import hashlib

        recipe = hashlib.sha256(repr(rm.fmt).encode()).hexdigest()[:10]
        return f"{rm.fmt.name}-{recipe}:{model_identity(rm.lm, name)}"
    fmt = getattr(getattr(rm, "fmt", None), "name", "ponder")
    base = model_identity(rm, name)
    return base if fmt == "ponder" else f"{fmt}:{base}"


def model_identity(lm: Any, name: str) -> str:
    """A hash of the weights for a local model; its endpoint and name for a remote one."""
    folder = getattr(lm, "path", None)
    if folder is not None and Path(folder).is_dir():
        return weights_id(folder)
    chat = "(chat)" if getattr(lm, "chat", False) else ""  # the server's template: other prompts
    return f"{getattr(lm, 'endpoint', 'in-process')}{chat}:{getattr(lm, 'name', name)}"


def load_sweep_model(spec: dict[str, Any], dtype: str) -> Any:
    """A [[model]] table's model: in-process, or remote with its request limit (problems
    of a chunk run concurrently; their requests share ``concurrency`` connections)."""
    from .. import strategies

    remote = {k2: spec[k1] for k1, k2 in (("concurrency", "max_concurrency"), ("tokenizer", "tokenizer")) if k1 in spec}
    return strategies.load_model(spec["name"], "[[model]] name", dtype, **remote)


@dataclass
class Prepared:
    """A sweep whose every run is built and checked: what ``sweep`` computes."""

    cfg: SweepConfig
    runs: list[tuple[Any, ...]]  # (model name, model id, task, level, problems, run, generator, config, lm)
    reward_model: Any = None


def prepare(cfg: SweepConfig) -> Prepared:
    """Load every model and task and build every run through the registry, before any
    store is opened or anything computed: a typo in the last strategy must not surface
    after an hour of the first, nor leave an empty store or a session row behind.
    Errors name the sweep file, the model and the strategy with its setting."""
    from .. import strategies
    from ..tasks.registry import load_task

    where = cfg.where
    try:
        rm = (strategies.load_reward_model(cfg.reward_model, "reward_model", cfg.reward_format)
              if cfg.reward_model else None)
    except SettingError as e:
        raise SettingError(f"{where}: {as_sweep_keys(str(e))}") from None
    rm_id = verifier_identity(rm, cfg.reward_model) if rm is not None else None
    loaded = []
    for spec in cfg.models:
        model_name = spec["name"]
        try:
            lm = load_sweep_model(spec, cfg.dtype)
        except SettingError as e:
            raise SettingError(f"{where}: [[model]] {model_name}: {e}") from None
        mid = model_identity(lm, model_name)
        chat = None
        if spec.get("chat_template"):
            from ..backends.chat import ChatTemplate

            try:
                chat = ChatTemplate.load(spec["chat_template"], lm)
            except SettingError as e:
                raise SettingError(f"{where}: [[model]] {model_name}: chat_template: {e}") from None
            mid += f"|chat:{digest(chat.source or '')}"  # another prompt format is another model
        for t in cfg.tasks:
            try:
                task = load_task(t["name"], **{k: v for k, v in t.items() if k not in ("name", "level", "limit", "split")})
                if chat is not None:
                    from ..tasks.base import FormattedTask

                    task = FormattedTask(task, chat.prompt_for)
                problems = (task.problems(t.get("level"), t.get("limit"), split=t["split"]) if "split" in t
                            else task.problems(t.get("level"), t.get("limit")))
            except SettingError as e:
                raise SettingError(f"{where}: [[task]] {t['name']}: {e}") from None
            except TypeError:  # problems() takes no split
                raise SettingError(f"{where}: [[task]] {t['name']}: split applies to arith's levels (test, fit); "
                                   "a JSONL task's problems are its file's") from None
            level = t.get("level") or getattr(task, "default_level", "") or ""
            for run in cfg.runs:
                if run.models and model_name not in run.models:
                    continue
                try:
                    params = SamplingParams(**run.params)
                    if hasattr(lm, "vocab_size"):  # a remote model's vocabulary is the server's to check
                        params.check_for(lm.vocab_size)
                    gen = strategies.build(run.strategy, lm, params, dict(run.settings),
                                           strategies.Context(task=task, reward_model=rm))
                except (SettingError, TypeError) as e:
                    raise SettingError(f"{where}: [[strategy]] {run.strategy} "
                                       f"{_setting_text(run.setting())}: {as_sweep_keys(str(e))}") from None
                config = {"strategy": run.strategy, "params": params.changed(), "settings": run.settings,
                          "seed": cfg.seed, "reward_model": rm_id if strategies.STRATEGIES[run.strategy].scored or "scorer" in run.settings
                          else None}
                loaded.append((model_name, mid, task, level, problems, run, gen, config, lm))
    return Prepared(cfg, loaded, rm)


def as_sweep_keys(msg: str) -> str:
    """A message written for the command line, in a sweep file's words: its keys, not flags
    (``--reward-model`` is ``reward_model = ...``, ``--set KEY=V`` is ``KEY = V``)."""
    import re

    msg = re.sub(r"--strategy ([\w-]+)", r"[[strategy]] \1", msg)
    msg = msg.replace("--reward-model", "reward_model = \"...\" (top level)")
    msg = re.sub(r"--set ([\w.]+)=([^\s,;)]+)", r'\1 = "\2"', msg)
    msg = re.sub(r"--set ([\w.]+)", r"\1", msg)
    return re.sub(r"--([a-z][a-z-]+)", lambda m: m[1].replace("-", "_"), msg)


def _setting_text(setting: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items()) or "(defaults)"


def fresh_caches(reward_model: Any = None) -> None:
    """Forget every cached prefix (the engines' and the reward model's): each chunk is
    computed as if it ran first, so a configuration's computed tokens and FLOPs never
    depend on which strategies ran before it in the process, nor on a resume. (A remote
    server's own prefix cache is the server's: its bill is what the server reports.)"""
    from ..engine.engines import clear_prefix_caches

    clear_prefix_caches()
    if reward_model is not None and hasattr(reward_model, "clear_cache"):
        reward_model.clear_cache()


def sweep(cfg: SweepConfig | Prepared, store: ResultsStore, command: str = "",
          on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every (model, task, run, problem) the store lacks, a chunk at a time, each
    chunk committed in one transaction. Returns {"computed": n, "cached": m,
    "configs": the configuration hashes of this sweep}. The store is claimed for the
    sweep's duration: a second sweep on it is refused (``ResultsStore.claim``)."""
    prepared = cfg if isinstance(cfg, Prepared) else prepare(cfg)
    cfg = prepared.cfg
    store.claim()
    session = store.start_session(command)
    total = sum(len(x[4]) for x in prepared.runs)
    counts: dict[str, Any] = {"computed": 0, "cached": 0, "configs": set()}
    state = {"done": 0, "total": total, "correct": 0, "scored": 0}
    for model_name, mid, task, level, problems, run, gen, config, lm in prepared.runs:
        chash = digest(canonical(config))
        counts["configs"].add(chash)
        keys = [digest(chash, mid, task.name, level, p.id) for p in problems]
        have = store.done(keys)
        todo = [(p, k) for p, k in zip(problems, keys) if k not in have]
        cached = len(problems) - len(todo)
        counts["cached"] += cached
        if cached:
            store.add([], session, cached=cached)
            state["done"] += cached
            for r in store.conn.execute(
                    f"SELECT correct FROM results WHERE key IN ({','.join('?' * len(have))})", list(have)):
                state["correct"] += r[0]
                state["scored"] += 1
        label = run.label or run.strategy
        for i in range(0, len(todo), cfg.chunk):
            part = todo[i : i + cfg.chunk]
            prompts = [task.prompt(p) for p, _ in part]
            fresh_caches(prepared.reward_model)
            # one seed for every chunk: a problem's output depends on the seed and its prompt only
            outs = gen.generate_batch(prompts, n=1, seed=cfg.seed)
            rows = []
            for (p, k), gens, prompt in zip(part, outs, prompts):
                g = gens[0]
                ok = task.check_answer(p, g.text)
                judge = (lambda text, p=p: (task.extract_answer(text), bool(task.check_answer(p, text))))
                rows.append(row(k, chash, config, model_name, mid, task.name, level, label, run.setting(), p.id,
                                g, task.extract_answer(g.text), ok, decode=getattr(lm, "decode", None),
                                question=prompt, gold=p.answer, judge=judge))
                state["correct"] += ok
                state["scored"] += 1
            store.add(rows, session)
            counts["computed"] += len(rows)
            state["done"] += len(rows)
            if on_progress:
                on_progress({**state, "run": f"{label} {canonical(run.setting())}"})
        if on_progress and not todo:
            on_progress({**state, "run": f"{label} {canonical(run.setting())}"})
    return counts


def default_config_path() -> Path:
    return Path(__file__).parent / "default.toml"

