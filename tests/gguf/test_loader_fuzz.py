"""The loader cannot be crashed, hung or made to allocate without bound by a file.

A mixed-width PMQ file of the micro model (2 layers, ODP thresholds, mcmoe.* metadata) is mutated
FUZZ_N times (default 1000; MCMOE_FUZZ_N overrides): bit flips in the header and in tensor data, tensor
type ids in and out of range, shapes, dimension counts, data offsets, truncation inside every region,
mcmoe.* values (NaN, infinite, negative, huge), array and string lengths, counts and value types. Each
copy goes through `mcmoe_gguf.load` and a 3-token evaluation in a worker process with a capped address
space (tests/support/fuzz_worker.py); each must end in success or a ValueError that says what is wrong, within
CASE_SECONDS. A worker that dies (signal), hangs or runs out of memory is a failure, reported with the
seed and the mutation, and `MCMOE_FUZZ_SEED=<seed>` replays the run. The seed is printed either way.
"""
from __future__ import annotations

import json
import math
import os
import select
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


FUZZ_N = int(os.environ.get("MCMOE_FUZZ_N", "1000"))
CASE_SECONDS = 10.0          # per file; a clean answer takes well under a second
MEMORY_MIB = 4096            # the worker's address-space cap (the micro model needs ~1 GiB of it)
SUPPORT = Path(__file__).resolve().parents[1] / "support"   # fuzz_worker.py
REPO = SUPPORT.parents[1]
GENERIC = "Failed to load model from file"

# ---------------------------------------------------------------- where things are in a GGUF

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass
class Kv:
    key: str
    vtype: int
    type_pos: int            # the u32 value type
    value_pos: int           # the value (for arrays: the element type)
    n_pos: int = -1          # arrays: the u64 length; strings: the u64 length
    etype: int = -1
    n: int = 0


@dataclass
class TensorInfo:
    name: str
    ndims_pos: int
    dims_pos: int
    type_pos: int
    offset_pos: int


