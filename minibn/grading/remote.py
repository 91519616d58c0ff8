"""The grader's side of a child process: a strict reader of its replies and proxies for its objects.

A case (``conformance.py``) runs in the grading process and talks to the
student's code through :class:`Student` (``c``): ``c.F.batch_norm_forward(x,
w, b, eps)`` sends the inputs to the child (``server.py``), which runs the
student's function and replies with raw outputs.  Arrays come back as NumPy
arrays, numbers as numbers, other objects as :class:`Remote` handles whose
attributes are fetched on access.

Everything the child sends is parsed against a small schema
(:func:`decode`): a known key, an allowed dtype, a shape that matches the
bytes, bounded sizes and depth.  Anything else is a :class:`ProtocolError`,
which fails the case: the child can make its own case fail, never pass.
"""
from __future__ import annotations

import base64
import json
import os
import select
import struct
import time
from typing import Any, List, Optional

import numpy as np

__all__ = ["ProtocolError", "RemoteError", "ChildTimeout", "ChildDied", "Channel", "Remote", "Mut",
           "Callback", "Student", "decode", "encode"]

MAX_MESSAGE = 64 << 20
MAX_DEPTH = 16
MAX_STRING = 4000
ARRAY_DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
                          "uint16", "uint32", "uint64", "bool"})


class ProtocolError(Exception):
    """The child sent something outside the message schema (the case fails)."""


class ChildTimeout(Exception):
    pass


class ChildDied(Exception):
    pass


class RemoteError(Exception):
    """The student's code raised: ``types`` are the names of the exception's classes (MRO)."""

    def __init__(self, types: List[str], message: str, where: str):
        self.types, self.message, self.where = types, message, where
        super().__init__(self.describe())

    @property
    def name(self):
        return self.types[0] if self.types else "Exception"

    @property
    def read_only_write(self):
        return "ValueError" in self.types and "read-only" in self.message

    def describe(self):
        text = f"{self.name}: {self.message}" if self.message else self.name
        if self.read_only_write:
            text = ("input modified in place: your code wrote into an input array, which it must leave "
                    f"unchanged (the grader hands inputs over read-only; {text})")
        if self.where:
            text += f" (at {self.where})"
        return text


# =========================================================================== values

class Mut:
    """An array argument the student's function is meant to update in place (a running buffer).

    The child gets a writable copy; after the call ``value`` holds what the
    function left in it (the grader's own array is never touched)."""

    def __init__(self, value):
        self.value = np.array(value, copy=True)


class Callback:
    """A reduce hook run in the child: ``f(s1, s2) -> (s1 + add1, s2 + add2)``; ``calls`` counts its calls."""

    def __init__(self, add1, add2):
        self.add1, self.add2, self.calls = np.asarray(add1, np.float64), np.asarray(add2, np.float64), 0


def _array(arr, writable=False):
    arr = np.ascontiguousarray(arr)
    return {"$a": [arr.dtype.name, list(arr.shape), base64.b64encode(arr.tobytes()).decode("ascii"), writable]}


