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
import pathlib
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


def read_checksums(root: pathlib.Path) -> dict:
    path = root / CHECKSUMS
    if not path.is_file():
        raise VectorFileError(f"{path}: checksum file missing")
    sums = {}
    for n, line in enumerate(path.read_text(encoding="ascii").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise VectorFileError(f"{path}:{n}: malformed line (expected '<sha256>  <file>')")
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
        raw = f.read_bytes()
        if hashlib.sha256(raw).hexdigest() != sums[f"{VECTORS_SUBDIR}/{f.name}"]:
            raise VectorFileError(f"{f}: checksum mismatch (edited or damaged; regenerate with "
                                  f"`refopt vectors generate`)")
        vec = parse(raw, f)
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
    except json.JSONDecodeError as exc:
        body = raw.strip()
        truncated = body.startswith(b"{") and not body.endswith(b"}")  # a cut-off object
        what = "truncated JSON" if truncated else "not JSON"
        raise VectorFileError(f"{where}: {what} ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    try:
        return _build(doc, where)
    except VectorFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise VectorFileError(f"{where}: off-schema ({type(exc).__name__}: {exc})") from None


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
    step = obj["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{where}.step must be a non-negative integer")
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


def _build(doc, where) -> Vector:
    if not isinstance(doc, dict):
        raise ValueError("top level must be an object")
    version = doc.get("format_version")
    if doc.get("format") != FORMAT or version not in FORMAT_VERSIONS or isinstance(version, bool):
        raise ValueError(f"format must be {FORMAT!r} version {' or '.join(map(str, FORMAT_VERSIONS))}")
    opt = doc["optimizer"]
    if opt not in OPTIMIZERS:
        raise ValueError(f"optimizer {opt!r} is not one of {', '.join(OPTIMIZERS)}")
    names = STATE_NAMES[opt]
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
        state = {"step": _step_count(s["state"], f"{w}.state"),
                 **{k: _expected(s["state"][k], f"{w}.state.{k}", version, golden_shape) for k in names}}
        steps.append(Step(grad_source=_input(s["grad"], f"{w}.grad", version, dtype, shape),
                          param=_expected(s["param"], f"{w}.param", version, golden_shape),
                          budget=_expected(s["budget"], f"{w}.budget", version, golden_shape), state=state,
                          state_budget={k: _expected(v, f"{w}.state_budget.{k}", version, golden_shape)
                                        for k, v in s["state_budget"].items()}))
    if not steps:
        raise ValueError("steps is empty")
    return Vector(
        id=doc["id"], name=doc["name"], optimizer=opt, profile=doc["profile"], quirks=dict(doc["quirks"]),
        hparams=dict(doc["hparams"]), dtype=dtype, shape=shape, clauses=tuple(doc["clauses"]),
        flags=tuple(doc["flags"]), param0_source=param0, state0_source=state0, steps=tuple(steps),
        tolerance=dict(doc["tolerance"]), description=doc.get("description", ""), path=str(where),
        judged=judged, format_version=version,
    )
