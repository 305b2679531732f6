"""The package's layering, as docs/architecture.md states it: every import
inside ``suite`` (function-level ones included, read with ``ast``) points to a lower layer,
or stays inside one component package; modules on one level never import each other."""

import ast
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "suite"

# lowest first; a module may import any module of a lower layer
LAYERS = [
    {"suite.errors", "suite.plots", "suite.noise", "suite.procs"},
    {"suite.config", "suite.models", "suite.tracking"},
    {"suite.runtime"},
    {"suite.timing"},
    {"suite.profile"},
    {"suite.training"},
    {"suite.studies.storage"},
    {"suite.studies.queue"},
    {"suite.studies.matrix", "suite.studies.search"},
    {"suite.studies.workers"},
    {"suite.outputs.report_format", "suite.outputs.report_plots"},
    {"suite.outputs.report", "suite.outputs.viz"},
    {"suite.demo"},
    {"suite.cli"},
    {"suite.__main__"},
]
# namespace packages holding only a docstring
PACKAGES = {"suite", "suite.studies", "suite.outputs"}
# packages whose modules work together as one component (they may import each other)
COMPONENTS = ("suite.models", "suite.tracking", "suite.training")


def unit(module: str) -> str:
    """The name the layers use for a module: its component package, or itself."""
    for c in COMPONENTS:
        if module == c or module.startswith(c + "."):
            return c
    return module


def layer(module: str) -> int:
    name = unit(module)
    for i, names in enumerate(LAYERS):
        if name in names or name.removesuffix(".__init__") in names:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def suite_imports(path: Path, module: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("suite")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target == "suite":  # from suite import x: the submodules named
                out |= {f"suite.{a.name}" for a in node.names}
            elif target.startswith("suite"):
                out.add(target)
    return out


def modules() -> dict[str, Path]:
    found = {}
    for p in SUITE.rglob("*.py"):
        rel = p.relative_to(SUITE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        found[name] = p
    return found


def test_every_module_has_a_layer():
    for name in modules():
        if name not in PACKAGES:
            layer(name)


def test_imports_point_down_or_stay_in_a_component():
    bad = []
    for name, path in modules().items():
        if name in PACKAGES or name.startswith("suite.experiments"):
            continue
        for target in suite_imports(path, name):
            if target == "suite" or unit(target) == unit(name):
                continue
            if layer(target) >= layer(name):
                bad.append(f"{name} imports {target}")
    assert not bad, "\n".join(sorted(bad))


def test_config_imports_nothing_of_the_suite_but_errors():
    """Validating a config imports no torch and builds no model: the model's knobs are checked
    where models live (``suite.models.check_model_config``), called by the commands."""
    config = SUITE / "config.py"
    assert suite_imports(config, "suite.config") <= {"suite.errors"}


def test_no_mlflow_filters_private_optuna_or_message_matching_outside_their_place():
    for name, path in modules().items():
        text = path.read_text()
        if unit(name) != "suite.tracking":
            assert "import mlflow" not in text and "from mlflow" not in text, name
            assert "attributes.status" not in text and "tags.kind =" not in text, name
        assert "_storage." not in text, name
        assert "in str(e)" not in text, name


COLUMN_PREFIXES = ("tags.", "params.", "metrics.")


def column_names(source: str) -> list[str]:
    """Strings (plain, or a part of an f-string) that begin with one of MLflow's run-table
    column prefixes, with their line numbers."""
    return [
        f"{node.lineno}: {node.value[:40]!r}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith(COLUMN_PREFIXES)
    ]


def test_mlflow_column_names_stay_in_tracking():
    """Outside suite.tracking, a run table's column is named by suite.tracking's ``param_col``,
    ``metric_col`` and ``tag_col`` (and read back by ``param_key``), never spelled out."""
    assert column_names('x = f"tags.{k}"\ny = r.get("params.model.name")\n') == [
        "1: 'tags.'",
        "2: 'params.model.name'",
    ]
    bad = [
        f"{name}:{hit}"
        for name, path in modules().items()
        if unit(name) != "suite.tracking"
        for hit in column_names(path.read_text())
    ]
    assert not bad, "\n".join(bad)


MAX_LINES = 60  # no function longer
LONG_LINES = 50  # ... and only a few (MAX_LONG) above this: short by design, not at the edge
MAX_LONG = 3
MAX_PARAMS = 8  # positional and keyword-only alike (self aside): more travel as one object


def test_functions_are_short_and_take_few_parameters():
    """No function over 60 lines, at most 3 over 50, and none taking more than 8 parameters,
    keyword-only ones counted (settings that travel together are one object: a config
    dataclass, ``StepOptions``, ``TimingOptions``...; dataclass constructors are generated,
    not written, and so not counted)."""
    too_long, long, wide = [], [], []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                a = node.args
                args = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
                params = len([x for x in args if x not in ("self", "cls")])
                where = f"{name}.{node.name}"
                if lines > MAX_LINES:
                    too_long.append(f"{where}: {lines} lines")
                elif lines > LONG_LINES:
                    long.append(f"{where}: {lines} lines")
                if params > MAX_PARAMS:
                    wide.append(f"{where}: {params} parameters")
    assert not too_long and not wide, "\n".join(too_long + wide)
    assert len(long) <= MAX_LONG, f"more than {MAX_LONG} functions over {LONG_LINES} lines:\n" + (
        "\n".join(long)
    )


def test_every_package_folder_is_installed():
    """pyproject lists its packages by name: a new folder of modules left off the list would
    work from the checkout and be missing from an install (CI installs)."""
    import tomllib

    listed = set(
        tomllib.loads((SUITE.parent / "pyproject.toml").read_text())["tool"]["setuptools"][
            "packages"
        ]
    )
    folders = {
        ".".join(p.relative_to(SUITE.parent).parts)
        for p in [SUITE, *SUITE.rglob("*")]
        if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py"))
    }
    assert folders <= listed, f"not in pyproject's packages: {sorted(folders - listed)}"


def test_one_first_line_helper():
    """A one-line error quotes the first line of the exception below it through
    ``errors.first_line``, not through a copy of the idiom."""
    from suite.errors import first_line

    assert first_line(RuntimeError("disk full\nSQL: INSERT ...")) == "disk full"
    assert first_line(OSError()) == "OSError"
    assert first_line(ValueError("\n  bad value  \nmore")) == "bad value"
    copies = [
        name
        for name, path in modules().items()
        if name != "suite.errors" and "splitlines() or [type(" in path.read_text()
    ]
    assert not copies, copies
