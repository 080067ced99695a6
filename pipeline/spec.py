"""Load a YAML job spec, validate it against schemas/job.schema.json, and resolve its DAG.

Every problem is reported at once, each with the YAML path of the offending key (and its
line), before any work starts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from pipeline.schemas import schema
from pipeline.stages import STAGES, Stage



class SpecError(ValueError):
    """All problems of a spec; each is (yaml path, message)."""

    def __init__(self, source: str, problems: list[tuple[str, str]], lines: dict[str, int] | None = None):
        self.source = source
        self.problems = problems
        lines = lines or {}
        super().__init__("\n".join(
            f"{source}:{lines[path]}: {path}: {msg}" if path in lines else f"{source}: {path or '(top)'}: {msg}"
            for path, msg in problems))


@dataclass(frozen=True)
class Execution:
    """How a stage runs (never what it outputs, so these stay out of fingerprints)."""
    max_failure_share: float = 0.5
    max_in_flight: int | None = None
    shard_retries: int = 2


@dataclass
class StageSpec:
    name: str
    kind: str
    inputs: list[str]
    stage: Stage
    execution: Execution

    @property
    def depends_on(self) -> list[str]:
        """Input stages, then referenced stages (e.g. a tokenizer)."""
        return self.inputs + [r for r in self.stage.references().values() if r not in self.inputs]


@dataclass
class JobSpec:
    name: str
    storage: str
    ray_address: str | None
    ray_num_cpus: int | None
    stages: dict[str, StageSpec]     # in dependency order
    source: str

    def downstream(self, names: set[str]) -> set[str]:
        """`names` and every stage that depends on them, transitively."""
        found = set(names)
        for spec in self.stages.values():   # dependency order: inputs come first
            if found & set(spec.depends_on):
                found.add(spec.name)
        return found


def load_job(path: str | Path) -> JobSpec:
    """Parse, validate and resolve the job spec at `path`; raises SpecError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(str(path), [("", f"cannot read job spec: {exc.strerror}")]) from None
    return parse_job(text, str(path), base_dir=path.parent)


def parse_job(text: str, source: str = "<spec>", base_dir: Path = Path(".")) -> JobSpec:
    """Like load_job, from YAML text; a relative local `storage` is taken relative to base_dir."""
    try:
        data = yaml.safe_load(text)
        lines = _line_numbers(yaml.compose(text))
    except yaml.YAMLError as exc:
        raise SpecError(source, [("", f"not valid YAML: {exc}")]) from None
    problems = _schema_problems(data)
    raw = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(raw, dict):
        raise SpecError(source, problems, lines)
    invalid = {path.split(".")[1].split("[")[0] for path, _ in problems if path.startswith("stages.")}
    storage = data.get("storage")
    if isinstance(storage, str) and "://" not in storage and not Path(storage).is_absolute():
        storage = str((base_dir / storage).resolve())
    stages, stage_problems = _build_stages({n: d for n, d in raw.items() if n not in invalid}, storage)
    problems += _storage_problems(storage) + stage_problems + _reference_problems(raw)
    if not problems:
        problems = _referenced_stage_problems(stages)
    if problems:
        raise SpecError(source, problems, lines)
    ray = data.get("ray") or {}
    order = _topological_order({n: s.depends_on for n, s in stages.items()})
    return JobSpec(data["name"], storage, ray.get("address"), ray.get("num_cpus"),
                   {n: stages[n] for n in order}, source)


