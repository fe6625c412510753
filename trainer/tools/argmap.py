"""Where each training argument takes effect: which of our modules read each `TrainConfig` field.

`argument_readers()` parses every `*.py` file of the `trainer` package with `ast` (nothing is imported, so
no torch) and maps each field of `trainer.config.args.TrainConfig` to the sorted repo-relative paths
("trainer/train/build.py") of the modules whose code reads it. docs/compatibility.md shows the result as
its "takes effect in" column, and tests/test_tools_argmap.py checks that every implemented argument is
read somewhere.

What counts as a read of field `name` in a module:

1. Attribute access `<anything>.name` in load context (`cfg.network_dim`, `config.seed`, `s.noise_offset`).
   The object is not resolved: any attribute spelled like a field counts (an over-approximation, e.g. a
   dataset subset's `.shuffle_caption`, which is where that argument ends up anyway).
2. `getattr(<anything>, "name")` / `getattr(<anything>, "name", default)` with the name as a string literal.
3. A string literal equal to a field name that is an element of a tuple, list or set display, or a key or
   value of a dict display, in a module that calls `getattr(<object>, <computed name>)` on an object other
   than an imported module (`getattr(torch, name)` does not count): name lists used with
   `getattr(cfg, name)` (e.g. the dataset keys that trainer/data/config.py resolves from the arguments
   by name). The module is not required to pass that very list to getattr, so a name listed for another
   purpose there counts too (an over-approximation: trainer/train/trackers.py's list of paths left out of
   --log_config makes those paths "read" there). Not in trainer/config/args.py (its lists feed the
   validation checks) and not in the front ends under `FRONT_ENDS` (the GUI lists argument names to lay out
   its form: it sets arguments, it does not act on them).
4. A name list declared in trainer/config/args.py (a module-level tuple/list/set of field names, such as
   `PER_STEP_CAPTION_OPTIONS`) counts as read by every other module that refers to it.
5. A dataclass with a `from_config` method that copies fields from the config by name
   (`getattr(cfg, n)` with a computed `n`, as `DiffusionSettings.from_config` in trainer/train/build.py
   does): each of its fields that is a TrainConfig field counts as read in the module defining the class.
   Where the copy is used (`s.noise_offset` in the training loop), rule 1 applies.
6. A `@property` of TrainConfig (a derived view such as `cfg.train_text_encoder`) counts as reading the
   fields its body reads from `self`, in every module that reads the property.
7. In trainer/config/args.py, a function that rewrites an argument's value (a store `values["field"] = ...`:
   the legacy aliases and implied flags of `_apply_aliases`, such as --use_8bit_adam -> --optimizer_type
   AdamW8bit, and --caption_extention / --config_file in `parse_train_args`) counts as reading the fields it
   reads by name there: `values["field"]`, `values.get("field")` and string literals in tuple displays.

What does not count: keywords (`dataclasses.replace(cfg, name=...)`, `TrainConfig(name=...)` are writes),
subscripts and `.get()` of a values dict (`v["name"]`, `v.get("name")`: trainer/config/args.py's validation
functions check values that way, which is not an effect; rule 7 is the one exception), and the field
declarations in the TrainConfig class body itself. In trainer/config/args.py only rules 1, 2, 6 and 7 apply,
outside the TrainConfig class (`cfg.config_file` in `write_output_config` is a read). Iterating over all
fields (`dataclasses.fields(cfg)`, as the tracker's `--log_config` does) reads no particular field and is
not counted. A module that does not parse (a file mid-edit) raises SyntaxError.

Only the `trainer` package is scanned; `package_dir` scans another folder laid out the same way (its
`config/args.py`, if any, gets the args.py treatment).
"""

from __future__ import annotations

import ast
from pathlib import Path

from trainer.config.args import ARGUMENTS

FIELD_NAMES = frozenset(f.name for f in ARGUMENTS)
ARGS_MODULE = "config/args.py"  # relative to the package folder
CONFIG_CLASS = "TrainConfig"
FRONT_ENDS = ("gui/",)  # relative to the package folder: their name lists lay out forms (rule 3 skipped)
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def argument_readers(package_dir: Path | None = None) -> dict[str, list[str]]:
    """Every TrainConfig field -> sorted repo-relative paths of the modules that read it (see the rules above)."""
    package_dir = Path(package_dir or PACKAGE_DIR).resolve()
    files = sorted(p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts)
    trees = {p.relative_to(package_dir).as_posix(): ast.parse(p.read_text(encoding="utf-8"), filename=str(p))
             for p in files}
    args_tree = trees.get(ARGS_MODULE)
    name_lists = _args_name_lists(args_tree) if args_tree is not None else {}
    properties = _config_properties(args_tree) if args_tree is not None else {}
    readers: dict[str, set[str]] = {name: set() for name in FIELD_NAMES}
    for rel, tree in trees.items():
        module = f"{package_dir.name}/{rel}"
        for name in _reads(tree, rel, name_lists, properties):
            readers[name].add(module)
    return {name: sorted(readers[name]) for name in sorted(readers)}


