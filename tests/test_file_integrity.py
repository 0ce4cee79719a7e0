"""Files mvpp writes and later trusts (issue 16, issue 11 item 4): checkpoints and memory banks share one
atomic writer and one checksummed container (mvpp_kernels._io). An edited header field, a flipped bit, a
truncated, foreign or wrong-version file is refused with a clear error; temporaries left by killed saves
are cleaned, safely; saves SIGKILLed at random moments leave the old or the new file (short kill loop
here, the long one is scripts/kill_loop.py); MicroLens parse errors name the file and the line."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mvpp_kernels import _io
from mvpp.train import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metadata(blob: bytes) -> dict:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n])["__metadata__"]


def _rewrite_header(blob: bytes, key: str, edit) -> bytes:
    """The same tensors with the JSON header under `key` edited (digest left as it was)."""
    header = json.loads(_metadata(blob)[key])
    edit(header)
    return st_save(st_load(blob), metadata={key: json.dumps(header)})


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def _trained_checkpoint(path):
    m = _model(0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.randn(4, 7, generator=torch.Generator().manual_seed(1))).sum().backward()
    opt.step()
    save_checkpoint(str(path), m, opt, {"epoch": 3, "best": 0.25, "history": {"val": [0.5, 0.25]}},
                    best_state={k: v * 2 for k, v in m.state_dict().items()})
    return m, opt


# ------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    p = tmp_path / "ck.safetensors"
    m, opt = _trained_checkpoint(p)
    m2 = _model(5)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    assert load_checkpoint(str(p), m2, opt2)["epoch"] == 3
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
    load_checkpoint(str(p), m2, which="best")
    assert all(torch.equal(2 * a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    header = json.loads(_metadata(p.read_bytes())["mvpp"])
    assert header["format"] == CHECKPOINT_FORMAT and header["version"] == CHECKPOINT_VERSION
    assert len(header["sha256"]) == 64


def test_checkpoint_flipped_weight_bit_is_refused(tmp_path):
    p = tmp_path / "ck.safetensors"
    _trained_checkpoint(p)
    blob = p.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    target = _model(5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    # every 97th byte of the tensor data, one bit each: all refused, the model untouched
    for i in range(8 + n, len(blob), 97):
        bad = bytearray(blob)
        bad[i] ^= 0x04
        (tmp_path / "bad").write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="checksum mismatch"):
            load_checkpoint(str(tmp_path / "bad"), target)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


@pytest.mark.parametrize("edit", [
    lambda h: h["extra"].__setitem__("epoch", 9),
    lambda h: h["extra"].__setitem__("best", 0.0),
    lambda h: h["optimizer"]["param_groups"][0].__setitem__("lr", 10.0),
    lambda h: h.__setitem__("note", "added"),
    lambda h: h.pop("optimizer"),
], ids=["epoch", "best", "optimizer-lr", "added-field", "removed-field"])
def test_checkpoint_edited_header_is_refused(tmp_path, edit):
    p = tmp_path / "ck.safetensors"
    _trained_checkpoint(p)
    (tmp_path / "edited").write_bytes(_rewrite_header(p.read_bytes(), "mvpp", edit))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_checkpoint(str(tmp_path / "edited"), _model())


def test_checkpoint_truncated_foreign_and_wrong_version_are_refused(tmp_path):
    p = tmp_path / "ck.safetensors"
    _trained_checkpoint(p)
    blob = p.read_bytes()
    for cut in (0, 5, 8, 100, len(blob) // 2, len(blob) - 1):
        (tmp_path / "torn").write_bytes(blob[:cut])
        with pytest.raises(ValueError, match="not a valid mvpp checkpoint: cannot parse it as safetensors"):
            load_checkpoint(str(tmp_path / "torn"), _model())
    (tmp_path / "foreign").write_bytes(st_save({"weight": torch.ones(3)}))
    with pytest.raises(ValueError, match="has no 'mvpp' header .a foreign safetensors file"):
        load_checkpoint(str(tmp_path / "foreign"))
    (tmp_path / "future").write_bytes(_rewrite_header(blob, "mvpp", lambda h: h.__setitem__("version", 3)))
    with pytest.raises(ValueError, match="format version 3; this mvpp reads version 2"):
        load_checkpoint(str(tmp_path / "future"))
    (tmp_path / "other").write_bytes(_rewrite_header(blob, "mvpp", lambda h: h.__setitem__("format", "x")))
    with pytest.raises(ValueError, match="format 'x', expected 'mvpp.checkpoint'"):
        load_checkpoint(str(tmp_path / "other"))
    # a checkpoint of the earlier layout (no version field, no checksum) is refused with the reason
    old = st_save(st_load(blob), metadata={"mvpp": json.dumps({"format": "mvpp-checkpoint/1", "extra": {}})})
    (tmp_path / "v1").write_bytes(old)
    with pytest.raises(ValueError, match="version-1 mvpp checkpoint, written without a checksum"):
        load_checkpoint(str(tmp_path / "v1"))
    (tmp_path / "text").write_bytes(b"definitely not a checkpoint, just some text" * 3)
    with pytest.raises(ValueError, match="not a valid mvpp checkpoint"):
        load_checkpoint(str(tmp_path / "text"))
    with pytest.raises(FileNotFoundError, match="no mvpp checkpoint at"):
        load_checkpoint(str(tmp_path / "absent"))


# ------------------------------------------------------------------------------------- memory bank
@pytest.fixture(scope="module")
def bank_file(tmp_path_factory):
    from mvpp_kernels import HierarchicalIndex
    from mvpp_kernels.testing import make_memory_bank_data

    keys, _ = make_memory_bank_data(300, 8, 0, "clustered", seed=21)
    values = torch.randn(300, 3, generator=torch.Generator().manual_seed(22))
    idx = HierarchicalIndex.build(keys, values, branching=(2, 3), seed=0)
    idx.update(keys[:7] * 0.5, values[:7])
    p = tmp_path_factory.mktemp("bank") / "bank.safetensors"
    idx.save(p)
    return p, idx


def _load_bank(path):
    from mvpp_kernels import HierarchicalIndex

    return HierarchicalIndex.load(path)


def test_bank_round_trip_keeps_header_and_tensors(bank_file):
    p, idx = bank_file
    back = _load_bank(p)
    for name, t in idx.tensors().items():
        assert torch.equal(t, back.tensors()[name]), name
    header = json.loads(_metadata(p.read_bytes())["mvpp_header"])
    assert header["version"] == 2 and len(header["sha256"]) == 64
    for field in ("next_id", "metric", "max_members", "split_factor", "max_fine_clusters", "base_spread"):
        assert header[field] == (list(getattr(idx, field)) if field == "branching" else getattr(idx, field))


@pytest.mark.parametrize("field, value", [
    ("next_id", 0), ("next_seq", 1), ("metric", "l2"), ("max_members", 2), ("split_factor", 1e9),
    ("max_fine_clusters", 1), ("base_spread", 0.0), ("n_splits", 5), ("branching", [9, 9]), ("d", 4),
    ("dtype", "float64"),
])
def test_bank_edited_header_field_is_refused(bank_file, tmp_path, field, value):
    """Issue 16: the digest covered the tensors only, so these edits loaded and corrupted later updates."""
    p, _ = bank_file
    bad = tmp_path / "edited"
    bad.write_bytes(_rewrite_header(p.read_bytes(), "mvpp_header", lambda h: h.__setitem__(field, value)))
    with pytest.raises(ValueError, match="checksum mismatch"):
        _load_bank(bad)


def test_bank_flipped_bits_truncation_foreign_and_versions_are_refused(bank_file, tmp_path):
    p, _ = bank_file
    blob = p.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    for i in list(range(8 + n, len(blob), 61)) + [len(blob) - 1]:
        bad = bytearray(blob)
        bad[i] ^= 0x80
        (tmp_path / "flip").write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="checksum mismatch"):
            _load_bank(tmp_path / "flip")
    for cut in (0, 7, 8, n // 2, 8 + n, len(blob) - 1):
        (tmp_path / "torn").write_bytes(blob[:cut])
        with pytest.raises(ValueError, match="not a valid mvpp memory bank file: cannot parse it as safetensors"):
            _load_bank(tmp_path / "torn")
    (tmp_path / "foreign").write_bytes(st_save({"keys": torch.ones(3, 2)}))
    with pytest.raises(ValueError, match="no 'mvpp_header' header"):
        _load_bank(tmp_path / "foreign")
    (tmp_path / "v1").write_bytes(_rewrite_header(blob, "mvpp_header", lambda h: h.__setitem__("version", 1)))
    with pytest.raises(ValueError, match="version-1 mvpp memory bank, whose checksum does not cover its header"):
        _load_bank(tmp_path / "v1")
    (tmp_path / "v9").write_bytes(_rewrite_header(blob, "mvpp_header", lambda h: h.__setitem__("version", 9)))
    with pytest.raises(ValueError, match="format version 9; this mvpp reads version 2"):
        _load_bank(tmp_path / "v9")
    # a checkpoint is not a bank, and a bank is not a checkpoint
    ck = tmp_path / "ck.safetensors"
    _trained_checkpoint(ck)
    with pytest.raises(ValueError, match="no 'mvpp_header' header"):
        _load_bank(ck)
    with pytest.raises(ValueError, match="has no 'mvpp' header"):
        load_checkpoint(str(p))


def test_only_one_atomic_writer_in_the_package():
    """Class-level guard: every file mvpp writes goes through mvpp_kernels/_io.py (atomic write, stale
    temporaries cleaned), so no module may rename temporaries into place on its own."""
    offenders = []
    for pkg in ("mvpp", "mvpp_kernels"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if not f.endswith(".py") or (pkg == "mvpp_kernels" and f == "_io.py" and
                                             os.path.basename(dirpath) == "mvpp_kernels"):
                    continue
                src = open(os.path.join(dirpath, f), encoding="utf-8").read()
                for needle in ("os.replace(", "os.rename(", "mkstemp(", "NamedTemporaryFile("):
                    if needle in src:
                        offenders.append(f"{os.path.relpath(os.path.join(dirpath, f), ROOT)}: {needle}")
    assert offenders == [], "write files through mvpp_kernels._io.atomic_write_bytes / write_checked"


# ------------------------------------------------------------------------------------- _io
def test_digest_covers_names_dtypes_shapes_and_header():
    t = {"a": torch.arange(6, dtype=torch.float32)}
    base = _io.tensors_digest({"x": 1}, t)
    assert _io.tensors_digest({"x": 1, "sha256": "ignored"}, t) == base  # the digest field itself is not hashed
    variants = [({"x": 2}, t), ({"x": 1, "y": 0}, t), ({"x": 1}, {"b": t["a"]}),
                ({"x": 1}, {"a": t["a"].view(torch.int32)}), ({"x": 1}, {"a": t["a"].view(2, 3)}),
                ({"x": 1}, {"a": t["a"], "c": torch.zeros(0)})]
    assert len({base} | {_io.tensors_digest(h, ts) for h, ts in variants}) == 1 + len(variants)
    # bfloat16 and 0-dim tensors hash (no numpy bfloat16 needed)
    _io.tensors_digest({}, {"s": torch.tensor(1.5, dtype=torch.bfloat16), "e": torch.empty(0, 3)})


def test_stale_temporaries_are_cleaned_and_only_those(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer exists
    host = _io.tmp_prefix("x").split(".")[2]
    names = {
        "dead": f".tmp-ck.safetensors.{host}.{dead.pid}.abc123.part",   # SIGKILLed writer: stale
        "alive": f".tmp-ck.safetensors.{host}.{os.getppid()}.abc123.part",  # a live writer: kept
        "mine": _io.tmp_prefix(tmp_path / "ck.safetensors") + "zz.part",     # this process: kept
        "remote": ".tmp-ck.safetensors.otherhost.1.abc123.part",           # another host, young: kept
        "remote_old": ".tmp-ck.safetensors.otherhost.2.abc123.part",       # another host, old: stale
        "foreign": ".tmp-notes.txt",                                       # not our pattern: kept
        "lookalike": f".tmp-ck.{host}.{dead.pid}.abc.part.bak",            # not our pattern: kept
    }
    for n in names.values():
        (tmp_path / n).write_bytes(b"partial")
    old = time.time() - _io.STALE_AFTER_S - 60
    os.utime(tmp_path / names["remote_old"], (old, old))
    os.mkdir(tmp_path / f".tmp-d.{host}.{dead.pid}.abc.part")  # a folder with our pattern: kept
    removed = _io.clean_stale_tmp(tmp_path)
    assert sorted(removed) == sorted([names["dead"], names["remote_old"]])
    left = set(os.listdir(tmp_path))
    assert left == (set(names.values()) - set(removed)) | {f".tmp-d.{host}.{dead.pid}.abc.part"}
    # temporaries of the earlier writers (no pid in the name): removed only when old, the bank's only for
    # its own target
    legacy = {"ck_old": ".tmp-abcd1234.part", "ck_young": ".tmp-wxyz5678.part",
              "bank_old": ".tmp-bank.safetensors.k2j4h6g8", "other_old": ".tmp-notes.txt.k2j4h6g8"}
    for n in legacy.values():
        (tmp_path / n).write_bytes(b"partial")
    for k in ("ck_old", "bank_old", "other_old"):
        os.utime(tmp_path / legacy[k], (old, old))
    assert _io.clean_stale_tmp(tmp_path) == [legacy["ck_old"]]
    assert _io.clean_stale_tmp(tmp_path, target=str(tmp_path / "bank.safetensors")) == [legacy["bank_old"]]
    assert {legacy["ck_young"], legacy["other_old"]} <= set(os.listdir(tmp_path))
    for k in ("ck_young", "other_old"):
        os.unlink(tmp_path / legacy[k])
    # an atomic write cleans them too, and leaves nothing of its own
    (tmp_path / names["dead"]).write_bytes(b"partial")
    _io.atomic_write_bytes(tmp_path / "ck.safetensors", b"new")
    assert names["dead"] not in os.listdir(tmp_path)
    assert (tmp_path / "ck.safetensors").read_bytes() == b"new"
    assert [n for n in os.listdir(tmp_path) if n.startswith(_io.tmp_prefix(tmp_path / "ck.safetensors"))] == \
        [names["mine"]]


def test_atomic_write_refuses_a_directory_and_keeps_the_old_file(tmp_path, monkeypatch):
    with pytest.raises(IsADirectoryError):
        _io.atomic_write_bytes(tmp_path, b"x")
    p = tmp_path / "f.bin"
    _io.atomic_write_bytes(p, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        _io.atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


# ------------------------------------------------------------------------------------- MicroLens
def _microlens(root, **override):
    files = {
        "MicroLens-100k_title_en.csv": "item,title\n1,a cat\n2,\"a, quoted\ntitle\"\n3,dog\n",
        "MicroLens-100k_likes_and_views.txt": "1\t5\t50\n2\t1\t10\n3\t0\t3\n",
        "MicroLens-100k_comment_en.txt": "u1\t1\tnice\nu2\t1\tok\nu3\t2\twow\n",
        "MicroLens-100k_pairs.csv": "user,item,timestamp\nu1,1,1000\nu2,1,5000\nu3,2,2000\n",
    }
    files.update(override)
    for name, text in files.items():
        (root / name).write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return root


def test_microlens_parses_a_good_folder(tmp_path):
    from mvpp.data.microlens import read_microlens

    t = read_microlens(str(_microlens(tmp_path)))
    assert t.ids == ["1", "2"] and t.dropped_zero_comment == 1 and t.titles["2"] == "a, quoted\ntitle"
    assert t.interactions["1"].tolist() == [1.0, 5.0]


@pytest.mark.parametrize("name, text, line, fragment", [
    ("MicroLens-100k_pairs.csv", "user,item,timestamp\nu1,1,1000\nu2,1,soon\n", 3, "timestamp: integer"),
    ("MicroLens-100k_pairs.csv", "user,item,timestamp\nu1,1\n", 2, "'user,item,timestamp'"),
    ("MicroLens-100k_pairs.csv", "user,item,timestamp\nu1,1,1000\n\nu1,,7\n", 4, "'user,item,timestamp'"),
    ("MicroLens-100k_likes_and_views.txt", "1\t5\t50\n2\tmany\t10\n", 2, "integer likes and views"),
    ("MicroLens-100k_comment_en.txt", "u1\t1\tnice\nno tabs here\n", 2, "'user<TAB>video<TAB>comment'"),
    ("MicroLens-100k_title_en.csv", "item,title\n1,a\n2,\"multi\nline\"\n,orphan title\n", 5, "video id"),
    ("MicroLens-100k_comment_en.txt", b"u1\t1\tnice\nu2\t1\t\xff\xfe\n", 2, "not UTF-8"),
    ("MicroLens-100k_pairs.csv", b"user,item,timestamp\nu1,1,1000\nu2,\xff,2\n", 3, "not UTF-8"),
])
def test_microlens_parse_errors_name_file_and_line(tmp_path, name, text, line, fragment):
    from mvpp.data.microlens import MicroLensParseError, read_microlens

    _microlens(tmp_path, **{name: text})
    with pytest.raises(MicroLensParseError) as e:
        read_microlens(str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / name} line {line}:"), msg
    assert fragment in msg
    assert isinstance(e.value, ValueError)  # the CLI boundary prints it as one line, exit 2


# ------------------------------------------------------------------------------------- kill loop
def test_saves_killed_at_random_moments_leave_old_or_new_file(tmp_path):
    """The short CI run of scripts/kill_loop.py: writers fork()ed from one process, SIGKILLed at seeded
    random points of their save cycle; the script asserts the invariant at every kill (the file loads and
    is the old or the new generation; only temporaries of killed writers, cleaned by the next save) and
    exits 1 with the first violation. Pass/fail never depends on timing, only the spread of kills does."""
    out = tmp_path / "kills.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "kill_loop.py"), "--kills", "6",
                        "--kinds", "bank,checkpoint", "--seed", "0", "--bank-items", "4000", "--model-width", "128",
                        "--dir", str(tmp_path / "files"), "--budget-s", "150", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    assert report["ok"]
    for kind in ("bank", "checkpoint"):
        res = report["results"][kind]
        assert res["ok"] and res["kills"] == 6 and res["old"] + res["new"] == 6, res
