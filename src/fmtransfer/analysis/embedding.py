"""2-D embeddings of each level's pooled features (PCA, t-SNE), for plotting coloured by class."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.preprocessing import StandardScaler


def embed_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """``[N, 2]`` coordinates of standardised ``features`` by ``pca`` or ``tsne`` (t-SNE after a 50-d PCA)."""
    z = StandardScaler().fit_transform(np.asarray(features, dtype=np.float32))
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(z)
    if method == "tsne":
        if z.shape[1] > 50:
            z = PCA(n_components=min(50, len(z)), random_state=seed).fit_transform(z)
        perplexity = float(min(30, max(2, (len(z) - 1) // 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(z)
    raise ValueError(f"method={method!r}: use 'pca' or 'tsne'")
