"""Retrieval: how any method ranks a gallery, and the COCO protocol that scores the ranking.

No stage of its own and no files: ``train`` uses it for early stopping and ``tune`` for its val
objective, ``evaluate`` for the reported numbers, ``select`` for costs -- one chain for all, so it
sits below them. ``scoring``: encode once -> similarity or exact pair scores -> ALBEF shortlist
re-rank -> score matrices. ``protocol``: ranks and R@1/5/10 over any number of captions per image,
RSUM, the 5K and 1K (five folds) numbers.
"""
