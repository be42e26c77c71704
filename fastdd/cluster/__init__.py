"""fastdd.cluster: batched per-class K-means (k-means++ seeding, Lloyd iterations on fastdd ops)."""
from .kmeans import KMeansResult, batched_kmeans, kmeans_plusplus, kmeans_plusplus_draws

__all__ = ["KMeansResult", "batched_kmeans", "kmeans_plusplus", "kmeans_plusplus_draws"]
