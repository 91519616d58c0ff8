"""The grading child: runs a student's functions on request and sends back raw outputs only.

This file is copied next to an assembled submission and run as
``python -I -S server.py CONFIG_JSON``; it imports nothing of the grader (it
must not be able to: the grader's package is not on ``sys.path``).  It holds
no expected value, no tolerance and no verdict.  Requests come on file
descriptor ``REQ``, replies go on ``REP`` (both named in the config); every
message is a 4-byte big-endian length and a JSON document.  The student's
prints go to this process's standard output and error, which the grader keeps
apart from the replies.

A reply is only data (arrays, numbers, strings, handles of objects that stay
in this process) and the facts the grader asked for; the grader parses it with
a fixed schema and decides everything itself, so a student's code that writes
into the reply channel can only make its own cases fail.

Requests (``target``: ``{"mod": "minibn.functional", "path": "name"}`` or
``{"obj": handle, "path": "attr.attr"}``, the path may be empty)::

    {"op": "call", "target": T, "args": [...], "kwargs": {...}, "facts": [[kind, a, b], ...]}
    {"op": "get", "target": T}
    {"op": "set", "target": T, "value": v, "inplace": bool}

Arguments: plain JSON values; ``{"$a": [dtype, shape, base64, writable]}`` an
array (read-only unless ``writable``); ``{"$t": [...]}`` a tuple; ``{"$r": h}``
an object held here; ``{"$dt": name}`` a NumPy scalar type;
``{"$cb": [a, b]}`` a reduce hook ``f(s1, s2) -> (s1 + a,
s2 + b)`` whose calls are counted.  Replies: ``{"ok": value, "args": [...],
"facts": [...], "calls": [...]}`` or ``{"err": {"types": [...], "message": str,
"where": str}}``.
"""
import base64
import json
import os
import struct
import sys
import traceback

CONFIG = json.loads(sys.argv[1])
sys.path[:] = [CONFIG["root"]] + CONFIG["path"]
os.chdir(CONFIG["cwd"])

import numpy as np  # noqa: E402  (after sys.path is set)

ARRAY_DTYPES = {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
                "uint32", "uint64", "bool"}
REQ = os.fdopen(CONFIG["req"], "rb", buffering=0)
REP = os.fdopen(CONFIG["rep"], "wb", buffering=0)
HANDLES = []
CALLBACK_CALLS = []


def read_exact(n):
    chunks = []
    while n:
        chunk = REQ.read(n)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def receive():
    (n,) = struct.unpack(">I", read_exact(4))
    return json.loads(read_exact(n).decode("utf-8"))


def send(message):
    data = json.dumps(message).encode("utf-8")
    REP.write(struct.pack(">I", len(data)) + data)


def hold(obj):
    HANDLES.append(obj)
    return {"$o": len(HANDLES) - 1, "type": type(obj).__name__}


def encode(value, depth=0):
    if depth > 12:
        return hold(value)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)) and type(value) in (int, float, bool):
        return value
    if isinstance(value, np.generic) and value.dtype.name in ARRAY_DTYPES:
        return encode(np.asarray(value), depth)
    if isinstance(value, np.ndarray) and value.dtype.name in ARRAY_DTYPES:
        data = np.ascontiguousarray(value).tobytes()
        return {"$a": [value.dtype.name, list(value.shape), base64.b64encode(data).decode("ascii"), False]}
    if type(value) in (tuple, list):
        items = [encode(v, depth + 1) for v in value]
        return {"$t": items} if isinstance(value, tuple) else items
    return hold(value)


def callback(a, b):
    index = len(CALLBACK_CALLS)
    CALLBACK_CALLS.append(0)

    def reduce(s1, s2):
        CALLBACK_CALLS[index] += 1
        return np.asarray(s1) + a, np.asarray(s2) + b
    return reduce


def decode(value):
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "$a" in value:
        dtype, shape, data, writable = value["$a"]
        arr = np.frombuffer(base64.b64decode(data), dtype=dtype).reshape(shape)   # a read-only buffer
        return arr.copy() if writable else arr
    if "$t" in value:
        return tuple(decode(v) for v in value["$t"])
    if "$dt" in value:
        return np.dtype(value["$dt"]).type
    if "$r" in value:
        return HANDLES[value["$r"]]
    if "$cb" in value:
        return callback(*(decode(v) for v in value["$cb"]))
    return {k: decode(v) for k, v in value.items()}


def walk(obj, path):
    for part in [p for p in path.split(".") if p]:
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def resolve(target):
    if "mod" in target:
        import importlib
        base = importlib.import_module(target["mod"])
    else:
        base = HANDLES[target["obj"]]
    return base, target.get("path", "")


def fact(kind, a, b, result, args):
    def at(ref):
        head, _, rest = ref.partition(".")
        base = result if head == "r" else args[int(head[1:])]
        return walk(base, rest)
    try:
        x, y = at(a), at(b)
    except Exception:
        return None
    if kind == "same":
        return x is y
    if kind == "shares":
        return bool(isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and np.shares_memory(x, y))
    return None


def where(exc):
    root = os.path.realpath(CONFIG["root"]) + os.sep
    frames = [fr for fr in traceback.extract_tb(exc.__traceback__)
              if os.path.realpath(fr.filename).startswith(root)]
    if not frames:
        return ""
    fr = frames[-1]
    return f"{os.path.relpath(os.path.realpath(fr.filename), root)}:{fr.lineno}"


def handle(request):
    op = request["op"]
    base, path = resolve(request["target"])
    if op == "get":
        return {"ok": encode(walk(base, path))}
    if op == "set":
        owner_path, _, attr = path.rpartition(".")
        value = decode(request["value"])
        if request.get("inplace"):
            walk(base, path)[...] = value
        else:
            setattr(walk(base, owner_path), attr, value)
        return {"ok": None}
    if op == "call":
        first_callback = len(CALLBACK_CALLS)
        args = decode(request.get("args", []))
        kwargs = decode(request.get("kwargs", {}))
        result = walk(base, path)(*args, **kwargs)
        reply = {"ok": encode(result),
                 "args": [encode(a) if isinstance(a, np.ndarray) and a.flags.writeable else None for a in args],
                 "calls": CALLBACK_CALLS[first_callback:]}
        reply["facts"] = [fact(k, a, b, result, args) for k, a, b in request.get("facts", [])]
        return reply
    raise ValueError(f"unknown request {op!r}")


def main():
    import minibn  # noqa: F401  (the package under test: a failing import is reported once)
    send({"ok": {"ready": os.path.realpath(minibn.__file__)}})
    while True:
        try:
            request = receive()
        except EOFError:
            return
        try:
            reply = handle(request)
        except BaseException as exc:  # noqa: B902 - a student's SystemExit is an error of the call
            types = [t.__name__ for t in type(exc).__mro__]
            reply = {"err": {"types": types, "message": str(exc)[:2000], "where": where(exc)}}
        send(reply)


if __name__ == "__main__":
    try:
        main()
    except BaseException as exc:  # noqa: B902 - the import of minibn failed
        send({"err": {"types": [t.__name__ for t in type(exc).__mro__], "message": str(exc)[:2000],
                      "where": where(exc), "import": True}})
    sys.stdout.flush()
    os._exit(0)
