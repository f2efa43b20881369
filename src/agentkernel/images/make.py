"""What the CLI calls to make images: from recipes (cached by recipe key) and from directories."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from agentkernel.artifacts.run import console, warn
from agentkernel.errors import AgentkernelError, CorruptImageError
from agentkernel.images import builder, store
from agentkernel.images.model import Image
from agentkernel.images.progress import BuildProgress
from agentkernel.images.recipes import Recipe, get_recipe, populate, recipe_key


def build_recipe(name: str, agent: Path, *, log: Path) -> Image:
    """Build the recipe `name` with `agent` as init and store it under that name, cached or not."""
    recipe = get_recipe(name)
    return _build(recipe, recipe_key(recipe, agent), agent, log)


def ensure_recipes(names: Iterable[str], agent: Path, *, log: Path) -> list[Image]:
    """The images of recipes `names`, building those missing, out of date or corrupted."""
    recipes = [get_recipe(name) for name in names]  # an unknown name fails before any build
    images = []
    for recipe in recipes:
        key = recipe_key(recipe, agent)
        image = _cached(recipe.name, key)
        if image is None:
            image = _build(recipe, key, agent, log)
        else:
            console.print(f"[green]ok[/green] image {recipe.name} is up to date")
        images.append(image)
    return images


def build_from_dir(directory: Path, name: str, agent: Path, *, log: Path) -> Image:
    """Store an image of the tree at `directory` (copied, not changed) under `name`."""
    store.check_name(name)
    if not directory.is_dir():
        raise AgentkernelError(f"{directory} is not a directory")
    with BuildProgress(name, 3) as progress, store.scratch() as tmp:
        progress.stage(f"copy {directory}")
        builder.build(directory, agent, tmp / store.ROOTFS, log=log, in_place=False, progress=progress)
        progress.stage("store")
        return store.add(tmp / store.ROOTFS, name, source=f"dir:{directory.resolve()}")


def _cached(name: str, key: str) -> Image | None:
    """The stored image for `name` if it was built with `key` and its content still verifies."""
    try:
        if store.get(name).recipe_key != key:
            return None
        return store.verify(name)
    except CorruptImageError as exc:
        warn(f"{exc}; rebuilding it")
        return None
    except AgentkernelError:
        return None  # not built yet


def _build(recipe: Recipe, key: str, agent: Path, log: Path) -> Image:
    with BuildProgress(recipe.name, 4 if recipe.packages else 3) as progress, store.scratch() as tmp:
        tree = tmp / "rootfs"
        populate(recipe, tree, log=log, progress=progress)
        progress.stage("ext4 image")
        builder.build(tree, agent, tmp / store.ROOTFS, log=log, in_place=True)
        progress.stage("store")
        return store.add(tmp / store.ROOTFS, recipe.name, source=f"recipe:{recipe.name}", recipe_key=key)
