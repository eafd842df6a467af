"""The tuning cache: keys and buckets, round trip, corrupt and unwritable caches, stacks,
shipped defaults, and the per-key lock."""
import json

import pytest

import ssmc.ops
from ssmc.autotune import cache as cache_mod
from ssmc.autotune.cache import (TuneCache, TuneKey, all_caches, export_defaults, read_defaults,
                                 shape_bucket)
from ssmc.autotune.space import Config

ENV = {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "cuda": "12.8", "driver": "570.1",
       "triton": "3.9.0", "tvm": "0.27", "torch": "2.13", "ssmc": "0.1.0"}
SIZES = dict(b=8, t=4096, h=80, p=64, n=128, g=1)


def key(**kw):
    args = dict(backend="auto", lowering="auto", dtype="bfloat16", sizes=SIZES)
    args.update(kw)
    return TuneKey.make(ssmc.ops.mamba2.program, **args)


def record(label="chunked", ms=1.0, **tile):
    return {"config": Config.make(label, tile).to_json(), "label": label, "median_ms": ms,
            "default_ms": 2 * ms, "speedup": 2.0, "shape": SIZES, "results": []}


def test_shape_bucket():
    assert shape_bucket(dict(b=3, t=100, h=6, g=2, n=16, p=64)) == \
        {"bt": 512, "t": 128, "h": 6, "g": 2, "n": 16, "p": 64}
    assert shape_bucket(dict(b=1, t=1)) == {"bt": 1, "t": 1, "h": 1, "g": 1, "n": 1, "p": 1}


def test_key_text_is_readable_and_distinguishes():
    text = key().text()
    assert text.startswith("ssd_auto_bf16_bt32768_t4096_h80_g1_n128_p64_")
    assert key().text() == text
    # same bucket: t=3000 rounds up to 4096 and b*t = 24000 to 32768
    assert key(sizes=dict(SIZES, t=3000)).text() == text
    others = [key(sizes=dict(SIZES, t=8192)), key(sizes=dict(SIZES, n=64)), key(dtype="float16"),
              key(lowering="chunked"), key(backend="triton"), key(return_final_state=True),
              key(varlen=True), key(has_initial_state=True)]
    texts = {k.text() for k in others}
    assert len(texts) == len(others) and text not in texts
    from ..helpers import make_definition
    other_def = TuneKey.make(make_definition("none").program, backend="auto", lowering="auto",
                             dtype="bfloat16", sizes=SIZES)
    assert other_def.definition != key().definition


def test_round_trip(tmp_path):
    c = TuneCache(ENV, tmp_path)
    assert c.load(key()) is None
    assert c.store(key(), record(BT=32))
    fresh = TuneCache(ENV, tmp_path)  # another process: nothing in memory
    got = fresh.load(key())
    assert got["config"] == {"lowering": "chunked", "tile": {"BT": 32}}
    assert got["key"] == key().text() and got["format"] == cache_mod.FORMAT
    assert json.loads(read_text(c.dir / "stack.json")) == ENV
    # the entry is the kernel cache's format: a hash line, then JSON
    assert c.path(key()).read_text().startswith("# ssmc-cache sha256=")


def read_text(path):
    return path.read_text().partition("\n")[2]


def test_stacks_and_devices_are_separate(tmp_path):
    a = TuneCache(ENV, tmp_path)
    b = TuneCache(dict(ENV, driver="575.0"), tmp_path)
    h200 = TuneCache(dict(ENV, gpu="NVIDIA H200"), tmp_path)
    assert a.dir.parent == b.dir.parent and a.dir != b.dir
    assert h200.dir.parent != a.dir.parent
    assert a.dir.parent.name == "nvidia-h100-80gb-hbm3-sm90"
    a.store(key(), record())
    assert b.load(key()) is None and h200.load(key()) is None


@pytest.mark.parametrize("garbage", [b"", b"not json at all", b"\xff\xfe\x00binary",
                                     "# ssmc-cache sha256=deadbeef\n{}".encode()])
