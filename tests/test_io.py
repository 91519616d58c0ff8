"""State dicts on disk: .npz of plain arrays, never pickle."""
import errno
import io
import os
import pickle
import re
import signal
import stat
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

import minibn as mb


def trained_model(rng):
    model = mb.Sequential(mb.BatchNorm1d(3), mb.BatchNorm2d(2, affine=False, momentum=None))
    for _ in range(3):
        model[0](rng.normal(2.0, 3.0, (6, 3)).astype(np.float32))
        model[1](rng.normal(-1.0, 0.5, (2, 2, 3, 3)).astype(np.float32))
    model[0].weight.data[...] = [0.5, 1.5, 2.5]
    return model


def test_round_trip(tmp_path, rng):
    model = trained_model(rng)
    sd = model.state_dict()
    path = mb.save(tmp_path / "model", sd)
    assert path.endswith("model.npz")
    back = mb.load(path)
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape, k
        np.testing.assert_array_equal(back[k], sd[k])
    assert back["0.num_batches_tracked"].shape == () and int(back["0.num_batches_tracked"]) == 3


def test_loaded_model_gives_identical_eval_outputs(tmp_path, rng):
    model = trained_model(rng)
    path = mb.save(tmp_path / "m.npz", model.state_dict())
    fresh = mb.Sequential(mb.BatchNorm1d(3), mb.BatchNorm2d(2, affine=False, momentum=None))
    held = fresh[0].running_mean
    fresh.load_state_dict(mb.load(path))
    assert fresh[0].running_mean is held                   # loaded in place
    model.eval()
    fresh.eval()
    x1 = rng.normal(size=(4, 3)).astype(np.float32)
    x2 = rng.normal(size=(2, 2, 3, 3)).astype(np.float32)
    np.testing.assert_array_equal(fresh[0](x1), model[0](x1))
    np.testing.assert_array_equal(fresh[1](x2), model[1](x2))


def test_file_is_a_zip_of_npy_without_pickle(tmp_path, rng):
    path = mb.save(tmp_path / "m.npz", trained_model(rng).state_dict())
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert all(n.endswith(".npy") for n in names)
        for n in names:
            with zf.open(n) as f:
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else \
                    np.lib.format.read_array_header_2_0
                _, _, dtype = read_header(f)
                assert dtype != np.dtype(object) and not dtype.hasobject
    with np.load(path, allow_pickle=False) as data:       # numpy reads it without pickle
        assert sorted(data.files) == sorted(n[:-4] for n in names)


def test_save_is_byte_reproducible(tmp_path, rng):
    sd = trained_model(rng).state_dict()
    a = mb.save(tmp_path / "a.npz", sd)
    b = mb.save(tmp_path / "b.npz", sd)
    assert Path(a).read_bytes() == Path(b).read_bytes()


def test_any_key_name_survives(tmp_path):
    # numpy.savez(file, **arrays) cannot take 'file' and silently drops 'allow_pickle'
    sd = {"file": np.ones(2), "allow_pickle": np.arange(3), "a.b.c": np.float32(1.5)}
    back = mb.load(mb.save(tmp_path / "k.npz", sd))
    assert list(back) == list(sd)
    np.testing.assert_array_equal(back["allow_pickle"], [0, 1, 2])
    assert back["a.b.c"].shape == () and back["a.b.c"].dtype == np.float32


def test_save_refuses_non_numeric(tmp_path):
    with pytest.raises(TypeError, match="'names' has dtype <U1; only numeric arrays"):
        mb.save(tmp_path / "x.npz", {"names": np.array(["a", "b"])})
    with pytest.raises(TypeError, match="dtype object"):
        mb.save(tmp_path / "x.npz", {"obj": np.array([None, 1], dtype=object)})
    with pytest.raises(TypeError, match="non-empty strings, got 3"):
        mb.save(tmp_path / "x.npz", {3: np.ones(1)})


def test_load_refuses_pickle(tmp_path):
    obj = tmp_path / "obj.npz"
    np.savez(obj, weight=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="only be read with pickle"):
        mb.load(obj)
    pkl = tmp_path / "sd.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"weight": np.ones(3)}, f)
    with pytest.raises(ValueError, match="only be read with pickle"):
        mb.load(pkl)


