"""Files opened once and only under their root (issue #14, points 4 and 5).

What is opened is observed with the kernel's own record, inotify: every open of a file in a watched
folder by this process, whatever library made it (h5py, tifffile and ONNX Runtime open files in C).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import struct
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from defectscope.errors import ModelUnavailable, PathNotAllowed
from defectscope.model.predictor import Predictor
from defectscope.preprocessing.loaders import load_map, open_under_root
from defectscope.preprocessing.scans import load_spec_tiff_scan
from defectscope.server.client import Client

from conftest import bragg_map
from test_loaders import write_ome_tiff

IN_CLOSE, IN_OPEN, IN_ISDIR = 0x08 | 0x10, 0x20, 0x40000000


class OpenWatch:
    """The names of the files opened in ``folder`` since the last call of ``opened`` (inotify IN_OPEN).

    The kernel queues the event inside the open call, so once a call has returned its opens are here.
    Closes are watched too: inotify merges an event into an identical one just before it, so a file opened,
    closed and opened again shows two opens only with the close between them."""

    def __init__(self, folder: Path):
        if not sys.platform.startswith("linux"):
            pytest.skip("inotify is Linux's")
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0 or libc.inotify_add_watch(self._fd, os.fsencode(folder), IN_OPEN | IN_CLOSE) < 0:
            pytest.skip(f"inotify unavailable: {os.strerror(ctypes.get_errno())}")

    def opened(self) -> list[str]:
        names = []
        while True:
            try:
                buf = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                return names
            at = 0
            while at < len(buf):
                _, mask, _, size = struct.unpack_from("iIII", buf, at)
                name = buf[at + 16 : at + 16 + size].rstrip(b"\0").decode()
                if mask & IN_OPEN and not mask & IN_ISDIR:
                    names.append(name)
                at += 16 + size

    def close(self):
        os.close(self._fd)


@pytest.fixture
def watch():
    watches = []

    def make(folder):
        watches.append(OpenWatch(folder))
        return watches[-1]

    yield make
    for w in watches:
        w.close()


@pytest.fixture
def tree(tmp_path):
    """A data root with a map and a sub-folder, and a folder outside it holding a secret map."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    amap = bragg_map(seed=3)
    np.save(root / "map.npy", amap)
    np.save(outside / "secret.npy", amap + 1)
    return root, outside, amap


def read(root, path) -> np.ndarray:
    fh, name = open_under_root(root, path)
    with fh:
        return load_map(fh, name=name)


# --- open_under_root ------------------------------------------------------------------------------
def test_files_under_the_root_open_with_their_name_under_it(tree):
    root, _, amap = tree
    np.save(root / "sub" / "deep.npy", amap)
    for path, name in (("map.npy", "map.npy"), ("./sub//deep.npy", "sub/deep.npy"), (str(root / "sub/deep.npy"), "sub/deep.npy")):
        fh, opened = open_under_root(root, path)
        with fh:
            assert opened == name and np.array_equal(load_map(fh), amap)


@pytest.mark.parametrize("path", ["../outside/secret.npy", "sub/../map.npy", "/etc/hostname", "", "map.npy\x00",
                                  "absent.npy", "sub", "sub/", ".", "map.npy/x"])
def test_paths_that_are_not_a_file_under_the_root_are_refused(tree, watch, path):
    root, outside, _ = tree
    seen = watch(outside)
    with pytest.raises(PathNotAllowed):
        open_under_root(root, path)
    assert seen.opened() == []


def test_symlinks_are_followed_only_while_they_stay_under_the_root(tree, watch):
    root, outside, amap = tree
    (root / "alias.npy").symlink_to("map.npy")
    (root / "absolute.npy").symlink_to(root / "map.npy")
    (root / "sub" / "up.npy").symlink_to("../map.npy")  # '..' in a link's target, staying inside
    (root / "here").symlink_to("sub")
    for path in ("alias.npy", "absolute.npy", "sub/up.npy", "here/up.npy"):
        assert np.array_equal(read(root, path), amap), path

    (root / "out.npy").symlink_to(outside / "secret.npy")
    (root / "out_rel.npy").symlink_to("../outside/secret.npy")
    (root / "sub" / "far.npy").symlink_to("../../outside/secret.npy")
    (root / "door").symlink_to(outside)
    (root / "loop_a").symlink_to("loop_b")
    (root / "loop_b").symlink_to("loop_a")
    seen = watch(outside)
    for path in ("out.npy", "out_rel.npy", "sub/far.npy", "door/secret.npy", "loop_a"):
        with pytest.raises(PathNotAllowed):
            open_under_root(root, path)
    assert seen.opened() == [], "a link out of the root was refused before its target was touched"


def test_a_symlink_swapped_in_after_the_open_redirects_nothing(tree, watch):
    """What was checked is what is read: the file is opened once, and replacing its name by a link out of the
    root afterwards changes nothing; a link in its place before the open is refused."""
    root, outside, amap = tree
    seen = watch(outside)
    fh, _ = open_under_root(root, "map.npy")
    (root / "swap.npy").symlink_to(outside / "secret.npy")
    os.replace(root / "swap.npy", root / "map.npy")
    with fh:
        assert np.array_equal(load_map(fh), amap)
    with pytest.raises(PathNotAllowed, match="out of the data root"):
        open_under_root(root, "map.npy")
    assert seen.opened() == []


