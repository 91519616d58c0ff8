"""The figures pipeline: every figure registered, committed with its numbers, reproducible byte for byte.

* every registered figure has ``figures/NAME.png`` and ``figures/NAME.json``
  committed, and every PNG there belongs to a registered figure and has its JSON;
* PNGs carry no timestamp or version text (checked chunk by chunk);
* rendering is deterministic: the section 4 figures rendered in this process
  and in a child process with another hash seed give identical bytes, equal to
  the committed files.  Every figure, rendered by two processes side by side
  (one via ``python -m minibn article``, one via ``python -m minibn figures``),
  gives identical bytes too; that takes minutes (some figures train networks),
  so it runs when ``MINIBN_TEST_ALL_FIGURES=1``.
"""
from __future__ import annotations

import filecmp
import json
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from lesson_utils import REPO

from minibn import figures as pipeline
from minibn.engines import default_engine_name

FIG_DIR = os.path.join(REPO, "figures")
SECTION4 = ("s4_static_vs_dynamic", "s4_nonstationary")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT_CHUNKS = {b"tEXt", b"zTXt", b"iTXt", b"tIME"}


def registered():
    return list(pipeline.load_all())


def png_chunks(path):
    """``[(type, data)]`` of a PNG file, checking the signature and each chunk's CRC."""
    import zlib
    with open(path, "rb") as f:
        blob = f.read()
    assert blob[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    chunks, i = [], 8
    while i < len(blob):
        (n,) = struct.unpack(">I", blob[i:i + 4])
        kind, data = blob[i + 4:i + 8], blob[i + 8:i + 8 + n]
        (crc,) = struct.unpack(">I", blob[i + 8 + n:i + 12 + n])
        assert zlib.crc32(kind + data) & 0xFFFFFFFF == crc, f"{path}: bad CRC in chunk {kind!r}"
        chunks.append((kind, data))
        i += 12 + n
    assert chunks and chunks[-1][0] == b"IEND"
    return chunks


def files_in(directory, ext):
    return sorted(f[:-len(ext)] for f in os.listdir(directory) if f.endswith(ext)) \
        if os.path.isdir(directory) else []


# --------------------------------------------------------------------------- registry and committed files

def test_registry_names_and_section_modules():
    names = registered()
    for name in SECTION4:
        assert name in names
    for name in names:
        assert re.fullmatch(r"s\d_[a-z0-9_]+", name), f"figure name {name!r} is not sN_short_name"
    modules = {fn.__module__.rsplit(".", 1)[-1] for fn in pipeline.FIGURES.values()}
    assert modules <= set(pipeline.SECTION_MODULES)


def test_every_registered_figure_is_committed_with_its_numbers():
    names = registered()
    pngs, jsons = files_in(FIG_DIR, ".png"), files_in(FIG_DIR, ".json")
    missing = [n for n in names if n not in pngs or n not in jsons]
    assert not missing, (f"figures registered but not generated into figures/: {missing} "
                         "(run `python -m minibn figures NAME`)")
    orphans = [p for p in pngs if p not in names]
    assert not orphans, f"PNGs in figures/ that no registered figure produces: {orphans}"
    no_json = [p for p in pngs if p not in jsons]
    assert not no_json, f"PNGs in figures/ without their JSON numbers: {no_json}"
    for name in jsons:
        with open(os.path.join(FIG_DIR, name + ".json")) as f:
            json.load(f)                                                   # valid JSON


# --------------------------------------------------------------------------- no metadata

def test_save_figure_writes_no_timestamp_or_version(tmp_path):
    plt = pipeline.pyplot()
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    png, js = pipeline.save_figure(fig, {"x": np.arange(3), "y": np.float32(1.5)}, str(tmp_path), "probe")
    kinds = [k for k, _ in png_chunks(png)]
    assert not TEXT_CHUNKS & set(kinds), f"metadata chunks found: {kinds}"
    with open(png, "rb") as f:
        blob = f.read()
    for marker in (b"matplotlib", b"Matplotlib", b"Software", b"Creation Time"):
        assert marker not in blob
    with open(js) as f:
        assert json.load(f) == {"x": [0, 1, 2], "y": 1.5}


def test_committed_pngs_have_no_metadata():
    pngs = files_in(FIG_DIR, ".png")
    assert pngs, "figures/ holds no PNG"
    for name in pngs:
        kinds = {k for k, _ in png_chunks(os.path.join(FIG_DIR, name + ".png"))}
        assert not TEXT_CHUNKS & kinds, f"{name}.png carries metadata chunks {TEXT_CHUNKS & kinds}"


# --------------------------------------------------------------------------- determinism

def _cli(args, hashseed):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONHASHSEED=str(hashseed))
    return subprocess.Popen([sys.executable, "-m", "minibn", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc, what, timeout=900):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"`python -m minibn {what}` failed:\n{out[-3000:]}\n{err[-5000:]}"
    return out


@pytest.mark.slow
def test_section4_figures_are_identical_across_processes_and_match_the_committed_files(tmp_path):
    """One rendering in this process, one in a child process with another hash seed, side by side."""
    a, b = tmp_path / "here", tmp_path / "child"
    child = _cli(["figures", "--quiet", "--out", str(b), *SECTION4], hashseed=12345)
    pipeline.make_figures(str(a), names=SECTION4, progress=False)
    _wait(child, "figures")
    for name in SECTION4:
        for ext in (".png", ".json"):
            fa, fb = a / (name + ext), b / (name + ext)
            assert filecmp.cmp(fa, fb, shallow=False), f"{name}{ext} differs between two processes"
            if default_engine_name() != "numpy":
                continue          # the committed figures are made with the default numpy engine
            committed = os.path.join(FIG_DIR, name + ext)
            assert filecmp.cmp(fa, committed, shallow=False), \
                f"figures/{name}{ext} is out of date (regenerate: python -m minibn figures {name})"


ALL = os.environ.get("MINIBN_TEST_ALL_FIGURES", "") not in ("", "0")


@pytest.mark.slow
@pytest.mark.skipif(not ALL, reason="renders every figure twice and runs every lesson (minutes); "
                                    "set MINIBN_TEST_ALL_FIGURES=1")
def test_all_figures_are_identical_across_processes_and_article_runs(tmp_path):
    """``article`` (every lesson, then every figure) and ``figures``, run side by side."""
    a, b = tmp_path / "article", tmp_path / "figures"
    lessons = sorted(f for f in os.listdir(os.path.join(REPO, "lessons")) if re.match(r"\d\d_.*\.py$", f))
    procs = [_cli(["article", "--quiet", "--out", str(a)], 1), _cli(["figures", "--quiet", "--out", str(b)], 2)]
    article_out = _wait(procs[0], "article")
    _wait(procs[1], "figures")
    names = registered()
    for d in (a, b):
        assert sorted(os.listdir(d)) == sorted([n + ".png" for n in names] + [n + ".json" for n in names])
    differ = [f for f in sorted(os.listdir(a)) if not filecmp.cmp(a / f, b / f, shallow=False)]
    assert not differ, f"figures that differ between two processes: {differ}"
    for lesson in lessons:
        assert lesson in article_out, f"`article` did not run {lesson}"
