"""sshd AuthorizedKeysCommand for the deploy test's stand-in EC2 host: the public keys of
the key pairs that `deploy` registered in the EC2 API (moto), so the host accepts exactly
the key AWS would have installed on a real instance.

Usage: python authorized_keys.py ENDPOINT_URL"""
import sys

import boto3

ec2 = boto3.client(
    "ec2",
    endpoint_url=sys.argv[1],
    region_name="us-east-1",
    aws_access_key_id="testing",
    aws_secret_access_key="testing",
)
pairs = ec2.describe_key_pairs(
    IncludePublicKey=True, Filters=[{"Name": "tag:app", "Values": ["secure-chat"]}]
)["KeyPairs"]
for pair in pairs:
    print(pair["PublicKey"].strip())
