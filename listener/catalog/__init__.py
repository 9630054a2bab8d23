"""The course catalog, by duty: the rows (saving.py: each saved with its job's
completion, or by the catalog itself), courses/catalog.json (render.py), and
the course cache (cache.py) that reuses a recent course for the same request."""

from listener.catalog.cache import CourseCache
from listener.catalog.render import CATALOG_PATH, Renderer, render_catalog
from listener.catalog.saving import Catalog, CatalogEntry, catalog_rows, complete_with_rows

__all__ = [
    "CATALOG_PATH",
    "Catalog",
    "CatalogEntry",
    "CourseCache",
    "Renderer",
    "catalog_rows",
    "complete_with_rows",
    "render_catalog",
]
