//! The cluster's layout in JetStream: the mailbox stream and the key-value buckets, made
//! when a relay starts and made again when NATS comes back without them (the memory-backed
//! session buckets vanish when every node restarts).

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};

use super::{ClusterError, sessions};
use crate::config::{Config, NatsBackend};

/// `wanted` with the limits whose lowering would make JetStream delete stored envelopes
/// kept where they are: the per-subject limit (JetStream trims every subject over a
/// lowered one, oldest first) is never lowered, and the byte limit not below the bytes
/// stored. The relays enforce a lower per-subject share by their tally
/// ([`super::tally`]); a lower byte limit takes effect at a later start, once the stream
/// holds less. The consumer limit is left as it is: [`raise_consumer_limit`] raises it
/// apart.
fn never_lower(mut wanted: stream::Config, existing: &stream::Info) -> stream::Config {
    let had = &existing.config;
    // 0 or -1: no limit, which lowering to any would trim too.
    let unlimited = had.max_messages_per_subject <= 0;
    if unlimited || had.max_messages_per_subject > wanted.max_messages_per_subject {
        tracing::warn!(
            "the mailbox keeps its per-subject limit of {} envelopes (lowering it would \
             delete queued envelopes); the relays hold senders to {}",
            had.max_messages_per_subject,
            wanted.max_messages_per_subject
        );
        wanted.max_messages_per_subject = had.max_messages_per_subject;
    }
    let stored = existing.state.bytes.min(i64::MAX as u64) as i64;
    if wanted.max_bytes < stored {
        tracing::warn!(
            "the mailbox holds {stored} bytes, more than queue.max_total_bytes ({}): its \
             limit stays at {stored} until it holds less (lowering it would delete queued \
             envelopes)",
            wanted.max_bytes
        );
        wanted.max_bytes = stored;
    }
    // Raised on its own ([`raise_consumer_limit`]), which some servers refuse.
    wanted.max_consumers = had.max_consumers;
    wanted
}

/// How long JetStream remembers a publish's message id to drop a retried duplicate.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The consumers the mailbox stream admits: every session in the cluster that had much
/// mail at once lately (within its relay's `reader_idle_secs`) reads its mailbox through
/// one of its own ([`super::delivery`]; little mail is read by gets), and relays make a
/// few more. Set
/// on the stream explicitly ([`raise_consumer_limit`]): nats-server 2.15.1 caps a stream
/// that sets no limit of its own (-1 or 0 there mean "the server's default") at 1,000
/// consumers (measured: the 1,001st is refused), which left the cluster's 1,001st
/// concurrent session without its mail. `i32::MAX`, the widest async-nats's stream
/// configuration holds: in effect no limit.
pub const MAILBOX_MAX_CONSUMERS: i32 = i32::MAX;

/// How long a relay keeps trying to set up the stream and buckets at start.
const SETUP_PATIENCE: Duration = Duration::from_secs(30);

/// The mailbox stream and the buckets.
pub(super) struct Handles {
    pub mailbox: stream::Stream,
    pub accounts: kv::Store,
    pub sessions: kv::Store,
    pub relays: kv::Store,
    pub registrations: kv::Store,
}

