//! Everything `deploy` asks of AWS, through `aws-sdk-ec2` and `aws-sdk-ssm`. Every call's
//! failure is turned into a message that says which permission or setting is missing.

use std::fmt::Debug;

use anyhow::Context;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, Instance,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest, InstanceStateName, IpPermission,
    IpRange, Ipv6Range, KeyFormat, KeyType, LocationType, ResourceType, Tag, TagSpecification,
    VolumeType,
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

fn filter(name: &str, values: &[&str]) -> Filter {
    values
        .iter()
        .fold(Filter::builder().name(name), |b, v| b.values(*v))
        .build()
}

fn tags(resource: ResourceType, name: &str) -> TagSpecification {
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

/// The region's default VPC, where the group and instance go.
async fn default_vpc(ec2: &Client) -> anyhow::Result<String> {
    let out = ec2
        .describe_vpcs()
        .filters(filter("is-default", &["true"]))
        .send()
        .await
        .map_err(|e| aws_error("ec2:DescribeVpcs", e))?;
    out.vpcs()
        .first()
        .and_then(|v| v.vpc_id())
        .map(str::to_owned)
        .context(
            "this region has no default VPC; create one with `aws ec2 create-default-vpc` \
             or pick another --region",
        )
}

/// The security group of this deployment, if it exists.
pub async fn find_security_group(ec2: &Client, group_name: &str) -> anyhow::Result<Option<String>> {
    let out = ec2
        .describe_security_groups()
        .filters(filter("group-name", &[group_name]))
        .filters(filter(&format!("tag:{}", APP_TAG.0), &[APP_TAG.1]))
        .send()
        .await
        .map_err(|e| aws_error("ec2:DescribeSecurityGroups", e))?;
    Ok(out
        .security_groups()
        .first()
        .and_then(|g| g.group_id())
        .map(str::to_owned))
}

/// One ingress rule: a TCP port from one CIDR.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub port: u16,
    pub cidr: String,
}

impl Rule {
    fn permission(&self) -> IpPermission {
        let b = IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(i32::from(self.port))
            .to_port(i32::from(self.port));
        let what = if self.port == 22 {
            "SSH"
        } else {
            "Secure Chat relay"
        };
        if self.cidr.contains(':') {
            b.ipv6_ranges(
                Ipv6Range::builder()
                    .cidr_ipv6(&self.cidr)
                    .description(what)
                    .build(),
            )
        } else {
            b.ip_ranges(
                IpRange::builder()
                    .cidr_ip(&self.cidr)
                    .description(what)
                    .build(),
            )
        }
        .build()
    }
}

/// The rules a deployment wants: the relay port from anywhere (v4 and v6), SSH from one CIDR.
pub fn wanted_rules(port: u16, ssh_cidr: &str) -> Vec<Rule> {
    let mut rules = vec![
        Rule {
            port,
            cidr: "0.0.0.0/0".into(),
        },
        Rule {
            port,
            cidr: "::/0".into(),
        },
        Rule {
            port: 22,
            cidr: ssh_cidr.into(),
        },
    ];
    rules.sort();
    rules
}

/// Creates the group if needed and makes its ingress rules exactly `wanted` (an SSH rule
/// for an old address of yours is revoked). Returns the group id.
pub async fn ensure_security_group(
    ec2: &Client,
    group_name: &str,
    name: &str,
    wanted: &[Rule],
) -> anyhow::Result<String> {
    let group_id = match find_security_group(ec2, group_name).await? {
        Some(id) => id,
        None => {
            let vpc = default_vpc(ec2).await?;
            let out = ec2
                .create_security_group()
                .group_name(group_name)
                .description("Secure Chat relay: its port from anywhere, SSH from the operator")
                .vpc_id(vpc)
                .tag_specifications(tags(ResourceType::SecurityGroup, name))
                .send()
                .await
                .map_err(|e| aws_error("ec2:CreateSecurityGroup", e))?;
            let id = out
                .group_id()
                .context("AWS returned no security group id")?
                .to_owned();
            eprintln!("created security group {group_name} ({id})");
            id
        }
    };
    let current = current_rules(ec2, &group_id).await?;
    let stale: Vec<_> = current.iter().filter(|r| !wanted.contains(r)).collect();
    let missing: Vec<_> = wanted.iter().filter(|r| !current.contains(r)).collect();
    if !stale.is_empty() {
        ec2.revoke_security_group_ingress()
            .group_id(&group_id)
            .set_ip_permissions(Some(stale.iter().map(|r| r.permission()).collect()))
            .send()
            .await
            .map_err(|e| aws_error("ec2:RevokeSecurityGroupIngress", e))?;
    }
    if !missing.is_empty() {
        ec2.authorize_security_group_ingress()
            .group_id(&group_id)
            .set_ip_permissions(Some(missing.iter().map(|r| r.permission()).collect()))
            .send()
            .await
            .map_err(|e| aws_error("ec2:AuthorizeSecurityGroupIngress", e))?;
    }
    Ok(group_id)
}

