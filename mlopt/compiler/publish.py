"""``mlopt compile --push``: a compile's images, built with the recipe's ``image:`` and ``serving:``
settings and pushed to its registry. Their digests go into the compile's manifest in memory; the
pipeline writes that manifest once, after this (``mlopt.compiler.pipeline.compile``).
"""

from __future__ import annotations

from pathlib import Path

from mlopt.core.util import Log
from mlopt.manifest import Manifest
from mlopt.package.image import BuiltImage, build_manifest_images, record_images
from mlopt.package.publish import PushOptions, image_options, push_images
from mlopt.recipes.schema import Recipe
from mlopt.store import Store


def publish(manifest: Manifest, recipe: Recipe, out: Path, store: Store | None = None,
            log: Log = print) -> list[BuiltImage]:
    """Build every image of ``manifest`` into the folder ``out`` and, when the recipe names a registry,
    push them; each entry's image record (digest, pushed references) is set in ``manifest`` as soon as
    it is known, so a push that fails still leaves the built images recorded."""
    options = image_options(recipe.image, recipe.serving, out)
    images = build_manifest_images(manifest, store, options, log, recipe.catalog)
    record_images(manifest, images)
    if recipe.image.registry:
        images = push_images(out, PushOptions(recipe.image.registry, recipe.image.push_with), log)
        record_images(manifest, images)
    return images
