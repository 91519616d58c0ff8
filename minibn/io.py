"""Saving and loading state dicts as ``.npz`` files, never with pickle.

A pickle file can run arbitrary code when it is loaded; an ``.npz`` of plain
numeric arrays cannot.  :func:`save` writes each array in NumPy's ``.npy``
format (with ``allow_pickle=False``) into a zip archive; :func:`load` reads the
archive member by member and refuses anything that would need pickle.

The archive is written entry by entry (rather than with ``numpy.savez``) for two
reasons: any key is allowed (``numpy.savez(file, **arrays)`` cannot take a key
named ``file`` and silently drops one named ``allow_pickle``), and the bytes are
reproducible (every entry carries the same fixed timestamp).

Keys.  Each key is stored verbatim as the zip member ``key + ".npy"``, and
:func:`load` gives back the member name without that last ``.npy``: a map
with no collisions, so ``'a'`` and ``'a.npy'`` are two keys, and non-ASCII keys
are stored in UTF-8 (the zip format's flag for it is set) and come back equal.
:func:`save` refuses, before it writes anything, a key that a zip member name
cannot carry unchanged:

* a key that is not a string, or the empty string;
* a key holding NUL (zip readers end the name there);
* a key holding ``/`` or ``\\`` (zip readers take them for folder separators,
  so ``'../x'`` or ``'/etc/x'`` could never reach a path outside the archive);
* a key that is not valid Unicode text (a lone surrogate has no UTF-8 form);
* a key whose member name is over 65535 bytes in UTF-8 (the format's limit);
* the same key twice (a mapping whose ``items()`` repeats itself).

Everything else (``'..'``, spaces, control characters, any script) round-trips
exactly.  Zip member names are case-sensitive, so ``'A'`` and ``'a'`` are two
keys; only a tool that extracts the archive onto a case-insensitive disk could
confuse them.  ``numpy.load`` reads these files too, but it resolves ``'a.npy'``
to the member of key ``'a'`` when both exist; :func:`load` does not.

Loading.  :func:`load` accepts exactly what :func:`save` writes: every member
must have a name that the rules above allow (so no folders, no duplicates), be
an ``.npy`` (format 1.0 or 2.0) of a numeric or boolean dtype, and hold exactly
the bytes its header declares.  Anything else is a ``ValueError`` naming the file
and the member.  Compressed members (``numpy.savez_compressed``) are read too.

Writing is atomic.  :func:`save` writes into a temporary file next to the
target, flushes it to disk, then renames it over the target (``os.replace``).
Whatever stops it halfway (an exception, a full disk, a file-size limit,
Ctrl-C), the file that was there before is left as it was, and the temporary
file is removed.  Saving through a symbolic link replaces the file it points
to; the new file keeps the permission bits of the one it replaces, and a file
that cannot be written (read-only) is refused as ``open`` would refuse it.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import secrets
import stat
import zipfile
import zlib
from collections import OrderedDict

import numpy as np

from .backend import asnumpy

__all__ = ["save", "load"]

_FIXED_DATE = (1980, 1, 1, 0, 0, 0)   # the earliest date a zip entry can carry
_MEMBER_SUFFIX = ".npy"
_MAX_MEMBER_NAME_BYTES = 0xFFFF       # a zip entry stores its name length in 2 bytes
_NPY_MAGIC = b"\x93NUMPY"
_PICKLE_PROTOCOL_MARK = b"\x80"       # how pickles of protocol 2 and later begin
_READ_CHUNK = 1 << 20
# what zipfile raises for a damaged or unsupported archive (bad CRC, bad deflate data, an
# encrypted member, a newer zip version, a truncated file)
_DAMAGED_ARCHIVE = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError)


# --------------------------------------------------------------------------- keys

def _key_problem(key: str) -> str | None:
    """Why ``key`` cannot be stored as the member name ``key + '.npy'``, or None if it can."""
    if key == "":
        return "it is empty"
    if "\x00" in key:
        return "it holds a NUL character, where zip readers end a member name"
    for separator in ("/", "\\"):
        if separator in key:
            return f"it holds {separator!r}, which zip readers take for a folder separator"
    try:
        encoded = (key + _MEMBER_SUFFIX).encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid Unicode text (a lone surrogate has no UTF-8 form)"
    if len(encoded) > _MAX_MEMBER_NAME_BYTES:
        return (f"its member name '<key>.npy' takes {len(encoded)} bytes in UTF-8, "
                f"over the zip limit of {_MAX_MEMBER_NAME_BYTES}")
    return None


def _shown(key: str, limit: int = 80) -> str:
    """``repr(key)``, cut short for very long keys."""
    text = repr(key)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(key)} characters)"


def _is_plain_numeric(dtype: np.dtype) -> bool:
    return not dtype.hasobject and (np.issubdtype(dtype, np.number) or dtype == np.bool_)


def _arrays_to_save(state_dict) -> "OrderedDict[str, np.ndarray]":
    """The state dict as host arrays, every key and dtype checked before a byte is written."""
    arrays = OrderedDict()
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"save: state dict keys must be non-empty strings, got {key!r}")
        problem = _key_problem(key)
        if problem:
            raise ValueError(f"save: key {_shown(key)} cannot be stored: {problem}")
        if key in arrays:
            raise ValueError(f"save: key {_shown(key)} appears twice in the state dict")
        a = np.asarray(asnumpy(value))
        if not _is_plain_numeric(a.dtype):
            raise TypeError(f"save: {key!r} has dtype {a.dtype}; only numeric arrays can be saved")
        arrays[key] = a
    return arrays


# --------------------------------------------------------------------------- save

def save(path, state_dict) -> str:
    """Write ``state_dict`` (name -> array) to ``path`` (``.npz``); returns the path written.

    A path without the ``.npz`` suffix gets it appended.  The write is atomic: the
    previous file at ``path`` stays intact unless the new one is complete.
    """
    arrays = _arrays_to_save(state_dict)
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    _replace_atomically(os.path.realpath(path), lambda f: _write_archive(f, arrays))
    return path


def _write_archive(fileobj, arrays) -> None:
    """The zip of ``.npy`` members, byte for byte the same for the same arrays."""
    zf = zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
    try:
        for key, a in arrays.items():
            info = zipfile.ZipInfo(key + _MEMBER_SUFFIX, date_time=_FIXED_DATE)
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, a, allow_pickle=False)
    except BaseException:
        with contextlib.suppress(Exception):   # the file is discarded: report the first error
            zf.close()
        raise
    zf.close()


def _replace_atomically(target: str, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``target``, then rename it over ``target``.

    On any failure, ``KeyboardInterrupt`` included, the temporary file is removed and
    ``target`` is untouched.
    """
    old_mode = _mode_of_existing_writable_file(target)
    temp_path, fd = _create_temporary_beside(target)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if old_mode is not None:
            os.chmod(temp_path, old_mode)
        os.replace(temp_path, target)
    except BaseException:
        _remove_quietly(temp_path)
        raise
    _fsync_directory(os.path.dirname(target))