/// [`layout`], retried for [`SETUP_PATIENCE`] while JetStream is not ready (a cluster
/// that just started elects its meta leader first). Fails at once if the nodes lack the
/// storage the limits reserve.
pub(super) async fn layout_patiently(
    js: &jetstream::Context,
    config: &Config,
    nats: &NatsBackend,
    adopt_limits: bool,
) -> Result<Handles, ClusterError> {
    let deadline = tokio::time::Instant::now() + SETUP_PATIENCE;
    loop {
        match layout(js, config, nats, adopt_limits).await {
            Ok(done) => return Ok(done),
            // Not a matter of time: the nodes lack the storage the limits reserve.
            Err(e) if e.to_string().contains("insufficient") => return Err(e),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!("JetStream not ready: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Creates (or, if `adopt_limits`, updates to `config`'s limits) the mailbox stream and
/// opens the buckets, creating what is missing.
///
/// # Errors
/// [`ClusterError::Setup`] naming the stream or bucket JetStream refused.
pub(super) async fn layout(
    js: &jetstream::Context,
    config: &Config,
    nats: &NatsBackend,
    adopt_limits: bool,
) -> Result<Handles, ClusterError> {
    let replicas = nats.stream_replicas;
    let setup = |what, name: &str| {
        let name = name.to_owned();
        move |detail: String| ClusterError::Setup {
            what,
            name,
            replicas,
            detail,
        }
    };
    let queue = &config.queue;
    let name = format!("{}_mailbox", nats.prefix);
    let mailbox_config = stream::Config {
        name: name.clone(),
        subjects: vec![format!("{}.inbox.>", nats.prefix)],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_messages_per_subject: queue.limits().max_sender_envelopes as i64,
        discard: stream::DiscardPolicy::New,
        discard_new_per_subject: true,
        max_age: Duration::from_secs_f64(queue.max_age_secs),
        max_bytes: queue.max_total_bytes.min(i64::MAX as u64) as i64,
        max_message_size: (config.max_frame_bytes + 4096).min(i32::MAX as usize) as i32,
        // At most the max age (JetStream refuses a longer one).
        duplicate_window: DUPLICATE_WINDOW.min(Duration::from_secs_f64(queue.max_age_secs)),
        allow_direct: true,
        allow_atomic_publish: true,
        ..Default::default()
    };
    // The stream as it is (made now, or found), asked once; read again only if changed.
    let mut mailbox = js
        .get_or_create_stream(mailbox_config.clone())
        .await
        .map_err(|e| setup("stream", &name)(e.to_string()))?;
    if adopt_limits {
        let adopted = never_lower(mailbox_config, mailbox.cached_info());
        let updated = js
            .update_stream(&adopted)
            .await
            .map_err(|e| setup("stream", &name)(e.to_string()))?;
        raise_consumer_limit(js, updated.config).await;
        mailbox = js
            .get_stream(&name)
            .await
            .map_err(|e| setup("stream", &name)(e.to_string()))?;
    }
    let kv_config = |suffix: &str, storage, max_value_size| kv::Config {
        bucket: format!("{}_{suffix}", nats.prefix),
        history: 1,
        storage,
        num_replicas: replicas,
        max_value_size,
        ..Default::default()
    };
    let accounts = bucket(
        js,
        kv_config("accounts", stream::StorageType::File, 16 * 1024),
    )
    .await?;
    let sessions = bucket(js, kv_config("sessions", stream::StorageType::Memory, 256)).await?;
    // Relay id → heartbeat; a key not refreshed within the TTL expires with a marker that
    // every relay's watch sees.
    let relays = bucket(
        js,
        kv::Config {
            max_age: sessions::RELAY_TTL,
            limit_markers: Some(sessions::RELAY_TTL),
            ..kv_config("relays", stream::StorageType::Memory, 256)
        },
    )
    .await?;
    // Address name → the token bucket for new accounts ([`crate::limits::SharedBucket`]);
    // a key idle long enough to be full again expires.
    let registrations = bucket(
        js,
        kv::Config {
            max_age: registration_memory(config),
            ..kv_config("registrations", stream::StorageType::Memory, 256)
        },
    )
    .await?;
    Ok(Handles {
        mailbox,
        accounts,
        sessions,
        relays,
        registrations,
    })
}

/// Raises the consumer limit of the mailbox stream whose configuration is now `config` to
/// [`MAILBOX_MAX_CONSUMERS`] in an update of its own, changing nothing else: a stream made without it (by this relay a
/// moment ago, by an older relay, or lowered by hand) caps the sessions the whole cluster
/// can serve. Apart from the other limits' update so that a server that refuses it does
/// not stop the relay: nats-server before 2.12.5 refuses any change of a stream's consumer
/// limit, and any version refuses one above an account limit its operator set. Refused,
/// it is logged as a warning saying what that costs, and the relay starts.
async fn raise_consumer_limit(js: &jetstream::Context, mut config: stream::Config) {
    let had = config.max_consumers;
    if had == MAILBOX_MAX_CONSUMERS {
        return;
    }
    config.max_consumers = MAILBOX_MAX_CONSUMERS;
    let refused = match js.update_stream(&config).await {
        Ok(_) => {
            tracing::info!(
                "the mailbox stream's consumer limit raised from {had} to \
                 {MAILBOX_MAX_CONSUMERS} (each session with mail reads through a consumer \
                 of its own)"
            );
            return;
        }
        Err(e) => e.to_string(),
    };
    tracing::warn!(
        "the mailbox stream's consumer limit could not be raised ({refused}): each session \
         with mail reads it through a consumer of its own, so the cluster serves mail to \
         at most as many sessions at once as the stream admits consumers (1,000 on \
         nats-server 2.15 unless set). Use nats-server 2.12.5 or newer and no account \
         consumer limit below {MAILBOX_MAX_CONSUMERS}, then restart a relay"
    );
}

/// How long an address's registration bucket takes to fill up from empty: after that
/// long idle it is as good as missing.
fn registration_memory(config: &Config) -> Duration {
    let r = config.registrations;
    Duration::from_secs_f64((r.burst / r.per_hour * 3600.0).clamp(1.0, 30.0 * 86_400.0))
}

/// Creates a bucket, or opens it if it exists.
pub(super) async fn bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, ClusterError> {
    let (name, replicas) = (config.bucket.clone(), config.num_replicas);
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        Err(create) => js
            .get_key_value(&name)
            .await
            .map_err(|_| ClusterError::Setup {
                what: "bucket",
                name,
                replicas,
                detail: create.to_string(),
            }),
    }
}
