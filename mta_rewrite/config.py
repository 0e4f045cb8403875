"""Configurations and plans: frozen, validated, versioned, JSON round-trip.

``MTAConfig`` is one chunk configuration of the MTA op. A ``Plan`` says, per attention site
(by its stable name), which configuration to use or that the site stays exact; calibration fills
in what it measured (error, relative cost). Plans are saved atomically (write a temporary file,
then rename) and loading checks the format version.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Union

FORMAT_VERSION = 1
EXACT = "exact"


INT64_LIMIT = 2 ** 63  # the op's integer arguments are int64 in its schema (torch.library)


def _positive_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    if value >= INT64_LIMIT:  # torch.export failed on it with "expected int, found int"
        raise ValueError(f"{name} must be an integer ≥ {minimum} below 2**63 (an int64), got {value!r}")
    return value


@dataclass(frozen=True)
class MTAConfig:
    """One configuration of ``torch.ops.mta.attention`` (MTA_SPEC.md): chunk size c, local
    window L in chunks, always-exact first tokens, exactly attended top-k chunks."""

    chunk_size: int
    local_chunks: int = 1
    sinks: int = 0
    top_k: int = 0

    def __post_init__(self) -> None:
        _positive_int("chunk_size", self.chunk_size, 1)
        _positive_int("local_chunks", self.local_chunks, 1)
        _positive_int("sinks", self.sinks, 0)
        _positive_int("top_k", self.top_k, 0)

    def op_kwargs(self) -> dict[str, int]:
        """Keyword arguments for ``torch.ops.mta.attention``."""
        return asdict(self)

    def to_dict(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MTAConfig":
        data = dict(data)
        version = data.pop("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"MTAConfig format version {version} is not supported (expected {FORMAT_VERSION})")
        unknown = set(data) - {"chunk_size", "local_chunks", "sinks", "top_k"}
        if unknown:
            raise ValueError(f"unknown MTAConfig fields: {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "MTAConfig":
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        return f"c={self.chunk_size} L={self.local_chunks} sinks={self.sinks} top_k={self.top_k}"

    @property
    def short(self) -> str:
        """Compact form for tables: c64·L2·s4·k2."""
        return f"c{self.chunk_size}·L{self.local_chunks}·s{self.sinks}·k{self.top_k}"


@dataclass(frozen=True)
class HeadGroups:
    """Different configurations for groups of query heads within one site (heads differ: some
    attend locally, some retrieve). ``groups``: (MTAConfig or None for exact, head indices)."""

    groups: tuple[tuple[MTAConfig | None, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        heads = [h for _, hs in self.groups for h in hs]
        if not heads or sorted(heads) != list(range(len(heads))):
            raise ValueError(f"head groups must cover heads 0..H-1 exactly once, got {sorted(heads)}")
        for cfg, _ in self.groups:
            if cfg is not None and not isinstance(cfg, MTAConfig):
                raise ValueError(f"a head group's config must be an MTAConfig or None (exact), got {cfg!r}")

    @classmethod
    def from_heads(cls, per_head: list[MTAConfig | None]) -> "MTAConfig | HeadGroups | None":
        """Group heads by their configuration; one configuration for all heads collapses to it."""
        if len(set(per_head)) == 1:
            return per_head[0]
        order: dict = {}
        for h, cfg in enumerate(per_head):
            order.setdefault(cfg, []).append(h)
        return cls(tuple((cfg, tuple(hs)) for cfg, hs in order.items()))

    @property
    def heads(self) -> int:
        return sum(len(hs) for _, hs in self.groups)

    def op_groups(self) -> tuple:
        """Plain (op kwargs or None, heads) tuples for the graph (printable in generated code)."""
        return tuple((None if cfg is None else tuple(sorted(cfg.op_kwargs().items())), hs) for cfg, hs in self.groups)

    @property
    def short(self) -> str:
        return ", ".join(f"{'exact' if cfg is None else cfg.short}×{len(hs)}" for cfg, hs in self.groups)

    def __str__(self) -> str:
        return f"per head: {self.short}"

    def to_dict(self) -> dict[str, Any]:
        return {"head_groups": [{"config": EXACT if cfg is None else _config_fields(cfg), "heads": list(hs)}
                                for cfg, hs in self.groups]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HeadGroups":
        return cls(tuple((None if g["config"] == EXACT else MTAConfig.from_dict(g["config"]), tuple(g["heads"]))
                         for g in data["head_groups"]))


@dataclass(frozen=True)
class Learned:
    """A site's configuration (an MTAConfig or HeadGroups) with learned summaries (MTA_SPEC.md,
    ``summary="learned"``): ``weight`` [Hkv][d], per key/value head a vector w; a chunk's summary
    weighs its keys by softmax_s(k_s·w) instead of their mean (w = 0 is the mean). Calibration fits
    it (``calibrate(..., learn_summaries=True)``, ``fit_summaries``)."""

    config: MTAConfig | HeadGroups
    weight: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.config, (MTAConfig, HeadGroups)):
            raise ValueError(f"learned summaries need an MTAConfig or HeadGroups, got {self.config!r}")
        rows = [len(r) for r in self.weight]
        if not rows or min(rows) < 1 or len(set(rows)) != 1:
            raise ValueError(f"a summary weight is [Hkv][d] with Hkv, d ≥ 1 and rows of one length, got row lengths {rows}")
        object.__setattr__(self, "weight", tuple(tuple(float(x) for x in r) for r in self.weight))

    @classmethod
    def from_tensor(cls, config: MTAConfig | HeadGroups, weight) -> "Learned":
        return cls(config, weight.detach().double().cpu().tolist())  # (made tuples of floats on construction)

    def tensor(self, device=None):
        import torch

        return torch.tensor(self.weight, dtype=torch.float32, device=device)

    @property
    def short(self) -> str:
        return f"{self.config.short}·learned"

    def __str__(self) -> str:
        return f"{self.config}, learned summaries"

    def to_dict(self) -> dict[str, Any]:
        inner = self.config.to_dict() if isinstance(self.config, HeadGroups) else _config_fields(self.config)
        return {**inner, "summary_weight": [list(r) for r in self.weight]}


@dataclass(frozen=True)
class Clustered:
    """A site's MTAConfig with clustered summaries (MTA_SPEC.md, learned clustering of keys;
    non-causal sites only, no top-k): ``centroids`` [Hkv][K][d], per key/value head K centroids;
    the keys outside a query's window are summarised per nearest centroid instead of per chunk
    (``ops/clustered.py``). ``calibration.cluster.fit_clusters`` fits them on calibration keys."""

    config: MTAConfig
    centroids: tuple[tuple[tuple[float, ...], ...], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.config, MTAConfig):
            raise ValueError(f"clustered summaries need an MTAConfig, got {self.config!r}")
        if self.config.top_k:
            raise ValueError("clustered summaries take no top_k")
        shapes = {(len(head), *{len(c) for c in head}) for head in self.centroids}
        if not self.centroids or len(shapes) != 1 or len(next(iter(shapes))) != 2 or min(next(iter(shapes))) < 1:
            raise ValueError("centroids are [Hkv][K][d] with Hkv, K, d ≥ 1 and the same K and d in every head")
        object.__setattr__(self, "centroids", tuple(tuple(tuple(float(x) for x in c) for c in head)
                                                    for head in self.centroids))

    @classmethod
    def from_tensor(cls, config: MTAConfig, centroids) -> "Clustered":
        return cls(config, centroids.detach().double().cpu().tolist())

    def tensor(self, device=None):
        import torch

        return torch.tensor(self.centroids, dtype=torch.float32, device=device)

    @property
    def clusters(self) -> int:
        return len(self.centroids[0])

    @property
    def short(self) -> str:
        return f"{self.config.short}·K{self.clusters}"

    def __str__(self) -> str:
        return f"{self.config}, {self.clusters} clustered summaries"

    def to_dict(self) -> dict[str, Any]:
        return {**_config_fields(self.config), "centroids": [[list(c) for c in head] for head in self.centroids]}


def _config_fields(cfg: MTAConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k != "version"}


@dataclass(frozen=True)
class Boundaries:
    """Boundary chunks (MTA_SPEC.md, "boundary") for a rewritten model: segment ids computed in the
    graph from the model's token-id input ``input`` (a [B, n] integer tensor): a segment ends after
    each token whose id is in ``separators`` (a tokenizer's ids of ".", "?", newline, …). Every MTA
    site then chunks by segments: a chunk ends at a segment's end or after ``chunk_size`` tokens."""

    separators: tuple[int, ...]
    input: str = "input_ids"

    def __post_init__(self) -> None:
        seps = tuple(self.separators)
        if not seps or any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < INT64_LIMIT for x in seps):
            raise ValueError(f"boundaries need one or more non-negative token ids (below 2**63) as separators, got "
                             f"{self.separators!r}")
        if not isinstance(self.input, str) or not self.input:
            raise ValueError(f"boundaries read a model input by name, got {self.input!r}")
        object.__setattr__(self, "separators", seps)

    def to_dict(self) -> dict[str, Any]:
        return {"separators": list(self.separators), "input": self.input}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Boundaries":
        unknown = set(data) - {"separators", "input"}
        if unknown:
            raise ValueError(f"unknown boundaries fields: {sorted(unknown)}")
        separators = data.get("separators", ())
        if not isinstance(separators, (list, tuple)):  # (tuple() of a number: "'float' object is not iterable")
            raise ValueError(f"boundaries' separators must be a list of token ids, got {separators!r}")
        return cls(tuple(separators), data.get("input", "input_ids"))

    def __str__(self) -> str:
        return f"boundaries after tokens {list(self.separators)} of {self.input}"


