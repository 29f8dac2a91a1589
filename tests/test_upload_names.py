"""Upload file names as clients send them, turned into safe stems and keys."""

from __future__ import annotations

import pytest

from serve_app.upload_names import MAX_NAME_BYTES, safe_filename, safe_stem


@pytest.mark.parametrize(
    ("name", "filename", "stem"),
    [
        ("test_000.jpg", "test_000.jpg", "test_000"),
        ("a.b.png", "a.b.png", "a.b"),
        ("../../etc/passwd.jpg", "passwd.jpg", "passwd"),
        ("C:\\photos\\me.jpg", "me.jpg", "me"),
        ("a\x00b\x1f\x7f.jpg", "ab.jpg", "ab"),
        ("evil\u202e.jpg", "evil.jpg", "evil"),  # bidi override: a format character
        ("..", "upload", "upload"),
        ("", "upload", "upload"),
        (None, "upload", "upload"),
        ("dir/", "upload", "upload"),
        ("Zoë café.jpg", "Zoë café.jpg", "Zoë café"),
    ],
)
def test_names_become_safe(name: str | None, filename: str, stem: str) -> None:
    assert safe_filename(name) == filename
    assert safe_stem(name) == stem


def test_long_names_are_cut_but_keep_their_extension() -> None:
    name = safe_filename("x" * 300 + ".jpg")
    assert name.endswith(".jpg") and len(name.encode()) == MAX_NAME_BYTES
    accented = safe_filename("é" * 300 + ".jpg")  # two bytes each: never cut inside a character
    assert accented.endswith(".jpg") and len(accented.encode()) <= MAX_NAME_BYTES
    accented.encode().decode()

    assert not safe_filename("a" * 199 + " " + "b" * 100).endswith(" ")