def test_load_refuses_a_single_array(tmp_path):
    np.save(tmp_path / "one.npy", np.ones(3))
    with pytest.raises(ValueError, match=r"single array \(\.npy\), not a state dict \(\.npz\)"):
        mb.load(tmp_path / "one.npy")


def test_torch_reads_a_minibn_file(tmp_path, rng):
    torch = pytest.importorskip("torch")
    bn = mb.BatchNorm1d(3)
    bn(rng.normal(1.0, 2.0, (8, 3)).astype(np.float32))
    path = mb.save(tmp_path / "bn.npz", bn.state_dict())
    tbn = torch.nn.BatchNorm1d(3)
    tbn.load_state_dict({k: torch.from_numpy(v) for k, v in mb.load(path).items()})
    np.testing.assert_array_equal(tbn.running_var.numpy(), bn.running_var)


# --------------------------------------------------------------------------- keys

def member_names(path):
    with zipfile.ZipFile(path) as zf:
        return [info.orig_filename for info in zf.infolist()]


def test_keys_a_and_a_npy_are_two_keys(tmp_path):
    sd = {"a": np.array([1.0]), "a.npy": np.array([2.0, 3.0]), "a.npy.npy": np.int8(4)}
    path = mb.save(tmp_path / "k.npz", sd)
    assert member_names(path) == ["a.npy", "a.npy.npy", "a.npy.npy.npy"]   # key + '.npy' verbatim
    back = mb.load(path)
    assert list(back) == list(sd)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key])
        assert back[key].shape == np.shape(sd[key]), key


