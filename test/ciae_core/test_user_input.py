"""Quoting user input in one-line messages; saying exactly what is wrong with a path."""

from __future__ import annotations

import os

import pytest

from ciae_core.user_input import ECHO_LIMIT, clip, file_problem, quote


def test_quote_keeps_short_input_and_caps_long_input_on_one_line():
    assert quote("rgb8") == "'rgb8'"
    assert quote(42) == "42" and quote((1, 2)) == "(1, 2)"
    assert quote(list(range(1000))).endswith("characters)") and len(quote(list(range(1000)))) < ECHO_LIMIT + 40
    long = quote("x" * 65536)
    assert long.startswith("'" + "x" * ECHO_LIMIT + "'...") and long.endswith("(65536 characters)")
    assert len(long) < ECHO_LIMIT + 40
    assert "\n" not in quote("a\nb" * 100)
    assert clip("p" * 200).endswith("...") and len(clip("p" * 200)) == ECHO_LIMIT + 3
    assert clip("short") == "short"


def test_file_problem_names_the_actual_problem(tmp_path):
    good = tmp_path / "w.safetensors"
    good.write_bytes(b"data")
    assert file_problem(good) is None
    assert file_problem(tmp_path / "missing") == "does not exist"
    assert file_problem(tmp_path) == "is a directory"
    assert file_problem("/dev/zero") == "is a character device"
    assert file_problem(good / "below") == "does not exist (a parent is not a directory)"
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert file_problem(empty) == "is empty"
    assert file_problem(empty, allow_empty=True) is None
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    assert file_problem(link) == "does not exist (dangling symbolic link)"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert file_problem(fifo) == "is a named pipe"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_file_problem_unreadable(tmp_path):
    locked = tmp_path / "locked"
    locked.write_bytes(b"data")
    locked.chmod(0)
    try:
        assert file_problem(locked) == "is not readable (permission denied)"
    finally:
        locked.chmod(0o600)


def test_clip_path_keeps_the_file_name():
    from ciae_core.user_input import clip_path

    assert clip_path("/a/b.safetensors") == "/a/b.safetensors"
    long = "/" + "d" * 500 + "/model.safetensors"
    assert clip_path(long).startswith("...") and clip_path(long).endswith("/model.safetensors")
    assert len(clip_path(long)) == 163
