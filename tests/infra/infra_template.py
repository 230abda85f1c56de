"""Queries over a synthesized CloudFormation template, shared by the infrastructure tests.

(Named infra_template, not helpers: test directories here have no __init__.py, so module names
must be unique across the whole test tree.)
"""

from __future__ import annotations

from typing import Any

# How tokens render in `render`: the same notation cdk-nag uses in its finding ids.
PARTITION = "<AWS::Partition>"
REGION = "<AWS::Region>"
ACCOUNT = "<AWS::AccountId>"
IOT_ARN_PREFIX = f"arn:{PARTITION}:iot:{REGION}:{ACCOUNT}"
KMS_KEYS = f"arn:{PARTITION}:kms:{REGION}:{ACCOUNT}:key/*"


def of_type(resources: dict[str, dict], cfn_type: str) -> dict[str, dict]:
    return {lid: r for lid, r in resources.items() if r["Type"] == cfn_type}


def only(resources: dict[str, dict], cfn_type: str) -> tuple[str, dict]:
    found = of_type(resources, cfn_type)
    assert len(found) == 1, f"expected one {cfn_type}, found {sorted(found)}"
    return next(iter(found.items()))


def render(value: Any) -> Any:
    """Fn::Join/Ref/GetAtt rendered as readable strings (`<AWS::Region>`, `<Logical.Arn>`),
    recursively, so that documents built from tokens compare with plain Python values."""
    if isinstance(value, list):
        return [render(v) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"Fn::Join"}:
        separator, parts = value["Fn::Join"]
        return separator.join(str(render(p)) for p in parts)
    if set(value) == {"Ref"}:
        return f"<{value['Ref']}>"
    if set(value) == {"Fn::GetAtt"}:
        return f"<{'.'.join(value['Fn::GetAtt'])}>"
    return {k: render(v) for k, v in value.items()}


def function_by_service(resources: dict[str, dict], service_name: str) -> tuple[str, dict]:
    for lid, r in of_type(resources, "AWS::Lambda::Function").items():
        env = r["Properties"].get("Environment", {}).get("Variables", {})
        if env.get("POWERTOOLS_SERVICE_NAME") == service_name:
            return lid, r
    raise AssertionError(f"no function with POWERTOOLS_SERVICE_NAME={service_name}")


def role_of(function: dict) -> str:
    return function["Properties"]["Role"]["Fn::GetAtt"][0]


def role_statements(resources: dict[str, dict], role_id: str) -> list[dict]:
    """Every statement of every inline policy attached to the role."""
    statements = []
    for policy in of_type(resources, "AWS::IAM::Policy").values():
        if {"Ref": role_id} in policy["Properties"]["Roles"]:
            statements.extend(policy["Properties"]["PolicyDocument"]["Statement"])
    for inline in resources[role_id]["Properties"].get("Policies", []):
        statements.extend(inline["PolicyDocument"]["Statement"])
    return statements


def as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def allowed_actions(statements: list[dict]) -> set[str]:
    return {a for s in statements if s["Effect"] == "Allow" for a in as_list(s["Action"])}


def resources_for(statements: list[dict], action: str) -> list:
    """The rendered resources of the Allow statements that grant `action`."""
    found = []
    for s in statements:
        if s["Effect"] == "Allow" and action in as_list(s["Action"]):
            found.extend(render(as_list(s["Resource"])))
    return found


def statements_for(statements: list[dict], action: str) -> list[dict]:
    """The Allow statements that grant `action`, rendered."""
    return [
        render(s) for s in statements if s["Effect"] == "Allow" and action in as_list(s["Action"])
    ]


def table_key_id(resources: dict[str, dict]) -> str:
    """The logical id of the KMS key that encrypts the table."""
    _, table = only(resources, "AWS::DynamoDB::Table")
    return table["Properties"]["SSESpecification"]["KMSMasterKeyId"]["Fn::GetAtt"][0]


def data_key_key_id(resources: dict[str, dict]) -> str:
    """The logical id of the KMS key that wraps the devices' data keys (FLEETKEY_DATA_KEY_ID of
    the data_keys function)."""
    for r in of_type(resources, "AWS::Lambda::Function").values():
        env = r["Properties"].get("Environment", {}).get("Variables", {})
        if env.get("POWERTOOLS_SERVICE_NAME") == "fleetkey-data_keys":
            return env["FLEETKEY_DATA_KEY_ID"]["Ref"]
    raise AssertionError("no data_keys function")


def output_ref(outputs: dict[str, dict], name: str) -> str:
    """The logical id of the resource a stack output names by `Ref` (a queue's URL, a key's
    id)."""
    return outputs[name]["Value"]["Ref"]


def method_paths(resources: dict[str, dict]) -> dict[tuple[str, str], dict]:
    """Every API method by (HTTP method, resource path), e.g. ("POST", "/v1/token")."""
    nodes = of_type(resources, "AWS::ApiGateway::Resource")

    def path(ref: dict) -> str:
        if "Fn::GetAtt" in ref:  # the root resource
            return ""
        node = nodes[ref["Ref"]]["Properties"]
        return f"{path(node['ParentId'])}/{node['PathPart']}"

    return {
        (m["Properties"]["HttpMethod"], path(m["Properties"]["ResourceId"]) or "/"): m
        for m in of_type(resources, "AWS::ApiGateway::Method").values()
    }
