"""Workflow task configs: the runtime placeholders Stigmer's workflow runner knows, and nothing
else. Pure functions, no I/O.

A Workflow's ``spec.tasks`` is a list of ``{task name: config}`` entries (the DSL's ``do``).
Their strings hold Zigflow's jq expressions (``${ $context.x }``, ``${ .input | length }``),
which belong to the workflow engine, and Stigmer's runtime placeholders, which belong to us:

* ``${.secrets.NAME}`` and ``${.env_vars.NAME}``, with or without inner spaces, NAME in upper
  case as Stigmer's runner matches it (``${ .secrets.token }`` stays a jq expression);
* the broker's own ``${NAME}`` only when the workflow opts in
  (``spec.document.metadata["stigmer.ai/broker-placeholders"]: true``).

Everything else inside ``${ … }`` is left byte for byte. Resolution is one pass over each string:
an inserted value is never scanned again. An unknown name fails the whole resolution, listing
each task and field.

An agent-call task (``call: agent``) forwards ``with.env`` to a child AgentExecution; its
``runtime_env`` keeps each value's secret flag: a value is secret when a secret variable went
into it, so the child's context stores forwarded secrets as secrets.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from broker.errors import ResolveError, ValidationError
from broker.records import record
from broker.resolve import Variable, map_strings

# Upper-case names, as Stigmer's runner matches them: ${ .secrets.token } is jq's.
RUNTIME = re.compile(r"\$\{\s*\.(?P<scope>secrets|env_vars)\.(?P<name>[A-Z_][A-Z0-9_]*)\s*\}")
BROKER = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)\}")
OPT_IN = "stigmer.ai/broker-placeholders"


def opted_in(document: Mapping[str, Any]) -> bool:
    """Does the workflow's DSL document let the broker's own ``${NAME}`` resolve in tasks?"""
    metadata = document.get("metadata")
    return isinstance(metadata, Mapping) and metadata.get(OPT_IN) is True


# With the workflow's opt-in, the broker's ${NAME} too (its group named apart from RUNTIME's).
RUNTIME_OR_BROKER = re.compile(
    f"{RUNTIME.pattern}|{BROKER.pattern.replace('?P<name>', '?P<bare>')}"
)


def _pattern(broker: bool) -> re.Pattern[str]:
    return RUNTIME_OR_BROKER if broker else RUNTIME


def task_name(index: int, task: Any) -> str:
    """A task's name: the one key of ``{name: config}``, else its position."""
    if isinstance(task, Mapping) and len(task) == 1:
        return str(next(iter(task)))
    return f"tasks[{index}]"


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{where}[{index}]")


def _names(match: re.Match[str]) -> str:
    return match.group("name") or match.groupdict().get("bare") or ""


def references(tasks: Sequence[Any], broker: bool = False) -> list[tuple[str, str, str]]:
    """(task, field, variable) for every placeholder of ours in ``tasks``."""
    pattern = _pattern(broker)
    found = []
    for index, task in enumerate(tasks):
        name = task_name(index, task)
        for where, text in _strings(task, "$"):
            found += [(name, where, _names(m)) for m in pattern.finditer(text)]
    return found


def check(tasks: Sequence[Any], known: Mapping[str, Any], broker: bool = False) -> None:
    """Refuse a reference to a variable the merged environment does not hold."""
    problems = [
        f"task {task} {where}: unknown variable {name}"
        for task, where, name in references(tasks, broker)
        if name not in known
    ]
    if problems:
        raise ValidationError("workflow tasks", problems)


def holding(tasks: Sequence[Any], broker: bool = False) -> list[dict[str, Any]]:
    """What the context records: ``{"name", "config"}`` of each task holding a placeholder."""
    recorded = []
    for index, task in enumerate(tasks):
        if references([task], broker):
            name = task_name(index, task)
            config = task[name] if isinstance(task, Mapping) and name in task else task
            recorded.append({"name": name, "config": config})
    return recorded


@record
class _Pass:
    variables: Mapping[str, Variable]
    pattern: re.Pattern[str]
    problems: list[str]
    secret: bool = False  # did a secret go into the last string?

    def string(self, text: str, where: str) -> str:
        def replace(match: re.Match[str]) -> str:
            name = _names(match)
            variable = self.variables.get(name)
            if variable is None:
                self.problems.append(f"{where}: unknown variable {name}")
                return match.group(0)
            self.secret = self.secret or variable.is_secret
            return variable.value

        return self.pattern.sub(replace, text)


def resolve(config: Any, variables: Mapping[str, Variable], broker: bool = False,
            where: str = "$") -> Any:  # fmt: skip
    """``config`` with our placeholders replaced and every other ``${ … }`` untouched."""
    run = _Pass(variables, _pattern(broker), [])
    resolved = map_strings(config, where, run.string)
    if run.problems:
        raise ResolveError(run.problems)
    return resolved


def child_runtime_env(
    config: Any, variables: Mapping[str, Variable], broker: bool = False
) -> dict[str, dict[str, Any]] | None:
    """For an agent-call task: its ``with.env`` as Stigmer's ``ExecutionValue`` map, each value
    resolved and secret when a secret went into it; None for any other task."""
    if not isinstance(config, Mapping) or config.get("call") != "agent":
        return None
    arguments = config.get("with")
    env = arguments.get("env") if isinstance(arguments, Mapping) else None
    if not isinstance(env, Mapping):
        return {}
    out: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for key, value in env.items():
        run = _Pass(variables, _pattern(broker), problems)
        text = run.string(str(value), f"$.with.env.{key}")
        out[str(key)] = {"value": text, "is_secret": run.secret}
    if problems:
        raise ResolveError(problems)
    return out