def _reads(tree: ast.Module, rel: str, name_lists: dict[str, set[str]],
           properties: dict[str, set[str]]) -> set[str]:
    is_args = rel == ARGS_MODULE
    nodes = _nodes_outside_config_class(tree) if is_args else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            if node.attr in FIELD_NAMES:  # rule 1
                found.add(node.attr)
            found |= properties.get(node.attr, set())  # rule 6
            if not is_args:
                found |= name_lists.get(node.attr, set())  # rule 4 (args.NAME_LIST)
        elif isinstance(node, ast.Call) and _is_getattr(node):  # rule 2
            found.add(node.args[1].value)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and not is_args:
            found |= name_lists.get(node.id, set())  # rule 4
    if not is_args and not rel.startswith(FRONT_ENDS) and _has_computed_getattr(tree):
        found |= _listed_names(tree)  # rule 3
    if not is_args:
        found |= _copied_by_name(tree)  # rule 5
    else:
        found |= _rewritten_by_name(tree)  # rule 7
    return found


def _is_getattr(node: ast.Call) -> bool:
    return (isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant) and node.args[1].value in FIELD_NAMES)


def _has_computed_getattr(tree: ast.Module) -> bool:
    """Rule 3's condition: `getattr(obj, <computed name>)` on an object that is not an imported module
    (`getattr(torch, dtype_name)` looks up a class or dtype, not an argument)."""
    imported = {(a.asname or a.name).split(".")[0] for n in ast.walk(tree)
                if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "getattr"
               and len(n.args) >= 2 and not isinstance(n.args[1], ast.Constant)
               and not (isinstance(n.args[0], ast.Name) and n.args[0].id in imported) for n in ast.walk(tree))


def _nodes_outside_config_class(tree: ast.Module) -> list[ast.AST]:
    """All nodes of args.py except those inside the TrainConfig class (declarations and derived views)."""
    skipped = {id(n) for node in tree.body if isinstance(node, ast.ClassDef) and node.name == CONFIG_CLASS
               for n in ast.walk(node)}
    return [n for n in ast.walk(tree) if id(n) not in skipped]


def _string_field_names(nodes) -> set[str]:
    return {n.value for n in nodes if isinstance(n, ast.Constant) and n.value in FIELD_NAMES}


def _listed_names(tree: ast.Module) -> set[str]:
    """Rule 3: field names as string literals in tuple/list/set displays and dict keys/values."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            found |= _string_field_names(node.elts)
        elif isinstance(node, ast.Dict):
            found |= _string_field_names([k for k in node.keys if k is not None] + node.values)
    return found


def _args_name_lists(tree: ast.Module) -> dict[str, set[str]]:
    """Rule 4: args.py's module-level `NAME = ("field", ...)` lists (also annotated or wrapped in frozenset())."""
    lists: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            target, value = node.target.id, node.value
        else:
            continue
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in (
                "frozenset", "set", "tuple") and len(value.args) == 1:
            value = value.args[0]
        if isinstance(value, (ast.Tuple, ast.List, ast.Set)):
            names = _string_field_names(value.elts)
            if names:
                lists[target] = names
    return lists


def _config_properties(tree: ast.Module) -> dict[str, set[str]]:
    """Rule 6: TrainConfig's properties -> the fields their bodies read from `self`."""
    views: dict[str, set[str]] = {}
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and node.name == CONFIG_CLASS):
            continue
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and any(
                    isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list):
                views[item.name] = {n.attr for n in ast.walk(item) if isinstance(n, ast.Attribute)
                                    and isinstance(n.value, ast.Name) and n.value.id == "self"
                                    and n.attr in FIELD_NAMES}
    return views


def _copied_by_name(tree: ast.Module) -> set[str]:
    """Rule 5: fields of a class whose `from_config(cls, cfg, ...)` does `getattr(cfg, <computed name>)`."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.FunctionDef) and item.name == "from_config" and len(item.args.args) >= 2):
                continue
            cfg = item.args.args[1].arg
            if any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "getattr"
                   and len(n.args) >= 2 and isinstance(n.args[0], ast.Name) and n.args[0].id == cfg
                   and not isinstance(n.args[1], ast.Constant) for n in ast.walk(item)):
                found |= {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)
                          and isinstance(s.target, ast.Name) and s.target.id in FIELD_NAMES}
    return found


def _constant_key(node: ast.Subscript) -> str | None:
    key = node.slice
    return key.value if isinstance(key, ast.Constant) and key.value in FIELD_NAMES else None


def _rewritten_by_name(tree: ast.Module) -> set[str]:
    """Rule 7: args.py's functions that store `values["field"] = ...` read the fields they name there."""
    found: set[str] = set()
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef):
            continue
        nodes = list(ast.walk(func))
        if not any(isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Store) and _constant_key(n)
                   for n in nodes):
            continue
        for n in nodes:
            if isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Load) and _constant_key(n):
                found.add(_constant_key(n))
            elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get" and n.args:
                found |= _string_field_names(n.args[:1])
            elif isinstance(n, ast.Tuple):
                found |= _string_field_names(n.elts)
    return found


def unread_arguments(status: str, package_dir: Path | None = None) -> list[str]:
    """The fields with this status (e.g. args.DONE) that no module reads."""
    readers = argument_readers(package_dir)
    return sorted(f.name for f in ARGUMENTS if f.metadata["status"] == status and not readers[f.name])
