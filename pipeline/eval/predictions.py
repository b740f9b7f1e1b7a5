"""Label maps of a finished (or partial) labeling run, read the way FORMAT.md lets any reader read them.

Only committed shards exist: a shard is read from `OUT/labels/<shard>.tar` only when
`OUT/_commits/<shard>.json` is present. One shard's PNG bytes are held at a time (compressed maps are
small); each map is decoded when its truth sample asks for it.

The run's class ids are mapped to the truth's by class name (`OUT/_run/vocabulary.json`), so a run
labeled with the classes in another order, or with extra classes, is still scored fairly: a predicted
class the truth does not know counts as a miss, like the ignore value.
"""

from __future__ import annotations

import logging
import tarfile

import numpy as np

from pipeline import schema
from pipeline.eval.truth import read_label_map
from pipeline.io import fs
from pipeline.outputs import committed_shards
from pipeline.vocab import Vocabulary, load_vocabulary

logger = logging.getLogger(__name__)


class RunOutputPredictions:
    """Committed label maps under a run's output URL, looked up by (shard, key)."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = storage_options
        if not fs.exists(fs.join(self.url, schema.COMMITS_DIR), storage_options):
            raise FileNotFoundError(f"{url} is not a labeling run's output: no {schema.COMMITS_DIR}/ folder")
        self.committed = frozenset(committed_shards(self.url, storage_options))
        vocab_url = fs.join(self.url, schema.VOCAB_FILE)
        self.vocab = load_vocabulary(vocab_url, storage_options) if fs.exists(vocab_url, storage_options) else None
        self._shard: str | None = None
        self._maps: dict[str, bytes] = {}
        self._lut: np.ndarray | None = None

    def align_to(self, truth_vocab: Vocabulary) -> None:
        """Map the run's class ids onto `truth_vocab`'s ids by display name (a no-op for equal lists)."""
        if self.vocab is None or self.vocab.display_names == truth_vocab.display_names:
            self._lut = None
            return
        ids = {name.lower(): i for i, name in enumerate(truth_vocab.display_names)}
        k = len(truth_vocab)
        lut = np.full(65536, k, dtype=np.int64)  # unknown classes and ignore values -> the ignored column
        for i, name in enumerate(self.vocab.display_names):
            lut[i] = ids.get(name.lower(), k)
        unknown = [n for n in self.vocab.display_names if n.lower() not in ids]
        if unknown:
            logger.warning("run classes missing from the truth vocabulary count as misses: %s", ", ".join(unknown))
        self._lut = lut

    def get(self, shard: str, key: str) -> np.ndarray | None:
        """(H, W) int label map of `key` in the run's output for input shard `shard`, or None if absent."""
        if shard != self._shard:
            self._shard, self._maps = shard, self._load(shard)
        data = self._maps.get(key)
        if data is None:
            return None
        labels = read_label_map(data, f"{self.url}/{schema.labels_path(shard)}:{key}.{schema.LABEL_EXT}")
        return self._lut[labels] if self._lut is not None else labels

    def _load(self, shard: str) -> dict[str, bytes]:
        if shard not in self.committed:
            return {}
        url = fs.join(self.url, schema.labels_path(shard))
        filesystem, path = fs.url_to_fs(url, self.storage_options)
        suffix = "." + schema.LABEL_EXT
        maps: dict[str, bytes] = {}
        try:
            with filesystem.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(suffix):
                        maps[member.name[: -len(suffix)]] = tar.extractfile(member).read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{url} is missing although {schema.commit_path(shard)} commits it") from None
        except tarfile.TarError as exc:
            raise ValueError(f"{url}: unreadable label shard ({exc})") from None
        return maps
