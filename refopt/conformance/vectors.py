"""Loading the golden vectors (conformance/v1/) into Python objects.

The files are the product; this module is one reader of them. ``load()`` checks every file
against ``SHA256SUMS`` and the shape of ``schema.json`` before it hands anything out, so a port
is never judged against a damaged or hand-edited golden.

Two format versions are read. Format 1 stores every array. Format 2 (the scale vectors, whose
tensors have 2**17 elements and more) may name a tensor instead of storing it (a ``counter``
tensor, regenerated here on use and cached briefly), compresses what it stores (``zlib_b64``),
and may judge a listed subset of the elements (``judged``: flat indices; the goldens and budgets
then hold those elements only, in that order).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pathlib
import re
import stat
from dataclasses import dataclass, field

import numpy as np

from .. import registry
from ..quirks import Quirks
from . import counter
from .encoding import decode, tensor_form

FORMAT = "refopt-conformance-vector"
#: The format the small vectors are written in; format 2 for those that need its features.
FORMAT_VERSION = 1
FORMAT_VERSIONS = (1, 2)
VECTORS_SUBDIR = "vectors"
CHECKSUMS = "SHA256SUMS"
OPTIMIZERS = tuple(registry.OPTIMIZERS)
STATE_NAMES = {key: facts.buffers for key, facts in registry.OPTIMIZERS.items()}
#: Bounds on what is read, so a damaged or hostile directory costs bounded memory and time.
MAX_VECTOR_BYTES = 256 << 20
MAX_CHECKSUM_BYTES = 4 << 20
MAX_NDIM = 32
#: The most elements a generated (format-2 ``counter``) tensor may have.
MAX_GENERATED = 1 << 26
#: Vector ids (and so file names): letters, digits, '.', '_', '-'.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class VectorFileError(Exception):
    """A vector directory or file that cannot be used: one line, naming the file and the fault."""


@dataclass(frozen=True)
class Generated:
    """A tensor that a format-2 file names instead of storing (``refopt.conformance.counter``)."""

    seed: int
    stream: int
    exponent: int
    centred: bool
    dtype: str
    shape: tuple

    def array(self) -> np.ndarray:
        return _generate(self)

    def as_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape),
                "counter": {"seed": counter.format_seed(self.seed), "stream": self.stream,
                            "exponent": self.exponent, "centred": self.centred}}


@functools.lru_cache(maxsize=64)
def _generate(spec: Generated) -> np.ndarray:
    """Regenerate once and share, read-only: every target of one check reads the same inputs."""
    out = counter.array(spec.seed, spec.stream, spec.shape, spec.dtype, spec.exponent, spec.centred)
    out.flags.writeable = False
    return out


def materialize(x):
    """An input as a NumPy array: stored arrays as they are, generated ones regenerated."""
    return x.array() if isinstance(x, Generated) else x


@dataclass(frozen=True)
class Step:
    grad_source: object       # input gradient: an ndarray in the vector dtype, or a Generated
    param: np.ndarray         # expected parameter after this step (the golden, float64)
    state: dict               # expected state after this step: {name: float64 ndarray, "step": int}
    budget: np.ndarray        # per-element error budget for param (float64, same shape)
    #: per-element budgets of the state buffers {name: float64 ndarray} (same model as ``budget``)
    state_budget: dict = field(default_factory=dict)

    @property
    def grad(self) -> np.ndarray:
        """The input gradient, in the vector dtype."""
        return materialize(self.grad_source)


@dataclass(frozen=True)
class Vector:
    id: str
    name: str
    optimizer: str            # "saveus" | "dope"
    profile: str
    quirks: dict              # every quirk name -> bool
    hparams: dict             # JSON form, reference names; SAVEUS clip_lambda {"power": p} or None
    dtype: str
    shape: tuple
    clauses: tuple            # spec clause ids this vector exercises
    flags: tuple              # names explained in conformance/v1/FLAGS.md
    param0_source: object     # initial parameter: an ndarray in the vector dtype, or a Generated
    state0_source: dict | None  # None = fresh state, else {name: ndarray or Generated, "step": int}
    steps: tuple              # tuple[Step, ...]
    tolerance: dict           # {"k": float, "floor_ulps": float, "model": "mca-v1", ...}
    description: str = ""
    path: str = ""            # the file it came from
    #: flat (C order) indices of the judged elements, or None: all of them. When set, the goldens
    #: and budgets of ``steps`` hold those elements only, in this order.
    judged: np.ndarray | None = None
    format_version: int = FORMAT_VERSION

    @property
    def param0(self) -> np.ndarray:
        """The initial parameter, in the vector dtype."""
        return materialize(self.param0_source)

    @property
    def state0(self) -> dict | None:
        """None for a fresh state, else ``{name: ndarray in the vector dtype, "step": int}``."""
        if self.state0_source is None:
            return None
        return {k: (v if k == "step" else materialize(v)) for k, v in self.state0_source.items()}

    def judged_part(self, full) -> np.ndarray:
        """The judged elements of a full-shape array (the whole array when all are judged)."""
        a = np.asarray(full)
        return a if self.judged is None else a.reshape(-1)[self.judged]

    def full_index(self, index) -> tuple:
        """The index in the tensor of element ``index`` of a judged (golden-shaped) array."""
        if self.judged is None:
            return tuple(index)
        flat = int(self.judged[int(index[0])])
        return tuple(int(i) for i in np.unravel_index(flat, self.shape))

    def optimizer_hparams(self) -> dict:
        """Keyword arguments for refopt.SAVEUS/DOPE (reference names), clip_lambda as a callable."""
        return hparams_from_json(self.optimizer, self.hparams)

    def make_reference(self):
        """The refopt core optimizer this vector was generated with (profile and quirks applied)."""
        import refopt

        cls = refopt.SAVEUS if self.optimizer == "saveus" else refopt.DOPE
        return cls(**self.optimizer_hparams(), profile=self.profile, quirks=dict(self.quirks))

    def __repr__(self) -> str:
        return (f"Vector({self.id} {self.name!r}: {self.optimizer} {self.dtype}{list(self.shape)} "
                f"{self.profile}, {len(self.steps)} step(s))")


class PowerLambda:
    """SAVEUS clip_lambda ``t -> t**power`` (picklable, and printable in reports)."""

    def __init__(self, power: float):
        self.power = float(power)

    def __call__(self, t):
        return t**self.power

    def __repr__(self) -> str:
        return f"(lambda t: t**{self.power!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, PowerLambda) and other.power == self.power

    def __hash__(self) -> int:
        return hash(("PowerLambda", self.power))


def hparams_from_json(optimizer: str, h: dict) -> dict:
    out = dict(h)
    if "betas" in out:
        out["betas"] = tuple(out["betas"])
    if optimizer == "saveus" and "clip_lambda" in out:
        cl = out["clip_lambda"]
        out["clip_lambda"] = None if cl is None else PowerLambda(cl["power"])
    return out


def hparams_to_json(optimizer: str, h: dict) -> dict:
    out = dict(h)
    if "betas" in out:
        out["betas"] = [float(b) for b in out["betas"]]
    if optimizer == "saveus" and "clip_lambda" in out:
        cl = out["clip_lambda"]
        if cl is None:
            out["clip_lambda"] = None
        elif isinstance(cl, PowerLambda):
            out["clip_lambda"] = {"power": cl.power}
        elif cl is registry.clip_lambda_default:
            out["clip_lambda"] = {"power": 0.25}
        else:
            raise ValueError("clip_lambda must be None, PowerLambda or the default to be stored in a vector")
    return out


def default_dir() -> pathlib.Path:
    """The vectors shipped in the wheel (refopt/_vectors/v1), else the repository's conformance/v1."""
    here = pathlib.Path(__file__).resolve().parent.parent
    installed = here / "_vectors" / "v1"
    if (installed / CHECKSUMS).is_file():
        return installed
    return here.parent / "conformance" / "v1"