def _storage_problems(storage: Any) -> list[tuple[str, str]]:
    """Credentials inside the storage URL (s3://KEY:SECRET@bucket) are refused, without repeating them."""
    if isinstance(storage, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://[^/]*@", storage):
        return [("storage", "holds credentials (user:secret@): a spec is shared and logged, so give them in the "
                            "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) or the provider's config files")]
    return []


def _schema_problems(data: Any) -> list[tuple[str, str]]:
    root = schema("job")
    problems = [_problem((), e) for e in jsonschema.Draft202012Validator(root).iter_errors(data)]
    stages = data.get("stages") if isinstance(data, dict) else None
    for name, stage in (stages.items() if isinstance(stages, dict) else []):
        kind = stage.get("kind") if isinstance(stage, dict) else None
        if not isinstance(kind, str):
            continue   # the job schema has reported it
        if kind not in STAGES:
            problems.append((_dotted(["stages", name, "kind"]),
                             f"unknown kind {kind!r} (known: {', '.join(sorted(STAGES))})"))
            continue
        kind_schema = {**STAGES[kind].json_schema(), "$defs": root["$defs"]}
        problems += [_problem(("stages", name), e)
                     for e in jsonschema.Draft202012Validator(kind_schema).iter_errors(stage)]
    return problems


def _problem(prefix: tuple, error: jsonschema.ValidationError) -> tuple[str, str]:
    path = list(prefix) + list(error.absolute_path)
    if error.validator in ("additionalProperties", "unevaluatedProperties"):
        unexpected = sorted(set(error.instance) - set(_known_keys(error.schema)))
        return _dotted(path + unexpected[:1]), f"unknown key (known: {', '.join(_known_keys(error.schema))})"
    return _dotted(path), error.message


def _known_keys(object_schema: dict) -> list[str]:
    known = list(object_schema.get("properties", {}))
    if "$ref" in object_schema:  # a stage kind: its own keys plus the shared execution keys
        known += [k for k in schema("job")["$defs"]["execution"]["properties"] if k not in known]
    return known


def _build_stages(raw: dict, storage: str) -> tuple[dict[str, StageSpec], list[tuple[str, str]]]:
    stages, problems = {}, []
    for name, data in raw.items():
        cls = STAGES[data["kind"]]
        config_keys = {f.name for f in fields(cls.Config)}
        config = cls.Config(**{k: v for k, v in data.items() if k in config_keys})
        problems += [(_dotted(["stages", name, *p.path]), p.message) for p in cls.check(config)]
        execution = Execution(**{f.name: data[f.name] for f in fields(Execution) if f.name in data})
        stages[name] = StageSpec(name, data["kind"], list(data.get("inputs", [])), cls(name, config, storage), execution)
    return stages, problems


def _reference_problems(raw: dict) -> list[tuple[str, str]]:
    located = {n: _references(d) for n, d in raw.items()}
    problems = [(_dotted(["stages", name, *path]), f"no stage named {ref!r} (stages: {', '.join(raw)})")
                for name, refs in located.items() for path, ref in refs if ref not in raw]
    if not problems:
        cycle = _find_cycle({n: [ref for _, ref in refs] for n, refs in located.items()})
        if cycle:
            problems.append((_dotted(["stages", cycle[0], "inputs"]), "cycle: " + " -> ".join(cycle)))
    return problems


def _references(stage: Any) -> list[tuple[list, str]]:
    """(YAML path within the stage, stage name) for every stage a stage refers to: its inputs
    and its kind's reference keys (malformed values are the schema's to report)."""
    if not isinstance(stage, dict):
        return []
    inputs = stage.get("inputs", [])
    refs = [(["inputs", i], r) for i, r in enumerate(inputs) if isinstance(r, str)] if isinstance(inputs, list) else []
    kind = STAGES.get(stage.get("kind")) if isinstance(stage.get("kind"), str) else None
    for key in kind.reference_keys if kind else ():
        path, value = key.split("."), stage
        for part in path:   # "codec.stage": key stage of the mapping under codec
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str):
            refs.append((path, value))
    return refs


def _referenced_stage_problems(stages: dict[str, StageSpec]) -> list[tuple[str, str]]:
    """What each stage's check_references finds in the stages it references (all of them exist)."""
    return [(_dotted(["stages", name, *p.path]), p.message) for name, spec in stages.items()
            for p in spec.stage.check_references({k: stages[r].stage for k, r in spec.stage.references().items()})]


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for dep in graph[node]:
            found = visit(dep, path + [node])
            if found:
                return found
        done.add(node)
        return None

    for node in graph:
        found = visit(node, [])
        if found:
            return found
    return None


def _topological_order(graph: dict[str, list[str]]) -> list[str]:
    order: list[str] = []

    def visit(node: str) -> None:
        if node not in order:
            for dep in graph[node]:
                visit(dep)
            order.append(node)

    for node in graph:
        visit(node)
    return order


def _dotted(path: list) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in path).replace(".[", "[")


def _line_numbers(node: yaml.Node | None, path: tuple = ()) -> dict[str, int]:
    """Dotted YAML path -> 1-based line of the key (mappings) or item (sequences)."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = path + (key.value,)
            lines[_dotted(list(child))] = key.start_mark.line + 1
            lines.update(_line_numbers(value, child))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            child = path + (i,)
            lines[_dotted(list(child))] = value.start_mark.line + 1
            lines.update(_line_numbers(value, child))
    return lines