@pytest.mark.parametrize("key", [
    "..", "...", ".hidden", " ", "a b", "tab\there", "line\nbreak", "\x7f", "x.npz",
    "é", "naïve.größe", "名前.重み", "\U0001f600", "e\u0301",   # the last: e + combining accent
    "k" * (65535 - 4),                                                    # the longest ASCII key
    "é" * ((65535 - 4) // 2),                                             # 2 bytes each in UTF-8
])
def test_unusual_keys_round_trip_exactly(tmp_path, key):
    path = mb.save(tmp_path / "k.npz", {key: np.arange(3.0), "plain": np.ones(1)})
    assert member_names(path) == [key + ".npy", "plain.npy"]
    back = mb.load(path)
    assert list(back) == [key, "plain"]
    np.testing.assert_array_equal(back[key], [0.0, 1.0, 2.0])


def test_keys_differing_only_in_case_or_normalization_stay_apart(tmp_path):
    sd = {"A": np.array([1]), "a": np.array([2]), "\u00e9": np.array([3]), "e\u0301": np.array([4])}
    back = mb.load(mb.save(tmp_path / "k.npz", sd))
    assert {k: int(v[0]) for k, v in back.items()} == {"A": 1, "a": 2, "\u00e9": 3, "e\u0301": 4}


@pytest.mark.parametrize("key, reason", [
    ("", "it is empty"),
    ("a\x00b", "NUL character"),
    ("\x00", "NUL character"),
    ("a/b", r"holds '/', which zip readers take for a folder separator"),
    ("/etc/passwd", "holds '/'"),
    ("../escape", "holds '/'"),
    ("dir/", "holds '/'"),
    ("a\\b", r"holds '\\\\'"),
    ("..\\escape", r"holds '\\\\'"),
    ("bad\ud800", "not valid Unicode text"),
    ("k" * (65535 - 3), "takes 65536 bytes in UTF-8, over the zip limit of 65535"),
    ("é" * 32766, "takes 65536 bytes in UTF-8"),
])
def test_save_refuses_keys_a_member_name_cannot_carry(tmp_path, key, reason):
    target = tmp_path / "k.npz"
    with pytest.raises(ValueError, match=r"save: key .* cannot be stored: .*" + reason):
        mb.save(target, {"fine": np.ones(2), key: np.ones(2)})
    assert list(tmp_path.iterdir()) == []                  # refused before anything was written


def test_save_error_shows_the_key_cut_short():
    with pytest.raises(ValueError) as info:
        mb.save("never.npz", {"k" * 70000: np.ones(1)})
    message = str(info.value)
    assert "'kkkk" in message and "(70000 characters)" in message and len(message) < 400


def test_save_refuses_a_key_given_twice(tmp_path):
    class Repeating(dict):
        def items(self):
            return [("w", np.ones(2)), ("w", np.zeros(2))]
    with pytest.raises(ValueError, match="key 'w' appears twice"):
        mb.save(tmp_path / "k.npz", Repeating())
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_non_string_keys_as_before(tmp_path):
    for key in (3, b"w", None, ("a",)):
        with pytest.raises(TypeError, match="non-empty strings, got"):
            mb.save(tmp_path / "x.npz", {key: np.ones(1)})


try:
    from hypothesis import given, strategies as st
except ImportError:  # pragma: no cover
    given = None


if given is not None:
    @given(st.lists(st.text(st.characters(exclude_categories=()), max_size=12), max_size=4,
                    unique=True))
    def test_every_key_round_trips_or_is_refused_by_name(keys):
        import tempfile
        sd = {key: np.full(2, i, dtype=np.int16) for i, key in enumerate(keys)}
        with tempfile.TemporaryDirectory() as folder:
            try:
                path = mb.save(os.path.join(folder, "k.npz"), sd)
            except ValueError as exc:
                assert "cannot be stored" in str(exc)
                assert any(repr(key) in str(exc) for key in keys)
                assert os.listdir(folder) == []
                return
            back = mb.load(path)
        assert list(back) == keys
        for key in keys:
            np.testing.assert_array_equal(back[key], sd[key])


# --------------------------------------------------------------------------- foreign archives

def npy_bytes(array):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def write_zip(path, members):
    """A zip holding ``members`` (name, bytes) in order, duplicates allowed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                    # zipfile warns on duplicate names
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members:
                zf.writestr(name, data)
    return path


def rename_member_bytes(path, old, new):
    """Rewrite a member name in the raw archive (zipfile itself cannot write NUL)."""
    raw = path.read_bytes()
    assert len(old) == len(new) and raw.count(old) == 2    # local header and central directory
    path.write_bytes(raw.replace(old, new))


GOOD = npy_bytes(np.arange(3.0))


@pytest.mark.parametrize("members, words", [
    ([("w.npy", GOOD), ("notes.txt", b"hello")],
     r"member 'notes.txt' is not an .npy array"),
    ([("w.npy", GOOD), ("w.npy", npy_bytes(np.zeros(3)))],
     r"member 'w.npy' appears twice in the archive"),
    ([("sub/w.npy", GOOD)],
     r"member 'sub/w.npy' has a name minibn.save never writes: it holds '/'"),
    ([("../w.npy", GOOD)], r"member '../w.npy' has a name .* holds '/'"),
    ([("/abs.npy", GOOD)], r"member '/abs.npy' has a name .* holds '/'"),
    ([("sub/", b"")], r"member 'sub/' is not an .npy array"),
    ([("a\\b.npy", GOOD)], r"member 'a\\\\b.npy' has a name .* holds '\\\\'"),
    ([(".npy", GOOD)], r"member '.npy' has a name .* it is empty"),
    ([("w.npy", b"not an array at all")],
     r"member 'w.npy' is not a valid .npy array \(the magic string is not correct"),
    ([("w.npy", b"")], r"member 'w.npy' is not a valid .npy array"),
    ([("w.npy", GOOD[:-5])],
     r"member 'w.npy' holds 19 bytes of array data, but its header declares shape \(3,\) of "
     r"float64 \(24 bytes\)"),
    ([("w.npy", GOOD + b"extra")], r"member 'w.npy' holds 29 bytes of array data"),
    ([("w.npy", npy_bytes(np.array(["a", "b"])))],
     r"member 'w.npy' has dtype <U1; only numeric arrays can be loaded"),
    ([("w.npy", npy_bytes(np.zeros(2, dtype=[("x", "f8")])))], r"member 'w.npy' has dtype"),
    ([("w.npy", npy_bytes(np.array(["2020-01-01"], dtype="M8[D]")))],
     r"member 'w.npy' has dtype datetime64"),
])
def test_load_refuses_foreign_members_by_name(tmp_path, members, words):
    path = write_zip(tmp_path / "foreign.npz", members)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + words):
        mb.load(path)


def test_load_refuses_a_member_needing_pickle_by_name(tmp_path):
    obj = np.array([{"a": 1}], dtype=object)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, obj, allow_pickle=True)
    path = write_zip(tmp_path / "p.npz", [("w.npy", GOOD), ("bias.npy", buffer.getvalue())])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": member 'bias.npy' can only be "
                       "read with pickle.*never unpickles"):
        mb.load(path)


def test_load_refuses_a_member_name_with_nul(tmp_path):
    path = write_zip(tmp_path / "nul.npz", [("aXb.npy", GOOD)])
    rename_member_bytes(path, b"aXb.npy", b"a\x00b.npy")
    with pytest.raises(ValueError, match=r"member 'a\\x00b.npy' has a name .* NUL character"):
        mb.load(path)


def test_load_refuses_a_corrupted_member(tmp_path):
    path = mb.save(tmp_path / "m.npz", {"w": np.arange(4.0)})
    raw = bytearray(Path(path).read_bytes())
    data_at = raw.index(np.arange(4.0).tobytes())
    raw[data_at] ^= 0xFF                                   # the CRC no longer matches
    Path(path).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"member 'w.npy' cannot be read \(Bad CRC-32"):
        mb.load(path)


def test_load_refuses_a_file_that_is_not_a_zip(tmp_path):
    whole = Path(mb.save(tmp_path / "m.npz", {"w": np.ones(3)})).read_bytes()
    for name, content in [("text.npz", b"just some text"), ("empty.npz", b""),
                          ("cut.npz", whole[:60]), ("no_end.npz", whole[:-10])]:
        path = tmp_path / name
        path.write_bytes(content)
        words = re.escape(str(path)) + " is not a readable zip archive"
        with pytest.raises(ValueError, match=words):
            mb.load(path)


def test_load_reads_numpy_savez_files(tmp_path):
    arrays = {"w": np.arange(6.0).reshape(2, 3), "n": np.int64(7),
              "f": np.asfortranarray(np.arange(6.0).reshape(2, 3))}
    for writer in (np.savez, np.savez_compressed):
        path = tmp_path / f"{writer.__name__}.npz"
        writer(path, **arrays)
        back = mb.load(path)
        assert list(back) == list(arrays)
        for key, value in arrays.items():
            np.testing.assert_array_equal(back[key], value)
            assert back[key].dtype == value.dtype and back[key].shape == np.shape(value)


def test_loaded_arrays_are_writable(tmp_path):
    back = mb.load(mb.save(tmp_path / "m.npz", {"w": np.ones(3)}))
    back["w"][0] = 5.0
    assert back["w"].tolist() == [5.0, 1.0, 1.0]


# --------------------------------------------------------------------------- atomic save

OLD = {"w": np.arange(4.0), "n": np.int64(1)}
NEW = {"w": np.ones(4), "a": np.zeros(1000), "b": np.full(3, 7.0), "n": np.int64(2)}


def good_checkpoint(tmp_path):
    path = mb.save(tmp_path / "ckpt.npz", OLD)
    return path, Path(path).read_bytes()


def assert_old_checkpoint_intact(tmp_path, path, old_bytes):
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"], "a temporary file was left behind"
    assert Path(path).read_bytes() == old_bytes
    back = mb.load(path)
    assert list(back) == ["w", "n"] and back["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def fail_on_call(number, error):
    real_write_array = np.lib.format.write_array
    calls = []

    def write_array(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise error
        return real_write_array(*args, **kwargs)
    return write_array


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
@pytest.mark.parametrize("failing_array", [1, 2, 4])
def test_failure_mid_write_leaves_old_checkpoint(tmp_path, monkeypatch, error, failing_array):
    path, old_bytes = good_checkpoint(tmp_path)
    monkeypatch.setattr(np.lib.format, "write_array", fail_on_call(failing_array, error))
    with pytest.raises(type(error)):
        mb.save(path, NEW)
    monkeypatch.undo()
    assert_old_checkpoint_intact(tmp_path, path, old_bytes)


def test_failure_mid_write_of_a_new_file_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(np.lib.format, "write_array", fail_on_call(2, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        mb.save(tmp_path / "fresh.npz", NEW)
    assert os.listdir(tmp_path) == []


def test_a_value_that_fails_to_convert_leaves_old_checkpoint(tmp_path):
    class Unconvertible:
        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("device lost")
    path, old_bytes = good_checkpoint(tmp_path)
    with pytest.raises(RuntimeError, match="device lost"):
        mb.save(path, {"w": np.ones(2), "bad": Unconvertible()})
    assert_old_checkpoint_intact(tmp_path, path, old_bytes)


@pytest.mark.parametrize("failing", ["replace", "fsync"])
@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), KeyboardInterrupt()])
def test_failure_in_fsync_or_replace_leaves_old_checkpoint(tmp_path, monkeypatch, failing, error):
    path, old_bytes = good_checkpoint(tmp_path)

    def boom(*args, **kwargs):
        raise error
    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(type(error)):
        mb.save(path, NEW)
    monkeypatch.undo()
    assert_old_checkpoint_intact(tmp_path, path, old_bytes)


def test_save_flushes_to_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync")
        real_fsync(fd)

    def replace(source, target):
        events.append("replace")
        real_replace(source, target)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    mb.save(tmp_path / "m.npz", OLD)
    assert events[:2] == ["fsync", "replace"]
    if hasattr(os, "O_DIRECTORY"):
        assert events == ["fsync", "replace", "fsync"]         # and the folder after the rename


FILE_SIZE_LIMIT_CHILD = """
import resource, signal, sys
import numpy as np
import minibn as mb
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # the write then fails with EFBIG
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    mb.save(sys.argv[1], {"w": np.ones(4), "big": np.zeros(200_000)})
except OSError as exc:
    print("errno", exc.errno)
else:
    print("saved")
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_file_size_limit_leaves_old_checkpoint(tmp_path):
    pytest.importorskip("resource")
    path, old_bytes = good_checkpoint(tmp_path)
    limit = 4 * len(old_bytes)                              # the new checkpoint needs 1.6 MB
    child = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT_CHILD, path, str(limit)],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["errno", str(errno.EFBIG)]
    assert_old_checkpoint_intact(tmp_path, path, old_bytes)


