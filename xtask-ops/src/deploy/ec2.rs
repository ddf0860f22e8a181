//! Everything `deploy` asks of AWS, through `aws-sdk-ec2` and `aws-sdk-ssm`. Every call's
//! failure is turned into a message that says which permission or setting is missing.

use std::fmt::Debug;

use anyhow::Context;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, Instance,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest, InstanceStateName, KeyFormat,
    KeyType, LocationType, ResourceType, Tag, TagSpecification, VolumeType,
};

/// The tag every resource of ours carries; `Name` says which deployment.
pub const APP_TAG: (&str, &str) = ("app", "secure-chat");

/// The public SSM parameter that names the latest Amazon Linux 2023 AMI.
pub const AL2023_PARAMETER: &str =
    "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64";

/// Turns an SDK error into one a person can act on. `action` is the IAM action name
/// (`ec2:RunInstances`), which is also what a missing permission is called.
pub fn aws_error<E, R>(action: &str, err: SdkError<E, R>) -> anyhow::Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: Debug + Send + Sync + 'static,
{
    let detail = DisplayErrorContext(&err).to_string();
    anyhow::anyhow!(explain(action, err.code(), err.message(), &detail))
}

/// The message for a failed AWS call, from its error code (pure, so it is unit-tested).
pub fn explain(action: &str, code: Option<&str>, message: Option<&str>, detail: &str) -> String {
    let message = message.unwrap_or("");
    match code {
        Some("UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException") => format!(
            "AWS denied {action}: your credentials lack the IAM permission `{action}`. \
             Attach a policy allowing it (infra/README.md lists every permission deploy \
             needs) and run again. AWS said: {message}"
        ),
        Some(
            "AuthFailure"
            | "InvalidClientTokenId"
            | "SignatureDoesNotMatch"
            | "UnrecognizedClientException"
            | "ExpiredToken"
            | "RequestExpired"
            | "ExpiredTokenException",
        ) => format!(
            "AWS rejected the credentials when calling {action}: {message}. Check \
             AWS_PROFILE / --profile, refresh an SSO session with `aws sso login`, or \
             check the access key and the clock of this machine"
        ),
        Some("OptInRequired") => format!(
            "{action}: the account is not subscribed to EC2 in this region ({message}); \
             enable the region in the AWS console or pick another with --region"
        ),
        Some("InstanceLimitExceeded" | "VcpuLimitExceeded") => format!(
            "{action}: the account's instance limit is reached ({message}); terminate an \
             instance or ask AWS for a higher limit"
        ),
        Some(code) => format!("{action} failed: {code}: {message}"),
        // No service answer at all: network, endpoint or credential resolution.
        None => format!(
            "could not complete {action}: {detail}. Check the network connection, the \
             region and --endpoint-url / AWS_ENDPOINT_URL if you set one"
        ),
    }
}

pub(super) fn filter(name: &str, values: &[&str]) -> Filter {
    values
        .iter()
        .fold(Filter::builder().name(name), |b, v| b.values(*v))
        .build()
}

pub(super) fn tags(resource: ResourceType, name: &str) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(resource)
        .tags(Tag::builder().key(APP_TAG.0).value(APP_TAG.1).build())
        .tags(Tag::builder().key("Name").value(name).build())
        .build()
}

/// The AMI to launch and its root device name.
#[derive(Debug, Clone)]
pub struct Image {
    pub id: String,
    pub name: String,
    pub root_device: String,
    /// Size of the image's root snapshot (the launch asks for exactly that).
    pub root_gib: i32,
}

