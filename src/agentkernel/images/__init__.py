"""Root filesystem images: built from recipes, directories or OCI layouts; immutable, content-addressed.

The CLI's entry points are re-exported here; store holds list/get/remove/verify.
"""

from agentkernel.images.api import build_from_dir, build_recipe, ensure_recipes
from agentkernel.images.model import Image, ImageConfig
from agentkernel.images.pull import pull

__all__ = ["Image", "ImageConfig", "build_from_dir", "build_recipe", "ensure_recipes", "pull"]