def test_a_fifo_is_refused_without_waiting_for_a_writer(tree):
    root, _, _ = tree
    os.mkfifo(root / "pipe.npy")
    with pytest.raises(PathNotAllowed, match="not a regular file"):
        open_under_root(root, "pipe.npy")


# --- through a real server ------------------------------------------------------------------------
def test_each_file_format_is_opened_once_by_the_server(make_server, tree, watch):
    """Issue #14.5: checked by name and then opened by name, a file could be two files. The server opens a
    request's file once and reads the map, header and data, from that open file."""
    root, _, amap = tree
    with h5py.File(root / "map.h5", "w") as f:
        f["entry/data"] = amap
    tifffile.imwrite(root / "map.tif", amap)
    np.savez(root / "map.npz", data=amap)
    server = make_server(data_root=root)
    seen = watch(root)
    with Client(server.endpoint, timeout_s=30, retries=0) as client:
        for name, dataset in (("map.npy", None), ("map.npz", None), ("map.tif", None), ("map.h5", "entry/data")):
            reply = client.classify_file(name, dataset)
            assert reply["ok"], reply
            assert seen.opened() == [name], f"{name} opened more than once"


def test_ome_tiff_that_names_a_file_outside_the_root_is_refused_by_the_server(make_server, tree, watch):
    """Issue #14.4: an OME-TIFF under the root whose OME-XML takes a plane from a file outside it gets
    PATH_NOT_ALLOWED, and the outside file is never opened."""
    root, outside, _ = tree
    amap = bragg_map(seed=5).astype(np.float32)
    tifffile.imwrite(outside / "secret.tif", amap[63:], metadata=None, photometric="minisblack")
    write_ome_tiff(root / "relative.ome.tif", amap[:63], others=["../outside/secret.tif"])
    write_ome_tiff(root / "sub" / "absolute.ome.tif", amap[:63], others=[str(outside / "secret.tif")])
    write_ome_tiff(root / "whole.ome.tif", amap)
    server = make_server(data_root=root)
    seen = watch(outside)
    with Client(server.endpoint, timeout_s=30, retries=0) as client:
        for path in ("relative.ome.tif", "sub/absolute.ome.tif"):
            with pytest.raises(PathNotAllowed, match="another file"):
                client.classify_file(path)
        assert seen.opened() == []
        assert client.classify_file("whole.ome.tif")["ok"]  # an OME-TIFF holding its own data is served


def test_ome_tiff_loader_opens_nothing_outside(tree, watch):
    root, outside, _ = tree
    tifffile.imwrite(outside / "secret.tif", np.full((1, 6, 7), 7777, np.uint16), metadata=None)
    write_ome_tiff(root / "evil.ome.tif", np.zeros((2, 6, 7), np.uint16), others=["../outside/secret.tif"])
    seen = watch(outside)
    with pytest.raises(PathNotAllowed, match="another file"):
        load_map(root / "evil.ome.tif")
    with pytest.raises(PathNotAllowed, match="another file"):
        read(root, "evil.ome.tif")
    assert seen.opened() == []


def test_raw_scan_frames_naming_other_files_are_refused(tmp_path, watch):
    """The raw-scan TIFF reader reads a frame's first page (no OME series), so it never followed the file
    names; a frame whose OME-XML says its data lie in other files is now refused like a map."""
    from test_scans import raw_frames, write_frames, write_spec

    frames = raw_frames()
    spec, folder = write_spec(tmp_path / "fake.spec"), write_frames(tmp_path / "frames", frames)
    (tmp_path / "outside").mkdir()
    tifffile.imwrite(tmp_path / "outside" / "secret.tif", frames[:1].astype(np.uint16), metadata=None)
    write_ome_tiff(folder / "scan_f_4.tif", frames[3:4].astype(np.uint16), others=["../outside/secret.tif"])
    seen = watch(tmp_path / "outside")
    with pytest.raises(PathNotAllowed, match="scan_f_4.tif"):
        load_spec_tiff_scan(spec, 7, folder)
    assert seen.opened() == []


# --- model files ----------------------------------------------------------------------------------
def test_model_file_is_read_once_and_its_hash_is_of_those_bytes(fixture_model, tmp_path, watch):
    """Issue #14.5: hashed by one open and loaded by another, a model file replaced in between would serve
    one model under another's sha256. The bytes are read once, hashed, and the session built from them."""
    path = tmp_path / "model.onnx"
    path.write_bytes(fixture_model.read_bytes())
    seen = watch(tmp_path)
    predictor = Predictor(path, provider="cpu", warmup=False)
    assert seen.opened() == ["model.onnx"]
    assert predictor.describe()["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_model_with_weights_in_other_files_is_refused(fixture_model, tmp_path):
    """The sha256 a reply names must cover every byte that serves: weights kept in external data files are
    not in it, so such a model is not loaded."""
    import onnx

    onnx.save_model(onnx.load(str(fixture_model)), str(tmp_path / "split.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    with pytest.raises(ModelUnavailable, match="cannot be loaded"):
        Predictor(tmp_path / "split.onnx", provider="cpu", warmup=False)
