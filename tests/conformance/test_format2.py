"""Format 2 (the Scale vectors): the counter generator's documented test values, exactness in
every dtype, the same values from the Node.js reader, compressed arrays, judged subsets, and a
reader that refuses a damaged or hostile format-2 file."""
from __future__ import annotations

import base64
import json
import math
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from refopt.builders import catalog, generate
from refopt.conformance import counter, default_dir, judge, load, vectors
from refopt.conformance.encoding import decode, encode_compressed, np_dtype

ROOT = default_dir()
EXAMPLES = Path(__file__).resolve().parents[2] / "conformance" / "examples"

# The test values printed in conformance/PORTING.md ("Generated inputs").
WORDS = {(0, 0): 0xE220A8397B1DCDAF, (0, 1): 0x6E789E6AA1B965F4}
VALUES = {"float64": [0.13444766273400033, -0.1332538926741864, -0.03661649634316255, 0.024115376747293027],
          "float32": [0.1344470977783203, -0.1332542896270752, -0.03661680221557617, 0.02411484718322754],
          "float16": [0.1328125, -0.13671875, -0.041015625, 0.021484375],
          "bfloat16": [0.09375, -0.15625, -0.0625, 0.0]}


@pytest.fixture(scope="module")
def scale_vectors():
    return [v for v in load() if "Scale" in v.flags]


def test_splitmix_words_and_documented_values():
    for (key, i), want in WORDS.items():
        assert int(counter.word(key, i)) == want  # SplitMix64 from state 0: the published sequence
    for dtype, want in VALUES.items():
        assert counter.values(1, 0, 4, dtype).tolist() == want
    text = (Path(__file__).resolve().parents[2] / "conformance" / "PORTING.md").read_text()
    assert "0xe220a8397b1dcdaf" in text and repr(VALUES["float32"][0]) in text


@pytest.mark.parametrize("dtype", list(counter.PRECISION))
def test_generated_values_are_exact_and_normal_ish(dtype):
    for centred, exponent in ((True, 0), (False, -6), (True, -5)):
        x = counter.values(7, 3, 20000, dtype, exponent, centred)
        assert np.array_equal(x.astype(np_dtype(dtype)).astype(np.float64), x)  # exact in the dtype
        span = 2.0 ** (exponent + 1)
        if centred:
            assert -span <= x.min() and x.max() < span and abs(x.mean()) < 0.05 * span
            assert abs(x.std() / 2.0**exponent - math.sqrt(1 / 3)) < 0.02
        else:
            assert 0 <= x.min() and x.max() < 2 * span
    # any slice is the same elements: element j depends on (seed, stream, j) only
    assert np.array_equal(counter.values(7, 3, 5, dtype, start=100), counter.values(7, 3, 105, dtype)[100:])


def test_scale_vectors_cover_every_dtype_reduction_and_awkward_shape(scale_vectors):
    assert {(v.optimizer, v.dtype) for v in scale_vectors} == {(o, d) for o in ("saveus", "dope")
                                                                for d in catalog.DTYPES}
    for v in scale_vectors:
        n = math.prod(v.shape)
        assert v.format_version == 2 and n >= 2**17 and n % 4 and n % 8 and n % 32
        assert isinstance(v.param0_source, vectors.Generated) and v.state0["step"] == catalog.SCALE_START
        assert np.array_equal(v.judged, generate.judged_indices(v.shape))
        assert v.steps[0].param.shape == v.judged.shape
    shapes = {v.shape for v in scale_vectors}
    assert {(catalog.PRIME,), (2, 65537), (catalog.PRIME, 1)} == shapes
    dope = {c for v in scale_vectors if v.optimizer == "dope" for c in v.clauses}
    assert {"A1", "A2", "D3", "D12"} <= dope  # mean, std, norm, count at scale


def test_judged_elements_cover_tails_rows_and_a_stride():
    idx = generate.judged_indices((2, 65537))
    n = 2 * 65537
    assert {0, 63, n - 64, n - 1, 65536, 65537, 65537 + 63} <= set(idx.tolist())  # both ends of both rows
    assert set(range(0, n, 64)) <= set(idx.tolist()) and len(idx) < n // 50


def test_judge_compares_the_listed_elements_and_names_the_full_index(scale_vectors):
    v = next(v for v in scale_vectors if v.dtype == "float64" and len(v.shape) == 2)
    opt = v.make_reference()
    st = opt.State(**{k: np.asarray(x) for k, x in v.state0.items()})
    p, _ = opt.step(np.asarray(v.param0), np.asarray(v.steps[0].grad), st)
    assert judge(v, 0, p).passed
    bad = p.copy()
    bad[1, 65536] += 1e-3  # the last element of the second row: judged (a row tail)
    j = judge(v, 0, bad)
    assert not j.passed and j.first_bad == (1, 65536) and j.actual == bad[1, 65536]
    bad = p.copy()
    bad[0, 1000] += 1.0  # not in the judged subset
    assert judge(v, 0, bad).passed


def test_node_reader_decodes_counter_zlib_and_judged(scale_vectors):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH")
    for v in [v for v in scale_vectors if v.optimizer == "dope" and len(v.shape) == 1]:  # one per dtype
        res = subprocess.run([node, str(EXAMPLES / "read_vector.js"), v.path, "6"], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        assert got["format_version"] == 2 and got["checksum"] == "ok"
        assert got["first_grad"] == v.steps[0].grad.astype(np.float64)[:6].tolist()
        assert got["first_judged"] == v.judged[:6].tolist()
        assert got["first_expected"] == v.steps[0].param[:6].tolist()


def test_compressed_arrays_round_trip_and_refuse_a_bomb():
    x = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
    t = encode_compressed(x)
    assert set(t) == {"dtype", "shape", "zlib_b64"} and np.array_equal(decode(t, version=2), x)
    with pytest.raises(ValueError, match="keys dtype, shape and one of b64"):
        decode(t, version=1)  # format 1 stores plain base64 only
    bomb = dict(t, zlib_b64=base64.b64encode(zlib.compress(bytes(1 << 24))).decode())
    with pytest.raises(ValueError, match="bytes for shape"):  # inflated no further than the shape needs
        decode(bomb, version=2)


def _first_scale_file():
    return min(p for p in (ROOT / "vectors").glob("*.json") if b'"format_version": 2' in p.read_bytes()[:200])


@pytest.mark.parametrize("damage,message", [
    (lambda d: d["param0"]["counter"].update(seed="xyz"), "seed must be 16 lowercase hex digits"),
    (lambda d: d["param0"]["counter"].update(stream=-1), "stream must be an integer >= 0"),
    (lambda d: d["param0"].update(shape=[1 << 20, 1 << 20]), "at most"),
    (lambda d: d.update(judged=None), "expected float64"),  # goldens of a subset, but all judged
    (lambda d: d["judged"].update(encode_compressed(np.array([5, 3], dtype=np.int64), "int64")), "judged"),
    (lambda d: d.update(format_version=3), "version 1 or 2"),
])
def test_reader_refuses_damaged_format2(damage, message):
    doc = json.loads(_first_scale_file().read_bytes())
    damage(doc)
    with pytest.raises(vectors.VectorFileError, match=message):
        vectors.parse(json.dumps(doc).encode(), "damaged")
