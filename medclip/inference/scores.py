"""What a model says the chance is that a text matches an image, as the model itself was trained to say it.

A contrastive (CLIP) model only ranks the candidates against each other: a softmax of its scaled similarities over
them, summing to 1 whatever the image. A sigmoid-loss model (SigLIP, MedSigLIP: any model with a learned logit
bias) scores each pair on its own, sigmoid(scale * cos + bias), as transformers' SiglipModel documents its
`torch.sigmoid(logits_per_image)`: none, one or several candidates may fit."""

from __future__ import annotations

import numpy as np


def match_probabilities(cosines: np.ndarray, logit_scale: float, logit_bias: float | None = None) -> np.ndarray:
    """(n,) probabilities for n candidate texts' cosine similarities to one image."""
    logits = logit_scale * np.asarray(cosines, np.float64)
    if logit_bias is not None:
        return 1.0 / (1.0 + np.exp(-(logits + logit_bias)))
    probabilities = np.exp(logits - logits.max())
    return probabilities / probabilities.sum()