def test_corrupt_entry_is_reported_once_and_rebuilt(tmp_path, capsys, garbage):
    c = TuneCache(ENV, tmp_path)
    c.store(key(), record())
    c.path(key()).write_bytes(garbage)
    fresh = TuneCache(ENV, tmp_path)
    assert fresh.load(key()) is None
    assert fresh.load(key()) is None
    err = capsys.readouterr().err
    assert err.count("corrupt cache entry") == 1
    calls = []
    rec, how = fresh.get_or_tune(key(), lambda: calls.append(1) or record(ms=0.5))
    assert how == "tuned" and calls == [1]
    assert TuneCache(ENV, tmp_path).load(key())["median_ms"] == 0.5


def test_valid_hash_but_bad_record_is_corrupt(tmp_path, capsys):
    from ssmc.backends.cache import write_checked
    c = TuneCache(ENV, tmp_path)
    write_checked(c.path(key()), json.dumps({"format": 1, "config": {"lowering": 7}}))
    assert c.load(key()) is None
    assert "corrupt" in capsys.readouterr().err


def test_unwritable_cache_keeps_results_in_memory(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    c = TuneCache(ENV, blocker)
    rec, how = c.get_or_tune(key(), lambda: record(ms=3.0))
    assert how == "tuned" and rec["median_ms"] == 3.0
    assert c.load(key())["median_ms"] == 3.0         # from memory
    c.store(key(sizes=dict(SIZES, n=64)), record())  # second failure: not reported again
    err = capsys.readouterr().err
    assert err.count("cannot write the tuning cache") == 1


def test_get_or_tune_hit_and_failed(tmp_path):
    c = TuneCache(ENV, tmp_path)
    assert c.get_or_tune(key(), lambda: None) == (None, "failed")
    assert not c.path(key()).exists()
    c.get_or_tune(key(), lambda: record())
    rec, how = TuneCache(ENV, tmp_path).get_or_tune(key(), lambda: pytest.fail("re-tuned"))
    assert how == "hit" and rec["label"] == "chunked"


def test_lock_timeout_tunes_anyway(tmp_path, capsys):
    import fcntl
    c = TuneCache(ENV, tmp_path)
    lock = c.path(key()).with_name(c.path(key()).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        rec, how = c.get_or_tune(key(), lambda: record(ms=4.0), lock_timeout_s=0.2)
    assert how == "tuned" and rec["median_ms"] == 4.0
    assert "gave up waiting" in capsys.readouterr().err


def test_listing_and_export_defaults(tmp_path):
    c = TuneCache(ENV, tmp_path)
    c.store(key(), record(BT=32))
    c.store(key(dtype="float16"), record("scan"))
    (c.dir / "broken.json").write_text("garbage")
    listed = all_caches(tmp_path)
    assert len(listed) == 1
    directory, env, entries = listed[0]
    assert env == ENV and directory == c.dir
    assert sum(r is None for _, r in entries) == 1 and len(entries) == 3
    out = tmp_path / "h100.json"
    assert export_defaults(c, "h100", out) == 2
    entries = read_defaults(out.read_text())
    assert entries[key().text()]["config"]["tile"] == {"BT": 32}
    with pytest.raises(ValueError):
        read_defaults('{"format": 1, "entries": {"k": {"format": 1}}}')
    with pytest.raises(ValueError):
        read_defaults("[]")


def test_packaged_defaults_absent_or_bad(monkeypatch, capsys):
    assert cache_mod.packaged_defaults("no-such-gpu") == {}

    class Files:
        def joinpath(self, *parts):
            return self

        def read_text(self):
            return "{broken"
    monkeypatch.setattr(cache_mod.resources, "files", lambda pkg: Files())
    assert cache_mod.packaged_defaults("h999") == {}
    assert "ignoring shipped defaults h999.json" in capsys.readouterr().err


def test_environment_on_cpu():
    env = cache_mod.environment("cpu")
    assert env["gpu"] == "none" and env["ssmc"] and env["torch"]
    assert cache_mod.device_slug(env).startswith("cpu")
    assert len(cache_mod.stack_hash(env)) == 12
