"""The registry's core: ``Strategy``, ``Context``, ``register``, ``build`` and the model
loaders; the strategies themselves are registered by the family modules beside it.

Strategies by name: the registry the CLI (``--strategy``) and ``ponder eval`` use.

A strategy is a factory ``(lm, params, settings, ctx) -> generator``: ``params`` is a
``SamplingParams`` (the token-level settings every strategy shares), ``settings`` the
strategy's own (``num_beams``, ``samples``...), given as flags or ``--set key=value``.
Each registration says which sampling adapters, history processors and options the
strategy honours; ``build`` refuses the rest, naming them, so that nothing the user
set is silently ignored. Defaults live once, in the generator classes: a factory
passes only what was given.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ..errors import SettingError
from ..params import SamplingParams
from .loading import load_endpoint, load_model, load_reward_model  # noqa: F401  (the loaders, by scheme)

ALL_ADAPTERS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon", "eta", "top_n_sigma", "mirostat",
                "mirostat_tau", "mirostat_eta")
ALL_OPTIONS = ("stop", "stop_token_ids", "ignore_eos", "token_healing", "logprobs")
# Constraints, given by name on the CLI; a strategy takes them if it says so.
CONSTRAINT_SETTINGS = ("json_schema", "regex", "grammar", "choice")


@dataclass(frozen=True)
class Setting:
    """A strategy's setting declared once: its type and legal range (``build`` checks a
    given value against them, naming the range), its help, and whether it sets how many
    generations an output may take (``spends``: ``ponder serve --max-n`` counts it, at
    ``default`` when not given, which is then the value the strategy gets)."""

    name: str
    kind: type = object  # int, float, bool, str; object: the factory reads it
    help: str = ""
    lo: float | None = None
    hi: float | None = None
    default: Any = None
    spends: bool = False

    def legal(self) -> str:
        what = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(self.kind, "a value")
        if self.lo is not None and self.hi is not None:
            return f"{what} in [{self.lo:g}, {self.hi:g}]"
        return what + (f" >= {self.lo:g}" if self.lo is not None else f" <= {self.hi:g}" if self.hi is not None else "")

    def check(self, v: Any) -> Any:
        """``v`` as the factory gets it, or a SettingError naming the legal range."""
        if self.kind is bool:
            return _bool(v, self.name)
        ok = {int: isinstance(v, int) and not isinstance(v, bool),
              float: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v,
              str: isinstance(v, str)}.get(self.kind, True)
        if ok and isinstance(v, (int, float)) and not isinstance(v, bool):
            ok = (self.lo is None or v >= self.lo) and (self.hi is None or v <= self.hi)
        if not ok:
            said = f" ({self.help})" if self.help else ""
            raise SettingError(f"{self.name}{said} must be {self.legal()}; got {v!r}", self.name)
        return float(v) if self.kind is float else v

    def but(self, **changes: Any) -> "Setting":
        return replace(self, **changes)


def samples(default: int = 16) -> Setting:
    """The candidates per problem of a parallel method or a search (spent per output)."""
    return Setting("samples", int, "candidates per problem", lo=1, default=default, spends=True)


@dataclass
class Strategy:
    """A strategy declared once. ``settings``: its own, each a ``Setting`` (typed, checked
    by ``build``) or a name (the factory reads it); ``scored``: its result depends on the
    reward model (a sweep's key then holds the verifier's identity); ``inner``: a
    parallel method may draw its samples from it (``--set over=NAME``)."""

    name: str
    factory: Callable[..., Any]
    help: str
    settings: tuple[Any, ...] = ()  # its own settings: Setting or name (names after construction)
    adapters: tuple[str, ...] = ()  # the sampling adapters it honours
    history: bool = True  # penalties, biases, bans
    options: tuple[str, ...] = ALL_OPTIONS  # stops and token healing it honours
    constraint: bool = False
    needs: tuple[str, ...] = ()  # e.g. ("task",) or ("reward_model",)
    meta: bool = False  # draws several candidates per problem (eval reports pass@N)
    access: str = "logits"  # the lowest access level its policy needs: text, logprobs or logits
    nested: tuple[str, ...] = ("over",)  # settings NAME whose value's own settings come as NAME.KEY=V
    scored: bool = False
    inner: bool = True
    declared: dict[str, Setting] = field(default_factory=dict)  # the typed ones, by name

    def __post_init__(self) -> None:
        self.declared = {**self.declared, **{x.name: x for x in self.settings if isinstance(x, Setting)}}
        self.settings = tuple(x.name if isinstance(x, Setting) else x for x in self.settings)

    def describe(self) -> str:
        """Its settings as ``ponder strategies`` lists them: name, legal range, default."""
        out = []
        for k in self.settings:
            d = self.declared.get(k)
            out.append(k if d is None else f"{k} ({d.legal()}" + (f", default {d.default}" if d.default is not None
                                                                  else "") + ")")
        return ", ".join(out) or "-"


@dataclass
class Context:
    """What a strategy may need besides the model and its settings."""

    task: Any = None
    reward_model: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> None:
    STRATEGIES[strategy.name] = strategy


def _flags(names: list[str]) -> str:
    return ", ".join("--" + k.replace("_", "-") for k in names)


def build(name: str, lm: Any, params: SamplingParams | None = None, settings: dict[str, Any] | None = None,
          ctx: Context | None = None) -> Any:
    """Make the generator for strategy ``name``. Unknown names and settings, and
    settings the strategy cannot honour, are errors that say what is legal."""
    if name not in STRATEGIES:
        raise SettingError(f"--strategy {name!r} is unknown; choose one of: {', '.join(STRATEGIES)}")
    st = STRATEGIES[name]
    params = params or SamplingParams()
    ctx = ctx or Context()
    from ..protocols import Access, require_access

    require_access(lm, Access[st.access.upper()], f"--strategy {name}")
    if _remote(lm):
        lm.check(params)  # settings a server cannot honour, by name, before anything runs
    for need in st.needs:
        if getattr(ctx, need) is None:
            raise SettingError(f"--strategy {name} needs {'--task' if need == 'task' else '--reward-model'}")
    # temperature 0 means greedy, which a strategy that does not sample already is
    adapters = [k for k in params.changed("adapter") if k not in st.adapters
                and not (k == "temperature" and params.greedy)]
    if adapters:
        hint = "; use --strategy sample" if name == "greedy" else ""
        raise SettingError(f"--strategy {name} does not take {_flags(adapters)}{hint}")
    if params.changed("history") and not st.history:
        raise SettingError(f"--strategy {name} does not take {_flags(list(params.changed('history')))}")
    options = [k for k in params.changed("option") if k in ALL_OPTIONS and k not in st.options]
    if options:
        raise SettingError(f"--strategy {name} does not take {_flags(options)}")
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    given = {k: settings.pop(k) for k in CONSTRAINT_SETTINGS if k in settings}
    if given:  # an empty pattern is an error, not "no constraint"
        if not st.constraint:
            raise SettingError(f"--strategy {name} does not take a constraint (--json-schema, --regex, --grammar, --choice)")
        if _remote(lm):  # before any grammar is compiled against a tokenizer the model may not have
            raise SettingError(f"a constraint ({', '.join('--' + k.replace('_', '-') for k in given)}) needs the "
                               f"model's logits, which {getattr(lm, 'endpoint', getattr(lm, 'name', lm))} does not "
                               "give (a remote server is text or logprobs level): run the model in-process "
                               "(native or hf:) or use the server's own structured output")
        from ..decoding.constraints import Grammar

        settings["constraint"] = Grammar.from_settings(lm, **given).constraint()
    unknown = [k for k in settings if k not in st.settings and k != "constraint"
               and not ("." in k and _nested_ok(st, settings, k.split(".", 1)[0]))]
    if unknown:
        legal = ", ".join(sorted(st.settings)) or "no settings of its own"
        raise SettingError(f"--strategy {name} does not take {', '.join(unknown)}; it takes {legal}")
    for k, d in st.declared.items():  # typed settings checked here, once; a budget's default filled in
        if k in settings:
            settings[k] = d.check(settings[k])
        elif d.spends and d.default is not None:
            settings[k] = d.default
    given = _Settings(settings)
    try:
        gen = st.factory(lm, params, given, ctx)
    except SettingError as e:
        raise _named(e, given) from None
    gen.strategy = st.name  # one name everywhere: the registry, Generation.meta["strategy"], results
    return gen


def spend(name: str, settings: dict[str, Any] | None = None) -> tuple[int, str]:
    """The most generations one output of strategy ``name`` may take by any one of its
    spending settings (given, else declared default), and that setting's name; the
    strategies nested in it (``over=``, a policy's candidates, ``probe_with=``) are read
    too, with the settings given to them as ``NAME.KEY=V``. ``ponder serve --max-n``
    reads this."""
    settings = settings or {}
    st = STRATEGIES.get(name)
    if st is None:
        return 1, ""
    best = (1, "")
    for d in st.declared.values():
        v = settings.get(d.name, d.default)
        if d.spends and isinstance(v, int) and not isinstance(v, bool) and v > best[0]:
            best = (v, d.name)
    inner: list[tuple[str, str, dict[str, Any]]] = []  # (name, registered strategy, its settings)
    if isinstance(settings.get("over"), str):
        inner.append((settings["over"], settings["over"], _nested(settings, "over")))
    if "policy" in st.nested:
        inner += policy_candidates(settings)
    if isinstance(settings.get("probe_with"), str):
        inner.append((settings["probe_with"], settings["probe_with"], _nested(settings, "probe_with")))
    for n, base, own in inner:
        v, what = spend(base, own)
        if v > best[0]:
            best = (v, f"{n}.{what}")
    return best


DEFAULT_POLICY = "0.25:probe,0.5:best-of-n,1:prm-beam"  # compute-optimal's, when none is given


def policy_candidates(settings: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """The strategies a compute-optimal policy names (the probe aside), each as (its name
    in the policy, the registered strategy: NAME of NAME#TAG, its own settings: those
    given as NAME.KEY=V, and samples=N where the strategy takes samples)."""
    from ..meta.compute_optimal import PROBE

    out = []
    for name in sorted(_policy_names({"policy": settings.get("policy", DEFAULT_POLICY)}) - {PROBE}):
        base = name.split("#", 1)[0]
        own = _nested(settings, name, name.replace("-", "_"))
        if base in STRATEGIES and "samples" in STRATEGIES[base].settings and "samples" in settings:
            own.setdefault("samples", settings["samples"])
        out.append((name, base, own))
    return out


# -- helpers the factories share ------------------------------------------------------------
def _nested_ok(st: Strategy, settings: dict[str, Any], prefix: str) -> bool:
    """``over.KEY=V`` passes through when the strategy takes ``over``; compute-optimal's
    ``best-of-n.samples=8`` when best-of-n is a strategy its policy names."""
    if prefix in st.nested and prefix in st.settings:
        return True
    # the CLI's --set turns dashes into underscores: best-of-n.samples arrives as best_of_n.samples
    return "policy" in st.nested and prefix.replace("-", "_") in {n.replace("-", "_") for n in _policy_names(settings)}


def _policy_names(settings: dict[str, Any]) -> set[str]:
    policy = settings.get("policy")
    if not isinstance(policy, str):
        return set()
    return {part.partition(":")[2].strip() for part in policy.split(",")}


def _encode(lm: Any) -> Callable[[str], list[int]]:
    return lambda w: lm.encode(w, add_special_tokens=False)


def _token_level(lm: Any, p: SamplingParams, s: dict[str, Any], adapters: bool = True) -> dict[str, Any]:
    """Keyword arguments for a token-level generator: options, history processors, the
    constraint, and (if it samples) the adapters."""
    out = {**p.options(), **p.history(_encode(lm))}
    if adapters:
        out.update(p.adapters())
    if "constraint" in s:
        out["constraint"] = s["constraint"]
    return out


class _Settings(dict):
    """A strategy's settings as its factory reads them, with the renames ``_given`` made
    (generator argument -> setting), so that an error a generator raises about its
    argument (``n must be...``) can name the setting the user gave (``samples``)."""

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.renamed: dict[str, str] = {}


def _named(e: SettingError, given: _Settings) -> SettingError:
    """``e`` naming the setting the user gave, by its own name, in ``e.setting``."""
    if e.setting is not None and e.setting in given:
        return e
    msg = str(e)
    word = msg.split(" ", 1)[0]
    key = given.renamed.get(word, word if word in given else None)
    if key is None:
        return e
    return SettingError(key + msg[len(word):], key)


def _given(s: dict[str, Any], **names: str) -> dict[str, Any]:
    """The settings that were given, renamed to the generator's argument names."""
    out = {arg: s[key] for arg, key in names.items() if key in s}
    if isinstance(s, _Settings):
        s.renamed.update({arg: key for arg, key in names.items() if key in s})
    return out


def _nested(s: dict[str, Any], *prefixes: str) -> dict[str, Any]:
    """The settings given as ``PREFIX.KEY=V`` (``over.samples``, ``best-of-n.samples``,
    ``probe_with.threshold``), keyed by KEY: those of a strategy built inside another."""
    return {k.split(".", 1)[1]: v for k, v in s.items() if "." in k and k.split(".", 1)[0] in prefixes}


def _bool(v: Any, name: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.lower() in ("true", "1", "yes")
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise SettingError(f"{name} must be true or false; got {v!r}", name)


def _floats(v: Any, name: str) -> list[float]:
    items = v if isinstance(v, (list, tuple)) else str(v).split(",")
    try:
        return [float(x) for x in items if str(x).strip()]
    except ValueError:
        raise SettingError(f"{name} must be comma-separated numbers; got {v!r}", name) from None


def _remote(lm: Any) -> bool:
    """A backend below the logits level (an OpenAI-compatible server): its server runs
    the token-level loop, so greedy and sampling are a request with the parameters."""
    from ..protocols import Access

    return getattr(lm, "access", Access.LOGITS) < Access.LOGITS
