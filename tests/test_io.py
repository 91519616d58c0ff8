"""State dicts on disk: .npz of plain arrays, never pickle."""
import pickle
import zipfile

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
    assert open(a, "rb").read() == open(b, "rb").read()


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