def _as_set(x):
    if x is None:
        return None
    return {x} if isinstance(x, str) else set(x)


def read_regular(path: pathlib.Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; VectorFileError for anything else
    (a directory, a device, a FIFO, a link to one of those, a file too large)."""
    try:
        info = os.stat(path)  # follows links: a link to /dev/zero is a device
    except OSError as exc:
        raise VectorFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise VectorFileError(f"{path}: not a regular file")
    if info.st_size > limit:
        raise VectorFileError(f"{path}: {info.st_size} bytes, more than the {limit} a vector file may have")
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise VectorFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > limit:
        raise VectorFileError(f"{path}: more than {limit} bytes")
    return raw


def read_checksums(root: pathlib.Path) -> dict:
    path = root / CHECKSUMS
    if not path.exists():
        raise VectorFileError(f"{path}: checksum file missing")
    raw = read_regular(path, MAX_CHECKSUM_BYTES)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise VectorFileError(f"{path}: not ASCII (byte {exc.start})") from None
    sums = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise VectorFileError(f"{path}:{n}: malformed line (expected '<sha256>  <file>')")
        folder, slash, file = name.partition("/")
        if folder != VECTORS_SUBDIR or not slash or not file.endswith(".json") \
                or not ID_PATTERN.fullmatch(file[:-len(".json")]):
            raise VectorFileError(f"{path}:{n}: {name!r} is not a vector file name (vectors/<id>.json)")
        if name in sums:
            raise VectorFileError(f"{path}:{n}: {name} listed twice")
        sums[name] = digest
    return sums


def load(path=None, *, optimizer=None, dtype=None, profile=None, ids=None) -> list:
    """The vectors in ``path`` (default: default_dir()), filtered; sorted by id.

    ``optimizer``, ``dtype``, ``profile`` and ``ids`` each take one value or a collection.
    Every file read is checked against SHA256SUMS and the schema; any fault raises
    VectorFileError. Selecting nothing is an error too (a typo must not pass silently)."""
    root = pathlib.Path(path) if path is not None else default_dir()
    if not root.is_dir():
        raise VectorFileError(f"{root}: vector directory missing")
    sums = read_checksums(root)
    vdir = root / VECTORS_SUBDIR
    files = sorted(vdir.glob("*.json")) if vdir.is_dir() else []
    listed = {n for n in sums if n.startswith(VECTORS_SUBDIR + "/")}
    present = {f"{VECTORS_SUBDIR}/{f.name}" for f in files}
    for name in sorted(listed - present):
        raise VectorFileError(f"{root / name}: listed in {CHECKSUMS} but missing")
    for name in sorted(present - listed):
        raise VectorFileError(f"{root / name}: not listed in {CHECKSUMS}")
    want = {k: _as_set(v) for k, v in
            (("optimizer", optimizer), ("dtype", dtype), ("profile", profile), ("id", ids))}
    if want["optimizer"]:
        want["optimizer"] = {o.lower() for o in want["optimizer"]}
    out = []
    for f in files:
        if want["id"] is not None and f.stem not in want["id"]:
            continue  # files are named by id, so unselected ones need not be read
        raw = read_regular(f, MAX_VECTOR_BYTES)
        if hashlib.sha256(raw).hexdigest() != sums[f"{VECTORS_SUBDIR}/{f.name}"]:
            raise VectorFileError(f"{f}: checksum mismatch (edited or damaged; regenerate with "
                                  f"`refopt vectors generate`)")
        vec = parse(raw, f)
        if vec.id != f.stem:
            raise VectorFileError(f"{f}: its id {vec.id!r} is not its file name")
        if all(want[k] is None or getattr(vec, k) in want[k] for k in ("optimizer", "dtype", "profile")):
            out.append(vec)
    if not out:
        sel = ", ".join(f"{k}={sorted(v)}" for k, v in want.items() if v is not None) or "all"
        raise VectorFileError(f"{root}: no vectors selected ({sel})")
    return out


def parse(raw: bytes, where="<vector>") -> Vector:
    """One vector from the bytes of its file (checked against the schema's shape)."""
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise VectorFileError(f"{where}: not UTF-8 ({exc})") from None
    except RecursionError:
        raise VectorFileError(f"{where}: nested too deeply to be a vector") from None
    except json.JSONDecodeError as exc:
        body = raw.strip()
        truncated = body.startswith(b"{") and not body.endswith(b"}")  # a cut-off object
        what = "truncated JSON" if truncated else "not JSON"
        raise VectorFileError(f"{where}: {what} ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise VectorFileError(f"{where}: not JSON ({_short(exc)})") from None
    try:
        return _build(doc, where)
    except VectorFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, IndexError, RecursionError) as exc:
        raise VectorFileError(f"{where}: off-schema ({type(exc).__name__}: {_short(exc)})") from None


def _short(exc, limit: int = 200) -> str:
    text = "".join(c if c.isprintable() else "?" for c in str(exc))
    return text if len(text) <= limit else text[:limit] + "..."


def _input(obj, where, version, dtype, shape):
    """An input tensor (param0, a state0 buffer, a gradient): stored, or a Generated (format 2)."""
    if tensor_form(obj, version, where) == "counter":
        spec = obj["counter"]
        if set(spec) != {"seed", "stream", "exponent", "centred"}:
            raise ValueError(f"{where}.counter: expected keys seed, stream, exponent, centred")
        if obj["dtype"] not in counter.PRECISION:
            raise ValueError(f"{where}: a generated tensor must be float16, bfloat16, float32 or float64")
        for key in ("stream", "exponent"):
            if not isinstance(spec[key], int) or isinstance(spec[key], bool) or (key == "stream" and spec[key] < 0):
                raise ValueError(f"{where}.counter.{key} must be an integer" + (" >= 0" if key == "stream" else ""))
        if not isinstance(spec["centred"], bool):
            raise ValueError(f"{where}.counter.centred must be true or false")
        if not isinstance(obj["shape"], list) or math.prod(obj["shape"]) > MAX_GENERATED:
            raise ValueError(f"{where}: a generated tensor has at most {MAX_GENERATED} elements")
        x = Generated(counter.parse_seed(spec["seed"]), spec["stream"], spec["exponent"], spec["centred"],
                      obj["dtype"], tuple(obj["shape"]))
    else:
        x = decode(obj, where, version)
    if tuple(x.shape) != shape or obj["dtype"] != dtype:
        raise ValueError(f"{where} is {obj['dtype']}{list(x.shape)}, expected {dtype}{list(shape)}")
    return x


def _expected(obj, where, version, shape):
    """A golden or budget array: stored float64, shaped like the judged elements."""
    x = decode(obj, where, version)
    if obj["dtype"] != "float64" or x.shape != shape:
        raise ValueError(f"{where} is {obj['dtype']}{list(x.shape)}, expected float64{list(shape)}")
    return x


def _step_count(obj, where):
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be an object")
    step = obj["step"]
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 2**62:
        raise ValueError(f"{where}.step must be an integer in [0, 2**62)")
    return step


def _judged(doc, version, shape):
    if version < 2 or doc["judged"] is None:
        return None
    idx = decode(doc["judged"], "judged", version)
    n = int(np.prod(shape, dtype=np.int64))
    if doc["judged"]["dtype"] != "int64" or idx.ndim != 1 or idx.size == 0:
        raise ValueError("judged must be a non-empty 1-D int64 array of flat indices")
    if np.any(idx < 0) or np.any(idx >= n) or np.any(np.diff(idx) <= 0):
        raise ValueError(f"judged must be increasing flat indices in [0, {n})")
    return idx


def _string(value, what, pattern=None) -> str:
    if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
        raise ValueError(f"{what} must be a string{' of letters, digits, ., _, -' if pattern else ''}, "
                         f"got {_short(repr(value), 60)}")
    return value


def _strings(value, what) -> tuple:
    if not isinstance(value, list) or not all(isinstance(x, str) and len(x) <= 100 for x in value):
        raise ValueError(f"{what} must be a list of short strings")
    return tuple(value)


def _tolerance(tol) -> dict:
    if not isinstance(tol, dict):
        raise ValueError("tolerance must be an object")
    for key in ("k", "floor_ulps"):
        value = tol.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"tolerance.{key} must be a finite number >= 0, got {_short(repr(value), 60)}")
    return dict(tol)


def _budget(arr, what):
    if not bool(np.all(np.isfinite(arr) & (arr >= 0))):
        raise ValueError(f"{what} must be finite and >= 0 (it has NaN, infinite or negative values)")
    return arr


def _build(doc, where) -> Vector:
    if not isinstance(doc, dict):
        raise ValueError("top level must be an object")
    version = doc.get("format_version")
    if doc.get("format") != FORMAT or version not in FORMAT_VERSIONS or isinstance(version, bool):
        raise ValueError(f"format must be {FORMAT!r} version {' or '.join(map(str, FORMAT_VERSIONS))}")
    opt = doc["optimizer"]
    if opt not in OPTIMIZERS:
        raise ValueError(f"optimizer {_short(repr(opt), 60)} is not one of {', '.join(OPTIMIZERS)}")
    names = STATE_NAMES[opt]
    _string(doc["id"], "id", ID_PATTERN)
    if doc["dtype"] not in registry.DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(registry.DTYPES)}")
    if doc["profile"] not in registry.PROFILES:
        raise ValueError(f"profile must be one of {', '.join(registry.PROFILES)}")
    if not isinstance(doc["shape"], list) or len(doc["shape"]) > MAX_NDIM or \
            not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in doc["shape"]):
        raise ValueError(f"shape must be a list of at most {MAX_NDIM} non-negative integers")
    if not isinstance(doc["hparams"], dict) or not isinstance(doc["steps"], list):
        raise ValueError("hparams must be an object and steps a list")
    dtype, shape = doc["dtype"], tuple(doc["shape"])
    judged = _judged(doc, version, shape)
    golden_shape = shape if judged is None else judged.shape
    param0 = _input(doc["param0"], "param0", version, dtype, shape)
    if sorted(doc["quirks"]) != sorted(Quirks.names()) or not all(isinstance(v, bool) for v in doc["quirks"].values()):
        raise ValueError(f"quirks must set each of {', '.join(Quirks.names())} to true or false")
    state0 = None
    if doc["state0"] is not None:
        state0 = {"step": _step_count(doc["state0"], "state0"),
                  **{k: _input(doc["state0"][k], f"state0.{k}", version, dtype, shape) for k in names}}
    steps = []
    for i, s in enumerate(doc["steps"]):
        w = f"steps[{i}]"
        if not isinstance(s["state_budget"], dict) or not set(s["state_budget"]) <= set(names):
            raise ValueError(f"{w}.state_budget must be an object with keys among {', '.join(names)}")
        state = {"step": _step_count(s["state"], f"{w}.state"),
                 **{k: _expected(s["state"][k], f"{w}.state.{k}", version, golden_shape) for k in names}}
        steps.append(Step(grad_source=_input(s["grad"], f"{w}.grad", version, dtype, shape),
                          param=_expected(s["param"], f"{w}.param", version, golden_shape),
                          budget=_budget(_expected(s["budget"], f"{w}.budget", version, golden_shape), f"{w}.budget"),
                          state=state,
                          state_budget={k: _budget(_expected(v, f"{w}.state_budget.{k}", version, golden_shape),
                                                   f"{w}.state_budget.{k}")
                                        for k, v in s["state_budget"].items()}))
    if not steps:
        raise ValueError("steps is empty")
    vector = Vector(
        id=doc["id"], name=_string(doc["name"], "name"), optimizer=opt, profile=doc["profile"],
        quirks=dict(doc["quirks"]), hparams=dict(doc["hparams"]), dtype=dtype, shape=shape,
        clauses=_strings(doc["clauses"], "clauses"), flags=_strings(doc["flags"], "flags"), param0_source=param0,
        state0_source=state0, steps=tuple(steps), tolerance=_tolerance(doc["tolerance"]),
        description=_string(doc.get("description", ""), "description"), path=str(where),
        judged=judged, format_version=version,
    )
    _check_hparams(vector)
    return vector


def _check_hparams(vector) -> None:
    """The vector's hyperparameters are ones the reference accepts (spec/errors.md)."""
    known = {h.name for h in registry.OPTIMIZERS[vector.optimizer].hparams}
    unknown = sorted(set(vector.hparams) - known)
    if unknown:
        raise ValueError(f"hparams: {_short(repr(unknown[0]), 60)} is not a hyperparameter of {vector.optimizer}")
    cl = vector.hparams.get("clip_lambda")
    if cl is not None and (not isinstance(cl, dict) or set(cl) != {"power"} or isinstance(cl["power"], bool)
                           or not isinstance(cl["power"], (int, float))):
        raise ValueError('hparams.clip_lambda must be null or {"power": number}')
    try:
        vector.make_reference()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"hparams: {_short(exc)}") from None
