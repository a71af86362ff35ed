"""Offline teachers: a teacher's top-k log-probabilities per token, computed once over a dataset and stored, to
distil from later without running the teacher (``tgtfast cache-teacher`` on the command line).

* :class:`TeacherCacheWriter` (or :meth:`TeacherCache.write`) runs a teacher (a transformers causal LM or any
  callable ``input_ids [B, L] -> logits [B, L, V]``) over token sequences and writes shards, resumably, one
  process or many under ``torchrun``.
* :class:`TeacherCache` reads them: ``cache.example(i) -> (positions, indices, logprobs)``.
* :class:`CachedTeacherDataset` and :class:`TeacherCollator` join the cached rows to a student's batches as a
  :class:`tgtfast.SparseTeacher` aligned with the student's logits, for :func:`tgtfast.distill_loss`.

The layout of a cache directory and its manifest are described in :mod:`tgtfast.cache.manifest`.

Why ``.npy`` files and not safetensors: NumPy is already a dependency of tgtfast (safetensors would be one more
for every user); ``np.load(path, mmap_mode="r", allow_pickle=False)`` maps a shard without copying it and without
unpickling anything, and a row range of a memory map is read straight from the page cache, so a data loader reads
one example's rows at random positions without loading the shard. A ``.npy`` file is one header and the raw
array, so a shard's files can be written as a stream while their sha256 is computed, and any tool that reads
NumPy reads them. safetensors would give the same zero-copy reads but needs its own package, and holds several
tensors per file, which buys nothing here: the manifest already ties a shard's arrays together.
"""

from tgtfast.cache.manifest import CacheError, NotCachedError
from tgtfast.cache.reader import CachedTeacherDataset, TeacherCache, TeacherCollator
from tgtfast.cache.writer import TeacherCacheWriter, topk_logprobs

__all__ = ["TeacherCache", "TeacherCacheWriter", "CachedTeacherDataset", "TeacherCollator", "CacheError",
           "NotCachedError", "topk_logprobs"]
