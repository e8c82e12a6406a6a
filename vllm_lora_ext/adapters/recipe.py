"""How a merged adapter records what it was made of: ``recipe.json`` beside its PEFT files.

Written by every producer of merged adapters (offline ``merge``, ``pool-merge``, merge jobs,
the inline-merge cache) and read back by the cache to know an entry's sources; it is part of
the adapter's folder, so it lives with the adapter format, not with the merge math.
"""

from __future__ import annotations

RECIPE_FILE = "recipe.json"
RECIPE_FORMAT = "vllm-lora-ext/merge-recipe"
RECIPE_VERSION = 1