/// The latest Amazon Linux 2023 x86_64 AMI: from the public SSM parameter, or (if SSM is
/// not allowed) the newest matching image owned by Amazon.
pub async fn latest_al2023(ec2: &Client, ssm: &aws_sdk_ssm::Client) -> anyhow::Result<Image> {
    let from_ssm = ssm.get_parameter().name(AL2023_PARAMETER).send().await;
    let id = match from_ssm {
        Ok(out) => out.parameter().and_then(|p| p.value()).map(str::to_owned),
        Err(err) => {
            eprintln!(
                "note: {}; looking the AMI up with DescribeImages instead",
                aws_error("ssm:GetParameter", err)
            );
            None
        }
    };
    let images = match &id {
        Some(id) => ec2.describe_images().image_ids(id).send().await,
        None => {
            ec2.describe_images()
                .owners("amazon")
                .filters(filter("name", &["al2023-ami-2023.*-kernel-*-x86_64"]))
                .filters(filter("architecture", &["x86_64"]))
                .filters(filter("state", &["available"]))
                .send()
                .await
        }
    }
    .map_err(|e| aws_error("ec2:DescribeImages", e))?;
    let image = images
        .images()
        .iter()
        .filter(|i| !i.name().unwrap_or_default().contains("minimal"))
        .max_by_key(|i| i.creation_date().unwrap_or_default().to_owned())
        .context("found no Amazon Linux 2023 x86_64 image in this region")?;
    let root_device = image.root_device_name().unwrap_or("/dev/xvda").to_owned();
    let root_gib = image
        .block_device_mappings()
        .iter()
        .find(|m| m.device_name() == Some(root_device.as_str()))
        .and_then(|m| m.ebs())
        .and_then(|e| e.volume_size())
        .unwrap_or(8);
    Ok(Image {
        id: image.image_id().unwrap_or_default().to_owned(),
        name: image.name().unwrap_or_default().to_owned(),
        root_device,
        root_gib,
    })
}

/// Fails unless `instance_type` can be launched in the client's region.
pub async fn check_instance_type(
    ec2: &Client,
    region: &str,
    instance_type: &str,
) -> anyhow::Result<()> {
    let out = ec2
        .describe_instance_type_offerings()
        .location_type(LocationType::Region)
        .filters(filter("instance-type", &[instance_type]))
        .send()
        .await
        .map_err(|e| aws_error("ec2:DescribeInstanceTypeOfferings", e))?;
    anyhow::ensure!(
        !out.instance_type_offerings().is_empty(),
        "instance type {instance_type} is not offered in {region}: pick another with \
         --instance-type (t3.micro is the free-tier type where t2.micro is missing) or \
         another --region"
    );
    Ok(())
}

/// Whether the key pair exists.
pub async fn key_pair_exists(ec2: &Client, key_name: &str) -> anyhow::Result<bool> {
    let out = ec2
        .describe_key_pairs()
        .filters(filter("key-name", &[key_name]))
        .send()
        .await
        .map_err(|e| aws_error("ec2:DescribeKeyPairs", e))?;
    Ok(!out.key_pairs().is_empty())
}

/// Creates an Ed25519 key pair and returns its private key (OpenSSH PEM); AWS keeps only
/// the public half.
pub async fn create_key_pair(ec2: &Client, key_name: &str, name: &str) -> anyhow::Result<String> {
    let out = ec2
        .create_key_pair()
        .key_name(key_name)
        .key_type(KeyType::Ed25519)
        .key_format(KeyFormat::Pem)
        .tag_specifications(tags(ResourceType::KeyPair, name))
        .send()
        .await
        .map_err(|e| aws_error("ec2:CreateKeyPair", e))?;
    out.key_material()
        .map(str::to_owned)
        .context("AWS created the key pair but returned no private key")
}

pub async fn delete_key_pair(ec2: &Client, key_name: &str) -> anyhow::Result<()> {
    ec2.delete_key_pair()
        .key_name(key_name)
        .send()
        .await
        .map_err(|e| aws_error("ec2:DeleteKeyPair", e))?;
    Ok(())
}

/// The tag saying which node of a cluster an instance is (`0`, `1`, …).
pub const NODE_TAG: &str = "secure-chat-node";

/// Whether an instance was launched as a cluster node.
pub fn is_node(instance: &Instance) -> bool {
    instance.tags().iter().any(|t| t.key() == Some(NODE_TAG))
}

