"""The architecture diagram (docs/architecture.md) is the synthesized stack: every function, IoT
rule, queue, schedule, table, KMS key and SNS topic of the template is drawn, nothing else is drawn
as one, the edges between them are the template's (rule -> function, error action, on-failure
destination, event source mapping, dead-letter queue, schedule target, a function's SendMessage
grant), and every API route is on the edge to its function.

A node of the diagram stands for a resource when its class is one of RESOURCE_CLASSES; its id is
the resource's CloudFormation logical id without CDK's hash suffix (`FunctionsToken` for
`FunctionsToken682CC78C`), which does not change with names or stages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from tests.support.docs import DOCS, mermaid_blocks

# Mermaid class -> the CloudFormation types it stands for.
RESOURCE_CLASSES = {
    "fn": ("AWS::Lambda::Function",),
    "rule": ("AWS::IoT::TopicRule",),
    "queue": ("AWS::SQS::Queue",),
    "schedule": ("AWS::Events::Rule", "AWS::Scheduler::Schedule"),
    "table": ("AWS::DynamoDB::Table",),
    "key": ("AWS::KMS::Key",),
    "topic": ("AWS::SNS::Topic",),
}
ARCHITECTURE = DOCS / "architecture.md"


def stem(logical_id: str) -> str:
    """A logical id without CDK's 8-character hash suffix."""
    return re.sub(r"[0-9A-F]{8}$", "", logical_id)


# ---- the diagram ---------------------------------------------------------------------------------

NODE = re.compile(
    r"^\s*(?P<id>[A-Za-z_]\w*)\s*(?P<shape>\[\[|\[\(|\(\[|\(\(|\{\{|\[/|\[\\|\[|\(|\{|>)"
    r"\s*\"(?P<label>[^\"]*)\"\s*(?:\]\]|\)\]|\]\)|\)\)|\}\}|/\]|\\\]|\]|\)|\})\s*$"
)
EDGE = re.compile(
    r"^\s*(?P<source>[A-Za-z_]\w*)\s*(?P<arrow>-->|-\.->|==>)\s*"
    r"(?:\|\s*\"(?P<label>[^\"]*)\"\s*\|\s*)?(?P<target>[A-Za-z_]\w*)\s*$"
)
SUBGRAPH = re.compile(r"^\s*subgraph\s+(?P<id>[A-Za-z_]\w*)(?:\s*\[\s*\"[^\"]*\"\s*\])?\s*$")
CLASS = re.compile(r"^\s*class\s+(?P<ids>[\w,]+)\s+(?P<name>\w+)\s*;?\s*$")
IGNORED = re.compile(r"^\s*(?:%%.*|classDef\s.*|end|flowchart\s+\w+|graph\s+\w+)?\s*$")


@dataclass
class Diagram:
    nodes: dict[str, str] = field(default_factory=dict)  # id -> label
    subgraphs: set[str] = field(default_factory=set)
    classes: dict[str, str] = field(default_factory=dict)  # id -> class
    edges: list[tuple[str, str, str]] = field(default_factory=list)  # (source, target, label)

    def of_class(self, name: str) -> set[str]:
        return {node for node, cls in self.classes.items() if cls == name}


def parse(lines: tuple[str, ...]) -> Diagram:
    """The diagram, read strictly: a line that is none of the forms it uses fails the test, so
    that nothing drawn escapes the comparison."""
    diagram = Diagram()
    for number, line in enumerate(lines, start=1):
        if match := NODE.match(line):
            diagram.nodes[match["id"]] = match["label"]
        elif match := EDGE.match(line):
            diagram.edges.append((match["source"], match["target"], match["label"] or ""))
        elif match := SUBGRAPH.match(line):
            diagram.subgraphs.add(match["id"])
        elif match := CLASS.match(line):
            for node in match["ids"].split(","):
                assert node not in diagram.classes, f"{node} has two classes"
                diagram.classes[node] = match["name"]
        elif not IGNORED.match(line):
            pytest.fail(f"docs/architecture.md, diagram line {number}: cannot read {line!r}")
    for source, target, _ in diagram.edges:
        for end in (source, target):
            assert end in diagram.nodes or end in diagram.subgraphs, f"edge to undeclared {end}"
    for node in diagram.classes:
        assert node in diagram.nodes, f"class given to undeclared node {node}"
    return diagram


@pytest.fixture(scope="module")
def diagram() -> Diagram:
    (block,) = [b for b in mermaid_blocks(ARCHITECTURE) if b.text.lstrip().startswith("flowchart")]
    return parse(block.lines)


# ---- the template --------------------------------------------------------------------------------


def _get_att(value) -> str | None:
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        return value["Fn::GetAtt"][0]
    if isinstance(value, dict) and "Ref" in value:
        return value["Ref"]
    return None


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def resource_nodes(resources: dict[str, dict]) -> dict[str, set[str]]:
    """Mermaid class -> the stems of the template's resources of its types."""
    found: dict[str, set[str]] = {name: set() for name in RESOURCE_CLASSES}
    for logical_id, resource in resources.items():
        for name, types in RESOURCE_CLASSES.items():
            if resource["Type"] in types:
                found[name].add(stem(logical_id))
    return found


