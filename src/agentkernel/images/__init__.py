"""Root filesystem images: built from recipes, directories or OCI layouts; immutable, content-addressed.

`api` makes images (recipes, directories), `pull` brings them from registries, `store` holds them.
"""

DEFAULT_IMAGES = ("base", "python", "node")  # what `agentkernel setup` builds
