"""The memory bound shared by the chunked cosine-similarity searches over a feature bank.

The kNN vote (:mod:`timm_adv.models.knn`) and the kNN-guided attack (:mod:`timm_adv.attacks.knn_guided`)
compare a batch with the bank one chunk of rows at a time, so a search holds ``B x chunk`` similarities,
never ``B x N``.
"""
__all__ = ['DEFAULT_CHUNK']

#: Bank rows per similarity chunk: B x 65,536 float32 similarities (32 MB at B = 128).
DEFAULT_CHUNK = 65536
