"""The first access-token signing key: an asymmetric KMS signing key, tagged, retained."""

from fleetkey.services.signing_keys import same_policy, token_key_policy, token_signing_tags
from fleetkey_infra import constants
from infra_template import (
    ACCOUNT,
    PARTITION,
    data_key_key_id,
    function_by_service,
    of_type,
    render,
    table_key_id,
)


def alarm_topic_key_id(resources: dict[str, dict]) -> str:
    """The logical id of the KMS key that encrypts the alarm topic (constructs/monitoring.py)."""
    [topic] = of_type(resources, "AWS::SNS::Topic").values()
    return topic["Properties"]["KmsMasterKeyId"]["Fn::GetAtt"][0]


def token_key(resources: dict[str, dict]) -> tuple[str, dict]:
    others = {table_key_id(resources), data_key_key_id(resources), alarm_topic_key_id(resources)}
    keys = {lid: r for lid, r in of_type(resources, "AWS::KMS::Key").items() if lid not in others}
    assert len(keys) == 1, sorted(keys)
    return next(iter(keys.items()))


def test_stack_has_the_table_key_the_data_key_key_and_one_token_signing_key(
    resources: dict[str, dict],
) -> None:
    # Given the synthesized stack
    # When listing its KMS keys
    # Then there are four: the table's, the data keys', the alarm topic's and the first token
    # signing key
    assert len(of_type(resources, "AWS::KMS::Key")) == 4
    token_key(resources)


def test_token_key_is_a_p256_signing_key_without_kms_rotation(resources: dict[str, dict]) -> None:
    # Given the token signing key
    _, key = token_key(resources)
    props = key["Properties"]

    # When reading its spec and usage
    # Then it signs ES256 tokens, and has no rotation flag (KMS rotates symmetric keys only;
    # fleetkey rotates by creating new keys)
    assert props["KeySpec"] == "ECC_NIST_P256"
    assert props["KeyUsage"] == "SIGN_VERIFY"
    assert "EnableKeyRotation" not in props
    assert props["Description"]


def test_token_key_carries_the_stacks_token_signing_tag(resources: dict[str, dict]) -> None:
    # Given the token signing key
    _, key = token_key(resources)

    # When reading its tags
    tags = {t["Key"]: t["Value"] for t in key["Properties"]["Tags"]}

    # Then it has the tag the core puts on the keys it creates for this stack (and the grants
    # key on): its value names the stack, so no other stack's grants reach it
    expected = token_signing_tags(constants.STACK_ID)
    assert expected == {"fleetkey:purpose": f"token-signing:{constants.STACK_ID}"}
    assert tags.items() >= expected.items()


def test_token_key_is_retained(resources: dict[str, dict]) -> None:
    # Given the token signing key
    _, key = token_key(resources)

    # When reading its policies
    # Then neither a stack deletion nor a replacement deletes it (tokens it signed stay
    # verifiable; retirement schedules its deletion in KMS)
    assert key["DeletionPolicy"] == "Retain"
    assert key["UpdateReplacePolicy"] == "Retain"


def test_every_registry_reader_knows_the_first_key_by_its_id(resources: dict[str, dict]) -> None:
    # Given the token signing key and the functions that read the signing-key registry
    key_id, _ = token_key(resources)
    for service in READERS:
        _, function = function_by_service(resources, service)

        # When reading the function's environment
        env = function["Properties"]["Environment"]["Variables"]

        # Then FLEETKEY_TOKEN_KEY_ID is that key's id (Ref of a KMS key is its key id): the sole
        # key while the registry is empty
        assert env["FLEETKEY_TOKEN_KEY_ID"] == {"Ref": key_id}, service


READERS = (
    constants.ADMIN_SERVICE_NAME,
    constants.TOKEN_SERVICE_NAME,
    constants.DISCOVERY_SERVICE_NAME,
    constants.INTROSPECT_SERVICE_NAME,
    constants.MAINTENANCE_SERVICE_NAME,
)