SiteChoice = Union[MTAConfig, HeadGroups, Learned, Clustered, str]  # a config, per-head groups, learned, clustered, "exact"


@dataclass(frozen=True)
class PlanEntry:
    """What a plan says about one site; ``config`` None means the site stays exact."""

    config: MTAConfig | HeadGroups | Learned | Clustered | None
    error: float | None = None  # measured error of this site alone (calibration)
    relative_cost: float | None = None  # predicted attention cost relative to exact

    @property
    def exact(self) -> bool:
        return self.config is None

    def to_dict(self) -> dict[str, Any]:
        if self.config is None:
            config: Any = EXACT
        elif isinstance(self.config, (HeadGroups, Learned, Clustered)):
            config = self.config.to_dict()
        else:
            config = _config_fields(self.config)
        return {
            "config": config,
            "error": self.error,
            "relative_cost": self.relative_cost,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PlanEntry":
        if not isinstance(data, Mapping):
            raise ValueError(f"a site's entry is an object with a \"config\", got {data!r}")
        cfg = data.get("config", EXACT)
        if cfg != EXACT and not isinstance(cfg, Mapping):
            raise ValueError(f"config must be {EXACT!r} or an object of MTAConfig fields, got {cfg!r}")
        weight = centroids = None
        if isinstance(cfg, Mapping) and ("summary_weight" in cfg or "centroids" in cfg):
            cfg = dict(cfg)
            weight, centroids = cfg.pop("summary_weight", None), cfg.pop("centroids", None)
        if cfg == EXACT:
            config = None
        elif isinstance(cfg, Mapping) and "head_groups" in cfg:
            config = HeadGroups.from_dict(cfg)
        else:
            config = MTAConfig.from_dict(cfg)
        if weight is not None:
            config = Learned(config, weight)
        if centroids is not None:
            config = Clustered(config, centroids)
        return cls(
            config=config,
            error=data.get("error"),
            relative_cost=data.get("relative_cost"),
        )


def _entry(choice: SiteChoice | PlanEntry) -> PlanEntry:
    if isinstance(choice, PlanEntry):
        return choice
    if isinstance(choice, (MTAConfig, HeadGroups, Learned, Clustered)):
        return PlanEntry(choice)
    if choice == EXACT:
        return PlanEntry(None)
    raise ValueError(f"a plan maps site names to an MTAConfig or {EXACT!r}, got {choice!r}")


@dataclass
class Plan:
    """Site name → MTAConfig, HeadGroups, Learned, Clustered or "exact", plus what calibration measured
    (``metadata``) and, optionally, ``boundaries``: every MTA site chunks by segments.

    Sites of a model that a plan does not name stay exact; a plan that names a site the model
    does not have is an error when it is applied (a typo must not pass silently).
    """

    sites: dict[str, PlanEntry] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    boundaries: Boundaries | None = None

    def __init__(self, sites: Mapping[str, SiteChoice | PlanEntry] | None = None, metadata: Mapping[str, Any] | None = None,
                 boundaries: Boundaries | None = None):
        self.sites = {str(name): _entry(choice) for name, choice in (sites or {}).items()}
        self.metadata = dict(metadata or {})
        if boundaries is not None and not isinstance(boundaries, Boundaries):
            raise ValueError(f"a plan's boundaries must be a Boundaries, got {boundaries!r}")
        self.boundaries = boundaries

    def config_for(self, name: str) -> MTAConfig | HeadGroups | Learned | Clustered | None:
        entry = self.sites.get(name)
        return None if entry is None else entry.config

    def __iter__(self) -> Iterator[str]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "mta-rewrite-plan",
            "version": FORMAT_VERSION,
            "sites": {name: entry.to_dict() for name, entry in self.sites.items()},
            "metadata": self.metadata,
            **({"boundaries": self.boundaries.to_dict()} if self.boundaries is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        if not isinstance(data, Mapping) or data.get("format") != "mta-rewrite-plan":
            raise ValueError("not an mta-rewrite plan (missing format: mta-rewrite-plan)")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"plan format version {data.get('version')} is not supported (expected {FORMAT_VERSION})")
        for key, kind in (("sites", "an object of site name → entry"), ("metadata", "an object"),
                          ("boundaries", "an object")):
            if key in data and not isinstance(data[key], Mapping) and not (key == "boundaries" and data[key] is None):
                raise ValueError(f"a plan's {key} must be {kind}, got {type(data[key]).__name__}")
        sites = {}
        for name, entry in data.get("sites", {}).items():
            try:
                sites[name] = PlanEntry.from_dict(entry)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:  # a hand-edited plan: say where
                reason = f"missing field {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
                raise ValueError(f"plan site {name!r}: {reason}") from None
        boundaries = data.get("boundaries")
        return cls(sites, data.get("metadata", {}), None if boundaries is None else Boundaries.from_dict(boundaries))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON atomically (never a half-written file at ``path``)."""
        return atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read plan {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"plan {path} is not a JSON text (not UTF-8)") from None
        try:
            return cls.from_json(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], *, companions: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then rename it to ``path``:
    readers never see a half-written file, and a failure leaves ``path`` as it was. The file gets
    the permissions a plain ``open(path, "w")`` would give it (an existing file's own, else
    0o666 less the umask), not the temporary file's owner-only 0o600. An OSError names ``path``
    (not the temporary file, which the user never asked for).

    ``companions``: ``write`` may write files beside ``tmp`` too (an ONNX model's external data,
    named in the model relative to it): ``tmp`` is then ``path``'s name in a temporary folder of
    ``path``'s folder, and every file written there is renamed beside ``path``, ``path`` last
    (each file complete when it appears; a failure leaves them all as they were)."""
    import shutil

    path = _file_target(path)
    tmp = folder = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_umask()
        if companions:
            folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
            tmp = str(folder / path.name)
        else:
            # (the temporary file ends as ``path`` does: writers that read the format from the name,
            # torch.export.save, which warns about any name not ending in .pt2, see the same one)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
            os.close(fd)
        write(tmp)
        if folder is None:
            renames = [(Path(tmp), path)]
        else:
            renames = [(file, path.parent / file.name) for file in sorted(folder.iterdir(), key=lambda p: p.name == path.name)]
        for file, target in renames:
            os.chmod(file, target.stat().st_mode & 0o7777 if target.is_file() else mode)
            os.replace(file, target)
    except BaseException as exc:
        if folder is None and tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.strerror:
            raise _cannot_write(path, exc) from exc
        raise
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return path


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, with :func:`atomic_write`'s error, where ``path`` could not be written later (its
    folder cannot be made, or takes no new file, or it is a folder): before work whose result goes
    there. Nothing is left behind: the folders :func:`atomic_write` will make are not made here (a
    run that failed after this check left them, empty), the nearest folder that exists is tried."""
    path = _file_target(path)
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():  # (a file where a folder of the path should be)
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise _cannot_write(path, exc) from exc


def check_outputs(inputs, outputs) -> None:
    """Before work whose results go to ``outputs`` (paths; an empty one is refused by
    :func:`check_writable`): none of them is one of ``inputs`` (inputs are never overwritten; empty
    ones ignored) or another of the outputs, and each can be written."""
    read, written = {Path(p).resolve() for p in inputs if p and os.fspath(p)}, set()
    for out in outputs:
        if os.fspath(out):
            where = Path(out).resolve()
            if where in read:
                raise ValueError(f"{out} is an input: outputs never overwrite inputs (give another output)")
            if where in written:
                raise ValueError(f"{out} is given for two outputs: one would replace the other")
            written.add(where)
        check_writable(out)


def _file_target(path: str | os.PathLike) -> Path:
    """``path`` as a Path, where it can name a file: not empty (Path("") is the current folder, and
    the final rename onto it failed, after the work, with "Device or resource busy"), not a folder."""
    if not os.fspath(path):
        raise _cannot_write("an empty path", OSError(errno.ENOENT, "give a file name"))
    path = Path(path)
    if path.is_dir():
        raise _cannot_write(path, OSError(errno.EISDIR, os.strerror(errno.EISDIR)))
    return path


def _cannot_write(path: Path | str, exc: OSError) -> OSError:
    error = OSError(f"cannot write {path}: {exc.strerror or exc}")  # str() without "[Errno N]"
    error.errno = exc.errno
    return error


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
