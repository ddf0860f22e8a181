//! The settings' parsing, defaults and checks.

use super::*;

#[test]
fn partial_file_keeps_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.ron");
    std::fs::write(
        &path,
        "(listen: \"127.0.0.1:4000\", rate_limit: (burst: 5.0))",
    )
    .unwrap();
    let config = Config::load(&path).unwrap();
    assert_eq!(config.listen, "127.0.0.1:4000".parse().unwrap());
    assert_eq!(config.rate_limit.burst, 5.0);
    assert_eq!(
        config.rate_limit.per_second,
        RateLimit::default().per_second
    );
    assert_eq!(config.max_frame_bytes, chat_protocol::DEFAULT_MAX_FRAME);
}

#[test]
fn printed_config_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.ron");
    std::fs::write(&path, Config::default().to_ron()).unwrap();
    assert_eq!(Config::load(&path).unwrap(), Config::default());
    let clustered = Config {
        backend: Backend::Nats(NatsBackend {
            urls: vec!["nats://a:4222".into(), "nats://b:4222".into()],
            stream_replicas: 3,
            prefix: "chat".into(),
            reader_idle_secs: 2.5,
        }),
        ..Config::default()
    };
    std::fs::write(&path, clustered.to_ron()).unwrap();
    assert_eq!(Config::load(&path).unwrap(), clustered);
    // As written in the docs: one pair of parentheses, defaults for the rest.
    std::fs::write(
        &path,
        "(backend: Nats(urls: [\"nats://a:4222\"], stream_replicas: 1))",
    )
    .unwrap();
    let loaded = Config::load(&path).unwrap();
    assert_eq!(
        loaded.backend,
        Backend::Nats(NatsBackend {
            urls: vec!["nats://a:4222".into()],
            stream_replicas: 1,
            ..NatsBackend::default()
        })
    );
    // Options keep their usual form beside it (a config of the TLS issue's time).
    std::fs::write(
        &path,
        "(tls: Some((cert_chain: \"/etc/c.pem\", key: \"/etc/k.pem\")), backend: Sqlite)",
    )
    .unwrap();
    let loaded = Config::load(&path).unwrap();
    assert_eq!(
        loaded.tls,
        Some(TlsFiles {
            cert_chain: "/etc/c.pem".into(),
            key: "/etc/k.pem".into(),
        })
    );
}

#[test]
fn unknown_field_and_bad_values_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.ron");
    std::fs::write(&path, "(lisen: \"127.0.0.1:1\")").unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(err.contains("lisen"), "{err}");

    std::fs::write(&path, "(max_connections: 0)").unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(err.contains("max_connections"), "{err}");

    std::fs::write(
        &path,
        "(ping_interval_secs: 100.0, idle_timeout_secs: 50.0)",
    )
    .unwrap();
    assert!(Config::load(&path).is_err());

    for shed in ["1e-7", "0.5", "-1.0", "NaN", "1e9"] {
        std::fs::write(&path, format!("(shed_delay_ms: {shed})")).unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("shed_delay_ms"), "{shed}: {err}");
    }
    for shed in ["0.0", "1.0", "5.0"] {
        std::fs::write(&path, format!("(shed_delay_ms: {shed})")).unwrap();
        Config::load(&path).unwrap();
    }

    for idle in ["0.0", "0.05", "-1.0", "NaN", "inf", "1e6"] {
        std::fs::write(&path, format!("(backend: Nats(reader_idle_secs: {idle}))")).unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("reader_idle_secs"), "{idle}: {err}");
    }
    for idle in ["0.1", "60.0", "86400.0"] {
        std::fs::write(&path, format!("(backend: Nats(reader_idle_secs: {idle}))")).unwrap();
        Config::load(&path).unwrap();
    }

    let err = Config::load(&dir.path().join("missing.ron"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn nats_urls_are_checked_before_connecting() {
    for good in [
        "nats://127.0.0.1:4222",
        "nats://n1.internal:4222",
        "tls://n1:4222",
        "nats://user:secret@n1:4222",
        "nats://[::1]:4222",
    ] {
        assert!(nats_url_ok(good), "{good}");
    }
    for bad in [
        "http//bad url",
        "127.0.0.1:4222",
        "http://n1:4222",
        "nats://",
        "nats://n1:4222/x",
        "nats://n 1:4222",
    ] {
        assert!(!nats_url_ok(bad), "{bad}");
        let config = Config {
            backend: Backend::Nats(NatsBackend {
                urls: vec![bad.into()],
                ..NatsBackend::default()
            }),
            ..Config::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("backend.urls") && err.contains("nats://HOST:PORT"),
            "{err}"
        );
    }
}