def encode(value):
    """A request argument (the grader's values) in the wire format."""
    if isinstance(value, Mut):
        return _array(value.value, writable=True)
    if isinstance(value, Callback):
        return {"$cb": [_array(value.add1), _array(value.add2)]}
    if isinstance(value, Remote):
        return {"$r": value._handle}
    if isinstance(value, type) and issubclass(value, np.generic):
        return {"$dt": np.dtype(value).name}
    if isinstance(value, (np.ndarray, np.generic)):
        if value.dtype.name not in ARRAY_DTYPES:
            raise TypeError(f"cannot send an array of dtype {value.dtype}")
        return _array(np.asarray(value))
    if isinstance(value, tuple):
        return {"$t": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot send {type(value).__name__}")


def decode(value, channel=None, depth=0):
    """A value from the child, checked against the schema."""
    if depth > MAX_DEPTH:
        raise ProtocolError("reply nested too deeply")
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise ProtocolError("string too long in reply")
        return value
    if isinstance(value, list):
        return [decode(v, channel, depth + 1) for v in value]
    if not isinstance(value, dict) or len(value) not in (1, 2):
        raise ProtocolError(f"unexpected value in reply: {type(value).__name__}")
    if set(value) == {"$a"}:
        return _decode_array(value["$a"])
    if set(value) == {"$t"} and isinstance(value["$t"], list):
        return tuple(decode(v, channel, depth + 1) for v in value["$t"])
    if set(value) == {"$o", "type"} and type(value["$o"]) is int and isinstance(value["type"], str):
        return Remote(channel, value["$o"], value["type"][:100])
    raise ProtocolError(f"unexpected object in reply (keys {sorted(value)[:5]})")


def _decode_array(spec):
    if not (isinstance(spec, list) and len(spec) == 4):
        raise ProtocolError("malformed array in reply")
    dtype, shape, data, _ = spec
    if dtype not in ARRAY_DTYPES:
        raise ProtocolError(f"array of dtype {dtype!r} in reply")
    if not (isinstance(shape, list) and len(shape) <= 8 and all(type(s) is int and 0 <= s for s in shape)):
        raise ProtocolError("malformed array shape in reply")
    if not isinstance(data, str):
        raise ProtocolError("malformed array data in reply")
    try:
        raw = base64.b64decode(data.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ProtocolError("malformed array data in reply") from None
    dt = np.dtype(dtype)
    if len(raw) != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
        raise ProtocolError("array data does not match its shape in reply")
    arr = np.frombuffer(raw, dtype=dt).reshape(shape).copy()
    return arr[()] if arr.ndim == 0 else arr


# =========================================================================== the channel

class Channel:
    """Requests to one child process and its replies, each within the case's deadline."""

    def __init__(self, req_fd: int, rep_fd: int, deadline: float, on_timeout):
        self.req_fd, self.rep_fd, self.deadline, self.on_timeout = req_fd, rep_fd, deadline, on_timeout

    def _read(self, n: int) -> bytes:
        chunks = []
        while n:
            left = self.deadline - time.monotonic()
            ready = select.select([self.rep_fd], [], [], max(0.0, left))[0] if left > 0 else []
            if not ready:
                self.on_timeout()
                raise ChildTimeout()
            chunk = os.read(self.rep_fd, min(n, 1 << 20))
            if not chunk:
                raise ChildDied()
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def receive(self) -> dict:
        (n,) = struct.unpack(">I", self._read(4))
        if n > MAX_MESSAGE:
            raise ProtocolError(f"reply of {n} bytes is over the limit")
        try:
            message = json.loads(self._read(n).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ProtocolError("a reply that is not JSON") from None
        if not isinstance(message, dict):
            raise ProtocolError("a reply that is not an object")
        return message

    def request(self, message: dict) -> dict:
        data = json.dumps(message).encode("utf-8")
        try:
            os.write(self.req_fd, struct.pack(">I", len(data)))
            view = memoryview(data)
            while view:
                view = view[os.write(self.req_fd, view):]
        except (BrokenPipeError, OSError):
            raise ChildDied() from None
        reply = self.receive()
        if set(reply) == {"err"}:
            raise _remote_error(reply["err"])
        if "ok" not in reply or not set(reply) <= {"ok", "args", "facts", "calls"}:
            raise ProtocolError(f"unexpected reply keys {sorted(reply)[:6]}")
        return reply


def _remote_error(err) -> RemoteError:
    if not (isinstance(err, dict) and isinstance(err.get("types"), list) and isinstance(err.get("message"), str)):
        raise ProtocolError("malformed error reply")
    types = [t[:100] for t in err["types"][:20] if isinstance(t, str)]
    return RemoteError(types, err["message"][:MAX_STRING], str(err.get("where", ""))[:200])


# =========================================================================== proxies

def call(channel, target: dict, args, kwargs, facts=()):
    """Call ``target`` in the child: ``(result, facts)``; ``Mut`` arguments get their new contents."""
    reply = channel.request({"op": "call", "target": target, "args": [encode(a) for a in args],
                             "kwargs": {k: encode(v) for k, v in kwargs.items()},
                             "facts": [list(f) for f in facts]})
    result = decode(reply["ok"], channel)
    returned = reply.get("args", [])
    if not isinstance(returned, list) or len(returned) != len(args):
        raise ProtocolError("reply does not describe the arguments")
    for arg, after in zip(args, returned):
        if isinstance(arg, Mut):
            value = decode(after, channel)
            if not isinstance(value, (np.ndarray, np.generic)):
                raise ProtocolError("a writable argument did not come back as an array")
            arg.value = np.asarray(value)
    calls = reply.get("calls", [])
    callbacks = [a for a in list(args) + list(kwargs.values()) if isinstance(a, Callback)]
    if not isinstance(calls, list) or len(calls) != len(callbacks) or not all(type(n) is int for n in calls):
        raise ProtocolError("reply does not count the hook's calls")
    for cb, n in zip(callbacks, calls):
        cb.calls += n
    got = reply.get("facts", [])
    if not isinstance(got, list) or len(got) != len(facts) or not all(f in (True, False, None) for f in got):
        raise ProtocolError("malformed facts in reply")
    return result, got


class Remote:
    """An object that lives in the child: attributes are fetched, calls are requests."""

    def __init__(self, channel, handle: int, type_name: str, path: str = ""):
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "_handle", handle)
        object.__setattr__(self, "_type", type_name)
        object.__setattr__(self, "_path", path)

    def _target(self, attr=""):
        path = ".".join(p for p in (self._path, attr) if p)
        return {"obj": self._handle, "path": path}

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        reply = self._channel.request({"op": "get", "target": self._target(name)})
        return decode(reply["ok"], self._channel)

    def __call__(self, *args, **kwargs):
        return call(self._channel, self._target(), args, kwargs)[0]

    def set(self, path: str, value, inplace=False):
        """``obj.<path> = value`` (``inplace``: ``obj.<path>[...] = value``) in the child."""
        self._channel.request({"op": "set", "target": self._target(path), "value": encode(value),
                               "inplace": bool(inplace)})

    def __repr__(self):
        return f"<{self._type} in the student's process>"


class Path:
    """A name in one of the student's modules (``c.F.batch_norm_forward``): call it, or ask for facts."""

    def __init__(self, channel, module: str, path: str):
        self._channel, self._module, self._path = channel, module, path

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return Path(self._channel, self._module, f"{self._path}.{name}" if self._path else name)

    def __call__(self, *args, **kwargs):
        return self.with_facts((), *args, **kwargs)[0]

    def with_facts(self, facts, *args, **kwargs):
        """``(result, [fact, ...])``: facts are ``(kind, ref, ref)`` with kind ``same`` (``is``) or
        ``shares`` (shared memory) and refs ``r[.path]`` (the result) or ``aN[.path]`` (argument N)."""
        return call(self._channel, {"mod": self._module, "path": self._path}, args, kwargs, facts)

    def get(self):
        reply = self._channel.request({"op": "get", "target": {"mod": self._module, "path": self._path}})
        return decode(reply["ok"], self._channel)


class Student:
    """``c`` of a case: the student's modules (``c.F``, ``c.M``, ``c.SN``, ``c.nn``, ``c.dist``, ``c.mb``)."""

    MODULES = {"F": "minibn.functional", "M": "minibn.moments", "SN": "minibn.sample_norms", "nn": "minibn.nn",
               "dist": "minibn.distributed", "mb": "minibn"}

    def __init__(self, channel, comm=None):
        self.channel, self.comm = channel, comm
        for attr, module in self.MODULES.items():
            setattr(self, attr, Path(channel, module, ""))


def typename(obj: Any) -> str:
    return obj._type if isinstance(obj, Remote) else type(obj).__name__


def expected_ready(message: dict) -> Optional[str]:
    """The path the child imported minibn from (its first message), or ``None`` when malformed."""
    ok = message.get("ok")
    if isinstance(ok, dict) and set(ok) == {"ready"} and isinstance(ok["ready"], str):
        return ok["ready"][:1000]
    return None
