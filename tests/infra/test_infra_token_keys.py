"""The first access-token signing key: an asymmetric KMS signing key, tagged, retained."""

from fleetkey.services.signing_keys import TAGS
from fleetkey_infra import constants
from infra_template import function_by_service, of_type, table_key_id


def token_key(resources: dict[str, dict]) -> tuple[str, dict]:
    keys = {
        lid: r
        for lid, r in of_type(resources, "AWS::KMS::Key").items()
        if lid != table_key_id(resources)
    }
    assert len(keys) == 1, sorted(keys)
    return next(iter(keys.items()))


def test_stack_has_the_table_key_and_one_token_signing_key(resources: dict[str, dict]) -> None:
    # Given the synthesized stack
    # When listing its KMS keys
    # Then there are two: the table's and the first token signing key
    assert len(of_type(resources, "AWS::KMS::Key")) == 2
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


def test_token_key_carries_the_token_signing_tag_of_the_core(resources: dict[str, dict]) -> None:
    # Given the token signing key
    _, key = token_key(resources)

    # When reading its tags
    tags = {t["Key"]: t["Value"] for t in key["Properties"]["Tags"]}

    # Then it has the tag the core puts on the keys it creates (and the grants key on)
    assert TAGS == {"fleetkey:purpose": "token-signing"}
    assert tags.items() >= TAGS.items()
    assert {constants.TOKEN_SIGNING_TAG_KEY: constants.TOKEN_SIGNING_TAG_VALUE} == TAGS


def test_token_key_is_retained(resources: dict[str, dict]) -> None:
    # Given the token signing key
    _, key = token_key(resources)

    # When reading its policies
    # Then neither a stack deletion nor a replacement deletes it (tokens it signed stay
    # verifiable; retirement schedules its deletion in KMS)
    assert key["DeletionPolicy"] == "Retain"
    assert key["UpdateReplacePolicy"] == "Retain"


def test_token_function_adopts_the_key_by_its_id(resources: dict[str, dict]) -> None:
    # Given the token signing key and the token function
    key_id, _ = token_key(resources)
    _, function = function_by_service(resources, constants.TOKEN_SERVICE_NAME)

    # When reading the function's environment
    env = function["Properties"]["Environment"]["Variables"]

    # Then FLEETKEY_TOKEN_KEY_ID is that key's id (Ref of a KMS key is its key id)
    assert env["FLEETKEY_TOKEN_KEY_ID"] == {"Ref": key_id}


def test_only_the_token_role_may_sign_whatever_iam_grants(resources: dict[str, dict]) -> None:
    # Given the token signing key and the token function's role
    [(_, key)] = [(i, r) for i, r in resources.items() if r["Type"] == "AWS::KMS::Key"
                  and r["Properties"].get("KeySpec") == "ECC_NIST_P256"]
    statements = key["Properties"]["KeyPolicy"]["Statement"]

    # When reading its key policy
    [deny] = [s for s in statements if s.get("Effect") == "Deny"]

    # Then every principal but one is denied kms:Sign, and that one is the token role; the admin
    # function knows the role, to give rotated keys the same policy
    assert deny["Action"] == "kms:Sign" and deny["Principal"] == {"AWS": "*"}
    [role_arn] = deny["Condition"]["ArnNotEquals"]["aws:PrincipalArn"]["Fn::GetAtt"][:1]
    assert "Token" in role_arn
    admin = [r for r in resources.values() if r["Type"] == "AWS::Lambda::Function"
             and r["Properties"]["Environment"]["Variables"].get("POWERTOOLS_SERVICE_NAME") == "fleetkey-admin"]
    env = admin[0]["Properties"]["Environment"]["Variables"]
    assert env["FLEETKEY_TOKEN_SIGNER_ROLE_ARN"]["Fn::GetAtt"][0] == role_arn