def layout(data: bytes) -> tuple[list[Kv], list[TensorInfo], int, int]:
    """(key-value pairs, tensor infos, end of the tensor infos, start of the data section) of a valid file."""
    pos = 24
    u32 = lambda p: struct.unpack_from("<I", data, p)[0]       # noqa: E731
    u64 = lambda p: struct.unpack_from("<Q", data, p)[0]       # noqa: E731
    n_tensors, n_kv = u64(8), u64(16)
    kvs = []
    for _ in range(n_kv):
        klen = u64(pos)
        key = data[pos + 8:pos + 8 + klen].decode()
        pos += 8 + klen
        vt = u32(pos)
        kv = Kv(key, vt, pos, pos + 4)
        pos += 4
        if vt == 8:
            kv.n_pos, kv.n = pos, u64(pos)
            pos += 8 + kv.n
        elif vt == 9:
            kv.etype, kv.n_pos, kv.n = u32(pos), pos + 4, u64(pos + 4)
            pos += 12
            if kv.etype == 8:
                for _ in range(kv.n):
                    pos += 8 + u64(pos)
            else:
                pos += kv.n * _SIZES[kv.etype]
        else:
            pos += _SIZES[vt]
        kvs.append(kv)
    tensors = []
    for _ in range(n_tensors):
        nlen = u64(pos)
        name = data[pos + 8:pos + 8 + nlen].decode()
        pos += 8 + nlen
        nd = u32(pos)
        tensors.append(TensorInfo(name, pos, pos + 4, pos + 4 + 8 * nd, pos + 8 + 8 * nd))
        pos += 4 + 8 * nd + 4 + 8
    return kvs, tensors, pos, -(-pos // 32) * 32


# ---------------------------------------------------------------- mutations

HUGE = [2**40, 2**62, 2**63, 2**64 - 1, 2**32, 2**32 - 1]
BAD_FLOATS = [math.nan, math.inf, -math.inf, -1.0, 1e9, -0.0, 1.5, 3.4e38]


class Mutator:
    def __init__(self, data: bytes, rng: np.random.Generator):
        self.src, self.rng = data, rng
        self.kvs, self.tensors, self.info_end, self.data_start = layout(data)

    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def put(self, buf: bytearray, pos: int, fmt: str, value) -> None:
        struct.pack_into("<" + fmt, buf, pos, value)

    # each returns a description; buf is modified in place (or replaced via truncation)
    def flip_header(self, buf):
        ks = [int(self.rng.integers(0, self.data_start * 8)) for _ in range(int(self.rng.integers(1, 5)))]
        for k in ks:
            buf[k >> 3] ^= 1 << (k & 7)
        return f"flip header bits {ks}"

    def flip_data(self, buf):
        ks = [int(self.rng.integers(self.data_start * 8, len(buf) * 8)) for _ in range(int(self.rng.integers(1, 64)))]
        for k in ks:
            buf[k >> 3] ^= 1 << (k & 7)
        return f"flip {len(ks)} data bits"

    def tensor_type(self, buf):
        t = self.pick(self.tensors)
        v = self.pick([int(self.rng.integers(0, 110)), int(self.rng.integers(43, 100)), 100, 101, 102, 103, 104,
                       2**31, 2**32 - 1, 0, 1, 8, 42])
        self.put(buf, t.type_pos, "I", v)
        return f"{t.name}: type id {v}"

    def tensor_shape(self, buf):
        t = self.pick(self.tensors)
        nd = struct.unpack_from("<I", self.src, t.ndims_pos)[0]
        i = int(self.rng.integers(nd))
        old = struct.unpack_from("<Q", self.src, t.dims_pos + 8 * i)[0]
        v = self.pick([0, 1, 2, 255, old * 2, old // 2, old + 256, int(self.rng.integers(1, 1 << 20))] + HUGE)
        self.put(buf, t.dims_pos + 8 * i, "Q", v)
        return f"{t.name}: dim {i} {old} -> {v}"

    def tensor_ndims(self, buf):
        t = self.pick(self.tensors)
        v = self.pick([0, 3, 4, 5, 255, 2**32 - 1])
        self.put(buf, t.ndims_pos, "I", v)
        return f"{t.name}: n_dims {v}"

    def tensor_offset(self, buf):
        t = self.pick(self.tensors)
        old = struct.unpack_from("<Q", self.src, t.offset_pos)[0]
        v = self.pick([old + 1, old + 32, old - 32 if old >= 32 else 1, len(self.src), int(self.rng.integers(0, len(self.src))),
                       len(self.src) - self.data_start] + HUGE)
        self.put(buf, t.offset_pos, "Q", v)
        return f"{t.name}: offset {old} -> {v}"

    def truncate(self, buf):
        region = self.pick([(0, 24), (24, self.kvs[-1].value_pos), (self.kvs[-1].value_pos, self.info_end),
                            (self.info_end, self.data_start + 1), (self.data_start, len(self.src))])
        cut = int(self.rng.integers(region[0], max(region[0] + 1, region[1])))
        del buf[cut:]
        return f"truncated at {cut} of {len(self.src)} (region {region})"

    def mcmoe_value(self, buf):
        kv = self.pick([k for k in self.kvs if k.key.startswith("mcmoe.")])
        if kv.vtype == 9 and kv.etype == 6:            # f32 array: mcmoe.odp.mu
            i = int(self.rng.integers(kv.n))
            v = self.pick(BAD_FLOATS)
            self.put(buf, kv.n_pos + 8 + 4 * i, "f", v)
            return f"{kv.key}[{i}] = {v}"
        if kv.vtype == 9 and kv.etype in _SIZES:       # integer array: mcmoe.expert_bits
            i = int(self.rng.integers(kv.n))
            size = _SIZES[kv.etype]
            v = self.pick([0, 4, 5, 7, 255, -1, 2**31 - 1])
            buf[kv.n_pos + 8 + size * i:kv.n_pos + 8 + size * (i + 1)] = (v % 2 ** (8 * size)).to_bytes(size, "little")
            return f"{kv.key}[{i}] = {v}"
        if kv.vtype == 6:
            v = self.pick(BAD_FLOATS)
            self.put(buf, kv.value_pos, "f", v)
            return f"{kv.key} = {v}"
        if kv.vtype == 7:
            buf[kv.value_pos] = self.pick([2, 255])
            return f"{kv.key} = bool byte {buf[kv.value_pos]}"
        if kv.vtype == 8:
            return self.string_len(buf, kv)
        v = self.pick([0, 2**32 - 1, 7])
        buf[kv.value_pos:kv.value_pos + _SIZES[kv.vtype]] = (v % 2 ** (8 * _SIZES[kv.vtype])).to_bytes(_SIZES[kv.vtype], "little")
        return f"{kv.key} = {v}"

    def array_len(self, buf):
        arrays = [k for k in self.kvs if k.vtype == 9]
        kv = self.pick([k for k in arrays if k.key == "mcmoe.odp.mu"] * 3 + arrays)
        v = self.pick([kv.n + 1, max(kv.n - 1, 0), 0, kv.n * 2] + HUGE)
        self.put(buf, kv.n_pos, "Q", v)
        return f"{kv.key}: array length {kv.n} -> {v}"

    def string_len(self, buf, kv: Kv | None = None):
        kv = kv or self.pick([k for k in self.kvs if k.vtype == 8])
        v = self.pick([kv.n + 1, 0, len(self.src)] + HUGE)
        self.put(buf, kv.n_pos, "Q", v)
        return f"{kv.key}: string length {kv.n} -> {v}"

    def counts(self, buf):
        which, pos = self.pick([("n_tensors", 8), ("n_kv", 16)])
        old = struct.unpack_from("<Q", self.src, pos)[0]
        v = self.pick([old + 1, old - 1, 0] + HUGE)
        self.put(buf, pos, "Q", v)
        return f"{which} {old} -> {v}"

    def value_type(self, buf):
        kv = self.pick(self.kvs)
        v = self.pick([int(self.rng.integers(0, 16)), 13, 2**32 - 1, 9, 8])
        self.put(buf, kv.type_pos, "I", v)
        return f"{kv.key}: value type {kv.vtype} -> {v}"

    KINDS = ("flip_header", "flip_data", "tensor_type", "tensor_shape", "tensor_ndims", "tensor_offset", "truncate",
             "mcmoe_value", "array_len", "string_len", "counts", "value_type")

    def mutate(self, kind: str) -> tuple[bytes, str]:
        buf = bytearray(self.src)
        what = getattr(self, kind)(buf)
        return bytes(buf), f"{kind}: {what}"


# ---------------------------------------------------------------- the worker

class Worker:
    def __init__(self):
        self.p = None

    def start(self):
        self.p = subprocess.Popen([sys.executable, str(SUPPORT / "fuzz_worker.py"), str(MEMORY_MIB)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, cwd=REPO)
        ans = self._answer(120.0)
        assert ans == {"ready": True}, f"fuzz worker did not start: {ans}"

    def _answer(self, timeout: float):
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            return None
        line = self.p.stdout.readline()
        return json.loads(line) if line else None

    def load(self, path: Path) -> tuple[dict, float]:
        """(answer, seconds); answer is {"died": signal} or {"hang": True} when there was none."""
        if self.p is None or self.p.poll() is not None:
            self.start()
        t0 = time.perf_counter()
        self.p.stdin.write(f"{path}\n")
        self.p.stdin.flush()
        ans = self._answer(CASE_SECONDS)
        dt = time.perf_counter() - t0
        if ans is None:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
                ans = {"hang": True}
            else:
                ans = {"died": -self.p.returncode}
            self.p = None
        return ans, dt

    def close(self):
        if self.p is not None:
            self.p.stdin.close()
            self.p.wait(timeout=30)


def verdict(ans: dict) -> str | None:
    """None if the answer is acceptable, else why not."""
    if ans.get("ok"):
        return None
    if "died" in ans:
        return f"worker killed by signal {ans['died']}"
    if "hang" in ans:
        return f"no answer within {CASE_SECONDS} s (hang)"
    if ans["type"] not in ("ValueError",):
        return f"{ans['type']}: {ans['error'][:300]}"
    if ans["error"].rstrip().endswith(GENERIC) or GENERIC + ":" in ans["error"] and "refused" not in ans["error"]:
        return f"generic error without llama.cpp's reason: {ans['error'][:300]}"
    return None


def run_cases(src: Path, tmp: Path, cases: list[tuple[str, bytes]]) -> tuple[list[str], list[float], dict]:
    worker = Worker()
    failures, times, outcomes = [], [], {"ok": 0, "refused": 0}
    try:
        for i, (what, data) in enumerate(cases):
            f = tmp / f"case-{i % 4}.gguf"
            f.write_bytes(data)
            ans, dt = worker.load(f)
            times.append(dt)
            why = verdict(ans)
            outcomes["ok" if ans.get("ok") else "refused"] += why is None
            if why:
                failures.append(f"case {i} ({what}): {why}")
    finally:
        worker.close()
    return failures, times, outcomes


def test_known_hang_is_refused_quickly(pmq_file, tmp_path):
    """The case that hung gguf-py's reader: mcmoe.odp.mu claiming 2^40 entries."""
    data = pmq_file.read_bytes()
    kvs, *_ = layout(data)
    mu = next(k for k in kvs if k.key == "mcmoe.odp.mu")
    buf = bytearray(data)
    struct.pack_into("<Q", buf, mu.n_pos, 2**40)
    failures, times, outcomes = run_cases(pmq_file, tmp_path, [("mu length 2^40", bytes(buf)), ("control", data)])
    assert not failures, failures
    assert outcomes == {"ok": 1, "refused": 1}


def test_inspect_refuses_the_hostile_file_quickly(pmq_file, tmp_path):
    """`mcmoe-gguf inspect` reads files with gguf-py, which hung on the same array: the bounded check
    (mcmoe_gguf/gguf/check.py) refuses it first, naming the key."""
    from helpers import cli
    kvs, *_ = layout(pmq_file.read_bytes())
    buf = bytearray(pmq_file.read_bytes())
    struct.pack_into("<Q", buf, next(k for k in kvs if k.key == "mcmoe.odp.mu").n_pos, 2**40)
    f = tmp_path / "hostile.gguf"
    f.write_bytes(bytes(buf))
    r = cli("inspect", f, timeout=60)
    assert r.returncode == 1 and "array mcmoe.odp.mu of 1,099,511,627,776 elements" in r.stderr, r.stderr
    assert cli("inspect", pmq_file, timeout=120).returncode == 0


def test_python_reader_is_guarded(pmq_file, tmp_path):
    """check_gguf on mutated files: a ValueError naming the defect, or a pass after which gguf-py's reader
    reads the file, so every Python reader of ours (read_gguf) stays bounded. On the intact file it
    returns the same mcmoe.* metadata as gguf-py."""
    import gguf

    from mcmoe_gguf.gguf.check import check_gguf
    from mcmoe_gguf.gguf.types import register
    register()
    clean = check_gguf(pmq_file)
    rd = gguf.GGUFReader(pmq_file)
    want = {f.name: f.contents() for f in rd.fields.values() if f.name.startswith("mcmoe.")}
    assert {k: v for k, v in clean.items() if k.startswith("mcmoe.")}.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, str):
            assert clean[k] == v, k
        else:
            np.testing.assert_allclose(np.asarray(clean[k], dtype=float), np.asarray(v, dtype=float), err_msg=k)
    seed = int(os.environ.get("MCMOE_FUZZ_SEED", "7"))
    m = Mutator(pmq_file.read_bytes(), np.random.default_rng(seed))
    f = tmp_path / "m.gguf"
    passed = refused = 0
    for i in range(600):
        data, what = m.mutate(Mutator.KINDS[i % len(Mutator.KINDS)])
        f.write_bytes(data)
        try:
            check_gguf(f)
        except ValueError as e:
            assert "not a valid GGUF file" in str(e) or "tensor" in str(e), (what, e)
            refused += 1
            continue
        try:
            gguf.GGUFReader(f)      # passed the check: the reader must manage (or fail with its own error)
        except (ValueError, KeyError, IndexError):
            pass                    # a semantic problem the structure check does not judge (e.g. tensor names)
        passed += 1
    print(f"\ncheck_gguf on 600 mutated files (seed {seed}): {refused} refused, {passed} passed to gguf-py")
    assert refused > 100 and passed > 100


def _set(data: bytes, key: str, fmt: str, value, index: int = 0) -> bytes:
    kv = next(k for k in layout(data)[0] if k.key == key)
    buf = bytearray(data)
    struct.pack_into("<" + fmt, buf, kv.n_pos + 8 + 4 * index if kv.vtype == 9 else kv.value_pos, value)
    return bytes(buf)


@pytest.mark.parametrize("key,fmt,value,message", [
    ("mcmoe.odp.mu", "f", math.nan, "mcmoe.odp.mu[0] = nan"),
    ("mcmoe.odp.mu", "f", math.inf, "mcmoe.odp.mu[0] = inf"),
    ("mcmoe.odp.mu", "f", -0.25, "mcmoe.odp.mu[0] = -0.25"),
    ("mcmoe.odp.mu", "f", 7.0, "mcmoe.odp.mu[0] = 7"),
    ("mcmoe.odp.mu_scale", "f", 1e9, "mcmoe.odp.mu_scale (file) must be a finite number >= 0 and <= 16"),
    ("mcmoe.odp.mu_scale", "f", math.nan, "mcmoe.odp.mu_scale (file)"),
])
def test_bad_odp_values_in_the_file_are_named(pmq_file, tmp_path, key, fmt, value, message):
    """The calibrated values the engine trusts are checked when ODP is on (mcmoe_gguf.load's default)."""
    f = tmp_path / "bad.gguf"
    f.write_bytes(_set(pmq_file.read_bytes(), key, fmt, value))
    w = Worker()
    try:
        ans, _ = w.load(f)
    finally:
        w.close()
    assert ans.get("type") == "ValueError" and message in ans["error"], ans


def _answer_beside_control(pmq_file, tmp_path, bad: bytes) -> dict:
    """The worker's answer for a damaged copy of pmq_file, after checking that the intact file loads and runs
    (so the refusal is the damage's doing)."""
    failures, _, outcomes = run_cases(pmq_file, tmp_path, [("control", pmq_file.read_bytes())])
    assert not failures and outcomes["ok"] == 1
    f = tmp_path / "bad.gguf"
    f.write_bytes(bad)
    w = Worker()
    try:
        return w.load(f)[0]
    finally:
        w.close()


@pytest.mark.parametrize("value,shown", [(-1e-5, "-1e-05"), (math.nan, "nan"), (-math.inf, "-inf")])
def test_bad_norm_epsilon_is_refused_at_load(pmq_file, tmp_path, value, shown):
    """ggml's rms_norm asserts eps >= 0 when the graph first runs, on a compute thread that no guard covers:
    a flipped sign bit in this key aborted the fuzz worker (seed 23132, case 180). The loader refuses it."""
    key = "llama.attention.layer_norm_rms_epsilon"
    ans = _answer_beside_control(pmq_file, tmp_path, _set(pmq_file.read_bytes(), key, "f", value))
    assert ans.get("type") == "ValueError" and f"{key} must be a finite number >= 0 (got {shown})" in ans["error"], ans


@pytest.mark.parametrize("name,int_type,shown", [("blk.1.attn_norm.weight", 26, "i32"), ("output_norm.weight", 26, "i32"),
                                                   ("token_embd.weight", 25, "i16")])
def test_integer_weight_types_are_refused_at_load(pmq_file, tmp_path, name, int_type, shown):
    """An F32 norm's type id turned into I32 (or an F16 matrix's into I16) keeps the tensor's byte size, so
    llama.cpp's size checks pass and ggml's CPU ops aborted at the first evaluation (seed 104, case 254).
    The loader refuses integer weights by name. The same files with the tensor's own type id load."""
    data = pmq_file.read_bytes()
    t = next(t for t in layout(data)[1] if t.name == name)
    own = struct.unpack_from("<I", data, t.type_pos)[0]
    assert (own, int_type) in ((0, 26), (1, 25)), "the case needs an integer type of the tensor's own element size"
    buf = bytearray(data)
    struct.pack_into("<I", buf, t.type_pos, int_type)
    ans = _answer_beside_control(pmq_file, tmp_path, bytes(buf))
    assert ans.get("type") == "ValueError" and f"tensor '{name}' has type {shown}" in ans["error"], ans


def test_fuzzed_files_load_or_fail_cleanly(pmq_file, tmp_path):
    seed = int(os.environ.get("MCMOE_FUZZ_SEED", str(int(time.time()) % 100_000)))
    print(f"\nloader fuzz: seed {seed}, {FUZZ_N} files (replay: MCMOE_FUZZ_SEED={seed} MCMOE_FUZZ_N={FUZZ_N})")
    rng = np.random.default_rng(seed)
    m = Mutator(pmq_file.read_bytes(), rng)
    cases = [m.mutate(Mutator.KINDS[i % len(Mutator.KINDS)])[::-1] for i in range(FUZZ_N)]
    failures, times, outcomes = run_cases(pmq_file, tmp_path, cases)
    print(f"loader fuzz: {outcomes['ok']} loaded and ran, {outcomes['refused']} refused cleanly, "
          f"{len(failures)} failures; slowest answer {max(times):.2f} s, median {np.median(times):.3f} s")
    assert not failures, f"seed {seed}: {len(failures)} of {FUZZ_N} files failed:\n" + "\n".join(failures[:40])