def template_edges(resources: dict[str, dict]) -> set[tuple[str, str]]:
    """(source, target) stems of every relation the diagram draws between resources."""
    edges: set[tuple[str, str]] = set()
    functions_by_role: dict[str, list[str]] = {}
    for lid, r in resources.items():
        if r["Type"] == "AWS::Lambda::Function":
            role = _get_att(r["Properties"]["Role"])
            functions_by_role.setdefault(role, []).append(lid)
    for lid, r in resources.items():
        props = r.get("Properties", {})
        if r["Type"] == "AWS::IoT::TopicRule":
            payload = props["TopicRulePayload"]
            for action in payload["Actions"]:
                if "Lambda" in action:
                    edges.add((lid, _get_att(action["Lambda"]["FunctionArn"])))
            error = payload.get("ErrorAction", {})
            if "Sqs" in error:
                edges.add((lid, _get_att(error["Sqs"]["QueueUrl"])))
        elif r["Type"] == "AWS::Lambda::EventInvokeConfig":
            destination = props.get("DestinationConfig", {}).get("OnFailure", {})
            if destination:
                edges.add((_get_att(props["FunctionName"]), _get_att(destination["Destination"])))
        elif r["Type"] == "AWS::Lambda::EventSourceMapping":
            edges.add((_get_att(props["EventSourceArn"]), _get_att(props["FunctionName"])))
        elif r["Type"] == "AWS::SQS::Queue" and "RedrivePolicy" in props:
            edges.add((lid, _get_att(props["RedrivePolicy"]["deadLetterTargetArn"])))
        elif r["Type"] == "AWS::Events::Rule":
            for target in props.get("Targets", []):
                edges.add((lid, _get_att(target["Arn"])))
                if "DeadLetterConfig" in target:
                    edges.add((lid, _get_att(target["DeadLetterConfig"]["Arn"])))
        elif r["Type"] == "AWS::IAM::Policy":
            for statement in props["PolicyDocument"]["Statement"]:
                actions = _as_list(statement["Action"])
                if statement["Effect"] != "Allow" or "sqs:SendMessage" not in actions:
                    continue
                queues = [_get_att(q) for q in _as_list(statement["Resource"])]
                for role in props["Roles"]:
                    for function in functions_by_role.get(_get_att(role), []):
                        edges.update((function, q) for q in queues if q in resources)
    return {(stem(s), stem(t)) for s, t in edges if s and t}


def _path(resources: dict[str, dict], resource_id: str | None) -> str:
    parts = []
    while resource_id and resources[resource_id]["Type"] == "AWS::ApiGateway::Resource":
        props = resources[resource_id]["Properties"]
        parts.append(props["PathPart"])
        resource_id = _get_att(props["ParentId"])
    return "/" + "/".join(reversed(parts))


def api_routes(resources: dict[str, dict]) -> set[tuple[str, str]]:
    """("METHOD /path", function stem) for every API method with a Lambda integration."""
    routes = set()
    for r in resources.values():
        if r["Type"] != "AWS::ApiGateway::Method" or r["Properties"]["HttpMethod"] == "OPTIONS":
            continue
        props = r["Properties"]
        uri = str(props.get("Integration", {}).get("Uri"))
        functions = {
            lid for lid in resources if lid in uri and "Function" in resources[lid]["Type"]
        }
        for function in functions:
            route = f"{props['HttpMethod']} {_path(resources, _get_att(props['ResourceId']))}"
            routes.add((route, stem(function)))
    return routes


# ---- the comparison ------------------------------------------------------------------------------


def test_the_diagram_reads(diagram):
    assert diagram.of_class("fn") and diagram.of_class("queue") and diagram.of_class("rule")


@pytest.mark.parametrize("cls", sorted(RESOURCE_CLASSES))
def test_every_resource_of_the_template_is_drawn_and_nothing_else(diagram, resources, cls):
    in_template = resource_nodes(resources)[cls]
    drawn = diagram.of_class(cls)
    missing = sorted(in_template - drawn)
    extra = sorted(drawn - in_template)
    assert not missing, (
        f"docs/architecture.md does not draw these {RESOURCE_CLASSES[cls]} of the template: "
        f"{missing} (add a node with that id and `class <id> {cls}`)"
    )
    assert not extra, (
        f"docs/architecture.md draws as {cls} what the template does not have: {extra}"
    )


def test_every_edge_between_resources_is_the_templates(diagram, resources):
    drawn_resources = {
        node for node in diagram.classes if diagram.classes[node] in RESOURCE_CLASSES
    }
    expected = template_edges(resources)
    drawn = {
        (source, target)
        for source, target, _ in diagram.edges
        if source in drawn_resources
        and target in drawn_resources
        and "table" not in (diagram.classes[source], diagram.classes[target])
        and "key" not in (diagram.classes[source], diagram.classes[target])
        and "topic" not in (diagram.classes[source], diagram.classes[target])
    }
    missing = sorted(expected - drawn)
    extra = sorted(drawn - expected)
    assert not missing, f"relations of the template the diagram does not draw: {missing}"
    assert not extra, f"edges of the diagram the template does not have: {extra}"


def test_every_api_route_is_on_the_edge_to_its_function(diagram, resources):
    drawn = set()
    for source, target, label in diagram.edges:
        if source != "Api":
            continue
        for route in re.split(r"<br\s*/?>", label):
            if route.strip():
                drawn.add((route.strip(), target))
    expected = api_routes(resources)
    assert expected, "no API route found in the template"
    assert sorted(expected - drawn) == [], "routes of the template the diagram does not show"
    assert sorted(drawn - expected) == [], "routes of the diagram the template does not have"