def test_save_keeps_the_path_it_returns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert mb.save("plain", OLD) == "plain.npz"
    assert mb.save("twice.npz", OLD) == "twice.npz"
    assert mb.save(tmp_path / "x.pt", OLD) == str(tmp_path / "x.pt.npz")
    assert sorted(os.listdir(tmp_path)) == ["plain.npz", "twice.npz", "x.pt.npz"]


def test_overwrite_gives_the_new_content_and_keeps_permissions(tmp_path):
    path, _ = good_checkpoint(tmp_path)
    os.chmod(path, 0o640)
    mb.save(path, NEW)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert list(mb.load(path)) == list(NEW)
    assert os.listdir(tmp_path) == ["ckpt.npz"]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_save_through_a_symlink_replaces_the_file_it_points_to(tmp_path):
    path, _ = good_checkpoint(tmp_path)
    link = tmp_path / "latest.npz"
    os.symlink(path, link)
    mb.save(link, NEW)
    assert os.path.islink(link)
    assert list(mb.load(path)) == list(NEW)


def test_save_refuses_to_overwrite_a_read_only_file(tmp_path, monkeypatch):
    path, old_bytes = good_checkpoint(tmp_path)
    os.chmod(path, 0o444)
    if os.access(path, os.W_OK):                           # root writes anyway: act as a user
        monkeypatch.setattr(os, "access", lambda where, mode: False)
    with pytest.raises(PermissionError, match="not writable"):
        mb.save(path, NEW)
    assert Path(path).read_bytes() == old_bytes and os.listdir(tmp_path) == ["ckpt.npz"]


def test_save_into_a_missing_folder_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot create a temporary file in .*missing"):
        mb.save(tmp_path / "missing" / "m.npz", OLD)
    assert os.listdir(tmp_path) == []


def test_save_with_the_longest_file_name(tmp_path):
    name = "n" * 251 + ".npz"                              # 255 bytes, the usual limit
    try:
        (tmp_path / name).write_bytes(b"")
    except OSError:
        pytest.skip("this file system takes shorter names")
    mb.save(tmp_path / name, OLD)
    assert list(mb.load(tmp_path / name)) == ["w", "n"] and os.listdir(tmp_path) == [name]
