"""The cost benchmark's fairness helper: every method must find the same (warm) page cache."""
import builtins

from benchmarks.transfer_cost import warm_page_cache


def test_warm_page_cache_reads_model_dirs_and_files_once(tmp_path, monkeypatch):
    model = tmp_path / "model"
    (model / "shards").mkdir(parents=True)
    for f in [model / "manifest.json", model / "config.json", model / "shards" / "model.safetensors"]:
        f.write_bytes(b"x" * 100)
    cache = tmp_path / "cache" / "teacher.pt"
    cache.parent.mkdir()
    cache.write_bytes(b"y" * 100)
    (cache.parent / "unrelated.pt").write_bytes(b"z")  # beside a plain input: not read
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    warm_page_cache([str(model / "manifest.json"), str(cache), str(cache)])
    assert sorted(opened) == sorted(map(str, [model / "manifest.json", model / "config.json",
                                              model / "shards" / "model.safetensors", cache]))
