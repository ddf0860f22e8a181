#!/usr/bin/env python3
"""ssh_config helper for the cluster deploy test: maps a made-up EC2 public IP to one of the
stand-in hosts (each a loopback address with its own sshd), the first time ssh is asked to
reach it. Run as `Match exec "python route.py %h STATE ENDPOINT"`; the ssh_config then
includes STATE/hosts.conf, where this adds `Host <public IP>` with the stand-in's HostName
and Port. It also records, in STATE/map.json, the instance's public and private IPs → the
stand-in's address, which the systemctl stand-in uses to rewrite installed configs.
Nothing ever connects to the made-up addresses. Always exits 0."""
import fcntl
import json
import os
import sys

host, state, endpoint = sys.argv[1:4]
if host.startswith("127."):
    sys.exit(0)
with open(os.path.join(state, "lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    map_path = os.path.join(state, "map.json")
    mapping = json.load(open(map_path)) if os.path.exists(map_path) else {}
    if host in mapping:
        sys.exit(0)
    import boto3

    ec2 = boto3.client(
        "ec2",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    private = None
    for reservation in ec2.describe_instances()["Reservations"]:
        for instance in reservation["Instances"]:
            if instance.get("PublicIpAddress") == host:
                private = instance.get("PrivateIpAddress")
    if private is None:
        sys.exit(0)
    slots = json.load(open(os.path.join(state, "slots.json")))
    used = set(mapping.values())
    free = [s for s in slots if s["addr"] not in used]
    if not free:
        sys.exit(0)
    slot = free[0]
    mapping[host] = slot["addr"]
    mapping[private] = slot["addr"]
    with open(map_path + ".new", "w") as f:
        json.dump(mapping, f)
    os.replace(map_path + ".new", map_path)
    with open(os.path.join(state, "hosts.conf"), "a") as f:
        f.write(f"Host {host}\n  HostName {slot['addr']}\n  Port {slot['port']}\n")
