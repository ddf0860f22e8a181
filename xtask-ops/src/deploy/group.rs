//! The deployment's security group: the relay port from anywhere, SSH from the operator,
//! and for a cluster the NATS ports (client 4222, routes 6222) from members of the same
//! group only (a rule naming the group itself), never from the internet.

use anyhow::Context;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{IpPermission, IpRange, Ipv6Range, ResourceType, UserIdGroupPair};

use super::ec2::{APP_TAG, aws_error, filter, tags};

/// NATS client connections (relay to NATS node), opened to the group's members only.
pub const NATS_CLIENT_PORT: u16 = 4222;
/// NATS cluster routes (node to node), opened to the group's members only.
pub const NATS_ROUTE_PORT: u16 = 6222;

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

/// Where a rule lets connections in from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// An address range (IPv4 or IPv6 CIDR).
    Cidr(String),
    /// Instances in this security group (its id).
    Group(String),
}

/// One ingress rule: a TCP port from one source.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub port: u16,
    pub source: Source,
}

impl Rule {
    fn cidr(port: u16, cidr: &str) -> Self {
        Self {
            port,
            source: Source::Cidr(cidr.to_owned()),
        }
    }

    fn permission(&self) -> IpPermission {
        let b = IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(i32::from(self.port))
            .to_port(i32::from(self.port));
        let what = match self.port {
            22 => "SSH",
            NATS_CLIENT_PORT => "NATS clients (relays of this cluster)",
            NATS_ROUTE_PORT => "NATS cluster routes",
            _ => "Secure Chat relay",
        };
        match &self.source {
            Source::Group(id) => b.user_id_group_pairs(
                UserIdGroupPair::builder()
                    .group_id(id)
                    .description(what)
                    .build(),
            ),
            Source::Cidr(cidr) if cidr.contains(':') => b.ipv6_ranges(
                Ipv6Range::builder()
                    .cidr_ipv6(cidr)
                    .description(what)
                    .build(),
            ),
            Source::Cidr(cidr) => {
                b.ip_ranges(IpRange::builder().cidr_ip(cidr).description(what).build())
            }
        }
        .build()
    }
}

/// The rules a deployment wants: the relay port from anywhere (v4 and v6), SSH from one
/// CIDR, and for a cluster (`cluster_group`: the group's own id) the NATS client and route
/// ports from the group's members only.
pub fn wanted_rules(port: u16, ssh_cidr: &str, cluster_group: Option<&str>) -> Vec<Rule> {
    let mut rules = vec![
        Rule::cidr(port, "0.0.0.0/0"),
        Rule::cidr(port, "::/0"),
        Rule::cidr(22, ssh_cidr),
    ];
    if let Some(group) = cluster_group {
        for port in [NATS_CLIENT_PORT, NATS_ROUTE_PORT] {
            rules.push(Rule {
                port,
                source: Source::Group(group.to_owned()),
            });
        }
    }
    rules.sort();
    rules
}

/// Creates the group if needed and makes its ingress rules exactly `wanted(group id)` (an
/// SSH rule for an old address of yours is revoked). Returns the group id.
pub async fn ensure_security_group(
    ec2: &Client,
    group_name: &str,
    name: &str,
    wanted: impl FnOnce(&str) -> Vec<Rule>,
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
    let wanted = wanted(&group_id);
    let wanted = wanted.as_slice();
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

/// The group's TCP ingress rules, one per (port, source).
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
        rules.extend(v4.chain(v6).map(|cidr| Rule::cidr(port, cidr)));
        rules.extend(
            perm.user_id_group_pairs()
                .iter()
                .filter_map(|p| p.group_id())
                .map(|id| Rule {
                    port,
                    source: Source::Group(id.to_owned()),
                }),
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_rules_open_the_relay_everywhere_and_ssh_to_one_address() {
        let rules = wanted_rules(65432, "198.51.100.4/32", None);
        assert_eq!(
            rules,
            vec![
                Rule::cidr(22, "198.51.100.4/32"),
                Rule::cidr(65432, "0.0.0.0/0"),
                Rule::cidr(65432, "::/0"),
            ]
        );
        let v6 = rules[2].permission();
        assert_eq!(v6.ipv6_ranges()[0].cidr_ipv6(), Some("::/0"));
        assert!(v6.ip_ranges().is_empty());
    }

    #[test]
    fn a_cluster_opens_nats_to_its_own_group_only() {
        let rules = wanted_rules(65432, "198.51.100.4/32", Some("sg-1"));
        let nats: Vec<&Rule> = rules
            .iter()
            .filter(|r| r.port != 65432 && r.port != 22)
            .collect();
        assert_eq!(
            nats.iter().map(|r| r.port).collect::<Vec<_>>(),
            [NATS_CLIENT_PORT, NATS_ROUTE_PORT]
        );
        for rule in nats {
            assert_eq!(rule.source, Source::Group("sg-1".into()));
            let p = rule.permission();
            assert!(p.ip_ranges().is_empty() && p.ipv6_ranges().is_empty());
            assert_eq!(p.user_id_group_pairs()[0].group_id(), Some("sg-1"));
        }
    }
}