def _mode_of_existing_writable_file(target: str) -> int | None:
    """The permission bits of the file at ``target`` (None if none); refuses a read-only file."""
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return None
    if os.path.isfile(target) and not os.access(target, os.W_OK):
        raise PermissionError(errno.EACCES, "save: the existing file is not writable", target)
    return mode


def _create_temporary_beside(target: str) -> tuple[str, int]:
    """A new, empty file in ``target``'s folder (permissions as ``open`` would give); (path, fd)."""
    folder, name = os.path.split(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:   # the name is cut so that a long target name still leaves room for the suffix
        temp_path = os.path.join(folder, f".{name[:32]}.{secrets.token_hex(6)}.tmp")
        try:
            return temp_path, os.open(temp_path, flags, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise type(exc)(exc.errno, f"save: cannot create a temporary file in {folder!r} "
                            f"to write {name!r} atomically ({exc.strerror})", temp_path) from exc


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_directory(folder: str) -> None:
    """Make the rename itself durable where the OS lets a folder be fsynced (not on Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- load

def load(path) -> "OrderedDict[str, np.ndarray]":
    """Read a state dict written by :func:`save` (NumPy arrays, in file order).

    A file that is not such an archive (a pickle, a single ``.npy``, a damaged zip, a
    member that is not a numeric ``.npy`` with a name :func:`save` could have written)
    is a ``ValueError`` naming the file and, where there is one, the member.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        start = f.read(len(_NPY_MAGIC))
    if start == _NPY_MAGIC:
        raise ValueError(f"load: {path} holds a single array (.npy), not a state dict (.npz); "
                         "expected a file written by minibn.save")
    try:
        zf = zipfile.ZipFile(path)
    except _DAMAGED_ARCHIVE as exc:
        if start.startswith(_PICKLE_PROTOCOL_MARK):
            raise ValueError(_needs_pickle(path)) from exc
        raise ValueError(f"load: {path} is not a readable zip archive (.npz) ({exc}); "
                         "expected a file written by minibn.save") from exc
    with zf:
        members = zf.infolist()
        _check_member_names(path, members)
        return OrderedDict((m.orig_filename[:-len(_MEMBER_SUFFIX)], _read_member(path, zf, m))
                           for m in members)


def _needs_pickle(where: str) -> str:
    return (f"load: {where} can only be read with pickle (object arrays or a pickled object); "
            "expected plain numeric arrays: minibn never unpickles, since unpickling can run "
            "arbitrary code")


def _check_member_names(path: str, members) -> None:
    """Every member is named ``key + '.npy'`` for a key :func:`save` accepts, and none repeats."""
    seen = set()
    for member in members:
        name = member.orig_filename          # as stored: zipfile cuts NUL and may rewrite '\\'
        if name in seen:
            raise ValueError(f"load: {path}: member {_shown(name)} appears twice in the archive; "
                             "expected a file written by minibn.save")
        seen.add(name)
        if not name.endswith(_MEMBER_SUFFIX):
            raise ValueError(f"load: {path}: member {_shown(name)} is not an .npy array; "
                             "expected a file written by minibn.save")
        problem = _key_problem(name[:-len(_MEMBER_SUFFIX)])
        if problem:
            raise ValueError(f"load: {path}: member {_shown(name)} has a name minibn.save never "
                             f"writes: {problem}")


def _read_member(path: str, zf: zipfile.ZipFile, member: zipfile.ZipInfo) -> np.ndarray:
    where = f"{path}: member {_shown(member.orig_filename)}"
    if member.compress_type == zipfile.ZIP_STORED and member.file_size != member.compress_size:
        raise ValueError(f"load: {where} is damaged: stored uncompressed, yet its sizes differ "
                         f"({member.file_size} and {member.compress_size} bytes)")
    try:
        with zf.open(member) as f:
            return _read_npy(f, member.file_size, where)
    except _DAMAGED_ARCHIVE as exc:
        raise ValueError(f"load: {where} cannot be read ({exc}); the archive is damaged or "
                         "was not written by minibn.save") from exc
    except OSError as exc:
        if exc.errno != errno.EINVAL:        # a failing disk, not an impossible offset in the file
            raise
        raise ValueError(f"load: {where} cannot be read ({exc}); the archive is damaged") from exc


def _read_npy(f, member_size: int, where: str) -> np.ndarray:
    """One ``.npy`` array from ``f``, its dtype and size checked before any data is read."""
    shape, fortran_order, dtype = _read_npy_header(f, where)
    if dtype.hasobject:
        raise ValueError(_needs_pickle(where))
    if not _is_plain_numeric(dtype):
        raise ValueError(f"load: {where} has dtype {dtype}; only numeric arrays can be loaded")
    data_size = math.prod(shape) * dtype.itemsize
    if f.tell() + data_size != member_size:
        raise ValueError(f"load: {where} holds {member_size - f.tell()} bytes of array data, "
                         f"but its header declares shape {shape} of {dtype} ({data_size} bytes)")
    data = _read_exactly(f, data_size, where)
    return data.view(dtype).reshape(shape, order="F" if fortran_order else "C")


def _read_npy_header(f, where: str):
    """(shape, fortran_order, dtype) from an ``.npy`` header of format 1.0 or 2.0."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
    except ValueError as exc:
        raise ValueError(f"load: {where} is not a valid .npy array ({exc})") from exc
    raise ValueError(f"load: {where} is .npy format {version[0]}.{version[1]}; "
                     "minibn.save writes 1.0 or 2.0")


def _read_exactly(f, size: int, where: str) -> np.ndarray:
    """``size`` bytes of ``f`` as a new uint8 array, read in chunks (no second full-size copy)."""
    data = np.empty(size, dtype=np.uint8)
    view = memoryview(data)
    filled = 0
    while filled < size:
        got = f.readinto(view[filled:filled + _READ_CHUNK])
        if not got:
            raise ValueError(f"load: {where} ends after {filled} of its {size} bytes of array data")
        filled += got
    if f.read(1) != b"":                                   # reading to the end checks the CRC
        raise ValueError(f"load: {where} has bytes after its {size} bytes of array data")
    return data