/// The node index an instance was launched as (0 for a single host, untagged).
pub fn node_of(instance: &Instance) -> usize {
    instance
        .tags()
        .iter()
        .find(|t| t.key() == Some(NODE_TAG))
        .and_then(|t| t.value())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One availability zone and its default subnet (in the default VPC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub name: String,
    pub subnet_id: String,
}

/// The region's availability zones that have a default subnet, by name.
pub async fn default_subnets(ec2: &Client) -> anyhow::Result<Vec<Zone>> {
    let out = ec2
        .describe_subnets()
        .filters(filter("default-for-az", &["true"]))
        .send()
        .await
        .map_err(|e| aws_error("ec2:DescribeSubnets", e))?;
    let mut zones: Vec<Zone> = out
        .subnets()
        .iter()
        .filter_map(|s| {
            Some(Zone {
                name: s.availability_zone()?.to_owned(),
                subnet_id: s.subnet_id()?.to_owned(),
            })
        })
        .collect();
    zones.sort_by(|a, b| a.name.cmp(&b.name));
    zones.dedup_by(|a, b| a.name == b.name);
    anyhow::ensure!(
        !zones.is_empty(),
        "this region has no default subnets; create the default VPC with `aws ec2 \
         create-default-vpc` or pick another --region"
    );
    Ok(zones)
}

/// The `zones` where `instance_type` is offered (AWS offers some types in only some of a
/// region's zones); fails if none.
pub async fn zones_offering(
    ec2: &Client,
    zones: Vec<Zone>,
    instance_type: &str,
) -> anyhow::Result<Vec<Zone>> {
    let out = ec2
        .describe_instance_type_offerings()
        .location_type(LocationType::AvailabilityZone)
        .filters(filter("instance-type", &[instance_type]))
        .send()
        .await
        .map_err(|e| aws_error("ec2:DescribeInstanceTypeOfferings", e))?;
    let offered: Vec<&str> = out
        .instance_type_offerings()
        .iter()
        .filter_map(|o| o.location())
        .collect();
    let all: Vec<String> = zones.iter().map(|z| z.name.clone()).collect();
    let zones: Vec<Zone> = zones
        .into_iter()
        .filter(|z| offered.contains(&z.name.as_str()))
        .collect();
    anyhow::ensure!(
        !zones.is_empty(),
        "instance type {instance_type} is offered in none of the zones with a default \
         subnet ({}); pick another --instance-type",
        all.join(", ")
    );
    Ok(zones)
}

/// What `launch` needs.
pub struct Launch<'a> {
    pub name: &'a str,
    pub image: &'a Image,
    pub instance_type: &'a str,
    pub key_name: &'a str,
    pub security_group_id: &'a str,
    /// For a cluster node: its index and the subnet (zone) to put it in.
    pub node: Option<(usize, &'a Zone)>,
    pub dry_run: bool,
}

/// Launches the instance: IMDSv2 only, encrypted gp3 root volume, tagged. With `dry_run`
/// AWS only checks the permissions and parameters; returns None then.
/// A cluster node's root volume, GiB: the system (about 2), NATS's file store (at most
/// `max_file_store`, 4 GB, in infra/nats-server.conf), the journal, and room for JetStream
/// to compact. A single host keeps the image's size (SQLite's queue is smaller).
pub const NODE_ROOT_GIB: i32 = 16;

pub async fn launch(ec2: &Client, l: &Launch<'_>) -> anyhow::Result<Option<String>> {
    let mut instance_tags = tags(ResourceType::Instance, l.name);
    let mut request = ec2.run_instances();
    if let Some((index, zone)) = l.node {
        request = request.subnet_id(&zone.subnet_id);
        instance_tags = TagSpecification::builder()
            .resource_type(ResourceType::Instance)
            .set_tags(Some(instance_tags.tags().to_vec()))
            .tags(
                Tag::builder()
                    .key(NODE_TAG)
                    .value(index.to_string())
                    .build(),
            )
            .build();
    }
    let result = request
        .image_id(&l.image.id)
        .instance_type(l.instance_type.into())
        .key_name(l.key_name)
        .security_group_ids(l.security_group_id)
        .min_count(1)
        .max_count(1)
        .metadata_options(
            InstanceMetadataOptionsRequest::builder()
                .http_tokens(HttpTokensState::Required)
                .http_endpoint(InstanceMetadataEndpointState::Enabled)
                .build(),
        )
        .block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name(&l.image.root_device)
                .ebs(
                    EbsBlockDevice::builder()
                        .encrypted(true)
                        .volume_type(VolumeType::Gp3)
                        .volume_size(if l.node.is_some() {
                            l.image.root_gib.max(NODE_ROOT_GIB)
                        } else {
                            l.image.root_gib
                        })
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        )
        .tag_specifications(instance_tags)
        .tag_specifications(tags(ResourceType::Volume, l.name))
        .dry_run(l.dry_run)
        .send()
        .await;
    match result {
        Err(e) if l.dry_run && e.code() == Some("DryRunOperation") => Ok(None),
        Err(e) => Err(aws_error("ec2:RunInstances", e)),
        Ok(out) => out
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .map(|id| Some(id.to_owned()))
            .context("AWS launched no instance"),
    }
}

/// The deployment's instances that are not terminated (normally one), newest first.
pub async fn find_instances(ec2: &Client, name: &str) -> anyhow::Result<Vec<Instance>> {
    let out = ec2
        .describe_instances()
        .filters(filter(&format!("tag:{}", APP_TAG.0), &[APP_TAG.1]))
        .filters(filter("tag:Name", &[name]))
        .filters(filter(
            "instance-state-name",
            &["pending", "running", "stopping", "stopped"],
        ))
        .send()
        .await
        .map_err(|e| aws_error("ec2:DescribeInstances", e))?;
    let mut instances: Vec<Instance> = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .cloned()
        .collect();
    instances.sort_by_key(|i| std::cmp::Reverse(i.launch_time().map(|t| t.secs())));
    Ok(instances)
}

/// One instance by id.
pub async fn describe(ec2: &Client, instance_id: &str) -> anyhow::Result<Instance> {
    let out = ec2
        .describe_instances()
        .instance_ids(instance_id)
        .send()
        .await
        .map_err(|e| aws_error("ec2:DescribeInstances", e))?;
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .next()
        .cloned()
        .with_context(|| format!("instance {instance_id} not found"))
}

pub fn state(instance: &Instance) -> InstanceStateName {
    instance
        .state()
        .and_then(|s| s.name())
        .cloned()
        .unwrap_or(InstanceStateName::Pending)
}

pub async fn start(ec2: &Client, instance_id: &str) -> anyhow::Result<()> {
    ec2.start_instances()
        .instance_ids(instance_id)
        .send()
        .await
        .map_err(|e| aws_error("ec2:StartInstances", e))?;
    Ok(())
}

pub async fn terminate(ec2: &Client, instance_id: &str) -> anyhow::Result<()> {
    ec2.terminate_instances()
        .instance_ids(instance_id)
        .send()
        .await
        .map_err(|e| aws_error("ec2:TerminateInstances", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_permission_names_the_iam_action() {
        let msg = explain(
            "ec2:RunInstances",
            Some("UnauthorizedOperation"),
            Some("You are not authorized to perform this operation."),
            "service error",
        );
        assert!(
            msg.contains("lack the IAM permission `ec2:RunInstances`"),
            "{msg}"
        );
        assert!(msg.contains("infra/README.md"), "{msg}");
    }

    #[test]
    fn bad_or_expired_credentials_point_at_the_profile() {
        for code in ["AuthFailure", "ExpiredToken", "InvalidClientTokenId"] {
            let msg = explain("ec2:DescribeImages", Some(code), Some("nope"), "");
            assert!(msg.contains("aws sso login"), "{code}: {msg}");
        }
    }

    #[test]
    fn no_answer_at_all_points_at_network_and_endpoint() {
        let msg = explain(
            "ec2:DescribeVpcs",
            None,
            None,
            "dispatch failure: connection refused",
        );
        assert!(msg.contains("connection refused"), "{msg}");
        assert!(msg.contains("--endpoint-url"), "{msg}");
    }

    #[test]
    fn other_codes_are_passed_through() {
        let msg = explain(
            "ec2:RunInstances",
            Some("InvalidAMIID.NotFound"),
            Some("gone"),
            "",
        );
        assert_eq!(msg, "ec2:RunInstances failed: InvalidAMIID.NotFound: gone");
    }
}