/// The group's TCP ingress rules, one per (port, CIDR).
pub async fn current_rules(ec2: &Client, group_id: &str) -> anyhow::Result<Vec<Rule>> {
    let out = ec2
        .describe_security_groups()
        .group_ids(group_id)
        .send()
        .await
        .map_err(|e| aws_error("ec2:DescribeSecurityGroups", e))?;
    let mut rules = Vec::new();
    for perm in out
        .security_groups()
        .iter()
        .flat_map(|g| g.ip_permissions())
    {
        let (Some(from), Some(to)) = (perm.from_port(), perm.to_port()) else {
            continue;
        };
        let Ok(port) = u16::try_from(from) else {
            continue;
        };
        if from != to || perm.ip_protocol() != Some("tcp") {
            // Not ours: keep it out of the comparison rather than revoking by mistake.
            continue;
        }
        let v4 = perm.ip_ranges().iter().filter_map(|r| r.cidr_ip());
        let v6 = perm.ipv6_ranges().iter().filter_map(|r| r.cidr_ipv6());
        rules.extend(v4.chain(v6).map(|cidr| Rule {
            port,
            cidr: cidr.to_owned(),
        }));
    }
    rules.sort();
    Ok(rules)
}

/// Deletes the group, retrying while AWS still sees it attached to a terminating instance.
pub async fn delete_security_group(ec2: &Client, group_id: &str) -> anyhow::Result<()> {
    use super::progress::{Patience, Poll, wait_for};
    let patience = Patience {
        every: std::time::Duration::from_secs(5),
        at_most: std::time::Duration::from_secs(180),
    };
    wait_for(
        &format!("deleting security group {group_id}"),
        patience,
        || async {
            match ec2.delete_security_group().group_id(group_id).send().await {
                Ok(_) => Ok(Poll::Ready(())),
                Err(e) if e.code() == Some("DependencyViolation") => Ok(Poll::Waiting(
                    "still in use by the terminated instance".into(),
                )),
                Err(e) if e.code() == Some("InvalidGroup.NotFound") => Ok(Poll::Ready(())),
                Err(e) => Err(aws_error("ec2:DeleteSecurityGroup", e)),
            }
        },
    )
    .await
}

/// What `launch` needs.
pub struct Launch<'a> {
    pub name: &'a str,
    pub image: &'a Image,
    pub instance_type: &'a str,
    pub key_name: &'a str,
    pub security_group_id: &'a str,
    pub dry_run: bool,
}

/// Launches the instance: IMDSv2 only, encrypted gp3 root volume, tagged. With `dry_run`
/// AWS only checks the permissions and parameters; returns None then.
pub async fn launch(ec2: &Client, l: &Launch<'_>) -> anyhow::Result<Option<String>> {
    let result = ec2
        .run_instances()
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
                        .volume_size(l.image.root_gib)
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        )
        .tag_specifications(tags(ResourceType::Instance, l.name))
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

    #[test]
    fn wanted_rules_open_the_relay_everywhere_and_ssh_to_one_address() {
        let rules = wanted_rules(65432, "198.51.100.4/32");
        assert_eq!(
            rules,
            vec![
                Rule {
                    port: 22,
                    cidr: "198.51.100.4/32".into()
                },
                Rule {
                    port: 65432,
                    cidr: "0.0.0.0/0".into()
                },
                Rule {
                    port: 65432,
                    cidr: "::/0".into()
                },
            ]
        );
        let v6 = rules[2].permission();
        assert_eq!(v6.ipv6_ranges()[0].cidr_ipv6(), Some("::/0"));
        assert!(v6.ip_ranges().is_empty());
    }
}
