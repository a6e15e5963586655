"""Model-independent evaluation: everything here works on embeddings and callables.

- ``retrieval``: image<->text retrieval metrics (R@K, MRR, median/mean rank), full split and PMC-CLIP's
  2,000-pair protocol, duplicate captions as shared ground truth.
- ``zeroshot``: prompt-ensembled zero-shot classification, single- and multi-label scores, K-most-frequent
  concept tasks.
- ``roco_labels``: ROCO concept files and keyword/CUI-based imaging-modality labels.
- ``plots``: training curves and retrieval example grids as PNG (needs matplotlib).

Submodules are imported explicitly (``from medclip.evaluation.retrieval import ...``) so that metrics never
pull in matplotlib.
"""
