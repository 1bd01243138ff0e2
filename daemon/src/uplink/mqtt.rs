//! The MQTT session's options: persistent session, keepalive, the retained last will,
//! credentials read from files, and TLS through rustls with a client certificate.

use std::sync::Arc;

use rumqttc::{LastWill, MqttOptions, QoS, TlsConfiguration, Transport};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::wire::{Topics, WIRE_VERSION};
use crate::config::UplinkSettings;

#[derive(Debug, thiserror::Error)]
pub enum MqttSetupError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no usable PEM data: {message}")]
    Pem {
        what: &'static str,
        path: std::path::PathBuf,
        message: String,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// Socket options: no Nagle delay (acknowledgements are small and a batch waits for
/// them), and a connect timeout that suits a slow link.
pub fn network_options(s: &UplinkSettings) -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n.set_connection_timeout(s.keep_alive.as_secs().clamp(5, 60));
    n
}

pub fn options(s: &UplinkSettings, topics: &Topics) -> Result<MqttOptions, MqttSetupError> {
    let mut o = MqttOptions::new(&s.device_id, &s.host, s.port);
    // The broker keeps the subscription and queues acknowledgements and work orders
    // while the device is away.
    o.set_clean_session(false);
    // A message is acknowledged to the broker once it has been handled (a push is in
    // the store), not when it is read: one read and then lost with the session or the
    // process would never come again.
    o.set_manual_acks(true);
    o.set_keep_alive(s.keep_alive);
    o.set_inflight((s.window * 2).clamp(8, u16::MAX as usize) as u16);
    // The incoming limit stays well above `max_downlink_bytes`: rumqttc drops the
    // connection on an oversize packet, the broker would redeliver it on the next one,
    // and the device would never get past it. Oversize messages are refused after
    // reading instead.
    // Outgoing: the uplink keeps every packet within `max_message_bytes`, topic and header
    // counted (`wire::packet_bytes`); rumqttc's own limit sits above it, so that it never
    // refuses one first.
    o.set_max_packet_size(
        s.max_downlink_bytes.saturating_mul(4).max(16 << 20),
        s.max_message_bytes + 64 * 1024,
    );
    let offline = serde_json::json!({"v": WIRE_VERSION, "state": "offline"}).to_string();
    o.set_last_will(LastWill::new(
        topics.status(),
        offline,
        QoS::AtLeastOnce,
        true,
    ));
    if let Some(user) = &s.username {
        let password = match &s.password_file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|source| MqttSetupError::Read {
                    what: "password file",
                    path: path.clone(),
                    source,
                })?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
            None => String::new(),
        };
        o.set_credentials(user, password);
    }
    if let Some(tls) = &s.tls {
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(
            client_config(tls)?,
        ))));
    }
    Ok(o)
}

fn client_config(tls: &crate::config::TlsFiles) -> Result<rustls::ClientConfig, MqttSetupError> {
    let mut config = authenticated(tls)?;
    config.alpn_protocols = tls.alpn.iter().map(|n| n.as_bytes().to_vec()).collect();
    Ok(config)
}

/// The TLS configuration with the roots to trust and the device's own certificate.
fn authenticated(tls: &crate::config::TlsFiles) -> Result<rustls::ClientConfig, MqttSetupError> {
    let read = |what: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| MqttSetupError::Read {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let pem_err = |what: &'static str, path: &std::path::Path, e: String| MqttSetupError::Pem {
        what,
        path: path.to_owned(),
        message: e,
    };
    let mut roots = rustls::RootCertStore::empty();
    let ca = read("CA file", &tls.ca)?;
    let mut any = false;
    for cert in CertificateDer::pem_slice_iter(&ca) {
        let cert = cert.map_err(|e| pem_err("CA file", &tls.ca, e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| pem_err("CA file", &tls.ca, e.to_string()))?;
        any = true;
    }
    if !any {
        return Err(pem_err("CA file", &tls.ca, "no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttSetupError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    match &tls.client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert_path, key_path)) => {
            let cert_pem = read("client certificate", cert_path)?;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<_, _>>()
                .map_err(|e| pem_err("client certificate", cert_path, e.to_string()))?;
            if certs.is_empty() {
                return Err(pem_err(
                    "client certificate",
                    cert_path,
                    "no certificate".into(),
                ));
            }
            let key_pem = read("client key", key_path)?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| pem_err("client key", key_path, e.to_string()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| MqttSetupError::Tls(e.to_string()))
        }
    }
}

/// What to check when the broker refuses the connection itself: the return codes of
/// MQTT 3.1.1, with the setting that usually causes each.
pub fn refusal_hint(code: rumqttc::ConnectReturnCode) -> &'static str {
    use rumqttc::ConnectReturnCode as C;
    match code {
        C::Success => "accepted",
        C::RefusedProtocolVersion => {
            "the broker refused MQTT 3.1.1 (return code 1); it must accept MQTT 3.1.1 clients"
        }
        C::BadClientId => {
            "the broker refused the client id (return code 2); check uplink.device_id against the broker's rules"
        }
        C::ServiceUnavailable => {
            "the broker is unavailable (return code 3); it is tried again"
        }
        C::BadUserNamePassword => {
            "the broker refused the user name or password (return code 4); check uplink.username and uplink.password_file"
        }
        C::NotAuthorized => {
            "the broker refused this device (return code 5, not authorized); check its certificate (uplink.cert_file) and the broker's access rules or policy for it"
        }
    }
}
