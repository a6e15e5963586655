"""Named recipes: one TOML file per recipe in the repository's `configs/` (big_vision's configs, readable and
diffable). A recipe names its source and what it reports, and holds `run_hybrid_clip.py` flag values in
`[flags]`; `--recipe NAME` puts them first on the command line, so any flag given after it wins.

A model chosen on the command line replaces the recipe's whole choice of model, not just the one flag: with
`--model_preset demo` the recipe's tokenizer would still be fetched (from the Hub) and its towers named as base
models in the card. A whole model (--model_preset, --model_name_or_path) drops every model flag of the recipe; one
tower (--text_model_name_or_path or --text_config, the same for vision) drops the recipe's flags for that tower (the
text tower's tokenizer included) and any whole model it names.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from pathlib import Path
from typing import Any

from medclip.training.arguments import DataArguments, ModelArguments, TrainingArguments
from medclip.training.config_check import ConfigError

logger = logging.getLogger(__name__)
CONFIGS_DIR = Path(os.environ.get("MEDCLIP_CONFIGS", Path(__file__).resolve().parents[2] / "configs"))
REQUIRED = ("name", "description", "source", "reports", "flags")
# Accepted and ignored, with a warning, so old command lines still run (a parsed flag must change something).
DEPRECATED_FLAGS = {"from_pt": ".bin checkpoints are always read, safely and without torch"}


WHOLE_MODEL_FLAGS = ("model_preset", "model_name_or_path")
MODEL_FLAGS = (*WHOLE_MODEL_FLAGS, "open_clip_model", "text_model_name_or_path", "vision_model_name_or_path",
               "text_config", "vision_config", "tokenizer_name", "projection_dim", "vision_head", "text_pooler")
TOWER_FLAGS = {"text": ("text_model_name_or_path", "text_config", "tokenizer_name"),
               "vision": ("vision_model_name_or_path", "vision_config")}


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str  # one line
    source: str  # paper / repository
    reports: str  # what it evaluates
    flags: dict[str, Any]
    path: Path

    def argv(self, without: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """The flags as command-line arguments (booleans as `--flag true|false`), less those named in `without`."""
        args: list[str] = []
        for name, value in self.flags.items():
            if name in without:
                continue
            text = str(value).lower() if isinstance(value, bool) else str(value)
            args += [f"--{name}", text]
        return args


def _flag_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for cls in (ModelArguments, DataArguments, TrainingArguments) for f in dataclasses.fields(cls)}


def available(directory: Path = CONFIGS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml"))


def load(name: str, directory: Path = CONFIGS_DIR) -> Recipe:
    """A recipe by name (configs/NAME.toml) or by the path of a .toml file."""
    path = Path(name) if name.endswith(".toml") else directory / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"--recipe {name!r}: no such recipe; available: {', '.join(available(directory))} "
                          f"(files in {directory})")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)} (a recipe has {', '.join(REQUIRED)})")
    fields = _flag_fields()
    for flag, value in data["flags"].items():
        if flag not in fields:
            raise ConfigError(f"{path}: --{flag} is not a run_hybrid_clip.py flag (python run_hybrid_clip.py --help)")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}: --{flag} must be a single value, not {value!r}")
    return Recipe(name=data["name"], description=data["description"], source=data["source"],
                  reports=data["reports"], flags=dict(data["flags"]), path=path)


def listing(directory: Path = CONFIGS_DIR) -> str:
    """One block per recipe: name, source, one-line description."""
    blocks = []
    for name in available(directory):
        recipe = load(name, directory)
        blocks.append(f"{recipe.name}\n  source: {recipe.source}\n  {recipe.description}")
    return "\n".join(blocks)


def _drop_deprecated(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        base = name[3:] if name and name.startswith("no_") else name
        if base in DEPRECATED_FLAGS:
            logger.warning("--%s is deprecated and ignored: %s", base, DEPRECATED_FLAGS[base])
            takes_value = "=" not in arg and not name.startswith("no_") and i + 1 < len(argv) \
                and argv[i + 1].lower() in ("true", "false", "yes", "no", "1", "0", "t", "f", "y", "n")
            i += 2 if takes_value else 1
            continue
        out.append(arg)
        i += 1
    return out


def expand(argv: list[str], directory: Path = CONFIGS_DIR) -> tuple[list[str], Recipe | None]:
    """argv with `--recipe NAME` (or `--recipe=NAME`) replaced by the recipe's flags, placed first so that
    every other flag on the line wins; deprecated flags dropped with a warning."""
    argv = _drop_deprecated(argv)
    rest, names = [], []
    i = 0
    while i < len(argv):
        if argv[i] == "--recipe":
            if i + 1 >= len(argv):
                raise ConfigError(f"--recipe needs a name; available: {', '.join(available(directory))}")
            names.append(argv[i + 1])
            i += 2
        elif argv[i].startswith("--recipe="):
            names.append(argv[i].split("=", 1)[1])
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    if not names:
        return rest, None
    if len(names) > 1:
        raise ConfigError(f"--recipe given {len(names)} times ({', '.join(names)}); give one")
    recipe = load(names[0], directory)
    replaced = replaced_model_flags(recipe, rest)
    if replaced:
        logger.info("recipe %s: your model flags replace the recipe's %s", recipe.name,
                    " ".join(f"--{name} {recipe.flags[name]}" for name in replaced))
    return recipe.argv(without=set(replaced)) + rest, recipe


def replaced_model_flags(recipe: Recipe, argv: list[str]) -> list[str]:
    """The recipe's model flags that the model flags in `argv` replace (see the module's docstring)."""
    given = {arg[2:].split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("--")}
    if given & set(WHOLE_MODEL_FLAGS):
        dropped = set(MODEL_FLAGS)
    else:
        dropped = set()
        for kind, flags in TOWER_FLAGS.items():
            if given & {f"{kind}_model_name_or_path", f"{kind}_config"}:
                dropped |= {*flags, *WHOLE_MODEL_FLAGS, "open_clip_model"}
    return [name for name in recipe.flags if name in dropped]