def test_the_first_key_has_exactly_the_policy_the_functions_trust(
    resources: dict[str, dict],
) -> None:
    # Given the token signing key and the token, admin and maintenance functions' roles
    _, key = token_key(resources)
    signer, *retirers = (
        role_arn_of(resources, service)
        for service in (
            constants.TOKEN_SERVICE_NAME,
            constants.ADMIN_SERVICE_NAME,
            constants.MAINTENANCE_SERVICE_NAME,
        )
    )

    # When comparing its key policy with the one the core builds (and checks keys against)
    expected = token_key_policy(
        partition=PARTITION, account=ACCOUNT, signer_role_arn=signer, retirer_role_arns=retirers
    )

    # Then they say the same: the stack's first key confirms like every rotated key
    assert same_policy(render(key["Properties"]["KeyPolicy"]), expected)


def role_arn_of(resources: dict[str, dict], service: str) -> str:
    _, function = function_by_service(resources, service)
    return f"<{function['Properties']['Role']['Fn::GetAtt'][0]}.Arn>"


def test_the_key_policy_grants_sign_and_deletion_to_fleetkeys_roles_only(
    resources: dict[str, dict],
) -> None:
    # Given the token signing key's policy
    _, key = token_key(resources)
    allows = [
        render(s) for s in key["Properties"]["KeyPolicy"]["Statement"] if s["Effect"] == "Allow"
    ]

    # When reading who it allows what directly (not through the account's IAM)
    direct = {
        (a, p)
        for s in allows
        if s["Principal"]["AWS"] != f"arn:{PARTITION}:iam::{ACCOUNT}:root"
        for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
        for p in (
            [s["Principal"]["AWS"]]
            if isinstance(s["Principal"]["AWS"], str)
            else s["Principal"]["AWS"]
        )
    }

    # Then the token role signs and the admin and maintenance roles schedule deletion, nothing
    # else: IAM grants neither (tagging a foreign key as this stack's gains no Sign, no deletion)
    assert direct == {
        ("kms:Sign", role_arn_of(resources, constants.TOKEN_SERVICE_NAME)),
        ("kms:ScheduleKeyDeletion", role_arn_of(resources, constants.ADMIN_SERVICE_NAME)),
        ("kms:ScheduleKeyDeletion", role_arn_of(resources, constants.MAINTENANCE_SERVICE_NAME)),
    }


def test_the_first_key_is_single_region_with_kms_material(resources: dict[str, dict]) -> None:
    _, key = token_key(resources)
    assert key["Properties"]["Origin"] == "AWS_KMS"
    assert key["Properties"]["MultiRegion"] is False


def test_every_registry_reader_knows_the_retirer_roles(resources: dict[str, dict]) -> None:
    admin = role_arn_of(resources, constants.ADMIN_SERVICE_NAME)
    maintenance = role_arn_of(resources, constants.MAINTENANCE_SERVICE_NAME)
    for service in READERS:
        _, function = function_by_service(resources, service)
        env = function["Properties"]["Environment"]["Variables"]
        assert render(env["FLEETKEY_TOKEN_KEY_RETIRER_ROLE_ARNS"]) == f"{admin},{maintenance}"


def test_only_the_token_role_may_sign_whatever_iam_grants(resources: dict[str, dict]) -> None:
    # Given the token signing key and the token function's role
    _, key = token_key(resources)
    statements = key["Properties"]["KeyPolicy"]["Statement"]

    # When reading its key policy
    [deny] = [s for s in statements if s.get("Effect") == "Deny"]

    # Then every principal but one is denied kms:Sign, and that one is the token role; every
    # registry reader knows the role, to compare keys' policies (and admin, to write them)
    assert deny["Action"] == "kms:Sign" and deny["Principal"] == {"AWS": "*"}
    [role_arn] = deny["Condition"]["ArnNotEquals"]["aws:PrincipalArn"]["Fn::GetAtt"][:1]
    assert "Token" in role_arn
    for service in READERS:
        _, function = function_by_service(resources, service)
        env = function["Properties"]["Environment"]["Variables"]
        assert env["FLEETKEY_TOKEN_SIGNER_ROLE_ARN"]["Fn::GetAtt"][0] == role_arn, service
