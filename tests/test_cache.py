"""Cache housekeeping: the most recently used entries are kept, files and directories alike."""

import os

from taskprune.cache import keep_recent


def test_keep_recent_marks_the_used_entry_and_deletes_the_oldest(tmp_path):
    entries = []
    for i, name in enumerate(["a.gguf", "b", "c.gguf", "d"]):  # a is the oldest, d the newest
        path = tmp_path / name
        if path.suffix:
            path.write_bytes(b"x")
        else:
            path.mkdir()
            (path / "config.json").write_text("{}")
        os.utime(path, (1000 + i, 1000 + i))
        entries.append(path)
    keep_recent(tmp_path / "a.gguf", entries, keep=2)  # a is used now: it and d stay
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "d"]
    keep_recent(tmp_path / "d", list(tmp_path.iterdir()), keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["d"] and (tmp_path / "d" / "config.json").is_file()
